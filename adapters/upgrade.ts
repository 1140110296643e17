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

/** `?access_token=` as an Authorization value (EventSource and WebSocket clients set no header). */
export function queryToken (request: FastifyRequest): string | undefined {
  const token = (request.query as Record<string, unknown> | null | undefined)?.access_token
  return typeof token === 'string' && token !== '' ? `Bearer ${token}` : undefined
}
