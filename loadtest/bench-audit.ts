// The audit section of `npm run bench` (only when asked for: --section audit). Against the
// machine's PostgreSQL (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test),
// in a database of its own that is dropped afterwards:
// - sustained throughput: entries enqueued as fast as the writer drains them, entries/s stored;
// - enqueue cost: building one call's entry and enqueueing it, per call (p50, p99), in this
//   process with the real writer behind it;
// - REST getAgent with the PostgreSQL audit on (gateway-audit) vs off (gateway-spine), two
//   gateway processes measured in interleaved rounds: the ratio.
import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import { GATEWAY_SPINE, median, pidsOf, startTargets, type RunningProcess, type TargetContext, type TargetDefinition } from './harness.js'
import { fmt, httpWarmup, measure, measureRounds, medianCpu, sleep, textTable, warmupFailures, type RunFigures, type WarmupFailures } from './measure.js'
import { nearestRank } from './histogram.js'
import { getAgent } from './scenarios.js'
import { migrate } from '../plugins/audit/migrations.js'
import { PostgresAuditStore } from '../plugins/audit/postgres-store.js'
import { Spool } from '../plugins/audit/spool.js'
import { AuditWriter } from '../plugins/audit/writer.js'
import { callEntry } from '../plugins/audit/index.js'
import { storableEntry } from '../plugins/audit/entry.js'
import { CallContext } from '../plugins/pipeline/index.js'
import { compileManifest } from '../manifest.js'

export interface AuditBenchOptions { duration: number, rounds: number, connections: number, warmupSeconds: number, pauseMs: number }

export const AUDIT_GOALS = { minEntriesPerSec: 10_000, maxEnqueueP99Us: 50, minRatioAuditOn: 0.9 } as const

export interface AuditReport {
  goals: typeof AUDIT_GOALS
  throughput: { entries: number, seconds: number, entriesPerSec: number }
  enqueue: { calls: number, p50Us: number, p99Us: number }
  rest: {
    auditOff: RunFigures[]
    auditOn: RunFigures[]
    reqPerSecOff: number
    reqPerSecOn: number
    ratio: number
    rowsStored: number
    /**
     * What gateway-audit's writer did during the rounds, from its /metrics: batches written,
     * entries stored and spooled, write failures, and the mean batch and write time. A writer
     * whose batches shrink (many small transactions) costs the gateway and PostgreSQL more a call.
     */
    writer: WriterFigures | null
    /** 2xx answers of gateway-audit, warm-up included: each must have its row (rowsStored may hold more, from calls in flight when a run ended). */
    answeredOn: number
    /** A run of either target had a failed answer (non-2xx or error), or rows are missing: the ratio is not a verdict. */
    flagged: boolean
    /**
     * CPU per call (µs, medians of rounds): the gateway's process with the audit off and on, and
     * PostgreSQL's processes (every one on the host) while each target ran; `postgresAudit` is
     * the difference, what the audit's writes cost PostgreSQL.
     */
    cpuUsPerCall: { gatewayOff: number, gatewayOn: number, postgresOn: number, postgresOff: number, postgresAudit: number }
  }
  met: { throughput: boolean, enqueue: boolean, ratio: boolean }
  /** The REST warm-ups' failed calls (null: none failed); reported, not flagged: the rounds flag their own. */
  warmupFailures: WarmupFailures | null
}

const ADMIN_URL = process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test'
const quiet = { warn: (obj: object, msg: string) => process.stderr.write(`audit: ${msg} ${JSON.stringify(obj)}\n`), info: () => {}, error: (obj: object, msg: string) => process.stderr.write(`audit: ${msg} ${JSON.stringify(obj)}\n`) }

async function admin (sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: ADMIN_URL })
  await client.connect()
  try { await client.query(sql) } finally { await client.end() }
}

