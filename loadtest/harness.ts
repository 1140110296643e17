// Reusable pieces of the load-test harness: statistics, free ports, target processes, worker
// processes (load generators that are not autocannon), the shapes of scenarios and targets,
// and the gateway configurations every section measures.
import { nginxPresent } from './nginx-proxy.js'
import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import { join } from 'node:path'
import { tmpdir } from 'node:os'
import { createServer } from 'node:net'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { parse, stringify } from 'yaml'
import { mintToken } from '../plugins/auth/index.js'
import { PERF_NODE_FLAGS, removePerfMap } from './perf-profile.js'

/** The repository root: children run from it so their relative imports and manifest resolve. */
export const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url))

export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE'

/** One request shape, as a client of the gateway sends it. */
export interface Scenario {
  name: string
  method: HttpMethod
  /** The gateway path (e.g. /api/v1/agents/a1); a target may rewrite it (the Kernel's /v1/...). */
  path: string
  headers?: Record<string, string>
  body?: unknown
}

/** Something to measure: a running process with a URL, and how a scenario is addressed to it. */
export interface Target {
  name: string
  url: string
  /** Headers every request carries (tenant, bearer token). */
  headers: Record<string, string>
  /** Maps a scenario's gateway path to this target's path. Default: unchanged. */
  rewritePath?: (path: string) => string
  /** The process serving it, when the harness started one: its RSS is read after each run. */
  pid?: number
}

/** The gateway serves the Kernel's /v1/... under /api/v1/...: the direct target drops the prefix. */
export const toKernelPath = (path: string): string => path.startsWith('/api/') ? path.slice(4) : path

/** The request a scenario becomes on one target. */
export function requestFor (target: Target, scenario: Scenario): { url: string, method: HttpMethod, headers: Record<string, string>, body?: string } {
  const headers: Record<string, string> = { ...target.headers, ...scenario.headers }
  const out: { url: string, method: HttpMethod, headers: Record<string, string>, body?: string } = {
    url: target.url + (target.rewritePath ?? ((p: string) => p))(scenario.path),
    method: scenario.method,
    headers
  }
  if (scenario.body !== undefined) {
    out.body = JSON.stringify(scenario.body)
    headers['content-type'] = 'application/json'
  }
  return out
}

/** The median (mean of the two middle values for an even count); NaN for no values. */
export function median (values: readonly number[]): number {
  if (values.length === 0) return Number.NaN
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

/**
 * A port nothing listens on right now. The OS picks it (port 0), we release it and hand the
 * number to a child: the processes we start do not report the port they got, so we choose it.
 * The small window in which another process could take it is acceptable for a benchmark.
 */
export function freePort (host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.once('error', reject)
    server.listen(0, host, () => {
      const address = server.address()
      const port = typeof address === 'object' && address !== null ? address.port : 0
      server.close((err) => { if (err === undefined) resolve(port); else reject(err) })
    })
  })
}

export interface ProcessOptions {
  name: string
  /** A TypeScript entry point, relative to the repository root. */
  script: string
  env: Record<string, string>
  /** Polled with GET until it answers 2xx. */
  readyUrl: string
  readyHeaders?: Record<string, string>
  readyTimeoutMs?: number
}

export interface RunningProcess {
  name: string
  pid: number
  stop: () => Promise<void>
  /** The last few KB of its stdout and stderr (a started process's: what it said before it died). */
  tail?: () => string
}

/** The target `--perf` names: it runs with PERF_NODE_FLAGS, and measureRounds samples it. */
let perfTarget: string | null = null
export function profileWithPerf (target: string | null): void { perfTarget = target }
export const profiledTarget = (): string | null => perfTarget

// Inherited settings that would silently change what a child measures (a developer's shell
// may export BFF_AUTH_ENABLED=false, say): every configuration is set explicitly instead.
const CONTROLLED_ENV = /^(BFF_|KERNEL_|PORT$|HOST$|LOG_LEVEL$|NODE_ENV$|NODE_OPTIONS$)/

const children = new Set<ChildProcess>()
const TAIL_CHARS = 4000
// A worker's whole stdout is its report; anything beyond this is not a report.
const MAX_STDOUT_CHARS = 4 * 1024 * 1024

interface SpawnedChild {
  child: ChildProcess
  /** The last TAIL_CHARS of stdout and stderr together, to explain a failure. */
  tail: () => string
  /** All of stdout (up to MAX_STDOUT_CHARS). */
  stdout: () => string
  exited: Promise<void>
  spawnFailure: { error: Error | null }
  stop: () => Promise<void>
}

