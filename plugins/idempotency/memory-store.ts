import { randomUUID } from 'node:crypto'
import { LRUCache } from 'lru-cache'
import type { Claim, DoneRecord, IdempotencyRecord, IdempotencyStore } from './store.js'

export interface MemoryStoreOptions {
  /** Most keys held; the least recently used goes first beyond it. */
  maxKeys: number
  /** Most bytes of stored answers held (keys and answers counted by length). */
  maxBytes: number
}

/**
 * Idempotency records of this instance, in a bounded LRU whose entries expire: a running claim
 * after its lease, a result after the TTL. Guarantees the Redis store's semantics within one
 * process (claims are synchronous, hence atomic). Never grows past `maxKeys` or `maxBytes`: an
 * evicted key is forgotten, and a repeat then runs again, so size the bound above the keys a
 * TTL's worth of traffic carries. An answer larger than `maxBytes` is not kept at all.
 */
export class MemoryIdempotencyStore implements IdempotencyStore {
  readonly kind = 'memory'
  private readonly cache: LRUCache<string, IdempotencyRecord>

  constructor (opts: MemoryStoreOptions) {
    this.cache = new LRUCache<string, IdempotencyRecord>({
      max: opts.maxKeys,
      maxSize: opts.maxBytes,
      sizeCalculation: (record, key) => key.length + 64 + (record.state === 'done' ? (record.body?.length ?? 0) + (record.error?.detail.length ?? 0) : 0)
    })
  }

  /** Keys held now (expired ones until they are next touched or purged). */
  get size (): number {
    return this.cache.size
  }

  /**
   * The record held for `key` and how long it has left (ms), without claiming it: the plugin asks
   * this first once Redis is back, so that a key claimed here during an outage stays answered here.
   */
  peek (key: string): { record: IdempotencyRecord, ttlMs: number } | undefined {
    const record = this.cache.get(key)
    if (record === undefined) return undefined
    return { record, ttlMs: this.cache.getRemainingTTL(key) }
  }

  async claim (key: string, hash: string, leaseMs: number): Promise<Claim> {
    const record = this.cache.get(key)
    if (record !== undefined) return { won: false, record }
    const token = randomUUID()
    this.cache.set(key, { state: 'running', hash, token }, { ttl: leaseMs })
    return { won: true, token }
  }

  async complete (key: string, token: string, record: DoneRecord, ttlMs: number): Promise<void> {
    const current = this.cache.get(key)
    if (current === undefined || (current.state === 'running' && current.token === token)) this.cache.set(key, record, { ttl: ttlMs })
  }

  async release (key: string, token: string): Promise<void> {
    const current = this.cache.get(key)
    if (current !== undefined && current.state === 'running' && current.token === token) this.cache.delete(key)
  }

  /** Drops expired entries (the plugin calls it before reporting the size). */
  purge (): void {
    this.cache.purgeStale()
  }
}
