import t from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { buildTestApp, startTestKernel, testManifest, bearer, json, until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { opKey, tenantKey, RedisWindowStore, SLIDING_WINDOW_LUA, hit, type WindowState } from '../../../plugins/rate-limit/index.js'

// Against the machine's real Redis: two gateway instances share one limit, and a Redis cut in
// the middle of the load (a TCP proxy the test controls) costs no 5xx and no limit.

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const REDIS_PORT = Number(new URL(REDIS_URL).port || 6379)

interface Teardown { teardown: (fn: () => unknown) => void }

function manifest (url: string) {
  return testManifest({
    limited: { type: 'query', rest: 'GET /limited', kernel: 'GET /v1/limited', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } }, rateLimit: { max: 20, windowMs: 60_000 } },
    tight: { type: 'query', rest: 'GET /tight', kernel: 'GET /v1/limited', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } }, rateLimit: { max: 5, windowMs: 60_000 } },
    loose: { type: 'query', rest: 'GET /loose', kernel: 'GET /v1/limited', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } }, rateLimit: { max: 100_000, windowMs: 60_000 } }
  }, { url })
}

async function redisClient (t: Teardown, keys: string[]): Promise<Redis> {
  const client = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 })
  await client.connect()
  t.teardown(async () => {
    // Only this test's own keys: the Redis is shared.
    if (keys.length > 0) await client.del(...keys)
    client.disconnect()
  })
  return client
}

/**
 * The machine is shared: an event loop starved of CPU can fire the Redis command timeout
 * while the answer already waits in the socket, and the check then (rightly) falls back to
 * memory. These tests are about what Redis counts, not about that timeout: they give it room.
 */
const PATIENT = { BFF_REDIS_COMMAND_TIMEOUT_MS: 10_000 }

async function metric (app: { inject: (o: { url: string }) => Promise<{ body: string }> }, name: string): Promise<number> {
  const text = (await app.inject({ url: '/metrics' })).body
  const line = text.split('\n').find(l => l.startsWith(name + ' ') || l.startsWith(name + '{'))
  return line === undefined ? 0 : Number(line.slice(line.lastIndexOf(' ') + 1))
}

t.test('two instances on one Redis: 100 concurrent calls split across both let exactly 20 through', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }) })
  const tenant = 'rl-' + randomUUID()
  const key = opKey(tenant, 'u1', 'limited')
  const redis = await redisClient(t, [key])
  const one = await buildTestApp(t, { REDIS_URL, ...PATIENT }, { manifest: manifest(kernel.url), kernelUrl: kernel.url })
  const two = await buildTestApp(t, { REDIS_URL, ...PATIENT }, { manifest: manifest(kernel.url), kernelUrl: kernel.url })
  t.equal(one.rateLimiter.store, 'redis', 'REDIS_URL set: Redis is the default store')
  const headers = bearer({ tenant, user: 'u1' })
  const answers = await Promise.all(Array.from({ length: 100 }, async (_, i) => await (i % 2 === 0 ? one : two).inject({ url: '/api/v1/limited', headers })))
  const ok = answers.filter(r => r.statusCode === 200)
  const refused = answers.filter(r => r.statusCode === 429)
  t.equal(ok.length, 20, 'exactly the limit passes')
  t.equal(refused.length, 80)
  t.equal(kernel.requests.length, 20, 'refused calls never reach the Kernel')
  t.ok(ok.some(r => r.headers['ratelimit-remaining'] === '0'), 'the last allowed call has none remaining')
  for (const r of ok) t.equal(r.headers['ratelimit-limit'], '20')
  const problem = refused[0].json()
  t.match(problem, { code: 'RATE_LIMITED', status: 429, type: 'urn:mantle:problem:rate-limited' })
  t.equal(refused[0].headers['content-type'], 'application/problem+json; charset=utf-8')
  t.ok(Number(refused[0].headers['retry-after']) >= 1)
  t.equal(refused[0].headers['ratelimit-remaining'], '0')
  t.equal(refused[0].headers['ratelimit-limit'], '20')
  t.ok(Number(refused[0].headers['ratelimit-reset']) >= 1)
  // The window is Redis' own minute (window.ts): a burst that runs across its end counts its
  // calls before the end as the previous window's (p) and the rest as this one's (c); a refusal
  // after the end alone moves all 20 to p. Either way the key holds the 20, and only them.
  const [c, p] = await redis.hmget(key, 'c', 'p')
  t.equal(Number(c) + Number(p), 20, `the count lives in Redis under bff:ratelimit:{tenant}:{user}:{op} (this window ${c}, the previous ${p})`)
  const pttl = await redis.pttl(key)
  t.ok(pttl > 0 && pttl <= 120_000, 'and expires two windows after')
  // Another user of the same tenant has a budget of their own.
  t.equal((await two.inject({ url: '/api/v1/limited', headers: bearer({ tenant, user: 'u2' }) })).statusCode, 200)
  await redis.del(opKey(tenant, 'u2', 'limited'))
  t.equal(await metric(one, 'mantle_rate_limit_fallback_total'), 0, 'every check was answered by Redis')
  t.ok(await metric(one, 'mantle_rate_limit_checks_total{scope="op",store="redis"}') >= 50)
  t.ok(await metric(one, 'mantle_rate_limit_refusals_total{scope="op",store="redis"}') >= 1)
})

