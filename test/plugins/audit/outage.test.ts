import t from 'tap'
import { randomUUID } from 'node:crypto'
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'
import { existsSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { hostname } from 'node:os'
import type { FastifyInstance } from 'fastify'
import { buildApp, type BuildOptions } from '../../../app.js'
import { migrate } from '../../../plugins/audit/migrations.js'
import { PostgresAuditStore, failureOf } from '../../../plugins/audit/postgres-store.js'
import { startKernel } from '../../../kernel/server.js'
import { testConfig, bearer, token, until, SECRET, closedPort } from '../../helper.js'
import { connect } from '../../adapters/websocket-helper.js'
import { startTcpProxy, type TcpProxy } from '../../proxy.js'
import { postgresAvailable, createTestDatabase, databaseUrl, sql, spoolDir, PG_PORT, PG_URL } from './db.js'

const root = fileURLToPath(new URL('../../../', import.meta.url))
const available = await postgresAvailable()
if (!available) t.comment('PostgreSQL is not reachable on 127.0.0.1:5432: skipped (CI fails instead)')

/**
 * server.ts in a child process on the PostgreSQL audit (`url`, spooling to `dir`), once it listens.
 * Outside tap's coverage: tsx compiles the sources its own way, and their coverage merged with
 * tap's would misplace line ranges across the whole report.
 */
async function gateway (t: { teardown: (fn: () => unknown) => void }, url: string, dir: string, env: Record<string, string> = {}): Promise<{ child: ChildProcess, base: string, output: () => string }> {
  const child = spawn('/usr/bin/env', ['-u', 'NODE_OPTIONS', '-u', 'NODE_V8_COVERAGE', process.execPath, '--import', 'tsx', 'server.ts'], {
    cwd: root,
    env: { PATH: process.env.PATH, NODE_ENV: 'test', PORT: '0', LOG_LEVEL: 'warn', BFF_JWT_SECRET: SECRET, BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: dir, BFF_AUDIT_BATCH_SIZE: '50', ...env },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let out = ''
  child.stdout!.on('data', (d: Buffer) => { out += d.toString() })
  child.stderr!.on('data', (d: Buffer) => { out += d.toString() })
  t.teardown(() => { if (child.exitCode === null) child.kill('SIGKILL') })
  await until(() => /listening on (http:\S+)/.test(out) || child.exitCode !== null, 'the gateway to listen', 60_000)
  const base = /listening on (http:\S+)/.exec(out)?.[1]
  if (base === undefined) throw new Error('server.ts did not start: ' + out)
  return { child, base, output: () => out }
}

const rowsOf = async (url: string): Promise<string[]> => (await sql<{ request_id: string }>(url, 'SELECT request_id FROM bff_audit_entries')).map(r => r.request_id)

/** The request ids of the entries in the spool of `dir` (none without a spool file). */
function spooledIds (dir: string): Set<string> {
  const spooled = new Set<string>()
  const file = join(dir, 'audit.spool')
  if (existsSync(file)) {
    for (const line of readFileSync(file, 'utf8').split('\n').filter(l => l !== '')) {
      for (const e of (JSON.parse(line) as { entries: Array<{ requestId: string }> }).entries) spooled.add(e.requestId)
    }
  }
  return spooled
}

if (available) {
  t.test('PostgreSQL cut mid-load: calls go on, entries are spooled, and after the cut every entry is stored exactly once', async t => {
    const name = await createTestDatabase(t, { migrated: true })
    const direct = databaseUrl(name)
    const proxy = await startTcpProxy(t, PG_PORT)
    const kernel = await startKernel({ port: 0, runDelayMs: 1 })
    t.teardown(() => kernel.close())
    const dir = spoolDir(t)
    const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl(name, proxy.port), BFF_AUDIT_SPOOL_DIR: dir, BFF_AUDIT_BATCH_SIZE: 20 }),
      { logger: false, kernelUrl: kernel.url, audit: { connectTimeoutMs: 300 } })
    t.teardown(() => app.close())
    await app.ready()

    const run = randomUUID()
    const sent: string[] = []
    const statuses: number[] = []
    const load = async (from: number, to: number): Promise<void> => {
      for (let i = from; i < to; i += 10) {
        await Promise.all(Array.from({ length: 10 }, async (_, k) => {
          const id = `${run}-${i + k}`
          sent.push(id)
          const res = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), 'x-request-id': id } })
          statuses.push(res.statusCode)
        }))
      }
    }
    await load(0, 100)
    proxy.cut('reset')
    await load(100, 200)
    await until(() => app.audit.health().spoolBytes > 0, 'entries in the spool')
    t.equal(app.audit.health().up, false)
    const ready = await app.inject({ method: 'GET', url: '/readyz' })
    t.equal(ready.statusCode, 503)
    t.match(ready.json(), { failing: ['postgres'], checks: { postgres: /^down \(audit spooling, \d+ bytes\)$/ } })
    t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_audit_store_up 0/)
    const diagz = (await app.inject({ method: 'GET', url: '/diagz', headers: bearer() })).json()
    t.match(diagz.stores.audit, { type: 'postgres', healthy: false, detail: /^spooling to disk/ })
    t.match(diagz.audit, { store: 'postgres', up: false, spoolBytes: Number, spooled: Number, failures: Number })
    t.ok(diagz.audit.spoolBytes > 0 && diagz.audit.failures > 0, 'the writer\'s figures: spooled bytes and failed writes')
    // A server that hangs rather than refuses: connection attempts time out, the spool takes over.
    proxy.cut('stall')
    await load(200, 300)
    t.ok(statuses.every(s => s === 200), 'every call succeeded during the outage')

    proxy.restore()
    // The calls' entries (the /diagz read above has its own, admin.diagz).
    const callRows = async (): Promise<string[]> => (await rowsOf(direct)).filter(id => id.startsWith(run))
    for (let i = 0; i < 1500; i++) {
      if ((await callRows()).length >= 300 && app.audit.health().spoolBytes === 0) break
      await new Promise(resolve => setTimeout(resolve, 20))
    }
    const rows = await callRows()
    t.equal(rows.length, 300, 'count equals calls')
    t.same(rows.sort(), sent.sort(), 'each call once, none twice')
    await until(() => app.audit.health().up, 'the store to be up')
    t.equal(app.audit.health().spoolBytes, 0, 'the spool is empty once replayed')
    t.equal(statSync(join(dir, 'audit.spool')).size, 0)
    const verify = await app.inject({ method: 'POST', url: '/admin/audit/verify', headers: bearer() })
    t.same(verify.json(), { ok: true, checked: 301, firstBroken: null }, 'the 300 calls and the /diagz read')
    t.match((await app.inject({ method: 'GET', url: '/diagz', headers: bearer() })).json(), { stores: { audit: { type: 'postgres', healthy: true } }, audit: { up: true, spoolBytes: 0, lastError: null } })
    t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_audit_entries_total\{outcome="replayed"\} [1-9]/)
  })

  t.test('a gateway that starts while PostgreSQL is down spools, then migrates and replays once it is back', async t => {
    const name = await createTestDatabase(t)
    const proxy = await startTcpProxy(t, PG_PORT)
    proxy.cut('reset')
    const kernel = await startKernel({ port: 0, runDelayMs: 1 })
    t.teardown(() => kernel.close())
    const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl(name, proxy.port), BFF_AUDIT_SPOOL_DIR: spoolDir(t) }),
      { logger: false, kernelUrl: kernel.url, audit: { connectTimeoutMs: 300 } })
    t.teardown(() => app.close())
    await app.ready()
    const ids = Array.from({ length: 20 }, (_, i) => `down-${i}`)
    for (const id of ids) t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), 'x-request-id': id } })).statusCode, 200)
    await until(() => app.audit.health().spoolBytes > 0, 'entries in the spool')
    // The admin reads answer 503 with Retry-After meanwhile (they were a 500 INTERNAL).
    for (const [method, url] of [['GET', '/admin/audit'], ['POST', '/admin/audit/verify']] as const) {
      // Audited themselves, as every call.
      ids.push(`admin-${method}`)
      const res = await app.inject({ method, url, headers: { ...bearer(), 'x-request-id': `admin-${method}` } })
      t.equal(res.statusCode, 503, `${method} ${url}`)
      t.equal(res.headers['retry-after'], '5')
      t.match(res.json(), { code: 'OVERLOADED', detail: /did not answer in time/ })
    }
    proxy.restore()
    const direct = databaseUrl(name)
    for (let i = 0; i < 1500; i++) {
      const tables = await sql(direct, "SELECT 1 FROM pg_tables WHERE tablename = 'bff_audit_entries'")
      if (tables.length > 0 && (await rowsOf(direct)).length >= ids.length) break
      await new Promise(resolve => setTimeout(resolve, 20))
    }
    t.same((await rowsOf(direct)).sort(), ids.sort())
  })

  t.test('SIGTERM during load loses no entry', async t => {
    const name = await createTestDatabase(t, { migrated: true })
    const url = databaseUrl(name)
    const dir = spoolDir(t)
    const { child, base } = await gateway(t, url, dir)

    const answered: string[] = []
    const state = { stop: false }
    let n = 0
    const auth = bearer()
    const worker = async (w: number): Promise<void> => {
      while (!state.stop) {
        const id = `sig-${w}-${n++}`
        try {
          const res = await fetch(`${base}/api/v1/agents/a1`, { headers: { ...auth, 'x-request-id': id } })
          await res.arrayBuffer()
          if (res.status === 200) answered.push(id)
        } catch {
          return // the server is gone
        }
      }
    }
    const workers = Array.from({ length: 8 }, async (_, w) => await worker(w))
    await until(() => answered.length >= 300, 'load to be under way', 60_000)
    child.kill('SIGTERM')
    const [code] = await once(child, 'exit')
    state.stop = true
    await Promise.all(workers)
    t.equal(code, 0, 'a clean exit')
    const rows = await rowsOf(url)
    const stored = new Set(rows)
    t.equal(stored.size, rows.length, 'no entry twice')
    t.same(answered.filter(id => !stored.has(id)), [], 'every answered call has its entry')
    t.ok(rows.length >= answered.length)
    t.notOk(existsSync(join(dir, 'audit.lock')), 'the spool lock is released')
  })
}

