// `npm run bench`, in sections (--section, default all = spine + faces + cache):
// - spine: REST getAgent against the Kernel alone, a bare Fastify pass-through and the gateway
//   in two configurations, each in its own process, in interleaved rounds;
// - faces: getAgent over REST, tRPC, GraphQL and WebSocket against one gateway process with
//   every face on (bench-faces.ts);
// - cache: REST getAgent answered from the response cache as a ratio to the pass-through, and
//   the p99 of the cache's Redis lookup (bench-cache.ts);
// - ws-scale: N concurrent subscribed WebSocket connections, the gateway's memory and the
//   fan-out time of events (bench-ws-scale.ts; only when asked for);
// - rate-limit: the cost of a Redis rate-limit check, alone and through REST (bench-rate-limit.ts;
//   only when asked for: it needs Redis).
// The machine is shared (2 cores for load generator, gateway and Kernel), so the figures to
// compare are the ratios between targets measured side by side, not the absolute numbers.
import { randomBytes } from 'node:crypto'
import { mkdirSync, writeFileSync } from 'node:fs'
import { cpus, totalmem, type as osType, release, arch } from 'node:os'
import { dirname, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import {
  GATEWAY_SPINE, REPO_ROOT, REST_TARGETS, benchToken, killAllNow, median, prepareBuild, profileWithPerf, requestFor, startKernelProcess, startTargets, stopAll,
  type RunningProcess, type Target, type TargetContext
} from './harness.js'
import { fmt, httpWarmup, measure, measureRounds, peakRssMiB, signed, sleep, SPINE_GOAL as GOAL, spineGoal, textTable, warmupFailures, type RunFigures, type WarmupFailures } from './measure.js'
import { getAgent, type ScenarioDefinition } from './scenarios.js'
import { runFaces, type FacesReport } from './bench-faces.js'
import { statedTargets } from './targets.js'
import { runWsScale, type WsScaleReport } from './bench-ws-scale.js'
import { runRateLimit, type RateLimitReport } from './bench-rate-limit.js'
import { runFirewall, type FirewallReport } from './bench-firewall.js'
import { runCache, type CacheReport } from './bench-cache.js'
import { runAudit, type AuditReport } from './bench-audit.js'
import { PROFILES, type LoadProfile } from './scenarios.js'
import { formatSuite, runSuite, SUITE_FACES, type SuiteFace } from './suite.js'
import { perfAvailable } from './perf-profile.js'
import { answerHelp, refuseUsage } from '../cli.js'

const SECTIONS = ['spine', 'faces', 'cache', 'ws-scale', 'rate-limit', 'firewall', 'audit'] as const
type Section = typeof SECTIONS[number]

interface Options {
  duration: number
  rounds: number
  connections: number
  only: string[] | null
  out: string
  sections: Section[]
  /** ws-scale: concurrent WebSocket connections. */
  connectionsScale: number
  /** ws-scale: client processes (null: enough for the file-descriptor limit, at least 2). */
  scaleClients: number | null
  /** ws-scale: connections being opened at once, over every client. */
  scaleBatch: number
  /** ws-scale: events published one after the other. */
  scaleEvents: number
  /** rate-limit: store checks per micro-benchmark measurement. */
  rateLimitChecks: number
  /** A load suite to run instead of the sections (smoke, load, stress, spike, soak). */
  scenario: LoadProfile | null
  /** The suite's durations are multiplied by this. */
  scale: number
  /** The suite's rates and connection counts are multiplied by this. */
  rateScale: number
  /** The faces the suite loads. */
  faces: SuiteFace[]
}

/** Exit status of a suite run whose thresholds were crossed (k6 exits 99 then too). */
const THRESHOLDS_CROSSED = 99

interface TargetReport {
  name: string
  description: string
  request: string
  warmup: RunFigures | null
  rounds: RunFigures[]
  reqPerSec: number
  /** autocannon's, in whole milliseconds (its histogram keeps no finer): the table shows the Fine ones. */
  p50Ms: number
  p99Ms: number
  p50FineMs: number
  p99FineMs: number
  non2xx: number
  errors: number
  timeouts: number
  flagged: boolean
  ratioToKernel: number | null
  ratioToPassthrough: number | null
  /** Against nginx as a reverse proxy, when nginx is installed. */
  ratioToNginx: number | null
  p99DiffToPassthroughMs: number | null
  /** The target process's largest resident set read after its runs (MiB); null for the Kernel. */
  peakRssMiB: number | null
}

const WARMUP_SECONDS = 1
// Between runs: lets the previous run's sockets close and its garbage be collected.
const PAUSE_MS = 250

class UsageError extends Error {}

const BENCH_USAGE = `Usage: npm run bench -- [--section ${SECTIONS.join('|')}|all (comma-separated; default all = spine,faces,cache)]\n` +
  '         [--duration <s>] [--rounds <n>] [--connections <n>] [--only <name,...>] [--out <file>]\n' +
  '         [--connections-scale <n>] [--scale-clients <n>] [--scale-batch <n>] [--scale-events <n>]\n' +
  '         [--rate-limit-checks <n>] [--perf <target>]\n' +
  '   or: npm run bench -- --scenario smoke|load|stress|spike|soak [--scale <f>] [--rate-scale <f>] [--faces rest,trpc,graphql,websocket]\n' +
  '       (exit status 99 when a threshold is crossed)\n' +
  `spine targets: ${REST_TARGETS.map((t) => t.name).join(', ')}\n` +
  '--perf <target>: samples that target during its first round with Linux perf (gateway-spine, gateway-cache,\n' +
  '       firewall-on, gateway-audit, ...) and prints where its CPU went, by the nearest JavaScript frame\n'

function parseOptions (argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      duration: { type: 'string', default: '5' },
      rounds: { type: 'string', default: '5' },
      connections: { type: 'string', default: '50' },
      only: { type: 'string' },
      out: { type: 'string' },
      section: { type: 'string', default: 'all' },
      'connections-scale': { type: 'string', default: '10000' },
      'scale-clients': { type: 'string' },
      'scale-batch': { type: 'string', default: '500' },
      'scale-events': { type: 'string', default: '5' },
      'rate-limit-checks': { type: 'string', default: '20000' },
      scenario: { type: 'string' },
      scale: { type: 'string', default: '1' },
      'rate-scale': { type: 'string', default: '1' },
      faces: { type: 'string', default: SUITE_FACES.join(',') },
      perf: { type: 'string' },
    }
  })
  const positive = (name: string, raw: string, integer: boolean): number => {
    const n = Number(raw)
    if (!Number.isFinite(n) || n <= 0 || (integer && !Number.isInteger(n))) {
      throw new UsageError(`--${name} must be a positive ${integer ? 'integer' : 'number'}, got ${JSON.stringify(raw)}`)
    }
    return n
  }
  let only: string[] | null = null
  if (values.only !== undefined) {
    only = values.only.split(',').map((s) => s.trim()).filter((s) => s !== '')
    const unknown = only.filter((n) => !REST_TARGETS.some((t) => t.name === n))
    if (only.length === 0 || unknown.length > 0) {
      throw new UsageError(`--only: unknown target ${JSON.stringify(unknown.join(','))}; known: ${REST_TARGETS.map((t) => t.name).join(', ')}`)
    }
  }
  const sections = new Set<Section>()
  for (const name of values.section.split(',').map((s) => s.trim()).filter((s) => s !== '')) {
    if (name === 'all') {
      sections.add('spine')
      sections.add('faces')
      sections.add('cache')
    } else if ((SECTIONS as readonly string[]).includes(name)) {
      sections.add(name as Section)
    } else {
      throw new UsageError(`--section: unknown section ${JSON.stringify(name)}; known: ${SECTIONS.join(', ')}, all`)
    }
  }
  if (sections.size === 0) throw new UsageError('--section: name at least one section')
  let scenario: LoadProfile | null = null
  if (values.scenario !== undefined) {
    scenario = PROFILES.find((p) => p.name === values.scenario) ?? null
    if (scenario === null) throw new UsageError(`--scenario: unknown suite ${JSON.stringify(values.scenario)}; known: ${PROFILES.map((p) => p.name).join(', ')}`)
  }
  const faces = values.faces.split(',').map((s) => s.trim()).filter((s) => s !== '')
  const unknownFaces = faces.filter((f) => !(SUITE_FACES as readonly string[]).includes(f))
  if (faces.length === 0 || unknownFaces.length > 0) throw new UsageError(`--faces: unknown face ${JSON.stringify(unknownFaces.join(','))}; known: ${SUITE_FACES.join(', ')}`)
  if (values.perf !== undefined && !perfAvailable()) throw new UsageError('--perf needs Linux perf on the PATH (apt-get install linux-perf)')
  profileWithPerf(values.perf ?? null)
  const stamp = new Date().toISOString().replace(/[:.]/g, '-')
  return {
    duration: positive('duration', values.duration, false),
    rounds: positive('rounds', values.rounds, true),
    connections: positive('connections', values.connections, true),
    only,
    out: values.out === undefined ? resolve(REPO_ROOT, 'loadtest/results', `bench-${stamp}.json`) : resolve(values.out),
    // In the order they are run.
    sections: SECTIONS.filter((name) => sections.has(name)),
    connectionsScale: positive('connections-scale', values['connections-scale'], true),
    scaleClients: values['scale-clients'] === undefined ? null : positive('scale-clients', values['scale-clients'], true),
    scaleBatch: positive('scale-batch', values['scale-batch'], true),
    scaleEvents: positive('scale-events', values['scale-events'], true),
    rateLimitChecks: positive('rate-limit-checks', values['rate-limit-checks'], true),
    scenario,
    scale: positive('scale', values.scale, false),
    rateScale: positive('rate-scale', values['rate-scale'], false),
    faces: faces as SuiteFace[]
  }
}

