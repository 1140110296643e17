// Connections opened without a token, which /graphql (connection_init) and /trpc
// (?connectionParams=1) accept because the token may come once upgraded: bounded per client
// address and per instance until they are identified. Before, any client without a token could
// hold the face's 100,000 places, each for the 10 s the face waits for a token and the close
// handshake's 30 s after: some 50 KB of heap each on /graphql (5 GB at the bound), 14 KB on /trpc.
import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { WebSocket } from 'ws'
import { token, until } from '../../helper.js'
import { wsApp, upgrade, type Frame, type WsSetup } from '../websocket-helper.js'
import { createGraphqlFace } from '../../../adapters/graphql/index.js'
import { createTrpcFace } from '../../../adapters/trpc/index.js'

interface Teardown { teardown: (fn: () => unknown) => void }

const PER_ADDRESS = 3
const INSTANCE = 5

const faces = [
  {
    name: 'GraphQL',
    label: 'graphql',
    plugin: () => createGraphqlFace({ maxUnidentified: INSTANCE, maxUnidentifiedPerAddress: PER_ADDRESS }),
    path: '/graphql',
    anonymous: '/graphql',
    protocol: 'graphql-transport-ws',
    detail: (body: Frame): unknown => body.errors[0].message,
    identify: async (ws: WebSocket, messages: Frame[]): Promise<void> => {
      ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token()}` } }))
      await until(() => messages.some(m => m.type === 'connection_ack'), 'connection_ack')
    }
  },
  {
    name: 'tRPC',
    label: 'trpc',
    plugin: () => createTrpcFace({ maxUnidentified: INSTANCE, maxUnidentifiedPerAddress: PER_ADDRESS }),
    path: '/trpc',
    anonymous: '/trpc?connectionParams=1',
    protocol: undefined,
    detail: (body: Frame): unknown => body.error.message,
    identify: async (ws: WebSocket, messages: Frame[]): Promise<void> => {
      ws.send(JSON.stringify({ method: 'connectionParams', data: { token: token() } }))
      ws.send(JSON.stringify({ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'a2' } } }))
      await until(() => messages.some(m => m.id === 1), 'the answer of a call after connectionParams')
    }
  }
]

/** The face alone, with the small bounds above, identity on (a tenant's share applies). */
async function setup (t: Teardown, face: typeof faces[number], env: Record<string, string | number | boolean> = {}): Promise<WsSetup> {
  const { app, url } = await wsApp(t, { face: { plugin: face.plugin(), path: face.path }, env })
  return { app, url: url.replace(face.path, face.anonymous) }
}

async function open (t: Teardown, url: string, protocol: string | undefined, headers: Record<string, string> = {}): Promise<{ ws: WebSocket, messages: Frame[] }> {
  const ws = new WebSocket(url, protocol, { headers })
  t.teardown(() => ws.terminate())
  const messages: Frame[] = []
  ws.on('message', d => messages.push(JSON.parse(String(d)) as Frame))
  await new Promise<void>((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  return { ws, messages }
}

async function metrics (app: FastifyInstance): Promise<string> {
  return (await app.inject({ method: 'GET', url: '/metrics' })).body
}

async function unidentified (app: FastifyInstance, face: string, n: number): Promise<void> {
  const line = `mantle_websocket_unidentified{face="${face}"} ${n}\n`
  for (let i = 0; i < 500; i++) {
    if ((await metrics(app)).includes(line)) return
    await new Promise(resolve => setTimeout(resolve, 10))
  }
  throw new Error(`no ${line.trim()}`)
}

for (const face of faces) {
  t.test(`${face.name}: one address holds at most its share of connections without a token; identified ones leave it`, async t => {
    const { app, url } = await setup(t, face)
    // Each counted by the upgrade's hook, before its 101.
    const held = await Promise.all(Array.from({ length: PER_ADDRESS }, async () => await open(t, url, face.protocol)))

    const over = await upgrade(t, url, {}, face.protocol)
    t.equal(over.status, 503, 'the address\'s next upgrade without a token is refused before it is accepted')
    t.equal(face.detail(over.body!), `An address holds at most ${PER_ADDRESS} WebSocket connections without a token at ${face.path} on this instance: send the token with the upgrade (Authorization or ?access_token=)`)
    t.equal(over.retryAfter, '5')
    await unidentified(app, face.label, PER_ADDRESS)

    const withToken = await upgrade(t, url, { authorization: `Bearer ${token()}` }, face.protocol)
    t.equal(withToken.status, 101, 'an upgrade with a token is not counted among them')

    // Identified, a connection counts against its tenant instead: its place among the unidentified comes back.
    await face.identify(held[0].ws, held[0].messages)
    await unidentified(app, face.label, PER_ADDRESS - 1)
    t.equal((await upgrade(t, url, {}, face.protocol)).status, 101, 'one more without a token once one was identified')
    t.equal((await upgrade(t, url, {}, face.protocol)).status, 503, 'and the share holds again')

    // Closed, likewise.
    held[1].ws.terminate()
    await unidentified(app, face.label, PER_ADDRESS - 1)
    t.equal((await upgrade(t, url, {}, face.protocol)).status, 101, 'one more once one was closed')

    t.match(await metrics(app), new RegExp(`mantle_websocket_connections_refused_total\\{face="${face.label}",bound="address"\\} 2\\n`), 'each refusal counted by its bound')
  })

  t.test(`${face.name}: the instance holds at most its bound of connections without a token, whatever their addresses`, async t => {
    // Each upgrade from its own address, as a trusted proxy names it.
    const { app, url } = await setup(t, face, { BFF_TRUST_PROXY: '127.0.0.1' })
    const from = (i: number): Record<string, string> => ({ 'x-forwarded-for': `198.51.100.${i}` })
    for (let i = 0; i < INSTANCE; i++) await open(t, url, face.protocol, from(i))
    const over = await upgrade(t, url, from(99), face.protocol)
    t.equal(over.status, 503, 'a new address is refused once the instance holds its bound')
    t.equal(face.detail(over.body!), `Too many WebSocket connections without a token at ${face.path} on this instance: send the token with the upgrade (Authorization or ?access_token=)`)
    t.equal((await upgrade(t, url, { ...from(99), authorization: `Bearer ${token()}` }, face.protocol)).status, 101, 'an upgrade with a token still connects')
    t.match(await metrics(app), new RegExp(`mantle_websocket_connections_refused_total\\{face="${face.label}",bound="unidentified"\\} 1\\n`))
    await unidentified(app, face.label, INSTANCE)
  })

  t.test(`${face.name}: with identity off no connection is counted as unidentified`, async t => {
    const { app, url } = await setup(t, face, { BFF_AUTH_ENABLED: false })
    // Each would throw if refused: every connection is the anonymous caller's, none awaits a token.
    for (let i = 0; i < PER_ADDRESS + 1; i++) await open(t, url, face.protocol)
    t.notMatch(await metrics(app), /bound="(?:address|unidentified)"\} [1-9]/, 'none refused')
  })
}

/** How `ws` closes, or code 0 when it is still open after 5 s. */
async function closeOf (ws: WebSocket): Promise<{ code: number, reason: string }> {
  return await new Promise(resolve => {
    const timer = setTimeout(() => resolve({ code: 0, reason: 'still open after 5 s' }), 5000)
    ws.once('close', (code, reason) => {
      clearTimeout(timer)
      resolve({ code, reason: String(reason) })
    })
  })
}

// What a connection without a token may send until one identifies it: UNIDENTIFIED_MAX_BYTES.
// Before, message after message of up to BFF_BODY_LIMIT, each parsed whole.
const BYTES = 64 * 1024
const OVER = 'At most 64 KiB may be sent before the connection is identified: send the token first'

const padded = [
  {
    name: 'GraphQL',
    label: 'graphql',
    face: faces[0],
    // A connection_init that would identify the connection, and a ping answered by a pong.
    init: (pad: string): string => JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token()}`, pad } }),
    small: (pad: string): string => JSON.stringify({ type: 'ping', payload: { pad } }),
    answered: (m: Frame): boolean => m.type === 'pong'
  },
  {
    name: 'tRPC',
    label: 'trpc',
    face: faces[1],
    init: (pad: string): string => JSON.stringify({ method: 'connectionParams', data: { token: token(), pad } }),
    // A call, answered (its input refused) once the connection is identified.
    small: (pad: string): string => JSON.stringify({ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'a2', pad } } }),
    answered: (m: Frame): boolean => m.id === 1
  }
]

