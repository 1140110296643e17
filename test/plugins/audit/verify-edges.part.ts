// Verify at the edges of a walk: what retention does between the walk's reads.
import t from 'tap'
import type { AuditEntry, AuditPage, AuditQuery, AuditStore, ChainSource } from '../../../plugins/audit/entry.js'
import { MemoryAuditStore } from '../../../plugins/audit/memory-store.js'
import { PostgresAuditStore } from '../../../plugins/audit/postgres-store.js'
import { postgresAvailable, pgStore, sql, statementsOf } from './db.js'
import { entry } from './entries.js'
import { bearer, buildDemoApp, drained } from '../../helper.js'

/** Ten entries stamped one second apart from a minute ago. */
function ten (): { base: number, batch: AuditEntry[] } {
  const base = Date.now() - 60_000
  return { base, batch: Array.from({ length: 10 }, (_, i) => entry({ timestamp: base + i * 1000 })) }
}

/**
 * Runs `meanwhile` once, just before the walk's last read (where the range ends: the entry after
 * it, and the head): what another instance's retention committing between two of the walk's
 * statements does. The source is the store's own; only the moment is chosen.
 */
function beforeTheEnd (store: AuditStore, meanwhile: () => Promise<unknown>): void {
  const source = (store as unknown as { source: ChainSource }).source
  const tail = source.tail
  let once = false
  source.tail = async after => {
    if (!once) {
      once = true
      await meanwhile()
    }
    return await tail(after)
  }
}

// The walk read the range page by page, then the entry after it and the head in a statement of
// its own. Retention that removed the range and what follows it in between (the oldest entries,
// which a range of the oldest day holds, while the hourly run removes them) left that entry
// linked to retention's new anchor, not to the last entry walked: an intact chain was answered
// broken ("ok": false, naming the first entry kept).
if (await postgresAvailable()) {
  t.test('postgres: retention past a range\'s end before the walk reads the entry after it is no break', async t => {
    const { url, store } = await pgStore(t)
    const { base, batch } = ten()
    await store.write(batch)
    await sql(url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'2 days\' WHERE seq <= 6')
    beforeTheEnd(store, async () => { t.equal(await store.prune(86_400_000, 100), 6, 'retention removed the first six') })
    t.same(await store.verify({ to: new Date(base + 2000) }), { ok: true, checked: 3, firstBroken: null }, 'the three of the range walked, the rest links to the anchor')
    t.same(await store.verify({}), { ok: true, checked: 4, firstBroken: null }, 'the chain is whole')
  })

  t.test('postgres: a range with no entry, retention past it before the walk reads the entry after it', async t => {
    const { url, store } = await pgStore(t)
    const { base, batch } = ten()
    await store.write(batch)
    await sql(url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'2 days\' WHERE seq <= 6')
    beforeTheEnd(store, async () => await store.prune(86_400_000, 100))
    t.same(await store.verify({ from: new Date(base + 2500), to: new Date(base + 2600) }), { ok: true, checked: 0, firstBroken: null })
  })

  t.test('postgres: a change past the range is still found once retention moved meanwhile', async t => {
    const { url, store } = await pgStore(t)
    const { base, batch } = ten()
    await store.write(batch)
    await sql(url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'2 days\' WHERE seq <= 6')
    await sql(url, 'UPDATE bff_audit_entries SET status = \'FORGED\' WHERE seq = 7')
    beforeTheEnd(store, async () => await store.prune(86_400_000, 100))
    t.same(await store.verify({ to: new Date(base + 2000) }), { ok: false, checked: 3, firstBroken: { id: batch[6].id, requestId: batch[6].requestId } }, 'the entry after the anchor is held to its own hash')
  })
}

t.test('memory: retention past a range\'s end before the walk reads the entry after it is no break', async t => {
  const store = new MemoryAuditStore({ max: 100 })
  const { base, batch } = ten()
  await store.write(batch)
  beforeTheEnd(store, async () => { t.equal(await store.prune(Date.now() - (base + 5500), 100), 6) })
  t.same(await store.verify({ to: new Date(base + 2000) }), { ok: true, checked: 3, firstBroken: null })
})

