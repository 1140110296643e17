import t, { type Test } from 'tap'
import { createClient, type FormattedExecutionResult } from 'graphql-ws'
import { WebSocket } from 'ws'
import { createSigner } from 'fast-jwt'
import { buildDemoApp, token, SECRET, until } from '../../helper.js'

// What graphql-ws' own client (createClient, the graphql-transport-ws protocol) does when /graphql
// ends a connection whose identity ended: it treats 4401 (and 4400, 4409, 4429, 4500 and the
// 1xxx codes other than 1000, 1001, 1005, 1006, 1012-1014) as fatal, fails every subscription with
// the close and never reconnects; 4403 it retries, asking its connectionParams again.

const RUN = { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:01Z', startedAt: '2026-01-01T00:00:01Z', finishedAt: null }

/**
 * graphql-ws' client on the demo app's /graphql, as an application makes it: its connectionParams
 * a function asked again on each connection, giving `first` once and a fresh token after; up to
 * three retries, at once. `asked` counts the connectionParams asked, `connected` the connections.
 */
function reconnectingClient (t: Test, port: number, first: string, closed: (event: { code: number, reason: string }) => void): { client: ReturnType<typeof createClient>, counts: { asked: number, connected: number } } {
  const counts = { asked: 0, connected: 0 }
  const client = createClient({
    url: `ws://127.0.0.1:${port}/graphql`,
    webSocketImpl: WebSocket,
    retryAttempts: 3,
    retryWait: async () => {},
    connectionParams: () => ({ authorization: `Bearer ${counts.asked++ === 0 ? first : token({ tenant: 't1', user: 'u1', roles: ['viewer'] })}` }),
    on: { closed: (event) => { closed(event as { code: number, reason: string }) }, connected: () => { counts.connected++ } }
  })
  t.teardown(() => client.dispose())
  return { client, counts }
}

t.test('graphql-ws\' client reconnects with a fresh token when its token expires, and its subscription goes on', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  // The first token's exp is 3 s ago: the 5 s clock tolerance leaves it good for 1 to 2 s more.
  const expiring = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u1', tid: 't1', roles: ['viewer'], exp: Math.floor(Date.now() / 1000) - 3 })
  const closes: number[] = []
  const { client, counts } = reconnectingClient(t, port, expiring, ({ code }) => { closes.push(code) })
  const results: Array<FormattedExecutionResult<Record<string, unknown>, unknown>> = []
  let error: unknown = null
  client.subscribe({ query: 'subscription { runUpdated { id status } }' }, { next: r => { results.push(r) }, error: e => { error = e }, complete: () => {} })
  await until(() => counts.connected === 1 && app.events.bus.subscriptions === 1, 'the first connection\'s subscription')
  await until(() => error !== null || counts.connected === 2, 'the expiry\'s close, then the client\'s reconnection or its error', 8000)
  t.equal(error, null, 'the subscription did not fail')
  t.equal(closes[0], 4403, 'the expired connection is closed with 4403, which graphql-ws\' client retries')
  t.equal(counts.connected, 2, 'the client reconnected')
  t.equal(counts.asked, 2, 'asking its connectionParams again: the fresh token')
  await until(() => app.events.bus.subscriptions === 1, 'the subscription again, on the new connection')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: RUN })
  await until(() => results.length === 1, 'the event after the reconnection')
  t.same(results[0], { data: { runUpdated: { id: 'r1', status: 'running' } } })
})

// A connection_init whose token is refused (a stale one its connectionParams gave on a reconnect,
// before the application refreshed it) was acked, the subscription then failed UNAUTHENTICATED and
// the connection closed 4401, which graphql-ws' client takes for fatal: the subscription ended for
// good. Refused at once with 4403, before any ack, as graphql-ws' own server refuses, the client
// retries, asks its connectionParams again, and subscribes on the new connection.
t.test('graphql-ws\' client whose connectionParams give a refused token retries with a fresh one, and its subscription goes on', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const stale = token({ tenant: 't1', user: 'u1', roles: ['viewer'], ttlSeconds: -60 })
  const closes: Array<[number, string]> = []
  const { client, counts } = reconnectingClient(t, port, stale, ({ code, reason }) => { closes.push([code, String(reason)]) })
  const results: Array<FormattedExecutionResult<Record<string, unknown>, unknown>> = []
  let error: unknown = null
  client.subscribe({ query: 'subscription { runUpdated { id status } }' }, { next: r => { results.push(r) }, error: e => { error = e }, complete: () => {} })
  await until(() => error !== null || (counts.connected === 1 && app.events.bus.subscriptions === 1), 'the subscription on the second connection, or its error', 8000)
  t.equal(error, null, 'the subscription did not fail')
  t.match(closes[0], [4403, /^Forbidden: The token was refused/], 'the stale token\'s connection is refused with 4403, which graphql-ws\' client retries')
  t.equal(counts.asked, 2, 'asking its connectionParams again: the fresh token')
  t.equal(counts.connected, 1, 'the refused connection was never acknowledged')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: RUN })
  await until(() => results.length === 1, 'the event')
  t.same(results[0], { data: { runUpdated: { id: 'r1', status: 'running' } } })
})
