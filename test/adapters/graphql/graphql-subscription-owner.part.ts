import t from 'tap'
import { WebSocket } from 'ws'
import { buildDemoApp, token, until } from '../../helper.js'

// README, GraphQL: "A `subscribe` message may carry its own (mercurius' extensions: [{ type:
// "connectionInit", payload }]): it must name the connection's tenant and user (else that
// subscription is refused, FORBIDDEN)". The connection's caller is the one of its own
// credentials (connection_init's, else the upgrade's), even when its FIRST subscribe carries
// another tenant's token (that one was once accepted, and the connection became the other's).

const RUN = { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:01Z', startedAt: '2026-01-01T00:00:01Z', finishedAt: null }
const SUBSCRIPTION = 'subscription { runUpdated { id status } }'

for (const where of ['upgrade header', 'connection_init'] as const) {
  t.test(`first subscribe with another tenant's token than the connection's (${where}) is refused`, async t => {
    const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
    await app.listen({ port: 0, host: '127.0.0.1' })
    const { port } = app.server.address() as { port: number }
    const mine = `Bearer ${token({ tenant: 'A', user: 'u', roles: ['viewer'], ttlSeconds: 3600 })}`
    const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws', where === 'upgrade header' ? { headers: { authorization: mine } } : {})
    t.teardown(() => ws.terminate())
    const frames: Array<Record<string, any>> = []
    ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
    await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
    ws.send(JSON.stringify(where === 'upgrade header' ? { type: 'connection_init' } : { type: 'connection_init', payload: { authorization: mine } }))
    await until(() => frames.some(f => f.type === 'connection_ack'), 'connection_ack')

    const other = `Bearer ${token({ tenant: 'B', user: 'u', roles: ['viewer'], ttlSeconds: 3600 })}`
    ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: SUBSCRIPTION }, extensions: [{ type: 'connectionInit', payload: { authorization: other } }] }))
    await until(() => frames.some(f => f.id === '1' && (f.type === 'error' || f.type === 'next')) || app.events.bus.subscriptions === 1, 'an answer or a stream')
    await new Promise(resolve => setTimeout(resolve, 100))
    await app.events.publish({ topic: 'runs.updated', tenantId: 'B', payload: RUN })
    await new Promise(resolve => setTimeout(resolve, 200))
    const answer = frames.find(f => f.id === '1')
    t.equal(app.events.bus.subscriptions, 0, 'no stream opened for tenant B on a tenant A connection')
    t.notOk(frames.some(f => f.type === 'next' && f.payload?.data?.runUpdated !== undefined), 'no tenant B event reaches the tenant A connection')
    const code = answer?.type === 'error' ? answer.payload?.[0]?.extensions?.code : answer?.payload?.errors?.[0]?.extensions?.code
    t.equal(code, 'FORBIDDEN', 'refused with FORBIDDEN')
  })
}
