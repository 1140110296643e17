// What the WebSockets hold unread, all together and per tenant (UnreadBytes). Each socket was
// bound on its own (4 MiB), but not their sum: one tenant's token opening its 10,000 connections
// per face, each sent small calls whose answers it never read, made an instance hold 4 MiB for
// each (measured: 150 sockets, 271 KB sent, 358 MB held outside the V8 heap, which load shedding
// watches, so nothing stopped it; 42 GB at the tenant's share of connections). Now a frame that
// finds its tenant's sockets holding more than the tenant's share is not queued: its socket closes
// with 1013, as a slow reader's does, and what they hold stays within the share and one frame.
import t from 'tap'
import type { Socket } from 'node:net'
import type { WebSocket } from 'ws'
import { token, until } from '../../helper.js'
import { wsApp, connect, run, openGraphqlWs, type Client } from '../websocket-helper.js'

interface Teardown { teardown: (fn: () => unknown) => void }

const SHARE = 512 * 1024
const FRAME = 64 * 1024
const SLOW = 4

interface Face {
  name: string
  env: Record<string, boolean>
  path: string
  /** Opens a subscribed client of `tenant`; `closed` resolves with its close code. */
  open: (t: Teardown, url: string, tenant: string) => Promise<{ raw: WebSocket, closed: () => Promise<number>, received: () => number }>
  /** The bytes the gateway's sockets `servers`, sent the same events, hold for their clients. */
  held: (servers: WebSocket[]) => number
}

const FACES: Face[] = [
  {
    name: '/ws',
    env: {},
    path: '/ws',
    async open (t, url, tenant) {
      const client: Client = await connect(t, url, { tenant, roles: ['viewer'] })
      await client.request({ id: 's', subscribe: 'runUpdated' })
      let received = 0
      client.ws.on('message', () => { received++ })
      return { raw: client.ws, closed: async () => (await client.closed).code, received: () => received }
    },
    // One event's frame is the same bytes on every socket (SharedFrame): each holds the latest
    // frames it was sent, so together they hold those of the one holding most, and a frame it has
    // partly written (within the assertion's frame to spare).
    held: servers => Math.max(0, ...servers.map(s => s.bufferedAmount))
  },
  {
    name: '/graphql',
    env: { BFF_GRAPHQL_ENABLED: true, BFF_WEBSOCKET_ENABLED: false },
    path: '/graphql',
    async open (t, url, tenant) {
      const client = await openGraphqlWs(t, url, { headers: { authorization: `Bearer ${token({ tenant, roles: ['viewer'] })}` } })
      client.send({ id: 's', type: 'subscribe', payload: { query: 'subscription { runUpdated { id output } }' } })
      const closed = new Promise<number>(resolve => client.ws.once('close', code => resolve(code)))
      return { raw: client.ws, closed: async () => await closed, received: () => client.frames.filter(f => f.type === 'next').length }
    },
    // Each subscription's frame is its own (it carries the subscription's id).
    held: servers => servers.reduce((sum, s) => sum + s.bufferedAmount, 0)
  }
]

for (const face of FACES) {
  t.test(`${face.name}: one tenant's sockets hold at most its share unread; the others are served`, async t => {
    const { app, url: wsUrl } = await wsApp(t, { env: face.env, build: { unreadBytes: { max: 64 * 1024 * 1024, perTenant: SHARE } } })
    const url = wsUrl.replace(/\/ws$/, face.path)
    const servers: WebSocket[] = []
    app.websocketServer.on('connection', (socket: WebSocket) => { servers.push(socket) })
    const subscribed = async (n: number): Promise<void> => { await until(() => app.events.bus.subscriptions === n, `${n} subscriptions`) }

    const slow = []
    for (let i = 0; i < SLOW; i++) {
      slow.push(await face.open(t, url, 'hog'))
      await subscribed(i + 1)
    }
    const hogs = servers.slice()
    const reader = await face.open(t, url, 'other')
    await subscribed(SLOW + 1)
    for (const s of slow) (s.raw as unknown as { _socket: Socket })._socket.pause()

    // Far more than the sockets' kernel buffers take: the gateway's queues must fill.
    const output = 'x'.repeat(FRAME)
    let peak = 0
    for (let i = 0; i < 800 && app.events.bus.subscriptions > 1; i++) {
      await app.events.publish({ topic: 'runs.updated', tenantId: 'hog', payload: run(`r${i}`, { output }) })
      peak = Math.max(peak, face.held(hogs))
      await new Promise(resolve => setImmediate(resolve))
    }
    t.equal(app.events.bus.subscriptions, 1, 'every slow reader of the tenant was closed')
    t.ok(peak > SHARE / 2, `the tenant's sockets did hold what their clients left unread (${peak})`)
    t.ok(peak <= SHARE + 2 * (FRAME + 1024), `within the tenant's share and a frame: ${peak} bytes (share ${SHARE})`)

    for (const s of slow) (s.raw as unknown as { _socket: Socket })._socket.resume()
    for (const s of slow) t.equal(await s.closed(), 1013, 'closed as a slow reader')

    // The other tenant is served meanwhile and after; and the share comes back with the sockets.
    await app.events.publish({ topic: 'runs.updated', tenantId: 'other', payload: run('o1', { output }) })
    await until(() => reader.received() > 0, 'the other tenant\'s event')
    t.equal(reader.raw.readyState, reader.raw.OPEN, 'the other tenant\'s reader is untouched')
    const again = await face.open(t, url, 'hog')
    await subscribed(2)
    for (let i = 0; i < 20; i++) {
      await app.events.publish({ topic: 'runs.updated', tenantId: 'hog', payload: run(`n${i}`, { output }) })
      await new Promise(resolve => setImmediate(resolve))
    }
    await until(() => again.received() >= 20, 'a new socket of the tenant gets its events')
    t.equal(again.raw.readyState, again.raw.OPEN, 'the tenant\'s share is free again once its slow sockets closed')
  })
}

for (const face of FACES) {
  t.test(`${face.name}: one event's frames to many readers of a tenant, together past its share, close none of them`, async t => {
    const { app, url: wsUrl } = await wsApp(t, { env: face.env, build: { unreadBytes: { max: 64 * 1024 * 1024, perTenant: SHARE } } })
    const url = wsUrl.replace(/\/ws$/, face.path)
    // Each reads what it is sent; the frames of one event to all of them hold 2.6 MB, five times the share.
    const readers: Array<Awaited<ReturnType<Face['open']>>> = []
    for (let i = 0; i < 40; i++) {
      readers.push(await face.open(t, url, 'many'))
      await until(() => app.events.bus.subscriptions === i + 1, `${i + 1} subscriptions`)
    }
    for (let i = 0; i < 3; i++) {
      await app.events.publish({ topic: 'runs.updated', tenantId: 'many', payload: run(`r${i}`, { output: 'x'.repeat(FRAME) }) })
      await until(() => readers.every(r => r.received() > i || r.raw.readyState !== r.raw.OPEN), `event ${i} read`)
    }
    t.equal(readers.filter(r => r.raw.readyState !== r.raw.OPEN).length, 0, 'no reader was closed')
    t.equal(app.events.bus.subscriptions, 40, 'every reader is still subscribed')
  })
}
