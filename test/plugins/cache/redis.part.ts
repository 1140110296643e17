// The cache shared by several gateway instances through the machine's real Redis, and a Redis
// cut through a TCP proxy the test controls.
import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { buildTestApp, bearer, json } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { itemKernel, itemManifest, metric, eventually } from './items.js'
import { entryKey, etagOf, localKey, RedisTier, tagKey, TAG_KEY_MAX, tenantBudgetKeys, type CachedAnswer } from '../../../plugins/cache/index.js'
import { canonicalJson } from '../../../plugins/pipeline/index.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const REDIS_PORT = Number(new URL(REDIS_URL).port || 6379)
const tenant = (): string => 'cache-' + randomUUID()

/** Two instances over the items Kernel, one reaching Redis through a proxy the test controls (cut), the other directly; a tenant of their own. */
async function cutAndDirect (t: Test, env: Record<string, string> = {}): Promise<{ kernel: Awaited<ReturnType<typeof itemKernel>>, proxy: Awaited<ReturnType<typeof startTcpProxy>>, cut: FastifyInstance, direct: FastifyInstance, who: string, headers: Record<string, string> }> {
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  // The database of REDIS_URL for both: through the proxy it was database 0 whatever REDIS_URL
  // named, and with REDIS_URL naming another the two instances shared no tag or entry.
  const cut = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port), ...env }, { manifest, kernelUrl: kernel.url })
  const direct = await buildTestApp(t, { REDIS_URL, ...env }, { manifest, kernelUrl: kernel.url })
  const who = tenant()
  return { kernel, proxy, cut, direct, who, headers: bearer({ tenant: who }) }
}

