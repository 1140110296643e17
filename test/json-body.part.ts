import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { buildTestApp, startTestKernel, testManifest, json, bearer, type TestKernel } from './helper.js'
import { connect } from 'node:net'

// JSON is UTF-8 (RFC 8259 §8.1). A body's bytes were read as a string, each byte that is not
// UTF-8 becoming U+FFFD: {"name":"caf\xE9"} reached the Kernel as "caf\uFFFD", and a body sent
// as ISO-8859-1 was read as UTF-8. Both are refused now, on every face that reads a body.
const LATIN1 = Buffer.from('{"name":"caf\xe9"}', 'latin1')

/** A gateway whose one mutation, create, answers the body its Kernel received. */
async function thingsApp (t: Test): Promise<{ app: FastifyInstance, kernel: TestKernel }> {
  const kernel = await startTestKernel(t, { 'POST /v1/things': (req, res) => json(res, 200, { body: req.body }) })
  const manifest = testManifest({
    create: { type: 'mutation', rest: 'POST /things', kernel: 'POST /v1/things', input: { type: 'object', properties: { name: { type: 'string' } } }, output: { type: 'object', properties: { body: { type: 'string' } } } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  return { app, kernel }
}

t.test('a body that is not UTF-8, or names another charset, is refused on every HTTP face', async t => {
  const { app, kernel } = await thingsApp(t)
  const post = async (url: string, payload: string | Buffer, type = 'application/json') =>
    await app.inject({ method: 'POST', url, headers: { ...bearer(), 'content-type': type }, payload })

  const rest = await post('/api/v1/things', LATIN1)
  t.equal(rest.statusCode, 400, 'REST')
  t.match(rest.headers['content-type'], /^application\/problem\+json/)
  t.match(rest.json(), { code: 'VALIDATION_FAILED', detail: 'The body is not valid UTF-8' })
  const batch = await post('/api/v1/batch', Buffer.concat([Buffer.from('{"calls":[{"op":"create","input":'), LATIN1, Buffer.from('}]}')]))
  t.match([batch.statusCode, batch.json()], [400, { code: 'VALIDATION_FAILED', detail: 'The body is not valid UTF-8' }], 'batch')
  const trpc = await post('/trpc/create', LATIN1)
  t.match([trpc.statusCode, trpc.json()], [400, { error: { data: { code: 'VALIDATION_FAILED' } } }], 'tRPC')
  const gql = await post('/graphql', Buffer.from('{"query":"{ __typename }","variables":{"x":"\xe9"}}', 'latin1'))
  t.match([gql.statusCode, gql.json()], [400, { errors: [{ extensions: { code: 'VALIDATION_FAILED' } }] }], 'GraphQL')

  for (const type of ['application/json; charset=iso-8859-1', 'application/json;charset="latin1"', 'application/json; foo=bar; charset=UTF-16']) {
    const res = await post('/api/v1/things', '{"name":"x"}', type)
    t.match([res.statusCode, res.json()], [415, { code: 'UNSUPPORTED_MEDIA_TYPE', detail: 'The request body must be application/json in UTF-8' }], type)
  }
  const trpcCharset = await post('/trpc/create', '{"name":"x"}', 'application/json; charset=iso-8859-1')
  t.match([trpcCharset.statusCode, trpcCharset.json()], [415, { error: { data: { code: 'UNSUPPORTED_MEDIA_TYPE' } } }], 'tRPC: another charset')
  t.equal(kernel.requests.length, 0, 'nothing reached the Kernel')

  // UTF-8, however it is named, goes on, and a quoted parameter hides nothing.
  for (const type of ['application/json; charset=utf-8', 'application/json;Charset="UTF-8"', 'application/json; charset=utf8', 'application/json; foo="a;charset=latin1"']) {
    const res = await post('/api/v1/things', '{"name":"café"}', type)
    t.same([res.statusCode, res.json()], [200, { body: '{"name":"café"}' }], type)
  }
  const trpcOk = await post('/trpc/create', '{"name":"café"}', 'application/json; charset=utf-8')
  t.same([trpcOk.statusCode, trpcOk.json()], [200, { result: { data: { body: '{"name":"café"}' } } }], 'tRPC: UTF-8')
  // Malformed JSON and an empty body are as before.
  t.match((await post('/api/v1/things', '{"name":')).json(), { code: 'VALIDATION_FAILED', detail: 'The body is not valid JSON' })
  t.equal((await post('/api/v1/things', '')).statusCode, 200, 'an empty body is an absent one')
  // An empty body has no encoding to get wrong, whatever charset its type names (it was a 415).
  t.equal((await post('/api/v1/things', '', 'application/json; charset=iso-8859-1')).statusCode, 200, 'an empty body in another charset is an absent one')
})

t.test('a GraphQL document sent as application/graphql is held to UTF-8 as a JSON body is', async t => {
  // mercurius parses that media type itself, as text: its bad bytes reached the Kernel as U+FFFD.
  const { app, kernel } = await thingsApp(t)
  const post = async (payload: Buffer, type: string) =>
    await app.inject({ method: 'POST', url: '/graphql', headers: { ...bearer(), 'content-type': type }, payload })
  const latin1 = Buffer.from('mutation { create(name: "caf\xe9") { body } }', 'latin1')
  const bad = await post(latin1, 'application/graphql')
  t.match([bad.statusCode, bad.json()], [400, { errors: [{ message: 'The body is not valid UTF-8', extensions: { code: 'VALIDATION_FAILED' } }] }], 'bytes that are not UTF-8')
  const charset = await post(Buffer.from('{ __typename }'), 'application/graphql; charset=iso-8859-1')
  t.match([charset.statusCode, charset.json()], [415, { errors: [{ extensions: { code: 'UNSUPPORTED_MEDIA_TYPE' } }] }], 'another charset')
  const good = await post(Buffer.from('mutation { create(name: "café") { body } }'), 'application/graphql; charset=utf-8')
  t.same([good.statusCode, good.json()], [200, { data: { create: { body: '{"name":"café"}' } } }], 'UTF-8')
  t.equal(kernel.requests.length, 1, 'only the UTF-8 document reached the Kernel')
})

// A body is read as sent: one labelled with a content coding was read as plain (a JSON body
// labelled gzip ran its call; a gzipped one was refused for its bytes).
t.test('a body with a Content-Encoding but identity is refused 415 on every HTTP face, and runs nothing', async t => {
  const { app, kernel } = await thingsApp(t)
  const body = '{"name":"plain"}'
  for (const coding of ['gzip', 'x-foo', 'br, identity']) {
    const headers = { ...bearer(), 'content-type': 'application/json', 'content-encoding': coding }
    const rest = await app.inject({ method: 'POST', url: '/api/v1/things', headers, payload: body })
    t.match([rest.statusCode, rest.headers['accept-encoding'], rest.json()], [415, 'identity', { code: 'UNSUPPORTED_MEDIA_TYPE' }], `REST, ${coding}`)
    const trpc = await app.inject({ method: 'POST', url: '/trpc/create', headers, payload: body })
    t.match([trpc.statusCode, trpc.json()], [415, { error: { data: { code: 'UNSUPPORTED_MEDIA_TYPE' } } }], `tRPC, ${coding}`)
    const gql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: '{"query":"mutation { create(name: \\"plain\\") { body } }"}' })
    t.match([gql.statusCode, gql.json()], [415, { errors: [{ extensions: { code: 'UNSUPPORTED_MEDIA_TYPE' } }] }], `GraphQL, ${coding}`)
  }
  t.equal(kernel.requests.length, 0, 'nothing reached the Kernel')
  const identity = await app.inject({ method: 'POST', url: '/api/v1/things', headers: { ...bearer(), 'content-type': 'application/json', 'content-encoding': 'Identity' }, payload: body })
  t.equal(identity.statusCode, 200, 'identity is the body as sent')
})

// Node's parser takes a transfer coding before chunked and hands the body on still coded: a JSON
// body framed `gzip, chunked` ran its call, read as plain text. A body refused before it is read
// ends its connection: Node read it to its end, however long, to reach the next request.
t.test('a body with a transfer coding but chunked is refused 400 before it is read, runs nothing, and ends its connection', async t => {
  const { app, kernel } = await thingsApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const body = '{"name":"plain"}'
  /** What the gateway answers up to its close of the connection (the request itself keeps it alive). */
  const send = async (head: string): Promise<string> => await new Promise<string>((resolve, reject) => {
    const socket = connect(port, '127.0.0.1')
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString() })
    socket.on('end', () => resolve(data))
    socket.on('error', reject)
    socket.write(`POST /api/v1/things HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\n${head}\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`)
  })
  for (const framing of ['gzip, chunked', 'x-foo, chunked', 'identity, chunked']) {
    const answer = await send(`Transfer-Encoding: ${framing}`)
    t.match(answer, /^HTTP\/1\.1 400 Bad Request\r\n/, framing)
    t.match(answer, /\r\nConnection: close\r\n/i, 'the connection ends with the answer')
    const problem = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as unknown
    t.match(problem, { code: 'BAD_REQUEST', detail: 'A request body is sent with no transfer coding but chunked' }, framing)
  }
  const coded = await send('Content-Encoding: gzip\r\nTransfer-Encoding: chunked')
  t.match(coded, /^HTTP\/1\.1 415 Unsupported Media Type\r\n[^]*\r\nConnection: close\r\n/i, 'a Content-Encoding refused so ends its connection too')
  t.equal(kernel.requests.length, 0, 'nothing reached the Kernel')
  t.match(await send('Transfer-Encoding: Chunked\r\nConnection: close'), /^HTTP\/1\.1 200 OK\r\n/, 'chunked alone is the body as sent')
  t.equal(kernel.requests.length, 1)
})

