import closeWithGrace from 'close-with-grace'
import { pathToFileURL } from 'node:url'
import { resolve } from 'node:path'
import type { FastifyInstance } from 'fastify'
import { loadConfig, demoKernel, demoKernelRefusal, startWarnings, productionProblems, ConfigError, DEV_JWT_SECRET, type Config } from './schemas/config.js'
import { mintToken } from './plugins/auth/index.js'
import type { KernelEventMessage } from './plugins/events/index.js'
import { longestTimeoutMs, type Manifest } from './manifest.js'
import { noArguments } from './cli.js'

/** A shutdown's grace at the least (ms). */
const MIN_GRACE_MS = 10_000
/**
 * What a shutdown needs after the longest call: the answer of a WebSocket call that ended by its
 * timeout (1 s, ANSWER_MARGIN_MS) and its socket's close handshake (2 s, then it is cut), then
 * the onClose hooks one after another: the audit's 5 s at most (3 s for PostgreSQL, 1 s for the
 * spool's disk, 1 s for the store's and the spool's close), the trace export's 2.5 s, the
 * idempotency store's last offer to Redis (0.5 s), the Redis connections' quits (the shared
 * one's 0.5 s at most, whatever BFF_REDIS_COMMAND_TIMEOUT_MS says), and what is left to spare.
 * It was 5 s, the audit's alone: a shutdown whose audit took its whole bound was killed at its
 * grace (exit 1) before the trace export and the Redis quits had run; then 10 s, which left the
 * WebSocket faces' 3 s out.
 */
const GRACE_MARGIN_MS = 13_000

/**
 * How long a shutdown may take before the process exits anyway: the longest operation's
 * `timeoutMs`, so that every call in flight can finish, plus what closing takes; 10 s at least.
 * Before, a fixed 10 s cut calls whose operation allowed them longer (up to 600 s).
 */
export function shutdownGraceMs (manifest: Manifest): number {
  return Math.max(MIN_GRACE_MS, longestTimeoutMs(manifest) + GRACE_MARGIN_MS)
}

export interface Started {
  app: FastifyInstance
  url: string
  kernelUrl: string | null
  close: () => Promise<void>
}

/**
 * Starts the gateway as `npm start` and `node dist/server.js` do: with no KERNEL_URL and the
 * demo manifest, the demo Kernel starts alongside (the embedded default).
 */
export async function start (config: Readonly<Config>, options: { onFatal?: (err: Error) => void } = {}): Promise<Started> {
  let stopKernel: (() => Promise<void>) | null = null
  let kernelUrl: string | null = null
  // The demo Kernel publishes run changes straight into the gateway's event bus.
  let publish: ((event: KernelEventMessage) => void) | null = null
  if (demoKernel(config)) {
    // Named with every other reason production refuses, in one line.
    const refusal = demoKernelRefusal(config)
    if (refusal !== null) throw new ConfigError('Refusing to start in production: ' + [...productionProblems(config), refusal].join('; '))
    const { startKernel } = await import('./kernel/server.js')
    const kernel = await startKernel({ port: 0, host: '127.0.0.1', onEvent: event => publish?.(event) })
    kernelUrl = kernel.url
    stopKernel = kernel.close
  }
  let app: FastifyInstance | undefined
  try {
    // Loaded here, not with the module: a configuration refused at start-up is told in a
    // fraction of the time the whole gateway's modules take to load (about 1,100 of them).
    const { buildApp } = await import('./app.js')
    app = await buildApp(config, { ...(kernelUrl === null ? {} : { kernelUrl }), ...options })
    const events = app.events
    const log = app.log
    publish = (event) => { events.publish(event).catch(err => log.warn({ err }, 'event not published')) }
    await app.listen({ port: config.PORT, host: config.HOST })
  } catch (err) {
    // Its connections (Redis, PostgreSQL, timers) too: a failed listen kept the process alive.
    await app?.close().catch(() => {})
    await stopKernel?.()
    throw err
  }
  const address = app.server.address()
  const port = typeof address === 'object' && address !== null ? address.port : config.PORT
  const host = config.HOST === '0.0.0.0' || config.HOST === '::' ? '127.0.0.1' : config.HOST
  return {
    app,
    url: `http://${host.includes(':') ? `[${host}]` : host}:${port}`,
    kernelUrl,
    async close () {
      await app.close()
      await stopKernel?.()
    }
  }
}

/**
 * Who may read /diagz, as its route decides: the role `system`, or with identity off anyone
 * outside production and no one in it (the banner said "role system" whatever the setting).
 */
function diagzAccess (config: Readonly<Config>): string {
  if (config.BFF_AUTH_ENABLED) return 'role system'
  return config.NODE_ENV === 'production' ? 'closed: identity is off, nobody holds the role system' : 'open: identity is off'
}

