import { CallContext, canonicalJson, type Next, type CacheOutcome } from '../pipeline/index.js'
import type { Operation } from '../../manifest.js'
import { MantleError } from '../../errors.js'
import { MemoryTier, type CachedAnswer } from './memory.js'
import type { RedisTier } from './redis.js'
import { etagOf, localKey, matchesIfNoneMatch, policyOf, sharedKey, tagKey, tagTemplate, takesIfNoneMatch } from './keys.js'
import { FairLru } from '../../fair-lru.js'

/** How long an entry is kept past its swr window, to answer (marked stale) while the Kernel is down. */
export const STALE_IF_ERROR_SECONDS = 300
/** Added to the longest entry's life for the spell without Redis entries after a lost invalidation, as the plugin adds to a tag's. */
const LOST_MARGIN_MS = 60_000
/**
 * After a Redis failure the shared tier is left alone this long: calls use memory, not a timeout
 * each. Then one call tries Redis again (the others staying off it for another hold) until a
 * command answers, as the rate limiter does (RateLimiter.check).
 */
const REDIS_HOLD_MS = 1000
/** Invalidations that could not reach Redis, kept to be replayed when it is back. */
const MAX_PENDING_TAGS = 10_000
/**
 * Tenants whose lost invalidations are remembered one by one (the spell without Redis entries
 * is theirs alone); past it (the spells over make room first), the spell covers every tenant,
 * and the list starts over.
 */
const MAX_LOST_TENANTS = 10_000
/** A spell without Redis entries: from the tenant's latest lost invalidation (`at`) until `until`. */
interface Spell { at: number, until: number }
/** Second invalidations waiting for their time (a mutation's tags whose Kernel call got no answer). */
const MAX_LATER_INVALIDATIONS = 10_000
interface LaterInvalidation { tenant: string, tags: readonly string[], timer: NodeJS.Timeout }

export interface CacheMetrics {
  outcome: (op: string, outcome: CacheOutcome) => void
  coalesced: (op: string) => void
  invalidated: (source: InvalidationSource, tags: number) => void
  fallback: (operation: 'read' | 'write' | 'invalidate') => void
  discarded: (op: string) => void
  /** An entry of the in-process tier pushed out by its bounds. */
  evicted: () => void
  /** Invalidated tags dropped, not kept to be replayed: MAX_PENDING_TAGS were waiting already. */
  lost: (tags: number) => void
  /** A tag version pushed out of its list at the list's bound (the clock's marks or floors, the Redis tier's known versions). */
  tagEvicted: (list: TagVersionList) => void
}

/** The bounded lists of tag versions: the in-process clock's marks and floors, the Redis tier's known versions. */
export type TagVersionList = 'marks' | 'floors' | 'known'

export type InvalidationSource = 'mutation' | 'admin' | 'remote'

// The roles of a user-scoped key, made once per roles array: identities are cached per token
// and frozen, so a token's calls share one array (sorting and encoding on every hit cost ~10x).
const rolesSegments = new WeakMap<readonly string[], string>()
function rolesSegment (roles: readonly string[]): string {
  let segment = rolesSegments.get(roles)
  if (segment === undefined) {
    segment = encodeURIComponent([...roles].sort().join(','))
    rolesSegments.set(roles, segment)
  }
  return segment
}

export interface ResponseCacheOptions {
  /**
   * null: memory only. `denied`: told of each failed Redis command (true: Redis refused it for
   * want of permission); `allowed`: a command (`mget`, a script's `evalsha`) went through while
   * Redis refused the tier some; `refuses`: whether Redis
   * refuses the tier its commands now (the shared connection's, plugins/redis).
   */
  redis: { tier: RedisTier, up: () => boolean, denied?: (err: unknown) => boolean, allowed?: (command: TierCommand) => void, refuses?: () => boolean } | null
  maxSize: number
  /** Bytes of answers the in-process tier holds, about. */
  maxBytes: number
  defaultTtlSeconds: number
  /** Whether the Kernel's circuit breaker is open (then stale entries answer). */
  breakerOpen: () => boolean
  /** The op's compiled output serializer: entries hold exactly what clients receive. */
  serializer: (op: string) => (value: unknown) => string
  /** The id this instance signs its invalidation messages with. */
  instanceId: string
  metrics?: CacheMetrics | undefined
  now?: () => number
  log: { warn: (obj: object, msg: string) => void, debug: (obj: object, msg: string) => void }
}

/** An entry's keys: in this instance's tier (localKey) and in Redis (sharedKey). */
interface EntryKeys {
  readonly local: string
  readonly shared: string
}

interface Fill {
  readonly promise: Promise<CachedAnswer>
  /** The clock tick the read that started the Kernel call began at. */
  readonly since: number
}

/** The 2xx statuses HTTP lets a cache keep without explicit freshness (RFC 9110 §15.1): 200, 203, 204, 206. */
const KEPT_STATUSES: ReadonlySet<number> = new Set([200, 203, 204, 206])

const noop = (): void => {}
const noMetrics: CacheMetrics = { outcome: noop, coalesced: noop, invalidated: noop, fallback: noop, discarded: noop, evicted: noop, lost: noop, tagEvicted: noop }

