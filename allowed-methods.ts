// The methods a path is served with, for the 405 of a request whose method it is not (RFC 9110
// §15.5.6: a 405 carries Allow). Asked of Fastify's own router, and only by the not-found
// handler: a request that matches a route pays nothing.

import type { FastifyInstance, HTTPMethods } from 'fastify'

/** The order Allow lists the methods in; any other method comes after, by name. */
const ORDER = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']

/**
 * The route `method` `url` reaches, as Fastify's router finds it, or null. A handle without
 * searchParams is no route: what find-my-way gives for a path it refuses (a segment longer than
 * maxParamLength), to answer 414 with.
 */
export function routed (app: FastifyInstance, method: string, url: string): ReturnType<FastifyInstance['findRoute']> | null {
  const route = app.findRoute({ method: method as HTTPMethods, url }) as ReturnType<FastifyInstance['findRoute']> | null
  return route === null || route.searchParams === undefined ? null : route
}

const rank = (method: string): number => {
  const i = ORDER.indexOf(method)
  return i === -1 ? ORDER.length : i
}

export class RouteMethods {
  // The methods some route is declared with: a handful (Fastify takes only the HTTP methods).
  private readonly declared = new Set<string>()
  private sorted: readonly string[] = []

  /** A route's method(s), from the onRoute hook. */
  add (method: string | readonly string[]): void {
    for (const m of typeof method === 'string' ? [method] : method) this.declared.add(m.toUpperCase())
    this.sorted = [...this.declared].sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0))
  }

  /**
   * The value of Allow for `path` (no query string), the methods of the routes it matches in
   * order, or null when it matches none. OPTIONS alone is none: with CORS on, its preflight route
   * (`OPTIONS *`) matches every path, which still has no route.
   */
  allowed (app: FastifyInstance, path: string): string | null {
    const found: string[] = []
    let other = false
    for (const method of this.sorted) {
      if (routed(app, method, path) === null) continue
      found.push(method)
      if (method !== 'OPTIONS') other = true
    }
    return other ? found.join(', ') : null
  }

  /**
   * Whether the router refuses `path` (no query string) for some method, as it does a parameter
   * longer than maxParamLength: it does so only for a method with a parametric route at that
   * place, so the same path was a 414 to GET and a 404 to a method with no such route (PUT).
   */
  refused (app: FastifyInstance, path: string): boolean {
    for (const method of this.sorted) {
      const route = app.findRoute({ method: method as HTTPMethods, url: path }) as ReturnType<FastifyInstance['findRoute']> | null
      if (route !== null && route.searchParams === undefined) return true
    }
    return false
  }
}
