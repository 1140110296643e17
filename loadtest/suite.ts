// The load suites (smoke, load, stress, spike, soak: the profiles of scenarios.ts) run by the
// Node harness, so that the very definitions the k6 scripts run are exercised on this machine,
// scaled down: `npm run bench -- --scenario smoke --scale 0.05`. Every HTTP face is driven as
// k6's ramping-arrival-rate drives it (an open model on keep-alive undici connections: the rate
// follows the stages continuously, arrivals beyond maxVUs in flight are dropped and counted), and
// the WebSocket face as k6's ramping-vus (one connection per virtual user, one call in flight
// each; the count follows the connection stages, adjusted every step of at most one second).
// The suite's thresholds are evaluated per face, as k6 evaluates them, and with abortOnFail the
// run stops at the first crossing (checked every step, after delayAbortEval), as k6's does.
import { performance } from 'node:perf_hooks'
import { Pool } from 'undici'
import { WebSocket, type RawData } from 'ws'
import { Histogram } from './histogram.js'
import { requestFor, type HttpMethod, type Target } from './harness.js'
import { fmt, sleep, textTable } from './measure.js'
import { SUITE_HTTP_SCENARIOS, wsGetAgent, type FaceScenarioDefinition, type LoadProfile, type Stage } from './scenarios.js'

export const SUITE_FACES = ['rest', 'trpc', 'graphql', 'websocket'] as const
export type SuiteFace = typeof SUITE_FACES[number]

export interface SuiteOptions {
  profile: LoadProfile
  /** Multiplies every stage's duration (and delayAbortEval). */
  timeScale: number
  /** Multiplies every stage's level: HTTP rates and WebSocket connections. */
  rateScale: number
  /** The gateway: its URL and the headers every request carries (the bearer token). */
  target: Target
  /** The token for WebSocket upgrades (sent in their Authorization header), or null. */
  token: string | null
  faces: readonly SuiteFace[]
  /** How often the WebSocket connection count is adjusted and abortOnFail thresholds are checked, in seconds (default 1). */
  stepSeconds?: number
  /** Progress lines (default: none). */
  log?: (line: string) => void
}

export interface ThresholdResult {
  face: SuiteFace
  /** As k6 names it: `http_req_duration{face:rest}`, `ws_call_failed{op:getAgent}`, ... */
  metric: string
  /** As k6 writes it: `p(99)<10`, `rate<0.001`, `count>0`. */
  expression: string
  observed: number
  pass: boolean
  abortOnFail: boolean
}

export interface FaceResult {
  face: SuiteFace
  /** Answered requests (calls) plus transport failures. */
  requests: number
  /** Non-expected status, transport error or timeout (WebSocket: error frame, wrong answer, refused upgrade or connection, a call unanswered by its deadline or by a close). */
  failed: number
  /** Answers with the expected status whose body did not carry the expected value. */
  checkFailures: number
  /** Answers by status (HTTP) or outcome (WebSocket); `dropped`: arrivals not started (k6's dropped_iterations). */
  outcomes: Record<string, number>
  achievedPerSec: number
  p50Ms: number
  p99Ms: number
  maxMs: number
}

export interface SuiteReport {
  profile: LoadProfile['name']
  timeScale: number
  rateScale: number
  /** The stages as run (scaled). */
  stages: Stage[]
  wsStages: Stage[]
  elapsedS: number
  faces: FaceResult[]
  thresholds: ThresholdResult[]
  /** Set when an abortOnFail threshold stopped the run: when, at which level, and which. */
  aborted: null | { atS: number, level: number, wsLevel: number, metric: string, expression: string }
  passed: boolean
}

/** The stages with durations times `timeScale` and levels times `levelScale` (as k6/common.ts scaleStages, without k6's 1 s floor). */
export function scaleStages (stages: readonly Stage[], timeScale: number, levelScale: number): Stage[] {
  return stages.map((s) => ({ durationS: s.durationS * timeScale, target: Math.round(s.target * levelScale) }))
}

/** The level at `t` seconds into the stages (linear within a stage, as k6 ramps), from `start`. */
export function levelAt (stages: readonly Stage[], start: number, t: number): number {
  let from = start
  let at = 0
  for (const s of stages) {
    if (t <= at + s.durationS) return s.durationS === 0 ? s.target : from + (s.target - from) * ((t - at) / s.durationS)
    at += s.durationS
    from = s.target
  }
  return from
}