// A range's start with more than three digits of a second's fraction: Date keeps the first three
// (…00.0005Z read as …00.000Z), and the stored timestamps are whole milliseconds, so the entry of
// that millisecond, which came before `from`, was answered as in the range.
t.test('GET /admin/audit: a from with a fraction finer than the millisecond leaves out the millisecond before it', async t => {
  const app = await buildDemoApp(t)
  const second = Date.UTC(2026, 0, 2, 3, 4, 5)
  for (const ms of [0, 1]) app.audit.enqueue(entry({ timestamp: second + ms, action: 'edge.probe' }))
  await drained(app)
  const at = (ms: string): string => encodeURIComponent(new Date(second).toISOString().replace('.000Z', ms + 'Z'))
  const times = async (query: string): Promise<string[]> => {
    const res = await app.inject({ method: 'GET', url: `/admin/audit?action=edge.probe${query}`, headers: bearer() })
    t.equal(res.statusCode, 200, res.body.slice(0, 200))
    return (res.json().entries as Array<{ timestamp: string }>).map(e => e.timestamp).sort()
  }
  t.same(await times(`&from=${at('.0005')}`), [new Date(second + 1).toISOString()], 'from …05.0005Z: not the entry of …05.000Z')
  t.same(await times(`&from=${at('.0010')}`), [new Date(second + 1).toISOString()], 'from …05.0010Z: the entry of …05.001Z')
  t.same(await times(`&from=${at('.0000')}`), [new Date(second).toISOString(), new Date(second + 1).toISOString()], 'from …05.0000Z: both')
  t.same(await times(`&to=${at('.0009')}`), [new Date(second).toISOString()], 'to …05.0009Z: the entry of …05.000Z only')
  t.same(await times(`&from=${at('.0005')}&to=${at('.0005')}`), [], 'a range within one millisecond holds no entry (not a reversed range)')
})

/** The statements `run` sends that read the audit entries, with their parameters. */
async function readsOf (run: () => Promise<unknown>): Promise<Array<{ text: string, values: unknown[] }>> {
  return await statementsOf(run, /^\s*SELECT[\s\S]*bff_audit_entries/)
}

interface PlanNode { 'Node Type': string, 'Index Name'?: string, 'Actual Rows': number, 'Actual Loops': number, 'Rows Removed by Filter'?: number, 'Rows Removed by Index Recheck'?: number, Plans?: PlanNode[] }

/** Each of `statements`' plan nodes, run (EXPLAIN ANALYZE). */
async function planNodes (url: string, statements: Array<{ text: string, values: unknown[] }>): Promise<PlanNode[]> {
  const nodes: PlanNode[] = []
  const walk = (n: PlanNode): void => { nodes.push(n); for (const c of n.Plans ?? []) walk(c) }
  for (const { text, values } of statements) walk((await sql<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(url, `EXPLAIN (ANALYZE, FORMAT JSON) ${text}`, values))[0]['QUERY PLAN'][0].Plan)
  return nodes
}

/** The rows PostgreSQL read and passed over running `statements` (EXPLAIN ANALYZE: Rows Removed by Filter, every node). */
async function passedOver (url: string, statements: Array<{ text: string, values: unknown[] }>): Promise<number> {
  return (await planNodes(url, statements)).reduce((sum, n) => sum + (n['Rows Removed by Filter'] ?? 0), 0)
}

/** The table's rows PostgreSQL read running `statements`, kept or passed over: every scan's, of every loop. */
async function rowsRead (url: string, statements: Array<{ text: string, values: unknown[] }>): Promise<number> {
  return (await planNodes(url, statements)).filter(n => n['Node Type'].endsWith('Scan') && n['Node Type'] !== 'Bitmap Index Scan')
    .reduce((sum, n) => sum + n['Actual Rows'] * n['Actual Loops'] + (n['Rows Removed by Filter'] ?? 0) + (n['Rows Removed by Index Recheck'] ?? 0), 0)
}