/** One request before measuring: a wrong status is reported with its body, not just counted. */
async function preflight (target: Target, scenario: ScenarioDefinition): Promise<void> {
  const req = requestFor(target, scenario)
  const res = await fetch(req.url, { method: req.method, headers: req.headers, ...(req.body === undefined ? {} : { body: req.body }), signal: AbortSignal.timeout(5000) })
  const text = await res.text()
  if (res.status !== scenario.expectedStatus) {
    process.stderr.write(`warning: ${target.name} answered ${res.status} (expected ${scenario.expectedStatus}) to ${req.method} ${req.url}: ${text.slice(0, 300)}\n`)
  }
}

function table (rows: readonly TargetReport[]): string {
  const header = ['target', 'req/s', 'p50 ms', 'p99 ms', 'x kernel', 'x nginx', 'x passthrough', 'p99 vs passthrough ms', 'RSS MiB', 'status']
  const body = rows.map((r) => [
    r.name,
    fmt(r.reqPerSec, 0),
    fmt(r.p50FineMs, 2),
    fmt(r.p99FineMs, 2),
    fmt(r.ratioToKernel, 2),
    fmt(r.ratioToNginx, 2),
    fmt(r.ratioToPassthrough, 2),
    signed(r.p99DiffToPassthroughMs, 2),
    fmt(r.peakRssMiB, 0),
    r.flagged ? `FLAGGED: ${r.non2xx} non-2xx, ${r.errors} errors (${r.timeouts} timeouts)` : 'ok'
  ])
  return textTable(header, body)
}

