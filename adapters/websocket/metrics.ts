import type { FastifyInstance } from 'fastify'
import { Gauge } from 'prom-client'
import { CallCounter } from '../../plugins/metrics/call-metrics.js'
import { slowReaderCuts } from '../slow-reader.js'

/** Why a connection ended; a fixed set, so the label's cardinality is too. */
export const CLOSE_REASONS = [
  'peer', // the client closed, or the socket dropped
  'protocol', // a frame `ws` refused (bad UTF-8, bad opcode, ...)
  'too_large', // 1009: over the face's own frame bound, or over BFF_BODY_LIMIT (ws's maxPayload)
  'expired', // 4401: the token expired without a fresh one
  'key_withdrawn', // 4401: the JWKS withdrew (or replaced) the key the token was verified with
  'slow_reader', // 1013: the client did not read its frames
  'heartbeat', // no pong to the last ping
  'shutdown' // 1001: the gateway is closing
] as const
export type CloseReason = typeof CLOSE_REASONS[number]

export interface WebSocketCounters {
  frameIn: () => void
  frameOut: () => void
  closed: (reason: CloseReason) => void
}

const noop = (): void => {}
const none: WebSocketCounters = { frameIn: noop, frameOut: noop, closed: noop }

/** The face's metrics on the gateway registry, when metrics are on; no-ops otherwise. */
export function websocketMetrics (app: FastifyInstance, openConnections: () => number): WebSocketCounters {
  if (!app.hasDecorator('metrics')) return none
  const registers = [app.metrics.registry]
  new Gauge({ name: 'mantle_websocket_connections', help: 'Open connections of the WebSocket face (/ws)', registers, collect () { this.set(openConnections()) } }) // eslint-disable-line no-new
  const frames = new CallCounter({ name: 'mantle_websocket_frames_total', help: 'Frames of the WebSocket face, by direction', labelNames: ['direction'], registers })
  const closes = new CallCounter({ name: 'mantle_websocket_closes_total', help: 'Connections of the WebSocket face that ended, by reason', labelNames: ['reason'], registers })
  // Label sets resolved once: these run per frame.
  const framesIn = frames.series('in')
  const framesOut = frames.series('out')
  const byReason = new Map(CLOSE_REASONS.map(r => [r, closes.series(r)]))
  // Every face's slow readers in one metric (mantle_slow_reader_cuts_total{face="ws"}), as closed.
  const cuts = slowReaderCuts(app, 'ws')!
  return {
    frameIn: () => framesIn.inc(),
    frameOut: () => framesOut.inc(),
    closed: reason => {
      byReason.get(reason)!.inc()
      if (reason === 'slow_reader') cuts.inc()
    }
  }
}
