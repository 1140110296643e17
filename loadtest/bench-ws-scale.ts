// The ws-scale section of `npm run bench` (only when asked for: --section ws-scale): one gateway
// process (identity on, BFF_INTERNAL_TOKEN set), N concurrent authenticated WebSocket
// connections from client processes (ws-scale-client.ts), each subscribed to runUpdated for
// one tenant. Measured: connections opened and failed, the gateway's RSS before connections,
// after them and after the fan-out, and for each event POSTed to /internal/events the time
// until the LAST client received its frame (plus p50/p99 of per-client delivery), as medians
// over the events; and that every connection got exactly one frame per event.
import { randomBytes } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import {
  SCALE_TENANT, freePort, gatewayScale, rssKiB, scaleToken, startProcess, startWorker,
  median, type RunningProcess, type TargetContext, type Worker
} from './harness.js'
import { fmt, sleep, textTable } from './measure.js'
import { nearestRank } from './histogram.js'
import { wsSubscribeRunUpdated } from './scenarios.js'
import type { FromClient, ToClient } from './ws-scale-client.js'

export interface WsScaleOptions {
  connections: number
  /** Client processes; null: enough to stay well under the file-descriptor limit, at least 2. */
  clients: number | null
  /** Connections being opened at once, over every client. */
  batch: number
  events: number
}

export interface ScaleEvent {
  event: number
  runId: string
  /** POST /internal/events answered (the gateway dispatches before it answers). */
  ackMs: number
  received: number
  missing: number
  firstMs: number
  p50Ms: number
  p99Ms: number
  /** From the POST to the last client's frame. */
  fanoutMs: number
}

export interface WsScaleReport {
  connections: number
  clients: number
  batch: number
  opened: number
  failed: number
  failures: Record<string, number>
  openSeconds: number
  /** What the gateway's /metrics said once every connection was open. */
  gatewayGauges: Record<string, number>
  rssKiB: { beforeConnections: number, afterConnections: number, afterFanout: number }
  rssPerConnectionKiB: number
  /** Largest difference between a client's clock (timeOrigin + now) and the harness's, in ms. */
  clockSkewMs: number
  events: ScaleEvent[]
  median: { ackMs: number, fanoutMs: number, p50Ms: number, p99Ms: number }
  delivery: { exactlyOnce: boolean, none: number, more: number, unexpectedFrames: number, firstUnexpected: string | null, closedEarly: number }
  /**
   * The run is not a result (as a flagged row of the other sections): connections failed to
   * open, closed early, or an event was not delivered exactly once. A fan-out over fewer
   * connections than asked, or that missed some, is faster than the one asked for.
   */
  flagged: boolean
}

/** What makes a ws-scale run not a result (its `flagged`), each said in a few words; none: a result. */
export function scaleProblems (r: Pick<WsScaleReport, 'failed' | 'delivery'>): string[] {
  const d = r.delivery
  const out: string[] = []
  if (r.failed > 0) out.push(`${r.failed} connections not opened`)
  if (d.closedEarly > 0) out.push(`${d.closedEarly} connections closed early`)
  if (!d.exactlyOnce) out.push('delivery not exactly once')
  return out
}

const RUN_PREFIX = 'scale-run-'
// A process may hold 20,000 descriptors here (ulimit -n): stay far below with each client.
const PER_CLIENT = 8000
const EVENT_TIMEOUT_MS = 30_000

const now = (): number => performance.timeOrigin + performance.now()

/** A client process and its messages, waited for by kind (`done:3`, `arrivals:3`, `opened`, ...). */
class Client {
  private readonly queued = new Map<string, FromClient[]>()
  private readonly waiting = new Map<string, Array<(m: FromClient | null) => void>>()
  private exited = false
  progress = { opened: 0, failed: 0 }

  constructor (readonly worker: Worker, readonly count: number) {
    worker.child.on('message', (m: FromClient) => {
      if (m.type === 'progress') {
        this.progress = { opened: m.opened, failed: m.failed }
        return
      }
      const key = m.type + ('event' in m ? ':' + m.event : '')
      const waiter = this.waiting.get(key)?.shift()
      if (waiter !== undefined) waiter(m)
      else this.queued.set(key, [...(this.queued.get(key) ?? []), m])
    })
    worker.child.once('exit', () => {
      this.exited = true
      for (const list of this.waiting.values()) for (const w of list) w(null)
      this.waiting.clear()
    })
  }

  send (message: ToClient): void {
    if (!this.exited && this.worker.child.connected) this.worker.child.send(message)
  }