interface Machine { cpu: string, cores: number, memoryGiB: number, os: string }

interface SpineResult {
  scenario: ScenarioDefinition
  goal: typeof GOAL & { evaluated: boolean, met: boolean, text: string }
  targets: TargetReport[]
  /** The warm-ups' failed calls (null: none failed); reported, not flagged: the rounds flag their own. */
  warmupFailures: WarmupFailures | null
  /** The gateway-spine process, when this section started it: the faces section reuses it. */
  gatewaySpine: Target | null
}

/** The spine section: the REST targets in interleaved rounds, the table and the spine goal. */
async function runSpine (opts: Options, ctx: TargetContext, processes: RunningProcess[], machine: Machine): Promise<SpineResult> {
  const scenario = getAgent
  const defs = REST_TARGETS.filter((t) => opts.only === null ? t.onlyWhenNamed !== true : opts.only.includes(t.name))
  const started = new Date()
  const targets = await startTargets(defs, ctx, processes)

  for (const target of targets) await preflight(target, scenario)

  const warmups = new Map<string, RunFigures>()
  for (const target of targets) {
    warmups.set(target.name, await measure(target, scenario, WARMUP_SECONDS, opts.connections))
    await sleep(PAUSE_MS)
  }

  const perTarget = await measureRounds(targets, scenario, { rounds: opts.rounds, duration: opts.duration, connections: opts.connections, pauseMs: PAUSE_MS, label: 'spine' })

  const reports: TargetReport[] = targets.map((target) => {
    const rounds = perTarget.get(target.name) ?? []
    const def = defs.find((d) => d.name === target.name)
    const req = requestFor(target, scenario)
    const sum = (pick: (r: RunFigures) => number): number => rounds.reduce((acc, r) => acc + pick(r), 0)
    const non2xx = sum((r) => r.non2xx)
    const errors = sum((r) => r.errors)
    return {
      name: target.name,
      description: def?.description ?? '',
      request: `${req.method} ${req.url.slice(target.url.length)}`,
      warmup: warmups.get(target.name) ?? null,
      rounds,
      reqPerSec: median(rounds.map((r) => r.reqPerSec)),
      p50Ms: median(rounds.map((r) => r.p50Ms)),
      p99Ms: median(rounds.map((r) => r.p99Ms)),
      p50FineMs: median(rounds.map((r) => r.p50FineMs)),
      p99FineMs: median(rounds.map((r) => r.p99FineMs)),
      non2xx,
      errors,
      timeouts: sum((r) => r.timeouts),
      // A fast error is not a result: any failed request disqualifies the target's figures.
      flagged: non2xx + errors > 0,
      ratioToKernel: null,
      ratioToPassthrough: null,
      ratioToNginx: null,
      p99DiffToPassthroughMs: null,
      peakRssMiB: peakRssMiB(rounds.map((r) => r.rssKiB))
    }
  })
  const kernelRow = reports.find((r) => r.name === 'kernel-direct')
  const passRow = reports.find((r) => r.name === 'passthrough')
  const nginxRow = reports.find((r) => r.name === 'nginx')
  for (const r of reports) {
    if (kernelRow !== undefined) r.ratioToKernel = r.reqPerSec / kernelRow.reqPerSec
    if (nginxRow !== undefined) r.ratioToNginx = r.reqPerSec / nginxRow.reqPerSec
    if (passRow !== undefined) {
      r.ratioToPassthrough = r.reqPerSec / passRow.reqPerSec
      r.p99DiffToPassthroughMs = r.p99FineMs - passRow.p99FineMs // as spineGoal
    }
  }

  const goal = spineGoal(reports.find((r) => r.name === 'gateway-spine'), passRow)
  const warmupFailed = warmupFailures([...warmups].map(([name, f]) => httpWarmup(name, f)))

  const header = [
    `Mantle bench — ${scenario.operation} (${scenario.method} ${scenario.path})`,
    `machine  ${machine.cpu} x ${machine.cores}, ${machine.memoryGiB} GiB, ${machine.os}`,
    `node     ${process.version}`,
    `date     ${started.toISOString()}`,
    `options  duration ${opts.duration} s x ${opts.rounds} rounds (median), ${opts.connections} connections, warm-up ${WARMUP_SECONDS} s, targets ${targets.map((t) => t.name).join(',')}`
  ]
  process.stdout.write('\n' + header.join('\n') + '\n\n' + table(reports) + '\n' + (warmupFailed === null ? '' : warmupFailed.text + '\n') + '\n' + goal.text + '\n')
  return { scenario, goal: { ...GOAL, ...goal }, targets: reports, warmupFailures: warmupFailed, gatewaySpine: targets.find((t) => t.name === GATEWAY_SPINE.name) ?? null }
}

