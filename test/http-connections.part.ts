import t from 'tap'
import { connect, type AddressInfo, type Socket } from 'node:net'
import { buildTestApp } from './helper.js'

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
