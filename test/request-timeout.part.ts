import t from 'tap'
import { connect, type Socket } from 'node:net'
import WebSocket from 'ws'
import { bearer, buildDemoApp, buildTestApp, json, startTestKernel, testManifest, token, until } from './helper.js'
import { requestTimeouts, HEADERS_TIMEOUT_MS } from '../app.js'

// A client that never finished sending its request (a body, or a head, a byte at a time) held its
// connection for ever: Fastify set no request timeout (Node's requestTimeout 0), and at shutdown
// such a connection is not idle, so the close waited until the process was killed at its grace,
// the audit queue never flushed.

type Gateway = Awaited<ReturnType<typeof buildTestApp>>

async function listen (app: Gateway): Promise<number> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return (app.server.address() as { port: number }).port
}

interface Stalled { socket: Socket, answer: () => string, closed: Promise<void>, stop: () => void }

/** A connection that sends `head`, then one more byte of `drip` every `everyMs`: never done. */
function stalled (t: { teardown: (fn: () => unknown) => void }, port: number, head: string, drip: string, everyMs = 100): Stalled {
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
  let answer = ''
  socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
  socket.on('error', () => {})
  const closed = new Promise<void>(resolve => socket.once('close', () => resolve()))
  socket.on('end', () => socket.end())
  socket.write(head)
  const timer = setInterval(() => { if (socket.writable) socket.write(drip) }, everyMs)
  const stop = (): void => clearInterval(timer)
  socket.once('close', stop)
  t.teardown(() => { stop(); socket.destroy() })
  return { socket, answer: () => answer, closed, stop }
}

// With a valid token: without one it is refused 401 before its body is awaited.
const STALLED_BODY = `POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"na`
const STALLED_HEAD = 'GET /healthz HTTP/1.1\r\nHost: x\r\n'

function problemOf (answer: string): Record<string, unknown> {
  return JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as Record<string, unknown>
}

t.test('the server\'s timeouts: the head within 10 s, the whole request within BFF_REQUEST_TIMEOUT_MS, checked every tenth of it', async t => {
  t.same(requestTimeouts(30_000), { requestTimeout: 30_000, headersTimeout: HEADERS_TIMEOUT_MS, connectionsCheckingInterval: 3000 })
  t.same(requestTimeouts(500), { requestTimeout: 500, headersTimeout: 500, connectionsCheckingInterval: 100 })
  t.same(requestTimeouts(600_000), { requestTimeout: 600_000, headersTimeout: HEADERS_TIMEOUT_MS, connectionsCheckingInterval: 5000 })
  const app = await buildTestApp(t)
  t.equal(app.server.requestTimeout, 30_000, 'the default')
  t.equal(app.server.headersTimeout, HEADERS_TIMEOUT_MS)
  const short = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 400 })
  t.equal(short.server.requestTimeout, 400)
  t.equal(short.server.headersTimeout, 400, 'never above the request timeout')
})

t.test('a body or a head that never finishes arriving is answered 408 problem+json and its connection closed', async t => {
  const app = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 500 })
  const port = await listen(app)
  const started = Date.now()
  const body = stalled(t, port, STALLED_BODY, 'a')
  const head = stalled(t, port, STALLED_HEAD, 'X: y\r\n')
  await Promise.all([body.closed, head.closed])
  const took = Date.now() - started
  t.ok(took < 4000, `both closed in ${took} ms`)
  for (const [name, s] of [['body', body], ['head', head]] as const) {
    t.match(s.answer(), /^HTTP\/1\.1 408 Request Timeout\r\n/, `${name}: 408`)
    t.match(s.answer(), /\r\nContent-Type: application\/problem\+json\r\n/i, `${name}: problem+json`)
    t.match(s.answer(), /\r\nConnection: close\r\n/i)
    t.match(problemOf(s.answer()), { status: 408, code: 'BAD_REQUEST', detail: 'The request took too long to arrive', requestId: String })
  }
  const health = await fetch(`http://127.0.0.1:${port}/healthz`)
  t.equal(health.status, 200, 'the gateway serves on')
})

t.test('a request answered 408 is counted once, as the 408 it was answered', async t => {
  // It ends, once its connection closes, as Node's 'aborted' (CLIENT_CLOSED): it was counted a
  // second time in mantle_http_errors_total, as a 499 no one was sent, beside its 408.
  const app = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 500 })
  let open = 0
  app.server.on('connection', (socket: Socket) => { open++; socket.once('close', () => { open-- }) })
  const port = await listen(app)
  const body = stalled(t, port, STALLED_BODY, 'a')
  await body.closed
  t.match(body.answer(), /^HTTP\/1\.1 408 /)
  await until(() => open === 0, 'the connection closed on the gateway\'s side', 3000)
  // The request's error handling follows its connection's close within the same turn or the next.
  await new Promise(resolve => setTimeout(resolve, 100))
  const metrics = (await app.inject({ url: '/metrics' })).body
  t.match(metrics, /mantle_http_errors_total\{code="BAD_REQUEST",status="408"\} 1\n/, 'its 408')
  t.notMatch(metrics, /mantle_http_errors_total\{code="CLIENT_CLOSED"/, 'no 499 beside it')
})

