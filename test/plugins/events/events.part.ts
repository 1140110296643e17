import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { createServer, connect, type AddressInfo, type Socket } from 'node:net'
import { Redis } from 'ioredis'
import { buildDemoApp, bearer, closedPort, testConfig, until } from '../../helper.js'
import { EventBus, isKernelEvent } from '../../../plugins/events/index.js'
import { ANONYMOUS, type Identity } from '../../../plugins/auth/index.js'
import { start } from '../../../server.js'
import { startRedisServer } from '../../redis-server.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import type { EventDefinition } from '../../../manifest.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const run = (id: string, extra: Record<string, unknown> = {}) => ({ id, agentId: 'a1', status: 'running', temperature: 1, promptChars: 3, output: null, error: null, createdAt: 'c', updatedAt: 'u', startedAt: null, finishedAt: null, ...extra })
const viewer: Identity = { tenant: 't1', user: 'u', roles: ['viewer'], zone: 'public', expiresAt: Infinity }
const def: EventDefinition = { name: 'runUpdated', topic: 'runs.updated', payload: { type: 'object', required: ['id'], properties: { id: { type: 'string' }, status: { type: 'string' } } }, payloadDocument: {}, roles: ['viewer'], zone: 'public', description: null }

t.test('the bus delivers an event to its tenant only, shaped by the event schema', async t => {
  const dropped: string[] = []
  const bus = new EventBus([def], true, 10, { delivered () {}, dropped: r => dropped.push(r), refused () {} })
  const got: Array<[string, unknown, string]> = []
  const offA = bus.subscribe('runUpdated', 'A', (payload, json) => got.push(['A', payload, json]))
  bus.subscribe('runUpdated', 'B', (payload) => got.push(['B', payload, '']))
  bus.dispatch({ topic: 'runs.updated', tenantId: 'A', payload: { id: 'r1', status: 'running', secret: 'x' } })
  t.same(got, [['A', { id: 'r1', status: 'running' }, '{"id":"r1","status":"running"}']])
  bus.dispatch({ topic: 'runs.updated', tenantId: 'C', payload: { id: 'r2' } })
  t.equal(got.length, 1, 'nobody of tenant C listens')
  bus.dispatch({ topic: 'other.topic', tenantId: 'A', payload: {} })
  bus.dispatch({ topic: 'runs.updated', tenantId: 'A', payload: { status: 'no id' } })
  t.same(dropped, ['unknown_topic', 'invalid'])
  t.equal(bus.subscriptions, 2)
  offA()
  offA()
  t.equal(bus.subscriptions, 1, 'unsubscribing twice is harmless')
  bus.dispatch({ topic: 'runs.updated', tenantId: 'A', payload: { id: 'r3' } })
  t.equal(got.length, 1)
})

t.test('the bus drops a payload nested more than 512 levels deep where its schema leaves it free', async t => {
  const dropped: string[] = []
  const free: EventDefinition = { ...def, name: 'blobChanged', topic: 'blobs', payload: { type: 'object', required: ['id'], properties: { id: { type: 'string' }, data: {} } } }
  const bus = new EventBus([def, free], true, 10, { delivered () {}, dropped: r => dropped.push(r), refused () {} })
  const got: string[] = []
  bus.subscribe('blobChanged', 'A', (_p, json) => got.push(json))
  bus.subscribe('runUpdated', 'A', (_p, json) => got.push(json))
  // n levels in all, the payload's own object counted: as a call's answer, well within what the
  // serializer writes (every face sent it), and GraphQL's subscriptions serialize it again deeper.
  const nested = (n: number): unknown => JSON.parse('['.repeat(n - 1) + ']'.repeat(n - 1))
  bus.dispatch({ topic: 'blobs', tenantId: 'A', payload: { id: 'b1', data: nested(513) } })
  bus.dispatch({ topic: 'blobs', tenantId: 'A', payload: { id: 'b2', data: nested(1000) } })
  t.same(got, [], 'not delivered')
  t.same(dropped, ['invalid', 'invalid'])
  bus.dispatch({ topic: 'blobs', tenantId: 'A', payload: { id: 'b3', data: nested(512) } })
  t.equal(got.length, 1, '512 levels are delivered')
  t.ok(got[0].startsWith('{"id":"b3","data":[['))
  // A schema that leaves nothing free drops what it does not declare, whatever its depth.
  bus.dispatch({ topic: 'runs.updated', tenantId: 'A', payload: { id: 'r1', deep: nested(1000) } })
  t.same(got.slice(1), ['{"id":"r1"}'])
})