// Before, close waited for the store: a write to a PostgreSQL that stopped answering failed only
// after its query timeout and a ROLLBACK's (20 s), past the shutdown's grace of 10 s, and the
// process was killed with its queue neither stored nor spooled.
if (available) {
  t.test('SIGTERM while PostgreSQL hangs: a clean exit within the grace, every answered call stored or spooled', async t => {
    const name = await createTestDatabase(t, { migrated: true })
    const direct = databaseUrl(name)
    const proxy = await startTcpProxy(t, PG_PORT)
    const dir = spoolDir(t)
    const { child, base, output } = await gateway(t, databaseUrl(name, proxy.port), dir)
    const answered: string[] = []
    const auth = bearer()
    const call = async (id: string): Promise<void> => {
      const res = await fetch(`${base}/api/v1/agents/a1`, { headers: { ...auth, 'x-request-id': id } })
      await res.arrayBuffer()
      if (res.status === 200) answered.push(id)
    }
    for (let i = 0; i < 60; i++) await call(`before-${i}`)
    for (let end = Date.now() + 10_000; (await rowsOf(direct)).length < 60;) {
      if (Date.now() > end) throw new Error('timed out waiting for the first calls to be stored')
      await new Promise(resolve => setTimeout(resolve, 50))
    }
    // PostgreSQL stops answering on the open connections (a partition, a stuck server).
    proxy.delay(120_000)
    for (let i = 0; i < 120; i++) await call(`hung-${i}`)
    child.kill('SIGTERM')
    const [code] = await once(child, 'exit')
    proxy.restore()
    t.equal(code, 0, `a clean exit, not killed at the end of the grace (${output().split('\n').filter(l => /killed|spool/.test(l)).join(' ').slice(0, 300)})`)
    const stored = new Set(await rowsOf(direct))
    const spooled = spooledIds(dir)
    t.equal(answered.length, 180)
    t.same(answered.filter(id => !stored.has(id) && !spooled.has(id)), [], 'every answered call is stored or spooled')
    t.ok(spooled.size > 0, 'what PostgreSQL did not take is in the spool')
  })
}

