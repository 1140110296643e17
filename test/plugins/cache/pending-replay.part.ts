// Invalidations that could not reach Redis while the cache held off it after a failed command
// (the connection itself stayed 'ready', so its 'ready' event does not come again): they are
// replayed when the hold ends, and until then no Redis read brings back an entry they dropped.
// And the hold itself, over a Redis that stalls with its connection open.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { buildTestApp, bearer } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { REDIS_URL, itemKernel, itemManifest, metric, eventually } from './items.js'
import { ResponseCache, RedisTier, etagOf, localKey, policyOf, tagKey, type CachedAnswer } from '../../../plugins/cache/index.js'
import type { CacheMetrics } from '../../../plugins/cache/cache.js'
import { CallContext, canonicalJson } from '../../../plugins/pipeline/index.js'
import type { Operation } from '../../../manifest.js'

const REDIS_PORT = Number(new URL(REDIS_URL).port || 6379)

/** The op of the two tests below that run the cache over a Redis tier of their own. */
const op = { name: 'getItem', timeoutMs: 5000, cache: { ttlSeconds: 60, swrSeconds: 0, tags: ['item:{id}'] }, invalidates: [] } as unknown as Operation

/** An entry `{"n":1}` of `op`, fresh for a minute. */
function oldEntry (): CachedAnswer {
  const json = '{"n":1}'
  return { value: { n: 1 }, json, status: 200, etag: etagOf(json), freshUntil: Date.now() + 60_000, staleUntil: Date.now() + 60_000, keepUntil: Date.now() + 60_000, policy: policyOf(op, op.cache!, 60) }
}

/** A cache over `tier` alone (no metrics, no log), closed with the test; `now` its clock. */
function cacheWith (t: { teardown: (fn: () => unknown) => void }, tier: RedisTier, now?: () => number, metrics?: CacheMetrics, warn: (obj: object, msg: string) => void = () => {}): ResponseCache {
  const cache = new ResponseCache({
    redis: { tier, up: () => true },
    maxSize: 100,
    maxBytes: 1 << 20,
    defaultTtlSeconds: 60,
    breakerOpen: () => false,
    serializer: () => JSON.stringify,
    instanceId: 'one',
    ...(now === undefined ? {} : { now }),
    metrics,
    log: { warn, debug: () => {} }
  })
  t.teardown(() => cache.close())
  return cache
}

/** A cache over `tier`, and a read of item `id` (a) of tenant t through its stage (the Kernel answers n 101, 102, ...). */
function cacheOver (t: { teardown: (fn: () => unknown) => void }, tier: RedisTier): { cache: ResponseCache, read: (id?: string) => Promise<{ value: unknown, cache: string | null }> } {
  const cache = cacheWith(t, tier)
  const stage = cache.stage(op)!
  let kernelCalls = 0
  const read = async (id = 'a'): Promise<{ value: unknown, cache: string | null }> => {
    const ctx = new CallContext('r', 'rest', op, { id }, undefined, undefined, undefined)
    ctx.tenant = 't'
    const value = await stage(ctx, async () => ({ n: 100 + ++kernelCalls }))
    return { value, cache: ctx.cache }
  }
  return { cache, read }
}

