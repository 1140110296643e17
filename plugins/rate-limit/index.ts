import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyReply, FastifyRequest, onRequestHookHandler } from 'fastify'
import fastifyRateLimit from '@fastify/rate-limit'
import { Counter, Gauge } from 'prom-client'
import { CallCounter, type CounterSeries } from '../metrics/call-metrics.js'
import { MantleError } from '../../errors.js'
import { StageOrder, type Stage } from '../pipeline/index.js'
import type { Operation } from '../../manifest.js'
import { MemoryWindowStore } from './memory-store.js'
import { RedisWindowStore } from './redis-store.js'
import { sharedStoreHealth } from '../diagz/index.js'
import { RateLimiter, fastifyStore, opKey, tenantKey, ipKey, type LimiterCounters, type Scope, type StoreKind } from './limiter.js'
import type { WindowCount } from './window.js'
import { withHook } from '../../route-hooks.js'
import { PROBE_PATHS, targetsProbe } from '../../probes.js'
import { requestAuthorization } from '../../adapters/credentials.js'
import { clientAddress } from '../../address.js'
import { carriesStaticToken } from '../auth/static-token.js'

export { RateLimiter, opKey, tenantKey, ipKey, keyPart, fastifyStore } from './limiter.js'
export { MemoryWindowStore } from './memory-store.js'
export { RedisWindowStore, RATE_LIMIT_COMMANDS } from './redis-store.js'
export { hit, SLIDING_WINDOW_LUA, type WindowCount, type WindowState } from './window.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The limiter both limits count with (its store, and whether it is on its memory fallback). */
    rateLimiter: RateLimiter
    /** The HTTP guard's count of a WebSocket message that is no operation's call; null: no guard. */
    messageGuard: MessageGuard | null
  }
}

/**
 * Counts one WebSocket message that asks for something other than an operation's call (a
 * subscription, a /ws `auth` frame) as one request of its connection towards the HTTP guard's
 * budget: under the tenant its connection speaks for, as the guard counts a request whose token
 * verifies, or under the upgrade's client address when identity is off (clientAddress) or the
 * connection speaks for no one yet (`caller` null: a graphql-ws subscribe bringing its token).
 * Gives the guard's 429 refusal beyond the limit, else null: synchronously on the memory store,
 * a promise on Redis (never rejected).
 */
export type MessageGuard = (caller: { readonly tenant: string } | null, address: string) => MantleError | null | Promise<MantleError | null>

export interface RateLimitPluginOptions {
  /** Where limits are counted; `redis` needs the mantle-redis plugin (REDIS_URL). */
  store: StoreKind
  /** The HTTP guard's limit per window; undefined: no guard, only the operations' limits. */
  globalMax?: number | undefined
  globalWindowMs: number
  /** Identity is on: the guard counts a caller with a verified token per tenant, others per IP. */
  perTenant: boolean
  /**
   * CORS is on and passes its preflights on (app.ts: preflightContinue): the guard counts every
   * OPTIONS request and answers it as CORS would. Off (no CORS): an OPTIONS request has no route.
   */
  preflights?: boolean
  /**
   * BFF_INTERNAL_TOKEN: the Kernel's POST /internal/events with it is not counted by the guard
   * (others to that route are, by address).
   */
  internalToken?: string | undefined
  /** Keys the memory store holds (100,000). */
  memoryMaxKeys?: number
  /** The memory store's clock (tests). */
  now?: () => number
  /** After a failed Redis check, how long checks stay in memory before trying Redis (1 s). */
  retryRedisMs?: number
}

async function rateLimitPlugin (app: FastifyInstance, opts: RateLimitPluginOptions): Promise<void> {
  if (opts.store === 'redis' && !app.hasDecorator('redis')) throw new Error('BFF_RATE_LIMIT_STORE=redis needs REDIS_URL')
  const memory = new MemoryWindowStore({ maxKeys: opts.memoryMaxKeys, now: opts.now })
  const redis = opts.store === 'redis' ? app.redis : null
  const limiter: RateLimiter = new RateLimiter({
    memory,
    redis: redis === null ? null : new RedisWindowStore(redis.client),
    up: redis === null ? undefined : redis.up,
    log: app.log,
    counters: counters(app, (): RateLimiter => limiter),
    retryRedisMs: opts.retryRedisMs,
    ...(redis === null ? {} : { failed: (err: Error) => { redis.denied(RATE_LIMITS, err) }, counted: () => { redis.allowed(RATE_LIMITS) } })
  })
  app.decorate('rateLimiter', limiter)
  if (redis !== null) {
    // A connection Redis refused (REDIS_URL's database or credentials) is ready but not up.
    const reconnected = (): void => { if (redis.up()) limiter.reconnected() }
    redis.client.on('ready', reconnected)
    // Redis permits the gateway's commands again (an ACL put back): as a reconnection.
    redis.onAllowed(reconnected)
    // Redis answers (the heartbeat's PING) after a check that failed on a connection that stayed
    // up: no longer said to be on memory (not while Redis refuses the limiter its commands).
    redis.onAnswer(() => { if (!redis.refuses(RATE_LIMITS)) limiter.answered() })
    app.addHook('onClose', async () => { redis.client.off('ready', reconnected) })
  }
  if (app.hasDecorator('diagz')) {
    app.diagz.addStore('rateLimit', () => sharedStoreHealth(limiter.store !== 'memory', !limiter.fallbackActive, `${limiter.memoryKeys} keys in memory`))
  }

  // Every face's calls pass here, each WebSocket frame and batch call counted on its own.
  app.pipeline.addStage({
    name: 'rateLimit',
    order: StageOrder.rateLimit,
    build: op => op.rateLimit === null ? null : operationLimit(limiter, op, op.rateLimit)
  })

  app.decorate('messageGuard', opts.globalMax === undefined ? null : messageGuard(limiter, opts.globalMax, opts.globalWindowMs, opts.perTenant))
  if (opts.globalMax !== undefined) await guard(app, limiter, opts.globalMax, opts.globalWindowMs, opts.perTenant, opts.preflights === true, opts.internalToken)
}

