import type { FastifyRateLimitStore, FastifyRateLimitStoreCtor } from '@fastify/rate-limit'
import type { MemoryWindowStore } from './memory-store.js'
import type { RedisWindowStore } from './redis-store.js'
import type { WindowCount } from './window.js'

/** Which limit a check is for: the HTTP guard of @fastify/rate-limit, or an operation's own. */
export type Scope = 'global' | 'op'
export type StoreKind = 'memory' | 'redis'

export interface LimiterCounters {
  /** A check answered by `store`; `refused` when it was over the limit. */
  checked: (scope: Scope, store: StoreKind, refused: boolean) => void
  /** A check that should have gone to Redis and was answered from memory. */
  fellBack: () => void
}

export interface LimiterOptions {
  memory: MemoryWindowStore
  /** null: memory is the store. Otherwise memory is only the fallback while Redis is away. */
  redis: RedisWindowStore | null
  /** Whether the Redis connection is ready (checks skip Redis at once when it is not). */
  up?: () => boolean
  log: { warn: (obj: object, msg: string) => void, info: (msg: string) => void }
  counters?: LimiterCounters | undefined
  /** After a failed Redis command, checks stay in memory this long before trying Redis (ms). */
  retryRedisMs?: number
  /**
   * Told of each failed Redis check (the shared connection's `denied`: a refusal for want of
   * permission makes /readyz fail), and when Redis counts again after a failure (`allowed`).
   */
  failed?: (err: Error) => void
  counted?: () => void
}

/**
 * The one sliding-window store of both limits. With Redis it counts in Redis; when Redis is not
 * ready, or a check fails or times out there, the same check is answered from memory, the
 * outage is logged once and counted, and the next check after `retryRedisMs` tries Redis again.
 * Never throws and never rejects: a store outage is never a client's 5xx. Memory checks stay
 * synchronous (no promise on the embedded default's hot path).
 */
export class RateLimiter {
  readonly store: StoreKind
  private readonly memory: MemoryWindowStore
  private readonly redis: RedisWindowStore | null
  private readonly up: () => boolean
  private readonly log: LimiterOptions['log']
  private readonly counters: LimiterCounters | undefined
  private readonly retryRedisMs: number
  private readonly failed: ((err: Error) => void) | undefined
  private readonly counted: (() => void) | undefined
  /**
   * Until when checks stay in memory after a failed one (performance.now(): monotonic; on the wall
   * clock, a step back held every check in memory for as long as the step, Redis back or not).
   */
  private pausedUntil = 0
  private outage = false
  /**
   * A check was answered from memory, and Redis has not answered since (a check it counted, its
   * connection ready again, or the heartbeat's PING: `answered`): what the gauge and /diagz say.
   * `outage` alone, a check that timed out on a connection that stayed up (a Redis busy for a
   * moment: one PING missed, not two) kept them saying "fallback" until the next guarded call,
   * for hours without traffic, the alert on it firing for a Redis that had answered all along.
   */
  private failing = false
  /**
   * A check of an outage is trying Redis again: the others stay in memory until it answers. The
   * pause alone let another through each `retryRedisMs` while it waited: with a command timeout
   * longer than that (BFF_REDIS_COMMAND_TIMEOUT_MS up to 60 s), a Redis that stalls with its
   * connection open held one more call each second for the whole timeout.
   */
  private probing = false

  constructor (options: LimiterOptions) {
    this.memory = options.memory
    this.redis = options.redis
    this.store = options.redis === null ? 'memory' : 'redis'
    this.up = options.up ?? (() => true)
    this.log = options.log
    this.counters = options.counters
    this.retryRedisMs = options.retryRedisMs ?? 1000
    this.failed = options.failed
    this.counted = options.counted
  }

  /**
   * True while Redis is configured and checks are answered from memory: after a failed check,
   * until one Redis counts (not one it refuses), Redis' connection is ready again or Redis answers
   * (`answered`), and whenever it is not ready (a check would go to memory: from start-up without
   * traffic, the gauge said 0).
   */
  get fallbackActive (): boolean {
    return this.redis !== null && (this.failing || !this.up())
  }

  /**
   * Redis answers (the heartbeat's PING), and does not refuse the limiter its commands: the gauge
   * and /diagz say so now. Checks still try Redis one at a time after a failure (`outage`): a
   * Redis that stalls now and then answers some PINGs, and every check in flight after each of
   * them waited out the command timeout. A check answered from memory meanwhile says "fallback" again.
   */
  answered (): void {
    this.failing = false
  }

  /** Keys the memory store holds (the embedded store, or the fallback's). */
  get memoryKeys (): number {
    return this.memory.size
  }

