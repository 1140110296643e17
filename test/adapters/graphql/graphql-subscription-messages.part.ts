import t from 'tap'
import { WebSocket } from 'ws'
import { buildDemoApp, token, until } from '../../helper.js'
import { openGraphqlWs, peakBuffered } from '../websocket-helper.js'

// What a graphql-transport-ws client may send wrong on /graphql, and what it gets back. The face
// screens `subscribe` and `complete` messages before mercurius reads them
// (adapters/graphql/subscriptions.ts, guard).

interface Teardown { teardown: (fn: () => unknown) => void }

/** A socket on /graphql in `protocol`, no token: the frames it receives (parsed) and its close, once it has one. */
async function openRaw (t: Teardown, port: number, protocol: string): Promise<{ ws: WebSocket, frames: any[], closed: () => [number, string] | null }> {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, protocol)
  t.teardown(() => ws.terminate())
  const frames: any[] = []
  let closed: [number, string] | null = null
  ws.on('message', d => frames.push(JSON.parse(String(d))))
  ws.on('close', (code, reason) => { closed = [code, String(reason)] })
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  return { ws, frames, closed: () => closed }
}

async function listen (t: Teardown): Promise<{ app: Awaited<ReturnType<typeof buildDemoApp>>, port: number }> {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, port: (app.server.address() as { port: number }).port }
}

