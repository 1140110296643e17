// A request no route takes (404), or not with its method (405), is answered before its body is
// read: Fastify read and parsed it first (a malformed one was a 400), so any caller's megabyte
// of JSON to any path cost its parse.
import t from 'tap'
import { once } from 'node:events'
import { connect, type AddressInfo } from 'node:net'
import { buildDemoApp } from './helper.js'

const json = { 'content-type': 'application/json' }
const broken = '{"name": '

t.test('unknown paths and methods are answered without reading the body', async t => {
  const app = await buildDemoApp(t)
  const nowhere = await app.inject({ method: 'POST', url: '/nowhere', headers: json, payload: broken })
  t.equal(nowhere.statusCode, 404, '404, not the body\'s 400')
  t.match(nowhere.json(), { code: 'NOT_FOUND', detail: 'No route POST /nowhere', requestId: nowhere.headers['x-request-id'] })
  const put = await app.inject({ method: 'PUT', url: '/api/v1/agents', headers: json, payload: broken })
  t.equal(put.statusCode, 405, '405, not the body\'s 400')
  t.equal(put.headers.allow, 'GET, HEAD, POST')
  t.match(put.json(), { code: 'BAD_REQUEST', status: 405 })
  // Without a body, as before.
  t.equal((await app.inject({ method: 'POST', url: '/nowhere' })).statusCode, 404)
})

t.test('the body of a request to no route is never awaited: the 404 comes after the head alone, and the connection ends', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const socket = connect(port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  let answer = ''
  socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
  await once(socket, 'connect')
  // A megabyte announced, none of it sent: the answer cannot wait for it.
  socket.write('POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n')
  await once(socket, 'end')
  t.match(answer, /^HTTP\/1\.1 404 /)
  t.match(answer, /\r\nconnection: close\r\n/i, 'its connection ends')
})
