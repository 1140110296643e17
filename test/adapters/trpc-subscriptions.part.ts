import t from 'tap'
import { connect, type AddressInfo, type Socket } from 'node:net'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { FastifyInstance } from 'fastify'
import { createSigner } from 'fast-jwt'
import { EventSource } from 'eventsource'
import WebSocket from 'ws'
import { createTRPCUntypedClient, createWSClient, httpLink, httpSubscriptionLink, wsLink, TRPCClientError } from '@trpc/client'
import type { AnyTRPCRouter } from '@trpc/server'
import { buildApp } from '../../app.js'
import { createTrpcFace, type TrpcFaceSettings } from '../../adapters/trpc/index.js'
import type { FaceOptions } from '../../adapters/face.js'
import { startKernel } from '../../kernel/server.js'
import { buildDemoApp, buildTestApp, startTestKernel, testConfig, testManifest, bearer, token, json, SECRET, readUntil } from '../helper.js'

type Headers = Record<string, string>
type ClientError = TRPCClientError<AnyTRPCRouter>
interface Teardown { teardown: (fn: () => unknown) => void }

const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

async function until (what: string, check: () => boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await sleep(5)
  }
}

async function listen (app: FastifyInstance): Promise<number> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return (app.server.address() as AddressInfo).port
}

function run (id: string, status = 'running', extra: Record<string, unknown> = {}): Record<string, unknown> {
  const now = new Date().toISOString()
  return { id, agentId: 'a1', status, temperature: 0.7, promptChars: 5, output: null, error: null, createdAt: now, updatedAt: now, startedAt: null, finishedAt: null, ...extra }
}

/** What one subscription saw. */
interface Seen { data: Array<Record<string, unknown>>, errors: ClientError[], started: boolean, stopped: boolean, unsubscribe: () => void }

type SubscribeClient = ReturnType<typeof createTRPCUntypedClient<AnyTRPCRouter>>

function watch (client: SubscribeClient, t: Teardown, name = 'runUpdated'): Seen {
  const seen: Seen = { data: [], errors: [], started: false, stopped: false, unsubscribe: () => {} }
  const sub = client.subscription(name, undefined, {
    onStarted: () => { seen.started = true },
    onData: (d: unknown) => { seen.data.push(d as Record<string, unknown>) },
    onError: (err: unknown) => { seen.errors.push(err as ClientError) },
    onStopped: () => { seen.stopped = true },
    onComplete: () => { seen.stopped = true }
  })
  seen.unsubscribe = () => sub.unsubscribe()
  t.teardown(() => sub.unsubscribe())
  return seen
}

/** A tRPC client over SSE (EventSource from `eventsource`, which can send headers). */
function sse (port: number, opts: { headers?: Headers, connectionParams?: Headers } = {}): SubscribeClient {
  return createTRPCUntypedClient({
    links: [httpSubscriptionLink({
      url: `http://127.0.0.1:${port}/trpc`,
      EventSource,
      ...(opts.connectionParams === undefined ? {} : { connectionParams: opts.connectionParams }),
      eventSourceOptions: {
        fetch: async (input, init) => await fetch(input, { ...init, headers: { ...init?.headers as Headers, ...opts.headers } })
      }
    })]
  })
}

/** A tRPC client over WebSocket at /trpc; closed at teardown. */
function ws (t: Teardown, port: number, connectionParams: Headers | null, query = ''): { client: SubscribeClient, close: () => Promise<void> } {
  const socket = createWSClient({
    url: `ws://127.0.0.1:${port}/trpc${query}`,
    WebSocket: WebSocket as unknown as typeof globalThis.WebSocket,
    ...(connectionParams === null ? {} : { connectionParams }),
    retryDelayMs: () => 60_000
  })
  const close = async (): Promise<void> => { await socket.close() }
  t.teardown(close)
  return { client: createTRPCUntypedClient({ links: [wsLink({ client: socket })] }), close }
}

/** A raw WebSocket, for what the tRPC client hides: close codes, messages as sent. */
async function rawSocket (t: Teardown, port: number, path: string, headers: Headers = {}): Promise<{ socket: WebSocket, messages: unknown[], closed: Promise<number> }> {
  const socket = new WebSocket(`ws://127.0.0.1:${port}${path}`, { headers })
  t.teardown(() => socket.terminate())
  const messages: unknown[] = []
  socket.on('message', (data: Buffer) => messages.push(JSON.parse(data.toString())))
  const closed = new Promise<number>(resolve => socket.on('close', (code: number) => resolve(code)))
  await new Promise<void>((resolve, reject) => { socket.once('open', resolve); socket.once('error', reject) })
  return { socket, messages, closed }
}

/** The gateway with a tRPC face of the given bounds, registered by the test (the app's own is off). */
async function buildWithSettings (t: Teardown, settings: Partial<TrpcFaceSettings>, env: Record<string, string | number | boolean> = {}, kernelUrl?: string): Promise<FastifyInstance> {
  const config = testConfig({ BFF_TRPC_ENABLED: false, ...env })
  const app = await buildApp(config, { logger: false, ...(kernelUrl === undefined ? {} : { kernelUrl }) })
  t.teardown(() => app.close())
  const face: FaceOptions = { bodyLimit: config.BFF_BODY_LIMIT, maxCalls: config.BFF_BATCH_MAX_CALLS, maxDepth: 12, secured: true, development: false }
  await app.register(createTrpcFace(settings), face)
  await app.ready()
  return app
}

