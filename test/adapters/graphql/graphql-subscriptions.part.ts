import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { createRequire } from 'node:module'
import { createClient, type Client, type FormattedExecutionResult } from 'graphql-ws'
import { WebSocket, type ClientOptions } from 'ws'
import { createSigner } from 'fast-jwt'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, drained, token, SECRET, until } from '../../helper.js'

// GraphQL subscriptions over the graphql-ws protocol (graphql-transport-ws), with the real
// graphql-ws client on `ws`, and raw `ws` sockets for what a well-behaved client never sends.

interface Teardown { teardown: (fn: () => unknown) => void }
type Env = Record<string, string | number | boolean | undefined>

const RUN = { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:01Z', startedAt: '2026-01-01T00:00:01Z', finishedAt: null }
const SUBSCRIPTION = 'subscription { runUpdated { id agentId status temperature promptChars output startedAt } }'

async function gateway (t: Teardown, env: Env = {}): Promise<{ app: FastifyInstance, url: string }> {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false, ...env })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  return { app, url: `ws://127.0.0.1:${port}/graphql` }
}

/** A graphql-ws client that never retries; `headers` go on the upgrade request. */
function client (t: Teardown, url: string, connectionParams?: Record<string, unknown>, headers?: Record<string, string>): Client {
  class HeaderSocket extends WebSocket {
    constructor (address: string, protocols?: string | string[], options?: ClientOptions) {
      super(address, protocols, { ...options, headers })
    }
  }
  const c = createClient({ url, webSocketImpl: HeaderSocket, retryAttempts: 0, lazy: true, ...(connectionParams === undefined ? {} : { connectionParams }) })
  t.teardown(() => c.dispose())
  return c
}

/** Subscribes and collects: results, the error, and completion. */
function collect (c: Client, query = SUBSCRIPTION): { results: Array<FormattedExecutionResult<Record<string, unknown>, unknown>>, error: () => unknown, done: () => boolean, stop: () => void } {
  const results: Array<FormattedExecutionResult<Record<string, unknown>, unknown>> = []
  let error: unknown
  let done = false
  const stop = c.subscribe({ query }, {
    next: (r) => { results.push(r) },
    error: (e) => { error = e; done = true },
    complete: () => { done = true }
  })
  return { results, error: () => error, done: () => done, stop }
}

const auth = (opts: Parameters<typeof token>[0] = {}): { authorization: string } => ({ authorization: `Bearer ${token(opts)}` })

t.test('an event reaches the subscribers of its tenant only, shaped by the payload schema', async t => {
  const { app, url } = await gateway(t)
  const a = collect(client(t, url, auth({ tenant: 'A', roles: ['viewer'] })))
  const a2 = collect(client(t, url, auth({ tenant: 'A', roles: ['viewer'] })), 'subscription Mine { runUpdated { id status } }')
  const b = collect(client(t, url, auth({ tenant: 'B', roles: ['viewer'] })))
  await until(() => app.events.bus.subscriptions === 3, 'three subscriptions')

  await app.events.publish({ topic: 'runs.updated', tenantId: 'A', payload: { ...RUN, secret: 'never sent' } })
  await until(() => a.results.length === 1 && a2.results.length === 1, 'tenant A events')
  t.same(a.results[0], { data: { runUpdated: { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, startedAt: '2026-01-01T00:00:01Z' } } })
  t.same(a2.results[0], { data: { runUpdated: { id: 'r1', status: 'running' } } })
  await app.events.publish({ topic: 'runs.updated', tenantId: 'C', payload: RUN })
  await app.events.publish({ topic: 'runs.updated', tenantId: 'B', payload: { ...RUN, id: 'r2', status: 'succeeded', output: 'done' } })
  await until(() => b.results.length === 1, 'tenant B event')
  t.same(b.results[0], { data: { runUpdated: { id: 'r2', agentId: 'a1', status: 'succeeded', temperature: 0.5, promptChars: 12, output: 'done', startedAt: '2026-01-01T00:00:01Z' } } })
  await sleep(50)
  t.equal(a.results.length, 1, 'A got nothing of B or C')
  t.equal(b.results.length, 1, 'B got nothing of A or C')

  // An event the payload schema refuses is dropped by the bus, for every face.
  await app.events.publish({ topic: 'runs.updated', tenantId: 'A', payload: { id: 'r3' } })
  await sleep(30)
  t.equal(a.results.length, 1)

  a.stop()
  await until(() => app.events.bus.subscriptions === 2, 'the completed subscription to leave the bus')
  t.notOk(a.error())
  t.equal(a2.results.length, 1)
})

