import t from 'tap'
import { WebSocket } from 'ws'
import { buildApp, VERSION } from '../../../app.js'
import { StageOrder, type Stage, type Next, CallContext, createPipeline } from '../../../plugins/pipeline/index.js'
import { timeStage, outcomeOf, sampleEveryFor, SAMPLED_PER_SECOND, loopDelay } from '../../../plugins/diagz/index.js'
import { MantleError } from '../../../errors.js'
import { buildDemoApp, buildTestApp, bearer, testConfig, startTestKernel, testManifest, json, until, token } from '../../helper.js'
import { wsApp, connect } from '../../adapters/websocket-helper.js'

const system = bearer({ roles: ['system'] })
const viewer = bearer({ roles: ['viewer', 'editor', 'operator'] })

t.test('/diagz needs the role system', async t => {
  const app = await buildDemoApp(t)
  const anonymous = await app.inject({ method: 'GET', url: '/diagz' })
  t.equal(anonymous.statusCode, 401)
  t.match(anonymous.json(), { code: 'UNAUTHENTICATED' })
  const forbidden = await app.inject({ method: 'GET', url: '/diagz', headers: viewer })
  t.equal(forbidden.statusCode, 403)
  t.match(forbidden.json(), { code: 'FORBIDDEN' })
  t.equal(forbidden.headers['content-type'], 'application/problem+json; charset=utf-8')
  const ok = await app.inject({ method: 'GET', url: '/diagz', headers: system })
  t.equal(ok.statusCode, 200)
  t.match(ok.json(), { version: VERSION, breakers: { kernel: { state: 'closed' } }, stores: { events: { type: 'memory', healthy: true } } })
})

t.test('calls of every face are counted with their outcome, latency and the stages they went through', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/items/ok': (_req, res) => json(res, 200, { id: 'ok' }),
    'GET /v1/items/gone': (_req, res) => json(res, 404, { message: 'no' }),
    'GET /v1/items/boom': (_req, res) => json(res, 500, { message: 'down' })
  })
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 8 } } }, output: { type: 'object', properties: { id: { type: 'string' } } }, roles: ['viewer'] }
  }, { url: kernel.url, retries: 0 })
  // Every call timed, so that each stage's outcomes are exact here.
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url, diagz: { stageSampleEvery: 1 } })
  for (let i = 0; i < 10; i++) t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/ok', headers: viewer })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/gone', headers: viewer })).statusCode, 404)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/boom', headers: viewer })).statusCode, 502)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/waytoolongid', headers: viewer })).statusCode, 400)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/ok', headers: bearer({ roles: [] }) })).statusCode, 403)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/ok' })).statusCode, 401)
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: viewer, payload: { calls: [{ id: 'a', op: 'getItem', input: { id: 'ok' } }, { id: 'b', op: 'getItem', input: { id: 'boom' } }] } })
  t.equal(batch.statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/trpc/getItem?input=' + encodeURIComponent('{"id":"ok"}'), headers: viewer })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/graphql', headers: viewer, payload: { query: '{ getItem(id: "ok") { id } }' } })).statusCode, 200)

  const report = (await app.inject({ method: 'GET', url: '/diagz', headers: system })).json()
  t.match(report.adapters.rest, { connections: null, calls: 15, errors: 1, refused: 4 })
  t.match(report.adapters.batch, { connections: null, calls: 2, errors: 1, refused: 0 })
  t.match(report.adapters.trpc, { calls: 1, errors: 0 })
  t.match(report.adapters.graphql, { calls: 1, errors: 0 })
  t.match(report.adapters.websocket, { calls: 0 })
  t.equal(report.lastMinute.calls, 19)
  t.equal(report.lastHour.calls, 19)
  t.equal(report.lastMinute.errorRate, Math.round(2 / 19 * 1e5) / 1e5)
  t.ok(report.lastMinute.requestsPerSecond > 0)
  t.ok(report.lastMinute.errorsPerSecond > 0)
  const lat = report.lastMinute.latencyMs
  t.ok(lat.p50 > 0 && lat.p50 <= lat.p95 && lat.p95 <= lat.p99 && lat.p99 <= lat.p999, `ordered percentiles ${JSON.stringify(lat)}`)
  // Each failure is counted where it started, not in every stage it went through.
  t.match(report.stages.identity, { calls: 19, errors: 0, refused: 1 })
  t.match(report.stages.authorization, { calls: 18, refused: 1 })
  t.match(report.stages.validation, { calls: 17, refused: 1 })
  t.match(report.stages.kernel, { calls: 16, errors: 2, refused: 1 })
  t.match(report.stages.metrics, { calls: 19, sampled: 19, errors: 0, refused: 0 })
  t.notOk('diagz' in report.stages, 'the diagnostics stage does not time itself')
  for (const s of Object.values(report.stages) as Array<{ avgMs: number, slowestMs: number }>) t.ok(s.avgMs >= 0 && s.slowestMs >= s.avgMs)
  t.ok(report.stages.kernel.avgMs > report.stages.validation.avgMs, 'the Kernel call takes longer than a schema check')
  t.equal(report.cache.hitRate, null, 'no cache stage: no hit rate')
  t.match(report.memory, { rssBytes: Number, heapUsedBytes: Number })
  t.ok(report.uptimeSeconds >= 0)
  t.match(report.eventLoop, { delayP99Ms: Number })
})

