// The WebSocket face's request/response throughput runner (autocannon does not speak
// WebSocket). The harness starts it as a child process, like a target, so that it does not
// compete with the harness process; its configuration comes in the environment
// (WS_RUNNER_CONFIG, JSON: the URL carries the token, which is kept out of the process list)
// and its report is one JSON line on stdout.
//
// N connections, each with exactly one call in flight: send {"id":"<n>","op":...,"input":...},
// and on the answer frame send the next, for the given duration. Per-call latency (send ->
// answer) is taken with performance.now() into a fixed-size histogram (histogram.ts), so memory
// does not grow with the number of calls. Before the timed window every connection makes one
// untimed probe call: its answer is checked field by field (CONTRACT §3) and becomes the exact
// text every later answer is compared with, like autocannon's expectBody.
import { performance } from 'node:perf_hooks'
import { WebSocket, type RawData } from 'ws'
import { Histogram } from './histogram.js'

export interface WsRunnerConfig {
  /** ws://host:port/ws?access_token=... */
  url: string
  connections: number
  durationSeconds: number
  op: string
  input: Record<string, unknown>
  /** The value at result + path must equal `equals` in the probe answer. */
  check: { path: readonly string[], equals: string }
  connectTimeoutMs?: number
}

export interface WsRunnerReport {
  connections: number
  opened: number
  /** Connections that could not be opened, by reason. */
  openFailures: Record<string, number>
  durationSeconds: number
  /** Correct answers received inside the timed window. */
  calls: number
  callsPerSec: number
  /** Correct answers received after the window (calls sent inside it); in the latencies, not in calls/s. */
  lateCalls: number
  /** Answers that were error frames (the first is kept in firstError). */
  errors: number
  /** Answers that were neither the expected result nor an error frame. */
  mismatches: number
  /** Calls with no answer by the end (connection closed, or stalled). */
  unanswered: number
  /** Connections that closed during the run. */
  closedEarly: number
  /** CPU time of this runner over the window, in % of one core. */
  generatorCpuPct: number
  p50Ms: number
  p90Ms: number
  p99Ms: number
  meanMs: number
  maxMs: number
  /** The probe answer every later answer was compared with (or what came instead). */
  probe: string
  firstError: string | null
  /** Set when the run could not be made at all (no connection, wrong probe answer). */
  failure: string | null
}

const DRAIN_MS = 5000

function valueAt (value: unknown, path: readonly string[]): unknown {
  let v = value
  for (const key of path) v = typeof v === 'object' && v !== null ? (v as Record<string, unknown>)[key] : undefined
  return v
}

function open (url: string, timeoutMs: number): Promise<WebSocket | string> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { perMessageDeflate: false })
    const timer = setTimeout(() => { ws.terminate(); resolve('timeout') }, timeoutMs)
    ws.once('open', () => { clearTimeout(timer); resolve(ws) })
    ws.once('unexpected-response', (_req, res) => { clearTimeout(timer); ws.terminate(); resolve(`HTTP ${res.statusCode ?? '?'}`) })
    ws.once('error', (err: NodeJS.ErrnoException) => { clearTimeout(timer); resolve(err.code ?? err.message) })
  })
}

/** One untimed call; resolves with the answer's text. */
function probe (ws: WebSocket, frame: string, timeoutMs: number): Promise<string> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => { ws.off('message', onMessage); resolve('(no answer within ' + timeoutMs + ' ms)') }, timeoutMs)
    const onMessage = (data: RawData): void => {
      clearTimeout(timer)
      resolve((data as Buffer).toString('utf8'))
    }
    ws.once('message', onMessage)
    ws.send(frame)
  })
}