t.test('subscriptions are authorized and bounded', async t => {
  const bus = new EventBus([def], true, 2)
  t.equal(bus.authorize('runUpdated', viewer).name, 'runUpdated')
  t.throws(() => bus.authorize('runUpdated', { ...viewer, roles: ['editor'] }), { code: 'FORBIDDEN' })
  t.throws(() => bus.authorize('nope', viewer), { code: 'NOT_FOUND' })
  t.throws(() => bus.subscribe('nope', 't', () => {}), { code: 'NOT_FOUND' })
  const open = new EventBus([def], false)
  t.equal(open.authorize('runUpdated', ANONYMOUS).name, 'runUpdated', 'no role check with identity off')
  // An event's zone, as an operation's: a token must reach it (public < internal < restricted).
  const zoned = new EventBus([{ ...def, name: 'internalRun', zone: 'internal' }, { ...def, name: 'restrictedRun', topic: 'runs.restricted', zone: 'restricted' }], true)
  t.throws(() => zoned.authorize('internalRun', viewer), { code: 'FORBIDDEN', message: 'internalRun is in the internal zone, beyond the caller\'s' })
  t.equal(zoned.authorize('internalRun', { ...viewer, zone: 'internal' }).name, 'internalRun')
  t.throws(() => zoned.authorize('restrictedRun', { ...viewer, zone: 'internal' }), { code: 'FORBIDDEN', message: 'restrictedRun is in the restricted zone, beyond the caller\'s' })
  t.equal(zoned.authorize('restrictedRun', { ...viewer, zone: 'restricted' }).name, 'restrictedRun')
  t.throws(() => zoned.authorize('internalRun', { ...viewer, zone: 'constructor' as 'public' }), { code: 'FORBIDDEN' }, 'a zone with no rank is below every zone')
  t.equal(new EventBus([{ ...def, zone: 'restricted' }], false).authorize('runUpdated', ANONYMOUS).name, 'runUpdated', 'no zone check with identity off')
  bus.subscribe('runUpdated', 't', () => {})
  bus.subscribe('runUpdated', 't', () => {})
  t.throws(() => bus.subscribe('runUpdated', 't', () => {}), { code: 'OVERLOADED' })
})

t.test('one tenant holds at most its share of the subscriptions; another still subscribes', async t => {
  const refused: string[] = []
  const bus = new EventBus([def], true, 5, { delivered () {}, dropped () {}, refused: bound => refused.push(bound) }, 2)
  const first = bus.subscribe('runUpdated', 'A', () => {})
  const second = bus.subscribe('runUpdated', 'A', () => {})
  t.throws(() => bus.subscribe('runUpdated', 'A', () => {}), { code: 'OVERLOADED', statusCode: 503, message: 'A tenant holds at most 2 event subscriptions on this instance', headers: { 'retry-after': '5' } })
  t.throws(() => bus.checkRoom('A'), { code: 'OVERLOADED' }, 'checkRoom refuses as subscribe does')
  t.equal(bus.subscriptionsOf('A'), 2)
  const got: string[] = []
  bus.subscribe('runUpdated', 'B', () => got.push('B'))
  bus.dispatch({ topic: 'runs.updated', tenantId: 'B', payload: { id: 'r1' } })
  t.same(got, ['B'], 'tenant B subscribes and receives while A is at its share')
  t.same(refused, ['tenant', 'tenant'])
  first()
  first()
  t.equal(bus.subscriptionsOf('A'), 1, 'an unsubscribe gives the tenant its room back, once')
  const third = bus.subscribe('runUpdated', 'A', () => {})
  second()
  third()
  t.equal(bus.subscriptionsOf('A'), 0)
  t.notOk((bus as unknown as { byTenant: Map<string, number> }).byTenant.has('A'), 'a tenant at zero leaves no entry')
  // The instance's bound still applies: 5 in all, from tenants within their share.
  bus.subscribe('runUpdated', 'B', () => {})
  for (const tenant of ['C', 'D', 'E']) bus.subscribe('runUpdated', tenant, () => {})
  t.equal(bus.subscriptions, 5)
  t.throws(() => bus.subscribe('runUpdated', 'F', () => {}), { code: 'OVERLOADED', message: 'Too many event subscriptions on this instance' })
  t.equal(refused.at(-1), 'instance')
  const noShare = new EventBus([def], true, 5)
  for (let i = 0; i < 5; i++) noShare.subscribe('runUpdated', 'A', () => {})
  t.equal(noShare.subscriptionsOf('A'), 5, 'no share by default: one tenant may hold the whole bound')
})

