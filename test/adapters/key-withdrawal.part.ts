import t from 'tap'
import { generateKeyPairSync, type KeyObject } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import { WebSocket } from 'ws'
import { createSigner } from 'fast-jwt'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, until } from '../helper.js'
import { jwksServer, type JwksServer } from '../plugins/auth/jwks-server.js'

// A key the IdP withdraws from its JWKS is mostly a key that leaked: whoever holds it mints
// tokens of any lifetime (exp in 2100 here). Before, a stream opened with such a token kept its
// identity, and the tenant's events, until that exp: /ws, GraphQL over WebSocket and the tRPC
// WebSocket closed at expiry only (4401; GraphQL's is now 4403), and a tRPC SSE subscription ended only then. Now
// each ends as it does at expiry, with a reason that says the key was withdrawn, as soon as a
// JWKS fetch no longer holds its kid or holds another key under it; a stream of another kid
// stays open.

interface Teardown { teardown: (fn: () => unknown) => void }
interface Pair { publicKey: KeyObject, privatePem: string }
const pair = (): Pair => {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
  return { publicKey, privatePem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString() }
}
const jwk = (p: Pair, kid: string): Record<string, unknown> => ({ ...p.publicKey.export({ format: 'jwk' }), kid })
// 2100-01-01: a token minted with a leaked key outlives any timer.
const EXP = 4102444800
const sign = (p: Pair, kid: string, roles = ['viewer']): string =>
  createSigner({ key: p.privatePem, algorithm: 'RS256', kid, noTimestamp: true })({ sub: 'u1', tid: 't1', roles, exp: EXP })

interface Socket { ws: WebSocket, messages: Array<Record<string, any>>, closed: () => { code: number, reason: string } | null }

async function open (t: Teardown, url: string, authorization: string, protocol?: string): Promise<Socket> {
  const ws = new WebSocket(url, protocol, { headers: { authorization } })
  t.teardown(() => ws.terminate())
  const messages: Array<Record<string, any>> = []
  let closed: { code: number, reason: string } | null = null
  ws.on('message', d => messages.push(JSON.parse(String(d)) as Record<string, any>))
  ws.on('close', (code, reason) => { closed = { code, reason: reason.toString() } })
  await new Promise<void>((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  return { ws, messages, closed: () => closed }
}

const SUBSCRIPTION = 'subscription { runUpdated { id status } }'
const RUN = { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.5, promptChars: 12, output: null, error: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:01Z', startedAt: '2026-01-01T00:00:01Z', finishedAt: null }

/** A stream of each face, subscribed to runUpdated, with the checks the test makes on it. */
interface Stream {
  name: string
  /** How it ended (code and reason, or the SSE error's text); null while open. */
  ended: () => string | null
  /** Events received. */
  events: () => number
}

async function wsStream (t: Teardown, port: number, name: string, tok: string, reauth?: string): Promise<Stream> {
  const s = await open(t, `ws://127.0.0.1:${port}/ws`, `Bearer ${tok}`)
  s.ws.send(JSON.stringify({ id: 's', subscribe: 'runUpdated' }))
  await until(() => s.messages.some(m => m.subscribed === 'runUpdated'), `${name} subscribed`)
  if (reauth !== undefined) {
    s.ws.send(JSON.stringify({ id: 'a', auth: reauth }))
    await until(() => s.messages.some(m => m.id === 'a'), `${name} re-authenticated`)
    if (s.messages.find(m => m.id === 'a')?.authenticated !== true) throw new Error(`${name}: the auth frame was refused`)
  }
  return { name, ended: () => { const c = s.closed(); return c === null ? null : `${c.code} ${c.reason}` }, events: () => s.messages.filter(m => m.event === 'runUpdated').length }
}

async function graphqlStream (t: Teardown, port: number, name: string, tok: string, subscribeWith?: string): Promise<Stream> {
  const s = await open(t, `ws://127.0.0.1:${port}/graphql`, `Bearer ${tok}`, 'graphql-transport-ws')
  s.ws.send(JSON.stringify({ type: 'connection_init' }))
  await until(() => s.messages.some(m => m.type === 'connection_ack'), `${name} acknowledged`)
  s.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: SUBSCRIPTION }, ...(subscribeWith === undefined ? {} : { extensions: [{ type: 'connectionInit', payload: { authorization: `Bearer ${subscribeWith}` } }] }) }))
  return { name, ended: () => { const c = s.closed(); return c === null ? null : `${c.code} ${c.reason}` }, events: () => s.messages.filter(m => m.type === 'next').length }
}