  /** The next message of that kind, or null after timeoutMs or when the client is gone. */
  async next<K extends FromClient['type']> (key: K | `${K}:${number}`, timeoutMs: number): Promise<Extract<FromClient, { type: K }> | null> {
    const queued = this.queued.get(key)?.shift()
    if (queued !== undefined) return queued as Extract<FromClient, { type: K }>
    if (this.exited) return null
    return await new Promise((resolve) => {
      const timer = setTimeout(() => {
        const list = this.waiting.get(key) ?? []
        const i = list.indexOf(done)
        if (i >= 0) list.splice(i, 1)
        resolve(null)
      }, timeoutMs)
      const done = (m: FromClient | null): void => {
        clearTimeout(timer)
        resolve(m as Extract<FromClient, { type: K }> | null)
      }
      this.waiting.set(key, [...(this.waiting.get(key) ?? []), done])
    })
  }

  async failure (): Promise<string> {
    const out = await this.worker.done.catch((err: Error) => ({ code: null, signal: null, stdout: '', tail: err.message }))
    return `${this.worker.name} exited (${out.code ?? out.signal ?? '?'}):\n${out.tail}`
  }
}

/** A Run (kernel/manifest.yaml schemas.Run) as the Kernel would publish it. */
function runPayload (runId: string): Record<string, unknown> {
  const at = new Date().toISOString()
  return {
    id: runId,
    agentId: 'a1',
    status: 'running',
    temperature: 0.7,
    promptChars: 64,
    output: null,
    error: null,
    createdAt: at,
    updatedAt: at,
    startedAt: at,
    finishedAt: null
  }
}

async function gauges (url: string): Promise<Record<string, number>> {
  const out: Record<string, number> = {}
  try {
    const res = await fetch(url + '/metrics', { signal: AbortSignal.timeout(10_000) })
    if (!res.ok) return out
    for (const line of (await res.text()).split('\n')) {
      const match = /^(mantle_websocket_connections|mantle_event_subscriptions)\s+(\S+)$/.exec(line)
      if (match !== null) out[match[1]] = Number(match[2])
    }
  } catch {}
  return out
}

const mib = (kib: number): string => fmt(kib / 1024, 1)

