import { randomUUID } from 'node:crypto'
import type { Redis } from 'ioredis'
import { FOREIGN_LUA } from '../redis/lua.js'
import { tenantIndex, type Claim, type DoneRecord, type IdempotencyRecord, type IdempotencyStore } from './store.js'

// Each step is one Lua script: one round trip, atomic for its key. The running record is its
// holder's token: complete and release act only while the key still holds that exact value,
// so a holder whose lease lapsed never overwrites or frees a newer claim.
//
// Each also keeps the tenant's index (KEYS[2], `bff:idem:{tenant}`): a sorted set of its records,
// each scored by when it expires (Redis' clock, as its PX). A claim first drops the entries whose
// time has passed (records gone by their TTL or lease leave the count so, each once), then wins
// only while the tenant holds fewer than ARGV[4] records; else it answers the ms until the
// tenant's first record expires (at least 1), and claims nothing. Without it one tenant's keyed
// mutations filled Redis: with `noeviction` every tenant's claims were refused (memory fallback),
// with an LRU policy other tenants' outcomes were evicted and their repeats ran again. The index
// expires with its last record. Two keys per script: like the cache's, not for Redis Cluster.
//
// A key of another type under either name (a hash or a list some other program wrote) failed the
// scripts WRONGTYPE, taken for a Redis outage: the call ran from memory, on each instance a repeat
// reached, and its outcome was offered to Redis every 250 ms for its TTL. A record's is read as a
// record this version cannot read (an empty text: the key is taken, 409); an index's is dropped
// and made anew (it only counts the tenant's records: the records themselves are kept).
const NOW = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)`
const INDEX = `${FOREIGN_LUA}
local function index (now, ms)
  if foreign(redis.pcall('ZADD', KEYS[2], now + ms, ARGV[#ARGV])) then
    redis.call('DEL', KEYS[2])
    redis.call('ZADD', KEYS[2], now + ms, ARGV[#ARGV])
  end
  if redis.call('PTTL', KEYS[2]) < ms then redis.call('PEXPIRE', KEYS[2], ms) end
end`
const CLAIM = `${INDEX}
local v = redis.pcall('GET', KEYS[1])
if foreign(v) then return '' end
if v then return v end${NOW}
if foreign(redis.pcall('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)) then redis.call('DEL', KEYS[2]) end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(first[2]) - now)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
index(now, tonumber(ARGV[2]))
return false`
const COMPLETE = `${INDEX}
local v = redis.pcall('GET', KEYS[1])
if foreign(v) then return 0 end
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])${NOW}
  index(now, tonumber(ARGV[3]))
  return 1
end
return 0`
const RELEASE = `${FOREIGN_LUA}
local v = redis.pcall('GET', KEYS[1])
if foreign(v) then return 0 end
if v == ARGV[1] then
  if foreign(redis.pcall('ZREM', KEYS[2], ARGV[2])) then redis.call('DEL', KEYS[2]) end
  return redis.call('DEL', KEYS[1])
end
return 0`

/** The commands the store runs on its keys (its scripts'), which Redis must permit (plugins/redis checks them). */
export const IDEMPOTENCY_COMMANDS: readonly string[] = ['get', 'set', 'del', 'time', 'zadd', 'zrem', 'zremrangebyscore', 'zcard', 'zrange', 'pttl', 'pexpire']

/** Each script's keys: the record's, then its tenant's index; the record's member in it is the last argument. */
interface Scripts {
  mantleIdemClaim2: (key: string, index: string, running: string, leaseMs: number, max: number, member: string) => Promise<string | number | null>
  mantleIdemComplete2: (key: string, index: string, running: string, done: string, ttlMs: number, member: string) => Promise<number>
  mantleIdemRelease2: (key: string, index: string, running: string, member: string) => Promise<number>
}

/**
 * A claim refused because the key's tenant holds `maxKeysPerTenant` records in Redis: nothing was
 * claimed, and no call may run under the key (its repeats would run again). `retryAfterMs`: until
 * the tenant's first record expires, freeing a place.
 */
export class TenantFullError extends Error {
  constructor (readonly retryAfterMs: number, readonly max: number) {
    super(`the tenant holds ${max} idempotency records in Redis`)
    this.name = 'TenantFullError'
  }
}

export interface RedisStoreOptions {
  /** Most records (running claims and outcomes) one tenant holds (BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT). */
  maxKeysPerTenant: number
}

/**
 * Idempotency records shared by every instance on one Redis, as JSON strings under
 * `bff:idem:{tenant}:{op}:{key}` with a TTL: a running claim lapses after its lease, a result
 * after the store's TTL. Every method throws when Redis fails; the stage then falls back.
 */
export class RedisIdempotencyStore implements IdempotencyStore {
  readonly kind = 'redis'
  private readonly scripts: Scripts

  private readonly maxKeysPerTenant: number

  constructor (private readonly client: Redis, opts: RedisStoreOptions) {
    // Defined once per connection (ioredis sends EVALSHA, and the script on a cache miss).
    if (typeof (client as unknown as Partial<Scripts>).mantleIdemClaim2 !== 'function') {
      client.defineCommand('mantleIdemClaim2', { numberOfKeys: 2, lua: CLAIM })
      client.defineCommand('mantleIdemComplete2', { numberOfKeys: 2, lua: COMPLETE })
      client.defineCommand('mantleIdemRelease2', { numberOfKeys: 2, lua: RELEASE })
    }
    this.scripts = client as unknown as Scripts
    this.maxKeysPerTenant = opts.maxKeysPerTenant
  }

  /**
   * The claim Redis holds when `claim(key, hash, leaseMs, running)` wins: made before the call,
   * so that a claim whose answer never came (a command timeout while Redis carried it out) is
   * still known, and an outcome can be copied over it (`seed`).
   */
  static running (hash: string, user?: string): string {
    return JSON.stringify({ state: 'running', hash, token: randomUUID(), user })
  }

  async claim (key: string, hash: string, leaseMs: number, running = RedisIdempotencyStore.running(hash)): Promise<Claim> {
    const { index, member } = indexOf(key)
    const found = await this.scripts.mantleIdemClaim2(key, index, running, leaseMs, this.maxKeysPerTenant, member)
    if (typeof found === 'number') throw new TenantFullError(found, this.maxKeysPerTenant)
    // `running` itself: an earlier claim of this call with it, whose answer never came (a
    // command timeout), was carried out. The key is this call's.
    if (found === null || found === running) return { won: true, token: running }
    return { won: false, record: decode(found) }
  }

  async complete (key: string, token: string, record: DoneRecord, ttlMs: number): Promise<void> {
    const { index, member } = indexOf(key)
    await this.scripts.mantleIdemComplete2(key, index, token, JSON.stringify(record), ttlMs, member)
  }

  async release (key: string, token: string): Promise<void> {
    const { index, member } = indexOf(key)
    await this.scripts.mantleIdemRelease2(key, index, token, member)
  }

  /**
   * Writes a final outcome stored elsewhere (the memory store, during an outage) for the `ttlMs`
   * it has left, unless the key holds another record: one is left as it is, except the Redis
   * claim the outcome answers (`heldAs`), which it replaces.
   */
  async seed (key: string, record: DoneRecord, ttlMs: number): Promise<void> {
    const { heldAs, ...outcome } = record
    const { index, member } = indexOf(key)
    await this.scripts.mantleIdemComplete2(key, index, heldAs ?? '', JSON.stringify(outcome), ttlMs, member)
  }
}

/** The tenant index of a store key (see `tenantIndex`): every key the store is given is one. */
function indexOf (key: string): { index: string, member: string } {
  const found = tenantIndex(key)
  if (found === null) throw new Error(`not an idempotency store key: ${key}`)
  return found
}

/**
 * A record under an idempotency key that this version cannot read (written by another version,
 * or damaged). Redis answered: not an outage. The key is taken all the same, by a call whose
 * outcome is unknown: the stage refuses it (409), never runs the call.
 */
export class UnreadableRecordError extends Error {
  constructor () {
    super('unreadable idempotency record')
    this.name = 'UnreadableRecordError'
  }
}

/** A stored record, checked: anything else under our key is an UnreadableRecordError, not a result. */
export function decode (text: string): IdempotencyRecord {
  let value: Partial<Record<string, unknown>> | null = null
  try {
    value = JSON.parse(text) as Partial<Record<string, unknown>> | null
  } catch {}
  if (value !== null && typeof value === 'object' && typeof value.hash === 'string' && (value.user === undefined || typeof value.user === 'string')) {
    if (value.state === 'running' && typeof value.token === 'string') return value as unknown as IdempotencyRecord
    if (value.state === 'done' && typeof value.status === 'number' && (value.body === null || (typeof value.body === 'string' && isJson(value.body)))) {
      const error = value.error as DoneRecord['error'] | undefined
      if ((error === null || (typeof error === 'object' && error !== undefined && (error.code === 'KERNEL_REJECTED' || error.code === 'NOT_FOUND'))) && verdictRead(value)) {
        return value as unknown as IdempotencyRecord
      }
    }
  }
  throw new UnreadableRecordError()
}

const RISKS = new Set(['none', 'low', 'medium', 'high', 'critical'])
const CATEGORIES = new Set(['injection', 'secret', 'pii'])

/** A done record's firewall verdict: none (records of older versions have none), or a readable one. */
function verdictRead (value: Partial<Record<string, unknown>>): boolean {
  if (value.risk === undefined && value.findings === undefined) return true
  return typeof value.risk === 'string' && RISKS.has(value.risk) && Array.isArray(value.findings) &&
    value.findings.every((f: Partial<Record<string, unknown>> | null) => f !== null && typeof f === 'object' && typeof f.category === 'string' && CATEGORIES.has(f.category) &&
      typeof f.type === 'string' && typeof f.score === 'number' && typeof f.field === 'string')
}

/** Whether a stored answer parses (a replay parses it: one that does not was a 500). */
function isJson (text: string): boolean {
  try {
    JSON.parse(text)
    return true
  } catch {
    return false
  }
}