// Uptime and the windows' rates are durations: on the wall clock, one stepped back an hour (an
// NTP correction) made uptimeSeconds negative until the next restart and every rate of the last
// hour a thousand times too high (the window's seconds at their floor of 0.001); stepped
// forward, a process up a second had an hour's uptime and rates an hour's worth too low.
t.test('a wall clock stepped back or forward changes neither the uptime nor the rates', async t => {
  const app = await buildDemoApp(t)
  for (let i = 0; i < 5; i++) t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents', headers: viewer })).statusCode, 200)
  await new Promise(resolve => setTimeout(resolve, 200))
  const now = Date.now
  t.teardown(() => { Date.now = now })
  for (const step of [-3_600_000, 3_600_000]) {
    Date.now = () => now() + step
    // A token of the stepped clock's time.
    const report = (await app.inject({ method: 'GET', url: '/diagz', headers: bearer({ roles: ['system'] }) })).json()
    t.ok(report.uptimeSeconds >= 0 && report.uptimeSeconds < 600, `uptime ${report.uptimeSeconds} s, stepped ${step} ms`)
    for (const window of ['lastMinute', 'lastHour']) {
      t.ok(report[window].seconds >= 0.1 && report[window].seconds < 600, `${window} covers ${report[window].seconds} s, stepped ${step} ms`)
      t.ok(report[window].requestsPerSecond <= 6 / 0.1, `${window}: ${report[window].requestsPerSecond} calls/s, stepped ${step} ms`)
    }
  }
})

t.test('refusals of the checking stages are counted with metrics on and off', async t => {
  // Identity, roles and validation throw synchronously: with no async stage between them and
  // diagz (metrics off), their refusals skipped the count.
  for (const metrics of [true, false]) {
    const app = await buildDemoApp(t, { BFF_METRICS_ENABLED: metrics })
    const statuses: number[] = [(await app.inject({ url: '/api/v1/agents/a1', headers: system })).statusCode]
    for (let i = 0; i < 3; i++) statuses.push((await app.inject({ url: '/api/v1/agents/a1' })).statusCode)
    for (let i = 0; i < 2; i++) statuses.push((await app.inject({ method: 'POST', url: '/api/v1/agents', headers: system, payload: { name: 'x' } })).statusCode)
    for (let i = 0; i < 2; i++) statuses.push((await app.inject({ method: 'POST', url: '/api/v1/agents', headers: bearer(), payload: { nope: 1 } })).statusCode)
    t.same(statuses, [200, 401, 401, 401, 403, 403, 400, 400], `metrics ${metrics}: the answers`)
    const report = (await app.inject({ url: '/diagz', headers: system })).json()
    t.equal(report.lastMinute.calls, 8, `metrics ${metrics}: every call in the window`)
    t.match(report.adapters.rest, { calls: 8, refused: 7, errors: 0 }, `metrics ${metrics}: every refusal counted`)
  }
})

t.test('the cache hit rate comes from the call outcome any cache stage records', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/items/ok': (_req, res) => json(res, 200, { id: 'ok' }) })
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', properties: { id: { type: 'string' } } } }
  }, { url: kernel.url })
  // The real cache is off: a stand-in stage picks the outcomes.
  const app = await buildApp(testConfig({ BFF_AUTH_ENABLED: false, BFF_CACHE_ENABLED: false }), { logger: false, manifest, kernelUrl: kernel.url, diagz: { cache: true } })
  t.teardown(() => app.close())
  // A stand-in for the cache concern: any stage setting ctx.cache is counted.
  let n = 0
  const outcomes = ['hit', 'hit', 'miss', 'stale'] as const
  app.pipeline.addStage({ name: 'cache', order: StageOrder.cache, build: () => (ctx, next) => { ctx.cache = outcomes[n++ % 4]; return next(ctx) } })
  await app.ready()
  for (let i = 0; i < 8; i++) await app.inject({ method: 'GET', url: '/api/v1/items/ok' })
  const report = (await app.inject({ method: 'GET', url: '/diagz' })).json()
  t.match(report.cache, { hits: 4, misses: 2, stale: 2, hitRate: 0.75 })
})

