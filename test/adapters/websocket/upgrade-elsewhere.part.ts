import t from 'tap'
import { connect as connectTcp, type Socket } from 'node:net'
import { WebSocket } from 'ws'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, buildTestApp, json, startTestKernel, testManifest, token } from '../../helper.js'

// An upgrade to a route that serves no WebSocket (a probe, a tRPC procedure, a REST route), or
// to /graphql without a subprotocol it speaks, is refused before any 101, in the face's error
// shape, and is no log line. @fastify/websocket had accepted every such upgrade (101, then an
// empty close, and an info line per request); on /graphql mercurius then closed with 1002 after
// echoing the unknown subprotocol, with a warn line and a raw console.log on stdout.

interface RawAnswer {
  head: string
  status: number
  headers: Record<string, string>
  body: string
  /** Whether the gateway closed the connection (not the test's timeout). */
  closedByGateway: boolean
}

/** An upgrade request written on a raw TCP socket, and everything that comes back until the gateway closes. */
async function rawUpgrade (port: number, path: string, headers: Record<string, string> = {}, method = 'GET'): Promise<RawAnswer> {
  const lines = Object.entries({
    host: 'x',
    connection: 'Upgrade',
    upgrade: 'websocket',
    'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==',
    'sec-websocket-version': '13',
    ...headers
  }).map(([k, v]) => `${k}: ${v}\r\n`).join('')
  return await new Promise((resolve, reject) => {
    let timedOut = false
    const chunks: Buffer[] = []
    const socket = connectTcp(port, '127.0.0.1', () => socket.write(`${method} ${path} HTTP/1.1\r\n${lines}\r\n`))
    socket.on('data', (c: Buffer) => chunks.push(c))
    socket.on('error', reject)
    socket.setTimeout(3000, () => { timedOut = true; socket.destroy() })
    socket.on('close', () => {
      const text = Buffer.concat(chunks).toString('latin1')
      const end = text.indexOf('\r\n\r\n')
      const head = end === -1 ? text : text.slice(0, end)
      const [statusLine = '', ...fields] = head.split('\r\n')
      const parsed: Record<string, string> = {}
      for (const field of fields) {
        const colon = field.indexOf(':')
        parsed[field.slice(0, colon).toLowerCase()] = field.slice(colon + 1).trim()
      }
      resolve({ head, status: Number(statusLine.split(' ')[1]), headers: parsed, body: end === -1 ? '' : text.slice(end + 4), closedByGateway: !timedOut })
    })
  })
}

/** The body as JSON, or as text when it is none (a WebSocket frame). */
function parse (text: string): unknown {
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}

const ACCESS_LOG = new Set(['incoming request', 'request completed'])

/** Log lines the gateway writes (but its access log), and whatever reaches stdout, while `run` runs. */
async function quietly<T> (lines: string[], run: () => Promise<T>): Promise<{ result: T, logged: string[], printed: string[] }> {
  const printed: string[] = []
  const write = process.stdout.write
  const log = console.log
  process.stdout.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    printed.push(String(chunk))
    return (write as (...args: unknown[]) => boolean).call(process.stdout, chunk, ...rest)
  }) as typeof process.stdout.write
  console.log = (...args: unknown[]) => { printed.push(args.map(String).join(' ')) }
  const before = lines.length
  try {
    const result = await run()
    // What a socket's close still writes (mercurius logs once the socket is open).
    await new Promise(resolve => setTimeout(resolve, 50))
    // Fastify's access log (`incoming request`, `request completed`) has two lines for every request.
    const logged = lines.slice(before).filter(line => !ACCESS_LOG.has((JSON.parse(line) as { msg?: string }).msg ?? ''))
    return { result, logged, printed }
  } finally {
    process.stdout.write = write
    console.log = log
  }
}

