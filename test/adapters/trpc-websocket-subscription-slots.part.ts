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

// The bus's bounds (the instance's, and each tenant's share of it) were the same: the bus counts a
// subscription from its first pull, so those sent together all passed its check at their decision.
t.test('WebSocket: subscriptions past the tenant\'s share or the instance\'s bound, sent together, are refused before they start, and recorded so', async t => {
  const app = await buildDemoApp(t, { BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT: 3 }, { events: { maxSubscriptions: 5 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const frames: Array<Record<string, any>> = []
  const sockets = await Promise.all(['tshareA', 'tshareB'].map(async tenant => {
    const client = await connect(t, `ws://127.0.0.1:${port}/trpc`, { tenant, user: 'u', roles: ['viewer'] })
    client.ws.on('message', d => frames.push({ tenant, ...JSON.parse(String(d)) as Record<string, any> }))
    return client
  }))
  const firstOf = (tenant: string, id: number): Record<string, any> | undefined => frames.find(f => f.tenant === tenant && f.id === id)
  const ids = [1, 2, 3, 4, 5]
  const message = ids.map(id => ({ id, method: 'subscription', params: { path: 'runUpdated' } }))
  // Tenant A sends 5: 3 are its share. Then tenant B sends 5: the instance holds 5, 2 are left.
  sockets[0].send(message)
  await until(() => ids.every(id => firstOf('tshareA', id) !== undefined), 'an answer to each of A\'s')
  sockets[1].send(message)
  await until(() => ids.every(id => firstOf('tshareB', id) !== undefined), 'an answer to each of B\'s')
  for (const [tenant, room, why] of [['tshareA', 3, /A tenant holds at most 3/], ['tshareB', 2, /Too many event subscriptions on this instance/]] as const) {
    const answers = ids.map(id => firstOf(tenant, id)!)
    t.equal(answers.filter(f => f.result?.type === 'started').length, room, `${tenant}: ${room} started`)
    const refused = answers.filter(f => f.result?.type !== 'started')
    t.same(refused.map(f => f.error?.data?.code), Array(5 - room).fill('OVERLOADED'), `${tenant}: the others refused before starting`)
    for (const f of refused) t.match(f.error?.message, why)
  }
  t.equal(app.events.bus.subscriptions, 5, 'the bus holds 5')
  await drained(app)
  const rows = (await app.audit.store.query({ action: 'runUpdated', limit: 100 })).entries.filter(r => r.tenantId === 'tshareA' || r.tenantId === 'tshareB')
  t.equal(rows.filter(r => r.status === 'ok').length, 5, '5 recorded granted')
  t.equal(rows.filter(r => r.status === 'OVERLOADED').length, 5, '5 recorded refused')
})