t.test('SSE: a subscription receives its tenant\'s events, shaped by the event schema', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const mine = watch(sse(port, { headers: bearer({ tenant: 't1', roles: ['viewer'] }) }), t)
  const other = watch(sse(port, { headers: bearer({ tenant: 't2', roles: ['viewer'] }) }), t)
  await until('both subscriptions', () => app.events.bus.subscriptions === 2)
  t.ok(mine.started)

  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('r1', 'running', { prompt: 'secret', ownerTenant: 't1' }) })
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('r1', 'succeeded', { output: 'done' }) })
  await until('two events', () => mine.data.length === 2)
  t.match(mine.data, [{ id: 'r1', status: 'running' }, { id: 'r1', status: 'succeeded', output: 'done' }])
  t.notOk('prompt' in mine.data[0], 'a field the event schema does not declare never reaches the client')
  t.notOk('ownerTenant' in mine.data[0])

  // Events are delivered in order: once t2's own event is there, t1's would have been too.
  await app.events.publish({ topic: 'runs.updated', tenantId: 't2', payload: run('r9') })
  await until('t2 event', () => other.data.length === 1)
  t.match(other.data, [{ id: 'r9' }], 'the other tenant received only its own event')
  t.equal(mine.data.length, 2)
  t.same(mine.errors, [])

  mine.unsubscribe()
  other.unsubscribe()
  await until('unsubscribed on the bus', () => app.events.bus.subscriptions === 0)
})

t.test('SSE: the token may come in connectionParams; refusals are the subscription\'s error', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const viaParams = watch(sse(port, { connectionParams: { token: token({ tenant: 't3', roles: ['viewer'] }) } }), t)
  await until('subscribed', () => app.events.bus.subscriptions === 1)
  await app.events.publish({ topic: 'runs.updated', tenantId: 't3', payload: run('r3') })
  await until('event', () => viaParams.data.length === 1)
  viaParams.unsubscribe()

  const noRole = watch(sse(port, { headers: bearer({ roles: ['editor'] }) }), t)
  await until('refusal', () => noRole.errors.length === 1)
  t.match(noRole.errors[0].data, { code: 'FORBIDDEN', httpStatus: 403, requestId: String })
  t.equal(noRole.errors[0].message, 'runUpdated needs one of the roles: viewer')
  t.equal(noRole.errors[0].shape?.code, -32003)

  const anonymous = watch(sse(port), t)
  await until('refusal', () => anonymous.errors.length === 1)
  t.match(anonymous.errors[0].data, { code: 'UNAUTHENTICATED', httpStatus: 401 })
  t.equal(anonymous.errors[0].shape?.code, -32001)
  const forged = watch(sse(port, { headers: { authorization: `Bearer ${token({ secret: 'another-secret-of-sufficient-length-000000' })}` } }), t)
  await until('refusal', () => forged.errors.length === 1)
  t.match(forged.errors[0].data, { code: 'UNAUTHENTICATED' })
  await until('nothing left on the bus', () => app.events.bus.subscriptions === 0)

  // An unknown subscription is a plain 404 (EventSource then gives up on it).
  const unknown = watch(sse(port, { headers: bearer() }), t, 'noSuchEvent')
  await until('refusal', () => unknown.errors.length === 1)
  const raw = await app.inject({ method: 'GET', url: '/trpc/noSuchEvent', headers: { ...bearer(), accept: 'text/event-stream' } })
  t.equal(raw.statusCode, 404)
  t.match(raw.json(), { error: { data: { code: 'NOT_FOUND', httpStatus: 404 } } })
})

