import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { Counter, Gauge } from 'prom-client'
import { CallCounter, type CounterSeries } from '../metrics/call-metrics.js'
import { StageOrder, type CacheOutcome } from '../pipeline/index.js'
import { ResponseCache, STALE_IF_ERROR_SECONDS, type CacheMetrics } from './cache.js'
import { RedisTier } from './redis.js'
import { INVALIDATE_CHANNEL } from './keys.js'
import { sharedStoreHealth } from '../diagz/index.js'
import { HEADER_SAFE } from '../auth/identity.js'
import { SCRAPE_SLICES } from '../../fair-lru.js'
import { watchPings } from '../redis/index.js'

export { ResponseCache, STALE_IF_ERROR_SECONDS } from './cache.js'
export { MemoryTier, TagClock, type CachedAnswer } from './memory.js'
export { RedisTier, CACHE_COMMANDS, tenantBudgetKeys } from './redis.js'
export { entryKey, policyOf, sharedKey, localKey, LOCAL_KEY_MAX_INPUT, tagKey, TAG_KEY_MAX, tagTemplate, etagOf, matchesIfNoneMatch, takesIfNoneMatch, INVALIDATE_CHANNEL } from './keys.js'

/**
 * The most text of tags an invalidation's audit entry names (the first ones, whole): a body of
 * 1,000 tags of 1 KB each would have made one entry of 1 MB, held in the audit's queue and its
 * memory store, which count entries, not bytes. `tagCount` says how many there were.
 */
export const AUDITED_TAG_CHARS = 2048

/** The part of the gateway the tier is to the shared Redis (its refusals, /readyz). */
const CACHE = 'cache'
const CACHE_SUBSCRIBER = 'cache invalidations subscriber'

/** How often the invalidations subscriber's connection is checked with a PING (ms), as the shared connection's heartbeat. */
const SUBSCRIBER_PROBE_MS = 1000

/**
 * How long start-up waits for the invalidations subscriber's first SUBSCRIBE, Redis up (ms): its
 * connection (a 1 s connect timeout) and the command. Past it the gateway starts all the same.
 */
const FIRST_SUBSCRIBE_WAIT_MS = 2000

function auditedTags (tags: readonly string[]): string[] {
  const named: string[] = []
  let chars = 0
  for (const tag of tags) {
    chars += tag.length
    if (chars > AUDITED_TAG_CHARS) break
    named.push(tag)
  }
  return named
}

export interface CacheOptions {
  store: 'memory' | 'redis'
  defaultTtlSeconds: number
  maxSize: number
  /** Bytes of answers the in-process tier holds, about (BFF_CACHE_MAX_BYTES). */
  maxBytes: number
  /** Bytes one tenant's entries may take in Redis (BFF_CACHE_REDIS_MAX_BYTES_PER_TENANT; unset: no bound). */
  maxBytesPerTenant?: number | undefined
  /** The clock entries are dated with (tests move it). */
  now?: (() => number) | undefined
}

export interface CacheStatus {
  readonly store: 'memory' | 'redis'
  readonly cache: ResponseCache
  /** Drops one tenant's tags on every instance (what a mutation's `invalidates` does). */
  invalidate: (tenant: string, tags: readonly string[]) => Promise<void>
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Present when BFF_CACHE_ENABLED. */
    responseCache: CacheStatus
  }
}