// In production, pending migrations found only once PostgreSQL answered (it was down at start-up)
// were taken for a write failure: the gateway ran on, retried the check (a connection and the
// migration lock) on every write, answered GET /admin/audit with a 500, flipped /readyz between
// ready and not, and spooled every entry for good. Now it refuses as at start-up: it shuts down.
if (available) {
  /** A production gateway in process on a database migrated to 3 (4 is pending), PostgreSQL cut. */
  const pendingAtStart = async (t: { teardown: (fn: () => unknown) => void }, options: BuildOptions = {}): Promise<{ app: FastifyInstance, proxy: TcpProxy, direct: string, dir: string, lines: string[] }> => {
    const name = await createTestDatabase(t)
    const direct = databaseUrl(name)
    await migrate(direct, 3)
    const proxy = await startTcpProxy(t, PG_PORT)
    proxy.cut('reset')
    const kernel = await startKernel({ port: 0, runDelayMs: 1 })
    t.teardown(() => kernel.close())
    const dir = spoolDir(t)
    const lines: string[] = []
    const app = await buildApp(testConfig({ NODE_ENV: 'production', LOG_LEVEL: 'warn', BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl(name, proxy.port), BFF_AUDIT_SPOOL_DIR: dir }),
      { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } }, kernelUrl: kernel.url, audit: { connectTimeoutMs: 300, probeIntervalMs: 50 }, ...options })
    t.teardown(() => app.close())
    await app.ready()
    return { app, proxy, direct, dir, lines }
  }
  const REFUSAL = /^Refusing to start in production: the audit database has pending migrations \(4, 5\): run npm run migrate/
  const fatalLines = (lines: string[]): string[] => lines.map(l => JSON.parse(l) as { level: number, msg: string }).filter(l => l.level === 60).map(l => l.msg)

  t.test('production: pending migrations found once PostgreSQL is back are fatal; until the shutdown /readyz and the audit reads answer 503, nothing retries, and every entry is spooled', async t => {
    const fatals: Error[] = []
    const { app, proxy, direct, dir, lines } = await pendingAtStart(t, { onFatal: err => { fatals.push(err) } })
    const ids: string[] = []
    const call = async (id: string): Promise<void> => {
      ids.push(id)
      t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), 'x-request-id': id } })).statusCode, 200)
    }
    for (let i = 0; i < 5; i++) await call(`down-${i}`)
    await until(() => app.audit.health().spoolBytes > 0, 'entries in the spool')
    proxy.restore()
    await until(() => fatals.length > 0, 'the refusal once PostgreSQL answers')
    t.match(fatals[0].message, REFUSAL)
    t.same(fatalLines(lines), [fatals[0].message], 'logged once, at fatal, with the start-up refusal\'s message')

    for (const scope of ['all', 'instance']) {
      const ready = await app.inject({ method: 'GET', url: `/readyz?scope=${scope}` })
      t.equal(ready.statusCode, 503, `/readyz?scope=${scope}`)
      t.match(ready.json(), { status: 'not-ready', failing: ['migrations'], checks: { postgres: 'pending migrations (4, 5): shutting down' } })
    }
    ids.push('admin-read')
    const read = await app.inject({ method: 'GET', url: '/admin/audit', headers: { ...bearer({ roles: ['system'] }), 'x-request-id': 'admin-read' } })
    t.equal(read.statusCode, 503, 'GET /admin/audit: a 503, not a 500')
    t.equal(read.headers['retry-after'], '5')
    t.match(read.json(), { code: 'OVERLOADED', detail: /pending migrations \(4, 5\): this instance is shutting down/ })

    // The writer goes on spooling while the shutdown comes, without asking PostgreSQL again.
    const failures = async (): Promise<number> => (await app.inject({ method: 'GET', url: '/diagz', headers: bearer({ roles: ['system'] }) })).json().audit.failures
    const connections = proxy.connections
    const before = await failures()
    for (let i = 0; i < 5; i++) await call(`refused-${i}`)
    for (let i = 0; i < 500 && await failures() < before + 2; i++) await new Promise(resolve => setTimeout(resolve, 20))
    t.ok(await failures() >= before + 2, 'the writer tried the store again')
    t.equal(proxy.connections, connections, 'no new connection to PostgreSQL (each try took the migration lock on one of its own)')
    t.equal(fatals.length, 1, 'fatal once')

    await call('last')
    await app.close()
    const spooled = spooledIds(dir)
    t.same(ids.filter(id => !spooled.has(id)), [], 'every entry is in the spool')
    t.same(await rowsOf(direct), [], 'none stored on the old schema')
  })

  t.test('production: without onFatal (buildApp alone) the app closes itself once the refusal is found, with no call made', async t => {
    const { app, proxy, dir, lines } = await pendingAtStart(t)
    t.ok(existsSync(join(dir, 'audit.lock')))
    proxy.restore()
    // Closing began (preClose), and the audit's onClose has run: it releases the spool's lock.
    await until(() => app.shuttingDown() && !existsSync(join(dir, 'audit.lock')), 'the app to close')
    t.match(fatalLines(lines), [REFUSAL])
  })

  t.test('production, server.ts: pending migrations found once PostgreSQL is back end the process (exit 1) after a graceful shutdown', async t => {
    const name = await createTestDatabase(t)
    await migrate(databaseUrl(name), 3)
    const proxy = await startTcpProxy(t, PG_PORT)
    proxy.cut('reset')
    const kernel = await startKernel({ port: 0, runDelayMs: 1 })
    t.teardown(() => kernel.close())
    const dir = spoolDir(t)
    const { child, base, output } = await gateway(t, databaseUrl(name, proxy.port), dir, { NODE_ENV: 'production', KERNEL_URL: kernel.url })
    t.equal((await fetch(`${base}/api/v1/agents/a1`, { headers: { ...bearer(), 'x-request-id': 'before' } })).status, 200)
    proxy.restore()
    await until(() => child.exitCode !== null, 'the gateway to exit', 30_000)
    t.equal(child.exitCode, 1, 'a non-zero exit')
    t.match(fatalLines(output().split('\n').filter(l => l.startsWith('{'))), [REFUSAL])
    t.match(output(), /closing after a fatal condition/)
    t.ok(spooledIds(dir).has('before'), 'the call\'s entry is in the spool')
    t.notOk(existsSync(join(dir, 'audit.lock')), 'the spool lock is released: a graceful shutdown')
  })
}