/** The guard's refusal of a request (or message) beyond `max` per `windowMs`. */
function guardRefusal (max: number, windowMs: number, ttl: number): MantleError {
  return new MantleError('RATE_LIMITED', `More than ${max} requests in ${windowMs} ms`, { headers: refusalHeaders(max, ttl) })
}

/**
 * Before, a WebSocket's upgrade was the only request of it the guard counted: behind it, a
 * connection could send subscribe and `auth` frames without end, each one decided (a token's
 * signature checked, an audit entry written) and counted by no limit (its calls are counted by
 * their operations' limits). Now each counts as one request, under the key its upgrade was
 * counted by (the verified tenant), so the tenant's budget is the same on every face.
 */
function messageGuard (limiter: RateLimiter, max: number, windowMs: number, perTenant: boolean): MessageGuard {
  const decide = (count: WindowCount): MantleError | null => count.current > max ? guardRefusal(max, windowMs, count.ttl) : null
  return (caller, address) => {
    const count = limiter.check('global', perTenant && caller !== null ? tenantKey(caller.tenant) : ipKey(address), windowMs, max)
    return count instanceof Promise ? count.then(decide) : decide(count)
  }
}

/** The part of the gateway the limiter is to the shared Redis (its refusals, /readyz). */
const RATE_LIMITS = 'rate limits'

/** The per-operation limit: `RateLimit-*` headers on success, 429 RATE_LIMITED beyond it. */
function operationLimit (limiter: RateLimiter, op: Operation, limit: { max: number, windowMs: number }): Stage {
  const { max, windowMs } = limit
  const name = op.name
  const maxText = String(max)
  const detail = `${name} allows ${max} calls per ${windowMs} ms`
  const decide = (ctx: Parameters<Stage>[0], current: number, ttl: number, next: Parameters<Stage>[1]): Promise<unknown> => {
    if (current > max) throw new MantleError('RATE_LIMITED', detail, { headers: refusalHeaders(max, ttl) })
    ctx.setHeader('RateLimit-Limit', maxText)
    ctx.setHeader('RateLimit-Remaining', String(max - current))
    ctx.setHeader('RateLimit-Reset', String(Math.ceil(ttl / 1000)))
    return next(ctx)
  }
  return (ctx, next) => {
    const count = limiter.check('op', opKey(ctx.tenant, ctx.user, name), windowMs, max)
    if (count instanceof Promise) return count.then(c => decide(ctx, c.current, c.ttl, next))
    return decide(ctx, count.current, count.ttl, next)
  }
}

/** The Kernel's route for its events (plugins/events). */
const KERNEL_EVENTS = '/internal/events'

function refusalHeaders (max: number, ttl: number): Record<string, string> {
  const seconds = String(Math.ceil(ttl / 1000))
  return { 'retry-after': seconds, 'ratelimit-limit': String(max), 'ratelimit-remaining': '0', 'ratelimit-reset': seconds }
}

/**
 * The HTTP guard: @fastify/rate-limit with the limiter as its store, on every route (WebSocket
 * upgrades of /ws, /graphql and /trpc included, and CORS's preflights) but the probes. Its hook is put first on each
 * route, ahead of a route's own hooks (the upgrades verify tokens in theirs), so a flood is
 * refused before it costs anything else.
 */
