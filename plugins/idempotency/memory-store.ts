import { randomUUID } from 'node:crypto'
import { LRUCache } from 'lru-cache'
import type { Claim, DoneRecord, IdempotencyRecord, IdempotencyStore, RunningRecord } from './store.js'

export interface MemoryStoreOptions {
  /** Most keys held; the least recently used goes first beyond it. */
  maxKeys: number
  /** Most bytes of stored answers held (keys and answers counted by length). */
  maxBytes: number
}

/**
 * Idempotency records of this instance: finished outcomes in a bounded LRU whose entries expire
 * after the TTL, running claims apart until their lease ends. Guarantees the Redis store's
 * semantics within one process (claims are synchronous, hence atomic). Outcomes never grow past
 * `maxKeys` or `maxBytes`: an evicted one is forgotten, and a repeat then runs again, so size
 * the bound above the keys a TTL's worth of traffic carries. An answer larger than `maxBytes` is
 * not kept at all. Running claims are never evicted: in the LRU, other keys' answers pushed a
 * claim out while its call ran, and a repeat then made a second Kernel call. They are as many as
 * the keyed calls running at once, each dropped when its call ends or its lease lapses.
 */
export class MemoryIdempotencyStore implements IdempotencyStore {
  readonly kind = 'memory'
  private readonly cache: LRUCache<string, DoneRecord>
  private readonly maxKeys: number
  /**
   * Claims of calls running now, with the end of their lease (performance.now()); `held`: a
   * call of this instance claimed in Redis (see `hold`), which `size` leaves out.
   */
  private readonly running = new Map<string, { record: RunningRecord, until: number, held: boolean }>()

  constructor (opts: MemoryStoreOptions) {
    // No `max`: given one, lru-cache allocates its arrays for that many entries up front (some
    // 50 bytes each: 5 MB at the default 100000 keys, 500 MB at 10 million, in every instance,
    // with Redis up too, where this store is the fallback). Without, they grow with the entries;
    // the key bound is kept in complete(), the byte bound by maxSize.
    this.maxKeys = opts.maxKeys
    this.cache = new LRUCache<string, DoneRecord>({
      maxSize: opts.maxBytes,
      sizeCalculation: (record, key) => key.length + 64 + (record.body?.length ?? 0) + (record.error?.detail.length ?? 0) + (record.findings?.length ?? 0) * 64
    })
  }

  /**
   * Keys this store answers for now (expired ones until they are next touched or purged): not
   * the holds on calls claimed in Redis, so that with Redis up it says 0 unless Redis failed.
   */
  get size (): number {
    let n = this.cache.size
    for (const claim of this.running.values()) if (!claim.held) n++
    return n
  }

  /**
   * The record held for `key` and how long it has left (ms), without claiming it: the plugin asks
   * this first once Redis is back, so that a key claimed here during an outage stays answered here.
   */
  peek (key: string): { record: IdempotencyRecord, ttlMs: number } | undefined {
    const claim = this.claimOf(key)
    if (claim !== undefined) return { record: claim.record, ttlMs: claim.until - performance.now() }
    const record = this.cache.get(key)
    if (record === undefined) return undefined
    return { record, ttlMs: this.cache.getRemainingTTL(key) }
  }

  async claim (key: string, hash: string, leaseMs: number): Promise<Claim> {
    const record = this.claimOf(key)?.record ?? this.cache.get(key)
    if (record !== undefined) return { won: false, record }
    const token = randomUUID()
    this.running.set(key, { record: { state: 'running', hash, token }, until: performance.now() + leaseMs, held: false })
    return { won: true, token }
  }

  /**
   * Holds `key` for a call of this process that claimed it elsewhere (in Redis, under `token`):
   * a repeat here waits for it even if Redis goes away meanwhile.
   */
  hold (key: string, hash: string, token: string, leaseMs: number): void {
    this.running.set(key, { record: { state: 'running', hash, token }, until: performance.now() + leaseMs, held: true })
  }

  async complete (key: string, token: string, record: DoneRecord, ttlMs: number): Promise<void> {
    const claim = this.claimOf(key)
    if (claim === undefined ? this.cache.has(key) : claim.record.token !== token) return
    this.running.delete(key)
    this.cache.set(key, record, { ttl: ttlMs })
    // One key in at most: the least recently used goes, as lru-cache's `max` would.
    if (this.cache.size > this.maxKeys) this.cache.pop()
  }

  async release (key: string, token: string): Promise<void> {
    if (this.claimOf(key)?.record.token === token) this.running.delete(key)
  }

  /** Drops expired entries (the plugin calls it before reporting the size). */
  purge (): void {
    this.cache.purgeStale()
    const now = performance.now()
    for (const [key, claim] of this.running) if (claim.until <= now) this.running.delete(key)
  }

  /** The running claim on `key`, unless its lease has lapsed. */
  private claimOf (key: string): { record: RunningRecord, until: number, held: boolean } | undefined {
    const claim = this.running.get(key)
    if (claim === undefined || claim.until > performance.now()) return claim
    this.running.delete(key)
    return undefined
  }
}
