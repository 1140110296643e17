// The query string parser of every route (app.ts gives it to Fastify's router): Fastify's own,
// fast-querystring, and a refusal of bad percent-encoding instead of its literal text.
import { parse } from 'fast-querystring'

/**
 * What parseQuery returns for a query string that is not valid percent-encoding of UTF-8: app.ts's
 * onRequest hook refuses a request whose query is this object (VALIDATION_FAILED, 400), before
 * any route reads it. The router calls the parser where a throw would reach no handler.
 */
export const MALFORMED_QUERY: Readonly<Record<string, never>> = Object.freeze(Object.create(null) as Record<string, never>)

/**
 * A query string's fields, or MALFORMED_QUERY. fast-querystring keeps a part it cannot decode as
 * its literal text (`%zz`, `%E0%A4%A`, `%ff`, which is no UTF-8), so `?q=%ff` reached the Kernel
 * as the three characters `%ff`, a tRPC input or a GraphQL query the same. The string is decoded
 * whole only when it holds a `%` (parse decodes nothing otherwise): it decodes if and only if
 * each key and value does, since `&` and `=` are plain ASCII and no escape or UTF-8 sequence can
 * span one.
 */
export function parseQuery (query: string): Record<string, unknown> {
  if (query.length === 0) return {}
  if (query.includes('%')) {
    try {
      decodeURIComponent(query)
    } catch {
      return MALFORMED_QUERY
    }
  }
  return parse(query) as Record<string, unknown>
}

/**
 * A request's query string as fast-querystring reads it, a part it cannot decode kept as its
 * literal text: for a probe (probes.ts), which takes no input but /readyz's `scope` and must
 * answer whatever a monitor appends.
 */
export function literalQuery (url: string): Record<string, unknown> {
  const start = url.indexOf('?')
  return start === -1 ? {} : parse(url.slice(start + 1)) as Record<string, unknown>
}