/**
 * The response cache: an in-process LRU before Redis, one Kernel call per key at a time, stale
 * while revalidate, stale answers while the Kernel is down, tag invalidation on every instance.
 *
 * Not async-cache-dedupe: it dedupes and caches in one storage, but stores a result without
 * checking that its tags were not invalidated while the call ran (an invalidation racing a
 * refill would put the stale answer back), has no second tier, and reports hit or miss through
 * global hooks rather than per call. The coalescing it would give is the small in-flight map below.
 */
export class ResponseCache {
  readonly memory: MemoryTier
  private readonly inflight = new Map<string, Fill>()
  private readonly metrics: CacheMetrics
  private readonly now: () => number
  private redisHeldUntil = 0
  /** A Redis command failed and none has answered since (nor has the connection been made anew). */
  private redisOutage = false
  /** A Redis command failed and neither a command nor the heartbeat's PING has answered since (/diagz). */
  private redisFailing = false
  /**
   * Tag key -> the clock tick of its latest invalidation that Redis has not received, by tenant.
   * Shared fairly (FairLru): past MAX_PENDING_TAGS, the tenant holding the most gives up its
   * oldest (`evicted`), or the tag being added when that is its own tenant (a tie included). In
   * one pool, first come first kept, one tenant's mutations during an outage filled it, and every
   * other tenant's invalidation after that was lost.
   */
  private readonly pending = new FairLru<number>(MAX_PENDING_TAGS, Infinity, (_key, tenant) => { (this.evicted ??= new Map()).set(tenant, (this.evicted.get(tenant) ?? 0) + 1) })
  /** The tags each tenant gave up to another's while an invalidation was added (null: none). */
  private evicted: Map<string, number> | null = null
  /**
   * No entry of a tenant read from Redis is used during its spell: an invalidation of its tags
   * past MAX_PENDING_TAGS was lost, and Redis keeps what it dropped, under versions it never
   * bumped, until the entry's lifetime ends. Before, once Redis answered again, this instance
   * read such an entry back and served it as a hit. A tag key names its tenant, and an entry's
   * tags are its own tenant's (tagKey): a lost invalidation leaves no other tenant's entry stale.
   * So the spell is the tenants' whose invalidations were lost (before, every tenant's, for one
   * tenant's mutation). By tenant, MAX_LOST_TENANTS at most.
   */
  private readonly lostTenants = new Map<string, Spell>()
  /**
   * The spell of every tenant, once more than MAX_LOST_TENANTS tenants are in one (`at` 0: never);
   * and the tenants' spells over that made room in the list, over too (a reload may start it again).
   */
  private readonly lostAll: Spell = { at: 0, until: 0 }
  /** The latest end of any spell (0: none ever): reads check a tenant's only before then. */
  private lostUntil = 0
  /** Invalidated tags lost since start (mantle_cache_invalidations_lost_total, /diagz). */
  private lostTags = 0
  /**
   * How long an entry of each operation's stage lives after it is made (ttl, swr,
   * stale-if-error: what its policy says), by operation: the stages of the manifest in force. A
   * spell lasts the longest of them (and of the stages replaced below), and the longest call.
   */
  private readonly lives = new Map<string, number>()
  /**
   * The longest Kernel call of any stage built since start (its timeout). Not in an entry's
   * policy: an instance still running a longer one stores entries of the same policy made that
   * much later. Only grows, as a manifest allows, 600 s at most.
   */
  private longestCallMs = 0
  /**
   * The longest life of a stage a reload replaced, and until when an entry it made may still
   * exist (its calls in flight included: replaced at + its life + LOST_MARGIN_MS). Before, the
   * spell lasted the longest life of any manifest the process ever ran: after a reload that
   * shortened every ttl from a day to a minute, a lost invalidation still kept every read off
   * Redis for two days, though no entry this instance takes could live that long (an entry
   * carries its policy, ttl included, and another policy's is not served).
   */
  private readonly retired = { until: 0, ms: 0 }
  private replayTimer: ReturnType<typeof setTimeout> | undefined
  /**
   * Second invalidations (invalidateLater), by tenant and tags. Shared fairly (FairLru): past
   * MAX_LATER_INVALIDATIONS, the oldest of the tenant holding the most is carried out at once
   * (sooner than its time). In one pool, one tenant's mutations without an answer had every other
   * tenant's second invalidation carried out at once, which then no longer covered a read made
   * before the Kernel's change.
   */
  private readonly later = new FairLru<LaterInvalidation>(MAX_LATER_INVALIDATIONS, Infinity, (_key, _tenant, due) => {
    clearTimeout(due.timer)
    this.invalidate(due.tenant, due.tags, 'mutation').catch(noop)
  })

  private closed = false
  /** Until when a tag version found gone back is not logged again (warnBehind). */
  private behindWarnedUntil = 0

  /**
   * Whether this instance hears the other instances' invalidations (its subscriber subscribed;
   * set by the plugin). While it does not, Redis up, an entry in memory is served only as Redis
   * holds it: the subscriber away for long (Redis full at maxclients for new connections, a path
   * to it that stays broken), memory served what other instances had invalidated, and what it
   * took from Redis meanwhile, as hits for their ttl, Redis answering all along.
   */
  hearing: () => boolean = () => true

  constructor (private readonly opts: ResponseCacheOptions) {
    this.now = opts.now ?? Date.now
    this.metrics = opts.metrics ?? noMetrics
    this.memory = new MemoryTier(opts.maxSize, opts.maxBytes, this.now, () => { this.metrics.evicted() }, list => { this.metrics.tagEvicted(list) })
  }

