import t from 'tap'
import pino from 'pino'
import type { FastifyBaseLogger } from 'fastify'
import { requestLoggerFactory } from '../request-logger.js'
import { buildApp } from '../app.js'
import { loadConfig } from '../schemas/config.js'
import { connect, type AddressInfo } from 'node:net'
import { closedPort, bearer, demoManifest, startTestKernel, testConfig, testManifest, until } from './helper.js'
import { connect as wsConnect } from './adapters/websocket-helper.js'

/** A pino logger writing its lines into `lines`, with a count of the children made from it. */
function capture (level: string): { root: FastifyBaseLogger, lines: Array<Record<string, unknown>>, children: () => number } {
  const lines: Array<Record<string, unknown>> = []
  const root = pino({ level, redact: { paths: ['req.headers.authorization', '*.input'], censor: '[redacted]' } }, { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } })
  let children = 0
  // pino's children inherit from their parent: a grandchild is made by the same function.
  const child = root.child
  root.child = function (this: typeof root, bindings, options) {
    if (this === root) children++
    return child.call(this, bindings, options)
  } as typeof root.child
  return { root, lines, children: () => children }
}

t.test('no pino child is made until a line is written at a level in force', async t => {
  const { root, lines, children } = capture('warn')
  const log = requestLoggerFactory(root, { reqId: 'r1' }, {})
  log.info('incoming request')
  log.debug({ a: 1 }, 'detail')
  log.trace('trace')
  log.silent('nothing')
  t.equal(children(), 0, 'lines below the level make no child')
  t.equal(lines.length, 0)
  log.warn({ code: 'X' }, 'call failed')
  log.error(new Error('boom'))
  log.fatal('fatal')
  t.equal(children(), 1, 'one child, made on the first line written and kept')
  t.same(lines.map(l => [l.reqId, l.msg]), [['r1', 'call failed'], ['r1', 'boom'], ['r1', 'fatal']], 'every line carries the bindings')
  t.equal(lines[0].code, 'X')
})

t.test('the parent\'s redaction applies to the lines written', async t => {
  const { root, lines } = capture('info')
  const log = requestLoggerFactory(root, { reqId: 'r2' }, {})
  log.info({ req: { headers: { authorization: 'Bearer SECRET' } }, call: { input: 'SECRET' } }, 'logged')
  t.notOk(JSON.stringify(lines).includes('SECRET'), 'no secret in the line')
  t.equal(lines[0].reqId, 'r2')
})

t.test('a route\'s level (the options Fastify passes) and a level set later are honoured', async t => {
  const { root, lines, children } = capture('warn')
  const log = requestLoggerFactory(root, { reqId: 'r3' }, { level: 'debug' })
  t.equal(log.level, 'debug')
  log.trace('not written')
  t.equal(children(), 0)
  log.debug('written at debug')
  t.equal(lines.length, 1)
  t.equal(log.level, 'debug', 'the child has the route\'s level')

  const later = requestLoggerFactory(root, { reqId: 'r4' }, {})
  t.equal(later.level, 'warn', 'the parent\'s level by default')
  later.level = 'trace'
  later.trace('before the child exists')
  t.equal(lines.at(-1)?.msg, 'before the child exists')
  later.level = 'error'
  later.warn('not written')
  t.equal(lines.at(-1)?.msg, 'before the child exists', 'the child follows a level set after it was made')
  t.equal(later.level, 'error')
})

t.test('child() gives a pino child carrying both sets of bindings', async t => {
  const { root, lines } = capture('info')
  const log = requestLoggerFactory(root, { reqId: 'r5' }, {})
  log.child({ op: 'getAgent' }).info('nested')
  t.same([lines[0].reqId, lines[0].op, lines[0].msg], ['r5', 'getAgent', 'nested'])
})

t.test('under Fastify\'s null logger (logging off), the null logger itself', async t => {
  const app = await buildApp(loadConfig({ NODE_ENV: 'test', LOG_LEVEL: 'silent', BFF_AUDIT_ENABLED: 'false' }), { logger: false })
  t.teardown(() => app.close())
  app.get('/log', async (request) => {
    request.log.error('dropped')
    return { same: request.log === app.log }
  })
  const res = await app.inject({ url: '/log' })
  t.same(res.json(), { same: true })
})

