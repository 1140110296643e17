import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { hash as digest } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { Counter, Gauge } from 'prom-client'
import { Leave, StageOrder, canonicalJson, unwatchCaller, watchCaller, type CallContext, type Next } from '../pipeline/index.js'
import { MantleError } from '../../errors.js'
import type { Operation } from '../../manifest.js'
import { MemoryIdempotencyStore } from './memory-store.js'
import { RedisIdempotencyStore, TenantFullError, UnreadableRecordError } from './redis-store.js'
import { storeKey, tenantOfKey, type Claim, type DoneRecord, type IdempotencyRecord, type IdempotencyStore } from './store.js'
import { FairLru, SCRAPE_SLICES } from '../../fair-lru.js'
import { sharedStoreHealth } from '../diagz/index.js'

export { MemoryIdempotencyStore } from './memory-store.js'
export { RedisIdempotencyStore, TenantFullError, UnreadableRecordError, decode, IDEMPOTENCY_COMMANDS } from './redis-store.js'
export { storeKey, tenantIndex, type IdempotencyStore, type IdempotencyRecord, type DoneRecord, type Claim } from './store.js'

// Mantle's own idea, by hand: no library keys a pipeline call by tenant, op and key with a
// lease, a stored outcome and a memory fallback (the Fastify idempotency plugins wrap whole
// HTTP routes, and Mantle has five faces that are not all routes).

export interface IdempotencyOptions {
  store: 'memory' | 'redis'
  /** How long a stored outcome answers repeats (BFF_IDEMPOTENCY_TTL_SECONDS). */
  ttlSeconds: number
  /** Bound of the memory store (BFF_IDEMPOTENCY_MAX_KEYS). */
  maxKeys: number
  /**
   * Most records one tenant holds in the Redis store (BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT;
   * by default `maxKeys`): past it, its new keys are refused 429 until its oldest record expires.
   */
  maxKeysPerTenant?: number
  /** Longest a repeat waits for the first call (BFF_IDEMPOTENCY_WAIT_MS); default the op's timeout. */
  waitMs?: number | undefined
  /**
   * A running claim lapses this long after the op's timeout (a crashed holder frees its key); by
   * default 5 s, or with REDIS_URL set twice its command timeout and 1 s when that is longer (see LEASE_MARGIN_MS).
   */
  leaseMarginMs?: number
  /** Most bytes of answers the memory store holds. */
  maxBytes?: number
  /** Most outcomes and releases waiting for Redis (MAX_PENDING; tests lower it). */
  maxPending?: number
}

export interface Idempotency {
  /** The configured store's kind (the memory store also serves while Redis is away). */
  readonly store: 'memory' | 'redis'
  /** How long a stored outcome answers repeats (BFF_IDEMPOTENCY_TTL_SECONDS): the OpenAPI document says it. */
  readonly ttlSeconds: number
  /** Keys the memory store holds now. */
  memoryKeys: () => number
}

declare module 'fastify' {
  interface FastifyInstance {
    idempotency: Idempotency
  }
}

/** The part of the gateway the store is to the shared Redis (its refusals, /readyz). */
const IDEMPOTENCY = 'idempotency'
const FIRST_POLL_MS = 5
const MAX_POLL_MS = 200
/**
 * What a claim's lease adds to the op's timeout: what a call does after its Kernel call (its
 * cache stage's invalidation, then storing its outcome: two Redis commands, each up to
 * BFF_REDIS_COMMAND_TIMEOUT_MS). At 5 s whatever that timeout was (up to 60 s), a Redis slow
 * within it took the outcome after the claim had lapsed, and a repeat on another instance claimed
 * the key and ran the Kernel call a second time.
 */
const LEASE_MARGIN_MS = 5000
const leaseMarginFor = (commandTimeoutMs: number): number => Math.max(LEASE_MARGIN_MS, 2 * commandTimeoutMs + 1000)
/** How often outcomes and releases Redis did not take are offered to it again. */
const RETRY_MS = 250
/** Most outcomes and releases waiting for Redis (one per call that was running when it failed). */
const MAX_PENDING = 10_000
/**
 * Longest the last offer of those to Redis, at close, holds the shutdown: a Redis command's
 * timeout by default, within server.ts' GRACE_MARGIN_MS with the audit's and the trace export's.
 */