// GET /admin/audit?tenant=X, no time range: one statement, newest first by position, which
// PostgreSQL runs by the seq index backwards, filtering each row on its tenant, as if a tenant's
// entries were spread evenly over the table. A tenant whose entries are all old (one that has
// left, or is quiet) had the whole table read past for its first page: 0.43 s at a million rows,
// past the reads' 10 s timeout (503) at some twenty million, 90 days of a busy gateway. Read
// then in windows of the newest positions (60,003 rows passed over for that page at a million)
// and the rest through the (tenant_id) index, sorted (every entry of the tenant's below the
// windows read); migration 005's (tenant_id, seq) index serves the statement itself: the page's
// rows are the only ones read.
if (await postgresAvailable()) {
  t.test('postgres: GET /admin/audit by a tenant whose entries are nearly all old reads the page\'s rows alone, through the (tenant_id, seq) index', async t => {
    const { url, store } = await pgStore(t)
    // 150,000 entries; those of tenant "quiet" one in ten of the oldest 10,000, and the newest
    // three (a page of it: three among the newest, the rest far below them); those of tenant
    // "gone" the next 15,000 (a tenant of a tenth of the table, which has left).
    const quiet = (n: number): boolean => (n < 10_000 && n % 10 === 0) || n >= 149_997
    const tenant = (n: number): string => quiet(n) ? 'quiet' : n >= 10_000 && n < 25_000 ? 'gone' : `t${n % 20}`
    for (let i = 0; i < 150_000; i += 5000) {
      await store.write(Array.from({ length: 5000 }, (_, k) => entry({ tenantId: tenant(i + k) })))
    }
    await sql(url, 'ANALYZE bff_audit_entries')
    const expected = async (tenant: string, beforeSeq = 1e9): Promise<number[]> => (await sql<{ seq: string }>(url,
      'SELECT seq FROM bff_audit_entries WHERE tenant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT 50', [tenant, beforeSeq])).map(r => Number(r.seq))
    let page: AuditPage | undefined
    let reads = await readsOf(async () => { page = await store.query({ limit: 50, tenant: 'quiet' }) })
    const first = await passedOver(url, reads)
    t.ok(first <= 70_000, `${first} rows passed over`)
    t.equal(first, 0, 'no row passed over')
    const read = await rowsRead(url, reads)
    t.ok(read <= 51, `the page's rows and the one after it read, no other (${read})`)
    t.same((await planNodes(url, reads)).filter(n => n['Node Type'].endsWith('Scan')).map(n => `${n['Node Type']} ${n['Index Name']}`), ['Index Scan bff_audit_entries_tenant_id_seq_idx'], 'one scan, of the (tenant_id, seq) index')
    t.same(page?.entries.map(e => e.seq), await expected('quiet'), 'newest first, as SQL says')
    reads = await readsOf(async () => { page = await store.query({ limit: 50, tenant: 'quiet', beforeSeq: page?.nextSeq ?? 0 }) })
    const next = await passedOver(url, reads)
    t.ok(next <= 70_000, `its next page: ${next}`)
    const nextRead = await rowsRead(url, reads)
    t.ok(next === 0 && nextRead <= 51, `its next page reads its own rows alone (${next} passed over, ${nextRead} read)`)
    t.same(page?.entries.map(e => e.seq), await expected('quiet', (await expected('quiet'))[49]), 'the next page, as SQL says')
    // A tenant found among the newest.
    reads = await readsOf(async () => { page = await store.query({ limit: 50, tenant: 't3' }) })
    const busy = await passedOver(url, reads)
    t.ok(busy <= 2000, `a busy tenant: ${busy}`)
    const busyRead = await rowsRead(url, reads)
    t.ok(busy === 0 && busyRead <= 51, `a busy tenant reads its page's rows alone (${busy} passed over, ${busyRead} read)`)
    t.same(page?.entries.map(e => e.seq), await expected('t3'))
    // A tenant of a tenth of the table whose entries are all old: PostgreSQL, which takes a
    // tenant's entries to be spread evenly, read the seq index backwards for it (the 125,000
    // entries since passed over) where the (tenant_id, seq) index was there.
    reads = await readsOf(async () => { page = await store.query({ limit: 50, tenant: 'gone' }) })
    const gone = await passedOver(url, reads)
    const goneRead = await rowsRead(url, reads)
    t.ok(gone === 0 && goneRead <= 51, `a tenant that left reads its page's rows alone (${gone} passed over, ${goneRead} read)`)
    t.same(page?.entries.map(e => e.seq), await expected('gone'))
    t.same((await store.query({ limit: 50, tenant: 'nobody' })).entries, [], 'a tenant with no entry')
  })
}

