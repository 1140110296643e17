// An ACL changed while the gateway runs (`ACL SETUSER mantle -evalsha`, `resetkeys`, `-publish`):
// every store failed NOPERM and ran on memory (rate limits and idempotency per instance,
// invalidations and events never reaching the other instances) while /readyz, /diagz and
// mantle_redis_up said up, and the idempotency store logged "Redis is back" at each PING and
// "unavailable" at its next claim.
import t, { type Test } from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis, ReplyError } from 'ioredis'
import type { FastifyInstance } from 'fastify'
import { bearer, buildTestApp, until } from '../../helper.js'
import { itemKernel, itemManifest } from '../cache/items.js'
import { storeKey } from '../../../plugins/idempotency/index.js'
import { tagKey } from '../../../plugins/cache/index.js'
import { aclUsers } from './acl.js'
import { refusedCommand } from '../../../plugins/redis/index.js'

const INTERNAL = 'internal-token-0123456789abcdef'
/** What the users are granted at first, and given back. */
const GRANTED = ['~bff:*', '&bff:*', '+@all']

interface Line { level: number, msg: string, part?: string }

async function gateway (t: Test, url: string, eventsProbeMs?: number): Promise<{ app: FastifyInstance, lines: Line[] }> {
  const kernel = await itemKernel(t)
  const lines: Line[] = []
  const app = await buildTestApp(t, { REDIS_URL: url, LOG_LEVEL: 'info', BFF_RATE_LIMIT_GLOBAL_MAX: 10_000, BFF_INTERNAL_TOKEN: INTERNAL }, {
    manifest: itemManifest(kernel.url),
    kernelUrl: kernel.url,
    logger: undefined,
    logStream: { write: line => { lines.push(JSON.parse(line)) } },
    ...(eventsProbeMs === undefined ? {} : { events: { probeIntervalMs: eventsProbeMs } })
  })
  await until(() => app.events.health().up, 'the events subscriber')
  return { app, lines }
}

const readyz = async (app: FastifyInstance): Promise<{ statusCode: number, body: any }> => {
  const res = await app.inject({ method: 'GET', url: '/readyz' })
  return { statusCode: res.statusCode, body: res.json() }
}
const stores = async (app: FastifyInstance): Promise<Record<string, { healthy: boolean, detail?: string }>> =>
  (await app.inject({ method: 'GET', url: '/diagz', headers: bearer({ roles: ['system'] }) })).json().stores
const metric = async (app: FastifyInstance, name: string): Promise<number> => {
  const text = (await app.inject({ method: 'GET', url: '/metrics' })).body
  return text.split('\n').filter(l => l.startsWith(name + ' ') || l.startsWith(name + '{')).reduce((sum, l) => sum + Number(l.split(' ').pop()), 0)
}
/** Polls an answer until it holds (a probe's, without a call between). */
async function eventually (check: () => Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}
/** Until the shared connection's heartbeat has been answered `n` more times. */
function beats (app: FastifyInstance): (n: number) => Promise<void> {
  let heard = 0
  app.redis.onAnswer(() => { heard++ })
  return async n => {
    const until_ = heard + n
    await until(() => heard >= until_, `${n} PINGs answered`, 10_000)
  }
}

