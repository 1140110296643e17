import t from 'tap'
import { WebSocket } from 'ws'
import { createClient } from 'graphql-ws'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, bearer, token, until, readUntil } from '../helper.js'

// One tenant holds at most its share of an instance's event subscriptions
// (BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT), checked by the bus for every face: a tenant that
// opens many sockets no longer takes every subscription from the others.

async function listen (app: FastifyInstance): Promise<string> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return `127.0.0.1:${(app.server.address() as { port: number }).port}`
}

async function wsSubscribe (t: { teardown: (fn: () => unknown) => void }, host: string, tenant: string): Promise<Record<string, unknown>> {
  const ws = new WebSocket(`ws://${host}/ws?access_token=${token({ tenant, roles: ['viewer'] })}`)
  t.teardown(() => ws.terminate())
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  const answer = new Promise<Record<string, unknown>>(resolve => ws.once('message', data => resolve(JSON.parse(String(data)))))
  ws.send(JSON.stringify({ id: '1', subscribe: 'runUpdated' }))
  return await answer
}

t.test('tenant B still subscribes on every face while tenant A holds its share', async t => {
  const app = await buildDemoApp(t, { BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT: 3 }, { events: { maxSubscriptions: 100 } })
  const host = await listen(app)

  // Tenant A takes its 3 over GraphQL (graphql-ws); its 4th is refused there.
  const gql = createClient({ url: `ws://${host}/graphql`, webSocketImpl: WebSocket, connectionParams: { authorization: `Bearer ${token({ tenant: 'A', roles: ['viewer'] })}` }, retryAttempts: 0, lazy: false })
  t.teardown(() => gql.dispose())
  const errors: unknown[] = []
  for (let i = 0; i < 3; i++) gql.subscribe({ query: 'subscription { runUpdated { id } }' }, { next () {}, error (err) { errors.push(err) }, complete () {} })
  await until(() => app.events.bus.subscriptions === 3, 'tenant A at its share')
  gql.subscribe({ query: 'subscription { runUpdated { id } }' }, { next () {}, error (err) { errors.push(err) }, complete () {} })
  await until(() => errors.length === 1, 'the 4th GraphQL subscription refused')
  t.match(errors[0], [{ message: 'A tenant holds at most 3 event subscriptions on this instance', extensions: { code: 'OVERLOADED', status: 503, retryAfter: 5 } }])

  // /ws: tenant A is refused, tenant B subscribes.
  t.match(await wsSubscribe(t, host, 'A'), { id: '1', error: { code: 'OVERLOADED', status: 503, detail: 'A tenant holds at most 3 event subscriptions on this instance', retryAfter: 5 } })
  t.same(await wsSubscribe(t, host, 'B'), { id: '1', subscribed: 'runUpdated' }, 'tenant B is not refused')

  // tRPC over SSE: refused before the stream starts, with Retry-After on the response.
  const controller = new AbortController()
  t.teardown(() => controller.abort())
  const res = await fetch(`http://${host}/trpc/runUpdated`, { headers: { ...bearer({ tenant: 'A', roles: ['viewer'] }), accept: 'text/event-stream' }, signal: controller.signal })
  t.equal(res.headers.get('retry-after'), '5')
  const text = await readUntil(res, 'serialized-error')
  t.match(text, /"code":"OVERLOADED","httpStatus":503,.*"retryAfter":5/)
  t.match(text, /A tenant holds at most 3 event subscriptions on this instance/)

  t.equal(app.events.bus.subscriptions, 4, 'tenant A\'s 3 and tenant B\'s 1')
  const metrics = await app.inject({ url: '/metrics' })
  t.match(metrics.body, /mantle_event_subscriptions_refused_total\{bound="tenant"\} 3\n/, 'each refusal counted by its bound')

  // Tenant A's room comes back as its subscriptions end.
  await gql.dispose()
  await until(() => app.events.bus.subscriptions === 1, 'tenant A\'s subscriptions gone')
  t.same(await wsSubscribe(t, host, 'A'), { id: '1', subscribed: 'runUpdated' })
})

t.test('with identity off every caller is one tenant: no share is applied', async t => {
  const app = await buildDemoApp(t, { BFF_AUTH_ENABLED: false, BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT: 1 }, { events: { maxSubscriptions: 100 } })
  for (let i = 0; i < 3; i++) app.events.bus.subscribe('runUpdated', 'public', () => {})
  t.equal(app.events.bus.subscriptions, 3)
})
