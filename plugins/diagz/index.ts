import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import type { WebSocket } from 'ws'
import type { IncomingMessage } from 'node:http'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { PROTOCOLS, type Protocol, type Stage, type Next, type CallContext } from '../pipeline/index.js'
import { RollingWindow, percentiles, type WindowSummary } from './histogram.js'

// /diagz (CONTRACT §6): what an operator asks one instance, answered from counters kept as calls
// go by, so that reading it costs a few thousand additions whatever the load. Every structure
// here has a fixed size: the minute is 6 slots of 10 s, the hour 60 slots of 1 min.

/** A store's answer: its kind (memory, redis, postgres) and whether it works now. */
export interface StoreHealth {
  type: string
  healthy: boolean
  /** Anything else worth showing (e.g. "fallback to memory"). */
  detail?: string
}

/**
 * The health of a store kept in Redis with an in-process fallback (rate limits, cache,
 * idempotency): memory only, Redis answering, or Redis away and memory answering for it.
 * `inMemory` says what the process holds (e.g. "12 keys in memory").
 */
export function sharedStoreHealth (redis: boolean, redisHealthy: boolean, inMemory: string): StoreHealth {
  if (!redis) return { type: 'memory', healthy: true, detail: inMemory }
  return redisHealthy ? { type: 'redis', healthy: true } : { type: 'redis', healthy: false, detail: `fallback to memory, ${inMemory}` }
}

export interface Diagnostics {
  /** Adds a store to the `stores` section; `check` runs on each /diagz read, so it must be cheap and synchronous. */
  addStore: (name: string, check: () => StoreHealth) => void
  /** Adds a section of the report (e.g. an audit queue); `read` must be cheap and synchronous. */
  addSection: (name: string, read: () => unknown) => void
  /** The report /diagz answers. */
  report: () => DiagzReport
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Present when BFF_DIAGZ_ENABLED: concerns plug their stores and sections into /diagz. */
    diagz: Diagnostics
  }
}

export interface DiagzOptions {
  version: string
  /**
   * The faces that are on, which `adapters` lists (one that is off is left out, as /metrics and
   * /readyz leave it out: listed at zero, it read as on but idle). Default: every face.
   */
  faces?: readonly Protocol[]
  /** Whether the response cache is on, which the `cache` section is about. Default: on. */
  cache?: boolean
  /** Slot lengths (tests shorten them); defaults 10 s and 60 s. */
  minuteSlotMs?: number
  hourSlotMs?: number
  /**
   * One call in this many is timed per stage (1 times every call). Unset: one in 8, or fewer
   * as the load grows (about SAMPLED_PER_SECOND calls a second).
   */
  stageSampleEvery?: number
}

/** How many calls the per-stage timing follows at most a second under load, by default. */
export const SAMPLED_PER_SECOND = 128
const MIN_SAMPLE_EVERY = 8
const MAX_SAMPLE_EVERY = 1024

/**
 * The sampling that keeps about SAMPLED_PER_SECOND timed calls a second: one in 8 at low rates
 * (the timing then costs next to nothing), one in a power of two above as the calls of the
 * last second grow, up to one in 1024.
 */
export function sampleEveryFor (callsPerSecond: number): number {
  let every = MIN_SAMPLE_EVERY
  while (every < MAX_SAMPLE_EVERY && callsPerSecond / every > SAMPLED_PER_SECOND) every *= 2
  return every
}

/** One call in `every` is timed; the object is shared, so the rate can follow the load. */
export interface StageSampler { every: number }

export interface StageStats {
  /** Every call that entered the stage. */
  calls: number
  /** The calls timed: the average, the slowest and the outcomes are theirs. */
  sampled: number
  errors: number
  refused: number
  totalMs: number
  slowestMs: number
}

interface Latencies { p50: number | null, p95: number | null, p99: number | null, p999: number | null }
interface WindowReport {
  seconds: number
  calls: number
  requestsPerSecond: number
  errorsPerSecond: number
  errorRate: number | null
  latencyMs: Latencies
}

export interface DiagzReport {
  version: string
  uptimeSeconds: number
  startedAt: string
  lastMinute: WindowReport
  lastHour: WindowReport
  stages: Record<string, StageStats & { avgMs: number | null }>
  /** The faces that are on. */
  adapters: Partial<Record<Protocol, { connections: number | null, calls: number, errors: number, refused: number, requestsPerSecond: number }>>
  http: { connections: number }
  stores: Record<string, StoreHealth>
  /** With the response cache on. */
  cache?: { hitRate: number | null, hits: number, misses: number, stale: number }
  /** `failureWindow`: with the failure-rate rule, the attempts of its window and how many failed. */
  breakers: Record<string, { state: string, failureWindow?: { calls: number, failures: number, failureRate: number, minimumCalls: number, windowMs: number } }>
  memory: { rssBytes: number, heapUsedBytes: number, heapTotalBytes: number, externalBytes: number, arrayBuffersBytes: number }
  eventLoop: { delayP50Ms: number, delayP99Ms: number, delayMaxMs: number }
  [section: string]: unknown
}

