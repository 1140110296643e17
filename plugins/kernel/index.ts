import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Counter, Gauge } from 'prom-client'
import { CallHistogram } from '../metrics/call-metrics.js'
import { KernelClient, type KernelMetrics } from './client.js'
import { OPEN_REASONS, type BreakerState, type CircuitBreaker, type OpenReason } from './breaker.js'
import { LATENCY_BUCKETS } from '../metrics/index.js'

export { KernelClient, childTraceparent } from './client.js'
export { CircuitBreaker, RetryBudget, type BreakerState } from './breaker.js'

export interface KernelPluginOptions {
  /** KERNEL_URL, when set, wins over the manifest's kernel.url. */
  url?: string | undefined
  resilience: boolean
  threshold?: number | undefined
  resetTimeoutMs?: number | undefined
  /** BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS. */
  keepAliveTimeoutMs?: number | undefined
  backoff?: { baseMs: number, capMs: number }
}

export interface KernelStatus {
  readonly origin: string
  /** `disabled` when retries and the breaker are switched off (the bulkhead never is). */
  breakerState: () => BreakerState | 'disabled'
  /** The breaker's failure-rate window as of now (CircuitBreaker.failureWindow); null without the rule or the breaker. */
  breakerWindow: () => ReturnType<CircuitBreaker['failureWindow']>
  inFlight: () => number
}

declare module 'fastify' {
  interface FastifyInstance {
    kernel: KernelStatus
  }
}

const BREAKER_VALUE: Record<BreakerState, number> = { closed: 0, 'half-open': 1, open: 2 }

/**
 * The breaker's metrics, registered only while it is on (BFF_CIRCUIT_BREAKER_ENABLED), as every
 * concern's (off, its state read 0, closed, while /readyz said disabled); the counter of its
 * openings, or null with metrics off.
 */
function breakerMetrics (app: FastifyInstance, origin: string, client: () => KernelClient): ((why: OpenReason) => void) | null {
  if (!app.hasDecorator('metrics')) return null
  const registers = [app.metrics.registry]
  // Read when Prometheus scrapes, as of then (an open breaker past its reset time is half-open).
  new Gauge({
    name: 'mantle_kernel_breaker_state',
    help: 'Kernel circuit breaker: 0 closed, 1 half-open, 2 open',
    labelNames: ['origin'] as const,
    registers,
    collect () {
      const b = client().breaker
      if (b !== null) this.set({ origin }, BREAKER_VALUE[b.current()])
    }
  }).set({ origin }, 0)
  const opened = new Counter({ name: 'mantle_kernel_breaker_opened_total', help: 'Times the Kernel circuit breaker opened, by why: consecutive (threshold failures in a row), failure_rate (the failure-rate rule), probe (the half-open probe failed)', labelNames: ['origin', 'reason'] as const, registers })
  // Each reason's series from 0: one first seen at 1 shows no increase() (Prometheus needs two
  // samples), and the flapping alert missed the first opening.
  for (const reason of OPEN_REASONS) opened.labels(origin, reason).inc(0)
  return why => opened.labels(origin, why).inc()
}