// The writer's `up` was true from start-up until a write failed: with PostgreSQL unreachable
// since start-up, or gone while no call came, /readyz said ready and `postgres: up`.
if (available) {
  t.test('/readyz follows PostgreSQL without traffic: down from start-up, back, and gone again', async t => {
    const name = await createTestDatabase(t)
    const proxy = await startTcpProxy(t, PG_PORT)
    proxy.cut()
    const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl(name, proxy.port), BFF_AUDIT_SPOOL_DIR: spoolDir(t) }),
      { logger: false, audit: { connectTimeoutMs: 300, probeIntervalMs: 50 } })
    t.teardown(() => app.close())
    await app.ready()
    const ready = async (): Promise<number> => (await app.inject({ method: 'GET', url: '/readyz' })).statusCode
    const first = await app.inject({ method: 'GET', url: '/readyz' })
    t.equal(first.statusCode, 503, 'unreachable since start-up: not ready')
    t.match(first.json(), { failing: ['postgres'], checks: { postgres: /^down/ } })
    const becomes = async (status: number): Promise<boolean> => {
      for (const end = Date.now() + 5000; Date.now() < end; await new Promise(resolve => setTimeout(resolve, 20))) if (await ready() === status) return true
      return false
    }
    proxy.restore()
    t.ok(await becomes(200), 'ready once PostgreSQL answers, with no call made')
    proxy.cut()
    t.ok(await becomes(503), 'not ready once it stops answering, with no call made')
  })
}

