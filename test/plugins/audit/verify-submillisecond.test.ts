import t from 'tap'
import { randomUUID } from 'node:crypto'
import type { AuditEntry } from '../../../plugins/audit/index.js'
import { PostgresAuditStore } from '../../../plugins/audit/postgres-store.js'
import { migrate } from '../../../plugins/audit/migrations.js'
import { postgresAvailable, createTestDatabase, databaseUrl, sql } from './db.js'

// The hash covers an entry's timestamp to the millisecond, as the gateway writes it, but the
// column (timestamptz) keeps microseconds, which Date drops when a row is read back. A timestamp
// that is not a whole millisecond was changed after the write: verify reports that row, although
// its hash, computed from the millisecond, would still match.
if (await postgresAvailable()) {
  t.test('verify: a stored timestamp changed by less than a millisecond is a changed row', async t => {
    const url = databaseUrl(await createTestDatabase(t))
    await migrate(url)
    const store = new PostgresAuditStore({ databaseUrl: url })
    t.teardown(() => store.close())
    const entry = (): AuditEntry => ({ id: randomUUID(), requestId: randomUUID(), timestamp: Date.now(), tenantId: 't1', userId: 'u1', method: 'GET', path: '/api/v1/agents/:id', protocol: 'rest', action: 'getAgent', category: 'read', riskLevel: 'none', status: 'ok', statusCode: 200, durationMs: 1, metadata: {} })
    const batch = [entry(), entry(), entry()]
    await store.write(batch)
    t.same(await store.verify({}), { ok: true, checked: 3, firstBroken: null })
    await sql(url, "UPDATE bff_audit_entries SET \"timestamp\" = \"timestamp\" + interval '999 microseconds' WHERE seq = 2")
    t.same(await store.verify({}), { ok: false, checked: 2, firstBroken: { id: batch[1].id, requestId: batch[1].requestId } })
    // The query path still answers the timestamp to the millisecond, as it did.
    const page = await store.query({ limit: 10, requestId: batch[1].requestId })
    t.equal(page.entries[0].timestamp, batch[1].timestamp)
  })
}