function cacheMetrics (app: FastifyInstance, cache: () => ResponseCache): CacheMetrics | undefined {
  if (!app.hasDecorator('metrics')) return undefined
  const registers = [app.metrics.registry]
  const outcomes = new CallCounter({ name: 'mantle_cache_requests_total', help: 'Cached-query calls by outcome (hit, miss, stale); hit rate = hit / sum', labelNames: ['op', 'outcome'], registers })
  const coalesced = new Counter({ name: 'mantle_cache_coalesced_total', help: 'Calls that waited for a Kernel call of the same key already in flight', labelNames: ['op'] as const, registers })
  const invalidated = new Counter({ name: 'mantle_cache_invalidations_total', help: 'Tags invalidated, by source (mutation, admin, remote: another instance)', labelNames: ['source'] as const, registers })
  const fallbacks = new Counter({ name: 'mantle_cache_redis_fallbacks_total', help: 'Cache operations that skipped Redis (away or failing) and used memory only', labelNames: ['operation'] as const, registers })
  const discarded = new Counter({ name: 'mantle_cache_discarded_total', help: 'Kernel answers not stored because their tags were invalidated during the call', labelNames: ['op'] as const, registers })
  const lost = new Counter({ name: 'mantle_cache_invalidations_lost_total', help: 'Invalidated tags lost: Redis away and 10,000 already waiting to be replayed (the tenant holding the most of those gives up one); other instances serve what they drop until it expires, this one reads no entry of their tenant from Redis for the longest life of an entry (of any tenant past 10,000 tenants)', registers })
  const tagEvictions = new Counter({ name: 'mantle_cache_tag_versions_evicted_total', help: 'Tag versions pushed out of a bounded list: list="marks" (a tag\'s latest in-process invalidation; the entries stored under it before it are dropped, and its tenant\'s floor rises: the tenant\'s reads under way store nothing), "floors" (a tenant\'s floor; the floor of all rises: every tenant\'s reads under way store nothing), "known" (a tag\'s latest Redis version; Redis going back on it is no longer seen)', labelNames: ['list'] as const, registers })
  new Gauge({ name: 'mantle_cache_tag_versions', help: 'Entries of the bounded lists of tag versions: list="marks" and "floors" (in-process, bounded by 4 x BFF_CACHE_MAX_SIZE, 1,000 at the least, each), "known" (the Redis tier\'s, the same bound; absent without Redis)', labelNames: ['list'] as const, registers, collect () { for (const [list, n] of Object.entries(cache().tagVersions)) this.labels(list).set(n) } }) // eslint-disable-line no-new
  const evictions = new Counter({ name: 'mantle_cache_memory_evictions_total', help: 'Entries the in-process cache tier pushed out to stay within BFF_CACHE_MAX_SIZE or BFF_CACHE_MAX_BYTES (each the least recently used of the tenant holding the most)', registers })
  // Both after the scrape's pass over the entries (one pass for both: purgeAllStale shares it),
  // which lets the event loop go between slices: a gauge read beside it, not after, counted the
  // bytes of the expired entries the other no longer counted.
  new Gauge({ name: 'mantle_cache_memory_entries', help: 'Entries held in the in-process cache tier (LRU shared fairly by tenants, bounded by BFF_CACHE_MAX_SIZE), after the scrape drops expired ones (65,536 looked at at most): invalidated ones count until read or pushed out', registers, async collect () { await cache().memory.purgeAll(SCRAPE_SLICES); this.set(cache().memory.size) } }) // eslint-disable-line no-new
  new Gauge({ name: 'mantle_cache_memory_bytes', help: 'Bytes of answers held in the in-process cache tier, about (bounded by BFF_CACHE_MAX_BYTES), counted as mantle_cache_memory_entries', registers, async collect () { await cache().memory.purgeAll(SCRAPE_SLICES); this.set(cache().memory.bytes) } }) // eslint-disable-line no-new
  new Gauge({ name: 'mantle_cache_in_flight', help: 'Keys with a Kernel call in flight (coalesced)', registers, collect () { this.set(cache().inFlight) } }) // eslint-disable-line no-new
  new Gauge({ name: 'mantle_cache_pending_invalidations', help: 'Invalidated tags waiting for Redis to come back (bounded, 10,000: past it a tag is lost, mantle_cache_invalidations_lost_total)', registers, collect () { this.set(cache().pendingInvalidations) } }) // eslint-disable-line no-new
  new Gauge({ name: 'mantle_cache_later_invalidations', help: 'Mutations whose Kernel call got no answer (timed out, connection lost), their tags to be invalidated again after the operation\'s timeout (bounded, 10,000, shared fairly between tenants)', registers, collect () { this.set(cache().laterInvalidations) } }) // eslint-disable-line no-new
  // Optimization: an op's label children are resolved at its first call, not per call (bounded
  // by the catalog: three outcomes per cached op).
  const byOp = new Map<string, Record<CacheOutcome, CounterSeries>>()
  const childrenOf = (op: string): Record<CacheOutcome, CounterSeries> => {
    let children = byOp.get(op)
    if (children === undefined) {
      children = { hit: outcomes.series(op, 'hit'), miss: outcomes.series(op, 'miss'), stale: outcomes.series(op, 'stale') }
      byOp.set(op, children)
    }
    return children
  }
  return {
    outcome: (op, outcome) => { childrenOf(op)[outcome].inc() },
    coalesced: op => coalesced.labels(op).inc(),
    invalidated: (source, n) => invalidated.labels(source).inc(n),
    fallback: operation => fallbacks.labels(operation).inc(),
    discarded: op => discarded.labels(op).inc(),
    evicted: () => evictions.inc(),
    lost: n => lost.inc(n),
    tagEvicted: list => tagEvictions.labels(list).inc()
  }
}

