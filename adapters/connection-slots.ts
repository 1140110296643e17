import type { Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { Counter, Gauge, type Registry } from 'prom-client'
import { MantleError } from '../errors.js'

/** The faces that upgrade, as metrics name them (the face's path without its slash). */
export type SlotsFace = 'ws' | 'graphql' | 'trpc'

/**
 * 1013 (try again later): the close of a connection refused beyond its tenant's share once
 * upgraded (its tenant known only then: GraphQL's connection_init, tRPC's connectionParams).
 */
export const CLOSE_TRY_AGAIN_LATER = 1013

/** The bound that refused a connection: the instance's, or its tenant's share of it. */
export type SlotsBound = 'instance' | 'tenant'

/**
 * A face's bound on the WebSocket connections of this instance (every face that upgrades has
 * one), and the share of them one tenant may hold (BFF_WS_MAX_CONNECTIONS_PER_TENANT). The place
 * is taken where the bound is checked, in the upgrade's onRequest hook, so the check and the
 * count are one step: upgrades that arrive together cannot all pass the check before any of them
 * is counted, whatever runs (and awaits) between the hook and the upgrade. The same holds for a
 * tenant's share, checked and counted in one step where the connection's tenant becomes known:
 * the upgrade's onRequest hook when it carries a token, else once the connection is identified
 * (GraphQL's connection_init, tRPC's connectionParams).
 *
 * A place belongs to the upgrade request's TCP socket and comes back when that socket closes,
 * which happens exactly once whatever follows: a refusal by a later step (@fastify/websocket
 * destroys a refused upgrade's socket once the answer is sent), a handshake `ws` rejects (it
 * destroys the socket), a client gone mid-handshake, or, once upgraded, the end of the
 * connection the same socket carries. So does its count against its tenant.
 */
export class ConnectionSlots {
  /** Places taken: connections open and upgrades under way. */
  private taken = 0
  private readonly holders = new WeakSet<Socket>()
  /**
   * Places each tenant holds; an entry goes when its count is back to 0, so there are never more
   * entries than sockets counted against a tenant.
   */
  private readonly tenants = new Map<string, number>()
  /** The tenant each socket counts against (at most one at a time). */
  private readonly owners = new WeakMap<Socket, string>()
  /** Counts a refusal by the bound that made it (reportSlots sets it when metrics are on). */
  refused: (bound: SlotsBound) => void = () => {}

  /**
   * @param perTenant the places one tenant may hold (undefined: no share, as with identity off,
   *   when every caller is the one tenant `public`)
   */
  constructor (readonly face: SlotsFace, readonly max: number, readonly perTenant: number | undefined = undefined) {}

  /** Places taken now. */
  get size (): number {
    return this.taken
  }

  /** The tenant the connection `socket` (its upgrade's TCP socket) counts against, if any yet. */
  ownerOf (socket: Socket): string | undefined {
    return this.owners.get(socket)
  }

  /** Places `tenant` holds now. */
  heldBy (tenant: string): number {
    return this.tenants.get(tenant) ?? 0
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
      this.refused('instance')
      throw new MantleError('OVERLOADED', 'Too many WebSocket connections on this instance', { headers: { 'retry-after': '5' } })
    }
    // A socket already destroyed never upgrades (`ws` checks), and its close may have gone by.
    if (socket.destroyed) return
    this.taken++
    this.holders.add(socket)
    socket.once('close', () => { this.taken-- })
  }

  /**
   * Counts the connection `socket` carries (an upgrade's TCP socket) against `tenant`, or throws
   * 503 OVERLOADED when `tenant` holds its share already. Once per socket: counted again for the
   * same tenant, nothing changes; for another one (GraphQL's connection_init may name a tenant
   * other than the upgrade's token), it moves to that tenant, if there is room.
   */
  claim (socket: Socket | undefined, tenant: string): void {
    if (this.perTenant === undefined || socket === undefined) return
    const owner = this.owners.get(socket)
    if (owner === tenant) return
    if (this.heldBy(tenant) >= this.perTenant) {
      this.refused('tenant')
      throw new MantleError('OVERLOADED', `A tenant holds at most ${this.perTenant} WebSocket connections at /${this.face} on this instance`, { headers: { 'retry-after': '5' } })
    }
    // Closed already, or about to be: its close may have gone by.
    if (socket.destroyed) return
    if (owner === undefined) {
      socket.once('close', () => {
        const last = this.owners.get(socket)
        this.owners.delete(socket)
        if (last !== undefined) this.release(last)
      })
    } else {
      this.release(owner)
    }
    this.owners.set(socket, tenant)
    this.tenants.set(tenant, this.heldBy(tenant) + 1)
  }

  private release (tenant: string): void {
    const left = this.heldBy(tenant) - 1
    if (left > 0) this.tenants.set(tenant, left)
    else this.tenants.delete(tenant)
  }
}

// The faces whose places each registry reports: one gauge and one counter per registry, a
// series per face.
const reported = new WeakMap<Registry, { faces: Map<SlotsFace, ConnectionSlots>, refused: Counter<'face' | 'bound'> }>()

/**
 * Reports `slots` as `mantle_websocket_slots{face}` when metrics are on: the WebSocket
 * connections of each face, open or being upgraded (`mantle_websocket_connections` counts those
 * of /ws alone; GraphQL's and tRPC's were in no metric); and its refusals as
 * `mantle_websocket_connections_refused_total{face,bound}`.
 */
export function reportSlots (app: FastifyInstance, slots: ConnectionSlots): void {
  if (!app.hasDecorator('metrics')) return
  const registry = app.metrics.registry
  let report = reported.get(registry)
  if (report === undefined) {
    const all = new Map<SlotsFace, ConnectionSlots>()
    // eslint-disable-next-line no-new
    new Gauge({ name: 'mantle_websocket_slots', help: 'WebSocket connections of each face, open or being upgraded (bound: its maxConnections)', labelNames: ['face'], registers: [registry], collect () { for (const [name, taken] of all) this.set({ face: name }, taken.size) } })
    const refused = new Counter({ name: 'mantle_websocket_connections_refused_total', help: 'WebSocket connections refused with OVERLOADED at a bound, by face: the instance\'s (bound="instance", the face\'s maxConnections) or a tenant\'s share of it (bound="tenant", BFF_WS_MAX_CONNECTIONS_PER_TENANT)', labelNames: ['face', 'bound'] as const, registers: [registry] })
    report = { faces: all, refused }
    reported.set(registry, report)
  }
  report.faces.set(slots.face, slots)
  const counter = report.refused
  slots.refused = bound => counter.labels(slots.face, bound).inc()
}
