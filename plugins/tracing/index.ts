import fp from 'fastify-plugin'
import type { FastifyBaseLogger, FastifyInstance } from 'fastify'
import { ROOT_CONTEXT, SpanKind, SpanStatusCode, TraceFlags, trace, createNoopMeter, type Attributes, type Context, type Meter, type MeterProvider, type ObservableCallback } from '@opentelemetry/api'
import { Counter, Gauge } from 'prom-client'
import { TracerProvider, BatchSpanProcessor, ParentBasedSampler, TraceIdRatioBasedSampler, type ReadableSpan, type SpanExporter } from '@opentelemetry/sdk-trace'
import { ExportResultCode, type ExportResult } from '@opentelemetry/core'
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http'
import { resourceFromAttributes } from '@opentelemetry/resources'
import { StageOrder } from '../pipeline/index.js'
import { toProblem } from '../../errors.js'
import { parseTraceparent } from '../../ids.js'

// One OpenTelemetry span per call, named by the operation, a child of the caller's
// `traceparent`, and the parent of the Kernel call (the Kernel client sends this span's
// context as its traceparent). Registered only when an OTLP endpoint is configured: without
// one, no stage, no provider, nothing on the hot path.

export interface TracingOptions {
  /** The OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces. */
  url: string
  serviceName: string
  version: string
  /** Share of new traces recorded (0..1); a caller's sampled flag is followed. */
  sampleRatio: number
  /** Tests hand their own exporter. */
  exporter?: SpanExporter
}

// One export's bound: the exporter's default (10 s) is close-with-grace's whole grace period, so a
// collector that accepted and never answered made every shutdown end killed, exit code 1. The
// exporter's is a socket's idle timeout only (a collector writing its answer a byte a second never
// trips it): the batch processor's bound on an export is this too.
const EXPORT_TIMEOUT_MS = 2000
// Shutdown's bound on the collector: the last batches' export, and no wait beyond it for exports
// still unanswered (the exporter's own shutdown awaits each, unbounded).
const SHUTDOWN_TIMEOUT_MS = EXPORT_TIMEOUT_MS + 500

// Exports in flight at most: the one the batch processor waits for, and one it stopped waiting
// for after its EXPORT_TIMEOUT_MS (it then sends the next batch, while the exporter keeps the first
// until the collector answers: a collector trickling its answer never trips the exporter's idle
// timeout). Beyond it an export fails at once, its spans counted failed. The exporter's default
// (30) held up to 30 batches of 512 spans in flight, 15,360 spans beyond SPAN_QUEUE_MAX.
const EXPORTS_IN_FLIGHT = 2

/** The OTLP/HTTP exporter to the collector at `url`. */
export function collectorExporter (url: string): SpanExporter {
  return new OTLPTraceExporter({ url, timeoutMillis: EXPORT_TIMEOUT_MS, concurrencyLimit: EXPORTS_IN_FLIGHT })
}

/** The caller's W3C traceparent as a remote parent context (ROOT_CONTEXT when absent or invalid). */
export function parentContext (traceparent: string | undefined): Context {
  const parent = parseTraceparent(traceparent)
  if (parent === null) return ROOT_CONTEXT
  return trace.setSpanContext(ROOT_CONTEXT, { traceId: parent.traceId, spanId: parent.spanId, traceFlags: parseInt(parent.flags, 16) & TraceFlags.SAMPLED, isRemote: true })
}

/** Spans waiting for export at most; beyond it a span is dropped. */
export const SPAN_QUEUE_MAX = 4096

/**
 * What the batch processor tells of itself through OpenTelemetry's self-observability meter (its
 * only public report of its queue): the queue's length, and spans done (exported, failed, or
 * dropped with the queue full). The gateway's metrics are prom-client's, so a meter of our own
 * takes those two instruments and leaves the rest to the no-op meter.
 */
export class SpanQueueReport implements MeterProvider {
  queueLength: ObservableCallback | null = null
  /** Told of each batch of spans done. */
  done: (outcome: 'exported' | 'failed' | 'dropped', n: number) => void = () => {}

  getMeter (): Meter {
    const meter = Object.create(createNoopMeter()) as Meter
    const report = this
    // New instruments, not the no-op meter's: it hands out one shared instance of each kind.
    meter.createCounter = (name: string) => {
      if (name !== 'otel.sdk.processor.span.processed') return createNoopMeter().createCounter(name)
      return {
        add: (n: number, attributes?: Attributes) => {
          const error = attributes?.['error.type']
          report.done(error === undefined ? 'exported' : error === 'queue_full' ? 'dropped' : 'failed', n)
        }
      }
    }
    meter.createObservableUpDownCounter = (name: string) => {
      if (name !== 'otel.sdk.processor.span.queue.size') return createNoopMeter().createObservableUpDownCounter(name)
      return {
        addCallback: (callback: ObservableCallback) => { report.queueLength = callback },
        removeCallback: () => { report.queueLength = null }
      }
    }
    return meter
  }

  /** The queue's length now (0 once the processor is shut down). */
  length (): number {
    let length = 0
    this.queueLength?.({ observe: (value: number) => { length = value } })
    return length
  }
}

