import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildDemoApp, until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const run = (id: string) => ({ id, agentId: 'a1', status: 'running', temperature: 1, promptChars: 3, output: null, error: null, createdAt: 'c', updatedAt: 'u', startedAt: null, finishedAt: null })

// The publisher's connection dropped (a Redis restarted, a failover, a reset) with a publish on its
// way, and made anew at once: that publish was neither sent again nor failed (ioredis keeps the
// commands of a first drop for a resend, which the publisher turns off, and drops them unsettled).
// It waited out its command timeout (1 s), and its timeout then dropped the new connection, ready
// and answering: a second reconnect, during which every event posted reached this instance alone.
t.test('a publish on its way when the publisher\'s connection drops fails at once, and the new connection is kept', async t => {
  const tenant = 'tenant-' + randomUUID()
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379))
  // The publisher's connections, each named in its handshake.
  let made = 0
  proxy.watch(chunk => { if (chunk.includes('mantle-events-pub')) made++ })
  const app = await buildDemoApp(t, { REDIS_URL: redisVia(proxy.port) })
  await until(() => app.events.health().up, 'the Redis subscriber and publisher')
  const got: string[] = []
  app.events.bus.subscribe('runUpdated', tenant, p => got.push((p as { id: string }).id))
  const before = made
  // The PUBLISH goes out on the publisher's connection and is held on its way to Redis.
  proxy.holdSends(chunk => /publish/i.test(chunk.toString('latin1')) && chunk.includes('bff:events'))
  let settled = -1
  const published = app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run('cut') }).then(() => { settled = performance.now() })
  await until(() => proxy.holding > 0, 'the PUBLISH on its way')
  // Every connection reset; new ones get through at once.
  const cut = performance.now()
  proxy.cut('reset')
  proxy.restore()
  await published
  t.ok(settled - cut < 800, `settled ${Math.round(settled - cut)} ms after its connection dropped, not at its 1 s timeout`)
  t.same(got, ['cut'], 'delivered here')
  await until(() => app.events.health().up, 'the publisher back')
  // Past the 1 s the publish would have waited.
  await sleep(1500)
  t.equal(made - before, 1, 'the publisher\'s connection made anew once, not dropped again once back')
  t.ok(app.events.health().up, 'up')
  t.same(got, ['cut'], 'once')
})

// Each publish that failed for want of Redis was logged at warn, one line per event: a Kernel
// posting hundreds of events a second during an outage wrote as many lines. Once per outage now
// (until a publish reaches Redis again), as the stores log theirs.
t.test('publishes failing while Redis is away are logged once per outage, not once per event', async t => {
  const tenant = 'tenant-' + randomUUID()
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port || 6379))
  const lines: Array<{ level: number, msg: string }> = []
  const app = await buildDemoApp(t, { REDIS_URL: redisVia(proxy.port), LOG_LEVEL: 'info' }, { logger: undefined, logStream: { write: line => { lines.push(JSON.parse(line)) } } })
  await until(() => app.events.health().up, 'the Redis subscriber and publisher')
  const got: string[] = []
  app.events.bus.subscribe('runUpdated', tenant, p => got.push((p as { id: string }).id))
  const failed = (): number => lines.filter(l => /Redis publish failed/.test(l.msg)).length
  const publish = async (id: string): Promise<void> => { await app.events.publish({ topic: 'runs.updated', tenantId: tenant, payload: run(id) }) }
  proxy.cut('reset')
  await until(() => !app.events.health().up, 'Redis away')
  for (let i = 0; i < 5; i++) await publish(`away-${i}`)
  t.same(got, ['away-0', 'away-1', 'away-2', 'away-3', 'away-4'], 'each delivered here')
  t.equal(failed(), 1, 'logged once')
  proxy.restore()
  await until(() => app.events.health().up, 'Redis back', 10_000)
  await publish('back')
  await until(() => got.includes('back'), 'the event through Redis')
  proxy.cut('reset')
  await until(() => !app.events.health().up, 'Redis away again')
  for (let i = 0; i < 3; i++) await publish(`again-${i}`)
  t.equal(failed(), 2, 'once more for the next outage')
})