async function gateway (t: { teardown: (fn: () => unknown) => void }): Promise<{ app: FastifyInstance, port: number, lines: string[] }> {
  const lines: string[] = []
  const app = await buildDemoApp(t, { LOG_LEVEL: 'info' }, { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, port: (app.server.address() as { port: number }).port, lines }
}

t.test('an upgrade to a route that serves no WebSocket is a 400 in the face\'s shape, before any 101, and no log line', async t => {
  const { port, lines } = await gateway(t)
  const problem = { type: String, title: String, status: 400, code: 'BAD_REQUEST', detail: /serves no WebSocket/, requestId: String }
  const cases: Array<[string, string, Record<string, string>, 'problem' | 'trpc' | 'graphql']> = [
    ['/healthz', '/healthz', {}, 'problem'],
    ['/readyz', '/readyz', {}, 'problem'],
    ['a tRPC query', '/trpc/listAgents', {}, 'trpc'],
    ['a tRPC query with a token', '/trpc/getAgent?input=%7B%22id%22%3A%22a1%22%7D', { authorization: `Bearer ${token()}` }, 'trpc'],
    ['a REST route', '/api/v1/agents', {}, 'problem'],
    ['a REST route with a token', '/api/v1/agents', { authorization: `Bearer ${token()}` }, 'problem'],
    ['GraphQL over HTTP\'s POST', 'POST /graphql', { 'content-length': '0' }, 'graphql']
  ]
  const { result: answers, logged, printed } = await quietly(lines, async () => await Promise.all(cases.map(async ([, target, headers]) => {
    const [method, path] = target.startsWith('/') ? ['GET', target] : target.split(' ')
    return await rawUpgrade(port, path, headers, method)
  }).concat(rawUpgrade(port, '/nope'), rawUpgrade(port, '/admin/audit/verify'))))
  cases.forEach(([what, , , shape], i) => {
    const answer = answers[i]
    t.equal(answer.status, 400, `${what}: 400`)
    t.notMatch(answer.head + answer.body, /101 Switching Protocols/, `${what}: no 101`)
    t.equal(answer.headers.connection, 'close', `${what}: the answer says the connection closes`)
    t.ok(answer.closedByGateway, `${what}: and the gateway closes it`)
    t.ok(answer.headers['x-request-id'] !== undefined, `${what}: a request id`)
    const body = parse(answer.body)
    if (shape === 'problem') {
      t.match(answer.headers['content-type'], /^application\/problem\+json/, what)
      t.match(body, problem, what)
    } else if (shape === 'graphql') {
      t.match(answer.headers['content-type'], /^application\/json/, what)
      t.match(body, { data: null, errors: [{ message: /serves no WebSocket/, extensions: { code: 'BAD_REQUEST', status: 400 } }] }, what)
    } else {
      t.match(answer.headers['content-type'], /^application\/json/, what)
      t.match(body, { error: { message: /serves no WebSocket/, data: { code: 'BAD_REQUEST', httpStatus: 400 } } }, what)
    }
  })
  // A path no route serves is the 404 it is to a plain request.
  const unknown = answers[cases.length]
  t.equal(unknown.status, 404, 'an unknown path: 404')
  t.match(parse(unknown.body), { status: 404, code: 'NOT_FOUND' }, 'an unknown path: its problem')
  t.ok(unknown.closedByGateway, 'an unknown path: the gateway closes the connection')
  // One served with other methods only, the 405 naming them.
  const otherMethods = answers[cases.length + 1]
  t.equal(otherMethods.status, 405, 'a path served with POST alone: 405')
  t.equal(otherMethods.headers.allow, 'POST')
  t.match(parse(otherMethods.body), { status: 405, code: 'BAD_REQUEST' })
  t.ok(otherMethods.closedByGateway, 'a path served with POST alone: the gateway closes the connection')
  t.same(logged, [], 'nothing logged')
  t.same(printed, [], 'nothing printed')
})

t.test('/graphql refuses an upgrade offering neither graphql-transport-ws nor graphql-ws before any 101, and takes one offering either', async t => {
  const { port, lines } = await gateway(t)
  const cases: Array<[string, Record<string, string>]> = [
    ['an unknown subprotocol', { 'sec-websocket-protocol': 'foo' }],
    ['two unknown ones', { 'sec-websocket-protocol': 'foo, bar' }],
    ['an unknown one with a valid token', { 'sec-websocket-protocol': 'foo', authorization: `Bearer ${token()}` }],
    ['none', {}]
  ]
  const { result: answers, logged, printed } = await quietly(lines, async () => await Promise.all(cases.map(async ([, headers]) => await rawUpgrade(port, '/graphql', headers))))
  cases.forEach(([what], i) => {
    const answer = answers[i]
    t.equal(answer.status, 400, `${what}: 400`)
    t.notMatch(answer.head + answer.body, /101 Switching Protocols/, `${what}: no 101`)
    t.equal(answer.headers['sec-websocket-protocol'], undefined, `${what}: no subprotocol echoed`)
    t.ok(answer.closedByGateway, `${what}: the gateway closes the connection`)
    t.match(answer.headers['content-type'], /^application\/json/, what)
    t.match(parse(answer.body), { data: null, errors: [{ message: /graphql-transport-ws or graphql-ws/, extensions: { code: 'BAD_REQUEST', status: 400 } }] }, what)
  })
  t.same(logged, [], 'nothing logged')
  t.same(printed, [], 'nothing printed')

  // An offer holding one the server speaks gets that one, wherever it stands in the offer (ws
  // picks the first offered by default, and an unknown first one was echoed).
  for (const [offer, chosen] of [[['graphql-transport-ws'], 'graphql-transport-ws'], [['foo', 'graphql-ws'], 'graphql-ws'], [['foo', 'graphql-transport-ws', 'graphql-ws'], 'graphql-transport-ws']] as const) {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, [...offer])
    t.teardown(() => ws.terminate())
    await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
    t.equal(ws.protocol, chosen, `${offer.join(', ')}: ${chosen}`)
    // The protocol answers: connection_init is acknowledged.
    ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token()}` } }))
    const reply = await new Promise<string>(resolve => {
      ws.once('message', (data: Buffer) => resolve(data.toString()))
      ws.once('close', (code: number) => resolve(`closed with ${code}`))
    })
    t.match(JSON.parse(reply), { type: 'connection_ack' }, `${offer.join(', ')}: acknowledged`)
  }
})

t.test('the faces that serve a WebSocket still upgrade', async t => {
  const { port } = await gateway(t)
  for (const [path, protocol] of [['/ws', undefined], ['/trpc', undefined], ['/graphql', 'graphql-transport-ws']] as const) {
    const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`, protocol, { headers: { authorization: `Bearer ${token()}` } })
    t.teardown(() => ws.terminate())
    await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
    t.pass(`${path} upgraded`)
  }
})