t.test('the HTTP guard counts across instances in Redis, per verified tenant', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }) })
  const tenant = 'rl-' + randomUUID()
  const redis = await redisClient(t, [tenantKey(tenant)])
  // A day's window, not a minute's: windows are aligned to the clock, and the run of 5f0294a's
  // clean clone crossed a minute's end between the calls (c '2', the first four in 'p').
  const env = { REDIS_URL, BFF_RATE_LIMIT_GLOBAL_MAX: 6, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 86_400_000 }
  const one = await buildTestApp(t, { ...env, ...PATIENT }, { manifest: manifest(kernel.url), kernelUrl: kernel.url })
  const two = await buildTestApp(t, { ...env, ...PATIENT }, { manifest: manifest(kernel.url), kernelUrl: kernel.url })
  const headers = bearer({ tenant, user: 'u1' })
  const other = bearer({ tenant, user: 'u2' })
  const statuses: number[] = []
  for (let i = 0; i < 8; i++) statuses.push((await (i % 2 === 0 ? one : two).inject({ url: '/api/v1/loose', headers: i < 3 ? headers : other })).statusCode)
  t.same(statuses, [200, 200, 200, 200, 200, 200, 429, 429], 'every user of the tenant shares the guard, on both instances')
  t.equal(await redis.hget(tenantKey(tenant), 'c'), '6')
})

