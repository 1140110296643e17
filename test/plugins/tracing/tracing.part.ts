import t from 'tap'
import { createServer } from 'node:http'
import { createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net'
import { buildTestApp, startTestKernel, json, bearer, testManifest, testConfig, until } from '../../helper.js'
import { tracesUrl } from '../../../app.js'
import { collectorExporter, parentContext, SpanQueueReport } from '../../../plugins/tracing/index.js'
import { InMemorySpanExporter, SimpleSpanProcessor, TracerProvider } from '@opentelemetry/sdk-trace'
import type { ExportResult } from '@opentelemetry/core'
import { childTraceparent } from '../../../plugins/kernel/index.js'
import { buildApp } from '../../../app.js'
import { startKernel } from '../../../kernel/server.js'
import { trace } from '@opentelemetry/api'
import type { InjectOptions } from 'fastify'
import { checkedTracestate } from '../../../ids.js'
import { WebSocket } from 'ws'

interface Teardown { teardown: (fn: () => unknown) => void }
interface OtlpSpan { traceId: string, spanId: string, parentSpanId?: string, name: string, kind: number, status?: { code?: number, message?: string }, attributes: Array<{ key: string, value: Record<string, unknown> }> }

/** A real OTLP/HTTP collector on port 0 that keeps every span it is sent. */
async function startCollector (t: Teardown): Promise<{ url: string, spans: OtlpSpan[] }> {
  const spans: OtlpSpan[] = []
  const server = createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { resourceSpans: Array<{ scopeSpans: Array<{ spans: OtlpSpan[] }> }> }
      for (const rs of body.resourceSpans) for (const ss of rs.scopeSpans) spans.push(...ss.spans)
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}')
    })
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>(resolve => server.close(() => resolve())))
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/traces`, spans }
}

const manifest = testManifest({
  getThing: {
    type: 'query',
    rest: 'GET /things/:id',
    kernel: 'GET /things/{id}',
    input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } },
    output: { type: 'object', properties: { id: { type: 'string' } } }
  }
})
const attr = (span: OtlpSpan, key: string): unknown => {
  const v = span.attributes.find(a => a.key === key)?.value
  return v === undefined ? undefined : Object.values(v)[0]
}

t.test('a span per call, named by the op, child of the caller\'s traceparent and parent of the Kernel call', async t => {
  const collector = await startCollector(t)
  const kernel = await startTestKernel(t, {
    'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }),
    'GET /things/b': (_req, res) => json(res, 500, { message: 'boom' })
  })
  const app = await buildTestApp({ teardown: () => {} }, { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: collector.url, BFF_CIRCUIT_BREAKER_ENABLED: false }, { manifest, kernelUrl: kernel.url })
  t.ok(app.pipeline.entry('getThing').stages.includes('tracing'))
  const traceId = '4bf92f3577b34da6a3ce929d0e0e4736'
  const parent = '00f067aa0ba902b7'
  const ok = await app.inject({ url: '/api/v1/things/a', headers: { ...bearer(), traceparent: `00-${traceId}-${parent}-01` } })
  t.equal(ok.statusCode, 200)
  const failed = await app.inject({ url: '/api/v1/things/b', headers: bearer() })
  t.equal(failed.statusCode, 502)
  await app.close() // flushes the spans still queued

  t.equal(collector.spans.length, 2)
  const [span, error] = collector.spans
  t.equal(span.name, 'getThing')
  t.equal(span.traceId, traceId, 'continues the caller\'s trace')
  t.equal(span.parentSpanId, parent, 'child of the caller\'s span')
  t.equal(span.kind, 2, 'a server span')
  t.equal(attr(span, 'mantle.protocol'), 'rest')
  t.equal(attr(span, 'mantle.tenant'), 't1')
  const sent = kernel.requests[0].headers.traceparent
  t.equal(sent, `00-${traceId}-${span.spanId}-01`, 'the Kernel call names the gateway\'s span as parent')

  t.not(error.traceId, traceId, 'a call without traceparent starts a trace')
  t.equal(error.status?.code, 2, 'a failed call is an error span')
  t.equal(attr(error, 'mantle.error_code'), 'KERNEL_ERROR')
  t.equal(kernel.requests[1].headers.traceparent, `00-${error.traceId}-${error.spanId}-01`)
})

t.test('without an OTLP endpoint there is no tracing stage and the Kernel still gets a traceparent', async t => {
  const kernel = await startTestKernel(t, { 'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }) })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  t.notOk(app.pipeline.entry('getThing').stages.includes('tracing'))
  await app.inject({ url: '/api/v1/things/a', headers: { ...bearer(), traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' } })
  t.match(kernel.requests[0].headers.traceparent, /^00-4bf92f3577b34da6a3ce929d0e0e4736-[0-9a-f]{16}-01$/)
})

t.test('the traces URL comes from the standard OpenTelemetry variables', async t => {
  t.equal(tracesUrl(testConfig()), null)
  t.equal(tracesUrl(testConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://collector:4318/' })), 'http://collector:4318/v1/traces')
  t.equal(tracesUrl(testConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://a:4318', OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://b:4318/v1/traces' })), 'http://b:4318/v1/traces')
  t.throws(() => testConfig({ BFF_TRACE_SAMPLE_RATIO: 2 }), /BFF_TRACE_SAMPLE_RATIO/)
})

t.test('a malformed or all-zero traceparent starts a new trace', async t => {
  for (const bad of [undefined, 'junk', '00-00000000000000000000000000000000-00f067aa0ba902b7-01', '00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01']) {
    t.equal(trace.getSpanContext(parentContext(bad)), undefined, String(bad))
  }
  t.match(trace.getSpanContext(parentContext('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00')), { traceFlags: 0, isRemote: true })
})

// W3C Trace Context: a parent id of all zeros is invalid, and such a header is ignored. The
// tracing plugin refused it, but the Kernel client (tracing off) continued its trace id.
t.test('a traceparent whose parent id is all zeros is not continued, with tracing on or off', async t => {
  const trace0 = '4bf92f3577b34da6a3ce929d0e0e4736'
  const bad = `00-${trace0}-0000000000000000-01`
  t.equal(trace.getSpanContext(parentContext(bad)), undefined)
  t.not(childTraceparent(bad).split('-')[1], trace0)
  t.equal(childTraceparent(`00-${trace0}-00f067aa0ba902b7-01`).split('-')[1], trace0, 'a valid one is continued')
})

// W3C Trace Context §3.3: a higher version (not ff) is read by its first 55 characters, when
// they are followed by '-' or the end. Only version 00 was read: such a caller's trace was lost.
t.test('a traceparent of a higher version is continued by its first 55 characters, with tracing on or off', async t => {
  const id = '4bf92f3577b34da6a3ce929d0e0e4736'
  const span = '00f067aa0ba902b7'
  for (const good of [`01-${id}-${span}-01`, `01-${id}-${span}-01-what-comes-next`, `cc-${id}-${span}-03-x`]) {
    t.match(trace.getSpanContext(parentContext(good)), { traceId: id, spanId: span, traceFlags: 1, isRemote: true }, good)
    t.match(childTraceparent(good), new RegExp(`^00-${id}-[0-9a-f]{16}-01$`), `${good}: continued as version 00, sampled kept`)
  }
  t.match(childTraceparent(`01-${id}-${span}-02`), new RegExp(`^00-${id}-[0-9a-f]{16}-00$`), 'a higher version\'s unknown flags are not carried on')
  for (const bad of [`ff-${id}-${span}-01`, `01-${id}-${span}-01x`, `01-${id}-${span}-0`, `00-${id}-${span}-01-extra`, `0g-${id}-${span}-01`, `01-${id.toUpperCase()}-${span}-01`]) {
    t.equal(trace.getSpanContext(parentContext(bad)), undefined, bad)
    t.not(childTraceparent(bad).split('-')[1], id, `${bad}: a new trace`)
  }

  const kernel = await startTestKernel(t, { 'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }) })
  const off = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const on = await buildTestApp(t, { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:9/v1/traces' }, { manifest, kernelUrl: kernel.url, traceExporter: { export: (_spans: unknown[], done: (r: { code: number }) => void) => done({ code: 0 }), shutdown: async () => {} } })
  for (const app of [off, on]) {
    for (const traceparent of [`01-${id}-${span}-01`, `01-${id}-${span}-01-extra`]) {
      t.equal((await app.inject({ url: '/api/v1/things/a', headers: { ...bearer(), traceparent } })).statusCode, 200)
      t.match(kernel.requests.at(-1)!.headers.traceparent, new RegExp(`^00-${id}-[0-9a-f]{16}-01$`), `${traceparent} continued`)
    }
  }
})

// W3C Trace Context §3.2.2.5: flags this version does not define are set to zero when passed on.
// With tracing off, a version 00 header's went to the Kernel as received (`ff` stayed `ff`).
t.test('a traceparent\'s unknown flags are not carried on, with tracing on or off', async t => {
  const id = '4bf92f3577b34da6a3ce929d0e0e4736'
  const span = '00f067aa0ba902b7'
  for (const [flags, sampled] of [['ff', '01'], ['03', '01'], ['02', '00'], ['fe', '00'], ['01', '01'], ['00', '00']]) {
    t.match(childTraceparent(`00-${id}-${span}-${flags}`), new RegExp(`^00-${id}-[0-9a-f]{16}-${sampled}$`), `${flags}: ${sampled}`)
  }
  const kernel = await startTestKernel(t, { 'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }) })
  const off = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const on = await buildTestApp(t, { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:9/v1/traces' }, { manifest, kernelUrl: kernel.url, traceExporter: { export: (_spans: unknown[], done: (r: { code: number }) => void) => done({ code: 0 }), shutdown: async () => {} } })
  for (const [tracing, app] of [['off', off], ['on', on]] as const) {
    t.equal((await app.inject({ url: '/api/v1/things/a', headers: { ...bearer(), traceparent: `00-${id}-${span}-ff` } })).statusCode, 200)
    t.match(kernel.requests.at(-1)!.headers.traceparent, new RegExp(`^00-${id}-[0-9a-f]{16}-01$`), `tracing ${tracing}: sampled kept, the rest zero`)
  }
})

// A caller's tracestate goes with its trace (W3C Trace Context §3.3: forwarded with the
// traceparent, bounded, dropped when malformed or when the traceparent was invalid). It was
// dropped, with tracing on and off.
t.test('a tracestate is forwarded with the traceparent on every HTTP face, with tracing on or off', async t => {
  const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
  const kernel = await startTestKernel(t, { 'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }) })
  const off = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const on = await buildTestApp(t, { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:9/v1/traces' }, { manifest, kernelUrl: kernel.url, traceExporter: { export: (_spans: unknown[], done: (r: { code: number }) => void) => done({ code: 0 }), shutdown: async () => {} } })
  const faces: Array<[string, (headers: Record<string, string>) => InjectOptions]> = [
    ['REST', headers => ({ method: 'GET', url: '/api/v1/things/a', headers })],
    ['batch', headers => ({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: '1', op: 'getThing', input: { id: 'a' } }] } })],
    ['tRPC', headers => ({ method: 'GET', url: '/trpc/getThing?input=' + encodeURIComponent('{"id":"a"}'), headers })],
    ['tRPC batch', headers => ({ method: 'GET', url: '/trpc/getThing?batch=1&input=' + encodeURIComponent('{"0":{"id":"a"}}'), headers })],
    ['GraphQL', headers => ({ method: 'POST', url: '/graphql', headers, payload: { query: '{ getThing(id: "a") { id } }' } })]
  ]
  const sent = async (app: typeof on, request: InjectOptions): Promise<unknown> => {
    const before = kernel.requests.length
    const res = await app.inject(request)
    t.equal(res.statusCode, 200, `${request.url} answered`)
    t.equal(kernel.requests.length, before + 1, 'one Kernel call')
    return kernel.requests.at(-1)!.headers.tracestate
  }
  for (const [tracing, app] of [['off', off], ['on', on]] as const) {
    for (const [face, request] of faces) {
      const what = `${face}, tracing ${tracing}`
      t.equal(await sent(app, request({ ...bearer(), traceparent, tracestate: 'vendor=abc,other=1' })), 'vendor=abc,other=1', `${what}: forwarded`)
      t.equal(await sent(app, request({ ...bearer(), traceparent })), undefined, `${what}: none received, none sent`)
      t.equal(await sent(app, request({ ...bearer(), tracestate: 'vendor=abc' })), undefined, `${what}: no traceparent, a new trace: not forwarded`)
      t.equal(await sent(app, request({ ...bearer(), traceparent: 'junk', tracestate: 'vendor=abc' })), undefined, `${what}: an invalid traceparent, a new trace: not forwarded`)
      t.equal(await sent(app, request({ ...bearer(), traceparent, tracestate: 'Vendor=abc' })), undefined, `${what}: malformed: not forwarded`)
    }
  }
})

// README: every call, on every face, continues the caller's traceparent. A call over /ws or tRPC's
// WebSocket had none (each started a trace of its own), nor the tracestate.
t.test('the calls of a WebSocket connection (/ws, tRPC) continue its upgrade\'s traceparent and tracestate, with tracing on or off', async t => {
  const id = '4bf92f3577b34da6a3ce929d0e0e4736'
  const kernel = await startTestKernel(t, { 'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }) })
  const off = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const on = await buildTestApp(t, { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:9/v1/traces' }, { manifest, kernelUrl: kernel.url, traceExporter: { export: (_spans: unknown[], done: (r: { code: number }) => void) => done({ code: 0 }), shutdown: async () => {} } })
  const faces: Array<[string, string, (n: number) => string]> = [
    ['/ws', '/ws', n => JSON.stringify({ id: `c${n}`, op: 'getThing', input: { id: 'a' } })],
    ['tRPC', '/trpc', n => JSON.stringify({ id: n, method: 'query', params: { path: 'getThing', input: { id: 'a' } } })]
  ]
  for (const [tracing, app] of [['off', off], ['on', on]] as const) {
    await app.listen({ port: 0, host: '127.0.0.1' })
    const port = (app.server.address() as AddressInfo).port
    for (const [face, path, frame] of faces) {
      for (const [what, headers, traceparent, tracestate] of [
        ['continued', { traceparent: `00-${id}-00f067aa0ba902b7-01`, tracestate: 'vendor=abc' }, new RegExp(`^00-${id}-[0-9a-f]{16}-01$`), 'vendor=abc'],
        ['none: a new trace', {}, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/, undefined]
      ] as const) {
        const socket = new WebSocket(`ws://127.0.0.1:${port}${path}`, { headers: { ...bearer(), ...headers } })
        t.teardown(() => socket.terminate())
        const answers: unknown[] = []
        socket.on('message', data => answers.push(JSON.parse(String(data))))
        await new Promise((resolve, reject) => socket.once('open', resolve).once('error', reject))
        const before = kernel.requests.length
        for (const n of [1, 2]) socket.send(frame(n))
        const deadline = Date.now() + 5000
        while (answers.length < 2 && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 10))
        t.equal(kernel.requests.length, before + 2, `${face}, tracing ${tracing}: two Kernel calls`)
        const sent = kernel.requests.slice(before)
        for (const request of sent) {
          t.match(request.headers.traceparent, traceparent, `${face}, tracing ${tracing}, ${what}: traceparent`)
          t.equal(request.headers.tracestate, tracestate, `${face}, tracing ${tracing}, ${what}: tracestate`)
        }
        if (what !== 'continued') t.not(String(sent[0]?.headers.traceparent).split('-')[1], id, 'not the trace of another connection')
        socket.close()
      }
    }
  }
})