// A PostgreSQL that answers but takes no writes (the URL on a hot standby after a failover,
// default_transaction_read_only) answered the probe's SELECT 1: /readyz said ready, with no
// call made, while every batch would be refused (25006) and spooled.
if (available) {
  t.test('/readyz without traffic: a PostgreSQL that answers but takes no writes is not ready, and ready once it takes them', async t => {
    const name = await createTestDatabase(t)
    const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl(name), BFF_AUDIT_SPOOL_DIR: spoolDir(t) }),
      { logger: false, audit: { connectTimeoutMs: 2000, probeIntervalMs: 50 } })
    t.teardown(() => app.close())
    await app.ready()
    const ready = async (): Promise<number> => (await app.inject({ method: 'GET', url: '/readyz' })).statusCode
    const becomes = async (status: number): Promise<boolean> => {
      for (const end = Date.now() + 5000; Date.now() < end; await new Promise(resolve => setTimeout(resolve, 20))) if (await ready() === status) return true
      return false
    }
    t.ok(await becomes(200), 'ready')
    // New sessions of the database are read-only; the gateway's are ended (as a failover ends them).
    const sessions = async (): Promise<void> => { await sql(PG_URL, 'SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1', [name]) }
    await sql(PG_URL, `ALTER DATABASE ${name} SET default_transaction_read_only = on`)
    await sessions()
    t.ok(await becomes(503), 'not ready once PostgreSQL takes no writes, with no call made')
    t.match((await app.inject({ method: 'GET', url: '/readyz' })).json(), { failing: ['postgres'] })
    // What the probe says (its first failure may be the end of its session instead, logged once).
    const store = new PostgresAuditStore({ databaseUrl: databaseUrl(name) })
    t.teardown(() => store.close())
    t.equal(await store.ping().then(() => 'resolved', failureOf), 'answered but failed: PostgreSQL takes no writes: transaction_read_only is on (a hot standby, or default_transaction_read_only)')
    await sql(PG_URL, `ALTER DATABASE ${name} RESET default_transaction_read_only`)
    await sessions()
    t.ok(await becomes(200), 'ready once it takes writes again')
  })
}