t.test('Redis cut mid-load: no 5xx, limits keep working from memory, back to Redis after', async t => {
  for (const mode of ['reset', 'stall'] as const) {
    await t.test(`cut by ${mode}`, async t => {
      const kernel = await startTestKernel(t, { 'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }) })
      const proxy = await startTcpProxy(t, REDIS_PORT)
      const tenant = 'rl-' + randomUUID()
      const keys = ['u1', 'during', 'after'].flatMap(u => [opKey(tenant, u, 'loose'), opKey(tenant, u, 'tight')])
      const redis = await redisClient(t, keys)
      // The cut itself closes the connection (up() is false at once): no timeout is needed to see it.
      // But the connection ioredis makes anew during a stall is accepted and never answered, and
      // only its ready check's command timeout ends it once the proxy forwards again: with
      // PATIENT's 10 s, each run waited 10 s for that. 3 s still gives a starved event loop room.
      const timeouts = mode === 'stall' ? { BFF_REDIS_COMMAND_TIMEOUT_MS: 3000 } : PATIENT
      const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port), ...timeouts }, { manifest: manifest(kernel.url), kernelUrl: kernel.url, rateLimit: { retryRedisMs: 50 } })
      t.equal(app.redis.up(), true)
      const headers = bearer({ tenant, user: 'u1' })

      // Load: 8 callers in a loop until told to stop; every status is kept.
      const statuses = new Map<number, number>()
      const load = { running: true }
      let calls = 0
      const loop = async (): Promise<void> => {
        while (load.running) {
          const res = await app.inject({ url: '/api/v1/loose', headers })
          calls++
          statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1)
        }
      }
      const callers = Array.from({ length: 8 }, loop)
      await until(() => calls >= 50, 'load before the cut')
      t.equal(await redis.hget(opKey(tenant, 'u1', 'loose'), 'c') !== null, true, 'counted in Redis before the cut')
      const before = await metric(app, 'mantle_rate_limit_fallback_total')
      proxy.cut(mode)
      const atCut = calls
      await until(() => app.rateLimiter.fallbackActive && calls >= atCut + 100, 'load on the fallback', 15_000)
      t.equal(await metric(app, 'mantle_rate_limit_fallback_active'), 1)
      t.ok(await metric(app, 'mantle_rate_limit_fallback_total') > before, 'the fallback is counted')
      t.ok(await metric(app, 'mantle_rate_limit_checks_total{scope="op",store="memory"}') > 0)

      // The limits still hold, from this instance's memory.
      const during = bearer({ tenant, user: 'during' })
      const tight = await Promise.all(Array.from({ length: 12 }, async () => (await app.inject({ url: '/api/v1/tight', headers: during })).statusCode))
      t.equal(tight.filter(s => s === 200).length, 5, 'exactly the limit passes during the outage')
      t.equal(tight.filter(s => s === 429).length, 7)
      t.equal(await redis.exists(opKey(tenant, 'during', 'tight')), 0, 'nothing reached Redis')

      proxy.restore()
      const atRestore = calls
      await until(() => !app.rateLimiter.fallbackActive && calls >= atRestore + 20, 'checks back on Redis', 15_000)
      load.running = false
      await Promise.all(callers)
      t.equal(await metric(app, 'mantle_rate_limit_fallback_active'), 0)
      const after = bearer({ tenant, user: 'after' })
      t.equal((await app.inject({ url: '/api/v1/tight', headers: after })).statusCode, 200)
      t.equal(await redis.hget(opKey(tenant, 'after', 'tight'), 'c'), '1', 'counted in Redis again')
      const fiveXX = [...statuses].filter(([s]) => s >= 500).reduce((n, [, c]) => n + c, 0)
      t.equal(fiveXX, 0, 'no 5xx at any point')
      t.same([...statuses.keys()], [200], `every call of the load was answered 200 (${calls} calls)`)
    })
  }
})

t.test('after a failed check, limits go back to Redis as soon as its connection is ready again, not when the pause ends', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }) })
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const tenant = 'rl-' + randomUUID()
  await redisClient(t, [opKey(tenant, 'u1', 'loose')])
  // A pause of ten minutes after a failed check: only the reconnection can end it within the test.
  const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 100 }, { manifest: manifest(kernel.url), kernelUrl: kernel.url, rateLimit: { retryRedisMs: 600_000 } })
  const headers = bearer({ tenant, user: 'u1' })
  const call = async (): Promise<number> => (await app.inject({ url: '/api/v1/loose', headers })).statusCode
  t.equal(await call(), 200)
  t.equal(app.rateLimiter.fallbackActive, false)
  proxy.delay(60_000)
  t.equal(await call(), 200, 'a check Redis does not answer in time is answered from memory')
  t.equal(app.rateLimiter.fallbackActive, true)
  proxy.cut('reset')
  await until(() => !app.redis.up(), 'the connection to drop')
  proxy.restore()
  await until(() => app.redis.up(), 'the connection to be ready again', 10_000)
  // Over once Redis is ready, before any call: without traffic the gauge (and /diagz, and the
  // alert on it) stayed at 1 until a guarded call came.
  t.equal(app.rateLimiter.fallbackActive, false, 'over without a call')
  t.equal(await metric(app, 'mantle_rate_limit_fallback_active'), 0)
  t.equal(await call(), 200)
  t.equal(app.rateLimiter.fallbackActive, false, 'counted in Redis again')
  t.ok(await metric(app, 'mantle_rate_limit_checks_total{scope="op",store="redis"}') >= 2)
})