// GET /admin/audit with a time range and a filter no index serves (`action`, `status`): past three
// windows of the newest positions, the rest of the range below the cursor was read through the
// timestamp index, on every page: a rare action over 89 days read 400,000 of a million rows for
// each page (past the reads' 10 s timeout, a 503, at tens of millions). A page now reads at most
// QUERY_SCAN positions (here 20,000) and, not full by then, is answered short with a cursor to go
// on. A tenant's page with a time range read its windows by the seq index too, passing over every
// other tenant's entries, then the rest of its range through an index and sorted it: each window
// now reads the tenant's entries alone, through the (tenant_id, seq) index.
if (await postgresAvailable()) {
  t.test('postgres: a page of GET /admin/audit with a time range reads a bounded span, and a tenant\'s its own entries', async t => {
    const { url } = await pgStore(t)
    const store = new PostgresAuditStore({ databaseUrl: url, queryScan: 20_000 })
    t.teardown(() => store.close())
    // 100,000 entries a second apart; action "rare" one in 1,600 (63 of them); tenant "gone"
    // the oldest 15,000 but one in ten.
    const base = Date.now() - 200_000_000
    const fill = (n: number): AuditEntry => entry({ timestamp: base + n * 1000, action: n % 1600 === 7 ? 'rare' : 'getAgent', tenantId: n < 15_000 && n % 10 !== 0 ? 'gone' : `t${n % 20}` })
    for (let i = 0; i < 100_000; i += 5000) await store.write(Array.from({ length: 5000 }, (_, k) => fill(i + k)))
    await sql(url, 'ANALYZE bff_audit_entries')
    const from = new Date(base)
    const all = async (where: string, params: unknown[]): Promise<number[]> => (await sql<{ seq: string }>(url,
      `SELECT seq FROM bff_audit_entries WHERE ${where} ORDER BY seq DESC`, params)).map(r => Number(r.seq))
    // Every page of the rare action over the whole range, walked with its cursors.
    const seen: number[] = []
    const reads: number[] = []
    let cursor: number | null | undefined
    for (let pages = 0; cursor !== null && pages < 20; pages++) {
      let page: AuditPage | undefined
      const statements = await readsOf(async () => { page = await store.query({ limit: 50, from, action: 'rare', beforeSeq: cursor ?? undefined }) })
      reads.push(await rowsRead(url, statements))
      seen.push(...(page?.entries.map(e => e.seq) ?? []))
      cursor = page?.nextSeq ?? null
    }
    t.same(seen, await all('action = $1', ['rare']), 'the pages walked hold every entry of it, newest first, once')
    t.ok(reads.length > 1 && reads.every(n => n <= 20_100), `each page read at most its 20,000 positions (rows read: ${reads.join(', ')})`)
    // A tenant that left, over the whole range: its own entries alone.
    let page: AuditPage | undefined
    let statements = await readsOf(async () => { page = await store.query({ limit: 50, from, tenant: 'gone' }) })
    const gone = await all('tenant_id = $1', ['gone'])
    t.same(page?.entries.map(e => e.seq), gone.slice(0, 50), 'its newest 50')
    let read = await rowsRead(url, statements)
    t.ok(read <= 51 + 4, `its first page read its rows alone (and the table's and the range's ends: 4) (${read})`)
    statements = await readsOf(async () => { page = await store.query({ limit: 50, from, tenant: 'gone', beforeSeq: page?.nextSeq ?? 0 }) })
    t.same(page?.entries.map(e => e.seq), gone.slice(50, 100), 'its next 50')
    read = await rowsRead(url, statements)
    t.ok(read <= 51 + 4, `its next page too (${read})`)
    // A range far below the newest entry (its oldest 40,000 seconds, 60,000 positions above it):
    // read whole through the timestamp index, a page of a rare action read every row of the range
    // (40,000; a month of a busy gateway's 90 days: tens of millions, a 503), past the positions
    // it may read. Its pages read at most those, short or empty, as any other page of it.
    const old = new Date(base + 40_000 * 1000 - 1)
    seen.length = 0
    reads.length = 0
    cursor = undefined
    for (let pages = 0; cursor !== null && pages < 20; pages++) {
      let page: AuditPage | undefined
      const statements = await readsOf(async () => { page = await store.query({ limit: 50, from, to: old, action: 'rare', beforeSeq: cursor ?? undefined }) })
      reads.push(await rowsRead(url, statements))
      seen.push(...(page?.entries.map(e => e.seq) ?? []))
      cursor = page?.nextSeq ?? null
    }
    t.same(seen, await all('action = $1 AND "timestamp" <= $2', ['rare', old]), 'a range far below: the pages walked hold every entry of it, newest first, once')
    t.ok(reads.every(n => n <= 20_100), `a range far below: each page read at most its 20,000 positions (rows read: ${reads.join(', ')})`)
    // A range that starts past the oldest entry (its newest 60,000 seconds): once its windows reached
    // the range's first position, the entries below it (stamped out of order) were read through the
    // timestamp index, every entry of the range (60,000), on the walk's last page.
    const recent = new Date(base + 40_000 * 1000)
    seen.length = 0
    reads.length = 0
    cursor = undefined
    for (let pages = 0; cursor !== null && pages < 20; pages++) {
      let page: AuditPage | undefined
      const statements = await readsOf(async () => { page = await store.query({ limit: 50, from: recent, action: 'rare', beforeSeq: cursor ?? undefined }) })
      reads.push(await rowsRead(url, statements))
      seen.push(...(page?.entries.map(e => e.seq) ?? []))
      cursor = page?.nextSeq ?? null
    }
    t.same(seen, await all('action = $1 AND "timestamp" >= $2', ['rare', recent]), 'a range past the oldest entry: the pages walked hold every entry of it, newest first, once')
    t.ok(reads.every(n => n <= 20_100), `a range past the oldest entry: each page read at most its 20,000 positions (rows read: ${reads.join(', ')})`)
  })
}

