// The connections the gateway accepts at once are bounded by the process's open-files limit,
// less what its own connections need. Without a bound, clients that held connections open (a
// request each, then idle for the keep-alive's 72 s, no token needed) took every descriptor:
// the Kernel pool could no longer connect (EMFILE), and every call failed, on connections
// already open too.
import t from 'tap'
import { connect, type Socket } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { buildTestApp, until } from './helper.js'
import { RESERVED_FDS, connectionBound, openFilesLimit } from '../connection-bound.js'

const LIMITS = `Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            20000                40000                files
Max locked memory         8388608              8388608              bytes
`

t.test('the bound is the open-files limit less the Kernel pool and a reserve, half of it at the least', async t => {
  t.equal(openFilesLimit(() => LIMITS), 20000, 'the soft limit')
  t.equal(openFilesLimit(() => LIMITS.replace('20000', 'unlimited')), null, 'unlimited: no bound')
  t.equal(openFilesLimit(() => { throw new Error('ENOENT') }), null, 'not Linux: no bound')
  t.equal(connectionBound(20000, 128), 20000 - 128 - RESERVED_FDS)
  t.equal(connectionBound(1024, 128), 640, 'the default limit of many systems')
  t.equal(connectionBound(1024, 4096), 512, 'half at the least')
  t.equal(connectionBound(null, 128), null)
  t.equal(typeof openFilesLimit(), process.platform === 'linux' ? 'number' : 'object', 'this process\'s own, on Linux')
})

/** A raw connection that sent one request and read its answer; `closed` says whether the gateway closed it. */
async function hold (t: { teardown: (fn: () => void) => void }, port: number): Promise<{ socket: Socket, answer: string, closed: () => boolean }> {
  const socket = connect(port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  let closed = false
  let answer = ''
  socket.on('error', () => {})
  socket.on('close', () => { closed = true })
  socket.on('data', (chunk: Buffer) => { answer += chunk.toString() })
  await new Promise<void>(resolve => socket.once('connect', () => resolve()))
  socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  await until(() => answer.includes('\r\n\r\n') || closed, 'an answer or a close')
  return { socket, answer, closed: () => closed }
}

async function listening (t: { teardown: (fn: () => unknown) => void }, maxConnections: number): Promise<{ app: FastifyInstance, port: number }> {
  const app = await buildTestApp(t, {}, { maxConnections })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, port: (app.server.address() as { port: number }).port }
}

t.test('a connection beyond the bound is closed at once, and counted; the ones held are served', async t => {
  const { app, port } = await listening(t, 3)
  const held = [await hold(t, port), await hold(t, port), await hold(t, port)]
  t.ok(held.every(h => h.answer.startsWith('HTTP/1.1 200')), 'the bound\'s connections are served')

  const over = await hold(t, port)
  t.equal(over.answer, '', 'the next one gets no answer')
  t.ok(over.closed(), 'and is closed')
  t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_connections_dropped_total 1\n/)

  // A connection held is still served.
  let again = ''
  held[0].socket.on('data', (chunk: Buffer) => { again += chunk.toString() })
  held[0].socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  await until(() => again.startsWith('HTTP/1.1 200'), 'an answer on a connection held')

  // One closed gives its place back.
  held[1].socket.destroy()
  let open = 3
  const count = (): void => { app.server.getConnections((err, n) => { if (err === null || err === undefined) open = n }) }
  await until(() => { count(); return open < 3 }, 'the close seen by the gateway')
  const next = await hold(t, port)
  t.ok(next.answer.startsWith('HTTP/1.1 200'), 'a new connection is served once one closed')
})