// A Redis busy for a moment (a fork, a long script) answered one check after the command timeout,
// its connection kept (one PING missed, not the two that drop it): the fallback gauge, and /diagz,
// stayed at "fallback" until the next guarded call, hours without traffic (MantleRedisFallbackActive
// firing after 2 minutes), though Redis answered every PING since.
t.test('after a check Redis answered too late, the connection kept, the fallback is over without a call once Redis answers', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }) })
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const tenant = 'rl-' + randomUUID()
  await redisClient(t, [opKey(tenant, 'u1', 'loose')])
  const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 300 }, { manifest: manifest(kernel.url), kernelUrl: kernel.url })
  const headers = bearer({ tenant, user: 'u1' })
  const call = async (): Promise<number> => (await app.inject({ url: '/api/v1/loose', headers })).statusCode
  t.equal(await call(), 200)
  t.equal(app.rateLimiter.fallbackActive, false)
  const connections = proxy.connections
  proxy.delay(600)
  const failedAt = performance.now()
  t.equal(await call(), 200, 'a check Redis does not answer in time is answered from memory')
  t.equal(app.rateLimiter.fallbackActive, true)
  proxy.restore()
  // The heartbeat's PINGs (each second) are answered again; no call comes.
  const end = performance.now() + 4000
  while (app.rateLimiter.fallbackActive && performance.now() < end) await new Promise(resolve => setTimeout(resolve, 50))
  t.equal(app.rateLimiter.fallbackActive, false, 'over without a call')
  t.equal(await metric(app, 'mantle_rate_limit_fallback_active'), 0)
  t.equal(proxy.connections, connections, 'on the same connection: not ended by a reconnect')
  t.ok(app.redis.up())
  // The next call once the pause after the failed check (1 s from its 300 ms timeout) is over goes to Redis.
  await new Promise(resolve => setTimeout(resolve, Math.max(0, failedAt + 1700 - performance.now())))
  t.equal(await call(), 200)
  t.equal(app.rateLimiter.fallbackActive, false, 'counted in Redis again')
})

t.test('a gateway configured for Redis that cannot reach it starts and limits from memory, logging once', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }) })
  const proxy = await startTcpProxy(t, REDIS_PORT)
  proxy.cut('reset')
  const lines: string[] = []
  const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port), BFF_RATE_LIMIT_STORE: 'redis', LOG_LEVEL: 'warn' }, {
    manifest: manifest(kernel.url),
    kernelUrl: kernel.url,
    logger: undefined,
    logStream: { write: (line: string) => { lines.push(line) } }
  })
  // Checks would go to memory: the fallback is active before any (it said 0 until one came).
  t.equal(app.rateLimiter.fallbackActive, true, 'active from start-up, without traffic')
  const headers = bearer({ tenant: 'rl-' + randomUUID(), user: 'u1' })
  const statuses = []
  for (let i = 0; i < 7; i++) statuses.push((await app.inject({ url: '/api/v1/tight', headers })).statusCode)
  t.same(statuses, [200, 200, 200, 200, 200, 429, 429])
  t.equal(app.rateLimiter.fallbackActive, true)
  t.equal(lines.filter(l => l.includes('rate limits fall back to memory')).length, 1, 'logged once for the outage, not per call')
})

t.test('in Redis too, the call that takes the last place resets when a call would pass again', async t => {
  const key = opKey('reset-' + randomUUID(), 'u', 'op')
  const redis = await redisClient(t, [key])
  const store = new RedisWindowStore(redis)
  const first = await store.check(key, 60_000, 3)
  t.ok(first.ttl <= 60_000, `places left: the window's end (${first.ttl})`)
  await store.check(key, 60_000, 3)
  const last = await store.check(key, 60_000, 3)
  t.equal(last.current, 3)
  // The window's end was first.ttl (less the time the calls took); a third of the window later.
  t.ok(last.ttl > first.ttl + 19_000 && last.ttl <= first.ttl + 20_001, `the last place: a call passes again in ${last.ttl} ms, not at the window's end (${first.ttl} ms)`)
  const refused = await store.check(key, 60_000, 3)
  t.equal(refused.current, 4)
  t.ok(Math.abs(refused.ttl - last.ttl) < 1000, 'the same wait a refusal names')
})