// A request whose body was too slow is a request already: it has its id, its access-log line and
// (on the gateway's own endpoints) its audit entry under that id. Its 408 carried another id, made
// for the answer, in x-request-id and the body's requestId: even the client's own x-request-id
// came back as some other one, and neither could be found in the logs or the audit trail.
t.test('a request answered 408 for its body is answered with its own request id', async t => {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const app = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 500, LOG_LEVEL: 'info' }, { logger: undefined, logStream })
  const port = await listen(app)
  const own = stalled(t, port, STALLED_BODY.replace('\r\n\r\n', '\r\nx-request-id: slow-body-1\r\n\r\n'), 'a')
  await own.closed
  t.match(own.answer(), /^HTTP\/1\.1 408 /)
  t.match(own.answer(), /\r\nx-request-id: slow-body-1\r\n/, 'the client\'s own id in the header')
  t.equal(problemOf(own.answer()).requestId, 'slow-body-1', 'and in the body')
  const made = stalled(t, port, STALLED_BODY, 'a')
  await made.closed
  const id = /\r\nx-request-id: ([^\r]+)\r\n/.exec(made.answer())?.[1]
  t.equal(problemOf(made.answer()).requestId, id)
  const incoming = lines.filter(l => l.msg === 'incoming request' && l.reqId !== 'slow-body-1').map(l => l.reqId)
  t.same(incoming, [id], 'a gateway-made id: the one its access-log line carries')
  // Its access log's second line too, with what it was answered (it ends as its client's leaving
  // would: Fastify's own line never came).
  await until(() => lines.some(l => l.reqId === id && l.msg === 'request completed'), 'its request completed line')
  t.match(lines.find(l => l.reqId === id && l.msg === 'request completed'), { res: { statusCode: 408 }, code: 'BAD_REQUEST' })
})

t.test('a request whose body still arrives at shutdown is answered 503 with its own request id', async t => {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const app = await buildTestApp(t, { LOG_LEVEL: 'info' }, { logger: undefined, logStream })
  const port = await listen(app)
  const body = stalled(t, port, STALLED_BODY.replace('\r\n\r\n', '\r\nx-request-id: arriving-1\r\n\r\n'), 'a', 200)
  await until(() => lines.some(l => l.reqId === 'arriving-1'), 'the request to be read')
  await app.close()
  await body.closed
  t.match(body.answer(), /^HTTP\/1\.1 503 /)
  t.match(body.answer(), /\r\nx-request-id: arriving-1\r\n/, 'the client\'s own id')
  t.equal(problemOf(body.answer()).requestId, 'arriving-1')
})

