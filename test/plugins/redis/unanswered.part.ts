// A command sent on the shared connection and left unanswered when the connection drops (a cut,
// or the heartbeat dropping a hung Redis) is failed to its caller, which falls back to memory, and
// must not run again on the new connection: ioredis resends such commands on reconnect unless told
// not to (autoResendUnfulfilledCommands). Resent, a rate-limit check would count a call twice and
// an idempotency claim would be taken again, after its caller had gone on without it.
import t from 'tap'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import redis from '../../../plugins/redis/index.js'
import { until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const target = new URL(REDIS_URL)

t.test('a command unanswered when the connection drops is not sent again once Redis is back', async t => {
  const proxy = await startTcpProxy(t, Number(target.port || 6379), target.hostname)
  const app = Fastify()
  t.teardown(() => app.close())
  // REDIS_URL's database, as the direct client's below (through the proxy it was database 0).
  await app.register(redis, { url: redisVia(proxy.port), commandTimeoutMs: 200, heartbeatMs: 60_000 })
  await app.ready()
  await until(() => app.redis.up(), 'the shared connection ready')
  const direct = new Redis(REDIS_URL)
  t.teardown(() => direct.disconnect())
  const key = `mantle:test:unanswered:${process.pid}:${Date.now()}`
  t.teardown(async () => { await direct.del(key) })
  let ran = false
  const watching = setInterval(() => { direct.get(key).then(v => { if (v !== null) ran = true }, () => {}) }, 10)
  t.teardown(() => clearInterval(watching))

  // Redis runs the INCR (the proxy forwards it) but its answer is held back: the caller's command
  // times out, then the connection drops.
  proxy.delay(600_000)
  await t.rejects(app.redis.client.incr(key), 'the caller is told the command failed')
  // Run by Redis before the cut (on a busy machine the timeout can fire before the proxy has
  // forwarded it, and the cut then dropped the command unsent).
  await until(() => ran, 'Redis to run the INCR')
  const connections = proxy.connections
  proxy.cut('reset')
  proxy.restore()
  await until(() => app.redis.up() && proxy.connections > connections, 'a new connection ready', 10_000)
  // Anything resent on the new connection went before this PING, and so has run by its answer.
  t.equal(await app.redis.client.ping(), 'PONG')
  t.equal(await direct.get(key), '1', 'the INCR ran once: it was not sent again on the new connection')
})
