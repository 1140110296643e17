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
  private readonly keys: LRUCache<string, WindowState>
  private readonly now: () => number

  constructor (options: MemoryStoreOptions = {}) {
    this.keys = new LRUCache({ max: options.maxKeys ?? 100_000 })
    this.now = options.now ?? Date.now
  }

  /** Keys held now (the metric `mantle_rate_limit_memory_keys`). */
  get size (): number {
    return this.keys.size
  }

  check (key: string, windowMs: number, max: number): WindowCount {
    let state = this.keys.get(key)
    if (state === undefined) {
      state = { w: 0, c: 0, p: 0 }
      this.keys.set(key, state)
    }
    return hit(state, this.now(), windowMs, max)
  }
}
