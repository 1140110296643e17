// The faces section of `npm run bench`: the same operation, getAgent(id a1), over REST, tRPC,
// GraphQL and WebSocket, against ONE gateway process with every face on (gateway-spine), in
// interleaved rounds (medians), and the faces goals as ratios to REST measured in the same
// rotation. HTTP faces are measured with autocannon in the harness process; the WebSocket face
// with ws-runner.ts in a child process (autocannon does not speak WebSocket).
import { requestFor, median, rssKiB, startWorker, type Target, type TargetContext } from './harness.js'
import { fmt, httpWarmup, measure, peakRssMiB, signed, sleep, textTable, warmupFailures, type RunFigures, type WarmupFailures, type WarmupRun } from './measure.js'
import {
  FACE_GOALS, FACE_SCENARIOS, GRAPHQL_ID_TYPE,
  type AnswerCheck, type FaceScenarioDefinition, type WsCallScenarioDefinition
} from './scenarios.js'
import type { WsRunnerConfig, WsRunnerReport } from './ws-runner.js'

export interface FacesOptions {
  duration: number
  rounds: number
  /** autocannon's connections for HTTP faces; WebSocket connections, one call in flight each. */
  connections: number
  warmupSeconds: number
  pauseMs: number
}

type FaceName = 'rest' | 'trpc' | 'graphql' | 'websocket'

/** One measurement of one face, in the same terms for every face. */
export interface FaceRound {
  /** req/s (HTTP: autocannon's requests.average), or calls/s (WebSocket: answers in the window / duration). */
  reqPerSec: number
  /** Full-resolution percentiles (autocannon's response times; the WebSocket runner's histogram). */
  p50Ms: number
  p99Ms: number
  /** Answers that were not the expected one: non-2xx, transport errors, other bodies, error frames, no answer. */
  failures: number
  /** CPU time of the load generator (autocannon in the harness process, or the WebSocket runner), % of one core. */
  generatorCpuPct: number
  /** The gateway's resident set right after the run (KiB); null when the harness did not start it. */
  rssKiB: number | null
  http?: RunFigures
  ws?: WsRunnerReport
}

export interface FaceRow {
  face: FaceName
  scenario: string
  request: string
  /** Why the face was not measured (its preflight failed), or null. */
  skipped: string | null
  /** Whether every answer's body was compared with the preflight's (HTTP) or the probe's (WebSocket). */
  bodiesCompared: boolean
  warmup: FaceRound | null
  rounds: FaceRound[]
  reqPerSec: number
  p50Ms: number
  p99Ms: number
  failures: number
  /** Median over rounds of the load generator's CPU, % of one core: near 100, the generator is the limit. */
  generatorCpuPct: number
  /** The gateway's largest resident set read after this face's runs (MiB). */
  peakRssMiB: number | null
  flagged: boolean
  ratioToRest: number | null
  /** req/s over REST's req/s of the same round, round by round: the spread behind ratioToRest. */
  ratioToRestPerRound: number[]
  p99DiffToRestMs: number | null
}

export interface FaceGoal {
  face: FaceName
  minRatioToRest: number
  evaluated: boolean
  met: boolean
  ratio: number | null
  text: string
}

export interface FacesReport {
  operation: string
  gateway: { name: string, reusedFromSpine: boolean }
  /** REST is measured again in the faces rotation (not taken from the spine section). */
  restBaseline: 'measured in the faces rotation'
  graphqlIdType: { used: string, source: string }
  faces: FaceRow[]
  goals: FaceGoal[]
  allGoalsMet: boolean
  /** The warm-ups' failed calls (null: none failed); reported, not flagged: the rounds flag their own. */
  warmupFailures: WarmupFailures | null
}

const LABEL: Record<FaceName, string> = { rest: 'REST', trpc: 'tRPC', graphql: 'GraphQL', websocket: 'WebSocket' }

function valueAt (value: unknown, path: readonly string[]): unknown {
  let v = value
  for (const key of path) v = typeof v === 'object' && v !== null ? (v as Record<string, unknown>)[key] : undefined
  return v
}

