// The rate-limit section of `npm run bench` (only when asked for: it needs Redis):
// - the store's check itself, in the harness process against the real Redis (REDIS_URL, else
//   redis://127.0.0.1:6379): one check at a time and 50 in flight, with a plain PING as the
//   round-trip floor and the memory store beside it;
// - REST getAgent through gateways that differ only in getAgent's limit: none, a limit counted
//   in memory, in Redis, and in Redis with the HTTP guard too (two Redis checks per request),
//   in interleaved rounds (medians), as ratios to the gateway without a limit.
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { demoManifestWith, gatewayEnv, GATEWAY_FLAGS, startTargets, type RunningProcess, type Target, type TargetContext, type TargetDefinition } from './harness.js'
import { fmt, httpWarmup, measure, measureRounds, roundsRow, signed, textTable, warmupFailures, type RoundsRow, type WarmupFailures, type WarmupRun } from './measure.js'
import { nearestRank } from './histogram.js'
import { getAgent } from './scenarios.js'
import { MemoryWindowStore, RedisWindowStore } from '../plugins/rate-limit/index.js'

export interface RateLimitBenchOptions {
  duration: number
  rounds: number
  connections: number
  warmupSeconds: number
  pauseMs: number
  /** Checks per micro-benchmark measurement. */
  checks: number
}

export interface CheckFigures { name: string, inFlight: number, checks: number, perSec: number, p50Us: number, p99Us: number, meanUs: number }
export interface RestRow extends RoundsRow {
  ratioToNoLimit: number | null
  p99DiffToNoLimitMs: number | null
}
export interface RateLimitReport {
  redisUrl: string
  checks: CheckFigures[]
  rest: RestRow[]
  goal: { maxRedisCheckP99Ms: number, redisCheckP99Ms: number, met: boolean, text: string }
  /** The REST warm-ups' failed calls (null: none failed); reported, not flagged: the rounds flag their own. */
  warmupFailures: WarmupFailures | null
}

const GOAL_P99_MS = 1
// Never reached during a run: the section measures the cost of counting, not refusals.
const HUGE = 1_000_000_000

function figures (name: string, inFlight: number, micros: number[], seconds: number): CheckFigures {
  micros.sort((a, b) => a - b)
  return { name, inFlight, checks: micros.length, perSec: micros.length / seconds, p50Us: nearestRank(micros, 0.5), p99Us: nearestRank(micros, 0.99), meanUs: micros.reduce((a, b) => a + b, 0) / micros.length }
}

/** `n` calls of `call`, `inFlight` at a time, each timed from its start to its answer. */
async function timed (name: string, n: number, inFlight: number, call: () => Promise<unknown> | unknown): Promise<CheckFigures> {
  const micros: number[] = []
  const started = performance.now()
  let left = n
  const worker = async (): Promise<void> => {
    while (left-- > 0) {
      const t0 = performance.now()
      await call()
      micros.push((performance.now() - t0) * 1000)
    }
  }
  await Promise.all(Array.from({ length: inFlight }, worker))
  return figures(name, inFlight, micros, (performance.now() - started) / 1000)
}

async function microBench (redisUrl: string, n: number): Promise<CheckFigures[]> {
  const client = new Redis(redisUrl, { lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 0, commandTimeout: 500 })
  await client.connect()
  const key = `bff:ratelimit:bench-${randomUUID()}:bench:getAgent`
  try {
    const redis = new RedisWindowStore(client)
    const memory = new MemoryWindowStore()
    // Warm-up: loads the script (the first EVALSHA meets NOSCRIPT and falls back to EVAL) and the JIT.
    for (let i = 0; i < 2000; i++) await redis.check(key, 60_000, HUGE)
    await timed('warm-up', 2000, 1, () => client.ping())
    return [
      await timed('Redis PING (round-trip floor)', n, 1, () => client.ping()),
      await timed('Redis rate-limit check (Lua)', n, 1, () => redis.check(key, 60_000, HUGE)),
      await timed('Redis PING (round-trip floor)', n, 50, () => client.ping()),
      await timed('Redis rate-limit check (Lua)', n, 50, () => redis.check(key, 60_000, HUGE)),
      await timed('memory rate-limit check', n, 1, () => memory.check(key, 60_000, HUGE))
    ]
  } finally {
    await client.del(key)
    client.disconnect()
  }
}

/** The demo manifest with a limit on getAgent that the run never reaches, in a temporary file. */
function limitedManifest (): string {
  return demoManifestWith('manifest-rate-limited.yaml', operations => { operations.getAgent.rateLimit = { max: HUGE, windowMs: 60_000 } })
}