/** How often the HTTP arrivals are started (the due ones since the last tick). */
const TICK_MS = 5

interface Collector {
  histogram: Histogram
  requests: number
  failed: number
  checkFailures: number
  outcomes: Record<string, number>
}

const collector = (): Collector => ({ histogram: new Histogram(), requests: 0, failed: 0, checkFailures: 0, outcomes: {} })

function count (c: Collector, outcome: string): void {
  c.outcomes[outcome] = (c.outcomes[outcome] ?? 0) + 1
}

function valueAt (value: unknown, path: readonly string[]): unknown {
  let v = value
  for (const key of path) v = typeof v === 'object' && v !== null ? (v as Record<string, unknown>)[key] : undefined
  return v
}

/** The answer check of a face scenario (k6: the `answer` check; GraphQL errors fail it). */
function answerOk (s: FaceScenarioDefinition, body: string): boolean {
  try {
    const answer = JSON.parse(body) as Record<string, unknown>
    return !('errors' in answer) && valueAt(answer, s.check.path) === s.check.equals
  } catch {
    return false
  }
}

/**
 * One HTTP face as k6's ramping-arrival-rate drives it (an open model): requests start at the
 * current rate whether or not earlier ones have been answered, up to `maxInFlight` at once (k6's
 * maxVUs); an arrival beyond that is dropped and counted (k6's dropped_iterations). Connections
 * are kept alive for the whole run, as k6's VUs keep theirs.
 */
class HttpArrivals {
  readonly c = collector()
  /** Arrivals not started because maxInFlight requests were already running. */
  dropped = 0
  private readonly pool: Pool
  private readonly path: string
  private readonly method: HttpMethod
  private readonly headers: Record<string, string>
  private readonly body: string | undefined
  private inFlight = 0
  private due = 0
  private readonly pending = new Set<Promise<void>>()

  constructor (target: Target, private readonly s: FaceScenarioDefinition, private readonly maxInFlight: number) {
    const req = requestFor(target, s)
    const url = new URL(req.url)
    this.pool = new Pool(url.origin, { connections: maxInFlight, pipelining: 1 })
    this.path = url.pathname + url.search
    this.method = req.method
    this.headers = req.headers
    this.body = req.body
  }

  /** Starts the arrivals of the last `seconds` at `rate` per second. */
  tick (rate: number, seconds: number): void {
    this.due += rate * seconds
    while (this.due >= 1) {
      this.due--
      if (this.inFlight >= this.maxInFlight) this.dropped++
      else this.start()
    }
  }

  async close (): Promise<void> {
    await Promise.all(this.pending)
    await this.pool.close()
  }

  private start (): void {
    const { c, s } = this
    this.inFlight++
    const startedAt = performance.now()
    const done = this.pool.request({ path: this.path, method: this.method, headers: this.headers, body: this.body, headersTimeout: 10_000, bodyTimeout: 10_000 })
      .then(async (res) => {
        const text = await res.body.text()
        c.histogram.recordMs(performance.now() - startedAt)
        c.requests++
        count(c, String(res.statusCode))
        if (res.statusCode !== s.expectedStatus) c.failed++
        else if (!answerOk(s, text)) c.checkFailures++
      }, (err: NodeJS.ErrnoException) => {
        c.requests++
        c.failed++
        count(c, err.code ?? 'error')
      })
      .finally(() => {
        this.inFlight--
        this.pending.delete(done)
      })
    this.pending.add(done)
  }
}

/**
 * The WebSocket face: virtual users, one connection each, one call in flight on each. A call
 * unanswered after wsGetAgent.callTimeoutMs has failed: it is recorded as failed with its
 * elapsed time as its duration, and the connection is closed and another opened.
 */
class WsUsers {
  readonly c = collector()
  private readonly users = new Set<{ stop: () => void, done: Promise<void> }>()
  private readonly url: string
  private readonly headers: Record<string, string>
  private readonly rest = JSON.stringify({ op: wsGetAgent.frame.op, input: wsGetAgent.frame.input }).slice(1)

  constructor (target: Target, token: string | null) {
    this.url = target.url.replace(/^http/, 'ws') + wsGetAgent.path
    // In the Authorization header, as k6/websocket.ts sends it (CONTRACT §2: upgrades accept it).
    this.headers = token === null ? {} : { authorization: `Bearer ${token}` }
  }

