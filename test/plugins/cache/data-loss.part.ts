// Redis that loses data while it answers: a replica promoted behind its primary (tag versions
// gone back with the entries they matched), a Redis full under maxmemory (noeviction).
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { buildTestApp, bearer } from '../../helper.js'
import { startRedisServer } from '../../redis-server.js'
import { itemKernel, itemManifest, eventually, REDIS_URL } from './items.js'
import { entryKey, INVALIDATE_CHANNEL, localKey, RedisTier, ResponseCache, tagKey } from '../../../plugins/cache/index.js'
import { canonicalJson } from '../../../plugins/pipeline/index.js'

t.test('a replica promoted behind its primary: tag versions gone back do not bring back the entries invalidated since', async t => {
  // Redis replicates asynchronously: a replica promoted by a failover lacks the primary's last
  // writes, and an invalidation among them took the tag back to the version the entry before it
  // was stored under. Every instance (their in-process tiers emptied by the reconnect) served
  // that entry again as a hit, for its ttl.
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const one = await buildTestApp(t, { REDIS_URL }, { manifest, kernelUrl: kernel.url })
  const two = await buildTestApp(t, { REDIS_URL }, { manifest, kernelUrl: kernel.url })
  const who = 'cache-' + randomUUID()
  const headers = bearer({ tenant: who })
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.disconnect())
  const entry = entryKey('getItem', who, { id: 'a' })
  const tags = [tagKey(who, 'item:a'), tagKey(who, 'items')]
  t.teardown(async () => { await redis.del(entry, ...tags) })
  const local = localKey('getItem', who, canonicalJson({ id: 'a' }))

  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/a', headers })).json().n, 1)
  // What the replica has when the failover comes: the entry and the tags it was stored under.
  const replica = { entry: await redis.dumpBuffer(entry), tags: await redis.mget(...tags) }
  t.equal((await one.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  await eventually(async () => Number(await redis.get(tags[0])) > Number(replica.tags[0]), 'the invalidation')
  const fresh = await two.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.equal(fresh.json().n, 2, 'the other instance reads the new answer')
  t.ok(two.responseCache.cache.memory.get(local) !== undefined)

  for (const [name, app] of [['the instance that invalidated', one], ['an instance that heard it', two]] as const) {
    // The failover: Redis as the replica had it, the in-process tiers emptied by the reconnect.
    await redis.restore(entry, 60_000, replica.entry!, 'REPLACE')
    for (let i = 0; i < tags.length; i++) await redis.set(tags[i], replica.tags[i]!, 'PX', 600_000)
    one.responseCache.cache.resync()
    two.responseCache.cache.resync()
    const read = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(read.statusCode, 200)
    t.not(read.json().n, 1, `${name}: the entry the invalidation dropped is not served again`)
    t.ok(Number(await redis.get(tags[0])) > Number(replica.tags[0]) + 1, `${name}: the tag moved past every version it had, not back to one it had before`)
    t.equal(await redis.get(tags[1]), replica.tags[1], 'a tag that did not go back is left as it is')
    const other = app === one ? two : one
    const again = await other.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.not(again.json().n, 1, `${name}: nor by the other instance`)
  }
})

t.test('Redis full (maxmemory, noeviction): a mutation\'s invalidation still reaches every instance', async t => {
  // Every write is refused (OOM) while reads go on: the invalidation's script failed, the tag
  // waited on the invalidating instance to be replayed (refused again as long as Redis stayed
  // full), and every other instance read the entry it dropped from Redis and served it as a hit.
  const own = await startRedisServer(t)
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const one = await buildTestApp(t, { REDIS_URL: own.url }, { manifest, kernelUrl: kernel.url })
  const two = await buildTestApp(t, { REDIS_URL: own.url }, { manifest, kernelUrl: kernel.url })
  const who = 'cache-' + randomUUID()
  const headers = bearer({ tenant: who })
  t.equal((await one.inject({ method: 'GET', url: '/api/v1/items/a', headers })).json().n, 1)
  await own.client.config('SET', 'maxmemory', '1')
  t.teardown(async () => { await own.client.config('SET', 'maxmemory', '0') })
  t.equal((await one.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  t.equal(one.responseCache.cache.pendingInvalidations, 0, 'Redis took the invalidation')
  const statuses: number[] = []
  for (const app of [two, one]) {
    const read = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    statuses.push(read.statusCode)
    t.not(read.json().n, 1, 'the entry the mutation dropped is not served')
  }
  t.same(statuses, [200, 200])
  // Once Redis has room again, the cache uses it as before.
  await own.client.config('SET', 'maxmemory', '0')
  await eventually(async () => {
    await one.inject({ method: 'GET', url: '/api/v1/items/b', headers })
    return (await two.inject({ method: 'GET', url: '/api/v1/items/b', headers })).headers['x-cache'] === 'hit'
  }, 'entries shared through Redis again')
})

/**
 * A Redis tier of a test's own on the shared Redis (tag time 60 s), a tenant of its own (`who`),
 * and the invalidation messages that name it, or are it, as they come (`heard`).
 */
async function tierHeard (t: { teardown: (fn: () => unknown) => void }): Promise<{ redis: Redis, tier: RedisTier, who: string, heard: string[] }> {
  const redis = new Redis(REDIS_URL)
  const listener = new Redis(REDIS_URL)
  t.teardown(() => { redis.disconnect(); listener.disconnect() })
  const who = 'cache-' + randomUUID()
  const heard: string[] = []
  await listener.subscribe(INVALIDATE_CHANNEL)
  listener.on('message', (_channel: string, text: string) => { if (text.includes(who)) heard.push(text) })
  return { redis, tier: new RedisTier(redis, 60_000), who, heard }
}

t.test('a tag found behind is moved only if it still is: a read answered before an invalidation heard since moves nothing', async t => {
  // Messages come on the subscriber's connection, read answers on the command connection: a read
  // that Redis answered just before an invalidation may be taken in after its message, and its
  // version is then below the one learned, Redis having gone back in nothing. Moved all the same,
  // every such race was an invalidation more, of a tag every instance had just refilled.
  const { redis, tier, who, heard } = await tierHeard(t)
  const tag = tagKey(who, 'item:a')
  const entry = entryKey('getItem', who, { id: 'a' })
  t.teardown(async () => { await redis.del(tag, entry) })

  const born = (await tier.read(entry, [tag])).versions
  const next = String(Number(born) + 1)
  tier.learn([tag], [next])
  await redis.set(tag, next, 'PX', 60_000)
  t.equal(await tier.raise([tag], 'test'), 0, 'at the version known: nothing moved')
  t.equal(await redis.get(tag), next)
  t.same((await tier.read(entry, [tag])).behind, undefined)
  // Behind for real: moved past what was known, and every instance told the new version.
  await redis.set(tag, born, 'PX', 60_000)
  t.same((await tier.read(entry, [tag])).behind, [tag])
  t.equal(await tier.raise([tag], 'test'), 1)
  const raised = String(Number(next) + 1)
  t.equal(await redis.get(tag), raised, 'past the version known, not back to it')
  await redis.publish(INVALIDATE_CHANNEL, who)
  await eventually(async () => heard.at(-1) === who, 'the messages')
  t.same(heard.map(m => m === who ? m : JSON.parse(m)), [{ from: 'test', db: tier.db, ms: tier.tagMs, keys: [tag], versions: [raised] }, who], 'one message, the raise\'s, with its version')
})

t.test('a tag that expired (its time ran out, nothing lost) is born anew: no instance takes it for Redis gone back', async t => {
  // A tag lives its tier's tag time after the last entry or invalidation that used it, then
  // expires, and the next read gives it a random version, lower than the one it had half the
  // time. An instance that had learnt the old version took the new one for a Redis gone back:
  // an invalidation of every entry stored under it since, and a warning of a failover that
  // never happened.
  const redis = new Redis(REDIS_URL)
  t.teardown(() => { redis.disconnect() })
  const TAG_MS = 400
  const one = new RedisTier(redis, TAG_MS)
  const two = new RedisTier(redis, TAG_MS)
  const who = 'cache-' + randomUUID()
  const tag = tagKey(who, 'item:a')
  const entry = entryKey('getItem', who, { id: 'a' })
  t.teardown(async () => { await redis.del(tag, entry) })
  // An invalidation gives the tag a version near the top, which the other instance hears.
  await redis.set(tag, String(2 ** 47 - 10), 'PX', 60_000)
  await one.invalidate([tag], 'one')
  const latest = await redis.get(tag)
  two.learn([tag], [latest])
  t.same((await two.read(entry, [tag])).behind, undefined, 'at the version known: not behind')
  await redis.pexpire(tag, TAG_MS)
  await eventually(async () => await redis.exists(tag) === 0, 'the tag to expire')
  await new Promise(resolve => setTimeout(resolve, TAG_MS))
  const reborn = await one.read(entry, [tag])
  t.ok(Number(reborn.versions) < Number(latest), 'born anew below the version it had')
  t.same(reborn.behind, undefined, 'not behind for the instance that gave it its version')
  t.same((await two.read(entry, [tag])).behind, undefined, 'nor for the instance that had learnt the old one')
  t.equal(await two.raise([tag], 'two'), 0)
  t.equal(await redis.get(tag), reborn.versions, 'the tag keeps the version it was born with')
})

t.test('two deployments on one Redis server, each in a database of its own, do not take each other\'s tag versions for Redis gone back', async t => {
  // Pub/sub ignores the database: an instance on db 1 hears the invalidations made on db 0. The
  // same tenant and tag in both (a staging and a production gateway, say) have versions of their
  // own, and one learnt from the other database's message is no step back of this one's.
  const own = await startRedisServer(t)
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const x = await buildTestApp(t, { REDIS_URL: own.url + '/0' }, { manifest, kernelUrl: kernel.url })
  const y = await buildTestApp(t, { REDIS_URL: own.url + '/1' }, { manifest, kernelUrl: kernel.url })
  const who = 'cache-' + randomUUID()
  const headers = bearer({ tenant: who })
  const tag = tagKey(who, 'item:a')
  const heard: string[] = []
  const listener = new Redis(own.url)
  t.teardown(() => listener.disconnect())
  await listener.subscribe(INVALIDATE_CHANNEL)
  listener.on('message', (_channel: string, text: string) => { heard.push(text) })
  for (const app of [x, y]) t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).statusCode, 200)
  // The tag's version in db 0 below the one in db 1 (each is born random: half the time so).
  await own.client.select(0)
  await own.client.set(tag, String(2 ** 40 + 1), 'PX', 600_000)
  await own.client.select(1)
  await own.client.set(tag, String(2 ** 46), 'PX', 600_000)
  t.equal((await y.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
  await eventually(async () => heard.length === 1, 'the invalidation message')
  const before = kernel.reads()
  const outcomes: string[] = []
  for (let i = 0; i < 6; i++) {
    for (const app of [x, y]) outcomes.push(String((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache']))
  }
  t.ok(kernel.reads() - before <= 2, `each instance refills once, then serves hits (Kernel reads ${kernel.reads() - before}, ${outcomes.join(' ')})`)
  await listener.publish(INVALIDATE_CHANNEL, who)
  await eventually(async () => heard.at(-1) === who, 'the messages')
  t.equal(heard.length, 2, 'no invalidation but the mutation\'s')
  await own.client.select(0)
  t.equal(await own.client.get(tag), String(2 ** 40 + 1), 'the tag of db 0 left as it was')
})

t.test('an instance whose tags live longer (a manifest of its own) forgets a version it heard before the tag the other instance moved can expire', async t => {
  // A tier's tag time comes from the longest-lived cached op of the manifest it started with: a
  // reload, or a deploy, that changed it leaves instances with times of their own. The one that
  // invalidates gives the tag its own time; one that heard it kept the version for nine tenths
  // of ITS time, longer than the tag lived: the tag expired, a read gave it a new version, lower
  // half the time, and the instance that had heard took that for Redis gone back (a raise of
  // every entry stored under it since, and the warning of a failover that never happened).
  const redis = new Redis(REDIS_URL)
  const listener = new Redis(REDIS_URL)
  t.teardown(() => { redis.disconnect(); listener.disconnect() })
  const SHORT_MS = 1000
  const short = new RedisTier(redis, SHORT_MS)
  const long = new RedisTier(redis, 60_000)
  const warned: string[] = []
  const cache = new ResponseCache({
    redis: { tier: long, up: () => true },
    maxSize: 100,
    maxBytes: 1 << 20,
    defaultTtlSeconds: 60,
    breakerOpen: () => false,
    serializer: () => JSON.stringify,
    instanceId: 'long',
    log: { warn: (_obj: object, msg: string) => { warned.push(msg) }, debug: () => {} }
  })
  t.teardown(() => cache.close())
  const who = 'cache-' + randomUUID()
  const tag = tagKey(who, 'item:a')
  const entry = entryKey('getItem', who, { id: 'a' })
  t.teardown(async () => { await redis.del(tag, entry) })
  const heard: string[] = []
  await listener.subscribe(INVALIDATE_CHANNEL)
  listener.on('message', (_channel: string, text: string) => { if (text.includes(who)) heard.push(text) })
  // A version near the top, so that the one the tag is born with next is below it.
  await redis.set(tag, String(2 ** 47 - 10), 'PX', 50)
  await short.invalidate([tag], 'short')
  const latest = await redis.get(tag)
  await eventually(async () => heard.length === 1, 'the invalidation message')
  cache.received(heard[0])
  t.same((await long.read(entry, [tag])).behind, undefined, 'at the version heard: not behind')
  await eventually(async () => await redis.exists(tag) === 0, 'the tag to expire')
  const reborn = await short.read(entry, [tag])
  t.ok(Number(reborn.versions) < Number(latest), 'born anew below the version it had')
  t.same((await long.read(entry, [tag])).behind, undefined, 'not taken for Redis gone back by the instance that heard the old version')
  t.equal(await long.raise([tag], 'long'), 0)
  t.equal(await redis.get(tag), reborn.versions, 'the tag keeps the version it was born with')
  t.same(warned, [])
})

t.test('a raise that moves one tag and finds another holding no number still tells every instance, in JSON', async t => {
  // The message carried the value of a tag that was not moved as Redis held it: one written by
  // something else than Mantle (`x"y`) made the message invalid JSON, every instance dropped it,
  // and the tag that was moved was not dropped from their memory.
  const { redis, tier, who, heard } = await tierHeard(t)
  const behind = tagKey(who, 'item:a')
  const junk = tagKey(who, 'item:b')
  t.teardown(async () => { await redis.del(behind, junk) })
  await redis.set(behind, String(2 ** 41), 'PX', 60_000)
  await redis.set(junk, 'x"y', 'PX', 60_000)
  tier.learn([behind], [String(2 ** 41 + 5)])
  t.equal(await tier.raise([behind, junk], 'test'), 1, 'the tag behind moved')
  await eventually(async () => heard.length === 1, 'the message')
  const message = JSON.parse(heard[0]) as { keys: string[], versions: string[] }
  t.same(message.keys, [behind, junk])
  t.same(message.versions, [String(2 ** 41 + 6), ''], 'a value that is no version is told as none')
})
