import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { WebSocket } from 'ws'
import { buildDemoApp, bearer, drained, readUntil, token, until } from '../../helper.js'
import { connect } from '../../adapters/websocket-helper.js'
import type { StoredEntry } from '../../../plugins/audit/entry.js'

// README, "Audit trail": every subscription decision leaves one entry on every face (accepted:
// ok, read, the event's name; refused: its code), and so does each /ws re-auth frame
// (websocket.auth). Before, they were decided outside the pipeline and left none: a denied
// subscription, or an attempt to switch a socket to another tenant, had no trace.

const now = new Date().toISOString()
const RUN = { id: 'r1', agentId: 'a1', status: 'queued', temperature: 1, promptChars: 2, output: null, error: null, createdAt: now, updatedAt: now, startedAt: null, finishedAt: null }

async function listen (app: FastifyInstance): Promise<number> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return (app.server.address() as { port: number }).port
}

/** A tRPC WebSocket of the app at `port`, open, with `headers`; the frames it receives, parsed. */
async function trpcSocket (t: { teardown: (fn: () => void) => void }, port: number, headers: Record<string, string>): Promise<{ ws: WebSocket, frames: Array<Record<string, any>> }> {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers })
  t.teardown(() => ws.terminate())
  const frames: Array<Record<string, any>> = []
  ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  return { ws, frames }
}

async function stored (app: FastifyInstance, action: string): Promise<StoredEntry[]> {
  await drained(app)
  return (await app.audit.store.query({ action, limit: 100 })).entries
}

t.test('/ws: a subscription accepted and one refused each leave one entry; unsubscribes, unknown events and events do not', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const url = `ws://127.0.0.1:${port}/ws`
  const editor = await connect(t, url, { tenant: 'ta', user: 'ua', roles: ['editor'] })
  const refused = await editor.request({ id: 's1', subscribe: 'runUpdated' })
  t.equal(refused.error?.code, 'FORBIDDEN')
  t.equal((await editor.request({ id: 's2', subscribe: 'noSuchEvent' })).error?.code, 'NOT_FOUND')
  const viewer = await connect(t, url, { tenant: 'tv', user: 'uv', roles: ['viewer'] })
  t.equal((await viewer.request({ id: 's3', subscribe: 'runUpdated' })).subscribed, 'runUpdated')
  app.events.bus.dispatch({ topic: 'runs.updated', tenantId: 'tv', payload: RUN })
  t.equal((await viewer.next()).event, 'runUpdated')
  t.equal((await viewer.request({ id: 's4', unsubscribe: 'runUpdated' })).unsubscribed, 'runUpdated')
  const rows = await stored(app, 'runUpdated')
  t.equal(rows.length, 2, 'one entry per decision, none for the unsubscribe or the event')
  const forbidden = rows.find(r => r.status !== 'ok')!
  t.match(forbidden, { requestId: refused.error.requestId, tenantId: 'ta', userId: 'ua', method: null, path: '/ws', protocol: 'websocket', category: 'auth', status: 'FORBIDDEN', statusCode: 403, riskLevel: 'none' })
  t.match(rows.find(r => r.status === 'ok'), { tenantId: 'tv', userId: 'uv', method: null, path: '/ws', protocol: 'websocket', category: 'read', statusCode: 200 })
  t.equal((await stored(app, 'noSuchEvent')).length, 0, 'an unknown event names no event: not recorded, as an unknown op')
})

t.test('/ws: each re-auth frame leaves one entry (websocket.auth), accepted or refused, never the token', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const client = await connect(t, `ws://127.0.0.1:${port}/ws`, { tenant: 'tr', user: 'ur' })
  const fresh = token({ tenant: 'tr', user: 'ur' })
  t.equal((await client.request({ id: 'a1', auth: fresh })).authenticated, true)
  const garbage = await client.request({ id: 'a2', auth: 'garbage' })
  t.equal(garbage.error?.status, 401)
  const other = await client.request({ id: 'a3', auth: token({ tenant: 'elsewhere', user: 'ur' }) })
  t.equal(other.error?.status, 403)
  const rows = await stored(app, 'websocket.auth')
  t.equal(rows.length, 3)
  const common = { tenantId: 'tr', userId: 'ur', method: null, path: '/ws', protocol: 'websocket', category: 'auth', riskLevel: 'none' }
  t.match(rows.find(r => r.status === 'ok'), { ...common, statusCode: 200 })
  t.match(rows.find(r => r.requestId === garbage.error.requestId), { ...common, status: 'UNAUTHENTICATED', statusCode: 401 })
  t.match(rows.find(r => r.requestId === other.error.requestId), { ...common, status: 'FORBIDDEN', statusCode: 403 })
  t.notMatch(JSON.stringify(rows), /eyJ|garbage/, 'no token')
})