  get size (): number { return this.users.size }

  /** Starts or stops users until `n` are running. */
  resize (n: number): void {
    while (this.users.size < n) this.start()
    for (const user of this.users) {
      if (this.users.size <= n) break
      user.stop()
      this.users.delete(user)
    }
  }

  async stopAll (): Promise<void> {
    const done = [...this.users].map((u) => { u.stop(); return u.done })
    this.users.clear()
    await Promise.all(done)
  }

  private start (): void {
    const c = this.c
    let stopped = false
    let ws: WebSocket | null = null
    let finish: () => void = () => {}
    const done = new Promise<void>((resolve) => { finish = resolve })
    const connect = (): void => {
      if (stopped) { finish(); return }
      const socket = new WebSocket(this.url, { perMessageDeflate: false, headers: this.headers })
      ws = socket
      let n = 0
      let id = ''
      let sentAt = 0
      let waiting = false
      /** Set once the connection opened, or its upgrade was answered (and counted): a later error is not a failed connection. */
      let settled = false
      let deadline: NodeJS.Timeout | undefined
      const timedOut = (): void => {
        if (!waiting) return
        waiting = false
        c.requests++
        c.failed++
        c.histogram.recordMs(performance.now() - sentAt)
        count(c, 'timeout')
        // The answer may still come: on another connection, the next call cannot mistake it for its own.
        socket.terminate()
      }
      const send = (): void => {
        id = String(n++)
        waiting = true
        sentAt = performance.now()
        socket.send('{"id":"' + id + '",' + this.rest)
        deadline = setTimeout(timedOut, wsGetAgent.callTimeoutMs)
      }
      socket.on('open', () => {
        settled = true
        send()
      })
      socket.on('unexpected-response', (_req, res) => {
        settled = true
        c.requests++
        c.failed++
        count(c, `upgrade ${res.statusCode ?? '?'}`)
        socket.terminate()
      })
      socket.on('message', (data: RawData) => {
        const now = performance.now()
        if (!waiting) return
        waiting = false
        clearTimeout(deadline)
        c.requests++
        c.histogram.recordMs(now - sentAt)
        let answer: { id?: unknown, result?: unknown, error?: { status?: unknown } } = {}
        try { answer = JSON.parse((data as Buffer).toString('utf8')) } catch {}
        if (answer.id === id && valueAt(answer.result, wsGetAgent.check.path) === wsGetAgent.check.equals) {
          count(c, 'result')
        } else {
          c.failed++
          count(c, answer.error === undefined ? 'other answer' : `error ${String(answer.error.status)}`)
        }
        if (stopped) socket.close(1000, 'done')
        else send()
      })
      socket.on('error', (err: NodeJS.ErrnoException) => {
        // A connection that failed before it opened, without an HTTP answer (refused, reset, its
        // upgrade cut unanswered): one failed call, as k6's onerror counts it. Uncounted, a gateway
        // gone mid-run failed one call per connection, however long it stayed gone.
        if (settled) return
        settled = true
        c.requests++
        c.failed++
        count(c, `connect ${err.code ?? 'error'}`)
      })
      socket.on('close', () => {
        clearTimeout(deadline)
        if (waiting) {
          c.requests++
          c.failed++
          count(c, 'unanswered')
        }
        waiting = false
        // A refused, dropped or timed-out connection: the user connects again (k6 starts a new iteration).
        if (stopped) finish()
        else setTimeout(connect, 100)
      })
    }
    const stop = (): void => {
      if (stopped) return
      stopped = true
      const socket = ws
      if (socket === null || socket.readyState === WebSocket.CLOSED) { finish(); return }
      // As k6's graceful ramp-down: the iteration ends after the call in flight is answered (the
      // message handler closes; a connection still opening makes its one call first), or fails
      // at its deadline. A connection whose upgrade is never answered is cut.
      setTimeout(() => socket.terminate(), wsGetAgent.callTimeoutMs + 1000).unref()
    }
    this.users.add({ stop, done })
    connect()
  }
}

