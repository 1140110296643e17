import t from 'tap'
import { generateKeyPairSync, type KeyObject } from 'node:crypto'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { WebSocket } from 'ws'
import { createSigner } from 'fast-jwt'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, until } from '../helper.js'

// A key the IdP withdraws from its JWKS is mostly a key that leaked: whoever holds it mints
// tokens of any lifetime (exp in 2100 here). Before, a stream opened with such a token kept its
// identity, and the tenant's events, until that exp: /ws, GraphQL over WebSocket and the tRPC
// WebSocket closed with 4401 at expiry only, and a tRPC SSE subscription ended only then. Now
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
const sign = (p: Pair, kid: string): string =>
  createSigner({ key: p.privatePem, algorithm: 'RS256', kid, noTimestamp: true })({ sub: 'u1', tid: 't1', roles: ['viewer'], exp: EXP })

/** A JWKS server whose document the test changes; it counts requests. */
async function jwksServer (t: Teardown, initial: { keys: unknown[] }): Promise<{ url: string, hits: () => number, set: (doc: { keys: unknown[] }) => void }> {
  let doc = initial
  let hits = 0
  const server = createServer((_req, res) => {
    hits++
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(doc))
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise(resolve => { server.close(resolve); server.closeAllConnections() }))
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/jwks.json`, hits: () => hits, set: d => { doc = d } }
}

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
  // Refused at its kid, before any signature check.
  try {
    app.identify(`Bearer ${b64({ alg: 'RS256', kid: 'unknown' })}.${b64({})}.x`)
  } catch {}
  await until(() => jwks.hits() > before, 'the JWKS refetch')
}

/**
 * Waits for the streams to end, for at most 5 s (without the fix they never do): each is then
 * checked on its own, so that a run without it says which stayed open.
 */
async function ending (streams: Stream[]): Promise<void> {
  await until(() => streams.every(s => s.ended() !== null), 'the streams to end').catch(() => {})
}

interface Lease { listeners: number, withdrawn: boolean }
const leaseOf = (app: FastifyInstance, tok: string): Lease | undefined => (app.identify(`Bearer ${tok}`) as { lease?: Lease }).lease

t.test('a JWKS key withdrawn, then one replaced under its kid, ends the streams opened with its tokens on every face; the others stay', async t => {
  const a = pair()
  const b = pair()
  const jwks = await jwksServer(t, { keys: [jwk(a, 'A'), jwk(b, 'B')] })
  const app = await buildDemoApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url }, { identity: { jwksMinRefetchMs: 0, jwksRefreshMs: 600_000 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const tokA = sign(a, 'A')
  const tokB = sign(b, 'B')
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
  const app = await buildDemoApp(t, { BFF_JWT_SECRET: secret, BFF_JWKS_URL: jwks.url }, { identity: { jwksMinRefetchMs: 0, jwksRefreshMs: 600_000 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
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
