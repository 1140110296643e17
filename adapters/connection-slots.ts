import type { Socket } from 'node:net'
import type { FastifyRequest } from 'fastify'
import { MantleError } from '../errors.js'

/**
 * A face's bound on the WebSocket connections of this instance (every face that upgrades has
 * one). The place is taken where the bound is checked, in the upgrade's onRequest hook, so the
 * check and the count are one step: upgrades that arrive together cannot all pass the check
 * before any of them is counted, whatever runs (and awaits) between the hook and the upgrade.
 *
 * A place belongs to the upgrade request's TCP socket and comes back when that socket closes,
 * which happens exactly once whatever follows: a refusal by a later step (@fastify/websocket
 * destroys a refused upgrade's socket once the answer is sent), a handshake `ws` rejects (it
 * destroys the socket), a client gone mid-handshake, or, once upgraded, the end of the
 * connection the same socket carries.
 */
export class ConnectionSlots {
  /** Places taken: connections open and upgrades under way. */
  private taken = 0
  private readonly holders = new WeakSet<Socket>()

  constructor (readonly max: number) {}

  /**
   * Takes a place for the upgrade `request`, or throws 503 OVERLOADED when every place is
   * taken. A plain HTTP request takes none.
   */
  reserve (request: FastifyRequest): void {
    if (request.ws !== true) return
    // (@fastify/websocket's injectWS makes a request without a socket.)
    const socket = request.raw.socket as Socket | undefined
    if (socket === undefined || this.holders.has(socket)) return
    if (this.taken >= this.max) {
      throw new MantleError('OVERLOADED', 'Too many WebSocket connections on this instance', { headers: { 'retry-after': '5' } })
    }
    // A socket already destroyed never upgrades (`ws` checks), and its close may have gone by.
    if (socket.destroyed) return
    this.taken++
    this.holders.add(socket)
    socket.once('close', () => { this.taken-- })
  }
}
