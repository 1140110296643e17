// The shared connection's QUIT at shutdown, to a Redis that hangs (accepts commands, answers
// none): it waited BFF_REDIS_COMMAND_TIMEOUT_MS, up to 60 s, where the shutdown's grace allows
// the Redis connections half a second (server.ts, GRACE_MARGIN_MS). With a timeout of 20 s the
// gateway was killed at its grace (exit 1, "killed by timeout") on every shutdown while Redis hung.
import t from 'tap'
import Fastify from 'fastify'
import redis from '../../../plugins/redis/index.js'
import { until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const target = new URL(REDIS_URL)

t.test('a Redis that hangs holds the close for half a second at most, whatever the command timeout', async t => {
  const proxy = await startTcpProxy(t, Number(target.port || 6379), target.hostname)
  const app = Fastify()
  await app.register(redis, { url: redisVia(proxy.port), commandTimeoutMs: 5000, heartbeatMs: 60_000 })
  await app.ready()
  await until(() => app.redis.up(), 'the shared connection ready')
  // The QUIT never reaches Redis, and so nothing comes back (a Redis that hangs).
  proxy.holdSends(() => true)
  const started = performance.now()
  await app.close()
  const took = performance.now() - started
  t.ok(took < 1500, `closed in ${Math.round(took)} ms`)
  await until(() => app.redis.client.status === 'end', 'the connection closed', 2000)
})

t.test('a Redis that answers gets its QUIT', async t => {
  const proxy = await startTcpProxy(t, Number(target.port || 6379), target.hostname)
  const app = Fastify()
  await app.register(redis, { url: redisVia(proxy.port), commandTimeoutMs: 5000, heartbeatMs: 60_000 })
  await app.ready()
  await until(() => app.redis.up(), 'the shared connection ready')
  const sent: string[] = []
  proxy.watch(chunk => { sent.push(chunk.toString('latin1')) })
  await app.close()
  t.match(sent.join(''), /QUIT/i, 'QUIT was sent')
  await until(() => app.redis.client.status === 'end', 'the connection closed', 2000)
})
