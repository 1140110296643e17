// The HTTP measurement every section shares (autocannon in the harness process), and the
// formatting of the printed tables.
import autocannon from 'autocannon'
import type { EventEmitter } from 'node:events'
import { BUILD_DIR, REPO_ROOT, cpuMicros, median, profiledTarget, requestFor, rssKiB, type Scenario, type Target } from './harness.js'
import { breakdown, formatBreakdown, recordPerf, type PerfBreakdown } from './perf-profile.js'
import { nearestRank } from './histogram.js'

export interface RunFigures {
  reqPerSec: number
  p50Ms: number
  p99Ms: number
  /** p50 from every 2xx response time at full resolution (autocannon's histogram keeps whole ms). */
  p50FineMs: number
  /** p99 from every 2xx response time at full resolution (autocannon's histogram keeps whole ms). */
  p99FineMs: number
  requests: number
  non2xx: number
  errors: number
  timeouts: number
  /** 2xx answers whose body was not the expected one (only when an expected body is given). */
  mismatches: number
  /** CPU time of the load generator (this process) over the run, in % of one core. */
  generatorCpuPct: number
  /** The target process's resident set right after the run (KiB); null when the harness did not start it. */
  rssKiB: number | null
  /**
   * CPU time the target process used per request answered (µs, from its process counters);
   * null when the harness did not start it. Steadier than req/s on a shared machine: it does
   * not count the time the process waited for a core.
   */
  cpuUsPerRequest: number | null
  /** CPU time of the watched processes (RoundsOptions.watch) per request answered (µs); null when none is watched. */
  watchedCpuUsPerRequest: number | null
  /** Where the target's CPU went in this run (`--perf`, first round of the named target only). */
  perf?: PerfBreakdown
}

/** CPU time (µs) of a set of processes; those gone since are not counted. */
function cpuOf (pids: readonly number[]): Map<number, number> {
  return new Map(pids.map((pid) => [pid, cpuMicros(pid)]))
}
function cpuSince (before: ReadonlyMap<number, number>, after: ReadonlyMap<number, number>): number {
  let used = 0
  for (const [pid, end] of after) {
    const start = before.get(pid) ?? 0 // a process started during the run: all of its time
    if (Number.isFinite(end) && Number.isFinite(start)) used += end - start
  }
  return used
}

/**
 * Counts the 2xx answers whose body was not the expected one. autocannon counts a non-2xx answer
 * as a mismatch too (its body is not the expected one), which non2xx counts already: a failed
 * call was counted twice. Fed autocannon's 'response' and then 'reqMismatch' for each answer
 * (it emits both at once, in that order, with pipelining 1).
 */
export function mismatchCounter (): { response: (status: number) => void, mismatch: () => void, readonly count: number } {
  let last = 0
  let count = 0
  return {
    response (status) { last = status },
    mismatch () { if (last >= 200 && last < 300) count++ },
    get count () { return count }
  }
}

/**
 * One autocannon run; response times are also collected at full resolution for p50FineMs and
 * p99FineMs. With `expectBody`, a 2xx answer with another body counts as a mismatch.
 */
export async function measure (target: Target, scenario: Scenario, seconds: number, connections: number, expectBody?: string, watch?: () => readonly number[]): Promise<RunFigures> {
  const req = requestFor(target, scenario)
  const times: number[] = []
  const targetCpu = target.pid === undefined ? Number.NaN : cpuMicros(target.pid)
  const watching = watch === undefined ? null : { pids: watch, before: cpuOf(watch()) }
  const cpu = process.cpuUsage()
  const mismatches = mismatchCounter()
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const instance = autocannon({
      url: req.url,
      method: req.method,
      headers: req.headers,
      ...(req.body === undefined ? {} : { body: req.body }),
      ...(expectBody === undefined ? {} : { expectBody }),
      connections,
      pipelining: 1,
      duration: seconds
    }, (err: unknown, res: autocannon.Result) => { if (err === null || err === undefined) resolve(res); else reject(err) })
    instance.on('response', (_client, statusCode, _bytes, responseTime) => {
      mismatches.response(statusCode)
      if (statusCode >= 200 && statusCode < 300) times.push(responseTime)
    })
    // Emitted by autocannon (lib/run.js), not in its types.
    const events = instance as unknown as EventEmitter
    events.on('reqMismatch', () => { mismatches.mismatch() })
  })
  const used = process.cpuUsage(cpu)
  const targetUsed = target.pid === undefined ? Number.NaN : cpuMicros(target.pid) - targetCpu
  const watched = watching === null ? null : cpuSince(watching.before, cpuOf(watching.pids()))
  const answered = result.requests.total
  times.sort((a, b) => a - b)
  return {
    reqPerSec: result.requests.average,
    p50Ms: result.latency.p50,
    p99Ms: result.latency.p99,
    p50FineMs: nearestRank(times, 0.5),
    p99FineMs: nearestRank(times, 0.99),
    requests: result.requests.total,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    mismatches: mismatches.count,
    generatorCpuPct: (used.user + used.system) / 10 / (seconds * 1000),
    rssKiB: target.pid === undefined ? null : rssKiB(target.pid),
    cpuUsPerRequest: target.pid === undefined || answered === 0 ? null : targetUsed / answered,
    watchedCpuUsPerRequest: watched === null || answered === 0 ? null : watched / answered
  }
}

