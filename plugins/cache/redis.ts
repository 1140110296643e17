import { randomInt } from 'node:crypto'
import type { Redis } from 'ioredis'
import { LRUCache } from 'lru-cache'
import type { CachedAnswer } from './memory.js'
import { INVALIDATE_CHANNEL } from './keys.js'
import { FOREIGN_LUA } from '../redis/lua.js'

// The shared tier. Each tag of a tenant has a version (an integer); an entry is stored with the
// versions of its tags as they were BEFORE the Kernel call, and only if they are still those
// (one Lua script: compare and set, atomic), and it is served only while they are (a read is
// one MGET of the entry and its tag versions). An invalidation increments the versions and
// publishes on INVALIDATE_CHANNEL in the same script, so every instance also drops the tags from
// its in-process tier.
// A tag that has no version (never used, expired, or evicted by Redis under maxmemory) is given
// a random one by the read that finds it missing (one more command, only then), and an
// invalidation gives a missing tag a random one too: no version is ever born 0 or 1, so a tag
// key that went away and came back cannot take an entry stored before it went for current.
// Before, a missing tag read as 0, the version every tag was born with. A version below 2^40 is
// that earlier release's (counted from 0, and counted from 0 again after an eviction): during a
// rolling deploy it is read as missing too, and replaced, lest a count that repeated take an
// invalidated entry for current.

/** Versions below this are the earlier release's (it counted from 0); ours are born above it. */
const LEGACY_BELOW = 2 ** 40

