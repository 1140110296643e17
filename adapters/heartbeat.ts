import { WebSocket } from 'ws'

/**
 * WebSocket pings for a face's sockets, one timer for them all: each tick, a socket that has not
 * answered the previous ping (a pong) is terminated, and every other is pinged. A client that
 * vanished without closing (its network gone) would otherwise hold its socket, its connection
 * slot and its subscriptions until its token expired, or for ever without one. /ws and /graphql
 * use it (tRPC's adapter pings its own).
 */
export class Heartbeat {
  /** The sockets watched, each with whether it answered since the last ping and what to do before it is cut. */
  private readonly watched = new Map<WebSocket, { alive: boolean, dead: (() => void) | undefined }>()
  private readonly timer: NodeJS.Timeout

  constructor (intervalMs: number) {
    this.timer = setInterval(() => { this.tick() }, intervalMs)
    this.timer.unref()
  }

  /** Pings `socket` until it closes; `dead` runs just before it is terminated for a missed pong. */
  watch (socket: WebSocket, dead?: () => void): void {
    const beat = { alive: true, dead }
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
        this.watched.delete(socket)
        beat.dead?.()
        socket.terminate()
        continue
      }
      beat.alive = false
      socket.ping()
    }
  }
}
