import t from 'tap'
import { WebSocket } from 'ws'
import { createSigner } from 'fast-jwt'
import { buildDemoApp, token, SECRET, until } from '../../helper.js'

// mercurius lets a `subscribe` message carry its own credentials (`extensions: [{ type:
// 'connectionInit', payload }]`). Such a token must name the connection's tenant and user, as
// /ws's `auth` frame must, and the connection ends (4403) when the first token it accepted
// expires: a subscription never outlives the token that authorized it.

const RUN = { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:01Z', startedAt: '2026-01-01T00:00:01Z', finishedAt: null }
const SUBSCRIPTION = 'subscription { runUpdated { id status } }'

interface Client { ws: WebSocket, frames: Array<Record<string, any>>, closed: () => number | null }

interface Teardown { teardown: (fn: () => unknown) => void }

async function connect (t: Teardown, port: number, authorization: string): Promise<Client> {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws', { headers: { authorization } })
  t.teardown(() => ws.terminate())
  const frames: Array<Record<string, any>> = []
  let closed: number | null = null
  ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  ws.on('close', code => { closed = code })
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  ws.send(JSON.stringify({ type: 'connection_init' }))
  await until(() => frames.some(f => f.type === 'connection_ack'), 'connection_ack')
  return { ws, frames, closed: () => closed }
}

const subscribeWith = (id: string, authorization: string): string =>
  JSON.stringify({ id, type: 'subscribe', payload: { query: SUBSCRIPTION }, extensions: [{ type: 'connectionInit', payload: { authorization } }] })

/** A gateway, and a connection of tenant A (a long-lived upgrade token) with subscription 1 sent. */
async function subscribedAsA (t: Teardown): Promise<{ app: Awaited<ReturnType<typeof buildDemoApp>>, client: Client }> {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const client = await connect(t, port, `Bearer ${token({ tenant: 'A', user: 'u', roles: ['viewer'], ttlSeconds: 3600 })}`)
  client.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: SUBSCRIPTION } }))
  return { app, client }
}

t.test('a subscription\'s own token for another tenant is refused; the connection and its subscriptions go on', async t => {
  const { app, client } = await subscribedAsA(t)
  await until(() => app.events.bus.subscriptions === 1, 'subscription 1 (tenant A)')

  for (const [id, other] of [['2', { tenant: 'B', user: 'u' }], ['3', { tenant: 'A', user: 'someone-else' }]] as const) {
    client.ws.send(subscribeWith(id, `Bearer ${token({ ...other, roles: ['viewer'], ttlSeconds: 3600 })}`))
    await until(() => client.frames.some(f => f.id === id && (f.type === 'error' || f.type === 'next')), `the answer to subscription ${id}`)
    const answer = client.frames.find(f => f.id === id)!
    const code = answer.type === 'error' ? answer.payload?.[0]?.extensions?.code : answer.payload?.errors?.[0]?.extensions?.code
    t.equal(code, 'FORBIDDEN', `subscription ${id} (tenant ${other.tenant}, user ${other.user}) is refused with FORBIDDEN`)
  }
  t.equal(app.events.bus.subscriptions, 1, 'no stream was opened for another caller')
  t.equal(client.closed(), null, 'the connection stays open')

  await app.events.publish({ topic: 'runs.updated', tenantId: 'B', payload: RUN })
  await app.events.publish({ topic: 'runs.updated', tenantId: 'A', payload: RUN })
  await until(() => client.frames.some(f => f.type === 'next' && f.id === '1'), 'tenant A\'s event on subscription 1')
  t.notOk(client.frames.some(f => f.type === 'next' && f.id !== '1'), 'nothing on the refused ids')
})

t.test('the connection ends with 4403 when the shortest-lived token it accepted expires', async t => {
  const { app, client } = await subscribedAsA(t)
  await until(() => app.events.bus.subscriptions === 1, 'subscription 1 (long token)')
  // The same caller, a token past its exp by 3 s: within the 5 s tolerance for 1 to 2 s more.
  const short = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 'A', roles: ['viewer'], exp: Math.floor(Date.now() / 1000) - 3 })
  client.ws.send(subscribeWith('2', `Bearer ${short}`))
  await until(() => app.events.bus.subscriptions === 2, 'subscription 2 (short token)')
  await until(() => client.closed() !== null, 'the close at the short token\'s expiry', 8000)
  t.equal(client.closed(), 4403, 'closed with 4403')
  await until(() => app.events.bus.subscriptions === 0, 'both streams ended')
})

// A refused token on one subscribe closed the whole connection (4401), its running
// subscriptions with it, though the connection held an accepted identity: as /ws keeps a
// connection whose `auth` frame is refused, only that subscription fails.
t.test('a subscription\'s own refused token fails that subscription alone on a connection that holds an identity', async t => {
  const { app, client } = await subscribedAsA(t)
  await until(() => app.events.bus.subscriptions === 1, 'subscription 1 (tenant A)')
  const expired = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 'A', roles: ['viewer'], exp: Math.floor(Date.now() / 1000) - 60 })
  const forged = token({ tenant: 'A', user: 'u', roles: ['viewer'], secret: 'another-secret-of-sufficient-length-000000' })
  for (const [id, authorization] of [['2', `Bearer ${expired}`], ['3', `Bearer ${forged}`], ['4', 'Bearer not-a-jwt']] as const) {
    client.ws.send(subscribeWith(id, authorization))
    await until(() => client.frames.some(f => f.id === id && f.type === 'error'), `the error of subscription ${id}`)
    t.match(client.frames.find(f => f.id === id), { type: 'error', payload: [{ message: /^The token was refused/, extensions: { code: 'UNAUTHENTICATED', status: 401 } }] }, `subscription ${id} is refused`)
  }
  // The id of a refused subscription is let go of: it may be used again, with a good token.
  client.ws.send(subscribeWith('2', `Bearer ${token({ tenant: 'A', user: 'u', roles: ['viewer'], ttlSeconds: 3600 })}`))
  await until(() => app.events.bus.subscriptions === 2, 'subscription 2 again, with a good token')
  t.equal(client.closed(), null, 'the connection stays open')
  await app.events.publish({ topic: 'runs.updated', tenantId: 'A', payload: RUN })
  await until(() => ['1', '2'].every(id => client.frames.some(f => f.type === 'next' && f.id === id)), 'the event on subscriptions 1 and 2')
  t.equal(client.closed(), null, 'still open')
})