  /** Entries of each bounded list of tag versions (`known` absent without Redis). */
  get tagVersions (): Partial<Record<TagVersionList, number>> {
    const sizes: Partial<Record<TagVersionList, number>> = { marks: this.memory.clock.size, floors: this.memory.clock.floorsSize }
    if (this.opts.redis !== null) sizes.known = this.opts.redis.tier.knownSize
    return sizes
  }

  get inFlight (): number {
    return this.inflight.size
  }

  /** Whether the shared tier answers: Redis connected and its last call did not fail (null: memory only). */
  get redisHealthy (): boolean | null {
    const redis = this.opts.redis
    if (redis === null) return null
    return redis.up() && !this.redisFailing
  }

  /**
   * Redis answers again (reconnected, or the heartbeat's PING answered): the tier is healthy now,
   * not at the next cache call, which may be long in coming (/diagz said unhealthy until then).
   * A PING answer does not end the hold after a failed command, nor the outage: a Redis that
   * stalls now and then answers some PINGs, and every call after each of them waited out the
   * command timeout. The next command that answers ends it, or the connection made anew
   * (redisReconnected).
   */
  redisAnswers (): void {
    // Redis refusing the tier its commands answers PINGs all the same: /diagz said healthy again
    // each second, the next call failing again.
    if (!this.redisFailing || this.opts.redis?.refuses?.() === true) return
    this.redisFailing = false
    this.opts.log.debug({}, 'cache: Redis answers again')
  }

  /**
   * Redis' connection is ready again (ioredis 'ready'): the hold ends and the next calls go to
   * Redis (the commands a reset connection failed say nothing of the new one). Pending
   * invalidations are replayed.
   */
  redisReconnected (): void {
    // As the end of an outage, whether a command had failed or not: the hold ends and pending
    // invalidations are replayed (redisRecovered).
    this.redisOutage = true
    this.redisRecovered()
  }

  /** The pipeline stage of a cached query, or of a mutation that invalidates tags; else null. */
  stage (op: Operation): ((ctx: CallContext, next: Next) => Promise<unknown>) | null {
    if (op.cache !== null) return this.queryStage(op, op.cache)
    // A reload took its cache away: its stage's entries may live on as long as they were made for.
    this.retire(op.name)
    if (op.invalidates.length > 0) {
      const templates = op.invalidates.map(tagTemplate)
      return async (ctx, next) => {
        let changed = true
        let unanswered = false
        try {
          return await next(ctx)
        } catch (err) {
          // The Kernel may have made the change though the call failed: it answered 2xx and the
          // answer was refused after (empty, or breaking the output schema: a 502), or it was
          // asked and did not refuse (a 5xx, no answer in time, the connection lost after the
          // request went out). Before, no tag was dropped then (on a lost connection still not),
          // and every instance served the old entry as a hit for its ttl. A call never sent
          // (breaker open, bulkhead full, its time out before a connection, the connection
          // refused) changed nothing.
          // A refusal after a retry does not undo what an earlier attempt may have done (retriedSent).
          const code = err instanceof MantleError ? err.code : null
          changed = ctx.answered || (ctx.sent && ((code !== 'KERNEL_REJECTED' && code !== 'NOT_FOUND') || ctx.retriedSent))
          unanswered = changed && !ctx.answered && (code === 'KERNEL_TIMEOUT' || code === 'KERNEL_UNAVAILABLE')
          throw err
        } finally {
          if (changed) {
            const tags = templates.map(t => t(ctx.input))
            await this.invalidate(ctx.tenant, tags, 'mutation')
            if (unanswered) this.invalidateLater(ctx.tenant, tags, op.timeoutMs)
          }
        }
      }
    }
    return null
  }