t.test('a stream yields events, ends on abort, and stays bounded for a slow consumer', async t => {
  const dropped: string[] = []
  const bus = new EventBus([def], true, 10, { delivered () {}, dropped: r => dropped.push(r), refused () {} })
  const controller = new AbortController()
  const iterator = bus.stream('runUpdated', 'A', controller.signal, 2)[Symbol.asyncIterator]()
  for (const id of ['1', '2', '3']) bus.dispatch({ topic: 'runs.updated', tenantId: 'A', payload: { id } })
  t.same(dropped, ['slow_consumer'], 'the oldest event was dropped')
  t.same(await iterator.next(), { done: false, value: { id: '2' } })
  t.same(await iterator.next(), { done: false, value: { id: '3' } })
  const pending = iterator.next()
  bus.dispatch({ topic: 'runs.updated', tenantId: 'A', payload: { id: '4' } })
  t.same(await pending, { done: false, value: { id: '4' } })
  const waiting = iterator.next()
  controller.abort()
  t.same(await waiting, { done: true, value: undefined })
  t.equal(bus.subscriptions, 0)
  const aborted = bus.stream('runUpdated', 'A', AbortSignal.abort())[Symbol.asyncIterator]()
  t.same(await aborted.next(), { done: true, value: undefined })
  const returned = bus.stream('runUpdated', 'A', new AbortController().signal)[Symbol.asyncIterator]()
  t.same(await returned.return!(), { done: true, value: undefined })
  t.equal(bus.subscriptions, 0)
})

t.test('a stream tells how far its consumer is behind in bytes, lost events included until it catches up', async t => {
  const bus = new EventBus([def], true, 10)
  let behind = 0
  const moves: number[] = []
  const controller = new AbortController()
  const iterator = bus.stream('runUpdated', 'A', controller.signal, 2, n => { behind += n; moves.push(n) })[Symbol.asyncIterator]()
  const size = Buffer.byteLength(JSON.stringify({ id: 'é1' }))
  for (const id of ['é1', 'é2', 'é3']) bus.dispatch({ topic: 'runs.updated', tenantId: 'A', payload: { id } })
  t.equal(behind, 3 * size, 'three events queued, one of them lost: still owed, in UTF-8 bytes')
  await iterator.next()
  t.equal(behind, 2 * size, 'one taken')
  await iterator.next()
  t.equal(behind, 0, 'caught up: the lost one is settled too')
  bus.dispatch({ topic: 'runs.updated', tenantId: 'A', payload: { id: 'é4' } })
  t.equal(behind, size)
  t.same(await iterator.return!(), { done: true, value: undefined })
  t.equal(behind, 0, 'an ended stream owes nothing')
  t.same(moves, [size, size, size, -size, -2 * size, size, -size])
})

t.test('isKernelEvent checks the envelope', async t => {
  t.ok(isKernelEvent({ topic: 'a', tenantId: 't', payload: null }))
  for (const bad of [null, 1, {}, { topic: '', tenantId: 't', payload: 1 }, { topic: 'a', tenantId: '', payload: 1 }, { topic: 'a', tenantId: 't' }]) t.notOk(isKernelEvent(bad))
})

t.test('POST /internal/events needs the internal token', async t => {
  const closed = await buildDemoApp(t)
  t.equal((await closed.inject({ method: 'POST', url: '/internal/events', payload: {} })).statusCode, 404, 'not served without BFF_INTERNAL_TOKEN')
  const token = 'internal-token-0123456789'
  const app = await buildDemoApp(t, { BFF_INTERNAL_TOKEN: token })
  const got: unknown[] = []
  app.events.bus.subscribe('runUpdated', 'acme', payload => got.push(payload))
  const event = { topic: 'runs.updated', tenantId: 'acme', payload: run('r1') }
  for (const authorization of [undefined, 'Bearer wrong', `Bearer ${token}x`, token]) {
    const res = await app.inject({ method: 'POST', url: '/internal/events', headers: authorization === undefined ? {} : { authorization }, payload: event })
    t.equal(res.statusCode, 401)
    t.match(res.json(), { code: 'UNAUTHENTICATED' })
  }
  const bad = await app.inject({ method: 'POST', url: '/internal/events', headers: { authorization: `Bearer ${token}` }, payload: { topic: 'runs.updated' } })
  t.equal(bad.statusCode, 400)
  const ok = await app.inject({ method: 'POST', url: '/internal/events', headers: { authorization: `Bearer ${token}` }, payload: event })
  t.equal(ok.statusCode, 202)
  t.same(ok.json(), { accepted: true })
  t.match(got, [{ id: 'r1', status: 'running' }])
  const metrics = await app.inject({ method: 'GET', url: '/metrics' })
  t.match(metrics.body, /mantle_events_published_total\{source="memory"\} 1/)
  t.match(metrics.body, /mantle_events_delivered_total\{event="runUpdated"\} 1/)
  t.match(metrics.body, /mantle_event_subscriptions 1/)
})

