import t, { type Test } from 'tap'
import type { AddressInfo, Socket } from 'node:net'
import WebSocket from 'ws'
import { buildDemoApp, buildTestApp, startTestKernel, testManifest, json, bearer, until } from '../helper.js'
import { peakBuffered } from './websocket-helper.js'

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

/**
 * A demo gateway (tRPC only), and a tRPC WebSocket client subscribed to runUpdated: the ids of
 * the runs it received, and how many frames came as binary.
 */
async function subscriber (t: Test, beforeSubscribe: (server: WebSocket) => void = () => {}) {
  const app = await buildDemoApp(t, { BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const client = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers: bearer({ roles: ['viewer'] }) })
  t.teardown(() => client.terminate())
  const received: string[] = []
  const frames = { started: false, binary: 0 }
  client.on('message', (d: Buffer, isBinary: boolean) => {
    if (isBinary) frames.binary++
    const message = JSON.parse(d.toString()) as { result?: { type?: string, data?: { id?: string } } }
    if (message.result?.type === 'started') frames.started = true
    const id = message.result?.data?.id
    if (id !== undefined) received.push(id)
  })
  await new Promise<void>((resolve, reject) => { client.once('open', resolve); client.once('error', reject) })
  const [server] = [...app.websocketServer.clients]
  beforeSubscribe(server)
  client.send(JSON.stringify({ id: 1, method: 'subscription', params: { path: 'runUpdated', input: null } }))
  await until(() => frames.started && app.events.bus.subscriptions === 1, 'the subscription')
  return { app, client, server, received, frames }
}

t.test('a tRPC WebSocket subscriber that stops reading loses the oldest events, and the socket stays bounded', async t => {
  const { app, client, server, received } = await subscriber(t)

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

// README: the bound on what a tRPC socket's client has not read is counted in UTF-8 bytes, as on
// /ws and /graphql. tRPC sends each answer and event as a string, which ws counts in characters:
// an event of N two-byte characters added about N to bufferedAmount, so a subscriber was paused
// only once twice the bound was queued.
t.test('a tRPC WebSocket subscriber that stops reading: each queued event counts its UTF-8 bytes, and it still arrives as text', async t => {
  let peaked!: ReturnType<typeof peakBuffered>
  const { app, client, server, received, frames } = await subscriber(t, server => { peaked = peakBuffered(server) })

  const raw = (client as unknown as { _socket: Socket })._socket
  raw.pause()
  // Two UTF-8 bytes a character: 60 KiB an event, 30 Ki characters.
  const output = 'é'.repeat(30 * 1024)
  const bytes = Buffer.byteLength(output)
  let sent = 0
  for (; sent < 400 && server.bufferedAmount < 1024 * 1024; sent++) {
    await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run(`r${sent}`, output) })
    await sleep(0)
  }
  const { step } = peaked()
  t.ok(step !== Infinity, 'events were queued on a socket holding something')
  t.ok(step >= bytes, `each queued event counts at least its ${bytes} UTF-8 bytes (${step})`)
  t.equal(server.readyState, WebSocket.OPEN, 'the connection stays open')

  raw.resume()
  await until(() => received.includes(`r${sent - 1}`), 'the last event')
  t.equal(frames.binary, 0, 'every frame arrived as text')
})

// README /ws: "A reader that lets more than 4 MiB pile up is closed with 1013". Before, the
// answers of tRPC WebSocket *calls* were sent whatever the socket held (only subscriptions looked
// at it): a client that sent small batched queries and never read made the gateway hold their
// much larger answers without end (56 MiB for 0.02 MiB sent). A call that would answer on a
// socket holding more than the bound now closes it with 1013, and the calls that still arrive on
// it run nothing.
t.test('a tRPC WebSocket client that stops reading the answers of its calls is closed with 1013', async t => {
  const app = await buildDemoApp(t, { BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  // 100 agents with a full description: a listAgents answer of ~210 KB for a call of ~80 bytes.
  await Promise.all(Array.from({ length: 100 }, async (_, i) => {
    const res = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: bearer(), payload: { name: `agent ${i}`, description: 'd'.repeat(2000) } })
    if (res.statusCode !== 201) throw new Error(res.body)
  }))

  const client = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers: bearer({ roles: ['viewer'] }) })
  t.teardown(() => client.terminate())
  let answers = 0
  client.on('message', () => { answers++ })
  const closed = new Promise<number>(resolve => client.once('close', (code: number) => resolve(code)))
  await new Promise<void>((resolve, reject) => { client.once('open', resolve); client.once('error', reject) })
  // The client stops reading.
  const raw = (client as unknown as { _socket: Socket })._socket
  raw.pause()

  const [server] = [...app.websocketServer.clients]
  let n = 0
  const batch = (): string => JSON.stringify(Array.from({ length: 50 }, () => ({ id: ++n, method: 'query', params: { path: 'listAgents', input: { limit: 100 } } })))
  // A message of 50 calls answers ~10 MB: more than the kernel's socket
  // buffers and the bound take together. Before, each batch added its answers to the buffer.
  for (let round = 0; round < 4 && server.readyState === WebSocket.OPEN; round++) {
    client.send(batch())
    await sleep(150)
  }
  // The answers of the calls sent so far are well over the bound: on a slow machine they may
  // still be in the making.
  await until(() => server.readyState !== WebSocket.OPEN, 'the gateway to close the socket', 15_000).catch(() => {})
  const holds = server.bufferedAmount
  t.not(server.readyState, WebSocket.OPEN, `the gateway closes the socket (it holds ${(holds / 1024 / 1024).toFixed(1)} MiB)`)
  // Calls that arrive on the closing socket are refused before they run: nothing more is held.
  client.send(batch())
  await sleep(150)
  t.ok(server.bufferedAmount <= holds, 'the calls sent after the close add nothing to the buffer')

  // Once it reads again, the client gets the answers sent before the close, then 1013.
  raw.resume()
  t.equal(await Promise.race([closed, sleep(3000).then(() => 'still open')]), 1013, 'closed with 1013, as /ws closes a reader that does not read')
  t.ok(answers > 0 && answers < n, `the client got ${answers} of its ${n} answers`)
  // Counted, once, as /ws counts its own (it was counted nowhere).
  t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_slow_reader_cuts_total\{face="trpc",transport="websocket"\} 1\n/)
})