// A re-auth whose token no longer holds an event's role ends the subscription FORBIDDEN: it left
// no entry, while the same refusal at subscribe time leaves one. Now recorded as that one is.
t.test('/ws: a subscription a re-auth ends leaves one entry, as a refused subscribe; one it keeps, none', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const client = await connect(t, `ws://127.0.0.1:${port}/ws`, { tenant: 'te', user: 'ue', roles: ['viewer'] })
  t.equal((await client.request({ id: 's1', subscribe: 'runUpdated' })).subscribed, 'runUpdated')
  t.equal((await client.request({ id: 'a1', auth: token({ tenant: 'te', user: 'ue', roles: ['viewer', 'editor'] }) })).authenticated, true)
  t.equal((await stored(app, 'runUpdated')).length, 1, 'a re-auth that keeps the subscription records nothing more')
  t.equal((await client.request({ id: 'a2', auth: token({ tenant: 'te', user: 'ue', roles: ['editor'] }) })).authenticated, true)
  const ended = await client.next()
  t.match(ended, { id: 's1', error: { code: 'FORBIDDEN', status: 403 } })
  t.equal((await client.request({ id: 'a3', auth: token({ tenant: 'te', user: 'ue', roles: ['editor'] }) })).authenticated, true)
  const rows = await stored(app, 'runUpdated')
  t.equal(rows.length, 2, 'the subscribe and its ending, once')
  t.match(rows.find(r => r.status !== 'ok'), { requestId: ended.error.requestId, tenantId: 'te', userId: 'ue', method: null, path: '/ws', protocol: 'websocket', category: 'auth', status: 'FORBIDDEN', statusCode: 403, riskLevel: 'none' })
  t.notMatch(JSON.stringify(rows), /eyJ/, 'no token')
  t.equal((await stored(app, 'websocket.auth')).length, 3, 'each re-auth frame its own entry, as before')
})