/** What is wrong with an HTTP answer, or null when it is the expected one. */
function answerProblem (status: number, text: string, expectedStatus: number, check: AnswerCheck): string | null {
  if (status !== expectedStatus) return `status ${status} (expected ${expectedStatus}): ${text.slice(0, 300)}`
  let body: unknown
  try {
    body = JSON.parse(text)
  } catch {
    return `not JSON: ${text.slice(0, 300)}`
  }
  if (typeof body === 'object' && body !== null && 'errors' in body) return `GraphQL errors: ${text.slice(0, 300)}`
  if (valueAt(body, check.path) !== check.equals) return `${check.path.join('.')} is not ${JSON.stringify(check.equals)}: ${text.slice(0, 300)}`
  return null
}

/**
 * Two requests before measuring: the answer must be the expected one (a GraphQL error is a
 * 200 too). When both bodies are the same, every answer of the run is compared with it.
 */
async function preflight (target: Target, scenario: FaceScenarioDefinition): Promise<{ problem: string | null, expectBody: string | undefined }> {
  const req = requestFor(target, scenario)
  const bodies: string[] = []
  for (let i = 0; i < 2; i++) {
    let res: Response
    try {
      res = await fetch(req.url, { method: req.method, headers: req.headers, ...(req.body === undefined ? {} : { body: req.body }), signal: AbortSignal.timeout(5000) })
    } catch (err) {
      return { problem: `${req.method} ${req.url}: ${(err as Error).message}`, expectBody: undefined }
    }
    const text = await res.text()
    const problem = answerProblem(res.status, text, scenario.expectedStatus, scenario.check)
    if (problem !== null) return { problem: `${req.method} ${req.url.slice(target.url.length)} answered ${problem}`, expectBody: undefined }
    bodies.push(text)
  }
  return { problem: null, expectBody: bodies[0] === bodies[1] ? bodies[0] : undefined }
}

interface IntrospectedType { kind: string, name: string | null, ofType: IntrospectedType | null }

function render (t: IntrospectedType | null): string {
  if (t === null) return '?'
  if (t.kind === 'NON_NULL') return render(t.ofType) + '!'
  if (t.kind === 'LIST') return '[' + render(t.ofType) + ']'
  return t.name ?? '?'
}

/**
 * The type of getAgent's `id` argument in the gateway's generated schema, by introspection
 * (the query's variable must be declared with exactly that type). Null when it cannot be read.
 */
async function graphqlArgType (target: Target, field: string, arg: string): Promise<string | null> {
  const query = '{ __type(name: "Query") { fields { name args { name type { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } }'
  try {
    const res = await fetch(target.url + '/graphql', {
      method: 'POST',
      headers: { ...target.headers, 'content-type': 'application/json' },
      body: JSON.stringify({ query }),
      signal: AbortSignal.timeout(5000)
    })
    if (!res.ok) return null
    const body = await res.json() as { data?: { __type?: { fields?: Array<{ name: string, args: Array<{ name: string, type: IntrospectedType }> }> } | null } }
    const type = body.data?.__type?.fields?.find((f) => f.name === field)?.args.find((a) => a.name === arg)?.type
    return type === undefined ? null : render(type)
  } catch {
    return null
  }
}

/** One run of ws-runner.ts in its own process; its report is the last line of its stdout. */
async function measureWs (gateway: Target, token: string, scenario: WsCallScenarioDefinition, seconds: number, connections: number): Promise<WsRunnerReport> {
  const url = gateway.url.replace(/^http/, 'ws') + scenario.path + '?access_token=' + encodeURIComponent(token)
  const config: WsRunnerConfig = { url, connections, durationSeconds: seconds, op: scenario.frame.op, input: scenario.frame.input, check: scenario.check }
  const worker = startWorker({ name: 'ws-runner', script: 'loadtest/ws-runner.ts', env: { WS_RUNNER_CONFIG: JSON.stringify(config) } })
  // Start-up, connections, probe, the window and the drain: far less than this.
  const timer = setTimeout(() => { worker.stop().catch(() => {}) }, (seconds + 60) * 1000)
  const out = await worker.done
  clearTimeout(timer)
  const line = out.stdout.trim().split('\n').pop() ?? ''
  if (out.code !== 0 || line === '') throw new Error(`ws-runner exited (${out.code ?? out.signal ?? '?'}) without a report:\n${out.tail}`)
  const report = JSON.parse(line) as WsRunnerReport
  // JSON has no NaN: the runner's "no value" comes back as null.
  for (const key of ['p50Ms', 'p90Ms', 'p99Ms', 'meanMs', 'maxMs', 'generatorCpuPct'] as const) report[key] ??= Number.NaN
  return report
}

