import { timingSafeEqual } from 'node:crypto'
import type { onRequestHookHandler } from 'fastify'
import { MantleError } from '../../errors.js'

/**
 * An onRequest hook that admits only `Authorization: Bearer <token>`, compared in constant time,
 * before anything else of the request is read; anyone else gets 401 UNAUTHENTICATED. For the
 * endpoints a machine calls with a shared secret rather than a user's JWT: the Kernel's
 * POST /internal/events (BFF_INTERNAL_TOKEN), Prometheus's GET /metrics (BFF_METRICS_TOKEN).
 */
export function requireStaticToken (token: string, what: string): onRequestHookHandler {
  const carries = carriesStaticToken(token)
  return (request, _reply, done) => {
    if (!carries(request)) {
      done(new MantleError('UNAUTHENTICATED', `The ${what} token is missing or wrong`))
      return
    }
    done()
  }
}

/** Whether a request carries `Authorization: Bearer <token>`, compared in constant time. */
export function carriesStaticToken (token: string): (request: { headers: { authorization?: string | undefined } }) => boolean {
  // The token is visible ASCII (the configuration's pattern): a header's bytes are read as
  // latin1, and a token outside ASCII could never match. The scheme is case-insensitive (RFC 9110).
  const expected = Buffer.from(token, 'latin1')
  return (request) => {
    const header = request.headers.authorization ?? ''
    const given = Buffer.from(/^bearer /i.test(header) ? header.slice(7) : '', 'latin1')
    return given.length === expected.length && timingSafeEqual(given, expected)
  }
}