t.test('tRPC over SSE: a subscription accepted and each refused one leave one entry', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const open = async (id: string, headers: Record<string, string>, marker: string): Promise<void> => {
    const controller = new AbortController()
    t.teardown(() => controller.abort())
    const res = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated`, { headers: { ...headers, 'x-request-id': id, accept: 'text/event-stream' }, signal: controller.signal })
    await readUntil(res, marker)
  }
  await open('sse-ok', bearer({ tenant: 'ts', user: 'us', roles: ['viewer'] }), 'connected')
  await until(() => app.events.bus.subscriptions === 1, 'the subscription')
  await open('sse-forbidden', bearer({ tenant: 'ts', user: 'us', roles: ['editor'] }), 'serialized-error')
  await open('sse-anonymous', {}, 'serialized-error')
  const rows = await stored(app, 'runUpdated')
  t.equal(rows.length, 3)
  const by = (id: string): StoredEntry | undefined => rows.find(r => r.requestId === id)
  const common = { method: null, path: '/trpc/runUpdated', protocol: 'trpc', riskLevel: 'none' }
  t.match(by('sse-ok'), { ...common, tenantId: 'ts', userId: 'us', category: 'read', status: 'ok', statusCode: 200 })
  t.match(by('sse-forbidden'), { ...common, tenantId: 'ts', userId: 'us', category: 'auth', status: 'FORBIDDEN', statusCode: 403 })
  t.match(by('sse-anonymous'), { ...common, tenantId: 'public', userId: 'anonymous', category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401 })
})

t.test('tRPC over WebSocket: a subscription accepted and one refused each leave one entry', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const subscribe = async (roles: string[]): Promise<Array<Record<string, any>>> => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers: bearer({ tenant: 'tw', user: 'uw', roles }) })
    t.teardown(() => ws.terminate())
    const frames: Array<Record<string, any>> = []
    ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
    await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
    ws.send(JSON.stringify({ id: 1, method: 'subscription', params: { path: 'runUpdated', input: null } }))
    await until(() => frames.some(f => f.id === 1), 'the answer')
    return frames
  }
  const refused = (await subscribe(['editor'])).find(f => f.id === 1)!
  t.equal(refused.error?.data?.code, 'FORBIDDEN')
  t.equal((await subscribe(['viewer'])).find(f => f.id === 1)?.result?.type, 'started')
  const rows = await stored(app, 'runUpdated')
  t.equal(rows.length, 2)
  const common = { tenantId: 'tw', userId: 'uw', method: null, path: '/trpc/runUpdated', protocol: 'trpc', riskLevel: 'none' }
  t.match(rows.find(r => r.status !== 'ok'), { ...common, requestId: refused.error.data.requestId, category: 'auth', status: 'FORBIDDEN', statusCode: 403 })
  t.match(rows.find(r => r.status === 'ok'), { ...common, category: 'read', statusCode: 200 })
})

t.test('GraphQL over graphql-ws: a subscription accepted and one refused each leave one entry', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const subscribe = async (roles: string[]): Promise<Record<string, any>> => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws')
    t.teardown(() => ws.terminate())
    const frames: Array<Record<string, any>> = []
    ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
    await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
    ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token({ tenant: 'tg', user: 'ug', roles })}` } }))
    await until(() => frames.some(f => f.type === 'connection_ack'), 'ack')
    ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } }))
    return { frames }
  }
  const refused = await subscribe(['editor'])
  await until(() => refused.frames.some((f: Record<string, any>) => f.id === '1'), 'the refusal')
  const error = refused.frames.find((f: Record<string, any>) => f.id === '1')
  t.equal(error.type, 'error')
  await subscribe(['viewer'])
  await until(() => app.events.bus.subscriptions === 1, 'the subscription')
  const rows = await stored(app, 'runUpdated')
  t.equal(rows.length, 2)
  const common = { tenantId: 'tg', userId: 'ug', method: null, path: '/graphql', protocol: 'graphql', riskLevel: 'none' }
  t.match(rows.find(r => r.status !== 'ok'), { ...common, requestId: error.payload[0].extensions.requestId, category: 'auth', status: 'FORBIDDEN', statusCode: 403 })
  t.match(rows.find(r => r.status === 'ok'), { ...common, category: 'read', statusCode: 200 })
})

t.test('with the audit off, subscriptions and re-auth work and nothing is recorded', async t => {
  const app = await buildDemoApp(t, { BFF_AUDIT_ENABLED: false })
  const port = await listen(app)
  const client = await connect(t, `ws://127.0.0.1:${port}/ws`, { roles: ['viewer'] })
  t.equal((await client.request({ id: '1', subscribe: 'runUpdated' })).subscribed, 'runUpdated')
  t.equal((await client.request({ id: '2', auth: token({ roles: ['viewer'] }) })).authenticated, true)
})

// A subscription refused for its input (a subscription takes none) was refused before its
// decision: tRPC's input parser, /ws's frame schema. It left no entry, where the same
// subscription refused for its roles leaves one, and a call refused for its input too. Now one
// entry each, VALIDATION_FAILED under the caller's own tenant and user, its roles checked first
// (as a call's are, before its input).
t.test('tRPC over SSE and WebSocket: a subscription refused for its input leaves one entry', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  for (const [id, input] of [['sse-object', '{"x":1}'], ['sse-number', '5']]) {
    const controller = new AbortController()
    t.teardown(() => controller.abort())
    const res = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated?input=${encodeURIComponent(input)}`, { headers: { ...bearer({ tenant: 'ti', user: 'ui', roles: ['viewer'] }), 'x-request-id': id, accept: 'text/event-stream' }, signal: controller.signal })
    t.match(await readUntil(res, 'serialized-error'), /A subscription takes no input/)
    controller.abort()
  }
  // Roles first: an editor's subscription with an input is refused for its roles, once.
  {
    const controller = new AbortController()
    t.teardown(() => controller.abort())
    const res = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated?input=5`, { headers: { ...bearer({ tenant: 'ti', user: 'ui', roles: ['editor'] }), 'x-request-id': 'sse-editor', accept: 'text/event-stream' }, signal: controller.signal })
    t.match(await readUntil(res, 'serialized-error'), /FORBIDDEN/)
    controller.abort()
  }
  const { ws, frames } = await trpcSocket(t, port, bearer({ tenant: 'ti', user: 'uw', roles: ['viewer'] }))
  ws.send(JSON.stringify({ id: 1, method: 'subscription', params: { path: 'runUpdated', input: { x: 1 } } }))
  await until(() => frames.some(f => f.id === 1), 'the refusal')
  const refused = frames.find(f => f.id === 1)!
  t.equal(refused.error?.data?.code, 'VALIDATION_FAILED')
  t.equal(app.events.bus.subscriptions, 0, 'none started')

  const rows = await stored(app, 'runUpdated')
  t.equal(rows.length, 4, 'one entry per subscription refused')
  const common = { method: null, path: '/trpc/runUpdated', protocol: 'trpc', riskLevel: 'none', category: 'read', status: 'VALIDATION_FAILED', statusCode: 400 }
  t.match(rows.find(r => r.requestId === 'sse-object'), { ...common, tenantId: 'ti', userId: 'ui' })
  t.match(rows.find(r => r.requestId === 'sse-number'), { ...common, tenantId: 'ti', userId: 'ui' })
  t.match(rows.find(r => r.requestId === 'sse-editor'), { ...common, tenantId: 'ti', userId: 'ui', category: 'auth', status: 'FORBIDDEN', statusCode: 403 })
  t.match(rows.find(r => r.requestId === refused.error.data.requestId), { ...common, tenantId: 'ti', userId: 'uw' })
  t.notMatch(JSON.stringify(rows), /"x"/, 'never the input')
})