t.test('redis: an invalidation made during the hold after a command timeout reaches Redis when the hold ends', async t => {
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  // REDIS_URL's database, as the other instance's (through the proxy it was database 0).
  const env = { REDIS_URL: redisVia(proxy.port), BFF_CACHE_STORE: 'redis', BFF_IDEMPOTENCY_STORE: 'memory', BFF_RATE_LIMIT_STORE: 'memory' }
  const app = await buildTestApp(t, env, { manifest, kernelUrl: kernel.url })
  // Another instance, straight on Redis.
  const other = await buildTestApp(t, { REDIS_URL, BFF_CACHE_STORE: 'redis' }, { manifest, kernelUrl: kernel.url })
  const who = 'cache-' + randomUUID()
  const headers = bearer({ tenant: who })

  const first = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.equal(first.headers['x-cache'], 'miss')
  t.equal(first.json().n, 1)
  t.equal((await other.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit', 'the entry is shared through Redis')

  // Redis is slow for a moment (a fork, a network blip): one command times out (500 ms) and the
  // cache holds off Redis for a second, while the connection stays up.
  proxy.delay(700)
  const slow = await app.inject({ method: 'GET', url: '/api/v1/items/b', headers })
  t.equal(slow.statusCode, 200, 'served from the Kernel, never a 5xx')
  proxy.restore()
  t.ok(app.redis.up(), 'the connection never dropped')

  // Within the hold the item is updated: the tag is dropped locally and kept to be replayed.
  t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  t.equal(await metric(app, 'mantle_cache_pending_invalidations'), 1, 'the invalidation waits for Redis')

  // The hold ends: the invalidation reaches Redis without waiting for any request.
  await eventually(async () => await metric(app, 'mantle_cache_pending_invalidations') === 0, 'the replay', 5000)
  // With no read of Redis since (every read was a hit of memory), the replay ends the outage: the
  // cache's store shows as healthy in /diagz again (before, only a Redis read did so).
  t.equal(app.responseCache.cache.redisHealthy, true, 'the replay that reached Redis ends the outage')
  const key = localKey('getItem', who, canonicalJson({ id: 'a' }))
  await eventually(async () => other.responseCache.cache.memory.get(key) === undefined, 'the other instance drops the entry from memory')

  const after = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.equal(after.headers['x-cache'], 'miss', 'the mutating instance does not read the old entry back from Redis')
  t.not(after.json().n, 1)
  const shared = await other.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.not(shared.json().n, 1, 'nor does another instance')
})

t.test('until a pending invalidation reaches Redis, an entry Redis holds under its tag is a miss', async t => {
  const stored = oldEntry()
  let invalidations = 0
  let release!: () => void
  const gate = new Promise<void>(resolve => { release = resolve })
  // A Redis tier whose first invalidation fails (a command timeout) and whose replay is slow to
  // land, so that reads run while the tag is still pending. Its reads keep returning the old entry.
  const tier = {
    read: async () => ({ answer: stored, versions: '0' }),
    write: async () => true,
    invalidate: async () => {
      if (++invalidations === 1) throw new Error('Command timed out')
      await gate
    }
  } as unknown as RedisTier
  const { cache, read } = cacheOver(t, tier)

  t.same(await read(), { value: { n: 1 }, cache: 'hit' }, 'the entry from Redis')
  await cache.invalidate('t', ['item:a'], 'mutation')
  t.equal(cache.pendingInvalidations, 1, 'the failed invalidation is pending')
  // The hold ends, the replay is sent but has not landed yet.
  await eventually(async () => invalidations === 2, 'the replay at the end of the hold', 5000)
  t.equal(cache.pendingInvalidations, 1, 'pending until Redis has it')
  t.same(await read(), { value: { n: 101 }, cache: 'miss' }, 'the old entry Redis returns is not served')
  release()
  await eventually(async () => cache.pendingInvalidations === 0, 'the replay to land')
  t.equal(invalidations, 2, 'replayed once')
})

// ioredis sends a script as EVALSHA and, when Redis answers NOSCRIPT (its script cache was
// flushed), again as EVAL: a read of the same instance sent between the two ran before the
// increment, found the old entry under the old versions, and put it in memory after the local
// mark, where it was served as a hit for its whole ttl (the instance ignores its own message).
t.test('a read that reaches Redis before an invalidation does cannot keep the old entry in memory', async t => {
  const stored = oldEntry()
  // Redis as the race leaves it: the old entry until the invalidation lands there, none after.
  let landed = false
  let land!: () => void
  const gate = new Promise<void>(resolve => { land = () => { landed = true; resolve() } })
  const tier = {
    read: async () => (landed ? { answer: null, versions: '1' } : { answer: stored, versions: '0' }),
    write: async () => true,
    invalidate: async () => { await gate }
  } as unknown as RedisTier
  const { cache, read } = cacheOver(t, tier)
  t.same(await read(), { value: { n: 1 }, cache: 'hit' })
  const invalidated = cache.invalidate('t', ['item:a'], 'mutation')
  t.same(await read(), { value: { n: 1 }, cache: 'hit' }, 'a read racing the invalidation, from Redis')
  land()
  await invalidated
  t.same(await read(), { value: { n: 101 }, cache: 'miss' }, 'once Redis has it, the old entry is gone from memory too')
})

// A Redis that stalls with its connection open (a command fails after its timeout, the connection
// stays 'ready', and the heartbeat may still get some PINGs answered): after the hold that follows
// a failed command, every call let through waited out the timeout there, and a PING answered
// ended the hold at once. Now, as the rate limiter does, one call at a time tries Redis until
// one answers; the others use memory and the Kernel.
t.test('a Redis that stalls: after the hold one call at a time tries it, and a PING answered does not end the hold', async t => {
  const TIMEOUT = 300
  let stalled = true
  let commands = 0
  const command = async <T>(value: T): Promise<T> => {
    commands++
    if (!stalled) return value
    await new Promise(resolve => setTimeout(resolve, TIMEOUT))
    throw new Error('Command timed out')
  }
  const tier = {
    read: async () => await command({ answer: null, versions: '0' }),
    write: async () => await command(true),
    invalidate: async () => { await command(undefined) }
  } as unknown as RedisTier
  const { cache, read } = cacheOver(t, tier)
  let next = 0
  /** 20 misses at once (keys never read before): the Redis commands they sent, and how many waited out the timeout. */
  const wave = async (): Promise<{ commands: number, waited: number }> => {
    const before = commands
    const waited = await Promise.all(Array.from({ length: 20 }, async () => {
      const began = performance.now()
      await read('k' + ++next)
      return performance.now() - began >= TIMEOUT - 50
    }))
    return { commands: commands - before, waited: waited.filter(Boolean).length }
  }
  const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

  t.same(await wave(), { commands: 20, waited: 20 }, 'the stall is not known yet: every call waits')
  // The hold runs a second from the last failure (the end of a wave that waited).
  let held = performance.now()
  cache.redisAnswers()
  t.equal(cache.redisHealthy, true, 'a PING answered: /diagz says Redis answers')
  t.same(await wave(), { commands: 0, waited: 0 }, 'but the hold goes on: no call goes to Redis')

  await sleep(1100 - (performance.now() - held))
  t.same(await wave(), { commands: 1, waited: 1 }, 'the hold is over: one call tries Redis, the others do not wait')
  held = performance.now()
  t.equal(cache.redisHealthy, false, 'it failed')
  cache.redisAnswers()
  t.same(await wave(), { commands: 0, waited: 0 }, 'its failure holds again, a PING answered or not')

  stalled = false
  await sleep(1100 - (performance.now() - held))
  t.same(await wave(), { commands: 2, waited: 0 }, 'the hold is over: one call tries Redis, which answers (its read, then its write)')
  t.same(await wave(), { commands: 40, waited: 0 }, 'the outage is over: every call reads and writes Redis')

  stalled = true
  t.same(await wave(), { commands: 20, waited: 20 }, 'Redis stalls again')
  stalled = false
  cache.redisReconnected()
  t.same(await wave(), { commands: 40, waited: 0 }, 'its connection made anew ends the hold at once')
})

t.test('invalidations held back during an outage are replayed as soon as a call finds Redis answering again', async t => {
  // The call that tries Redis at the hold's end holds it off for another hold meanwhile: an
  // invalidation made then waited that whole hold, though the call found Redis answering, while
  // other instances served the entries it drops.
  let mode: 'fail' | 'slow' = 'fail'
  let invalidations = 0
  const tier = {
    read: async () => {
      if (mode === 'fail') throw new Error('Command timed out')
      await new Promise(resolve => setTimeout(resolve, 200))
      return { answer: null, versions: '0' }
    },
    write: async () => true,
    invalidate: async () => { invalidations++ }
  } as unknown as RedisTier
  const { cache, read } = cacheOver(t, tier)
  await read('a')
  t.equal(cache.redisHealthy, false, 'a read failed: the hold begins')
  await new Promise(resolve => setTimeout(resolve, 1100))
  mode = 'slow'
  const probe = read('b')
  await new Promise(resolve => setTimeout(resolve, 20))
  await cache.invalidate('t', ['item:a'], 'mutation')
  t.equal(cache.pendingInvalidations, 1, 'made while the probe is under way: held back')
  t.same(await probe, { value: { n: 102 }, cache: 'miss' }, 'the probe finds Redis answering')
  await new Promise(resolve => setTimeout(resolve, 300))
  t.equal(invalidations, 1, 'the invalidation reached Redis')
  t.equal(cache.pendingInvalidations, 0, 'none left pending')
})

// Found by a review: past 10,000 tags pending, an invalidation was lost (a warning said entries
// expire by their ttl), and once Redis answered again this very instance read the entry the
// invalidation dropped back from Redis, under the versions it never lost, and served it as a hit.
t.test('an invalidation past the bound of those pending never lets this instance serve the entry it dropped', async t => {
  const redis = failingTier(oldEntry(), 60_000)
  const { cache, read } = cacheOver(t, redis.tier)
  await read('x')
  t.equal(cache.redisHealthy, false, 'Redis fails')
  for (let i = 0; i < 10_000; i++) await cache.invalidate('t', [`other:${i}`], 'mutation')
  await cache.invalidate('t', ['item:a'], 'mutation')
  redis.failing = false
  cache.redisReconnected()
  const after = await read('a')
  t.not(after.cache, 'hit', `the entry the invalidation dropped is not served (${JSON.stringify(after)})`)
})

// Left open by the revert of 577631c (review tenant-leak): the 10,000 tags kept while Redis is away
// were one pool, first come first kept. One tenant's mutations during an outage filled it, and
// every other tenant's invalidation after that was lost: other instances served that tenant's
// entries from before its own change as hits for their ttl, and this one read none of its entries
// from Redis for as long. Past the bound, the tenant holding the most now gives up a tag.
t.test('past the bound, the tenant holding the most pending invalidations loses one, not another tenant', async t => {
  const replayed: string[] = []
  const redis = failingTier(oldEntry(), 60_000)
  const invalidate = redis.tier.invalidate.bind(redis.tier)
  redis.tier.invalidate = async (keys: string[], from: string) => {
    await invalidate(keys, from)
    replayed.push(...keys)
  }
  const cache = cacheWith(t, redis.tier)
  const stage = cache.stage(op)!
  const read = async (tenant: string): Promise<string | null> => {
    const ctx = Object.assign(new CallContext('r', 'rest', op, { id: 'a' }, undefined, undefined, undefined), { tenant })
    await stage(ctx, async () => ({ n: 2 }))
    return ctx.cache
  }
  await read('x')
  t.equal(cache.redisHealthy, false, 'Redis fails')
  for (let i = 0; i < 10_000; i++) await cache.invalidate('flood', [`other:${i}`], 'mutation')
  await cache.invalidate('quiet', ['item:a'], 'mutation')
  await cache.invalidate('quiet', ['item:b'], 'mutation')
  t.equal(cache.pendingInvalidations, 10_000, 'still 10,000 pending')
  t.match(cache.invalidationsDetail, /; 2 invalidated tags lost since start/, 'two tags lost')
  redis.failing = false
  cache.redisReconnected()
  await eventually(async () => cache.pendingInvalidations === 0, 'the replay')
  t.ok(replayed.includes(tagKey('quiet', 'item:a')) && replayed.includes(tagKey('quiet', 'item:b')), 'the quiet tenant\'s invalidations reach Redis')
  t.notOk(replayed.includes(tagKey('flood', 'other:0')), 'the flooding tenant\'s oldest is lost')
  t.notOk(replayed.includes(tagKey('flood', 'other:1')), 'and its next oldest')
  t.ok(replayed.includes(tagKey('flood', 'other:2')), 'its others reach Redis')
  t.equal(await read('quiet'), 'hit', 'the quiet tenant reads its entries from Redis again')
  t.equal(await read('flood'), 'miss', 'the tenant whose invalidations were lost takes no entry from Redis')
})

// Review tenant-leak: the second invalidations of mutations that got no answer were one pool, the
// oldest carried out at once past 10,000: one tenant's mutations without an answer had another
// tenant's second invalidation carried out at once, sooner than its time, where it no longer
// dropped an answer read before the Kernel's change. Past the bound, the tenant holding the most
// now has its own oldest carried out.
t.test('past the bound of second invalidations, the tenant holding the most has its own carried out early, not another tenant\'s', async t => {
  const cache = new ResponseCache({ redis: null, maxSize: 100, maxBytes: 1 << 20, defaultTtlSeconds: 60, breakerOpen: () => false, serializer: () => JSON.stringify, instanceId: 'one', log: { warn: () => {}, debug: () => {} } })
  const early: string[] = []
  const invalidate = cache.invalidate.bind(cache)
  cache.invalidate = async (tenant, tags, source) => { early.push(`${tenant} ${tags.join(',')}`); await invalidate(tenant, tags, source) }
  t.teardown(async () => { cache.invalidate = invalidate; await cache.close() })
  cache.invalidateLater('quiet', ['item:a'], 60_000)
  for (let i = 0; i < 10_000; i++) cache.invalidateLater('flood', [`other:${i}`], 60_000)
  t.equal(cache.laterInvalidations, 10_000, 'the bound holds')
  t.same(early, ['flood other:0'], 'the flooding tenant\'s oldest is carried out at once, the quiet tenant\'s waits for its time')
})

// Left open by review r-cache: the spell became each tenant's, but its warning was still said
// once while any tenant's ran: a second tenant's loss then, whose reads no longer took entries
// from Redis, was counted and never said.
t.test('each tenant whose invalidation is lost is said once for its spell', async t => {
  const redis = failingTier(oldEntry(), 60_000)
  const said: Array<{ tenant?: string }> = []
  const cache = cacheWith(t, redis.tier, undefined, undefined, (obj, msg) => { if (/too many invalidations/.test(msg)) said.push(obj) })
  const stage = cache.stage(op)!
  const ctx = new CallContext('r', 'rest', op, { id: 'x' }, undefined, undefined, undefined)
  ctx.tenant = 't'
  await stage(ctx, async () => ({ n: 1 }))
  t.equal(cache.redisHealthy, false, 'Redis fails')
  // Past the bound, the tenant holding the most gives up a tag (the one adding, on a tie): both hold as many.
  for (let i = 0; i < 5_000; i++) await cache.invalidate('t', [`other:${i}`], 'mutation')
  for (let i = 0; i < 5_000; i++) await cache.invalidate('u', [`other:${i}`], 'mutation')
  await cache.invalidate('t', ['item:a'], 'mutation')
  await cache.invalidate('t', ['item:b'], 'mutation')
  await cache.invalidate('u', ['item:a'], 'mutation')
  await cache.invalidate('u', ['item:b'], 'mutation')
  t.same(said.map(s => s.tenant), ['t', 'u'], 'the first loss of each tenant\'s spell, not one for both')
})

// Found by a review of the test above: the spell without Redis entries lasted RedisTier.tagMs,
// the longest an entry lived under the manifest at start-up. A reload may lengthen an operation's
// ttl (the cache is no fixed part of a manifest): its entries then outlived the spell, and once it
// ended this instance read the entry the lost invalidation dropped back from Redis, as a hit.
t.test('after a reload lengthened the ttl, an invalidation past the bound never lets this instance serve the entry it dropped', async t => {
  let clock = Date.now()
  const long = { name: 'getItem', timeoutMs: 5000, cache: { ttlSeconds: 3600, swrSeconds: 0, tags: ['item:{id}'] }, invalidates: [] } as unknown as Operation
  const json = '{"n":1}'
  const stored: CachedAnswer = { value: { n: 1 }, json, status: 200, etag: etagOf(json), freshUntil: clock + 3_600_000, staleUntil: clock + 3_600_000, keepUntil: clock + 3_900_000, policy: policyOf(long, long.cache!, 60) }
  // tagMs: what the plugin gives a manifest of 60 s ttls, (60 + 300) s + 5 s + 60 s.
  const redis = failingTier(stored, 425_000)
  const tier = redis.tier
  const cache = cacheWith(t, tier, () => clock)
  cache.stage({ ...op, timeoutMs: 5000 } as unknown as Operation)
  // The reload: the operation's stage built anew, with an hour's ttl.
  const stage = cache.stage(long)!
  const read = async (id: string): Promise<unknown> => {
    const ctx = new CallContext('r', 'rest', long, { id }, undefined, undefined, undefined)
    ctx.tenant = 't'
    return await stage(ctx, async () => ({ n: 2 }))
  }
  await read('x')
  t.equal(cache.redisHealthy, false, 'Redis fails')
  for (let i = 0; i < 10_000; i++) await cache.invalidate('t', [`other:${i}`], 'mutation')
  await cache.invalidate('t', ['item:a'], 'mutation')
  redis.failing = false
  cache.redisReconnected()
  // Ten minutes on: past the start-up manifest's longest entry, within the hour's ttl.
  clock += 600_000
  t.same(await read('a'), { n: 2 }, 'the entry the invalidation dropped is not served once the start-up manifest\'s entries would have expired')
})

// Found by review of the test above: the spell's length was fixed when the invalidation was
// lost. A reload after it that lengthens a ttl (instances reload one by one: others ran the new
// manifest before, and stored its hour-long entries under the versions Redis never bumped) left
// those entries outliving the spell, and this instance then served the one the loss dropped.
t.test('a reload after an invalidation past the bound lengthens the spell without Redis entries', async t => {
  let clock = Date.now()
  const long = { name: 'getItem', timeoutMs: 5000, cache: { ttlSeconds: 3600, swrSeconds: 0, tags: ['item:{id}'] }, invalidates: [] } as unknown as Operation
  const json = '{"n":1}'
  // Stored by an instance that ran the reloaded manifest before this one lost the invalidation.
  const stored: CachedAnswer = { value: { n: 1 }, json, status: 200, etag: etagOf(json), freshUntil: clock + 3_600_000, staleUntil: clock + 3_600_000, keepUntil: clock + 3_900_000, policy: policyOf(long, long.cache!, 60) }
  const redis = failingTier(stored, 425_000)
  const cache = cacheWith(t, redis.tier, () => clock)
  const short = cache.stage({ ...op, timeoutMs: 5000 } as unknown as Operation)!
  const ctx = (o: Operation, id: string): CallContext => Object.assign(new CallContext('r', 'rest', o, { id }, undefined, undefined, undefined), { tenant: 't' })
  await short(ctx(op, 'x'), async () => ({ n: 2 }))
  t.equal(cache.redisHealthy, false, 'Redis fails')
  for (let i = 0; i < 10_000; i++) await cache.invalidate('t', [`other:${i}`], 'mutation')
  await cache.invalidate('t', ['item:a'], 'mutation')
  // The reload comes after the loss.
  const stage = cache.stage(long)!
  redis.failing = false
  cache.redisReconnected()
  clock += 600_000
  t.same(await stage(ctx(long, 'a'), async () => ({ n: 2 })), { n: 2 }, 'the entry the invalidation dropped is not served')
})

/** A Redis tier whose commands time out while `failing`, then answer `stored` for every read. */
function failingTier (stored: CachedAnswer, tagMs: number): { tier: RedisTier, failing: boolean } {
  const state = {
    failing: true,
    tier: {
      read: async () => {
        if (state.failing) throw new Error('Command timed out')
        return { answer: stored, versions: '0' }
      },
      write: async () => true,
      invalidate: async () => { if (state.failing) throw new Error('Command timed out') },
      tagMs
    } as unknown as RedisTier
  }
  return state
}

// Every bound has its metric: an invalidation lost past the 10,000 pending was only a warning,
// logged once per spell, and nothing in /metrics or /diagz said that other instances serve what
// it drops (and that this one reads no entry from Redis meanwhile).
t.test('invalidated tags lost past the bound of those pending are counted in /metrics and told in /diagz', async t => {
  const kernel = await itemKernel(t)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  proxy.cut('reset')
  const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port), BFF_CACHE_STORE: 'redis' }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  const who = 'cache-' + randomUUID()
  const scrape = async (): Promise<string> => (await app.inject({ method: 'GET', url: '/metrics' })).body
  const diagz = async (): Promise<{ healthy: boolean, detail?: string }> => (await app.inject({ method: 'GET', url: '/diagz', headers: bearer({ roles: ['system'] }) })).json().stores.cache
  t.match(await scrape(), /^mantle_cache_invalidations_lost_total 0$/m, 'exported at 0')
  t.notMatch((await diagz()).detail, /invalidated tags/, 'nothing pending, nothing lost')

  for (let i = 0; i < 9_999; i++) await app.responseCache.invalidate(who, [`other:${i}`])
  t.equal(app.responseCache.cache.pendingInvalidations, 9_999)
  // One more fits, two are lost; the one already pending is not.
  await app.responseCache.invalidate(who, ['item:a', 'item:b', 'other:0', 'item:c'])
  const text = await scrape()
  t.match(text, /^mantle_cache_pending_invalidations 10000$/m)
  t.match(text, /^mantle_cache_invalidations_lost_total 2$/m, 'the tags lost')
  await app.responseCache.invalidate(who, ['item:d'])
  t.match(await scrape(), /^mantle_cache_invalidations_lost_total 3$/m, 'counted on every loss, not once per spell as the warning')
  const store = await diagz()
  t.equal(store.healthy, false)
  t.match(store.detail, /10000 invalidated tags waiting for Redis; 3 invalidated tags lost since start, no entry read from Redis until \d{4}-/)
})