/** A target's REST rounds, summed up as the sections' tables show them. */
export interface RoundsRow {
  name: string
  description: string
  rounds: RunFigures[]
  /** Medians of the rounds. */
  reqPerSec: number
  p50Ms: number
  p99Ms: number
  /** A call got another answer than expected, or failed: the row is no result. */
  flagged: boolean
}

/** The row of a target's rounds: the medians, and flagged when a call failed. */
export function roundsRow (name: string, description: string, rounds: RunFigures[]): RoundsRow {
  return {
    name,
    description,
    rounds,
    reqPerSec: median(rounds.map((r) => r.reqPerSec)),
    p50Ms: median(rounds.map((r) => r.p50FineMs)),
    p99Ms: median(rounds.map((r) => r.p99FineMs)),
    flagged: rounds.some((r) => r.non2xx + r.errors > 0)
  }
}

/** The median CPU time per request of a target's runs (µs; NaN when none was read). */
export function medianCpu (runs: readonly RunFigures[], pick: (r: RunFigures) => number | null = (r) => r.cpuUsPerRequest): number {
  return median(runs.map(pick).filter((v): v is number => v !== null && Number.isFinite(v)))
}

/** The largest RSS read after a set of runs, in MiB (null when none was read). */
export function peakRssMiB (kib: ReadonlyArray<number | null>): number | null {
  const read = kib.filter((k): k is number => k !== null && !Number.isNaN(k))
  return read.length === 0 ? null : Math.max(...read) / 1024
}

export interface RoundsOptions {
  rounds: number
  duration: number
  connections: number
  /** Pause between two measurements, so that one run's tail does not load the next (ms). */
  pauseMs: number
  /** The prefix of each progress line on stderr (the section). */
  label: string
  /** Other processes whose CPU time each run reports (watchedCpuUsPerRequest): e.g. PostgreSQL's, pidsOf('postgres'). */
  watch?: () => readonly number[]
  /** One measurement of a target, when it is more than the scenario alone (the firewall's, with large prompts alongside). */
  run?: (target: Target) => Promise<RunFigures>
}

/**
 * Measures every target `rounds` times, interleaved: each round runs every target once, and
 * the first target rotates from round to round, so that slow drift of the shared machine is
 * spread over every target rather than charged to one. Returns each target's figures by name,
 * in round order; prints one progress line per measurement.
 */
export async function measureRounds (targets: readonly Target[], scenario: Scenario, opts: RoundsOptions): Promise<Map<string, RunFigures[]>> {
  const perTarget = new Map<string, RunFigures[]>(targets.map((t) => [t.name, []]))
  const width = Math.max(...targets.map((t) => t.name.length))
  for (let round = 0; round < opts.rounds; round++) {
    const order = targets.map((_, i) => targets[(i + round) % targets.length])
    for (const target of order) {
      // `--perf`: the named target is sampled during its first round, from 1 s in to 1 s before the end.
      const sampled = round === 0 && target.name === profiledTarget() && target.pid !== undefined && opts.duration > 2
        ? new Promise<string>((resolve, reject) => { setTimeout(() => { recordPerf(target.pid!, opts.duration - 2).then(resolve, reject) }, 1000) })
        : null
      const f = opts.run === undefined ? await measure(target, scenario, opts.duration, opts.connections, undefined, opts.watch) : await opts.run(target)
      if (sampled !== null) {
        try {
          f.perf = breakdown(await sampled, [BUILD_DIR + '/', REPO_ROOT])
          process.stderr.write(formatBreakdown(target.name, f.perf))
        } catch (err) {
          process.stderr.write(`perf: ${target.name} not sampled: ${(err as Error).message}\n`)
        }
      }
      perTarget.get(target.name)!.push(f)
      process.stderr.write(`${opts.label} round ${round + 1}/${opts.rounds}  ${target.name.padEnd(width)} ${f.reqPerSec.toFixed(0).padStart(7)} req/s  p50 ${f.p50FineMs.toFixed(2)} ms  p99 ${f.p99FineMs.toFixed(2)} ms` +
        (f.cpuUsPerRequest === null ? '' : `  CPU ${f.cpuUsPerRequest.toFixed(1)} µs/req`) +
        (f.watchedCpuUsPerRequest === null ? '' : ` (+${f.watchedCpuUsPerRequest.toFixed(1)} watched)`) +
        (f.non2xx + f.errors > 0 ? `  (${f.non2xx} non-2xx, ${f.errors} errors)` : '') + '\n')
      await sleep(opts.pauseMs)
    }
  }
  return perTarget
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))
export const fmt = (n: number | null, digits: number): string => n === null || Number.isNaN(n) ? '-' : n.toFixed(digits)
export const signed = (n: number | null, digits: number): string => n === null || Number.isNaN(n) ? '-' : (n >= 0 ? '+' : '') + n.toFixed(digits)