t.test('what is off is left out: faces and the cache section, as /metrics and /readyz leave them out', async t => {
  // They were listed at zero whatever the flags, which read as on but idle.
  const off = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false, BFF_CACHE_ENABLED: false })
  const report = (await off.inject({ url: '/diagz', headers: system })).json()
  t.same(Object.keys(report.adapters).sort(), ['batch', 'rest'], 'the faces that are on')
  t.notOk('cache' in report, 'no cache section with the cache off')
  const some = await buildDemoApp(t, { BFF_GRAPHQL_ENABLED: false })
  t.same(Object.keys((await some.inject({ url: '/diagz', headers: system })).json().adapters).sort(), ['batch', 'rest', 'trpc', 'websocket'], 'one face off')
  const on = (await (await buildDemoApp(t)).inject({ url: '/diagz', headers: system })).json()
  t.same(Object.keys(on.adapters).sort(), ['batch', 'graphql', 'rest', 'trpc', 'websocket'], 'every face on by default')
  t.match(on.cache, { hitRate: null, hits: 0 }, 'the cache section with the cache on')
})

t.test('stores and sections plug in; a failing check reads as unhealthy, not as a 500', async t => {
  const app = await buildTestApp(t, { REDIS_URL: 'redis://127.0.0.1:6379' })
  app.diagz.addStore('search', () => ({ type: 'redis', healthy: false, detail: 'fallback to memory' }))
  app.diagz.addStore('broken', () => { throw new Error('no answer') })
  app.diagz.addSection('quota', () => ({ queueDepth: 3 }))
  app.diagz.addSection('flaky', () => { throw new Error('oops') })
  t.throws(() => app.diagz.addStore('search', () => ({ type: 'memory', healthy: true })), /twice/)
  t.throws(() => app.diagz.addStore('cache', () => ({ type: 'memory', healthy: true })), /twice/, 'the concerns added their own')
  t.throws(() => app.diagz.addSection('memory', () => 1), /twice/)
  await until(() => app.redis.up(), 'redis up')
  const res = await app.inject({ method: 'GET', url: '/diagz', headers: system })
  t.equal(res.statusCode, 200)
  const report = res.json()
  t.same(report.stores.redis, { type: 'redis', healthy: true })
  t.same(report.stores.search, { type: 'redis', healthy: false, detail: 'fallback to memory' })
  t.same(report.stores.broken, { type: 'unknown', healthy: false, detail: 'no answer' })
  t.equal(report.stores.events.type, 'redis')
  t.same(report.quota, { queueDepth: 3 })
  t.same(report.flaky, { error: 'oops' })
})

t.test('a Redis that is away reads as unhealthy', async t => {
  const app = await buildTestApp(t, { REDIS_URL: 'redis://127.0.0.1:1' })
  const report = (await app.inject({ method: 'GET', url: '/diagz', headers: system })).json()
  t.match(report.stores.redis, { type: 'redis', healthy: false })
  t.match(report.stores.events, { type: 'redis', healthy: false })
})

t.test('WebSocket connections are counted per face, HTTP connections in http', async t => {
  const { app, url } = await wsApp(t, { env: { BFF_TRPC_ENABLED: true, BFF_GRAPHQL_ENABLED: true } })
  const base = url.replace('/ws', '')
  const read = async (): Promise<any> => (await app.inject({ method: 'GET', url: '/diagz', headers: system })).json()
  const ws = await connect(t, url)
  const call = await ws.request({ id: '1', op: 'getAgent', input: { id: 'a1' } })
  t.equal(call.result.id, 'a1')
  const gql = new WebSocket(base + '/graphql', 'graphql-transport-ws', { headers: { authorization: `Bearer ${token()}` } })
  t.teardown(() => gql.terminate())
  await new Promise<void>((resolve, reject) => { gql.once('open', resolve); gql.once('error', reject) })
  const report = await read()
  t.match(report.adapters.websocket, { connections: 1, calls: 1 })
  t.match(report.adapters.graphql, { connections: 1 })
  t.match(report.adapters.trpc, { connections: 0 })
  t.ok(report.http.connections >= 2, 'the sockets are HTTP connections too')
  ws.ws.close()
  gql.close()
  const gone = { websocket: false, graphql: false }
  const poll = setInterval(() => {
    read().then(r => { gone.websocket = r.adapters.websocket.connections === 0; gone.graphql = r.adapters.graphql.connections === 0 }, () => {})
  }, 20)
  t.teardown(() => clearInterval(poll))
  await until(() => gone.websocket && gone.graphql, 'closed connections no longer counted')
  clearInterval(poll)
})