/** The manifest's kernel.url, which the gateway calls without KERNEL_URL (it was printed as "from the manifest"). */
function manifestKernel (started: Started): string {
  // Optional: a Started made by hand (tests) may have no app.
  const app = started.app as FastifyInstance | undefined
  return app?.pipeline.manifest.kernel.url ?? 'from the manifest'
}

export function banner (started: Started, config: Readonly<Config>): string {
  const { url } = started
  const ws = 'ws' + url.slice('http'.length)
  const lines = [
    '',
    `Mantle is listening on ${url}`,
    `  REST        ${url}/api/v1/...`,
    ...(config.BFF_OPENAPI_ENABLED ? [`  OpenAPI     ${url}/openapi.json   docs: ${url}/docs`] : []),
    ...(config.BFF_TRPC_ENABLED ? [`  tRPC        ${url}/trpc/<procedure>   ${ws}/trpc`] : []),
    ...(config.BFF_GRAPHQL_ENABLED ? [`  GraphQL     ${url}/graphql   ${ws}/graphql${config.NODE_ENV === 'production' ? '' : `   IDE: ${url}/graphiql`}`] : []),
    ...(config.BFF_WEBSOCKET_ENABLED ? [`  WebSocket   ${ws}/ws`] : []),
    `  health      ${url}/healthz   ${url}/readyz`,
    ...(config.BFF_METRICS_ENABLED ? [`  metrics     ${url}/metrics`] : []),
    ...(config.BFF_DIAGZ_ENABLED ? [`  diagnostics ${url}/diagz   (${diagzAccess(config)})`] : []),
    `  Kernel      ${started.kernelUrl === null ? (config.KERNEL_URL ?? manifestKernel(started)) : started.kernelUrl + ' (demo Kernel)'}`
  ]
  // Only with the development secret (no key source at all): a token signed with a configured
  // secret, system role included, went to stdout and so into the logs of any run without
  // NODE_ENV=production (a staging run). `npm run token` mints one with any secret.
  const devSecret = config.BFF_JWT_SECRET === undefined && config.BFF_JWT_SECRETS === undefined && config.BFF_JWT_PUBLIC_KEYS === undefined && config.BFF_JWKS_URL === undefined
  if (config.BFF_AUTH_ENABLED && config.NODE_ENV !== 'production' && devSecret) {
    const token = mintToken(DEV_JWT_SECRET, {
      tenant: 'demo',
      user: 'dev',
      roles: ['viewer', 'editor', 'operator', 'admin', 'system'],
      zone: 'restricted',
      ttlSeconds: 24 * 3600,
      issuer: config.BFF_JWT_ISSUER,
      audience: config.BFF_JWT_AUDIENCE
    })
    lines.push('', 'Dev token (tenant demo, every demo role, 24 h):', token, '', `  curl -H "Authorization: Bearer $TOKEN" ${url}/api/v1/agents`)
  }
  return lines.join('\n') + '\n'
}

/**
 * Takes `signals` from now on, while the gateway starts, noting whether one came (`again` for
 * each one after the first); `release` stops taking them and says whether one did.
 */
function hold (signals: readonly NodeJS.Signals[], emitter: Pick<NodeJS.Process, 'on' | 'off'>, again: () => void = () => {}): { release: () => boolean } {
  let came = false
  const meanwhile = (): void => {
    if (came) again()
    came = true
  }
  for (const signal of signals) emitter.on(signal, meanwhile)
  return {
    release () {
      for (const signal of signals) emitter.off(signal, meanwhile)
      return came
    }
  }
}

/**
 * Takes SIGHUP from now on: its default action ends the process, and one sent while the gateway
 * starts (a ConfigMap's update, `kill -HUP 1` in every pod) ended it (exit 129). `serve` hands
 * SIGHUP to `reload` from then on, and calls it at once when one came meanwhile.
 */
export function holdHangups (): { serve: (reload: () => void) => void } {
  const held = hold(['SIGHUP'], process)
  return {
    serve (reload) {
      const came = held.release()
      process.on('SIGHUP', reload)
      if (came) reload()
    }
  }
}

/** The signals that shut the gateway down (close-with-grace's, but SIGHUP's and NOT_SHUTDOWN_SIGNALS). */
const SHUTDOWN_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGQUIT'] as const

/**
 * Takes the shutdown signals while the gateway starts, before close-with-grace listens: the
 * gateway is PID 1 in its container, and the kernel drops a signal PID 1 has no listener for, so
 * a SIGTERM sent while it started (a rollout superseded, a scale-down, a drain) was lost: the
 * gateway came up and served until the kubelet's SIGKILL at the end of the grace. `serve` stops
 * taking them (close-with-grace's listeners take over) and calls `close` at once when one came
 * meanwhile: the gateway shuts down as soon as it can. A second one exits at once.
 */