// Found by review of the loss past the bound: the loop stopped at the first tag lost, and a tag
// after it in the same invalidation, already pending, kept the tick of its earlier invalidation.
// A replay under way (sent before this invalidation) then took it for replayed and deleted it.
t.test('past the bound, a tag already pending that a replay under way carries stays pending for the next one', async t => {
  let replays = 0
  let land!: () => void
  const gate = new Promise<void>(resolve => { land = resolve })
  let failing = true
  const tier = {
    read: async () => {
      if (failing) throw new Error('Command timed out')
      return { answer: null, versions: '0' }
    },
    // While failing, every invalidation fails; then the replay hangs until land(), and an
    // invalidation made meanwhile fails (Redis stalls again).
    invalidate: async (keys: string[]) => {
      if (failing) throw new Error('Command timed out')
      if (keys.length === 10_000 && ++replays === 1) { await gate; return }
      throw new Error('Command timed out')
    },
    write: async () => true,
    tagMs: 60_000
  } as unknown as RedisTier
  const { cache, read } = cacheOver(t, tier)
  await read('x')
  t.equal(cache.redisHealthy, false, 'Redis fails')
  for (let i = 0; i < 9_999; i++) await cache.invalidate('t', [`other:${i}`], 'mutation')
  await cache.invalidate('t', ['item:a'], 'mutation')
  t.equal(cache.pendingInvalidations, 10_000)
  failing = false
  cache.redisReconnected()
  t.equal(replays, 1, 'the replay is under way')
  // The item is changed again while the replay is on its way: its invalidation fails, one tag is lost.
  await cache.invalidate('t', ['item:lost', 'item:a'], 'mutation')
  land()
  await eventually(async () => cache.pendingInvalidations < 10_000, 'the replay to land')
  t.equal(cache.pendingInvalidations, 1, 'item:a\'s second invalidation waits for the next replay')
})