async function trpcWsStream (t: Teardown, port: number, name: string, tok: string): Promise<Stream> {
  const s = await open(t, `ws://127.0.0.1:${port}/trpc`, `Bearer ${tok}`)
  s.ws.send(JSON.stringify({ id: 1, method: 'subscription', params: { path: 'runUpdated' } }))
  await until(() => s.messages.some(m => m.id === 1 && m.result?.type === 'started'), `${name} started`)
  return { name, ended: () => { const c = s.closed(); return c === null ? null : `${c.code} ${c.reason}` }, events: () => s.messages.filter(m => m.id === 1 && m.result?.type === 'data').length }
}

async function sseStream (t: Teardown, port: number, name: string, tok: string): Promise<Stream> {
  const controller = new AbortController()
  t.teardown(() => controller.abort())
  const res = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated`, { headers: { authorization: `Bearer ${tok}`, accept: 'text/event-stream' }, signal: controller.signal })
  if (res.status !== 200) throw new Error(`${name}: ${res.status}`)
  let text = ''
  let done = false
  ;(async () => {
    const reader = res.body!.getReader()
    for (;;) {
      const chunk = await reader.read()
      if (chunk.done) break
      text += Buffer.from(chunk.value).toString()
    }
  })().catch(() => {}).finally(() => { done = true })
  return {
    name,
    ended: () => {
      const error = /event: serialized-error\ndata: (.*)\n/.exec(text)
      if (error !== null) return error[1] as string
      return done ? 'ended without an error' : null
    },
    events: () => text.split('\n').filter(l => l.startsWith('data: ') && l.includes('"r1"')).length
  }
}

/** Fetches the JWKS again now (an unknown kid asks for it; jwksMinRefetchMs is 0) and waits for it. */
async function refetch (app: FastifyInstance, jwks: { hits: () => number }): Promise<void> {
  const before = jwks.hits()
  const b64 = (v: unknown): string => Buffer.from(JSON.stringify(v)).toString('base64url')
  // Refused at its kid, before any signature check; asked again while an earlier fetch is in
  // flight (the fetcher starts none then). Until a second fetch has started: the first has then
  // ended and its keys are in place. Once the first had only reached the JWKS server, a token
  // checked next raced its keys: under the suite's load, B's token was refused "unknown key id"
  // after B was brought back.
  await until(() => {
    try {
      app.identify(`Bearer ${b64({ alg: 'RS256', kid: 'unknown' })}.${b64({})}.x`)
    } catch {}
    return jwks.hits() > before + 1
  }, 'the JWKS refetch')
}

/**
 * Waits for the streams to end, for at most 5 s (without the fix they never do): each is then
 * checked on its own, so that a run without it says which stayed open.
 */
async function ending (streams: Stream[]): Promise<void> {
  await until(() => streams.every(s => s.ended() !== null), 'the streams to end').catch(() => {})
}

/** A demo gateway listening on port 0 whose identity takes the JWKS at `url` (refetched on any unknown kid), and its port. */
async function gatewayOn (t: Teardown, url: string, env: Record<string, string | undefined> = {}): Promise<{ app: FastifyInstance, port: number }> {
  const app = await buildDemoApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: url, ...env }, { identity: { jwksMinRefetchMs: 0, jwksRefreshMs: 600_000 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, port: (app.server.address() as AddressInfo).port }
}

/** Keys A and B, a JWKS serving both, a gateway on it, and a token of each. */
async function twoKeys (t: Teardown): Promise<{ a: Pair, b: Pair, jwks: JwksServer, app: FastifyInstance, port: number, tokA: string, tokB: string }> {
  const a = pair()
  const b = pair()
  const jwks = await jwksServer(t, { keys: [jwk(a, 'A'), jwk(b, 'B')] })
  const { app, port } = await gatewayOn(t, jwks.url)
  return { a, b, jwks, app, port, tokA: sign(a, 'A'), tokB: sign(b, 'B') }
}

interface Lease { listeners: number, withdrawn: boolean }
const leaseOf = (app: FastifyInstance, tok: string): Lease | undefined => (app.identify(`Bearer ${tok}`) as { lease?: Lease }).lease

t.test('a JWKS key withdrawn, then one replaced under its kid, ends the streams opened with its tokens on every face; the others stay', async t => {
  const { b, jwks, app, port, tokA, tokB } = await twoKeys(t)
  const leaseA = leaseOf(app, tokA)
  const leaseB = leaseOf(app, tokB)

  const ofA = [
    await wsStream(t, port, '/ws (A)', tokA),
    await wsStream(t, port, '/ws (B, then an auth frame of A)', tokB, tokA),
    await graphqlStream(t, port, 'graphql (A)', tokA),
    await graphqlStream(t, port, 'graphql (B, a subscribe of A)', tokB, tokA),
    await trpcWsStream(t, port, 'tRPC WebSocket (A)', tokA),
    await sseStream(t, port, 'tRPC SSE (A)', tokA)
  ]
  const ofB = [
    await wsStream(t, port, '/ws (B)', tokB),
    await wsStream(t, port, '/ws (A, then an auth frame of B)', tokA, tokB),
    await graphqlStream(t, port, 'graphql (B)', tokB),
    await trpcWsStream(t, port, 'tRPC WebSocket (B)', tokB),
    await sseStream(t, port, 'tRPC SSE (B)', tokB)
  ]
  await until(() => app.events.bus.subscriptions === ofA.length + ofB.length, 'every stream on the bus')
  t.equal(leaseA?.listeners, 6, 'one listener on A per stream that holds a token of A (the /ws connection re-authenticated with B let go of its own)')
  t.equal(leaseB?.listeners, 6, 'one listener on B per stream that holds a token of B (the GraphQL connection that saw B and A holds one on each)')

  // A refetch that changes nothing ends nothing: an unchanged key keeps its lease.
  await refetch(app, jwks)
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: RUN })
  await until(() => [...ofA, ...ofB].every(s => s.events() === 1), 'the event on every stream')
  t.ok(leaseA?.withdrawn === false && leaseB?.withdrawn === false, 'the same keys fetched again: nothing withdrawn')

  // A withdrawn.
  jwks.set({ keys: [jwk(b, 'B')] })
  await refetch(app, jwks)
  await ending(ofA)
  for (const s of ofA) {
    if (s.name.startsWith('tRPC SSE')) {
      t.match(s.ended(), /"message":"The token's signing key was withdrawn: subscribe again with a fresh token".*"code":"UNAUTHENTICATED","httpStatus":401/, `${s.name}: UNAUTHENTICATED, the key withdrawn`)
    } else if (s.name.startsWith('graphql')) {
      // graphql-transport-ws' 4403, which graphql-ws' client retries with a fresh token (4401 it takes for fatal).
      t.match(s.ended(), /^4403 Forbidden: .*signing key was withdrawn$/, `${s.name}: 4403, the key withdrawn`)
    } else {
      t.match(s.ended(), /^4401 .*signing key was withdrawn$/, `${s.name}: 4401, the key withdrawn`)
    }
  }
  t.equal(leaseA?.withdrawn, true, 'A\'s lease is withdrawn')
  t.equal(leaseA?.listeners, 0, 'and holds no listener')
  t.same(ofB.map(s => s.ended()), ofB.map(() => null), 'the streams of B stay open')
  t.equal(leaseB?.listeners, 5, 'B\'s listeners are those of its open streams (the GraphQL connection that also saw A let go of its own)')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: RUN })
  await until(() => ofB.every(s => s.events() === 2), 'the next event on every stream of B')
  await until(() => app.events.bus.subscriptions === ofB.length, 'the streams of A to leave the bus').catch(() => {})
  t.equal(app.events.bus.subscriptions, ofB.length, 'the streams of A have left the bus')
  t.throws(() => app.identify(`Bearer ${tokA}`), { code: 'UNAUTHENTICATED', message: /unknown key id/ }, 'A\'s token is refused')

  // B replaced under the same kid.
  jwks.set({ keys: [jwk(pair(), 'B')] })
  await refetch(app, jwks)
  await ending(ofB)
  for (const s of ofB) {
    if (s.name.startsWith('tRPC SSE')) {
      t.match(s.ended(), /"message":"The token's signing key was withdrawn: subscribe again with a fresh token".*"code":"UNAUTHENTICATED","httpStatus":401/, `${s.name}: UNAUTHENTICATED, the key replaced`)
    } else if (s.name.startsWith('graphql')) {
      // graphql-transport-ws' 4403, which graphql-ws' client retries with a fresh token (4401 it takes for fatal).
      t.match(s.ended(), /^4403 Forbidden: .*signing key was withdrawn$/, `${s.name}: 4403, the key replaced`)
    } else {
      t.match(s.ended(), /^4401 .*signing key was withdrawn$/, `${s.name}: 4401, the key replaced`)
    }
  }
  t.equal(leaseB?.listeners, 0, 'B\'s lease holds no listener')
  await until(() => app.events.bus.subscriptions === 0, 'every stream to leave the bus').catch(() => {})
  t.equal(app.events.bus.subscriptions, 0, 'every stream has left the bus')
  t.throws(() => app.identify(`Bearer ${tokB}`), { code: 'UNAUTHENTICATED', message: /signature is invalid/ }, 'B\'s old token is refused')
})

t.test('identities of the HS256 secret carry no lease: a JWKS change ends none of their streams', async t => {
  const a = pair()
  const jwks = await jwksServer(t, { keys: [jwk(a, 'A')] })
  const secret = 'key-withdrawal-test-secret-of-at-least-32-bytes'
  const { app, port } = await gatewayOn(t, jwks.url, { BFF_JWT_SECRET: secret })
  const hs = createSigner({ key: secret, algorithm: 'HS256', noTimestamp: true })({ sub: 'u1', tid: 't1', roles: ['viewer'], exp: EXP })
  t.equal(app.identify(`Bearer ${hs}`).lease, undefined, 'no lease')
  const kept = await wsStream(t, port, '/ws (HS256)', hs)
  const ended = await wsStream(t, port, '/ws (A)', sign(a, 'A'))
  jwks.set({ keys: [jwk(pair(), 'other')] })
  await refetch(app, jwks)
  await ending([ended])
  t.match(ended.ended(), /^4401 /, 'the stream of A ended')
  t.equal(kept.ended(), null, 'the HS256 stream stays open')
})

t.test('a lease holds a listener per open stream only, however its streams end, round after round', async t => {
  const { a, app, port, tokA, tokB } = await twoKeys(t)
  const noRoleA = sign(a, 'A', [])
  const leaseA = leaseOf(app, tokA)
  const kept = await wsStream(t, port, '/ws (A, kept open)', tokA)
  for (let round = 0; round < 5; round++) {
    // /ws: the client closes; an auth frame moves one to B; a refused subscribe on a connection
    // the client then closes.
    const ws = await open(t, `ws://127.0.0.1:${port}/ws`, `Bearer ${tokA}`)
    const moved = await open(t, `ws://127.0.0.1:${port}/ws`, `Bearer ${tokA}`)
    moved.ws.send(JSON.stringify({ id: 'a', auth: tokB }))
    const refused = await open(t, `ws://127.0.0.1:${port}/ws`, `Bearer ${noRoleA}`)
    refused.ws.send(JSON.stringify({ id: 's', subscribe: 'runUpdated' }))
    await until(() => refused.messages.some(m => m.id === 's') && moved.messages.some(m => m.id === 'a'), 'the /ws answers')
    // GraphQL: a subscription the client completes, and a connection it then closes.
    const gql = await open(t, `ws://127.0.0.1:${port}/graphql`, `Bearer ${tokA}`, 'graphql-transport-ws')
    gql.ws.send(JSON.stringify({ type: 'connection_init' }))
    await until(() => gql.messages.some(m => m.type === 'connection_ack'), 'GraphQL acknowledged')
    const busBefore = app.events.bus.subscriptions
    gql.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: SUBSCRIPTION } }))
    await until(() => app.events.bus.subscriptions === busBefore + 1, 'the GraphQL subscription')
    gql.ws.send(JSON.stringify({ id: '1', type: 'complete' }))
    await until(() => app.events.bus.subscriptions === busBefore, 'the GraphQL subscription completed')
    // tRPC WebSocket and SSE: the client leaves.
    const trpc = await open(t, `ws://127.0.0.1:${port}/trpc`, `Bearer ${tokA}`)
    trpc.ws.send(JSON.stringify({ id: 1, method: 'subscription', params: { path: 'runUpdated' } }))
    await until(() => trpc.messages.some(m => m.id === 1 && m.result?.type === 'started'), 'tRPC started')
    const controller = new AbortController()
    const res = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated`, { headers: { authorization: `Bearer ${tokA}`, accept: 'text/event-stream' }, signal: controller.signal })
    t.equal(res.status, 200)
    const sseRefused = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated`, { headers: { authorization: `Bearer ${noRoleA}`, accept: 'text/event-stream' } })
    await sseRefused.text()
    await until(() => (leaseA?.listeners ?? 0) >= 6, 'the streams on A')
    for (const s of [ws, moved, refused, trpc]) s.ws.close()
    controller.abort()
    await until(() => leaseA?.listeners === 2, `round ${round}: the listeners of the streams left`).catch(() => {})
    t.equal(leaseA?.listeners, 2, `round ${round}: the kept /ws and the GraphQL connection alone hold A`)
    gql.ws.close()
    await until(() => leaseA?.listeners === 1, `round ${round}: GraphQL's listener`).catch(() => {})
    t.equal(leaseA?.listeners, 1, `round ${round}: the kept /ws alone holds A`)
  }
  t.equal(kept.ended(), null, 'the kept stream is open')
  await app.close()
  t.equal(leaseA?.listeners, 0, 'shutdown (1001) lets go of the last')
  t.equal(leaseA?.withdrawn, false, 'and withdraws nothing')
})

