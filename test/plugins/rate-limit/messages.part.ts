// The HTTP guard counts a WebSocket's messages that are no operation's call (README, "Rate
// limits"): on /ws each subscribe and auth frame, on /trpc and /graphql each subscription
// started, as one request of the connection's tenant.
// Before, behind its upgrade a connection sent them without end, each decided and audited.
import t, { type Test } from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { WebSocket } from 'ws'
import { buildDemoApp, startTestKernel, testManifest, bearer, token, json, until } from '../../helper.js'
import { wsApp, connect, openGraphqlWs, run, type Frame } from '../../adapters/websocket-helper.js'
import { tenantKey } from '../../../plugins/rate-limit/index.js'
import { redisVia, startTcpProxy } from '../../proxy.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const op = { type: 'query', rest: 'GET /ping', kernel: 'GET /v1/ok', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
const events = { runUpdated: { topic: 'runs.updated', payload: { type: 'object' } } }
// A day's window: windows are aligned to the clock, and one of a minute could end mid-test.
const DAY = 86_400_000

async function guardedWs (t: Test, store: 'memory' | 'redis', env: Record<string, string | number | boolean> = {}): ReturnType<typeof wsApp> {
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }) })
  return await wsApp(t, {
    env: { BFF_RATE_LIMIT_GLOBAL_MAX: 6, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: DAY, BFF_AUDIT_ENABLED: true, ...(store === 'redis' ? { REDIS_URL, BFF_REDIS_COMMAND_TIMEOUT_MS: 10_000 } : {}), ...env },
    build: { manifest: testManifest({ ping: op }, { url: kernel.url }, { events }), kernelUrl: kernel.url }
  })
}

/** Deletes the guard's keys of this test from the shared Redis at teardown. */
function forgetInRedis (t: Test, keys: string[]): void {
  const redis = new Redis(REDIS_URL)
  t.teardown(async () => {
    await redis.del(...keys)
    redis.disconnect()
  })
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store}: /ws subscribe and auth frames count towards the tenant's budget; calls and unsubscribes do not`, async t => {
    const { app, url } = await guardedWs(t, store)
    t.equal(app.rateLimiter.store, store)
    const tenant = 'g-' + randomUUID()
    if (store === 'redis') forgetInRedis(t, [tenantKey(tenant)])
    const client = await connect(t, url, { tenant }) // 1: the upgrade
    t.match(await client.request({ id: 'c1', op: 'ping', input: {} }), { id: 'c1', result: { ok: true } }, 'a call: its operation\'s limits, not the guard')
    t.match(await client.request({ id: 's1', subscribe: 'runUpdated' }), { id: 's1', subscribed: 'runUpdated' }) // 2
    t.match(await client.request({ id: 'u1', unsubscribe: 'runUpdated' }), { id: 'u1', unsubscribed: 'runUpdated' }, 'not counted')
    t.match(await client.request({ id: 'a1', auth: token({ tenant }) }), { id: 'a1', authenticated: true }) // 3
    t.match(await client.request({ id: 'n1', subscribe: 'noSuchEvent' }), { id: 'n1', error: { code: 'NOT_FOUND' } }, 'an unknown event: not counted, as a request to no route is not')
    t.match(await client.request({ id: 'r1', subscribe: 'runUpdated', input: {} }), { id: 'r1', error: { code: 'VALIDATION_FAILED' } }, 'a subscribe refused for its form is counted') // 4
    t.match(await client.request({ id: 'a2', auth: 'not-a-token' }), { id: 'a2', error: { code: 'UNAUTHENTICATED' } }) // 5
    t.match(await client.request({ id: 's2', subscribe: 'runUpdated' }), { id: 's2', subscribed: 'runUpdated' }) // 6: the last place
    const refused: Frame[] = []
    for (const frame of [{ id: 's3', subscribe: 'runUpdated' }, { id: 'a3', auth: token({ tenant }) }, { id: 'r2', auth: 7 }]) refused.push(await client.request(frame))
    for (const [i, id] of ['s3', 'a3', 'r2'].entries()) {
      t.match(refused[i], { id, error: { code: 'RATE_LIMITED', status: 429, detail: `More than 6 requests in ${DAY} ms` } }, `${id}: the guard's refusal`)
      t.ok(refused[i].error.retryAfter >= 1, 'with the wait a Retry-After would say')
    }
    t.match(await client.request({ id: 'c2', op: 'ping', input: {} }), { id: 'c2', result: { ok: true } }, 'calls still run')
    t.match(await client.request({ id: 'u2', unsubscribe: 'runUpdated' }), { id: 'u2', unsubscribed: 'runUpdated' }, 'and the client can still let go of what it holds')
    t.equal((await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant }) })).statusCode, 429, 'one budget with the tenant\'s HTTP requests')
    t.equal((await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant: 'g-' + randomUUID() }) })).statusCode, 200, 'another tenant has its own')
    // Each refusal is the frame's decision, recorded as any other (the subscribe and auth frames').
    // (Read from the store: GET /admin/audit is a request the guard counts too.)
    let rows: Array<{ action: string, statusCode: number }> = []
    for (let i = 0; i < 250 && rows.length < 3; i++) {
      rows = (await app.audit.store.query({ limit: 10, tenant, status: 'RATE_LIMITED' })).entries.filter(e => e.protocol === 'websocket')
      if (rows.length < 3) await new Promise(resolve => setTimeout(resolve, 20))
    }
    t.same(rows.map(r => [r.action, r.statusCode]).sort(), [['runUpdated', 429], ['websocket.auth', 429], ['websocket.auth', 429]])
    t.match((await app.inject({ url: '/metrics' })).body, new RegExp(`mantle_rate_limit_refusals_total\\{scope="global",store="${store}"\\} [1-9]`))
  })
}