// Only a WebSocket upgrade is refused: a GET offering HTTP/2 in cleartext (Java's HttpClient on
// an http:// URL, `curl --http2`) is answered in HTTP/1.1 where it was, as RFC 9110 §7.8 allows.
t.test('a GET offering h2c is served as HTTP/1.1 on REST, OpenAPI and /metrics', async t => {
  const { port } = await gateway(t)
  // `close` too: the connection is kept otherwise (see below), and the answer read until it closes.
  const h2c = { connection: 'Upgrade, HTTP2-Settings, close', upgrade: 'h2c', 'http2-settings': 'AAMAAABkAAQAoAAAAAIAAAAA' }
  const rest = await rawUpgrade(port, '/api/v1/agents/a1', { ...h2c, authorization: `Bearer ${token()}` })
  t.equal(rest.status, 200, 'REST')
  t.match(parse(rest.body), { id: 'a1' })
  t.equal((await rawUpgrade(port, '/openapi.json', h2c)).status, 200, 'OpenAPI')
  t.equal((await rawUpgrade(port, '/metrics', h2c)).status, 200, '/metrics')
})

/** Requests written as they are on one raw TCP socket, and the answers' status lines and bodies, read until the gateway closes. */
async function exchange (port: number, requests: string): Promise<{ answers: Array<{ status: number, body: string }>, closedByGateway: boolean }> {
  return await new Promise((resolve, reject) => {
    let timedOut = false
    const chunks: Buffer[] = []
    const socket = connectTcp(port, '127.0.0.1', () => socket.write(requests))
    socket.on('data', (c: Buffer) => chunks.push(c))
    socket.on('error', reject)
    socket.setTimeout(3000, () => { timedOut = true; socket.destroy() })
    socket.on('close', () => {
      let text = Buffer.concat(chunks).toString('latin1')
      const answers: Array<{ status: number, body: string }> = []
      while (text.startsWith('HTTP/1.1 ')) {
        const end = text.indexOf('\r\n\r\n')
        const head = text.slice(0, end)
        const length = Number(/\r\ncontent-length: (\d+)/i.exec(head)?.[1] ?? 0)
        answers.push({ status: Number(head.split(' ')[1]), body: text.slice(end + 4, end + 4 + length) })
        text = text.slice(end + 4 + length)
      }
      resolve({ answers, closedByGateway: !timedOut })
    })
  })
}