  private queryStage (op: Operation, spec: NonNullable<Operation['cache']>): (ctx: CallContext, next: Next) => Promise<unknown> {
    const ttlMs = (spec.ttlSeconds ?? this.opts.defaultTtlSeconds) * 1000
    const swrMs = spec.swrSeconds * 1000
    this.retire(op.name)
    this.lives.set(op.name, ttlMs + swrMs + STALE_IF_ERROR_SECONDS * 1000)
    this.longestCallMs = Math.max(this.longestCallMs, op.timeoutMs)
    // A reload after a lost invalidation: other instances that ran this stage before may have
    // stored entries of it, under the versions Redis never bumped, that outlive the spell as it
    // was set (or the spell was over: it starts again from the loss).
    this.lengthenSpells()
    const templates = spec.tags.map(tagTemplate)
    const serialize = this.opts.serializer(op.name)
    const name = op.name
    const policy = policyOf(op, spec, this.opts.defaultTtlSeconds)
    const make = (value: unknown, status: number): CachedAnswer => {
      const json = serialize(value)
      const now = this.now()
      return { value: JSON.parse(json), json, status, etag: etagOf(json), freshUntil: now + ttlMs, staleUntil: now + ttlMs + swrMs, keepUntil: now + ttlMs + swrMs + STALE_IF_ERROR_SECONDS * 1000, policy }
    }
    // A user's own answers: the user and the roles the Kernel is told (x-user-roles) are part of
    // the key's input, as `{user}:{roles}:` before it (URI-encoded, so neither holds a ':'; a
    // canonical input starts with '{'; the roles sorted). Keyed by the user alone, an answer
    // made for one token's roles was served to the same user under another token's (fewer)
    // roles. Tags stay the tenant's: an invalidation drops every user's entries.
    const perUser = spec.scope === 'user'
    return async (ctx, next) => {
      const input = canonicalJson(ctx.input)
      const canonical = perUser ? encodeURIComponent(ctx.user) + ':' + rolesSegment(ctx.roles) + ':' + input : input
      const local = localKey(name, ctx.tenant, canonical)
      let found = this.memory.get(local)
      if (found !== undefined && found.policy !== policy) found = undefined
      const deaf = this.opts.redis !== null && !this.hearing()
      if (found !== undefined && !deaf && this.now() < found.freshUntil) return this.answer(ctx, name, found, 'hit', ttlMs)
      // A miss of the in-process tier: the Redis key and the tag keys are needed from here on.
      const key: EntryKeys = { local, shared: sharedKey(name, ctx.tenant, canonical) }
      const tagKeys = templates.map(t => tagKey(ctx.tenant, t(ctx.input)))
      const since = this.memory.clock.now()
      let versions: string | null = null
      const redis = this.redisTier('read')
      if (redis !== null) {
        try {
          const read = await redis.read(key.shared, tagKeys)
          this.redisRecovered('mget')
          // Deaf to invalidations: what memory holds counts only as Redis has it (Redis away, the
          // read failed: memory alone answers, as it does then).
          if (deaf) found = undefined
          versions = read.versions
          if (read.behind !== undefined) {
            // Redis went back (a replica promoted behind its primary): entries the invalidations
            // it lost dropped match their tags again. The tags are moved past what was known, on
            // every instance, unless they are past it now (the read was answered before an
            // invalidation heard meanwhile); this call's answer is not written to Redis (its
            // versions are old).
            versions = null
            const moved = await redis.raise(read.behind, this.opts.instanceId)
            if (moved > 0) {
              this.warnBehind(ctx.tenant, moved)
              this.memory.clock.invalidate(read.behind)
            }
          }
          // While one of its tags waits to be replayed, Redis still holds the versions the entry
          // was stored under: it may predate the invalidation and is not used.
          if (read.answer !== null && read.answer.policy === policy && read.answer.keepUntil > this.now() && (found === undefined || read.answer.freshUntil > found.freshUntil) && !this.anyPending(tagKeys) && !this.inSpell(ctx.tenant)) {
            found = read.answer
            this.memory.set(local, ctx.tenant, found, tagKeys, since)
          }
        } catch (err) {
          this.redisFailed('read', err)
        }
      }
      const now = this.now()
      if (found !== undefined) {
        if (now < found.freshUntil) return this.answer(ctx, name, found, 'hit', ttlMs)
        if (now < found.staleUntil) {
          this.refresh(name, key, tagKeys, since, versions, ctx, next, make)
          return this.answer(ctx, name, found, 'stale', ttlMs)
        }
        if (this.opts.breakerOpen()) return this.answer(ctx, name, found, 'stale', ttlMs)
      }
      try {
        const filled = await this.fill(name, key, tagKeys, since, versions, ctx, next, make)
        return this.answer(ctx, name, filled, 'miss', ttlMs)
      } catch (err) {
        if (found !== undefined && kernelDown(err)) return this.answer(ctx, name, found, 'stale', ttlMs)
        throw err
      }
    }
  }

  /** `ttlMs`: the op's ttl, the most freshness an answer of its policy has (the max-age said at most). */
  private answer (ctx: CallContext, op: string, a: CachedAnswer, outcome: CacheOutcome, ttlMs: number): unknown {
    ctx.cache = outcome
    ctx.status = a.status
    // What the entry holds is exactly what the op's serializer made of the answer.
    ctx.json = a.json
    ctx.setHeader('x-cache', outcome)
    if (ctx.protocol === 'rest') {
      // Where If-None-Match is read (a GET): a POST query's ETag could never give a 304.
      if (takesIfNoneMatch(ctx.op)) {
        ctx.setHeader('etag', a.etag)
        // A 304 stands for the 200 it spares (RFC 9110 §15.4.5): a 202 or a 204 is answered as it is.
        if (ctx.ifNoneMatch !== undefined && a.status === 200 && matchesIfNoneMatch(ctx.ifNoneMatch, a.etag)) ctx.status = 304
      }
      // At most the ttl: `freshUntil` is a time of day (instances share it through Redis), and a
      // wall clock stepped back an hour made an entry's remaining freshness an hour longer, which
      // a browser then kept the answer for.
      const maxAge = outcome === 'stale' ? 0 : Math.max(0, Math.ceil(Math.min(a.freshUntil - this.now(), ttlMs) / 1000))
      ctx.setHeader('cache-control', `private, max-age=${maxAge}`)
      // The answer is the token's (its tenant, or its user): a browser's cache may reuse it only
      // for the same Authorization (RFC 9111 §4.1), not for the next user of that browser.
      ctx.setHeader('vary', 'authorization')
    }
    this.metrics.outcome(op, outcome)
    return a.value
  }

