import t from 'tap'
import type { AddressInfo, Socket } from 'node:net'
import WebSocket from 'ws'
import { buildDemoApp, bearer, until } from '../helper.js'

// README "Events": "Delivery is bounded: a subscriber whose stream falls more than 256 events
// behind loses the oldest". @trpc/server's WebSocket adapter sends each event the moment the
// subscription yields it, without looking at what the socket already holds. The face pulls the
// next event only while the socket holds at most the /ws face's bound (4 MiB), so for a client
// that stops reading the bus's queue fills and drops the oldest events, instead of the socket's
// buffer growing without end.

const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

function run (id: string, output: string): Record<string, unknown> {
  const at = '2026-01-01T00:00:00.000Z'
  return { id, agentId: 'a1', status: 'running', temperature: 0.7, promptChars: 5, output, error: null, createdAt: at, updatedAt: at, startedAt: at, finishedAt: null }
}

t.test('a tRPC WebSocket subscriber that stops reading loses the oldest events, and the socket stays bounded', async t => {
  const app = await buildDemoApp(t, { BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo

  const client = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers: bearer({ roles: ['viewer'] }) })
  t.teardown(() => client.terminate())
  // The ids of the runs received, and whether the subscription started.
  const received: string[] = []
  let started = false
  client.on('message', (d: Buffer) => {
    const message = JSON.parse(d.toString()) as { result?: { type?: string, data?: { id?: string } } }
    if (message.result?.type === 'started') started = true
    const id = message.result?.data?.id
    if (id !== undefined) received.push(id)
  })
  await new Promise<void>((resolve, reject) => { client.once('open', resolve); client.once('error', reject) })
  client.send(JSON.stringify({ id: 1, method: 'subscription', params: { path: 'runUpdated', input: null } }))
  await until(() => started && app.events.bus.subscriptions === 1, 'the subscription')

  // The client stops reading: the kernel's buffers fill, then the gateway's.
  const raw = (client as unknown as { _socket: Socket })._socket
  raw.pause()
  const EVENTS = 2000
  const SIZE = 50 * 1024
  const big = 'x'.repeat(SIZE)
  for (let i = 0; i < EVENTS; i++) {
    await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run(`r${i}`, big) })
    if (i % 20 === 0) await sleep(0)
  }
  await sleep(200)

  const [server] = [...app.websocketServer.clients]
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  const dropped = Number(/mantle_events_dropped_total\{reason="slow_consumer"\} (\d+)/.exec(metrics)?.[1] ?? 0)
  // The socket holds at most the bound plus the one event sent when it was just below it.
  t.ok(server.bufferedAmount <= 4 * 1024 * 1024 + 2 * SIZE, `the socket holds at most ~4 MiB (holds ${(server.bufferedAmount / 1024 / 1024).toFixed(1)} MiB)`)
  t.ok(dropped > 0, `the bus dropped the oldest events of the slow subscriber (${dropped})`)
  t.equal(server.readyState, WebSocket.OPEN, 'the connection stays open')

  // Once the client reads again, the subscription resumes with the newest events.
  raw.resume()
  await until(() => received.includes(`r${EVENTS - 1}`), 'the newest event')
  t.ok(received.length < EVENTS, `the client got ${received.length} of ${EVENTS} events, the newest among them`)

  // A subscription paused on a full socket ends when the socket closes.
  raw.pause()
  for (let i = 0; i < 400; i++) await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run(`s${i}`, big) })
  await until(() => server.bufferedAmount > 4 * 1024 * 1024, 'the socket to fill')
  client.terminate()
  await until(() => app.events.bus.subscriptions === 0, 'the subscription to end')
  t.pass('the paused subscription ended with its socket')
})