function kernelMetrics (app: FastifyInstance, origin: string, client: () => KernelClient): KernelMetrics | undefined {
  if (!app.hasDecorator('metrics')) return undefined
  const registers = [app.metrics.registry]
  const duration = new CallHistogram({ name: 'mantle_kernel_request_duration_seconds', help: 'Duration of each attempt towards the Kernel, by operation and outcome', labelNames: ['op', 'outcome'] as const, buckets: LATENCY_BUCKETS, registers })
  const retries = new Counter({ name: 'mantle_kernel_retries_total', help: 'Retries of idempotent Kernel calls', labelNames: ['op'] as const, registers })
  const exhausted = new Counter({ name: 'mantle_kernel_retry_budget_exhausted_total', help: 'Retries refused because the retry budget was spent', registers })
  const rejected = new Counter({ name: 'mantle_kernel_rejected_total', help: 'Calls failed without reaching the Kernel: breaker open, bulkhead full, their time ran out waiting for a connection (queue_timeout), or they were handed one with less time left than the Kernel needs (queue_shed)', labelNames: ['reason'] as const, registers })
  const dropped = new Counter({ name: 'mantle_kernel_answers_dropped_total', help: 'Kernel 2xx answers cut, and their calls answered 503 OVERLOADED, for want of room among the answers being read at once', registers })
  new Gauge({ name: 'mantle_kernel_answer_bytes', help: 'Bytes of Kernel 2xx answers being read now, all calls together (bounded: see mantle_kernel_answers_dropped_total)', registers, collect () { this.set(client().answerBytes) } }) // eslint-disable-line no-new
  const connections = new Counter({ name: 'mantle_kernel_pool_connections_opened_total', help: 'Connections the Kernel pool opened (requests / connections = reuse)', registers })
  // Pool gauges are read when Prometheus scrapes, not on the hot path.
  new Gauge({ // eslint-disable-line no-new
    name: 'mantle_kernel_pool',
    help: 'Kernel pool: connected, free, pending, queued, running sockets and requests',
    labelNames: ['state'] as const,
    registers,
    collect () {
      const s = client().pool.stats
      this.set({ state: 'connected' }, s.connected)
      this.set({ state: 'free' }, s.free)
      this.set({ state: 'pending' }, s.pending)
      // Waiting for a connection: in the gateway (KernelClient.queued), and in undici for a moment.
      this.set({ state: 'queued' }, s.queued + client().queued)
      this.set({ state: 'running' }, s.running)
    }
  })
  new Gauge({ name: 'mantle_kernel_in_flight', help: 'Calls in flight to the Kernel (the bulkhead counts these)', registers, collect () { this.set(client().inFlight) } }) // eslint-disable-line no-new
  return {
    forOperation (op) {
      const observer = (outcome: string): ((seconds: number) => void) => duration.series(op, outcome).observe
      const retry = retries.labels(op)
      return {
        call: { ok: observer('ok'), client_error: observer('client_error'), redirect: observer('redirect'), bad_answer: observer('bad_answer'), server_error: observer('server_error'), timeout: observer('timeout'), unavailable: observer('unavailable'), client_closed: observer('client_closed') },
        retry: () => retry.inc()
      }
    },
    budgetExhausted: () => exhausted.inc(),
    rejected: reason => rejected.labels(reason).inc(),
    answerDropped: () => dropped.inc(),
    connected: () => connections.inc()
  }
}

async function kernelPlugin (app: FastifyInstance, opts: KernelPluginOptions): Promise<void> {
  const settings = app.pipeline.manifest.kernel
  const origin = (opts.url ?? settings.url).replace(/\/$/, '')
  let client: KernelClient | null = null
  const metrics = kernelMetrics(app, origin, () => client!)
  const opened = opts.resilience ? breakerMetrics(app, origin, () => client!) : null
  client = new KernelClient({
    origin,
    connections: settings.connections,
    retries: settings.retries,
    maxInFlight: settings.maxInFlight,
    resilience: opts.resilience
      ? { threshold: opts.threshold ?? settings.circuitBreaker.threshold, resetTimeoutMs: opts.resetTimeoutMs ?? settings.circuitBreaker.resetTimeoutMs, rate: settings.circuitBreaker.rate }
      : null,
    ...(opts.keepAliveTimeoutMs === undefined ? {} : { keepAliveTimeoutMs: opts.keepAliveTimeoutMs }),
    ...(opts.backoff === undefined ? {} : { backoff: opts.backoff }),
    ...(metrics === undefined ? {} : { metrics }),
    onBreakerChange: (state, why) => {
      if (why !== null) {
        opened?.(why)
        app.log.warn({ origin, reason: why }, 'the Kernel circuit breaker opened')
      } else if (state === 'closed') {
        app.log.info({ origin }, 'the Kernel circuit breaker closed')
      }
    }
  })
  const c = client
  app.pipeline.setTerminal(op => c.forOperation(op))
  app.decorate('kernel', {
    origin,
    breakerState: () => c.breaker?.current() ?? 'disabled',
    breakerWindow: () => c.breaker?.failureWindow() ?? null,
    inFlight: () => c.inFlight
  })
  // Fastify has let in-flight requests finish before onClose: the pool can close now.
  app.addHook('onClose', async () => { await c.close() })
}

export default fp(kernelPlugin, { name: 'mantle-kernel', dependencies: ['mantle-pipeline'], fastify: '5.x' })
