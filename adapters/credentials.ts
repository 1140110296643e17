import type { FastifyRequest } from 'fastify'
import { upgradeAuthorization } from './upgrade.js'
import { httpAuthorization, TRPC_CALLS } from './trpc/context.js'

/**
 * A request's token, read where the route it reached reads it, for whoever must know the caller
 * before (the rate-limit guard) or beside (the audit of a refused request) the route:
 * - a WebSocket upgrade of a route that serves WebSocket (/ws, /graphql, /trpc): its header,
 *   else `?access_token=`; a token that comes after it (graphql-ws's connection_init, tRPC's
 *   connectionParams message) is not in the request. A WebSocket upgrade of any other route is
 *   read as that route reads a plain request (its `?access_token=`, which REST never reads,
 *   named the tenant the guard counted it towards and the audit recorded);
 * - a tRPC call over HTTP (`/trpc/*`, SSE subscriptions included): its header, else
 *   `?connectionParams=` (`token` or `authorization`), else `?access_token=`;
 * - any other request (REST, batch, GraphQL over HTTP, the gateway's own): its header.
 * Not verified: app.identify does that (a verified token is then a lookup in its cache).
 */
export function requestAuthorization (request: FastifyRequest): string | undefined {
  // Node's mark of an upgrade, as soon as the request exists (@fastify/websocket's request.ws
  // comes with its onRequest hook, which a request refused before it never reaches), or
  // @fastify/websocket's alone (injectWS makes no Node request).
  if (((request.raw as { upgrade?: boolean }).upgrade === true || request.ws === true) && request.routeOptions.config.servesWebSocket === true) return upgradeAuthorization(request)
  if (request.routeOptions.url === TRPC_CALLS) return httpAuthorization(request)
  const header = request.headers.authorization
  return header === '' ? undefined : header
}