function faceResult (face: SuiteFace, c: Collector, elapsedS: number): FaceResult {
  return {
    face,
    requests: c.requests,
    failed: c.failed,
    checkFailures: c.checkFailures,
    outcomes: c.outcomes,
    achievedPerSec: elapsedS > 0 ? c.requests / elapsedS : 0,
    p50Ms: c.histogram.trendMs(0.5),
    p99Ms: c.histogram.trendMs(0.99),
    maxMs: c.histogram.total === 0 ? Number.NaN : c.histogram.max / 1000
  }
}

/** The suite's thresholds evaluated on what was collected so far (k6's, per face). */
export function evaluate (profile: LoadProfile, faces: ReadonlyArray<{ face: SuiteFace, c: Collector }>): ThresholdResult[] {
  const t = profile.thresholds
  const out: ThresholdResult[] = []
  const rate = (n: number, of: number): number => of === 0 ? 0 : n / of
  for (const { face, c } of faces) {
    // p(99) as k6's Trend computes it: interpolated between neighbouring ranks.
    const p99 = c.histogram.trendMs(0.99)
    // No answer at all: p99 is NaN, and `NaN < x` is false: an empty run does not pass.
    const base = { face, abortOnFail: t.abortOnFail }
    if (face === 'websocket') {
      out.push({ ...base, metric: `ws_call_duration{op:${wsGetAgent.operation}}`, expression: `p(99)<${t.p99Ms}`, observed: p99, pass: p99 < t.p99Ms })
      out.push({ ...base, metric: `ws_call_failed{op:${wsGetAgent.operation}}`, expression: `rate<${t.errorRate}`, observed: rate(c.failed, c.requests), pass: rate(c.failed, c.requests) < t.errorRate })
      out.push({ ...base, abortOnFail: false, metric: 'ws_calls', expression: 'count>0', observed: c.requests - c.failed, pass: c.requests - c.failed > 0 })
    } else {
      const checks = rate(c.requests - c.failed - c.checkFailures, c.requests)
      out.push({ ...base, metric: `http_req_failed{face:${face}}`, expression: `rate<${t.errorRate}`, observed: rate(c.failed, c.requests), pass: c.requests > 0 && rate(c.failed, c.requests) < t.errorRate })
      out.push({ ...base, metric: `http_req_duration{face:${face}}`, expression: `p(99)<${t.p99Ms}`, observed: p99, pass: p99 < t.p99Ms })
      out.push({ ...base, metric: `checks{face:${face}}`, expression: `rate>${1 - t.errorRate}`, observed: checks, pass: checks > 1 - t.errorRate })
    }
  }
  return out
}