t.test('redis: frames sent behind a counted frame are handled in the order they came', async t => {
  const { url } = await guardedWs(t, 'redis', { BFF_RATE_LIMIT_GLOBAL_MAX: 1000 })
  const tenant = 'g-' + randomUUID()
  forgetInRedis(t, [tenantKey(tenant)])
  const client = await connect(t, url, { tenant })
  // All in one write: the subscribe waits for Redis, the frames behind it are held.
  const frames = [
    { id: '1', subscribe: 'runUpdated' },
    { id: '2', unsubscribe: 'runUpdated' },
    { id: '3', op: 'ping', input: {} },
    { id: '4', subscribe: 'runUpdated' },
    { id: '5', auth: token({ tenant }) },
    { id: '6', unsubscribe: 'runUpdated' },
    { id: '7', op: 'ping', input: {} }
  ]
  for (const frame of frames) client.send(frame)
  const answers: Frame[] = []
  for (let i = 0; i < frames.length; i++) answers.push(await client.next())
  // A call's answer may come after later frames' (it waits for the Kernel); the rest in order.
  const order = answers.map(a => a.id as string).filter(id => id !== '3' && id !== '7')
  t.same(order, ['1', '2', '4', '5', '6'])
  t.match(answers.find(a => a.id === '2'), { unsubscribed: 'runUpdated' })
  t.match(answers.find(a => a.id === '6'), { unsubscribed: 'runUpdated' })
  t.match(answers.find(a => a.id === '3'), { result: { ok: true } })
  t.match(answers.find(a => a.id === '7'), { result: { ok: true } })
})

t.test('with identity off, a connection\'s frames count towards its address', async t => {
  const { url } = await guardedWs(t, 'memory', { BFF_AUTH_ENABLED: false, BFF_RATE_LIMIT_GLOBAL_MAX: 2 })
  const client = await connect(t, url, null) // 1
  t.match(await client.request({ id: 's1', subscribe: 'runUpdated' }), { subscribed: 'runUpdated' }) // 2
  t.match(await client.request({ id: 's2', subscribe: 'runUpdated' }), { error: { code: 'RATE_LIMITED' } })
})