t.test('POST /internal/events refuses a payload nested deeper than 512 levels, with Redis or without, and nothing else changes', async t => {
  // A Redis of the test's own: the event must not reach other sessions' gateways on the shared one.
  const redis = await startRedisServer(t)
  const token = 'internal-token-0123456789'
  // As text: light-my-request's JSON.stringify of such an object overflows the test's own stack.
  const event = (payload: string): string => `{"topic":"runs.updated","tenantId":"acme","payload":${payload}}`
  const nested = (depth: number): string => '{"id":"r1","deep":' + '['.repeat(depth - 1) + ']'.repeat(depth - 1) + '}'
  const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' }
  for (const env of [{}, { REDIS_URL: redis.url }]) {
    const app = await buildDemoApp(t, { BFF_INTERNAL_TOKEN: token, ...env })
    const store = env.REDIS_URL === undefined ? 'memory' : 'redis'
    if (store === 'redis') await until(() => app.events.health().up, 'the Redis subscriber')
    const got: string[] = []
    app.events.bus.subscribe('runUpdated', 'acme', (_p, json) => got.push(json))
    for (const depth of [5_000, 100_000]) {
      const res = await app.inject({ method: 'POST', url: '/internal/events', headers, payload: event(nested(depth)) })
      t.equal(res.statusCode, 400, `${store}: ${depth} levels`)
      t.match(res.json(), { code: 'VALIDATION_FAILED', detail: 'body.payload nests objects and arrays more than 512 levels deep' })
    }
    const ok = await app.inject({ method: 'POST', url: '/internal/events', headers, payload: event(JSON.stringify(run('r2')).slice(0, -1) + ',"deep":' + '['.repeat(511) + ']'.repeat(511) + '}') })
    t.equal(ok.statusCode, 202, `${store}: 512 levels are accepted`)
    await until(() => got.length === 1, 'the event of 512 levels')
    t.same(got, [JSON.stringify(run('r2'))], `${store}: delivered, shaped by its schema`)
  }
})

t.test('two instances sharing Redis: an event published once reaches both, and only its tenant', async t => {
  const tenant = 'tenant-' + randomUUID()
  const token = 'internal-token-0123456789'
  const one = await buildDemoApp(t, { REDIS_URL, BFF_INTERNAL_TOKEN: token })
  const two = await buildDemoApp(t, { REDIS_URL })
  await until(() => one.events.health().up && two.events.health().up, 'both Redis subscribers')
  const got: string[] = []
  one.events.bus.subscribe('runUpdated', tenant, (_p, json) => got.push('one ' + json))
  two.events.bus.subscribe('runUpdated', tenant, (_p, json) => got.push('two ' + json))
  two.events.bus.subscribe('runUpdated', tenant + '-other', () => got.push('other tenant'))
  const res = await one.inject({ method: 'POST', url: '/internal/events', headers: { authorization: `Bearer ${token}` }, payload: { topic: 'runs.updated', tenantId: tenant, payload: run('r9') } })
  t.equal(res.statusCode, 202)
  await until(() => got.length >= 2, 'both deliveries')
  await sleep(50)
  t.same(got.sort(), [`one ${JSON.stringify(run('r9'))}`, `two ${JSON.stringify(run('r9'))}`])
  const ready = await two.inject({ method: 'GET', url: '/readyz' })
  t.equal(ready.statusCode, 200)
  t.equal(ready.json().checks.redis, 'up')
})

t.test('a Redis that is down at start-up leaves the gateway up, degraded and saying so', async t => {
  const port = await closedPort()
  const app = await buildDemoApp(t, { REDIS_URL: redisVia(port) })
  const ready = await app.inject({ method: 'GET', url: '/readyz' })
  t.equal(ready.statusCode, 503)
  t.match(ready.json(), { status: 'not-ready', failing: ['redis'], checks: { redis: 'down' } })
  const got: unknown[] = []
  app.events.bus.subscribe('runUpdated', 't1', p => got.push(p))
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('r1') })
  t.equal(got.length, 1, 'delivered on this instance')
  const call = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  t.equal(call.statusCode, 200, 'calls are not affected')
})