t.test('a body that arrives whole after its 408 runs nothing', async t => {
  // Its answer went out while the body still came: the rest arriving within the linger completed
  // the request, and the call ran, a mutation included, behind the 408 the client was given.
  const kernel = await startTestKernel(t, { 'POST /v1/agents': (_req, res) => { json(res, 201, { id: 'a9', name: 'n', model: 'm', description: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z' }) } })
  const app = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 300 }, { kernelUrl: kernel.url })
  const port = await listen(app)
  const payload = '{"name":"late","model":"m"}'
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
  t.teardown(() => socket.destroy())
  let answer = ''
  socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
  socket.on('error', () => {})
  socket.write(`POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: ${payload.length}\r\n\r\n${payload.slice(0, 4)}`)
  await until(() => answer.includes('\r\n\r\n'), 'the 408', 3000)
  t.match(answer, /^HTTP\/1\.1 408 /)
  socket.write(payload.slice(4))
  await new Promise(resolve => setTimeout(resolve, 500))
  t.equal(kernel.requests.length, 0, 'the call did not run')
  t.equal((answer.match(/HTTP\/1\.1 \d+/g) ?? []).length, 1, 'one answer')
})

t.test('the timeout is the request\'s arrival only: a slow call, an SSE stream and a WebSocket live past it', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/slow': (_req, res) => { setTimeout(() => json(res, 200, { ok: true }), 900) } })
  const manifest = testManifest({ slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', input: { type: 'object', properties: {} }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } } })
  const slowApp = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 300, BFF_CACHE_ENABLED: false }, { manifest, kernelUrl: kernel.url })
  const slowPort = await listen(slowApp)
  const slow = await fetch(`http://127.0.0.1:${slowPort}/api/v1/slow`, { headers: bearer() })
  t.equal(slow.status, 200, 'a call answered after three times the timeout')

  const app = await buildDemoApp(t, { BFF_REQUEST_TIMEOUT_MS: 300 })
  const port = await listen(app)
  const controller = new AbortController()
  t.teardown(() => controller.abort())
  const stream = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated`, { headers: { ...bearer({ tenant: 'live', roles: ['viewer'] }), accept: 'text/event-stream' }, signal: controller.signal })
  t.equal(stream.status, 200)
  let text = ''
  let ended = false
  const reader = stream.body!.getReader()
  const reading = (async () => {
    for (;;) {
      const chunk = await reader.read().catch(() => ({ done: true, value: undefined }))
      if (chunk.done) { ended = true; return }
      text += Buffer.from(chunk.value).toString()
    }
  })()
  const socket = new WebSocket(`ws://127.0.0.1:${port}/ws?access_token=${token()}`)
  t.teardown(() => socket.terminate())
  let wsClosed = false
  socket.on('close', () => { wsClosed = true })
  await new Promise<void>((resolve, reject) => { socket.once('open', () => resolve()); socket.once('error', reject) })
  await until(() => app.events.bus.subscriptions === 1, 'the SSE subscription')
  // Five times the timeout, and so several of Node's checks (every 100 ms here).
  await new Promise(resolve => setTimeout(resolve, 1500))
  const now = new Date().toISOString()
  await app.events.publish({ topic: 'runs.updated', tenantId: 'live', payload: { id: 'r-late', agentId: 'a1', status: 'running', temperature: 0.7, promptChars: 5, output: null, error: null, createdAt: now, updatedAt: now, startedAt: null, finishedAt: null } })
  await until(() => text.includes('r-late') || ended, 'the event on the SSE stream')
  t.notOk(ended, 'the SSE stream is still open')
  t.match(text, /r-late/, 'and carries the event published after the timeout')
  t.notMatch(text, /408/)
  const pong = new Promise<boolean>(resolve => { socket.once('pong', () => resolve(true)); setTimeout(() => resolve(false), 2000) })
  socket.ping()
  t.ok(await pong, 'the WebSocket answers a ping after the timeout')
  t.notOk(wsClosed, 'the WebSocket is still open')
  controller.abort()
  await reading
})

t.test('at shutdown, requests still arriving are answered 503 once no call is in flight: the close completes, the audit flushed', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/slow': (_req, res) => { setTimeout(() => json(res, 200, { ok: true }), 600) }
  })
  // POST /agents served (STALLED_BODY's route): a request to no route is answered 404 before its body arrives.
  const manifest = testManifest({
    slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', input: { type: 'object', properties: {} }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } },
    make: { type: 'mutation', rest: 'POST /agents', kernel: 'POST /v1/agents', input: { type: 'object', properties: {} }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  })
  // The default timeout (30 s): a request still arriving at shutdown would hold the close that long.
  // No flush by the audit's interval within the test: only the close's.
  const app = await buildTestApp(t, { BFF_CACHE_ENABLED: false }, { manifest, kernelUrl: kernel.url, audit: { flushIntervalMs: 600_000 } })
  const port = await listen(app)
  const body = stalled(t, port, STALLED_BODY, 'a', 500)
  const head = stalled(t, port, STALLED_HEAD, 'X: y\r\n', 500)
  // Connected, and never a byte sent (a browser's preconnect): not idle to Node either.
  const silent = connect({ port, host: '127.0.0.1' })
  t.teardown(() => silent.destroy())
  silent.on('error', () => {})
  let heard = ''
  silent.on('data', (chunk: Buffer) => { heard += chunk.toString('latin1') })
  const silentClosed = new Promise<void>(resolve => silent.once('close', () => resolve()))
  const call = fetch(`http://127.0.0.1:${port}/api/v1/slow`, { headers: bearer() })
  await until(() => kernel.requests.length === 1, 'the slow call to reach the Kernel')
  const started = Date.now()
  const closing = app.close()
  // While the call is in flight, those still arriving wait with it.
  await new Promise(resolve => setTimeout(resolve, 200))
  t.equal(body.answer(), '', 'no answer while a call is in flight')
  t.equal(head.answer(), '')
  const res = await call
  t.equal(res.status, 200, 'the call in flight is answered')
  await closing
  const took = Date.now() - started
  t.ok(took < 3000, `the close took ${took} ms`)
  for (const [name, s] of [['body', body], ['head', head]] as const) {
    t.match(s.answer(), /^HTTP\/1\.1 503 Service Unavailable\r\n/, `${name}: 503`)
    t.match(s.answer(), /\r\nRetry-After: 1\r\n/i)
    t.match(problemOf(s.answer()), { status: 503, code: 'OVERLOADED', detail: /shutting down/ })
  }
  await silentClosed
  t.equal(heard, '', 'a connection that asked nothing is closed unanswered')
  t.equal(app.audit.health().queueDepth, 0, 'the audit queue was flushed')
  const entries = (await app.audit.store.query({ limit: 10 })).entries
  t.ok(entries.some(e => e.action === 'slow' && e.statusCode === 200), 'the call\'s entry is stored')
})

