import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { createSigner } from 'fast-jwt'
import type { FastifyInstance } from 'fastify'
import { token, SECRET, testManifest } from '../../helper.js'
import { wsApp, connect, run, type Client } from '../websocket-helper.js'

const publish = async (app: FastifyInstance, tenantId: string, payload: unknown): Promise<void> => {
  await app.events.publish({ topic: 'runs.updated', tenantId, payload })
}

/** Proves nothing else is queued: the next frame is the answer to a fresh call. */
async function nothingQueued (client: Client, id: string): Promise<boolean> {
  const frame = await client.request({ id, op: 'listAgents', input: { limit: 1 } })
  return frame.id === id && client.pending === 0
}

t.test('subscribe, receive the own tenant events only, unsubscribe', async t => {
  const { app, url } = await wsApp(t)
  const a = await connect(t, url, { tenant: 't1', roles: ['viewer'] })
  const b = await connect(t, url, { tenant: 't2', roles: ['viewer'] })

  t.same(await a.request({ id: '1', subscribe: 'runUpdated' }), { id: '1', subscribed: 'runUpdated' })
  t.same(await a.request({ id: '1b', subscribe: 'runUpdated' }), { id: '1b', subscribed: 'runUpdated' }, 'subscribing twice is one subscription')
  t.same(await b.request({ id: '2', subscribe: 'runUpdated' }), { id: '2', subscribed: 'runUpdated' })

  await publish(app, 't1', run('r1'))
  const event = await a.next()
  const { internalCost, ...declared } = run('r1')
  t.equal(internalCost, 42)
  t.same(event, { event: 'runUpdated', data: declared }, 'the payload as the event schema declares it')
  t.ok(await nothingQueued(a, 'after1'), 'one event, not two, for a double subscribe')
  t.ok(await nothingQueued(b, 'b1'), 'another tenant receives nothing')

  await publish(app, 't2', run('r2', { status: 'succeeded' }))
  t.match(await b.next(), { event: 'runUpdated', data: { id: 'r2', status: 'succeeded' } })
  t.ok(await nothingQueued(a, 'after2'), 't1 does not see t2')

  t.same(await a.request({ id: '3', unsubscribe: 'runUpdated' }), { id: '3', unsubscribed: 'runUpdated' })
  t.same(await a.request({ id: '3b', unsubscribe: 'runUpdated' }), { id: '3b', unsubscribed: 'runUpdated' }, 'unsubscribing again is harmless')
  await publish(app, 't1', run('r3'))
  t.ok(await nothingQueued(a, 'after3'), 'nothing after unsubscribe')
  t.equal(app.events.bus.subscriptions, 1, 'only b is still subscribed')

  b.ws.close()
  await b.closed
  await sleep(20)
  t.equal(app.events.bus.subscriptions, 0, 'a closed connection leaves no subscription behind')
})

t.test('subscribe refusals: role, unknown event', async t => {
  const { url } = await wsApp(t)
  const client = await connect(t, url, { roles: [] })
  const refused = await client.request({ id: 'r', subscribe: 'runUpdated' })
  t.match(refused, { id: 'r', error: { code: 'FORBIDDEN', status: 403, detail: 'runUpdated needs one of the roles: viewer' } })
  const unknown = await client.request({ id: 'u', subscribe: 'noSuchEvent' })
  t.match(unknown, { id: 'u', error: { code: 'NOT_FOUND', status: 404, detail: 'No event noSuchEvent' } })
  const unknownOff = await client.request({ id: 'v', unsubscribe: 'noSuchEvent' })
  t.match(unknownOff, { id: 'v', error: { code: 'NOT_FOUND', status: 404 } })
})

t.test('a run started over the socket reports its progress as events', async t => {
  let gateway: FastifyInstance | null = null
  const { app, url } = await wsApp(t, { kernel: { onEvent: (e) => { gateway?.events.publish(e).catch(() => {}) } } })
  gateway = app
  const client = await connect(t, url, { roles: ['viewer', 'operator'] })
  await client.request({ id: 's', subscribe: 'runUpdated' })
  client.send({ id: 'run', op: 'runAgent', input: { id: 'a1', prompt: 'Summarise the report' } })
  const statuses: string[] = []
  let answered = false
  while (statuses.at(-1) !== 'succeeded') {
    const frame = await client.next()
    if (frame.id === 'run') {
      t.match(frame.result, { agentId: 'a1', status: 'queued' })
      answered = true
    } else {
      t.equal(frame.event, 'runUpdated')
      t.notOk('prompt' in frame.data)
      statuses.push(frame.data.status)
    }
  }
  t.ok(answered)
  t.same(statuses.filter(s => s !== 'queued'), ['running', 'succeeded'])
})

