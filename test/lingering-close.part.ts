import t from 'tap'
import { connect } from 'node:net'
import { bearer, buildTestApp, json, rawAnswer, startTestKernel, until } from './helper.js'
import { MAX_PIPELINED, MAX_PIPELINED_BYTES } from '../app.js'

// Found by `npm run fuzz`: the gateway answered a request it refused before reading its body
// (a 413, or junk in the head) and closed the connection with the body still arriving; the
// reset that followed reached the client before the answer, which it never read. The gateway
// now half-closes and reads on (RFC 9112 §9.6), so the client reads the answer and its upload
// ends without a reset.

interface Exchange { answer: string, sent: number, error: string | null }

/** Sends the head, then `bodyBytes` in chunks (backpressure respected); collects the answer. */
function exchange (port: number, head: string, bodyBytes: number): Promise<Exchange> {
  return new Promise((resolve) => {
    // Half-open, as an HTTP client uploading a body is: the gateway's FIN does not stop the upload.
    const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
    let answer = ''
    let sent = 0
    let error: string | null = null
    const chunk = Buffer.alloc(64 * 1024, 'x')
    socket.on('data', (data: Buffer) => { answer += data.toString('latin1') })
    socket.on('error', (err: NodeJS.ErrnoException) => { error = err.code ?? err.message })
    socket.on('close', () => resolve({ answer, sent, error }))
    const pump = (): void => {
      while (sent < bodyBytes) {
        const n = Math.min(chunk.length, bodyBytes - sent)
        sent += n
        if (!socket.write(n === chunk.length ? chunk : chunk.subarray(0, n))) { socket.once('drain', pump); return }
      }
      // All sent: the client closes its side, and the gateway its own.
      socket.end()
    }
    socket.on('connect', () => { socket.write(head); pump() })
  })
}

const BODY = 8 * 1024 * 1024

/** A gateway listening on a free port. */
async function listening (t: Parameters<typeof buildTestApp>[0], overrides: Parameters<typeof buildTestApp>[1] = {}, options: Parameters<typeof buildTestApp>[2] = {}): Promise<{ app: Awaited<ReturnType<typeof buildTestApp>>, port: number }> {
  const app = await buildTestApp(t, overrides, options)
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, port: (app.server.address() as { port: number }).port }
}

t.test('a body refused unread (413): the answer is read and the upload ends without a reset', async t => {
  const { port } = await listening(t, { BFF_BODY_LIMIT: 1024 })
  // With a valid token: without one the 401 comes first, before the body is read too.
  const res = await exchange(port, `POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: ${BODY}\r\n\r\n`, BODY)
  t.match(res.answer, /^HTTP\/1\.1 413 /)
  t.match(res.answer, /connection: close/i)
  t.equal(res.error, null, 'no reset while the body was still sent')
  t.equal(res.sent, BODY)
})

t.test('junk in the head before a large body: a 400 problem+json, read, and no reset', async t => {
  const { port } = await listening(t)
  const res = await exchange(port, `POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nX-Junk: a\u0001b\r\nContent-Length: ${BODY}\r\n\r\n`, BODY)
  t.match(res.answer, /^HTTP\/1\.1 400 Bad Request\r\n/)
  t.match(res.answer, /\r\nContent-Type: application\/problem\+json\r\n/)
  t.match(JSON.parse(res.answer.slice(res.answer.indexOf('\r\n\r\n') + 4)), { status: 400, code: 'BAD_REQUEST', detail: 'The request is not valid HTTP', requestId: String })
  t.equal(res.error, null, 'no reset while the body was still sent')
  t.equal(res.sent, BODY)
})