t.test('credentials: connection_init payload, upgrade header, ?access_token=', async t => {
  const { app, url } = await gateway(t)
  const viaHeader = collect(client(t, url, undefined, auth({ tenant: 'H', roles: ['viewer'] })))
  const viaQuery = collect(client(t, `${url}?access_token=${token({ tenant: 'Q', roles: ['viewer'] })}`))
  await until(() => app.events.bus.subscriptions === 2, 'two subscriptions')
  await app.events.publish({ topic: 'runs.updated', tenantId: 'H', payload: RUN })
  await app.events.publish({ topic: 'runs.updated', tenantId: 'Q', payload: { ...RUN, id: 'q1' } })
  await until(() => viaHeader.results.length === 1 && viaQuery.results.length === 1, 'events')
  t.equal((viaHeader.results[0].data as any).runUpdated.id, 'r1')
  t.equal((viaQuery.results[0].data as any).runUpdated.id, 'q1')

  // connection_init wins over the upgrade's credentials.
  const both = collect(client(t, url, auth({ tenant: 'I', roles: ['viewer'] }), auth({ tenant: 'H', roles: ['viewer'] })))
  await until(() => app.events.bus.subscriptions === 3, 'third subscription')
  await app.events.publish({ topic: 'runs.updated', tenantId: 'I', payload: { ...RUN, id: 'i1' } })
  await until(() => both.results.length === 1, 'event of I')
  t.equal((both.results[0].data as any).runUpdated.id, 'i1')
})

t.test('refusals: no credentials, no role, bad tokens, unknown fields', async t => {
  const { app, url } = await gateway(t)
  const errorOf = async (c: Client, query = SUBSCRIPTION): Promise<any> => {
    const s = collect(c, query)
    await until(s.done, 'the subscription to end')
    t.equal(s.results.length, 0)
    return s.error()
  }

  const anonymous = await errorOf(client(t, url))
  t.match(anonymous, [{ message: 'A bearer token is required', path: ['runUpdated'], extensions: { code: 'UNAUTHENTICATED', status: 401, requestId: String } }])

  const noRole = await errorOf(client(t, url, auth({ roles: ['editor'] })))
  t.match(noRole, [{ message: 'runUpdated needs one of the roles: viewer', extensions: { code: 'FORBIDDEN', status: 403 } }])

  const unknown = await errorOf(client(t, url, auth({ roles: ['viewer'] })), 'subscription { runUpdated { id nope } }')
  t.match(unknown, [{ message: /Cannot query field "nope"/, extensions: { code: 'VALIDATION_FAILED', status: 400, requestId: String } }])
  const twoFields = await errorOf(client(t, url, auth({ roles: ['viewer'] })), 'subscription { runUpdated { id } runUpdated2: runUpdated { id } }')
  t.match(twoFields, [{ message: /must select only one top level field/, extensions: { code: 'VALIDATION_FAILED' } }])
  const syntax = await errorOf(client(t, url, auth({ roles: ['viewer'] })), 'subscription { runUpdated { id }')
  t.match(syntax, [{ message: /Syntax Error/, extensions: { code: 'VALIDATION_FAILED', status: 400, requestId: String } }])
  const query = await errorOf(client(t, url, auth({ roles: ['viewer'] })), '{ getAgent(id: "a1") { id } }')
  t.match(query, [{ message: 'A subscribe message carries a subscription; a query goes over HTTP', extensions: { code: 'VALIDATION_FAILED' } }], 'queries and mutations go over HTTP')

  // A bad token in connection_init: the connection is refused at once, before its ack, with
  // 4403 Forbidden and the reason (graphql-ws' server's refusal, which its client retries with
  // its connectionParams; this one retries nothing, and fails the subscription with the close).
  // Before, it was acked, the subscription failed with the reason, then the connection closed 4401.
  const forged = await errorOf(client(t, url, { authorization: `Bearer ${token({ secret: 'another-secret-of-sufficient-length-000000' })}` }))
  t.match(forged, { code: 4403, reason: 'Forbidden: The token was refused: the token signature is invalid' })
  const junk = await errorOf(client(t, url, { authorization: 42 }))
  t.match(junk, { code: 4403, reason: 'Forbidden: A bearer token is required' })

  // Bad credentials on the upgrade are a 401 before any WebSocket exists.
  const now = Math.floor(Date.now() / 1000)
  const expired = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 't', roles: ['viewer'], exp: now - 60 })
  for (const authorization of [`Bearer ${expired}`, 'Bearer not-a-jwt', 'Basic dXNlcjpwYXNz']) {
    const status = await new Promise<number>((resolve) => {
      const ws = new WebSocket(url, 'graphql-transport-ws', { headers: { authorization } })
      ws.on('unexpected-response', (_req, res) => { resolve(res.statusCode ?? 0); ws.terminate() })
      ws.on('open', () => { resolve(101); ws.close() })
      ws.on('error', () => {})
    })
    t.equal(status, 401, authorization.slice(0, 16))
  }
  t.equal(app.events.bus.subscriptions, 0, 'no refused subscription left a listener')
})