// The same on the other faces' WebSockets: each subscription /trpc and /graphql start.
for (const store of ['memory', 'redis'] as const) {
  t.test(`${store}: each subscription a /trpc or /graphql WebSocket starts counts towards the tenant's budget`, async t => {
    const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 4, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: DAY, BFF_WEBSOCKET_ENABLED: false, ...(store === 'redis' ? { REDIS_URL, BFF_REDIS_COMMAND_TIMEOUT_MS: 10_000 } : {}) })
    await app.listen({ port: 0, host: '127.0.0.1' })
    const base = `ws://127.0.0.1:${(app.server.address() as { port: number }).port}`
    const [trpcTenant, graphqlTenant] = ['g-' + randomUUID(), 'g-' + randomUUID()]
    if (store === 'redis') forgetInRedis(t, [tenantKey(trpcTenant), tenantKey(graphqlTenant)])

    // tRPC: the upgrade (1), then three subscriptions; the fourth is refused.
    const trpc = new WebSocket(`${base}/trpc`, { headers: bearer({ tenant: trpcTenant, roles: ['viewer'] }) })
    t.teardown(() => trpc.terminate())
    const answers: Frame[] = []
    trpc.on('message', data => answers.push(JSON.parse(String(data))))
    await new Promise((resolve, reject) => { trpc.once('open', resolve).once('error', reject) })
    for (let id = 1; id <= 4; id++) trpc.send(JSON.stringify({ id, method: 'subscription', params: { path: 'runUpdated', input: null } }))
    await until(() => answers.filter(a => typeof a.id === 'number').length >= 4, 'an answer to each subscription')
    for (let id = 1; id <= 3; id++) t.match(answers.find(a => a.id === id), { result: { type: 'started' } }, `tRPC subscription ${id}`)
    t.match(answers.find(a => a.id === 4), { error: { data: { code: 'RATE_LIMITED', httpStatus: 429, retryAfter: Number } } }, 'the fourth: the guard\'s refusal')
    t.equal((await app.inject({ url: '/api/v1/agents/a1', headers: bearer({ tenant: trpcTenant }) })).statusCode, 429, 'the tenant\'s budget is spent on every face')

    // GraphQL: the upgrade (1), then three subscriptions; the fourth is refused.
    const graphql = await openGraphqlWs(t, `${base}/graphql`, { headers: bearer({ tenant: graphqlTenant, roles: ['viewer'] }) })
    for (const id of ['1', '2', '3', '4']) graphql.send({ id, type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } })
    await until(() => graphql.frames.some(f => f.id === '4'), 'the fourth subscription\'s answer')
    t.match(graphql.frames.find(f => f.id === '4'), { type: 'error', payload: [{ extensions: { code: 'RATE_LIMITED', status: 429, retryAfter: Number } }] })
    t.notOk(graphql.frames.some(f => f.id !== '4' && f.type === 'error'), 'the first three run')
    await until(() => app.events.bus.subscriptions === 6, 'six subscriptions on the bus')
    t.equal(graphql.closed(), null, 'the connection stays open')
  })
}

