import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { WebSocket } from 'ws'
import type { FastifyInstance } from 'fastify'
import { buildApp } from '../../../app.js'
import { createGraphqlFace } from '../../../adapters/graphql/index.js'
import { startKernel } from '../../../kernel/server.js'
import { buildDemoApp, testConfig, token, until } from '../../helper.js'
import { openGraphqlWs as open, run } from '../websocket-helper.js'

// How a GraphQL subscription's life goes over graphql-transport-ws on /graphql: a document
// graphql-js throws on, a `complete` then a `subscribe` of the same id, a client that stops
// reading, a client that vanishes (adapters/graphql/subscriptions.ts).

interface Teardown { teardown: (fn: () => unknown) => void }

async function listen (t: Teardown, env: Record<string, unknown> = {}): Promise<{ app: FastifyInstance, url: string }> {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false, ...env })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, url: `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql` }
}

let sockets = 0
/**
 * As listen(), on a Unix socket: the operating system holds about 200 KB of a client that does
 * not read there, against several MB over loopback TCP, so a test that must fill it first sends
 * hundreds of pings, not hundreds of thousands (10 s of CPU on each side, on a loaded run 30 s).
 */
async function listenUnix (t: Teardown): Promise<{ app: FastifyInstance, url: string }> {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  const path = join(tmpdir(), `mantle-graphql-${process.pid}-${++sockets}.sock`)
  await app.listen({ path })
  return { app, url: `ws+unix://${path}:/graphql` }
}

const SUBSCRIPTION = 'subscription { runUpdated { id } }'

t.test('a document graphql-js throws on gets its VALIDATION_FAILED error, and its id is free again; variables in directives work', async t => {
  // graphql-js's single-field rule runs without the variables: a variable in a directive made
  // validate() throw, and a root field left out by @skip made subscribe() throw a TypeError.
  // Either was sent without extensions.code, and the id stayed taken for good: reusing it
  // closed the connection with 4409.
  const { app, url } = await listen(t)
  const c = await open(t, url)
  const anonymous = 'Anonymous Subscription must'
  const refused: Array<[string, Record<string, unknown>, string]> = [
    ['a root field skipped', { query: 'subscription { runUpdated @skip(if: true) { id } }' }, `${anonymous} select one top level field: its @skip and @include leave none`],
    ['a root field left out by a variable', { query: 'subscription ($s: Boolean!) { runUpdated @include(if: $s) { id } }', variables: { s: false } }, `${anonymous} select one top level field: its @skip and @include leave none`],
    ['an introspection root field', { query: 'subscription { __typename }' }, `${anonymous} not select an introspection top level field.`],
    // graphql's own validation comes first, with its own message, as over HTTP.
    ['a directive argument of the wrong type', { query: 'subscription { runUpdated @skip(if: "yes") { id } }' }, 'Boolean cannot represent a non boolean value: "yes"'],
    ['a nullable variable where a directive needs one', { query: 'subscription ($s: Boolean) { runUpdated @include(if: $s) { id } }' }, 'Variable "$s" of type "Boolean" used in position expecting type "Boolean!".'],
    ['a variable a directive needs, not given', { query: 'subscription ($s: Boolean!) { runUpdated @include(if: $s) { id } }' }, 'Variable "$s" of required type "Boolean!" was not provided.'],
    ['an unknown fragment', { query: 'subscription { ...F }' }, 'Unknown fragment "F".'],
    ['a fragment on the wrong type', { query: 'subscription { ...F } fragment F on Query { __typename }' }, 'Fragment "F" cannot be spread here as objects of type "Subscription" can never be of type "Query".'],
    ['a root field that does not exist', { query: 'subscription { nope }' }, 'Cannot query field "nope" on type "Subscription".'],
    ['two root fields, one by a variable', { query: 'subscription ($s: Boolean = true) { runUpdated { id } again: runUpdated @include(if: $s) { id } }' }, `${anonymous} select only one top level field.`]
  ]
  for (const [what, payload, message] of refused) {
    c.frames.length = 0
    c.send({ id: 'v', type: 'subscribe', payload })
    await until(() => c.frames.some(f => f.id === 'v'), `the error of ${what}`)
    t.match(c.frames.find(f => f.id === 'v'), { type: 'error', payload: [{ message, extensions: { code: 'VALIDATION_FAILED', status: 400, requestId: String } }] }, what)
  }
  // The id is free again: a well-formed subscription runs under it, with a variable in a
  // directive of its root field, given or defaulted.
  c.frames.length = 0
  c.send({ id: 'v', type: 'subscribe', payload: { query: 'subscription ($s: Boolean = true) { runUpdated @include(if: $s) { id } }' } })
  c.send({ id: 'w', type: 'subscribe', payload: { query: 'subscription ($s: Boolean!) { runUpdated @skip(if: $s) { id status @include(if: $s) } }', variables: { s: false } } })
  await until(() => app.events.bus.subscriptions === 2, 'both subscriptions to run')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('r1') })
  await until(() => c.frames.filter(f => f.type === 'next').length === 2, 'the event on both')
  t.same(c.frames.filter(f => f.id === 'v'), [{ type: 'next', id: 'v', payload: { data: { runUpdated: { id: 'r1' } } } }])
  t.same(c.frames.filter(f => f.id === 'w'), [{ type: 'next', id: 'w', payload: { data: { runUpdated: { id: 'r1' } } } }])
  t.equal(c.closed(), null)
})