t.test('/ws: a subscribe, call or auth frame refused for its form leaves the one entry of what it names; junk frames none', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const client = await connect(t, `ws://127.0.0.1:${port}/ws`, { tenant: 'tf', user: 'uf', roles: ['viewer'] })
  const subscribe = await client.request({ id: 's1', subscribe: 'runUpdated', input: { secret: 'hunter2' } })
  t.match(subscribe.error, { code: 'VALIDATION_FAILED', detail: 'frame.input is not allowed' })
  const call = await client.request({ id: 'c1', op: 'getAgent', input: { id: 'a1' }, extra: 'hunter2' })
  t.match(call.error, { code: 'VALIDATION_FAILED', detail: 'frame.extra is not allowed' })
  const mutation = await client.request({ id: 'c2', op: 'runAgent', input: { id: 'a1', prompt: 'hunter2' }, extra: 1 })
  t.match(mutation.error, { code: 'FORBIDDEN' }, 'a call\'s roles come before its form, as before its input')
  const auth = await client.request({ id: 'a1', auth: 5 })
  t.match(auth.error, { code: 'VALIDATION_FAILED', detail: 'frame.auth must be string' })
  // A `__proto__` key, which REST refuses in a body (recorded): the call's refusal too.
  client.send('{"id":"c3","op":"getAgent","input":{"id":"a1","__proto__":{"hunter2":1}}}')
  const proto = await client.next()
  t.match(proto, { id: 'c3', error: { code: 'VALIDATION_FAILED', detail: 'The frame contains a forbidden prototype property' } })
  // Frames that name nothing known: answered, unrecorded.
  t.equal((await client.request({ id: 'j1', subscribe: 'noSuchEvent', input: 1 })).error?.code, 'VALIDATION_FAILED')
  t.equal((await client.request({ id: 'j2', op: 'noSuchOp', extra: 1 })).error?.code, 'VALIDATION_FAILED')
  t.equal((await client.request({ id: 'j3', unsubscribe: 'runUpdated', extra: 1 })).error?.code, 'VALIDATION_FAILED')
  t.equal((await client.request({ id: 'j4', nothing: 1 })).error?.code, 'VALIDATION_FAILED')
  t.equal(app.events.bus.subscriptions, 0)

  const common = { tenantId: 'tf', userId: 'uf', method: null, path: '/ws', protocol: 'websocket', riskLevel: 'none' }
  const subscriptions = await stored(app, 'runUpdated')
  t.equal(subscriptions.length, 1)
  t.match(subscriptions[0], { ...common, requestId: subscribe.error.requestId, category: 'read', status: 'VALIDATION_FAILED', statusCode: 400 })
  const calls = await stored(app, 'getAgent')
  t.equal(calls.length, 2)
  t.match(calls.find(r => r.requestId === call.error.requestId), { ...common, category: 'read', status: 'VALIDATION_FAILED', statusCode: 400 })
  t.match(calls.find(r => r.requestId === proto.error.requestId), { ...common, category: 'read', status: 'VALIDATION_FAILED', statusCode: 400 })
  const mutations = await stored(app, 'runAgent')
  t.equal(mutations.length, 1)
  t.match(mutations[0], { ...common, requestId: mutation.error.requestId, category: 'auth', status: 'FORBIDDEN', statusCode: 403 })
  const auths = await stored(app, 'websocket.auth')
  t.equal(auths.length, 1)
  t.match(auths[0], { ...common, requestId: auth.error.requestId, category: 'auth', status: 'VALIDATION_FAILED', statusCode: 400 })
  t.equal((await app.audit.store.query({ limit: 100 })).entries.length, 5, 'nothing else')
  t.notMatch(JSON.stringify(await app.audit.store.query({ limit: 100 })), /hunter2|secret/, 'never the input')
})

