import type { FastifyInstance } from 'fastify'

const HealthSchema = {
  type: 'object',
  properties: { status: { type: 'string' } }
} as const

const ReadySchema = {
  type: 'object',
  properties: {
    status: { type: 'string' },
    failing: { type: 'array', items: { type: 'string' } },
    degraded: { type: 'array', items: { type: 'string' } },
    checks: { type: 'object', additionalProperties: { type: 'string' } }
  }
} as const

/** What every instance shares: when one of them fails, it fails for all of them at once. */
const SHARED = new Set(['kernel', 'redis', 'postgres'])

/**
 * `/healthz` answers while the process lives (no dependency is asked: a liveness probe must not
 * restart pods because the Kernel is down). `/readyz` names every part that is not ready.
 * `/readyz?scope=instance` fails only for what is this instance's own (it sheds load, it shuts
 * down): a load balancer's readiness probe on plain `/readyz` took every replica out of service
 * at once when Redis, PostgreSQL or the Kernel went away, though each one still answered (from
 * memory stores, the audit spool, stale cache entries). Those are reported as `degraded`.
 */
export default async function healthRoutes (app: FastifyInstance): Promise<void> {
  app.get('/healthz', { schema: { hide: true, response: { 200: HealthSchema } } }, async () => ({ status: 'ok' }))

  app.get('/readyz', {
    schema: {
      hide: true,
      querystring: { type: 'object', properties: { scope: { type: 'string', enum: ['all', 'instance'], default: 'all' } } },
      // A 503 is the readiness above, or the shutdown's refusal of every request (app.ts's
      // refusedEarly), a problem+json: serialized by ReadySchema, which keeps `status` alone, it
      // went out as {"status":"503"}, neither the problem (no code, no detail) nor a readiness.
      response: { 200: ReadySchema, 503: { content: { 'application/json': { schema: ReadySchema }, 'application/problem+json': { schema: { $ref: 'Problem#' } } } } }
    }
  }, async (request, reply) => {
    const checks: Record<string, string> = {}
    const failing: string[] = []
    const breaker = app.kernel.breakerState()
    checks.kernel = breaker === 'disabled' ? 'breaker disabled' : `breaker ${breaker}`
    if (breaker === 'open') failing.push('kernel')
    // Identity without a key refuses every token: a JWKS-only gateway whose JWKS has not answered
    // yet was ready, and 401'd every call. This instance's own (others may hold the keys).
    if (app.identityHasKeys !== undefined) {
      const keys = app.identityHasKeys()
      checks.identity = keys ? 'keys loaded' : 'no key: every token is refused until the JWKS answers'
      if (!keys) failing.push('identity')
    }
    // Redis: the shared store connection and the events subscriber must both be up, and Redis
    // must permit what the gateway's parts ask of it (an ACL changed while it runs: the parts it
    // refuses run as if it were away, and instances diverge).
    // Which part Redis refuses, and what, never in Redis' words (Redis 7.2 names REDIS_URL's
    // user in them: this answer is anyone's); /diagz (role system) and the logs have them. A
    // refused PING (the heartbeat) leaves every store on Redis: not said to be on memory.
    const events = app.events.health()
    if (events.store === 'redis' || app.hasDecorator('redis')) {
      const denial = app.hasDecorator('redis') ? app.redis.denialSummary() : null
      const up = events.up && (!app.hasDecorator('redis') || app.redis.up()) && denial === null
      checks.redis = up ? 'up' : denial !== null && app.redis.up() ? (app.redis.denialOnMemory() ? `refused (memory stores): ${denial}` : `refused: ${denial}; the stores still run on Redis`) : 'down (memory stores)'
      if (!up) failing.push('redis')
    }
    // PostgreSQL behind the audit trail: down, entries are spooled to disk and /readyz says so.
    if (app.hasDecorator('audit') && app.audit.health().store === 'postgres') {
      const audit = app.audit.health()
      if (audit.refusal !== null) {
        // Production found pending migrations once PostgreSQL answered: this instance shuts
        // down, so it is not ready in either scope (`migrations` is not a shared part).
        checks.postgres = `${audit.refusal}: shutting down`
        failing.push('migrations')
      } else {
        checks.postgres = audit.up ? (audit.spooling ? `up (replaying ${audit.spoolBytes} spooled bytes)` : 'up') : `down (audit spooling, ${audit.spoolBytes} bytes)`
        if (!audit.up) failing.push('postgres')
        // Its spool's disk refuses too, and the backlog is full: this instance refuses every call
        // while replicas whose spools take entries serve them. Its own part, not PostgreSQL's.
        if (audit.saturated) {
          checks.audit = `refusing calls: neither PostgreSQL nor the spool's disk takes entries (${audit.queueDepth} waiting)`
          failing.push('audit')
        }
      }
    }
    // Under pressure the instance sheds load: take it out of the balancer until it recovers.
    if (app.hasDecorator('loadShedding')) {
      const pressure = app.loadShedding.status()
      checks.pressure = pressure === null ? 'ok' : `over ${pressure.reason} bound (${Math.round(pressure.value)} > ${pressure.limit})`
      if (pressure !== null) failing.push('pressure')
    }
    if ((request.query as { scope: 'all' | 'instance' }).scope === 'instance') {
      const degraded = failing.filter(part => SHARED.has(part))
      const own = failing.filter(part => !SHARED.has(part))
      if (own.length > 0) reply.code(503)
      return { status: own.length > 0 ? 'not-ready' : degraded.length > 0 ? 'degraded' : 'ready', failing: own, degraded, checks }
    }
    if (failing.length > 0) reply.code(503)
    return { status: failing.length > 0 ? 'not-ready' : 'ready', failing, checks }
  })
}