// GET /admin/audit?action=X (or status) with no time range: one statement, newest first by
// position, which PostgreSQL runs by the seq index (or the whole table, then sorted), filtering
// each row: an action found rarely or never, or the last page of any rare one, had the whole
// table read (a million rows, 0.2 s at a million; past the reads' 10 s timeout, a 503, at tens of
// millions). A page of it now reads at most QUERY_SCAN positions (here 20,000), windows as with
// a time range, and, not full by then, is answered short with a cursor to go on.
if (await postgresAvailable()) {
  t.test('postgres: a page of GET /admin/audit by action or status with no time range reads a bounded span', async t => {
    const { url } = await pgStore(t)
    const store = new PostgresAuditStore({ databaseUrl: url, queryScan: 20_000 })
    t.teardown(() => store.close())
    // 100,000 entries; action "rare" one in 1,600 (63 of them), status FORBIDDEN one in 2,000.
    const fill = (n: number): AuditEntry => entry({ action: n % 1600 === 7 ? 'rare' : 'getAgent', status: n % 2000 === 3 ? 'FORBIDDEN' : 'ok', tenantId: `t${n % 20}` })
    for (let i = 0; i < 100_000; i += 5000) await store.write(Array.from({ length: 5000 }, (_, k) => fill(i + k)))
    await sql(url, 'ANALYZE bff_audit_entries')
    const all = async (where: string, params: unknown[]): Promise<number[]> => (await sql<{ seq: string }>(url,
      `SELECT seq FROM bff_audit_entries WHERE ${where} ORDER BY seq DESC`, params)).map(r => Number(r.seq))
    /** Every page of `q`, walked with its cursors: the entries' positions, and the rows each page read. */
    const walk = async (q: Omit<AuditQuery, 'limit' | 'beforeSeq'>): Promise<{ seen: number[], reads: number[] }> => {
      const seen: number[] = []
      const reads: number[] = []
      let cursor: number | null | undefined
      for (let pages = 0; cursor !== null && pages < 20; pages++) {
        let page: AuditPage | undefined
        const statements = await readsOf(async () => { page = await store.query({ limit: 50, ...q, beforeSeq: cursor ?? undefined }) })
        reads.push(await rowsRead(url, statements))
        seen.push(...(page?.entries.map(e => e.seq) ?? []))
        cursor = page?.nextSeq ?? null
      }
      return { seen, reads }
    }
    for (const [q, where, params] of [[{ action: 'rare' }, 'action = $1', ['rare']], [{ status: 'FORBIDDEN' }, 'status = $1', ['FORBIDDEN']], [{ action: 'none' }, 'action = $1', ['none']]] as const) {
      const { seen, reads } = await walk(q)
      t.same(seen, await all(where, [...params]), `${JSON.stringify(q)}: the pages walked hold every entry of it, newest first, once`)
      t.ok(reads.every(n => n <= 20_100), `${JSON.stringify(q)}: each page read at most its 20,000 positions (rows read: ${reads.join(', ')})`)
    }
  })
}