t.test('SSE: a subscription refused because the instance holds its most subscriptions carries Retry-After, as every refusal', async t => {
  const app = await buildDemoApp(t, {}, { events: { maxSubscriptions: 1 } })
  const port = await listen(app)
  const first = watch(sse(port, { headers: bearer({ roles: ['viewer'] }) }), t)
  await until('the first subscription', () => first.started && app.events.bus.subscriptions === 1)
  const controller = new AbortController()
  t.teardown(() => controller.abort())
  const res = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated`, { headers: { ...bearer({ roles: ['viewer'] }), accept: 'text/event-stream' }, signal: controller.signal })
  // A 200 stream whose one event is the error, which is what httpSubscriptionLink reads.
  t.equal(res.status, 200)
  // Before, the bus refused it at the stream's first pull, the headers already sent: none.
  t.equal(res.headers.get('retry-after'), '5', 'the refusal\'s wait on the response')
  t.equal(res.headers.get('www-authenticate'), null)
  const text = await readUntil(res, 'serialized-error')
  t.match(text, /"code":"OVERLOADED","httpStatus":503,.*"retryAfter":5/)
})

t.test('SSE: a subscription ends with UNAUTHENTICATED when its token expires', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  // Expired 3 s ago, inside the 5 s clock tolerance: valid for 2 to 3 more seconds.
  const exp = Math.ceil(Date.now() / 1000) - 3
  const almost = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 't1', roles: ['viewer'], exp })
  const seen = watch(sse(port, { headers: { authorization: `Bearer ${almost}` } }), t)
  await until('subscribed', () => app.events.bus.subscriptions === 1)
  await until('expiry', () => seen.errors.length === 1, 6000)
  t.match(seen.errors[0].data, { code: 'UNAUTHENTICATED', httpStatus: 401 })
  t.match(seen.errors[0].message, /expired/)
  await until('unsubscribed on the bus', () => app.events.bus.subscriptions === 0)
})

// Before, the stream simply ended at shutdown: httpSubscriptionLink took it as complete and
// never reconnected, so every browser subscribed over SSE stopped getting events at a deploy.
t.test('SSE: shutting down ends open subscriptions promptly, and clients subscribe again to the next instance', async t => {
  const kernel = await startKernel({ port: 0, runDelayMs: 5 })
  t.teardown(() => kernel.close())
  const app = await buildTestApp(t, {}, { kernelUrl: kernel.url })
  const port = await listen(app)
  const seen = watch(sse(port, { headers: bearer({ tenant: 't-deploy' }) }), t)
  await until('subscribed', () => app.events.bus.subscriptions === 1)
  const started = Date.now()
  await app.close()
  t.ok(Date.now() - started < 2000, 'closed promptly')
  t.equal(app.events.bus.subscriptions, 0)
  t.notOk(seen.stopped, 'not complete: the client goes on')
  const next = await buildTestApp(t, {}, { kernelUrl: kernel.url })
  await next.listen({ port, host: '127.0.0.1' })
  await until('subscribed again, to the next instance', () => next.events.bus.subscriptions === 1, 10_000)
  await next.events.publish({ topic: 'runs.updated', tenantId: 't-deploy', payload: run('after') })
  await until('the event from the next instance', () => seen.data.length === 1)
  t.match(seen.data, [{ id: 'after' }])
})

/** An SSE subscription on a socket of its own, which reads the response's head and nothing after it. */
async function stalledSse (t: Teardown, port: number, tenant: string): Promise<Socket> {
  const socket = connect(port, '127.0.0.1', () => {
    socket.write(`GET /trpc/runUpdated HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer ${token({ tenant, roles: ['viewer'] })}\r\n\r\n`)
  })
  socket.on('error', () => {})
  t.teardown(() => socket.destroy())
  await new Promise<void>(resolve => socket.once('data', () => { socket.pause(); resolve() }))
  return socket
}

// tRPC's SSE ping asks for a subscription's next event before it hands on the one it holds, and
// looks at that promise only when its reader pulls again, which it never does while the client
// reads nothing. A subscription that ended then with its error (shutting down here; a token that
// expired, a key withdrawn, alike) rejected a promise no one held: an unhandled rejection, which
// close-with-grace answers by shutting the instance down. Each tenant's client stalls at another
// point (a large event fills its socket, then 0 to 5 small ones): one of them stalls tRPC there.
t.test('SSE: a subscription that ends while its client reads nothing is no unhandled rejection', async t => {
  const app = await buildTestApp(t, { BFF_WEBSOCKET_ENABLED: false })
  const port = await listen(app)
  const unhandled: unknown[] = []
  const onUnhandled = (reason: unknown): void => { unhandled.push(reason) }
  process.on('unhandledRejection', onUnhandled)
  t.teardown(() => { process.off('unhandledRejection', onUnhandled) })
  const tenants = [0, 1, 2, 3, 4, 5].map(i => `stalled-${i}`)
  const sockets = []
  for (const tenant of tenants) sockets.push(await stalledSse(t, port, tenant))
  await until('subscribed', () => app.events.bus.subscriptions === tenants.length)
  // 8 MiB: more than a socket on loopback takes unread (4 MiB of send buffer, the peer's receive window).
  const big = 'x'.repeat(8 * 1024 * 1024)
  for (const [i, tenant] of tenants.entries()) {
    await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('big', 'running', { output: big }) })
    await sleep(100)
    for (let n = 0; n < i; n++) {
      await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run(`small-${n}`) })
      await sleep(20)
    }
  }
  await sleep(200)
  const closed = app.close()
  await until('every subscription ended', () => app.events.bus.subscriptions === 0)
  await sleep(200)
  for (const socket of sockets) socket.destroy()
  await closed
  t.same(unhandled.map(err => (err as Error).message), [], 'no unhandled rejection')
})

// At shutdown an SSE stream ends with its error event, which a client that reads nothing never
// takes: the response was waited for as a call in flight, and held app.close until the process was
// killed at its grace (exit 1, the audit's last batch with it).
t.test('SSE: app.close does not wait for a subscriber that reads nothing', async t => {
  const app = await buildTestApp(t, { BFF_WEBSOCKET_ENABLED: false })
  const port = await listen(app)
  const socket = await stalledSse(t, port, 'stalled')
  await until('subscribed', () => app.events.bus.subscriptions === 1)
  // More than a socket on loopback takes unread: the response waits for the client.
  await app.events.publish({ topic: 'runs.updated', tenantId: 'stalled', payload: run('big', 'running', { output: 'x'.repeat(8 * 1024 * 1024) }) })
  await sleep(200)
  const closed = app.close()
  const outcome = await Promise.race([closed.then(() => 'closed'), sleep(3000).then(() => 'still open')])
  t.equal(outcome, 'closed', 'the shutdown did not wait for the client')
  socket.destroy()
  await closed
})

// A subscription whose token expires leaves the bus (its tenant's share of subscriptions), and
// ends with its UNAUTHENTICATED event; a client that reads nothing never takes it, and kept its
// connection, and what the gateway held for it, for as long as it liked: as many as its fresh
// tokens allowed. It has a ping interval to read the end, then its connection is closed.
t.test('SSE: the connection of a subscriber that reads nothing is closed once its token has expired', async t => {
  const app = await buildWithSettings(t, { pingMs: 300 }, { BFF_WEBSOCKET_ENABLED: false })
  const port = await listen(app)
  // Expired 3 s ago, inside the 5 s clock tolerance: valid for 2 to 3 more seconds.
  const exp = Math.ceil(Date.now() / 1000) - 3
  const almost = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 'stalled', roles: ['viewer'], exp })
  const socket = connect(port, '127.0.0.1', () => {
    socket.write(`GET /trpc/runUpdated HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer ${almost}\r\n\r\n`)
  })
  socket.on('error', () => {})
  t.teardown(() => socket.destroy())
  await new Promise<void>(resolve => socket.once('data', () => { socket.pause(); resolve() }))
  await until('subscribed', () => app.events.bus.subscriptions === 1)
  // More than a socket on loopback takes unread: the response waits for the client.
  await app.events.publish({ topic: 'runs.updated', tenantId: 'stalled', payload: run('big', 'running', { output: 'x'.repeat(8 * 1024 * 1024) }) })
  await until('expiry', () => app.events.bus.subscriptions === 0, 6000)
  const connections = async (): Promise<number> => await new Promise(resolve => app.server.getConnections((_err, n) => resolve(n)))
  let open = await connections()
  for (let i = 0; i < 100 && open > 0; i++) {
    await sleep(50)
    open = await connections()
  }
  t.equal(open, 0, 'closed, a ping interval after its end')
})

// A client that reads nothing had the bus queue up to 256 events for it (256 MB of 1 MB events),
// for each subscription its tenant's share allows: past the WebSocket faces' bound on what a
// client leaves unread, its subscription ends and its connection is closed, as a WebSocket's is.
t.test('SSE: a subscriber that reads nothing is cut once it holds more than maxBufferedBytes unread', async t => {
  const app = await buildWithSettings(t, { maxBufferedBytes: 1024 * 1024 }, { BFF_WEBSOCKET_ENABLED: false })
  const port = await listen(app)
  await stalledSse(t, port, 'unread')
  const reader = sse(port, { headers: bearer({ tenant: 'unread', roles: ['viewer'] }) })
  const seen = watch(reader, t)
  await until('subscribed', () => app.events.bus.subscriptions === 2)
  const connections = async (): Promise<number> => await new Promise(resolve => app.server.getConnections((_err, n) => resolve(n)))
  t.equal(await connections(), 2)
  // 10 MB in all, more than loopback's buffers take unread, at a pace a reader keeps up with.
  for (let i = 0; i < 80; i++) {
    await app.events.publish({ topic: 'runs.updated', tenantId: 'unread', payload: run(`e${i}`, 'running', { output: 'x'.repeat(128 * 1024) }) })
    await sleep(40)
  }
  await until('the stalled one cut', () => app.events.bus.subscriptions === 1, 10_000)
  let open = await connections()
  for (let i = 0; i < 100 && open > 1; i++) {
    await sleep(50)
    open = await connections()
  }
  t.equal(open, 1, 'its connection closed; the reader\'s kept')
  await until('the reader has every event', () => seen.data.length === 80, 10_000)
  t.equal(seen.data.length, 80, 'a client that reads is not cut')
  // Counted, once, as /ws counts its own (it was counted nowhere).
  t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_slow_reader_cuts_total\{face="trpc",transport="sse"\} 1\n/)
})

// tRPC takes an SSE subscription's events from the bus ahead of its client (withPing asks for the
// next before it hands on the one it holds; the web streams to the response hold one each): the
// bound counted what the bus queued and the response's writableLength, not those. A client that
// read nothing held 3 events past the bound when it was cut (1 MiB bound, 256 KiB events: 2 MiB).
t.test('SSE: what a subscriber that reads nothing holds at its cut counts the events tRPC took ahead', async t => {
  const MAX = 1024 * 1024
  const SIZE = 256 * 1024
  const app = await buildWithSettings(t, { maxBufferedBytes: MAX }, { BFF_WEBSOCKET_ENABLED: false })
  const port = await listen(app)
  // What the bus gave the subscription (queued, and taken from its queue), and at each event
  // what the gateway held for the client before it: queued, and taken less what reached the
  // operating system (socket.bytesWritten counts the socket's own buffer too: added back).
  let queued = 0
  let taken = 0
  let response: ServerResponse | null = null
  const held: number[] = []
  app.server.on('request', (req: IncomingMessage, res: ServerResponse) => { if (req.url?.startsWith('/trpc/runUpdated') === true) response = res })
  const bus = app.events.bus
  const stream = bus.stream.bind(bus)
  bus.stream = (name, tenant, signal, highWaterMark, behind) => stream(name, tenant, signal, highWaterMark, bytes => {
    if (bytes > 0) {
      const socket = (response as ServerResponse | null)?.socket
      if (socket !== null && socket !== undefined && !socket.destroyed) held.push(queued + taken - (socket.bytesWritten - socket.writableLength))
      queued += bytes
    } else {
      queued += bytes
      taken -= bytes
    }
    behind?.(bytes)
  })
  await stalledSse(t, port, 'ahead')
  await until('subscribed', () => app.events.bus.subscriptions === 1)
  // 20 MB at most: well past loopback's buffers and the bound.
  for (let i = 0; i < 80 && app.events.bus.subscriptions === 1; i++) {
    await app.events.publish({ topic: 'runs.updated', tenantId: 'ahead', payload: run(`e${i}`, 'running', { output: 'x'.repeat(SIZE) }) })
    await sleep(30)
  }
  await until('cut', () => app.events.bus.subscriptions === 0, 10_000)
  const most = Math.max(...held)
  // Before the event that cut it, more than the bound, by one event at most (a few bytes of
  // SSE framing aside).
  t.ok(most <= MAX + SIZE + 16 * 1024, `held at most the bound and one event (${(most / 1024).toFixed(0)} KiB)`)
})

// README "Load shedding": what clients leave unread counts against their tenant's share, every
// face's. An SSE response's did not (answerBounds leaves event streams to the subscription's own
// bound): one tenant's subscriptions that read nothing each held up to 4 MiB of their own, its
// 10,000 of them 40 GiB, outside its share. They count now, and an event that finds the share
// passed cuts the stream, as a frame closes a WebSocket.
t.test('SSE: what a subscriber that reads nothing holds counts against its tenant\'s share of the unread bytes', async t => {
  const SIZE = 256 * 1024
  // Its subscription's own bound is 4 MiB: the tenant's share, 1 MiB, cuts it first.
  const app = await buildTestApp(t, { BFF_WEBSOCKET_ENABLED: false }, { unreadBytes: { max: 1024 * 1024 * 1024, perTenant: 1024 * 1024 } })
  const port = await listen(app)
  const unread = async (): Promise<number> => Number(/^mantle_unread_bytes (\d+)$/m.exec((await app.inject({ method: 'GET', url: '/metrics' })).body)?.[1] ?? NaN)
  let response: ServerResponse | null = null
  app.server.on('request', (req: IncomingMessage, res: ServerResponse) => { if (req.url?.startsWith('/trpc/runUpdated') === true) response = res })
  await stalledSse(t, port, 'share')
  await until('subscribed', () => app.events.bus.subscriptions === 1)
  let most = 0
  // Events published once the operating system's buffers are full (the socket holds some itself).
  let past = 0
  // 15 MB at most: past loopback's buffers and the tenant's 1 MiB.
  for (let i = 0; i < 60 && app.events.bus.subscriptions === 1; i++) {
    if (((response as ServerResponse | null)?.socket?.writableLength ?? 0) > 0) past++
    await app.events.publish({ topic: 'runs.updated', tenantId: 'share', payload: run(`e${i}`, 'running', { output: 'x'.repeat(SIZE) }) })
    await sleep(30)
    most = Math.max(most, await unread())
  }
  await until('cut at the tenant\'s share', () => app.events.bus.subscriptions === 0, 10_000)
  // At its own bound, 4 MiB queued on the bus as well: 16 events and more.
  t.ok(past < 12, `cut at the tenant's share, ${past} events after the buffers filled`)
  t.ok(most > 0, `counted while held (${(most / 1024).toFixed(0)} KiB at most)`)
  const connections = async (): Promise<number> => await new Promise(resolve => app.server.getConnections((_err, n) => resolve(n)))
  let open = await connections()
  for (let i = 0; i < 100 && open > 0; i++) {
    await sleep(50)
    open = await connections()
  }
  t.equal(open, 0, 'its connection closed')
  t.equal(await unread(), 0, 'all given back')
})