  /**
   * One Kernel call per key at a time: later callers of the key wait for the first one's, unless
   * its tags were invalidated since it began (it may answer what the invalidation replaced). Then
   * the caller makes a call of its own, which the key's later callers wait for instead.
   */
  private async fill (op: string, key: EntryKeys, tagKeys: readonly string[], since: number, versions: string | null, ctx: CallContext, next: Next, make: (value: unknown, status: number) => CachedAnswer): Promise<CachedAnswer> {
    const running = this.running(key.local, tagKeys)
    if (running !== undefined) {
      this.metrics.coalesced(op)
      try {
        return await running.promise
      } catch (err) {
        // The first caller left and its Kernel call was cancelled (CLIENT_CLOSED): the callers
        // still here are not answered so; the first of them makes the key's call again.
        if (!(err instanceof MantleError && err.code === 'CLIENT_CLOSED')) throw err
        if (this.inflight.get(key.local) === running) this.inflight.delete(key.local)
        return await this.fill(op, key, tagKeys, since, versions, ctx, next, make)
      }
    }
    const own: Fill = { promise: this.load(op, key, tagKeys, since, versions, ctx, next, make), since }
    this.inflight.set(key.local, own)
    try {
      return await own.promise
    } finally {
      // A newer call of the key may have taken the place of this one: it stays.
      if (this.inflight.get(key.local) === own) this.inflight.delete(key.local)
    }
  }

  /** The key's Kernel call in flight, if its tags (the same for every caller of the key) still hold since it began. */
  private running (local: string, tagKeys: readonly string[]): Fill | undefined {
    const fill = this.inflight.get(local)
    return fill !== undefined && this.memory.clock.valid(tagKeys, fill.since) ? fill : undefined
  }

  private async load (op: string, key: EntryKeys, tagKeys: readonly string[], since: number, versions: string | null, ctx: CallContext, next: Next, make: (value: unknown, status: number) => CachedAnswer): Promise<CachedAnswer> {
    // A Kernel call of its own, not the one an identical call of its request (a batch, a GraphQL
    // document) made, which the request's memo would hand it: that one may have begun before an
    // invalidation this call began after (`since`), and its answer was stored under the new tag
    // versions, in memory and in Redis, and served as a hit on every instance for its ttl. The
    // cache's own coalescing (fill) shares a call between a request's identical calls when no
    // invalidation came between them.
    ctx.memo = null
    const value = await next(ctx)
    const answer = make(value, ctx.status)
    // Only 2xx answers return from the Kernel call (errors throw); of those, only the ones HTTP
    // lets a cache keep by default are stored (KEPT_STATUSES). Another (a 202: the work is under
    // way, the answer not known yet) is answered as it came and fresh for no one: before, it was
    // stored and replayed as a hit for the ttl to a client polling for the answer.
    if (!KEPT_STATUSES.has(answer.status)) return { ...answer, freshUntil: Math.min(answer.freshUntil, this.now()) }
    // Tags invalidated during the call: the answer may predate the change, and memory.set below
    // refuses it. Not written to Redis either: were the invalidation lost (Redis away, the pending
    // bound reached), its versions would never be bumped and every other instance would serve it.
    // The subscriber reconnected meanwhile (the clock's epoch) does not stop the write: the
    // messages it may have missed are invalidations Redis has had, which its script checks.
    let stored = this.memory.clock.valid(tagKeys, since, false)
    const redis = versions === null || !stored ? null : this.redisTier('write')
    if (redis !== null) {
      try {
        stored = await redis.write(key.shared, tagKeys, versions!, answer, this.now())
        this.redisRecovered('evalsha')
      } catch (err) {
        this.redisFailed('write', err)
      }
    }
    if (stored) stored = this.memory.set(key.local, ctx.tenant, answer, tagKeys, since)
    if (stored) return answer
    this.metrics.discarded(op)
    // Fresh for no one: it may predate the change the invalidation stands for. Said fresh for the
    // ttl, a browser kept it (max-age) and answered it to the page's next read, after the
    // mutation's own answer had dropped what the browser held of the URL (RFC 9111 §4.4).
    return { ...answer, freshUntil: Math.min(answer.freshUntil, this.now()) }
  }

  /** Stale while revalidate: one background refill per key, with a context of its own. */
  private refresh (op: string, key: EntryKeys, tagKeys: readonly string[], since: number, versions: string | null, ctx: CallContext, next: Next, make: (value: unknown, status: number) => CachedAnswer): void {
    if (this.running(key.local, tagKeys) !== undefined) return
    const own = new CallContext(ctx.requestId + '.refresh', ctx.protocol, ctx.op, ctx.input, ctx.authorization, ctx.traceparent, undefined)
    own.tracestate = ctx.tracestate
    own.clientRequestId = ctx.clientRequestId
    own.tenant = ctx.tenant
    own.user = ctx.user
    own.roles = ctx.roles
    own.zone = ctx.zone
    this.fill(op, key, tagKeys, since, versions, own, next, make).catch((err: unknown) => {
      this.opts.log.debug({ err, op }, 'cache refresh failed: the stale answer stays until its window ends')
    })
  }