for (const [revoke, giveBack] of [[['-evalsha'], ['+evalsha']], [['resetkeys', '~mantle-*'], ['~bff:*']]]) {
  t.test(`Redis refusing the stores (${revoke.join(' ')}) while the gateway runs: memory stores and no 5xx, /readyz and /diagz say so, logged once; ready again once Redis permits it, without a call`, async t => {
    const { make, admin } = aclUsers(t)
    const user = await make(...GRANTED)
    const { app, lines } = await gateway(t, user.url)
    const beat = beats(app)
    const tenant = 'revoked-' + randomUUID()
    const headers = (key?: string): Record<string, string> => ({ ...bearer({ tenant }), ...(key === undefined ? {} : { 'idempotency-key': key }) })
    const calls = async (): Promise<number[]> => [
      (await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: headers() })).statusCode,
      (await app.inject({ method: 'GET', url: '/api/v1/items/b', headers: headers() })).statusCode,
      (await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers: headers(randomUUID()) })).statusCode
    ]
    t.same(await calls(), [200, 200, 200])
    t.equal((await readyz(app)).statusCode, 200, 'ready')

    await admin.call('ACL', 'SETUSER', user.name, ...revoke)
    // Calls with PINGs answered between: the store was said back at each.
    for (let i = 0; i < 3; i++) {
      t.same(await calls(), [200, 200, 200], 'no 5xx: each store answers from memory')
      await beat(1)
    }
    const ready = await readyz(app)
    t.equal(ready.statusCode, 503, 'not ready')
    t.same(ready.body.failing, ['redis'])
    t.match(ready.body.checks.redis, /^refused \(memory stores\): .*NOPERM/, 'naming the refusal')
    const health = await stores(app)
    t.match(health.redis, { healthy: false, detail: /NOPERM/ }, '/diagz: Redis refuses')
    t.match(health, { rateLimit: { healthy: false }, idempotency: { healthy: false }, cache: { healthy: false } }, '/diagz: each store on memory, a PING answered since')
    t.equal(await metric(app, 'mantle_redis_up'), 0, 'mantle_redis_up 0')
    t.ok(await metric(app, 'mantle_rate_limit_fallback_total') > 0, 'rate-limit fallbacks counted')
    t.ok(await metric(app, 'mantle_idempotency_store_fallbacks_total') > 0, 'idempotency fallbacks counted')
    t.ok(await metric(app, 'mantle_cache_redis_fallbacks_total') > 0, 'cache fallbacks counted')
    const refusals = lines.filter(l => l.level === 50 && /^Redis refused/.test(l.msg))
    t.same(refusals.map(l => l.part).sort(), ['cache', 'idempotency', 'rate limits'], 'logged once at error for each store')
    t.same(lines.filter(l => /^idempotency: Redis is (back|unavailable)/.test(l.msg)).map(l => l.msg), ['idempotency: Redis is unavailable, new keys are held in memory until it is back'], 'the idempotency store not said back at each PING')

    await admin.call('ACL', 'SETUSER', user.name, ...giveBack)
    await eventually(async () => (await readyz(app)).statusCode === 200, 'ready again, without a call')
    t.match(await stores(app), { redis: { healthy: true }, rateLimit: { healthy: true }, idempotency: { healthy: true }, cache: { healthy: true } }, '/diagz: every store back on Redis')
    t.equal(await metric(app, 'mantle_redis_up'), 1)
    t.ok(lines.some(l => /^Redis permits the gateway's commands again/.test(l.msg)), 'logged')
    const key = randomUUID()
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers: headers(key) })).statusCode, 200)
    await admin.select(3)
    t.equal(await admin.exists(storeKey(tenant, 'updateItem', key)), 1, 'a keyed call claimed in Redis again')
    await admin.del(storeKey(tenant, 'updateItem', key))
  })
}

t.test('Redis refusing the cache its scripts (-evalsha) while its reads go through: a read answered between does not end the refusal, logged once (not at each miss after a hold)', async t => {
  const { make, admin } = aclUsers(t)
  const user = await make(...GRANTED)
  const { app, lines } = await gateway(t, user.url)
  const tenant = 'revoked-' + randomUUID()
  const get = async (path: string): Promise<string | undefined> => {
    const res = await app.inject({ method: 'GET', url: `/api/v1/${path}`, headers: bearer({ tenant }) })
    t.equal(res.statusCode, 200, 'no 5xx')
    return res.headers['x-cache'] as string | undefined
  }
  // Item a's tags in Redis already: a read of an entry under them is its MGET alone, which Redis
  // still answers once it refuses scripts.
  t.equal(await get('items/a'), 'miss')
  await admin.call('ACL', 'SETUSER', user.name, '-evalsha')
  // Misses of other operations under the same tags, each once the cache's hold on Redis has
  // ended: the read answered, the write (a script) refused.
  for (const path of ['default/a', 'fresh/a', 'mine/a']) {
    t.equal(await get(path), 'miss')
    await new Promise(resolve => setTimeout(resolve, 1100))
  }
  t.equal(lines.filter(l => l.level === 50 && l.part === 'cache').length, 1, 'the refusal logged once')
  t.notOk(lines.some(l => /^Redis permits cache its commands again/.test(l.msg)), 'not said permitted at each read')
  t.notOk(lines.some(l => /^cache: Redis failed/.test(l.msg)), 'nor warned of as an outage of Redis')
  t.match((await readyz(app)).body.checks.redis, /cache: NOPERM/, '/readyz still names the cache')
  t.match((await stores(app)).cache, { healthy: false }, '/diagz: the cache on memory')
  await admin.call('ACL', 'SETUSER', user.name, '+evalsha')
  await eventually(async () => (await readyz(app)).statusCode === 200, 'ready again, without a call')
  t.match((await stores(app)).cache, { healthy: true })
})