t.test('the gateway: a request\'s error line carries its request id', async t => {
  const lines: string[] = []
  const config = loadConfig({ NODE_ENV: 'test', LOG_LEVEL: 'warn', BFF_AUDIT_ENABLED: 'false' })
  const app = await buildApp(config, { logStream: { write: (line: string) => { lines.push(line) } } })
  t.teardown(() => app.close())
  app.get('/boom', async (request) => {
    request.log.info('below the level')
    request.log.error({ where: 'test' }, 'a handler failed')
    return { ok: true }
  })
  const res = await app.inject({ url: '/boom', headers: { 'x-request-id': 'rid-logger-test' } })
  t.equal(res.statusCode, 200)
  const mine = lines.map(l => JSON.parse(l) as Record<string, unknown>).filter(l => l.reqId === 'rid-logger-test')
  t.same(mine.map(l => l.msg), ['a handler failed'], 'the line written, with the request id; the info line dropped')
})

/** A log stream read back as lines, and a manifest of one query whose Kernel cannot be reached. */
async function unreachableKernel (): Promise<{ lines: Array<Record<string, unknown>>, logStream: { write: (line: string) => void }, kernelUrl: string, manifest: ReturnType<typeof testManifest> }> {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const kernelUrl = `http://127.0.0.1:${await closedPort()}`
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object' } }
  }, { url: kernelUrl, retries: 0 })
  return { lines, logStream, kernelUrl, manifest }
}

// A refusal is the client's answer, counted by metrics, never a log line per request, on every
// face by one rule (errors.ts logLevelOf). REST logged every 5xx at warn as `call failed`: with
// the heap bound passed, 1,000 shed calls wrote 1,000 lines; so did an open breaker's refusals,
// made without a Kernel call. A Kernel that cannot be reached is still a warn, on every face.
t.test('refusals write no log line per request; a Kernel that failed the call is a warn on every face', async t => {
  const { lines, logStream, kernelUrl, manifest } = await unreachableKernel()
  const headers = bearer()
  const trpcUrl = '/trpc/getItem?input=' + encodeURIComponent('{"id":"i1"}')

  // A Kernel that cannot be reached: a warn per call, on REST and on tRPC alike.
  const failing = await buildApp(testConfig({ LOG_LEVEL: 'warn', BFF_CIRCUIT_BREAKER_THRESHOLD: 2 }), { logStream, manifest, kernelUrl })
  t.teardown(() => failing.close())
  const rest = await failing.inject({ url: '/api/v1/items/i1', headers })
  t.equal(rest.json().code, 'KERNEL_UNAVAILABLE')
  t.equal(rest.headers['retry-after'], undefined, 'the Kernel was called and could not be reached')
  t.equal((await failing.inject({ url: trpcUrl, headers })).json().error.data.code, 'KERNEL_UNAVAILABLE')
  // The second failure opens the breaker: one warn says so, once, with why.
  t.match(lines, [{ level: 40, msg: 'call failed', code: 'KERNEL_UNAVAILABLE', requestId: rest.json().requestId }, { level: 40, msg: 'the Kernel circuit breaker opened', origin: kernelUrl, reason: 'consecutive' }, { level: 40, msg: 'call failed', code: 'KERNEL_UNAVAILABLE', requestId: String }])
  t.equal(lines.length, 3)
  // The breaker is open now: its refusals, without a Kernel call, write nothing.
  lines.length = 0
  for (let i = 0; i < 20; i++) {
    const refused = await failing.inject({ url: '/api/v1/items/i1', headers })
    t.equal(refused.statusCode, 503)
    t.not(refused.headers['retry-after'], undefined, 'the open breaker\'s refusal')
    await failing.inject({ url: trpcUrl, headers })
  }
  t.same(lines, [], 'no line for an open breaker\'s refusals')

  // Load shed (the heap bound passed): every call refused OVERLOADED, no line for any of them.
  const shedding = await buildApp(testConfig({ LOG_LEVEL: 'warn', BFF_MAX_HEAP_BYTES: 1 }), { logStream, manifest, kernelUrl, pressureSampleIntervalMs: 100 })
  t.teardown(() => shedding.close())
  // Shed, not refused for the Kernel (also a 503 here): a gateway built fast answered before its
  // first pressure sample.
  let last: unknown = null
  const poll = setInterval(() => { shedding.inject({ url: '/api/v1/items/i1', headers }).then(r => { last = r.json().code }, () => {}) }, 10)
  try {
    await until(() => last === 'OVERLOADED', 'a REST call shed', 10_000)
  } finally {
    clearInterval(poll)
  }
  lines.length = 0
  for (let i = 0; i < 100; i++) {
    const res = await shedding.inject({ url: '/api/v1/items/i1', headers })
    t.equal(res.json().code, 'OVERLOADED')
  }
  await shedding.inject({ url: trpcUrl, headers })
  await shedding.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ getItem(id: "i1") }' } })
  t.same(lines, [], 'no line for a shed call, on any face')
})