t.test('runs started over tRPC stream their status changes from the demo Kernel', async t => {
  // The Kernel's events go to the gateway as they would through /internal/events.
  const target: { app?: FastifyInstance } = {}
  const kernel = await startKernel({ port: 0, runDelayMs: 20, onEvent: (e) => { target.app?.events.publish(e).catch(() => {}) } })
  t.teardown(() => kernel.close())
  const gateway = target.app = await buildTestApp(t, {}, { kernelUrl: kernel.url })
  const port = await listen(gateway)
  const seen = watch(sse(port, { headers: bearer({ tenant: 'live', roles: ['viewer'] }) }), t)
  await until('subscribed', () => gateway.events.bus.subscriptions === 1)
  const calls = createTRPCUntypedClient({ links: [httpLink({ url: `http://127.0.0.1:${port}/trpc`, headers: bearer({ tenant: 'live', roles: ['operator'] }) })] })
  const started = await calls.mutation('runAgent', { id: 'a1', prompt: 'Summarise the report' }) as { id: string }
  await until('the run to finish', () => seen.data.some(r => r.status === 'succeeded' || r.status === 'failed'))
  t.ok(seen.data.every(r => r.id === started.id))
  t.same(seen.data.map(r => r.status).slice(0, 2), ['queued', 'running'])
  t.notOk(seen.data.some(r => 'prompt' in r))
})