  /**
   * Drops one tenant's tags on every instance: its own tier at once, Redis and the other
   * instances' tiers through one script. Never throws: with Redis away or held off the tags are
   * kept and replayed when it is back (its connection's 'ready') or when the hold ends.
   */
  async invalidate (tenant: string, tags: readonly string[], source: InvalidationSource): Promise<void> {
    // Each tag once: a mutation's templates may fill alike (user:{owner}, user:{assignee}), and a
    // tag named twice was counted twice and sent to Redis and every instance twice.
    const keys = (tags.length > 1 ? [...new Set(tags)] : tags).map(t => tagKey(tenant, t))
    this.memory.clock.invalidate(keys)
    this.metrics.invalidated(source, keys.length)
    if (this.opts.redis === null) return
    const redis = this.redisTier('invalidate')
    if (redis !== null) {
      try {
        await redis.invalidate(keys, this.opts.instanceId)
        this.redisRecovered('evalsha')
        // Marked again once Redis has it: a read of this instance that reached Redis before the
        // increment (ioredis resends a script as EVAL after NOSCRIPT, and a read may pass between)
        // put the old entry in memory after the first mark, to be served as a hit for its ttl.
        this.memory.clock.invalidate(keys)
        return
      } catch (err) {
        this.redisFailed('invalidate', err)
      }
    }
    const tick = this.memory.clock.now()
    let lost = 0
    for (const k of keys) {
      // Past the bound, a tag already pending still takes this tick: the loop used to stop at
      // the first tag lost, and a replay under way then took a later one for replayed, though
      // it went out before this invalidation. A new tag is lost when its tenant holds the most
      // (with it, a tie too); else the tenant that does gives up its oldest (`evicted`).
      if (this.pending.size >= MAX_PENDING_TAGS && !this.pending.has(k) && this.pending.held(tenant).count + 1 >= this.pending.most) lost++
      else this.pending.set(k, tenant, tick, 0, Infinity)
    }
    if (lost > 0) this.lost(tenant, lost, keys.length)
    if (this.evicted !== null) {
      const evicted = this.evicted
      this.evicted = null
      for (const [other, n] of evicted) this.lost(other, n, keys.length)
    }
    this.scheduleReplay()
  }

  /** `n` of `tenant`'s invalidated tags will never reach Redis (see `lose`). */
  private lost (tenant: string, n: number, tags: number): void {
    // Logged once per tenant's spell (it came on every invalidation while the bound was
    // reached); once per spell of any tenant, a second tenant's spell went unsaid.
    if (!this.inSpell(tenant)) this.opts.log.warn({ tags, lost: n, tenant }, 'cache: too many invalidations waiting for Redis: some are lost; other instances serve what they drop until it expires, this one reads no entry of their tenant from Redis meanwhile')
    this.lose(tenant)
    this.lostTags += n
    this.metrics.lost(n)
  }

  /** A message of another instance: drops the tags from this instance's tier. */
  received (text: string): void {
    let message: { from?: unknown, db?: unknown, ms?: unknown, keys?: unknown, versions?: unknown }
    try {
      message = JSON.parse(text)
    } catch {
      return
    }
    if (message === null || typeof message !== 'object' || message.from === this.opts.instanceId || !Array.isArray(message.keys)) return
    const keys = message.keys.filter((k): k is string => typeof k === 'string')
    this.memory.clock.invalidate(keys)
    this.metrics.invalidated('remote', keys.length)
    // The versions the tags were given (none from a release before them): Redis answering one
    // below it later went back. Only those of this database: a message of another (a deployment
    // of its own on the same server) drops the tags from memory, as any message, and no more.
    // Remembered no longer than the tags live, by the sender's tag time (`ms`, its manifest's).
    const tier = this.opts.redis?.tier
    if (tier !== undefined && message.db === tier.db && typeof message.ms === 'number' && message.ms > 0 && Array.isArray(message.versions) && message.versions.length === message.keys.length && keys.length === message.keys.length) tier.learn(keys, message.versions, message.ms)
  }

  /** Redis answered tags below the versions known: logged once a minute at most (each is invalidated anew). */
  private warnBehind (tenant: string, tags: number): void {
    const now = this.now()
    if (now < this.behindWarnedUntil) return
    this.behindWarnedUntil = now + 60_000
    this.opts.log.warn({ tenant, tags }, 'cache: Redis holds tag versions older than this instance knew (a replica promoted behind its primary, or tags evicted under maxmemory): they are invalidated anew')
  }

  /** Invalidations may have been missed (the subscriber was away): nothing in memory is trusted. */
  resync (): void {
    this.memory.clock.invalidateAll()
    this.memory.clear()
  }

  /**
   * Replays the invalidations Redis missed while it was away or held off. The tags stay pending
   * until Redis has them, so that meanwhile no Redis read brings back an entry they dropped.
   */
  async replayPending (closing = false): Promise<void> {
    const redis = this.opts.redis
    // Redis down: its connection's 'ready' replays.
    if (redis === null || this.pending.size === 0 || !redis.up()) return
    // Held off (another call is trying Redis): the replay comes when the hold ends. Not at close,
    // when no replay comes after this one.
    if (!closing && !this.redisOpen()) {
      this.scheduleReplay()
      return
    }
    const replayed = [...this.pending.items()]
    const keys = replayed.map(([k]) => k)
    try {
      await redis.tier.invalidate(keys, this.opts.instanceId)
    } catch (err) {
      this.redisFailed('invalidate', err)
      this.scheduleReplay()
      return
    }
    // A tag invalidated again while the replay ran may not be covered by it: it stays for the next one.
    for (const [k, tick] of replayed) if (this.pending.peek(k) === tick) this.pending.delete(k)
    this.redisRecovered('evalsha')
  }

  /** One replay when the hold on Redis ends (at once when there is none). */
  private scheduleReplay (): void {
    if (this.replayTimer !== undefined || this.closed) return
    this.replayTimer = setTimeout(() => {
      this.replayTimer = undefined
      this.replayPending().catch(noop)
    }, Math.max(0, this.redisHeldUntil - performance.now()))
    this.replayTimer.unref()
  }