// An upgrade of /trpc whose token is refused is a 401, recorded (`trpc` at /trpc, auth). The same
// token brought in connectionParams (?connectionParams=1, wsLink's `connectionParams`) was refused
// with the same UNAUTHENTICATED, the calls sent behind it too, and left no entry.
t.test('tRPC over WebSocket: a token in connectionParams refused leaves one entry, as the upgrade\'s refusal does; one accepted, none', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const open = async (token: string): Promise<{ frames: Array<Record<string, any>>, code: number }> => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/trpc?connectionParams=1`)
    t.teardown(() => ws.terminate())
    const frames: Array<Record<string, any>> = []
    ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
    const closed = new Promise<number>(resolve => ws.once('close', resolve))
    await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
    ws.send(JSON.stringify({ method: 'connectionParams', data: { token } }))
    ws.send(JSON.stringify({ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'a1' } } }))
    await until(() => frames.some(f => f.id === 1), 'the call\'s answer')
    if (frames.some(f => f.id === 1 && f.result !== undefined)) {
      ws.close()
      return { frames, code: 0 }
    }
    return { frames, code: await closed }
  }
  const forged = await open('not.a.token')
  t.equal(forged.code, 4401)
  const expired = await open(token({ tenant: 'tc', user: 'uc', ttlSeconds: -60 }))
  t.equal(expired.code, 4401)
  const fine = await open(token({ tenant: 'tc', user: 'uc' }))
  t.equal(fine.code, 0, 'answered')
  const rows = await stored(app, 'trpc')
  t.equal(rows.length, 2, 'one per refused connection')
  for (const refused of [forged, expired]) {
    const error = refused.frames.find(f => f.id === null)?.error
    t.equal(error?.data?.code, 'UNAUTHENTICATED')
    t.match(rows.find(r => r.requestId === error.data.requestId), { tenantId: 'public', userId: 'anonymous', method: null, path: '/trpc', protocol: 'trpc', category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, riskLevel: 'none' })
  }
  t.notMatch(JSON.stringify(rows), /not\.a\.token|eyJ/, 'never the token')
  t.equal((await stored(app, 'getAgent')).length, 1, 'the accepted connection\'s call, its own entry')
})

// A GraphQL subscription refused for its document (an argument, which a subscription never takes;
// a variable; a field its event does not have) was answered by the face's screen before any
// decision, and left no entry, where one refused for its roles leaves one. Now one each, under the
// caller's own valid token; one whose document names no event (a query, a document that does not
// parse) as the same document over HTTP is (`http`).
t.test('GraphQL over graphql-ws: a subscription refused for its document leaves one entry, under its event when it names one', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws')
  t.teardown(() => ws.terminate())
  const frames: Array<Record<string, any>> = []
  ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token({ tenant: 'tq', user: 'uq', roles: ['viewer'] })}` } }))
  await until(() => frames.some(f => f.type === 'connection_ack'), 'ack')
  const documents: Array<[string, Record<string, unknown>]> = [
    ['1', { query: 'subscription { runUpdated(secret: "hunter2") { id } }' }],
    ['2', { query: 'subscription S($x: String) { runUpdated { id } }', variables: { x: 'hunter2' } }],
    ['3', { query: 'subscription { runUpdated { nope } }' }],
    ['4', { query: '{ getAgent(id: "a1") { id } }' }],
    ['5', { query: 'subscription { runUpdated { id ' }],
    ['6', { query: 'subscription { noSuchEvent { id } }' }]
  ]
  for (const [id, payload] of documents) ws.send(JSON.stringify({ id, type: 'subscribe', payload }))
  await until(() => documents.every(([id]) => frames.some(f => f.id === id)), 'the refusals')
  const errorOf = (id: string): Record<string, any> => frames.find(f => f.id === id)!
  for (const [id] of documents) t.equal(errorOf(id).type, 'error', `${id}: refused`)
  t.equal(app.events.bus.subscriptions, 0)
  const rows = await stored(app, 'runUpdated')
  t.equal(rows.length, 3, 'the three that name the event')
  for (const id of ['1', '2', '3']) {
    t.match(rows.find(r => r.requestId === errorOf(id).payload[0].extensions.requestId), { tenantId: 'tq', userId: 'uq', method: null, path: '/graphql', protocol: 'graphql', action: 'runUpdated', category: 'read', status: 'VALIDATION_FAILED', statusCode: 400, riskLevel: 'none' }, id)
  }
  // Those that name no event: as the same document over HTTP, `http`, category security.
  const others = await stored(app, 'http')
  t.equal(others.length, 3)
  for (const id of ['4', '5', '6']) {
    t.match(others.find(r => r.requestId === errorOf(id).payload[0].extensions.requestId), { tenantId: 'tq', userId: 'uq', method: null, path: '/graphql', protocol: 'graphql', action: 'http', category: 'security', status: 'VALIDATION_FAILED', statusCode: 400 }, id)
  }
  // A message that is no subscribe: the protocol's, unrecorded (graphql-transport-ws closes 4400).
  const closed = new Promise<number>(resolve => ws.once('close', resolve))
  ws.send('{"type":"nonsense"}')
  t.equal(await closed, 4400)
  t.equal((await app.audit.store.query({ limit: 100 })).entries.length, 6, 'nothing else')
  t.notMatch(JSON.stringify(await app.audit.store.query({ limit: 100 })), /hunter2|secret/, 'never the document')
})

