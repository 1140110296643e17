import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Registry, Gauge, collectDefaultMetrics } from 'prom-client'
import { CallHistogram, type HistogramSeries } from './call-metrics.js'
import { StageOrder, PROTOCOLS, type Protocol } from '../pipeline/index.js'
import { requireStaticToken } from '../auth/static-token.js'

export interface Metrics {
  readonly registry: Registry
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Present when metrics are on; other plugins register their own metrics on its registry. */
    metrics: Metrics
  }
}

/** Seconds; a gateway's interesting range is sub-millisecond to the Kernel's timeouts. */
export const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

const CLASSES = ['2xx', '4xx', '5xx'] as const
const classOf = (err: unknown): 1 | 2 => {
  const status = (err as { statusCode?: unknown } | null)?.statusCode
  return typeof status === 'number' && status >= 400 && status < 500 ? 1 : 2
}
/** The class of what a call of several was answered: its result (null) or, left out, the status in its place. */
const answeredClass = (leftOut: { status: number } | null): 0 | 1 | 2 => leftOut === null ? 0 : leftOut.status >= 400 && leftOut.status < 500 ? 1 : 2

export interface MetricsOptions {
  /** When set, GET /metrics answers only `Authorization: Bearer <token>` (BFF_METRICS_TOKEN). */
  token?: string
}

async function metricsPlugin (app: FastifyInstance, opts: MetricsOptions): Promise<void> {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry })

  // Labels are the manifest's op names and fixed sets: cardinality is bounded by the catalog.
  const duration = new CallHistogram({
    name: 'mantle_request_duration_seconds',
    help: 'Duration of operation calls through the pipeline, by protocol, operation and status class',
    labelNames: ['protocol', 'op', 'status_class'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [registry]
  })
  // Counted in a plain number and read when scraped: no gauge update per call.
  let inFlight = 0
  new Gauge({ name: 'mantle_requests_in_flight', help: 'Operation calls in the pipeline now', registers: [registry], collect () { this.set(inFlight) } }) // eslint-disable-line no-new

  app.decorate('metrics', { registry })

  app.pipeline.addStage({
    name: 'metrics',
    order: StageOrder.metrics,
    build (op) {
      // Optimization: the label sets of an op are resolved once, not per call.
      const children = new Map<Protocol, HistogramSeries[]>()
      for (const p of PROTOCOLS) children.set(p, CLASSES.map(c => duration.series(p, op.name, c)))
      return async (ctx, next) => {
        inFlight++
        const observers = children.get(ctx.protocol)!
        try {
          const result = await next(ctx)
          const seconds = (performance.now() - ctx.startedAt) / 1000
          // One call of several whose answer is bounded as a whole: counted once its face has
          // decided, as the audit entry is (PAYLOAD_TOO_LARGE, a 4xx, where its result is left out).
          if (ctx.answer === null) observers[0].observe(seconds)
          else ctx.answer.hold(ctx.requestId, leftOut => { observers[answeredClass(leftOut)].observe(seconds) })
          return result
        } catch (err) {
          observers[classOf(err)].observe((performance.now() - ctx.startedAt) / 1000)
          throw err
        } finally {
          inFlight--
        }
      }
    }
  })

  // Unguarded, /metrics tells anyone who reaches it the gateway's traffic by operation and face.
  app.get('/metrics', { schema: { hide: true }, ...(opts.token === undefined ? {} : { onRequest: requireStaticToken(opts.token, 'metrics') }) }, async (_request, reply) => {
    reply.type(registry.contentType)
    return await registry.metrics()
  })
}

export default fp(metricsPlugin, { name: 'mantle-metrics', dependencies: ['mantle-pipeline'], fastify: '5.x' })