t.test('a refusal that asks for a wait carries it in extensions.retryAfter: a graphql-ws message has no Retry-After header', async t => {
  const { app, url } = await gateway(t)
  const c = client(t, url, auth({ roles: ['viewer'] }))
  // The instance's bound on event subscriptions, reached (the bus refuses with Retry-After: 5);
  // /ws frames and tRPC errors say retryAfter 5 for it, this said nothing.
  const bus = app.events.bus as unknown as { count: number }
  bus.count = 100_000
  const full = collect(c)
  await until(full.done, 'the refusal')
  t.match(full.error(), [{ message: 'Too many event subscriptions on this instance', extensions: { code: 'OVERLOADED', status: 503, requestId: String, retryAfter: 5 } }])
  bus.count = 0
  const noRole = collect(client(t, url, auth({ roles: ['editor'] })))
  await until(noRole.done, 'the refusal')
  const [forbidden] = noRole.error() as Array<{ extensions: Record<string, unknown> }>
  t.match(forbidden, { extensions: { code: 'FORBIDDEN' } })
  t.notOk('retryAfter' in forbidden.extensions, 'none on a refusal that asks no wait')
})

t.test('a refused subscription is the client\'s answer, not an error log line; a gateway bug is one', async t => {
  // mercurius logged at level error, whole, every refusal a resolver threw: one unnamed line per
  // subscribe message, holding text the client chose (here a token's kid).
  const lines: string[] = []
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false, LOG_LEVEL: 'info' }, { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const url = `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`
  const errorOf = async (c: Client): Promise<unknown> => {
    const s = collect(c)
    await until(s.done, 'the refusal')
    return s.error()
  }
  const located = { path: ['runUpdated'], locations: [{ line: 1, column: 16 }] }
  const c = client(t, url, auth({ roles: ['editor'] }))
  for (let i = 0; i < 3; i++) t.match(await errorOf(c), [{ ...located, message: 'runUpdated needs one of the roles: viewer', extensions: { code: 'FORBIDDEN', status: 403, requestId: String } }])
  const kid = `${Buffer.from('{"alg":"RS256","kid":"chosen-by-the-client"}').toString('base64url')}.e30.x`
  // In connection_init: refused at once, the reason in the close (4403), logged neither.
  t.match(await errorOf(client(t, url, { authorization: `Bearer ${kid}` })), { code: 4403, reason: 'Forbidden: The token was refused: unknown key id (kid) "chosen-by-the-client"' })
  const bus = app.events.bus as unknown as { count: number, stream: unknown }
  const viewer = client(t, url, auth({ roles: ['viewer'] }))
  bus.count = 100_000
  t.match(await errorOf(viewer), [{ ...located, extensions: { code: 'OVERLOADED', status: 503, retryAfter: 5 } }])
  bus.count = 0
  t.same(lines.map(l => JSON.parse(l) as { level: number }).filter(l => l.level >= 40), [], 'no refusal logged at warn or error')

  bus.stream = () => { throw new Error('a bug') }
  t.match(await errorOf(viewer), [{ ...located, extensions: { code: 'INTERNAL', status: 500 } }])
  const errors = lines.map(l => JSON.parse(l) as { level: number, msg?: string, err?: { message: string }, requestId?: string }).filter(l => l.level >= 40)
  t.match(errors, [{ level: 50, msg: 'unexpected error on a GraphQL subscription', err: { message: 'a bug' }, requestId: String }])
})