t.test('tRPC over WebSocket: a message tRPC cannot parse leaves one entry when it names a procedure, as a /ws frame naming an op does', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const { ws, frames } = await trpcSocket(t, port, bearer({ tenant: 'tp', user: 'up' }))
  const send = async (message: string): Promise<Record<string, any>> => {
    const before = frames.length
    ws.send(message)
    await until(() => frames.length > before, 'the refusal')
    return frames[frames.length - 1]
  }
  // A batch one call of which is malformed: refused whole, nothing runs. Recorded as `trpc`.
  const batch = await send(JSON.stringify([{ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'hunter2' } } }, { id: {}, method: 'query' }]))
  t.match(batch, { id: null, error: { data: { code: 'VALIDATION_FAILED', httpStatus: 400 } } })
  // One call of an event, without an id: under its procedure.
  const single = await send(JSON.stringify({ method: 'subscription', params: { path: 'runUpdated' } }))
  t.match(single, { id: null, error: { data: { code: 'VALIDATION_FAILED' } } })
  // A call whose id is null is refused alone; its neighbour runs (its own entry). A batch: `trpc`.
  ws.send(JSON.stringify([{ id: null, method: 'query', params: { path: 'getAgent', input: { id: 'a1' } } }, { id: 2, method: 'query', params: { path: 'listAgents' } }]))
  await until(() => frames.some(f => f.id === 2), 'the neighbour\'s answer')
  await until(() => frames.some(f => f.id === null && f.error?.message === '`id` is required'), 'the refusal of the call without an id')
  const idless = frames.find(f => f.id === null && f.error?.message === '`id` is required')!
  // Naming no procedure, or one the manifest does not have: the protocol's, unrecorded.
  await send('not json')
  await send(JSON.stringify([{ id: 3, method: 'query', params: { path: 'nope' } }, { id: {} }]))
  await send(JSON.stringify([{ id: null, method: 'query', params: { path: 'nope' } }]))
  const rows = await stored(app, 'trpc')
  // Newest first: the batch of a call without an id, then the malformed batch, once each.
  t.match(rows, [
    { requestId: idless.error.data.requestId, path: '/trpc', action: 'trpc', status: 'VALIDATION_FAILED' },
    { requestId: batch.error.data.requestId, tenantId: 'tp', userId: 'up', method: null, path: '/trpc', protocol: 'trpc', action: 'trpc', category: 'security', status: 'VALIDATION_FAILED', statusCode: 400 }
  ])
  t.equal(rows.length, 2)
  t.match(await stored(app, 'runUpdated'), [{ requestId: single.error.data.requestId, path: '/trpc/runUpdated', action: 'runUpdated', category: 'security', status: 'VALIDATION_FAILED' }])
  t.equal((await stored(app, 'getAgent')).length, 0, 'getAgent ran in none of them')
  t.equal((await stored(app, 'listAgents')).length, 1, 'the neighbour ran')
  t.notMatch(JSON.stringify(await app.audit.store.query({ limit: 100 })), /hunter2/, 'never the input')
})