const manifest = compileManifest({
  version: 1,
  kernel: { url: 'http://127.0.0.1:1' },
  operations: { getAgent: { type: 'query', rest: 'GET /agents/:id', kernel: 'GET /v1/agents/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object' } } }
}, 'bench')
const op = manifest.byName.get('getAgent')!
const WHERE = ['GET', '/api/v1/agents/:id'] as const

function context (): CallContext {
  const ctx = new CallContext(randomUUID(), 'rest', op, { id: 'a1' }, undefined, undefined, undefined)
  ctx.tenant = 'bench'
  ctx.user = 'bench'
  return ctx
}

async function countRows (databaseUrl: string): Promise<number> {
  const client = new pg.Client({ connectionString: databaseUrl })
  await client.connect()
  try {
    return Number((await client.query<{ n: string }>('SELECT count(*) AS n FROM bff_audit_entries')).rows[0].n)
  } finally {
    await client.end()
  }
}

async function vacuum (databaseUrl: string): Promise<void> {
  const client = new pg.Client({ connectionString: databaseUrl })
  await client.connect()
  try {
    await client.query('VACUUM (ANALYZE) bff_audit_entries')
  } finally {
    await client.end()
  }
}

export interface WriterFigures { batches: number, stored: number, spooled: number, failures: number, entriesPerBatch: number, meanWriteMs: number }

/** The audit writer's counters from a gateway's /metrics (null when they cannot be read). */
async function writerFigures (target: { url: string }): Promise<Omit<WriterFigures, 'entriesPerBatch' | 'meanWriteMs'> & { seconds: number } | null> {
  const text = await fetch(target.url + '/metrics').then(async res => res.ok ? await res.text() : null, () => null)
  if (text === null) return null
  const value = (name: string, label = ''): number => {
    let sum = 0
    for (const line of text.split('\n')) {
      if (line.startsWith(name + (label === '' ? '' : '{')) && (label === '' || line.includes(label))) {
        const at = line.lastIndexOf(' ')
        if (line.slice(0, at) === name || line[name.length] === '{') sum += Number(line.slice(at + 1))
      }
    }
    return sum
  }
  return {
    batches: value('mantle_audit_flush_duration_seconds_count'),
    seconds: value('mantle_audit_flush_duration_seconds_sum'),
    stored: value('mantle_audit_entries_total', 'outcome="stored"'),
    spooled: value('mantle_audit_entries_total', 'outcome="spooled"'),
    failures: value('mantle_audit_write_failures_total')
  }
}

function writerDelta (a: NonNullable<Awaited<ReturnType<typeof writerFigures>>>, b: NonNullable<Awaited<ReturnType<typeof writerFigures>>>): WriterFigures {
  const batches = b.batches - a.batches
  const stored = b.stored - a.stored
  return { batches, stored, spooled: b.spooled - a.spooled, failures: b.failures - a.failures, entriesPerBatch: batches === 0 ? 0 : stored / batches, meanWriteMs: batches === 0 ? 0 : (b.seconds - a.seconds) * 1000 / batches }
}