const CLOSE_PASS_MS = 500
const MEMORY_MAX_BYTES = 64 * 1024 * 1024
/**
 * Kernel refusals that say "try later" rather than "no": a repeat must run again. So does any
 * refusal whose Kernel answer carried a Retry-After (a 423 or 409 "busy, come back"): stored, the
 * retry it asked for got the refusal replayed, without its Retry-After, until the key expired.
 */
const TRANSIENT_STATUS = new Set([408, 425, 429])

/** The hash of an input that a repeat must match: canonical JSON, so key order does not matter. */
export function inputHash (input: unknown): string {
  return digest('sha256', canonicalJson(input), 'base64url')
}

/**
 * The hash a repeat of `ctx`'s call must match: its input's, and with the conditions REST sends on
 * to the Kernel (If-Match, If-None-Match), those too: they make another request of the same input.
 * The hash covered the input only, and a key reused without a create-only condition replayed the
 * first call's 412 (or one reused with it the first call's 201). A call without them keeps its
 * input's hash (records of earlier versions match as before).
 */
function requestHash (ctx: CallContext): string {
  if (ctx.ifMatch === undefined && ctx.ifNoneMatch === undefined) return inputHash(ctx.input)
  return digest('sha256', canonicalJson(ctx.input) + '\n' + JSON.stringify([ctx.ifMatch ?? null, ctx.ifNoneMatch ?? null]), 'base64url')
}

interface OpMetrics { replay: () => void, conflict: () => void, reused: () => void, full: () => void }
const nothing = (): void => {}
const noOpMetrics: OpMetrics = { replay: nothing, conflict: nothing, reused: nothing, full: nothing }