t.test('Redis refusing the events\' publishes (-publish) while the gateway runs: delivered here, no 5xx, /readyz says so; ready again once Redis permits it', async t => {
  const { make, admin } = aclUsers(t)
  const user = await make(...GRANTED)
  const { app, lines } = await gateway(t, user.url)
  t.equal((await readyz(app)).statusCode, 200, 'ready')
  await admin.call('ACL', 'SETUSER', user.name, '-publish')
  const publish = async (): Promise<number> => (await app.inject({ method: 'POST', url: '/internal/events', headers: { authorization: `Bearer ${INTERNAL}` }, payload: { topic: 'item.changed', tenantId: 't1', payload: {} } })).statusCode
  for (let i = 0; i < 3; i++) t.equal(await publish(), 202, 'accepted, no 5xx')
  const ready = await readyz(app)
  t.equal(ready.statusCode, 503, 'not ready: events posted here reach no other instance')
  t.match(ready.body.checks.redis, /events: NOPERM \(publish\)/)
  t.match((await stores(app)).events, { healthy: false }, '/diagz: events on this instance only')
  t.equal(lines.filter(l => l.part === 'events').length, 1, 'logged once')
  t.notOk(lines.some(l => /Redis publish failed/.test(l.msg)), 'not once per publish')
  await admin.call('ACL', 'SETUSER', user.name, '+publish')
  await eventually(async () => (await readyz(app)).statusCode === 200, 'ready again, without a publish')
  t.equal(await publish(), 202)
  t.match((await stores(app)).events, { healthy: true })
})

t.test('Redis refusing the cache\'s PUBLISH (-publish): its invalidation moves no tag until Redis lets it tell the other instances, then moves it once, whatever the replays meanwhile', async t => {
  // Before, the script moved the tags and then failed at its PUBLISH, and each replay of the
  // pending invalidation (one a second) moved them again: the version of item:a went up by one
  // each second for as long as the refusal lasted.
  const { make, admin } = aclUsers(t)
  const user = await make(...GRANTED)
  const { app } = await gateway(t, user.url)
  const beat = beats(app)
  const tenant = 'revoked-' + randomUUID()
  const key = tagKey(tenant, 'item:a')
  await admin.select(3)
  t.teardown(async () => { await admin.del(key, tagKey(tenant, 'items')) })
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant }) })).headers['x-cache'], 'miss')
  const before = Number(await admin.get(key))
  t.ok(before > 0, 'item:a has a version')
  await admin.call('ACL', 'SETUSER', user.name, '-publish')
  t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers: bearer({ tenant }), payload: {} })).statusCode, 200)
  await beat(3)
  t.equal(Number(await admin.get(key)), before, 'no tag moved while the message cannot go out, replayed each second')
  t.equal(app.responseCache.cache.pendingInvalidations, 1, 'the invalidation waits for Redis')
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant }) })).headers['x-cache'], 'miss', 'the entry it drops is not served meanwhile')
  const ready = await readyz(app)
  t.equal(ready.statusCode, 503)
  t.match(ready.body.checks.redis, /cache: NOPERM .*publish/, 'the cache refused its PUBLISH')
  await admin.call('ACL', 'SETUSER', user.name, '+publish')
  await eventually(async () => app.responseCache.cache.pendingInvalidations === 0, 'the invalidation replayed')
  t.equal(Number(await admin.get(key)), before + 1, 'moved once')
})