  /** The longest an entry this instance may take from Redis lives after its Kernel call began (lives, retired, the longest call). */
  private longestMs (): number {
    let ms = this.now() < this.retired.until ? this.retired.ms : 0
    for (const life of this.lives.values()) if (life > ms) ms = life
    return ms + this.longestCallMs
  }

  /** The stage of `name` is replaced (a reload) or gone: its entries count until they can no longer exist. */
  private retire (name: string): void {
    const life = this.lives.get(name)
    if (life === undefined) return
    this.lives.delete(name)
    const now = this.now()
    if (now >= this.retired.until) this.retired.ms = 0
    this.retired.ms = Math.max(this.retired.ms, life)
    // Its calls in flight may still make entries: until the longest call is over.
    this.retired.until = Math.max(this.retired.until, now + this.longestCallMs + life + LOST_MARGIN_MS)
  }

  /** An invalidation of `tenant`'s tags was lost: no entry of the tenant is taken from Redis for the longest an entry may live. */
  private lose (tenant: string): void {
    const now = this.now()
    const until = now + this.longestMs() + LOST_MARGIN_MS
    const all = this.lostAll
    if (now >= all.until && this.lostTenants.size >= MAX_LOST_TENANTS && !this.lostTenants.has(tenant)) {
      // The spells over make room (once the list is full: a pass at a loss, not per read). Before,
      // they stayed until the list overflowed, and 10,000 tenants that had ever lost one made the
      // next tenant's loss every tenant's. Each is folded into the spell of every tenant, still
      // over: a reload that lengthens a ttl starts it again from the loss (lengthenSpells), for
      // every tenant then, as it would have started the tenant's.
      for (const [name, spell] of this.lostTenants) {
        if (now < spell.until) continue
        all.at = Math.max(all.at, spell.at)
        all.until = Math.max(all.until, spell.until)
        this.lostTenants.delete(name)
      }
    }
    if (now < all.until || (this.lostTenants.size >= MAX_LOST_TENANTS && !this.lostTenants.has(tenant))) {
      // Every tenant's spell, from this loss (the latest: a reload lengthens every tenant's from
      // here). The tenants remembered are covered by it: the list starts over.
      all.at = now
      all.until = Math.max(all.until, until)
      for (const spell of this.lostTenants.values()) all.until = Math.max(all.until, spell.until)
      this.lostTenants.clear()
    } else {
      const spell = this.lostTenants.get(tenant)
      this.lostTenants.delete(tenant)
      this.lostTenants.set(tenant, { at: now, until: Math.max(spell?.until ?? 0, until) })
    }
    this.lostUntil = Math.max(this.lostUntil, until)
  }

  /** A stage built (a reload): the spells last as long as an entry may live from their loss under it. */
  private lengthenSpells (): void {
    if (this.lostUntil === 0) return
    const longest = this.longestMs() + LOST_MARGIN_MS
    for (const spell of [this.lostAll, ...this.lostTenants.values()]) {
      if (spell.at === 0) continue
      spell.until = Math.max(spell.until, spell.at + longest)
      this.lostUntil = Math.max(this.lostUntil, spell.until)
    }
  }

  /** Whether no entry of `tenant` is taken from Redis now: an invalidation of its tags was lost. */
  private inSpell (tenant: string): boolean {
    if (this.lostUntil === 0) return false
    const now = this.now()
    if (now >= this.lostUntil) return false
    if (now < this.lostAll.until) return true
    const spell = this.lostTenants.get(tenant)
    return spell !== undefined && now < spell.until
  }

  private anyPending (tagKeys: readonly string[]): boolean {
    if (this.pending.size === 0) return false
    for (const k of tagKeys) if (this.pending.has(k)) return true
    return false
  }

  get pendingInvalidations (): number {
    return this.pending.size
  }

  /**
   * /diagz's word on invalidations Redis has not had: how many tags wait to be replayed, and,
   * once any was lost, how many since start and until when no entry is read from Redis (null
   * when neither).
   */
  get invalidationsDetail (): string | null {
    const parts: string[] = []
    if (this.pending.size > 0) parts.push(`${this.pending.size} invalidated tags waiting for Redis`)
    if (this.lostTags > 0) {
      const now = this.now()
      let spell = ''
      if (now < this.lostAll.until) {
        spell = `, no entry read from Redis until ${new Date(this.lostUntil).toISOString()} for any tenant`
      } else if (now < this.lostUntil) {
        // At most MAX_LOST_TENANTS, on a /diagz read.
        let tenants = 0
        for (const s of this.lostTenants.values()) if (now < s.until) tenants++
        spell = `, no entry read from Redis until ${new Date(this.lostUntil).toISOString()} for ${tenants === 1 ? 'their tenant' : `their ${tenants} tenants`}`
      }
      parts.push(`${this.lostTags} invalidated tags lost since start${spell}`)
    }
    return parts.length === 0 ? null : parts.join('; ')
  }