// Only a body that has not all arrived ends its connection: Node emits a request before its
// parser has seen even a bodyless one end, and a GET refused early lost its keep-alive.
t.test('a request without a body refused before its handler keeps its connection', async t => {
  const { app } = await thingsApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const answer = await new Promise<string>((resolve, reject) => {
    const socket = connect(port, '127.0.0.1')
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString() })
    socket.on('end', () => resolve(data))
    socket.on('error', reject)
    socket.write(`POST /api/v1/things?x=%ZZ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: ${bearer().authorization}\r\nContent-Length: 00\r\n\r\n`)
    socket.write('GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n')
  })
  t.match(answer, /^HTTP\/1\.1 400 Bad Request\r\n/, 'the malformed query string is refused')
  t.notMatch(answer.slice(0, answer.indexOf('\r\n\r\n')), /\r\nConnection: close\r\n/i, 'and its connection kept')
  t.match(answer, /HTTP\/1\.1 200 OK\r\n/, 'the next request on it is served')
})

// Node sent 100 Continue as soon as the head arrived: a body refused for its coding was first
// invited, then refused unread.
t.test('Expect: 100-continue: a body refused for its coding is not invited, one served is', async t => {
  const { app, kernel } = await thingsApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const body = '{"name":"plain"}'
  const exchange = async (extra: string): Promise<string> => await new Promise<string>((resolve, reject) => {
    const socket = connect(port, '127.0.0.1')
    let data = ''
    let sent = false
    socket.on('data', (chunk: Buffer) => {
      data += chunk.toString()
      // The body, once invited, as a client that waits for the 100 sends it.
      if (data.startsWith('HTTP/1.1 100 ') && !sent) {
        sent = true
        socket.write(body)
      }
    })
    socket.on('end', () => resolve(data))
    socket.on('error', reject)
    socket.write(`POST /api/v1/things HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nExpect: 100-continue\r\n${extra}\r\n`)
  })
  const refused = await exchange('Content-Encoding: gzip\r\n')
  t.match(refused, /^HTTP\/1\.1 415 Unsupported Media Type\r\n/, 'the refusal alone, no 100 before it')
  t.match(refused, /\r\nConnection: close\r\n/i)
  t.equal(kernel.requests.length, 0)
  const served = await exchange('Connection: close\r\n')
  t.match(served, /^HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 200 OK\r\n/, 'invited, then served')
  t.equal(kernel.requests.length, 1)
})