/** A plain-text table: the first and last columns left-aligned, the others right-aligned. */
export function textTable (header: readonly string[], body: ReadonlyArray<readonly string[]>): string {
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i].length)))
  const line = (cells: readonly string[]): string => cells.map((c, i) => i === 0 || i === cells.length - 1 ? c.padEnd(widths[i]) : c.padStart(widths[i])).join('  ').trimEnd()
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...body.map(line)].join('\n')
}

/** The spine section's goal: gateway-spine against passthrough, measured in the same rounds. */
export const SPINE_GOAL = { minRatioToPassthrough: 0.8, maxP99OverPassthroughMs: 1.5 } as const

/** What the spine goal reads of a target's figures. */
export interface SpineGoalRow { reqPerSec: number, p99FineMs: number, flagged: boolean }

/** The spine goal, from the rows of gateway-spine and passthrough (p99s at full resolution). */
export function spineGoal (spine: SpineGoalRow | undefined, pass: SpineGoalRow | undefined): { evaluated: boolean, met: boolean, text: string } {
  if (spine === undefined || pass === undefined) return { evaluated: false, met: false, text: 'spine goal not evaluated: needs both gateway-spine and passthrough' }
  const ratio = spine.reqPerSec / pass.reqPerSec
  // At full resolution: autocannon's p99 is cut to whole ms, and a difference of two such values
  // (always whole) met "+1.5 ms" for a true 1.96 ms and missed it for a true 1.01 ms.
  const diff = spine.p99FineMs - pass.p99FineMs
  const throughputOk = ratio >= SPINE_GOAL.minRatioToPassthrough
  const latencyOk = diff <= SPINE_GOAL.maxP99OverPassthroughMs
  const clean = !spine.flagged && !pass.flagged
  const met = throughputOk && latencyOk && clean
  return {
    evaluated: true,
    met,
    text: `spine goal (req/s >= ${SPINE_GOAL.minRatioToPassthrough * 100}% of passthrough, p99 <= passthrough + ${SPINE_GOAL.maxP99OverPassthroughMs} ms): ` +
      `${met ? 'goal met' : 'goal NOT met'} — req/s ${(ratio * 100).toFixed(1)}% ${throughputOk ? 'ok' : 'too low'}, ` +
      `p99 ${signed(diff, 2)} ms ${latencyOk ? 'ok' : 'too high'}${clean ? '' : ', flagged targets (non-2xx or errors)'}`
  }
}

/** One target's warm-up: the calls it made and how many failed (non-2xx, errors, other bodies). */
export interface WarmupRun { name: string, calls: number, failed: number }

/** A section's warm-up calls that failed, by target; null when none did. */
export interface WarmupFailures { calls: number, failed: number, byTarget: Record<string, number>, text: string }

/** An autocannon warm-up as a WarmupRun: every response and every error is a call. */
export function httpWarmup (name: string, f: RunFigures): WarmupRun {
  const calls = f.requests + f.errors
  return { name, calls, failed: Math.min(calls, f.non2xx + f.errors + f.mismatches) }
}

/**
 * The warm-ups' failed calls, or null when none failed. The measurement rounds flag their own
 * failures; a warm-up's are only reported ("warm-up: N of M calls failed"), never a failed run:
 * they tell of a target set up wrong (every call a 401, say) before its rounds show it.
 */
export function warmupFailures (runs: readonly WarmupRun[]): WarmupFailures | null {
  const failed = runs.reduce((n, r) => n + r.failed, 0)
  if (failed === 0) return null
  const calls = runs.reduce((n, r) => n + r.calls, 0)
  const byTarget: Record<string, number> = {}
  for (const r of runs) if (r.failed > 0) byTarget[r.name] = (byTarget[r.name] ?? 0) + r.failed
  const names = Object.entries(byTarget).map(([name, n]) => `${name} ${n}`).join(', ')
  return { calls, failed, byTarget, text: `warm-up: ${failed} of ${calls} calls failed (${names})` }
}