t.test('two instances: a read on one fills the other; a mutation on one invalidates the other, in both tiers', async t => {
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const one = await buildTestApp(t, { REDIS_URL }, { manifest, kernelUrl: kernel.url })
  const two = await buildTestApp(t, { REDIS_URL }, { manifest, kernelUrl: kernel.url })
  const who = tenant()
  const headers = bearer({ tenant: who })
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'miss')
  const shared = await two.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.equal(shared.headers['x-cache'], 'hit', 'from Redis')
  t.equal(shared.json().n, 1)
  t.equal((await two.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit', 'from its own memory now')
  t.equal(two.responseCache.cache.memory.size, 1)
  t.equal(kernel.reads(), 1)

  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.disconnect())
  t.ok(await redis.exists(entryKey('getItem', who, { id: 'a' })), 'the key shape bff:cache:{op}:{tenant}:{hash}')
  t.match(entryKey('getItem', who, { id: 'a' }), new RegExp(`^bff:cache:getItem:${who}:[A-Za-z0-9_-]{43}$`))

  // The in-process tier's key of the entry: both instances hold it now.
  const key = localKey('getItem', who, canonicalJson({ id: 'a' }))
  t.ok(one.responseCache.cache.memory.get(key) !== undefined && two.responseCache.cache.memory.get(key) !== undefined, 'both instances hold the entry in memory')

  const before = Number(await redis.get(tagKey(who, 'item:a')))
  t.equal((await one.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  t.equal(Number(await redis.get(tagKey(who, 'item:a'))), before + 1, 'the tag version went up in Redis')
  // Other test processes share the channel: wait for this entry to leave, not for a count.
  await eventually(async () => two.responseCache.cache.memory.get(key) === undefined, 'the other instance drops it from memory')
  t.ok(await metric(two, 'mantle_cache_invalidations_total', { source: 'remote' }) >= 1)
  const after = await two.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.equal(after.headers['x-cache'], 'miss', 'neither its memory nor Redis answers the old entry')
  t.equal(after.json().n, 2)
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/a', headers })).json().n, 2, 'and the first instance reads the refill from Redis')
  t.equal(kernel.reads(), 2)
  // An admin invalidation on one instance is seen by the other too.
  t.ok(one.responseCache.cache.memory.get(key) !== undefined, 'the first instance holds the refill in memory')
  t.equal((await two.inject({ method: 'POST', url: '/admin/cache/invalidate', headers, payload: { tags: ['items'] } })).statusCode, 200)
  await eventually(async () => one.responseCache.cache.memory.get(key) === undefined, 'the first instance drops it from memory')
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'miss')
  // Junk on the channel is ignored.
  await redis.publish('bff:cache:invalidate', 'not json')
  await redis.publish('bff:cache:invalidate', '{"from":"x","keys":"nope"}')
  // JSON that is no object: reading its "from" threw in the subscriber's message handler, an
  // uncaught exception (the end of every gateway process subscribed).
  await redis.publish('bff:cache:invalidate', 'null')
  await redis.publish('bff:cache:invalidate', '[1]')
  // Versions that are not versions teach nothing.
  await redis.publish('bff:cache:invalidate', JSON.stringify({ from: 'x', keys: [tagKey(who, 'other')], versions: [null] }))
  await redis.publish('bff:cache:invalidate', JSON.stringify({ from: 'x', keys: [tagKey(who, 'other'), 7], versions: ['1e300', '5'] }))
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit')
})

t.test('Redis cut mid-traffic: the cache serves from memory, never a 5xx, and invalidations made meanwhile reach Redis when it is back', async t => {
  const { proxy, cut, direct, who, headers } = await cutAndDirect(t)
  t.equal((await cut.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'miss')
  t.equal((await direct.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit', 'stored in Redis')
  const key = localKey('getItem', who, canonicalJson({ id: 'a' }))
  t.ok(direct.responseCache.cache.memory.get(key) !== undefined, 'and kept in the other instance\'s memory')

  for (const mode of ['reset', 'stall'] as const) {
    proxy.cut(mode)
    const statuses: number[] = []
    for (let i = 0; i < 20; i++) {
      const ids = ['a', 'b', 'c']
      const answers = await Promise.all(ids.map(async id => await cut.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers })))
      statuses.push(...answers.map(a => a.statusCode))
    }
    t.same([...new Set(statuses)], [200], `${mode}: every read answered 200`)
    t.ok(await metric(cut, 'mantle_cache_redis_fallbacks_total') > 0, `${mode}: fallbacks are counted`)
  }
  // A mutation while Redis is away: its own memory drops the tag at once...
  t.equal((await cut.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  t.equal((await cut.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'miss')
  t.ok(cut.responseCache.cache.pendingInvalidations > 0, 'the invalidation waits for Redis')
  // ...and Redis gets it when it is back, so no instance serves the old shared entry.
  proxy.restore()
  await eventually(async () => cut.redis.up() && cut.responseCache.cache.pendingInvalidations === 0, 'the replay')
  await eventually(async () => direct.responseCache.cache.memory.get(key) === undefined, 'the other instance drops it from memory')
  const shared = await direct.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.not(shared.json().n, 1, 'the entry stored before the cut is gone from Redis')
  // And the cut instance uses Redis again.
  let i = 0
  await eventually(async () => {
    const url = `/api/v1/items/d?q=${++i}`
    t.equal((await cut.inject({ method: 'GET', url, headers })).statusCode, 200)
    return (await direct.inject({ method: 'GET', url, headers })).headers['x-cache'] === 'hit'
  }, 'what the cut instance stores is shared again')
})

// ioredis' own re-subscribe after a reconnect dropped its SUBSCRIBE's promise: one that timed
// out was an unhandled rejection (the end of a gateway process on Node 20 without a handler),
// and the subscriber stayed ready but unsubscribed, deaf to every other instance's invalidation.
t.test('a cache subscriber whose SUBSCRIBE fails after a reconnect subscribes again, and the failure rejects nothing unhandled', async t => {
  const unhandled: unknown[] = []
  const onUnhandled = (err: unknown): void => { unhandled.push(err) }
  process.on('unhandledRejection', onUnhandled)
  t.teardown(() => { process.off('unhandledRejection', onUnhandled) })
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const lines: string[] = []
  const cut = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 1000, LOG_LEVEL: 'warn' }, {
    manifest,
    kernelUrl: kernel.url,
    logger: undefined,
    logStream: { write: (line: string) => { lines.push(line) } }
  })
  const direct = await buildTestApp(t, { REDIS_URL }, { manifest, kernelUrl: kernel.url })
  const who = tenant()
  const headers = bearer({ tenant: who })
  const key = localKey('getItem', who, canonicalJson({ id: 'a' }))
  const invalidationArrives = async (what: string): Promise<void> => {
    await eventually(async () => {
      await cut.inject({ method: 'GET', url: '/api/v1/items/a', headers })
      return cut.responseCache.cache.memory.get(key) !== undefined
    }, `the entry in the cut instance's memory (${what})`)
    t.equal((await direct.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
    await eventually(async () => cut.responseCache.cache.memory.get(key) === undefined, `the other instance's invalidation reaches the cut one (${what})`)
  }
  await invalidationArrives('subscribed at start-up')

  // The answer to the SUBSCRIBE sent on the next connection is held back past the command timeout.
  const failures = (): number => lines.filter(l => l.includes('cannot subscribe to invalidations')).length
  const failed = failures()
  let subscribes = 0
  proxy.watch(chunk => {
    const text = chunk.toString()
    if (!/subscribe/i.test(text) || !text.includes('bff:cache:invalidate')) return
    if (++subscribes === 1) proxy.delay(60_000)
  })
  proxy.cut('reset')
  await eventually(async () => !cut.redis.up(), 'the connections to drop')
  proxy.restore()
  await eventually(async () => unhandled.length > 0 || failures() > failed, 'the SUBSCRIBE to time out')
  proxy.restore()
  t.same(unhandled.map(err => (err as Error).message), [], 'no unhandled rejection')
  t.equal(failures(), failed + 1, 'the failure is logged')
  // Its connection made anew (what it held is dropped: the in-process tier starts over), it subscribes again.
  await eventually(async () => subscribes >= 2, 'a SUBSCRIBE on a new connection')
  proxy.watch(null)
  await invalidationArrives('subscribed again')
})

// The same re-subscribe, still unanswered when the gateway closes: disconnect() failed it with
// "Connection is closed.", unhandled (seen under load in rate-limit/redis-store.part.ts, whose
// gateways close right after a cut and its restore).
t.test('a gateway closed while its cache subscriber\'s SUBSCRIBE after a reconnect is unanswered rejects nothing unhandled', async t => {
  const unhandled: unknown[] = []
  const onUnhandled = (err: unknown): void => { unhandled.push(err) }
  process.on('unhandledRejection', onUnhandled)
  t.teardown(() => { process.off('unhandledRejection', onUnhandled) })
  const kernel = await itemKernel(t)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 5000 }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  let held = false
  proxy.watch(chunk => {
    if (held || !/subscribe/i.test(chunk.toString()) || !chunk.toString().includes('bff:cache:invalidate')) return
    held = true
    proxy.delay(60_000)
  })
  proxy.cut('reset')
  await eventually(async () => !app.redis.up(), 'the connections to drop')
  proxy.restore()
  await eventually(async () => held, 'the cache subscriber to send SUBSCRIBE again')
  await app.close()
  // A rejection is reported unhandled once the microtasks after it have run.
  await new Promise(resolve => setTimeout(resolve, 100))
  t.same(unhandled.map(err => (err as Error).message), [], 'no unhandled rejection')
})

// The subscriber dropped what its memory held when its connection was ready again, then sent
// SUBSCRIBE: an invalidation another instance published before Redis had that SUBSCRIBE never
// reached it, and an entry it had put in memory meanwhile was served, stale, until it expired.
t.test('an invalidation sent while the cache subscriber subscribes again after a reconnect is not lost to its memory', async t => {
  const { proxy, cut, direct, who, headers } = await cutAndDirect(t)
  const keyOf = (id: string): string => localKey('getItem', who, canonicalJson({ id }))
  const subscribing = (chunk: Buffer): boolean => /subscribe/i.test(chunk.toString()) && chunk.toString().includes('bff:cache:invalidate')
  const read = async (app: typeof cut, id: string) => await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers })
  // Subscribed at start-up: another instance's invalidation reaches it.
  // b read into the cut instance's memory, changed by the other: its invalidation reaches it.
  const invalidationReaches = async (when: string): Promise<void> => {
    await eventually(async () => {
      await read(cut, 'b')
      return cut.responseCache.cache.memory.get(keyOf('b')) !== undefined
    }, `b in the cut instance's memory${when}`)
    t.equal((await direct.inject({ method: 'PATCH', url: '/api/v1/items/b', headers, payload: {} })).statusCode, 200)
    await eventually(async () => cut.responseCache.cache.memory.get(keyOf('b')) === undefined, `the invalidation of b to reach the cut instance${when}`)
  }
  await invalidationReaches('')

  // Its next SUBSCRIBE is held back from Redis: its connection is ready, not yet subscribed.
  proxy.holdSends(subscribing)
  proxy.cut('reset')
  await eventually(async () => !cut.redis.up(), 'the connections to drop')
  proxy.restore()
  proxy.holdSends(subscribing)
  await eventually(async () => proxy.holding === 1 && cut.redis.up(), 'the subscriber\'s SUBSCRIBE, held, and the shared connection back')
  const first = await read(cut, 'a')
  t.equal(first.statusCode, 200)
  t.ok(cut.responseCache.cache.memory.get(keyOf('a')) !== undefined, 'a is in the cut instance\'s memory')
  // Another instance changes a, and says so before the SUBSCRIBE reaches Redis.
  t.equal((await direct.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  proxy.holdSends(null)
  proxy.release()
  // Subscribed again: the next invalidation (of b, read again) reaches it.
  await invalidationReaches(' again')
  const after = await read(cut, 'a')
  t.not(after.headers['x-cache'], 'hit', 'the entry of a made before the subscription is not served')
  t.ok(after.json().n > first.json().n, `a read after the change (n ${after.json().n}, ${first.json().n} before it)`)
})

t.test('a Redis down at start-up: the cache runs on memory', async t => {
  const kernel = await itemKernel(t)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  proxy.cut('reset')
  const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port) }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  const headers = bearer({ tenant: tenant() })
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'miss')
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit')
  t.equal(kernel.reads(), 1)
})

t.test('a tag version outlives every entry stored under it, whatever lifetime the entry has; an invalidation never shortens it', async t => {
  // The tag lifetime was computed once from the start-up manifest: after a reload that
  // lengthened an operation's ttl, entries outlived their tags, whose version then read 0 again,
  // and an entry stored under 0 before an invalidation was served again as a hit.
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.quit())
  const tier = new RedisTier(redis, 60_000)
  const who = tenant()
  const key = entryKey('getItem', who, { id: 'a' })
  const tags = [tagKey(who, 'item:a')]
  t.teardown(async () => { await redis.del(key, ...tags) })
  const now = Date.now()
  const day = 86_400_000
  const { versions } = await tier.read(key, tags)
  const born = await redis.get(tags[0])
  t.match(born, /^[1-9][0-9]*$/, 'the read gave the missing tag a version')
  t.equal(versions, born)
  t.ok(await tier.write(key, tags, versions, { value: {}, json: '{}', status: 200, etag: etagOf('{}'), freshUntil: now + day, staleUntil: now + day, keepUntil: now + day, policy: 'p' }, now))
  const entryTtl = await redis.pttl(key)
  t.ok(await redis.pttl(tags[0]) > entryTtl, 'the tag outlives the day-long entry, beyond the 60 s it was made with')
  await tier.invalidate(tags, 'test')
  const next = String(Number(born) + 1)
  t.equal(await redis.get(tags[0]), next)
  t.ok(await redis.pttl(tags[0]) > entryTtl, 'the invalidation kept the longer lifetime')
  // A short entry afterwards does not shorten it either.
  const short = entryKey('getItem', who, { id: 'b' })
  t.teardown(async () => { await redis.del(short) })
  t.ok(await tier.write(short, tags, next, { value: {}, json: '{}', status: 200, etag: etagOf('{}'), freshUntil: now + 1000, staleUntil: now + 1000, keepUntil: now + 1000, policy: 'p' }, now))
  t.ok(await redis.pttl(tags[0]) > entryTtl)
  // A tag made by an invalidation alone gets the tier's lifetime.
  const fresh = tagKey(who, 'item:fresh')
  t.teardown(async () => { await redis.del(fresh) })
  await tier.invalidate([fresh], 'test')
  const freshTtl = await redis.pttl(fresh)
  t.ok(freshTtl > 50_000 && freshTtl <= 60_000, `the tier's 60 s (${freshTtl} ms)`)
})