// Once @fastify/websocket listens for upgrades, Node hands it every request with
// `Connection: upgrade`, its body unread: a POST offering h2c (Java's HttpClient sends one on
// every http:// request with a body, curl --http2 too) was refused 400 "the Content-Length
// header does not match the body", a GET to /trpc/* or /graphql went to ws (a bare 400 "Invalid
// Upgrade header"), and each such connection was closed after its answer. Such an offer is now
// served as the HTTP/1.1 request it also is, on every route, its connection kept.
t.test('a request offering h2c, a POST with its body included, is served as HTTP/1.1 on every route and keeps its connection', async t => {
  const { port } = await gateway(t)
  const offer = 'Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n'
  const auth = `Authorization: Bearer ${token()}\r\n`
  const post = (path: string, body: string): string => `POST ${path} HTTP/1.1\r\nHost: x\r\n${offer}${auth}Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
  const chunked = (path: string, body: string): string => `POST ${path} HTTP/1.1\r\nHost: x\r\n${offer}${auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`
  const get = (path: string, last = false): string => `GET ${path} HTTP/1.1\r\nHost: x\r\n${offer}${auth}${last ? 'Connection: close\r\n' : ''}\r\n`.replace(/Connection: Upgrade, HTTP2-Settings\r\n(.*)Connection: close\r\n/s, 'Connection: Upgrade, HTTP2-Settings, close\r\n$1')
  const { answers, closedByGateway } = await exchange(port,
    post('/api/v1/agents', JSON.stringify({ name: 'h2c' })) +
    chunked('/api/v1/agents', JSON.stringify({ name: 'h2c chunked' })) +
    post('/graphql', JSON.stringify({ query: '{ getAgent(id: "a1") { id } }' })) +
    get('/trpc/listAgents') +
    get('/healthz') +
    get('/api/v1/agents/a1', true))
  t.same(answers.map(a => a.status), [201, 201, 200, 200, 200, 200], 'every request answered, one after the other on the one connection')
  t.match(parse(answers[0]?.body ?? ''), { name: 'h2c' }, 'REST read the POST\'s body')
  t.match(parse(answers[1]?.body ?? ''), { name: 'h2c chunked' }, 'and a chunked one')
  t.match(parse(answers[2]?.body ?? ''), { data: { getAgent: { id: 'a1' } } }, 'GraphQL')
  t.match(parse(answers[3]?.body ?? ''), { result: { data: Array } }, 'tRPC')
  t.match(parse(answers[5]?.body ?? ''), { id: 'a1' })
  t.ok(closedByGateway, 'closed as the last request asked (Connection: close), not held open')
})

/** A raw keep-alive connection: what it writes, and the answers read so far (status lines and bodies). */
function rawConnection (port: number): { write: (text: string) => void, answers: () => Array<{ status: number, body: string }>, closed: Promise<void>, end: () => void } {
  const chunks: Buffer[] = []
  const socket = connectTcp(port, '127.0.0.1')
  socket.on('data', (c: Buffer) => chunks.push(c))
  socket.on('error', () => {})
  const closed = new Promise<void>(resolve => socket.on('close', () => resolve()))
  return {
    write: (text) => { socket.write(text) },
    answers: () => {
      let text = Buffer.concat(chunks).toString('latin1')
      const answers: Array<{ status: number, body: string }> = []
      while (text.startsWith('HTTP/1.1 ') && text.includes('\r\n\r\n')) {
        const end = text.indexOf('\r\n\r\n')
        const head = text.slice(0, end)
        const length = Number(/\r\ncontent-length: (\d+)/i.exec(head)?.[1] ?? 0)
        answers.push({ status: Number(head.split(' ')[1]), body: text.slice(end + 4, end + 4 + length) })
        text = text.slice(end + 4 + length)
      }
      return answers
    },
    closed,
    end: () => { socket.destroy() }
  }
}

async function until (check: () => boolean, ms = 3000): Promise<boolean> {
  const deadline = Date.now() + ms
  while (!check() && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 10))
  return check()
}

const OFFER = 'Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n'

/** A gateway (WebSocket on, cache off) whose op `slow` (GET /api/v1/slow) answers after 600 ms: an answer still under way. */
async function slowGateway (t: Parameters<typeof buildTestApp>[0], env: Record<string, unknown> = {}): Promise<number> {
  const kernel = await startTestKernel(t, {
    'GET /v1/slow': (_req, res) => { setTimeout(() => json(res, 200, { ok: true }), 600) },
    'POST /v1/things': (_req, res) => json(res, 201, { ok: true })
  })
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', input: { type: 'object', properties: {} }, output },
    // A route that reads its body: a 404 or a 405 is answered before the body, the connection closed.
    makeThing: { type: 'mutation', rest: 'POST /things', kernel: 'POST /v1/things', input: { type: 'object', properties: { name: { type: 'string' } } }, output }
  })
  const app = await buildTestApp(t, { BFF_CACHE_ENABLED: false, BFF_WEBSOCKET_ENABLED: true, ...env }, { manifest, kernelUrl: kernel.url })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return (app.server.address() as { port: number }).port
}

/** The uncaught exceptions of the process while the test runs (kept from ending it). */
function uncaughtErrors (t: { teardown: (fn: () => unknown) => void }): Error[] {
  const uncaught: Error[] = []
  const record = (err: Error): void => { uncaught.push(err) }
  process.prependListener('uncaughtException', record)
  t.teardown(() => { process.removeListener('uncaughtException', record) })
  return uncaught
}

// Node takes its listeners off an upgrade's socket, 'error' too, and @fastify/websocket adds its
// own: an offer taken before it, pipelined behind an answer still under way, left its socket
// with none until that answer was written, and a client that reset the connection then threw an
// uncaught ECONNRESET (the process's end: anyone could stop the gateway).
t.test('a client that resets its connection while its offer waits for an answer before it is no uncaught error', async t => {
  const port = await slowGateway(t)
  const uncaught = uncaughtErrors(t)
  const socket = connectTcp(port, '127.0.0.1', () => socket.write(`GET /api/v1/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token()}\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n${OFFER}\r\n`))
  socket.on('error', () => {})
  await new Promise(resolve => setTimeout(resolve, 200))
  socket.resetAndDestroy()
  await new Promise(resolve => setTimeout(resolve, 800))
  t.same(uncaught.map(err => err.message), [], 'no uncaught error')
  t.equal((await fetch(`http://127.0.0.1:${port}/healthz`)).status, 200, 'the gateway still serves')
})

