// The audit database's migrations (plugins/audit/migrations.ts, scripts/migrate.ts) against the
// real PostgreSQL: the lock, what a run leaves when it fails, the undo steps that would destroy
// entries, a database newer than this release, a build without its SQL files, and a schema of
// its own per deployment. (The commands' ordinary path: postgres.test.ts.)
import t from 'tap'
import pg from 'pg'
import { spawnSync } from 'node:child_process'
import { cpSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { createServer, connect, type Socket, type AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { buildApp } from '../../../app.js'
import { testConfig, SECRET, until } from '../../helper.js'
import { migrate, migrationStatus } from '../../../plugins/audit/migrations.js'
import { PostgresAuditStore } from '../../../plugins/audit/postgres-store.js'
import { main as migrateMain } from '../../../scripts/migrate.js'
import { postgresAvailable, createTestDatabase, databaseUrl, sql, spoolDir, PG_URL, PG_PORT, MIGRATE_SOURCES } from './db.js'
import { entry } from './entries.js'
import { startTcpProxy } from '../../proxy.js'

interface Teardown { teardown: (fn: () => unknown) => void }

/** `p`, or a rejection naming `what` once `ms` have passed (the old lock waited for ever). */
async function within<T> (p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => { reject(new Error(`${what}: still waiting after ${ms} ms`)) }, ms) })
  try {
    return await Promise.race([p, late])
  } finally {
    clearTimeout(timer)
  }
}

/**
 * A stand-in for a transaction-mode pooler (PgBouncer): it keeps the server connection when the
 * client leaves (it swallows the client's Terminate message), as a pooler keeps it for the next
 * client; whatever the session held stays held.
 */
async function startPooler (t: Teardown): Promise<number> {
  const TERMINATE = Buffer.from([0x58, 0, 0, 0, 4])
  const kept = new Set<Socket>()
  const server = createServer(client => {
    const upstream = connect(PG_PORT, '127.0.0.1')
    kept.add(upstream)
    upstream.on('error', () => {})
    client.on('error', () => {})
    upstream.on('data', chunk => { if (!client.destroyed) client.write(chunk) })
    client.on('data', (chunk: Buffer) => {
      const out = chunk.subarray(chunk.length - 5).equals(TERMINATE) ? chunk.subarray(0, chunk.length - 5) : chunk
      if (out.length > 0) upstream.write(out)
    })
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const s of kept) s.destroy()
    await new Promise(resolve => server.close(resolve))
  })
  return (server.address() as AddressInfo).port
}

/** The migration lock's holders and waiters on the database of `url`. */
const migrationLocks = async (url: string): Promise<Array<{ granted: boolean, pid: number }>> => await sql(url,
  "SELECT granted, pid FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND classid = 28001 AND objid = 1853123685 AND objsubid = 1")
const versions = async (url: string): Promise<number[]> => (await sql<{ version: string }>(url, 'SELECT version FROM bff_schema_version ORDER BY version')).map(r => Number(r.version))
const hashIndex = async (url: string): Promise<string> => (await sql<{ method: string }>(url,
  "SELECT am.amname AS method FROM pg_class c JOIN pg_am am ON am.oid = c.relam WHERE c.relname = 'bff_audit_entries_hash_idx'"))[0].method

/** A client of its own, in an open transaction that holds `lock`; ended at teardown. */
async function holding (t: Teardown, url: string, lock: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  t.teardown(async () => { await client.end().catch(() => {}) })
  await client.query('BEGIN')
  await client.query(lock)
  return client
}

const available = await postgresAvailable()
if (!available) t.comment('PostgreSQL is not reachable on 127.0.0.1:5432: skipped (CI fails instead)')

