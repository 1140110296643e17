import t from 'tap'
import { buildTestApp, rawAnswer } from './helper.js'

// Found by `npm run fuzz`: Node hands CONNECT requests to 'connect' listeners and, without one,
// closes the connection without an answer. The gateway is no proxy: a 405 problem+json.

t.test('CONNECT is answered 405 problem+json, not dropped', async t => {
  const app = await buildTestApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  for (const target of ['/api/v1/agents/a1', 'example.com:443']) {
    const answer = await rawAnswer(port, `CONNECT ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`)
    t.match(answer, /^HTTP\/1\.1 405 Method Not Allowed\r\n/, target)
    t.match(answer, /\r\nContent-Type: application\/problem\+json\r\n/)
    const problem = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as { requestId: string }
    t.match(problem, { status: 405, code: 'BAD_REQUEST', detail: 'CONNECT is not served', requestId: /^[0-9a-f]{8}-[0-9a-f]{4}-7/ }, 'a request id the gateway makes: UUIDv7')
    // A 405 names the methods served; and like every answer, the request id and the security headers.
    t.match(answer, /\r\nAllow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n/)
    t.match(answer, new RegExp(`\\r\\nx-request-id: ${problem.requestId}\\r\\n`))
    t.match(answer, /\r\nx-content-type-options: nosniff\r\n/)
  }
  const health = await app.inject({ method: 'GET', url: '/healthz' })
  t.equal(health.statusCode, 200, 'the gateway serves on')
})

// Node answers an Expect other than 100-continue with a bare 417 unless a listener answers it.
t.test('an Expect other than 100-continue is answered 417 problem+json, and the connection closed', async t => {
  const app = await buildTestApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const answer = await rawAnswer(port, 'POST /api/v1/agents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\nExpect: 200-ok\r\n\r\n{}')
  t.match(answer, /^HTTP\/1\.1 417 Expectation Failed\r\n/)
  t.match(answer, /\r\ncontent-type: application\/problem\+json\r\n/i)
  t.match(answer, /\r\nconnection: close\r\n/i)
  const problem = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as { requestId: string }
  t.match(problem, { status: 417, code: 'BAD_REQUEST', detail: 'The only expectation served is 100-continue', requestId: /^[0-9a-f]{8}-[0-9a-f]{4}-7/ })
  t.match(answer, new RegExp(`\\r\\nx-request-id: ${problem.requestId}\\r\\n`, 'i'))
  t.match(answer, /\r\nx-content-type-options: nosniff\r\n/i)
})
