import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { WebSocket } from 'ws'
import { EventSource } from 'eventsource'
import { createClient } from 'graphql-ws'
import { createTRPCUntypedClient, httpSubscriptionLink } from '@trpc/client'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, token, until } from '../helper.js'

// Two gateway instances share the machine's Redis. One event, published once on the first,
// reaches a WebSocket subscriber on each, a GraphQL subscriber and a tRPC subscriber; a
// subscriber of another tenant receives nothing.

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const INTERNAL = 'internal-token-for-events-test'

async function listen (app: FastifyInstance): Promise<string> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return `127.0.0.1:${(app.server.address() as { port: number }).port}`
}

t.test('one event reaches subscribers of its tenant on every face and every instance', async t => {
  const tenant = 'tenant-' + randomUUID()
  const one = await buildDemoApp(t, { REDIS_URL, BFF_INTERNAL_TOKEN: INTERNAL })
  const two = await buildDemoApp(t, { REDIS_URL })
  await until(() => one.events.health().up && two.events.health().up, 'both Redis subscribers')
  const [hostOne, hostTwo] = [await listen(one), await listen(two)]
  const viewer = token({ tenant, roles: ['viewer'] })
  const stranger = token({ tenant: tenant + '-other', roles: ['viewer'] })
  const received: Record<string, unknown[]> = { wsOne: [], wsTwo: [], wsStranger: [], graphql: [], trpc: [] }

  // WebSocket: one subscriber per instance, and one of another tenant.
  const subscribeWs = async (host: string, bearer: string, into: unknown[]): Promise<WebSocket> => {
    const ws = new WebSocket(`ws://${host}/ws?access_token=${bearer}`)
    t.teardown(() => ws.terminate())
    await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
    const subscribed = new Promise<void>(resolve => {
      ws.on('message', (data) => {
        const frame = JSON.parse(String(data)) as { subscribed?: string, event?: string, data?: unknown }
        if (frame.subscribed === 'runUpdated') resolve()
        if (frame.event === 'runUpdated') into.push(frame.data)
      })
    })
    ws.send(JSON.stringify({ id: 's', subscribe: 'runUpdated' }))
    await subscribed
    return ws
  }
  await subscribeWs(hostOne, viewer, received.wsOne)
  await subscribeWs(hostTwo, viewer, received.wsTwo)
  await subscribeWs(hostTwo, stranger, received.wsStranger)

  // GraphQL over graphql-ws, on instance two.
  const gql = createClient({ url: `ws://${hostTwo}/graphql`, webSocketImpl: WebSocket, connectionParams: { authorization: `Bearer ${viewer}` }, retryAttempts: 0 })
  t.teardown(() => gql.dispose())
  const gqlDone = gql.subscribe({ query: 'subscription { runUpdated { id status agentId } }' }, {
    next: (value) => { received.graphql.push((value.data as { runUpdated: unknown }).runUpdated) },
    error: (err) => { received.graphql.push({ error: String(err) }) },
    complete: () => {}
  })
  t.teardown(gqlDone)

  // tRPC over SSE, on instance one.
  const trpc = createTRPCUntypedClient({
    links: [httpSubscriptionLink({
      url: `http://${hostOne}/trpc`,
      EventSource,
      eventSourceOptions: () => ({ fetch: async (input, init) => await fetch(input, { ...init, headers: { ...init?.headers, authorization: `Bearer ${viewer}` } }) })
    })]
  })
  let trpcStarted = false
  const sub = trpc.subscription('runUpdated', undefined, {
    onStarted: () => { trpcStarted = true },
    onData: (data: unknown) => { received.trpc.push(data) },
    onError: (err: unknown) => { received.trpc.push({ error: String(err) }) }
  })
  t.teardown(() => sub.unsubscribe())
  await until(() => trpcStarted, 'the tRPC subscription')
  await until(() => one.events.bus.subscriptions >= 2 && two.events.bus.subscriptions >= 3, 'every subscription to reach the buses')

  const run = { id: 'r42', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-11-23T00:00:00.000Z', updatedAt: '2026-11-23T00:00:01.000Z', startedAt: '2026-11-23T00:00:01.000Z', finishedAt: null, secretCost: 99 }
  const res = await one.inject({ method: 'POST', url: '/internal/events', headers: { authorization: `Bearer ${INTERNAL}` }, payload: { topic: 'runs.updated', tenantId: tenant, payload: run } })
  t.equal(res.statusCode, 202)

  await until(() => received.wsOne.length > 0 && received.wsTwo.length > 0 && received.graphql.length > 0 && received.trpc.length > 0, 'every face to receive the event')
  await sleep(100)
  const { secretCost: _hidden, ...shaped } = run
  t.same(received.wsOne, [shaped], 'WebSocket on the publishing instance, shaped by the event schema')
  t.same(received.wsTwo, [shaped], 'WebSocket on the other instance')
  t.same(received.graphql, [{ id: 'r42', status: 'running', agentId: 'a1' }], 'GraphQL subscription')
  t.same(received.trpc, [shaped], 'tRPC subscription')
  t.same(received.wsStranger, [], 'another tenant receives nothing')
})

t.test('an event whose payload its schema refuses reaches no face; the next one reaches every face', async t => {
  const app = await buildDemoApp(t, { BFF_INTERNAL_TOKEN: INTERNAL })
  const host = await listen(app)
  const viewer = token({ tenant: 'mismatch', roles: ['viewer'] })
  const received: Record<string, unknown[]> = { ws: [], graphql: [], trpc: [] }
  const ws = new WebSocket(`ws://${host}/ws?access_token=${viewer}`)
  t.teardown(() => ws.terminate())
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  ws.on('message', (data) => {
    const frame = JSON.parse(String(data)) as { event?: string, data?: unknown }
    if (frame.event === 'runUpdated') received.ws.push(frame.data)
  })
  ws.send(JSON.stringify({ id: 's', subscribe: 'runUpdated' }))
  const gql = createClient({ url: `ws://${host}/graphql`, webSocketImpl: WebSocket, connectionParams: { authorization: `Bearer ${viewer}` }, retryAttempts: 0 })
  t.teardown(() => gql.dispose())
  t.teardown(gql.subscribe({ query: 'subscription { runUpdated { id status promptChars temperature } }' }, {
    next: (value) => { received.graphql.push(value.errors === undefined ? (value.data as { runUpdated: unknown }).runUpdated : { errors: value.errors.map(e => e.message) }) },
    error: (err) => { received.graphql.push({ error: String(err) }) },
    complete: () => {}
  }))
  const trpc = createTRPCUntypedClient({
    links: [httpSubscriptionLink({
      url: `http://${host}/trpc`,
      EventSource,
      eventSourceOptions: () => ({ fetch: async (input, init) => await fetch(input, { ...init, headers: { ...init?.headers, authorization: `Bearer ${viewer}` } }) })
    })]
  })
  const sub = trpc.subscription('runUpdated', undefined, { onData: (data: unknown) => { received.trpc.push(data) }, onError: (err: unknown) => { received.trpc.push({ error: String(err) }) } })
  t.teardown(() => sub.unsubscribe())
  await until(() => app.events.bus.subscriptions === 3, 'every subscription to reach the bus')

  const run = { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-11-23T00:00:00.000Z', updatedAt: '2026-11-23T00:00:01.000Z', startedAt: null, finishedAt: null }
  const publish = async (payload: string): Promise<void> => {
    const res = await app.inject({ method: 'POST', url: '/internal/events', headers: { authorization: `Bearer ${INTERNAL}`, 'content-type': 'application/json' }, payload: `{"topic":"runs.updated","tenantId":"mismatch","payload":${payload}}` })
    t.equal(res.statusCode, 202)
  }
  const refused = [
    { ...run, status: 'paused' }, // not in its enum: GraphQL answered an error, the others sent it
    { ...run, promptChars: 1.5 }, // a fraction for an integer: sent as 1
    { ...run, temperature: '1' }, // text for a number: sent as 1
    { ...run, id: 42 }, // a number for a string: sent as "42"
    { ...run, temperature: 3 } // beyond its maximum
  ]
  for (const payload of refused) await publish(JSON.stringify(payload))
  await publish(JSON.stringify(run).replace('"promptChars":12', '"promptChars":1e400')) // Infinity: sent as null
  await publish(JSON.stringify({ ...run, id: 'r2' }))
  await until(() => received.ws.length > 0 && received.graphql.length > 0 && received.trpc.length > 0, 'every face to receive an event')
  await sleep(100)
  t.same(received.ws, [{ ...run, id: 'r2' }], '/ws receives the event its schema admits, alone')
  t.same(received.trpc, [{ ...run, id: 'r2' }], 'tRPC too')
  t.same(received.graphql, [{ id: 'r2', status: 'running', promptChars: 12, temperature: 0.5 }], 'GraphQL too')
  const metrics = await app.inject({ method: 'GET', url: '/metrics' })
  t.match(metrics.body, /mantle_events_dropped_total\{reason="invalid"\} 6/)
})
