import type { Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import { Counter, Gauge, type Registry } from 'prom-client'
import { MantleError } from '../errors.js'
import { clientAddress } from '../address.js'

/** The faces that upgrade, as metrics name them (the face's path without its slash). */
export type SlotsFace = 'ws' | 'graphql' | 'trpc'

/**
 * 1013 (try again later): the close of a connection refused beyond its tenant's share once
 * upgraded (its tenant known only then: GraphQL's connection_init, tRPC's connectionParams).
 */
export const CLOSE_TRY_AGAIN_LATER = 1013

/**
 * The bound that refused a connection: the instance's, or its tenant's share of it; of those
 * still unidentified (an upgrade with no credentials), the instance's (`unidentified`) or its
 * client address's share of them (`address`).
 */
export type SlotsBound = 'instance' | 'tenant' | 'unidentified' | 'address'

/**
 * The bounds on connections still unidentified: upgrades that carry no credentials, which a
 * client may bring once upgraded (GraphQL's connection_init, tRPC's connectionParams).
 */
export interface UnidentifiedBounds {
  /** Such connections on the instance, at each face. */
  max: number
  /** Such connections from one client address (an IPv6 one by its /64), at each face. */
  perAddress: number
}

/**
 * A legitimate client is unidentified for one round trip (its upgrade's answer, then its
 * connection_init or connectionParams): a few at a time even from an address that many clients
 * share (a NAT, a balancer's when BFF_TRUST_PROXY is unset). Before, anyone could hold the
 * face's 100,000 places without a token, each 10 s and the close handshake's 30 s: a GraphQL
 * socket held some 50 KB of heap (5 GB at the bound), a tRPC one some 14 KB.
 */
export const UNIDENTIFIED_DEFAULTS: Readonly<UnidentifiedBounds> = Object.freeze({ max: 5000, perAddress: 200 })

/**
 * The bytes an unidentified connection may send before it is identified: its connection_init or
 * connectionParams, a token of a few KB in it, and (graphql-ws' legacy protocol) the subscribes
 * its client sends right behind it. Past them it is closed with 1008 before the message is read:
 * before, it could send message after message of up to BFF_BODY_LIMIT for the 10 s a token is
 * waited for, each parsed whole (JSON nested deep cost some 165 ms of CPU per MB), where an HTTP
 * request without a token is refused before its body is read (a GraphQL one read up to 16 KiB).
 */
export const UNIDENTIFIED_MAX_BYTES = 64 * 1024

/** 1008 (policy violation): the close of a connection that sent too much before it was identified. */
export const CLOSE_POLICY_VIOLATION = 1008

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
  /** Unidentified connections now, and each client address's (an entry goes at 0). */
  private unidentifiedCount = 0
  private readonly addresses = new Map<string, number>()
  /**
   * The client address each unidentified connection (its upgrade's TCP socket) counts against,
   * and the bytes it has sent since it was upgraded (see screen).
   */
  private readonly unidentifiedBy = new WeakMap<Socket, { address: string, received: number }>()
  /** Counts a refusal by the bound that made it (reportSlots sets it when metrics are on). */
  refused: (bound: SlotsBound) => void = () => {}
  /** Counts a connection closed past UNIDENTIFIED_MAX_BYTES (reportSlots sets it too). */
  overflowed: () => void = () => {}

  /**
   * @param perTenant the places one tenant may hold (undefined: no share, as with identity off,
   *   when every caller is the one tenant `public`; the bounds on unidentified connections then
   *   do not apply either: every connection is the anonymous caller's)
   */
  constructor (readonly face: SlotsFace, readonly max: number, readonly perTenant: number | undefined = undefined, readonly unidentifiedBounds: Readonly<UnidentifiedBounds> = UNIDENTIFIED_DEFAULTS) {}

  /** Places taken now. */
  get size (): number {
    return this.taken
  }

  /** Connections open or being upgraded without credentials and not identified since. */
  get unidentified (): number {
    return this.unidentifiedCount
  }

  /**
   * Counts the upgrade `request`, which carries no credentials, as unidentified against its
   * client's address until it is identified (claim) or closed; throws 503 OVERLOADED when the
   * instance holds its bound of such connections, or the address its share of them. Called after
   * reserve. With identity off (no share per tenant) nothing is counted.
   */
  awaitIdentity (request: FastifyRequest): void {
    if (this.perTenant === undefined || request.ws !== true) return
    const socket = request.raw.socket as Socket | undefined
    if (socket === undefined || this.unidentifiedBy.has(socket) || this.owners.has(socket)) return
    const address = clientAddress(request)
    const { max, perAddress } = this.unidentifiedBounds
    if (this.unidentifiedCount >= max) {
      this.refused('unidentified')
      throw new MantleError('OVERLOADED', `Too many WebSocket connections without a token at /${this.face} on this instance: send the token with the upgrade (Authorization or ?access_token=)`, { headers: { 'retry-after': '5' } })
    }
    if ((this.addresses.get(address) ?? 0) >= perAddress) {
      this.refused('address')
      throw new MantleError('OVERLOADED', `An address holds at most ${perAddress} WebSocket connections without a token at /${this.face} on this instance: send the token with the upgrade (Authorization or ?access_token=)`, { headers: { 'retry-after': '5' } })
    }
    if (socket.destroyed) return
    this.unidentifiedBy.set(socket, { address, received: 0 })
    this.unidentifiedCount++
    this.addresses.set(address, (this.addresses.get(address) ?? 0) + 1)
    socket.once('close', () => { this.identified(socket) })
  }

  /** `socket` no longer counts as unidentified (it is identified, or closed); once. */
  private identified (socket: Socket): void {
    const address = this.unidentifiedBy.get(socket)?.address
    if (address === undefined) return
    this.unidentifiedBy.delete(socket)
    this.unidentifiedCount--
    const left = (this.addresses.get(address) ?? 1) - 1
    if (left > 0) this.addresses.set(address, left)
    else this.addresses.delete(address)
  }

  /**
   * Screens the messages of `ws`, the connection its upgrade's TCP socket `tcp` carries, while
   * it is unidentified: one that takes what it has sent past UNIDENTIFIED_MAX_BYTES closes it
   * with 1008, and neither it nor any after it is handed on. To be called once the face has
   * wrapped the socket's 'message' event, so that this screen runs first. A connection upgraded
   * with its token (or with identity off) is not screened: nothing is added to its messages.
   */
  screen (ws: WebSocket, tcp: Socket): void {
    if (!this.unidentifiedBy.has(tcp)) return
    const slots = this
    const emit = ws.emit
    ws.emit = function (this: WebSocket, event: string | symbol, ...args: unknown[]): boolean {
      if (event !== 'message') return emit.call(this, event, ...args)
      const entry = slots.unidentifiedBy.get(tcp)
      if (entry === undefined) return emit.call(this, event, ...args)
      // Past the bound already: the connection is closing, and what it sends is not read.
      if (entry.received > UNIDENTIFIED_MAX_BYTES) return false
      entry.received += byteLength(args[0])
      if (entry.received <= UNIDENTIFIED_MAX_BYTES) return emit.call(this, event, ...args)
      slots.overflowed()
      ws.close(CLOSE_POLICY_VIOLATION, `At most ${UNIDENTIFIED_MAX_BYTES / 1024} KiB may be sent before the connection is identified: send the token first`)
      return false
    } as WebSocket['emit']
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
    this.identified(socket)
  }

  private release (tenant: string): void {
    const left = this.heldBy(tenant) - 1
    if (left > 0) this.tenants.set(tenant, left)
    else this.tenants.delete(tenant)
  }
}