t.test('a JWKS fetch that fails, or holds no usable key, ends no stream: the last good keys stay', async t => {
  const { a, b, jwks, app, port, tokA } = await twoKeys(t)
  const leaseA = leaseOf(app, tokA)
  const streams = [
    await wsStream(t, port, '/ws (A)', tokA),
    await graphqlStream(t, port, 'graphql (A)', tokA),
    await trpcWsStream(t, port, 'tRPC WebSocket (A)', tokA),
    await sseStream(t, port, 'tRPC SSE (A)', tokA)
  ]
  // Ended by the last fetch below (B dropped): fetches run one at a time, so once it has ended
  // every failed fetch before it has been taken, or refused, already.
  const sentinel = await wsStream(t, port, '/ws (B)', sign(b, 'B'))
  await until(() => app.events.bus.subscriptions === streams.length + 1, 'every stream on the bus')
  const short = generateKeyPairSync('rsa', { modulusLength: 1024 }).publicKey
  const docs: Array<{ keys: unknown[] } | null> = [
    null, // a 503
    { keys: [] },
    { keys: [{ ...short.export({ format: 'jwk' }), kid: 'A' }] }, // a 1024-bit RSA key only
    { keys: [{ ...b.publicKey.export({ format: 'jwk' }), kid: 'B', use: 'enc' }] }, // no signing key
    { keys: 'x' as unknown as unknown[] } // no "keys" array
  ]
  for (const doc of docs) {
    jwks.set(doc)
    await refetch(app, jwks)
  }
  jwks.set({ keys: [jwk(a, 'A')] })
  await refetch(app, jwks)
  await ending([sentinel])
  t.match(sentinel.ended(), /^4401 /, 'the fetch that dropped B has been taken')
  t.same(streams.map(s => s.ended()), streams.map(() => null), 'every stream of A stayed open through the five failed fetches')
  t.equal(leaseA?.withdrawn, false, 'A\'s lease stands')
  t.equal(leaseA?.listeners, streams.length, 'and holds its streams\' listeners')
  t.equal(app.identify(`Bearer ${tokA}`).lease, leaseA, 'A\'s tokens verify, with the same lease')
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: RUN })
  await until(() => streams.every(s => s.events() === 1), 'the event on every stream')
  t.pass('they still get events')
})