t.test('by default one call in 8 is timed per stage; every call is counted', async t => {
  // No cache: every call reaches the Kernel stage.
  const app = await buildDemoApp(t, { BFF_CACHE_ENABLED: false })
  for (let i = 0; i < 20; i++) t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: viewer })).statusCode, 200)
  const report = (await app.inject({ method: 'GET', url: '/diagz', headers: system })).json()
  t.match(report.stages.kernel, { calls: 20, sampled: 2 })
  t.match(report.stages.identity, { calls: 20, sampled: 2 })
  t.ok(report.stages.kernel.avgMs > 0)
  t.equal(report.lastMinute.calls, 20, 'the window counts every call')
})

t.test('with BFF_DIAGZ_ENABLED=false there is no /diagz and no timing in the pipeline', async t => {
  const app = await buildDemoApp(t, { BFF_DIAGZ_ENABLED: false })
  t.equal((await app.inject({ method: 'GET', url: '/diagz', headers: system })).statusCode, 404)
  t.notOk(app.hasDecorator('diagz'))
  t.notOk(app.pipeline.entry('getAgent').stages.includes('diagz'))
  t.ok((await buildDemoApp(t)).pipeline.entry('getAgent').stages.includes('diagz'))
})

t.test('the stage timer: own time, errors where they start, synchronous throws', async t => {
  const fresh = () => ({ calls: 0, sampled: 0, errors: 0, refused: 0, totalMs: 0, slowestMs: 0 })
  const ctx = {} as unknown as CallContext
  const ok: Next = async () => 'ok'
  // A stage that refuses by throwing synchronously.
  const refusing: Stage = () => { throw new MantleError('FORBIDDEN') }
  let stats = fresh()
  t.throws(() => timeStage(stats, refusing)(ctx, ok), { code: 'FORBIDDEN' })
  t.match(stats, { calls: 1, refused: 1, errors: 0 })
  // An error from further in passes through without counting here, thrown sync or async.
  stats = fresh()
  const passing: Stage = (c, next) => next(c)
  t.throws(() => timeStage(stats, passing)(ctx, () => { throw new MantleError('KERNEL_ERROR') }), { code: 'KERNEL_ERROR' })
  await t.rejects(timeStage(stats, passing)(ctx, async () => { throw new MantleError('KERNEL_ERROR') }), { code: 'KERNEL_ERROR' })
  t.match(stats, { calls: 2, refused: 0, errors: 0 })
  // A stage that turns the inner failure into its own is counted.
  stats = fresh()
  const translating: Stage = async (c, next) => { try { return await next(c) } catch { throw new Error('mine') } }
  await t.rejects(timeStage(stats, translating)(ctx, async () => { throw new MantleError('KERNEL_ERROR') }), /mine/)
  t.match(stats, { calls: 1, errors: 1 })
  // Own time excludes the time in next.
  stats = fresh()
  const slowNext: Next = async () => await new Promise(resolve => setTimeout(() => resolve('late'), 50))
  t.equal(await timeStage(stats, passing)(ctx, slowNext), 'late')
  t.ok(stats.totalMs < 45, `own time ${stats.totalMs} ms excludes the 50 ms of next`)
  // Sampling: the calls in between are counted, not timed, and their outcomes not looked at.
  stats = fresh()
  const sampler = { every: 3 }
  const sampled = timeStage(stats, refusing, sampler)
  for (let i = 0; i < 6; i++) t.throws(() => sampled(ctx, ok))
  t.match(stats, { calls: 6, sampled: 2, refused: 2 })
  // The rate is read at each call: the sampler's owner may change it as the load changes.
  sampler.every = 1
  for (let i = 0; i < 3; i++) t.throws(() => sampled(ctx, ok))
  t.match(stats, { calls: 9, sampled: 5, refused: 5 })
  t.equal(outcomeOf(null), 2)
  t.equal(outcomeOf({ statusCode: 429 }), 1)
})

