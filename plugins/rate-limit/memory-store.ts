import { FairLru } from '../../fair-lru.js'
import { hit, type WindowCount, type WindowState } from './window.js'

export interface MemoryStoreOptions {
  /** Keys kept; beyond it the least recently used key of the tenant holding the most is forgotten (default 100,000). */
  maxKeys?: number
  /** The clock, in ms (tests move it by hand). */
  now?: () => number
}

const PREFIX = 'bff:ratelimit:'

/** The holder of every address's key: a name no tenant's key has (a tenant's `:` is escaped). */
const ADDRESSES = ':ip'

/**
 * Whose a key is, for eviction: its tenant (`bff:ratelimit:{tenant}:...`), or ADDRESSES for every
 * address's (`bff:ratelimit:ip:{address}`, the address escaped: no further `:`), which are one
 * holder together. A tenant named `ip` (`bff:ratelimit:ip:{user}:{op}`, `bff:ratelimit:ip:*`)
 * is its own: taken for the addresses, a flood of them evicted its counts first.
 */
function holder (key: string): string {
  if (!key.startsWith(PREFIX)) return ''
  const end = key.indexOf(':', PREFIX.length)
  if (end === -1) return key
  const tenant = key.slice(PREFIX.length, end)
  return tenant === 'ip' && key.indexOf(':', end + 1) === -1 && !key.endsWith(':*') ? ADDRESSES : tenant
}

/**
 * The sliding window in this process: the embedded default, and the fallback while Redis is
 * away. Guarantees: a check is synchronous and never throws; at most `maxKeys` keys are held
 * (about 100 bytes each). Never shared between instances: with N instances a limit is N times
 * looser, which is what the Redis store is for. A key evicted under pressure starts afresh.
 * Past the bound, the key that goes is the least recently used of the tenant (or of the
 * addresses) holding the most, but an address's new key only ever pushes out an address's (see
 * check): with one LRU of all, requests from 100,000 addresses (an IPv6 /48 holds 65,536 /64s)
 * pushed out every tenant's counts, and a limit spent started afresh.
 */
export class MemoryWindowStore {
  /**
   * Made at the first check: most instances never check a key in memory (with Redis, only while
   * it is away).
   */
  private keys: FairLru<WindowState> | undefined
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
    const keys = this.keys ??= new FairLru(this.maxKeys, Infinity)
    let state = keys.get(key)
    if (state === undefined) {
      state = { w: 0, c: 0, p: 0 }
      const who = holder(key)
      // An address's new key, the store full: the addresses' least recently used goes, never a
      // tenant's. Left to the holder with the most, a tenant holding more keys than the addresses
      // (many users, a count per operation each) lost its oldest to every new address until the
      // addresses held as many: a client with an IPv6 /48 (no token needed) reset the spent limits
      // of that tenant's users, its own among them. Addresses cost nothing to make; a tenant's
      // keys come from verified tokens. With no address held, one tenant key goes (the fair way).
      if (who === ADDRESSES && keys.size >= this.maxKeys) {
        const oldest = keys.itemsOf(ADDRESSES).next()
        if (oldest.done !== true) keys.delete(oldest.value[0])
      }
      keys.set(key, who, state, 1, Infinity)
    }
    return hit(state, this.now(), windowMs, max)
  }
}