// A cursor above the newest entry (one kept across a restore of an older backup, or made by
// hand: the endpoint takes any position) on a page by `action` or `status`: its windows started
// at the cursor, so the page read only positions that hold nothing and answered empty with a
// cursor a million positions lower, page after page (some nine billion of them from 2^53), where
// the memory store, and a page with no action or status, answer the entries below it.
if (await postgresAvailable()) {
  t.test('postgres: a page by action or status with a cursor above the newest entry answers the entries below it', async t => {
    const { url } = await pgStore(t)
    const store = new PostgresAuditStore({ databaseUrl: url, queryScan: 10_000 })
    t.teardown(() => store.close())
    // 12,000 entries a second apart, action "rare" one in 1,000: a range of all of them spans more
    // positions than a page may read.
    const base = Date.now() - 100_000_000
    await store.write(Array.from({ length: 12_000 }, (_, n) => entry({ timestamp: base + n * 1000, action: n % 1000 === 0 ? 'rare' : 'getAgent' })))
    await sql(url, 'ANALYZE bff_audit_entries')
    const want = (await sql<{ seq: string }>(url, 'SELECT seq FROM bff_audit_entries WHERE action = $1 ORDER BY seq DESC', ['rare'])).map(r => Number(r.seq))
    const far = Number.MAX_SAFE_INTEGER
    for (const q of [{ action: 'rare' }, { action: 'rare', from: new Date(base) }, { action: 'rare', status: 'ok', to: new Date(base + 12_000_000) }]) {
      // Walked from it, a page holding what lies below the cursor (and at most 10,000 positions).
      const seen: number[] = []
      let cursor: number | null = far
      for (let pages = 0; cursor !== null && pages < 5; pages++) {
        const page: AuditPage = await store.query({ limit: 50, ...q, beforeSeq: cursor })
        seen.push(...page.entries.map(e => e.seq))
        cursor = page.nextSeq
      }
      t.same(seen, want, `${JSON.stringify(q)}: the entries below it, in two pages`)
      t.equal(cursor, null, `${JSON.stringify(q)}: and the end`)
    }
  })
}