t.test('a tag filled from a long input is keyed by its hash: Redis and memory hold no tag key its length, and its invalidation still drops the entry', async t => {
  // Kept as it was, a read with a 1 MB id (a GraphQL POST) wrote a 1 MB tag key to Redis for the
  // tag's lifetime (minutes), even when the Kernel refused the call.
  const kernel = await itemKernel(t)
  const id = 'l'.repeat(2000)
  let n = 0
  kernel.on(`GET /v1/items/${id}`, (_req, res) => json(res, 200, { id: 'long', n: ++n }))
  kernel.on(`PATCH /v1/items/${id}`, (_req, res) => json(res, 200, { id: 'long', n: 0 }))
  const app = await buildTestApp(t, { REDIS_URL }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  const who = tenant()
  const headers = bearer({ tenant: who })
  const redis = new Redis(REDIS_URL)
  t.teardown(async () => {
    const keys = await redis.keys(`bff:cache*:${who}:*`)
    if (keys.length > 0) await redis.del(...keys)
    redis.disconnect()
  })
  const read = async (): Promise<{ headers: Record<string, unknown>, json: () => { result: { data: { n: number } } } }> => await app.inject({ method: 'GET', url: '/trpc/getItem?input=' + encodeURIComponent(JSON.stringify({ id })), headers })
  t.equal((await read()).headers['x-cache'], 'miss')
  t.equal((await read()).headers['x-cache'], 'hit')
  const tags = await redis.keys(`bff:cache-tag:${who}:*`)
  t.equal(tags.length, 2, 'item:{id} and items')
  for (const k of tags) t.ok(k.length <= tagKey(who, '').length + TAG_KEY_MAX, `a tag key of ${k.length} characters`)
  t.equal(tagKey(who, `item:${id}`), tagKey(who, `item:${id}`), 'one tag, one key')
  t.not(tagKey(who, `item:${id}`), tagKey(who, `item:${id}x`), 'two tags, two keys')
  t.equal((await app.inject({ method: 'POST', url: '/trpc/updateItem', headers, payload: { id } })).statusCode, 200)
  const after = await read()
  t.equal(after.headers['x-cache'], 'miss', 'the mutation dropped it')
  t.equal(after.json().result.data.n, 2)
})

/** A Redis tier of its own for one test: entries of `ids` (getItem) under `tagNames` of a new tenant, removed after. */
async function tierFor (t: { teardown: (fn: () => unknown) => void }, ids: string[], tagNames: string[]): Promise<{ redis: Redis, tier: RedisTier, keys: string[], tags: string[], answer: (json: string) => CachedAnswer }> {
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.quit())
  const who = tenant()
  const keys = ids.map(id => entryKey('getItem', who, { id }))
  const tags = tagNames.map(name => tagKey(who, name))
  t.teardown(async () => { await redis.del(...keys, ...tags) })
  const now = Date.now()
  const answer = (json: string): CachedAnswer => ({ value: JSON.parse(json), json, status: 200, etag: etagOf(json), freshUntil: now + 60_000, staleUntil: now + 60_000, keepUntil: now + 60_000, policy: 'p' })
  return { redis, tier: new RedisTier(redis, 60_000), keys, tags, answer }
}

