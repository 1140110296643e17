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
    checks: { type: 'object', additionalProperties: { type: 'string' } }
  }
} as const

/**
 * `/healthz` answers while the process lives (no dependency is asked: a liveness probe must not
 * restart pods because the Kernel is down). `/readyz` names every part that is not ready.
 */
export default async function healthRoutes (app: FastifyInstance): Promise<void> {
  app.get('/healthz', { schema: { hide: true, response: { 200: HealthSchema } } }, async () => ({ status: 'ok' }))

  app.get('/readyz', { schema: { hide: true, response: { 200: ReadySchema, 503: ReadySchema } } }, async (_request, reply) => {
    const checks: Record<string, string> = {}
    const failing: string[] = []
    const breaker = app.kernel.breakerState()
    checks.kernel = breaker === 'disabled' ? 'breaker disabled' : `breaker ${breaker}`
    if (breaker === 'open') failing.push('kernel')
    // Redis: the shared store connection and the events subscriber must both be up.
    const events = app.events.health()
    if (events.store === 'redis' || app.hasDecorator('redis')) {
      const up = events.up && (!app.hasDecorator('redis') || app.redis.up())
      checks.redis = up ? 'up' : 'down (memory stores)'
      if (!up) failing.push('redis')
    }
    // PostgreSQL behind the audit trail: down, entries are spooled to disk and /readyz says so.
    if (app.hasDecorator('audit') && app.audit.health().store === 'postgres') {
      const audit = app.audit.health()
      checks.postgres = audit.up ? (audit.spooling ? `up (replaying ${audit.spoolBytes} spooled bytes)` : 'up') : `down (audit spooling, ${audit.spoolBytes} bytes)`
      if (!audit.up) failing.push('postgres')
    }
    // Under pressure the instance sheds load: take it out of the balancer until it recovers.
    if (app.hasDecorator('loadShedding')) {
      const pressure = app.loadShedding.status()
      checks.pressure = pressure === null ? 'ok' : `over ${pressure.reason} bound (${Math.round(pressure.value)} > ${pressure.limit})`
      if (pressure !== null) failing.push('pressure')
    }
    if (failing.length > 0) reply.code(503)
    return { status: failing.length > 0 ? 'not-ready' : 'ready', failing, checks }
  })
}
