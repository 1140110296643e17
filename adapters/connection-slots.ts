import type { Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { Gauge, type Registry } from 'prom-client'
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

  /** Places taken now. */
  get size (): number {
    return this.taken
  }

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

// The faces whose places each registry reports: one gauge per registry, a series per face.
const reported = new WeakMap<Registry, Map<string, ConnectionSlots>>()

/**
 * Reports `slots` as `mantle_websocket_slots{face}` when metrics are on: the WebSocket
 * connections of each face, open or being upgraded (`mantle_websocket_connections` counts those
 * of /ws alone; GraphQL's and tRPC's were in no metric).
 */
export function reportSlots (app: FastifyInstance, face: string, slots: ConnectionSlots): void {
  if (!app.hasDecorator('metrics')) return
  const registry = app.metrics.registry
  let faces = reported.get(registry)
  if (faces === undefined) {
    const all = new Map<string, ConnectionSlots>()
    reported.set(registry, all)
    faces = all
    // eslint-disable-next-line no-new
    new Gauge({ name: 'mantle_websocket_slots', help: 'WebSocket connections of each face, open or being upgraded (bound: its maxConnections)', labelNames: ['face'], registers: [registry], collect () { for (const [name, taken] of all) this.set({ face: name }, taken.size) } })
  }
  faces.set(face, slots)
}
