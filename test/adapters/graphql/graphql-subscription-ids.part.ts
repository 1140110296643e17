import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildDemoApp, until } from '../../helper.js'
import { openGraphqlWs } from '../websocket-helper.js'

// A subscription's id goes into every frame of it (each `next`, its `error`, its `complete`). It
// was of any length up to the frame limit: 50 subscriptions under 60 KB ids made each event of
// the tenant 3 MB of frames to serialize and write to that one connection (8.4 KB with short
// ids), over each of the tenant's connections, for as long as they stayed. The /ws face bounds its
// frame ids (128 characters) for that reason; graphql-ws clients use UUIDs (36).

const RUN = { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:01Z', startedAt: '2026-01-01T00:00:01Z', finishedAt: null }
const QUERY = 'subscription { runUpdated { id } }'

t.test('a subscription id longer than 128 characters is refused; one of 128 runs', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const open = async (protocol: string): ReturnType<typeof openGraphqlWs> => await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`, {}, protocol)

  // graphql-transport-ws: a message the gateway does not take, 4400.
  const long = await open('graphql-transport-ws')
  long.ws.send(JSON.stringify({ id: 'x'.repeat(129), type: 'subscribe', payload: { query: QUERY } }))
  await until(() => long.closed() !== null, 'the close')
  t.same(long.closed(), [4400, 'Invalid message: an id holds at most 128 characters'])
  t.equal(app.events.bus.subscriptions, 0, 'no subscription ran')

  // The legacy graphql-ws: an error, without the id, and the connection stays open.
  const legacy = await open('graphql-ws')
  legacy.ws.send(JSON.stringify({ id: 'y'.repeat(60_000), type: 'start', payload: { query: QUERY } }))
  await until(() => legacy.frames.some(f => f.type === 'error'), 'the legacy error')
  t.match(legacy.frames.find(f => f.type === 'error'), { id: null, payload: [{ message: 'Invalid message: an id holds at most 128 characters', extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
  await sleep(50)
  t.equal(app.events.bus.subscriptions, 0, 'no subscription ran')
  t.equal(legacy.closed(), null)

  // 128 characters run, and each event carries the id as sent.
  const ok = await open('graphql-transport-ws')
  const id = 'z'.repeat(128)
  ok.ws.send(JSON.stringify({ id, type: 'subscribe', payload: { query: QUERY } }))
  await until(() => app.events.bus.subscriptions === 1, 'the subscription')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: RUN })
  await until(() => ok.frames.some(f => f.type === 'next'), 'the event')
  t.same(ok.frames.find(f => f.type === 'next'), { type: 'next', id, payload: { data: { runUpdated: { id: 'r1' } } } })
  t.equal(ok.closed(), null)
})