// Found by review of the loss past the bound: a refill whose Kernel call began before an
// invalidation that was then lost is refused by this instance's memory tier (its tag clock moved
// during the call), but was written to Redis all the same, under the tag versions Redis never
// bumped: every other instance then served the answer from before the change as a hit, for its ttl.
t.test('a refill whose tags were invalidated during its Kernel call is written neither to memory nor to Redis', async t => {
  let failing = false
  const writes: unknown[] = []
  const tier = {
    read: async () => {
      if (failing) throw new Error('Command timed out')
      return { answer: null, versions: '0' }
    },
    invalidate: async () => { if (failing) throw new Error('Command timed out') },
    write: async (_key: string, _tags: unknown, _versions: string, answer: CachedAnswer) => { writes.push(answer.value); return true },
    tagMs: 60_000
  } as unknown as RedisTier
  const cache = cacheWith(t, tier)
  const stage = cache.stage(op)!
  let answer!: (value: unknown) => void
  const ctx = Object.assign(new CallContext('r', 'rest', op, { id: 'a' }, undefined, undefined, undefined), { tenant: 't' })
  // A miss: the Kernel call is under way, with the answer from before the change.
  const refill = stage(ctx, async () => await new Promise(resolve => { answer = resolve }))
  await eventually(async () => answer !== undefined, 'the Kernel call')
  // Redis fails; 10,000 tags wait already, and the change's invalidation of item:a is lost.
  failing = true
  for (let i = 0; i < 10_000; i++) await cache.invalidate('t', [`other:${i}`], 'mutation')
  await cache.invalidate('t', ['item:a'], 'mutation')
  failing = false
  cache.redisReconnected()
  answer({ n: 1 })
  t.same(await refill, { n: 1 }, 'the caller has its answer')
  t.same(writes, [], 'the answer from before the change is not written to Redis')
  t.equal(cache.memory.size, 0, 'nor kept in memory')
})