t.test('a tracestate is forwarded as received when well formed and within 512 characters and 32 members', async t => {
  const members = (n: number): string => Array.from({ length: n }, (_, i) => `k${i}=v`).join(',')
  for (const good of ['vendor=abc,other=1', 'a=1 , b=2\t,,c=x y', 'tenant@system=v', '0t@s=v', 'a-_*/=!~', 'a= b', 'k=' + 'v'.repeat(256), members(32), 'k=' + 'v'.repeat(250) + ',j=' + 'w'.repeat(250)]) {
    t.equal(checkedTracestate(good), good, good)
  }
  for (const bad of ['', ',', 'Vendor=abc', 'a=1,a=2', 'a', 'a=', 'a=b\u007f', 'a=b=c', 'a=b,c', '@s=v', 't@=v', 't@S=v', 'a=\u00e9', members(33), 'k=' + 'v'.repeat(257), 'k'.repeat(257) + '=v', 'a=1,' + 'b'.repeat(600) + '=1', 'k=' + 'v'.repeat(255) + ',j=' + 'w'.repeat(255)]) {
    t.equal(checkedTracestate(bad), undefined, bad.slice(0, 40))
  }
})

// The exporter's default timeout (10 s) was close-with-grace's whole grace period: with a
// collector that accepted and never answered, every shutdown ended killed, exit code 1.
t.test('close with a collector that never answers ends within the export bound', async t => {
  const sockets: Socket[] = []
  const blackhole = createTcpServer(s => { sockets.push(s); s.on('error', () => {}) })
  await new Promise<void>(resolve => blackhole.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { for (const s of sockets) s.destroy(); blackhole.close() })
  const kernel = await startKernel({ port: 0, runDelayMs: 1 })
  t.teardown(() => kernel.close())
  const app = await buildApp(testConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${(blackhole.address() as AddressInfo).port}` }), { logger: false, kernelUrl: kernel.url })
  await app.ready()
  t.equal((await app.inject({ url: '/api/v1/agents/a1', headers: bearer() })).statusCode, 200)
  const started = Date.now()
  await app.close()
  t.ok(Date.now() - started < 5000, `closed in ${Date.now() - started} ms`)
})

// A collector that answers 200 and then writes a byte a second never trips the exporter's
// timeout (a socket's idle timeout), and the exporter's shutdown awaited every export in flight:
// a shutdown took the batch processor's 30 s per batch, or never ended with an export under way.
t.test('close with a collector that trickles its answer ends within a few seconds, the spans it held counted dropped', async t => {
  let posts = 0
  const sent = (): number => posts
  const collector = createServer((req, res) => {
    posts++
    req.resume()
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/json' })
      const trickle = setInterval(() => res.write(' '), 200)
      res.on('close', () => clearInterval(trickle))
    })
  })
  await new Promise<void>(resolve => collector.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { collector.closeAllConnections(); collector.close() })
  const kernel = await startTestKernel(t, { 'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }) })
  // An export under way at shutdown, with or without spans still queued.
  for (const queued of [3, 0]) {
    posts = 0
    const app = await buildApp(testConfig({ OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `http://127.0.0.1:${(collector.address() as AddressInfo).port}/v1/traces` }), { logger: false, manifest, kernelUrl: kernel.url })
    await app.ready()
    const calls = async (n: number): Promise<void> => {
      for (let i = 0; i < n; i++) t.equal((await app.inject({ url: '/api/v1/things/a', headers: bearer() })).statusCode, 200)
    }
    await calls(2)
    const deadline = Date.now() + 5000
    while (sent() === 0 && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 20))
    t.equal(posts, 1, 'an export under way, its answer trickling')
    await calls(queued) // sent at shutdown
    const started = Date.now()
    let timer: NodeJS.Timeout | undefined
    const closed = await Promise.race([app.close().then(() => true), new Promise<false>(resolve => { timer = setTimeout(() => resolve(false), 6000) })])
    clearTimeout(timer)
    t.ok(closed, `${queued} queued: closed in ${Date.now() - started} ms (at most 6 s)`)
    const spans = await app.metrics.registry.getSingleMetric('mantle_tracing_spans_total')?.get()
    const count = (outcome: string): number => spans?.values.find(v => v.labels.outcome === outcome)?.value ?? 0
    t.equal(count('dropped'), 2 + queued, `${queued} queued: the spans never answered for are counted dropped`)
    t.equal(count('exported') + count('failed'), 0)
    collector.closeAllConnections()
  }
})