  /** Counts one call against `max` per `windowMs` under `key`. */
  check (scope: Scope, key: string, windowMs: number, max: number): WindowCount | Promise<WindowCount> {
    const redis = this.redis
    if (redis === null) return this.local(scope, key, windowMs, max)
    if (!this.up() || this.probing || (this.pausedUntil !== 0 && performance.now() < this.pausedUntil)) return this.fallback(scope, key, windowMs, max, 'Redis is not connected')
    // During an outage, one check at a time tries Redis again; the others stay in memory until it
    // answers. A Redis that stalls without closing the connection stays "up": after each pause,
    // every check in flight waited out the command timeout (500 ms) there.
    const probe = this.outage
    if (probe) {
      this.pausedUntil = performance.now() + this.retryRedisMs
      this.probing = true
    }
    return redis.check(key, windowMs, max).then(count => {
      if (probe) this.probing = false
      // Only a check Redis counted (it wrote) ends an outage: a refused one only reads, and a Redis
      // refusing writes (out of memory, say) answered it, so that the outage ended and began again
      // at every other check, each logged (review rv-rl).
      if (this.outage && count.current <= max) this.recovered()
      this.counters?.checked(scope, 'redis', count.current > max)
      return count
    }, (err: Error) => {
      if (probe) this.probing = false
      this.pausedUntil = performance.now() + this.retryRedisMs
      this.failed?.(err)
      return this.fallback(scope, key, windowMs, max, err.message)
    })
  }

  /**
   * Redis' connection is ready again (ioredis 'ready'): the pause after a failed check ends, and
   * the next check goes to Redis. A reset connection fails the commands in flight, and ioredis
   * is back well within the pause: instances would count apart for the rest of it.
   */
  reconnected (): void {
    this.pausedUntil = 0
    // A check still trying the connection that was left (ioredis resends it on the new one) no
    // longer holds the others in memory: they would start an outage anew.
    this.probing = false
    // The outage is over now, not at the next check: without traffic the fallback gauge (and
    // /diagz, and the alert on it) stayed at 1 for as long as no guarded call came.
    if (this.outage) this.recovered()
  }

  private local (scope: Scope, key: string, windowMs: number, max: number): WindowCount {
    const count = this.memory.check(key, windowMs, max)
    this.counters?.checked(scope, 'memory', count.current > max)
    return count
  }

  private fallback (scope: Scope, key: string, windowMs: number, max: number, why: string): WindowCount {
    if (!this.outage) {
      this.outage = true
      this.log.warn({ err: why }, 'rate limits fall back to memory (per instance) until Redis is back')
    }
    this.failing = true
    this.counters?.fellBack()
    return this.local(scope, key, windowMs, max)
  }

  private recovered (): void {
    this.outage = false
    this.failing = false
    this.pausedUntil = 0
    this.counted?.()
    this.log.info('rate limits are counted in Redis again')
  }
}

// Key segments are escaped so that no tenant, user or address can write a `:` and make its key
// another's, nor `*` (the guard's "any"), nor Redis Cluster's `{}` hash tags.
const UNSAFE = /[%:*{}\s]/
const UNSAFE_ALL = /[%:*{}\s]/g
const escapeChar = (c: string): string => '%' + c.charCodeAt(0).toString(16).padStart(2, '0').toUpperCase()
export const keyPart = (value: string): string => UNSAFE.test(value) ? value.replace(UNSAFE_ALL, escapeChar) : value

/** An operation's limit for one user of one tenant: `bff:ratelimit:{tenant}:{user}:{op}`. */
export const opKey = (tenant: string, user: string, op: string): string => `bff:ratelimit:${keyPart(tenant)}:${keyPart(user)}:${op}`
/** The HTTP guard's key for a verified tenant (every user and op): `bff:ratelimit:{tenant}:*`. */
export const tenantKey = (tenant: string): string => `bff:ratelimit:${keyPart(tenant)}:*`
/** The HTTP guard's key for a caller without a verified identity: `bff:ratelimit:ip:{address}`. */
export const ipKey = (address: string): string => `bff:ratelimit:ip:${keyPart(address)}`

/**
 * @fastify/rate-limit's custom store contract (`new Store(options)`, `incr(key, cb, timeWindow,
 * max)`, `child(routeOptions)`) over the limiter, so the HTTP guard counts in the same sliding
 * window, Redis and fallback as the operations. `incr` never reports an error.
 */
export function fastifyStore (limiter: RateLimiter, scope: Scope): FastifyRateLimitStoreCtor {
  class MantleRateLimitStore implements FastifyRateLimitStore {
    private readonly suffix: string

    constructor (_options: unknown, suffix = '') {
      this.suffix = suffix
    }

    incr (key: string, callback: (error: Error | null, result?: { current: number, ttl: number }) => void, timeWindow: number, max: number): void {
      const count = limiter.check(scope, key + this.suffix, timeWindow, max)
      if (count instanceof Promise) count.then(c => callback(null, c), callback)
      else callback(null, count)
    }

    /** A route with a limit of its own counts apart: its method and URL end the key. */
    child (routeOptions: { method?: unknown, url?: unknown }): FastifyRateLimitStore {
      return new MantleRateLimitStore(routeOptions, this.suffix + ':' + keyPart(`${String(routeOptions.method)} ${String(routeOptions.url)}`).replace(/\//g, '%2F'))
    }
  }
  return MantleRateLimitStore as unknown as FastifyRateLimitStoreCtor
}