/**
 * A TCP proxy to the test Redis that refuses new connections while `refusing`, and can drop
 * the connections that sent a SUBSCRIBE alone (the events subscriber), keeping the publisher's.
 */
/**
 * A proxy in front of Redis that can refuse new connections, drop the subscriber's, or freeze
 * those open now (they stay open and pass nothing, as a Redis that hangs or a half-open flow).
 */
async function redisProxy (t: { teardown: (fn: () => unknown) => void }): Promise<{ url: string, refusing: boolean, delayMs: number, subscriberDelayMs: number, othersDelayMs: number, subscribes: number, dropSubscriber: () => void, dropOthers: () => void, freeze: () => void }> {
  const target = new URL(REDIS_URL)
  const [host, port] = [target.hostname, Number(target.port || 6379)]
  const pairs = new Set<{ client: Socket, upstream: Socket, subscriber: boolean, frozen: boolean }>()
  const state = {
    url: '',
    refusing: false,
    /** Redis's answers reach the gateway this much later. */
    delayMs: 0,
    /** Redis's answers reach the subscriber's connection (once it has subscribed) this much later still. */
    subscriberDelayMs: 0,
    /** Redis's answers reach the other connections (not the subscribers') this much later still. */
    othersDelayMs: 0,
    /** Chunks sent that carry a SUBSCRIBE of bff:events. */
    subscribes: 0,
    dropSubscriber () { for (const p of pairs) if (p.subscriber) p.client.destroy() },
    dropOthers () { for (const p of pairs) if (!p.subscriber) p.client.destroy() },
    freeze () { for (const p of pairs) p.frozen = true }
  }
  const server = createServer(client => {
    if (state.refusing) { client.resetAndDestroy(); return }
    const pair = { client, upstream: connect(port, host), subscriber: false, frozen: false }
    pairs.add(pair)
    client.on('data', (chunk: Buffer) => {
      if (chunk.includes('subscribe')) { pair.subscriber = true; if (chunk.includes('bff:events')) state.subscribes++ }
      if (!pair.frozen) pair.upstream.write(chunk)
    })
    pair.upstream.on('data', (chunk: Buffer) => {
      if (pair.frozen) return
      const delay = state.delayMs + (pair.subscriber ? state.subscriberDelayMs : state.othersDelayMs)
      if (delay === 0) client.write(chunk)
      else setTimeout(() => { if (!client.destroyed) client.write(chunk) }, delay)
    })
    for (const s of [client, pair.upstream]) s.on('error', () => s.destroy()).on('close', () => { pairs.delete(pair); client.destroy(); pair.upstream.destroy() })
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const p of pairs) p.client.destroy()
    await new Promise(resolve => server.close(resolve))
  })
  target.host = `127.0.0.1:${(server.address() as AddressInfo).port}`
  state.url = target.toString()
  return state
}

/** A gateway on Redis through redisProxy, subscribed (up), and the ids of a fresh tenant's events it delivers. */
async function subscribedThroughProxy (t: { teardown: (fn: () => unknown) => void }, events: { probeIntervalMs?: number, maxPublishing?: number } = {}) {
  const tenant = 'tenant-' + randomUUID()
  const proxy = await redisProxy(t)
  const app = await buildDemoApp(t, { REDIS_URL: proxy.url }, { events })
  await until(() => app.events.health().up, 'the Redis subscriber')
  const got: string[] = []
  app.events.bus.subscribe('runUpdated', tenant, p => got.push((p as { id: string }).id))
  return { tenant, proxy, app, got }
}

// Before, the subscriber subscribed only after a first connect() that succeeded: with Redis down
// at start-up it reconnected later but never subscribed, while 'ready' alone made it say up. The
// instance then got no event at all, not even its own (they went to Redis), and /readyz said up.
t.test('a Redis that is down at start-up and comes back is subscribed to, and only then up', async t => {
  const tenant = 'tenant-' + randomUUID()
  const proxy = await redisProxy(t)
  proxy.refusing = true
  const app = await buildDemoApp(t, { REDIS_URL: proxy.url })
  t.equal(app.events.health().up, false)
  proxy.refusing = false
  await until(() => app.events.health().up, 'the Redis subscriber', 10000)
  const got: string[] = []
  app.events.bus.subscribe('runUpdated', tenant, p => got.push((p as { id: string }).id))
  const other = new Redis(REDIS_URL)
  t.teardown(() => other.disconnect())
  await other.publish('bff:events', JSON.stringify({ topic: 'runs.updated', tenantId: tenant, payload: run('from-redis') }))
  await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('own') })
  await until(() => got.length >= 2, 'both events', 2000)
  await sleep(50)
  // In either order: the publisher reconnects on its own schedule, and while it is not ready yet
  // the instance's own event is delivered here at once, before the other's arrives from Redis.
  t.same([...got].sort(), ['from-redis', 'own'], 'each event once')
})