export async function runAudit (opts: AuditBenchOptions, ctx: TargetContext, processes: RunningProcess[], machine: { cpu: string, cores: number }): Promise<AuditReport> {
  const name = 'mantle_bench_' + randomUUID().replace(/-/g, '').slice(0, 12)
  await admin(`CREATE DATABASE ${name}`)
  const url = new URL(ADMIN_URL)
  url.pathname = '/' + name
  const databaseUrl = url.toString()
  const dirs: string[] = []
  const dir = (): string => { const d = mkdtempSync(join(tmpdir(), 'mantle-bench-spool-')); dirs.push(d); return d }
  try {
    await migrate(databaseUrl)
    const store = new PostgresAuditStore({ databaseUrl })
    const spool = await Spool.open(dir())
    const counted = { stored: 0 }
    const writer = new AuditWriter({ store, spool, batchSize: 500, queueMax: 50_000, log: quiet, hooks: { stored: n => { counted.stored += n }, replayed: n => { counted.stored += n } } })

    // Enqueue cost, per call: the entry of a finished call built and queued, as the stage does.
    const calls = 100_000
    const samples = new Float64Array(calls)
    for (let i = 0; i < calls; i += 1000) {
      for (let k = 0; k < 1000; k++) {
        const c = context()
        const t0 = performance.now()
        writer.enqueue(storableEntry(callEntry(c, WHERE, null)))
        samples[i + k] = (performance.now() - t0) * 1000
      }
      // Paced to what the writer drains: this measures the enqueue, not a full queue's spill.
      while (writer.depth > 5000) await sleep(2)
    }
    while (counted.stored < calls) await sleep(10)
    samples.sort()
    const enqueue = { calls, p50Us: nearestRank(samples, 0.5), p99Us: nearestRank(samples, 0.99) }

    // Sustained throughput: keep the queue fed (below its bound) for the duration, count what is stored.
    const base = counted.stored
    const started = performance.now()
    const until = started + opts.duration * 1000 * 2
    let produced = 0
    while (performance.now() < until) {
      while (writer.depth < 20_000) { writer.enqueue(storableEntry(callEntry(context(), WHERE, null))); produced++ }
      await sleep(5)
    }
    while (counted.stored - base < produced) await sleep(5)
    const seconds = (performance.now() - started) / 1000
    const throughput = { entries: produced, seconds, entriesPerSec: produced / seconds }
    await writer.close()
    await spool.close()
    await store.close()

    // REST with the audit on vs off, two processes side by side.
    const auditOn: TargetDefinition = {
      name: 'gateway-audit',
      description: 'gateway-spine + the audit trail on PostgreSQL',
      process: {
        ...GATEWAY_SPINE.process!,
        env: (c, port) => ({ ...GATEWAY_SPINE.process!.env(c, port), BFF_AUDIT_ENABLED: 'true', BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl, BFF_AUDIT_SPOOL_DIR: dir() })
      },
      headers: GATEWAY_SPINE.headers
    }
    // The sustained phase left hundreds of thousands of rows that autovacuum would otherwise
    // visit during the rounds below, charging that phase's upkeep to the audit-on rounds.
    await vacuum(databaseUrl)
    const before = await countRows(databaseUrl)
    const mine: RunningProcess[] = []
    const targets = await startTargets([GATEWAY_SPINE, auditOn], ctx, mine)
    processes.push(...mine)
    const warm: RunFigures[] = []
    for (const t of targets) warm.push(await measure(t, getAgent, opts.warmupSeconds, opts.connections))
    // PostgreSQL's processes are watched: on the same cores, what it spends per entry is taken from the gateway.
    const writerBefore = await writerFigures(targets[1])
    const runs = await measureRounds(targets, getAgent, { rounds: opts.rounds, duration: opts.duration, connections: opts.connections, pauseMs: opts.pauseMs, label: 'audit', watch: () => pidsOf('postgres') })
    const writerAfter = await writerFigures(targets[1])
    const written = writerBefore === null || writerAfter === null ? null : writerDelta(writerBefore, writerAfter)
    const off = runs.get(GATEWAY_SPINE.name)!
    const on = runs.get('gateway-audit')!
    const reqPerSecOff = median(off.map(r => r.reqPerSec))
    const reqPerSecOn = median(on.map(r => r.reqPerSec))
    // Stopped (SIGTERM: the gateway flushes its queue) before the database is dropped.
    for (const p of mine) await p.stop()
    const rowsStored = await countRows(databaseUrl) - before
    // Every 2xx answer the audit-on target gave has its row; a failed answer (non-2xx, error) in
    // either target's runs flags the ratio, as every other section does.
    const ok2xx = (r: RunFigures): number => r.requests - r.non2xx
    const answeredOn = ok2xx(warm[1]) + on.reduce((n, r) => n + ok2xx(r), 0)
    const flagged = [...off, ...on].some(r => r.non2xx + r.errors > 0) || rowsStored < answeredOn
    const postgresOn = medianCpu(on, (r) => r.watchedCpuUsPerRequest)
    const postgresOff = medianCpu(off, (r) => r.watchedCpuUsPerRequest)
    const warmupFailed = warmupFailures(targets.map((t, i) => httpWarmup(t.name, warm[i])))

    const report: AuditReport = {
      goals: AUDIT_GOALS,
      throughput,
      enqueue,
      rest: {
        auditOff: off,
        auditOn: on,
        reqPerSecOff,
        reqPerSecOn,
        ratio: reqPerSecOn / reqPerSecOff,
        rowsStored,
        writer: written,
        answeredOn,
        flagged,
        // PostgreSQL's background (and other clients') CPU runs by the second, not by the call: the
        // slower audit-on rounds spread it over fewer calls, so it is scaled to their rate first.
        cpuUsPerCall: { gatewayOff: medianCpu(off), gatewayOn: medianCpu(on), postgresOn, postgresOff, postgresAudit: postgresOn - postgresOff * reqPerSecOff / reqPerSecOn }
      },
      met: {
        throughput: throughput.entriesPerSec >= AUDIT_GOALS.minEntriesPerSec,
        enqueue: enqueue.p99Us <= AUDIT_GOALS.maxEnqueueP99Us,
        ratio: !flagged && reqPerSecOn / reqPerSecOff >= AUDIT_GOALS.minRatioAuditOn
      },
      warmupFailures: warmupFailed
    }
    const ok = (b: boolean): string => b ? 'goal met' : 'goal NOT met'
    process.stdout.write(`\nMantle bench — audit trail into PostgreSQL (${machine.cpu} x ${machine.cores})\n\n` + textTable(['measure', 'value', 'goal', ''], [
      ['sustained throughput', `${fmt(throughput.entriesPerSec, 0)} entries/s (${throughput.entries} in ${fmt(seconds, 1)} s)`, `>= ${AUDIT_GOALS.minEntriesPerSec}`, ok(report.met.throughput)],
      ['enqueue cost per call', `p50 ${fmt(enqueue.p50Us, 1)} µs, p99 ${fmt(enqueue.p99Us, 1)} µs`, `p99 < ${AUDIT_GOALS.maxEnqueueP99Us} µs`, ok(report.met.enqueue)],
      ['REST audit on / off', `${fmt(reqPerSecOn, 0)} / ${fmt(reqPerSecOff, 0)} req/s = ${fmt(report.rest.ratio, 2)}`, `>= ${AUDIT_GOALS.minRatioAuditOn}`, ok(report.met.ratio) + (flagged ? ' (FLAGGED: failed answers or missing rows)' : '')]
    ]) + `\nrows stored by gateway-audit: ${rowsStored}, for ${answeredOn} 2xx answers (warm-up included)${rowsStored < answeredOn ? ': ROWS MISSING' : ''}\n` +
      (warmupFailed === null ? '' : warmupFailed.text + '\n') +
      `CPU per call (median of rounds): gateway ${fmt(report.rest.cpuUsPerCall.gatewayOn, 1)} µs with the audit on, ${fmt(report.rest.cpuUsPerCall.gatewayOff, 1)} µs off; ` +
      `PostgreSQL (every process on the host, on the same cores) ${fmt(postgresOn, 1)} µs per call with the audit on, ${fmt(postgresOff, 1)} off: ${fmt(report.rest.cpuUsPerCall.postgresAudit, 1)} for the audit (the off figure scaled to the on rounds' rate)\n` +
      (written === null ? '' : `writer during the rounds: ${written.batches} batches, ${fmt(written.entriesPerBatch, 0)} entries each, ${fmt(written.meanWriteMs, 1)} ms a write, ${written.spooled} spooled, ${written.failures} failures\n`))
    return report
  } finally {
    for (const d of dirs) rmSync(d, { recursive: true, force: true })
    await admin(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => {})
  }
}
