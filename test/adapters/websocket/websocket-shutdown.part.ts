// Shutdown and the WebSocket faces: every socket is closed with 1001, and a client that never
// completes the close is cut after the grace, on /ws, /trpc and /graphql alike.
import t from 'tap'
import { connect as tcp, type Socket } from 'node:net'
import WebSocket from 'ws'
import { buildDemoApp, token } from '../../helper.js'
import { WEBSOCKET_CLOSE_GRACE_MS } from '../../../app.js'

/** An upgraded socket whose client reads everything and never answers a close frame. */
async function deaf (t: { teardown: (fn: () => unknown) => void }, port: number, path: string, protocol?: string): Promise<Socket> {
  const socket = tcp(port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  await new Promise(resolve => socket.once('connect', resolve))
  socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n${protocol === undefined ? '' : `Sec-WebSocket-Protocol: ${protocol}\r\n`}\r\n`)
  const head = await new Promise<string>(resolve => socket.once('data', (c: Buffer) => { resolve(c.toString()) }))
  if (!head.startsWith('HTTP/1.1 101')) throw new Error(`not upgraded: ${head.slice(0, 40)}`)
  socket.on('data', () => {})
  return socket
}

/** A client that answers the server's close with a frame of invalid UTF-8 (ws then emits 'error'). */
async function rude (t: { teardown: (fn: () => unknown) => void }, url: string, protocol?: string): Promise<WebSocket> {
  const ws = new WebSocket(url, protocol)
  t.teardown(() => ws.terminate())
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  ws.on('error', () => {})
  const raw = (ws as unknown as { _socket: Socket })._socket
  const mask = Buffer.from([1, 2, 3, 4])
  const bad = Buffer.from([0xff, 0xfe])
  raw.prependListener('data', () => { raw.write(Buffer.concat([Buffer.from([0x81, 0x80 | bad.length]), mask, Buffer.from(bad.map((b, i) => b ^ mask[i % 4]))])) })
  return ws
}

const FACES: Array<[string, string, string | undefined]> = [['/ws', `/ws?access_token=${token()}`, undefined], ['/trpc', `/trpc?access_token=${token()}`, undefined], ['/graphql', `/graphql?access_token=${token()}`, 'graphql-transport-ws']]

for (const [name, path, protocol] of FACES) {
  t.test(`${name}: at shutdown a well-behaved client gets 1001, one that never answers is cut after the grace, a rude one changes nothing`, async t => {
    const app = await buildDemoApp(t)
    await app.listen({ port: 0, host: '127.0.0.1' })
    const { port } = app.server.address() as { port: number }
    const client = new WebSocket(`ws://127.0.0.1:${port}${path}`, protocol)
    t.teardown(() => client.terminate())
    await new Promise((resolve, reject) => { client.once('open', resolve); client.once('error', reject) })
    const closed = new Promise<number>(resolve => client.once('close', (code: number) => { resolve(code) }))
    const silent = await deaf(t, port, path, protocol)
    await rude(t, `ws://127.0.0.1:${port}${path}`, protocol)
    const started = Date.now()
    // Before, on /trpc and /graphql: 30 s (ws's close timeout) for the silent client; on /ws,
    // app.close() rejected at once with the rude client's invalid frame (the process exited 1
    // without cutting the silent one).
    await app.close()
    const took = Date.now() - started
    t.ok(took < WEBSOCKET_CLOSE_GRACE_MS + 3000, `the close took ${took} ms`)
    t.equal(await closed, 1001, 'going away: clients reconnect elsewhere')
    t.ok(silent.destroyed || await new Promise(resolve => { silent.once('close', () => resolve(true)); setTimeout(() => resolve(false), 1000) }), 'the silent client was cut')
  })
}