function targets (redisUrl: string, manifest: string): TargetDefinition[] {
  const headers = (ctx: TargetContext): Record<string, string> => ({ authorization: `Bearer ${ctx.token}` })
  const gateway = (name: string, description: string, env: Record<string, string>): TargetDefinition =>
    ({ name, description, process: gatewayEnv(GATEWAY_FLAGS, () => ({ REDIS_URL: redisUrl, BFF_RATE_LIMIT_ENABLED: 'true', ...env })), headers })
  return [
    gateway('no-limit', 'gateway-spine with Redis, getAgent without a limit', { BFF_RATE_LIMIT_STORE: 'redis' }),
    gateway('op-limit-memory', 'getAgent limited, counted in memory', { BFF_MANIFEST: manifest, BFF_RATE_LIMIT_STORE: 'memory' }),
    gateway('op-limit-redis', 'getAgent limited, counted in Redis', { BFF_MANIFEST: manifest, BFF_RATE_LIMIT_STORE: 'redis' }),
    gateway('op+guard-redis', 'getAgent limited and the HTTP guard, both in Redis', { BFF_MANIFEST: manifest, BFF_RATE_LIMIT_STORE: 'redis', BFF_RATE_LIMIT_GLOBAL_MAX: String(HUGE) })
  ]
}

export async function runRateLimit (opts: RateLimitBenchOptions, ctx: TargetContext, processes: RunningProcess[]): Promise<RateLimitReport> {
  const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
  process.stderr.write(`rate-limit: ${opts.checks} checks per measurement against ${redisUrl}\n`)
  const checks = await microBench(redisUrl, opts.checks)

  const defs = targets(redisUrl, limitedManifest())
  const running: Target[] = await startTargets(defs, ctx, processes)
  const warm: WarmupRun[] = []
  for (const target of running) warm.push(httpWarmup(target.name, await measure(target, getAgent, opts.warmupSeconds, opts.connections)))
  const warmupFailed = warmupFailures(warm)
  const perTarget = await measureRounds(running, getAgent, { rounds: opts.rounds, duration: opts.duration, connections: opts.connections, pauseMs: opts.pauseMs, label: 'rate-limit' })
  const rest: RestRow[] = defs.map((def) => {
    return {
      ...roundsRow(def.name, def.description, perTarget.get(def.name) ?? []),
      ratioToNoLimit: null,
      p99DiffToNoLimitMs: null
    }
  })
  const base = rest[0]
  for (const r of rest) {
    r.ratioToNoLimit = r.reqPerSec / base.reqPerSec
    r.p99DiffToNoLimitMs = r.p99Ms - base.p99Ms
  }

  const redisCheck = checks.find((c) => c.name.startsWith('Redis rate-limit') && c.inFlight === 1)!
  const p99Ms = redisCheck.p99Us / 1000
  const met = p99Ms < GOAL_P99_MS
  const goal = { maxRedisCheckP99Ms: GOAL_P99_MS, redisCheckP99Ms: p99Ms, met, text: `rate-limit goal (a Redis check's p99 under ${GOAL_P99_MS} ms on loopback): ${met ? 'goal met' : 'goal NOT met'} — p99 ${p99Ms.toFixed(3)} ms` }

  const checkTable = textTable(['store check', 'in flight', 'checks/s', 'p50 µs', 'p99 µs', 'mean µs'],
    checks.map((c) => [c.name, String(c.inFlight), fmt(c.perSec, 0), fmt(c.p50Us, 1), fmt(c.p99Us, 1), fmt(c.meanUs, 1)]))
  const restTable = textTable(['target', 'req/s', 'p50 ms', 'p99 ms', 'x no-limit', 'p99 vs no-limit ms', 'status'],
    rest.map((r) => [r.name, fmt(r.reqPerSec, 0), fmt(r.p50Ms, 2), fmt(r.p99Ms, 2), fmt(r.ratioToNoLimit, 2), signed(r.p99DiffToNoLimitMs, 2), r.flagged ? 'FLAGGED' : 'ok']))
  process.stdout.write(`\nMantle bench — rate limits (Redis ${redisUrl})\n` +
    `options  ${opts.checks} checks per store measurement; REST ${getAgent.method} ${getAgent.path}, duration ${opts.duration} s x ${opts.rounds} rounds (median), ${opts.connections} connections\n\n` +
    checkTable + '\n\n' + restTable + '\n' + (warmupFailed === null ? '' : warmupFailed.text + '\n') + '\n' + goal.text + '\n')
  return { redisUrl, checks, rest, goal, warmupFailures: warmupFailed }
}