t.test('with identity off every subscriber is the public tenant', async t => {
  const { app, url } = await gateway(t, { BFF_AUTH_ENABLED: false })
  const s = collect(client(t, url))
  await until(() => app.events.bus.subscriptions === 1, 'subscription')
  await app.events.publish({ topic: 'runs.updated', tenantId: 'public', payload: RUN })
  await until(() => s.results.length === 1, 'event')
  t.equal((s.results[0].data as any).runUpdated.status, 'running')
})

/** A raw graphql-transport-ws socket: frames in order, and how it closed. */
async function raw (t: Teardown, url: string): Promise<{ ws: WebSocket, send: (m: unknown) => void, next: () => Promise<any>, closed: Promise<{ code: number, reason: string }> }> {
  const ws = new WebSocket(url, 'graphql-transport-ws')
  t.teardown(() => ws.terminate())
  const frames: any[] = []
  const waiters: Array<(f: any) => void> = []
  ws.on('message', (data) => {
    const frame = JSON.parse(String(data))
    const w = waiters.shift()
    if (w !== undefined) w(frame)
    else frames.push(frame)
  })
  const closed = new Promise<{ code: number, reason: string }>(resolve => ws.on('close', (code, reason) => resolve({ code, reason: String(reason) })))
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  return {
    ws,
    send: (m) => ws.send(typeof m === 'string' ? m : JSON.stringify(m)),
    next: async () => frames.length > 0 ? frames.shift() : await new Promise(resolve => waiters.push(resolve)),
    closed
  }
}

