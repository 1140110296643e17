import type { FastifyInstance, FastifyRequest } from 'fastify'
import { decisions, messageGuardOf, type FaceOptions } from '../face.js'
import { clientAddress } from '../../address.js'
import { MantleError } from '../../errors.js'
import { ConnectionSlots, reportSlots } from '../connection-slots.js'
import { MAX_BUFFERED_BYTES } from '../slow-reader.js'
import { SharedFrame, defaultUnreadBytes } from '../unread.js'
import { Connection, type ConnectionAuth, type FaceShared } from './connection.js'
import { websocketMetrics } from './metrics.js'
import { inFlightBoundMs, upgradeAuthorization, upgradeTrace } from '../upgrade.js'
import { Heartbeat } from '../heartbeat.js'

export { CLOSE_REASONS, type CloseReason } from './metrics.js'

export interface WebSocketFaceSettings {
  /** Event subscriptions one connection may hold. */
  maxSubscriptions: number
  /** Calls of one connection running at once; beyond it a call is refused with OVERLOADED. */
  maxInFlight: number
  /** Bytes queued for a client that does not read before it is closed with 1013. */
  maxBufferedBytes: number
  /** Largest frame, in bytes (1009 beyond it); never above BFF_BODY_LIMIT, ws's maxPayload. */
  maxFrameBytes: number
  /** Ping interval; a peer that has not answered the previous ping is dropped. */
  heartbeatMs: number
  /** Connections on this instance; beyond it an upgrade is refused with 503 OVERLOADED. */
  maxConnections: number
  /** How long a shutdown waits for clients to acknowledge 1001 before dropping them. */
  closeGraceMs: number
}

export const DEFAULT_SETTINGS: Readonly<Omit<WebSocketFaceSettings, 'maxFrameBytes'>> = Object.freeze({
  maxSubscriptions: 32,
  maxInFlight: 64,
  maxBufferedBytes: MAX_BUFFERED_BYTES,
  heartbeatMs: 30_000,
  maxConnections: 100_000,
  closeGraceMs: 2000
})

/**
 * The WebSocket face (CONTRACT §3) at /ws with the given bounds. The default export uses the
 * defaults; tests build one with short timers.
 */
export function createWebSocketFace (settings: Partial<WebSocketFaceSettings> = {}) {
  return async function websocketFace (app: FastifyInstance, opts: FaceOptions): Promise<void> {
    const limits = { ...DEFAULT_SETTINGS, maxFrameBytes: opts.bodyLimit, ...settings }
    const connections = new Set<Connection>()
    // The bound, counted from the check on (the set only holds connections once upgraded).
    const slots = new ConnectionSlots('ws', limits.maxConnections, opts.maxConnectionsPerTenant)
    reportSlots(app, slots)
    const eventPrefixes = new Map(app.pipeline.manifest.events.map(e => [e.name, '{"event":' + JSON.stringify(e.name) + ',"data":']))
    // One timer for every connection rather than one each.
    const heartbeat = new Heartbeat(limits.heartbeatMs)
    const face: FaceShared = { app, limits, counters: websocketMetrics(app, () => connections.size), eventPrefixes, eventFrame: eventFrames(), heartbeat, decide: decisions(app), guard: messageGuardOf(app), unread: opts.unread ?? defaultUnreadBytes(opts.maxConnectionsPerTenant !== undefined) }
    // Identity verified in the upgrade's onRequest hook, handed to the connection it opens.
    const verified = new WeakMap<FastifyRequest, ConnectionAuth>()
    const forget = (c: Connection): void => { connections.delete(c) }
    const reached = app.hasDecorator('audit') ? app.audit.reached : null

    app.route({
      method: 'GET',
      url: '/ws',
      schema: { hide: true },
      // Runs before the upgrade: without a valid token no socket is accepted, the client gets
      // the 401 problem+json over plain HTTP; nor beyond its tenant's share of the connections
      // (the tenant never changes: an `auth` frame must keep it), a 503.
      onRequest: (request, _reply, done) => {
        try {
          slots.reserve(request)
          const authorization = upgradeAuthorization(request)
          const identity = app.identify(authorization, request.raw)
          if (request.ws) slots.claim(request.raw.socket, identity.tenant)
          verified.set(request, { identity, authorization, address: face.guard === null ? '' : clientAddress(request) })
          done()
        } catch (err) {
          done(err as Error)
        }
      },
      handler: async (request, reply) => {
        // The face's own answer to a plain GET, not a refusal before it (see Audit.reached).
        reached?.(request)
        // A sender of Upgrade MUST name it in Connection (RFC 9110 §7.8), so that an intermediary
        // that does not know it drops it as hop-by-hop; the connection kept or not as Node would.
        const connection = reply.raw.shouldKeepAlive ? 'upgrade' : 'upgrade, close'
        throw new MantleError('BAD_REQUEST', '/ws speaks WebSocket: send an upgrade request', { status: 426, headers: { upgrade: 'websocket', connection } })
      },
      wsHandler: (socket, request) => {
        // This face closes its own connections (1001 on shutdown, below): taken out of the
        // shared server's set, they are not sent the bare close of @fastify/websocket's preClose.
        app.websocketServer.clients.delete(socket)
        connections.add(new Connection(face, socket, verified.get(request)!, request.id, upgradeTrace(request.headers), forget))
        verified.delete(request)
      }
    })

    app.addHook('preClose', async () => {
      heartbeat.stop()
      if (connections.size === 0) return
      let timer: NodeJS.Timeout | undefined
      // The calls in flight are let finish and answered first, as HTTP requests are: each ends
      // by its operation's timeoutMs, which the shutdown's grace allows (server.ts), so the wait
      // is bounded by the longest of them and the time an answer then takes (inFlightBoundMs).
      const calls = new Promise<void>(resolve => { timer = setTimeout(resolve, inFlightBoundMs(app.pipeline)) })
      await Promise.race([Promise.all([...connections].map(async c => await c.drain())), calls])
      clearTimeout(timer)
      const grace = new Promise<void>(resolve => { timer = setTimeout(resolve, limits.closeGraceMs) })
      await Promise.race([Promise.all([...connections].map(async c => await c.shutdown())), grace])
      clearTimeout(timer)
      // Clients that did not acknowledge the close in time would hold the server open.
      for (const c of connections) c.socket.terminate()
    })
  }
}

/**
 * An event's frame for its tenant's subscribers, encoded once per event: the bus hands each of them
 * the same JSON in one synchronous loop, and the frame made for the first is handed to the others
 * (and forgotten once the loop is over, not held until the next event). Encoded apart, a large
 * event held a copy per subscriber until each was written out, each counted in its tenant's share:
 * a 2 MB event to 100 subscribers whose networks were a moment behind counted 200 MB against it.
 */
function eventFrames (): (prefix: string, json: string, tenant: string) => SharedFrame {
  let last: { prefix: string, json: string, tenant: string, frame: SharedFrame } | null = null
  const forget = (): void => { last = null }
  return (prefix, json, tenant) => {
    if (last !== null && last.json === json && last.prefix === prefix && last.tenant === tenant) return last.frame
    if (last === null) queueMicrotask(forget)
    last = { prefix, json, tenant, frame: new SharedFrame(Buffer.from(prefix + json + '}')) }
    return last.frame
  }
}

export default createWebSocketFace()