export const BUILD_DIR = join(REPO_ROOT, '.bench-build')
/** Whether prepareBuild compiled the targets: else they run from their sources through tsx. */
let built = false

/**
 * Compiles the gateway, the demo Kernel and the harness's own targets (tsconfig.bench.json) into
 * .bench-build/, with the assets a build carries (scripts/copy-assets.mjs, as `npm run build`
 * does for dist/): from then on startProcess runs targets from there, as they are deployed. Run
 * through tsx, a cache hit cost 13% more CPU than the build (67.9 against 59.2 µs a call, 5
 * interleaved rounds) and the bare pass-through 10% more. Workers (load generators,
 * micro-benchmarks) still run through tsx.
 */
export async function prepareBuild (): Promise<void> {
  await rm(BUILD_DIR, { recursive: true, force: true })
  execFileSync(process.execPath, [join(REPO_ROOT, 'node_modules/typescript/bin/tsc'), '-p', join(REPO_ROOT, 'tsconfig.bench.json'), '--outDir', BUILD_DIR], { cwd: REPO_ROOT, stdio: 'inherit' })
  execFileSync(process.execPath, [join(REPO_ROOT, 'scripts/copy-assets.mjs'), BUILD_DIR], { cwd: REPO_ROOT, stdio: 'inherit' })
  built = true
}

// Plain JavaScript, so that it loads without tsx: a process's worker threads load it too (they
// inherit its --import), and on Node 20 a worker's second --import of a .ts file fails
// (ERR_UNKNOWN_FILE_EXTENSION: tsx's hooks are not yet in force there).
const GUARD = pathToFileURL(join(REPO_ROOT, 'loadtest/child-guard.mjs')).href

/** How a child runs `script` (a path from the repository root): compiled when prepared, else through tsx. */
function nodeArgs (script: string, compiled: boolean): string[] {
  if (!compiled || !built) return ['--import', 'tsx', '--import', GUARD, script]
  return ['--import', GUARD, join(BUILD_DIR, script.replace(/\.ts$/, '.js'))]
}

/**
 * `node --import tsx --import ./loadtest/child-guard.mjs <script>` from the repository root (or
 * its compiled form, see prepareBuild), registered for stopAll/killAllNow. Inherited settings
 * that change a configuration are dropped.
 */
function spawnChild (script: string, extraEnv: Record<string, string>, ipc: boolean, args: readonly string[] = [], nodeFlags: readonly string[] = [], compiled = false): SpawnedChild {
  const env: Record<string, string> = {}
  for (const [key, value] of Object.entries(process.env)) {
    if (value !== undefined && !CONTROLLED_ENV.test(key)) env[key] = value
  }
  Object.assign(env, extraEnv)
  // Through env(1) without NODE_OPTIONS: a test runner that instruments children (tap's
  // coverage) must not reach into a target, whose tsx-compiled sources would skew its report.
  const child = spawn('/usr/bin/env', ['-u', 'NODE_OPTIONS', '-u', 'NODE_V8_COVERAGE', process.execPath, ...nodeFlags, ...nodeArgs(script, compiled), ...args], {
    cwd: REPO_ROOT,
    env,
    // stdin is the guard's lifeline; stdout/stderr are kept to explain a failed start (and, for
    // a worker, stdout is its report); an IPC channel for the workers that are driven step by step.
    stdio: ipc ? ['pipe', 'pipe', 'pipe', 'ipc'] : ['pipe', 'pipe', 'pipe']
  })
  children.add(child)
  let tail = ''
  let out = ''
  child.stdout?.on('data', (chunk: Buffer) => {
    const text = chunk.toString('utf8')
    tail = (tail + text).slice(-TAIL_CHARS)
    if (out.length < MAX_STDOUT_CHARS) out += text
  })
  child.stderr?.on('data', (chunk: Buffer) => { tail = (tail + chunk.toString('utf8')).slice(-TAIL_CHARS) })
  // The child may die while we write to its stdin: that is reported by the exit, not as a crash.
  child.stdin?.on('error', () => {})
  // 'error' without 'exit' happens when the process could not be spawned at all.
  const spawnFailure: { error: Error | null } = { error: null }
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => {
      children.delete(child)
      resolve()
    })
    child.once('error', (err) => {
      spawnFailure.error = err
      children.delete(child)
      resolve()
    })
  })

  const stop = async (): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null || !children.has(child)) return
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000)
    await exited
    clearTimeout(timer)
  }
  return { child, tail: () => tail, stdout: () => out, exited, spawnFailure, stop }
}