t.test('a tag version Redis evicted does not bring back the entries its invalidation dropped', async t => {
  // Tag keys have a lifetime, and under maxmemory Redis may evict one before the entries stored
  // under it. A missing tag read as 0, the version every tag was born with: an entry stored
  // under 0, then invalidated, was served again as a hit once its tag key was gone.
  const { redis, tier, keys: [key], tags, answer } = await tierFor(t, ['a'], ['item:a'])
  t.ok(await tier.write(key, tags, (await tier.read(key, tags)).versions, answer('{"n":1}'), Date.now()))
  t.same((await tier.read(key, tags)).answer?.value, { n: 1 }, 'stored and served')
  await tier.invalidate(tags, 'test')
  t.equal((await tier.read(key, tags)).answer, null, 'invalidated')
  await redis.del(tags[0]) // as an eviction would
  t.equal((await tier.read(key, tags)).answer, null, 'still invalidated once its tag key is gone')
  // An invalidation of a tag that has no version gives it a random one, never 1.
  await redis.del(tags[0])
  await tier.invalidate(tags, 'test')
  t.not(await redis.get(tags[0]), '1')
})

t.test('a tag key some other program wrote as another type (a list) is taken for missing: reads, writes and invalidations of it succeed', async t => {
  // GET of a list fails with WRONGTYPE, and every script reading the tag failed with it: each
  // read of the tag held the whole shared tier off for a second, and its invalidation, pending,
  // failed every replay, with every other invalidation waiting beside it.
  const { redis, tier, keys: [key], tags, answer } = await tierFor(t, ['a'], ['item:a', 'items'])
  await redis.rpush(tags[0], 'junk')
  const read = await tier.read(key, tags)
  t.equal(read.answer, null)
  t.equal(await redis.type(tags[0]), 'string', 'the read gave it a version')
  t.ok(await tier.write(key, tags, read.versions, answer('{"n":1}'), Date.now()), 'stored')
  t.same((await tier.read(key, tags)).answer?.value, { n: 1 })
  await redis.del(tags[0])
  await redis.rpush(tags[0], 'junk')
  t.notOk(await tier.write(key, tags, read.versions, answer('{"n":2}'), Date.now()), 'a write under it is refused, not failed')
  t.equal((await tier.read(key, tags)).answer, null, 'the entry stored before is not served')
  await redis.del(tags[0])
  await redis.hset(tags[0], 'f', 'v')
  await tier.invalidate(tags, 'test')
  t.ok(Number(await redis.get(tags[0])) >= 2 ** 40, 'an invalidation gives it a version of ours')
})