t.test('Redis refusing the heartbeat\'s PING (-ping) while the gateway runs: reported as the PING refused, the stores still on Redis and said so', async t => {
  // Before, the refusal was reported as "heartbeat" among the parts that run on memory: /readyz
  // said "refused (memory stores)" and /diagz "those parts fall back to memory", every store
  // still on Redis.
  const { make, admin } = aclUsers(t)
  const user = await make(...GRANTED)
  const { app, lines } = await gateway(t, user.url)
  const tenant = 'revoked-' + randomUUID()
  await admin.call('ACL', 'SETUSER', user.name, '-ping')
  await eventually(async () => (await readyz(app)).statusCode === 503, 'the refusal reported')
  const ready = await readyz(app)
  t.same(ready.body.failing, ['redis'])
  t.match(ready.body.checks.redis, /^refused: heartbeat PING: NOPERM \(ping\); the stores still run on Redis/, 'what is refused, and the stores not said on memory')
  t.notMatch(ready.body.checks.redis, /memory stores/)
  const key = randomUUID()
  t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers: { ...bearer({ tenant }), 'idempotency-key': key }, payload: {} })).statusCode, 200)
  await admin.select(3)
  t.equal(await admin.exists(storeKey(tenant, 'updateItem', key)), 1, 'a keyed call still claimed in Redis')
  await admin.del(storeKey(tenant, 'updateItem', key))
  const health = await stores(app)
  t.match(health, { rateLimit: { healthy: true }, idempotency: { healthy: true }, cache: { healthy: true } }, '/diagz: every store on Redis')
  t.match(health.redis, { healthy: false, detail: /heartbeat PING.*NOPERM.*the stores still run on Redis/ })
  t.notMatch(health.redis.detail, /fall back to memory/)
  const logged = lines.filter(l => l.part === 'heartbeat PING')
  t.equal(logged.length, 1, 'logged once')
  t.notMatch(logged[0].msg, /as if Redis were away/)
  await admin.call('ACL', 'SETUSER', user.name, '+ping')
  await eventually(async () => (await readyz(app)).statusCode === 200, 'ready again')
})

t.test('/readyz names the part Redis refuses and the command, never the user of REDIS_URL, its password or the URL; /diagz (role system) has Redis\' words', async t => {
  // Redis 7.2 words a refusal "NOPERM User <name> has no permissions ...", and /readyz, which
  // anyone may read, showed it as it came. The Redis of the tests (7.0) says "this user": the
  // events' refusal is told in 7.2's words, beside a real one of the cache's (-evalsha, which
  // keeps the refusals standing: Redis is asked again each second).
  const { make, admin } = aclUsers(t)
  const user = await make(...GRANTED)
  const { app } = await gateway(t, user.url)
  const tenant = 'revoked-' + randomUUID()
  await admin.call('ACL', 'SETUSER', user.name, '-evalsha', '-eval')
  await eventually(async () => {
    await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant }) })
    return /cache/.test((await readyz(app)).body.checks.redis ?? '')
  }, 'the cache\'s refusal reported')
  t.ok(app.redis.denied('events', new ReplyError(`NOPERM User ${user.name} has no permissions to run the 'publish' command`)), 'a refusal in 7.2\'s words')
  for (const url of ['/readyz', '/readyz?scope=instance']) {
    const text = (await app.inject({ method: 'GET', url })).body
    t.match(text, /cache: NOPERM \(eval(sha)?\); events: NOPERM \(publish\)/, `${url} names each part and what it was refused`)
    t.notOk(text.includes(user.name), `${url} does not name the user`)
    t.notOk(text.includes('s3cret-pw-0123'), `${url} shows no password`)
    t.notOk(/redis:\/\//.test(text), `${url} shows no URL`)
  }
  const detail = (await stores(app)).redis.detail ?? ''
  t.ok(detail.includes(`events: NOPERM User ${user.name} has no permissions`), '/diagz keeps Redis\' words')
  t.notOk(detail.includes('s3cret-pw-0123'), '/diagz shows no password')
})