// A PostgreSQL (or a pooler in front of it) that answered with an error (a database or relation
// that is not there, a refused connection) was logged as "unreachable at start-up" and, by the
// writer's probe, as "no answer to a ping": the cause was nowhere in the log.
if (available) {
  t.test('the log tells a PostgreSQL that answered with an error, and that error, from one that did not answer: at start-up and by the probe', async t => {
    const warnings = (lines: string[]): Array<{ msg: string, err: string }> => lines.map(l => JSON.parse(l) as { level: number, msg: string, err: string }).filter(l => l.level === 40)
    const gateway = async (url: string): Promise<string[]> => {
      const lines: string[] = []
      const app = await buildApp(testConfig({ LOG_LEVEL: 'warn', BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t) }),
        { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } }, audit: { connectTimeoutMs: 2000, probeIntervalMs: 50 } })
      t.teardown(() => app.close())
      await app.ready()
      return lines
    }
    const missing = `mantle_t_missing_${randomUUID().slice(0, 8)}`
    const answered = `answered but failed: database "${missing}" does not exist`
    t.match(warnings(await gateway(databaseUrl(missing))), [
      { msg: 'PostgreSQL failed at start-up: audit entries are spooled until it works', err: answered },
      { msg: 'audit store fails: entries go to the spool until it is back', err: answered }
    ], 'a database that is not there')
    t.match(warnings(await gateway(databaseUrl('test', await closedPort()))), [
      { msg: 'PostgreSQL failed at start-up: audit entries are spooled until it works', err: /^no answer: / },
      { msg: 'audit store fails: entries go to the spool until it is back', err: /^no answer: / }
    ], 'nothing listening')
    // Up, then its database closed to connections and its connections ended: the probe's new
    // connection is refused by PostgreSQL.
    const name = await createTestDatabase(t)
    const lines = await gateway(databaseUrl(name))
    t.same(warnings(lines), [], 'up: nothing to say')
    await sql(PG_URL, `ALTER DATABASE ${name} ALLOW_CONNECTIONS false`)
    await sql(PG_URL, 'SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1', [name])
    const probed = (): Array<{ msg: string, err: string }> => warnings(lines).filter(l => l.msg.startsWith('audit store fails'))
    await until(() => probed().length > 0, 'the probe to fail')
    t.match(probed(), [{ msg: 'audit store fails: entries go to the spool until it is back', err: /^answered but failed: (database "\w+" is not currently accepting connections|terminating connection due to administrator command)$/ }], 'the probe says what PostgreSQL answered (the end of its connection, or the refusal of a new one)')
  })
}