const QUANTILES = [0.5, 0.95, 0.99, 0.999] as const
const KIND = new Map<Protocol, number>(PROTOCOLS.map((p, i) => [p, i]))
/** WebSocket upgrade paths of the faces that hold connections of their own. */
const UPGRADE_FACES: ReadonlyArray<readonly [string, Protocol]> = [['/ws', 'websocket'], ['/graphql', 'graphql'], ['/trpc', 'trpc']]

/** 0 success, 1 refused (a 4xx: the client's doing), 2 error (anything else). */
export function outcomeOf (err: unknown): 1 | 2 {
  const status = (err as { statusCode?: unknown } | null)?.statusCode
  return typeof status === 'number' && status >= 400 && status < 500 ? 1 : 2
}

const round = (n: number, digits = 3): number => Math.round(n * 10 ** digits) / 10 ** digits
/** How often the event-loop delay is sampled (ms). */
const LOOP_RESOLUTION_MS = 20
/**
 * A sampled event-loop delay (ns) as ms of delay: less the sampling interval each sample waits
 * on purpose (an idle loop read 20 ms, where load shedding, which subtracts it, saw 0).
 */
export const loopDelay = (ns: number): number => round(Math.max(0, ns / 1e6 - LOOP_RESOLUTION_MS))
const ms = (micros: number | null): number | null => micros === null ? null : round(micros / 1000)

function windowReport (s: WindowSummary): WindowReport {
  const calls = s.calls.reduce((a, b) => a + b, 0)
  const errors = s.errors.reduce((a, b) => a + b, 0)
  const [p50, p95, p99, p999] = percentiles(s.latency, s.count, QUANTILES).map(ms)
  return {
    seconds: round(s.seconds, 1),
    calls,
    requestsPerSecond: round(calls / s.seconds, 2),
    errorsPerSecond: round(errors / s.seconds, 2),
    errorRate: calls === 0 ? null : round(errors / calls, 5),
    latencyMs: { p50, p95, p99, p999 }
  }
}

/**
 * The per-stage timer, built once per (stage, operation) at compile time. One call in
 * `sampleEvery` is timed: it records the stage's own time (its total minus the time spent in
 * the stages after it) and counts an error only where it started (a Kernel failure is the
 * Kernel's, not every stage's it passes through). The other calls are counted and go straight
 * on: timing every call costs two promises and four clock reads per stage, measured at
 * ~4 us per stage and call on this project's VM, more than a stage's own work.
 */
export function timeStage (stats: StageStats, stage: Stage, sampler: StageSampler = { every: 1 }): Stage {
  let tick = 0
  return (ctx, next) => {
    stats.calls++
    if (++tick < sampler.every) return stage(ctx, next)
    tick = 0
    const start = performance.now()
    let inner = 0
    let innerError: unknown = null
    const timedNext: Next = (c) => {
      const t = performance.now()
      let p: Promise<unknown>
      try {
        p = next(c)
      } catch (err) {
        inner += performance.now() - t
        innerError = err
        throw err
      }
      return p.then(value => { inner += performance.now() - t; return value }, (err: unknown) => { inner += performance.now() - t; innerError = err; throw err })
    }
    const done = (err: unknown): void => {
      const own = performance.now() - start - inner
      stats.sampled++
      stats.totalMs += own
      if (own > stats.slowestMs) stats.slowestMs = own
      if (err !== null && err !== innerError) {
        if (outcomeOf(err) === 1) stats.refused++
        else stats.errors++
      }
    }
    let result: Promise<unknown>
    try {
      result = stage(ctx, timedNext)
    } catch (err) {
      done(err)
      throw err
    }
    return result.then(value => { done(null); return value }, (err: unknown) => { done(err); throw err })
  }
}