// Before, with only the subscriber down (the publisher up), this instance's own events went to
// Redis and never came back: its local subscribers got nothing, unlike with Redis wholly down.
t.test('while only the subscriber is down, own events still reach local subscribers, once', async t => {
  const { tenant, proxy, app, got } = await subscribedThroughProxy(t)
  proxy.refusing = true
  proxy.dropSubscriber()
  await until(() => !app.events.health().up, 'the subscriber to drop')
  await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('while-down') })
  t.same(got, ['while-down'], 'delivered here though the publisher reached Redis')
  proxy.refusing = false
  await until(() => app.events.health().up, 'the subscriber to be back', 10000)
  await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('back') })
  await until(() => got.length >= 2, 'the event through Redis', 2000)
  await sleep(50)
  t.same(got, ['while-down', 'back'], 'through Redis again, not twice')
})

// Before, an event published while the subscriber's SUBSCRIBE had reached Redis but its answer
// had not been read yet was delivered here (not subscribed yet) and again when it came back from
// Redis on the subscriber: twice, where delivery is at most once.
t.test('an event published while the subscriber\'s SUBSCRIBE awaits its answer is delivered here once', async t => {
  const { tenant, proxy, app, got } = await subscribedThroughProxy(t)
  proxy.subscriberDelayMs = 300
  const subscribes = proxy.subscribes
  proxy.dropSubscriber()
  await until(() => !app.events.health().up, 'the subscriber to drop')
  await until(() => proxy.subscribes > subscribes, 'the new SUBSCRIBE', 10000)
  // Redis has it; its answer is on its way.
  await sleep(50)
  t.equal(app.events.health().up, false, 'not subscribed yet as far as the gateway knows')
  await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('meanwhile') })
  t.same(got, ['meanwhile'], 'delivered here at once')
  await until(() => app.events.health().up, 'the SUBSCRIBE\'s answer', 5000)
  // The echo follows the answer on the same connection.
  await sleep(300)
  t.same(got, ['meanwhile'], 'not again when it comes back from Redis')
  t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_events_dropped_total\{reason="duplicate"\} 1\n/)
})

t.test('the demo Kernel publishes run changes into the gateway', async t => {
  const started = await start(testConfig({ PORT: 0 }))
  t.teardown(() => started.close())
  const got: Array<{ id: string, status: string }> = []
  started.app.events.bus.subscribe('runUpdated', 'demo-events', p => got.push(p as { id: string, status: string }))
  const res = await fetch(`${started.url}/api/v1/agents/a1/runs`, { method: 'POST', headers: { ...bearer({ tenant: 'demo-events' }), 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'hello there' }) })
  t.equal(res.status, 201)
  const { id } = await res.json() as { id: string }
  await until(() => got.some(e => e.status === 'succeeded'), 'the run to succeed')
  t.ok(got.every(e => e.id === id))
  t.same(got.map(e => e.status).filter((s, i, all) => all.indexOf(s) === i), ['queued', 'running', 'succeeded'])
})

// Before, the events connections had no command timeout: with Redis frozen (or a flow left
// half-open by a failover) every publish waited for ever and reached no one, each queued in
// memory, and the subscriber stayed "up" (so /readyz said redis up) while no event came.
t.test('a Redis that stops answering: publishes are delivered here at once, and the subscriber reconnects', async t => {
  const { tenant, proxy, app, got } = await subscribedThroughProxy(t, { probeIntervalMs: 100 })
  // Another instance's view of Redis, from before the freeze: whatever reaches Redis is seen.
  const other = new Redis(REDIS_URL)
  const watcher = new Redis(REDIS_URL)
  t.teardown(() => { other.disconnect(); watcher.disconnect() })
  const seen: string[] = []
  watcher.on('message', (_c: string, text: string) => { seen.push((JSON.parse(text) as { payload: { id: string } }).payload.id) })
  await watcher.subscribe('bff:events')
  proxy.freeze()
  const started = Date.now()
  await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('frozen') })
  t.ok(Date.now() - started < 3000, `the publish gave up on Redis in ${Date.now() - started} ms`)
  t.same(got, ['frozen'], 'and delivered the event here')
  // The probe finds the subscriber silent, drops it, and a new connection (the proxy passes new
  // ones) subscribes again.
  await until(() => !app.events.health().up, 'the silent subscriber to be noticed', 5000)
  await until(() => app.events.health().up, 'a new subscriber', 10000)
  // The same event as the one whose publish timed out (it never reached Redis): no echo of it,
  // and delivered. Remembered by its text, it was dropped here as a duplicate.
  await other.publish('bff:events', JSON.stringify({ topic: 'runs.updated', tenantId: tenant, payload: run('frozen') }))
  await until(() => got.length >= 2, 'an event from Redis', 3000)
  // The publisher's silent connection was dropped too: its events reach Redis again.
  await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('again') })
  await until(() => got.length >= 3, 'the event through Redis', 3000)
  t.same(got, ['frozen', 'frozen', 'again'])
  t.same(seen, ['frozen', 'again'], 'through Redis, for the other instances')
})

