import t from 'tap'
import type { AddressInfo } from 'node:net'
import { buildDemoApp, drained, until } from '../helper.js'
import { connect } from './websocket-helper.js'

// A tRPC WebSocket connection holds at most 32 subscriptions (README). The bound was checked
// when each subscription was decided, but counted only from its first pull: wsLink sends every
// call started in one tick in one message, and the subscriptions of one message were all decided
// before any was pulled, so every one passed. Past the 32nd each was then answered `started`,
// recorded as granted in the audit trail, and ended with OVERLOADED right after; sent one by one,
// the same subscription is refused before it starts, and recorded refused.

t.test('WebSocket: subscriptions past the connection\'s bound in one message are refused before they start, and recorded so', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const client = await connect(t, `ws://127.0.0.1:${port}/trpc`, { tenant: 'tslots', user: 'uslots', roles: ['viewer'] })
  const frames: Array<Record<string, any>> = []
  client.ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  const firstOf = (id: number): Record<string, any> | undefined => frames.find(f => f.id === id)
  const count = 34
  client.send(Array.from({ length: count }, (_, i) => ({ id: i + 1, method: 'subscription', params: { path: 'runUpdated' } })))
  const ids = Array.from({ length: count }, (_, i) => i + 1)
  await until(() => ids.every(id => firstOf(id) !== undefined), 'an answer to each subscription')
  const answers = ids.map(id => firstOf(id)!)
  t.equal(answers.filter(f => f.result?.type === 'started').length, 32, '32 subscriptions started')
  t.same(answers.filter(f => f.result?.type !== 'started').map(f => f.error?.data?.code), ['OVERLOADED', 'OVERLOADED'], 'the 2 past the bound refused before starting')
  t.equal(app.events.bus.subscriptions, 32, 'the bus holds 32')
  await drained(app)
  const rows = (await app.audit.store.query({ action: 'runUpdated', limit: 100 })).entries.filter(r => r.tenantId === 'tslots')
  t.equal(rows.filter(r => r.status === 'ok').length, 32, '32 recorded granted')
  t.equal(rows.filter(r => r.status === 'OVERLOADED').length, 2, '2 recorded refused')

  // A slot is given back when its subscription stops: another may start in its place.
  const started = answers.find(f => f.result?.type === 'started')!.id as number
  client.send({ id: started, method: 'subscription.stop' })
  await until(() => frames.some(f => f.id === started && f.result?.type === 'stopped'), 'the stop answered')
  client.send({ id: 100, method: 'subscription', params: { path: 'runUpdated' } })
  await until(() => firstOf(100) !== undefined, 'the new subscription answered')
  t.equal(firstOf(100)?.result?.type, 'started', 'a subscription starts in the freed slot')
})