// One client could write warn lines without limit: a batch of 50 calls the Kernel failed wrote 50
// `call failed` lines, a /ws connection with calls in flight ~1,700 a second. They are bounded
// per operation and code (call-failed-log.ts), on every face together; each line of a call an
// HTTP request carried has the request's reqId, as the access log's lines do.
t.test('call failed lines: at most 10 per operation and code, then how many were left out; each with its request\'s reqId', async t => {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const kernel = await startTestKernel(t)
  for (let i = 0; i < 60; i++) kernel.on(`GET /v1/items/i${i}`, (_req, res) => { res.writeHead(500).end('{}') })
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object' } },
    getOther: { type: 'query', rest: 'GET /others/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object' } }
  }, { url: kernel.url, retries: 0 })
  const app = await buildApp(testConfig({ LOG_LEVEL: 'warn', BFF_CIRCUIT_BREAKER_THRESHOLD: 1000 }), { logStream, manifest, kernelUrl: kernel.url })
  t.teardown(() => app.close())
  const headers = bearer()
  const failed = (): Array<Record<string, unknown>> => lines.filter(l => l.msg === 'call failed')

  const calls = Array.from({ length: 50 }, (_, i) => ({ id: String(i), op: 'getItem', input: { id: `i${i}` } }))
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: { ...headers, 'x-request-id': 'rid-batch' }, payload: { calls } })
  t.equal(batch.statusCode, 200)
  t.equal((batch.json() as { results: Array<{ error?: { code: string } }> }).results.filter(r => r.error?.code === 'KERNEL_ERROR').length, 50, 'every call failed')
  t.equal(failed().length, 10, '10 lines for 50 failed calls')
  t.ok(failed().every(l => l.level === 40 && l.code === 'KERNEL_ERROR' && l.reqId === 'rid-batch' && String(l.requestId).startsWith('rid-batch.')), 'each with the batch\'s reqId and its call\'s requestId')
  // The bound is the operation's, on every face: REST's next failure of getItem writes nothing.
  t.equal((await app.inject({ url: '/api/v1/items/i1', headers })).json().code, 'KERNEL_ERROR')
  t.equal(failed().length, 10, 'no line past the bound, on another face either')
  // Another operation has its own bound, and a REST line its reqId.
  await app.inject({ url: '/api/v1/others/i1', headers: { ...headers, 'x-request-id': 'rid-rest' } })
  t.match(failed().at(-1), { code: 'KERNEL_ERROR', reqId: 'rid-rest' })
  t.equal(failed().length, 11)

  // The interval ends (here at the close): one line per key with what it left out.
  await app.close()
  t.same(lines.filter(l => l.msg === 'call failed lines suppressed').map(l => [l.level, l.op, l.code, l.suppressed]), [[40, 'getItem', 'KERNEL_ERROR', 41]])
  const metric = await app.metrics.registry.getSingleMetricAsString('mantle_log_lines_suppressed_total')
  t.match(metric, /mantle_log_lines_suppressed_total\{op="getItem",code="KERNEL_ERROR"\} 41/)
})

