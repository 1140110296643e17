// One tenant's share of each upgrading face's connections (BFF_WS_MAX_CONNECTIONS_PER_TENANT):
// a tenant that opens its share of sockets on /ws, /trpc or /graphql gets 503 OVERLOADED for the
// next one, while every other tenant still connects. Before, only the instance's bound counted
// (100,000 per face): one tenant's token was enough to take every place, and every other
// tenant's upgrade was refused. A connection identified only once upgraded (GraphQL's
// connection_init, tRPC's connectionParams) is counted then, and closed with 1013 beyond it.
import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { WebSocket } from 'ws'
import { bearer, token, until } from '../../helper.js'
import { wsApp, upgrade, type Frame, type WsSetup } from '../websocket-helper.js'

interface Teardown { teardown: (fn: () => unknown) => void }

const SHARE = 2

const faces = [
  {
    name: '/ws',
    label: 'ws',
    env: {},
    path: '/ws',
    protocol: undefined,
    code: (body: Frame): unknown => body.code,
    detail: (body: Frame): unknown => body.detail
  },
  {
    name: 'tRPC',
    label: 'trpc',
    env: { BFF_WEBSOCKET_ENABLED: false, BFF_TRPC_ENABLED: true },
    path: '/trpc',
    protocol: undefined,
    code: (body: Frame): unknown => body.error.data.code,
    detail: (body: Frame): unknown => body.error.message
  },
  {
    name: 'GraphQL',
    label: 'graphql',
    env: { BFF_WEBSOCKET_ENABLED: false, BFF_GRAPHQL_ENABLED: true },
    path: '/graphql',
    protocol: 'graphql-transport-ws',
    code: (body: Frame): unknown => body.errors[0].extensions.code,
    detail: (body: Frame): unknown => body.errors[0].message
  }
]

/** The gateway as app.ts builds it, with the one face and a share of SHARE; `url` at the face's path. */
async function setup (t: Teardown, face: typeof faces[number]): Promise<WsSetup> {
  const { app, url } = await wsApp(t, { env: { ...face.env, BFF_WS_MAX_CONNECTIONS_PER_TENANT: SHARE } })
  return { app, url: url.replace(/\/ws$/, face.path) }
}

async function metrics (app: FastifyInstance): Promise<string> {
  return (await app.inject({ method: 'GET', url: '/metrics' })).body
}

/** Until the face's gauge of places says `n`: a closed connection's place comes back when the gateway sees the close. */
async function places (app: FastifyInstance, face: string, n: number): Promise<void> {
  const line = `mantle_websocket_slots{face="${face}"} ${n}\n`
  for (let i = 0; i < 500; i++) {
    if ((await metrics(app)).includes(line)) return
    await new Promise(resolve => setTimeout(resolve, 10))
  }
  throw new Error(`no ${line.trim()}`)
}

for (const face of faces) {
  t.test(`${face.name}: one tenant holds at most its share of the connections; the others still connect`, async t => {
    const { app, url } = await setup(t, face)
    const hog = bearer({ tenant: 'hog' })
    const held = await Promise.all(Array.from({ length: SHARE }, async () => await upgrade(t, url, hog, face.protocol)))
    t.same(held.map(u => u.status), [101, 101], 'the share opens')

    const over = await upgrade(t, url, hog, face.protocol)
    t.equal(over.status, 503, 'the hog\'s next upgrade is refused before it is accepted')
    t.equal(face.code(over.body!), 'OVERLOADED')
    t.equal(face.detail(over.body!), `A tenant holds at most ${SHARE} WebSocket connections at ${face.path} on this instance`, 'naming the tenant\'s bound')
    t.equal(over.retryAfter, '5', 'with the instance bound\'s wait')

    const other = await upgrade(t, url, bearer({ tenant: 'other' }), face.protocol)
    t.equal(other.status, 101, 'another tenant still connects')

    // A closed connection gives its place in the share back.
    held[0].ws!.close()
    await places(app, face.label, 2)
    const again = await upgrade(t, url, hog, face.protocol)
    t.equal(again.status, 101, 'the hog connects again once one of its connections closed')
    t.equal((await upgrade(t, url, hog, face.protocol)).status, 503, 'and its share holds again')

    const text = await metrics(app)
    t.match(text, new RegExp(`mantle_websocket_connections_refused_total\\{face="${face.label}",bound="tenant"\\} 2\\n`), 'each refusal counted by its bound')
    t.notMatch(text, /bound="instance"\} [1-9]/, 'none by the instance\'s')
  })
}