t.test('a rolling deploy from the release that counted versions from 0: its versions are replaced, its entries never served', async t => {
  // That release read a missing tag as 0 and stored entries under 0, 1, ... counted again from 0
  // after an eviction: a count that repeated made an invalidated entry current again.
  const { redis, tier, keys: [key], tags, answer } = await tierFor(t, ['a'], ['item:a'])
  const old = answer('{"n":1}')
  // As the earlier release stored it: entry under 0, tag 0.
  await redis.set(tags[0], '0')
  await redis.set(key, '0\n' + ['p', 200, old.etag, old.freshUntil, old.staleUntil, old.keepUntil, old.json].join('\n'), 'PX', 60_000)
  const read = await tier.read(key, tags)
  t.equal(read.answer, null, 'an entry under a legacy version is not served')
  t.ok(Number(read.versions) >= 2 ** 40, `the tag got a version of ours (${read.versions})`)
  t.equal(await redis.get(tags[0]), read.versions)
})

t.test('fills of several keys under a tag that has no version are all stored', async t => {
  // The first version of a missing tag is given at the read: given at the first write, it made
  // every other fill that had read the tag missing look raced, and only one of them was stored.
  const { redis, tier, keys, tags, answer } = await tierFor(t, ['a', 'b', 'c'], ['items', 'item:x'])
  await redis.set(tags[1], String(2 ** 41))
  const reads = await Promise.all(keys.map(async key => await tier.read(key, tags)))
  t.equal(new Set(reads.map(r => r.versions)).size, 1, 'every read got the same versions')
  t.same(await Promise.all(keys.map(async (key, i) => await tier.write(key, tags, reads[i].versions, answer('{}'), Date.now()))), [true, true, true])
  for (const key of keys) t.ok((await tier.read(key, tags)).answer, 'served')
})

