// Replaying the spool into PostgreSQL: what the metrics say of it.
import t from 'tap'
import { Spool } from '../../../plugins/audit/spool.js'
import { AuditWriter } from '../../../plugins/audit/writer.js'
import { until } from '../../helper.js'
import { postgresAvailable, spoolDir, pgStore, storedIds } from './db.js'
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
}