for (const p of padded) {
  t.test(`${p.name}: a connection without a token is closed (1008) once it has sent more than 64 KiB, before the message is read`, async t => {
    const { app, url } = await setup(t, p.face)
    const { ws, messages } = await open(t, url, p.face.protocol)
    const closed = closeOf(ws)
    // Its token in it, but past the bound: not read, so not identified.
    ws.send(p.init('x'.repeat(BYTES)))
    t.same(await closed, { code: 1008, reason: OVER })
    t.same(messages, [], 'nothing answered: the message was not handed on')
    await unidentified(app, p.label, 0)
    t.match(await metrics(app), new RegExp(`mantle_websocket_unidentified_overflows_total\\{face="${p.label}"\\} 1\\n`))
  })

  t.test(`${p.name}: the bound counts every message until the connection is identified, not after`, async t => {
    const { app, url } = await setup(t, p.face)
    if (p.label === 'graphql') {
      // Pings, each answered, until the ones that pass the bound.
      const { ws, messages } = await open(t, url, p.face.protocol)
      const closed = closeOf(ws)
      for (let i = 0; i < 20; i++) ws.send(p.small('x'.repeat(4000)))
      t.same(await closed, { code: 1008, reason: OVER })
      // Those within 64 KiB handed on (the last one's pong may be dropped by the close that
      // follows it at once), none after.
      const within = Math.floor(BYTES / Buffer.byteLength(p.small('x'.repeat(4000))))
      const answered = messages.filter(p.answered).length
      t.ok(answered >= within - 1 && answered <= within, `${answered} of the ${within} pings within 64 KiB answered, none after`)
    }
    // Identified, it may send as much as any client with a token.
    const { ws, messages } = await open(t, url, p.face.protocol)
    ws.send(p.init('x'.repeat(1000)))
    if (p.label === 'graphql') await until(() => messages.some(m => m.type === 'connection_ack'), 'connection_ack')
    else await unidentified(app, p.label, 0)
    for (let i = 0; i < 3; i++) ws.send(p.small('x'.repeat(BYTES)))
    await until(() => messages.filter(p.answered).length === 3, 'three answers past 64 KiB once identified')
    t.equal(ws.readyState, WebSocket.OPEN)
    const overflows = new RegExp(`mantle_websocket_unidentified_overflows_total\\{face="${p.label}"\\} 1\\n`)
    if (p.label === 'graphql') t.match(await metrics(app), overflows, 'the pings\' connection alone')
    else t.notMatch(await metrics(app), overflows)
  })
}