t.test('a `complete` for an id the server does not hold is ignored, and the connection stays open', async t => {
  // A subscribe whose document does not parse is refused before any subscription exists; the
  // client then completes it. mercurius runs its onSubscriptionEnd hooks with the context of
  // the connection's last subscription, null before the first, and used to throw on it and
  // close the socket without a code (1005).
  const { app, port } = await listen(t)
  const c = await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`)
  c.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: 'subscription { runUpdated { id ' } }))
  await until(() => c.frames.some(f => f.id === '1'), 'the error')
  c.ws.send(JSON.stringify({ id: '1', type: 'complete' }))
  c.ws.send(JSON.stringify({ id: 'never-used', type: 'complete' }))
  c.ws.send(JSON.stringify({ id: '2', type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } }))
  await until(() => app.events.bus.subscriptions === 1, 'the next subscription to run')
  t.equal(c.closed(), null, 'the connection stays open')

  // A `complete` for an id the connection holds still ends that subscription.
  c.ws.send(JSON.stringify({ id: '2', type: 'complete' }))
  await until(() => app.events.bus.subscriptions === 0, 'the completed subscription to leave the bus')
  t.equal(c.closed(), null)
})

t.test('a malformed subscribe message gets an error with the contract extensions, never JavaScript\'s own message', async t => {
  // README, GraphQL: "Errors carry extensions.code, extensions.status and extensions.requestId."
  // mercurius reads the payload unchecked: `payload: null` was answered with "Cannot destructure
  // property 'query' of 'payload' as it is null." and no extensions.
  const { app, port } = await listen(t)
  const subscription = 'subscription { runUpdated { id } }'
  const cases: Array<[string, Record<string, unknown>, string | RegExp]> = [
    ['no payload', { payload: null }, 'A subscribe message needs a `payload` object'],
    ['a payload that is not an object', { payload: 'x' }, 'A subscribe message needs a `payload` object'],
    ['no query', { payload: {} }, 'The payload needs a `query` string holding a GraphQL document'],
    ['a query that is not a string', { payload: { query: { kind: 'Document', definitions: [] } } }, 'The payload needs a `query` string holding a GraphQL document'],
    ['a document that does not parse', { payload: { query: 'subscription { runUpdated { id }' } }, /^Syntax Error/],
    ['a query', { payload: { query: '{ getAgent(id: "a1") { id } }' } }, 'A subscribe message carries a subscription; a query goes over HTTP'],
    ['two operations and no operationName', { payload: { query: `${subscription} subscription B { runUpdated { id } }` } }, 'The document does not define exactly one operation: name one in `operationName`'],
    ['an unknown operationName', { payload: { query: 'subscription A { runUpdated { id } }', operationName: 'B' } }, 'The document defines no operation of that `operationName`'],
    ['an operationName that is not a string', { payload: { query: subscription, operationName: 1 } }, '`operationName` must be a string'],
    ['variables that are not an object', { payload: { query: subscription, variables: 5 } }, '`variables` must be a JSON object'],
    ['a missing variable', { payload: { query: 'subscription ($x: Boolean!) { runUpdated { id @include(if: $x) } }' } }, 'Variable "$x" of required type "Boolean!" was not provided.'],
    ['an unknown extension', { payload: { query: subscription }, extensions: [null] }, 'The only extension of a subscribe message is `{ type: "connectionInit", payload }`'],
    // mercurius runs each one (onConnect, then a copy of the context): 15,000 in an 870 KB frame
    // took 200 ms of CPU, before any token was looked at.
    ['two extensions', { payload: { query: subscription }, extensions: [{ type: 'connectionInit', payload: {} }, { type: 'connectionInit', payload: {} }] }, 'A subscribe message carries at most one extension, `{ type: "connectionInit", payload }`']
  ]
  for (const [what, message, text] of cases) {
    const c = await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`)
    c.ws.send(JSON.stringify({ id: '1', type: 'subscribe', ...message }))
    await until(() => c.frames.some(f => f.id === '1'), `the error of ${what}`)
    const error = c.frames.find(f => f.id === '1')
    t.match(error, { type: 'error', payload: [{ message: text, extensions: { code: 'VALIDATION_FAILED', status: 400, requestId: String } }] }, what)
    t.equal(c.closed(), null, `${what}: the connection stays open`)
  }

  // A document over 64 KiB, as over HTTP.
  const c = await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`)
  c.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: `${subscription} ${'#'.repeat(65536)}` } }))
  await until(() => c.frames.some(f => f.id === '1'), 'the error of a long document')
  t.match(c.frames.find(f => f.id === '1'), { type: 'error', payload: [{ extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413, requestId: String } }] })

  // A well-formed subscription, with its variables, still runs.
  c.ws.send(JSON.stringify({ id: '2', type: 'subscribe', payload: { query: 'subscription ($x: Boolean!) { runUpdated { id @include(if: $x) } }', variables: { x: true } } }))
  await until(() => app.events.bus.subscriptions === 1, 'the subscription')
  t.equal(c.closed(), null)
})

t.test('a malformed subscribe sent right behind connection_init is screened too', async t => {
  // The screen used to start once mercurius had built the connection's context, which it does
  // asynchronously while it handles connection_init. A subscribe sent behind connection_init
  // without waiting for the ack (mercurius runs it once initialised) got through unscreened:
  // `payload: null` was answered with "Cannot destructure property 'query' of 'payload' as it
  // is null." and no extensions.
  const { app, port } = await listen(t)
  const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws', { headers: { authorization: `Bearer ${token({ roles: ['viewer'] })}` } })
  t.teardown(() => ws.terminate())
  const frames: any[] = []
  ws.on('message', d => frames.push(JSON.parse(String(d))))
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  ws.send(JSON.stringify({ type: 'connection_init' }))
  ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: null }))
  ws.send(JSON.stringify({ id: '2', type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } }))
  await until(() => frames.some(f => f.id === '1') && app.events.bus.subscriptions === 1, 'the error, and the well-formed subscription to run')
  t.match(frames.find(f => f.id === '1'), { type: 'error', payload: [{ message: 'A subscribe message needs a `payload` object', extensions: { code: 'VALIDATION_FAILED', status: 400, requestId: String } }] })
  // The screen answers before mercurius has acked: its error must still come after the ack.
  t.equal(frames[0].type, 'connection_ack', 'the ack comes first')
})

// No bound: a client that sent frames and never read the answers made the server buffer about
// 4 bytes of error frames for each byte it sent, and the connection stayed open.
t.test('a client that does not read its frames is closed with 1013 once the socket holds 4 MiB', async t => {
  const { app, port } = await listen(t)
  const c = await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`)
  const server = [...app.websocketServer.clients][0]
  ;(c.ws as unknown as { _socket: { pause: () => void } })._socket.pause()
  const junk = JSON.stringify({ type: 'subscribe', id: '1', payload: { query: '{' } })
  for (let sent = 0; sent < 200_000 && server.readyState === WebSocket.OPEN; sent++) {
    c.ws.send(junk)
    if (sent % 5000 === 0) await new Promise(resolve => setImmediate(resolve))
  }
  await until(() => server.readyState !== WebSocket.OPEN, 'the server to close the socket', 20_000)
  t.ok(server.bufferedAmount < 8 * 1024 * 1024, `the server holds ${server.bufferedAmount} bytes`)
})