t.test('WebSocket at /trpc: calls, errors and subscriptions through wsLink', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const { client } = ws(t, port, { token: token({ tenant: 't1' }) })
  t.match(await client.query('getAgent', { id: 'a1' }), { id: 'a1', name: 'Research Assistant' })
  t.match(await client.mutation('createAgent', { name: 'over ws' }), { name: 'over ws' })
  const invalid = await client.query('listAgents', { limit: 0 }).catch((err: unknown) => err as ClientError)
  t.match((invalid as ClientError).data, { code: 'VALIDATION_FAILED', httpStatus: 400, requestId: /^[0-9a-f-]{36}$/ })
  t.equal((invalid as ClientError).message, 'input.limit must be >= 1')

  const seen = watch(client, t)
  const other = ws(t, port, { token: token({ tenant: 't2' }) })
  const theirs = watch(other.client, t)
  await until('both subscriptions', () => app.events.bus.subscriptions === 2)
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('w1', 'queued', { secret: 'x' }) })
  await app.events.publish({ topic: 'runs.updated', tenantId: 't2', payload: run('w2') })
  await until('events', () => seen.data.length === 1 && theirs.data.length === 1)
  t.match(seen.data, [{ id: 'w1', status: 'queued' }])
  t.notOk('secret' in seen.data[0])
  t.match(theirs.data, [{ id: 'w2' }])
  seen.unsubscribe()
  await until('unsubscribed', () => app.events.bus.subscriptions === 1)
  await other.close()
  await until('the closed connection unsubscribed', () => app.events.bus.subscriptions === 0)

  const viewerless = ws(t, port, { token: token({ roles: ['editor'] }) })
  const refused = watch(viewerless.client, t)
  await until('refusal', () => refused.errors.length === 1)
  t.match(refused.errors[0].data, { code: 'FORBIDDEN', httpStatus: 403 })
})

t.test('WebSocket: the token comes from connectionParams, the upgrade header or ?access_token=', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const query = JSON.stringify({ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'a2' } } })

  const header = await rawSocket(t, port, '/trpc', bearer())
  header.socket.send(query)
  await until('answer', () => header.messages.length === 1)
  t.match(header.messages[0], { id: 1, result: { type: 'data', data: { id: 'a2' } } })

  const queryToken = await rawSocket(t, port, `/trpc?access_token=${token()}`)
  queryToken.socket.send(query)
  await until('answer', () => queryToken.messages.length === 1)
  t.match(queryToken.messages[0], { id: 1, result: { data: { id: 'a2' } } })

  const params = await rawSocket(t, port, '/trpc?connectionParams=1')
  params.socket.send(JSON.stringify({ method: 'connectionParams', data: { authorization: `Bearer ${token()}` } }))
  params.socket.send(query)
  await until('answer', () => params.messages.length === 1)
  t.match(params.messages[0], { id: 1, result: { data: { id: 'a2' } } })

  // Junk on an authenticated connection is an error message, not a crash or a 5xx.
  params.socket.send('{not json')
  params.socket.send(JSON.stringify({ id: 2, method: 'query', params: { path: 'nope', input: {} } }))
  params.socket.send(JSON.stringify({ id: 3, method: 'mutation', params: { path: 'createAgent', input: 'x' } }))
  params.socket.send(Buffer.from([0, 159, 146, 150]), { binary: true })
  params.socket.send(JSON.stringify({ id: 4, method: 'teleport', params: { path: 'getAgent' } }))
  await until('answers', () => params.messages.length === 6)
  // Answers to calls come when their call ends; refusals of junk come at once: match by id.
  type Reply = { id: number | null, error?: { message: string, data: { code: string, httpStatus: number } } }
  const replies = params.messages.slice(1) as Reply[]
  t.match(replies.find(m => m.id === 2), { error: { data: { code: 'NOT_FOUND', httpStatus: 404 } } })
  t.match(replies.find(m => m.id === 3), { error: { message: 'The input must be a JSON object', data: { code: 'VALIDATION_FAILED' } } })
  const junk = replies.filter(m => m.id === null)
  t.equal(junk.length, 3, 'malformed JSON, a binary frame, an unknown method')
  for (const m of junk) t.match(m, { error: { data: { code: 'VALIDATION_FAILED', httpStatus: 400 } } })
  // Still serving after all that.
  params.socket.send(query)
  await until('answer', () => params.messages.length === 7)
  t.match(params.messages[6], { id: 1, result: { data: { id: 'a2' } } })
})