// The answer of a call that started while the socket held little, and ends once it holds more
// than the bound, is not sent: the bound is checked when the answer is ready, not only when the
// call starts (the calls of a batch all start together, on an empty socket).
t.test('a tRPC WebSocket call that ends on a socket holding more than the bound closes it unanswered', async t => {
  let release = (): void => {}
  const held = new Promise<void>(resolve => { release = resolve })
  const big = { data: 'x'.repeat(1024 * 1024) }
  const kernel = await startTestKernel(t, {
    'GET /v1/big': (_req, res) => json(res, 200, big),
    'GET /v1/held': async (_req, res) => { await held; json(res, 200, { data: 'held' }) }
  })
  const output = { type: 'object', properties: { data: { type: 'string' } } }
  const manifest = testManifest({
    big: { type: 'query', rest: 'GET /big', kernel: 'GET /v1/big', output },
    held: { type: 'query', rest: 'GET /held', kernel: 'GET /v1/held', output }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, { BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false }, { manifest, kernelUrl: kernel.url })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo

  const client = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers: bearer() })
  t.teardown(() => client.terminate())
  const ids: unknown[] = []
  client.on('message', (d: Buffer) => ids.push((JSON.parse(d.toString()) as { id?: unknown }).id))
  const closed = new Promise<number>(resolve => client.once('close', (code: number) => resolve(code)))
  await new Promise<void>((resolve, reject) => { client.once('open', resolve); client.once('error', reject) })
  const raw = (client as unknown as { _socket: Socket })._socket
  raw.pause()
  const [server] = [...app.websocketServer.clients]

  // Calls in the pipeline: one that has left it has had its answer sent (in the same turn).
  const gauge = app.metrics.registry.getSingleMetric('mantle_requests_in_flight')!
  const inPipeline = async (): Promise<number> => (await gauge.get()).values[0].value

  // `held` starts on an empty socket; then 1 MB answers, one call at a time, fill the kernel's
  // buffers and the socket's until it holds more than 4 MiB.
  client.send(JSON.stringify({ id: 'held', method: 'query', params: { path: 'held', input: {} } }))
  await until(() => kernel.requests.length === 1, 'the held call to reach the Kernel')
  for (let i = 0; i < 64 && server.bufferedAmount <= 4 * 1024 * 1024; i++) {
    client.send(JSON.stringify({ id: i, method: 'query', params: { path: 'big', input: {} } }))
    await until(() => kernel.requests.length === i + 2, 'the call to reach the Kernel')
    while (await inPipeline() > 1) await sleep(5)
  }
  t.ok(server.bufferedAmount > 4 * 1024 * 1024, 'the socket holds more than the bound')
  t.equal(server.readyState, WebSocket.OPEN, 'every answer sent so far left on a socket within the bound')

  release()
  await until(() => server.readyState !== WebSocket.OPEN, 'the socket to close', 10_000).catch(() => {})
  t.not(server.readyState, WebSocket.OPEN, 'the held call\'s answer closes the socket')
  // A call that still arrives on the closing socket is refused before it reaches the Kernel.
  const reached = kernel.requests.length
  client.send(JSON.stringify({ id: 'late', method: 'query', params: { path: 'big', input: {} } }))
  await sleep(100)
  t.equal(kernel.requests.length, reached, 'a call sent after the close does not reach the Kernel')
  raw.resume()
  t.equal(await Promise.race([closed, sleep(3000).then(() => 'still open')]), 1013, 'closed with 1013')
  t.notOk(ids.includes('held'), 'the held call\'s answer was never sent')
})

t.test('a client that reads nothing is closed with 1013 once @trpc/server\'s own answers pass the bound, not only its calls\'', async t => {
  // The router checks the bound for calls alone; @trpc/server answers a subscription refused
  // before it runs (here its input), a batch past 1000 calls, a PING or a message it cannot parse
  // itself, whatever the socket holds: 200 messages of 1000 refused subscriptions each made a
  // socket hold 37 MB, growing, still open.
  const app = await buildDemoApp(t, { BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const client = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers: bearer({ roles: ['viewer'] }) })
  t.teardown(() => client.terminate())
  await new Promise<void>((resolve, reject) => { client.once('open', resolve); client.once('error', reject) })
  const [server] = [...app.websocketServer.clients]
  ;(client as unknown as { _socket: Socket })._socket.pause()
  let id = 0
  for (let m = 0; m < 100 && server.readyState === WebSocket.OPEN; m++) {
    client.send(JSON.stringify(Array.from({ length: 1000 }, () => ({ id: ++id, method: 'subscription', params: { path: 'runUpdated', input: { x: 1 } } }))))
    await sleep(20)
  }
  t.not(server.readyState, WebSocket.OPEN, 'closed')
  t.ok(server.bufferedAmount < 8 * 1024 * 1024, `the socket held ${server.bufferedAmount} bytes: the bound and a message's answers`)
})
