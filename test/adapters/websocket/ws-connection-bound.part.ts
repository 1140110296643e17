// The per-instance bound on WebSocket connections of every face that upgrades (/ws, /trpc,
// /graphql): it holds against upgrades that arrive together, and every upgrade that never
// completes gives its place back.
import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { createTrpcFace } from '../../../adapters/trpc/index.js'
import { createGraphqlFace } from '../../../adapters/graphql/index.js'
import { bearer } from '../../helper.js'
import { wsApp, upgrade, rawUpgrade, drained, slowUpgrades, type Frame, type Upgrade, type WsSetup } from '../websocket-helper.js'

interface Teardown { teardown: (fn: () => unknown) => void }

const faces = [
  {
    name: '/ws',
    setup: async (t: Teardown, maxConnections: number): Promise<WsSetup> => await wsApp(t, { settings: { maxConnections }, prepare: slowUpgrades }),
    protocol: undefined,
    code: (body: Frame): unknown => body.code
  },
  {
    name: 'tRPC',
    setup: async (t: Teardown, maxConnections: number): Promise<WsSetup> => await wsApp(t, { face: { plugin: createTrpcFace({ maxConnections }), path: '/trpc' }, prepare: slowUpgrades }),
    protocol: undefined,
    code: (body: Frame): unknown => body.error.data.code
  },
  {
    name: 'GraphQL',
    setup: async (t: Teardown, maxConnections: number): Promise<WsSetup> => await wsApp(t, { face: { plugin: createGraphqlFace({ maxConnections }), path: '/graphql' }, prepare: slowUpgrades }),
    protocol: 'graphql-transport-ws',
    code: (body: Frame): unknown => body.errors[0].extensions.code
  }
]

/** The /ws face's gauge of open connections. */
const gauge = async (app: FastifyInstance): Promise<string | undefined> => /\nmantle_websocket_connections (\d+)\n/.exec((await app.inject({ method: 'GET', url: '/metrics' })).body)?.[1]

const BAD_SECRET = 'another-secret-that-is-long-enough-for-hs256-0123'

for (const face of faces) {
  t.test(`${face.name}: concurrent upgrades cannot pass the connection bound; closed connections give their places back`, async t => {
    const { app, url } = await face.setup(t, 2)
    const burst = async (): Promise<Upgrade[]> => await Promise.all(Array.from({ length: 20 }, async () => await upgrade(t, url, bearer(), face.protocol)))
    const first = await burst()
    const open = first.filter(u => u.status === 101)
    t.equal(open.length, 2, 'exactly the bound went through')
    const refused = first.filter(u => u.status !== 101)
    t.equal(refused.length, 18)
    for (const r of refused) {
      t.equal(r.status, 503)
      t.equal(face.code(r.body!), 'OVERLOADED')
      t.equal(r.retryAfter, '5', 'with Retry-After (GraphQL\'s error handler, mercurius\', had dropped it)')
    }
    if (face.name === '/ws') {
      t.match(refused[0].type, /^application\/problem\+json/)
      t.equal(await gauge(app), '2', 'the gauge counts the open connections')
    }

    for (const u of open) u.ws!.close()
    await drained(app)
    if (face.name === '/ws') t.equal(await gauge(app), '0')
    const second = await burst()
    t.equal(second.filter(u => u.status === 101).length, 2, 'the places came back: nothing leaked')
    t.equal(second.filter(u => u.status === 503).length, 18)
  })

  t.test(`${face.name}: upgrades that never complete give their places back`, async t => {
    // Each of these takes a place while under way: the bound leaves room for all of them.
    const bound = 30
    const { app, url } = await face.setup(t, bound)
    const key = 'dGhlIHNhbXBsZSBub25jZQ=='
    // The subprotocol the face speaks, if any (/graphql refuses an upgrade without one first).
    const protocol: Record<string, string> = face.protocol === undefined ? {} : { 'sec-websocket-protocol': face.protocol }
    const attempts = Array.from({ length: bound / 3 }, async () => await Promise.all([
      // A token that does not verify: every face refuses the upgrade (401).
      upgrade(t, url, bearer({ secret: BAD_SECRET }), face.protocol),
      // Refused by `ws`: a handshake it does not accept.
      rawUpgrade(url, { ...bearer(), ...protocol, 'sec-websocket-key': 'bad', 'sec-websocket-version': '99' }),
      // Gone mid-handshake.
      rawUpgrade(url, { ...bearer(), ...protocol, 'sec-websocket-key': key, 'sec-websocket-version': '13' }, true)
    ]))
    for (const [unauthorized, rejected, abandoned] of await Promise.all(attempts)) {
      t.equal(unauthorized.status, 401)
      t.match(rejected, /^HTTP\/1\.1 400 /)
      t.equal(abandoned, '')
    }
    await drained(app)
    const after = await Promise.all(Array.from({ length: bound }, async () => await upgrade(t, url, bearer(), face.protocol)))
    t.ok(after.every(u => u.status === 101), 'connections up to the bound still open')
    const over = await upgrade(t, url, bearer(), face.protocol)
    t.equal(over.status, 503, 'and the bound still holds')
  })
}