if (available) {
  // The lock was session-level, released by closing the connection: behind a pooler the server
  // connection stayed, holding it, and the next migrate waited for it with no end.
  t.test('the migration lock is the transaction\'s: behind a pooler that keeps the connection it is released at COMMIT and at ROLLBACK', async t => {
    const name = await createTestDatabase(t)
    const direct = databaseUrl(name)
    const pooled = databaseUrl(name, await startPooler(t))
    t.match(await within(migrate(pooled), 20_000, 'up'), { from: 0, to: 5 })
    t.same(await migrationLocks(direct), [], 'released when the migration committed, the connection kept')
    t.match(await within(migrate(pooled), 5000, 'the next up'), { from: 5, to: 5, ran: [] }, 'the next migrate takes it at once')
    // A failed run: 002's undo refuses while entries are stored.
    const store = new PostgresAuditStore({ databaseUrl: direct })
    t.teardown(() => store.close())
    await store.write([entry()])
    await t.rejects(within(migrate(pooled, 1), 5000, 'down 1'), /migration 002 is not undone/)
    t.same(await migrationLocks(direct), [], 'released when the failed migration rolled back, the connection kept')
    t.same(await versions(direct), [0, 1, 2, 3, 4, 5], 'nothing of the failed run is left: 005, 004 and 003 were undone and rolled back with it')
  })

  t.test('while a migration runs, its transaction holds the lock; a failed run leaves the database as it was; every wait is bounded', async t => {
    const url = databaseUrl(await createTestDatabase(t))
    await migrate(url, 2)
    // A writer holds the table: 003's DROP INDEX waits for it.
    const writer = await holding(t, url, 'LOCK TABLE bff_audit_entries IN ROW EXCLUSIVE MODE')
    const running = migrate(url)
    let locks: Array<{ granted: boolean, pid: number }> = []
    for (let i = 0; i < 200 && locks.length === 0; i++) { locks = await migrationLocks(url); await new Promise(resolve => setTimeout(resolve, 20)) }
    t.match(locks, [{ granted: true }], 'the migration holds the lock')
    // Until it waits for the writer's table (DROP INDEX): between the lock and that statement the
    // session is 'idle in transaction' for a moment, which a busy CI machine stretched (seen twice).
    let activity: { state: string, in_transaction: boolean } | undefined
    for (let i = 0; i < 200 && activity?.state !== 'active'; i++) {
      [activity] = await sql<{ state: string, in_transaction: boolean }>(url, 'SELECT state, xact_start IS NOT NULL AS in_transaction FROM pg_stat_activity WHERE pid = $1', [locks[0].pid])
      if (activity?.state !== 'active') await new Promise(resolve => setTimeout(resolve, 20))
    }
    t.same(activity, { state: 'active', in_transaction: true }, 'in its transaction')
    t.match(await within(migrationStatus(url), 5000, 'status'), { current: 2, max: 5, pending: [3, 4, 5] }, 'status takes no lock, and sees nothing of the running migration')
    await t.rejects(within(migrate(url, undefined, { lockTimeoutMs: 200 }), 5000, 'a second migrate'), /^another migration of this database is running: the migration lock was not free after 200 ms/, 'a second migration waits for the lock no longer than its lock_timeout')
    await writer.query('ROLLBACK')
    t.match(await within(running, 20_000, 'the migration'), { from: 2, to: 5 })
    t.same(await migrationLocks(url), [], 'released')

    // A run that fails half-way: 003 is applied, and 004's version row waits past the lock_timeout
    // for another transaction's (a wait for a row, and a table's lock, are bounded too).
    await migrate(url, 2)
    const rival = await holding(t, url, "INSERT INTO bff_schema_version (version, name) VALUES (4, 'rival')")
    await t.rejects(within(migrate(url, undefined, { lockTimeoutMs: 300 }), 10_000, 'up'), /^a migration waited 300 ms for a lock another transaction holds \(on a table or a row\) and was rolled back/)
    await rival.query('ROLLBACK')
    t.same(await versions(url), [0, 1, 2], 'no version row of the failed run')
    t.equal(await hashIndex(url), 'btree', '003\'s change is rolled back with it')
    t.match(await migrate(url), { from: 2, to: 5 })
    t.equal(await hashIndex(url), 'hash')
  })

  // down 1 with entries stored, then up, failed ("column seq contains null values") and left the
  // database at 1 (the gateway spooled everything); down 0 dropped the whole trail.
  t.test('undo steps that would destroy entries refuse while the table holds any; a refused run changes nothing', async t => {
    const url = databaseUrl(await createTestDatabase(t))
    await migrate(url)
    const store = new PostgresAuditStore({ databaseUrl: url })
    t.teardown(() => store.close())
    await store.write([entry(), entry()])
    await t.rejects(migrateMain(['down', '1'], { DATABASE_URL: url }), /^migration 002 is not undone while bff_audit_entries holds entries: it would drop their hash chain \(seq\), which cannot be rebuilt\. Keep version 2 or above, or copy the entries elsewhere and delete them first/)
    t.equal(await migrateMain(['status'], { DATABASE_URL: url }), 'version 5 of 5; pending: none', 'still at 5: the undo steps run before it are rolled back')
    await t.rejects(migrateMain(['down', '0'], { DATABASE_URL: url }), /^migration 002 is not undone/)
    t.match(await migrateMain(['down', '2'], { DATABASE_URL: url }), /^migrated down from 5 to 2/, 'the index steps undo with entries')
    t.match(await migrateMain(['up'], { DATABASE_URL: url }), /^migrated up from 2 to 5/)
    t.equal((await store.verify({})).ok, true, 'the chain is whole')
    await sql(url, 'DELETE FROM bff_audit_entries')
    t.match(await migrateMain(['down', '1'], { DATABASE_URL: url }), /^migrated down from 5 to 1/, 'an empty table: 002 undoes')
    await sql(url, "INSERT INTO bff_audit_entries (id, request_id, \"timestamp\", hash, previous_hash, tenant_id, user_id, protocol, action, category, risk_level, status, status_code, duration_ms) VALUES (gen_random_uuid(), 'r', now(), 'h', 'p', 't', 'u', 'rest', 'a', 'read', 'low', 'ok', 200, 1)")
    await t.rejects(migrateMain(['down', '0'], { DATABASE_URL: url }), /^migration 001 is not undone while bff_audit_entries holds entries: it would drop the audit trail/)
    t.equal((await sql(url, 'SELECT 1 FROM bff_audit_entries')).length, 1, 'the entry is kept')
    await sql(url, 'DELETE FROM bff_audit_entries')
    t.match(await migrateMain(['down', '0'], { DATABASE_URL: url }), /^migrated down from 1 to 0/)
  })

  // `up 3` migrated to the newest version (an operator who meant to stop short of 004's index
  // rebuild got it), and `status` or `down 1` with a stray word ran as without it: a word a command
  // does not take is refused before anything runs.
  t.test('a word a command does not take is refused, and nothing runs', async t => {
    const url = databaseUrl(await createTestDatabase(t))
    await t.rejects(migrateMain(['up', '3'], { DATABASE_URL: url }), /^up takes no version \(it migrates to the newest\): got "3"; use up, down \[version\] or status$/)
    t.same(await migrationStatus(url), { current: 0, max: 5, pending: [1, 2, 3, 4, 5] }, 'nothing migrated')
    await migrate(url)
    await t.rejects(migrateMain(['down', '2', '1'], { DATABASE_URL: url }), /^down takes one version at most: got "2" "1"; use up, down \[version\] or status$/)
    await t.rejects(migrateMain(['status', 'now'], { DATABASE_URL: url }), /^status takes nothing: got "now"; use up, down \[version\] or status$/)
    t.same(await versions(url), [0, 1, 2, 3, 4, 5], 'nothing undone')
  })

  // A rolled-back deploy: down said "from 5 to 5 (nothing to do)", and down 3 ran 004's undo,
  // said "from 5 to 5" and left 0,1,2,3,5, after which up never applied 004 again.
  t.test('a database newer than this release: down refuses, status says so, up and a production start accept it', async t => {
    const url = databaseUrl(await createTestDatabase(t))
    await migrate(url)
    await sql(url, "INSERT INTO bff_schema_version (version, name, md5, run_at) VALUES (6, 'from-a-newer-release', 'x', now())")
    const NEWER = /^the database is at version 6, newer than this release \(its newest migration is 5\): run down from the release that has migration 6$/
    await t.rejects(migrateMain(['down'], { DATABASE_URL: url }), NEWER)
    await t.rejects(migrateMain(['down', '3'], { DATABASE_URL: url }), NEWER)
    await t.rejects(migrate(url, 3), NEWER, 'migrate() itself refuses')
    t.same(await versions(url), [0, 1, 2, 3, 4, 5, 6], 'nothing undone')
    t.equal(await migrateMain(['status'], { DATABASE_URL: url }), 'version 6 of 5; pending: none (the database is newer than this release, whose newest migration is 5)')
    t.equal(await migrateMain(['up'], { DATABASE_URL: url }), 'migrated up from 6 to 6 (nothing to do)')
    const app = await buildApp(testConfig({ NODE_ENV: 'production', BFF_JWT_SECRET: SECRET, BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t) }), { logger: false })
    t.teardown(() => app.close())
    await app.ready()
    t.equal(app.audit.health().store, 'postgres', 'production starts on it')
  })

  // In a LATIN1 database, an entry holding a character LATIN1 lacks ('€', '中': a tag, a tenant of
  // a published event) was refused (22P05) and taken out of the trail into the quarantine file.
  t.test('a database not in UTF8: migrate, status and a start refuse it, naming its encoding', async t => {
    const url = databaseUrl(await createTestDatabase(t, { encoding: 'LATIN1' }))
    const REFUSED = /^the audit database's encoding is LATIN1: it must be UTF8 .*ENCODING 'UTF8'$/
    await t.rejects(migrate(url), REFUSED)
    await t.rejects(migrateMain(['status'], { DATABASE_URL: url }), REFUSED)
    await t.rejects(migrateMain(['up'], { DATABASE_URL: url }), REFUSED)
    t.same(await sql(url, "SELECT to_regclass('bff_audit_entries') AS t"), [{ t: null }], 'nothing migrated')
    for (const NODE_ENV of ['development', 'production']) {
      await t.rejects(buildApp(testConfig({ NODE_ENV, BFF_JWT_SECRET: SECRET, BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t) }), { logger: false }), REFUSED, `${NODE_ENV}: the gateway does not start`)
    }
  })

  // A spool directory the gateway cannot use stopped the start with Node's words alone ("EEXIST:
  // file already exists, mkdir '/tmp/afile'"), where every bad setting is named by its variable.
  t.test('a spool directory the gateway cannot make stops the start naming BFF_AUDIT_SPOOL_DIR', async t => {
    const url = databaseUrl(await createTestDatabase(t))
    const file = join(spoolDir(t), 'a-file')
    writeFileSync(file, 'x')
    await t.rejects(buildApp(testConfig({ BFF_JWT_SECRET: SECRET, BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: file }), { logger: false }), { name: 'ConfigError', message: /^BFF_AUDIT_SPOOL_DIR=.*a-file: EEXIST/ })
  })

  // postgrator found the version table by its name in any schema: a second deployment in another
  // schema of the same database (search_path in DATABASE_URL) took the first one's for its own.
  t.test('two deployments in two schemas of one database migrate each its own', async t => {
    const name = await createTestDatabase(t)
    await sql(databaseUrl(name), 'CREATE SCHEMA one; CREATE SCHEMA two')
    const inSchema = (schema: string): string => databaseUrl(name) + '?options=' + encodeURIComponent(`-c search_path=${schema}`)
    t.match(await migrate(inSchema('one')), { from: 0, to: 5 })
    t.match(await migrate(inSchema('two')), { from: 0, to: 5 })
    t.same(await versions(inSchema('two')), [0, 1, 2, 3, 4, 5])
    const tables = await sql<{ t: string }>(databaseUrl(name), "SELECT schemaname || '.' || tablename AS t FROM pg_tables WHERE tablename LIKE 'bff_%' ORDER BY 1")
    t.same(tables.map(r => r.t), ['one.bff_audit_chain', 'one.bff_audit_entries', 'one.bff_schema_version', 'two.bff_audit_chain', 'two.bff_audit_entries', 'two.bff_schema_version'])
    t.match(await migrationStatus(inSchema('two')), { current: 5, pending: [] })
    t.match(await migrate(inSchema('one'), 3), { from: 5, to: 3 })
    t.match(await migrationStatus(inSchema('two')), { current: 5 }, 'the other deployment\'s version is its own')
  })

  // A PostgreSQL (or a pooler: PgBouncer waiting for a server connection) that takes the
  // connection and then answers nothing: the schema's check waited for ever. A gateway's start-up
  // failed after 30 s with Fastify's "Plugin did not start in time: 'mantle-audit'", where one
  // whose PostgreSQL is down starts and spools; `npm run migrate -- status` never ended.
  t.test('a PostgreSQL that answers nothing: the check fails in bounded time, and the gateway starts spooling', async t => {
    const name = await createTestDatabase(t, { migrated: true })
    const proxy = await startTcpProxy(t, PG_PORT, new URL(PG_URL).hostname)
    proxy.holdSends(chunk => chunk.toString('latin1').includes('server_encoding'))
    const url = databaseUrl(name, proxy.port)
    const runs: Array<[string, () => Promise<unknown>]> = [['status', async () => await migrationStatus(url, { answerTimeoutMs: 300 })], ['migrate', async () => await migrate(url, undefined, { answerTimeoutMs: 300 })]]
    for (const [what, run] of runs) {
      const started = performance.now()
      await t.rejects(within(run(), 10_000, what), /^PostgreSQL did not answer within 300 ms/, what)
      t.ok(performance.now() - started < 5000, `${what} gave up in ${Math.round(performance.now() - started)} ms`)
    }
    const started = performance.now()
    const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t) }), { logger: false })
    t.teardown(() => app.close())
    await within((async () => { await app.ready() })(), 25_000, 'the start')
    t.ok(performance.now() - started < 25_000, `started in ${Math.round(performance.now() - started)} ms`)
    t.equal(app.audit.health().up, false, 'PostgreSQL is taken as unreachable: entries are spooled')
  })

  // Outside production the start-up migrates, within Fastify's 30 s for the audit plugin: a
  // migration that took longer (an index built on a large table), or an instance waiting for
  // another's, failed the start with "Plugin did not start in time: 'mantle-audit'", and the
  // migration was rolled back with the process, to be started again, and cut again, at each restart.
  t.test('a start-up migration that takes its time: the gateway starts spooling, and the migration ends meanwhile', async t => {
    const url = databaseUrl(await createTestDatabase(t))
    // Another migration holds the lock (an instance starting at once, its migration a long one).
    const other = await holding(t, url, 'SELECT pg_advisory_xact_lock(120265232378981)')
    const started = performance.now()
    const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t) }), { logger: false, audit: { schemaWaitMs: 1000, probeIntervalMs: 100, flushIntervalMs: 50 } })
    t.teardown(() => app.close())
    await within((async () => { await app.ready() })(), 20_000, 'the start')
    t.ok(performance.now() - started < 10_000, `started in ${Math.round(performance.now() - started)} ms`)
    t.equal(app.audit.health().up, false, 'entries are spooled meanwhile')
    await other.query('COMMIT')
    await until(() => app.audit.health().up, 'the audit store up once the migration has run', 15_000)
    t.same(await versions(url), [0, 1, 2, 3, 4, 5], 'migrated')
  })

  // Without dist/migrations, status said "version 0 of -Infinity", up "nothing to do" (exit 0),
  // and a production gateway started and spooled every entry.
  t.test('a build without its migrations refuses: no migrations found', async t => {
    const root = fileURLToPath(new URL('../../../', import.meta.url))
    const base = mkdtempSync(join(tmpdir(), 'mantle-no-migrations-'))
    t.teardown(() => rmSync(base, { recursive: true, force: true }))
    for (const file of [...MIGRATE_SOURCES, 'package.json']) cpSync(join(root, file), join(base, file))
    symlinkSync(join(root, 'node_modules'), join(base, 'node_modules'))
    for (const command of ['status', 'up']) {
      const run = spawnSync(process.execPath, ['--import', 'tsx', 'scripts/migrate.ts', command], { cwd: base, env: { ...process.env, DATABASE_URL: PG_URL }, encoding: 'utf8', timeout: 60_000 })
      t.equal(run.status, 1, `${command} exits 1`)
      t.match(run.stderr, `migrate: no migrations found in ${join(base, 'migrations')}`, command)
    }
  })
}