/** The answer to an upgrade the gateway refuses before accepting it: its status and body. */
async function refusedUpgrade (port: number, path: string, headers: Headers = {}): Promise<{ status: number, body: unknown }> {
  return await new Promise((resolve, reject) => {
    const socket = new WebSocket(`ws://127.0.0.1:${port}${path}`, { headers })
    socket.on('error', () => {})
    socket.once('open', () => { socket.terminate(); reject(new Error(`${path} was upgraded`)) })
    socket.once('unexpected-response', (req, res) => {
      let text = ''
      res.on('data', (chunk: Buffer) => { text += chunk.toString() })
      res.on('end', () => { req.destroy(); resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) }) })
    })
  })
}

t.test('WebSocket: a connection without a valid token is refused and closed', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  // Refused at the upgrade, with a 401 as /ws and /graphql answer: a bad token in the header or
  // ?access_token=, or none without ?connectionParams=1 (nothing else could bring one).
  const forgedToken = token({ secret: 'another-secret-of-sufficient-length-000000' })
  const expiredToken = token({ ttlSeconds: -60 })
  const unauthenticated = { error: { code: -32001, data: { code: 'UNAUTHENTICATED', httpStatus: 401 } } }
  for (const [what, path, headers] of [
    ['no token', '/trpc', {}],
    ['a forged token in the header', '/trpc', { authorization: `Bearer ${forgedToken}` }],
    ['an expired token in the header', '/trpc', { authorization: `Bearer ${expiredToken}` }],
    ['a forged ?access_token=', `/trpc?access_token=${forgedToken}`, {}],
    ['a forged token in the header, connectionParams awaited', '/trpc?connectionParams=1', { authorization: `Bearer ${forgedToken}` }]
  ] as const) {
    const refused = await refusedUpgrade(port, path, headers)
    t.equal(refused.status, 401, `${what}: 401 at the upgrade`)
    t.match(refused.body, unauthenticated, what)
  }

  // A refused token in connectionParams: its error, an answer to a call sent with it, then 4401
  // (not tRPC's bare close, a 1005 that wsLink takes for a network drop and reconnects after).
  const forged = await rawSocket(t, port, '/trpc?connectionParams=1')
  forged.socket.send(JSON.stringify({ method: 'connectionParams', data: { token: forgedToken } }))
  forged.socket.send(JSON.stringify({ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'a1' } } }))
  await until('refusals', () => forged.messages.length === 2)
  t.match(forged.messages[0], { id: null, ...unauthenticated })
  t.match((forged.messages[0] as { error: { message: string } }).error.message, /signature is invalid/)
  t.match(forged.messages[1], { id: 1, ...unauthenticated })
  t.equal(await forged.closed, 4401, 'closed with 4401')

  // A call that arrives in a read of its own, a moment after the connectionParams (as wsLink's
  // queued calls often do): it gets the error too. The socket closed at the next turn of the event
  // loop, and the call went unanswered (wsLink: "Unknown error", no code). Found by a session
  // using the gateway with @trpc/client.
  const late = await rawSocket(t, port, '/trpc?connectionParams=1')
  late.socket.send(JSON.stringify({ method: 'connectionParams', data: { token: forgedToken } }))
  await new Promise(resolve => setTimeout(resolve, 30))
  late.socket.send(JSON.stringify({ id: 2, method: 'query', params: { path: 'getAgent', input: { id: 'a1' } } }))
  t.equal(await late.closed, 4401, 'closed with 4401')
  t.match(late.messages, [{ id: null, ...unauthenticated }, { id: 2, ...unauthenticated }], 'the call sent 30 ms behind its connectionParams is answered before the close')

  const junk = await rawSocket(t, port, '/trpc?connectionParams=1')
  junk.socket.send('not json at all')
  await until('refusal', () => junk.messages.length === 1)
  t.match(junk.messages[0], { id: null, error: { data: { code: 'VALIDATION_FAILED', httpStatus: 400 } } })
  await junk.closed

  const plain = await app.inject({ method: 'GET', url: '/trpc', headers: bearer() })
  t.equal(plain.statusCode, 404, 'plain GET /trpc is not a procedure')
})

