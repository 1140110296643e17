import fp from 'fastify-plugin'
import { closeAfterAnswer } from '../../lingering.js'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import underPressure from '@fastify/under-pressure'
import { getHeapStatistics } from 'node:v8'
import { Counter, Gauge } from 'prom-client'
import { MantleError } from '../../errors.js'
import { PROBE_PATHS } from '../../probes.js'

// Load shedding with @fastify/under-pressure: it samples event-loop delay, heap and RSS once per
// interval, and past a bound every request but the exempt ones is refused at onRequest, before
// any parsing, with 503 OVERLOADED and Retry-After. WebSocket upgrades pass through onRequest
// too, so they are refused the same way. What arrives on a socket already open never passes
// onRequest: its calls and subscribes are refused by the faces (runCall, the event bus) through
// the check this plugin hands the pipeline, with the same answer.

export interface PressureOptions {
  /** Mean event-loop delay (ms) over one sample beyond which requests are shed; 0: not checked. */
  maxEventLoopDelayMs: number
  /** Heap used (bytes); 0: not checked; undefined: 90% of V8's old-generation limit (defaultHeapBound). */
  maxHeapBytes?: number | undefined
  /** Resident set size (bytes); 0: not checked. */
  maxRssBytes: number
  /** Seconds a refused client is told to wait. */
  retryAfterSeconds?: number
  /** How often the bounds are sampled (ms, default 1000; tests shorten it). */
  sampleIntervalMs?: number
}

export type PressureReason = 'eventLoopDelay' | 'heapUsedBytes' | 'rssBytes'

export interface LoadShedding {
  /** The bound exceeded at the last sample, or null; read by /readyz. */
  status: () => { reason: PressureReason, value: number, limit: number } | null
  readonly limits: { maxEventLoopDelayMs: number, maxHeapBytes: number, maxRssBytes: number }
  /**
   * While a bound is exceeded, the refusal of new work on an open WebSocket (a call, which
   * runCall makes before any stage, or a subscribe), counted as a shed request; else null.
   */
  refuse: () => Error | null
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Present when BFF_LOAD_SHEDDING_ENABLED. */
    loadShedding: LoadShedding
  }
}

/**
 * Never shed: liveness (a pod that sheds must not be restarted for it), readiness (it says
 * not-ready itself), the metrics scrape and diagnostics (what an operator needs most when the
 * instance is overloaded). All four are cheap and answer from memory.
 */
export const EXEMPT_ROUTES: ReadonlySet<string> = new Set([...PROBE_PATHS, '/diagz'])

/**
 * V8's young generation at its largest: three semi-spaces, 16 MiB each on 64-bit unless
 * `--max-semi-space-size` (MiB) says otherwise, in Node's arguments or NODE_OPTIONS.
 */
export function youngGenerationBytes (argv: readonly string[] = [...process.execArgv, ...(process.env.NODE_OPTIONS ?? '').split(/\s+/)]): number {
  let semiMiB = 16
  for (const arg of argv) {
    const m = /^--max[-_]semi[-_]space[-_]size=(\d+)$/.exec(arg)
    if (m !== null) semiMiB = Number(m[1])
  }
  return 3 * semiMiB * 2 ** 20
}

/**
 * The default heap bound: 90% of the old generation's limit (`--max-old-space-size`), beyond
 * which the process is about to fail. V8's heap_size_limit is that limit plus the young
 * generation, and a heap filled with live objects dies when its old generation is full, its
 * heapUsed then the old generation and one semi-space at most: 90% of heap_size_limit was never
 * reached with --max-old-space-size=256 (274 MiB; the process died at 253) nor deploy/k8s' 384
 * (389 MiB; it died at 372), and the heap bound shed nothing.
 */
export const defaultHeapBound = (): number => {
  const limit = getHeapStatistics().heap_size_limit
  const young = youngGenerationBytes()
  // A young generation said to be half the heap or more is none we know of: the whole limit then.
  return Math.floor((young < limit / 2 ? limit - young : limit) * 0.9)
}

