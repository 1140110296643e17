import t from 'tap'
import { WebSocket } from 'ws'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, token, until } from '../helper.js'
import { run } from './websocket-helper.js'

// How a GraphQL subscription's life goes over graphql-transport-ws on /graphql: a document
// graphql-js throws on, a `complete` then a `subscribe` of the same id, a client that stops
// reading, a client that vanishes (adapters/graphql/subscriptions.ts).

interface Teardown { teardown: (fn: () => unknown) => void }

async function listen (t: Teardown): Promise<{ app: FastifyInstance, url: string }> {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, url: `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql` }
}

/** An initialised raw graphql-transport-ws socket: the frames it got, and how it closed. */
async function open (t: Teardown, url: string, options: { autoPong?: boolean } = {}): Promise<{ ws: WebSocket, frames: any[], send: (m: unknown) => void, closed: () => [number, string] | null }> {
  const ws = new WebSocket(url, 'graphql-transport-ws', { headers: { authorization: `Bearer ${token({ roles: ['viewer'] })}` }, ...options })
  t.teardown(() => ws.terminate())
  const frames: any[] = []
  let closed: [number, string] | null = null
  ws.on('message', d => frames.push(JSON.parse(String(d))))
  ws.on('close', (c, r) => { closed = [c, String(r)] })
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  ws.send(JSON.stringify({ type: 'connection_init' }))
  await until(() => frames.some(f => f.type === 'connection_ack'), 'ack')
  return { ws, frames, send: m => ws.send(JSON.stringify(m)), closed: () => closed }
}

t.test('a document graphql-js throws on gets its VALIDATION_FAILED error, and its id is free again; variables in directives work', async t => {
  // graphql-js's single-field rule runs without the variables: a variable in a directive made
  // validate() throw, and a root field left out by @skip made subscribe() throw a TypeError.
  // Either was sent without extensions.code, and the id stayed taken for good: reusing it
  // closed the connection with 4409.
  const { app, url } = await listen(t)
  const c = await open(t, url)
  const refused: Array<[string, Record<string, unknown>]> = [
    ['a root field skipped', { query: 'subscription { runUpdated @skip(if: true) { id } }' }],
    ['a root field left out by a variable', { query: 'subscription ($s: Boolean!) { runUpdated @include(if: $s) { id } }', variables: { s: false } }],
    ['an introspection root field', { query: 'subscription { __typename }' }],
    ['two root fields, one by a variable', { query: 'subscription ($s: Boolean = true) { runUpdated { id } again: runUpdated @include(if: $s) { id } }' }]
  ]
  for (const [what, payload] of refused) {
    c.frames.length = 0
    c.send({ id: 'v', type: 'subscribe', payload })
    await until(() => c.frames.some(f => f.id === 'v'), `the error of ${what}`)
    t.match(c.frames.find(f => f.id === 'v'), { type: 'error', payload: [{ message: String, extensions: { code: 'VALIDATION_FAILED', status: 400, requestId: String } }] }, what)
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