t.test('redis: a GraphQL subscription completed while the guard counts it never starts, and its id is free again', async t => {
  const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1000, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: DAY, BFF_WEBSOCKET_ENABLED: false, BFF_TRPC_ENABLED: false, REDIS_URL, BFF_REDIS_COMMAND_TIMEOUT_MS: 10_000 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const tenant = 'g-' + randomUUID()
  forgetInRedis(t, [tenantKey(tenant)])
  const graphql = await openGraphqlWs(t, `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`, { headers: bearer({ tenant, roles: ['viewer'] }) })
  const query = 'subscription { runUpdated { id } }'
  // One write: the complete comes while the subscribe waits for Redis.
  graphql.ws.send(JSON.stringify({ id: 'x', type: 'subscribe', payload: { query } }))
  graphql.ws.send(JSON.stringify({ id: 'x', type: 'complete' }))
  graphql.send({ id: 'y', type: 'subscribe', payload: { query } })
  await until(() => app.events.bus.subscriptions === 1, 'y running')
  await new Promise(resolve => setTimeout(resolve, 100))
  t.equal(app.events.bus.subscriptions, 1, 'x never started')
  graphql.send({ id: 'x', type: 'subscribe', payload: { query } })
  await until(() => app.events.bus.subscriptions === 2, 'x, sent again, runs')
  await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('r1') })
  await until(() => graphql.frames.filter(f => f.type === 'next').length === 2, 'the event on both')
  t.same(graphql.frames.filter(f => f.type !== 'connection_ack').map(f => [f.id, f.type]).sort(), [['x', 'next'], ['y', 'next']], 'nothing else: no error, no complete for the one that never started')
  t.equal(graphql.closed(), null)
})

t.test('a GraphQL subscribe that brings the connection\'s first token counts towards the address, as a request without one', async t => {
  const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 3, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: DAY, BFF_WEBSOCKET_ENABLED: false, BFF_TRPC_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const tenant = 'g-' + randomUUID()
  // No token on the upgrade nor in connection_init: the upgrade counts towards the address (1).
  const graphql = await openGraphqlWs(t, `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`, { headers: {} })
  const query = 'subscription { runUpdated { id } }'
  const extensions = [{ type: 'connectionInit', payload: { authorization: `Bearer ${token({ tenant, roles: ['viewer'] })}` } }]
  graphql.send({ id: 'a', type: 'subscribe', payload: { query }, extensions }) // the address: 2
  await until(() => app.events.bus.subscriptions === 1, 'a running')
  graphql.send({ id: 'b', type: 'subscribe', payload: { query }, extensions }) // the tenant: 1
  await until(() => app.events.bus.subscriptions === 2, 'b running')
  t.equal((await app.inject({ url: '/api/v1/agents' })).statusCode, 401, 'the address\'s third request')
  t.equal((await app.inject({ url: '/api/v1/agents' })).statusCode, 429, 'and its fourth: the first subscribe was the address\'s second')
  const statuses: number[] = []
  for (let i = 0; i < 3; i++) statuses.push((await app.inject({ url: '/api/v1/agents', headers: bearer({ tenant }) })).statusCode)
  t.same(statuses, [200, 200, 429], 'the second subscribe was the tenant\'s first')
})

t.test('redis stalled: the frames held behind a counted one are answered, in order, once the guard falls back to memory', async t => {
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379))
  const { app, url } = await guardedWs(t, 'redis', { BFF_RATE_LIMIT_GLOBAL_MAX: 1000, REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 100 })
  const tenant = 'g-' + randomUUID()
  forgetInRedis(t, [tenantKey(tenant)])
  const client = await connect(t, url, { tenant })
  proxy.delay(60_000)
  const frames = [
    { id: '1', subscribe: 'runUpdated' },
    { id: '2', op: 'ping', input: {} },
    { id: '3', unsubscribe: 'runUpdated' },
    { id: '4', auth: token({ tenant }) },
    { id: '5', subscribe: 'runUpdated' }
  ]
  for (const frame of frames) client.send(frame)
  const answers: Frame[] = []
  for (let i = 0; i < frames.length; i++) answers.push(await client.next(5000))
  t.same(answers.map(a => a.id as string).filter(id => id !== '2'), ['1', '3', '4', '5'], 'every frame answered, in order')
  t.match(answers.find(a => a.id === '1'), { subscribed: 'runUpdated' })
  t.match(answers.find(a => a.id === '2'), { result: { ok: true } })
  t.match(answers.find(a => a.id === '4'), { authenticated: true })
  t.match(answers.find(a => a.id === '5'), { subscribed: 'runUpdated' })
  t.equal(app.rateLimiter.fallbackActive, true, 'counted in memory meanwhile')
  proxy.restore()
})