t.test('neither PostgreSQL nor the spool\'s disk takes entries: calls are refused (503), never served without their entry', async t => {
  // The spool's file is /dev/full: every append fails with ENOSPC, as on a full disk.
  const dir = spoolDir(t)
  symlinkSync('/dev/full', join(dir, 'audit.spool'))
  const kernel = await startKernel({ port: 0, runDelayMs: 1 })
  t.teardown(() => kernel.close())
  const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl('test', await closedPort()), BFF_AUDIT_SPOOL_DIR: dir, BFF_AUDIT_QUEUE_MAX: 10, BFF_AUDIT_BATCH_SIZE: 5 }),
    { logger: false, kernelUrl: kernel.url, audit: { connectTimeoutMs: 200 } })
  t.teardown(() => app.close())
  await app.ready()
  const statuses: number[] = []
  for (let i = 0; i < 300 && !statuses.includes(503); i++) {
    statuses.push((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })).statusCode)
    await new Promise(resolve => setTimeout(resolve, 2))
  }
  const served = statuses.filter(s => s === 200).length
  t.ok(statuses.includes(503) && served >= 20, `calls are served until two queues wait, then refused (${served} served)`)
  const refused = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  t.equal(refused.statusCode, 503)
  t.equal(refused.headers['retry-after'], '5')
  t.match(refused.json(), { code: 'OVERLOADED', detail: /audit trail cannot record calls/ })
  t.match((await app.inject({ url: '/metrics' })).body, /mantle_audit_entries_total\{outcome="refused"\} [1-9]/)
})

t.test('neither PostgreSQL nor the spool\'s disk takes entries: the routes that audit themselves are refused too, the probes are served, the backlog stays bounded', async t => {
  const dir = spoolDir(t)
  symlinkSync('/dev/full', join(dir, 'audit.spool'))
  const kernel = await startKernel({ port: 0, runDelayMs: 1 })
  t.teardown(() => kernel.close())
  const internal = 'internal-token-of-the-outage-test'
  const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl('test', await closedPort()), BFF_AUDIT_SPOOL_DIR: dir, BFF_AUDIT_QUEUE_MAX: 10, BFF_AUDIT_BATCH_SIZE: 5, BFF_INTERNAL_TOKEN: internal }),
    { logger: false, kernelUrl: kernel.url, audit: { connectTimeoutMs: 200 } })
  t.teardown(() => app.close())
  await app.ready()
  for (let i = 0; i < 300; i++) {
    if ((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })).statusCode === 503) break
    await new Promise(resolve => setTimeout(resolve, 2))
  }
  const depth = app.audit.health().queueDepth
  t.ok(depth >= 20, `saturated: two queues wait (${depth})`)
  const system = bearer({ roles: ['system'] })
  const admin = [
    { method: 'GET' as const, url: '/diagz', headers: system },
    { method: 'POST' as const, url: '/admin/cache/invalidate', headers: system, payload: { tenant: 'victim', tags: ['agents'] } },
    { method: 'POST' as const, url: '/internal/events', headers: { authorization: `Bearer ${internal}` }, payload: { topic: 'runs.updated', tenantId: 't1', payload: {} } },
    { method: 'GET' as const, url: '/admin/audit', headers: system },
    { method: 'POST' as const, url: '/admin/audit/verify', headers: system, payload: {} },
    { method: 'GET' as const, url: '/diagz' }
  ]
  for (let i = 0; i < 50; i++) {
    for (const c of admin) {
      const res = await app.inject(c)
      if (i > 0) continue
      t.equal(res.statusCode, 503, `${c.method} ${c.url}: refused rather than served without its entry`)
      t.equal(res.headers['retry-after'], '5')
      t.match(res.json(), { code: 'OVERLOADED', detail: /audit trail cannot record calls/ })
    }
  }
  t.ok(app.audit.health().queueDepth <= depth, `no entry queued for the ${50 * admin.length} refusals (${app.audit.health().queueDepth})`)
  // Subscriptions and /ws re-auth frames, recorded like calls, are refused like them.
  await app.listen({ port: 0, host: '127.0.0.1' })
  const client = await connect(t, `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/ws`, { roles: ['viewer'] })
  for (let i = 0; i < 20; i++) {
    const subscribed = await client.request({ id: 's', subscribe: 'runUpdated' })
    const renewed = await client.request({ id: 'a', auth: token({ roles: ['viewer'] }) })
    if (i > 0) continue
    t.match(subscribed.error, { code: 'OVERLOADED', detail: /audit trail cannot record calls/ }, 'a subscription is refused rather than made without its entry')
    t.match(renewed.error, { code: 'OVERLOADED', detail: /audit trail cannot record calls/ }, 'so is a re-auth frame')
  }
  t.equal(app.events.bus.subscriptions, 0)
  t.ok(app.audit.health().queueDepth <= depth, `no entry queued for them (${app.audit.health().queueDepth})`)
  for (const url of ['/healthz', '/metrics']) t.equal((await app.inject({ url })).statusCode, 200, `${url} is served: it is not audited`)
  t.not((await app.inject({ url: '/readyz' })).statusCode, 500)
})

