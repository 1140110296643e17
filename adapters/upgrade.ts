import type { IncomingHttpHeaders } from 'node:http'
import type { FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import type { Pipeline } from '../plugins/pipeline/index.js'

/**
 * Sockets of the shared WebSocket server whose face closes them itself at shutdown, once their
 * calls in flight are answered (/trpc): @fastify/websocket's preClose (closeWebSockets, app.ts),
 * which closes the others at once, leaves them alone.
 */
export const closedByTheirFace = new WeakSet<WebSocket>()

/**
 * What a call that ends by its timeout takes to be answered once its timer fires: the Kernel
 * request's abort, the audit entry, the frame. At shutdown, a face waits for its sockets' calls in
 * flight for the longest operation timeout and this (within server.ts' GRACE_MARGIN_MS). With the
 * timeout alone, a call sent just before the shutdown began timed out, under load, a few event-loop
 * turns before its answer went, and the drain's own timer, due at about the same moment, closed its
 * socket first: the answer was lost.
 */
export const ANSWER_MARGIN_MS = 1000

/**
 * How long a WebSocket face's shutdown waits for its calls in flight (/ws, /trpc): by the longest
 * timeout of every manifest applied since start-up, as server.ts' grace, since a call that started
 * before a reload runs on with its old deadline. By the manifest in force alone, a reload that
 * shortened a timeout let the drain close a socket with 1001 while such a call still ran: its
 * answer was lost (a mutation carried out at the Kernel, its client never told).
 */
export function inFlightBoundMs (pipeline: Pick<Pipeline, 'longestTimeoutMs'>): number {
  return pipeline.longestTimeoutMs + ANSWER_MARGIN_MS
}

/**
 * A WebSocket upgrade's credentials: the Authorization header, else `?access_token=` (a browser
 * cannot set headers on an upgrade). /ws, /graphql and /trpc read them alike, in the upgrade's
 * onRequest hook, where bad ones are refused with a 401 before any socket is accepted.
 */
export function upgradeAuthorization (request: FastifyRequest): string | undefined {
  const header = request.headers.authorization
  if (typeof header === 'string' && header !== '') return header
  return queryToken(request)
}

/** The trace context of a WebSocket upgrade, which every call on its connection continues. */
export interface UpgradeTrace {
  traceparent: string | undefined
  tracestate: string | undefined
}

/**
 * A WebSocket upgrade's `traceparent` and `tracestate`, read once per connection (/ws, /trpc):
 * each call on it continues the caller's trace as an HTTP call continues its request's (the
 * pipeline checks them per call, as it does for HTTP).
 */
export function upgradeTrace (headers: IncomingHttpHeaders): UpgradeTrace {
  const { traceparent, tracestate } = headers
  return { traceparent: typeof traceparent === 'string' ? traceparent : undefined, tracestate: typeof tracestate === 'string' ? tracestate : undefined }
}

/** `?access_token=` as an Authorization value (EventSource and WebSocket clients set no header). */
export function queryToken (request: FastifyRequest): string | undefined {
  const token = (request.query as Record<string, unknown> | null | undefined)?.access_token
  return typeof token === 'string' && token !== '' ? `Bearer ${token}` : undefined
}

/** Whether an error is ws' refusal of a client's frame (too large, bad UTF-8: its codes are all `WS_ERR_*`). */
export function refusedByWs (cause: unknown): boolean {
  const code = (cause as { code?: unknown } | null | undefined)?.code
  return cause instanceof Error && typeof code === 'string' && code.startsWith('WS_ERR_')
}

/**
 * Whether a WebSocket upgrade comes from a page another site serves, for a gateway whose
 * identity is off (BFF_AUTH_ENABLED=false: the network in front authenticates callers, perhaps
 * by a cookie its proxy checks, which a browser sends along with a cross-site upgrade). A
 * browser holds a page's WebSocket to no same-origin rule, as it does its HTTP requests (CORS):
 * without this, any site a user inside that network opened read every operation's answers
 * over /ws, /graphql or /trpc, which its REST calls could not (no CORS header). Allowed: an
 * upgrade without `Origin` (no browser sends one without it), one whose `Origin` is this
 * gateway's own host (its scheme not compared: TLS may end at a balancer; a port left out is the
 * scheme's default), and one `origins` (BFF_CORS_ORIGINS) names, or any with `*`. `null` (a
 * sandboxed frame, a file:// page) and anything that is no http(s) origin are cross-site.
 */
export function crossSiteUpgrade (origins: readonly string[]): (request: FastifyRequest) => boolean {
  const any = origins.includes('*')
  const allowed = new Set(origins)
  return (request) => {
    const origin = request.headers.origin
    if (origin === undefined || any || allowed.has(origin)) return false
    let url: URL
    try {
      url = new URL(origin)
    } catch {
      return true
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') return true
    const port = url.port === '' ? (url.protocol === 'https:' ? '443' : '80') : url.port
    let host: URL
    try {
      host = new URL(`${url.protocol}//${request.host}`)
    } catch {
      return true
    }
    return host.hostname !== url.hostname || (host.port === '' ? port !== (url.protocol === 'https:' ? '443' : '80') : host.port !== port)
  }
}