export function fromHttp (f: RunFigures): FaceRound {
  return { reqPerSec: f.reqPerSec, p50Ms: f.p50FineMs, p99Ms: f.p99FineMs, failures: f.non2xx + f.errors + f.mismatches, generatorCpuPct: f.generatorCpuPct, rssKiB: f.rssKiB, http: f }
}

/**
 * A WebSocket run as a FaceRound. Its failures are calls and connections, each counted once: a
 * connection that closed with its call waiting is that unanswered call (closedEarly counts the
 * connection again: it was counted twice), and a run with no connection opened is its
 * connections not opened.
 */
export function fromWs (r: WsRunnerReport, rss: number | null): FaceRound {
  const notOpened = r.connections - r.opened
  return {
    rssKiB: rss,
    reqPerSec: r.callsPerSec,
    p50Ms: r.p50Ms,
    p99Ms: r.p99Ms,
    failures: r.errors + r.mismatches + r.unanswered + notOpened + (r.failure === null || r.opened === 0 ? 0 : 1),
    generatorCpuPct: r.generatorCpuPct,
    ws: r
  }
}

/** A face's warm-up as a WarmupRun (WebSocket: answers in and after the window, and the failures). */
function warmupRun (row: FaceRow, round: FaceRound): WarmupRun {
  if (round.http !== undefined) return httpWarmup(LABEL[row.face], round.http)
  const calls = round.ws === undefined ? 0 : round.ws.calls + round.ws.lateCalls
  return { name: LABEL[row.face], calls: calls + round.failures, failed: round.failures }
}

function describeFailures (row: FaceRow): string {
  if (row.face === 'websocket') {
    const sum = (pick: (r: WsRunnerReport) => number): number => row.rounds.reduce((acc, r) => acc + (r.ws === undefined ? 0 : pick(r.ws)), 0)
    return `FLAGGED: ${sum((r) => r.errors)} error frames, ${sum((r) => r.mismatches)} other answers, ${sum((r) => r.unanswered)} unanswered, ${sum((r) => r.connections - r.opened)} not opened`
  }
  const sum = (pick: (r: RunFigures) => number): number => row.rounds.reduce((acc, r) => acc + (r.http === undefined ? 0 : pick(r.http)), 0)
  return `FLAGGED: ${sum((r) => r.non2xx)} non-2xx, ${sum((r) => r.errors)} errors (${sum((r) => r.timeouts)} timeouts), ${sum((r) => r.mismatches)} other bodies`
}

function table (rows: readonly FaceRow[]): string {
  const header = ['face', 'req/s', 'p50 ms', 'p99 ms', 'x REST', 'p99 vs REST ms', 'load gen CPU %', 'gateway RSS MiB', 'status']
  const body = rows.map((r) => r.skipped !== null
    ? [LABEL[r.face], '-', '-', '-', '-', '-', '-', '-', `NOT MEASURED: ${r.skipped.slice(0, 100)}`]
    : [
        LABEL[r.face] + (r.face === 'websocket' ? ' (calls/s)' : ''),
        fmt(r.reqPerSec, 0),
        fmt(r.p50Ms, 2),
        fmt(r.p99Ms, 2),
        fmt(r.ratioToRest, 2),
        r.face === 'rest' ? '-' : signed(r.p99DiffToRestMs, 2),
        fmt(r.generatorCpuPct, 0),
        fmt(r.peakRssMiB, 0),
        r.flagged ? describeFailures(r) : 'ok'
      ])
  return textTable(header, body)
}