t.test('an auth frame replaces the token of the connection', async t => {
  const { app, url } = await wsApp(t)
  const client = await connect(t, url, { roles: [] })
  t.match(await client.request({ id: '1', op: 'getRun', input: { id: 'r999' } }), { error: { code: 'FORBIDDEN' } })

  const fresh = token({ roles: ['viewer'], ttlSeconds: 900 })
  const auth = await client.request({ id: '2', auth: fresh })
  t.same(Object.keys(auth), ['id', 'authenticated', 'expiresAt'])
  t.equal(auth.authenticated, true)
  t.equal(auth.expiresAt, app.identify(`Bearer ${fresh}`).expiresAt, 'the new expiry, in ms')
  t.match(await client.request({ id: '3', op: 'getRun', input: { id: 'r999' } }), { error: { code: 'NOT_FOUND' } }, 'the calls now carry the new roles')

  const now = Math.floor(Date.now() / 1000)
  const expired = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u1', tid: 't1', exp: now - 60 })
  const refusals: Array<[string, string, string, RegExp]> = [
    ['other user', token({ user: 'u2' }), 'FORBIDDEN', /same tenant and user/],
    ['other tenant', token({ tenant: 't9' }), 'FORBIDDEN', /same tenant and user/],
    ['forged', token({ secret: 'another-secret-of-sufficient-length-000000' }), 'UNAUTHENTICATED', /signature is invalid/],
    ['expired', expired, 'UNAUTHENTICATED', /expired/],
    ['garbage', 'not-a-jwt', 'UNAUTHENTICATED', /malformed/]
  ]
  for (const [name, jwt, code, detail] of refusals) {
    const frame = await client.request({ id: name, auth: jwt })
    t.match(frame, { id: name, error: { code, detail } }, name)
  }
  t.match(await client.request({ id: '4', op: 'getRun', input: { id: 'r999' } }), { error: { code: 'NOT_FOUND' } }, 'the token in place stays after a refusal')
})

t.test('a token without the role any more ends the subscription it held', async t => {
  const { app, url } = await wsApp(t)
  const client = await connect(t, url, { roles: ['viewer'] })
  await client.request({ id: 'sub', subscribe: 'runUpdated' })
  const auth = await client.request({ id: 'a', auth: token({ roles: [] }) })
  t.equal(auth.authenticated, true)
  t.match(await client.next(), { id: 'sub', error: { code: 'FORBIDDEN' } }, 'the subscribe frame id carries the end')
  await publish(app, 't1', run('r1'))
  t.ok(await nothingQueued(client, 'n'), 'no event after it')
  t.equal(app.events.bus.subscriptions, 0)
})

t.test('an event in a zone is refused to a token below it, and ends for a re-auth below it', async t => {
  const ping = { type: 'query', rest: 'GET /ping', kernel: 'GET /v1/ok', input: { type: 'object' }, output: { type: 'object' } }
  const manifest = testManifest({ ping }, {}, { events: { secretRun: { topic: 'runs.secret', payload: { type: 'object' }, zone: 'restricted' } } })
  const { app, url } = await wsApp(t, { build: { manifest } })
  const low = await connect(t, url, { zone: 'internal' })
  t.match(await low.request({ id: 'r', subscribe: 'secretRun' }), { id: 'r', error: { code: 'FORBIDDEN', status: 403, detail: 'secretRun is in the restricted zone, beyond the caller\'s' } })
  const high = await connect(t, url, { zone: 'restricted' })
  t.same(await high.request({ id: 's', subscribe: 'secretRun' }), { id: 's', subscribed: 'secretRun' })
  t.equal((await high.request({ id: 'a', auth: token({ zone: 'internal' }) })).authenticated, true)
  t.match(await high.next(), { id: 's', error: { code: 'FORBIDDEN' } }, 'the subscription ends with the zone it needs')
  t.equal(app.events.bus.subscriptions, 0)
})

t.test('an expiring token closes the connection with 4401 unless refreshed', async t => {
  const { url } = await wsApp(t)
  // Inside the 5 s clock tolerance: valid for 0.5 to 1.5 more seconds (exp 4 s ago left 0 to 1
  // s, too little to connect on a loaded machine when signed late in a second).
  const sign = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })
  const shortLived = (): string => sign({ sub: 'u1', tid: 't1', roles: ['viewer'], exp: Math.ceil((Date.now() + 500) / 1000) - 5 })

  const expiring = await connect(t, url, shortLived())
  const started = Date.now()
  const closed = await expiring.closed
  t.equal(closed.code, 4401)
  t.equal(closed.reason, 'The token has expired')
  t.ok(Date.now() - started <= 2000, 'closed when the token expires')

  const refreshed = await connect(t, url, shortLived())
  t.equal((await refreshed.request({ id: 'a', auth: token({ ttlSeconds: 600 }) })).authenticated, true)
  await sleep(1600)
  t.equal(refreshed.ws.readyState, refreshed.ws.OPEN, 'a refreshed connection outlives the first token')
  t.match(await refreshed.request({ id: 'b', op: 'listAgents' }), { id: 'b', result: Array })
})

t.test('a token valid for longer than a timer can wait does not close the connection early', async t => {
  const { url } = await wsApp(t)
  // 30 days is past setTimeout's 24.8-day limit, beyond which a timer fires at once.
  const warnings: string[] = []
  const onWarning = (w: Error): void => { warnings.push(w.name) }
  process.on('warning', onWarning)
  t.teardown(() => { process.off('warning', onWarning) })
  const client = await connect(t, url, { ttlSeconds: 30 * 24 * 3600 })
  await sleep(50)
  t.equal(client.ws.readyState, client.ws.OPEN)
  t.notOk(warnings.includes('TimeoutOverflowWarning'), 'the expiry timer is clamped, not left to overflow')
  t.match(await client.request({ id: '1', op: 'listAgents', input: { limit: 1 } }), { id: '1', result: Array })
})
