import t from 'tap'
import { Redis } from 'ioredis'
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
