import t from 'tap'
import { mock } from 'node:test'
import { EventEmitter } from 'node:events'
import { WebSocket } from 'ws'
import { Heartbeat } from '../../adapters/heartbeat.js'

/** A socket as Heartbeat sees it: its pings, whether it was cut, and its net.Socket's counts. */
class FakeSocket extends EventEmitter {
  readyState: number = WebSocket.OPEN
  pings = 0
  terminated = false
  readonly _socket = { bytesWritten: 0, writableLength: 0 }
  ping (): void { this.pings++ }
  terminate (): void { this.terminated = true }
  /** The socket was sent `bytes`, which wait in Node until the operating system takes them. */
  queue (bytes: number): void {
    this._socket.bytesWritten += bytes
    this._socket.writableLength += bytes
  }

  /** The operating system took `bytes` of what waited (the peer read that much, freeing room). */
  take (bytes: number): void { this._socket.writableLength -= bytes }
}

t.test('heartbeat: a peer still taking what was queued before its ping is not cut for the pong it cannot have read yet; one that takes nothing is', async t => {
  // The ping goes out behind every frame queued before it. A peer reading them slower than
  // (bytes queued) / interval could not answer in time and was cut with 1006 though it read on.
  mock.timers.enable({ apis: ['setInterval'] })
  t.teardown(() => mock.timers.reset())
  const beat = new Heartbeat(100)
  t.teardown(() => beat.stop())
  const reading = new FakeSocket()
  const stalled = new FakeSocket()
  const silent = new FakeSocket()
  for (const s of [reading, stalled, silent]) beat.watch(s as unknown as WebSocket)
  reading.queue(4_000_000)
  stalled.queue(4_000_000)
  mock.timers.tick(100)
  t.same([reading.pings, stalled.pings, silent.pings], [1, 1, 1], 'each pinged')
  for (let i = 0; i < 5; i++) {
    reading.take(100_000)
    mock.timers.tick(100)
  }
  t.notOk(reading.terminated, 'a peer taking its frames stays, five intervals on')
  t.equal(reading.pings, 1, 'its ping still on its way: none more')
  t.ok(stalled.terminated, 'a peer taking nothing is cut')
  t.ok(silent.terminated, 'as is one with nothing queued that sends no pong')
  mock.timers.tick(100)
  t.ok(reading.terminated, 'the reading peer, once it takes nothing more and sends no pong, is cut too')
})

t.test('heartbeat: a pong keeps a peer; a missed one with nothing taken cuts it at the next tick', async t => {
  mock.timers.enable({ apis: ['setInterval'] })
  t.teardown(() => mock.timers.reset())
  const beat = new Heartbeat(100)
  t.teardown(() => beat.stop())
  const peer = new FakeSocket()
  let dead = 0
  beat.watch(peer as unknown as WebSocket, () => { dead++ })
  mock.timers.tick(100)
  peer.emit('pong')
  mock.timers.tick(100)
  t.same([peer.pings, peer.terminated], [2, false], 'answered: pinged again')
  mock.timers.tick(100)
  t.same([peer.pings, peer.terminated, dead], [2, true, 1], 'missed: cut, its dead hook run once')
})