// A tag key's value, nil when there is none or it is no string: a key of another type (a list,
// a hash, which some other program wrote under the name) failed GET with WRONGTYPE, and the
// script with it: every read of the tag, and every invalidation replayed with it, failed, and
// each failure held the whole shared tier off for a second. SET replaces it with a version.
const GET_STRING = `
local function get (k)
  local v = redis.pcall('GET', k)
  if type(v) == 'table' then return nil end
  return v
end
`
// KEYS[1] the entry, KEYS[2..n] its tag keys, then its tenant's index (a sorted set of the
// tenant's entries, each scored by when it expires, Redis' clock) and its tenant's sizes (a hash:
// entry -> the bytes it was counted as, '' -> their total). An entry counts as its key three times
// (the entry's, its member in the index and its field in the sizes), its text, and 192 bytes for
// Redis' own keeping of the three (Redis 7 takes 120 to 320 bytes more an entry than this count,
// its allocator's rounding included: README sizes maxmemory for it). ARGV: versions read before the Kernel
// call, body, entry ms, tag ms, the bytes one tenant's entries may take (0: no bound). 1 stored,
// 0 raced, 2 not stored: the tenant's entries would take more than their bound. A tag's lifetime
// is only ever lengthened, here and on invalidation. The index first lets go of the tenant's
// entries past their time (256 at most a write: the others with the next writes, counted meanwhile).
// Without the bound one tenant's distinct reads (an entry each) filled Redis: under an LRU policy
// other tenants' idempotency records were evicted (their repeats ran their mutations again) and
// their rate-limit windows; under noeviction every tenant's writes were refused.
// An index or sizes key of another type (which some other program wrote under the name) is
// replaced, as a tag key is (GET_STRING): its WRONGTYPE failed every write of the tenant, and
// each failure held the whole shared tier off for a second, every tenant's reads with it. An
// index replaced takes the sizes with it (their counts would never be let go); the tenant's
// entries already in Redis then go uncounted until they expire.
const WRITE = GET_STRING + FOREIGN_LUA + `
local n = #KEYS - 2
local v = {}
for i = 2, n do v[i - 1] = get(KEYS[i]) or '' end
if table.concat(v, ',') ~= ARGV[1] then return 0 end
local index, sizes = KEYS[n + 1], KEYS[n + 2]
local ms = tonumber(ARGV[3])
local size = 3 * #KEYS[1] + #ARGV[1] + #ARGV[2] + 192
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.pcall('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, 256)
if foreign(gone) then
  redis.call('DEL', index, sizes)
  gone = {}
end
local total = redis.pcall('HGET', sizes, '')
if foreign(total) then
  redis.call('DEL', sizes)
  total = false
end
local freed = 0
for _, m in ipairs(gone) do
  freed = freed + (tonumber(redis.call('HGET', sizes, m)) or 0)
  redis.call('HDEL', sizes, m)
end
if #gone > 0 then redis.call('ZREM', index, unpack(gone)) end
total = math.max(0, (tonumber(total) or 0) - freed)
local old = tonumber(redis.call('HGET', sizes, KEYS[1])) or 0
local max = tonumber(ARGV[5])
if max > 0 and total - old + size > max then
  if freed > 0 then redis.call('HSET', sizes, '', total) end
  return 2
end
redis.call('SET', KEYS[1], ARGV[1] .. '\\n' .. ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', index, now + ms, KEYS[1])
redis.call('HSET', sizes, KEYS[1], size, '', total - old + size)
if redis.call('PTTL', index) < ms then redis.call('PEXPIRE', index, ms) end
if redis.call('PTTL', sizes) < ms then redis.call('PEXPIRE', sizes, ms) end
local tagMs = tonumber(ARGV[4])
for i = 2, n do
  if redis.call('PTTL', KEYS[i]) < tagMs then redis.call('PEXPIRE', KEYS[i], tagMs) end
end
return 1
`
// KEYS the tag keys; ARGV: tag ms, the message to publish up to its versions, a random version
// for the tags that have none (INCR would make one 1), '1' to move only the tags below their
// floors (else '0': every tag), then each tag's floor: the latest version this instance knew it
// by (0: none). A tag below its floor went back (a replica promoted behind the primary, which
// lost the writes it had not had): it takes the floor's next, never a version it had before,
// which entries stored before an invalidation lost with those writes may carry. A tag Redis
// refuses to write (full, under maxmemory with noeviction) is deleted, which DEL may even then: a
// tag with no version matches no entry stored before. Its version is '' then (and that of a tag
// missing and left so). The message, published when any tag moved, carries the versions: other
// instances learn them (floors). The tags moved and the versions of all.
// A user Redis does not let publish on the channel (`-publish`, an ACL changed while the gateway
// runs) is refused before any tag moves (Redis 7 says so: redis.acl_check_cmd): the move and its
// message are one unit. Before, the tags moved and the PUBLISH then failed the script, and each
// replay of the pending invalidation (one a second) moved them again, every entry stored under
// them since dropped each time. Redis 6 cannot be asked: there the tags still move first.
const INVALIDATE = GET_STRING + `
local check = redis.acl_check_cmd
if check and not check('publish', '${INVALIDATE_CHANNEL}', '') then
  return redis.error_reply('NOPERM this user has no permissions to publish to the channel ${INVALIDATE_CHANNEL}: no tag moved')
end
local ms = tonumber(ARGV[1])
local only = ARGV[4] == '1'
local moved = 0
local out = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  local v = tonumber(get(k))
  local floor = tonumber(ARGV[4 + i]) or 0
  if only and (v == nil or v >= floor) then
    out[i] = v and string.format('%.0f', v) or ''
  else
    moved = moved + 1
    local keep = redis.call('PTTL', k)
    if keep < ms then keep = ms end
    local r
    if v ~= nil and v >= floor then
      r = redis.pcall('INCR', k)
      if type(r) ~= 'table' then r = redis.pcall('PEXPIRE', k, keep) end
    else
      local n = floor + 1
      if v == nil and tonumber(ARGV[3]) > n then n = tonumber(ARGV[3]) end
      r = redis.pcall('SET', k, string.format('%.0f', n), 'PX', keep)
    end
    if type(r) == 'table' and r.err then
      redis.call('DEL', k)
      out[i] = ''
    else
      out[i] = redis.call('GET', k)
    end
  end
end
if moved > 0 then
  redis.call('PUBLISH', '${INVALIDATE_CHANNEL}', ARGV[2] .. '"' .. table.concat(out, '","') .. '"]}')
end
return {moved, out}
`
// KEYS tag keys a read found missing (or with an earlier release's version); ARGV: a random
// version, tag ms. Their versions, each the one a concurrent read may have given it first.
const BORN = GET_STRING + `
local out = {}
for i = 1, #KEYS do
  local v = get(KEYS[i])
  if not v or (tonumber(v) or 0) < ${LEGACY_BELOW} then
    v = ARGV[1]
    redis.call('SET', KEYS[i], v, 'PX', ARGV[2])
  end
  out[i] = v
end
return out
`