async function diagzPlugin (app: FastifyInstance, opts: DiagzOptions): Promise<void> {
  // Uptime and the windows' rates are durations, on performance.now(); the wall clock gives only
  // the start's time of day (on it, a clock stepped back made uptimeSeconds negative, and every
  // rate a thousand times too high, the window's seconds at their floor).
  const startedAt = Date.now()
  const started = performance.now()
  const minuteSlotMs = opts.minuteSlotMs ?? 10_000
  const hourSlotMs = opts.hourSlotMs ?? 60_000
  const sampler: StageSampler = { every: opts.stageSampleEvery ?? MIN_SAMPLE_EVERY }
  const faces = new Set<Protocol>(opts.faces ?? PROTOCOLS)
  const minute = new RollingWindow(6, minuteSlotMs, PROTOCOLS.length, started)
  const hour = new RollingWindow(60, hourSlotMs, PROTOCOLS.length, started)
  const totals = { calls: new Float64Array(PROTOCOLS.length), errors: new Float64Array(PROTOCOLS.length), refused: new Float64Array(PROTOCOLS.length) }
  const cache = { hit: 0, miss: 0, stale: 0 }
  // One stats object per stage name, shared by every operation: bounded by the stage list.
  const stages = new Map<string, StageStats>()
  const stores = new Map<string, () => StoreHealth>()
  const sections = new Map<string, () => unknown>()
  const sockets = new Map<Protocol, number>()
  let httpConnections = 0
  const loop = monitorEventLoopDelay({ resolution: LOOP_RESOLUTION_MS })
  loop.enable()

  // Rotation on timers, so a call records with no clock read beyond the one it already made.
  const minuteTimer = setInterval(() => minute.rotate(performance.now()), minuteSlotMs)
  const hourTimer = setInterval(() => { hour.rotate(performance.now()); loop.reset() }, hourSlotMs)
  minuteTimer.unref()
  hourTimer.unref()
  // Timing a call costs ~0.5 us per stage (two promises, four clock reads): under load the share
  // of calls timed shrinks, so that the cost stays a few microseconds a second, not per call.
  let counted = 0
  const samplerTimer = opts.stageSampleEvery !== undefined
    ? null
    : setInterval(() => {
      const calls = totals.calls.reduce((a, b) => a + b, 0)
      sampler.every = sampleEveryFor(calls - counted)
      counted = calls
    }, 1000)
  samplerTimer?.unref()

  const record = (protocol: Protocol, micros: number, outcome: 0 | 1 | 2): void => {
    const kind = KIND.get(protocol)!
    minute.record(kind, micros, outcome)
    hour.record(kind, micros, outcome)
    totals.calls[kind]++
    if (outcome === 2) totals.errors[kind]++
    else if (outcome === 1) totals.refused[kind]++
  }

  // Outermost stage: every call of every face, from its context's creation to its outcome.
  app.pipeline.addStage({
    name: 'diagz',
    order: -1,
    build () {
      const failed = (ctx: CallContext, err: unknown): never => {
        record(ctx.protocol, (performance.now() - ctx.startedAt) * 1000, outcomeOf(err))
        throw err
      }
      return (ctx, next) => {
        let pending: Promise<unknown>
        try {
          pending = next(ctx)
        } catch (err) {
          // Checking stages throw synchronously (identity, roles, validation): with no async
          // stage between (metrics off), their refusals were never counted.
          return failed(ctx, err)
        }
        return pending.then(value => {
          record(ctx.protocol, (performance.now() - ctx.startedAt) * 1000, 0)
          if (ctx.cache !== null) cache[ctx.cache]++
          return value
        }, (err: unknown) => failed(ctx, err))
      }
    }
  })
  app.pipeline.instrument((name, _op, stage) => {
    if (name === 'diagz') return stage
    let stats = stages.get(name)
    if (stats === undefined) {
      stats = { calls: 0, sampled: 0, errors: 0, refused: 0, totalMs: 0, slowestMs: 0 }
      stages.set(name, stats)
    }
    return timeStage(stats, stage, sampler)
  })

  const addStore = (name: string, check: () => StoreHealth): void => {
    if (stores.has(name)) throw new Error(`diagz: the store ${name} is added twice`)
    stores.set(name, check)
  }
  const addSection = (name: string, read: () => unknown): void => {
    if (sections.has(name) || name in FIXED_SECTIONS) throw new Error(`diagz: the section ${name} is added twice`)
    sections.set(name, read)
  }

  const report = (): DiagzReport => {
    const now = performance.now()
    const minuteSummary = minute.summary(now)
    const adapters = {} as DiagzReport['adapters']
    for (const [i, p] of PROTOCOLS.entries()) {
      if (!faces.has(p)) continue
      adapters[p] = {
        connections: sockets.get(p) ?? null,
        calls: totals.calls[i],
        errors: totals.errors[i],
        refused: totals.refused[i],
        requestsPerSecond: round(minuteSummary.calls[i] / minuteSummary.seconds, 2)
      }
    }
    const stageReport: DiagzReport['stages'] = {}
    for (const [name, s] of stages) {
      stageReport[name] = { calls: s.calls, sampled: s.sampled, avgMs: s.sampled === 0 ? null : round(s.totalMs / s.sampled, 4), slowestMs: round(s.slowestMs, 3), totalMs: round(s.totalMs, 1), errors: s.errors, refused: s.refused }
    }
    const storeReport: Record<string, StoreHealth> = {}
    for (const [name, check] of stores) {
      try {
        storeReport[name] = check()
      } catch (err) {
        storeReport[name] = { type: 'unknown', healthy: false, detail: (err as Error).message }
      }
    }
    const lookups = cache.hit + cache.miss + cache.stale
    const breakers: DiagzReport['breakers'] = {}
    if (app.hasDecorator('kernel')) {
      const failureWindow = app.kernel.breakerWindow()
      breakers.kernel = { state: app.kernel.breakerState(), ...(failureWindow === null ? {} : { failureWindow }) }
    }
    const mem = process.memoryUsage()
    const out: DiagzReport = {
      version: opts.version,
      uptimeSeconds: round((now - started) / 1000, 1),
      startedAt: new Date(startedAt).toISOString(),
      lastMinute: windowReport(minuteSummary),
      lastHour: windowReport(hour.summary(now)),
      stages: stageReport,
      adapters,
      http: { connections: httpConnections },
      stores: storeReport,
      ...(opts.cache === false ? {} : { cache: { hitRate: lookups === 0 ? null : round((cache.hit + cache.stale) / lookups, 4), hits: cache.hit, misses: cache.miss, stale: cache.stale } }),
      breakers,
      memory: { rssBytes: mem.rss, heapUsedBytes: mem.heapUsed, heapTotalBytes: mem.heapTotal, externalBytes: mem.external, arrayBuffersBytes: mem.arrayBuffers },
      eventLoop: { delayP50Ms: loopDelay(loop.percentile(50)), delayP99Ms: loopDelay(loop.percentile(99)), delayMaxMs: loopDelay(loop.max) }
    }
    for (const [name, read] of sections) {
      try {
        out[name] = read()
      } catch (err) {
        out[name] = { error: (err as Error).message }
      }
    }
    return out
  }

  app.decorate('diagz', { addStore, addSection, report })

  // What exists in every build: the Kernel's breaker (above), the event bus and the shared Redis.
  // The plugins that register later are read once the app is ready.
  app.addHook('onReady', async () => {
    if (app.hasDecorator('events') && !stores.has('events')) {
      stores.set('events', () => {
        const h = app.events.health()
        return h.store === 'redis' ? { type: 'redis', healthy: h.up, ...(h.up ? {} : { detail: 'delivering on this instance only' }) } : { type: 'memory', healthy: true }
      })
    }
    if (app.hasDecorator('redis') && !stores.has('redis')) {
      stores.set('redis', () => {
        if (!app.redis.up()) return { type: 'redis', healthy: false, detail: 'unreachable: stores fall back to memory' }
        const denial = app.redis.denial()
        if (denial === null) return { type: 'redis', healthy: true }
        // The heartbeat's PING alone refused: every store still runs on Redis (their own entries say so).
        return { type: 'redis', healthy: false, detail: `refused (the ACL of REDIS_URL's user): ${denial}; ${app.redis.denialOnMemory() ? 'those parts fall back to memory' : 'the stores still run on Redis, but a Redis that stops answering is not found'}` }
      })
    }
    if (app.hasDecorator('websocketServer')) {
      for (const [, face] of UPGRADE_FACES) sockets.set(face, 0)
      app.websocketServer.on('connection', (socket: WebSocket, request: IncomingMessage) => {
        const path = (request.url ?? '').split('?')[0]
        const face = UPGRADE_FACES.find(([prefix]) => path === prefix || path.startsWith(prefix + '/'))?.[1]
        if (face === undefined) return
        sockets.set(face, sockets.get(face)! + 1)
        socket.once('close', () => sockets.set(face, sockets.get(face)! - 1))
      })
    }
  })
  app.server.on('connection', (socket) => {
    httpConnections++
    socket.once('close', () => { httpConnections-- })
  })
  app.addHook('onClose', async () => {
    clearInterval(minuteTimer)
    clearInterval(hourTimer)
    if (samplerTimer !== null) clearInterval(samplerTimer)
    loop.disable()
  })
}

/**
 * GET /diagz (role system), registered apart from the plugin: after identity, the rate-limit
 * guard and the audit, whose onRoute hooks reach only the routes registered after them (the
 * audit records each read, allowed or refused, as `admin.diagz`), while the plugin itself comes
 * before the concerns so that each can add its store.
 */
export async function diagzRoute (app: FastifyInstance): Promise<void> {
  app.get('/diagz', { config: { audit: 'admin.diagz' }, onRequest: app.requireRole('system'), schema: { hide: true } }, async () => app.diagz.report())
}

const FIXED_SECTIONS = { version: 1, uptimeSeconds: 1, startedAt: 1, lastMinute: 1, lastHour: 1, stages: 1, adapters: 1, http: 1, stores: 1, cache: 1, breakers: 1, memory: 1, eventLoop: 1 }

export default fp(diagzPlugin, { name: 'mantle-diagz', dependencies: ['mantle-pipeline'], fastify: '5.x' })