// A /ws call's lines had no reqId: nothing tied them to the connection's access-log lines. They
// carry the upgrade request's, the connection's.
t.test('call failed lines of tRPC, GraphQL and /ws carry their request\'s reqId (on /ws, the upgrade\'s)', async t => {
  const { lines, logStream, kernelUrl, manifest } = await unreachableKernel()
  const app = await buildApp(testConfig({ LOG_LEVEL: 'warn', BFF_CIRCUIT_BREAKER_THRESHOLD: 1000 }), { logStream, manifest, kernelUrl })
  t.teardown(() => app.close())
  const headers = bearer()
  const input = encodeURIComponent('{"id":"i1"}')
  await app.inject({ url: `/trpc/getItem?input=${input}`, headers: { ...headers, 'x-request-id': 'rid-trpc' } })
  await app.inject({ url: `/trpc/getItem?batch=1&input=${encodeURIComponent('{"0":{"id":"i1"}}')}`, headers: { ...headers, 'x-request-id': 'rid-trpc-batch' } })
  await app.inject({ method: 'POST', url: '/graphql', headers: { ...headers, 'x-request-id': 'rid-graphql' }, payload: { query: '{ getItem(id: "i1") }' } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const ws = await wsConnect(t, `ws://127.0.0.1:${(app.server.address() as AddressInfo).port}/ws`, {}, { headers: { 'x-request-id': 'rid-ws' } })
  const answer = await ws.request({ id: '1', op: 'getItem', input: { id: 'i1' } })
  t.equal(answer.error?.code, 'KERNEL_UNAVAILABLE')
  t.same(lines.filter(l => l.msg === 'call failed').map(l => [l.code, l.reqId, l.requestId]), [
    ['KERNEL_UNAVAILABLE', 'rid-trpc', 'rid-trpc'],
    ['KERNEL_UNAVAILABLE', 'rid-trpc-batch', 'rid-trpc-batch.0'],
    ['KERNEL_UNAVAILABLE', 'rid-graphql', 'rid-graphql.0'],
    ['KERNEL_UNAVAILABLE', 'rid-ws', answer.error.requestId]
  ])
  // So does a call's `unexpected error` line (a gateway bug, INTERNAL), on these faces as on REST.
  const entry = app.pipeline.entry
  app.pipeline.entry = () => { throw new TypeError('a bug') }
  t.teardown(() => { app.pipeline.entry = entry })
  const bug = await ws.request({ id: '2', op: 'getItem', input: { id: 'i1' } })
  t.equal(bug.error?.code, 'INTERNAL')
  await app.inject({ method: 'POST', url: '/api/v1/batch', headers: { ...headers, 'x-request-id': 'rid-batch' }, payload: { calls: [{ id: 'a', op: 'getItem', input: { id: 'i1' } }] } })
  t.same(lines.filter(l => l.msg === 'unexpected error').map(l => [l.level, l.reqId, l.requestId]), [[50, 'rid-ws', bug.error.requestId], [50, 'rid-batch', 'rid-batch.0']])
})

// The access log's url: a target in absolute form, which REST serves, was logged as sent, with
// its credentials, and a 404 under /api/v1 unredacted; a url or a host of 16 KB was logged whole.
t.test('the access log: an absolute-form target is logged as its path; url and host are cut to 512 characters', async t => {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const app = await buildApp(testConfig({ LOG_LEVEL: 'info', BFF_AUTH_ENABLED: false }), { logStream, manifest: await demoManifest() })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const raw = async (head: string): Promise<string> => await new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => { socket.write(head) })
    let answer = ''
    socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
    socket.on('close', () => { resolve(answer) })
    socket.on('error', reject)
  })
  const logged = (): Array<Record<string, unknown>> => lines.filter(l => l.msg === 'incoming request').map(l => l.req as Record<string, unknown>)

  const served = await raw('GET http://user:ABSPASS-SECRET@h.example/api/v1/agents?limit=1 HTTP/1.1\r\nHost: h.example\r\nConnection: close\r\n\r\n')
  t.match(served, /^HTTP\/1\.1 (200|503) /, 'REST serves a target in absolute form (the Kernel answers or not)')
  t.same(logged().at(-1), { method: 'GET', url: '/api/v1/agents?limit=[redacted]', host: 'h.example', remoteAddress: '127.0.0.1', remotePort: logged().at(-1)?.remotePort }, 'logged as its path and query')
  t.match(await raw('GET http://h.example/api/v1/NOROUTE-SECRET HTTP/1.1\r\nHost: h.example\r\nConnection: close\r\n\r\n'), /^HTTP\/1\.1 404 /)
  t.equal(logged().at(-1)?.url, '/api/v1/[redacted]', 'a 404 under /api/v1 in absolute form: the prefix only')
  t.notOk(JSON.stringify(lines).includes('SECRET'), 'no line carries the credentials or the path')
  await raw('OPTIONS * HTTP/1.1\r\nHost: h.example\r\nConnection: close\r\n\r\n')
  t.equal(logged().at(-1)?.url, '[redacted]', 'a target that is no URL')

  const long = `/healthz?${'q'.repeat(6_000)}`
  await raw(`GET ${long} HTTP/1.1\r\nHost: ${'h'.repeat(6_000)}.example\r\nConnection: close\r\n\r\n`)
  const last = logged().at(-1)!
  t.equal(last.url, '/healthz?[redacted]', 'a query is redacted, not cut')
  const path = `/healthz/${'p'.repeat(6_000)}`
  await raw(`GET ${path} HTTP/1.1\r\nHost: ${'h'.repeat(6_000)}.example\r\nConnection: close\r\n\r\n`)
  const cut = logged().at(-1)!
  t.equal(cut.url, path.slice(0, 512) + '...[cut]', 'a url: its first 512 characters, marked')
  t.equal(cut.host, 'h'.repeat(512) + '...[cut]', 'a host: its first 512 characters, marked')
  t.ok(lines.every(l => JSON.stringify(l).length < 2_000), 'no line of 6 KB')
})

