// A Redis that hangs with its connection open: before, the connection stayed "ready", every
// keyed mutation waited out the command timeout, and /readyz and mantle_redis_up said up.
import t from 'tap'
import type { Command } from 'ioredis'
import { buildDemoApp, until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

async function readyWithin (app: Awaited<ReturnType<typeof buildDemoApp>>, ms: number): Promise<number> {
  const end = Date.now() + ms
  for (;;) {
    const status = (await app.inject({ method: 'GET', url: '/readyz' })).statusCode
    if (status === 200 || Date.now() > end) return status
    await new Promise(resolve => setTimeout(resolve, 20))
  }
}

async function redisUp (app: Awaited<ReturnType<typeof buildDemoApp>>): Promise<string | undefined> {
  const text = (await app.inject({ method: 'GET', url: '/metrics' })).body
  return /^mantle_redis_up (\d)$/m.exec(text)?.[1]
}

t.test('a Redis that stops answering on an open connection is found by the heartbeat, and the connection made anew', async t => {
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379), new URL(REDIS_URL).hostname)
  const app = await buildDemoApp(t, { REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 200 })
  t.equal(await readyWithin(app, 5000), 200, 'ready: Redis and the events subscriber connected')
  const connections = proxy.connections
  proxy.delay(600_000)
  await until(() => !app.redis.up(), 'the hang found', 5000)
  const ready = await app.inject({ method: 'GET', url: '/readyz' })
  t.equal(ready.statusCode, 503, 'not ready while Redis does not answer')
  t.match(ready.body, /redis/)
  t.equal(await redisUp(app), '0')
  proxy.restore()
  await until(() => app.redis.up(), 'ready again, on a new connection', 10_000)
  t.ok(proxy.connections > connections, 'a new connection')
  t.equal(await app.redis.client.ping(), 'PONG', 'and it answers')
  t.equal(await redisUp(app), '1')
  t.equal(await readyWithin(app, 5000), 200, 'ready again')
})

t.test('one PING missed (a Redis busy for a moment) keeps the connection: only two in a row drop it', async t => {
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379), new URL(REDIS_URL).hostname)
  const app = await buildDemoApp(t, { REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 200 })
  t.equal(await readyWithin(app, 5000), 200, 'ready')
  const client = app.redis.client
  const outcomes: string[] = []
  const send = client.sendCommand.bind(client)
  // The heartbeat's PINGs, seen as they end (the heartbeat sends a PING command each second).
  client.sendCommand = (command: Command, stream?: never) => {
    if (command.name === 'ping') command.promise.then(() => { outcomes.push('answered') }, () => { outcomes.push('missed') })
    return send(command, stream)
  }
  t.teardown(() => { client.sendCommand = send })
  // The shared connection's own id (the proxy's count also moves with other connections, the
  // event and cache subscribers', which may reconnect on a delay of their own).
  const id = await client.client('ID')
  let wentDown = false
  const watch = setInterval(() => { if (!app.redis.up()) wentDown = true }, 10)
  t.teardown(() => clearInterval(watch))
  // Every answer held back 400 ms: the next PING misses its 200 ms, its answer comes late.
  proxy.delay(400)
  await until(() => outcomes.includes('missed'), 'one PING missed', 5000)
  await new Promise(resolve => setTimeout(resolve, 300))
  proxy.restore()
  const missed = outcomes.length
  await until(() => outcomes.length > missed, 'the next PING', 5000)
  t.same(outcomes.slice(missed), ['answered'], 'the next PING is answered')
  t.notOk(wentDown, 'Redis was never taken for down')
  t.equal(await client.client('ID'), id, 'the same connection throughout')
  t.equal(await redisUp(app), '1')
})