/**
 * The commands the tier runs on its keys (its reads' MGET and its scripts'), which Redis must
 * permit (plugins/redis checks them, and PUBLISH on INVALIDATE_CHANNEL).
 */
export const CACHE_COMMANDS: readonly string[] = ['mget', 'get', 'set', 'del', 'incr', 'pttl', 'pexpire', 'time', 'zadd', 'zrangebyscore', 'zrem', 'hget', 'hset', 'hdel']

/** A random version, within Redis' (and Lua's exact) integers, above every legacy one. */
const randomVersion = (): string => String(randomInt(LEGACY_BELOW, 2 ** 47))

/** A version the read must replace: none, or one of the release that counted from 0. */
const replaced = (version: string | null): boolean => version === null || !(Number(version) >= LEGACY_BELOW)

/**
 * How long a version is remembered (RedisTier's `known`) after a move that left its tag `tagMs`
 * to live, at the least: a tenth less, and no more than 30 s less (the message's way here), so
 * that with an hour's ttl the entries stored before a lost invalidation stay guarded almost as
 * long as they may live.
 */
const knownMs = (tagMs: number): number => Math.max(1, Math.floor(tagMs - Math.min(30_000, tagMs / 10)))

/**
 * Each tenant's index of its entries in Redis and their sizes (see WRITE), by its URI-encoded
 * tenant: under the entries' own prefix `bff:cache:`, which an ACL written for the stores' keys
 * already grants (prefixes of their own made such a user's gateway refuse to start once
 * upgraded), with an empty operation name, which no operation's entry key (`bff:cache:{op}:`) has.
 */
const INDEX_PREFIX = 'bff:cache::index:'
const SIZES_PREFIX = 'bff:cache::bytes:'

/**
 * The index and the sizes of the tenant of an entry key `bff:cache:{op}:{tenant}:{hash}` (see
 * WRITE), by its tenant as the key holds it (URI-encoded); those of '' for another key.
 */
export function tenantBudgetKeys (entryKey: string): [index: string, sizes: string] {
  const parts = entryKey.split(':', 5)
  const tenant = parts.length === 5 && parts[0] === 'bff' && parts[1] === 'cache' ? parts[3] : ''
  return [INDEX_PREFIX + tenant, SIZES_PREFIX + tenant]
}

/** How much longer than the entry stored under it a tag version lives, at the least. */
const TAG_MARGIN_MS = 60_000

interface CacheCommands {
  mantleCacheWrite: (n: number, ...args: string[]) => Promise<number>
  mantleCacheInvalidate: (n: number, ...args: string[]) => Promise<[number, string[]]>
  mantleCacheBorn: (n: number, ...args: string[]) => Promise<string[]>
}

export interface RedisRead {
  answer: CachedAnswer | null
  /** The tag versions at the time of the read, to be checked again when the refill is stored. */
  versions: string
  /**
   * Tags Redis holds at a version below the latest this instance knew them by (absent: none):
   * they went back, and entries their invalidations dropped may be current again. The read's
   * answer is null then; they are to be invalidated anew (`invalidate` raises them past what was known).
   */
  behind?: readonly string[] | undefined
}

/**
 * The Redis tier on the instance's shared command connection. Every method may throw (Redis
 * away, command timeout): the caller falls back to its in-process tier. It never stores an
 * answer whose tags were invalidated after the versions it was given were read.
 */
