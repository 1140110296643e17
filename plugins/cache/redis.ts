import { randomInt } from 'node:crypto'
import type { Redis } from 'ioredis'
import type { CachedAnswer } from './memory.js'
import { INVALIDATE_CHANNEL } from './keys.js'

// The shared tier. Each tag of a tenant has a version (an integer); an entry is stored with the
// versions of its tags as they were BEFORE the Kernel call, and only if they are still those
// (one Lua script: compare and set, atomic), and it is served only while they are (a read is
// one MGET of the entry and its tag versions). An invalidation increments the versions and
// publishes on INVALIDATE_CHANNEL in the same script, so every instance also drops the tags from
// its in-process tier. A tag that has no version (never used, expired, or evicted by Redis under
// maxmemory) reads as '' and matches no stored entry: a version is born random, never 0, so a
// tag key that went away and came back cannot take an entry stored before it went for current.

// KEYS[1] the entry, KEYS[2..] its tag keys; ARGV: versions read before the Kernel call, body,
// entry ms, tag ms, a random version for the tags that have none. 1 stored, 0 raced. A tag's
// lifetime is only ever lengthened, here and on invalidation.
const WRITE = `
local v = {}
for i = 2, #KEYS do v[i - 1] = redis.call('GET', KEYS[i]) or '' end
if table.concat(v, ',') ~= ARGV[1] then return 0 end
local ms = tonumber(ARGV[4])
for i = 2, #KEYS do
  if v[i - 1] == '' then
    v[i - 1] = ARGV[5]
    redis.call('SET', KEYS[i], ARGV[5], 'PX', ms)
  elseif redis.call('PTTL', KEYS[i]) < ms then
    redis.call('PEXPIRE', KEYS[i], ms)
  end
end
redis.call('SET', KEYS[1], table.concat(v, ',') .. '\\n' .. ARGV[2], 'PX', ARGV[3])
return 1
`
// KEYS the tag keys; ARGV: tag ms, the message to publish, a random version for the tags that
// have none (INCR would make it 1, which an entry stored under an evicted version may hold).
const INVALIDATE = `
local ms = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCR', KEYS[i]) else redis.call('SET', KEYS[i], ARGV[3]) end
  if redis.call('PTTL', KEYS[i]) < ms then redis.call('PEXPIRE', KEYS[i], ms) end
end
redis.call('PUBLISH', '${INVALIDATE_CHANNEL}', ARGV[2])
return #KEYS
`

/** A tag version for a tag that has none: random, within Redis' (and Lua's exact) integers. */
function bornVersion (): string {
  return String(randomInt(1, 2 ** 47))
}

/** How much longer than the entry stored under it a tag version lives, at the least. */
const TAG_MARGIN_MS = 60_000

interface CacheCommands {
  mantleCacheWrite: (n: number, ...args: string[]) => Promise<number>
  mantleCacheInvalidate: (n: number, ...args: string[]) => Promise<number>
}

export interface RedisRead {
  answer: CachedAnswer | null
  /** The tag versions at the time of the read, to be checked again when the refill is stored. */
  versions: string
}

/**
 * The Redis tier on the instance's shared command connection. Every method may throw (Redis
 * away, command timeout): the caller falls back to its in-process tier. It never stores an
 * answer whose tags were invalidated after the versions it was given were read.
 */
export class RedisTier {
  private readonly commands: CacheCommands

  /** @param tagMs how long a tag version outlives the last entry or invalidation that used it */
  constructor (private readonly client: Redis, private readonly tagMs: number) {
    // defineCommand runs EVALSHA and loads the script once when Redis does not know it.
    if (!('mantleCacheWrite' in client)) {
      client.defineCommand('mantleCacheWrite', { lua: WRITE })
      client.defineCommand('mantleCacheInvalidate', { lua: INVALIDATE })
    }
    this.commands = client as unknown as CacheCommands
  }

  /**
   * The entry and its tags' current versions in one MGET (atomic, as every Redis command is; no
   * script needed to read): the entry counts only when it was stored under those versions.
   */
  async read (key: string, tagKeys: readonly string[]): Promise<RedisRead> {
    const [entry, ...tags] = await this.client.mget(key, ...tagKeys)
    const versions = tags.map(v => v ?? '').join(',')
    if (entry === null) return { answer: null, versions }
    const nl = entry.indexOf('\n')
    if (nl < 0 || entry.slice(0, nl) !== versions) return { answer: null, versions }
    return { answer: decode(entry.slice(nl + 1)), versions }
  }

  async write (key: string, tagKeys: readonly string[], versions: string, answer: CachedAnswer, now: number): Promise<boolean> {
    const ms = answer.keepUntil - now
    if (ms <= 0) return false
    // The tags outlive this entry whatever lifetime the manifest gave it: a reload may lengthen
    // an operation's ttl beyond what the tag lifetime was computed from at start-up.
    const tagMs = Math.max(this.tagMs, ms + TAG_MARGIN_MS)
    return await this.commands.mantleCacheWrite(1 + tagKeys.length, key, ...tagKeys, versions, encode(answer), String(ms), String(tagMs), bornVersion()) === 1
  }

  async invalidate (tagKeys: readonly string[], message: string): Promise<void> {
    if (tagKeys.length === 0) return
    await this.commands.mantleCacheInvalidate(tagKeys.length, ...tagKeys, String(this.tagMs), message, bornVersion())
  }
}

// policy, status, etag, freshUntil, staleUntil, keepUntil, then the JSON, one per line (the JSON
// holds no raw newline). An entry written before the policy line reads as another policy.
function encode (a: CachedAnswer): string {
  return `${a.policy}\n${a.status}\n${a.etag}\n${a.freshUntil}\n${a.staleUntil}\n${a.keepUntil}\n${a.json}`
}

function decode (body: string): CachedAnswer | null {
  const fields = body.split('\n', 6)
  if (fields.length < 6) return null
  const json = body.slice(fields.reduce((n, f) => n + f.length + 1, 0))
  let value: unknown
  try {
    value = JSON.parse(json)
  } catch {
    return null
  }
  return { policy: fields[0], value, json, status: Number(fields[1]), etag: fields[2], freshUntil: Number(fields[3]), staleUntil: Number(fields[4]), keepUntil: Number(fields[5]) }
}