// A tRPC WebSocket message of more calls than the face runs from one message (1000) is refused
// whole, PAYLOAD_TOO_LARGE for each call, as an HTTP batch past BFF_BATCH_MAX_CALLS is: that one
// is recorded (`trpc`, security), this one left no entry.
t.test('tRPC over WebSocket: a message of too many calls leaves one entry, as an HTTP batch too long does', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const { ws, frames } = await trpcSocket(t, port, bearer({ tenant: 'tl', user: 'ul' }))
  ws.send(JSON.stringify(Array.from({ length: 1001 }, (_, i) => ({ id: i, method: 'query', params: { path: 'getAgent', input: { id: 'hunter2' } } }))))
  await until(() => frames.length === 1001, 'each call\'s refusal')
  t.match(frames[0], { error: { data: { code: 'PAYLOAD_TOO_LARGE', httpStatus: 413 } } })
  const requestId = frames[0].error.data.requestId
  t.ok(frames.every(f => f.error?.data?.requestId === requestId), 'one refusal, one request id')
  const rows = await stored(app, 'trpc')
  t.equal(rows.length, 1)
  t.match(rows[0], { requestId, tenantId: 'tl', userId: 'ul', method: null, path: '/trpc', protocol: 'trpc', action: 'trpc', category: 'security', status: 'PAYLOAD_TOO_LARGE', statusCode: 413 })
  t.equal((await stored(app, 'getAgent')).length, 0, 'no call ran')
  t.notMatch(JSON.stringify(rows), /hunter2/, 'never the input')
})

// A connection_init whose token is refused closes the socket at once (4403), before any ack: its
// refusal is recorded once, as the upgrade's own 401 for the same token is (`http` at /graphql,
// public / anonymous). Before, it was acked and left an entry only if a subscribe followed, one
// per subscribe (under the event), and none when the client sent nothing more.
t.test('GraphQL over graphql-ws: a connection_init whose token is refused leaves one entry, as the upgrade\'s refusal does, whatever follows it', async t => {
  const app = await buildDemoApp(t)
  const port = await listen(app)
  const refuse = async (authorization: unknown, subscribes: number): Promise<{ code: number, frames: unknown[] }> => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws')
    t.teardown(() => ws.terminate())
    const frames: unknown[] = []
    ws.on('message', d => frames.push(JSON.parse(String(d))))
    const closed = new Promise<number>(resolve => ws.once('close', resolve))
    await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
    ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization } }))
    for (let i = 0; i < subscribes; i++) ws.send(JSON.stringify({ id: String(i), type: 'subscribe', payload: { query: 'subscription { runUpdated { id } }' } }))
    return { code: await closed, frames }
  }
  const forged = await refuse('Bearer not.a.token', 0)
  const expired = await refuse(`Bearer ${token({ tenant: 'tx', user: 'ux', ttlSeconds: -60 })}`, 3)
  const junk = await refuse(42, 1)
  for (const refused of [forged, expired, junk]) t.same(refused, { code: 4403, frames: [] }, 'closed with 4403, nothing answered')
  const rows = await stored(app, 'http')
  t.equal(rows.length, 3, 'one per refused connection')
  for (const row of rows) t.match(row, { tenantId: 'public', userId: 'anonymous', method: null, path: '/graphql', protocol: 'graphql', action: 'http', category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, riskLevel: 'none' })
  t.equal((await stored(app, 'runUpdated')).length, 0, 'the subscribes behind it were not decided')
  t.notMatch(JSON.stringify(rows), /not\.a\.token|eyJ/, 'never the token')
  t.equal(app.events.bus.subscriptions, 0)
})