async function idempotencyPlugin (app: FastifyInstance, opts: IdempotencyOptions): Promise<void> {
  if (opts.store === 'redis' && !app.hasDecorator('redis')) throw new Error('BFF_IDEMPOTENCY_STORE=redis needs REDIS_URL')
  let evicted: () => void = nothing
  const memory = new MemoryIdempotencyStore({ maxKeys: opts.maxKeys, maxBytes: opts.maxBytes ?? MEMORY_MAX_BYTES, onEvict: () => { evicted() } })
  const redis = opts.store === 'redis' ? app.redis : null
  const shared = redis === null ? null : new RedisIdempotencyStore(redis.client, { maxKeysPerTenant: opts.maxKeysPerTenant ?? opts.maxKeys })
  const ttlMs = opts.ttlSeconds * 1000
  // Rate limits are on (mantle-rate-limit, registered before): their RateLimit-* are on every
  // response, the tenant-full refusal's included unless it sets its own (see tenantFull).
  const limited = app.hasDecorator('rateLimiter')
  // Any Redis, not only the store's: a mutation's cache invalidation goes to it after its Kernel call.
  const leaseMargin = opts.leaseMarginMs ?? leaseMarginFor(app.hasDecorator('redis') ? app.redis.client.options.commandTimeout ?? 0 : 0)

  let metricsFor: (op: string) => OpMetrics = () => noOpMetrics
  let fellBack: () => void = nothing
  if (app.hasDecorator('metrics')) {
    const registers = [app.metrics.registry]
    const replays = new Counter({ name: 'mantle_idempotency_replays_total', help: 'Repeats answered with the stored outcome of the first call, by operation', labelNames: ['op'] as const, registers })
    const conflicts = new Counter({ name: 'mantle_idempotency_conflicts_total', help: 'Repeats refused with 409 IDEMPOTENCY_CONFLICT because the first call was still running, by operation', labelNames: ['op'] as const, registers })
    const reused = new Counter({ name: 'mantle_idempotency_key_reused_total', help: 'Keys refused with 422 IDEMPOTENCY_KEY_REUSED (same key, another input or another user of the tenant), by operation', labelNames: ['op'] as const, registers })
    const full = new Counter({ name: 'mantle_idempotency_tenant_full_total', help: 'Keyed calls refused with 429 RATE_LIMITED, before any Kernel call, because their tenant held BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT records in Redis, by operation', labelNames: ['op'] as const, registers })
    const fallbacks = new Counter({ name: 'mantle_idempotency_store_fallbacks_total', help: 'Keyed calls claimed in the memory store because Redis was away or failed (a waiting repeat counts once, not per poll)', registers })
    const evictions = new Counter({ name: 'mantle_idempotency_memory_evictions_total', help: 'Outcomes the memory idempotency store dropped before their TTL, or did not keep, to stay within BFF_IDEMPOTENCY_MAX_KEYS or its 64 MB (each the least recently used of the tenant holding the most); a repeat of one runs again', registers })
    evicted = () => evictions.inc()
    new Gauge({ name: 'mantle_idempotency_memory_keys', help: 'Keys the memory idempotency store holds, after the scrape drops expired ones (65,536 looked at at most)', registers, async collect () { await memory.purgeAll(SCRAPE_SLICES); this.set(memory.size) } }) // eslint-disable-line no-new
    // Not bounded by a number of their own: one per keyed call running (each until its call ends
    // or its lease lapses), so by the calls in flight.
    new Gauge({ name: 'mantle_idempotency_running_claims', help: 'Claims of keyed calls this instance is running, by where the key was claimed (memory, or redis: held here too so that a repeat here waits for it); one per keyed call in flight', labelNames: ['store'] as const, registers, collect () { const n = memory.runningClaims(); this.labels('memory').set(n.memory); this.labels('redis').set(n.redis) } }) // eslint-disable-line no-new
    metricsFor = (op) => {
      const r = replays.labels(op)
      const c = conflicts.labels(op)
      const k = reused.labels(op)
      const f = full.labels(op)
      return { replay: () => r.inc(), conflict: () => c.inc(), reused: () => k.inc(), full: () => f.inc() }
    }
    fellBack = () => fallbacks.inc()
  }

  // Redis away: the memory store answers, logged once per outage. Two instances may then each
  // run a call once; a 5xx for a store failure would be worse for the client than that.
  let degraded = false
  const outage = (err: unknown): void => {
    redis?.denied(IDEMPOTENCY, err)
    if (!degraded) app.log.warn({ err: (err as Error | null)?.message }, 'idempotency: Redis is unavailable, new keys are held in memory until it is back')
    degraded = true
  }
  const fallBack = (err: unknown, count: boolean): void => {
    if (count) fellBack()
    outage(err)
  }
  const back = (): void => {
    if (degraded) app.log.info('idempotency: Redis is back')
    degraded = false
  }
  /** Redis took a claim: back, and permitting the store its commands (a refusal of them is over). */
  const claimed = (): void => {
    redis?.allowed(IDEMPOTENCY)
    back()
  }
  // Copying an outcome held in memory to Redis may fail: never a replay's error.
  const settle = async (write: Promise<void>): Promise<void> => {
    try {
      await write
    } catch (err) {
      app.log.warn({ err: (err as Error).message }, 'idempotency: could not copy an outcome to Redis')
    }
  }
  /**
   * Stores a call's outcome where it claimed its key (null frees the key), and ends its hold in
   * memory. A store that fails never fails the call. When Redis does not take an outcome, this
   * instance keeps it, with the claim it answers: replayed here, and copied to Redis over that
   * claim as soon as Redis takes it (`later`). Lost, a repeat here ran a second Kernel call
   * during the outage, and every instance's repeat waited for the stale claim's lease, then ran
   * again. A failed call's release that Redis does not take is retried the same way.
   *
   * `unanswered`: the Redis claim a call claimed in memory may hold there too (its claim failed
   * with no answer, a timeout, which Redis may yet have carried out). Its outcome is then copied
   * over that claim, as one Redis did not take; its release frees it. Before, a repeat on
   * another instance found that claim, waited out the conflict and, once its lease ended, ran
   * the Kernel call a second time, with this instance's outcome never copied.
   */
  const finish = async (store: IdempotencyStore, key: string, token: string, outcome: DoneRecord | null, leaseMs: number, unanswered: string | null): Promise<void> => {
    try {
      if (outcome === null) {
        if (unanswered !== null) shared!.release(key, unanswered).catch(() => { later(key, leaseMs, unanswered) })
        await store.release(key, token)
      } else if (unanswered !== null) {
        await memory.complete(key, token, { ...outcome, heldAs: unanswered }, ttlMs)
        later(key, ttlMs, null)
        return
      } else await store.complete(key, token, outcome, ttlMs)
    } catch (err) {
      redis?.denied(IDEMPOTENCY, err)
      app.log.warn({ err: (err as Error).message }, outcome === null ? 'idempotency: could not release the key of a failed call' : 'idempotency: could not store the outcome of a call')
      if (outcome !== null) {
        const kept: DoneRecord = { ...outcome, heldAs: token }
        await memory.complete(key, token, kept, ttlMs)
        // Offered for as long as it lives here, not only while its claim is leased in Redis: a
        // Redis away for longer came back with the claim gone and the key free, the outcome no
        // longer offered, and a repeat on another instance ran the Kernel call again.
        later(key, ttlMs, null)
        return
      }
      // The Redis claim of a failed call: released once Redis is back.
      if (store !== memory) later(key, leaseMs, token)
    }
    if (store !== memory) await memory.release(key, token)
    // A call claimed in memory, Redis away: its outcome is copied to Redis once Redis is back,
    // for as long as it lives here (no claim of it there ends sooner). Copied only when a repeat
    // reached this instance, a repeat on another instance, Redis back, ran the call again.
    else if (shared !== null && outcome !== null) later(key, ttlMs, null)
  }

  // What Redis did not take, offered to it again every 250 ms without waiting for a repeat to
  // reach this instance: an outcome, copied over its call's claim there, and the release of a
  // failed call's claim. A repeat on another instance found that claim running and waited for
  // its lease (the op's timeout plus 5 s), then ran the call again, or got 409 after a release
  // that failed (README: the key was released). A release is tried until Redis takes it or the
  // claim's lease ends (the claim is gone from Redis then, and a release is guarded by the
  // claim's token anyway); an outcome until Redis takes it or it expires here (once the claim's
  // lease has ended, it is copied into the key if the key is still free there, never over another
  // call's record; offered only while the lease lasted, an outage longer than it left the key free
  // in Redis, and a repeat on another instance ran the call again). As many as the calls that
  // were running when Redis failed or ran while it was away, at most `maxPending` (MAX_PENDING),
  // shared fairly between tenants (FairLru): past it, the oldest of the tenant holding the most is
  // dropped (its claim's lease ends first). In one pool, one tenant's keyed mutations during an
  // outage pushed out another tenant's outcomes, and a repeat of that tenant's call on another
  // instance, Redis back, ran its mutation a second time.
  // Keyed by the store key for an outcome (the memory store holds it), by the claim's token,
  // unique, for a release: a key may have both (a repeat's outcome over a claim of its own).
  interface Pending { key: string, until: number, release: string | null }
  const pending = new FairLru<Pending>(opts.maxPending ?? MAX_PENDING, Infinity)
  let retrier: NodeJS.Timeout | null = null
  let retrying = false
  // Set by onClose: a call that ends after it (the Kernel pool's close waits for calls, then
  // this plugin's onClose runs, then Redis's), or a Redis command of one answered late, is not
  // put up for a retry; it started a timer that ticked after close until the claim's lease ended.
  let closed = false
  /** Offers Redis one pending outcome or release (an outcome the memory store no longer holds: nothing). */
  const offer = async (p: Pending): Promise<void> => {
    if (p.release !== null) await shared!.release(p.key, p.release)
    else {
      const outcome = outcomeOf(memory.peek(p.key))
      if (outcome !== null) await shared!.seed(p.key, outcome.record, outcome.ttl)
    }
  }
  const retryAll = async (): Promise<void> => {
    if (retrying) return
    retrying = true
    try {
      const now = performance.now()
      for (const [id, p] of pending.items()) {
        if (closed) break
        if (p.until <= now) pending.delete(id)
        else if (redis!.up()) {
          await offer(p)
          pending.delete(id)
        }
      }
    } catch (err) {
      // Redis is away again (or refuses the store its commands): the next tick tries the rest.
      redis?.denied(IDEMPOTENCY, err)
    } finally {
      retrying = false
      if (pending.size === 0 && retrier !== null) {
        clearInterval(retrier)
        retrier = null
      }
    }
  }
  /** Offers Redis again, for `leaseMs` (its claim's lease, or its outcome's TTL), the key's outcome (`release` null) or the release of a claim. */
  const later = (key: string, leaseMs: number, release: string | null): void => {
    if (closed) return
    const id = release ?? key
    pending.set(id, tenantOfKey(key), { key, until: performance.now() + leaseMs, release }, 0, leaseMs)
    if (retrier === null) {
      retrier = setInterval(() => { retryAll().catch(() => {}) }, RETRY_MS)
      retrier.unref()
    }
  }
  // At close, those still waiting are offered to Redis once more if it is up (all at once, the
  // whole pass CLOSE_PASS_MS at most: a hung Redis does not hold the shutdown; Redis's own onClose
  // runs after this one), then dropped. Dropped at once, another instance's repeat waited for the
  // claim's lease and ran the call again, Redis up all along. What ends after this is not kept.
  // Set by preClose: the gateway is shutting down (see the repeats' wait, below).
  let closing = false
  app.addHook('preClose', (done) => {
    closing = true
    done()
  })
  app.addHook('onClose', async () => {
    closed = true
    if (retrier !== null) clearInterval(retrier)
    retrier = null
    const now = performance.now()
    const last = [...pending.items()].map(([, p]) => p).filter(p => p.until > now)
    pending.clear()
    if (last.length === 0) return
    let taken = 0
    if (redis?.up() === true) await Promise.race([Promise.allSettled(last.map(async p => { await offer(p); taken++ })), sleep(CLOSE_PASS_MS, undefined, { ref: false })])
    if (taken < last.length) app.log.warn({ dropped: last.length - taken, taken }, 'idempotency: closing, outcomes and key releases Redis did not take are dropped: a repeat on another instance waits for their claims\' leases')
  })
  if (app.hasDecorator('metrics')) {
    new Gauge({ name: 'mantle_idempotency_pending_redis_writes', help: 'Outcomes and key releases Redis did not take, offered to it again every 250 ms (outcomes while they live here, releases while their claims\' leases last; bounded, 10,000, shared fairly between tenants)', registers: [app.metrics.registry], collect () { this.set(pending.size) } }) // eslint-disable-line no-new
  }
  /**
   * Where a claim was made or what it found, and the Redis claim a call claimed in memory may hold
   * (see `finish`). `inRedis`: what it found in memory is the hold of a call of this instance
   * claimed in Redis, a record Redis holds as much as one found there.
   */
  interface Claimed { store: IdempotencyStore, claim: Claim, unanswered: string | null, unsure?: boolean, inRedis?: boolean }
  /**
   * Claims `key` for a call whose Redis claim is `running` (one per call: a claim whose answer
   * never came, carried out all the same, is then known as the call's own at its next poll).
   * `first`: the call's first claim (a repeat waiting for the first call claims again each
   * poll). `held`: the running record the call found in Redis (a repeat waiting for another
   * call), else null.
   */
  const claimIn = async (key: string, hash: string, user: string, leaseMs: number, running: string, first: boolean, held: IdempotencyRecord | null): Promise<Claimed> => {
    let unanswered: string | null = null
    if (shared !== null) {
      if (redis!.up()) {
        // A key claimed in memory while Redis was away stays this instance's until it expires
        // there: a call still running here is waited for (never a second Kernel call), and an
        // outcome is replayed and copied to Redis for the time it has left (never extended).
        // The memory store holds keys claimed while Redis was away or failed (usually none), and
        // holds on the calls this instance is running.
        const local = memory.peek(key)
        if (local !== undefined) {
          const outcome = outcomeOf(local)
          if (outcome !== null) await settle(shared.seed(key, outcome.record, outcome.ttl))
          return { store: memory, claim: { won: false, record: local.record }, unanswered: null, inRedis: local.held === true }
        }
        try {
          const claim = await shared.claim(key, hash, leaseMs, running)
          claimed()
          return { store: shared, claim, unanswered: null }
        } catch (err) {
          if (err instanceof UnreadableRecordError) {
            claimed()
            throw unreadable()
          }
          if (err instanceof TenantFullError) {
            claimed()
            throw err
          }
          if (held !== null) return waiting(key, held, err)
          unanswered = running
          fallBack(err, first)
        }
      } else if (held !== null) {
        return waiting(key, held, null)
      } else {
        fallBack(null, first)
      }
    }
    const claim = await memory.claim(key, hash, leaseMs, user)
    return { store: memory, claim, unanswered, inRedis: !claim.won && memory.peek(key)?.held === true }
  }
  /**
   * A repeat waiting for a call that holds its key in Redis, Redis failing or away: it never
   * claims the key in memory (the call runs elsewhere, and this instance's memory has never seen
   * it: a second Kernel call). It goes on waiting, for what this instance holds if anything (its
   * own calls), else for the record it found, and polls Redis again until its wait ends (409).
   */
  const waiting = (key: string, held: IdempotencyRecord, err: unknown): Claimed => {
    outage(err)
    return { store: memory, claim: { won: false, record: memory.peek(key)?.record ?? held }, unanswered: null, unsure: err !== null }
  }
  /** A key whose record in Redis this version cannot read: taken, by a call whose outcome is unknown. */
  const unreadable = (): MantleError => {
    app.log.warn('idempotency: a record in Redis cannot be read (written by another version, or damaged): its key is refused with 409 until the record expires')
    return new MantleError('IDEMPOTENCY_CONFLICT', 'The Idempotency-Key is held by a call whose outcome cannot be read', { headers: { 'retry-after': '1' } })
  }

  // Redis answers again (reconnected, or a PING answered): the outage is over now, not at the
  // next keyed claim, which may be long in coming (/diagz said unhealthy until then). Not while
  // Redis refuses the store its commands (its PING answers all the same): the store said "Redis
  // is back" at each PING and "unavailable" at its next claim, two lines a second, and /diagz
  // said healthy between. Over when Redis permits them again (its check, or a claim it takes).
  redis?.onAnswer(() => { if (!redis.refuses(IDEMPOTENCY)) back() })
  redis?.onAllowed(back)
  app.decorate('idempotency', { store: opts.store, ttlSeconds: opts.ttlSeconds, memoryKeys: () => memory.size })
  if (app.hasDecorator('diagz')) {
    app.diagz.addStore('idempotency', () => sharedStoreHealth(redis !== null, !degraded && redis?.up() === true, `${memory.size} keys in memory, expired ones included until dropped`))
  }

  app.pipeline.addStage({
    name: 'idempotency',
    order: StageOrder.idempotency,
    build (op: Operation) {
      if (op.type !== 'mutation') return null
      const entry = app.pipeline.entry(op.name)
      const metrics = metricsFor(op.name)
      const leaseMs = op.timeoutMs + leaseMargin
      const waitMs = opts.waitMs ?? op.timeoutMs

      const run = async (ctx: CallContext, next: Next, store: IdempotencyStore, key: string, token: string, hash: string, unanswered: string | null): Promise<unknown> => {
        // A call claimed in Redis is held here too: a repeat on this instance waits for it even
        // if Redis goes away meanwhile (it claimed the key in memory and ran a second call).
        if (store !== memory) memory.hold(key, hash, token, leaseMs, ctx.user)
        let result: unknown
        try {
          result = await next(ctx)
        } catch (err) {
          const definitive = err instanceof MantleError && (err.code === 'KERNEL_REJECTED' || err.code === 'NOT_FOUND') && !TRANSIENT_STATUS.has(err.statusCode) && err.headers?.['retry-after'] === undefined
          await finish(store, key, token, definitive ? { state: 'done', hash, user: ctx.user, status: err.statusCode, body: null, error: { code: err.code as 'KERNEL_REJECTED' | 'NOT_FOUND', status: err.statusCode, detail: err.message }, ...verdictOf(ctx) } : null, leaseMs, unanswered)
          throw err
        }
        // The chain's innermost step serialized the answer (ctx.json; an answer that breaks the
        // output schema threw there, and released the key above): stored as the client gets it.
        const body = ctx.json ?? entry.serialize(result)
        await finish(store, key, token, { state: 'done', hash, user: ctx.user, status: ctx.status, body, error: null, ...verdictOf(ctx) }, leaseMs, unanswered)
        return result
      }

      const once = async (ctx: CallContext, next: Next, idempotencyKey: string): Promise<unknown> => {
        const key = storeKey(ctx.tenant, op.name, idempotencyKey)
        const hash = requestHash(ctx)
        const giveUp = performance.now() + waitMs
        let delay = FIRST_POLL_MS
        // Made at a repeat's first wait, not before: a call that claims its key pays nothing.
        let leave: Leave | null = null
        const caller = ctx.caller
        const running = shared === null ? '' : RedisIdempotencyStore.running(hash, ctx.user)
        // The running record this call found in Redis: from then on it never claims in memory.
        let held: IdempotencyRecord | null = null
        // A poll of it that Redis did not answer in time, and none answered since: that claim
        // may have been carried out (the key freed meanwhile), and is released if the call stops.
        let unsure = false
        try {
          for (let first = true; ; first = false) {
            let claimedIn: Claimed
            try {
              claimedIn = await claimIn(key, hash, ctx.user, leaseMs, running, first, held)
            } catch (err) {
              if (!(err instanceof TenantFullError)) throw err
              metrics.full()
              throw tenantFull(err, limited)
            }
            const { store, claim, unanswered, unsure: maybe, inRedis } = claimedIn
            if (store === shared) unsure = false
            else if (maybe === true) unsure = true
            if (claim.won) return await run(ctx, next, store, key, claim.token, hash, unanswered)
            const record = claim.record
            // Found in Redis, or as this instance's own call claimed there: its outcome goes to
            // Redis, and this instance forgets it once Redis takes it. A repeat that waited for it
            // here and found Redis away at its next poll claimed the key in memory and ran a
            // second Kernel call.
            if (store === shared || inRedis === true) held = record
            // Another user of the tenant with the key is refused as another input is (the Kernel
            // gets the user as x-user-id: it is part of the call). The key is the tenant's, the
            // answer the first user's: replayed to another user (or waited for, while the first ran),
            // it went to anyone who learnt or guessed the key (a token the Kernel minted for the
            // first user, say). A record of an older version names no user: any user's, as before.
            if (record.hash !== hash || (record.user !== undefined && record.user !== ctx.user)) {
              metrics.reused()
              throw new MantleError('IDEMPOTENCY_KEY_REUSED', `The Idempotency-Key was already used for ${op.name} with another input, or by another user`)
            }
            if (record.state === 'done') {
              metrics.replay()
              return replay(ctx, record)
            }
            const remaining = giveUp - performance.now()
            if (remaining <= 0) {
              metrics.conflict()
              throw new MantleError('IDEMPOTENCY_CONFLICT', `The first ${op.name} call with this Idempotency-Key is still running`, { headers: { 'retry-after': '1' } })
            }
            // Shutting down, a repeat waits on only for a call this instance runs, which ends within
            // the shutdown's grace (its op's timeout). One that runs elsewhere (another instance's
            // Redis claim, a crashed one's until its lease lapses, or any, Redis away, until the wait
            // ends) held the shutdown up to BFF_IDEMPOTENCY_WAIT_MS (600 s at most), past the grace
            // (the longest timeout plus 13 s): the process was killed, the audit not flushed. It is
            // answered as at the end of its wait, to be sent again to another instance.
            if (closing && memory.peek(key)?.record.state !== 'running') {
              metrics.conflict()
              throw new MantleError('IDEMPOTENCY_CONFLICT', `The first ${op.name} call with this Idempotency-Key runs on another instance, and this one is shutting down`, { headers: { 'retry-after': '1' } })
            }
            // A repeat whose caller left stops waiting at once (README, "Clients that leave"):
            // it polled the store until the first call ended or its wait bound passed.
            if (caller !== null && leave === null) {
              leave = new Leave()
              if (!watchCaller(caller, leave.onLeave)) throw callerLeft()
            }
            // The first call may finish at any moment: poll often at first, then back off.
            await (leave === null ? sleep(Math.min(delay, remaining)) : leave.pause(Math.min(delay, remaining)))
            if (leave?.gone() === true) throw callerLeft()
            delay = Math.min(delay * 2, MAX_POLL_MS)
          }
        } finally {
          if (leave !== null) unwatchCaller(caller!, leave.onLeave)
          if (unsure) shared!.release(key, running).catch(() => { later(key, leaseMs, running) })
        }
      }

      return (ctx, next) => {
        const key = ctx.idempotencyKey
        if (key == null) return next(ctx)
        return once(ctx, next, key)
      }
    }
  })
}