// Node's parser hands JavaScript a request's first 1,000 or so header fields only (maxHeadersCount)
// and drops the rest from rawHeaders, but frames the body by all of them: an offer's head written
// again from rawHeaders lost a Content-Length beyond them, and its body was parsed as the next
// request (smuggled past whatever framed it by its Content-Length, a proxy in front).
t.test('an offer whose head has more fields than Node hands on is refused, its body never parsed as a request', async t => {
  const { port } = await gateway(t)
  const smuggled = 'GET /healthz?smuggled HTTP/1.1\r\nHost: x\r\n\r\n'
  const junk = 'a: b\r\n'.repeat(1100)
  const conn = rawConnection(port)
  conn.write(`POST /api/v1/agents HTTP/1.1\r\nHost: x\r\n${OFFER}Content-Type: application/json\r\n${junk}Content-Length: ${smuggled.length}\r\n\r\n${smuggled}`)
  await Promise.race([conn.closed, new Promise(resolve => setTimeout(resolve, 1500))])
  conn.end()
  const answers = conn.answers()
  t.equal(answers.length, 1, 'one answer: the body was no request')
  t.equal(answers[0]?.status, 431, 'a head Node could not hand on whole, refused')
  t.notOk(answers.some(a => a.status === 200), 'nothing smuggled was served')
})

