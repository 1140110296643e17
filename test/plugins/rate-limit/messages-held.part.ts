// The guard's count on Redis of a WebSocket message, and what comes meanwhile (README, "Rate
// limits"): frames /ws holds behind it, a close or a shutdown, a tRPC subscription stopped, a
// GraphQL subscribe behind one that brings the connection's first token. Found by a review.
import t, { type Test } from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { WebSocket } from 'ws'
import { buildDemoApp, bearer, startTestKernel, testManifest, token, json, until } from '../../helper.js'
import { wsApp, connect, openGraphqlWs, type Client } from '../../adapters/websocket-helper.js'
import { tenantKey, ipKey } from '../../../plugins/rate-limit/index.js'
import { redisVia, startTcpProxy, type TcpProxy } from '../../proxy.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const op = { type: 'query', rest: 'GET /ping', kernel: 'GET /v1/ok', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
const events = { runUpdated: { topic: 'runs.updated', payload: { type: 'object' } } }
const DAY = 86_400_000
const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

/** /ws with the guard on Redis through a proxy whose commands a test can hold; Kernel calls counted. */
async function setup (t: Test, settings?: { maxFrameBytes: number }): Promise<{ app: Awaited<ReturnType<typeof wsApp>>['app'], url: string, proxy: TcpProxy, hits: { n: number }, tenant: string }> {
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379))
  const hits = { n: 0 }
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => { hits.n++; json(res, 200, { ok: true }) } })
  const { app, url } = await wsApp(t, {
    env: { BFF_RATE_LIMIT_GLOBAL_MAX: 1000, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: DAY, BFF_AUDIT_ENABLED: true, REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 10_000 },
    ...(settings === undefined ? {} : { settings }),
    build: { manifest: testManifest({ ping: op }, { url: kernel.url }, { events }), kernelUrl: kernel.url }
  })
  const tenant = 'g-' + randomUUID()
  const redis = new Redis(REDIS_URL)
  t.teardown(async () => { await redis.del(tenantKey(tenant)); redis.disconnect() })
  return { app, url, proxy, hits, tenant }
}

/** Sends the frames in one TCP write: the first is counted, the others are held behind it. */
function sendTogether (client: Client, frames: Array<string | Record<string, unknown>>): void {
  const socket = (client.ws as unknown as { _socket: { cork: () => void, uncork: () => void } })._socket
  socket.cork()
  for (const f of frames) client.send(f)
  socket.uncork()
}

const closedWithin = async (client: Client, ms: number): Promise<{ code: number } | 'still open'> =>
  await Promise.race([client.closed, sleep(ms).then(() => 'still open' as const)])

t.test('redis: a /ws frame held behind one that closed the connection (1009) leaves the socket reading: the close completes', async t => {
  const { url, proxy, tenant } = await setup(t, { maxFrameBytes: 1000 })
  const client = await connect(t, url, { tenant })
  proxy.holdSends(chunk => chunk.toString().includes(tenant))
  sendTogether(client, [{ id: 's1', subscribe: 'runUpdated' }, JSON.stringify({ id: 'big', pad: 'x'.repeat(2000) }), { id: 's2', subscribe: 'runUpdated' }])
  await until(() => proxy.holding === 1, 'the count held at Redis')
  await sleep(100)
  proxy.release()
  const closed = await closedWithin(client, 5000)
  t.match(closed, { code: 1009 }, 'the close completes within 5 s')
})

t.test('redis: a /ws shutdown while a frame is counted answers the call held behind it, and the close completes at once', async t => {
  const { app, url, proxy, hits, tenant } = await setup(t)
  const client = await connect(t, url, { tenant })
  proxy.holdSends(chunk => chunk.toString().includes(tenant))
  sendTogether(client, [{ id: 's1', subscribe: 'runUpdated' }, { id: 'c1', op: 'ping', input: {} }])
  await until(() => proxy.holding === 1, 'the count held at Redis')
  await sleep(100)
  const started = Date.now()
  const closing = app.close()
  setTimeout(() => { proxy.release() }, 100)
  const closed = await client.closed
  const took = Date.now() - started
  await closing
  const frames: Array<Record<string, unknown>> = []
  while (client.pending > 0) frames.push(await client.next())
  t.ok(frames.some(f => f.id === 'c1'), `the call sent before the shutdown is answered (result or OVERLOADED); got ${JSON.stringify(frames.map(f => f.id))}, Kernel calls ${hits.n}`)
  t.equal(closed.code, 1001)
  t.ok(took < 1000, `a client that answers the close at once is not held until the 2 s grace cuts it (took ${took} ms)`)
})