/**
 * Starts `<script>` (compiled, after prepareBuild; else through tsx) as its own process (never in the harness process, whose
 * CPU time goes to the load generator) and waits until it answers. The child also loads
 * child-guard.mjs, which ends it when the harness disappears without cleaning up (SIGKILL).
 */
export async function startProcess (opts: ProcessOptions): Promise<RunningProcess> {
  const { child, tail, spawnFailure, stop } = spawnChild(opts.script, opts.env, false, [], opts.name === perfTarget ? PERF_NODE_FLAGS : [], true)
  try {
    await waitReady(opts, child, tail, spawnFailure)
  } catch (err) {
    await stop()
    throw err
  }
  if (child.pid === undefined) throw new Error(`${opts.name}: no pid`)
  const pid = child.pid
  // A profiled process leaves the map of its compiled code behind (/tmp/perf-<pid>.map).
  if (opts.name === perfTarget) return { name: opts.name, pid, stop: async () => { await stop(); await removePerfMap(pid) }, tail }
  return { name: opts.name, pid, stop, tail }
}

export interface WorkerOptions {
  name: string
  /** A TypeScript entry point, relative to the repository root. */
  script: string
  env: Record<string, string>
  args?: readonly string[]
  /** An IPC channel (child.send / process.send) for a worker driven step by step. */
  ipc?: boolean
}

export interface Worker extends RunningProcess {
  child: ChildProcess
  /** Resolves when the worker exits, with its exit code and whole stdout. */
  done: Promise<{ code: number | null, signal: NodeJS.Signals | null, stdout: string, tail: string }>
}

/**
 * A load generator in its own process (the WebSocket runners), so that the harness process does
 * not compete with it. No readiness poll: the worker reports on stdout or over IPC.
 */
export function startWorker (opts: WorkerOptions): Worker {
  const spawned = spawnChild(opts.script, opts.env, opts.ipc === true, opts.args ?? [])
  const { child } = spawned
  const done = spawned.exited.then(() => {
    if (spawned.spawnFailure.error !== null) throw new Error(`${opts.name}: could not start: ${spawned.spawnFailure.error.message}`)
    return { code: child.exitCode, signal: child.signalCode, stdout: spawned.stdout(), tail: spawned.tail() }
  })
  // Whoever awaits `done` sees a failure; an unobserved one must not crash the harness.
  done.catch(() => {})
  return { name: opts.name, pid: child.pid ?? -1, child, done, stop: spawned.stop }
}

/** Resident set size of a process in KiB (VmRSS of /proc/<pid>/status); NaN off Linux. */
export function rssKiB (pid: number): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8')
    const match = /^VmRSS:\s+(\d+)\s+kB/m.exec(status)
    return match === null ? Number.NaN : Number(match[1])
  } catch {
    return Number.NaN
  }
}

let clockTicks: number | null = null
/** Clock ticks per second of /proc's CPU times (getconf CLK_TCK; 100, the Linux ABI's, if that fails). */
function ticksPerSecond (): number {
  if (clockTicks === null) {
    try {
      clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100
    } catch {
      clockTicks = 100
    }
  }
  return clockTicks
}

/**
 * CPU time a process has used so far, user and system, in µs (utime + stime of
 * /proc/<pid>/stat); NaN off Linux or once the process is gone. At the clock's 10 ms
 * resolution, good for whole runs, not single calls.
 */
export function cpuMicros (pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // The command name, in parentheses, may hold spaces: the fields are counted after it.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) * 1e6 / ticksPerSecond()
  } catch {
    return Number.NaN
  }
}

/** The pids of the processes whose command is `comm` (every PostgreSQL backend: "postgres"); [] off Linux. */
export function pidsOf (comm: string): number[] {
  try {
    return readdirSync('/proc').filter((d) => /^\d+$/.test(d)).filter((d) => {
      try { return readFileSync(`/proc/${d}/comm`, 'utf8').trim() === comm } catch { return false }
    }).map(Number)
  } catch {
    return []
  }
}