t.test('neither PostgreSQL nor the spool\'s disk takes entries: the instance is not ready in either scope', async t => {
  // This instance refuses every call (503) while its own disk refuses the spool: the readiness
  // probe (?scope=instance) said 200 "degraded" (PostgreSQL is every replica's), and the load
  // balancer kept sending it calls that replicas whose spools take entries would have served.
  const dir = spoolDir(t)
  symlinkSync('/dev/full', join(dir, 'audit.spool'))
  const kernel = await startKernel({ port: 0, runDelayMs: 1 })
  t.teardown(() => kernel.close())
  const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl('test', await closedPort()), BFF_AUDIT_SPOOL_DIR: dir, BFF_AUDIT_QUEUE_MAX: 10, BFF_AUDIT_BATCH_SIZE: 5 }),
    { logger: false, kernelUrl: kernel.url, audit: { connectTimeoutMs: 200 } })
  t.teardown(() => app.close())
  await app.ready()
  const before = await app.inject({ url: '/readyz?scope=instance' })
  t.equal(before.statusCode, 200, 'PostgreSQL away alone: degraded, still ready')
  t.same(before.json().degraded, ['postgres'])
  for (let i = 0; i < 300; i++) {
    if ((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })).statusCode === 503) break
    await new Promise(resolve => setTimeout(resolve, 2))
  }
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })).statusCode, 503, 'every call refused')
  const instance = await app.inject({ url: '/readyz?scope=instance' })
  t.equal(instance.statusCode, 503, 'not ready: its own spool refuses')
  t.match(instance.json(), { status: 'not-ready', failing: ['audit'], degraded: ['postgres'] })
  t.match(instance.json().checks.audit, /^refusing calls: /)
  const all = await app.inject({ url: '/readyz' })
  t.equal(all.statusCode, 503)
  t.same(all.json().failing, ['postgres', 'audit'])
})

// A container restarted after a crash (a new PID namespace) finds its predecessor's lock fresh
// and watches it for two heartbeats (10 s), which Fastify's default plugin timeout (10 s) did not
// wait for: the restart failed ("Plugin did not start in time: 'mantle-audit'") until the lock
// was 30 s old, a crash loop instead of a takeover.
if (available) {
  t.test('a gateway that finds a fresh lock of another container takes the spool over at the real heartbeat, within its start', async t => {
    const name = await createTestDatabase(t)
    const dir = spoolDir(t)
    mkdirSync(dir, { recursive: true })
    // As the crashed container left it: this host, another PID namespace, touched just now.
    writeFileSync(join(dir, 'audit.lock'), `1 ${hostname()} pid:[4026500000] ${randomUUID()}`)
    const started = Date.now()
    const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: databaseUrl(name), BFF_AUDIT_SPOOL_DIR: dir }), { logger: false })
    t.teardown(() => app.close())
    await app.ready()
    t.ok(Date.now() - started >= 9000, 'it watched the lock for two heartbeats first')
    t.match(readFileSync(join(dir, 'audit.lock'), 'utf8'), new RegExp(`^${process.pid} `), 'and took it over')
    t.equal((await app.inject({ method: 'GET', url: '/readyz' })).statusCode, 200)
  })
}