export async function runFaces (opts: FacesOptions, ctx: TargetContext, gateway: Target, reused: boolean, machine: { cpu: string, cores: number, memoryGiB: number, os: string }): Promise<FacesReport> {
  const started = new Date()
  const [rest, trpc, graphqlDefault, ws] = FACE_SCENARIOS

  // The GraphQL variable must have the argument's exact type: read it from the schema.
  const introspected = await graphqlArgType(gateway, graphqlDefault.operation, 'id')
  let graphql = graphqlDefault
  let graphqlIdType = { used: GRAPHQL_ID_TYPE, source: 'scenarios.ts (introspection unavailable)' }
  if (introspected !== null) {
    graphqlIdType = { used: introspected, source: 'introspection of the gateway schema' }
    if (introspected !== GRAPHQL_ID_TYPE) {
      const body = graphqlDefault.body as { query: string, variables: unknown }
      graphql = { ...graphqlDefault, body: { ...body, query: body.query.replace(`$id:${GRAPHQL_ID_TYPE}`, `$id:${introspected}`) } }
      process.stderr.write(`faces: getAgent's id argument is ${introspected} in the schema, not ${GRAPHQL_ID_TYPE}: the query uses ${introspected}\n`)
    }
  }

  const httpFaces = [rest, trpc, graphql]
  const rows: FaceRow[] = []
  const expect = new Map<FaceName, string | undefined>()
  for (const scenario of httpFaces) {
    const req = requestFor(gateway, scenario)
    const { problem, expectBody } = await preflight(gateway, scenario)
    if (problem !== null) process.stderr.write(`warning: ${LABEL[scenario.face]} face not measured: ${problem}\n`)
    expect.set(scenario.face, expectBody)
    rows.push({
      face: scenario.face,
      scenario: scenario.name,
      request: `${req.method} ${req.url.slice(gateway.url.length)}${req.body === undefined ? '' : ' ' + req.body}`,
      skipped: problem,
      bodiesCompared: expectBody !== undefined,
      warmup: null,
      rounds: [],
      reqPerSec: Number.NaN,
      p50Ms: Number.NaN,
      p99Ms: Number.NaN,
      failures: 0,
      generatorCpuPct: Number.NaN,
      flagged: false,
      ratioToRest: null,
      ratioToRestPerRound: [],
      peakRssMiB: null,
      p99DiffToRestMs: null
    })
  }
  const wsRow: FaceRow = {
    face: 'websocket',
    scenario: ws.name,
    request: `${ws.path}?access_token=<token> ${JSON.stringify({ id: '<n>', ...ws.frame })}`,
    skipped: null,
    bodiesCompared: true,
    warmup: null,
    rounds: [],
    reqPerSec: Number.NaN,
    p50Ms: Number.NaN,
    p99Ms: Number.NaN,
    failures: 0,
    generatorCpuPct: Number.NaN,
    flagged: false,
    ratioToRest: null,
    ratioToRestPerRound: [],
    peakRssMiB: null,
    p99DiffToRestMs: null
  }
  rows.push(wsRow)

  const runOnce = async (row: FaceRow, seconds: number): Promise<FaceRound> => {
    if (row.face === 'websocket') {
      const report = await measureWs(gateway, ctx.token, ws, seconds, opts.connections)
      return fromWs(report, gateway.pid === undefined ? null : rssKiB(gateway.pid))
    }
    const scenario = httpFaces.find((s) => s.face === row.face)!
    return fromHttp(await measure(gateway, scenario, seconds, opts.connections, expect.get(row.face)))
  }

  // Warm-up, which is also the WebSocket face's preflight: the runner checks the probe answer.
  for (const row of rows) {
    if (row.skipped !== null) continue
    let round: FaceRound
    try {
      round = await runOnce(row, opts.warmupSeconds)
    } catch (err) {
      row.skipped = (err as Error).message
      process.stderr.write(`warning: ${LABEL[row.face]} face not measured: ${row.skipped}\n`)
      continue
    }
    if (round.ws !== undefined && round.ws.failure !== null) {
      row.skipped = round.ws.failure
      process.stderr.write(`warning: WebSocket face not measured: ${round.ws.failure}\n`)
    } else {
      row.warmup = round
    }
    await sleep(opts.pauseMs)
  }

  const measured = rows.filter((r) => r.skipped === null)
  for (let round = 0; round < opts.rounds; round++) {
    // Rotating the first face spreads slow drift of the shared machine over every face.
    const order = measured.map((_, i) => measured[(i + round) % measured.length])
    for (const row of order) {
      const figures = await runOnce(row, opts.duration)
      row.rounds.push(figures)
      process.stderr.write(`faces round ${round + 1}/${opts.rounds}  ${LABEL[row.face].padEnd(9)} ${figures.reqPerSec.toFixed(0).padStart(7)} ${row.face === 'websocket' ? 'calls/s' : 'req/s  '}  p50 ${fmt(figures.p50Ms, 2)} ms  p99 ${fmt(figures.p99Ms, 2)} ms` +
        (figures.failures > 0 ? `  (${figures.failures} failed)` : '') + '\n')
      await sleep(opts.pauseMs)
    }
  }

  for (const row of measured) {
    row.reqPerSec = median(row.rounds.map((r) => r.reqPerSec))
    row.p50Ms = median(row.rounds.map((r) => r.p50Ms))
    row.p99Ms = median(row.rounds.map((r) => r.p99Ms))
    row.failures = row.rounds.reduce((acc, r) => acc + r.failures, 0)
    row.generatorCpuPct = median(row.rounds.map((r) => r.generatorCpuPct))
    row.peakRssMiB = peakRssMiB(row.rounds.map((r) => r.rssKiB))
    // A fast error is not a result: any failed answer disqualifies the face's figures.
    row.flagged = row.failures > 0
  }
  const restRow = rows[0]
  if (restRow.skipped === null) {
    for (const row of measured) {
      row.ratioToRest = row.reqPerSec / restRow.reqPerSec
      row.ratioToRestPerRound = row.rounds.map((r, i) => r.reqPerSec / restRow.rounds[i].reqPerSec)
      row.p99DiffToRestMs = row.p99Ms - restRow.p99Ms
    }
  }

  const goals: FaceGoal[] = (['trpc', 'graphql', 'websocket'] as const).map((face) => {
    const row = rows.find((r) => r.face === face)!
    const min = FACE_GOALS[face]
    const what = `${LABEL[face]} ${face === 'websocket' ? 'calls/s' : 'req/s'} >= ${(min * 100).toFixed(0)}% of REST req/s`
    if (row.skipped !== null || restRow.skipped !== null) {
      const reason = restRow.skipped !== null ? 'REST was not measured' : `${LABEL[face]} was not measured`
      return { face, minRatioToRest: min, evaluated: false, met: false, ratio: null, text: `${what}: goal NOT met — ${reason}` }
    }
    const ratio = row.ratioToRest ?? Number.NaN
    const clean = !row.flagged && !restRow.flagged
    const met = ratio >= min && clean
    return {
      face,
      minRatioToRest: min,
      evaluated: true,
      met,
      ratio,
      text: `${what}: ${met ? 'goal met' : 'goal NOT met'} — ${(ratio * 100).toFixed(1)}%${ratio >= min ? '' : ' too low'}${clean ? '' : ', flagged (failed answers)'}`
    }
  })

  const header = [
    'Mantle bench — faces: getAgent(id a1) over every face of one gateway process',
    `gateway  gateway-spine (identity, metrics, OpenAPI, circuit breaker; tRPC, GraphQL and WebSocket on)${reused ? ', the spine section\'s process' : ''}; token tenant bench, roles viewer,operator`,
    `machine  ${machine.cpu} x ${machine.cores}, ${machine.memoryGiB} GiB, ${machine.os}`,
    `date     ${started.toISOString()}`,
    `options  duration ${opts.duration} s x ${opts.rounds} rounds (median), ${opts.connections} connections (WebSocket: ${opts.connections} connections, one call in flight each), warm-up ${opts.warmupSeconds} s`,
    'notes    REST is measured again in this rotation; p50/p99 at full resolution (autocannon response times; WebSocket: send -> answer, histogram within 0.8 %)',
    `         GraphQL: query($id:${graphqlIdType.used}) (${graphqlIdType.source}); answers compared with the preflight body: ${rows.filter((r) => r.bodiesCompared && r.skipped === null).map((r) => LABEL[r.face]).join(', ') || 'none'}`
  ]
  // The goals read the ratio of medians; the per-round ratios show how far the machine's noise
  // reaches (each round measures every face once, one after the other).
  const spread = rows.filter((r) => r.face !== 'rest' && r.ratioToRestPerRound.length > 0)
    .map((r) => `${LABEL[r.face]} ${fmt(Math.min(...r.ratioToRestPerRound), 2)}..${fmt(Math.max(...r.ratioToRestPerRound), 2)}`)
  const spreadLine = spread.length === 0 ? '' : `x REST round by round (min..max): ${spread.join(', ')}\n`
  const warmupFailed = warmupFailures(rows.flatMap((r) => r.warmup === null ? [] : [warmupRun(r, r.warmup)]))
  process.stdout.write('\n' + header.join('\n') + '\n\n' + table(rows) + '\n' + (warmupFailed === null ? '' : warmupFailed.text + '\n') + '\n' + spreadLine + goals.map((g) => g.text).join('\n') + '\n')

  return {
    operation: rest.operation,
    gateway: { name: gateway.name, reusedFromSpine: reused },
    restBaseline: 'measured in the faces rotation',
    graphqlIdType,
    faces: rows,
    goals,
    allGoalsMet: goals.every((g) => g.met),
    warmupFailures: warmupFailed
  }
}