/** An open socket at `url`, its messages and how it closed. */
async function open (t: Teardown, url: string, protocol?: string): Promise<{ ws: WebSocket, messages: Frame[], closed: () => [number, string] | null }> {
  const ws = new WebSocket(url, protocol)
  t.teardown(() => ws.terminate())
  const messages: Frame[] = []
  let closed: [number, string] | null = null
  ws.on('message', d => messages.push(JSON.parse(String(d)) as Frame))
  ws.on('close', (code, reason) => { closed = [code, String(reason)] })
  await new Promise<void>((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  return { ws, messages, closed: () => closed }
}

type Socket = Awaited<ReturnType<typeof open>>

/** Until `c` is identified (answered) or closed. */
async function settled (c: Socket, answered: (m: Frame) => boolean): Promise<void> {
  await until(() => c.closed() !== null || c.messages.some(answered), 'the connection identified or closed')
}

const identifiedLater = [
  {
    face: faces[1],
    // wsLink's connectionParams: the upgrade carries no token; a query after them is answered once they are taken.
    path: '/trpc?connectionParams=1',
    identify: async (c: Socket, tenant: string): Promise<void> => {
      c.ws.send(JSON.stringify({ method: 'connectionParams', data: { token: token({ tenant }) } }))
      c.ws.send(JSON.stringify({ id: 1, method: 'query', params: { path: 'getAgent', input: { id: 'a2' } } }))
      await settled(c, m => m.id === 1)
    },
    refusal: (messages: Frame[]): unknown => messages.find(m => m.id === null)?.error?.data?.code
  },
  {
    face: faces[2],
    path: '/graphql',
    identify: async (c: Socket, tenant: string): Promise<void> => {
      c.ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token({ tenant })}` } }))
      await settled(c, m => m.type === 'connection_ack')
    },
    // graphql-transport-ws has no message for a refused connection_init: the close says it.
    refusal: (): unknown => 'OVERLOADED'
  }
]

for (const { face, path, identify, refusal } of identifiedLater) {
  t.test(`${face.name}: a connection whose tenant is known once upgraded counts then, and is closed with 1013 beyond the share`, async t => {
    const { app, url } = await setup(t, face)
    const at = url.replace(face.path, path)
    const opened = async (tenant: string): Promise<Socket> => {
      const c = await open(t, at, face.protocol)
      await identify(c, tenant)
      return c
    }
    const held = [await opened('hog'), await opened('hog')]
    t.ok(held.every(c => c.closed() === null), 'the share opens')
    const over = await opened('hog')
    await until(() => over.closed() !== null, 'the refused connection closed')
    t.same(over.closed(), [1013, `A tenant holds at most ${SHARE} WebSocket connections at ${face.path} on this instance`], 'closed with 1013, naming the tenant\'s bound')
    t.equal(refusal(over.messages), 'OVERLOADED')

    // Counted as a token in the upgrade is: the hog's upgrade with one is refused too.
    t.equal((await upgrade(t, url, bearer({ tenant: 'hog' }), face.protocol)).status, 503)
    const other = await opened('other')
    t.equal(other.closed(), null, 'another tenant still connects')

    held[0].ws.close()
    await until(() => held[0].closed() !== null, 'closed')
    await places(app, face.label, 2)
    const again = await opened('hog')
    t.equal(again.closed(), null, 'the place came back: the hog connects again')
    const probe = await opened('hog')
    await until(() => probe.closed() !== null, 'the probe closed')
    t.equal(probe.closed()?.[0], 1013, 'and its share holds again')
    t.ok([held[1], other, again].every(c => c.closed() === null), 'the others stay open')
    t.match(await metrics(app), new RegExp(`mantle_websocket_connections_refused_total\\{face="${face.label}",bound="tenant"\\} 3\\n`))
  })
}

// An upgrade to /trpc?connectionParams=1 that carries a valid token (its header or
// ?access_token=) was verified and then counted nowhere: not against its tenant's share (its
// connectionParams might name another tenant), nor as a connection without a token (it had one).
// A tenant that held its share opened as many more as the instance allows that way (each kept 10 s
// waiting for connectionParams, then opened again), and every other tenant's upgrade was refused.
// Counted against the upgrade's tenant, as /graphql counts an upgrade whose connection_init may
// name another tenant (moved to that one once it is known).
t.test('tRPC: an upgrade awaiting connectionParams with a token counts against that token\'s tenant', async t => {
  const { url } = await setup(t, faces[1])
  const hog = bearer({ tenant: 'hog' })
  const held = await Promise.all(Array.from({ length: SHARE }, async () => await upgrade(t, `${url}?connectionParams=1`, hog)))
  t.same(held.map(u => u.status), [101, 101], 'the share opens')
  const over = await upgrade(t, `${url}?connectionParams=1`, hog)
  t.equal(over.status, 503, 'the hog\'s next upgrade is refused before it is accepted')
  t.equal(faces[1].code(over.body!), 'OVERLOADED')
  const query = await upgrade(t, `${url}?connectionParams=1&access_token=${hog.authorization.slice(7)}`)
  t.equal(query.status, 503, 'so is one with the token in ?access_token=')
  t.equal((await upgrade(t, url, bearer({ tenant: 'other' }))).status, 101, 'another tenant still connects')
})