t.test('what a client leaves unread is counted in UTF-8 bytes: no frame is queued once it passes the bound', async t => {
  // ws counted a queued text frame in characters, not UTF-8 bytes: 8,196,680 bytes were queued
  // for a bound of 4 MiB.
  const { app, port } = await listen(t)
  const c = await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`)
  const server = [...app.websocketServer.clients][0]
  const peaked = peakBuffered(server)
  const socket = (c.ws as unknown as { _socket: { pause: () => void, resume: () => void } })._socket
  socket.pause()
  // Each refusal echoes the variable's value, twice (graphql's message names it twice): 200 Ki
  // two-byte characters in all. (It echoed the id, which now holds at most 128 characters:
  // graphql-subscription-ids.part.ts.)
  const junk = JSON.stringify({ type: 'subscribe', id: '1', payload: { query: 'subscription ($v: Boolean!) { runUpdated @include(if: $v) { id } }', variables: { v: 'é'.repeat(100 * 1024) } } })
  for (let sent = 0; sent < 200 && server.readyState === WebSocket.OPEN; sent++) {
    c.ws.send(junk)
    await new Promise(resolve => setTimeout(resolve, 5))
  }
  await until(() => server.readyState !== WebSocket.OPEN, 'the server to close the socket', 20_000)
  const { peak, before, step } = peaked()
  t.ok(peak > 0, 'frames were queued')
  t.ok(step >= 400 * 1024, `a refusal echoing 200 Ki two-byte characters counts at least 400 KiB (${step})`)
  t.ok(before <= 4 * 1024 * 1024, `no frame queued once 4 MiB were unread (${before})`)
  t.ok(peak <= 4 * 1024 * 1024 + 512 * 1024, `at most the bound and one frame queued, the peak was ${peak}`)
  socket.resume()
  await until(() => c.closed() !== null, 'the close', 20_000)
  t.same(c.closed(), [1013, 'The client does not read its frames'])
})

// With introspection off (production), a subscription's refusal names no field near a
// misspelt one (graphql's 'Did you mean "id"?'), as over HTTP; with it on, it does.
t.test('introspection off: a refused subscription names no field it was not given', async t => {
  for (const [env, message] of [
    [{ NODE_ENV: 'production', BFF_AUDIT_ENABLED: false }, 'Cannot query field "idd" on type "Run".'],
    [{}, /^Cannot query field "idd" on type "Run". Did you mean "id"/]
  ] as const) {
    const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false, ...env })
    await app.listen({ port: 0, host: '127.0.0.1' })
    const c = await openGraphqlWs(t, `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`)
    c.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: 'subscription { runUpdated { idd } }' } }))
    await until(() => c.frames.some(f => f.id === '1'), 'the error')
    t.match(c.frames.find(f => f.id === '1'), { type: 'error', payload: [{ message, extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
    if (typeof message === 'string') t.equal(c.frames.find(f => f.id === '1').payload[0].message, message, 'nothing after it')
  }
})

t.test('an id that is no string is refused, without a token, and the process lives on', async t => {
  // The screen read a legacy `stop`'s id as text (String(id)) and wrote a refused `start`'s id
  // back (JSON.stringify), outside any catch: an array nested 20,000 deep (40 KB) overflowed
  // the stack in ws's 'message' listener or in a setImmediate, and ended the process.
  const { app, port } = await listen(t)
  const deep = '['.repeat(20_000) + ']'.repeat(20_000)
  for (const [protocol, messages] of [
    ['graphql-ws', [`{"type":"stop","id":${deep}}`]],
    ['graphql-ws', ['{"type":"connection_init"}', `{"type":"start","id":${deep},"payload":null}`]],
    ['graphql-transport-ws', ['{"type":"connection_init"}', `{"type":"ping","id":${deep}}`]]
  ] as const) {
    const { ws, frames, closed } = await openRaw(t, port, protocol)
    for (const m of messages) ws.send(m)
    if (protocol === 'graphql-ws') {
      await until(() => frames.some(f => f.type === 'error'), `the error (${messages.at(-1)!.slice(0, 20)})`)
      t.match(frames.find(f => f.type === 'error'), { id: null, payload: [{ message: 'Invalid message: an id must be a string', extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
    } else {
      await until(() => closed() !== null, 'the close')
      t.same(closed(), [4400, 'Invalid message: an id must be a string'])
    }
  }
  // Still serving.
  const c = await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`)
  c.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } }))
  await until(() => app.events.bus.subscriptions === 1, 'a subscription to run')
})