export class RedisTier {
  private readonly commands: CacheCommands
  /**
   * The latest version of each tag this instance knows: from its own invalidations and those it
   * heard (their messages carry the versions). Redis answering a tag below it went back (a
   * replica promoted behind its primary, which lost the writes it had not had yet): the entries
   * stored before the invalidations it lost matched their tags' versions again, and every
   * instance served them as hits, the in-process tiers emptied by the failover's reconnect.
   * Bounded: a tag pushed out is no longer checked. Each is forgotten before the tag can expire
   * in Redis (an invalidation leaves it `tagMs` to live, at the least; knownMs keeps a margin for
   * the message's way here): a tag that expired is born anew at a random version, lower than the
   * one it had half the time, and was taken for Redis gone back (an invalidation of what had
   * been stored under it since, and a warning of a failover that never happened).
   */
  private readonly known: LRUCache<string, number>
  /**
   * The database of the connection (REDIS_URL's /db), which the messages name: Redis delivers a
   * PUBLISH to the subscribers of every database, and a version of another database's tag (a
   * second deployment's, on the same server) is no version of this one's. Learnt, a tag of this
   * database below it was raised past it, the other's instances learnt that and raised theirs,
   * and so on: every read of the tag on either side a miss, a raise and a message.
   */
  readonly db: number

  /**
   * @param tagMs how long a tag version outlives the last entry or invalidation that used it
   * @param maxKnown how many tags' latest versions are remembered (`known`)
   * @param onEvict called for each version `known` pushed out at its bound (that tag's going back
   *   is no longer seen)
   * @param maxBytesPerTenant the bytes one tenant's entries may take in Redis (each counted as its
   *   key three times, its text, and 192 more: see WRITE; BFF_CACHE_REDIS_MAX_BYTES_PER_TENANT):
   *   past it an answer is not written there (Infinity: no bound)
   * @param onFull called for each answer not written for its tenant's bound
   */
  constructor (private readonly client: Redis, readonly tagMs: number, maxKnown = 10_000, onEvict?: () => void, private readonly maxBytesPerTenant = Infinity, private readonly onFull?: () => void) {
    this.known = new LRUCache<string, number>({ max: maxKnown, ttl: knownMs(tagMs), ...(onEvict === undefined ? {} : { dispose: (_v: number, _k: string, reason: LRUCache.DisposeReason) => { if (reason === 'evict') onEvict() } }) })
    this.db = client.options.db ?? 0
    // defineCommand runs EVALSHA and loads the script once when Redis does not know it.
    if (!('mantleCacheWrite' in client)) {
      client.defineCommand('mantleCacheWrite', { lua: WRITE })
      client.defineCommand('mantleCacheInvalidate', { lua: INVALIDATE })
      client.defineCommand('mantleCacheBorn', { lua: BORN })
    }
    this.commands = client as unknown as CacheCommands
  }

  /** Tags whose latest version is remembered (`known`; expired ones until lru-cache drops them). */
  get knownSize (): number {
    return this.known.size
  }

  /**
   * The entry and its tags' current versions in one MGET (atomic, as every Redis command is; no
   * script needed to read): the entry counts only when it was stored under those versions.
   */
  async read (key: string, tagKeys: readonly string[]): Promise<RedisRead> {
    const [entry, ...tags] = await this.client.mget(key, ...tagKeys)
    if (tags.some(replaced)) {
      const missing = tagKeys.filter((_, i) => replaced(tags[i]))
      // Missing tags get their versions now, before the Kernel call, so that every concurrent
      // fill under them reads the same ones; no entry was stored under them. Only a read that
      // finds a tag missing writes (once per tag lifetime; a read of present tags is the MGET
      // alone), and it must be the read: born at the first write, every other fill that read
      // the tag missing looked raced and was not stored; and a fill that read it missing would
      // store a pre-invalidation answer if the version an invalidation gave the tag meanwhile
      // were evicted before the write, which would find it missing as the read did.
      const born = await this.commands.mantleCacheBorn(missing.length, ...missing, randomVersion(), String(this.tagMs))
      let n = 0
      for (let i = 0; i < tags.length; i++) {
        if (!replaced(tags[i])) continue
        tags[i] = born[n++]
        // A version born anew (the tag evicted, or Redis emptied) is no earlier one gone back.
        this.known.delete(tagKeys[i])
      }
      return { answer: null, versions: tags.join(','), behind: this.behind(tagKeys, tags) }
    }
    const versions = tags.join(',')
    const behind = this.behind(tagKeys, tags)
    if (entry === null || behind !== undefined) return { answer: null, versions, behind }
    const nl = entry.indexOf('\n')
    if (nl < 0 || entry.slice(0, nl) !== versions) return { answer: null, versions, behind }
    return { answer: decode(entry.slice(nl + 1)), versions, behind }
  }