t.test('in Redis too, the waits named are exact to the ms', async t => {
  const key = opKey('exact-' + randomUUID(), 'u', 'op')
  const redis = await redisClient(t, [key])
  // The script on a clock the test sets: Redis' TIME replaced by the seconds and microseconds given.
  const script = SLIDING_WINDOW_LUA.replace("redis.call('TIME')", '{ARGV[3], ARGV[4]}')
  t.not(script, SLIDING_WINDOW_LUA)
  const at = async (ms: number, max: number): Promise<unknown> => await redis.eval(script, 1, key, 60_000, max, Math.floor(ms / 1000), (ms % 1000) * 1000)
  t.same(await at(6_000_000, 3), [1, 60_000])
  await at(6_000_000, 3)
  t.same(await at(6_000_000, 3), [3, 80_000], 'the last place: 80 s, when the 3 calls weigh 2 (not 80,001 ms, a Retry-After of 81 s)')
  t.same(await at(6_000_000, 3), [4, 80_000], 'refused: the same wait')
  t.same(await at(6_079_999, 3), [4, 1])
  t.same(await at(6_080_000, 3), [3, 20_000], 'allowed at the wait it named: the last place, until the previous 3 weigh 1')
})

t.test('in Redis too, a key counted in a window ahead of the clock expires two windows after that window\'s start', async t => {
  // It expired two windows after the call: while its count still weighed in the window after
  // its own, for as long as the clock had stepped back, and that many more calls passed.
  const key = opKey('back-expiry-' + randomUUID(), 'u', 'op')
  const redis = await redisClient(t, [key])
  const script = SLIDING_WINDOW_LUA.replace("redis.call('TIME')", '{ARGV[3], ARGV[4]}')
  await redis.hset(key, 'w', 101, 'c', 1, 'p', 0, 'm', 60_000)
  t.same(await redis.eval(script, 1, key, 60_000, 3, 6_030, 0), [2, 30_000 + 60_000], '30 s back: counted in the window ahead')
  const pttl = await redis.pttl(key)
  t.ok(pttl > 150_000 - 1000 && pttl <= 150_000, `kept until two windows after that window's start (${pttl} ms)`)
})

// A clock stepped back (a failover to a replica behind) never moves a key's window back: taken
// as a jump ahead, the calls counted were forgotten, and twice the limit passed.
t.test('in Redis too, a key whose window is ahead of the clock keeps its count', async t => {
  const key = opKey('back-' + randomUUID(), 'u', 'op')
  const redis = await redisClient(t, [key])
  const index = Math.floor(Date.now() / 60_000)
  await redis.hset(key, 'w', index + 1, 'c', 3, 'p', 0)
  const store = new RedisWindowStore(redis)
  t.equal((await store.check(key, 60_000, 3)).current, 4, 'refused: the 3 counted stand')
  t.equal(await redis.hget(key, 'w'), String(index + 1), 'the window stays')
  // An hour ahead (a clock that had jumped, set right): the key starts anew.
  await redis.hset(key, 'w', index + 60, 'c', 3, 'p', 0)
  t.equal((await store.check(key, 60_000, 3)).current, 1)
  t.equal(await redis.hget(key, 'w'), String(index), 'the window is the clock\'s')
})

t.test('in Redis too, after a clock stepped back the waits named count the step', async t => {
  const key = opKey('back-wait-' + randomUUID(), 'u', 'op')
  const redis = await redisClient(t, [key])
  const index = Math.floor(Date.now() / 60_000)
  await redis.hset(key, 'w', index + 1, 'c', 3, 'p', 0, 'm', 60_000)
  const store = new RedisWindowStore(redis)
  const refused = await store.check(key, 60_000, 3)
  const step = (index + 1) * 60_000 - Date.now()
  t.equal(refused.current, 4)
  // From the start of the key's window: 60 s for it to end, 20 s more for its 3 calls to weigh 2.
  t.ok(Math.abs(refused.ttl - (step + 80_000)) < 1000, `the step (${step} ms) and 80 s (${refused.ttl})`)
  await redis.hset(key, 'w', index + 1, 'c', 0, 'p', 0, 'm', 60_000)
  const allowed = await store.check(key, 60_000, 3)
  t.equal(allowed.current, 1)
  t.ok(Math.abs(allowed.ttl - (step + 60_000)) < 1000, `allowed: until the key's window ends (${allowed.ttl})`)
})