// Found by review of the count of tags lost: a tag named twice in one invalidation (two templates
// of a mutation's `invalidates` filled with the same value, as `user:{owner}` and
// `user:{assignee}` for the same user) was counted lost twice past the bound.
t.test('past the bound, a tag named twice in one invalidation is counted lost once', async t => {
  const tier = {
    read: async () => { throw new Error('Command timed out') },
    invalidate: async () => { throw new Error('Command timed out') },
    write: async () => true,
    tagMs: 60_000
  } as unknown as RedisTier
  const { cache, read } = cacheOver(t, tier)
  await read('x')
  for (let i = 0; i < 10_000; i++) await cache.invalidate('t', [`other:${i}`], 'mutation')
  await cache.invalidate('t', ['user:u1', 'user:u1'], 'mutation')
  t.match(cache.invalidationsDetail, /; 1 invalidated tags lost since start/, 'one tag lost')
})

// Left open by the review above: mantle_cache_invalidations_total counted a tag named twice in
// one invalidation twice, and the tag went to Redis (and to every instance) twice.
t.test('a tag named twice in one invalidation is invalidated and counted once', async t => {
  const sent: string[][] = []
  const tier = {
    read: async () => ({ answer: null, versions: '0' }),
    invalidate: async (keys: string[]) => { sent.push(keys) },
    write: async () => true,
    tagMs: 60_000
  } as unknown as RedisTier
  let counted = 0
  const noop = (): void => {}
  const cache = cacheWith(t, tier, undefined, { outcome: noop, coalesced: noop, invalidated: (_source, n) => { counted += n }, fallback: noop, discarded: noop, evicted: noop, lost: noop, tagEvicted: noop })
  await cache.invalidate('t', ['user:u1', 'user:u1', 'item:a'], 'mutation')
  t.equal(counted, 2, 'two tags counted')
  t.same(sent.map(keys => keys.length), [2], 'two tags sent to Redis')
})