async function pressurePlugin (app: FastifyInstance, opts: PressureOptions): Promise<void> {
  const limits = {
    maxEventLoopDelayMs: opts.maxEventLoopDelayMs,
    maxHeapBytes: opts.maxHeapBytes ?? defaultHeapBound(),
    maxRssBytes: opts.maxRssBytes
  }
  const retryAfter = String(opts.retryAfterSeconds ?? 5)
  const sampleInterval = opts.sampleIntervalMs ?? 1000
  // Building the app (schemas, GraphQL, routes) blocks the loop for a while, and the first
  // samples would hold that against the ready instance: the loop delay counts only from the
  // second sample after start-up on. Heap and RSS count at once.
  let settled = false
  app.addHook('onReady', (done) => {
    setTimeout(() => { settled = true }, 2 * sampleInterval).unref()
    done()
  })
  function status (): ReturnType<LoadShedding['status']> {
    const m = app.memoryUsage()
    if (limits.maxEventLoopDelayMs > 0 && settled && m.eventLoopDelay > limits.maxEventLoopDelayMs) return { reason: 'eventLoopDelay', value: m.eventLoopDelay, limit: limits.maxEventLoopDelayMs }
    if (limits.maxHeapBytes > 0 && m.heapUsed > limits.maxHeapBytes) return { reason: 'heapUsedBytes', value: m.heapUsed, limit: limits.maxHeapBytes }
    if (limits.maxRssBytes > 0 && m.rssBytes > limits.maxRssBytes) return { reason: 'rssBytes', value: m.rssBytes, limit: limits.maxRssBytes }
    return null
  }
  let shed: ((reason: string) => void) | null = null
  if (app.hasDecorator('metrics')) {
    const registers = [app.metrics.registry]
    const counter = new Counter({ name: 'mantle_load_shed_total', help: 'Requests, and calls or subscribes on open WebSockets, refused with 503 OVERLOADED because the instance was under pressure, by bound', labelNames: ['reason'] as const, registers })
    shed = reason => counter.labels(reason).inc()
    // Each checked bound's series from 0: one first seen at 1 shows no increase() (Prometheus
    // needs two samples), and a lone burst of shedding was in no rate().
    const checked: Record<PressureReason, number> = { eventLoopDelay: limits.maxEventLoopDelayMs, heapUsedBytes: limits.maxHeapBytes, rssBytes: limits.maxRssBytes }
    for (const [reason, limit] of Object.entries(checked)) if (limit > 0) counter.labels(reason).inc(0)
    new Gauge({ name: 'mantle_under_pressure', help: '1 while the instance sheds load (a bound of BFF_MAX_* exceeded at the last sample)', registers, collect () { this.set(status() === null ? 0 : 1) } }) // eslint-disable-line no-new
  }

  // A call or subscribe on an open WebSocket while a bound is exceeded: refused as an HTTP
  // request is, counted the same. Asked only before socket calls and subscribes: HTTP calls pay nothing for it.
  const overloaded = (): MantleError => new MantleError('OVERLOADED', 'The gateway is overloaded: retry later', { headers: { 'retry-after': retryAfter } })
  const refuse = (): Error | null => {
    const over = status()
    if (over === null) return null
    shed?.(over.reason)
    return overloaded()
  }

  await app.register(underPressure, {
    maxEventLoopDelay: limits.maxEventLoopDelayMs,
    maxHeapUsedBytes: limits.maxHeapBytes,
    maxRssBytes: limits.maxRssBytes,
    sampleInterval,
    // Runs only while a bound is exceeded: the cost when all is well is one comparison per bound.
    pressureHandler: async (request: FastifyRequest, reply, type) => {
      if (EXEMPT_ROUTES.has(request.routeOptions.url ?? '')) return
      if (type === 'eventLoopDelay' && !settled) return
      shed?.(type)
      // Set here too: the GraphQL and tRPC faces encode the error in their own envelope.
      reply.header('retry-after', retryAfter)
      if (request.headers.upgrade !== undefined) closeAfterAnswer(request, reply)
      throw overloaded()
    }
  })

  app.decorate('loadShedding', { limits, status, refuse })
}

export default fp(pressurePlugin, { name: 'mantle-pressure', fastify: '5.x' })
