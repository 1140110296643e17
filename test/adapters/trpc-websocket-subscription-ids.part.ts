import t from 'tap'
import type { AddressInfo } from 'node:net'
import { buildDemoApp, drained, until } from '../helper.js'
import { connect } from './websocket-helper.js'

// A tRPC WebSocket subscription's id goes into every message of it (`started`, each `data`,
// `stopped`, its error), and @trpc/server holds it as its key while the subscription lasts. It
// was of any length up to the frame limit: 32 subscriptions (a connection's bound) under 60 KB
// ids made each event of the tenant some 2 MB of messages to encode and write to that one
// connection, and held 2 MB of ids, over each such connection of the tenant. /ws bounds its frame
// ids (128 characters), and so does /graphql its subscribe ids (ed41017); wsLink's are numbers.

const RUN = { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:01Z', startedAt: '2026-01-01T00:00:01Z', finishedAt: null }

t.test('WebSocket: a subscription whose id is longer than 128 characters is refused before it starts; one of 128 runs', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const client = await connect(t, `ws://127.0.0.1:${port}/trpc`, { tenant: 'tids', user: 'uids', roles: ['viewer'] })
  const frames: Array<Record<string, any>> = []
  client.ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))

  // Refused whole, as a message tRPC cannot parse is: id null, VALIDATION_FAILED, recorded under the event.
  client.send({ id: 'x'.repeat(60_000), method: 'subscription', params: { path: 'runUpdated' } })
  await until(() => frames.length > 0, 'the answer')
  t.match(frames[0], { id: null, error: { message: 'A subscription\'s id holds at most 128 characters', data: { code: 'VALIDATION_FAILED', httpStatus: 400 } } })
  t.equal(app.events.bus.subscriptions, 0, 'no subscription ran')
  await drained(app)
  const rows = (await app.audit.store.query({ action: 'runUpdated', limit: 10 })).entries.filter(r => r.tenantId === 'tids')
  t.match(rows, [{ requestId: frames[0].error.data.requestId, status: 'VALIDATION_FAILED', category: 'security' }], 'recorded once, refused')

  // 128 characters run, and each event carries the id as sent.
  const id = 'z'.repeat(128)
  client.send({ id, method: 'subscription', params: { path: 'runUpdated' } })
  await until(() => app.events.bus.subscriptions === 1, 'the subscription')
  await app.events.publish({ topic: 'runs.updated', tenantId: 'tids', payload: RUN })
  await until(() => frames.some(f => f.result?.type === 'data'), 'the event')
  t.match(frames.find(f => f.result?.type === 'data'), { id, result: { type: 'data', data: { id: 'r1' } } })
  t.equal(client.ws.readyState, client.ws.OPEN, 'the connection stays open')
})