t.test('Redis refusing the invalidations channel (resetchannels) while the gateway runs: the cache subscriber asks again on its connection, not on a new one ten times a second; /readyz says so until Redis permits it', async t => {
  // The cache's subscriber, as the plugin makes it (a duplicate of the shared connection).
  const duplicate = Redis.prototype.duplicate
  let connects = 0
  Redis.prototype.duplicate = function (this: Redis, ...args: Parameters<Redis['duplicate']>) {
    const made = duplicate.apply(this, args)
    if (args[0]?.connectionName === 'mantle-cache-sub') made.on('connect', () => { connects++ })
    return made
  }
  t.teardown(() => { Redis.prototype.duplicate = duplicate })
  const { make, admin } = aclUsers(t)
  const user = await make(...GRANTED)
  const { app, lines } = await gateway(t, user.url)
  Redis.prototype.duplicate = duplicate
  const beat = beats(app)
  t.equal(connects, 1, 'one connection')
  // Redis 7 drops the connections subscribed to the channels it no longer grants.
  await admin.call('ACL', 'SETUSER', user.name, 'resetchannels')
  await until(() => connects >= 2, 'the subscriber dropped and made anew')
  await beat(3)
  t.ok(connects <= 3, `the subscriber made anew ${connects - 1} times, at most twice`)
  const ready = await readyz(app)
  t.equal(ready.statusCode, 503, 'not ready')
  t.match(ready.body.checks.redis, /cache invalidations subscriber: NOPERM/)
  t.equal(await metric(app, 'mantle_cache_subscriber_up'), 0)
  t.equal(lines.filter(l => l.part === 'cache invalidations subscriber').length, 1, 'logged once')
  t.notOk(lines.some(l => /cache: cannot subscribe/.test(l.msg)), 'not taken for a Redis that is slow')
  await admin.call('ACL', 'SETUSER', user.name, '&bff:*')
  await eventually(async () => (await readyz(app)).statusCode === 200, 'ready again', 15_000)
  t.equal(await metric(app, 'mantle_cache_subscriber_up'), 1, 'subscribed again')
  t.ok(connects <= 3, 'on the same connection')
})

t.test('Redis refusing the events\' SUBSCRIBE (-subscribe) once the subscriber reconnects: /readyz names it, logged once, not once per probe; subscribed again once Redis permits it', async t => {
  const { make, admin } = aclUsers(t)
  const user = await make(...GRANTED)
  // The subscriber's probe (a PING, and a SUBSCRIBE while not subscribed) each 200 ms.
  const { app, lines } = await gateway(t, user.url, 200)
  const beat = beats(app)
  await admin.call('ACL', 'SETUSER', user.name, '-subscribe')
  // A subscription made stays (Redis checks SUBSCRIBE as it comes): the subscriber's connection is cut.
  const list = String(await admin.call('CLIENT', 'LIST', 'TYPE', 'pubsub'))
  const ids = list.split('\n').filter(l => l.includes(`user=${user.name} `) && l.includes('name=mantle-events-sub ')).map(l => /^id=(\d+)/.exec(l)![1])
  t.equal(ids.length, 1, 'the events subscriber found')
  await admin.call('CLIENT', 'KILL', 'ID', ids[0])
  await eventually(async () => (await readyz(app)).statusCode === 503, 'not ready')
  await eventually(async () => /events subscriber: NOPERM/.test((await readyz(app)).body.checks.redis), 'naming the subscriber')
  await beat(2)
  t.equal(lines.filter(l => l.part === 'events subscriber').length, 1, 'logged once')
  t.notOk(lines.some(l => /Redis events subscribe failed/.test(l.msg)), 'not as a passing failure')
  t.notOk(app.events.health().up)
  await admin.call('ACL', 'SETUSER', user.name, '+subscribe')
  await eventually(async () => (await readyz(app)).statusCode === 200, 'ready again', 15_000)
  t.ok(app.events.health().up, 'subscribed again')
})

t.test('a refusal is told on /readyz by what was refused, never in Redis\' words', async t => {
  const cases: Array<[string, string]> = [
    ["NOPERM User mantle has no permissions to run the 'evalsha' command", 'NOPERM (evalsha)'],
    ["NOPERM this user has no permissions to run the 'config|get' command", 'NOPERM (config|get)'],
    ['NOPERM this user has no permissions to publish to the channel bff:cache:invalidate: no tag moved', 'NOPERM (publish on a channel)'],
    ['NOPERM User mantle has no permissions to access one of the keys used as arguments', 'NOPERM (keys)'],
    ['NOPERM User mantle has no permissions to access one of the channels used as arguments', 'NOPERM (channels)'],
    ['ERR The user executing the script can\'t run this command or subcommand script: 4f2e, on @user_script:3.', 'NOPERM (a command of a script)'],
    ['NOPERM User mantle is not allowed', 'NOPERM']
  ]
  for (const [message, told] of cases) t.equal(refusedCommand(message), told, message)
})
