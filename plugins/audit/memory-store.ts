import Denque from 'denque'
import { type AuditEntry, type AuditPage, type AuditQuery, type AuditStore, type ChainSource, type StoredEntry, type VerifyOptions, type VerifyResult, type WalkStart, type WalkedRow, ChainWalker, GENESIS, storedEntry, suffixed, walkChain } from './entry.js'

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
  }

  /**
   * The same walk as PostgreSQL's (walkChain), with the same bound; between pages other calls
   * run, and writes meanwhile may drop the oldest entries (the walk then goes on from the last
   * dropped).
   */
  async verify (range: { from?: Date, to?: Date }, opts: VerifyOptions = {}): Promise<VerifyResult> {
    return await walkChain(this.source, async () => this.start(range), opts)
  }

  private start (range: { from?: Date, to?: Date }): WalkStart {
    const from = range.from?.getTime() ?? -Infinity
    const to = range.to?.getTime() ?? Infinity
    const ring = this.ring
    const inRange = (i: number): boolean => { const t = ring.peekAt(i)!.timestamp; return t >= from && t <= to }
    // From the first to the last position holding an entry of the range (as PostgreSQL's); with
    // none, where the range would be: the first entry at or after `from`.
    let first = 0
    while (first < ring.length && ring.peekAt(first)!.timestamp < from) first++
    let last = ring.length - 1
    while (last >= first && !inRange(last)) last--
    if (last >= first) while (!inRange(first)) first++
    const before = first === 0 ? null : ring.peekAt(first - 1)!
    const walker = before === null ? new ChainWalker(this.anchorSeq, this.anchorHash) : ChainWalker.after(before)
    // The position before the range's first entry; with nothing in the range, nothing is walked,
    // but the entries around it must still link.
    const after = first < ring.length ? ring.peekAt(first)!.seq - 1 : (before?.seq ?? this.anchorSeq)
    return { walker, after, end: last >= first ? ring.peekAt(last)!.seq : after, anchorSeq: this.anchorSeq }
  }

  /** The index of the first entry after position `seq` (the ring is in position order). */
  private indexAfter (seq: number): number {
    let lo = 0
    let hi = this.ring.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (this.ring.peekAt(mid)!.seq <= seq) lo = mid + 1
      else hi = mid
    }
    return lo
  }

  private readonly source: ChainSource = {
    page: async (after, end, n) => {
      const rows: WalkedRow[] = []
      for (let i = this.indexAfter(after); i < this.ring.length && rows.length < n; i++) {
        const e = this.ring.peekAt(i)!
        if (e.seq > end) break
        rows.push({ e, intact: true })
      }
      return { anchorSeq: this.anchorSeq, anchorHash: this.anchorHash, rows }
    },
    tail: async (after) => {
      const next = this.ring.peekAt(this.indexAfter(after))
      return { next: next === undefined ? null : { e: next, intact: true }, headSeq: this.headSeq, headHash: this.headHash, anchorSeq: this.anchorSeq, anchorHash: this.anchorHash }
    },
    at: async (seq) => {
      const e = this.ring.peekAt(this.indexAfter(seq - 1))
      return e?.seq === seq ? { e, intact: true } : null
    }
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

  /** One process's clock stamps the entries and judges their age: theirs is `timestamp`. */
  async prune (ageMs: number, limit: number): Promise<number> {
    const before = Date.now() - ageMs
    let n = 0
    while (n < limit && n < this.ring.length && this.ring.peekAt(n)!.timestamp < before) n++
    this.drop(n)
    return n
  }

  async close (): Promise<void> {}
}
