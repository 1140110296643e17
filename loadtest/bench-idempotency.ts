// The cost of idempotency keys (issue 5, item 3), on their own:
//   node --import tsx loadtest/bench-idempotency.ts [--duration 3] [--rounds 2] [--connections 20]
// One gateway process per store (redis, memory), both in front of one demo Kernel. Against each,
// REST updateAgent (PATCH /api/v1/agents/a1) in interleaved rounds: without a key (the
// baseline), with a fresh key per request (a claim and a stored outcome per call), and with one
// key for every request (each answered by replay, without the Kernel). The machine is shared:
// compare the ratios to the baseline of the same process, not the absolute figures.
// A row whose calls failed (non-2xx, errors) is FLAGGED, as in `npm run bench`: an error is
// answered fast, and p50/p99 are read from 2xx answers alone. The script then exits 1.
import autocannon from 'autocannon'
import { randomBytes, randomUUID } from 'node:crypto'
import { realpathSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { freePort, killAllNow, median, prepareBuild, startKernelProcess, startProcess, stopAll, type RunningProcess } from './harness.js'
import { fmt, textTable } from './measure.js'
import { nearestRank } from './histogram.js'
import { mintToken } from '../plugins/auth/index.js'

export const MODES = ['no key', 'fresh key', 'same key (replay)'] as const
type Mode = typeof MODES[number]

/** One run: p50/p99 of the 2xx answers; non-2xx answers and errors (timeouts included) apart. */
export interface Figures { reqPerSec: number, p50Ms: number, p99Ms: number, non2xx: number, errors: number }

/**
 * The table's rows (medians over rounds, ratios to the keyless baseline of the same store) and
 * the rows whose rounds had a failed call. A row read against a flagged baseline says so: its
 * ratio is not a result either.
 */
export function summarise (stores: readonly string[], figures: ReadonlyMap<string, readonly Figures[]>): { rows: string[][], flagged: string[] } {
  const rows: string[][] = []
  const flagged: string[] = []
  const failed = (fs: readonly Figures[]): { non2xx: number, errors: number } =>
    ({ non2xx: fs.reduce((s, f) => s + f.non2xx, 0), errors: fs.reduce((s, f) => s + f.errors, 0) })
  for (const store of stores) {
    const base = figures.get(`${store} / no key`) ?? []
    const baseRps = median(base.map(f => f.reqPerSec))
    const baseP99 = median(base.map(f => f.p99Ms))
    const baseFailed = failed(base)
    for (const mode of MODES) {
      const name = `${store} / ${mode}`
      const fs = figures.get(name) ?? []
      const rps = median(fs.map(f => f.reqPerSec))
      const p99 = median(fs.map(f => f.p99Ms))
      const { non2xx, errors } = failed(fs)
      let status = 'ok'
      if (non2xx + errors > 0) {
        status = `FLAGGED: ${non2xx} non-2xx, ${errors} errors`
        flagged.push(name)
      } else if (baseFailed.non2xx + baseFailed.errors > 0) {
        status = 'FLAGGED: its baseline (no key) is'
        flagged.push(name)
      }
      rows.push([name, fmt(rps, 0), fmt(rps / baseRps, 2), fmt(median(fs.map(f => f.p50Ms)), 2), fmt(p99, 2), fmt(p99 - baseP99, 2), String(non2xx + errors), status])
    }
  }
  return { rows, flagged }
}

async function run (url: string, token: string, mode: Mode, duration: number, connections: number): Promise<Figures> {
  const prefix = randomUUID()
  let n = 0
  const headers: Record<string, string> = { authorization: `Bearer ${token}`, 'content-type': 'application/json' }
  if (mode === 'same key (replay)') headers['idempotency-key'] = prefix
  const times: number[] = []
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const instance = autocannon({
      url: url + '/api/v1/agents/a1',
      connections,
      pipelining: 1,
      duration,
      requests: [{
        method: 'PATCH',
        headers,
        body: JSON.stringify({ name: 'Bench agent' }),
        ...(mode === 'fresh key' ? { setupRequest: (req: autocannon.Request) => ({ ...req, headers: { ...req.headers, 'idempotency-key': `${prefix}-${n++}` } }) } : {})
      }]
    }, (err: unknown, res: autocannon.Result) => { if (err === null || err === undefined) resolve(res); else reject(err) })
    instance.on('response', (_client, statusCode, _bytes, responseTime) => { if (statusCode >= 200 && statusCode < 300) times.push(responseTime) })
  })
  times.sort((a, b) => a - b)
  return { reqPerSec: result.requests.average, p50Ms: nearestRank(times, 0.5), p99Ms: nearestRank(times, 0.99), non2xx: result.non2xx, errors: result.errors }
}

async function main (): Promise<void> {
  const { values } = parseArgs({
    options: {
      duration: { type: 'string', default: '3' },
      rounds: { type: 'string', default: '2' },
      connections: { type: 'string', default: '20' },
      redis: { type: 'string', default: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379' }
    }
  })
  const duration = Number(values.duration)
  const rounds = Number(values.rounds)
  const connections = Number(values.connections)
  const started: RunningProcess[] = []
  try {
    await prepareBuild()
    const kernel = await startKernelProcess()
    started.push(kernel.process)
    const secret = randomBytes(32).toString('hex')
    const token = mintToken(secret, { tenant: 'bench-idem', user: 'bench', roles: ['editor'], zone: 'public', ttlSeconds: 3600 })
    const gateways: Array<{ store: string, url: string }> = []
    for (const store of ['redis', 'memory']) {
      const port = await freePort()
      const url = `http://127.0.0.1:${port}`
      started.push(await startProcess({
        name: `gateway-${store}`,
        script: 'server.ts',
        env: {
          PORT: String(port),
          HOST: '127.0.0.1',
          KERNEL_URL: kernel.url,
          LOG_LEVEL: 'warn',
          NODE_ENV: 'production',
          BFF_JWT_SECRET: secret,
          REDIS_URL: values.redis,
          BFF_IDEMPOTENCY_STORE: store,
          // Production refuses the memory audit store, and the audit is not what this measures.
          BFF_AUDIT_ENABLED: 'false',
          // Fresh keys stay in the shared Redis only briefly.
          BFF_IDEMPOTENCY_TTL_SECONDS: '60'
        },
        readyUrl: url + '/healthz'
      }))
      gateways.push({ store, url })
    }
    const figures = new Map<string, Figures[]>()
    for (let r = 0; r < rounds; r++) {
      for (const g of gateways) {
        for (const mode of MODES) {
          const f = await run(g.url, token, mode, duration, connections)
          const name = `${g.store} / ${mode}`
          figures.set(name, [...(figures.get(name) ?? []), f])
        }
      }
    }
    const { rows, flagged } = summarise(gateways.map(g => g.store), figures)
    console.log(`updateAgent over REST, ${connections} connections, ${rounds} x ${duration} s, medians over rounds`)
    console.log(textTable(['store / mode', 'req/s', 'x baseline', 'p50 ms', 'p99 ms', 'p99 +ms', 'failed', 'status'], rows))
    if (flagged.length === 0) console.log('every call answered 2xx')
    else {
      // An error is answered fast: these figures would flatter the mode. Not a result.
      console.log(`FLAGGED, calls failed: ${flagged.join(', ')}; those figures are not a result`)
      process.exitCode = 1
    }
  } finally {
    await stopAll(started)
  }
}

// Run as a script, not when a test imports summarise.
if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === realpathSync(process.argv[1])) {
  main().catch((err: unknown) => {
    console.error(err)
    killAllNow()
    process.exitCode = 1
  })
}
