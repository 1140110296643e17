import { type AuditEntry, type AuditPage, type AuditQuery, type AuditStore, type StoredEntry, type VerifyResult, ChainWalker, GENESIS, hashEntry, suffixed } from './entry.js'

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
  private readonly ring: StoredEntry[] = []
  private readonly ids = new Set<string>()
  private readonly requestIds = new Set<string>()
  private headSeq = 0
  private headHash = GENESIS
  /** The last entry dropped: verification of the oldest kept entry starts there. */
  private anchorSeq = 0
  private anchorHash = GENESIS

  constructor (private readonly opts: MemoryStoreOptions) {}

  get size (): number { return this.ring.length }

  async write (batch: AuditEntry[]): Promise<void> {
    this.writeNow(batch)
  }

  /** Synchronous: the writer uses it when its queue is full. */
  writeNow (batch: AuditEntry[]): void {
    for (const e of batch) {
      if (this.ids.has(e.id)) continue
      const requestId = this.requestIds.has(e.requestId) ? suffixed(e) : e.requestId
      const seq = this.headSeq + 1
      const stored: StoredEntry = { ...e, requestId, seq, previousHash: this.headHash, hash: '' }
      stored.hash = hashEntry(this.headHash, seq, stored)
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
  }

  private drop (n: number): void {
    const gone = this.ring.splice(0, n)
    for (const e of gone) {
      this.ids.delete(e.id)
      this.requestIds.delete(e.requestId)
    }
    const last = gone[gone.length - 1]
    if (last !== undefined) {
      this.anchorSeq = last.seq
      this.anchorHash = last.hash
    }
  }

  async verify (range: { from?: Date, to?: Date }): Promise<VerifyResult> {
    const from = range.from?.getTime() ?? -Infinity
    const to = range.to?.getTime() ?? Infinity
    const first = this.ring.findIndex(e => e.timestamp >= from)
    let last = -1
    for (let i = this.ring.length - 1; i >= 0; i--) if (this.ring[i].timestamp <= to) { last = i; break }
    if (first === -1 || last < first) return { ok: true, checked: 0, firstBroken: null }
    const anchor = first === 0 ? { seq: this.anchorSeq, hash: this.anchorHash } : { seq: this.ring[first - 1].seq, hash: this.ring[first - 1].hash }
    const walker = new ChainWalker(anchor.seq, anchor.hash)
    for (let i = first; i <= last && walker.step(this.ring[i]); i++);
    if (last === this.ring.length - 1) walker.endsAt(this.headSeq, this.headHash, this.ring[last])
    return walker.result()
  }

  async query (q: AuditQuery): Promise<AuditPage> {
    const entries: StoredEntry[] = []
    for (let i = this.ring.length - 1; i >= 0 && entries.length <= q.limit; i--) {
      const e = this.ring[i]
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
    while (n < limit && n < this.ring.length && this.ring[n].timestamp < before.getTime()) n++
    this.drop(n)
    return n
  }

  async close (): Promise<void> {}
}
