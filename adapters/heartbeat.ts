import { WebSocket } from 'ws'
import type { Socket } from 'node:net'

/**
 * WebSocket pings for a face's sockets, one timer for them all: each tick, a socket that has not
 * answered the previous ping (a pong) is terminated, and every other is pinged. A client that
 * vanished without closing (its network gone) would otherwise hold its socket, its connection
 * slot and its subscriptions until its token expired, or for ever without one. /ws and /graphql
 * use it (tRPC's adapter pings its own).
 */
export class Heartbeat {
  /**
   * The sockets watched, each with whether it answered since the last ping, the bytes the
   * operating system had taken of it at the last tick (taken), the bytes sent on it up to and
   * including the last ping (pinged), and what to do before it is cut.
   */
  private readonly watched = new Map<WebSocket, { alive: boolean, taken: number, pinged: number, dead: (() => void) | undefined }>()
  private readonly timer: NodeJS.Timeout

  constructor (intervalMs: number) {
    this.timer = setInterval(() => { this.tick() }, intervalMs)
    this.timer.unref()
  }

  /** Pings `socket` until it closes; `dead` runs just before it is terminated for a missed pong. */
  watch (socket: WebSocket, dead?: () => void): void {
    const beat = { alive: true, taken: 0, pinged: 0, dead }
    this.watched.set(socket, beat)
    socket.on('pong', () => { beat.alive = true })
    socket.once('close', () => { this.watched.delete(socket) })
  }

  stop (): void {
    clearInterval(this.timer)
  }

  private tick (): void {
    for (const [socket, beat] of this.watched) {
      // A closing socket has ws's own close timer.
      if (socket.readyState !== WebSocket.OPEN) continue
      if (!beat.alive) {
        // The ping waits behind every frame queued before it: a peer still taking them (the
        // operating system took more of them since the ping) is reading, only not yet as far as
        // the ping. It was cut, on a link slower than what was queued over one interval, though
        // it read on. One that takes nothing is cut, as one that sends no pong. Only the frames
        // before the ping excuse it: once the ping was in the OS's hands at the last tick, what the
        // OS took after it (events sent since) says nothing of the peer. Counted as progress, a peer
        // gone (or reading nothing) whose socket's buffers took a small event per interval was kept
        // for as long as they had room, hours at one event per 30 s.
        const now = taken(socket)
        if (now > beat.taken && beat.taken < beat.pinged) {
          beat.taken = now
          continue
        }
        this.watched.delete(socket)
        beat.dead?.()
        socket.terminate()
        continue
      }
      beat.alive = false
      beat.taken = taken(socket)
      socket.ping()
      beat.pinged = sent(socket)
    }
  }
}

/** `socket`'s net.Socket: ws keeps it as `_socket`, and offers no other way to it once open. */
function rawOf (socket: WebSocket): Socket | undefined {
  return (socket as unknown as { _socket?: Socket })._socket
}

/**
 * The bytes the operating system has taken of `socket` so far: net.Socket's bytesWritten counts
 * what is still queued in Node too (writableLength).
 */
function taken (socket: WebSocket): number {
  const raw = rawOf(socket)
  return raw === undefined ? 0 : raw.bytesWritten - raw.writableLength
}

/** The bytes written to `socket` so far, those still queued in Node included (a ping just sent, say). */
function sent (socket: WebSocket): number {
  return rawOf(socket)?.bytesWritten ?? 0
}