t.test('a message holding "__proto__" or constructor.prototype is refused in the contract\'s words', async t => {
  // mercurius parses with secure-json-parse and answered such a message with its own `error`
  // message, id null ("Message must be a JSON string"): graphql-transport-ws defines no such
  // message, and a subscribe whose variables held the key never heard of its id again.
  const { app, port } = await listen(t)
  const reason = 'Invalid message: a "__proto__" key, or a "constructor" holding a "prototype"'
  const query = 'subscription Q($x: String) { runUpdated { id } }'
  // graphql-transport-ws: a subscribe gets an error for its id and the connection stays open.
  const c = await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`)
  c.ws.send(JSON.stringify({ id: 's1', type: 'subscribe', payload: { query } }).replace('"query"', '"variables":{"__proto__":{"x":"a"}},"query"'))
  c.ws.send(JSON.stringify({ id: 's2', type: 'subscribe', payload: { query, extensions: { constructor: { prototype: { a: 1 } } } } }))
  await until(() => c.frames.filter(f => f.type === 'error').length === 2, 'two errors')
  for (const id of ['s1', 's2']) t.match(c.frames.find(f => f.id === id), { type: 'error', id, payload: [{ message: reason, extensions: { code: 'VALIDATION_FAILED' } }] })
  c.ws.send(JSON.stringify({ id: 's3', type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } }))
  await until(() => app.events.bus.subscriptions === 1, 'the connection still subscribes')
  t.equal(c.closed(), null)
  // Any other message holding one is a message the protocol does not define: 4400.
  const p = await openRaw(t, port, 'graphql-transport-ws')
  p.ws.send('{"type":"connection_init","payload":{"__proto__":{"authorization":"x"}}}')
  await until(() => p.closed() !== null, 'the close')
  t.same(p.closed(), [4400, reason])
  // Legacy graphql-ws: an error message (for the id, when it has one).
  const l = await openRaw(t, port, 'graphql-ws')
  l.ws.send('{"type":"connection_init","payload":{"__proto__":{}}}')
  l.ws.send('{"type":"connection_init"}')
  l.ws.send(`{"id":"l1","type":"start","payload":{"query":${JSON.stringify(query)},"variables":{"__proto__":{}}}}`)
  await until(() => l.frames.filter(f => f.type === 'error').length === 2, 'two errors')
  t.match(l.frames.filter(f => f.type === 'error'), [{ id: null, payload: [{ message: reason, extensions: { code: 'VALIDATION_FAILED' } }] }, { id: 'l1', payload: [{ message: reason, extensions: { code: 'VALIDATION_FAILED' } }] }])
})

// mercurius copies connection_init's payload (or its `headers`) onto the upgrade request's
// headers, key by key, on every subscribe, before any hook or resolver has looked at a token: a
// payload of 60,000 keys held the event loop 2.4 s for 20 subscribes, and a 900 KB string (its
// characters, one key each) 46 s, from a client without a token. The face reads `authorization`
// alone from that payload: mercurius is handed nothing else.
t.test('connection_init\'s payload is not copied onto the upgrade request\'s headers, whatever it holds', async t => {
  const { port, app } = await listen(t)
  for (const [name, payload] of [
    // No credentials: a connection_init whose token is refused is closed at once (4403), and a
    // payload that is no object (a string) with 4400, before mercurius sees either.
    ['an object', { 'x-planted': 'by the client', ...Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`k${i}`, 'v'])) }],
    ['its headers', { headers: { 'x-planted': 'by the client' } }]
  ] as const) {
    const upgraded = new Promise<{ headers: Record<string, unknown> }>(resolve => app.websocketServer.once('connection', (_socket: unknown, request: { headers: Record<string, unknown> }) => { resolve(request) }))
    const c = await openRaw(t, port, 'graphql-transport-ws')
    const request = await upgraded
    const before = Object.keys(request.headers).length
    c.ws.send(JSON.stringify({ type: 'connection_init', payload }))
    c.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } }))
    await until(() => c.frames.some(f => f.id === '1'), `${name}: the subscription's answer`)
    t.match(c.frames.find(f => f.id === '1'), { type: 'error', payload: [{ extensions: { code: 'UNAUTHENTICATED' } }] }, `${name}: refused for its token, as before`)
    t.equal(request.headers['x-planted'], undefined, `${name}: no header planted`)
    t.ok(Object.keys(request.headers).length <= before + 1, `${name}: at most authorization added (${Object.keys(request.headers).length - before} keys added)`)
    c.ws.terminate()
  }
})