/** A WebSocket message's size in bytes, as `ws` hands it ('nodebuffer': a Buffer; else an ArrayBuffer or a Buffer's fragments). */
function byteLength (data: unknown): number {
  if (Array.isArray(data)) return data.reduce<number>((sum, part: Buffer) => sum + part.length, 0)
  return (data as Buffer | ArrayBuffer).byteLength
}

// The faces whose places each registry reports: one gauge and one counter per registry, a
// series per face.
const reported = new WeakMap<Registry, { faces: Map<SlotsFace, ConnectionSlots>, refused: Counter<'face' | 'bound'>, overflowed: Counter<'face'> }>()

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
    // eslint-disable-next-line no-new
    new Gauge({ name: 'mantle_websocket_unidentified', help: 'WebSocket connections of each face opened without a token and not identified yet (GraphQL\'s connection_init, tRPC\'s connectionParams), bounded per instance and per client address', labelNames: ['face'], registers: [registry], collect () { for (const [name, taken] of all) this.set({ face: name }, taken.unidentified) } })
    const refused = new Counter({ name: 'mantle_websocket_connections_refused_total', help: 'WebSocket connections refused with OVERLOADED at a bound, by face: the instance\'s (bound="instance", the face\'s maxConnections), a tenant\'s share of it (bound="tenant", BFF_WS_MAX_CONNECTIONS_PER_TENANT), or of those without a token the instance\'s (bound="unidentified") or a client address\'s (bound="address")', labelNames: ['face', 'bound'] as const, registers: [registry] })
    const overflowed = new Counter({ name: 'mantle_websocket_unidentified_overflows_total', help: `WebSocket connections of each face opened without a token and closed (1008) for sending more than ${UNIDENTIFIED_MAX_BYTES / 1024} KiB before a token identified them`, labelNames: ['face'] as const, registers: [registry] })
    report = { faces: all, refused, overflowed }
    reported.set(registry, report)
  }
  report.faces.set(slots.face, slots)
  const { refused, overflowed } = report
  slots.refused = bound => refused.labels(slots.face, bound).inc()
  slots.overflowed = () => overflowed.labels(slots.face).inc()
}