// Requests refused before they became Fastify requests (a head Node's parser refused or found too
// large, CONNECT, an Expect other than 100-continue, a WebSocket handshake ws refused) were
// answered with a request id that no log line carried, at any level: a client reporting its 431
// could not be found in the logs.
t.test('a refusal written straight to the socket logs one info line with the request id it answered', async t => {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const app = await buildApp(testConfig({ LOG_LEVEL: 'info', BFF_AUTH_ENABLED: false }), { logStream, manifest: await demoManifest() })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const raw = async (head: string): Promise<string> => await new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => { socket.write(head) })
    let answer = ''
    socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
    socket.on('close', () => { resolve(answer) })
    socket.on('error', reject)
  })
  const heads: Array<[string, number]> = [
    [`GET /healthz HTTP/1.1\r\nHost: h\r\nx-big: ${'a'.repeat(20_000)}\r\n\r\n`, 431],
    ['GET /healthz HTTP/1.1\r\nHost h\r\n\r\n', 400],
    ['CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n', 405],
    ['GET /healthz HTTP/1.1\r\nHost: h\r\nExpect: foo\r\nConnection: close\r\n\r\n', 417],
    ['GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n', 400]
  ]
  for (const [head, status] of heads) {
    const answer = await raw(head)
    t.equal(Number(answer.slice(9, 12)), status)
    const id = /\r\nx-request-id: ([^\r]+)\r\n/i.exec(answer)?.[1]
    // A WebSocket handshake is a Fastify request (its access log's `incoming request` line) until ws refuses it.
    const logged = lines.filter(l => l.reqId === id && l.msg !== 'incoming request')
    t.same(logged.map(l => [l.level, l.msg, (l.res as { statusCode?: number } | undefined)?.statusCode]), [[30, 'request refused', status]], `${status}: one info line with its request id ${String(id)}`)
  }
  t.notOk(lines.some(l => JSON.stringify(l).includes('a'.repeat(100))), 'nothing of the refused head is logged')
})

// Every answer carries the client's own x-request-id when it is valid (README): CONNECT's 405, the
// 417 of an Expect other than 100-continue and the 400 of a WebSocket handshake ws refused, whose
// heads were read, came back with an id made for the answer.
t.test('a refusal of a request whose head was read carries the client\'s own x-request-id', async t => {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const app = await buildApp(testConfig({ LOG_LEVEL: 'info', BFF_AUTH_ENABLED: false }), { logStream, manifest: await demoManifest() })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const raw = async (head: string): Promise<string> => await new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => { socket.write(head) })
    let answer = ''
    socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
    socket.on('close', () => { resolve(answer) })
    socket.on('error', reject)
  })
  const heads: Array<[string, number, string]> = [
    ['CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nx-request-id: own-405\r\n\r\n', 405, 'own-405'],
    ['GET /healthz HTTP/1.1\r\nHost: h\r\nExpect: foo\r\nx-request-id: own-417\r\nConnection: close\r\n\r\n', 417, 'own-417'],
    ['GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nx-request-id: own-ws\r\n\r\n', 400, 'own-ws']
  ]
  for (const [head, status, id] of heads) {
    const answer = await raw(head)
    t.equal(Number(answer.slice(9, 12)), status)
    t.match(answer, new RegExp(`\\r\\nx-request-id: ${id}\\r\\n`), `${status}: the client's id in the header`)
    t.equal((JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as { requestId?: string }).requestId, id, `${status}: and in the body`)
    t.ok(lines.some(l => l.reqId === id && l.msg === 'request refused'), `${status}: and on its log line`)
  }
  const bad = await raw(`CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nx-request-id: ${'x'.repeat(129)}\r\n\r\n`)
  t.match(bad, /\r\nx-request-id: [0-9a-f]{8}-[0-9a-f]{4}-7/, 'an id that is not valid: one made by the gateway')
})