// A publish that times out is delivered here; Redis may still have taken it, and then it came
// back on the subscriber too: a Redis slower than the timeout delivered events here twice.
t.test('a Redis slower than the publish timeout: the event is delivered here once', async t => {
  // No probe meanwhile: its PING would time out too, and drop the subscriber with the echo.
  const { tenant, proxy, app, got } = await subscribedThroughProxy(t, { probeIntervalMs: 60_000 })
  proxy.delayMs = 1500
  // Two events alike, published at once: each is its own (remembered by text, the second echo
  // was delivered again: three in all).
  const event = { topic: 'runs.updated', tenantId: tenant, payload: run('once') }
  await Promise.all([app.events.publish(event), app.events.publish(event)])
  t.same(got, ['once', 'once'], 'delivered here when the publishes timed out')
  await sleep(1200)
  t.same(got, ['once', 'once'], 'and not again when Redis sent them back')
  t.match((await app.inject({ url: '/metrics' })).body, /mantle_events_dropped_total\{reason="duplicate"\} 2\n/)
})

// The echoes are remembered for a time (30 s), not until a time of day: on the wall clock, one
// stepped forward (an NTP correction) between a publish's timeout and its echo forgot the echo,
// and the event was delivered here twice.
t.test('a wall clock stepped forward before the echo comes back: the event is still delivered here once', async t => {
  const { tenant, proxy, app, got } = await subscribedThroughProxy(t, { probeIntervalMs: 60_000 })
  proxy.delayMs = 1500
  await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('stepped') })
  t.same(got, ['stepped'], 'delivered here when the publish timed out')
  const now = Date.now
  Date.now = () => now() + 60_000
  t.teardown(() => { Date.now = now })
  // Until the echo is back from Redis (dropped as this instance's own), not a fixed wait: an echo
  // later than the wait (a loaded machine) left nothing to check, and the test passed whatever
  // the clock did. Timed by performance.now(): Date.now is the stepped one.
  const duplicate = /mantle_events_dropped_total\{reason="duplicate"\} 1\n/
  const deadline = performance.now() + 5000
  while (!duplicate.test((await app.inject({ url: '/metrics' })).body) && performance.now() < deadline) await sleep(50)
  t.same(got, ['stepped'], 'and not again when Redis sent it back')
  t.match((await app.inject({ url: '/metrics' })).body, duplicate, 'the echo came back, and was dropped')
})

// The publishes waiting for Redis had no bound and no metric (nor had the echoes remembered once
// they timed out): a Redis answering late let them pile up unseen.
t.test('publishes waiting for Redis are bounded and counted, and so are the echoes remembered', async t => {
  const { tenant, proxy, app, got } = await subscribedThroughProxy(t, { probeIntervalMs: 60_000, maxPublishing: 2 })
  proxy.delayMs = 1500
  const event = { topic: 'runs.updated', tenantId: tenant, payload: run('slow') }
  const waiting = [app.events.publish(event), app.events.publish(event)]
  const refused = await app.events.publish(event).then(() => null, (err: unknown) => err)
  t.match(refused, { code: 'OVERLOADED', headers: { 'retry-after': '1' } }, 'a third publish is refused while two wait')
  // Read from the registry, not scraped: at once, well within the 1 s the publishes wait.
  const value = async (name: string) => (await app.metrics.registry.getSingleMetric(name)?.get())?.values[0]?.value
  t.equal(await value('mantle_events_publishing'), 2, 'the two waiting')
  t.equal(await value('mantle_events_publishes_refused_total'), 1, 'the refusal counted')
  await Promise.all(waiting)
  t.same(got, ['slow', 'slow'], 'the two delivered here when they timed out')
  const after = (await app.inject({ url: '/metrics' })).body
  t.match(after, /mantle_events_publishing 0\n/, 'none waiting any more')
  t.match(after, /mantle_events_uncertain 2\n/, 'their echoes remembered')
})

