import t from 'tap'
import { WebSocket } from 'ws'
import { buildDemoApp, token, until } from '../helper.js'
import { wsApp, connect } from '../adapters/websocket-helper.js'

// README, REST and OpenAPI: a request id the gateway makes is "a new UUID, version 7 (RFC 9562:
// the time in ms first, then random bits), so that the ids the gateway makes sort as the calls
// came. The same holds for the request id of each WebSocket frame's call and of a subscription."
// Refused subscriptions on /ws and GraphQL subscription documents refused by validation once
// carried randomUUID() ids: version 4.

const V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/

t.test('/ws: a refused subscription carries a UUIDv7 request id', async t => {
  const { url } = await wsApp(t)
  const client = await connect(t, url, { roles: ['editor'] })
  const forbidden = await client.request({ id: 's1', subscribe: 'runUpdated' })
  t.equal(forbidden.error?.code, 'FORBIDDEN')
  t.match(forbidden.error?.requestId, V7, `FORBIDDEN subscription requestId ${String(forbidden.error?.requestId)} is a v7`)
  const unknown = await client.request({ id: 's2', subscribe: 'noSuchEvent' })
  t.equal(unknown.error?.code, 'NOT_FOUND')
  t.match(unknown.error?.requestId, V7, `NOT_FOUND subscription requestId ${String(unknown.error?.requestId)} is a v7`)
})

t.test('GraphQL: a subscription refused by validation carries a UUIDv7 request id', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws', { headers: { authorization: `Bearer ${token({ roles: ['viewer'] })}` } })
  t.teardown(() => ws.terminate())
  const frames: Array<Record<string, any>> = []
  ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  ws.send(JSON.stringify({ type: 'connection_init' }))
  await until(() => frames.some(f => f.type === 'connection_ack'), 'ack')
  ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: 'subscription { runUpdated { id nope } }' } }))
  await until(() => frames.some(f => f.id === '1'), 'answer')
  const answer = frames.find(f => f.id === '1')!
  const ext = answer.type === 'error' ? answer.payload?.[0]?.extensions : answer.payload?.errors?.[0]?.extensions
  t.equal(ext?.code, 'VALIDATION_FAILED')
  t.match(ext?.requestId, V7, `requestId ${String(ext?.requestId)} is a v7`)
})