t.test('in Redis too, a key counted in windows of another length (a reload changed windowMs) keeps its calls', async t => {
  const key = opKey('length-' + randomUUID(), 'u', 'op')
  const redis = await redisClient(t, [key])
  const store = new RedisWindowStore(redis)
  t.equal((await store.check(key, 60_000, 2)).current, 1)
  t.equal((await store.check(key, 60_000, 2)).current, 2)
  t.equal(await redis.hget(key, 'm'), '60000', 'the length is kept with the counts')
  const refused = await store.check(key, 3_600_000, 2)
  t.equal(refused.current, 3, 'refused: the 2 of the last minute count in the hour')
  t.equal(await redis.hget(key, 'm'), '3600000', 'the key now counts in hours')
  t.equal(await redis.hget(key, 'c'), '2')
  t.equal((await store.check(key, 3_600_000, 2)).current, 3, 'and is refused again')
  // Back to a minute: the minute's counts were kept beside the hour's, and its 2 calls still
  // count (a minute's share of the hour's, rounded up, gave one more: a lapse while instances
  // disagree on the length).
  t.equal((await store.check(key, 60_000, 2)).current, 3, 'refused: the minute\'s own 2 calls stand')
  t.equal(await redis.hget(key, 'm2'), '3600000', 'the hour\'s counts are kept beside')
})

t.test('in Redis too, two window lengths in use at once: neither limit lapses, call by call as in memory', async t => {
  // Alternating 10 a minute and 10 an hour, one call a second for 10 minutes (instances that
  // disagree on windowMs): all 600 passed, each shortening dividing the key's count.
  const key = opKey('lengths-' + randomUUID(), 'u', 'op')
  const redis = await redisClient(t, [key])
  const script = SLIDING_WINDOW_LUA.replace("redis.call('TIME')", '{ARGV[3], ARGV[4]}')
  const at = async (ms: number, windowMs: number, max: number): Promise<number[]> => await redis.eval(script, 1, key, windowMs, max, Math.floor(ms / 1000), (ms % 1000) * 1000) as number[]
  const state: WindowState = { w: 0, c: 0, p: 0 }
  let passed = 0
  let hour = 0
  let same = true
  for (let i = 0; i < 600; i++) {
    const windowMs = i % 2 === 0 ? 60_000 : 3_600_000
    const now = 6_000_000 + i * 1000
    const [current, ttl] = await at(now, windowMs, 10)
    const expected = hit(state, now, windowMs, 10)
    if (same && (current !== expected.current || ttl !== expected.ttl)) {
      same = false
      t.fail(`call ${i}: Redis ${current}, ${ttl}; memory ${expected.current}, ${expected.ttl}`)
    }
    if (current <= 10) {
      passed++
      if (windowMs !== 60_000) hour++
    }
  }
  t.ok(same, 'Redis and memory agree on every call')
  t.ok(hour <= 10, `the hour's limit holds: ${hour} passed under it`)
  t.ok(passed <= 110, `about 10 a minute in all: ${passed} of 600 passed`)
  const pttl = await redis.pttl(key)
  t.ok(pttl > 60_000 * 2, `the key lives as long as the hour's counts weigh (${pttl} ms)`)
  // The minute asked from now on: the hour's counts are kept beside, and go once it has not been
  // asked for two hours; the key is one length's again.
  await at(6_600_000, 60_000, 10)
  t.same(await redis.hmget(key, 'm', 'm2', 'm3'), ['60000', '3600000', ''])
  await at(6_600_000 + 7_200_001, 60_000, 10)
  t.same(await redis.hmget(key, 'm', 'm2', 'm3'), ['60000', '', ''])
})