async function waitReady (opts: ProcessOptions, child: ChildProcess, tail: () => string, spawnFailure: { error: Error | null }): Promise<void> {
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 30_000)
  let last = 'no answer yet'
  while (Date.now() < deadline) {
    if (spawnFailure.error !== null) throw new Error(`${opts.name}: could not start: ${spawnFailure.error.message}`)
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`${opts.name} exited (${child.exitCode ?? child.signalCode}) before it was ready:\n${tail()}`)
    }
    try {
      const res = await fetch(opts.readyUrl, { headers: opts.readyHeaders ?? {}, signal: AbortSignal.timeout(1000) })
      await res.body?.cancel()
      if (res.ok) return
      last = `answered ${res.status}`
    } catch (err) {
      last = (err as Error).message
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  throw new Error(`${opts.name} was not ready at ${opts.readyUrl} within ${opts.readyTimeoutMs ?? 30_000} ms (${last}):\n${tail()}`)
}

/** Stops every child still running (SIGTERM, then SIGKILL after 5 s). */
export async function stopAll (processes: readonly RunningProcess[]): Promise<void> {
  await Promise.allSettled(processes.map((p) => p.stop()))
  killAllNow()
}

/** Last resort, synchronous (usable in an 'exit' listener): SIGKILL whatever is left. */
export function killAllNow (): void {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  }
  children.clear()
}

/** Children started by this process and not yet exited. */
export const liveChildren = (): number => children.size

// --- targets -------------------------------------------------------------------------------

/** What every target definition may depend on: the Kernel's URL and the gateway's JWT secret. */
export interface TargetContext {
  kernelUrl: string
  secret: string
  /** A bearer token the gateway accepts (tenant bench). */
  token: string
}

export interface TargetDefinition {
  name: string
  description: string
  /** The process that serves it; null: the Kernel itself, which is started once for all targets. */
  process: null | {
    script: string
    env: (ctx: TargetContext, port: number) => Record<string, string>
    /** Polled (with the target's headers) until it answers 2xx. */
    readyPath: string
  }
  headers: (ctx: TargetContext) => Record<string, string>
  rewritePath?: (path: string) => string
  /** Measured only when `--only` names it (a comparison, not part of the default run). */
  onlyWhenNamed?: boolean
}

/** The tenant of every benchmark request (header for the Kernel and the pass-through, claim for the gateway). */
export const BENCH_TENANT = 'bench'

/** The demo manifest's operations, as a section changes them (demoManifestWith). */
export type DemoOperations = Record<string, Record<string, unknown> & { input: { properties: Record<string, Record<string, unknown>> } }>

/**
 * The demo manifest as `change` leaves it, in a temporary file (its path) for a section's
 * gateways (BFF_MANIFEST), removed when the bench exits: the gateways read it at start, and
 * watch it for as long as they run.
 */
export function demoManifestWith (name: string, change: (operations: DemoOperations) => void): string {
  const manifest = parse(readFileSync(join(REPO_ROOT, 'kernel/manifest.yaml'), 'utf8')) as { operations: DemoOperations }
  change(manifest.operations)
  const dir = mkdtempSync(join(tmpdir(), 'mantle-bench-'))
  process.once('exit', () => { rmSync(dir, { recursive: true, force: true }) })
  const file = join(dir, name)
  writeFileSync(file, stringify(manifest))
  return file
}

/** The concerns of the spine; each gateway target sets every one of them, on or off. */
const SPINE_FLAGS = ['BFF_AUTH_ENABLED', 'BFF_METRICS_ENABLED', 'BFF_OPENAPI_ENABLED', 'BFF_CIRCUIT_BREAKER_ENABLED'] as const
/** The faces besides REST (REST is always on). They default to on: the targets set them explicitly. */
const FACE_FLAGS = ['BFF_TRPC_ENABLED', 'BFF_GRAPHQL_ENABLED', 'BFF_WEBSOCKET_ENABLED'] as const
/** The operations concerns (issue 7): on in gateway-spine as deployed, off in gateway-off. */
const OPS_FLAGS = ['BFF_DIAGZ_ENABLED', 'BFF_COMPRESSION_ENABLED', 'BFF_LOAD_SHEDDING_ENABLED'] as const
export const GATEWAY_FLAGS = [...SPINE_FLAGS, ...FACE_FLAGS, ...OPS_FLAGS] as const
/** The concerns beyond the spine, off in every target unless it turns one on. */
export const CONCERN_FLAGS = ['BFF_RATE_LIMIT_ENABLED', 'BFF_AI_FIREWALL_ENABLED', 'BFF_CACHE_ENABLED', 'BFF_IDEMPOTENCY_ENABLED', 'BFF_AUDIT_ENABLED'] as const
type GatewayFlag = typeof GATEWAY_FLAGS[number]

