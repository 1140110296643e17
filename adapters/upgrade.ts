import type { IncomingHttpHeaders } from 'node:http'
import type { FastifyRequest } from 'fastify'

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