export function holdShutdowns (emitter: Pick<NodeJS.Process, 'on' | 'off'> = process, exit: () => void = () => process.exit(1)): { serve: (close: () => void) => void } {
  // A second one exits at once, as close-with-grace does once it listens: Ctrl-C twice.
  const held = hold(SHUTDOWN_SIGNALS, emitter, exit)
  return {
    serve (close) {
      if (held.release()) close()
    }
  }
}

/**
 * The signals close-with-grace would take as a shutdown that are none: SIGUSR2 is Node's
 * diagnostic signal (`--report-on-signal` and `--heapsnapshot-signal` by default), and SIGTRAP a
 * debugger's. A report or a heap snapshot taken of a running gateway shut it down. Each is
 * logged and ignored (with no listener at all, its default action would end the process at once).
 */
const NOT_SHUTDOWN_SIGNALS = ['SIGUSR2', 'SIGTRAP'] as const

/**
 * Ignores NOT_SHUTDOWN_SIGNALS from now on (from start-up: one sent meanwhile ended the process),
 * each told to `warn`; a `--report-on-signal` report or a heap snapshot is still written.
 */
function ignoreNonShutdownSignals (warn: (msg: string) => void): void {
  for (const signal of NOT_SHUTDOWN_SIGNALS) process.on(signal, () => { warn(`${signal} received: not a shutdown signal, ignored`) })
}

async function main (): Promise<void> {
  const hangups = holdHangups()
  const shutdowns = holdShutdowns()
  let warn = (msg: string): void => { process.stderr.write(`mantle: ${msg}\n`) }
  ignoreNonShutdownSignals(msg => { warn(msg) })
  let config: Readonly<Config>
  let started: Started
  // A condition start-up refuses, found once the gateway runs (app.fatal, which logged it): the
  // shutdown of a signal, then exit 1. One found before the shutdown is wired waits for it.
  let fatal: Error | null = null
  let shutDown: (() => void) | null = null
  const onFatal = (err: Error): void => {
    fatal = err
    shutDown?.()
  }
  try {
    config = loadConfig(process.env, { starting: true })
    started = await start(config, { onFatal })
  } catch (err) {
    process.stderr.write(`mantle: ${(err as Error).message}\n`)
    process.exit(1)
  }
  process.stdout.write(banner(started, config))
  for (const warning of startWarnings(config)) started.app.log.warn(warning)
  // The longest grace any manifest applied since start-up needed: calls still running on a chain
  // a reload replaced keep their own, longer deadline.
  let grace = shutdownGraceMs(started.app.pipeline.manifest)
  const reload = (): void => {
    started.app.reloadManifest().then(() => { grace = Math.max(grace, shutdownGraceMs(started.app.pipeline.manifest)) }, () => {})
  }
  // SIGHUP: apply a changed manifest without a restart and without dropping a call.
  hangups.serve(reload)
  // First SIGTERM/SIGINT/SIGQUIT: stop accepting, let in-flight calls finish, close the pool.
  // A second signal exits at once (close-with-grace's default).
  // SIGHUP is the reload's, not a shutdown: close-with-grace listens to it by default, and the
  // one signal both reloaded the manifest and took the replica down. SIGUSR2 and SIGTRAP neither
  // (ignored since start-up, above).
  const log = started.app.log
  warn = (msg) => { log.warn(msg) }
  let closing = false
  const graceful = closeWithGrace({ delay: false, logger: started.app.log, skip: ['SIGHUP', ...NOT_SHUTDOWN_SIGNALS] }, async ({ err, signal }) => {
    closing = true
    grace = Math.max(grace, shutdownGraceMs(started.app.pipeline.manifest))
    if (err !== undefined) started.app.log.error({ err, graceMs: grace }, 'closing after an error')
    else if (fatal !== null && signal === undefined) started.app.log.error({ graceMs: grace }, 'closing after a fatal condition')
    else started.app.log.info({ signal, graceMs: grace }, 'closing')
    const timer = setTimeout(() => {
      started.app.log.error(`killed by timeout (${grace}ms)`)
      process.exit(1)
    }, grace)
    try {
      await started.close()
    } finally {
      clearTimeout(timer)
    }
    // close-with-grace exits 0 after a shutdown it was asked for (graceful.close()).
    if (fatal !== null) process.exit(1)
  })
  shutDown = () => { if (!closing) graceful.close() }
  if (fatal !== null) shutDown()
  shutdowns.serve(shutDown)
}

const USAGE = `Usage: npm start (from a checkout), or node dist/server.js (built)
Mantle takes no arguments: it is configured by its environment (PORT=8080 npm start), every
variable with its default in .env.example and README.md ("Configuration"). With none set it
starts on the embedded default: memory stores, the demo Kernel it starts itself, and a
development token printed with its URLs.`

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  if (noArguments('mantle', process.argv.slice(2), USAGE)) await main()
}
