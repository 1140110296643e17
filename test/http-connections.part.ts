import t from 'tap'
import { connect, type AddressInfo, type Socket } from 'node:net'
import { buildApp, ANSWER_STALL_MS } from '../app.js'
import { bearer, buildTestApp, json, startTestKernel, testConfig, testManifest, until } from './helper.js'

// README "Operations endpoints": `mantle_http_connections`. The HTTP server's connections (app.ts
// keeps every one for the shutdown) are bounded in time by its timeouts, not in number, and were
// counted nowhere: a client holding thousands of idle keep-alive connections showed only as
// file descriptors.
t.test('mantle_http_connections counts the TCP connections the server holds', async t => {
  const app = await buildTestApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const gauge = async (): Promise<number> => {
    const body = (await app.inject({ method: 'GET', url: '/metrics' })).body
    return Number(/^mantle_http_connections (\d+)$/m.exec(body)?.[1] ?? NaN)
  }
  t.equal(await gauge(), 0, 'none before (app.inject makes no connection)')
  const sockets: Socket[] = []
  for (let i = 0; i < 3; i++) {
    const socket = connect(port, '127.0.0.1')
    socket.on('error', () => {})
    t.teardown(() => socket.destroy())
    sockets.push(socket)
  }
  let seen = await gauge()
  for (let i = 0; i < 500 && seen !== 3; i++) {
    await new Promise(resolve => setTimeout(resolve, 10))
    seen = await gauge()
  }
  t.equal(seen, 3, 'three idle connections')
  for (const socket of sockets) socket.destroy()
  for (let i = 0; i < 500 && seen !== 0; i++) {
    await new Promise(resolve => setTimeout(resolve, 10))
    seen = await gauge()
  }
  t.equal(seen, 0, 'none once they closed')
})

// A client that sent a request and read none of its answer held its connection for good: the
// request, headers and keep-alive timeouts do not run while an answer is written, and such
// connections, one request each, took every place the open-files limit leaves. One whose answer's
// bytes wait, none taken, for ANSWER_STALL_MS (here 1 s) is closed; a call the Kernel takes longer
// than that to answer is not cut, and an idle connection still closes at the keep-alive timeout.
t.test('a connection whose client reads none of its answer is closed; a slow call and keep-alive are as they were', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/big': (_req, res) => { json(res, 200, Array.from({ length: 4000 }, (_, i) => 'x'.repeat(1000) + i)) },
    'GET /v1/slow': async (_req, res) => { await new Promise(resolve => setTimeout(resolve, 2500)); json(res, 200, { slow: true }) }
  })
  const manifest = testManifest({
    big: { type: 'query', rest: 'GET /big', kernel: 'GET /v1/big', output: { type: 'array' } },
    slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', output: { type: 'object', properties: { slow: { type: 'boolean' } } }, timeoutMs: 10000 }
  }, { url: kernel.url })
  const app = await buildApp(testConfig(), { logger: false, manifest, kernelUrl: kernel.url })
  t.teardown(() => app.close())
  t.equal(app.server.timeout, ANSWER_STALL_MS, 'the stall bound is on')
  await app.listen({ port: 0, host: '127.0.0.1' })
  app.server.timeout = 1000
  const { port } = app.server.address() as AddressInfo
  let open = 0
  app.server.on('connection', (socket: Socket) => { open++; socket.once('close', () => { open-- }) })
  const head = (path: string): string => `GET /api/v1/${path} HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\n\r\n`

  // Reads nothing: its 4 MB answer waits.
  const stalled = connect(port, '127.0.0.1', () => { stalled.write(head('big')) })
  stalled.pause()
  stalled.on('error', () => {})
  t.teardown(() => stalled.destroy())
  await until(() => open === 1, 'the connection')
  await until(() => open === 0, 'the stalled connection closed', 6000)
  t.pass('closed by the gateway')

  // Reads everything, of a call the Kernel answers in 2.5 s.
  app.server.keepAliveTimeout = 500
  const reader = connect(port, '127.0.0.1', () => { reader.write(head('slow')) })
  let answer = ''
  reader.on('data', (chunk: Buffer) => { answer += chunk.toString() })
  reader.on('error', () => {})
  t.teardown(() => reader.destroy())
  await until(() => answer.includes('"slow":true'), 'the slow answer', 6000)
  t.match(answer, /^HTTP\/1\.1 200 /, 'a call longer than the bound is answered')
  await until(() => open === 0, 'the idle connection closed at the keep-alive timeout', 4000)
  t.pass('an idle connection still closes at the keep-alive timeout')
})