export async function runWsScale (opts: WsScaleOptions, ctx: TargetContext, processes: RunningProcess[], machine: { cpu: string, cores: number, memoryGiB: number, os: string }): Promise<WsScaleReport> {
  const started = new Date()
  const internalToken = randomBytes(24).toString('hex')
  const def = gatewayScale(internalToken)
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const gateway = await startProcess({ name: def.name, script: def.process!.script, env: def.process!.env(ctx, port), readyUrl: url + def.process!.readyPath })
  processes.push(gateway)
  const token = scaleToken(ctx.secret, 3600)
  const wsUrl = `ws://127.0.0.1:${port}${wsSubscribeRunUpdated.path}?access_token=${encodeURIComponent(token)}`

  const clientCount = opts.clients ?? Math.max(2, Math.ceil(opts.connections / PER_CLIENT))
  const perClient = Array.from({ length: clientCount }, (_, i) => Math.floor(opts.connections / clientCount) + (i < opts.connections % clientCount ? 1 : 0))
  if (Math.max(...perClient) > PER_CLIENT) process.stderr.write(`warning: ${Math.max(...perClient)} connections per client process: beyond ${PER_CLIENT}, the file-descriptor limit (ulimit -n) may refuse some\n`)
  if (opts.connections > 19_000) process.stderr.write(`warning: ${opts.connections} connections: the gateway is one process, and its file-descriptor limit (ulimit -n) may refuse some\n`)
  const clients = perClient.map((count, i) => {
    const worker = startWorker({ name: `ws-scale-client-${i + 1}`, script: 'loadtest/ws-scale-client.ts', env: {}, ipc: true })
    processes.push(worker)
    return new Client(worker, count)
  })
  for (const c of clients) {
    if (await c.next('ready', 30_000) === null) throw new Error(`ws-scale: a client did not start: ${await c.failure()}`)
  }

  // Settle the gateway after start-up before the baseline.
  await sleep(1000)
  const rssBefore = rssKiB(gateway.pid)

  // Every client opens its share in batches; together at most opts.batch handshakes at once.
  const batch = Math.max(1, Math.floor(opts.batch / clientCount))
  const openStarted = now()
  const clientSkews: number[] = []
  const harnessOffset = (): number => now() - Number(process.hrtime.bigint()) / 1e6
  for (const c of clients) {
    c.send({
      type: 'open',
      url: wsUrl,
      count: c.count,
      batch,
      timeoutMs: 30_000,
      events: opts.events,
      runPrefix: RUN_PREFIX,
      subscribe: JSON.stringify(wsSubscribeRunUpdated.frame),
      subscribed: JSON.stringify(wsSubscribeRunUpdated.subscribed)
    })
  }
  const progress = setInterval(() => {
    const opened = clients.reduce((acc, c) => acc + c.progress.opened, 0)
    const failed = clients.reduce((acc, c) => acc + c.progress.failed, 0)
    process.stderr.write(`ws-scale: ${opened} open, ${failed} failed of ${opts.connections}\n`)
  }, 2000)
  const openedMessages = await Promise.all(clients.map(async (c) => await c.next('opened', 60_000 + c.count * 20)))
  clearInterval(progress)
  const openSeconds = (now() - openStarted) / 1000
  let opened = 0
  let failed = 0
  const failures: Record<string, number> = {}
  for (let i = 0; i < clients.length; i++) {
    const m = openedMessages[i]
    if (m === null) throw new Error(`ws-scale: a client did not finish opening its connections: ${await clients[i].failure()}`)
    opened += m.opened
    failed += m.failed
    for (const [reason, n] of Object.entries(m.failures)) failures[reason] = (failures[reason] ?? 0) + n
    // Both clocks advance together: the difference of (wall - monotonic) is the skew.
    clientSkews.push(Math.abs((m.clock.wall - m.clock.mono) - harnessOffset()))
  }
  process.stderr.write(`ws-scale: ${opened} connections open and subscribed, ${failed} failed, in ${openSeconds.toFixed(1)} s\n`)
  if (opened === 0) throw new Error(`ws-scale: no connection could be opened: ${JSON.stringify(failures)}`)

  await sleep(1000)
  const rssAfterConnections = rssKiB(gateway.pid)
  const gatewayGauges = await gauges(url)

  const events: ScaleEvent[] = []
  for (let e = 0; e < opts.events; e++) {
    const runId = RUN_PREFIX + String(e)
    const body = JSON.stringify({ topic: wsSubscribeRunUpdated.topic, tenantId: SCALE_TENANT, payload: runPayload(runId) })
    const done = Promise.all(clients.map(async (c, i) => openedMessages[i]!.opened === 0 ? null : await c.next(`done:${e}`, EVENT_TIMEOUT_MS)))
    const t0 = now()
    const res = await fetch(url + '/internal/events', {
      method: 'POST',
      headers: { authorization: `Bearer ${internalToken}`, 'content-type': 'application/json' },
      body,
      signal: AbortSignal.timeout(EVENT_TIMEOUT_MS)
    })
    const ackMs = now() - t0
    const answer = await res.text()
    if (res.status !== 202) throw new Error(`ws-scale: POST /internal/events answered ${res.status}: ${answer.slice(0, 300)}`)
    await done
    const latencies: number[] = []
    for (const c of clients) {
      c.send({ type: 'collect', event: e })
      const m = await c.next(`arrivals:${e}`, 30_000)
      if (m === null) throw new Error(`ws-scale: a client did not report its arrivals: ${await c.failure()}`)
      for (const at of m.arrivals) if (at >= 0) latencies.push(at - t0)
    }
    latencies.sort((a, b) => a - b)
    const row: ScaleEvent = {
      event: e + 1,
      runId,
      ackMs,
      received: latencies.length,
      missing: opened - latencies.length,
      firstMs: latencies[0] ?? Number.NaN,
      p50Ms: nearestRank(latencies, 0.5),
      p99Ms: nearestRank(latencies, 0.99),
      fanoutMs: latencies.at(-1) ?? Number.NaN
    }
    events.push(row)
    process.stderr.write(`ws-scale: event ${row.event}/${opts.events}  ${row.received}/${opened} received  POST answered ${fmt(row.ackMs, 1)} ms  p50 ${fmt(row.p50Ms, 1)} ms  p99 ${fmt(row.p99Ms, 1)} ms  last ${fmt(row.fanoutMs, 1)} ms\n`)
    await sleep(500)
  }

  // Late duplicates would arrive now: give them a moment before counting frames.
  await sleep(1000)
  const delivery = { exactlyOnce: true, none: 0, more: 0, unexpectedFrames: 0, firstUnexpected: null as string | null, closedEarly: 0 }
  for (const c of clients) {
    c.send({ type: 'verify' })
    const m = await c.next('verified', 30_000)
    if (m === null) throw new Error(`ws-scale: a client did not verify: ${await c.failure()}`)
    for (const ev of m.events) {
      delivery.none += ev.none
      delivery.more += ev.more
    }
    delivery.unexpectedFrames += m.unexpectedFrames
    delivery.firstUnexpected ??= m.firstUnexpected
    delivery.closedEarly += m.closedEarly
  }
  delivery.exactlyOnce = delivery.none === 0 && delivery.more === 0 && delivery.unexpectedFrames === 0 && events.length === opts.events
  const rssAfterFanout = rssKiB(gateway.pid)

  // The clients first (they close their sockets), then the gateway, which has nothing to drain.
  for (const c of clients) c.send({ type: 'close' })
  await Promise.all(clients.map(async (c) => {
    const timer = setTimeout(() => { c.worker.stop().catch(() => {}) }, 15_000)
    await c.worker.done.catch(() => {})
    clearTimeout(timer)
  }))
  await gateway.stop()

  const report: WsScaleReport = {
    connections: opts.connections,
    clients: clientCount,
    batch: opts.batch,
    opened,
    failed,
    failures,
    openSeconds,
    gatewayGauges,
    rssKiB: { beforeConnections: rssBefore, afterConnections: rssAfterConnections, afterFanout: rssAfterFanout },
    rssPerConnectionKiB: (rssAfterConnections - rssBefore) / opened,
    clockSkewMs: Math.max(...clientSkews),
    events,
    median: {
      ackMs: median(events.map((e) => e.ackMs)),
      fanoutMs: median(events.map((e) => e.fanoutMs)),
      p50Ms: median(events.map((e) => e.p50Ms)),
      p99Ms: median(events.map((e) => e.p99Ms))
    },
    delivery,
    flagged: false
  }
  report.flagged = scaleProblems(report).length > 0
  print(report, opts, machine, started)
  return report
}

