import t from 'tap'
import type { AddressInfo } from 'node:net'
import { buildDemoApp, drained, token, until } from '../helper.js'
import { connect } from './websocket-helper.js'

// Issue 6: one audit entry per call on every face, refused calls too. A tRPC WebSocket
// subscription sent with the id of one the connection already runs is refused by tRPC itself
// (BAD_REQUEST, `Duplicate id 1`) before any procedure runs: it left no entry.

t.test('WebSocket: a subscription sent again with an id in use is refused, and recorded so', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const client = await connect(t, `ws://127.0.0.1:${port}/trpc`, { tenant: 'tdup', user: 'udup', roles: ['viewer'] })
  const frames: Array<Record<string, any>> = []
  client.ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  client.send({ id: 1, method: 'subscription', params: { path: 'runUpdated' } })
  await until(() => frames.some(f => f.id === 1 && f.result?.type === 'started'), 'the first subscription started')
  client.send({ id: 1, method: 'subscription', params: { path: 'runUpdated' } })
  await until(() => frames.some(f => f.id === 1 && f.error !== undefined), 'the second one refused')
  const refusal = frames.find(f => f.id === 1 && f.error !== undefined)!
  t.match(refusal.error.data, { code: 'BAD_REQUEST', httpStatus: 400 }, 'refused BAD_REQUEST')
  t.match(refusal.error.message, /Duplicate id 1/)
  await drained(app)
  const rows = (await app.audit.store.query({ action: 'runUpdated', limit: 100 })).entries.filter(r => r.tenantId === 'tdup')
  t.equal(rows.filter(r => r.status === 'ok').length, 1, 'the first recorded granted')
  const refused = rows.filter(r => r.status !== 'ok')
  t.equal(refused.length, 1, 'the second recorded refused')
  t.match(refused[0], { status: 'BAD_REQUEST', statusCode: 400, userId: 'udup', protocol: 'trpc', path: '/trpc/runUpdated', requestId: refusal.error.data.requestId })
  t.equal(app.events.bus.subscriptions, 1, 'the bus still holds the first alone')
})

// A connection identified by its connectionParams has no context until tRPC's createContext
// settles (a microtask after the message): a subscription sent again with an id in use in the
// same read as those params was refused as above, but onError saw no context and it left no entry.
t.test('WebSocket: a duplicate id sent with the connectionParams, before the context settles, is recorded too', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const client = await connect(t, `ws://127.0.0.1:${port}/trpc?connectionParams=1`, null, { perMessageDeflate: false })
  const frames: Array<Record<string, any>> = []
  client.ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  // One write, so that the gateway reads the three messages at once.
  const raw = (client.ws as unknown as { _socket: { cork: () => void, uncork: () => void } })._socket
  raw.cork()
  client.ws.send(JSON.stringify({ method: 'connectionParams', data: { token: token({ tenant: 'tdupearly', user: 'uearly', roles: ['viewer'] }) } }))
  client.send({ id: 1, method: 'subscription', params: { path: 'runUpdated' } })
  client.send({ id: 1, method: 'subscription', params: { path: 'runUpdated' } })
  raw.uncork()
  await until(() => frames.some(f => f.id === 1 && f.error !== undefined), 'the second one refused')
  await until(() => frames.some(f => f.id === 1 && f.result?.type === 'started'), 'the first subscription started')
  const refusal = frames.find(f => f.id === 1 && f.error !== undefined)!
  t.match(refusal.error.message, /Duplicate id 1/)
  await drained(app)
  const rows = (await app.audit.store.query({ tenant: 'tdupearly', limit: 100 })).entries
  const refused = rows.filter(r => r.status !== 'ok')
  t.equal(refused.length, 1, 'the second recorded refused')
  t.match(refused[0], { status: 'BAD_REQUEST', statusCode: 400, userId: 'uearly', protocol: 'trpc', action: 'runUpdated', requestId: refusal.error.data.requestId })
})

t.test('WebSocket: a message of too many calls sent with the connectionParams is recorded too', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const client = await connect(t, `ws://127.0.0.1:${port}/trpc?connectionParams=1`, null, { perMessageDeflate: false })
  const frames: Array<Record<string, any>> = []
  client.ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  const raw = (client.ws as unknown as { _socket: { cork: () => void, uncork: () => void } })._socket
  raw.cork()
  client.ws.send(JSON.stringify({ method: 'connectionParams', data: { token: token({ tenant: 'tbigearly', user: 'ubig', roles: ['viewer'] }) } }))
  client.ws.send(JSON.stringify(Array.from({ length: 1001 }, (_, i) => ({ id: i + 1, method: 'query' }))))
  raw.uncork()
  await until(() => frames.some(f => f.error?.data?.code === 'PAYLOAD_TOO_LARGE'), 'the message refused')
  const refusal = frames.find(f => f.error !== undefined)!
  await drained(app)
  const rows = (await app.audit.store.query({ tenant: 'tbigearly', limit: 100 })).entries
  t.match(rows, [{ action: 'trpc', category: 'security', status: 'PAYLOAD_TOO_LARGE', userId: 'ubig', requestId: refusal.error.data.requestId }], 'recorded once, under the connection\'s token')
})

// The same duplicate id naming an operation (a query) rather than an event: refused alike
// (Duplicate id, before its method is looked at), and recorded as the misdirected call it is
// (security, the operation as action), as the same call with an id not in use is (405). It left no entry.
t.test('WebSocket: a subscription of an operation sent with an id in use is recorded too', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const client = await connect(t, `ws://127.0.0.1:${port}/trpc`, { tenant: 'tdupop', user: 'udupop', roles: ['viewer'] })
  const frames: Array<Record<string, any>> = []
  client.ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  client.send({ id: 1, method: 'subscription', params: { path: 'runUpdated' } })
  await until(() => frames.some(f => f.id === 1 && f.result?.type === 'started'), 'the first subscription started')
  client.send({ id: 1, method: 'subscription', params: { path: 'getAgent', input: { id: 'a1' } } })
  client.send({ id: 1, method: 'subscription', params: { path: 'noSuchThing' } })
  await until(() => frames.filter(f => f.id === 1 && f.error !== undefined).length === 2, 'both refused')
  const [refusal, none] = frames.filter(f => f.id === 1 && f.error !== undefined)
  t.match(refusal.error.message, /Duplicate id 1/)
  await drained(app)
  const rows = (await app.audit.store.query({ tenant: 'tdupop', limit: 100 })).entries.filter(r => r.status !== 'ok')
  t.match(rows, [{ status: 'BAD_REQUEST', statusCode: 400, category: 'security', userId: 'udupop', protocol: 'trpc', action: 'getAgent', path: '/trpc/getAgent', requestId: refusal.error.data.requestId }], 'the operation\'s: recorded once')
  t.equal(rows.filter(r => r.requestId === none.error.data.requestId).length, 0, 'a procedure that is none: unrecorded')
})