t.test('WebSocket: a connectionParams message tRPC cannot read gets its error, then a close with 4400 and why', async t => {
  const lines: string[] = []
  const app = await buildDemoApp(t, { LOG_LEVEL: 'info', BFF_BODY_LIMIT: 64 * 1024 }, { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } } })
  const port = await listen(app)
  const notJson = 'The connectionParams message is not JSON'
  const badShape = 'The connectionParams message must be {"method":"connectionParams","data":{<name>:<string>}}'
  for (const [what, message, reason] of [
    ['not JSON', 'not json at all {{ secret-junk', notJson],
    ['a JSON array', '[1,2]', badShape],
    ['no data', '{"method":"connectionParams"}', badShape],
    ['data not an object', '{"method":"connectionParams","data":"x"}', badShape],
    ['a value not a string', '{"method":"connectionParams","data":{"token":5}}', badShape],
    ['many values not strings', JSON.stringify({ method: 'connectionParams', data: Object.fromEntries(Array.from({ length: 2000 }, (_, i) => [`secret-key-${i}`, i])) }), badShape]
  ] as const) {
    const socket = new WebSocket(`ws://127.0.0.1:${port}/trpc?connectionParams=1`)
    t.teardown(() => socket.terminate())
    const messages: unknown[] = []
    socket.on('message', (data: Buffer) => messages.push(JSON.parse(data.toString())))
    const closed = new Promise<[number, string]>(resolve => socket.on('close', (code: number, why: Buffer) => resolve([code, why.toString()])))
    await new Promise<void>((resolve, reject) => { socket.once('open', resolve); socket.once('error', reject) })
    socket.send(message)
    // Before, tRPC closed it without a code: 1005, which wsLink takes for a network drop.
    t.same(await closed, [4400, reason], `${what}: 4400 and why`)
    t.match(messages, [{ id: null, error: { data: { code: 'VALIDATION_FAILED', httpStatus: 400 } } }], `${what}: its error first`)
  }
  // Frames ws refuses itself close with its code, and are not the gateway's error to log.
  const huge = await rawSocket(t, port, '/trpc?connectionParams=1')
  huge.socket.send(JSON.stringify({ method: 'connectionParams', data: { token: 'x'.repeat(100 * 1024) } }))
  t.equal(await huge.closed, 1009, 'over the body limit: 1009')
  const garbled = await rawSocket(t, port, '/trpc?connectionParams=1')
  garbled.socket.send(Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), { binary: false })
  t.equal(await garbled.closed, 1007, 'invalid UTF-8: 1007')

  // A well-formed one still authenticates the socket.
  const good = await rawSocket(t, port, '/trpc?connectionParams=1')
  good.socket.send(JSON.stringify({ method: 'connectionParams', data: { token: token() } }))
  good.socket.send(JSON.stringify({ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'a1' } } }))
  await until('an answer', () => good.messages.length === 1)
  t.match(good.messages[0], { id: 1, result: { data: { id: 'a1' } } })
  // Before, each frame ws refused was logged at error as 'unexpected error on a tRPC WebSocket'.
  t.same(lines.filter(line => JSON.parse(line).level >= 50), [], 'nothing logged at error')
  t.notOk(lines.some(line => line.includes('secret-')), 'no client text in the log')
})

t.test('WebSocket: an upgrade with a Host tRPC makes no URL of is refused 400, as an HTTP call is', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  // Accepted before: with credentials (`a@b`) tRPC served the socket, with no host at all (`a b`)
  // it threw once it was open, logged at error, and the socket dropped with 1006.
  const badRequest = { error: { code: -32600, data: { code: 'BAD_REQUEST', httpStatus: 400 } } }
  // And Hosts of the right characters that are still no URL's: a port out of range, an address
  // that is none, a bracket alone (taken by a character class, then thrown on once open).
  // A label in Punycode is a URL's where this runtime's URL decodes it, as tRPC's own does: Node
  // 20 and 22 refuse `xn--a` and `XN--abc.com`, Node 24 and later take them (then served, below).
  const urlTakes = (host: string): boolean => URL.canParse(`http://${host}/`)
  const idn = ['xn--a', 'XN--abc.com']
  for (const host of ['a@b', 'u:p@x', 'a b', 'example.com:99999', 'example.com:abc', '1.2.3.4.5', 'a.1', 'a[b', ...idn.filter(h => !urlTakes(h))]) {
    const refused = await refusedUpgrade(port, '/trpc', { ...bearer(), host })
    t.equal(refused.status, 400, `Host ${host}: 400 at the upgrade`)
    t.match(refused.body, badRequest, `Host ${host}`)
    t.match((refused.body as { error: { message: string } }).error.message, /Host/)
  }
  // A target in absolute form with credentials, as over HTTP.
  const answer = await new Promise<string>((resolve, reject) => {
    const socket = connect({ port, host: '127.0.0.1' })
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString('latin1') })
    socket.on('error', reject)
    socket.on('close', () => { resolve(data) })
    socket.on('connect', () => {
      socket.write(`GET http://u:p@x/trpc HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: ${bearer().authorization}\r\n\r\n`)
    })
  })
  t.match(answer, /^HTTP\/1\.1 400 /)
  t.match(answer, /"code":"BAD_REQUEST"/)
  // A Host tRPC takes still upgrades.
  for (const host of [`localhost:${port}`, ...idn.filter(urlTakes)]) {
    const served = await rawSocket(t, port, '/trpc', { ...bearer(), host })
    served.socket.send(JSON.stringify({ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'a2' } } }))
    await until('answer', () => served.messages.length === 1)
    t.match(served.messages[0], { id: 1, result: { data: { id: 'a2' } } }, `Host ${host}: served`)
  }
})