/** An outcome the memory store holds and the ms it has left, to copy to Redis for that long (never a fresh TTL; PX counts from the copy's arrival). */
function outcomeOf (held: { record: IdempotencyRecord, ttlMs: number } | undefined): { record: DoneRecord, ttl: number } | null {
  if (held === undefined || held.record.state !== 'done') return null
  // Less a millisecond: the time left is read before the copy is sent, and the copy must not
  // outlive the outcome (with lru-cache, which read the clock at most once a ms, it did by 1 ms).
  const ttl = Math.floor(held.ttlMs) - 1
  return Number.isFinite(ttl) && ttl > 0 ? { record: held.record, ttl } : null
}

/**
 * A keyed call whose tenant holds the most records it may in Redis: refused before its Kernel call
 * (run without its key stored, a repeat would run it again), to be sent again once its tenant's
 * oldest record expires, or without a key. A 429: the tenant's own keyed traffic filled its share.
 * With rate limits on (`limited`), RateLimit-* of its own, as every RATE_LIMITED has (CONTRACT §5):
 * the bound, none left, and the reset Retry-After names. With Retry-After alone, the response kept
 * the RateLimit-* the HTTP guard or the operation's limit had set on it, places left and an
 * earlier reset: a 429 saying "RateLimit-Remaining: 97, RateLimit-Reset: 26" beside "Retry-After:
 * 60". With rate limits off nothing sets RateLimit-*, and the OpenAPI document declares none.
 */