// graphql-transport-ws: the payload of a connection_init, ping or pong is an object, or none (null
// or absent); graphql-ws' own server closes the socket with 4400 on any other. mercurius acked a
// connection_init whose payload was a string (read as no credentials), and answered such a ping.
t.test('graphql-transport-ws: a connection_init, ping or pong whose payload is not an object closes the socket with 4400', async t => {
  const { port } = await listen(t)
  for (const type of ['connection_init', 'ping', 'pong']) {
    for (const payload of ['x', 5, true, ['a']]) {
      const c = await openRaw(t, port, 'graphql-transport-ws')
      c.ws.send(JSON.stringify({ type, payload }))
      await until(() => c.closed() !== null, `${type} ${JSON.stringify(payload)}: the close`)
      t.same(c.closed(), [4400, `Invalid message: a ${type} payload must be an object`], `${type} ${JSON.stringify(payload)}`)
      t.same(c.frames, [], `${type} ${JSON.stringify(payload)}: nothing answered`)
    }
  }
  // An object, null or none: as before.
  const c = await openRaw(t, port, 'graphql-transport-ws')
  c.ws.send(JSON.stringify({ type: 'ping', payload: null }))
  c.ws.send(JSON.stringify({ type: 'ping', payload: { at: 1 } }))
  c.ws.send(JSON.stringify({ type: 'pong' }))
  c.ws.send(JSON.stringify({ type: 'connection_init', payload: null }))
  await until(() => c.frames.some(f => f.type === 'connection_ack'), 'the ack')
  t.same(c.frames.map(f => f.type), ['pong', 'pong', 'connection_ack'])
  t.equal(c.closed(), null)
  // The legacy protocol defines no such rule: a connection_init whose payload is a string is acked.
  const legacy = await openRaw(t, port, 'graphql-ws')
  legacy.ws.send(JSON.stringify({ type: 'connection_init', payload: 'x' }))
  await until(() => legacy.frames.some(f => f.type === 'connection_ack'), 'the legacy ack')
  t.equal(legacy.closed(), null)
})