t.test('WebSocket: closed with 4401 when the token expires; bounds per connection and per instance', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/slow': async (_req, res) => { await sleep(150); json(res, 200, { id: 'slow' }) }
  })
  const manifest = testManifest({
    slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', output: { type: 'object', properties: { id: { type: 'string' } } } }
  }, { url: kernel.url }, { events: { ticks: { topic: 'ticks', payload: { type: 'object', properties: { n: { type: 'integer' } } } } } })
  const config = testConfig({ BFF_TRPC_ENABLED: false })
  const app = await buildApp(config, { logger: false, manifest, kernelUrl: kernel.url })
  t.teardown(() => app.close())
  await app.register(createTrpcFace({ authTimeoutMs: 100, maxSubscriptions: 2, maxInFlight: 1, maxConnections: 3, maxCallsPerMessage: 8 }), { bodyLimit: 4096, maxCalls: 5, maxDepth: 12, secured: true, development: false })
  await app.ready()
  const port = await listen(app)

  const exp = Math.ceil(Date.now() / 1000) - 3
  const almost = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 't1', exp })
  const expiring = await rawSocket(t, port, '/trpc', { authorization: `Bearer ${almost}` })
  t.equal(await expiring.closed, 4401, 'closed with 4401 when the token expired')

  const silent = await rawSocket(t, port, '/trpc?connectionParams=1')
  t.equal(await silent.closed, 4401, 'no connectionParams in time: closed with 4401')

  const busy = await rawSocket(t, port, '/trpc', bearer())
  busy.socket.send(JSON.stringify([
    { id: 1, method: 'query', params: { path: 'slow', input: {} } },
    { id: 2, method: 'query', params: { path: 'slow', input: {} } }
  ]))
  await until('answers', () => busy.messages.length === 2)
  const byId = new Map((busy.messages as Array<{ id: number }>).map(m => [m.id, m]))
  t.match(byId.get(1), { result: { data: { id: 'slow' } } })
  t.match(byId.get(2), { error: { data: { code: 'OVERLOADED', httpStatus: 503 } } }, 'one call at a time on this connection')

  // A message of more calls than BFF_BATCH_MAX_CALLS (wsLink sends a tick's calls in one): those
  // the connection runs at once run, the others are refused OVERLOADED one by one. Before, the
  // whole message was refused PAYLOAD_TOO_LARGE.
  const many = Array.from({ length: 6 }, (_, i) => ({ id: 10 + i, method: 'query', params: { path: 'slow', input: {} } }))
  busy.socket.send(JSON.stringify(many))
  await until('answers', () => busy.messages.length === 8)
  const answers = new Map((busy.messages.slice(2) as Array<{ id: number }>).map(m => [m.id, m]))
  t.match(answers.get(10), { result: { data: { id: 'slow' } } }, 'a message over BFF_BATCH_MAX_CALLS runs')
  for (let id = 11; id < 16; id++) t.match(answers.get(id), { error: { data: { code: 'OVERLOADED', httpStatus: 503, retryAfter: 1 } } }, `call ${id}: past the in-flight bound`)
  const tooLong = Array.from({ length: 9 }, (_, i) => ({ id: 30 + i, method: 'query', params: { path: 'slow', input: {} } }))
  busy.socket.send(JSON.stringify(tooLong))
  await until('refusals', () => busy.messages.length === 17)
  t.match(busy.messages[8], { id: 30, error: { data: { code: 'PAYLOAD_TOO_LARGE', httpStatus: 413 } } }, 'a message over maxCallsPerMessage is refused')

  for (let id = 20; id < 23; id++) busy.socket.send(JSON.stringify({ id, method: 'subscription', params: { path: 'ticks', input: null } }))
  await until('two started and one refused', () => busy.messages.filter(m => (m as { id: number }).id >= 20 && (m as { id: number }).id < 23).length >= 3)
  const subs = (busy.messages as Array<{ id: number, result?: { type: string }, error?: { data: { code: string } } }>).filter(m => m.id >= 20 && m.id < 23)
  // The third is refused before it starts (no `started`), as one sent after the others began is:
  // the slots are counted when each is decided (trpc-websocket-subscription-slots.part.ts).
  t.same(subs.filter(m => m.result?.type === 'started').map(m => m.id), [20, 21], 'two started')
  t.match(subs.find(m => m.error !== undefined), { id: 22, error: { data: { code: 'OVERLOADED' } } })
  await until('two on the bus', () => app.events.bus.subscriptions === 2)

  const more = await Promise.all([1, 2].map(async () => await rawSocket(t, port, '/trpc', bearer())))
  t.equal(more.length, 2)
  const status = await new Promise<number>(resolve => {
    const refused = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers: bearer() })
    refused.on('error', () => {})
    refused.on('unexpected-response', (req, res) => {
      resolve(res.statusCode ?? 0)
      req.destroy()
    })
  })
  t.equal(status, 503, 'beyond maxConnections an upgrade is refused')

  // The face's bodyLimit applies to its routes.
  const big = await app.inject({ method: 'POST', url: '/trpc/slow', headers: { ...bearer(), 'content-type': 'application/json' }, payload: JSON.stringify({ pad: 'x'.repeat(5000) }) })
  t.equal(big.statusCode, 413)
})

t.test('without @fastify/websocket the face serves HTTP only', async t => {
  const app = await buildWithSettings(t, {}, { BFF_WEBSOCKET_ENABLED: false, BFF_GRAPHQL_ENABLED: false })
  t.notOk(app.hasDecorator('websocketServer'))
  const res = await app.inject({ method: 'GET', url: '/trpc', headers: bearer() })
  t.equal(res.statusCode, 404)
  t.match(res.json(), { error: { data: { code: 'NOT_FOUND' } } })
})

t.test('WebSocket at /trpc: one event\'s frames to many readers of a tenant, together past its share, close none of them', async t => {
  const app = await buildTestApp(t, {}, { unreadBytes: { max: 64 * 1024 * 1024, perTenant: 512 * 1024 } })
  const port = await listen(app)
  const seen: Seen[] = []
  for (let i = 0; i < 40; i++) seen.push(watch(ws(t, port, { token: token({ tenant: 'many', roles: ['viewer'] }) }).client, t))
  await until('subscribed', () => app.events.bus.subscriptions === 40, 10_000)
  for (let i = 0; i < 3; i++) {
    await app.events.publish({ topic: 'runs.updated', tenantId: 'many', payload: run(`e${i}`, 'running', { output: 'x'.repeat(64 * 1024) }) })
    await until(`event ${i} read`, () => seen.every(s => s.data.length > i || s.errors.length > 0 || s.stopped) && app.events.bus.subscriptions === 40, 5000).catch(() => {})
  }
  t.equal(app.events.bus.subscriptions, 40, 'every reader is still subscribed')
  t.same(seen.map(s => s.data.length), seen.map(() => 3), 'each read every event')
})
