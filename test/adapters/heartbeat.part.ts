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

/** A heartbeat of 100 ms on mocked timers (mock.timers.tick runs its ticks), stopped and reset at teardown. */
function mockedHeartbeat (t: { teardown: (fn: () => unknown) => void }): Heartbeat {
  mock.timers.enable({ apis: ['setInterval'] })
  t.teardown(() => mock.timers.reset())
  const beat = new Heartbeat(100)
  t.teardown(() => beat.stop())
  return beat
}

t.test('heartbeat: a peer still taking what was queued before its ping is not cut for the pong it cannot have read yet; one that takes nothing is', async t => {
  // The ping goes out behind every frame queued before it. A peer reading them slower than
  // (bytes queued) / interval could not answer in time and was cut with 1006 though it read on.
  const beat = mockedHeartbeat(t)
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
  const beat = mockedHeartbeat(t)
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

t.test('heartbeat: a peer that sends no pong is cut once its ping is in the operating system\'s hands, however much more the OS takes after it', async t => {
  // What the operating system takes after the ping says nothing of the peer: a peer gone (its
  // network with it) or one that reads nothing still has its socket's buffers taking a trickle of
  // small events, interval after interval. Only the frames queued before the ping excuse a late pong.
  const beat = mockedHeartbeat(t)
  const gone = new FakeSocket()
  const behind = new FakeSocket()
  beat.watch(gone as unknown as WebSocket)
  beat.watch(behind as unknown as WebSocket)
  behind.queue(300_000)
  mock.timers.tick(100)
  t.same([gone.pings, behind.pings], [1, 1], 'each pinged')
  // The behind peer takes what was queued before its ping, then (the ping in the OS's hands)
  // only what was sent after it; the gone one, with nothing queued, only what was sent after.
  behind.take(300_000)
  for (const s of [gone, behind]) { s.queue(200); s.take(200) }
  mock.timers.tick(100)
  t.notOk(behind.terminated, 'the behind peer, which took the frames before its ping during the interval, stays')
  t.ok(gone.terminated, 'the gone peer, its ping handed to the OS at once, is cut at the next tick (an event taken by the OS after it is no pong)')
  for (let i = 0; i < 5 && !behind.terminated; i++) {
    behind.queue(200)
    behind.take(200)
    mock.timers.tick(100)
  }
  t.ok(behind.terminated, 'the behind peer is cut an interval after its ping reached the OS, events still taken after it')
})