// An offer is served on the connection it came on: not announced as a new one (the 'connection'
// listeners of the app ran again for each: /diagz counted one more connection for each offer, and
// each added its 'close' listeners to the socket, without bound on a keep-alive connection).
t.test('a connection whose requests offer h2c is one connection: counted once, no listener piled up', async t => {
  const { app, port } = await gateway(t)
  const served: Socket[] = []
  app.server.on('connection', (s: Socket) => { if (!served.includes(s)) served.push(s) })
  const plain = rawConnection(port)
  const offers = rawConnection(port)
  const count = 15
  plain.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(count))
  offers.write(`GET /healthz HTTP/1.1\r\nHost: x\r\n${OFFER}\r\n`.repeat(count))
  t.ok(await until(() => plain.answers().length === count && offers.answers().length === count), 'every request answered')
  t.same(offers.answers().map(a => a.status), new Array(count).fill(200))
  t.equal(app.diagz.report().http.connections, 2, '/diagz counts two connections')
  t.equal(served.length, 2)
  t.equal(served[1]?.listenerCount('close'), served[0]?.listenerCount('close'), 'the offers\' socket has as many close listeners as the plain one')
  plain.end()
  offers.end()
})

// Node arms a connection's keep-alive timeout once its last answer is written, and disarms it when
// the connection's next request arrives: an offer pipelined behind an answer still under way was
// handed on with that timeout armed (the new parser knew nothing of it), and its request, a
// body still uploading say, was cut when it ran out (keep-alive timeout plus a second).
t.test('an offer pipelined behind an answer is not cut by the keep-alive timeout that answer armed', async t => {
  const { app, port } = await gateway(t)
  app.server.keepAliveTimeout = 100
  const conn = rawConnection(port)
  const body = JSON.stringify({ name: 'slow h2c' })
  conn.write(`GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPOST /api/v1/agents HTTP/1.1\r\nHost: x\r\n${OFFER}Authorization: Bearer ${token()}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body.slice(0, 5)}`)
  await new Promise(resolve => setTimeout(resolve, 1600))
  conn.write(body.slice(5))
  await Promise.race([conn.closed, new Promise(resolve => setTimeout(resolve, 3000))])
  conn.end()
  t.same(conn.answers().map(a => a.status), [200, 201], 'both answered')
})