export function gatewayEnv (on: readonly GatewayFlag[], extra: (ctx: TargetContext) => Record<string, string> = () => ({})): TargetDefinition['process'] {
  return {
    script: 'server.ts',
    env: (ctx, port) => {
      const env: Record<string, string> = {
        PORT: String(port),
        HOST: '127.0.0.1',
        KERNEL_URL: ctx.kernelUrl,
        LOG_LEVEL: 'warn',
        // Measured as deployed; production also insists on a secret of 32 bytes or more.
        NODE_ENV: 'production',
        BFF_JWT_SECRET: ctx.secret,
      }
      // Concerns beyond the spine default to on in the gateway: off here unless a target's
      // `extra` turns them on, so that each target measures exactly what its name says.
      for (const flag of CONCERN_FLAGS) env[flag] = 'false'
      for (const flag of GATEWAY_FLAGS) env[flag] = String(on.includes(flag))
      // Off in production by default: the faces section reads getAgent's argument type by
      // introspection (a validation rule less, run once per document: mercurius caches it).
      if (on.includes('BFF_GRAPHQL_ENABLED')) env.BFF_GRAPHQL_INTROSPECTION = 'true'
      return { ...env, ...extra(ctx) }
    },
    readyPath: '/healthz'
  }
}

/**
 * The gateway as deployed: auth, metrics, OpenAPI and the circuit breaker on, and every face
 * (tRPC, GraphQL, WebSocket) served by the same process. The spine section measures its REST
 * face; the faces section measures all four faces of this one process.
 */
export const GATEWAY_SPINE: TargetDefinition = {
  name: 'gateway-spine',
  description: 'Mantle, auth + metrics + OpenAPI + circuit breaker on, every face on, diagz, compression, load shedding on',
  process: gatewayEnv(GATEWAY_FLAGS),
  // As a browser asks: the answer (under 1 KB) is not compressed, but the negotiation runs.
  headers: (ctx) => ({ authorization: `Bearer ${ctx.token}`, 'accept-encoding': 'gzip, deflate, br' })
}

/** gateway-spine without some operations concerns: what they cost (only with `--only`). */
function spineWithout (name: string, off: ReadonlyArray<typeof OPS_FLAGS[number]>): TargetDefinition {
  return { ...GATEWAY_SPINE, name, description: `as gateway-spine, ${off.join(', ')} false`, process: gatewayEnv(GATEWAY_FLAGS.filter(f => !(off as readonly string[]).includes(f))), onlyWhenNamed: true }
}

/**
 * gateway-spine plus the response cache on Redis (REDIS_URL, default the local one): getAgent
 * is a cached query, so after the first request every answer is a hit of the in-process tier.
 */
export function gatewayCache (redisUrl: string): TargetDefinition {
  return {
    name: 'gateway-cache',
    description: 'Mantle, as gateway-spine, with the response cache on (store redis)',
    process: gatewayEnv(GATEWAY_FLAGS, () => ({ BFF_CACHE_ENABLED: 'true', BFF_CACHE_STORE: 'redis', REDIS_URL: redisUrl })),
    // Asked as gateway-spine is: the compression negotiation runs on a hit too.
    headers: GATEWAY_SPINE.headers
  }
}

/**
 * The gateway of the WebSocket scale run: the same configuration, plus BFF_INTERNAL_TOKEN so
 * that the harness may publish events with POST /internal/events. Every connection of the run
 * is one tenant's, so that tenant may hold the instance's whole bound of subscriptions and of
 * /ws connections (the default shares, 10,000 each, would refuse a run of more connections).
 */
export function gatewayScale (internalToken: string): TargetDefinition {
  return {
    name: 'gateway-scale',
    description: 'Mantle, as gateway-spine, with BFF_INTERNAL_TOKEN set and one tenant allowed every subscription and connection',
    process: gatewayEnv(GATEWAY_FLAGS, () => ({ BFF_INTERNAL_TOKEN: internalToken, BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT: '100000', BFF_WS_MAX_CONNECTIONS_PER_TENANT: '100000' })),
    headers: () => ({})
  }
}

