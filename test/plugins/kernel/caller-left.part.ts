import t, { type Test } from 'tap'
import { request as httpRequest, type ClientRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import WebSocket from 'ws'
import { buildTestApp, startTestKernel, testManifest, bearer, json, token, until, drained, type TestKernel } from '../../helper.js'

// A call whose caller left (its HTTP request closed, its WebSocket closed) is cancelled: out of
// the connection queue, no retry, a query's Kernel request aborted, its bulkhead slot freed; a
// mutation already sent is let finish (README, "Clients that leave").

const item = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' } }, additionalProperties: false }

async function setup (t: Test, kernelSettings: Record<string, unknown> = {}, cache = false, timeoutMs = 5000) {
  const kernel = await startTestKernel(t, {})
  const m = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs, ...(cache ? { cache: { ttlSeconds: 30 } } : {}) },
    createItem: { type: 'mutation', rest: 'POST /items/:id', kernel: 'POST /v1/items/{id}', input: idInput, output: item, timeoutMs: 5000 }
  }, { retries: 2, circuitBreaker: { threshold: 50, resetTimeoutMs: 200 }, ...kernelSettings })
  // A backoff long enough that a retry would still be to come when the client leaves.
  const app = await buildTestApp(t, { BFF_CACHE_ENABLED: cache }, { manifest: m, kernelUrl: kernel.url, kernelBackoff: { baseMs: 300, capMs: 300 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  return { kernel, app, port }
}

/** A request over a real socket (inject cannot leave), destroyed by the test. */
function send (port: number, method: string, path: string, requestId: string, headers: Record<string, string> = {}): ClientRequest {
  const req = httpRequest({ port, method, path, headers: { ...bearer(), 'x-request-id': requestId, ...headers } })
  req.on('error', () => {})
  req.end()
  return req
}

const hits = (kernel: TestKernel, path: string): number => kernel.requests.filter(r => r.url === path).length

async function auditOf (app: Awaited<ReturnType<typeof setup>>['app'], requestId: string): Promise<Array<{ status: string, statusCode: number }>> {
  await drained(app)
  const res = await app.inject({ url: `/admin/audit?requestId=${requestId}`, headers: bearer() })
  return res.json().entries
}

t.test('a REST client that leaves frees the bulkhead slot at once and its Kernel request is aborted', async t => {
  const { app, kernel, port } = await setup(t, { maxInFlight: 1 })
  let kernelClosed = false
  kernel.on('GET /v1/items/hang', (_req, res) => { res.on('close', () => { kernelClosed = true }) })
  const req = send(port, 'GET', '/api/v1/items/hang', 'left-1')
  await until(() => app.kernel.inFlight() === 1, 'the call to reach the Kernel')
  req.destroy()
  await until(() => app.kernel.inFlight() === 0, 'the slot to be freed (the op allows 5 s)', 2000)
  await until(() => kernelClosed, 'the Kernel request to be aborted', 2000)
  const other = await app.inject({ url: '/api/v1/items/other', headers: bearer() })
  t.equal(other.statusCode, 404, 'another client is served, not refused KERNEL_UNAVAILABLE')
  t.match(await auditOf(app, 'left-1'), [{ status: 'CLIENT_CLOSED', statusCode: 499 }], 'the cancelled call has its audit entry')
})

t.test('a tRPC, GraphQL or batch client over HTTP that leaves frees its slots at once too', async t => {
  const { app, kernel, port } = await setup(t, { maxInFlight: 2 })
  kernel.on('GET /v1/items/hang', () => { /* never answers */ })
  const input = encodeURIComponent(JSON.stringify({ id: 'hang' }))
  for (const [face, method, path, body] of [
    ['tRPC', 'GET', `/trpc/getItem?input=${input}`, undefined],
    ['tRPC batch', 'GET', `/trpc/getItem,getItem?batch=1&input=${encodeURIComponent(JSON.stringify({ 0: { id: 'hang' }, 1: { id: 'hang' } }))}`, undefined],
    ['GraphQL', 'POST', '/graphql', JSON.stringify({ query: '{ getItem(id: "hang") { id } }' })],
    ['REST batch', 'POST', '/api/v1/batch', JSON.stringify({ calls: [{ id: 'a', op: 'getItem', input: { id: 'hang' } }, { id: 'b', op: 'getItem', input: { id: 'hang' } }] })]
  ] as const) {
    const req = httpRequest({ port, method, path, headers: { ...bearer(), ...(body === undefined ? {} : { 'content-type': 'application/json' }) } })
    req.on('error', () => {})
    req.end(body)
    await until(() => app.kernel.inFlight() > 0, `${face}: the call to reach the Kernel`)
    req.destroy()
    await until(() => app.kernel.inFlight() === 0, `${face}: the slots to be freed (the op allows 5 s)`, 2000)
    t.pass(`${face}: freed`)
  }
})

t.test('a REST client that leaves during the backoff gets no retry', async t => {
  const { app, kernel, port } = await setup(t)
  let req: ClientRequest | null = null
  // The 500 comes once the client is gone: a retry would follow after the 300 ms backoff.
  kernel.on('GET /v1/items/e', (_q, res) => { req!.destroy(); setImmediate(() => json(res, 500, {})) })
  req = send(port, 'GET', '/api/v1/items/e', 'left-2')
  await until(() => hits(kernel, '/v1/items/e') === 1, 'the first attempt')
  await until(() => app.kernel.inFlight() === 0, 'the call to end')
  t.equal(hits(kernel, '/v1/items/e'), 1, 'one attempt, no retry')
  t.match(await auditOf(app, 'left-2'), [{ status: 'CLIENT_CLOSED', statusCode: 499 }])
})

t.test('a /ws socket closed with calls in flight frees their slots', async t => {
  const { app, kernel, port } = await setup(t, { maxInFlight: 4 })
  kernel.on('GET /v1/items/h', () => { /* never answers */ })
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?access_token=${token()}`)
  await new Promise(resolve => ws.once('open', resolve))
  for (let i = 0; i < 4; i++) ws.send(JSON.stringify({ id: String(i), op: 'getItem', input: { id: 'h' } }))
  await until(() => app.kernel.inFlight() === 4, 'four calls in flight')
  ws.close()
  await until(() => app.kernel.inFlight() === 0, 'the slots to be freed', 2000)
  const other = await app.inject({ url: '/api/v1/items/x', headers: bearer({ tenant: 'another-tenant' }) })
  t.equal(other.statusCode, 404, 'another tenant is served')
})

t.test('a /ws socket the gateway closes (its token expired) frees its calls\' slots at once, the client answering the close or not', async t => {
  const { app, kernel, port } = await setup(t, { maxInFlight: 4 }, false, 60_000)
  kernel.on('GET /v1/items/h', () => { /* never answers */ })
  const opened = new Promise<WebSocket>(resolve => app.websocketServer.once('connection', resolve))
  // Closed with 4401 at its expiry, 1 s on and the 5 s allowed for clock skew.
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?access_token=${token({ ttlSeconds: 1 })}`)
  ws.on('error', () => {})
  await new Promise(resolve => ws.once('open', resolve))
  const server = await opened
  for (let i = 0; i < 4; i++) ws.send(JSON.stringify({ id: String(i), op: 'getItem', input: { id: 'h' } }))
  await until(() => app.kernel.inFlight() === 4, 'four calls in flight')
  // The client reads nothing more: it never answers the gateway's close.
  ;(ws as unknown as { _socket: { pause: () => void } })._socket.pause()
  t.teardown(() => ws.terminate())
  await until(() => server.readyState !== WebSocket.OPEN, 'the gateway to close the socket', 10_000)
  // Before, 'close' came only at the end of ws' 30 s wait for the client's answer, and the
  // calls kept their slots until then.
  await until(() => app.kernel.inFlight() === 0, 'the slots to be freed', 2000)
  t.equal(server.readyState, WebSocket.CLOSING, 'freed while the close waits for the client')
})

t.test('a mutation already sent is let finish: its outcome is audited and stored for its Idempotency-Key', async t => {
  const { app, kernel, port } = await setup(t)
  let answer: (() => void) | null = null
  kernel.on('POST /v1/items/m1', (_q, res) => { answer = () => json(res, 201, { id: 'm1' }) })
  const req = send(port, 'POST', '/api/v1/items/m1', 'left-3', { 'content-type': 'application/json', 'idempotency-key': 'k-left' })
  await until(() => answer !== null, 'the mutation to reach the Kernel')
  req.destroy()
  // Time for the close to reach the gateway: the call must still be running after it.
  await new Promise(resolve => setTimeout(resolve, 100))
  t.equal(app.kernel.inFlight(), 1, 'the sent mutation still runs')
  answer!()
  await until(() => app.kernel.inFlight() === 0, 'the mutation to end')
  t.match(await auditOf(app, 'left-3'), [{ status: 'ok', statusCode: 201 }], 'audited as carried out')
  const repeat = await app.inject({ method: 'POST', url: '/api/v1/items/m1', headers: { ...bearer(), 'idempotency-key': 'k-left' }, payload: {} })
  t.equal(repeat.statusCode, 201)
  t.equal(repeat.headers['idempotent-replayed'], 'true', 'the repeat gets the stored outcome')
  t.equal(hits(kernel, '/v1/items/m1'), 1, 'the Kernel ran it once')
})

t.test('a mutation still waiting for a connection is cancelled, and its Idempotency-Key is free for a repeat', async t => {
  const { app, kernel, port } = await setup(t, { connections: 1 })
  let release: (() => void) | null = null
  kernel.on('GET /v1/items/busy', (_q, res) => { release = () => json(res, 200, { id: 'busy' }) })
  kernel.on('POST /v1/items/m2', (_q, res) => json(res, 201, { id: 'm2' }))
  const busy = app.inject({ url: '/api/v1/items/busy', headers: bearer() })
  await until(() => release !== null, 'the one connection to be taken')
  const req = send(port, 'POST', '/api/v1/items/m2', 'left-4', { 'content-type': 'application/json', 'idempotency-key': 'k-queued' })
  await until(() => app.kernel.inFlight() === 2, 'the mutation to wait for the connection')
  req.destroy()
  await until(() => app.kernel.inFlight() === 1, 'the mutation to leave the queue', 2000)
  release!()
  t.equal((await busy).statusCode, 200)
  t.equal(hits(kernel, '/v1/items/m2'), 0, 'never sent')
  t.match(await auditOf(app, 'left-4'), [{ status: 'CLIENT_CLOSED', statusCode: 499 }])
  const repeat = await app.inject({ method: 'POST', url: '/api/v1/items/m2', headers: { ...bearer(), 'idempotency-key': 'k-queued' }, payload: {} })
  t.equal(repeat.statusCode, 201, 'the repeat runs, not refused IDEMPOTENCY_CONFLICT')
  t.equal(hits(kernel, '/v1/items/m2'), 1)
})

t.test('callers waiting on a cached query\'s Kernel call are answered when the first caller leaves', async t => {
  const { app, kernel, port } = await setup(t, {}, true)
  let n = 0
  kernel.on('GET /v1/items/c', (_q, res) => { if (++n > 1) json(res, 200, { id: 'c' }) })
  const first = send(port, 'GET', '/api/v1/items/c', 'left-5')
  await until(() => n === 1, 'the first call to reach the Kernel')
  const second = app.inject({ url: '/api/v1/items/c', headers: bearer() })
  await until(() => app.responseCache.cache.inFlight === 1 && app.kernel.inFlight() === 1, 'the second call to wait on the first')
  first.destroy()
  const res = await second
  t.equal(res.statusCode, 200, 'answered by a Kernel call of its own')
  t.same(res.json(), { id: 'c' })
})

t.test('a cancelled attempt is counted: outcome client_closed, sent or still waiting for a connection', async t => {
  const { app, kernel, port } = await setup(t, { connections: 1 })
  kernel.on('GET /v1/items/hang', () => { /* never answers */ })
  const sent = send(port, 'GET', '/api/v1/items/hang', 'left-6')
  await until(() => app.kernel.inFlight() === 1, 'the first call to take the one connection')
  const queued = send(port, 'GET', '/api/v1/items/hang', 'left-7')
  await until(() => app.kernel.inFlight() === 2, 'the second call to wait for the connection')
  queued.destroy()
  await until(() => app.kernel.inFlight() === 1, 'the queued call to leave')
  sent.destroy()
  await until(() => app.kernel.inFlight() === 0, 'the sent call to be aborted', 2000)
  const text = (await app.inject({ url: '/metrics' })).body
  // Before, neither left a Kernel metric: only the pipeline's 4xx.
  t.match(text, /mantle_kernel_request_duration_seconds_count\{op="getItem",outcome="client_closed"\} 2\n/)
  t.notMatch(text, /mantle_kernel_request_duration_seconds_count\{op="getItem",outcome="timeout"\}/, 'not a Kernel timeout')
  t.notMatch(text, /mantle_kernel_rejected_total\{reason=/, 'nor a rejection')
})

// The half-open breaker's one probe, aborted when its caller left, was handed back as if never
// sent: the next call went out as another probe at once, one per client that left, to a Kernel
// that may hang on each (a load balancer or browser giving up before the operation's timeout
// made a stream of them), and no probe's outcome ever closed or opened the breaker.
t.test('a half-open breaker\'s probe whose caller leaves is let finish: its outcome decides, and no other call goes out meanwhile', async t => {
  const { app, kernel, port } = await setup(t, { retries: 0, circuitBreaker: { threshold: 1, resetTimeoutMs: 300 } }, false, 1000)
  kernel.on('GET /v1/items/boom', (_q, res) => json(res, 500, {}))
  let hung = 0
  kernel.on('GET /v1/items/hang', () => { hung++ })
  const open = async (): Promise<void> => {
    t.equal((await app.inject({ url: '/api/v1/items/boom', headers: bearer() })).statusCode, 502)
    t.equal(app.kernel.breakerState(), 'open')
    await until(() => app.kernel.breakerState() === 'half-open', 'the reset time to pass')
  }
  await open()
  for (let i = 0; i < 3; i++) {
    const req = send(port, 'GET', '/api/v1/items/hang', `probe-${i}`)
    await until(() => app.kernel.inFlight() > 0 || hung > i, `call ${i} to run`)
    await new Promise(resolve => setTimeout(resolve, 30))
    req.destroy()
    await new Promise(resolve => setTimeout(resolve, 30))
  }
  t.equal(hung, 1, 'one probe reached the Kernel, not one per client that left')
  const refused = await app.inject({ url: '/api/v1/items/hang', headers: bearer() })
  t.same([refused.statusCode, refused.json().code], [503, 'KERNEL_UNAVAILABLE'], 'the probe is still out: refused fast')
  await until(() => app.kernel.inFlight() === 0, 'the probe to time out (1 s)', 3000)
  t.equal(app.kernel.breakerState(), 'open', 'its timeout opened the breaker again')
  // A Kernel that answers: the probe let finish closes the breaker, its caller gone or not.
  await until(() => app.kernel.breakerState() === 'half-open', 'the reset time to pass')
  kernel.on('GET /v1/items/slowok', (_q, res) => { setTimeout(() => json(res, 200, { id: 'slowok' }), 150) })
  const req = send(port, 'GET', '/api/v1/items/slowok', 'probe-ok')
  await until(() => hits(kernel, '/v1/items/slowok') === 1, 'the probe to reach the Kernel')
  req.destroy()
  await until(() => app.kernel.inFlight() === 0, 'the probe to end')
  t.equal(app.kernel.breakerState(), 'closed', 'its answer closed the breaker')
})

// Every request has the access log's two lines (README, "Errors"): one whose client left while its
// Kernel call ran had only `incoming request`, as Fastify writes `request completed` on the
// answer's 'finish', which never comes once the connection is gone.
t.test('a client that leaves mid-call still has its second access-log line, saying it left', async t => {
  const kernel = await startTestKernel(t, {})
  kernel.on('GET /v1/items/hang', () => { /* never answers */ })
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const m = testManifest({ getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 5000 } })
  const app = await buildTestApp(t, { LOG_LEVEL: 'info' }, { manifest: m, kernelUrl: kernel.url, logger: undefined, logStream })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const req = send(port, 'GET', '/api/v1/items/hang', 'left-log-1')
  await until(() => app.kernel.inFlight() === 1, 'the call to reach the Kernel')
  req.destroy()
  await until(() => app.kernel.inFlight() === 0, 'the call to be cancelled', 2000)
  t.match(await auditOf(app, 'left-log-1'), [{ status: 'CLIENT_CLOSED', statusCode: 499 }])
  const mine = lines.filter(l => l.reqId === 'left-log-1').map(l => l.msg)
  t.same(mine.filter(m => m !== 'incoming request' && m !== 'request completed' && m !== 'request closed by the client'), [], 'no other line')
  const second = lines.find(l => l.reqId === 'left-log-1' && l.msg !== 'incoming request')
  t.match(second, { level: 30, msg: 'request completed', res: { statusCode: 499 }, code: 'CLIENT_CLOSED' }, 'the second line says the client left')
})