// Found by review of the test above: the write to Redis followed the memory tier's whole word,
// its epoch included, which only says the subscriber reconnected (other instances' invalidations
// may have been missed here, but Redis has had them, and its script checks their versions). A
// refill under way across a reconnect was then written nowhere: every other instance made its
// own Kernel call for the key, and an entry Redis held was not replaced.
t.test('a refill under way while the cache subscriber reconnects is still written to Redis', async t => {
  const writes: unknown[] = []
  const tier = {
    read: async () => ({ answer: null, versions: '0' }),
    invalidate: async () => {},
    write: async (_key: string, _tags: unknown, _versions: string, answer: CachedAnswer) => { writes.push(answer.value); return true },
    tagMs: 60_000
  } as unknown as RedisTier
  const { cache } = cacheOver(t, tier)
  const stage = cache.stage(op)!
  let answer!: (value: unknown) => void
  const ctx = Object.assign(new CallContext('r', 'rest', op, { id: 'a' }, undefined, undefined, undefined), { tenant: 't' })
  const refill = stage(ctx, async () => await new Promise(resolve => { answer = resolve }))
  await eventually(async () => answer !== undefined, 'the Kernel call')
  // The subscriber's connection is made anew: what it heard is no longer trusted in memory.
  cache.resync()
  answer({ n: 1 })
  t.same(await refill, { n: 1 })
  t.same(writes, [{ n: 1 }], 'written to Redis: its versions still hold')
  t.equal(cache.memory.size, 0, 'not kept in memory, whose tier started over')
})