t.test('a read writes only tags it finds missing: a read of present tags is one MGET', async t => {
  // The versions born at a read are what keeps concurrent fills and an invalidation racing them
  // apart (the tests above); a read that found every tag had no reason to write anything.
  const { redis, tier, keys: [key, other], tags, answer } = await tierFor(t, ['a', 'b'], ['items', 'item:a'])
  const sent: string[] = []
  const send = redis.sendCommand.bind(redis)
  redis.sendCommand = ((command: { name: string }) => { sent.push(command.name); return send(command as Parameters<typeof send>[0]) }) as typeof redis.sendCommand
  await redis.set(tags[0], String(2 ** 41))
  sent.length = 0
  const first = await tier.read(key, tags)
  t.same([...new Set(sent.map(name => name.startsWith('eval') ? 'script' : name))], ['mget', 'script'], 'and one script for the missing tag')
  t.ok(await tier.write(key, tags, first.versions, answer('{}'), Date.now()))
  sent.length = 0
  t.ok((await tier.read(key, tags)).answer, 'a hit')
  t.equal((await tier.read(other, tags)).answer, null, 'a miss')
  t.same(sent, ['mget', 'mget'], 'nothing written')
})

// A rolling deploy that drops a field from an output schema: old and new instances share Redis,
// and the new one served the old one's entries as they were, the dropped field included.
t.test('an instance does not serve an entry made under another output schema (a rolling deploy)', async t => {
  const kernel = await itemKernel(t)
  const narrow = { type: 'object', properties: { id: { type: 'string' }, n: { type: 'integer' } } }
  const v1 = await buildTestApp(t, { REDIS_URL, BFF_CACHE_STORE: 'redis' }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  const v2 = await buildTestApp(t, { REDIS_URL, BFF_CACHE_STORE: 'redis' }, { manifest: itemManifest(kernel.url, { getItem: { output: narrow } }), kernelUrl: kernel.url })
  const headers = bearer({ tenant: tenant() })
  const old = await v1.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.same(Object.keys(old.json()).sort(), ['id', 'n', 'tenant'])
  const fresh = await v2.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.equal(fresh.headers['x-cache'], 'miss', 'the old version\'s entry is not served')
  t.same(Object.keys(fresh.json()).sort(), ['id', 'n'], 'what the new output schema declares')
  t.equal((await v2.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit', 'its own entry is')
})

// Left open by review r-cache: an entry's policy hashed the op's `cache` as the manifest wrote
// it, so instances whose BFF_CACHE_TTL differed made entries of one policy that lived for
// different times: one served the other's hour-long entries as its own minute-long ones (and an
// instance that lost an invalidation read them back once its spell, as long as its own entries
// live, was over). The ttl in force is in the policy now.
t.test('instances with another BFF_CACHE_TTL do not serve each other\'s entries of an op that sets no ttl; those that set one still share', async t => {
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const hour = await buildTestApp(t, { REDIS_URL, BFF_CACHE_TTL: '3600' }, { manifest, kernelUrl: kernel.url })
  const minute = await buildTestApp(t, { REDIS_URL, BFF_CACHE_TTL: '60' }, { manifest, kernelUrl: kernel.url })
  const headers = bearer({ tenant: tenant() })
  t.equal((await hour.inject({ method: 'GET', url: '/api/v1/default/a', headers })).headers['x-cache'], 'miss')
  const other = await minute.inject({ method: 'GET', url: '/api/v1/default/a', headers })
  t.equal(other.headers['x-cache'], 'miss', 'the hour-long entry is not served by the instance whose entries live a minute')
  t.match(other.headers['cache-control'], /max-age=60\b/)
  t.equal(kernel.reads(), 2)
  // An op that sets its ttl is the same policy on both: shared as before.
  t.equal((await hour.inject({ method: 'GET', url: '/api/v1/items/b', headers })).headers['x-cache'], 'miss')
  t.equal((await minute.inject({ method: 'GET', url: '/api/v1/items/b', headers })).headers['x-cache'], 'hit')
  t.equal(kernel.reads(), 3)
})

// The cache subscriber only listens: a connection that stopped bringing anything (a flow a
// failover left half-open) stayed "ready" and subscribed, deaf to every other instance's
// invalidation, and the in-process tier served what they dropped as hits until it expired (and
// so on for every entry it took in after, while the connection stayed so: for ever).
t.test('a cache subscriber that hears nothing more is made anew: what memory held is not served long past another instance\'s invalidation', async t => {
  const { proxy, cut, direct, who, headers } = await cutAndDirect(t, { BFF_CACHE_TTL: '3600' })
  const keyOf = (id: string): string => localKey('getDefault', who, canonicalJson({ id }))
  const read = async (id: string) => await cut.inject({ method: 'GET', url: `/api/v1/default/${id}`, headers })
  await eventually(async () => {
    await read('a')
    return cut.responseCache.cache.memory.get(keyOf('a')) !== undefined
  }, 'a in the cut instance\'s memory')
  const first = (await read('a')).json().n
  // The subscriber's connection gets nothing more from Redis; the shared one is untouched.
  proxy.deafen(sent => sent.includes('mantle-cache-sub'))
  t.equal((await direct.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  let served = first
  try {
    await eventually(async () => {
      served = (await read('a')).json().n
      return served > first
    }, 'a read after the change', 8000)
  } catch {}
  t.ok(served > first, `a read after the change within seconds (n ${served}, ${first} before it)`)
  proxy.restore()
  // Subscribed again: another instance's invalidation reaches it.
  await eventually(async () => {
    await read('b')
    return cut.responseCache.cache.memory.get(keyOf('b')) !== undefined
  }, 'b in the cut instance\'s memory')
  t.equal((await direct.inject({ method: 'PATCH', url: '/api/v1/items/b', headers, payload: {} })).statusCode, 200)
  await eventually(async () => cut.responseCache.cache.memory.get(keyOf('b')) === undefined, 'the invalidation of b to reach the cut instance')
})

// The subscriber away for good while the shared connection works (Redis full at maxclients for
// new connections, a path to it that stays broken): the in-process tier went on serving its
// entries, and those it took from Redis meanwhile, as hits for their ttl, deaf to every other
// instance's invalidation, Redis answering all along. Until the subscriber is back, a read asks
// Redis, which knows the versions.
t.test('while the cache subscriber cannot get back, Redis up, memory does not serve what another instance invalidated', async t => {
  const { proxy, cut, direct, who, headers } = await cutAndDirect(t, { BFF_CACHE_TTL: '3600' })
  const keyOf = (id: string): string => localKey('getDefault', who, canonicalJson({ id }))
  const read = async (id: string) => await cut.inject({ method: 'GET', url: `/api/v1/default/${id}`, headers })
  const subscribed = async (): Promise<number> => await metric(cut, 'mantle_cache_subscriber_up')
  // The subscriber's connection, and every one it makes again, gets nothing from Redis.
  proxy.deafen(sent => sent.includes('mantle-cache-sub'), true)
  await eventually(async () => await subscribed() === 0, 'the subscriber dropped', 10_000)
  // Read while it is away: in memory, from the Kernel or from Redis.
  await eventually(async () => {
    await read('a')
    return cut.responseCache.cache.memory.get(keyOf('a')) !== undefined
  }, 'a in the cut instance\'s memory')
  const first = (await read('a')).json().n
  t.ok(cut.redis.up(), 'the shared connection is up')
  t.equal((await direct.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  const after = await read('a')
  t.equal(await subscribed(), 0, 'the subscriber still away')
  t.not(after.json().n, first, 'the change is read')
  t.not(after.headers['x-cache'], 'hit', 'not the entry from before it')
  proxy.restore()
  await eventually(async () => await subscribed() === 1, 'subscribed again', 10_000)
})

t.test('one tenant\'s entries in Redis are bounded (BFF_CACHE_REDIS_MAX_BYTES_PER_TENANT): its distinct reads take no more, and another tenant\'s are still written', async t => {
  // Unbounded, one tenant's distinct reads (an entry each) filled Redis: under an LRU policy it
  // then evicted other tenants' idempotency records (their repeats ran their mutations again).
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const env = { REDIS_URL, BFF_CACHE_REDIS_MAX_BYTES_PER_TENANT: '4096' }
  const one = await buildTestApp(t, env, { manifest, kernelUrl: kernel.url })
  const two = await buildTestApp(t, env, { manifest, kernelUrl: kernel.url })
  const a = tenant()
  const b = tenant()
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.disconnect())
  const read = (i: number): string => `/api/v1/items/a?q=${'x'.repeat(100)}${i}`
  const statuses = new Set<number>()
  for (let i = 0; i < 40; i++) statuses.add((await one.inject({ method: 'GET', url: read(i), headers: bearer({ tenant: a }) })).statusCode)
  t.same([...statuses], [200], 'every read is answered')
  const keys = (await redis.keys(`bff:cache:getItem:${a}:*`))
  let bytes = 0
  for (const key of keys) bytes += key.length + await redis.strlen(key)
  t.ok(keys.length > 0 && keys.length < 40, `some of the tenant's reads are in Redis, not all (${keys.length} of 40)`)
  t.ok(bytes <= 4096, `the tenant's entries take at most its bound in Redis (${bytes} bytes)`)
  // The last read, past the bound: answered, kept in the memory of the instance that made it only.
  t.equal((await one.inject({ method: 'GET', url: read(39), headers: bearer({ tenant: a }) })).headers['x-cache'], 'hit', 'in its instance\'s memory')
  t.equal((await two.inject({ method: 'GET', url: read(39), headers: bearer({ tenant: a }) })).headers['x-cache'], 'miss', 'not in Redis')
  t.ok(await metric(one, 'mantle_cache_redis_tenant_full_total') > 0, 'counted')
  // Another tenant's entry is written as ever.
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/b', headers: bearer({ tenant: b }) })).headers['x-cache'], 'miss')
  t.equal((await two.inject({ method: 'GET', url: '/api/v1/items/b', headers: bearer({ tenant: b }) })).headers['x-cache'], 'hit', 'the other tenant\'s entry is in Redis')
})

t.test('a tenant\'s index or sizes key some other program wrote as another type: its answers are still written to Redis, and no other tenant\'s read skips Redis for it', async t => {
  // The write's script read the tenant's index (a sorted set) and sizes (a hash) with commands
  // that fail with WRONGTYPE on any other type, and so did every write of the tenant: none of its
  // answers reached Redis, and each failure held the whole shared tier off for a second, every
  // other tenant's reads and invalidations with it (as a tag key of another type did, 920ac85).
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const one = await buildTestApp(t, { REDIS_URL }, { manifest, kernelUrl: kernel.url })
  const two = await buildTestApp(t, { REDIS_URL }, { manifest, kernelUrl: kernel.url })
  const x = tenant()
  const y = tenant()
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.disconnect())
  const [index, sizes] = tenantBudgetKeys(entryKey('getItem', x, { id: 'a' }))
  await redis.set(index, 'junk', 'PX', 60_000)
  await redis.rpush(sizes, 'junk')
  await redis.pexpire(sizes, 60_000)
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/b', headers: bearer({ tenant: y }) })).headers['x-cache'], 'miss', 'the other tenant\'s entry, in Redis')
  const read = await two.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: x }) })
  t.same([read.statusCode, read.headers['x-cache']], [200, 'miss'])
  t.equal((await two.inject({ method: 'GET', url: '/api/v1/items/b', headers: bearer({ tenant: y }) })).headers['x-cache'], 'hit', 'the other tenant\'s read still reaches Redis')
  t.equal(await metric(two, 'mantle_cache_redis_fallbacks_total'), 0, 'no cache operation skipped Redis')
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: x }) })).headers['x-cache'], 'hit', 'the tenant\'s answer was written to Redis')
  t.equal(kernel.reads(), 2)
  t.same([await redis.type(index), await redis.type(sizes)], ['zset', 'hash'], 'its index and sizes are kept again')
  // The sizes alone of another type.
  await redis.del(sizes)
  await redis.rpush(sizes, 'junk')
  t.equal((await two.inject({ method: 'GET', url: '/api/v1/items/c', headers: bearer({ tenant: x }) })).headers['x-cache'], 'miss')
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/c', headers: bearer({ tenant: x }) })).headers['x-cache'], 'hit', 'written to Redis')
  t.equal(await metric(two, 'mantle_cache_redis_fallbacks_total'), 0)
  t.equal(await redis.type(sizes), 'hash')
})