t.test('/ws counts a withdrawal close as key_withdrawn; a key of BFF_JWT_PUBLIC_KEYS under a kid the JWKS also has wins, and carries no lease', async t => {
  const a = pair()
  const c = pair()
  const jwks = await jwksServer(t, { keys: [jwk(a, 'A'), jwk(pair(), 'C')] })
  const configured = JSON.stringify({ C: c.publicKey.export({ type: 'spki', format: 'pem' }).toString() })
  const { app, port } = await gatewayOn(t, jwks.url, { BFF_JWT_PUBLIC_KEYS: configured })
  const tokC = sign(c, 'C')
  t.equal(app.identify(`Bearer ${tokC}`).lease, undefined, 'the configured key verifies C: no lease')
  const ofA = await wsStream(t, port, '/ws (A)', sign(a, 'A'))
  const ofC = await wsStream(t, port, '/ws (C)', tokC)
  jwks.set({ keys: [jwk(pair(), 'other')] })
  await refetch(app, jwks)
  await ending([ofA])
  t.match(ofA.ended(), /^4401 The token's signing key was withdrawn$/)
  t.equal(ofC.ended(), null, 'the configured C\'s stream stays open though the JWKS dropped C')
  const counted = /mantle_websocket_closes_total\{reason="key_withdrawn"\} 1/
  let metrics = ''
  for (let i = 0; i < 100 && !counted.test(metrics); i++) {
    if (i > 0) await new Promise(resolve => setTimeout(resolve, 20))
    metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  }
  t.match(metrics, counted, 'the close is counted as key_withdrawn')
})

t.test('the same key under a new kid, and a kid dropped then brought back: the streams of the old kid, or of the drop, end; later tokens get a new lease', async t => {
  const { a, b, jwks, app, port, tokA } = await twoKeys(t)
  // A's PEM now under kid A2: a token naming A is refused by any call, so its stream ends too.
  const ofA = await wsStream(t, port, '/ws (A)', tokA)
  // A token of A verified from within the withdrawal (a listener runs once the new keys are in
  // place and the verified tokens dropped): refused, not answered from the cache.
  const leaseA = (app.identify(`Bearer ${tokA}`) as { lease?: { onWithdrawn: (fn: () => void) => () => void } }).lease
  let during = 'not run'
  leaseA?.onWithdrawn(() => {
    try {
      app.identify(`Bearer ${tokA}`)
      during = 'verified'
    } catch (err) {
      during = (err as Error).message
    }
  })
  jwks.set({ keys: [jwk(a, 'A2'), jwk(b, 'B')] })
  await refetch(app, jwks)
  await ending([ofA])
  t.match(during, /unknown key id/, 'a token of A verified during the withdrawal is refused')
  t.match(ofA.ended(), /^4401 The token's signing key was withdrawn$/, 'the stream of kid A ends')
  t.throws(() => app.identify(`Bearer ${sign(a, 'A')}`), { message: /unknown key id/ }, 'as a call with its token is refused')
  const leaseA2 = leaseOf(app, sign(a, 'A2'))
  t.equal(leaseA2?.withdrawn, false, 'A2 verifies, on a lease of its own')
  // B dropped, then back with the same key: the drop ends B's streams; the key back is a new lease.
  const tokB = sign(b, 'B')
  const leaseB = leaseOf(app, tokB)
  const ofB = await wsStream(t, port, '/ws (B)', tokB)
  jwks.set({ keys: [jwk(a, 'A2')] })
  await refetch(app, jwks)
  await ending([ofB])
  t.match(ofB.ended(), /^4401 The token's signing key was withdrawn$/, 'the stream of B ends at the drop')
  jwks.set({ keys: [jwk(a, 'A2'), jwk(b, 'B')] })
  await refetch(app, jwks)
  const back = leaseOf(app, tokB)
  t.ok(back !== undefined && back !== leaseB && !back.withdrawn, 'B back: its tokens verify again, on a new lease')
  t.equal(leaseA2?.withdrawn, false, 'A2 was never withdrawn')
})