// Node 26 and later read an offer's body themselves, into the request, where Node 20 to 24 left it
// on the socket for the parser the head is written again for: servePlainUpgrades reads it whole
// there, bounded as any body is (BFF_BODY_LIMIT). The same answers on every Node.
t.test('a request offering h2c with a body over the limit is a 413, whole or still arriving, and what follows it is not served', async t => {
  const app = await buildDemoApp(t, { BFF_BODY_LIMIT: 2048 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const body = JSON.stringify({ name: 'x'.repeat(4096) })
  const head = `POST /api/v1/agents HTTP/1.1\r\nHost: x\r\n${OFFER}Authorization: Bearer ${token()}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`
  const next = 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
  const whole = rawConnection(port)
  whole.write(head + body + next)
  await Promise.race([whole.closed, new Promise(resolve => setTimeout(resolve, 3000))])
  whole.end()
  t.same(whole.answers().map(a => a.status), [413], 'the body sent with its head: 413, and the request after it not served')
  t.match(JSON.parse(whole.answers()[0]?.body ?? '{}'), { code: 'PAYLOAD_TOO_LARGE' })
  const slow = rawConnection(port)
  slow.write(head + body.slice(0, 100))
  await new Promise(resolve => setTimeout(resolve, 200))
  slow.write(body.slice(100) + next)
  await Promise.race([slow.closed, new Promise(resolve => setTimeout(resolve, 3000))])
  slow.end()
  t.same(slow.answers().map(a => a.status), [413], 'the body still arriving: 413, and the request after it not served')
  // Within the limit, the same offer is served and so is what follows it.
  const small = JSON.stringify({ name: 'within' })
  const fine = rawConnection(port)
  fine.write(head.replace(`Content-Length: ${body.length}`, `Content-Length: ${small.length}`) + small.slice(0, 4))
  await new Promise(resolve => setTimeout(resolve, 200))
  fine.write(small.slice(4) + 'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  await Promise.race([fine.closed, new Promise(resolve => setTimeout(resolve, 3000))])
  fine.end()
  t.same(fine.answers().map(a => a.status), [201, 200], 'within the limit, still arriving: served, and the request after it')
})

// Node 26 reads an offer's body itself, and an offer whose empty chunked body came with its head
// looked as one on Node 20 to 24 does (complete, nothing buffered): its head was written again
// still chunked, and the request after it was read as its body (never answered).
t.test('an offer with an empty chunked body sent with its head, and the request after it, are both answered', async t => {
  const { port } = await gateway(t)
  const conn = rawConnection(port)
  conn.write(`POST /api/v1/agents HTTP/1.1\r\nHost: x\r\n${OFFER}Authorization: Bearer ${token()}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  await Promise.race([conn.closed, new Promise(resolve => setTimeout(resolve, 3000))])
  conn.end()
  t.same(conn.answers().map(a => a.status), [400, 200])
})

// Node invites no offer's body: a client that waits for the 100 (Expect: 100-continue) waited on
// Node 26 until a timeout cut it; Node 20 to 24 invite it (the new parser reads the head).
t.test('an offer that expects 100-continue is invited to send its body, once', async t => {
  const { port } = await gateway(t)
  const conn = rawConnection(port)
  const body = JSON.stringify({ name: 'continue' })
  conn.write(`POST /api/v1/agents HTTP/1.1\r\nHost: x\r\n${OFFER}Authorization: Bearer ${token()}\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`)
  const invited = await until(() => conn.answers().length > 0, 1500)
  conn.write(body)
  await Promise.race([conn.closed, new Promise(resolve => setTimeout(resolve, 3000))])
  conn.end()
  t.ok(invited, 'invited to send the body')
  t.same(conn.answers().map(a => a.status), [100, 201])
})

// Node 26: the head written again had its Transfer-Encoding replaced by a Content-Length, and a
// body sent `gzip, chunked`, which app.ts refuses (codingRefusal), was served.
t.test('an offer whose body is sent gzip, chunked is refused as any such request is', async t => {
  const { port } = await gateway(t)
  const conn = rawConnection(port)
  const body = JSON.stringify({ name: 'gz' })
  conn.write(`POST /api/v1/agents HTTP/1.1\r\nHost: x\r\n${OFFER}Authorization: Bearer ${token()}\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`)
  await Promise.race([conn.closed, new Promise(resolve => setTimeout(resolve, 3000))])
  conn.end()
  t.same(conn.answers().map(a => a.status), [400])
  t.match(JSON.parse(conn.answers()[0]?.body ?? '{}'), { detail: /chunked/ })
})

// Node 26: an offer over the body limit behind an answer still under way was refused at once,
// and the connection closed after that answer, the 413 never sent.
t.test('an offer over the body limit behind an answer still under way is answered 413 after it', async t => {
  const port = await slowGateway(t, { BFF_BODY_LIMIT: 2048 })
  const conn = rawConnection(port)
  const body = JSON.stringify({ name: 'x'.repeat(4096) })
  conn.write(`GET /api/v1/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token()}\r\n\r\nPOST /api/v1/things HTTP/1.1\r\nHost: x\r\n${OFFER}Authorization: Bearer ${token()}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  await Promise.race([conn.closed, new Promise(resolve => setTimeout(resolve, 4000))])
  conn.end()
  t.same(conn.answers().map(a => a.status), [200, 413])
})

// What follows an offer on Node 26 (its body read by Node): a body still arriving a byte at a
// time, requests after it in later chunks, all behind an answer still under way; a client that
// resets the connection at each stage.
t.test('an offer whose body arrives a byte at a time behind an answer under way, and the requests after it, are answered in order', async t => {
  const port = await slowGateway(t)
  const conn = rawConnection(port)
  const body = '{}' + ' '.repeat(30)
  conn.write(`GET /api/v1/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token()}\r\n\r\nPOST /api/v1/things HTTP/1.1\r\nHost: x\r\n${OFFER}Authorization: Bearer ${token()}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`)
  for (const c of body) { conn.write(c); await new Promise(resolve => setTimeout(resolve, 5)) }
  conn.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  await new Promise(resolve => setTimeout(resolve, 20))
  conn.write('GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  await Promise.race([conn.closed, new Promise(resolve => setTimeout(resolve, 4000))])
  conn.end()
  t.same(conn.answers().map(a => a.status), [200, 201, 200, 200])
})
t.test('an offer whose body stops arriving is a 408 at the request timeout', async t => {
  const app = await buildDemoApp(t, { BFF_REQUEST_TIMEOUT_MS: 1000 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const conn = rawConnection(port)
  conn.write(`POST /api/v1/agents HTTP/1.1\r\nHost: x\r\n${OFFER}Authorization: Bearer ${token()}\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{"na`)
  await Promise.race([conn.closed, new Promise(resolve => setTimeout(resolve, 4000))])
  conn.end()
  t.same(conn.answers().map(a => a.status), [408])
})
t.test('a client that resets an offer mid-body, or after it behind an answer under way, is no uncaught error', async t => {
  const port = await slowGateway(t)
  const uncaught = uncaughtErrors(t)
  const post = (n: number, part: string): string => `POST /api/v1/slow HTTP/1.1\r\nHost: x\r\n${OFFER}Content-Type: application/json\r\nContent-Length: ${n}\r\n\r\n${part}`
  for (const [first, second] of [[post(10, '{"a'), null], [post(10, '{"a'), '":1}  '], [`GET /api/v1/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token()}\r\n\r\n` + post(10, '{"a'), '":1}  GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n']]) {
    const socket = connectTcp(port, '127.0.0.1', () => socket.write(first as string))
    socket.on('error', () => {})
    await new Promise(resolve => setTimeout(resolve, 100))
    if (second !== null) socket.write(second)
    await new Promise(resolve => setTimeout(resolve, 100))
    socket.resetAndDestroy()
  }
  await new Promise(resolve => setTimeout(resolve, 1000))
  t.same(uncaught.map(err => err.message), [], 'no uncaught error')
  t.equal((await fetch(`http://127.0.0.1:${port}/healthz`)).status, 200, 'the gateway still serves')
})

// Node 26 marks a socket whose offer's body is still arriving (its UpgradeStream) and never
// unmarks it: the next offer on that connection, its body read to its end, was handed to that
// stream, already drained, and never to the 'upgrade' event: it and the connection hung.
t.test('offers after one whose body was still arriving are each served, and pile up no listener', async t => {
  const { app, port } = await gateway(t)
  const served: Socket[] = []
  app.server.on('connection', (s: Socket) => { if (!served.includes(s)) served.push(s) })
  const plain = rawConnection(port)
  plain.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  t.ok(await until(() => plain.answers().length === 1))
  const offers = rawConnection(port)
  const count = 12
  for (let i = 0; i < count; i++) {
    offers.write(`POST /graphql HTTP/1.1\r\nHost: x\r\n${OFFER}Content-Type: application/json\r\nContent-Length: 2\r\n\r\n`)
    await new Promise(resolve => setTimeout(resolve, 20))
    offers.write('{}')
    if (!await until(() => offers.answers().length === i + 1, 1000)) break
  }
  offers.write(`GET /healthz HTTP/1.1\r\nHost: x\r\n${OFFER}\r\n`)
  await until(() => offers.answers().length === count + 1, 1000)
  t.equal(offers.answers().length, count + 1, 'every offer answered')
  for (const event of ['close', 'error', 'end', 'data']) t.equal(served[1]?.listenerCount(event), served[0]?.listenerCount(event), `as many '${event}' listeners as a plain connection`)
  plain.end()
  offers.end()
})