t.test('the pipeline takes one instrument, before it is compiled', async t => {
  const p = createPipeline(testManifest({ getX: { type: 'query', rest: 'GET /x', kernel: 'GET /v1/x', input: { type: 'object' }, output: { type: 'object' } } }))
  p.setTerminal(() => async () => ({}))
  const seen: string[] = []
  p.instrument((name, _op, stage) => { seen.push(name); return stage })
  t.throws(() => p.instrument((_n, _o, stage) => stage), /already instrumented/)
  p.compile()
  t.same(seen.sort(), ['kernel', 'validation'])
  t.same(await p.entry('getX').run(new CallContext('r', 'rest', p.entry('getX').op, {}, undefined, undefined, undefined)), {})
  t.throws(() => p.instrument((_n, _o, stage) => stage), /after it was compiled/)
})

t.test('every concern reports its store: rate limits, cache, idempotency and audit', async t => {
  const memory = (await buildDemoApp(t, { BFF_AUDIT_STORE: 'memory' }))
  const local = (await memory.inject({ method: 'GET', url: '/diagz', headers: system })).json()
  t.match(local.stores, {
    rateLimit: { type: 'memory', healthy: true, detail: /keys in memory/ },
    cache: { type: 'memory', healthy: true, detail: /entries in memory/ },
    idempotency: { type: 'memory', healthy: true, detail: /keys in memory/ },
    audit: { type: 'memory', healthy: true }
  })
  // As the cache's: the keys held, those expired included until a read, a bound or a scrape drops them (not live keys).
  t.equal(local.stores.idempotency.detail, '0 keys in memory, expired ones included until dropped')
  t.match(local.audit, { store: 'memory', up: true, queueMax: Number, spoolBytes: 0, failures: 0, lastError: null })

  const shared = { REDIS_URL: 'redis://127.0.0.1:6379', BFF_RATE_LIMIT_STORE: 'redis', BFF_CACHE_STORE: 'redis', BFF_IDEMPOTENCY_STORE: 'redis', BFF_AUDIT_STORE: 'memory' }
  const redis = await buildDemoApp(t, shared)
  await until(() => redis.redis.up(), 'redis up')
  const up = (await redis.inject({ method: 'GET', url: '/diagz', headers: system })).json()
  t.match(up.stores, { rateLimit: { type: 'redis', healthy: true }, cache: { type: 'redis', healthy: true }, idempotency: { type: 'redis', healthy: true } })

  // Redis configured but unreachable: each store says it answers from memory.
  const away = await buildDemoApp(t, { ...shared, REDIS_URL: 'redis://127.0.0.1:1' })
  const down = (await away.inject({ method: 'GET', url: '/diagz', headers: system })).json()
  t.match(down.stores, {
    cache: { type: 'redis', healthy: false, detail: /memory/ },
    idempotency: { type: 'redis', healthy: false, detail: /fallback to memory/ }
  })
  t.equal(down.stores.rateLimit.type, 'redis')
})

t.test('the per-stage timing follows the load: one call in 8 at low rates, about 128 timed a second above', async t => {
  t.equal(sampleEveryFor(0), 8)
  t.equal(sampleEveryFor(1000), 8)
  t.equal(sampleEveryFor(SAMPLED_PER_SECOND * 8), 8)
  t.equal(sampleEveryFor(SAMPLED_PER_SECOND * 8 + 1), 16)
  t.equal(sampleEveryFor(15_000), 128)
  t.equal(sampleEveryFor(1e9), 1024, 'at most one in 1024')
  for (const rate of [2000, 15_000, 60_000]) t.ok(rate / sampleEveryFor(rate) <= SAMPLED_PER_SECOND, `${rate}/s: at most ${SAMPLED_PER_SECOND} timed`)

  // As deployed (no fixed rate): the rate is set again each second, and the calls are counted.
  const app = await buildDemoApp(t)
  const call = async (): Promise<void> => { t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: viewer })).statusCode, 200) }
  for (let i = 0; i < 16; i++) await call()
  await new Promise(resolve => setTimeout(resolve, 1100))
  for (let i = 0; i < 16; i++) await call()
  const stages = (await app.inject({ method: 'GET', url: '/diagz', headers: system })).json().stages
  t.equal(stages.identity.calls, 32)
  t.equal(stages.identity.sampled, 4, 'one in 8 at this rate')
})

t.test('the event-loop delay is told less the 20 ms each sample waits on purpose', async t => {
  // An idle gateway read delayP50Ms 20.3: the sampling interval, not delay.
  t.equal(loopDelay(20_316_000), 0.316)
  t.equal(loopDelay(45_000_000), 25)
  t.equal(loopDelay(19_000_000), 0, 'never below 0')
})