t.test('redis: a tRPC subscription stopped while the guard counts it is never decided, nor recorded as granted', async t => {
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379))
  const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1000, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: DAY, BFF_WEBSOCKET_ENABLED: false, BFF_GRAPHQL_ENABLED: false, BFF_AUDIT_ENABLED: true, REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 10_000 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const tenant = 'g-' + randomUUID()
  const redis = new Redis(REDIS_URL)
  t.teardown(async () => { await redis.del(tenantKey(tenant)); redis.disconnect() })
  const trpc = new WebSocket(`ws://127.0.0.1:${(app.server.address() as { port: number }).port}/trpc`, { headers: bearer({ tenant, roles: ['viewer'] }) })
  t.teardown(() => trpc.terminate())
  const answers: Array<Record<string, unknown>> = []
  trpc.on('message', data => answers.push(JSON.parse(String(data))))
  await new Promise((resolve, reject) => { trpc.once('open', resolve).once('error', reject) })
  proxy.holdSends(chunk => chunk.toString().includes(tenant))
  trpc.send(JSON.stringify({ id: 1, method: 'subscription', params: { path: 'runUpdated', input: null } }))
  await until(() => proxy.holding === 1, 'the count held at Redis')
  trpc.send(JSON.stringify({ id: 1, method: 'subscription.stop' }))
  await sleep(100)
  proxy.release()
  await sleep(500)
  t.notOk(answers.some(a => a.id === 1 && (a.result as { type?: string } | undefined)?.type === 'started'), 'never started')
  const entries = (await app.audit.store.query({ limit: 10, tenant })).entries.filter(e => e.protocol === 'trpc' && e.action === 'runUpdated')
  t.same(entries.map(e => e.statusCode), [], `no subscription granted in the audit trail for one the client stopped before it was decided (got ${JSON.stringify(entries.map(e => [e.action, e.statusCode]))}); bus subscriptions ${app.events.bus.subscriptions}`)
})

t.test('redis: of two GraphQL subscribes bringing the connection\'s first token, only the first counts towards the address (as on the memory store)', async t => {
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379))
  const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1000, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: DAY, BFF_WEBSOCKET_ENABLED: false, BFF_TRPC_ENABLED: false, REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 10_000 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const tenant = 'g-' + randomUUID()
  const redis = new Redis(REDIS_URL)
  const address = ipKey('127.0.0.1')
  await redis.del(address)
  t.teardown(async () => { await redis.del(tenantKey(tenant), address); redis.disconnect() })
  // No token on the upgrade nor in connection_init: the upgrade counts towards the address (1).
  const graphql = await openGraphqlWs(t, `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`, { headers: {} })
  const query = 'subscription { runUpdated { id } }'
  const extensions = [{ type: 'connectionInit', payload: { authorization: `Bearer ${token({ tenant, roles: ['viewer'] })}` } }]
  proxy.holdSends(chunk => chunk.toString().includes('ratelimit:ip'))
  graphql.send({ id: 'a', type: 'subscribe', payload: { query }, extensions })
  await until(() => proxy.holding === 1, 'a counted at Redis')
  graphql.send({ id: 'b', type: 'subscribe', payload: { query }, extensions })
  await sleep(200)
  proxy.release()
  await until(() => app.events.bus.subscriptions === 2, 'both running')
  const counts = [await redis.hget(address, 'c'), await redis.hget(tenantKey(tenant), 'c')]
  t.same(counts, ['2', '1'], 'the address: the upgrade and a; the tenant: b (memory store: the same test gives this)')
})