// The subscriber's connection dropped with its SUBSCRIBE on the way (Redis restarted, a failover,
// a cut just after a reconnect): ioredis neither sent it again nor failed it, and it held off the
// new connection's own SUBSCRIBE until its command timeout, which then dropped that connection,
// ready, to subscribe on the one after: deaf to invalidations for the timeout more, and the
// in-process tier emptied once more.
t.test('a SUBSCRIBE on its way when the cache subscriber\'s connection drops does not hold off, nor drop, the next connection', async t => {
  const kernel = await itemKernel(t)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  // The subscriber's connections, each named in its handshake.
  let made = 0
  proxy.watch(chunk => { if (chunk.includes('mantle-cache-sub')) made++ })
  const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port) }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  const subscribed = async (): Promise<number> => await metric(app, 'mantle_cache_subscriber_up')
  await eventually(async () => await subscribed() === 1, 'subscribed')
  // Every connection reset; the subscriber's next SUBSCRIBE is held on its way to Redis.
  proxy.cut('reset')
  proxy.restore()
  proxy.holdSends(chunk => chunk.includes('subscribe') && chunk.includes('bff:cache:invalidate'))
  await eventually(async () => proxy.holding > 0, 'the SUBSCRIBE on its way')
  const before = made
  const cutAt = performance.now()
  proxy.cut('reset')
  proxy.restore()
  await eventually(async () => await subscribed() === 1, 'subscribed again')
  const took = Math.round(performance.now() - cutAt)
  // Past the command timeout (500 ms) of the SUBSCRIBE caught by the cut.
  await new Promise(resolve => setTimeout(resolve, 1500))
  t.equal(made - before, 1, `the connection made anew once, not dropped again once subscribed (subscribed ${took} ms after the cut)`)
  t.equal(await subscribed(), 1, 'subscribed')
})