async function run (cfg: WsRunnerConfig): Promise<WsRunnerReport> {
  const timeoutMs = cfg.connectTimeoutMs ?? 10_000
  const report: WsRunnerReport = {
    connections: cfg.connections,
    opened: 0,
    openFailures: {},
    durationSeconds: cfg.durationSeconds,
    calls: 0,
    callsPerSec: 0,
    lateCalls: 0,
    errors: 0,
    mismatches: 0,
    unanswered: 0,
    closedEarly: 0,
    generatorCpuPct: Number.NaN,
    p50Ms: Number.NaN,
    p90Ms: Number.NaN,
    p99Ms: Number.NaN,
    meanMs: Number.NaN,
    maxMs: Number.NaN,
    probe: '',
    firstError: null,
    failure: null
  }
  const attempts = await Promise.all(Array.from({ length: cfg.connections }, async () => await open(cfg.url, timeoutMs)))
  const sockets: WebSocket[] = []
  for (const a of attempts) {
    if (typeof a === 'string') report.openFailures[a] = (report.openFailures[a] ?? 0) + 1
    else sockets.push(a)
  }
  report.opened = sockets.length
  if (sockets.length === 0) {
    report.failure = 'no connection could be opened: ' + JSON.stringify(report.openFailures)
    return report
  }

  // The frame is {"id":"<n>"} + the rest of the scenario's frame; the answer must be exactly
  // {"id":"<n>","result":<the probe's result>}.
  const rest = JSON.stringify({ op: cfg.op, input: cfg.input }).slice(1)
  const frameOf = (id: string): string => '{"id":"' + id + '",' + rest
  const probes = await Promise.all(sockets.map(async (ws) => await probe(ws, frameOf('probe'), timeoutMs)))
  report.probe = probes[0]
  const probePrefix = '{"id":"probe","result":'
  let result: string | null = null
  try {
    const parsed = JSON.parse(probes[0]) as { result?: unknown }
    if (probes[0].startsWith(probePrefix) && probes[0].endsWith('}') && valueAt(parsed.result, cfg.check.path) === cfg.check.equals) {
      result = probes[0].slice(probePrefix.length, -1)
    }
  } catch {}
  if (result === null) {
    report.failure = `the probe call was answered with ${probes[0].slice(0, 300)} (expected result.${cfg.check.path.join('.')} = ${JSON.stringify(cfg.check.equals)})`
    for (const ws of sockets) ws.terminate()
    return report
  }
  const differing = probes.filter((p) => p !== probes[0]).length
  if (differing > 0) {
    report.failure = `${differing} of ${probes.length} probe answers differ from the first: ${probes.find((p) => p !== probes[0])?.slice(0, 300) ?? ''}`
    for (const ws of sockets) ws.terminate()
    return report
  }
  const answerTail = '","result":' + result + '}'
  const errorTail = '","error":'

  const histogram = new Histogram()
  let active = sockets.length
  // Set once the drain is over: the calls still waiting then are counted unanswered there, and
  // what their connections do as they are closed below counts nothing more (their 'close' was
  // counted as one closed early, and their call unanswered a second time).
  let ended = false
  let finish: () => void = () => {}
  const finished = new Promise<void>((resolve) => { finish = resolve })
  const cpu = process.cpuUsage()
  const start = performance.now()
  const end = start + cfg.durationSeconds * 1000

  for (const ws of sockets) {
    let n = 0
    let id = '0'
    let sentAt = 0
    let waiting = false
    let over = false
    const stop = (): void => {
      if (over) return
      over = true
      if (--active === 0) finish()
    }
    const send = (): void => {
      id = String(n++)
      waiting = true
      sentAt = performance.now()
      ws.send(frameOf(id))
    }
    ws.on('message', (data: RawData) => {
      if (ended) return
      const now = performance.now()
      if (over || !waiting) {
        report.mismatches++
        return
      }
      waiting = false
      const text = (data as Buffer).toString('utf8')
      const head = '{"id":"' + id
      if (text.length === head.length + answerTail.length && text.startsWith(head) && text.endsWith(answerTail)) {
        histogram.recordMs(now - sentAt)
        if (now <= end) report.calls++
        else report.lateCalls++
      } else if (text.startsWith(head + errorTail)) {
        report.errors++
        report.firstError ??= text.slice(0, 500)
      } else {
        report.mismatches++
      }
      if (now < end) send()
      else stop()
    })
    ws.on('close', () => {
      if (over || ended) return
      report.closedEarly++
      if (waiting) report.unanswered++
      stop()
    })
    ws.on('error', () => {})
    send()
  }

  const timer = setTimeout(finish, cfg.durationSeconds * 1000 + DRAIN_MS)
  await finished
  ended = true
  clearTimeout(timer)
  const used = process.cpuUsage(cpu)
  report.generatorCpuPct = (used.user + used.system) / 10 / (performance.now() - start)
  // Connections still waiting after the drain: their call never got an answer.
  report.unanswered += active
  await Promise.all(sockets.map(async (ws) => await new Promise<void>((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) { resolve(); return }
    const t = setTimeout(() => { ws.terminate(); resolve() }, 1000)
    ws.once('close', () => { clearTimeout(t); resolve() })
    ws.close(1000, 'done')
  })))

  report.callsPerSec = report.calls / cfg.durationSeconds
  report.p50Ms = histogram.quantileMs(0.5)
  report.p90Ms = histogram.quantileMs(0.9)
  report.p99Ms = histogram.quantileMs(0.99)
  report.meanMs = histogram.meanMs()
  report.maxMs = histogram.total === 0 ? Number.NaN : histogram.max / 1000
  return report
}

const raw = process.env.WS_RUNNER_CONFIG
if (raw === undefined) {
  process.stderr.write('ws-runner: WS_RUNNER_CONFIG is required\n')
  process.exit(2)
}
const report = await run(JSON.parse(raw) as WsRunnerConfig)
// NaN (no value) becomes null in JSON.
process.stdout.write(JSON.stringify(report) + '\n')
process.exit(0)
