import { LRUCache } from 'lru-cache'
import { hit, type WindowCount, type WindowState } from './window.js'

export interface MemoryStoreOptions {
  /** Keys kept; beyond it the least recently used key is forgotten (default 100,000). */
  maxKeys?: number
  /** The clock, in ms (tests move it by hand). */
  now?: () => number
}

/**
 * The sliding window in this process: the embedded default, and the fallback while Redis is
 * away. Guarantees: a check is synchronous and never throws; at most `maxKeys` keys are held
 * (about 100 bytes each). Never shared between instances: with N instances a limit is N times
 * looser, which is what the Redis store is for. A key evicted under pressure starts afresh.
 */
export class MemoryWindowStore {
  /**
   * Made at the first check: lru-cache allocates its arrays for `max` keys when made, 68 ms of
   * CPU for 100,000, paid at every start of the gateway (and by every app a test builds) though
   * most never check a key in memory (with Redis, only while it is away).
   */
  private keys: LRUCache<string, WindowState> | undefined
  private readonly maxKeys: number
  private readonly now: () => number

  constructor (options: MemoryStoreOptions = {}) {
    this.maxKeys = options.maxKeys ?? 100_000
    this.now = options.now ?? Date.now
  }

  /** Keys held now (the metric `mantle_rate_limit_memory_keys`). */
  get size (): number {
    return this.keys?.size ?? 0
  }

  check (key: string, windowMs: number, max: number): WindowCount {
    const keys = this.keys ??= new LRUCache({ max: this.maxKeys })
    let state = keys.get(key)
    if (state === undefined) {
      state = { w: 0, c: 0, p: 0 }
      keys.set(key, state)
    }
    return hit(state, this.now(), windowMs, max)
  }
}