  /**
   * Drops the tags again `ms` from now (the operation's timeout): a mutation that got no answer
   * may still be under way at the Kernel, and a read between the first invalidation and the
   * Kernel's change put the old answer back, under the new tag versions, for its whole ttl on
   * every instance. Repeats of the same tags share one timer; beyond MAX_LATER_INVALIDATIONS
   * the oldest of the tenant holding the most is carried out at once. Once the app closes, none
   * is scheduled.
   */
  invalidateLater (tenant: string, tags: readonly string[], ms: number): void {
    if (this.closed) return
    const k = JSON.stringify([tenant, tags])
    clearTimeout(this.later.peek(k)?.timer)
    this.later.delete(k)
    const timer = setTimeout(() => {
      this.later.delete(k)
      this.invalidate(tenant, tags, 'mutation').catch(noop)
    }, ms)
    timer.unref()
    this.later.set(k, tenant, { tenant, tags, timer }, 0, Infinity)
  }

  /** Invalidations waiting to be carried out again (invalidateLater). */
  get laterInvalidations (): number {
    return this.later.size
  }

  /**
   * The app closes: the scheduled replay stops, and the second invalidations still waiting are
   * carried out now, while Redis is still open (sooner than their time, but other instances keep
   * serving what this one would otherwise never drop); none is scheduled from now on. So are the
   * invalidations Redis has not had yet (the hold after a failed command not over: tried once, the
   * hold or not). Cancelled with the replay's timer, they were lost without a word: a gateway
   * stopped within a second of a Redis blip (a rolling deploy) left the mutations it had answered
   * uninvalidated on every other instance, which served what they dropped for its ttl.
   */
  async close (): Promise<void> {
    this.closed = true
    clearTimeout(this.replayTimer)
    this.replayTimer = undefined
    const due = [...this.later.items()].map(([, d]) => d)
    this.later.clear()
    for (const d of due) clearTimeout(d.timer)
    await Promise.all(due.map(async d => { await this.invalidate(d.tenant, d.tags, 'mutation') }))
    if (this.pending.size === 0) return
    await this.replayPending(true)
    if (this.pending.size > 0) this.opts.log.warn({ tags: this.pending.size }, 'cache: closing with invalidated tags Redis never had: other instances serve what they drop until it expires')
  }

  /** The Redis tier when it is usable; null (counted as a fallback when Redis is configured) when not. */
  private redisTier (operation: 'read' | 'write' | 'invalidate'): RedisTier | null {
    const redis = this.opts.redis
    if (redis === null) return null
    if (!redis.up() || !this.redisOpen()) {
      this.metrics.fallback(operation)
      return null
    }
    return redis.tier
  }

  /**
   * Whether a call may go to Redis now (its connection up): not during the hold after a failed
   * command. During an outage, one call at a time tries Redis again; the others stay off it until
   * it answers (its success ends the outage, its failure holds again). A Redis that stalls with
   * its connection open stays "up": after each hold, every call in flight waited out the command
   * timeout (500 ms) there.
   */
  private redisOpen (): boolean {
    const now = performance.now()
    if (now < this.redisHeldUntil) return false
    if (this.redisOutage) this.redisHeldUntil = now + REDIS_HOLD_MS
    return true
  }

  private redisFailed (operation: 'read' | 'write' | 'invalidate', err: unknown): void {
    // A refusal for want of permission is logged by the shared connection, once (plugins/redis).
    const refusal = this.opts.redis?.denied?.(err) === true
    // Logged once per outage (any Redis command that answers ends it), counted every time.
    if (!refusal && !this.redisOutage) this.opts.log.warn({ err: (err as Error).message, operation }, 'cache: Redis failed, serving from memory')
    this.redisOutage = true
    this.redisFailing = true
    this.redisHeldUntil = performance.now() + REDIS_HOLD_MS
    this.metrics.fallback(operation)
  }

  /**
   * A Redis command answered (`command`), or the connection is ready again, or Redis permits the
   * gateway's commands again (none): the outage, if any, is over.
   */
  private redisRecovered (command?: TierCommand): void {
    this.redisFailing = false
    // A refusal ends once each command refused has gone through (plugins/redis), not at any: Redis
    // refusing the scripts alone (`-evalsha`) answers the reads, and a read that ended it had the
    // next write refused and logged again, each second of misses, /readyz ready and not with it.
    if (command !== undefined && this.opts.redis?.refuses?.() === true) this.opts.redis.allowed?.(command)
    if (!this.redisOutage) return
    this.redisOutage = false
    this.redisHeldUntil = 0
    this.opts.log.debug({}, 'cache: Redis answers again')
    // Invalidations held back meanwhile go now: a call that tried Redis at the hold's end put
    // the replay off by another hold, and other instances served the entries they drop until then.
    if (this.pending.size > 0) this.replayPending().catch(noop)
  }
}

/** The tier's commands, as ioredis names them: its read, and its scripts (defineCommand's). */
type TierCommand = 'mget' | 'evalsha'

/**
 * A Kernel call that failed as RFC 5861's stale-if-error has it: any 502, 503 or 504 (an expired
 * entry answers instead). KERNEL_ERROR was left out: a Kernel answering 503 while it restarts (or
 * its proxy, with no healthy upstream) got the client 502 for an entry kept for Kernel outages,
 * until the breaker opened, and always with a Kernel failing some calls but not `threshold` in a
 * row; so did a 2xx it could not pass on (an HTML maintenance page).
 */
function kernelDown (err: unknown): boolean {
  return err instanceof MantleError && (err.code === 'KERNEL_UNAVAILABLE' || err.code === 'KERNEL_TIMEOUT' || err.code === 'KERNEL_ERROR')
}