// A publish whose answer is late (the publisher's flow half-open, or slow) may have reached Redis
// and come back on the subscriber before the publish timed out: it was delivered then, and again
// here when the publish timed out (only an echo after the timeout was recognised).
t.test('a publish that times out after its event came back from Redis is not delivered again', async t => {
  const { tenant, proxy, app, got } = await subscribedThroughProxy(t, { probeIntervalMs: 60_000 })
  proxy.othersDelayMs = 2000
  const published = app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('late') })
  await until(() => got.length === 1, 'the event through Redis', 900)
  await published
  t.same(got, ['late'], 'not delivered again when its publish timed out')
})

t.test('an event whose publish failed at once (Redis away) is no duplicate of a later one', async t => {
  // Only a publish that timed out may have reached Redis. Before, every failed publish was
  // remembered, and the next identical event from Redis (another instance's, the Kernel's) was
  // dropped here as its duplicate, however late.
  const { tenant, proxy, app, got } = await subscribedThroughProxy(t, { probeIntervalMs: 60_000 })
  proxy.refusing = true
  proxy.dropOthers()
  await sleep(100)
  const event = { topic: 'runs.updated', tenantId: tenant, payload: run('r1') }
  await app.events.publish(event)
  t.same(got, ['r1'], 'delivered here, the publisher being away')
  const other = new Redis(REDIS_URL)
  t.teardown(() => other.disconnect())
  await other.publish('bff:events', JSON.stringify(event))
  await until(() => got.length >= 2, 'the same event again, from Redis', 3000)
  t.same(got, ['r1', 'r1'])
  t.notMatch((await app.inject({ url: '/metrics' })).body, /mantle_events_dropped_total\{reason="duplicate"\}/)
})

// The publishing connection away for good while the subscriber stays (Redis at maxclients for
// new connections, a path to it that stays broken): every event posted to this instance reached
// its own subscribers only, never another instance's, while /readyz said ready (the load
// balancer kept sending it the Kernel's events) and /diagz said the events store was healthy.
t.test('a publisher that cannot get back to Redis: /readyz fails redis, while the subscriber is up', async t => {
  const tenant = 'tenant-' + randomUUID()
  const token = 'internal-token-0123456789'
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379))
  const app = await buildDemoApp(t, { REDIS_URL: redisVia(proxy.port), BFF_INTERNAL_TOKEN: token })
  const other = await buildDemoApp(t, { REDIS_URL })
  await until(() => app.events.health().up && other.events.health().up, 'both Redis subscribers')
  t.equal((await app.inject({ method: 'GET', url: '/readyz' })).statusCode, 200)
  const got: string[] = []
  other.events.bus.subscribe('runUpdated', tenant, p => got.push((p as { id: string }).id))
  // The publisher's connection, and each one it makes again, gets nothing more from Redis.
  proxy.deafen(sent => sent.includes('mantle-events-pub'), true)
  const post = async (id: string): Promise<number> => (await app.inject({ method: 'POST', url: '/internal/events', headers: { authorization: `Bearer ${token}` }, payload: { topic: 'runs.updated', tenantId: tenant, payload: run(id) } })).statusCode
  // The first publish reaches Redis but its answer does not come: it times out, and the
  // publisher's connection is made anew, never ready again.
  t.equal(await post('first'), 202)
  await sleep(300)
  t.equal(await post('lost'), 202, 'accepted (delivered on this instance only)')
  await sleep(300)
  t.notOk(got.includes('lost'), 'the other instance did not get it')
  const ready = await app.inject({ method: 'GET', url: '/readyz' })
  t.equal(ready.statusCode, 503, 'not ready')
  t.match(ready.json(), { failing: ['redis'] })
  t.ok(app.redis.up(), 'though the shared connection is up')
  proxy.restore()
  await until(() => app.events.health().up, 'the publisher back', 10_000)
  t.equal((await app.inject({ method: 'GET', url: '/readyz' })).statusCode, 200, 'ready again')
  t.equal(await post('through'), 202)
  await until(() => got.includes('through'), 'the other instance gets the next one', 3000)
  t.notOk(got.includes('lost'))
})
