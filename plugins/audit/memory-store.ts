import Denque from 'denque'
import { setImmediate as nextTurn } from 'node:timers/promises'
import { type AuditEntry, type AuditPage, type AuditQuery, type AuditStore, type StoredEntry, type VerifyResult, ChainWalker, GENESIS, storedEntry, suffixed } from './entry.js'

// Entries a verify hashes between two turns of the event loop (a few ms): in one piece, a verify
// of the default 100,000 entries held every other request for 205 ms, of the most allowed for 20 s.
const VERIFY_SLICE = 2000

export interface MemoryStoreOptions {
  /** Most entries kept; beyond it the oldest is dropped (and counted). */
  max: number
  onEvict?: (n: number) => void
}

/**
 * The embedded default's audit store: a bounded ring in process memory with the same chain,
 * verify and query as PostgreSQL. It guarantees the chain of what it holds; it never survives
 * a restart and drops its oldest entries beyond `max` (production refuses it).
 */
export class MemoryAuditStore implements AuditStore {
  readonly kind = 'memory' as const
  // A deque, oldest first: dropping the oldest is O(1) (Array#splice(0, n) moved the whole
  // ring, 100,000 entries by default, for every batch once it was full).
  private readonly ring = new Denque<StoredEntry>()
  private readonly ids = new Set<string>()
  private readonly requestIds = new Set<string>()
  private headSeq = 0
  private headHash = GENESIS
  /** The last entry dropped: verification of the oldest kept entry starts there. */
  private anchorSeq = 0
  private anchorHash = GENESIS
  /** Entries dropped from the front so far: a verify that waited finds its place by it. */
  private dropped = 0

  constructor (private readonly opts: MemoryStoreOptions) {}

  get size (): number { return this.ring.length }

  async write (batch: AuditEntry[]): Promise<number> {
    return this.writeNow(batch)
  }

  /** Synchronous: the writer uses it when its queue is full. Returns the entries stored. */
  writeNow (batch: AuditEntry[]): number {
    let n = 0
    for (const e of batch) {
      if (this.ids.has(e.id)) continue
      n++
      const requestId = this.requestIds.has(e.requestId) ? suffixed(e) : e.requestId
      const seq = this.headSeq + 1
      const stored = storedEntry(e, requestId, seq, this.headHash)
      this.ring.push(stored)
      this.ids.add(e.id)
      this.requestIds.add(requestId)
      this.headSeq = seq
      this.headHash = stored.hash
    }
    const over = this.ring.length - this.opts.max
    if (over > 0) {
      this.drop(over)
      this.opts.onEvict?.(over)
    }
    return n
  }

  private drop (n: number): void {
    for (let i = 0; i < n; i++) {
      const e = this.ring.shift()!
      this.ids.delete(e.id)
      this.requestIds.delete(e.requestId)
      this.anchorSeq = e.seq
      this.anchorHash = e.hash
    }
    this.dropped += n
  }

  async verify (range: { from?: Date, to?: Date }): Promise<VerifyResult> {
    const from = range.from?.getTime() ?? -Infinity
    const to = range.to?.getTime() ?? Infinity
    const ring = this.ring
    let first = 0
    while (first < ring.length && ring.peekAt(first)!.timestamp < from) first++
    let last = ring.length - 1
    while (last >= 0 && ring.peekAt(last)!.timestamp > to) last--
    // Nothing in the range: nothing is walked, but the entries around it must still link.
    if (last < first) last = first - 1
    const before = first === 0 ? null : ring.peekAt(first - 1)!
    let walker = before === null ? new ChainWalker(this.anchorSeq, this.anchorHash) : ChainWalker.after(before)
    // Where position i of the ring as it was is now: writes while the walk waits drop the oldest.
    const dropped = this.dropped
    const now = (i: number): number => i - (this.dropped - dropped)
    let i = first
    for (let walked = 0; i <= last; i++, walked++) {
      if (walked !== 0 && walked % VERIFY_SLICE === 0) await nextTurn()
      let k = now(i)
      if (k < 0) {
        // Entries still to walk were dropped meanwhile: go on from the oldest kept, linked to the
        // last dropped, as a verify begun now would.
        const checked = walker.checked
        walker = new ChainWalker(this.anchorSeq, this.anchorHash)
        walker.checked = checked
        i -= k
        k = 0
        if (i > last) break
      }
      if (!walker.step(ring.peekAt(k)!)) break
    }
    if (i > last) walker.endsAt(ring.peekAt(Math.max(0, now(last + 1))) ?? null, this.headSeq, this.headHash)
    return walker.result()
  }

  async query (q: AuditQuery): Promise<AuditPage> {
    const entries: StoredEntry[] = []
    for (let i = this.ring.length - 1; i >= 0 && entries.length <= q.limit; i--) {
      const e = this.ring.peekAt(i)!
      if (q.beforeSeq !== undefined && e.seq >= q.beforeSeq) continue
      if (q.tenant !== undefined && e.tenantId !== q.tenant) continue
      if (q.from !== undefined && e.timestamp < q.from.getTime()) continue
      if (q.to !== undefined && e.timestamp > q.to.getTime()) continue
      if (q.requestId !== undefined && e.requestId !== q.requestId && !e.requestId.startsWith(q.requestId + '~')) continue
      if (q.action !== undefined && e.action !== q.action) continue
      if (q.status !== undefined && e.status !== q.status) continue
      entries.push(e)
    }
    const more = entries.length > q.limit
    if (more) entries.pop()
    return { entries, nextSeq: more ? entries[entries.length - 1].seq : null }
  }

  async prune (before: Date, limit: number): Promise<number> {
    let n = 0
    while (n < limit && n < this.ring.length && this.ring.peekAt(n)!.timestamp < before.getTime()) n++
    this.drop(n)
    return n
  }

  async close (): Promise<void> {}
}
