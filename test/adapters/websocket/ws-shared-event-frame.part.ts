// One event's frame to many subscribers of a tenant on /ws: the same bytes for each of them, encoded
// once and held once, and counted once in the tenant's share of what clients leave unread. Encoded
// apart, each subscriber's socket held a copy of a large event until it was written out, each copy
// counted against the tenant: 10 subscribers a moment behind made a 2 MB event count 20 MB.
import t from 'tap'
import { EventEmitter } from 'node:events'
import type { Socket } from 'node:net'
import type { WebSocket } from 'ws'
import { until } from '../../helper.js'
import { SharedFrame, UnreadBytes } from '../../../adapters/unread.js'
import { wsApp, connect, run, type Client } from '../websocket-helper.js'

/** What each frame queued is counted for besides its bytes (adapters/slow-reader.ts, FRAME_OVERHEAD). */
const OVERHEAD = 1024

/** A socket whose client reads nothing until drained: every frame sent stays queued. */
class StalledSocket extends EventEmitter {
  readonly OPEN = 1
  readyState = 1
  bufferedAmount = 0
  readonly sent: Buffer[] = []
  private readonly callbacks: Array<() => void> = []

  send (data: Buffer, _options?: unknown, cb?: (err?: Error) => void): void {
    this.sent.push(data)
    this.bufferedAmount += data.length
    this.callbacks.push(() => {
      this.bufferedAmount -= data.length
      cb?.()
    })
  }

  drain (): void {
    for (const cb of this.callbacks.splice(0)) cb()
  }
}

t.test('a shared frame counts its bytes once against its tenant, while any socket holds it', async t => {
  const unread = new UnreadBytes(2 ** 40, 2 ** 40)
  const sockets = Array.from({ length: 10 }, () => new StalledSocket())
  const frame = new SharedFrame(Buffer.alloc(100_000, 'x'))
  for (const s of sockets) t.ok(unread.send(s as unknown as WebSocket, frame, 't1'), 'sent')
  t.equal(unread.heldBy('t1'), 100_000 + 10 * OVERHEAD, 'its bytes once, and each socket\'s queuing')
  t.equal(unread.size, 100_000 + 10 * OVERHEAD, 'the instance counts it once too')
  t.ok(sockets.every(s => s.sent[0] === frame.bytes), 'each socket is handed the same bytes, no copy')
  for (const s of sockets.slice(0, 9)) s.drain()
  t.equal(unread.heldBy('t1'), 100_000 + OVERHEAD, 'held while one socket still holds it')
  sockets[9].readyState = 3
  sockets[9].emit('close')
  t.equal(unread.heldBy('t1'), 0, 'given back when the last one holding it closes')
  t.equal(unread.size, 0)
  sockets[9].drain()
  t.equal(unread.size, 0, 'a callback after the close gives nothing back twice')
})

t.test('one socket sent a shared frame twice holds it until both sends are written', async t => {
  const unread = new UnreadBytes(2 ** 40, 2 ** 40)
  const a = new StalledSocket()
  const b = new StalledSocket()
  const frame = new SharedFrame(Buffer.alloc(5000, 'x'))
  unread.send(a as unknown as WebSocket, frame, 't1')
  unread.send(a as unknown as WebSocket, frame, 't1')
  unread.send(b as unknown as WebSocket, frame, 't1')
  t.equal(unread.heldBy('t1'), 5000 + 3 * OVERHEAD)
  b.drain()
  t.equal(unread.heldBy('t1'), 5000 + 2 * OVERHEAD)
  a.emit('close')
  t.equal(unread.heldBy('t1'), 0, 'both of the closed socket\'s sends let go')
})

t.test('/ws: a large event to subscribers who read late is held once, counted once, and each receives it whole', async t => {
  const unread = new UnreadBytes(2 ** 40, 2 ** 40)
  const { app, url } = await wsApp(t, { settings: {}, unread })
  const servers: WebSocket[] = []
  app.websocketServer.on('connection', (socket: WebSocket) => { servers.push(socket) })
  const clients: Client[] = []
  for (let i = 0; i < 10; i++) {
    const client = await connect(t, url, { tenant: 'big', roles: ['viewer'] })
    await client.request({ id: 's', subscribe: 'runUpdated' })
    clients.push(client)
  }
  const raws = clients.map(c => (c.ws as unknown as { _socket: Socket })._socket)
  for (const raw of raws) raw.pause()
  const event = (id: string): Record<string, unknown> => run(id, { output: 'x'.repeat(1024 * 1024) })
  // Until the sockets' kernel buffers are full: each socket then holds what it is sent next.
  let sent = 0
  while (servers.some(s => s.bufferedAmount === 0) && sent < 20) {
    app.events.bus.dispatch({ topic: 'runs.updated', tenantId: 'big', payload: event(`r${sent++}`) })
    await new Promise(resolve => setImmediate(resolve))
  }
  t.ok(servers.every(s => s.bufferedAmount > 0), `every socket holds what its client has not read (after ${sent} events)`)
  const before = unread.heldBy('big')
  const payload = event('last')
  app.events.bus.dispatch({ topic: 'runs.updated', tenantId: 'big', payload })
  sent++
  const { internalCost, ...data } = payload
  const frameBytes = Buffer.byteLength(JSON.stringify({ event: 'runUpdated', data }))
  const added = unread.heldBy('big') - before
  t.ok(added >= frameBytes, `the event is counted while held (${added})`)
  t.ok(added <= frameBytes + 10 * OVERHEAD, `counted once, not once per socket holding it: ${added} bytes for a frame of ${frameBytes}`)

  for (const raw of raws) raw.resume()
  for (const client of clients) {
    let last
    for (let i = 0; i < sent; i++) last = await client.next(10_000)
    t.same(last, { event: 'runUpdated', data }, 'each subscriber receives the event whole')
  }
  await until(() => unread.size === 0, 'everything given back once read')
})

t.test('/ws: every subscriber receives the event frame\'s bytes as they were encoded apart', async t => {
  const { app, url } = await wsApp(t)
  const raw: string[][] = [[], []]
  for (const received of raw) {
    const client = await connect(t, url, { tenant: 'bytes', roles: ['viewer'] })
    await client.request({ id: 's', subscribe: 'runUpdated' })
    client.ws.on('message', (data: Buffer) => { received.push(data.toString('utf8')) })
  }
  let json = ''
  const off = app.events.bus.subscribe('runUpdated', 'bytes', (_payload, text) => { json = text })
  t.teardown(off)
  app.events.bus.dispatch({ topic: 'runs.updated', tenantId: 'bytes', payload: run('r1', { output: 'é😀\u2028"\\' }) })
  await until(() => raw.every(r => r.length === 1), 'both frames')
  t.equal(raw[0][0], '{"event":"runUpdated","data":' + json + '}', 'the prefix, the payload\'s JSON, the closing brace')
  t.equal(raw[1][0], raw[0][0], 'the same bytes for each subscriber')
})