t.test('protocol abuse: duplicate ids, a second init, too many subscriptions, junk frames', async t => {
  const { app, url } = await gateway(t, { BFF_BATCH_MAX_CALLS: 2 })
  const init = { type: 'connection_init', payload: auth({ roles: ['viewer'] }) }

  const dup = await raw(t, url)
  dup.send(init)
  t.match(await dup.next(), { type: 'connection_ack' })
  dup.send({ id: '1', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 1, 'subscription 1')
  dup.send({ id: '1', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  t.match(await dup.closed, { code: 4409, reason: 'Subscriber for 1 already exists' })
  await until(() => app.events.bus.subscriptions === 0, 'the closed connection to leave the bus')
  // The id in the close reason is cut by bytes: 64 characters of 2 bytes each made a reason over
  // the 123 bytes a close frame holds, ws threw, and the connection stayed open.
  const wide = await raw(t, url)
  wide.send(init)
  t.match(await wide.next(), { type: 'connection_ack' })
  wide.send({ id: 'ü'.repeat(64), type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 1, 'subscription ü')
  wide.send({ id: 'ü'.repeat(64), type: 'subscribe', payload: { query: SUBSCRIPTION } })
  t.same(await wide.closed, { code: 4409, reason: `Subscriber for ${'ü'.repeat(32)} already exists` })
  await until(() => app.events.bus.subscriptions === 0, 'the closed connection to leave the bus')

  const twice = await raw(t, url)
  twice.send(init)
  t.match(await twice.next(), { type: 'connection_ack' })
  twice.send(init)
  t.match(await twice.closed, { code: 4429 })

  const many = await raw(t, url)
  many.send(init)
  t.match(await many.next(), { type: 'connection_ack' })
  many.send({ id: 'a', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  many.send({ id: 'b', type: 'subscribe', payload: { query: 'subscription { runUpdated { nope } }' } })
  t.match(await many.next(), { id: 'b', type: 'error', payload: [{ extensions: { code: 'VALIDATION_FAILED' } }] })
  // A failed operation ends with its error and does not count: the client need not complete it
  // (it used to count until the client did, and `c` closed the connection with 1008).
  many.send({ id: 'c', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 2, 'two subscriptions')
  many.send({ id: 'd', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  t.match(await many.closed, { code: 1008, reason: 'At most 2 subscriptions per connection' })
  await until(() => app.events.bus.subscriptions === 0, 'the closed connection to leave the bus')
  // The refused one has its entry, under its event, as /ws and tRPC record theirs (OVERLOADED).
  await drained(app)
  const overloaded = (await app.audit.store.query({ status: 'OVERLOADED', limit: 10 })).entries
  t.match(overloaded, [{ protocol: 'graphql', path: '/graphql', action: 'runUpdated', statusCode: 503, category: 'read', method: null }])
  t.equal(overloaded.length, 1, 'one entry')

  // A message graphql-transport-ws does not define closes the socket with 4400 (mercurius
  // answered with its own text and no extensions, and a `null` threw in its handler).
  for (const junk of ['not json', 'null', '42', '[]', JSON.stringify({ id: '1', type: 'bogus' }), JSON.stringify({ id: '1', type: 'next', payload: {} }), JSON.stringify({ id: 7, type: 'subscribe', payload: { query: SUBSCRIPTION } })]) {
    const socket = await raw(t, url)
    socket.send(init)
    t.match(await socket.next(), { type: 'connection_ack' })
    socket.send(junk)
    t.match(await socket.closed, { code: 4400, reason: /^Invalid message: / }, junk)
  }
  // A subscribe before connection_init: 4401 (mercurius sent connection_error, a legacy message).
  const early = await raw(t, url)
  early.send({ type: 'subscribe', id: 'x', payload: { query: SUBSCRIPTION } })
  t.same(await early.closed, { code: 4401, reason: 'Unauthorized' }, 'subscribe before connection_init is refused')
  // The legacy graphql-ws protocol answers such a message with an error in the contract's shape.
  const legacy = new WebSocket(url, 'graphql-ws')
  t.teardown(() => legacy.terminate())
  const frames: any[] = []
  legacy.on('message', data => frames.push(JSON.parse(String(data))))
  await new Promise(resolve => legacy.once('open', resolve))
  legacy.send('null')
  legacy.send(JSON.stringify(init))
  await until(() => frames.length === 2, 'the error and the ack')
  t.match(frames, [{ type: 'error', id: null, payload: [{ message: 'Invalid message: not a JSON object', extensions: { code: 'VALIDATION_FAILED', status: 400 } }] }, { type: 'connection_ack' }])

  const big = await raw(t, url)
  big.send({ type: 'connection_init', payload: { pad: 'x'.repeat(2 * 1024 * 1024) } })
  t.equal((await big.closed).code, 1009, 'a frame over the body limit closes the socket')

  // The server is still fine.
  const after = await raw(t, url)
  after.send(init)
  t.match(await after.next(), { type: 'connection_ack' })
})

t.test('a failed subscription ends with its error: it holds neither a place in the bound nor its id', async t => {
  // graphql-transport-ws: an `error` message ends the operation, and graphql-ws' client never
  // sends `complete` after one. A failed subscription (a document validation refuses, a role
  // the caller lacks) used to keep its place in the connection's bound and its id until the
  // client completed it: after BFF_BATCH_MAX_CALLS refusals, the next subscribe closed the
  // connection (1008) with its running subscriptions, and a failed id could not be used again
  // (4409). mercurius kept its own state for each failed id too.
  const { app, url } = await gateway(t, { BFF_BATCH_MAX_CALLS: 3 })
  // mercurius' own connections (internal), for the state it keeps per operation id.
  interface Held { subscriptionContexts: Map<unknown, unknown>, subscriptionIters: Map<unknown, unknown> }
  const { prototype } = createRequire(import.meta.url)('mercurius/lib/subscription-connection.js')
  const handleConnection = prototype.handleConnection
  const held: Held[] = []
  prototype.handleConnection = function (this: Held) { held.push(this); return handleConnection.call(this) }
  t.teardown(() => { prototype.handleConnection = handleConnection })

  // With graphql-ws' client: a running subscription, three refused ones, then a fourth that runs.
  const closes: number[] = []
  const c = client(t, url, auth({ roles: ['viewer'] }))
  c.on('closed', (e) => { closes.push((e as { code: number }).code) })
  const running = collect(c)
  await until(() => app.events.bus.subscriptions === 1, 'the running subscription')
  for (let i = 0; i < 3; i++) {
    const refused = collect(c, 'subscription { runUpdated { nope } }')
    await until(refused.done, `refusal ${i}`)
    t.match(refused.error(), [{ extensions: { code: 'VALIDATION_FAILED' } }])
  }
  const fourth = collect(c)
  await until(() => app.events.bus.subscriptions === 2, 'the fourth subscription to run')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: RUN })
  await until(() => running.results.length === 1 && fourth.results.length === 1, 'the event on both')
  t.same(closes, [], 'the connection stays open')
  t.notOk(running.done() || fourth.done(), 'both subscriptions still run')

  // On a raw socket: ids refused by validation and by the resolver (a token without the role)
  // are free again once their error is out, and mercurius was handed their `complete`.
  const s = await raw(t, url)
  s.send({ type: 'connection_init', payload: auth({ roles: ['viewer'] }) })
  t.match(await s.next(), { type: 'connection_ack' })
  const forbidden = { extensions: [{ type: 'connectionInit', payload: auth({ roles: ['editor'] }) }] }
  for (let i = 0; i < 3; i++) {
    s.send({ id: 'v', type: 'subscribe', payload: { query: 'subscription { runUpdated { nope } }' } })
    t.match(await s.next(), { id: 'v', type: 'error', payload: [{ extensions: { code: 'VALIDATION_FAILED' } }] })
    s.send({ id: 'f', type: 'subscribe', payload: { query: SUBSCRIPTION }, ...forbidden })
    t.match(await s.next(), { id: 'f', type: 'error', payload: [{ extensions: { code: 'FORBIDDEN' } }] })
  }
  await until(() => held.at(-1)!.subscriptionContexts.size === 0 && held.at(-1)!.subscriptionIters.size === 0, 'mercurius to let go of the failed operations')
  // A failed id can name a running subscription; a duplicate of a running one is still refused.
  s.send({ id: 'v', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 3, 'the subscription of a failed id to run')
  s.send({ id: 'v', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  t.match(await s.closed, { code: 4409, reason: 'Subscriber for v already exists' })
  t.same(closes, [])
})

// A `complete` that came in the same read as its `subscribe` (a client that subscribes and
// unsubscribes at once) reached the guard before mercurius had set the subscription up: it was
// dropped as naming no operation, and the subscription ran until the connection closed.
t.test('a complete right behind its subscribe ends the subscription', async t => {
  const { app, url } = await gateway(t)
  const s = await raw(t, url)
  s.send({ type: 'connection_init', payload: auth({ roles: ['viewer'] }) })
  t.match(await s.next(), { type: 'connection_ack' })
  const socket = (s.ws as unknown as { _socket: { cork: () => void, uncork: () => void } })._socket
  for (const id of ['x', 'y']) {
    socket.cork()
    s.send({ id, type: 'subscribe', payload: { query: SUBSCRIPTION } })
    s.send({ id, type: 'complete' })
    socket.uncork()
  }
  s.send({ id: 'z', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 1, 'the subscription z')
  await sleep(30)
  t.equal(app.events.bus.subscriptions, 1, 'x and y do not run')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: RUN })
  const frames: Array<{ id?: string, type: string }> = []
  while (!frames.some(f => f.id === 'z' && f.type === 'next')) frames.push(await s.next())
  t.same(frames.filter(f => f.type === 'next').map(f => f.id), ['z'], 'the event reaches z alone')
  // The ended ids are free again.
  s.send({ id: 'x', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 2, 'x subscribed again')
})

t.test('a connection is closed with 4403 when its token expires', async t => {
  const { app, url } = await gateway(t)
  // exp 3 s ago; the 5 s clock tolerance leaves it good for 1 to 2 more seconds.
  const now = Math.floor(Date.now() / 1000)
  const short = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 'T', roles: ['viewer'], exp: now - 3 })
  const socket = await raw(t, url)
  socket.send({ type: 'connection_init', payload: { authorization: `Bearer ${short}` } })
  t.match(await socket.next(), { type: 'connection_ack' })
  socket.send({ id: '1', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 1, 'subscription')
  const closed = await socket.closed
  t.equal(closed.code, 4403)
  t.match(closed.reason, /expired/)
  await until(() => app.events.bus.subscriptions === 0, 'the expired connection to leave the bus')
})