/**
 * The REST targets, from the floor up: the Kernel alone, the least any Fastify gateway does
 * (pass-through), the gateway with every concern off, and the gateway's spine (identity,
 * validation, metrics, resilience; OpenAPI is on too since it costs nothing per request).
 */
export const REST_TARGETS: readonly TargetDefinition[] = [
  {
    name: 'kernel-direct',
    description: 'the demo Kernel, no gateway',
    process: null,
    headers: () => ({ 'x-tenant-id': BENCH_TENANT }),
    rewritePath: toKernelPath
  },
  // Debian's nginx as a reverse proxy, when it is installed.
  ...(nginxPresent()
    ? [{
        name: 'nginx',
        description: 'nginx reverse proxy (one worker, keep-alive upstream) to the Kernel',
        process: {
          script: 'loadtest/nginx-proxy.ts',
          env: (ctx: TargetContext, port: number) => ({ PORT: String(port), HOST: '127.0.0.1', KERNEL_URL: ctx.kernelUrl }),
          readyPath: '/api/v1/agents/a1'
        },
        headers: () => ({ 'x-tenant-id': BENCH_TENANT })
      }]
    : []),
  {
    name: 'passthrough',
    description: 'bare Fastify 5 + undici.Pool forwarding to the Kernel',
    process: {
      script: 'loadtest/passthrough.ts',
      env: (ctx, port) => ({ PORT: String(port), HOST: '127.0.0.1', KERNEL_URL: ctx.kernelUrl }),
      readyPath: '/api/v1/agents/a1'
    },
    headers: () => ({ 'x-tenant-id': BENCH_TENANT })
  },
  {
    name: 'gateway-off',
    description: 'Mantle, every BFF_*_ENABLED false (faces too: REST only)',
    process: gatewayEnv([]),
    // Identity off: the gateway calls the Kernel as the public tenant whatever the client says.
    headers: () => ({})
  },
  GATEWAY_SPINE,
  spineWithout('spine-no-compression', ['BFF_COMPRESSION_ENABLED']),
  spineWithout('spine-no-diagz', ['BFF_DIAGZ_ENABLED']),
  spineWithout('spine-no-ops', OPS_FLAGS)
]

/** A bearer token for the benchmark tenant; roles cover every demo REST scenario. */
export function benchToken (secret: string, ttlSeconds: number): string {
  return mintToken(secret, { tenant: BENCH_TENANT, user: 'bench', roles: ['viewer', 'operator'], zone: 'public', ttlSeconds })
}

/** The tenant of the WebSocket scale run. */
export const SCALE_TENANT = 'scale'

/** One token for every connection of the scale run: tenant scale, role viewer (runUpdated). */
export function scaleToken (secret: string, ttlSeconds: number): string {
  return mintToken(secret, { tenant: SCALE_TENANT, user: 'scale', roles: ['viewer'], zone: 'public', ttlSeconds })
}

/** Starts the demo Kernel in its own process on a free port. */
export async function startKernelProcess (): Promise<{ url: string, process: RunningProcess }> {
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const proc = await startProcess({
    name: 'kernel',
    script: 'kernel/server.ts',
    env: { KERNEL_PORT: String(port), KERNEL_HOST: '127.0.0.1' },
    readyUrl: url + '/v1/health'
  })
  return { url, process: proc }
}

/**
 * Starts the given targets, each in its own process and one after the other so that start-up
 * work does not compete. Every process is pushed onto `started` as soon as it is ready, so
 * that the caller can stop them all even when a later one fails to start.
 */
export async function startTargets (defs: readonly TargetDefinition[], ctx: TargetContext, started: RunningProcess[]): Promise<Target[]> {
  const targets: Target[] = []
  for (const def of defs) {
    const headers = def.headers(ctx)
    let url = ctx.kernelUrl
    let pid: number | undefined
    if (def.process !== null) {
      const port = await freePort()
      url = `http://127.0.0.1:${port}`
      const running = await startProcess({
        name: def.name,
        script: def.process.script,
        env: def.process.env(ctx, port),
        readyUrl: url + def.process.readyPath,
        readyHeaders: headers
      })
      started.push(running)
      pid = running.pid
    }
    targets.push({ name: def.name, url, headers, ...(def.rewritePath === undefined ? {} : { rewritePath: def.rewritePath }), ...(pid === undefined ? {} : { pid }) })
  }
  return targets
}