function print (r: WsScaleReport, opts: WsScaleOptions, machine: { cpu: string, cores: number, memoryGiB: number, os: string }, started: Date): void {
  const failures = Object.entries(r.failures).map(([reason, n]) => `${n} ${reason}`).join(', ')
  const header = [
    `Mantle bench — WebSocket scale: ${r.connections} connections subscribed to runUpdated (tenant ${SCALE_TENANT}), ${opts.events} events`,
    `machine      ${machine.cpu} x ${machine.cores}, ${machine.memoryGiB} GiB, ${machine.os}`,
    `date         ${started.toISOString()}`,
    `setup        one gateway process (identity, metrics, every face on), ${r.clients} client processes, ${r.batch} handshakes at a time`,
    `connections  ${r.opened} opened and subscribed, ${r.failed} failed${failures === '' ? '' : ` (${failures})`}, in ${r.openSeconds.toFixed(1)} s (${fmt(r.opened / r.openSeconds, 0)}/s)` +
      (Object.keys(r.gatewayGauges).length === 0 ? '' : `; gateway says ${Object.entries(r.gatewayGauges).map(([k, v]) => `${k} ${v}`).join(', ')}`),
    `gateway RSS  before connections ${mib(r.rssKiB.beforeConnections)} MiB, after connections ${mib(r.rssKiB.afterConnections)} MiB ` +
      `(+${fmt(r.rssPerConnectionKiB, 1)} KiB per connection), after fan-out ${mib(r.rssKiB.afterFanout)} MiB`,
    `clock        client and harness stamps: performance.timeOrigin + performance.now(), largest skew between processes ${fmt(r.clockSkewMs, 3)} ms`
  ]
  const rows = r.events.map((e) => [String(e.event), `${e.received}/${r.opened}`, fmt(e.ackMs, 1), fmt(e.firstMs, 1), fmt(e.p50Ms, 1), fmt(e.p99Ms, 1), fmt(e.fanoutMs, 1)])
  rows.push(['median', '', fmt(r.median.ackMs, 1), '', fmt(r.median.p50Ms, 1), fmt(r.median.p99Ms, 1), fmt(r.median.fanoutMs, 1)])
  const table = textTable(['event', 'received', 'POST answered ms', 'first ms', 'p50 ms', 'p99 ms', 'fan-out (last) ms'], rows)
  const d = r.delivery
  const check = d.exactlyOnce
    ? `delivery     every connection got exactly one frame per event (${r.opened} x ${opts.events})`
    : `delivery     NOT exactly once: ${d.none} (connection, event) pairs without a frame, ${d.more} with more than one, ${d.unexpectedFrames} unexpected frames` +
      `${d.firstUnexpected === null ? '' : ` (first: ${d.firstUnexpected})`}, ${d.closedEarly} connections closed early`
  const problems = scaleProblems(r)
  const status = problems.length === 0 ? 'status       ok' : `status       FLAGGED (not a result): ${problems.join(', ')}`
  process.stdout.write('\n' + header.join('\n') + '\n\n' + table + '\n\n' + check + '\n' + status + '\n' +
    'fan-out      from the POST to the moment the LAST connection received its frame; p50/p99 over connections; medians over events\n')
}