/** A raw connection that sends `text` and records what it reads; it ends when the gateway does. */
function rawClient (t: { teardown: (fn: () => unknown) => void }, port: number, text: string): { answer: () => string, closed: Promise<void>, socket: Socket } {
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
  let answer = ''
  socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
  socket.on('error', () => {})
  socket.on('end', () => socket.end())
  const closed = new Promise<void>(resolve => socket.once('close', () => resolve()))
  if (text !== '') socket.write(text)
  t.teardown(() => socket.destroy())
  return { answer: () => answer, closed, socket }
}

const AGENT = { id: 'a9', name: 'n', model: 'm', description: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z' }

t.test('a request timing out pipelined behind a call that runs: the call\'s own answer goes out, then the connection closes', async t => {
  // The 408 was written in front of the earlier call's answer, not yet begun: the client read it as
  // that call's answer, though the call had reached the Kernel, and its real answer was lost.
  const kernel = await startTestKernel(t, { 'POST /v1/agents': (_req, res) => { setTimeout(() => json(res, 201, AGENT), 900) } })
  const app = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 300 }, { kernelUrl: kernel.url })
  const port = await listen(app)
  const payload = '{"name":"n","model":"m"}'
  const client = rawClient(t, port, `POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: ${payload.length}\r\n\r\n${payload}` +
    STALLED_HEAD)
  await client.closed
  t.equal(kernel.requests.length, 1, 'the call ran')
  t.match(client.answer(), /^HTTP\/1\.1 201 Created\r\n/, 'its own answer, not a 408')
  t.match(client.answer(), /\r\nConnection: close\r\n/i, 'which says the connection closes')
  t.match(client.answer(), /"id":"a9"/)
  t.equal((client.answer().match(/HTTP\/1\.1 \d+/g) ?? []).length, 1, 'one answer')
})

t.test('a GET whose handler runs with a body announced and never sent is in flight: answered, not 408 nor 503 at shutdown', async t => {
  // Fastify runs a GET without waiting for a body: its call reached the Kernel, yet the request,
  // incomplete, was taken for one that never reached a handler.
  const kernel = await startTestKernel(t, { 'GET /v1/slow': (_req, res) => { setTimeout(() => json(res, 200, { ok: true }), 700) } })
  const manifest = testManifest({ slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', input: { type: 'object', properties: {} }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } } })
  const request = `GET /api/v1/slow HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Length: 5\r\n\r\n`

  const timed = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 300, BFF_CACHE_ENABLED: false }, { manifest, kernelUrl: kernel.url })
  const timedClient = rawClient(t, await listen(timed), request)
  await timedClient.closed
  t.match(timedClient.answer(), /^HTTP\/1\.1 200 OK\r\n/, 'past the request timeout: the call\'s answer, not a 408')
  t.match(timedClient.answer(), /\r\nConnection: close\r\n/i)

  const app = await buildTestApp(t, { BFF_CACHE_ENABLED: false }, { manifest, kernelUrl: kernel.url, audit: { flushIntervalMs: 600_000 } })
  const port = await listen(app)
  const before = kernel.requests.length
  const client = rawClient(t, port, request)
  await until(() => kernel.requests.length === before + 1, 'the call to reach the Kernel')
  await app.close()
  await client.closed
  t.match(client.answer(), /^HTTP\/1\.1 200 OK\r\n/, 'at shutdown: the call\'s answer, not a 503')
  t.equal((client.answer().match(/HTTP\/1\.1 \d+/g) ?? []).length, 1, 'and nothing after it')
  const entries = (await app.audit.store.query({ limit: 10 })).entries
  t.ok(entries.some(e => e.action === 'slow' && e.statusCode === 200), 'audited as answered')
})

t.test('a connection that sends nothing within the head\'s timeout is closed unanswered', async t => {
  // Node times a fresh connection's head from the connect: a browser's preconnect, or a pool's
  // spare, was sent an unasked 408, which a client sending its first request then read as its answer.
  const app = await buildTestApp(t, { BFF_REQUEST_TIMEOUT_MS: 300 })
  const port = await listen(app)
  const started = Date.now()
  const silent = rawClient(t, port, '')
  await silent.closed
  t.ok(Date.now() - started < 3000, 'closed')
  t.equal(silent.answer(), '', 'nothing written')
  const started2 = rawClient(t, port, 'GET /healthz HTTP/1.1\r\nHost: x\r\n')
  await started2.closed
  t.match(started2.answer(), /^HTTP\/1\.1 408 /, 'a head begun still gets its 408')
})
