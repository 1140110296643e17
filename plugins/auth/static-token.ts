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
  const expected = Buffer.from(`Bearer ${token}`)
  return (request, _reply, done) => {
    const given = Buffer.from(request.headers.authorization ?? '')
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) {
      done(new MantleError('UNAUTHENTICATED', `The ${what} token is missing or wrong`))
      return
    }
    done()
  }
}