t.test('in Redis too, one window length keeps the hash and the answers as they were', async t => {
  const key = opKey('one-length-' + randomUUID(), 'u', 'op')
  const redis = await redisClient(t, [key])
  const script = SLIDING_WINDOW_LUA.replace("redis.call('TIME')", '{ARGV[3], ARGV[4]}')
  const state: WindowState = { w: 0, c: 0, p: 0 }
  let now = 6_000_000
  for (let i = 0; i < 300; i++) {
    now += (i * 7919) % 1500
    const got = await redis.eval(script, 1, key, 60_000, 25, Math.floor(now / 1000), (now % 1000) * 1000) as number[]
    const expected = hit(state, now, 60_000, 25)
    if (got[0] !== expected.current || got[1] !== expected.ttl) {
      t.fail(`call ${i}: Redis ${got.join(', ')}; memory ${expected.current}, ${expected.ttl}`)
      break
    }
  }
  t.same(Object.keys(await redis.hgetall(key)).sort(), ['c', 'm', 'p', 'w'], 'only the four fields')
  t.equal(state.o, undefined, 'nor in memory')
})

t.test('a key of another type at a limit\'s name (some other program wrote it) is counted anew in Redis, never a fallback for every key', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }) })
  const tenant = 'rl-foreign-' + randomUUID()
  const foreign = opKey(tenant, 'u1', 'tight')
  const other = opKey(tenant, 'u2', 'tight')
  const redis = await redisClient(t, [foreign, other])
  await redis.set(foreign, 'not a hash')
  const app = await buildTestApp(t, { REDIS_URL, ...PATIENT }, { manifest: manifest(kernel.url), kernelUrl: kernel.url })
  t.equal((await app.inject({ url: '/api/v1/tight', headers: bearer({ tenant, user: 'u1' }) })).statusCode, 200)
  // Another user's call right after: the failed check held every check in memory for a second.
  t.equal((await app.inject({ url: '/api/v1/tight', headers: bearer({ tenant, user: 'u2' }) })).statusCode, 200)
  t.equal(await metric(app, 'mantle_rate_limit_fallback_total'), 0, 'both checks were answered by Redis')
  t.equal(app.rateLimiter.fallbackActive, false, 'no outage began')
  t.equal(await redis.type(foreign), 'hash', 'the foreign value is replaced by the limit\'s count')
  t.equal(await redis.hget(foreign, 'c'), '1')
  t.equal(await redis.hget(other, 'c'), '1', 'and the other user\'s call counted in Redis')
})

t.test('Redis refusing the script a command (an ACL changed) is still a refusal: the limit holds from memory, never counted anew', async t => {
  // The script reads with pcall to tell a key of another type: any other failure is raised as before.
  const kernel = await startTestKernel(t, { 'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }) })
  const admin = await redisClient(t, [])
  const name = `mantle-test-${randomUUID()}`
  await admin.call('ACL', 'SETUSER', name, 'on', '>s3cret-pw-0123', '~bff:*', '&bff:*', '+@all')
  t.teardown(async () => { await admin.call('ACL', 'DELUSER', name) })
  const url = new URL(REDIS_URL)
  const app = await buildTestApp(t, { REDIS_URL: `redis://${name}:s3cret-pw-0123@${url.host}${url.pathname}`, ...PATIENT }, { manifest: manifest(kernel.url), kernelUrl: kernel.url })
  await admin.call('ACL', 'SETUSER', name, '-hmget')
  const headers = bearer({ tenant: 'rl-acl-' + randomUUID(), user: 'u1' })
  const codes: number[] = []
  for (let i = 0; i < 7; i++) codes.push((await app.inject({ url: '/api/v1/tight', headers })).statusCode)
  t.same(codes, [200, 200, 200, 200, 200, 429, 429], 'the limit of 5 holds')
  t.ok(await metric(app, 'mantle_rate_limit_fallback_total') > 0, 'counted in memory, as a fallback')
})