  /** The tags whose version read is below the latest this instance knew (none: undefined; the usual case costs a lookup per tag). */
  private behind (tagKeys: readonly string[], versions: ReadonlyArray<string | null>): string[] | undefined {
    if (this.known.size === 0) return undefined
    let out: string[] | undefined
    for (let i = 0; i < tagKeys.length; i++) {
      const latest = this.known.peek(tagKeys[i])
      if (latest !== undefined && Number(versions[i]) < latest) (out ??= []).push(tagKeys[i])
    }
    return out
  }

  /**
   * Versions another instance's invalidation gave its tags (its message, of this `db`): the
   * latest known of each. `ms`: the tag time of the instance that moved them (its message's), which
   * its script gave them at the least: remembered for knownMs of it if shorter than this tier's
   * (another manifest), since the tags may expire then and be born anew lower.
   */
  learn (tagKeys: readonly string[], versions: readonly unknown[], ms: number = this.tagMs): void {
    const ttl = ms < this.tagMs ? knownMs(ms) : undefined
    for (let i = 0; i < tagKeys.length; i++) this.remember(tagKeys[i], versions[i], ttl)
  }

  private remember (tagKey: string, version: unknown, ttl?: number): void {
    const n = typeof version === 'string' && version !== '' ? Number(version) : NaN
    // '': the tag was deleted (Redis full): whatever version it is born with next is no step back.
    if (version === '') this.known.delete(tagKey)
    else if (Number.isSafeInteger(n) && n > (this.known.peek(tagKey) ?? 0)) this.known.set(tagKey, n, ttl === undefined ? undefined : { ttl })
  }

  async write (key: string, tagKeys: readonly string[], versions: string, answer: CachedAnswer, now: number): Promise<boolean> {
    const ms = answer.keepUntil - now
    if (ms <= 0) return false
    // The tags outlive this entry whatever lifetime the manifest gave it: a reload may lengthen
    // an operation's ttl beyond what the tag lifetime was computed from at start-up.
    const tagMs = Math.max(this.tagMs, ms + TAG_MARGIN_MS)
    const max = Number.isFinite(this.maxBytesPerTenant) ? String(this.maxBytesPerTenant) : '0'
    const written = await this.commands.mantleCacheWrite(3 + tagKeys.length, key, ...tagKeys, ...tenantBudgetKeys(key), versions, encode(answer), String(ms), String(tagMs), max)
    // Past its tenant's bound the answer is not in Redis, but nothing raced it: memory may keep it.
    if (written === 2) this.onFull?.()
    return written !== 0
  }

  /**
   * Moves the tags to new versions (past the latest this instance knew, should Redis have gone
   * back) and tells every instance, as `{"from", "db", "ms", "keys", "versions"}` on
   * INVALIDATE_CHANNEL. `from`: this instance's id; `db`: the connection's database; `ms`: the
   * tag time the tags were given, at the least (`tagMs`).
   */
  async invalidate (tagKeys: readonly string[], from: string): Promise<void> {
    if (tagKeys.length === 0) return
    await this.move(tagKeys, from, '0')
  }

  /**
   * Moves past what this instance knew, as `invalidate`, the tags a read found behind it (RedisRead's
   * `behind`), if they are still (one script): a read answered before an invalidation this
   * instance heard meanwhile read an older version without Redis going back. How many moved.
   */
  async raise (tagKeys: readonly string[], from: string): Promise<number> {
    return await this.move(tagKeys, from, '1')
  }

  private async move (tagKeys: readonly string[], from: string, only: '0' | '1'): Promise<number> {
    const start = JSON.stringify({ from, db: this.db, ms: this.tagMs, keys: tagKeys }).slice(0, -1) + ',"versions":['
    const floors = tagKeys.map(k => String(this.known.peek(k) ?? 0))
    const [moved, versions] = await this.commands.mantleCacheInvalidate(tagKeys.length, ...tagKeys, String(this.tagMs), start, randomVersion(), only, ...floors)
    for (let i = 0; i < tagKeys.length; i++) this.remember(tagKeys[i], versions[i])
    return moved
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
