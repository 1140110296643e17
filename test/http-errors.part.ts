import t from 'tap'
import { buildDemoApp, bearer, rawAnswer } from './helper.js'

// mantle_http_errors_total counts every error answered over HTTP by code and status: the
// refusals no face's call metrics see (a 401 before the body, 404, 405, 413, 415, the guard's
// 429, a head Node's parser refuses, a tRPC or GraphQL request refused whole) as well as REST's
// own. Before, a flood of 401s showed in no metric.

t.test('every error answered over HTTP is counted by its code and status, refusals before any face included', async t => {
  const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1000, BFF_BODY_LIMIT: 1000 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const auth = bearer()
  const statuses = [
    (await app.inject({ url: '/api/v1/agents' })).statusCode, // no token: 401 before the route's handler
    (await app.inject({ url: '/api/v1/agents', headers: { authorization: 'Bearer x.y.z' } })).statusCode,
    (await app.inject({ url: '/api/v1/nope', headers: auth })).statusCode, // 404
    (await app.inject({ method: 'PUT', url: '/api/v1/agents', headers: auth })).statusCode, // 405
    (await app.inject({ method: 'POST', url: '/api/v1/agents', headers: { ...auth, 'content-type': 'text/plain' }, payload: 'x' })).statusCode, // 415
    (await app.inject({ method: 'POST', url: '/api/v1/agents', headers: { ...auth, 'content-type': 'application/json' }, payload: JSON.stringify({ name: 'x'.repeat(2000) }) })).statusCode, // 413
    (await app.inject({ url: '/api/v1/agents?limit=0', headers: auth })).statusCode, // the call's own 400
    (await app.inject({ url: '/api/v1/agents/nope', headers: auth })).statusCode, // a Kernel 404
    (await app.inject({ method: 'POST', url: '/graphql', headers: auth, payload: { query: '{ nope }' } })).statusCode, // refused whole, in GraphQL's shape
    (await app.inject({ method: 'POST', url: '/graphql', headers: { 'content-type': 'application/json' }, payload: { query: '{ listAgents { id } }' } })).statusCode, // no token: each field refused, a 200
    (await app.inject({ method: 'POST', url: '/graphql', headers: auth, payload: { query: '{ getAgent(id: "nope") { id } }' } })).statusCode, // a call's error: its call metrics
    (await app.inject({ method: 'POST', url: '/trpc/createAgent', headers: { 'content-type': 'application/json' }, payload: '{}' })).statusCode // no token, before tRPC runs
  ]
  t.same(statuses, [401, 401, 404, 405, 415, 413, 400, 404, 400, 200, 200, 401])
  t.match(await rawAnswer(port, 'GARBAGE\r\n\r\n'), /^HTTP\/1\.1 400 /, 'a head Node refuses')
  t.match(await rawAnswer(port, 'CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n'), /^HTTP\/1\.1 405 /)
  const scrape = (await app.inject({ url: '/metrics' })).body
  const count = (code: string, status: number): number => Number(new RegExp(`^mantle_http_errors_total\\{code="${code}",status="${status}"\\} (\\d+)$`, 'm').exec(scrape)?.[1] ?? 0)
  t.equal(count('UNAUTHENTICATED', 401), 3, 'REST twice and tRPC; not the GraphQL fields refused so (their calls\' metrics)')
  t.equal(count('NOT_FOUND', 404), 2, 'no route, and the Kernel\'s 404 of a REST call; not the GraphQL field\'s')
  t.equal(count('BAD_REQUEST', 405), 2, 'PUT where GET and POST are served, and CONNECT')
  t.equal(count('UNSUPPORTED_MEDIA_TYPE', 415), 1)
  t.equal(count('PAYLOAD_TOO_LARGE', 413), 1)
  t.equal(count('VALIDATION_FAILED', 400), 2, 'the REST call\'s own refusal, and the GraphQL document refused whole')
  t.equal(count('BAD_REQUEST', 400), 1, 'the head Node refused')
  t.match(scrape, /# HELP mantle_http_errors_total Errors answered over HTTP/)
})

// tRPC answers some requests itself, in its own shape, before any call runs: an input that is not
// JSON, a mutation over GET, a procedure that does not exist. No call metric saw them, and they
// went uncounted here too (GraphQL's refused documents were counted): a flood of them showed in
// no metric at all.
t.test('a tRPC request refused by tRPC before any call runs is counted by its code and status', async t => {
  const app = await buildDemoApp(t)
  const auth = bearer()
  const statuses = [
    (await app.inject({ url: '/trpc/listAgents?input=%7Bbad', headers: auth })).statusCode, // input not JSON
    (await app.inject({ method: 'POST', url: '/trpc/createAgent', headers: { ...auth, 'content-type': 'application/json' }, payload: '{bad' })).statusCode, // body not JSON
    (await app.inject({ url: '/trpc/createAgent?input=%7B%7D', headers: auth })).statusCode, // a mutation over GET
    (await app.inject({ url: '/trpc/noSuchProcedure', headers: auth })).statusCode // no such procedure
  ]
  t.same(statuses, [400, 400, 405, 404])
  const scrape = (await app.inject({ url: '/metrics' })).body
  const count = (code: string, status: number): number => Number(new RegExp(`^mantle_http_errors_total\\{code="${code}",status="${status}"\\} (\\d+)$`, 'm').exec(scrape)?.[1] ?? 0)
  t.equal(count('VALIDATION_FAILED', 400), 2, 'the input and the body that are not JSON')
  t.equal(count('BAD_REQUEST', 405), 1, 'the mutation over GET')
  t.equal(count('NOT_FOUND', 404), 1, 'the procedure that does not exist')
})

// A tRPC call alone in its request is answered as REST's is, the request's status its error's:
// a query over GET with an expired token was a 401 counted nowhere here, where the same call
// over POST (refused before its body) and over REST were, so MantleUnauthenticatedSurge missed
// tRPC clients whose tokens had expired. The calls of a batch are still counted by their calls.
t.test('a tRPC call alone in its request that fails is counted as REST\'s is, over GET as over POST', async t => {
  const app = await buildDemoApp(t)
  const expired = bearer({ ttlSeconds: -100 })
  const statuses = [
    (await app.inject({ url: '/trpc/listAgents', headers: expired })).statusCode,
    (await app.inject({ method: 'POST', url: '/trpc/listAgents', headers: { ...expired, 'content-type': 'application/json' }, payload: '{}' })).statusCode,
    (await app.inject({ url: '/api/v1/agents', headers: expired })).statusCode,
    (await app.inject({ url: '/trpc/getAgent?input=%7B%22id%22%3A%22nope%22%7D', headers: bearer() })).statusCode, // the Kernel's 404
    (await app.inject({ url: '/trpc/listAgents,listAgents?batch=1&input=%7B%7D', headers: expired })).statusCode // a batch: its calls' metrics
  ]
  t.same(statuses, [401, 401, 401, 404, 401])
  const scrape = (await app.inject({ url: '/metrics' })).body
  const count = (code: string, status: number): number => Number(new RegExp(`^mantle_http_errors_total\\{code="${code}",status="${status}"\\} (\\d+)$`, 'm').exec(scrape)?.[1] ?? 0)
  t.equal(count('UNAUTHENTICATED', 401), 3, 'tRPC over GET and over POST, and REST; not the batch')
  t.equal(count('NOT_FOUND', 404), 1, 'the Kernel\'s 404 of the tRPC call, as REST\'s is counted')
})

t.test('with metrics off, problems are answered as before and nothing is counted', async t => {
  const app = await buildDemoApp(t, { BFF_METRICS_ENABLED: false })
  t.equal((await app.inject({ url: '/api/v1/agents' })).statusCode, 401)
  t.equal((await app.inject({ url: '/metrics' })).statusCode, 404)
})

t.test('the HTTP guard\'s 429 is counted too', async t => {
  const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1 })
  const auth = bearer({ tenant: 'problems-429' })
  t.same([(await app.inject({ url: '/api/v1/agents', headers: auth })).statusCode, (await app.inject({ url: '/api/v1/agents', headers: auth })).statusCode], [200, 429])
  t.match((await app.inject({ url: '/metrics' })).body, /^mantle_http_errors_total\{code="RATE_LIMITED",status="429"\} 1$/m)
})

// RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400. Node answered it itself, a bare 400
// with no body, no request id, no security headers, and no count (found exploring the gateway).
t.test('an HTTP/1.1 request without Host: a 400 problem+json of the gateway, counted; HTTP/1.0 may omit it', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const answer = await rawAnswer(port, `GET /api/v1/agents HTTP/1.1\r\nAuthorization: ${bearer().authorization}\r\nConnection: close\r\n\r\n`)
  t.match(answer, /^HTTP\/1\.1 400 /)
  t.match(answer, /\r\ncontent-type: application\/problem\+json/i)
  t.match(answer, /\r\nx-request-id: \S+/i)
  t.match(answer, /\r\nx-content-type-options: nosniff/i)
  t.match(JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)), { status: 400, code: 'BAD_REQUEST', detail: 'An HTTP/1.1 request needs a Host header' })
  t.match(await rawAnswer(port, 'GET /healthz HTTP/1.0\r\n\r\n'), /^HTTP\/1\.1 200 /, 'HTTP/1.0 without Host: served')
  t.match(await rawAnswer(port, 'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'), /^HTTP\/1\.1 200 /)
  const scrape = (await app.inject({ url: '/metrics' })).body
  t.match(scrape, /^mantle_http_errors_total\{code="BAD_REQUEST",status="400"\} 1$/m)
})

// A WebSocket handshake ws refuses was answered by ws itself: a text/html 400, no request id, no
// security headers, not counted (found exploring the gateway). Now as every refusal, on each face.
t.test('a malformed WebSocket handshake: a 400 problem+json on every face, counted', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  // /graphql asks for its subprotocol first (its own refusal, in GraphQL's shape).
  const head = (path: string, fields: string): string => `GET ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n${path === '/graphql' ? 'Sec-WebSocket-Protocol: graphql-transport-ws\r\n' : ''}${fields}\r\n`
  for (const path of ['/ws', '/trpc', '/graphql']) {
    const noKey = await rawAnswer(port, head(path, 'Sec-WebSocket-Version: 13\r\n'))
    t.match(noKey, /^HTTP\/1\.1 400 /, `${path}: no key`)
    t.match(noKey, /\r\ncontent-type: application\/problem\+json/i)
    t.match(noKey, /\r\nx-request-id: \S+/i)
    t.match(noKey, /\r\nstrict-transport-security: /i)
    t.match(JSON.parse(noKey.slice(noKey.indexOf('\r\n\r\n') + 4)), { status: 400, code: 'BAD_REQUEST', detail: 'The WebSocket handshake is refused: Missing or invalid Sec-WebSocket-Key header', requestId: String })
    const version = await rawAnswer(port, head(path, 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 99\r\n'))
    t.match(version, /^HTTP\/1\.1 400 /, `${path}: version 99`)
    t.match(version, /\r\nSec-WebSocket-Version: 13, 8\r\n/i, 'the versions served (RFC 6455 §4.4)')
  }
  const scrape = (await app.inject({ url: '/metrics' })).body
  t.match(scrape, /^mantle_http_errors_total\{code="BAD_REQUEST",status="400"\} 6$/m)
})
