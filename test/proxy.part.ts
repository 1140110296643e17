import t from 'tap'
import { Redis } from 'ioredis'
import { connect } from 'node:net'
import { once } from 'node:events'
import { startTcpProxy } from './proxy.js'

const REDIS_PORT = 6379

t.test('the proxy forwards, cuts (reset and stall) and restores a real Redis link', async t => {
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const client = new Redis({ port: proxy.port, host: '127.0.0.1', lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 0, commandTimeout: 200, retryStrategy: () => 20 })
  client.on('error', () => {})
  t.teardown(() => client.disconnect())
  await client.connect()
  t.equal(await client.ping(), 'PONG')
  proxy.delay(50)
  t.equal(await client.ping(), 'PONG', 'a delayed link still answers')
  t.same(await Promise.all([client.echo('a'), client.echo('b'), client.echo('c')]), ['a', 'b', 'c'], 'in order')
  proxy.delay(0)
  proxy.cut('reset')
  await t.rejects(client.ping(), 'a cut link fails the command')
  proxy.cut('stall')
  await t.rejects(client.ping(), 'a stalled link fails the command')
  proxy.restore()
  const end = Date.now() + 3000
  while (client.status !== 'ready' && Date.now() < end) await new Promise(resolve => setTimeout(resolve, 20))
  t.equal(await client.ping(), 'PONG', 'back after restore')
  t.ok(proxy.connections >= 2)
})

t.test('holdSends: a client that ends its side while its chunks are held has them reach the server on release, then the end', async t => {
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const direct = new Redis({ port: REDIS_PORT, host: '127.0.0.1' })
  t.teardown(() => direct.disconnect())
  const key = `proxy-held-end-${process.pid}-${Date.now()}`
  t.teardown(async () => { await direct.del(key) })
  proxy.holdSends(chunk => chunk.toString().includes(key))
  const socket = connect(proxy.port, '127.0.0.1')
  socket.on('error', () => {})
  await once(socket, 'connect')
  socket.end(`SET ${key} held\r\n`)
  const end = Date.now() + 3000
  while (proxy.holding === 0 && Date.now() < end) await new Promise(resolve => setTimeout(resolve, 10))
  t.equal(proxy.holding, 1, 'the SET is held')
  // Its end has come in behind the held chunk: the server must not see the end first.
  await new Promise(resolve => setTimeout(resolve, 100))
  proxy.holdSends(null)
  proxy.release()
  let value: string | null = null
  while (value === null && Date.now() < end + 2000) {
    value = await direct.get(key)
    if (value === null) await new Promise(resolve => setTimeout(resolve, 20))
  }
  t.equal(value, 'held', 'the held SET reached Redis')
})