/**
 * An exporter, with the spans handed to it and not yet answered for counted, and the collector's
 * outages logged: a warn line when an export fails after one that did not (or as the first), an
 * info line when one is taken again; not a line per batch. The SDK itself reports only to
 * OpenTelemetry's diag logger, silent unless set: a collector away or refusing left no line.
 */
class UnansweredCount implements SpanExporter {
  unanswered = 0
  private failing = false
  constructor (private readonly exporter: SpanExporter, private readonly log: FastifyBaseLogger) {}

  export (spans: ReadableSpan[], done: (result: ExportResult) => void): void {
    this.unanswered += spans.length
    this.exporter.export(spans, result => {
      this.unanswered -= spans.length
      this.watch(result)
      done(result)
    })
  }

  private watch (result: ExportResult): void {
    const failed = result.code !== ExportResultCode.SUCCESS
    if (failed === this.failing) return
    this.failing = failed
    // The error's message only: an OTLPExporterError carries the collector's answer (up to 4 MB) as `data`.
    if (failed) this.log.warn({ err: result.error?.message }, 'trace export failed: spans are lost until the collector takes them again')
    else this.log.info('trace export works again')
  }

  async shutdown (): Promise<void> { await this.exporter.shutdown() }

  async forceFlush (): Promise<void> { await this.exporter.forceFlush?.() }
}

async function tracingPlugin (app: FastifyInstance, opts: TracingOptions): Promise<void> {
  const report = new SpanQueueReport()
  const exporter = new UnansweredCount(opts.exporter ?? collectorExporter(opts.url), app.log)
  const provider = new TracerProvider({
    resource: resourceFromAttributes({ 'service.name': opts.serviceName, 'service.version': opts.version }),
    sampler: new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(opts.sampleRatio) }),
    spanProcessors: [new BatchSpanProcessor({ exporter, exportTimeoutMillis: EXPORT_TIMEOUT_MS, maxQueueSize: SPAN_QUEUE_MAX, maxExportBatchSize: 512, scheduledDelayMillis: 1000, selfObsMeterProvider: report })]
  })
  // The metrics plugin registers after this one: its registry is there once the app is ready.
  app.addHook('onReady', async () => {
    if (!app.hasDecorator('metrics')) return
    const registers = [app.metrics.registry]
    new Gauge({ name: 'mantle_tracing_span_queue', help: `Finished spans waiting for export (at most ${SPAN_QUEUE_MAX}; beyond it spans are dropped)`, registers, collect () { this.set(report.length()) } }) // eslint-disable-line no-new
    const spans = new Counter({ name: 'mantle_tracing_spans_total', help: 'Finished spans by outcome: exported, failed (the export failed), dropped (the queue was full, or unanswered at shutdown)', labelNames: ['outcome'] as const, registers })
    report.done = (outcome, n) => { spans.labels(outcome).inc(n) }
  })
  const tracer = provider.getTracer('mantle', opts.version)

  app.pipeline.addStage({
    name: 'tracing',
    order: StageOrder.tracing,
    build (op) {
      const kind = op.type === 'query' ? 'query' : 'mutation'
      return async (ctx, next) => {
        const span = tracer.startSpan(op.name, {
          kind: SpanKind.SERVER,
          attributes: { 'mantle.operation': op.name, 'mantle.operation.type': kind, 'mantle.protocol': ctx.protocol, 'mantle.request_id': ctx.requestId }
        }, parentContext(ctx.traceparent))
        const sc = span.spanContext()
        // A tracestate belongs to the caller's trace: not to one started here.
        if (ctx.tracestate !== undefined && parseTraceparent(ctx.traceparent) === null) ctx.tracestate = undefined
        // The Kernel call continues this span: its traceparent names this span as parent.
        ctx.traceparent = `00-${sc.traceId}-${sc.spanId}-0${sc.traceFlags & TraceFlags.SAMPLED}`
        ctx.traced = true
        try {
          const result = await next(ctx)
          span.setAttributes({ 'mantle.tenant': ctx.tenant, 'mantle.status_code': ctx.status })
          return result
        } catch (err) {
          const { problem } = toProblem(err, ctx.requestId)
          span.setAttributes({ 'mantle.tenant': ctx.tenant, 'mantle.status_code': problem.status, 'mantle.error_code': problem.code })
          span.setStatus({ code: SpanStatusCode.ERROR, message: problem.code })
          throw err
        } finally {
          span.end()
        }
      }
    }
  })

  // Spans still queued are exported before the process goes, within SHUTDOWN_TIMEOUT_MS: those
  // the collector has not answered for by then (still queued, or sent) are counted dropped.
  app.addHook('onClose', async () => {
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<void>((resolve, reject) => { timer = setTimeout(() => reject(new Error(`no answer from the collector within ${SHUTDOWN_TIMEOUT_MS} ms`)), SHUTDOWN_TIMEOUT_MS) })
    try {
      await Promise.race([provider.shutdown(), timeout])
    } catch (err) {
      app.log.warn({ err }, 'trace export at shutdown failed')
    } finally {
      clearTimeout(timer)
    }
    const lost = exporter.unanswered + report.length()
    if (lost > 0) report.done('dropped', lost)
    report.done = () => {} // an answer coming later is not counted again
  })
}

export default fp(tracingPlugin, { name: 'mantle-tracing', dependencies: ['mantle-pipeline'], fastify: '5.x' })