async function run (opts: Options, processes: RunningProcess[]): Promise<void> {
  const started = new Date()
  const cpu = cpus()
  const machine: Machine = {
    cpu: cpu[0]?.model ?? 'unknown',
    cores: cpu.length,
    memoryGiB: Number((totalmem() / 2 ** 30).toFixed(1)),
    os: `${osType()} ${release()} ${arch()}`
  }
  // A load suite (--scenario) runs instead of the sections, not beside them.
  const sections = opts.scenario === null ? opts.sections : []
  // Every target and face is measured once per round plus a warm-up; the token must outlive it all.
  const spineTargets = sections.includes('spine') ? REST_TARGETS.filter((t) => opts.only === null ? t.onlyWhenNamed !== true : opts.only.includes(t.name)).length : 0
  // Extra gateway measurements per round, by section.
  const PER_SECTION: Partial<Record<Section, number>> = { faces: 4, cache: 3, 'rate-limit': 4, firewall: 4, audit: 2 }
  const faces = sections.reduce((n, s) => n + (PER_SECTION[s] ?? 0), 0)
  const suiteSeconds = opts.scenario === null ? 0 : Math.max(...[opts.scenario.stages, opts.scenario.wsStages].map((stages) => stages.reduce((sum, s) => sum + s.durationS, 0))) * opts.scale
  const estimatedSeconds = (spineTargets + faces) * (opts.rounds * (opts.duration + 2) + WARMUP_SECONDS + 5) + suiteSeconds
  const secret = randomBytes(32).toString('hex')
  // Every target runs compiled, as deployed (prepareBuild): not through tsx.
  process.stderr.write('bench: compiling the targets (tsconfig.bench.json -> .bench-build/)\n')
  await prepareBuild()
  const kernel = await startKernelProcess()
  processes.push(kernel.process)
  const ctx: TargetContext = { kernelUrl: kernel.url, secret, token: benchToken(secret, Math.max(3600, Math.ceil(estimatedSeconds * 2))) }

  // The JSON keeps the spine section's fields at the top level, as before the other sections.
  const report: Record<string, unknown> = {
    sections: opts.sections,
    machine,
    node: process.version,
    date: started.toISOString(),
    options: { ...opts, warmupSeconds: WARMUP_SECONDS }
  }
  let gatewaySpine: Target | null = null
  if (opts.scenario !== null) {
    // A load suite instead of the sections: the gateway as deployed (gateway-spine), every face on.
    const gateway = (await startTargets([GATEWAY_SPINE], ctx, processes))[0]
    process.stdout.write(`\nMantle load suite ${opts.scenario.name} against ${GATEWAY_SPINE.name} (${GATEWAY_SPINE.description})\nmachine  ${machine.cpu} x ${machine.cores}, ${machine.memoryGiB} GiB\n\n`)
    const suite = await runSuite({
      profile: opts.scenario,
      timeScale: opts.scale,
      rateScale: opts.rateScale,
      target: gateway,
      token: ctx.token,
      faces: opts.faces,
      log: (line) => process.stderr.write(line + '\n')
    })
    process.stdout.write(formatSuite(suite) + '\n')
    report.suite = suite
    if (!suite.passed) process.exitCode = THRESHOLDS_CROSSED
  }
  if (sections.includes('spine')) {
    const spine = await runSpine(opts, ctx, processes, machine)
    gatewaySpine = spine.gatewaySpine
    Object.assign(report, { scenario: spine.scenario, goal: spine.goal, targets: spine.targets, warmupFailures: spine.warmupFailures })
  }
  if (sections.includes('faces')) {
    const reused = gatewaySpine !== null
    // One gateway process with every face on: the spine section's gateway-spine when it ran.
    gatewaySpine ??= (await startTargets([GATEWAY_SPINE], ctx, processes))[0]
    const faces: FacesReport = await runFaces({ duration: opts.duration, rounds: opts.rounds, connections: opts.connections, warmupSeconds: WARMUP_SECONDS, pauseMs: PAUSE_MS }, ctx, gatewaySpine, reused, machine)
    report.faces = faces
  }
  if (sections.includes('spine') || sections.includes('faces')) {
    const spineRow = (report.targets as TargetReport[] | undefined)?.find((r) => r.name === GATEWAY_SPINE.name)
    const stated = statedTargets(spineRow, report.faces as FacesReport | undefined)
    process.stdout.write(`\nStated targets (gateway-spine, ${machine.cores} cores)\n${stated.map((s) => '  ' + s.text).join('\n')}\n`)
    report.statedTargets = stated
  }
  if (sections.includes('cache')) {
    const cache: CacheReport = await runCache({
      duration: opts.duration,
      rounds: opts.rounds,
      connections: opts.connections,
      warmupSeconds: WARMUP_SECONDS,
      pauseMs: PAUSE_MS,
      redisUrl: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
      lookups: 5000
    }, ctx, processes, gatewaySpine)
    report.cache = cache
  }
  if (sections.includes('ws-scale')) {
    const scale: WsScaleReport = await runWsScale({ connections: opts.connectionsScale, clients: opts.scaleClients, batch: opts.scaleBatch, events: opts.scaleEvents }, ctx, processes, machine)
    report.wsScale = scale
  }
  if (sections.includes('audit')) {
    const audit: AuditReport = await runAudit({ duration: opts.duration, rounds: opts.rounds, connections: opts.connections, warmupSeconds: WARMUP_SECONDS, pauseMs: PAUSE_MS }, ctx, processes, machine)
    report.audit = audit
  }

  if (sections.includes('rate-limit')) {
    const rateLimit: RateLimitReport = await runRateLimit({ duration: opts.duration, rounds: opts.rounds, connections: opts.connections, warmupSeconds: WARMUP_SECONDS, pauseMs: PAUSE_MS, checks: opts.rateLimitChecks }, ctx, processes)
    report.rateLimit = rateLimit
  }
  if (sections.includes('firewall')) {
    const firewall: FirewallReport = await runFirewall({ duration: opts.duration, rounds: opts.rounds, connections: opts.connections, warmupSeconds: WARMUP_SECONDS, pauseMs: PAUSE_MS }, ctx, processes)
    report.firewall = firewall
  }

  mkdirSync(dirname(opts.out), { recursive: true })
  // NaN (no value) becomes null.
  writeFileSync(opts.out, JSON.stringify(report, null, 2) + '\n')
  process.stdout.write(`\nresults  ${opts.out}\n`)
}

async function main (): Promise<void> {
  let opts: Options
  const argv = process.argv.slice(2)
  if (answerHelp(argv, BENCH_USAGE)) return
  try {
    opts = parseOptions(argv)
  } catch (err) {
    refuseUsage('bench', (err as Error).message, BENCH_USAGE)
    return
  }
  const processes: RunningProcess[] = []
  // Children must not outlive the harness, however it ends.
  process.once('exit', killAllNow)
  let interrupted = false
  const onSignal = (signal: NodeJS.Signals): void => {
    if (interrupted) return
    interrupted = true
    process.stderr.write(`bench: ${signal}, stopping the targets\n`)
    stopAll(processes).finally(() => process.exit(signal === 'SIGINT' ? 130 : 143))
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  try {
    await run(opts, processes)
  } catch (err) {
    process.stderr.write(`bench: ${(err as Error).stack ?? String(err)}\n`)
    process.exitCode = 1
  } finally {
    await stopAll(processes)
  }
  process.off('SIGINT', onSignal)
  process.off('SIGTERM', onSignal)
  // autocannon may leave timers or sockets behind; the harness is done once children are gone.
  process.exit()
}

await main()