t.test('a head over 16 KB: 431 problem+json', async t => {
  const { port } = await listening(t)
  const res = await exchange(port, `GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, 0)
  t.match(res.answer, /^HTTP\/1\.1 431 Request Header Fields Too Large\r\n/)
  t.match(JSON.parse(res.answer.slice(res.answer.indexOf('\r\n\r\n') + 4)), { status: 431, code: 'BAD_REQUEST', detail: 'The request head is larger than 16 KB' })
  t.equal(res.error, null)
})

// Node hands JavaScript a head's first 999 fields and drops the rest: a request with more reached
// the routes without them, so that an Idempotency-Key among those lost let a keyed mutation run
// twice, and an Authorization among them made a 401 of a call with a valid token. Found by a
// session exploring the gateway as its users would.
t.test('a head of more fields than Node hands on: 431 problem+json on every route, never served without them', async t => {
  const agent = { id: 'n1', name: 'x', model: 'm', description: '', createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z' }
  const kernel = await startTestKernel(t, { 'POST /v1/agents': (_req, res) => json(res, 201, agent) })
  const { port } = await listening(t, {}, { kernelUrl: kernel.url })
  const junk = Array.from({ length: 1000 }, (_, i) => `x-h${i}: 1\r\n`).join('')
  const post = `POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: 12\r\n${junk}Idempotency-Key: k-fields\r\nConnection: close\r\n\r\n{"name":"x"}`
  for (let i = 0; i < 2; i++) {
    const res = await exchange(port, post, 0)
    t.match(res.answer, /^HTTP\/1\.1 431 Request Header Fields Too Large\r\n/, `the keyed mutation, sent ${i + 1} time(s)`)
    t.match(JSON.parse(res.answer.slice(res.answer.indexOf('\r\n\r\n') + 4)), { status: 431, code: 'BAD_REQUEST', detail: 'The request has more header fields than are served (at most 999)' })
  }
  t.equal(kernel.requests.length, 0, 'the Kernel never called: the key among the fields lost could not guard it')
  const probe = await exchange(port, `GET /healthz HTTP/1.1\r\nHost: x\r\n${junk}Connection: close\r\n\r\n`, 0)
  t.match(probe.answer, /^HTTP\/1\.1 431 /, 'a probe too')
  const fewer = Array.from({ length: 994 }, (_, i) => `x-h${i}: 1\r\n`).join('')
  const served = await rawAnswer(port, `POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: 12\r\n${fewer}Connection: close\r\n\r\n{"name":"x"}`)
  t.match(served, /^HTTP\/1\.1 201 /, '999 fields: served')
})

t.test('a client that never closes its side is closed by the gateway after the linger', async t => {
  const { app, port } = await listening(t)
  const connections = async (): Promise<number> => await new Promise((resolve, reject) => app.server.getConnections((err, n) => { if (err !== null) reject(err); else resolve(n) }))
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
  t.teardown(() => { socket.destroy() })
  let answer = ''
  let ended = false
  socket.on('data', (data: Buffer) => { answer += data.toString('latin1') })
  socket.on('end', () => { ended = true })
  socket.on('error', () => {})
  await new Promise<void>((resolve) => socket.on('connect', resolve))
  socket.write('JUNK / HTTP/1.1\r\n\r\n')
  await until(() => ended, 'the answer and the gateway\'s half-close')
  t.match(answer, /^HTTP\/1\.1 400 /)
  // More junk after the answer: read and dropped, never answered again.
  socket.write('more junk\r\n\r\n')
  t.equal(await connections(), 1, 'the gateway still reads the connection')
  let open = 1
  await until(() => { connections().then(n => { open = n }, () => {}); return open === 0 }, 'the gateway closing the connection after the linger')
  t.equal((answer.match(/HTTP\/1\.1/g) ?? []).length, 1, 'one answer, whatever came after it')
  const health = await app.inject({ method: 'GET', url: '/healthz' })
  t.equal(health.statusCode, 200, 'the gateway serves on')
})

t.test('a request pipelined after a refused body is not served: it never reaches the Kernel', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/agents/a1': (_req, res) => { json(res, 200, { id: 'a1', name: 'n', model: 'm', description: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z' }) } })
  const { port } = await listening(t, { BFF_BODY_LIMIT: 1024 }, { kernelUrl: kernel.url })
  const get = `GET /api/v1/agents/a1 HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\n\r\n`
  const size = 2 * 1024 * 1024
  const answer = await new Promise<string>((resolve) => {
    const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString('latin1') })
    socket.on('error', () => {})
    socket.on('close', () => resolve(data))
    socket.on('connect', () => {
      socket.write(`POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: ${size}\r\n\r\n`)
      socket.write(Buffer.alloc(size, 'x'))
      socket.write(get)
      socket.end()
    })
  })
  t.match(answer, /^HTTP\/1\.1 413 /)
  t.equal((answer.match(/HTTP\/1\.1 \d+/g) ?? []).length, 1, 'one answer')
  t.equal(kernel.requests.length, 0, 'the pipelined call did not run')
  // The same call on a connection of its own runs (the Kernel records it).
  const alone = await fetch(`http://127.0.0.1:${port}/api/v1/agents/a1`, { headers: bearer() })
  t.equal(alone.status, 200, await alone.text())
  t.equal(kernel.requests.length, 1)
})

t.test('a request pipelined behind a body read whole and refused (not JSON) is not served either', async t => {
  // The body was read, so no linger: Node had parsed the next request already and the gateway
  // served it behind the 400 that ended the connection; the Kernel carried out the mutation,
  // and its answer was never sent (a client retrying it would have it carried out twice).
  const kernel = await startTestKernel(t, { 'POST /v1/agents': (_req, res) => { json(res, 201, { id: 'a9', name: 'n', model: 'm', description: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z' }) } })
  const { port } = await listening(t, {}, { kernelUrl: kernel.url })
  const post = (body: string): string => `POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
  const send = async (text: string): Promise<string> => await new Promise<string>((resolve) => {
    const socket = connect({ port, host: '127.0.0.1' })
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString('latin1') })
    socket.on('error', () => {})
    socket.on('close', () => resolve(data))
    socket.on('connect', () => { socket.write(text) })
  })
  const answer = await send(post('{{{{{') + post('{"name":"victim","model":"m"}'))
  t.match(answer, /^HTTP\/1\.1 400 /)
  t.equal((answer.match(/HTTP\/1\.1 \d+/g) ?? []).length, 1, 'one answer')
  t.equal(kernel.requests.length, 0, 'the pipelined mutation did not run')
  // Pipelined behind an answer that keeps the connection open, both are served, in order.
  const get = 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
  const both = await send(get + post('{"name":"fine","model":"m"}').replace('Host: x\r\n', 'Host: x\r\nConnection: close\r\n'))
  t.same((both.match(/HTTP\/1\.1 \d+/g) ?? []), ['HTTP/1.1 200', 'HTTP/1.1 201'], 'both answered, in order')
  t.equal(kernel.requests.length, 1)
})

t.test('requests pipelined behind a slow answer: served in order, and bounded per connection', async t => {
  let release!: () => void
  const slow = new Promise<void>(resolve => { release = resolve })
  const kernel = await startTestKernel(t, { 'GET /v1/agents/a1': async (_req, res) => { await slow; json(res, 200, { id: 'a1', name: 'n', model: 'm', description: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z' }) } })
  const { port } = await listening(t, {}, { kernelUrl: kernel.url })
  const first = `GET /api/v1/agents/a1 HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\n\r\n`
  const health = 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
  const open = (text: string): { answer: () => string, closed: Promise<void> } => {
    const socket = connect({ port, host: '127.0.0.1' })
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString('latin1') })
    socket.on('error', () => {})
    const closed = new Promise<void>(resolve => socket.on('close', () => { resolve() }))
    socket.on('connect', () => { socket.write(text) })
    t.teardown(() => { socket.destroy() })
    return { answer: () => data, closed }
  }
  // Over the bound, waiting behind the slow one: the connection is closed (before, each waiting
  // request was held, a client writing them without end grew the heap without end).
  const flood = open(first + health.repeat(MAX_PIPELINED + 1))
  await flood.closed
  t.equal(flood.answer(), '', 'closed unanswered')
  // So are fewer requests whose heads hold more than the bytes allowed (each head kept whole).
  const big = `GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ${'p'.repeat(14 * 1024)}\r\n\r\n`
  const heavy = open(first + big.repeat(Math.ceil(MAX_PIPELINED_BYTES / (14 * 1024)) + 1))
  await heavy.closed
  t.equal(heavy.answer(), '', 'heads over the bytes allowed: closed unanswered')
  // A head of many empty headers holds far more than its text: each is a string of its own.
  const fields = Array.from({ length: 1900 }, (_, i) => `h${i}:\r\n`).join('')
  const many = `GET /healthz HTTP/1.1\r\nHost: x\r\n${fields}\r\n`
  // Node 22 and later refuse such a head themselves (431: their parser counts each field against
  // the 16 KB bound); Node 20 takes it, and the gateway refuses it (431: more fields than Node
  // hands on), or its own bound closes the connection.
  const probe = open(`GET /healthz HTTP/1.1\r\nHost: x\r\n${fields}Connection: close\r\n\r\n`)
  await probe.closed
  const nodeTakes = probe.answer().startsWith('HTTP/1.1 200')
  if (!nodeTakes) t.match(probe.answer(), /^HTTP\/1\.1 431 /, 'this Node refuses a head of 1,900 empty headers itself')
  const headers = open(first + many.repeat(Math.ceil(MAX_PIPELINED_BYTES / (1900 * 32)) + 1))
  await headers.closed
  if (nodeTakes) t.equal(headers.answer(), '', 'heads of 1,900 empty headers, their text 14 KB each, a sixth of what they hold: closed unanswered')
  else t.notMatch(headers.answer(), /HTTP\/1\.1 200/, 'heads of 1,900 empty headers, refused by Node: none of them served')
  // Within both: every one served, in order, once the slow answer is sent.
  const fine = open(first + health.repeat(MAX_PIPELINED - 2) + big + 'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  await until(() => fine.answer() === '' && kernel.requests.length > 0, 'a slow call at the Kernel')
  await new Promise(resolve => setTimeout(resolve, 200)) // the 201 parsed meanwhile, waiting
  release()
  await fine.closed
  const statuses = fine.answer().match(/HTTP\/1\.1 \d+/g) ?? []
  t.equal(statuses.length, MAX_PIPELINED + 1, 'the slow answer and every one behind it')
  t.ok(statuses.every(s => s === 'HTTP/1.1 200'))
})