/** Runs a suite against a running gateway and evaluates its thresholds. */
export async function runSuite (opts: SuiteOptions): Promise<SuiteReport> {
  const { profile } = opts
  const log = opts.log ?? (() => {})
  const stepSeconds = opts.stepSeconds ?? 1
  const stages = scaleStages(profile.stages, opts.timeScale, opts.rateScale)
  const wsStages = scaleStages(profile.wsStages, opts.timeScale, opts.rateScale)
  const startRate = profile.startRate * opts.rateScale
  const total = stages.reduce((sum, s) => sum + s.durationS, 0)
  const wsTotal = wsStages.reduce((sum, s) => sum + s.durationS, 0)
  const length = Math.max(opts.faces.some((f) => f !== 'websocket') ? total : 0, opts.faces.includes('websocket') ? wsTotal : 0)
  const delayAbortS = profile.thresholds.delayAbortEvalS * opts.timeScale

  // k6's maxVUs for the suite's peak rate (k6/common.ts rampingArrival).
  const peak = Math.max(1, Math.round(startRate), ...stages.map((s) => s.target))
  const maxInFlight = Math.max(50, peak)
  const http = SUITE_HTTP_SCENARIOS.filter((s) => opts.faces.includes(s.face)).map((s) => ({ face: s.face as SuiteFace, driver: new HttpArrivals(opts.target, s, maxInFlight) }))
  const ws = opts.faces.includes('websocket') ? new WsUsers(opts.target, opts.token) : null
  const all = [...http.map(({ face, driver }) => ({ face, c: driver.c })), ...(ws === null ? [] : [{ face: 'websocket' as SuiteFace, c: ws.c }])]

  let aborted: SuiteReport['aborted'] = null
  const started = performance.now()
  const now = (): number => (performance.now() - started) / 1000
  let rate = 0
  let wsLevel = 0
  try {
    let lastTick = 0
    let nextStep = 0
    while (now() < length) {
      const t = now()
      rate = t < total ? levelAt(stages, startRate, t) : 0
      for (const { driver } of http) driver.tick(rate, t - lastTick)
      lastTick = t
      if (t >= nextStep) {
        wsLevel = t < wsTotal ? Math.round(levelAt(wsStages, 0, t)) : 0
        ws?.resize(wsLevel)
        if (profile.thresholds.abortOnFail && t >= delayAbortS) {
          // A face with no answer yet has nothing to judge (k6 does not abort on an empty metric).
          const crossed = evaluate(profile, all.filter(({ c }) => c.requests > 0)).find((r) => r.abortOnFail && !r.pass)
          if (crossed !== undefined) {
            aborted = { atS: t, level: Math.round(rate), wsLevel, metric: crossed.metric, expression: crossed.expression }
            log(`${profile.name}: ${crossed.metric} ${crossed.expression} crossed at ${fmt(t, 1)} s (${Math.round(rate)} req/s per HTTP face, ${wsLevel} connections): aborting`)
            break
          }
        }
        log(`${profile.name} ${fmt(t, 1)}/${fmt(length, 1)} s  ${http.length === 0 ? '' : `${Math.round(rate)} req/s per HTTP face  `}${ws === null ? '' : `${wsLevel} WebSocket connections`}`)
        nextStep += stepSeconds
      }
      await sleep(TICK_MS)
    }
  } finally {
    await Promise.all([ws?.stopAll(), ...http.map(({ driver }) => driver.close())])
  }
  const elapsedS = (performance.now() - started) / 1000
  const thresholds = evaluate(profile, all)
  return {
    profile: profile.name,
    timeScale: opts.timeScale,
    rateScale: opts.rateScale,
    stages,
    wsStages,
    elapsedS,
    faces: all.map(({ face, c }) => {
      const dropped = http.find((h) => h.face === face)?.driver.dropped ?? 0
      if (dropped > 0) c.outcomes.dropped = dropped
      return faceResult(face, c, elapsedS)
    }),
    thresholds,
    aborted,
    passed: aborted === null && thresholds.every((r) => r.pass)
  }
}

/** The printed report: a row per face, then every threshold with ✓/✗, then the verdict. */
export function formatSuite (r: SuiteReport): string {
  const rows = r.faces.map((f) => [
    f.face, String(f.requests), fmt(f.achievedPerSec, 1), fmt(f.p50Ms, 2), fmt(f.p99Ms, 2), fmt(f.maxMs, 2),
    String(f.failed), String(f.checkFailures),
    Object.entries(f.outcomes).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k}: ${v}`).join(', ')
  ])
  const table = textTable(['face', 'requests', 'req/s', 'p50 ms', 'p99 ms', 'max ms', 'failed', 'bad answers', 'outcomes'], rows)
  const shown = (t: ThresholdResult): string => t.expression.startsWith('rate') ? fmt(t.observed, 4) : t.expression.startsWith('count') ? String(t.observed) : fmt(t.observed, 2) + ' ms'
  const lines = r.thresholds.map((t) => `  ${t.pass ? 'pass' : 'FAIL'}  ${`${t.metric} ${t.expression}`.padEnd(44)} observed ${shown(t)}${t.abortOnFail ? '  (abortOnFail)' : ''}`)
  const verdict = r.aborted !== null
    ? `suite ${r.profile}: FAILED, aborted at ${fmt(r.aborted.atS, 1)} s (rate ${r.aborted.level}/s per HTTP face, ${r.aborted.wsLevel} WebSocket connections) by ${r.aborted.metric} ${r.aborted.expression}`
    : `suite ${r.profile}: ${r.passed ? 'passed' : 'FAILED'} (${r.thresholds.filter((t) => !t.pass).length} of ${r.thresholds.length} thresholds crossed)`
  return [
    `suite ${r.profile}, durations x ${r.timeScale}, levels x ${r.rateScale}, ${fmt(r.elapsedS, 1)} s`,
    `  HTTP stages (req/s per face): ${r.stages.map((s) => `${fmt(s.durationS, 2)} s -> ${s.target}`).join(', ')}`,
    `  WebSocket stages (connections): ${r.wsStages.map((s) => `${fmt(s.durationS, 2)} s -> ${s.target}`).join(', ')}`,
    '',
    table,
    '',
    'thresholds',
    ...lines,
    '',
    verdict
  ].join('\n')
}