/** A Redis tier whose commands time out while `failing`, then answer for every read an entry of `o` made at `clock()` (the Kernel's n 1). */
function entryTier (o: Operation, clock: () => number): { tier: RedisTier, failing: boolean } {
  const state = {
    failing: true,
    tier: {
      read: async () => {
        if (state.failing) throw new Error('Command timed out')
        const json = '{"n":1}'
        const ttl = o.cache!.ttlSeconds! * 1000
        return { answer: { value: { n: 1 }, json, status: 200, etag: etagOf(json), freshUntil: clock() + ttl, staleUntil: clock() + ttl, keepUntil: clock() + ttl + 300_000, policy: policyOf(o, o.cache!, 60) }, versions: '0' }
      },
      write: async () => true,
      invalidate: async () => { if (state.failing) throw new Error('Command timed out') },
      tagMs: 86_400_000
    } as unknown as RedisTier
  }
  return state
}

/**
 * Fills the 10,000 invalidations pending (none may be pending before), then loses one of each
 * tenant in `lost` (item:a). Past the bound, the tenant holding the most gives up a tag, the one
 * adding on a tie: so each tenant in `lost` holds as many as any (its own other:i), and tenant
 * `filler` the rest, pending and never lost, while any is left over.
 */
async function loseInvalidations (cache: ResponseCache, filler: string, lost: readonly string[]): Promise<void> {
  if (cache.pendingInvalidations !== 0) throw new Error('invalidations are pending already')
  const each = Math.max(1, Math.floor(10_000 / (lost.length + 1)))
  for (const tenant of lost) for (let i = 0; i < each; i++) await cache.invalidate(tenant, [`other:${i}`], 'mutation')
  for (let i = 0; cache.pendingInvalidations < 10_000; i++) await cache.invalidate(filler, [`other:${i}`], 'mutation')
  for (const tenant of lost) await cache.invalidate(tenant, ['item:a'], 'mutation')
}

// Left open by review h-cache: the spell's length was the longest life of an entry under any
// manifest the process ever ran. After a reload that shortened a day's ttl to a minute, and once
// no entry of the day-long stage could exist any more, a lost invalidation still kept this
// instance off Redis for two days, though the entries it takes (of the policy in force: a minute)
// live 6 minutes at most. The replaced stage's life counts as long as its entries may exist.
t.test('after a reload shortened every ttl, the spell without Redis entries shrinks once the old entries can no longer exist', async t => {
  let clock = Date.now()
  const day = { name: 'getItem', timeoutMs: 5000, cache: { ttlSeconds: 86_400, swrSeconds: 0, tags: ['item:{id}'] }, invalidates: [] } as unknown as Operation
  const minute = { ...day, cache: { ...day.cache, ttlSeconds: 60 } } as unknown as Operation
  const redis = entryTier(minute, () => clock)
  const cache = cacheWith(t, redis.tier, () => clock)
  cache.stage(day)
  // The reload: the operation's stage built anew, with a minute's ttl.
  const stage = cache.stage(minute)!
  const read = async (tenant: string): Promise<unknown> => {
    const ctx = Object.assign(new CallContext('r', 'rest', minute, { id: 'a' }, undefined, undefined, undefined), { tenant })
    return await stage(ctx, async () => ({ n: 2 }))
  }
  // Right after the reload, entries of the day-long stage (its calls in flight) may still be made.
  await read('x')
  await loseInvalidations(cache, 'filler', ['t'])
  redis.failing = false
  cache.redisReconnected()
  clock += 600_000
  t.same(await read('t'), { n: 2 }, 'within the old stage\'s life, the spell still lasts it')

  // A day and more after the reload, no entry of the day-long stage exists any more.
  clock += 87_000_000
  redis.failing = true
  await read('x')
  await loseInvalidations(cache, 'filler', ['t'])
  // (60 + 300) s + 5 s, and the margin of a minute.
  t.match(cache.invalidationsDetail, new RegExp(`no entry read from Redis until ${new Date(clock + 365_000 + 60_000).toISOString()} for their tenant$`), 'the spell lasts the life of an entry under the manifest in force')
  redis.failing = false
  cache.redisReconnected()
  clock += 600_000
  t.same(await read('t'), { n: 1 }, 'ten minutes after the loss, the tenant\'s entries are read from Redis again')
})

// Left open by review h-cache: after one tenant's invalidation was lost, this instance took no
// entry from Redis for any tenant. A tag key names its tenant and an entry's tags are its own
// tenant's: a lost invalidation leaves no other tenant's entry stale in Redis.
t.test('the spell without Redis entries is the tenants\' whose invalidations were lost, every tenant\'s past 10,000 of them', async t => {
  const clock = Date.now()
  const minute = { name: 'getItem', timeoutMs: 5000, cache: { ttlSeconds: 60, swrSeconds: 0, tags: ['item:{id}'] }, invalidates: [] } as unknown as Operation
  const redis = entryTier(minute, () => clock)
  const cache = cacheWith(t, redis.tier, () => clock)
  const stage = cache.stage(minute)!
  const read = async (tenant: string): Promise<string | null> => {
    const ctx = Object.assign(new CallContext('r', 'rest', minute, { id: 'a' }, undefined, undefined, undefined), { tenant })
    await stage(ctx, async () => ({ n: 2 }))
    return ctx.cache
  }
  await read('x')
  await loseInvalidations(cache, 'filler', ['t', 'v'])
  redis.failing = false
  cache.redisReconnected()
  t.equal(await read('t'), 'miss', 'a tenant whose invalidation was lost takes no entry from Redis')
  t.equal(await read('v'), 'miss', 'nor does the other one')
  t.equal(await read('filler'), 'hit', 'a tenant whose invalidations are pending, none lost, reads Redis once they are replayed')
  t.equal(await read('u'), 'hit', 'another tenant\'s entries are read from Redis')
  t.match(cache.invalidationsDetail, /lost since start, no entry read from Redis until \S+ for their 2 tenants$/)

  // 10,000 tenants lose an invalidation each: past that, every tenant's spell.
  redis.failing = true
  await read('x')
  await loseInvalidations(cache, 'filler', Array.from({ length: 9_998 }, (_, i) => `lost${i}`))
  t.match(cache.invalidationsDetail, /for their 10000 tenants$/, 'remembered one by one up to 10,000')
  await cache.invalidate('last', ['item:a'], 'mutation')
  redis.failing = false
  cache.redisReconnected()
  // A tenant with no entry in memory (u's, read above, is served from there: no invalidation of
  // its tags since, and the marks the 10,000 others pushed out drop their own tags' entries alone).
  t.equal(await read('y'), 'miss', 'past them, no tenant takes an entry from Redis')
  t.match(cache.invalidationsDetail, /for any tenant$/)
})