// CORS answers every OPTIONS through one route, `*`: a preflight of `POST /api/v1/agents/<id>/runs`
// (and an OPTIONS without one) was logged with the id, which the operation's own requests log by
// their pattern. So was a 404 of a path whose slashes were doubled (a client's base URL ending in
// `/`), which did not start with /api/v1/.
t.test('the access log: an OPTIONS under /api/v1 (CORS on) and a path with doubled slashes log the prefix only', async t => {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const app = await buildApp(testConfig({ LOG_LEVEL: 'info', BFF_CORS_ORIGINS: 'https://app.example.com' }), { logStream, manifest: await demoManifest() })
  t.teardown(() => app.close())
  const logged = (): unknown => (lines.filter(l => l.msg === 'incoming request').at(-1)?.req as Record<string, unknown>).url
  const preflight = await app.inject({ method: 'OPTIONS', url: '/api/v1/agents/PREFLIGHT-SECRET/runs', headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST' } })
  t.equal(preflight.statusCode, 204)
  t.equal(logged(), '/api/v1/[redacted]', 'a preflight')
  t.equal((await app.inject({ method: 'OPTIONS', url: '/api/v1/agents/OPTIONS-SECRET?x=1', headers: bearer() })).statusCode, 204)
  t.equal(logged(), '/api/v1/[redacted]?x=[redacted]', 'an OPTIONS that is no preflight')
  t.equal((await app.inject({ url: '//api/v1/agents/SLASHES-SECRET', headers: bearer() })).statusCode, 404)
  t.equal(logged(), '/api/v1/[redacted]', 'a path with doubled slashes')
  t.notOk(JSON.stringify(lines).includes('SECRET'), 'no line carries a path parameter')
  t.equal((await app.inject({ method: 'OPTIONS', url: '/graphql', headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST' } })).statusCode, 204)
  t.equal(logged(), '/graphql', 'a path outside /api/v1 is logged as it is')
})

// A Kernel answer that broke its output schema was logged with the path of the field at fault,
// and a map's key is the answer's own data: `output.scores["alice.smith@example.com"] must be
// integer` reached the warn line of every face. The client is still told the key (its own
// answer); the log line shows the keys its schema names and `[<key>]` for the others.
t.test('a call failed line never holds the keys of a Kernel answer that broke its schema, on any face', async t => {
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const EMAIL = 'alice.smith@example.com'
  const kernel = await startTestKernel(t, {
    'GET /v1/scores': (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ team: { scores: { [EMAIL]: 'high', bob: 3 } } })) }
  })
  const manifest = testManifest({
    scores: {
      type: 'query',
      rest: 'GET /scores',
      kernel: 'GET /v1/scores',
      input: { type: 'object', properties: {} },
      output: { type: 'object', properties: { team: { type: 'object', required: ['scores'], properties: { scores: { type: 'object', additionalProperties: { type: 'integer' } } } } } }
    }
  }, { url: kernel.url, retries: 0 })
  const app = await buildApp(testConfig({ LOG_LEVEL: 'trace' }), { logStream, manifest, kernelUrl: kernel.url })
  t.teardown(() => app.close())
  const headers = bearer()
  const rest = await app.inject({ url: '/api/v1/scores', headers })
  t.equal(rest.statusCode, 502)
  t.equal(rest.json().detail, `The Kernel's answer to scores does not match its output schema: output.team.scores["${EMAIL}"] must be integer`, 'the client is told the field at fault')
  t.equal((await app.inject({ url: '/trpc/scores', headers })).json().error.data.code, 'KERNEL_ERROR')
  const graphql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ scores { team { scores } } }' } })
  t.equal(graphql.json().errors?.[0]?.extensions?.code, 'KERNEL_ERROR', graphql.body)
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: 'a', op: 'scores' }] } })).json().results[0].error.code, 'KERNEL_ERROR')
  await app.listen({ port: 0, host: '127.0.0.1' })
  const ws = await wsConnect(t, `ws://127.0.0.1:${(app.server.address() as AddressInfo).port}/ws`)
  t.equal((await ws.request({ id: '1', op: 'scores', input: {} })).error?.code, 'KERNEL_ERROR')
  const failed = lines.filter(l => l.msg === 'call failed')
  t.equal(failed.length, 5, 'a line per face')
  for (const line of failed) t.equal(line.detail, 'The Kernel\'s answer to scores does not match its output schema: output.team.scores[<key>] must be integer', 'the names the schema declares, not the answer\'s own keys')
  t.same(lines.filter(l => JSON.stringify(l).includes(EMAIL)), [], 'no log line holds the key, at any level')
})