t.test('the span queue is in the metrics: its length, and spans exported, failed or dropped with the queue full', async t => {
  const kernel = await startTestKernel(t, { 'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }) })
  let exports = 0
  // A collector that takes the first batch, refuses the second, and never answers the third.
  const exporter = {
    export: (spans: unknown[], done: (result: { code: number, error?: Error }) => void) => {
      exports++
      if (exports === 1) done({ code: 0 })
      else if (exports === 2) done({ code: 1, error: new Error('refused') })
    },
    shutdown: async () => {}
  }
  const app = await buildTestApp(t, { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:9/v1/traces' }, { manifest, kernelUrl: kernel.url, traceExporter: exporter })
  const text = async (): Promise<string> => (await app.inject({ url: '/metrics' })).body
  const value = (body: string, line: RegExp): number => Number(line.exec(body)?.[1])
  const calls = async (n: number): Promise<void> => {
    const codes = await Promise.all(Array.from({ length: n }, async () => (await app.inject({ url: '/api/v1/things/a', headers: bearer() })).statusCode))
    t.ok(codes.every(code => code === 200))
  }
  const exported = async (n: number, outcome: string): Promise<void> => {
    const deadline = Date.now() + 5000
    while (value(await text(), new RegExp(`^mantle_tracing_spans_total\\{outcome="${outcome}"\\} (\\d+)$`, 'm')) !== n && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 50))
  }
  await calls(2)
  t.equal(value(await text(), /^mantle_tracing_span_queue (\d+)$/m), 2, 'two spans wait')
  await exported(2, 'exported')
  const first = await text()
  t.equal(value(first, /^mantle_tracing_spans_total\{outcome="exported"\} (\d+)$/m), 2, 'exported once the batch was due')
  t.equal(value(first, /^mantle_tracing_span_queue (\d+)$/m), 0)
  await calls(3)
  await exported(3, 'failed')
  t.equal(value(await text(), /^mantle_tracing_spans_total\{outcome="failed"\} (\d+)$/m), 3, 'a batch the collector refused')
})

t.test('spans the batch processor drops with its queue full are counted as dropped', async t => {
  // The SDK's own report (its self-observability counter, error.type queue_full); filling the
  // queue of 4,096 through the gateway takes tens of seconds.
  const report = new SpanQueueReport()
  const done: Array<[string, number]> = []
  report.done = (outcome, n) => { done.push([outcome, n]) }
  const counter = report.getMeter().createCounter('otel.sdk.processor.span.processed')
  counter.add(1, { 'otel.component.type': 'batching_span_processor', 'error.type': 'queue_full' })
  counter.add(512, { 'otel.component.type': 'batching_span_processor' })
  counter.add(3, { 'otel.component.type': 'batching_span_processor', 'error.type': 'Error' })
  t.same(done, [['dropped', 1], ['exported', 512], ['failed', 3]])
  report.getMeter().createCounter('otel.sdk.span.started').add(1)
  t.equal(done.length, 3, 'other counters of the SDK are not counted')
  t.equal(report.length(), 0, 'no queue before the processor reports one')
})

// A collector that refused or could not be reached left no line in the logs at any level (the
// SDK reports to OpenTelemetry's diag logger, which is silent unless set): an operator whose
// OTLP endpoint was wrong saw nothing. Now one warn line per outage, one info line when it ends.
t.test('a collector outage is logged once when it starts and once when it ends, not per batch', async t => {
  const kernel = await startTestKernel(t, { 'GET /things/a': (_req, res) => json(res, 200, { id: 'a' }) })
  const answers = [1, 1, 1, 0, 1] // failed, failed, failed, exported, failed
  let exports = 0
  const exporter = {
    export: (_spans: unknown[], done: (result: { code: number, error?: Error }) => void) => {
      const code = answers[exports++]
      done(code === 0 ? { code } : { code, error: new Error('connect ECONNREFUSED 127.0.0.1:4318') })
    },
    shutdown: async () => {}
  }
  const lines: Array<Record<string, unknown>> = []
  const logStream = { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }
  const app = await buildTestApp(t, { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:9/v1/traces', LOG_LEVEL: 'info' }, { manifest, kernelUrl: kernel.url, traceExporter: exporter, logger: undefined, logStream })
  const exporterLines = (): Array<[unknown, unknown]> => lines.filter(l => typeof l.msg === 'string' && l.msg.startsWith('trace export')).map(l => [l.level, l.msg])
  for (let n = 1; n <= answers.length; n++) {
    t.equal((await app.inject({ url: '/api/v1/things/a', headers: bearer() })).statusCode, 200)
    await until(() => exports === n, `export ${n}`)
  }
  t.same(exporterLines(), [
    [40, 'trace export failed: spans are lost until the collector takes them again'],
    [30, 'trace export works again'],
    [40, 'trace export failed: spans are lost until the collector takes them again']
  ], 'a warn line when exports start failing, an info line when one is taken again')
  t.equal(lines.find(l => l.level === 40 && typeof l.msg === 'string' && l.msg.startsWith('trace export'))?.err, 'connect ECONNREFUSED 127.0.0.1:4318', 'with the error')
})

// README: at most 4,096 finished spans wait for export. The batch processor stops waiting for an
// export after its 2 s and sends the next batch, while the exporter keeps the first in flight
// (a collector that trickles its answer never trips its idle timeout): up to the exporter's
// default of 30 exports of 512 spans each, 15,360 more spans held. Two at most now: the one the
// processor waits for and one it gave up on; a third is refused at once, its spans failed.
t.test('the collector exporter holds at most two exports in flight', async t => {
  const held: Array<import('node:http').ServerResponse> = []
  const collector = createServer((req, res) => { req.resume(); held.push(res) })
  await new Promise<void>(resolve => collector.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { collector.closeAllConnections(); collector.close() })
  const spans = new InMemorySpanExporter()
  const provider = new TracerProvider({ spanProcessors: [new SimpleSpanProcessor({ exporter: spans })] })
  for (let i = 0; i < 3; i++) provider.getTracer('t').startSpan(`s${i}`).end()
  const exporter = collectorExporter(`http://127.0.0.1:${(collector.address() as AddressInfo).port}/v1/traces`)
  t.teardown(() => exporter.shutdown())
  const results: Array<ExportResult | null> = [null, null, null]
  t.equal(spans.getFinishedSpans().length, 3)
  spans.getFinishedSpans().forEach((span, i) => { exporter.export([span], result => { results[i] = result }) })
  t.same(results.slice(0, 2), [null, null], 'two in flight')
  t.match(results[2], { code: 1, error: { message: 'Concurrent export limit reached' } }, 'the third refused at once')
  await until(() => held.length === 2, 'the two exports to reach the collector')
})
