import { randomUUID } from 'node:crypto'
import { FairLru } from '../../fair-lru.js'
import { tenantOfKey, type Claim, type DoneRecord, type IdempotencyRecord, type IdempotencyStore, type RunningRecord } from './store.js'

export interface MemoryStoreOptions {
  /** Most keys held, by all tenants (see the class). */
  maxKeys: number
  /** Most bytes of stored answers held, by all tenants (keys and answers counted by length). */
  maxBytes: number
  /** Called for each outcome a bound pushed out before its TTL. */
  onEvict?: () => void
}

/**
 * Idempotency records of this instance: finished outcomes, expiring after the TTL, in a store
 * bounded for all tenants together but shared fairly (FairLru), running claims apart until their
 * lease ends. Guarantees the Redis store's semantics within one process (claims are synchronous,
 * hence atomic). Outcomes never grow past `maxKeys` or `maxBytes`: an evicted one is forgotten,
 * and a repeat then runs again, so size the bound above the keys a TTL's worth of traffic
 * carries. Past a bound the outcome that goes is the least recently used of the tenant holding
 * the most keys (or bytes): in one LRU for all, one tenant's keyed calls (even DELETEs of
 * missing ids, each a stored NOT_FOUND) pushed out another tenant's outcomes, whose retry then
 * ran its mutation a second time. An answer larger than `maxBytes` is not kept at all. Running
 * claims are never evicted: in the LRU, other keys' answers pushed a claim out while its call
 * ran, and a repeat then made a second Kernel call. They are as many as the keyed calls running
 * at once, each dropped when its call ends or its lease lapses.
 */
export class MemoryIdempotencyStore implements IdempotencyStore {
  readonly kind = 'memory'
  private readonly cache: FairLru<DoneRecord>
  /**
   * Claims of calls running now, with the end of their lease (performance.now()); `held`: a
   * call of this instance claimed in Redis (see `hold`), which `size` leaves out.
   */
  private readonly running = new Map<string, { record: RunningRecord, until: number, held: boolean }>()

  constructor (opts: MemoryStoreOptions) {
    // Its maps grow with the entries: nothing is allocated for the whole bound up front (lru-cache
    // given a `max` took some 50 bytes a key at start-up, 500 MB at 10 million keys).
    this.cache = new FairLru<DoneRecord>(opts.maxKeys, opts.maxBytes, opts.onEvict)
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
   * `held`: the claim is a hold (see `hold`), of a call of this process that claimed it in Redis.
   */
  peek (key: string): { record: IdempotencyRecord, ttlMs: number, held?: boolean } | undefined {
    const claim = this.claimOf(key)
    if (claim !== undefined) return { record: claim.record, ttlMs: claim.until - performance.now(), held: claim.held }
    const record = this.cache.get(key)
    if (record === undefined) return undefined
    return { record, ttlMs: this.cache.remainingTtl(key) }
  }

  async claim (key: string, hash: string, leaseMs: number, user?: string): Promise<Claim> {
    const record = this.claimOf(key)?.record ?? this.cache.get(key)
    if (record !== undefined) return { won: false, record }
    const token = randomUUID()
    this.running.set(key, { record: running(hash, token, user), until: performance.now() + leaseMs, held: false })
    return { won: true, token }
  }

  /**
   * Holds `key` for a call of this process that claimed it elsewhere (in Redis, under `token`):
   * a repeat here waits for it even if Redis goes away meanwhile.
   */
  hold (key: string, hash: string, token: string, leaseMs: number, user?: string): void {
    this.running.set(key, { record: running(hash, token, user), until: performance.now() + leaseMs, held: true })
  }

  async complete (key: string, token: string, record: DoneRecord, ttlMs: number): Promise<void> {
    const claim = this.claimOf(key)
    if (claim === undefined ? this.cache.has(key) : claim.record.token !== token) return
    this.running.delete(key)
    this.cache.set(key, tenantOfKey(key), record, sizeOf(key, record), ttlMs)
  }

  async release (key: string, token: string): Promise<void> {
    if (this.claimOf(key)?.record.token === token) this.running.delete(key)
  }

  /** Drops every lapsed claim (as many as the keyed calls running), and expired outcomes a slice at a time, `maxSlices` at most (FairLru.purgeAllStale; the plugin's gauge, before reporting the size). */
  async purgeAll (maxSlices = Infinity): Promise<void> {
    const now = performance.now()
    for (const [key, claim] of this.running) if (claim.until <= now) this.running.delete(key)
    await this.cache.purgeAllStale(maxSlices)
  }

  /**
   * The claims of calls running now, after dropping lapsed ones: those claimed here (`memory`)
   * and the holds of calls claimed in Redis (`redis`). As many as the keyed calls running (the
   * plugin's gauge).
   */
  runningClaims (): { memory: number, redis: number } {
    const now = performance.now()
    let held = 0
    for (const [key, claim] of this.running) {
      if (claim.until <= now) this.running.delete(key)
      else if (claim.held) held++
    }
    return { memory: this.running.size - held, redis: held }
  }

  /** The running claim on `key`, unless its lease has lapsed. */
  private claimOf (key: string): { record: RunningRecord, until: number, held: boolean } | undefined {
    const claim = this.running.get(key)
    if (claim === undefined || claim.until > performance.now()) return claim
    this.running.delete(key)
    return undefined
  }
}

/** A running claim, for `user` when the call has one. */
function running (hash: string, token: string, user: string | undefined): RunningRecord {
  return user === undefined ? { state: 'running', hash, token } : { state: 'running', hash, token, user }
}

/** What an outcome is counted as against the byte bound: its key and text (its user's too, up to 256 characters) by length. */
function sizeOf (key: string, record: DoneRecord): number {
  return key.length + 64 + (record.user?.length ?? 0) + (record.body?.length ?? 0) + (record.error?.detail.length ?? 0) + (record.findings?.length ?? 0) * 64
}
