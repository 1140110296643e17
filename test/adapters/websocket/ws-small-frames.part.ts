// Small frames a client leaves unread, counted with what queuing each holds (FRAME_OVERHEAD)
// besides its bytes. Counted by their bytes alone, a socket's 4 MiB took some 250,000 frames of
// 15 bytes, 1.2 KB of heap each: a client without a token that sent /graphql pings
// (`{"type":"ping"}`) and read no pong made the gateway hold 300 MB on one socket.
import t from 'tap'
import { EventEmitter } from 'node:events'
import type { WebSocket } from 'ws'
import { CLOSE_SLOW_READER, MAX_BUFFERED_BYTES, slowReader, utf8Sends } from '../../../adapters/slow-reader.js'
import { UnreadBytes } from '../../../adapters/unread.js'

const PONG = '{"type":"pong"}'
/** What each frame is counted for besides its bytes, at the least (adapters/slow-reader.ts, FRAME_OVERHEAD). */
const OVERHEAD = 1024

/** A socket whose client reads nothing: every frame sent stays queued, as ws counts it. */
class StalledSocket extends EventEmitter {
  readonly OPEN = 1
  readyState = 1
  bufferedAmount = 0
  queued = 0
  closedWith: number | null = null
  private readonly callbacks: Array<() => void> = []

  send (data: Buffer, _options?: unknown, cb?: (err?: Error) => void): void {
    this.bufferedAmount += data.length
    this.queued++
    this.callbacks.push(() => {
      this.bufferedAmount -= data.length
      this.queued--
      cb?.()
    })
  }

  close (code: number): void {
    this.closedWith = code
    this.readyState = 2
  }

  /** The client reads everything: each send completes. */
  drain (): void {
    for (const cb of this.callbacks.splice(0)) cb()
  }
}

t.test('a client that reads nothing is closed once its small frames hold its bound with their overhead', async t => {
  const socket = new StalledSocket()
  const ws = socket as unknown as WebSocket
  const unread = new UnreadBytes(2 ** 40, undefined)
  utf8Sends(ws, MAX_BUFFERED_BYTES, { unread, tenant: () => undefined })
  let sent = 0
  while (socket.readyState === socket.OPEN && sent < 100_000) {
    ws.send(PONG)
    sent++
  }
  t.equal(socket.closedWith, CLOSE_SLOW_READER, 'closed with 1013')
  const most = Math.ceil(MAX_BUFFERED_BYTES / (PONG.length + OVERHEAD)) + 1
  t.ok(socket.queued <= most, `at most ${most} frames queued (${socket.queued}), not the 280,000 their bytes alone fit in 4 MiB`)
  t.ok(unread.size >= socket.queued * (PONG.length + OVERHEAD), 'the instance counts each frame with its overhead')
  t.ok(slowReader(ws), 'slowReader says so too')

  socket.drain()
  t.notOk(slowReader(ws), 'nothing held once every frame is sent')
  t.equal(unread.size, 0)
})

t.test('a client that reads is never closed, however many small frames it gets', async t => {
  const socket = new StalledSocket()
  const ws = socket as unknown as WebSocket
  const unread = new UnreadBytes(2 ** 40, undefined)
  utf8Sends(ws, MAX_BUFFERED_BYTES, { unread, tenant: () => undefined })
  for (let i = 0; i < 100_000; i++) {
    ws.send(PONG)
    if (i % 1000 === 999) socket.drain()
  }
  t.equal(socket.closedWith, null)
  socket.drain()
  t.equal(unread.size, 0)
})