async function cachePlugin (app: FastifyInstance, opts: CacheOptions): Promise<void> {
  const manifest = app.pipeline.manifest
  const shared = opts.store === 'redis' && app.hasDecorator('redis') ? app.redis : null
  // A tag version must outlive every entry stored under it and every refill in flight.
  let longestMs = 60_000
  for (const op of manifest.operations) {
    if (op.cache === null) continue
    longestMs = Math.max(longestMs, ((op.cache.ttlSeconds ?? opts.defaultTtlSeconds) + op.cache.swrSeconds + STALE_IF_ERROR_SECONDS) * 1000 + op.timeoutMs + 60_000)
  }
  let cache: ResponseCache | null = null
  const metrics = cacheMetrics(app, () => cache!)
  // Each tenant's entries in Redis are bounded (RedisTier): one tenant's distinct reads filled it,
  // and Redis then evicted other tenants' idempotency records and rate-limit windows (or, under
  // noeviction, refused every tenant's writes).
  const tenantFull = shared !== null && app.hasDecorator('metrics')
    ? new Counter({ name: 'mantle_cache_redis_tenant_full_total', help: 'Answers not written to Redis because their tenant\'s entries there would take more than BFF_CACHE_REDIS_MAX_BYTES_PER_TENANT (this instance keeps them in memory, unless over an eighth of BFF_CACHE_MAX_BYTES)', registers: [app.metrics.registry] })
    : null
  cache = new ResponseCache({
    redis: shared === null
      ? null
      : {
          tier: new RedisTier(shared.client, longestMs, Math.max(1000, opts.maxSize * 4), metrics === undefined ? undefined : () => { metrics.tagEvicted('known') }, opts.maxBytesPerTenant ?? Infinity, tenantFull === null ? undefined : () => { tenantFull.inc() }),
          up: shared.up,
          denied: (err: unknown) => shared.denied(CACHE, err),
          allowed: (command: string) => { shared.allowed(CACHE, command) },
          refuses: () => shared.refuses(CACHE)
        },
    maxSize: opts.maxSize,
    maxBytes: opts.maxBytes,
    defaultTtlSeconds: opts.defaultTtlSeconds,
    breakerOpen: () => app.kernel.breakerState() === 'open',
    serializer: name => app.pipeline.entry(name).serialize,
    instanceId: randomUUID(),
    metrics,
    now: opts.now,
    log: app.log
  })
  const c = cache

  if (shared !== null) {
    // A subscriber of its own (a subscribed connection runs no commands). Commands wait for it
    // (offline queue). It subscribes itself on each 'ready', not through ioredis' autoResubscribe:
    // that one drops the promise of the SUBSCRIBE it sends after a reconnect, and a SUBSCRIBE that
    // timed out (a starved or slow Redis) or whose connection closed (a shutdown, another cut) was
    // an unhandled rejection, which ends a Node process; and the connection then stayed ready
    // without the subscription, missing every other instance's invalidation until it next dropped.
    // Its commands on their way when the connection drops fail then (maxRetriesPerRequest 0;
    // autoResendUnfulfilledCommands is off, the shared connection's): with null ioredis kept them
    // unsettled, and a SUBSCRIBE caught so held off the new connection's own (one at a time)
    // until its command timeout, which then dropped that connection, ready, to subscribe on the
    // next: an extra reconnect, and the in-process tier emptied twice.
    const subscriber = shared.client.duplicate({ lazyConnect: false, enableOfflineQueue: true, maxRetriesPerRequest: 0, autoResubscribe: false, connectionName: 'mantle-cache-sub' })
    let lost = false
    // Not subscribed yet (at start-up, or since its connection closed): what the in-process tier
    // takes in meanwhile may miss an invalidation, published before Redis had the SUBSCRIBE.
    let unsubscribed = true
    let closing = false
    let subscribeWarned = false
    let subscribedOnce!: () => void
    const firstSubscribe = new Promise<void>(resolve => { subscribedOnce = resolve })
    subscriber.on('error', (err: Error) => app.log.debug({ err: err.message }, 'cache subscriber error'))
    subscriber.on('close', () => { lost = true; unsubscribed = true })
    let subscribing = false
    const subscribe = (): void => {
      if (subscribing) return
      subscribing = true
      subscriber.subscribe(INVALIDATE_CHANNEL).then(() => {
        subscribeWarned = false
        shared.allowed(CACHE_SUBSCRIBER)
        if (!unsubscribed || subscriber.status !== 'ready') return
        unsubscribed = false
        c.resync()
        subscribedOnce()
      }, (err: Error) => {
        // Its connection dropped on the way: the next 'ready' subscribes.
        if (closing || err.name === 'MaxRetriesPerRequestError') return
        // Refused for want of permission (the ACL of REDIS_URL's user changed: `resetchannels`,
        // `-subscribe`): reported to the shared connection (logged once, /readyz fails naming
        // it), and asked again at each PING answered on this connection and when Redis permits
        // it. Made anew at each refusal, the connection was made ~10 times a second for as long
        // as the ACL stayed so (each ready at once, refused at once).
        if (shared.denied(CACHE_SUBSCRIBER, err)) return
        // Logged once until a SUBSCRIBE succeeds: a Redis that stays slow fails each attempt.
        if (!subscribeWarned) app.log.warn({ err: err.message }, 'cache: cannot subscribe to invalidations: reconnecting the subscriber')
        subscribeWarned = true
        if (subscriber.status === 'ready') subscriber.disconnect(true)
      }).finally(() => { subscribing = false })
    }
    subscriber.on('ready', () => {
      // Messages sent while it was away are lost: the in-process tier starts over.
      if (lost) c.resync()
      lost = false
      // A SUBSCRIBE that fails leaves the connection unsubscribed: it is made anew (its 'close'
      // marks what it heard since as lost), and subscribes again once ready. Once subscribed,
      // the tier starts over again: an entry it took in after 'ready' (or at start-up) whose
      // invalidation came before Redis had the SUBSCRIBE was served until it expired.
      subscribe()
    })
    subscriber.on('message', (_channel: string, text: string) => c.received(text))
    c.hearing = () => !unsubscribed
    // The subscriber only listens: a connection that stopped bringing anything (a flow a failover
    // left half-open, a Redis that hangs) stayed ready and subscribed, and every other instance's
    // invalidation was missed: the in-process tier served what they dropped as hits until it
    // expired, for as long as the connection stayed so. A PING (allowed while subscribed), as the
    // shared connection's heartbeat: two in a row unanswered within the command timeout drop the
    // connection; it is made anew ('close', then 'ready': the tier starts over) and subscribes.
    const probe = watchPings(subscriber, SUBSCRIBER_PROBE_MS, 2, {
      // A SUBSCRIBE Redis refused for want of permission is asked again (not another connection).
      heard: () => { if (unsubscribed && shared.refuses(CACHE_SUBSCRIBER)) subscribe() },
      deaf: (err) => { app.log.warn({ err: err.message }, 'cache: the invalidations subscriber did not answer two PINGs in time: reconnecting it') }
    })
    // /diagz: healthy again as soon as Redis answers (a PING too). Its connection ready again
    // ends the hold after a failed command, and invalidations made while Redis was away reach it.
    shared.onAnswer(() => { c.redisAnswers() })
    // Redis permits the tier's commands again (an ACL put back): as a reconnection (pending
    // invalidations are replayed at once).
    shared.onAllowed(() => {
      c.redisReconnected()
      if (unsubscribed && subscriber.status === 'ready') subscribe()
    })
    const reconnected = (): void => { c.redisReconnected() }
    shared.client.on('ready', reconnected)
    app.addHook('onClose', async () => {
      shared.client.off('ready', reconnected)
      closing = true
      clearInterval(probe)
      subscriber.disconnect()
    })
    if (app.hasDecorator('metrics')) {
      new Gauge({ name: 'mantle_cache_subscriber_up', help: '1 while the cache invalidations subscriber is connected and subscribed (absent without Redis)', registers: [app.metrics.registry], collect () { this.set(unsubscribed ? 0 : 1) } }) // eslint-disable-line no-new
    }
    // Calls served before the first SUBSCRIBE: the resync it brings made a cold key's callers
    // after it start a second Kernel call beside the first one's (its answer may predate an
    // invalidation the subscriber never heard), and an entry taken in before it was dropped.
    // With Redis up, the gateway listens once subscribed (2 s at most: then as before).
    if (shared.up()) await Promise.race([firstSubscribe, sleep(FIRST_SUBSCRIBE_WAIT_MS, undefined, { ref: false })])
  }
  // Registered after the Redis plugin, so this runs before its connection closes.
  app.addHook('onClose', async () => { await c.close() })

  app.pipeline.addStage({ name: 'cache', order: StageOrder.cache, build: op => c.stage(op) })

  const invalidate = async (tenant: string, tags: readonly string[]): Promise<void> => await c.invalidate(tenant, tags, 'mutation')
  app.decorate('responseCache', { store: shared === null ? 'memory' : 'redis', cache: c, invalidate })
  if (app.hasDecorator('diagz')) {
    app.diagz.addStore('cache', () => {
      // The entries held: those expired or invalidated are dropped when read, when a bound needs
      // room or (expired ones) by a scrape's pass, not here (a check must be cheap: a pass over a
      // million entries takes seconds, and an invalidated entry is found only by reading it).
      const health = sharedStoreHealth(shared !== null, c.redisHealthy === true, `${c.memory.size} entries in memory, expired or invalidated ones included until dropped`)
      // Invalidations Redis has not had (pending, lost): only with Redis, only when there are some.
      const invalidations = shared === null ? null : c.invalidationsDetail
      return invalidations === null ? health : { ...health, detail: health.detail === undefined ? invalidations : `${health.detail}; ${invalidations}` }
    })
  }

  // Its entry names the tenant whose tags were dropped, the tags and how many (audit on).
  const audit = app.hasDecorator('audit') ? app.audit : null
  app.post('/admin/cache/invalidate', {
    config: { audit: 'admin.cache.invalidate' },
    onRequest: app.requireRole('system'),
    schema: {
      hide: true,
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['tags'],
        properties: {
          tags: { type: 'array', minItems: 1, maxItems: 1000, items: { type: 'string', minLength: 1, maxLength: 1024 } },
          // What a token's tid may be (a lone surrogate, say, made the key's encoding throw: 500).
          tenant: { type: 'string', minLength: 1, maxLength: 256, pattern: HEADER_SAFE.source }
        }
      },
      response: { 200: { type: 'object', properties: { tenant: { type: 'string' }, tags: { type: 'array', items: { type: 'string' } } } } }
    }
  }, async (request) => {
    const body = request.body as { tags: string[], tenant?: string }
    // By default the caller's own tenant; a system caller may name another one.
    const tenant = body.tenant ?? app.identify(request.headers.authorization, request.raw).tenant
    const tags = [...new Set(body.tags)]
    audit?.describe(request, { tenant, tags: auditedTags(tags), tagCount: tags.length })
    await c.invalidate(tenant, tags, 'admin')
    return { tenant, tags }
  })
}

export default fp(cachePlugin, { name: 'mantle-cache', dependencies: ['mantle-pipeline', 'mantle-kernel'], fastify: '5.x' })