function tenantFull (err: TenantFullError, limited: boolean): MantleError {
  const seconds = String(Math.ceil(err.retryAfterMs / 1000))
  const headers: Record<string, string> = limited
    ? { 'retry-after': seconds, 'ratelimit-limit': String(err.max), 'ratelimit-remaining': '0', 'ratelimit-reset': seconds }
    : { 'retry-after': seconds }
  return new MantleError('RATE_LIMITED', `The tenant holds ${err.max} idempotency keys, the most it may: a keyed mutation runs once one of them expires`, { headers })
}

/** Nobody reads it: how a repeat whose caller left while it waited ends, for its audit entry. */
function callerLeft (): MantleError {
  return new MantleError('CLIENT_CLOSED', 'The caller left while its repeat waited for the first call with its Idempotency-Key')
}

/** The firewall's verdict on a call's input, kept with its outcome: nothing when it found nothing. */
function verdictOf (ctx: CallContext): Pick<DoneRecord, 'risk' | 'findings'> | null {
  return ctx.risk === 'none' && ctx.findings === null ? null : { risk: ctx.risk, findings: ctx.findings ?? [] }
}

/** Answers a repeat with the first call's outcome, marked as replayed, with the first call's firewall verdict (its audit entry's risk and findings). */
function replay (ctx: CallContext, record: DoneRecord): unknown {
  ctx.replayed = true
  if (record.risk !== undefined) {
    ctx.risk = record.risk
    ctx.findings = record.findings !== undefined && record.findings.length > 0 ? record.findings : null
  }
  if (record.error !== null) {
    throw new MantleError(record.error.code, record.error.detail, { status: record.error.status, headers: { 'idempotent-replayed': 'true' } })
  }
  ctx.setHeader('idempotent-replayed', 'true')
  ctx.status = record.status
  // The stored bytes go out as they are (the faces send ctx.json): not parsed and serialized again.
  ctx.json = record.body ?? 'null'
  return record.body === null ? null : JSON.parse(record.body)
}

export default fp(idempotencyPlugin, { name: 'mantle-idempotency', dependencies: ['mantle-pipeline'], fastify: '5.x' })