t.test('a subscribe right behind the complete of the same id runs, and the ended one sends no complete', async t => {
  // mercurius' loop of the completed subscription ends a moment later, sends its own
  // `complete` and lets go of the iterator held under that id: the new subscription's.
  const { app, url } = await listen(t)
  const c = await open(t, url)
  for (let i = 0; i < 10; i++) {
    const id = `x${i % 2}`
    c.frames.length = 0
    c.send({ id, type: 'subscribe', payload: { query: SUBSCRIPTION } })
    await until(() => app.events.bus.subscriptions === 1, 'the subscription')
    await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('before') })
    await until(() => c.frames.some(f => f.type === 'next'), 'the first event')
    c.send({ id, type: 'complete' })
    c.send({ id, type: 'subscribe', payload: { query: SUBSCRIPTION } })
    await sleep(20)
    await until(() => app.events.bus.subscriptions === 1, 'the new subscription')
    await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('after') })
    await until(() => c.frames.filter(f => f.type === 'next').length === 2 || c.frames.some(f => f.type === 'complete'), 'the second event')
    await sleep(20)
    t.same(c.frames.map(f => [f.type, f.id, f.payload?.data?.runUpdated?.id]), [['next', id, 'before'], ['next', id, 'after']], `try ${i}: the new subscription gets the event, no complete`)
    // A complete then a subscribe then its complete: nothing runs, nothing is sent.
    c.frames.length = 0
    c.send({ id, type: 'complete' })
    c.send({ id, type: 'subscribe', payload: { query: SUBSCRIPTION } })
    c.send({ id, type: 'complete' })
    await until(() => app.events.bus.subscriptions === 0, 'nothing to run')
    await sleep(20)
    t.equal(app.events.bus.subscriptions, 0)
    t.same(c.frames, [])
  }
  // A second subscribe of an id still ending is a duplicate, as of a running one.
  c.send({ id: 'd', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 1, 'd')
  c.send({ id: 'd', type: 'complete' })
  c.send({ id: 'd', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  c.send({ id: 'd', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => c.closed() !== null, 'the close')
  t.same(c.closed(), [4409, 'Subscriber for d already exists'])
})

t.test('a subscribe, its complete and the same subscribe again, before the first has started: the second runs', async t => {
  // The client's complete frees the id (graphql-transport-ws). The complete of a subscription
  // still starting went to `cancelled`, and the second subscribe reached mercurius while the
  // first still held the id: 4409 'Subscriber for a already exists'.
  const { app, url } = await listen(t)
  const c = await open(t, url)
  for (let i = 0; i < 5; i++) {
    const id = `s${i}`
    c.frames.length = 0
    c.send({ id, type: 'subscribe', payload: { query: SUBSCRIPTION } })
    c.send({ id, type: 'complete' })
    c.send({ id, type: 'subscribe', payload: { query: SUBSCRIPTION } })
    await until(() => app.events.bus.subscriptions === 1 || c.closed() !== null, 'the second subscription')
    await sleep(20)
    t.equal(c.closed(), null, `try ${i}: the connection stays open`)
    t.equal(app.events.bus.subscriptions, 1, `try ${i}: one subscription runs`)
    await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run(`r${i}`) })
    await until(() => c.frames.some(f => f.type === 'next') || c.closed() !== null, 'the event')
    await sleep(20)
    t.same(c.frames, [{ type: 'next', id, payload: { data: { runUpdated: { id: `r${i}` } } } }], `try ${i}: the event, nothing else`)
    // Its complete then ends it; a complete of the held one drops it.
    c.send({ id, type: 'complete' })
    await until(() => app.events.bus.subscriptions === 0, 'the end')
  }
  // subscribe, complete, subscribe, complete: nothing runs, nothing is sent.
  c.frames.length = 0
  c.send({ id: 'z', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  c.send({ id: 'z', type: 'complete' })
  c.send({ id: 'z', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  c.send({ id: 'z', type: 'complete' })
  await sleep(50)
  t.equal(app.events.bus.subscriptions, 0)
  t.same(c.frames, [])
  t.equal(c.closed(), null)
})

t.test('the complete of a subscribe sent while the bound of them were starting ends it; one over the bound closes 1008', async t => {
  // A subscribe counted among those starting only while fewer than the bound were: with two
  // starting (one of them already completed), a third was not counted, and its complete, before
  // it reached mercurius' hooks, was ignored: it ran until the connection closed.
  const { app, url } = await listen(t, { BFF_BATCH_MAX_CALLS: 2 })
  const c = await open(t, url)
  c.send({ id: 's1', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  c.send({ id: 's2', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  c.send({ id: 's1', type: 'complete' })
  c.send({ id: 'x', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  c.send({ id: 'x', type: 'complete' })
  await until(() => app.events.bus.subscriptions === 1, 's2')
  await sleep(50)
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('r') })
  await until(() => c.frames.some(f => f.type === 'next'), 'the event')
  await sleep(20)
  t.same(c.frames.filter(f => f.type !== 'connection_ack'), [{ type: 'next', id: 's2', payload: { data: { runUpdated: { id: 'r' } } } }], 's2 runs, x does not')
  t.equal(app.events.bus.subscriptions, 1)
  t.equal(c.closed(), null)
  // Three live ids at once are over the bound of two, as the operations' bound says.
  const d = await open(t, url)
  d.send({ id: 'a', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  d.send({ id: 'b', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  d.send({ id: 'c', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => d.closed() !== null, 'the close')
  t.same(d.closed(), [1008, 'At most 2 subscriptions per connection'])
})

t.test('a subscriber that stops reading is closed with 1013 once 4 MiB of its events are unread', async t => {
  // mercurius waits for each frame to be written before it takes the next event: the socket
  // never held more than about one frame, and the events waited in the subscription's queue,
  // the oldest dropped past 256, with the connection left open.
  const { app, url } = await listen(t)
  const c = await open(t, url)
  const reader = await open(t, url)
  c.send({ id: 's', type: 'subscribe', payload: { query: 'subscription { runUpdated { id output } }' } })
  reader.send({ id: 's', type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } })
  await until(() => app.events.bus.subscriptions === 2, 'the subscriptions')
  const socket = (c.ws as unknown as { _socket: { pause: () => void, resume: () => void } })._socket
  socket.pause()
  const server = [...app.websocketServer.clients].find(s => s.readyState === WebSocket.OPEN)!
  for (let i = 0; i < 600 && c.closed() === null; i++) {
    await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run(`r${i}`, { output: 'x'.repeat(200 * 1024) }) })
    if (i % 20 === 0) await sleep(5)
  }
  socket.resume()
  await until(() => c.closed() !== null, 'the close', 20_000)
  t.same(c.closed(), [1013, 'The client does not read its frames'])
  const got = c.frames.filter(f => f.type === 'next').length
  t.ok(got < 60, `the client got ${got} events before the close, not the rest dropped one by one`)
  t.ok(server.readyState !== WebSocket.OPEN)
  // A subscriber that reads is not touched.
  await until(() => reader.frames.filter(f => f.type === 'next').length === 600, 'every event on the reader', 20_000)
  t.equal(reader.closed(), null)
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.notMatch(metrics, /mantle_events_dropped_total\{reason="slow_consumer"\} [1-9]/, 'no event dropped')
  // Counted, once, as /ws counts its own (it was counted nowhere).
  t.match(metrics, /mantle_slow_reader_cuts_total\{face="graphql",transport="websocket"\} 1\n/)
})

t.test('messages sent while mercurius waits to write its connection_ack count as unread: past 4 MiB the socket closes, they are not queued', async t => {
  // mercurius reads a socket's messages one at a time and awaits the write of its
  // connection_ack before the next: from a client that does not read (its socket's buffers
  // filled with pongs), every message sent after connection_init waited in mercurius' queue,
  // which has no bound: 300 MB held for 300 MB sent, without a token, the socket left open.
  // (Its token with the upgrade: one without any is closed once it has sent 64 KiB.)
  const { app, url } = await listenUnix(t)
  let server: WebSocket | undefined
  app.websocketServer.once('connection', (s: WebSocket) => { server = s })
  const ws = new WebSocket(url, 'graphql-transport-ws', { headers: { authorization: `Bearer ${token()}` } })
  t.teardown(() => ws.terminate())
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  ;(ws as unknown as { _socket: { pause: () => void } })._socket.pause()
  await until(() => server !== undefined, 'the server socket')
  // Pongs until the operating system holds no more of them: the server's socket starts to queue.
  const pings = Array.from({ length: 2000 }, () => '{"type":"ping"}')
  for (let i = 0; i < 2000 && server!.bufferedAmount < 64 * 1024; i++) {
    for (const ping of pings) ws.send(ping)
    await sleep(2)
  }
  t.ok(server!.bufferedAmount >= 64 * 1024, 'the client reads nothing')
  ws.send(JSON.stringify({ type: 'connection_init' }))
  const pong = JSON.stringify({ type: 'pong', payload: 'x'.repeat(1000 * 1000) })
  for (let i = 0; i < 8 && server!.readyState === WebSocket.OPEN; i++) {
    ws.send(pong)
    await sleep(20)
  }
  await until(() => server!.readyState !== WebSocket.OPEN, 'the close', 2000)
  t.pass('closed as a client that does not read')
})

t.test('subscribes held behind the completes of subscriptions whose events the client does not read count as unread: past 4 MiB the socket closes', async t => {
  // A subscribe of an id whose subscription the client completed is held until mercurius' loop
  // of the old one ends, which waits for its last event to be written: from a client that does
  // not read, for ever. Each held subscribe may carry a megabyte of variables, and a connection
  // holds 100 of them (twice its bound of operations), none counted.
  const { app, url } = await listenUnix(t)
  const c = await open(t, url)
  const ids = Array.from({ length: 10 }, (_, i) => `s${i}`)
  for (const id of ids) c.send({ id, type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === ids.length, 'the subscriptions')
  const server = [...app.websocketServer.clients].find(s => s.readyState === WebSocket.OPEN)!
  ;(c.ws as unknown as { _socket: { pause: () => void } })._socket.pause()
  const pings = Array.from({ length: 2000 }, () => '{"type":"ping"}')
  for (let i = 0; i < 2000 && server.bufferedAmount < 64 * 1024; i++) {
    for (const ping of pings) c.ws.send(ping)
    await sleep(2)
  }
  t.ok(server.bufferedAmount >= 64 * 1024, 'the client reads nothing')
  // Each subscription's loop now waits for its event to be written.
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('r') })
  await sleep(50)
  const variables = { junk: 'x'.repeat(1000 * 1000) }
  for (const id of ids) {
    if (server.readyState !== WebSocket.OPEN) break
    c.send({ id, type: 'complete' })
    c.send({ id, type: 'subscribe', payload: { query: SUBSCRIPTION, variables } })
    await sleep(20)
  }
  await until(() => server.readyState !== WebSocket.OPEN, 'the close', 2000)
  t.pass('closed as a client that does not read')
})

t.test('/graphql pings its sockets and drops one that misses a pong, as /ws does', async t => {
  const kernel = await startKernel({ port: 0 })
  t.teardown(() => kernel.close())
  const app = await buildApp(testConfig({ BFF_GRAPHQL_ENABLED: false }), { logger: false, kernelUrl: kernel.url })
  // A beat long enough for both subscriptions to start before the dead peer misses a pong (at
  // 40 ms, a loaded machine dropped it first and the test waited for two subscriptions forever).
  await app.register(createGraphqlFace({ heartbeatMs: 150 }), { bodyLimit: 1048576, maxCalls: 50, maxDepth: 12, secured: true, development: false })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const url = `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`
  const dead = await open(t, url, { autoPong: false })
  const alive = await open(t, url)
  dead.send({ id: 's', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  alive.send({ id: 's', type: 'subscribe', payload: { query: SUBSCRIPTION } })
  await until(() => app.events.bus.subscriptions === 2, 'the subscriptions')
  await until(() => dead.closed() !== null, 'the dead peer to be dropped')
  t.same(dead.closed(), [1006, ''], 'terminated, no close frame')
  await until(() => app.events.bus.subscriptions === 1, 'its subscription to leave the bus')
  await sleep(450)
  t.equal(alive.closed(), null, 'a peer that answers stays')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: run('r1') })
  await until(() => alive.frames.some(f => f.type === 'next'), 'the event')
})
