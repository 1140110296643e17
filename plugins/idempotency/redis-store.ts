import { randomUUID } from 'node:crypto'
import type { Redis } from 'ioredis'
import type { Claim, DoneRecord, IdempotencyRecord, IdempotencyStore } from './store.js'

// Each step is one Lua script: one round trip, atomic for its key. The running record is its
// holder's token: complete and release act only while the key still holds that exact value,
// so a holder whose lease lapsed never overwrites or frees a newer claim.
const CLAIM = `
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false`
const COMPLETE = `
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0`
const RELEASE = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`

/** The commands the store runs on its keys (its scripts'), which Redis must permit (plugins/redis checks them). */
export const IDEMPOTENCY_COMMANDS: readonly string[] = ['get', 'set', 'del']

interface Scripts {
  mantleIdemClaim: (key: string, running: string, leaseMs: number) => Promise<string | null>
  mantleIdemComplete: (key: string, running: string, done: string, ttlMs: number) => Promise<number>
  mantleIdemRelease: (key: string, running: string) => Promise<number>
}

/**
 * Idempotency records shared by every instance on one Redis, as JSON strings under
 * `bff:idem:{tenant}:{op}:{key}` with a TTL: a running claim lapses after its lease, a result
 * after the store's TTL. Every method throws when Redis fails; the stage then falls back.
 */
export class RedisIdempotencyStore implements IdempotencyStore {
  readonly kind = 'redis'
  private readonly scripts: Scripts

  constructor (private readonly client: Redis) {
    // Defined once per connection (ioredis sends EVALSHA, and the script on a cache miss).
    if (typeof (client as unknown as Partial<Scripts>).mantleIdemClaim !== 'function') {
      client.defineCommand('mantleIdemClaim', { numberOfKeys: 1, lua: CLAIM })
      client.defineCommand('mantleIdemComplete', { numberOfKeys: 1, lua: COMPLETE })
      client.defineCommand('mantleIdemRelease', { numberOfKeys: 1, lua: RELEASE })
    }
    this.scripts = client as unknown as Scripts
  }

  /**
   * The claim Redis holds when `claim(key, hash, leaseMs, running)` wins: made before the call,
   * so that a claim whose answer never came (a command timeout while Redis carried it out) is
   * still known, and an outcome can be copied over it (`seed`).
   */
  static running (hash: string): string {
    return JSON.stringify({ state: 'running', hash, token: randomUUID() })
  }

  async claim (key: string, hash: string, leaseMs: number, running = RedisIdempotencyStore.running(hash)): Promise<Claim> {
    const found = await this.scripts.mantleIdemClaim(key, running, leaseMs)
    // `running` itself: an earlier claim of this call with it, whose answer never came (a
    // command timeout), was carried out. The key is this call's.
    if (found === null || found === running) return { won: true, token: running }
    return { won: false, record: decode(found) }
  }

  async complete (key: string, token: string, record: DoneRecord, ttlMs: number): Promise<void> {
    await this.scripts.mantleIdemComplete(key, token, JSON.stringify(record), ttlMs)
  }

  async release (key: string, token: string): Promise<void> {
    await this.scripts.mantleIdemRelease(key, token)
  }

  /**
   * Writes a final outcome stored elsewhere (the memory store, during an outage) for the `ttlMs`
   * it has left, unless the key holds another record: one is left as it is, except the Redis
   * claim the outcome answers (`heldAs`), which it replaces.
   */
  async seed (key: string, record: DoneRecord, ttlMs: number): Promise<void> {
    const { heldAs, ...outcome } = record
    await this.scripts.mantleIdemComplete(key, heldAs ?? '', JSON.stringify(outcome), ttlMs)
  }
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
  if (value !== null && typeof value === 'object' && typeof value.hash === 'string') {
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