async function guard (app: FastifyInstance, limiter: RateLimiter, max: number, windowMs: number, perTenant: boolean, preflights: boolean, internalToken: string | undefined): Promise<void> {
  await app.register(fastifyRateLimit, {
    global: false,
    max,
    timeWindow: windowMs,
    store: fastifyStore(limiter, 'global'),
    keyGenerator: perTenant ? (request) => guardKey(app, request) : addressKey,
    enableDraftSpec: true,
    errorResponseBuilder: (_request, context) => guardRefusal(context.max, windowMs, context.ttl)
  })
  const hook = app.rateLimit() as onRequestHookHandler
  // The Kernel's events (plugins/events): counted by its address, they were refused 429 beyond
  // the clients' budget, and lost; a publish carrying BFF_INTERNAL_TOKEN is the Kernel's.
  const kernel = internalToken === undefined ? null : carriesStaticToken(internalToken)
  const counted = hook as unknown as (request: FastifyRequest, reply: FastifyReply) => Promise<void>
  const unlessKernel = async (request: FastifyRequest, reply: FastifyReply): Promise<void> => {
    if (kernel === null || !kernel(request)) await counted(request, reply)
  }
  app.addHook('onRoute', (route) => {
    if (PROBE_PATHS.has(route.url ?? '')) return
    route.onRequest = withHook(route.onRequest, route.url === KERNEL_EVENTS && kernel !== null ? unlessKernel as onRequestHookHandler : hook, true)
  })
  if (preflights) {
    // @fastify/cors answers every OPTIONS request as a preflight, in its own onRequest hook (ahead
    // of any route's hooks) and on its `OPTIONS *` route, declared before this onRoute hook: the
    // guard never counted one, and a flood of them cost nothing of any budget. CORS now passes
    // them on with its headers set (app.ts, preflightContinue); they are counted here and
    // answered as CORS answered them: 204 with Content-Length 0 (Safari waits for a body without).
    // A preflight to a probe is not counted, as the probe itself is not.
    const answer = (reply: FastifyReply): void => { reply.code(204).header('content-length', '0').send() }
    app.addHook('onRequest', (request, reply, done) => {
      if (request.method !== 'OPTIONS') {
        done()
        return
      }
      if (targetsProbe(request.url)) {
        answer(reply)
        return
      }
      counted(request, reply).then(() => { answer(reply) }, done)
    })
  }
}

/**
 * A caller's tenant, only from a token app.identify verifies (its cache makes the pipeline's
 * own identify of the same token a lookup, and a token it refuses is refused for the rest of
 * this request without another check): a forged or expired token must not spend a real
 * tenant's budget, so it is counted by address like an anonymous caller.
 */
function guardKey (app: FastifyInstance, request: FastifyRequest): string {
  // The token where the route reads it (requestAuthorization, the audit's too). The guard read
  // only the header and `?access_token=`: a tRPC call whose token came in `?connectionParams=`
  // (httpSubscriptionLink, EventSource's SSE) counted towards its address, a budget shared by
  // every tenant behind one NAT and one more for a tenant on each address it called from.
  const authorization = requestAuthorization(request)
  if (authorization !== undefined) {
    try {
      return tenantKey(app.identify(authorization, request.raw).tenant)
    } catch {}
  }
  return addressKey(request)
}

/** The key of a caller by its address (clientAddress). */
function addressKey (request: FastifyRequest): string {
  return ipKey(clientAddress(request))
}

function counters (app: FastifyInstance, limiter: () => RateLimiter): LimiterCounters | undefined {
  if (!app.hasDecorator('metrics')) return undefined
  const registers = [app.metrics.registry]
  const checks = new CallCounter({ name: 'mantle_rate_limit_checks_total', help: 'Rate-limit checks, by scope (global HTTP guard or op) and the store that answered', labelNames: ['scope', 'store'], registers })
  const refusals = new CallCounter({ name: 'mantle_rate_limit_refusals_total', help: 'Calls refused with 429 RATE_LIMITED, by scope and store', labelNames: ['scope', 'store'], registers })
  const fallbacks = new Counter({ name: 'mantle_rate_limit_fallback_total', help: 'Checks answered from memory because Redis was unreachable, failed or timed out', registers })
  new Gauge({ name: 'mantle_rate_limit_fallback_active', help: '1 while rate limits configured for Redis are counted in memory', registers, collect () { this.set(limiter().fallbackActive ? 1 : 0) } }) // eslint-disable-line no-new
  new Gauge({ name: 'mantle_rate_limit_memory_keys', help: 'Keys the in-memory rate-limit store holds (bounded)', registers, collect () { this.set(limiter().memoryKeys) } }) // eslint-disable-line no-new
  // Optimization: the four label children of each counter are resolved once, not per check.
  const children = (c: CallCounter): Record<Scope, Record<StoreKind, CounterSeries>> => ({
    global: { memory: c.series('global', 'memory'), redis: c.series('global', 'redis') },
    op: { memory: c.series('op', 'memory'), redis: c.series('op', 'redis') }
  })
  const checked = children(checks)
  const refused = children(refusals)
  return {
    checked: (scope: Scope, store: StoreKind, wasRefused: boolean) => {
      checked[scope][store].inc()
      if (wasRefused) refused[scope][store].inc()
    },
    fellBack: () => fallbacks.inc()
  }
}

// Not encapsulated: the guard's onRoute hook must reach every route registered after it.
export default fp(rateLimitPlugin, { name: 'mantle-rate-limit', dependencies: ['mantle-pipeline'], fastify: '5.x' })
