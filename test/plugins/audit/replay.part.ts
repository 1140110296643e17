// Replaying the spool into PostgreSQL: what the metrics say of it.
import t from 'tap'
import { Spool } from '../../../plugins/audit/spool.js'
import { AuditWriter } from '../../../plugins/audit/writer.js'
import { until } from '../../helper.js'
import { PostgresAuditStore } from '../../../plugins/audit/postgres-store.js'
import { startTcpProxy } from '../../proxy.js'
import { postgresAvailable, spoolDir, pgStore, storedIds, createTestDatabase, databaseUrl, PG_PORT } from './db.js'
import { entry, quiet } from './entries.js'

const available = await postgresAvailable()
if (!available) t.comment('PostgreSQL is not reachable on 127.0.0.1:5432: skipped (CI fails instead)')

if (available) {
  t.test('replayed counts the entries a replay stored, not those already stored (a crash between the commit and the cut)', async t => {
    const { url, store } = await pgStore(t)
    const dir = spoolDir(t)
    const committed = [entry(), entry(), entry()]
    const fresh = [entry(), entry()]
    // An earlier process stored `committed`, then died before cutting it from its spool.
    await store.write(committed)
    const before = await Spool.open(dir)
    await before.append(committed)
    await before.append([committed[2], ...fresh])
    await before.close()

    const spool = await Spool.open(dir)
    const counts = { replayed: 0, stored: 0 }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 1000, intervalMs: 5, log: quiet, hooks: { replayed: n => { counts.replayed += n }, stored: n => { counts.stored += n } } })
    t.teardown(async () => { await writer.close(); await spool.close() })
    const live = entry()
    writer.enqueue(live)
    await until(() => spool.size === 0 && counts.stored === 1, 'the spool replayed and the live entry stored')
    t.same(await storedIds(url), [...committed, ...fresh, live].map(e => e.id), 'each once, in order')
    t.equal(counts.replayed, fresh.length, 'only the entries the replay stored')
  })

  // A write whose COMMIT PostgreSQL carried out, but whose answer never came (the connection
  // went, or the answer came past the query timeout), looks failed: its batch is spooled, and the
  // replay finds its entries stored and skips them. They were counted spooled, and then neither
  // stored nor replayed: the metrics never said the store had them (spooled minus replayed read
  // as entries still waiting, or lost).
  t.test('entries a lost COMMIT answer had stored are counted stored once, by the replay that finds them stored', async t => {
    const direct = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const proxy = await startTcpProxy(t, PG_PORT)
    const store = new PostgresAuditStore({ databaseUrl: databaseUrl(new URL(direct).pathname.slice(1), proxy.port), queryTimeoutMs: 500 })
    t.teardown(() => store.close())
    // The first COMMIT reaches PostgreSQL (a query of its own, ended by its NUL; not the BEGIN's
    // READ COMMITTED); its answer is held back until restore().
    let lost = false
    proxy.watch(chunk => { if (!lost && chunk.includes('COMMIT\0')) { lost = true; proxy.delay(600_000) } })
    const spool = await Spool.open(spoolDir(t))
    const counts = { stored: 0, spooled: 0, replayed: 0, replays: 0 }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 1000, intervalMs: 5, log: quiet, hooks: { stored: n => { counts.stored += n }, found: n => { counts.stored += n }, spooled: n => { counts.spooled += n }, replayed: n => { counts.replayed += n; counts.replays++ } } })
    t.teardown(async () => { await writer.close(); await spool.close() })
    const batch = [entry(), entry(), entry()]
    for (const e of batch) writer.enqueue(e)
    await until(() => counts.spooled === 3, 'the batch spooled, its COMMIT unanswered')
    t.same(await storedIds(direct), batch.map(e => e.id), 'the COMMIT went through')
    proxy.restore()
    await until(() => counts.replays > 0 && spool.size === 0, 'the spool replayed')
    t.same(await storedIds(direct), batch.map(e => e.id), 'each once')
    t.same({ stored: counts.stored, spooled: counts.spooled, replayed: counts.replayed }, { stored: 3, spooled: 3, replayed: 0 }, 'stored once (by the write whose answer was lost), not replayed: the replay stored none')
  })
}