// Found by review r-cache: the tenants' spells that were over stayed in the list until it
// overflowed. Once 10,000 tenants had lost an invalidation since start, however long ago, the next
// tenant's loss took every tenant off Redis. The spells over now make room; a reload that lengthens
// a ttl still starts them again from their loss (for every tenant).
t.test('the tenants\' spells that are over make room for another tenant\'s, and a reload still starts them again', async t => {
  let clock = Date.now()
  const minute = { name: 'getItem', timeoutMs: 5000, cache: { ttlSeconds: 60, swrSeconds: 0, tags: ['item:{id}'] }, invalidates: [] } as unknown as Operation
  const day = { ...minute, cache: { ...minute.cache, ttlSeconds: 86_400 } } as unknown as Operation
  // Redis holds entries of the operation's policy in force here (made now).
  let served = minute
  const state = { failing: true }
  const tier = {
    read: async () => {
      if (state.failing) throw new Error('Command timed out')
      const json = '{"n":1}'
      const ttl = served.cache!.ttlSeconds! * 1000
      return { answer: { value: { n: 1 }, json, status: 200, etag: etagOf(json), freshUntil: clock + ttl, staleUntil: clock + ttl, keepUntil: clock + ttl + 300_000, policy: policyOf(served, served.cache!, 60) }, versions: '0' }
    },
    write: async () => true,
    invalidate: async () => { if (state.failing) throw new Error('Command timed out') },
    tagMs: 86_400_000
  } as unknown as RedisTier
  const cache = cacheWith(t, tier, () => clock)
  let stage = cache.stage(minute)!
  const read = async (tenant: string): Promise<string | null> => {
    const ctx = Object.assign(new CallContext('r', 'rest', served, { id: 'a' }, undefined, undefined, undefined), { tenant })
    await stage(ctx, async () => ({ n: 2 }))
    return ctx.cache
  }
  await read('x')
  await loseInvalidations(cache, 'filler', Array.from({ length: 10_000 }, (_, i) => `lost${i}`))
  state.failing = false
  cache.redisReconnected()
  // An hour on, every one of those spells is over.
  clock += 3_600_000
  t.equal(await read('lost0'), 'hit', 'a spell is over')
  state.failing = true
  await read('x')
  await loseInvalidations(cache, 'filler', ['new'])
  state.failing = false
  cache.redisReconnected()
  t.equal(await read('new'), 'miss', 'the tenant whose invalidation was lost takes no entry from Redis')
  t.equal(await read('w'), 'hit', 'another tenant\'s entries are read from Redis')
  t.match(cache.invalidationsDetail, /for their tenant$/, 'one tenant in a spell')

  // A reload lengthens the ttl to a day: other instances that ran it before stored entries of
  // the tenants whose invalidations were lost an hour ago, that live on.
  served = day
  stage = cache.stage(day)!
  t.equal(await read('lost0'), 'miss', 'a spell over starts again from its loss')
  t.match(cache.invalidationsDetail, /for any tenant$/, 'for every tenant')
})

t.test('redis: an invalidation still waiting for the hold to end when the gateway closes reaches Redis before it closes', async t => {
  // A gateway stopped (a rolling deploy's SIGTERM) within the second the cache holds off Redis
  // after a failed command: close() cancelled the replay scheduled for the hold's end, and the
  // mutation it had answered 200 was never invalidated in Redis nor on any other instance, which
  // served the entry it dropped as a hit for its whole ttl.
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const env = { REDIS_URL: redisVia(proxy.port), BFF_CACHE_STORE: 'redis', BFF_IDEMPOTENCY_STORE: 'memory', BFF_RATE_LIMIT_STORE: 'memory' }
  const app = await buildTestApp(t, env, { manifest, kernelUrl: kernel.url })
  const other = await buildTestApp(t, { REDIS_URL, BFF_CACHE_STORE: 'redis' }, { manifest, kernelUrl: kernel.url })
  const who = 'cache-' + randomUUID()
  const headers = bearer({ tenant: who })
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).json().n, 1)
  t.equal((await other.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit', 'the entry is shared through Redis')
  // One command times out: the cache holds off Redis for a second, the connection staying up.
  proxy.delay(700)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/b', headers })).statusCode, 200)
  proxy.restore()
  t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  t.equal(await metric(app, 'mantle_cache_pending_invalidations'), 1, 'the invalidation waits for the hold to end')
  await app.close()
  const key = localKey('getItem', who, canonicalJson({ id: 'a' }))
  await eventually(async () => other.responseCache.cache.memory.get(key) === undefined, 'the other instance drops the entry from memory', 3000)
  const after = await other.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.equal(after.headers['x-cache'], 'miss', 'nor does it read it back from Redis')
  t.not(after.json().n, 1)
})
