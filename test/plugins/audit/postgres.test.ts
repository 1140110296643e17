import t, { type Test } from 'tap'
import pg from 'pg'
import { randomUUID } from 'node:crypto'
import { spawnSync } from 'node:child_process'
import { cpSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FastifyInstance } from 'fastify'
import { buildApp } from '../../../app.js'
import { ConfigError } from '../../../schemas/config.js'
import { startKernel } from '../../../kernel/server.js'
import { testConfig, bearer, drained, until, SECRET } from '../../helper.js'
import { connect } from '../../adapters/websocket-helper.js'
import { postgresAvailable, createTestDatabase, databaseUrl, sql, spoolDir, startPoolerProxy, statementsOf, PG_URL, MIGRATE_SOURCES } from './db.js'
import { main as migrateMain } from '../../../scripts/migrate.js'
import type { AuditEntry } from '../../../plugins/audit/index.js'
import type { AuditPage } from '../../../plugins/audit/entry.js'
import { PostgresAuditStore, binaryArray } from '../../../plugins/audit/postgres-store.js'
import { entry, resumedVerifies } from './entries.js'
import { VERIFY_PAGE } from '../../../plugins/audit/entry.js'

interface Teardown { teardown: (fn: () => unknown) => void }

/** A gateway on the demo Kernel whose audit trail is the database `url`. */
async function pgApp (t: Teardown, url: string, env: Record<string, string | number | boolean> = {}, kernelUrl?: string): Promise<FastifyInstance> {
  if (kernelUrl === undefined) {
    const kernel = await startKernel({ port: 0, runDelayMs: 1 })
    t.teardown(() => kernel.close())
    kernelUrl = kernel.url
  }
  const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t), ...env }), { logger: false, kernelUrl, audit: { retentionIntervalMs: 100 } })
  t.teardown(() => app.close())
  await app.ready()
  return app
}

/** A PostgreSQL store on a new, migrated database, and a maker of entries for it. */
async function storeOnNewDatabase (t: Teardown): Promise<{ url: string, store: PostgresAuditStore, entry: (over?: Partial<AuditEntry>) => AuditEntry }> {
  const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
  const store = new PostgresAuditStore({ databaseUrl: url })
  t.teardown(() => store.close())
  return { url, store, entry }
}

/** The columns of an entry but its id, position and request id (a row copied by hand). */
const COPIED = '"timestamp", hash, previous_hash, tenant_id, user_id, method, path, protocol, action, category, risk_level, status, status_code, duration_ms, metadata'

const count = async (url: string): Promise<number> => Number((await sql<{ n: string }>(url, 'SELECT count(*) AS n FROM bff_audit_entries'))[0].n)

async function verify (app: FastifyInstance, body: Record<string, unknown> = {}): Promise<{ ok: boolean, checked: number, firstBroken: { id: string, requestId: string } | null }> {
  const res = await app.inject({ method: 'POST', url: '/admin/audit/verify', headers: bearer(), payload: body })
  if (res.statusCode !== 200) throw new Error(res.body)
  return res.json()
}

/** `n` REST calls with request ids of their own; resolves when every entry is in the table. */
async function restCalls (app: FastifyInstance, url: string, n: number, prefix = randomUUID()): Promise<string[]> {
  const ids = Array.from({ length: n }, (_, i) => `${prefix}-${i}`)
  for (const id of ids) {
    const res = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), 'x-request-id': id } })
    if (res.statusCode !== 200) throw new Error(res.body)
  }
  return ids
}

interface PlanNode { 'Node Type': string, 'Index Name'?: string, 'Index Cond'?: string, 'Rows Removed by Filter'?: number, Plans?: PlanNode[] }

/** Each statement's plan (EXPLAIN, FORMAT JSON; run with ANALYZE), its nodes in a list. */
async function plansOf (url: string, statements: Array<{ text: string, values: unknown[] }>, analyze: boolean): Promise<PlanNode[][]> {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  try {
    const plans: PlanNode[][] = []
    for (const { text, values } of statements) {
      const plan = (await client.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(`EXPLAIN (${analyze ? 'ANALYZE, ' : ''}FORMAT JSON) ${text}`, values)).rows[0]['QUERY PLAN'][0].Plan
      const nodes: PlanNode[] = []
      const walk = (n: PlanNode): void => { nodes.push(n); for (const c of n.Plans ?? []) walk(c) }
      walk(plan)
      plans.push(nodes)
    }
    return plans
  } finally {
    await client.end()
  }
}

const available = await postgresAvailable()
if (!available) t.comment('PostgreSQL is not reachable on 127.0.0.1:5432: skipped (CI fails instead)')

if (available) {
  t.test('every call on every face, refusals and failures included, gives exactly one row with its request id; the chain verifies', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const app = await pgApp(t, url)
    await app.listen({ port: 0, host: '127.0.0.1' })
    const port = (app.server.address() as { port: number }).port
    const run = randomUUID()
    const expected: string[] = []
    const rid = (name: string): Record<string, string> => ({ 'x-request-id': `${run}-${name}` })

    for (let i = 0; i < 3; i++) {
      const res = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), ...rid(`rest${i}`) } })
      t.equal(res.statusCode, 200)
      expected.push(`${run}-rest${i}`)
    }
    const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: { ...bearer(), ...rid('batch') }, payload: { calls: [{ id: 'a', op: 'getAgent', input: { id: 'a1' } }, { id: 'b', op: 'listAgents', input: {} }] } })
    t.equal(batch.statusCode, 200)
    expected.push(`${run}-batch.0`, `${run}-batch.1`)
    const trpc = await app.inject({ method: 'GET', url: `/trpc/getAgent?input=${encodeURIComponent('{"id":"a1"}')}`, headers: { ...bearer(), ...rid('trpc') } })
    t.equal(trpc.statusCode, 200)
    expected.push(`${run}-trpc`)
    const gql = await app.inject({ method: 'POST', url: '/graphql', headers: { ...bearer(), ...rid('gql') }, payload: { query: '{ a: getAgent(id: "a1") { id } b: getAgent(id: "a2") { id } }' } })
    t.equal(gql.statusCode, 200)
    expected.push(`${run}-gql.0`, `${run}-gql.1`)
    const ws = await connect(t, `ws://127.0.0.1:${port}/ws`)
    t.ok('result' in await ws.request({ id: '1', op: 'getAgent', input: { id: 'a1' } }))
    t.ok('result' in await ws.request({ id: '2', op: 'listAgents', input: {} }))
    ws.ws.close()

    // Refused, failed and invalid calls are recorded too.
    const denied = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: rid('noauth') })
    t.equal(denied.statusCode, 401)
    const forbidden = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: { ...bearer({ roles: [] }), ...rid('forbidden') }, payload: { prompt: 'hi' } })
    t.equal(forbidden.statusCode, 403)
    const missing = await app.inject({ method: 'GET', url: '/api/v1/agents/nope', headers: { ...bearer(), ...rid('missing') } })
    t.equal(missing.statusCode, 404)
    const invalid = await app.inject({ method: 'GET', url: '/api/v1/agents?limit=1000', headers: { ...bearer(), ...rid('invalid') } })
    t.equal(invalid.statusCode, 400)
    const malformed = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: { ...bearer(), ...rid('malformed'), 'content-type': 'application/json' }, payload: '{"prompt":' })
    t.equal(malformed.statusCode, 400)
    expected.push(`${run}-noauth`, `${run}-forbidden`, `${run}-missing`, `${run}-invalid`, `${run}-malformed`)

    // 15 calls with known ids, 2 WebSocket calls whose ids the face makes.
    let rows: Array<{ request_id: string, protocol: string, category: string, status: string, status_code: number, tenant_id: string, metadata: unknown }> = []
    const total = expected.length + 2
    for (let i = 0; i < 500 && rows.length < total; i++) {
      rows = await sql(url, 'SELECT request_id, protocol, category, status, status_code, tenant_id, metadata FROM bff_audit_entries ORDER BY seq')
      if (rows.length < total) await new Promise(resolve => setTimeout(resolve, 20))
    }
    t.equal(rows.length, total, 'exactly one row per call')
    t.same(rows.filter(r => r.protocol !== 'websocket').map(r => r.request_id).sort(), [...expected].sort(), 'with their request ids')
    t.equal(rows.filter(r => r.protocol === 'websocket').length, 2)
    t.same([...new Set(rows.map(r => r.protocol))].sort(), ['batch', 'graphql', 'rest', 'trpc', 'websocket'])
    const by = (name: string) => rows.find(r => r.request_id === `${run}-${name}`)
    t.match(by('rest0'), { category: 'read', status: 'ok', status_code: 200, tenant_id: 't1' })
    t.match(by('noauth'), { category: 'auth', status: 'UNAUTHENTICATED', status_code: 401, tenant_id: 'public' })
    t.match(by('forbidden'), { category: 'auth', status: 'FORBIDDEN', status_code: 403 })
    t.match(by('missing'), { category: 'read', status: 'NOT_FOUND', status_code: 404 })
    t.match(by('invalid'), { category: 'read', status: 'VALIDATION_FAILED', status_code: 400 })
    t.match(by('malformed'), { category: 'security', status: 'VALIDATION_FAILED', status_code: 400 })
    const raw = JSON.stringify(await sql(url, 'SELECT * FROM bff_audit_entries'))
    t.notMatch(raw, /hi"|Bearer|eyJ/, 'no payload and no token in the table')

    t.same(await verify(app), { ok: true, checked: total, firstBroken: null })
    t.match((await app.inject({ method: 'GET', url: '/readyz' })).json(), { status: 'ready', checks: { postgres: 'up' } })
    const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
    t.match(metrics, /mantle_audit_queue_depth \d+/)
    t.match(metrics, /mantle_audit_entries_total\{outcome="stored"\} \d+/)
    t.match(metrics, /mantle_audit_flush_duration_seconds_count \d+/)
    t.match(metrics, /mantle_audit_spool_bytes 0/)
  })

  t.test('GET /admin/audit filters by tenant, time, request id, action and status, a page at a time', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const app = await pgApp(t, url)
    const prefix = randomUUID()
    await restCalls(app, url, 5, prefix)
    for (let i = 0; i < 2; i++) await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer({ tenant: 'other' }) })
    await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), 'x-request-id': `${prefix}-0` } })
    await app.inject({ method: 'GET', url: '/api/v1/agents/nope', headers: bearer() })
    await drained(app)
    const get = async (query: string): Promise<{ entries: Array<Record<string, any>>, nextCursor: string | null }> => {
      const res = await app.inject({ method: 'GET', url: '/admin/audit?' + query, headers: bearer() })
      t.equal(res.statusCode, 200, query)
      return res.json()
    }
    t.equal((await get('tenant=other')).entries.length, 2)
    const same = await get(`requestId=${prefix}-0`)
    t.equal(same.entries.length, 2, 'a request id that came twice: the second is stored with a suffix and still found')
    t.match(same.entries[0].requestId, new RegExp(`^${prefix}-0~[0-9a-f-]{36}$`))
    t.equal(same.entries[1].requestId, `${prefix}-0`)
    t.equal((await get('status=NOT_FOUND')).entries.length, 1)
    t.equal((await get('action=getAgent&tenant=t1')).entries.length, 7)
    t.equal((await get('from=2000-01-01T00:00:00Z&to=2001-01-01T00:00:00Z')).entries.length, 0)
    t.ok((await get(`from=${encodeURIComponent(new Date(Date.now() - 60_000).toISOString())}&action=getAgent`)).entries.length >= 9)

    const seen: string[] = []
    let cursor: string | null = null
    let pages = 0
    do {
      const page = await get('action=getAgent&limit=4' + (cursor === null ? '' : '&cursor=' + cursor))
      seen.push(...page.entries.map(e => e.id as string))
      cursor = page.nextCursor
      pages++
    } while (cursor !== null)
    t.equal(pages, 3)
    t.equal(new Set(seen).size, 9, 'every entry once across pages, newest first')

    const bad = await app.inject({ method: 'GET', url: '/admin/audit?cursor=garbage', headers: bearer() })
    t.equal(bad.statusCode, 400)
    t.equal(bad.json().code, 'VALIDATION_FAILED')
    t.equal((await app.inject({ method: 'GET', url: '/admin/audit?limit=501', headers: bearer() })).statusCode, 400)
    t.equal((await app.inject({ method: 'GET', url: '/admin/audit?from=yesterday', headers: bearer() })).statusCode, 400)
    t.equal((await app.inject({ method: 'GET', url: '/admin/audit', headers: bearer({ roles: ['viewer'] }) })).statusCode, 403)
    t.equal((await app.inject({ method: 'GET', url: '/admin/audit' })).statusCode, 401)
    // The audit endpoints are audited themselves.
    await drained(app)
    const admin = await sql<{ n: string }>(url, "SELECT count(*) AS n FROM bff_audit_entries WHERE category = 'admin'")
    t.ok(Number(admin[0].n) >= 10)
  })

  t.test('tampering by SQL is found at the right entry: a changed field, a deleted row, a swapped pair, a removed tail', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const app = await pgApp(t, url)
    await restCalls(app, url, 10)
    await drained(app)
    for (let i = 0; i < 200 && await count(url) < 10; i++) await new Promise(resolve => setTimeout(resolve, 20))
    const at = async (seq: number): Promise<{ id: string, request_id: string }> => (await sql<{ id: string, request_id: string }>(url, 'SELECT id, request_id FROM bff_audit_entries WHERE seq = $1', [seq]))[0]
    t.same(await verify(app), { ok: true, checked: 10, firstBroken: null })

    // A changed field.
    const fourth = await at(4)
    await sql(url, "UPDATE bff_audit_entries SET status = 'FORBIDDEN' WHERE seq = 4")
    t.same(await verify(app), { ok: false, checked: 4, firstBroken: { id: fourth.id, requestId: fourth.request_id } })
    await sql(url, "UPDATE bff_audit_entries SET status = 'ok' WHERE seq = 4")
    t.equal((await verify(app)).ok, true, 'restored, it verifies again')

    // A reordered pair: positions 6 and 7 exchanged.
    const seventh = await at(7)
    await sql(url, 'UPDATE bff_audit_entries SET seq = -1 WHERE seq = 6')
    await sql(url, 'UPDATE bff_audit_entries SET seq = 6 WHERE seq = 7')
    await sql(url, 'UPDATE bff_audit_entries SET seq = 7 WHERE seq = -1')
    t.same(await verify(app), { ok: false, checked: 6, firstBroken: { id: seventh.id, requestId: seventh.request_id } }, 'found at the entry now first')
    await sql(url, 'UPDATE bff_audit_entries SET seq = -1 WHERE seq = 7')
    await sql(url, 'UPDATE bff_audit_entries SET seq = 7 WHERE seq = 6')
    await sql(url, 'UPDATE bff_audit_entries SET seq = 6 WHERE seq = -1')
    t.equal((await verify(app)).ok, true)

    // A deleted row: the next one no longer links.
    const ninth = await at(9)
    await sql(url, 'DELETE FROM bff_audit_entries WHERE seq = 8')
    t.same(await verify(app), { ok: false, checked: 8, firstBroken: { id: ninth.id, requestId: ninth.request_id } })
    const ranged = await verify(app, { from: new Date(Date.now() + 60_000).toISOString() })
    t.same(ranged, { ok: true, checked: 0, firstBroken: null }, 'an empty range has nothing to check')

    // A removed tail: the last row left is not the head the writers recorded.
    const tenth = await at(10)
    t.ok(tenth)
    // The verify calls above are audited too: their entries are written first (a write after
    // the DELETE would append past a gap, found at that entry instead).
    await drained(app)
    await sql(url, 'DELETE FROM bff_audit_entries WHERE seq >= 8')
    const tail = await verify(app)
    t.equal(tail.ok, false)
    t.same(tail.firstBroken, { id: (await at(7)).id, requestId: (await at(7)).request_id }, 'the chain breaks off after the last row left')
    const bad = await app.inject({ method: 'POST', url: '/admin/audit/verify', headers: bearer(), payload: { from: '2030-01-01T00:00:00Z', to: '2020-01-01T00:00:00Z' } })
    t.equal(bad.statusCode, 400)
  })

  t.test('two gateway instances writing at once keep one valid chain', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const kernel = await startKernel({ port: 0, runDelayMs: 1 })
    t.teardown(() => kernel.close())
    const one = await pgApp(t, url, { BFF_AUDIT_BATCH_SIZE: 7 }, kernel.url)
    const two = await pgApp(t, url, { BFF_AUDIT_BATCH_SIZE: 7 }, kernel.url)
    const ids: string[] = []
    const run = randomUUID()
    await Promise.all([one, two].map(async (app, k) => {
      for (let round = 0; round < 10; round++) {
        await Promise.all(Array.from({ length: 15 }, async (_, i) => {
          const id = `${run}-${k}-${round}-${i}`
          ids.push(id)
          const res = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), 'x-request-id': id } })
          if (res.statusCode !== 200) throw new Error(res.body)
        }))
      }
    }))
    for (let i = 0; i < 500 && await count(url) < ids.length; i++) await new Promise(resolve => setTimeout(resolve, 20))
    const rows = await sql<{ seq: string, request_id: string }>(url, 'SELECT seq, request_id FROM bff_audit_entries ORDER BY seq')
    t.equal(rows.length, 300)
    t.same(rows.map(r => Number(r.seq)), Array.from({ length: 300 }, (_, i) => i + 1), 'positions 1..300 without a gap')
    t.same(rows.map(r => r.request_id).sort(), ids.sort())
    t.same(await verify(one), { ok: true, checked: 300, firstBroken: null })
    // The verify is audited itself: its entry lands in the chain before the second walks it.
    await drained(one)
    t.same(await verify(two), { ok: true, checked: 301, firstBroken: null })
  })

  t.test('the store itself: a batch replayed after a lost COMMIT is stored once, a taken request id gets its suffix, the chain holds', async t => {
    const { url, store, entry } = await storeOnNewDatabase(t)
    const first = [entry(), entry(), entry({ requestId: 'client-chosen' })]
    await store.write(first)
    t.equal(await count(url), 3)
    // The spool replays the batch a COMMIT that looked failed had stored, with one new entry: the
    // unique index refuses the fast path, the second pass skips what is there.
    const fresh = entry()
    await store.write([...first, fresh])
    t.equal(await count(url), 4, 'only the new entry was added')
    // Another call whose client sent the same x-request-id, in a batch of its own.
    const again = entry({ requestId: 'client-chosen' })
    await store.write([again])
    const rows = await sql<{ id: string, request_id: string }>(url, 'SELECT id, request_id FROM bff_audit_entries ORDER BY seq')
    t.same(rows.map(r => r.id), [...first, fresh, again].map(e => e.id), 'in chain order, each once')
    t.equal(rows[4].request_id.startsWith('client-chosen~'), true, 'the taken request id is stored with a suffix')
    t.same(await store.verify({}), { ok: true, checked: 5, firstBroken: null })
  })

  t.test('the store itself: a client\'s reused request id is looked up first: one INSERT per batch, no new connection', async t => {
    const { url, store, entry } = await storeOnNewDatabase(t)
    // Each statement the writer's connections run, and each connection opened.
    const statements: string[] = []
    let connects = 0
    store.pool.on('connect', client => {
      connects++
      const query = client.query.bind(client) as (...args: unknown[]) => unknown
      ;(client as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
        const q = args[0] as string | { name?: string, text: string }
        statements.push(typeof q === 'string' ? q : q.name ?? q.text)
        return query(...args)
      }
    })
    const batch = (): AuditEntry[] => [entry(), entry({ requestId: 'fixed-client-id', clientRequestId: true }), entry()]
    await store.write(batch())
    t.equal(connects, 1)
    statements.length = 0
    for (let i = 0; i < 5; i++) await store.write(batch())
    t.equal(statements.filter(s => s === 'mantle-audit-insert').length, 5, 'one INSERT per batch, none refused and written again')
    t.equal(statements.filter(s => s === 'ROLLBACK').length, 0)
    t.equal(connects, 1, 'no new connection')
    // Repeated within a batch, and the same as an id the gateway made in that batch: suffixed too.
    const gatewayMade = entry()
    const twice = [entry({ requestId: 'in-batch', clientRequestId: true }), entry({ requestId: 'in-batch', clientRequestId: true }), gatewayMade, entry({ requestId: gatewayMade.requestId, clientRequestId: true })]
    statements.length = 0
    await store.write(twice)
    t.equal(statements.filter(s => s === 'mantle-audit-insert').length, 1)
    const rows = await sql<{ id: string, request_id: string }>(url, 'SELECT id, request_id FROM bff_audit_entries ORDER BY seq')
    t.equal(rows.length, 22)
    t.same(rows.filter(r => r.request_id.startsWith('fixed-client-id')).map(r => r.request_id), ['fixed-client-id', ...rows.filter(r => r.request_id.startsWith('fixed-client-id~')).map(r => r.request_id)])
    t.equal(rows.filter(r => r.request_id.startsWith('fixed-client-id~')).length, 5, 'every later one suffixed')
    t.same(rows.slice(18).map(r => r.request_id), ['in-batch', `in-batch~${twice[1].id}`, gatewayMade.requestId, `${gatewayMade.requestId}~${twice[3].id}`])
    // An entry not marked (spooled by an earlier version) whose id is taken: the INSERT refuses it,
    // the batch is written again with every id looked up, on the same connection.
    statements.length = 0
    await store.write([entry({ requestId: 'fixed-client-id' })])
    t.equal(statements.filter(s => s === 'mantle-audit-insert').length, 2, 'refused once, then written')
    t.equal(statements.filter(s => s === 'ROLLBACK').length, 1)
    t.equal(connects, 1, 'the connection of the refused statement is kept')
    t.same(await store.verify({}), { ok: true, checked: 23, firstBroken: null })
  })

  t.test('the store itself: the batch INSERT is prepared once per connection, then planned once', async t => {
    const { url, store, entry } = await storeOnNewDatabase(t)
    for (let i = 0; i < 8; i++) await store.write([entry(), entry()])
    t.equal(await count(url), 16)
    // The writes went one after the other, each on the connection the last one gave back.
    const client = await store.pool.connect()
    try {
      const rows = (await client.query<{ name: string, generic: string, custom: string }>(
        'SELECT name, generic_plans AS generic, custom_plans AS custom FROM pg_prepared_statements')).rows
      t.same(rows.map(r => r.name), ['mantle-audit-insert'], 'one statement, under its name')
      t.equal(Number(rows[0].generic) + Number(rows[0].custom), 8, 'run for each of the 8 batches')
      t.ok(Number(rows[0].generic) > 0, 'PostgreSQL went on to a generic plan: no planning per batch')
    } finally {
      client.release()
    }
  })

  t.test('the store itself: reads (verify, query) have connections of their own, apart from the writer\'s', async t => {
    // One pool of 4 served both: verifies of a large table at once held every connection, and
    // the writer, waiting past its connect timeout, spooled.
    const { url, store, entry } = await storeOnNewDatabase(t)
    const reads = (store as unknown as { reads: { connect: () => Promise<{ release: () => void }> } }).reads
    const held = [await reads.connect(), await reads.connect()]
    try {
      await store.write([entry(), entry()])
      t.equal(await count(url), 2, 'a write goes through while every read connection is taken')
    } finally {
      for (const c of held) c.release()
    }
    t.same(await store.verify({}), { ok: true, checked: 2, firstBroken: null })
    const names = (await sql<{ name: string }>(url, "SELECT DISTINCT application_name AS name FROM pg_stat_activity WHERE application_name LIKE 'mantle-audit%' AND datname = current_database() ORDER BY 1")).map(r => r.name)
    t.same(names, ['mantle-audit', 'mantle-audit-reads'])
  })

  // A verify held one read connection, in one REPEATABLE READ transaction, for its whole walk:
  // 8 s for 200,000 entries, hours for a 90-day trail, keeping every dead version of the chain
  // head's row that writers left meanwhile (the head lookup every writer makes under the chain
  // lock slowed with each batch). Each page is now a statement of its own, the connection given
  // back between them.
  t.test('the store itself: a verify gives its read connection back after every page, holding no snapshot between them', async t => {
    const { url, store, entry } = await storeOnNewDatabase(t)
    await store.write(Array.from({ length: 3 * VERIFY_PAGE }, () => entry()))
    const reads = (store as unknown as { reads: pg.Pool }).reads
    let released = 0
    const given = (): void => { released++ }
    reads.on('release', given)
    t.same(await store.verify({}), { ok: true, checked: 3 * VERIFY_PAGE, firstBroken: null })
    reads.off('release', given)
    t.ok(released >= 4, `given back after the start, each of the 3 pages and the end (${released} times; once for the whole walk before)`)
    const open = await sql<{ n: string }>(url, "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'mantle-audit-reads' AND datname = current_database() AND xact_start IS NOT NULL")
    t.equal(Number(open[0].n), 0, 'no read transaction left open')
  })

  t.test('the store itself: a verify that times out leaves no read connection in its snapshot; reads end on the server too', async t => {
    // A query that timed out made pg drop the COMMIT behind it, and the connection went back to
    // the pool inside the read-only transaction: GET /admin/audit on it read the old snapshot.
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const store = new PostgresAuditStore({ databaseUrl: url, queryTimeoutMs: 500 })
    t.teardown(() => store.close())
    await store.write([entry(), entry(), entry()])
    const locker = new pg.Client({ connectionString: url })
    await locker.connect()
    t.teardown(() => locker.end())
    await locker.query('BEGIN')
    await locker.query('LOCK TABLE bff_audit_entries IN ACCESS EXCLUSIVE MODE')
    await t.rejects(store.verify({}), 'the verify times out')
    await locker.query('COMMIT')
    await store.write([entry(), entry(), entry()])
    for (let round = 0; round < 4; round++) {
      const seen = await Promise.all([store.query({ limit: 50 }), store.query({ limit: 50 })])
      t.same(seen.map(page => page.entries.length), [6, 6], `round ${round}: every read sees every entry`)
    }
    const stuck = await sql<{ n: string }>(url, "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'mantle-audit-reads' AND state = 'idle in transaction'")
    t.equal(Number(stuck[0].n), 0, 'no read connection idles in a transaction')
    // The server ends a read at the same timeout: its statement does not wait on for the lock.
    await locker.query('BEGIN')
    await locker.query('LOCK TABLE bff_audit_entries IN ACCESS EXCLUSIVE MODE')
    await t.rejects(store.query({ limit: 50 }), 'the read times out')
    let waiting = -1
    for (const end = Date.now() + 3000; Date.now() < end && waiting !== 0; await new Promise(resolve => setTimeout(resolve, 50))) {
      waiting = Number((await sql<{ n: string }>(url, "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'mantle-audit-reads' AND wait_event_type = 'Lock'"))[0].n)
    }
    t.equal(waiting, 0, 'no read statement waits on the lock on the server')
    await locker.query('COMMIT')
  })

  t.test('the store itself: a writer transaction whose client is gone is ended by the server, and the chain head with it', async t => {
    // A network partition between a batch's INSERT and its COMMIT left the transaction open on
    // the server, the chain head's row lock held, until TCP keepalive (2 h): every write of every
    // instance waited on it past its timeout and was spooled. Here a write takes the lock and its
    // INSERT never reaches the server, as a partitioned one's.
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    // 2 s: on a loaded machine the server had ended the transaction before the check below saw it.
    const store = new PostgresAuditStore({ databaseUrl: url, queryTimeoutMs: 2000 })
    t.teardown(() => store.close())
    let partitioned = false
    store.pool.on('connect', client => {
      const query = client.query.bind(client) as (...args: unknown[]) => unknown
      ;(client as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
        if (!partitioned || (args[0] as { name?: string }).name !== 'mantle-audit-insert') return query(...args)
        partitioned = false
        // Nothing more goes out; the write hears of it only when the connection ends.
        return new Promise((resolve, reject) => { client.once('end', () => reject(new Error('the connection ended'))) })
      }
    })
    await store.write([entry()])
    partitioned = true
    const lost = store.write([entry()])
    await until(() => !partitioned, 'the write to take the lock')
    // This database's sessions only: the suite's other processes write audit entries to theirs.
    const idle = await sql<{ n: string }>(url, "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'mantle-audit' AND state = 'idle in transaction'")
    t.equal(Number(idle[0].n), 1, 'the lost write\'s transaction is open on the server')
    // The server ends the idle transaction (idle_in_transaction_session_timeout, SET LOCAL in
    // the transaction), and the connection with it.
    await t.rejects(lost, 'the lost write fails once the server ended its transaction')
    await store.write([entry(), entry()])
    t.equal(await count(url), 3, 'the next write goes through')
    t.same(await store.verify({}), { ok: true, checked: 3, firstBroken: null })
  })

  // PgBouncer refuses a connection whose startup packet carries a parameter it does not know:
  // the pools sent statement_timeout (the writer's also lock_timeout and
  // idle_in_transaction_session_timeout), so behind PgBouncer the gateway migrated (the
  // migration's connection sends none) but never wrote an entry: every batch was spooled.
  t.test('the store itself: behind a pooler that refuses unknown startup parameters (PgBouncer), writes, reads, verify, retention and the ping work', async t => {
    const name = await createTestDatabase(t, { migrated: true })
    const pooler = await startPoolerProxy(t)
    const store = new PostgresAuditStore({ databaseUrl: databaseUrl(name, pooler.port), connectTimeoutMs: 1000 })
    t.teardown(() => store.close())
    await t.resolves(store.ping(), 'the ping')
    t.equal(await store.write([entry(), entry(), entry()]), 3, 'a batch is written')
    t.equal((await store.query({ limit: 10 })).entries.length, 3, 'GET /admin/audit reads it')
    t.same(await store.verify({}), { ok: true, checked: 3, firstBroken: null }, 'verify')
    await sql(databaseUrl(name), 'UPDATE bff_audit_entries SET created_at = now() - interval \'1 day\'')
    t.equal(await store.prune(3_600_000, 2), 2, 'retention')
    t.ok(pooler.startups.length >= 2, 'both pools connected through the pooler')
    for (const parameters of pooler.startups) t.same(Object.keys(parameters).sort(), ['application_name', 'client_encoding', 'database', 'user'], 'no startup parameter but the user, the database, the application name and the encoding')
  })

  t.test('the store itself: each transaction sets its own timeouts (SET LOCAL), which hold behind a pooler in transaction mode; a session keeps none', async t => {
    const name = await createTestDatabase(t, { migrated: true })
    const pooler = await startPoolerProxy(t)
    const store = new PostgresAuditStore({ databaseUrl: databaseUrl(name, pooler.port), queryTimeoutMs: 700 })
    t.teardown(() => store.close())
    const SETTINGS = "SELECT current_setting('statement_timeout') AS statement, current_setting('lock_timeout') AS lock, current_setting('idle_in_transaction_session_timeout') AS idle, current_setting('transaction_read_only') AS read_only"
    type Settings = Record<'statement' | 'lock' | 'idle' | 'read_only', string>
    // What each statement of the store's own runs under, asked on its connection just before it.
    const seen: Array<{ pool: string, what: string, settings: Settings }> = []
    const watch = (pool: pg.Pool, label: string): void => {
      pool.on('connect', client => {
        const query = client.query.bind(client) as (...args: unknown[]) => Promise<unknown>
        ;(client as unknown as { query: (...args: unknown[]) => unknown }).query = async (...args: unknown[]) => {
          const q = args[0] as string | { name?: string, text: string }
          const text = typeof q === 'string' ? q : q.text
          if (/^(BEGIN|COMMIT|ROLLBACK)/.test(text) || text.startsWith('SELECT current_setting')) return await query(...args)
          const settings = (await query(SETTINGS) as pg.QueryResult<Settings>).rows[0]
          seen.push({ pool: label, what: typeof q === 'string' ? q.slice(0, 30) : q.name ?? q.text.slice(0, 30), settings })
          return await query(...args)
        }
      })
    }
    watch(store.pool, 'writer')
    watch((store as unknown as { reads: pg.Pool }).reads, 'reads')
    await store.write([entry(), entry()])
    await store.query({ limit: 10 })
    await store.verify({})
    await store.prune(90 * 86_400_000, 10)
    const writer = seen.filter(s => s.pool === 'writer')
    const reads = seen.filter(s => s.pool === 'reads')
    t.ok(writer.some(s => s.what === 'mantle-audit-insert'), 'the batch INSERT was watched')
    t.ok(reads.length >= 3, 'the reads were watched')
    for (const s of writer) t.same(s.settings, { statement: '700ms', lock: '700ms', idle: '700ms', read_only: 'off' }, `writer: ${s.what}`)
    for (const s of reads) t.same({ statement: s.settings.statement, idle: s.settings.idle, read_only: s.settings.read_only }, { statement: '700ms', idle: '700ms', read_only: 'on' }, `reads: ${s.what}`)
    // Outside the store's transactions, its connections keep the server's defaults: nothing is
    // set for a session (behind a pooler it would hold for another client's transactions).
    const defaults = (await sql<Settings>(databaseUrl(name), SETTINGS))[0]
    for (const pool of [store.pool, (store as unknown as { reads: pg.Pool }).reads]) {
      const settings = (await pool.query<Settings>(SETTINGS)).rows[0]
      t.same(settings, defaults, 'a session holds no timeout of the store')
    }
  })

  // An operator's database may default to another isolation level (default_transaction_isolation,
  // set for the database or the role). Under repeatable read or serializable, a writer that waited
  // for the chain head's row lock while another instance's batch moved the head failed with 40001
  // "could not serialize access due to concurrent update": with two instances writing, about one
  // batch in three went to the spool, the store read as down in turn (the warning, /readyz,
  // mantle_audit_store_up) and retention failed whenever a write committed during its wait.
  for (const level of ['repeatable read', 'serializable']) {
    t.test(`the store itself: under a default isolation of ${level}, a write and retention that waited for the chain head another instance moved go through`, async t => {
      const name = await createTestDatabase(t, { migrated: true })
      const url = databaseUrl(name)
      await sql(PG_URL, `ALTER DATABASE ${name} SET default_transaction_isolation = '${level}'`)
      const store = new PostgresAuditStore({ databaseUrl: url })
      t.teardown(() => store.close())
      await store.write([entry()])
      const other = new pg.Client({ connectionString: url })
      await other.connect()
      t.teardown(() => other.end())
      const waiting = async (): Promise<boolean> => Number((await sql<{ n: string }>(url, "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'mantle-audit' AND wait_event_type = 'Lock'"))[0].n) === 1
      // Another instance's batch holds the chain head, and moves it while the write waits.
      const moved = async (run: () => Promise<number>): Promise<PromiseSettledResult<number>> => {
        await other.query('BEGIN ISOLATION LEVEL READ COMMITTED')
        await other.query('UPDATE bff_audit_chain SET head_seq = head_seq WHERE id = 1')
        const done = run().then(n => ({ status: 'fulfilled' as const, value: n }), (reason: unknown) => ({ status: 'rejected' as const, reason }))
        for (let i = 0; i < 500 && !await waiting(); i++) await new Promise(resolve => setTimeout(resolve, 10))
        t.ok(await waiting(), 'the store waits for the chain head')
        await other.query('COMMIT')
        return await done
      }
      t.same(await moved(async () => await store.write([entry(), entry()])), { status: 'fulfilled', value: 2 }, 'the write goes through')
      await sql(url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'1 day\'')
      t.same(await moved(async () => await store.prune(3_600_000, 10)), { status: 'fulfilled', value: 3 }, 'retention goes through')
      t.same(await store.verify({}), { ok: true, checked: 0, firstBroken: null })
      t.equal((await sql<{ head_seq: string }>(url, 'SELECT head_seq FROM bff_audit_chain'))[0].head_seq, '3')
    })
  }

  t.test('the store itself: duplicates within one batch, and any text in any column, are stored as given', async t => {
    const { url, store, entry } = await storeOnNewDatabase(t)
    // Text an array literal must quote or escape: quotes, backslashes, braces, commas, the word
    // NULL, blanks, control characters and text outside ASCII.
    const odd = ['say "hi"', 'back\\slash', '\\"', '{a,b}', 'NULL', 'null', '', ' lead', 'tab\tline\n', 'ünï©ødé 😀', '\u0001']
    const entries = odd.map((text, i) => entry({ requestId: 'odd-' + i + text, tenantId: text === '' ? 'empty' : text, userId: text + '-user', method: i % 2 === 0 ? null : 'POST', path: i % 3 === 0 ? null : '/x/' + text, status: text === '' ? 'ok' : text, durationMs: i + 0.125, metadata: { note: text, nested: { quote: '"', list: [text, null] } } }))
    const twin = entry()
    const sameRequest = entry({ requestId: 'twice-in-one-batch' })
    // One batch: the odd texts, an entry twice (a replay within one batch), and two calls whose
    // clients sent the same x-request-id.
    await store.write([...entries, twin, twin, sameRequest, entry({ requestId: 'twice-in-one-batch' })])
    const rows = await sql<{ id: string, request_id: string, tenant_id: string, user_id: string, method: string | null, path: string | null, status: string, duration_ms: number, metadata: unknown }>(url,
      'SELECT id, request_id, tenant_id, user_id, method, path, status, duration_ms, metadata FROM bff_audit_entries ORDER BY seq')
    t.equal(rows.length, odd.length + 3, 'the twin once, both calls of the shared request id')
    for (const [i, e] of entries.entries()) {
      const r = rows[i]
      t.same({ id: r.id, request_id: r.request_id, tenant_id: r.tenant_id, user_id: r.user_id, method: r.method, path: r.path, status: r.status, duration_ms: r.duration_ms, metadata: r.metadata },
        { id: e.id, request_id: e.requestId, tenant_id: e.tenantId, user_id: e.userId, method: e.method, path: e.path, status: e.status, duration_ms: e.durationMs, metadata: e.metadata }, `stored as given: ${JSON.stringify(odd[i])}`)
    }
    t.equal(rows[odd.length].id, twin.id)
    t.equal(rows[odd.length + 1].request_id, 'twice-in-one-batch')
    t.match(rows[odd.length + 2].request_id, /^twice-in-one-batch~/, 'the second call with that request id is stored with a suffix')
    t.same(await store.verify({}), { ok: true, checked: odd.length + 3, firstBroken: null }, 'every hash recomputed from the stored text matches')
    // A query by tenant alone passes its tenant in an array (tenant_id = ANY: see query).
    for (const [i, e] of entries.entries()) t.same((await store.query({ limit: 5, tenant: e.tenantId })).entries.map(x => x.id), [e.id], `found by its tenant: ${JSON.stringify(odd[i])}`)
  })

  t.test('the batch\'s binary columns: PostgreSQL reads each value as it reads the same value written as text', async t => {
    const url = PG_URL
    // [element type, values in binary, the same values as PostgreSQL text input (null: the values themselves)]
    const cases: Array<[Parameters<typeof binaryArray>[0], unknown[], Array<string | null> | null]> = [
      ['uuid', ['0190a3b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b', 'FFFFFFFF-FFFF-4FFF-BFFF-FFFFFFFFFFFF', '00000000-0000-0000-0000-000000000000'], null],
      ['int8', [1, 0, 2 ** 40 + 5, Number.MAX_SAFE_INTEGER, -7, null], ['1', '0', String(2 ** 40 + 5), String(Number.MAX_SAFE_INTEGER), '-7', null]],
      ['int4', [200, 599, 0, -1, 2 ** 31 - 1], ['200', '599', '0', '-1', String(2 ** 31 - 1)]],
      ['float8', [0.125, 1.234, 1e-9, 12345678.901, 0, -2.5], ['0.125', '1.234', '1e-9', '12345678.901', '0', '-2.5']],
      // The epoch, before and after PostgreSQL's (2000), a fraction of a millisecond (truncated, as Date does), 2026.
      ['timestamptz', [0, 946_684_799_999, 946_684_800_001, 1_780_000_000_123.9, Date.UTC(2026, 11, 3, 7, 0, 0, 5)], [0, 946_684_799_999, 946_684_800_001, 1_780_000_000_123, Date.UTC(2026, 11, 3, 7, 0, 0, 5)].map(ms => new Date(ms).toISOString())],
      ['text', ['', 'say "hi"', 'back\\slash', '{a,b}', 'NULL', null, 'ünï©ødé 😀', '\u0001\t\n', 'x'.repeat(3000), 'ascii then é', 'a'.repeat(70) + 'é'], ['', 'say "hi"', 'back\\slash', '{a,b}', 'NULL', null, 'ünï©ødé 😀', '\u0001\t\n', 'x'.repeat(3000), 'ascii then é', 'a'.repeat(70) + 'é']],
      ['jsonb', ['{}', '{"cache":"hit"}', '{"note":"ü \\"q\\" 😀","list":[1,null,true],"n":{"deep":[]}}', null], ['{}', '{"cache":"hit"}', '{"note":"ü \\"q\\" 😀","list":[1,null,true],"n":{"deep":[]}}', null]]
    ]
    for (const [type, values, texts] of cases) {
      const asText = texts ?? values as string[]
      const binary = await sql<{ v: string | null }>(url, `SELECT v::text FROM unnest($1::${type}[]) WITH ORDINALITY AS u(v, i) ORDER BY i`, [binaryArray(type, values)])
      const text = await sql<{ v: string | null }>(url, `SELECT v::text FROM unnest($1::${type}[]) WITH ORDINALITY AS u(v, i) ORDER BY i`, [asText])
      t.same(binary.map(r => r.v), text.map(r => r.v), `${type}: the same values`)
      t.equal(binary.length, values.length)
    }
    t.throws(() => binaryArray('uuid', ['not-a-uuid']), /not a uuid/, 'a malformed id is refused before PostgreSQL stores garbage')
    t.throws(() => binaryArray('uuid', ['0190a3b4-5c6d-7e8f-9a0b-1c2d3e4f5a6bX']), /not a uuid/)
    t.throws(() => binaryArray('uuid', ['0190a3b4x5c6d-7e8f-9a0b-1c2d3e4f5a6b']), /not a uuid/)
    t.throws(() => binaryArray('uuid', ['0190a3b4-5c6d-7e8f-9a0b-1c2d3e4f5aé6']), /not a uuid/, 'a character outside ASCII whose low bits are a hex digit')
  })

  t.test('retention removes the oldest entries in batches; verification starts from the oldest kept', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const app = await pgApp(t, url, { BFF_AUDIT_RETENTION_DAYS: 30 })
    const old = Date.now() - 40 * 86_400_000
    // 1,005 entries from 40 days ago (more than one pruning batch), then calls of today.
    for (let i = 0; i < 1005; i++) {
      app.audit.enqueue(entry({ requestId: `old-${i}`, timestamp: old + i }))
    }
    // Written 40 days ago (nothing is pruned before: each row was written just now).
    await drained(app)
    t.equal(await count(url), 1005)
    await sql(url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'40 days\'')
    const fresh = await restCalls(app, url, 5)
    for (let i = 0; i < 1000; i++) {
      const rows = await sql<{ request_id: string }>(url, 'SELECT request_id FROM bff_audit_entries ORDER BY seq')
      if (rows.length === 5 && rows.every(r => fresh.includes(r.request_id))) break
      await new Promise(resolve => setTimeout(resolve, 20))
    }
    const rows = await sql<{ request_id: string, seq: string }>(url, 'SELECT request_id, seq FROM bff_audit_entries ORDER BY seq')
    t.same(rows.map(r => r.request_id), fresh, 'only today\'s entries are left')
    t.same((await sql(url, 'SELECT anchor_seq FROM bff_audit_chain'))[0], { anchor_seq: '1005' })
    t.same(await verify(app), { ok: true, checked: 5, firstBroken: null }, 'verified from the anchor retention left')
    const second = (await sql<{ id: string, request_id: string }>(url, 'SELECT id, request_id FROM bff_audit_entries WHERE seq = 1007'))[0]
    await sql(url, 'DELETE FROM bff_audit_entries WHERE seq = 1006')
    t.same((await verify(app)).firstBroken, { id: second.id, requestId: second.request_id }, 'deleting the oldest kept row is still found')
  })

  t.test('verify and GET /admin/audit with a time range read the entries of the range, not the table', async t => {
    const { url, store } = await storeOnNewDatabase(t)
    // 60,000 entries, one a minute from 60,000 minutes ago, of 50 tenants; then one of 47,000
    // minutes ago written last (a spool replayed late): timestamps out of position order.
    const minute = 60_000
    const base = Date.now() - 60_000 * minute
    for (let i = 0; i < 60_000; i += 5000) {
      await store.write(Array.from({ length: 5000 }, (_, k) => entry({ timestamp: base + (i + k) * minute, tenantId: `t${(i + k) % 50}` })))
    }
    const late = entry({ timestamp: base + 13_000 * minute, tenantId: 't3' })
    await store.write([late])
    await sql(url, 'ANALYZE bff_audit_entries')
    const from = new Date(base + 10_000 * minute)
    const to = new Date(base + 17_000 * minute)
    const removed = async (run: () => Promise<unknown>): Promise<number> =>
      (await plansOf(url, await statementsOf(run), true)).flat().reduce((sum, n) => sum + (n['Rows Removed by Filter'] ?? 0), 0)

    // 7,000 entries in the range (and the late one), 10,000 before it, 43,000 after it.
    let answer: unknown
    t.ok(await removed(async () => { answer = await store.verify({ from, to }, { limit: 1 }) }) <= 7001, 'verify of a range: the rows of the range at most')
    t.same(answer, { ok: true, checked: 1, firstBroken: null, next: { seq: 10_002, hash: (answer as { next: { hash: string } }).next.hash, end: 60_001 }, through: 10_001 }, 'from the first entry of the range to the late one')
    t.ok(await removed(async () => await store.verify({ from: new Date(base + 53_000 * minute) }, { limit: 1 })) <= 7001, 'verify from a time: the rows before it or the rows after it, whichever are fewer')
    t.ok(await removed(async () => await store.verify({ from: new Date(base + 59_000 * minute) }, { limit: 1 })) <= 1001, 'verify of the last entries')

    const expected = async (tenant: string | null, beforeSeq?: number): Promise<number[]> => (await sql<{ seq: string }>(url,
      'SELECT seq FROM bff_audit_entries WHERE ($1::text IS NULL OR tenant_id = $1) AND "timestamp" BETWEEN $2 AND $3 AND seq < $4 ORDER BY seq DESC LIMIT 50',
      [tenant, from, to, beforeSeq ?? 1e9])).map(r => Number(r.seq))
    let page: AuditPage | undefined
    t.ok(await removed(async () => { page = await store.query({ limit: 50, tenant: 't3', from, to }) }) <= 10_000 + 7001, 'query of a tenant and a range: a window of the newest at most, and the range')
    t.same(page?.entries.map(e => e.seq), await expected('t3'), 'newest first, the late entry first')
    t.equal(page?.entries[0].id, late.id)
    t.ok(await removed(async () => { page = await store.query({ limit: 50, tenant: 't3', from, to, beforeSeq: page?.nextSeq ?? 0 }) }) <= 10_000 + 7001, 'its next page too')
    t.same(page?.entries.map(e => e.seq), await expected('t3', (await expected('t3'))[49]), 'the next page')
    t.ok(await removed(async () => { page = await store.query({ limit: 50, from, to }) }) <= 10_000 + 7001, 'query of a range')
    t.same(page?.entries.map(e => e.seq), await expected(null))
    t.ok(await removed(async () => { page = await store.query({ limit: 50, from: new Date(base + 59_000 * minute) }) }) <= 10_000, 'query of the last entries')
    t.equal(page?.entries.length, 50)
  })

  t.test('GET /admin/audit with a time range and a selective filter reads windows of the newest positions, not the range, for each page', async t => {
    const { url, store } = await storeOnNewDatabase(t)
    // 100,000 entries, one a minute; one in 500 of action "rare". A page of 50 of them lies in the
    // newest 25,500 positions: the whole range below the cursor was read for each page.
    const minute = 60_000
    const base = Date.now() - 100_000 * minute
    for (let i = 0; i < 100_000; i += 5000) {
      await store.write(Array.from({ length: 5000 }, (_, k) => entry({ timestamp: base + (i + k) * minute, action: (i + k) % 500 === 0 ? 'rare' : 'getAgent' })))
    }
    await sql(url, 'ANALYZE bff_audit_entries')
    const from = new Date(base + minute)
    const removed = async (run: () => Promise<unknown>): Promise<number> =>
      (await plansOf(url, await statementsOf(run), true)).flat().reduce((sum, n) => sum + (n['Rows Removed by Filter'] ?? 0), 0)
    const expected = async (beforeSeq: number): Promise<number[]> => (await sql<{ seq: string }>(url,
      'SELECT seq FROM bff_audit_entries WHERE action = \'rare\' AND "timestamp" >= $1 AND seq < $2 ORDER BY seq DESC LIMIT 50', [from, beforeSeq])).map(r => Number(r.seq))
    let page: AuditPage | undefined
    let cursor = 1e9
    for (let n = 1; n <= 2; n++) {
      const read = await removed(async () => { page = await store.query({ limit: 50, action: 'rare', from, ...(n > 1 ? { beforeSeq: cursor } : {}) }) })
      t.ok(read <= 31_000, `page ${n}: ${read} rows read past (windows of 10,000 and 20,000 at most)`)
      t.same(page?.entries.map(e => e.seq), await expected(cursor), `page ${n}: as SQL says`)
      cursor = page?.nextSeq ?? 0
    }
    t.ok(cursor > 0, 'more pages')
    // A filter that matches nothing: three windows, the last the rest of the page's span (window
    // after window was 8 statements over 500,000 rows), then what lies below the range.
    const statements = (await statementsOf(async () => { page = await store.query({ limit: 50, action: 'none', from }) })).filter(s => s.text.includes('bff_audit_entries'))
    t.equal(page?.entries.length, 0)
    t.ok(statements.length <= 5, `${statements.length} statements: where the range lies, three windows, the rest`)
  })

  t.test('retention: each batch reads and deletes from the anchor on, by the seq index, statistics or not', async t => {
    const { url, store } = await storeOnNewDatabase(t)
    await sql(url, 'ALTER TABLE bff_audit_entries SET (autovacuum_enabled = false)')
    const old = Date.now() - 40 * 86_400_000
    for (let i = 0; i < 20_000; i += 5000) {
      await store.write(Array.from({ length: 5000 }, (_, k) => entry({ timestamp: old + i + k })))
    }
    // The first 10,000 written 40 days ago.
    await sql(url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'40 days\' WHERE seq <= 10000')
    t.equal(await store.prune(30 * 86_400_000, 5000), 5000)
    const statements = await statementsOf(async () => { t.equal(await store.prune(30 * 86_400_000, 1000), 1000) })
    const plans = await plansOf(url, statements.filter(s => s.text.includes('bff_audit_entries')), false)
    t.equal(plans.length, 2, 'the oldest entries read, then deleted')
    for (const [i, nodes] of plans.entries()) {
      const scan = nodes.find(n => n['Index Name'] === 'bff_audit_entries_seq_key')
      t.match(scan?.['Index Cond'], /seq > /, `${i === 0 ? 'read' : 'deleted'} by the seq index from the anchor on`)
    }
    t.same((await sql(url, 'SELECT anchor_seq FROM bff_audit_chain'))[0], { anchor_seq: '6000' })
    t.same(await store.verify({}), { ok: true, checked: 14_000, firstBroken: null })
  })

  t.test('verify: a row put below retention\'s anchor is the first broken; nothing was skipped', async t => {
    const { url, store } = await storeOnNewDatabase(t)
    const old = Date.now() - 40 * 86_400_000
    await store.write(Array.from({ length: 10 }, (_, i) => entry({ timestamp: old + i })))
    await sql(url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'40 days\' WHERE seq <= 5')
    t.equal(await store.prune(30 * 86_400_000, 100), 5)
    const id = randomUUID()
    await sql(url, `INSERT INTO bff_audit_entries (id, seq, request_id, "timestamp", hash, previous_hash, tenant_id, user_id, protocol, action, category, risk_level, status, status_code, duration_ms)
      SELECT $1, 0, 'by-hand', "timestamp", hash, previous_hash, tenant_id, user_id, protocol, action, category, risk_level, status, status_code, duration_ms FROM bff_audit_entries WHERE seq = 6`, [id])
    t.same(await store.verify({}), { ok: false, checked: 1, firstBroken: { id, requestId: 'by-hand' } }, 'no "skipped": retention removed nothing during the walk')
  })

  // Retention judged entries by their timestamps alone, against the pruning instance's clock:
  // an entry of an instance whose clock ran ahead held every entry after it until its own
  // timestamp was old, and an instance whose clock runs ahead removed entries early.
  t.test('retention: an entry of a clock ahead holds nothing back, and a clock ahead removes nothing early', async t => {
    const day = 86_400_000
    const ahead = await storeOnNewDatabase(t)
    const now = Date.now()
    // Written 40 days ago: the second by an instance whose clock was a year ahead.
    await ahead.store.write([entry({ timestamp: now - 40 * day }), entry({ timestamp: now + 365 * day }), entry({ timestamp: now - 40 * day + 1 })])
    await sql(ahead.url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'40 days\'')
    await ahead.store.write([entry()])
    t.equal(await ahead.store.prune(30 * day, 1000), 3, 'the three entries written 40 days ago are removed, the one of the clock ahead with them')
    t.same((await sql(ahead.url, 'SELECT seq FROM bff_audit_entries ORDER BY seq')).map(r => Number(r.seq)), [4])
    t.same(await ahead.store.verify({}), { ok: true, checked: 1, firstBroken: null })

    const early = await storeOnNewDatabase(t)
    // Written 10 days ago, and today.
    await early.store.write([entry({ timestamp: Date.now() - 10 * day })])
    await sql(early.url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'10 days\'')
    await early.store.write([entry()])
    // An instance whose clock runs 30 days ahead (before: its "30 days ago" was today).
    const realNow = Date.now
    Date.now = () => realNow() + 30 * day
    let removed: number
    try {
      removed = await early.store.prune(30 * day, 1000)
    } finally {
      Date.now = realNow
    }
    t.equal(removed, 0, 'the entry of 10 days ago stays: PostgreSQL\'s clock says it is not 30 days old')
    t.equal(await count(early.url), 2)
  })

  // Retention judged an entry old by its timestamp (the gateway's clock) as well as by when its
  // row was written: a gateway whose clock runs behind had its entries removed early, at the next
  // hourly prune with a clock reading 1970 (a dead battery), 30 days early with one 30 days behind.
  t.test('retention: the entries of a gateway whose clock runs far behind are kept the retention period from when they were written', async t => {
    const day = 86_400_000
    const { url, store } = await storeOnNewDatabase(t)
    // Written today by gateways whose clocks read 1970 and 30 days ago, then by one on time.
    await store.write([entry({ timestamp: 1000 }), entry({ timestamp: Date.now() - 30 * day })])
    await store.write([entry()])
    // Retention of 20 days, pruned by the gateway 30 days behind (before: its "20 days ago", 50
    // days ago), then by one on time (before: 20 days ago).
    const realNow = Date.now
    Date.now = () => realNow() - 30 * day
    let removed: number
    try {
      removed = await store.prune(20 * day, 1000)
    } finally {
      Date.now = realNow
    }
    t.equal(removed, 0, 'nothing written today is 20 days old, whatever the gateways\' clocks said')
    t.equal(await count(url), 3)
    t.equal(await store.prune(20 * day, 1000), 0, 'a gateway on time removes them no earlier')
    t.equal(await count(url), 3)
    // Once written more than 20 days ago (PostgreSQL's clock), they go, the 1970 one no sooner.
    await sql(url, 'UPDATE bff_audit_entries SET created_at = now() - interval \'21 days\' WHERE seq <= 2')
    t.equal(await store.prune(20 * day, 1000), 2, 'the two written 21 days ago are removed')
    t.equal(await count(url), 1)
  })

  t.test('migrations: up, down and status; production refuses pending migrations and starts once migrated', async t => {
    const url = databaseUrl(await createTestDatabase(t))
    t.equal(await migrateMain(['status'], { DATABASE_URL: url }), 'version 0 of 5; pending: 1, 2, 3, 4, 5')
    const prod = { NODE_ENV: 'production', BFF_JWT_SECRET: SECRET, BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t) }
    await t.rejects(buildApp(testConfig(prod), { logger: false }), ConfigError)
    await t.rejects(buildApp(testConfig(prod), { logger: false }), /pending migrations \(1, 2, 3, 4, 5\): run npm run migrate/)
    t.match(await migrateMain(['up'], { DATABASE_URL: url }), /^migrated up from 0 to 5: 001\.do\.audit-entries\.sql, 002\.do\.audit-chain\.sql, 003\.do\.audit-hash-index\.sql, 004\.do\.audit-request-id-pattern-index\.sql, 005\.do\.audit-tenant-seq-index\.sql$/)
    t.match(await migrateMain([], { DATABASE_URL: url }), /nothing to do/)
    t.equal(await migrateMain(['status'], { DATABASE_URL: url }), 'version 5 of 5; pending: none')
    const indexes = async (): Promise<string[]> => (await sql<{ indexname: string, method: string }>(url,
      "SELECT indexname, am.amname AS method FROM pg_indexes JOIN pg_class c ON c.relname = indexname JOIN pg_am am ON am.oid = c.relam WHERE tablename = 'bff_audit_entries' ORDER BY indexname")).map(r => `${r.indexname} ${r.method}`)
    t.same(await indexes(), ['bff_audit_entries_hash_idx hash', 'bff_audit_entries_pkey btree', 'bff_audit_entries_request_id_idx btree', 'bff_audit_entries_seq_key btree', 'bff_audit_entries_tenant_id_seq_idx btree', 'bff_audit_entries_tenant_id_timestamp_idx btree', 'bff_audit_entries_timestamp_idx btree'])
    t.match(await sql(url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'bff_audit_entries_tenant_id_seq_idx'"), [{ indexdef: /USING btree \(tenant_id, seq\)$/ }], 'on (tenant_id, seq), in place of (tenant_id)')
    const app = await buildApp(testConfig(prod), { logger: false })
    t.teardown(() => app.close())
    await app.ready()
    t.equal(app.audit.health().store, 'postgres')
    await app.close()

    // The request id's index serves a prefix search (a suffixed request id) without a scan.
    // (Sequential scans priced out: on a table this small the planner would rightly prefer one.)
    const noScans = url + (url.includes('?') ? '&' : '?') + 'options=-c%20enable_seqscan%3Doff'
    const plan = JSON.stringify(await sql(noScans, "EXPLAIN (FORMAT JSON) SELECT * FROM bff_audit_entries WHERE request_id = 'r1' OR request_id LIKE 'r1~%'"))
    t.match(plan, /bff_audit_entries_request_id_idx/)
    t.notMatch(plan, /Seq Scan/)
    // Number('') is 0: `down "$VERSION"` with VERSION unset dropped every table.
    for (const arg of ['', ' ', '1.0', '-0']) await t.rejects(migrateMain(['down', arg], { DATABASE_URL: url }), /down needs a version from 0 to 5/, `down ${JSON.stringify(arg)} refused`)
    t.match(await migrateMain(['down'], { DATABASE_URL: url }), /^migrated down from 5 to 4/)
    t.same((await indexes()).filter(i => i.includes('tenant')), ['bff_audit_entries_tenant_id_idx btree', 'bff_audit_entries_tenant_id_timestamp_idx btree'], 'down to 4: the index on tenant_id again')
    t.match(await migrateMain(['down'], { DATABASE_URL: url }), /^migrated down from 4 to 3/)
    t.ok((await indexes()).includes('bff_audit_entries_request_id_key btree'), 'down to 3: the unique constraint again')
    t.match(await migrateMain(['down'], { DATABASE_URL: url }), /^migrated down from 3 to 2/)
    t.ok((await indexes()).includes('bff_audit_entries_hash_idx btree'), 'down to 2: the index on hash is a B-tree again')
    t.match(await migrateMain(['down'], { DATABASE_URL: url }), /^migrated down from 2 to 1/)
    t.match(await migrateMain(['down', '0'], { DATABASE_URL: url }), /^migrated down from 1 to 0/)
    t.equal((await sql(url, "SELECT 1 FROM pg_tables WHERE tablename LIKE 'bff_audit%'")).length, 0, 'down removes every table')
    await t.rejects(migrateMain(['down', '7'], { DATABASE_URL: url }), /down needs a version from 0 to 0/)
    await t.rejects(migrateMain(['sideways'], { DATABASE_URL: url }), /unknown command sideways/)
    await t.rejects(migrateMain(['status'], {}), /DATABASE_URL is not set/)
    // Checked as the gateway checks it, naming the variable: pg said a bare "Invalid URL" (a port
    // past 65535) or "getaddrinfo ENOTFOUND base" (not a URL at all).
    await t.rejects(migrateMain(['status'], { DATABASE_URL: 'postgres://postgres:pw@127.0.0.1:99999/db' }), { message: 'DATABASE_URL="postgres://postgres:***@127.0.0.1:99999/db" is invalid: expected postgres://[user:password@]host[:port]/database (or postgresql://) (the port "99999" is not 1..65535)' })
    await t.rejects(migrateMain(['up'], { DATABASE_URL: 'notaurl' }), /^DATABASE_URL="notaurl" is invalid: .*\(not a valid URL\)$/)
  })
}

// The hash covers an entry's timestamp to the millisecond, as the gateway writes it, but the
// column (timestamptz) keeps microseconds, which Date drops when a row is read back. A timestamp
// that is not a whole millisecond was changed after the write: verify reports that row, although
// its hash, computed from the millisecond, would still match.
if (await postgresAvailable()) {
  t.test('verify: a stored timestamp changed by less than a millisecond is a changed row', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const store = new PostgresAuditStore({ databaseUrl: url })
    t.teardown(() => store.close())
    const batch = [entry(), entry(), entry()]
    await store.write(batch)
    t.same(await store.verify({}), { ok: true, checked: 3, firstBroken: null })
    await sql(url, "UPDATE bff_audit_entries SET \"timestamp\" = \"timestamp\" + interval '999 microseconds' WHERE seq = 2")
    t.same(await store.verify({}), { ok: false, checked: 2, firstBroken: { id: batch[1].id, requestId: batch[1].requestId } })
    // The query path still answers the timestamp to the millisecond, as it did.
    const page = await store.query({ limit: 10, requestId: batch[1].requestId })
    t.equal(page.entries[0].timestamp, batch[1].timestamp)
  })

  // pg reads `infinity` as a number and a year past 275760 as an Invalid Date: hashing the row
  // threw, and verify and GET /admin/audit answered 500 for every walk or page that reached it.
  t.test('verify: a stored timestamp JavaScript cannot represent is a changed row; GET /admin/audit answers it as null', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const app = await pgApp(t, url)
    const ids = await restCalls(app, url, 3)
    await drained(app)
    const [row] = await sql<{ id: string, request_id: string, seq: string }>(url, 'SELECT id, request_id, seq FROM bff_audit_entries WHERE request_id = $1', [ids[1]])
    t.match(await verify(app), { ok: true, firstBroken: null })
    for (const value of ['infinity', '-infinity', '290000-01-01T00:00:00Z']) {
      await sql(url, 'UPDATE bff_audit_entries SET "timestamp" = $1 WHERE seq = $2', [value, row.seq])
      t.same((await verify(app)).firstBroken, { id: row.id, requestId: row.request_id }, `${value}: the changed row is the first broken`)
      t.same((await verify(app, { from: new Date(Date.now() - 60_000).toISOString() })).firstBroken, { id: row.id, requestId: row.request_id }, `${value}: in a range too`)
      const res = await app.inject({ url: `/admin/audit?requestId=${ids[1]}`, headers: bearer() })
      t.equal(res.statusCode, 200, `${value}: GET /admin/audit ${res.body.slice(0, 200)}`)
      t.match(res.json(), { entries: [{ requestId: ids[1], timestamp: null }] }, `${value}: its timestamp answered null`)
      const all = await app.inject({ url: '/admin/audit?limit=500', headers: bearer() })
      t.equal(all.statusCode, 200, `${value}: a page holding it`)
    }
  })

  // Number() rounded 2^63 - 1 up to 2^63, which the next statement sent back out of bigint's range
  // (22003): every verify, and GET /admin/audit with a time range, answered 500.
  t.test('verify: a row moved to a position past 2^53 either way is reported, and GET /admin/audit pages on', async t => {
    const { url, store } = await storeOnNewDatabase(t)
    const base = Date.now() - 60_000
    const batch = Array.from({ length: 5 }, (_, i) => entry({ timestamp: base + i * 1000 }))
    await store.write(batch)
    const named = (i: number): { id: string, requestId: string } => ({ id: batch[i].id, requestId: batch[i].requestId })
    const pages = async (q: { from?: Date }): Promise<number> => {
      let n = 0
      let beforeSeq: number | undefined
      for (let i = 0; i < 10; i++) {
        const page = await store.query({ limit: 2, ...q, beforeSeq })
        n += page.entries.length
        if (page.nextSeq === null) return n
        beforeSeq = page.nextSeq
      }
      return n
    }
    await sql(url, 'UPDATE bff_audit_entries SET seq = 9223372036854775807 WHERE seq = 5')
    t.same(await store.verify({}), { ok: false, checked: 4, firstBroken: named(4) }, 'the last row moved to 2^63 - 1')
    t.same(await store.verify({ from: new Date(base + 2000) }), { ok: false, checked: 2, firstBroken: named(4) }, 'in a range too')
    t.equal(await pages({}), 5, 'every entry, page by page')
    t.ok(await pages({ from: new Date(base) }) >= 4, 'with a time range')
    await sql(url, 'UPDATE bff_audit_entries SET seq = 5 WHERE seq = 9223372036854775807')
    t.same(await store.verify({}), { ok: true, checked: 5, firstBroken: null }, 'put back')
    await sql(url, `INSERT INTO bff_audit_entries (${COPIED}, id, seq, request_id) SELECT ${COPIED}, gen_random_uuid(), -9223372036854775808, 'forged' FROM bff_audit_entries WHERE seq = 1`)
    const [forged] = await sql<{ id: string }>(url, 'SELECT id FROM bff_audit_entries WHERE request_id = \'forged\'')
    t.same(await store.verify({}), { ok: false, checked: 0, firstBroken: { id: forged.id, requestId: 'forged' } }, 'a row put at -2^63, before the chain')
    t.equal(await pages({}), 6, 'every entry, page by page')
    t.equal(await pages({ from: new Date(base) }), 6, 'with a time range')
  })

  t.test('verify: a number of the metadata changed to a decimal JavaScript reads as the same is a changed row', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const store = new PostgresAuditStore({ databaseUrl: url })
    t.teardown(() => store.close())
    // Numbers jsonb writes in its own notation (1e21, 1e-7) and the shortest forms of doubles.
    const base = Date.now() - 10_000
    const batch = [entry({ timestamp: base }), entry({ timestamp: base + 1000, metadata: { cache: 'hit', tagCount: 3, big: 1e21, small: 1e-7, sum: 0.1 + 0.2, neg: -2.5, max: Number.MAX_VALUE, tiny: 5e-324, list: [0, -0, 1.5e300] } }), entry({ timestamp: base + 2000 }), entry({ timestamp: base + 3000 })]
    await store.write(batch)
    t.same(await store.verify({}), { ok: true, checked: 4, firstBroken: null }, 'every number the gateway wrote reads as written')
    // Each number changed alone, the rest of the metadata as it was.
    await sql(url, 'UPDATE bff_audit_entries SET metadata = jsonb_set(metadata, \'{tagCount}\', \'3.00000000000000000001\') WHERE seq = 2')
    t.same((await sql<{ n: string }>(url, 'SELECT metadata->>\'tagCount\' AS n FROM bff_audit_entries WHERE seq = 2'))[0].n, '3.00000000000000000001')
    t.same((await store.verify({})).firstBroken, { id: batch[1].id, requestId: batch[1].requestId }, 'tagCount 3 as 3.00000000000000000001')
    await sql(url, 'UPDATE bff_audit_entries SET metadata = jsonb_set(metadata, \'{tagCount}\', \'3\') WHERE seq = 2')
    t.same(await store.verify({}), { ok: true, checked: 4, firstBroken: null }, 'put back')
    await sql(url, 'UPDATE bff_audit_entries SET metadata = jsonb_set(metadata, \'{big}\', \'1000000000000000000000.0000000001\') WHERE seq = 2')
    t.same(await store.verify({}), { ok: false, checked: 2, firstBroken: { id: batch[1].id, requestId: batch[1].requestId } })
    t.same(await store.verify({ from: new Date(batch[2].timestamp) }), { ok: false, checked: 0, firstBroken: { id: batch[1].id, requestId: batch[1].requestId } }, 'the entry before a range is held to it too')
    t.same(await store.verify({}, { limit: 1 }).then(async r => await store.verify({}, { next: r.next })), { ok: false, checked: 1, firstBroken: { id: batch[1].id, requestId: batch[1].requestId } }, 'and a resumed walk')
  })

  /** A fresh store holding ten entries one second apart, from a minute ago (`named(i)`: the i-th). */
  const tenSeconds = async (t: Test): Promise<{ url: string, store: PostgresAuditStore, base: number, named: (i: number) => { id: string, requestId: string } }> => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const store = new PostgresAuditStore({ databaseUrl: url })
    t.teardown(() => store.close())
    const base = Date.now() - 60_000
    const batch = Array.from({ length: 10 }, (_, i) => entry({ timestamp: base + i * 1000 }))
    await store.write(batch)
    // Each row written when it was stamped (retention goes by when a row was written).
    await sql(url, 'UPDATE bff_audit_entries SET created_at = "timestamp"')
    return { url, store, base, named: i => ({ id: batch[i].id, requestId: batch[i].requestId }) }
  }

  // Before, a range was held to the chain only at its start (and at the head when it reached the
  // newest entry): rows deleted at the end of a range, a range deleted whole, or every row, verified ok.
  t.test('verify: rows removed at the end of a range, the whole range or the whole table are found', async t => {
    const { url, store, base, named } = await tenSeconds(t)
    const at = (s: number): Date => new Date(base + s * 1000)
    t.same(await store.verify({ from: at(3), to: at(5) }), { ok: true, checked: 3, firstBroken: null })
    t.same(await store.verify({ from: at(3.5), to: at(3.7) }), { ok: true, checked: 0, firstBroken: null }, 'a range with no entry, nothing removed: ok')
    t.same(await store.verify({ from: at(20) }), { ok: true, checked: 0, firstBroken: null }, 'after the newest entry, which is the head: ok')

    await sql(url, 'DELETE FROM bff_audit_entries WHERE seq = 6')
    t.same(await store.verify({ from: at(3), to: at(5) }), { ok: false, checked: 2, firstBroken: named(6) }, 'the last row of a range: found at the entry after the gap')
    t.same(await store.verify({ from: at(5), to: at(5.5) }), { ok: false, checked: 0, firstBroken: named(6) }, 'the whole range')
    await sql(url, 'DELETE FROM bff_audit_entries WHERE seq > 8')
    t.same(await store.verify({ from: at(8) }), { ok: false, checked: 0, firstBroken: named(7) }, 'a removed tail that was the range: at the last entry left')
    await sql(url, 'DELETE FROM bff_audit_entries')
    t.same(await store.verify({}), { ok: false, checked: 0, firstBroken: null }, 'every row: no entry left to name')
  })

  // A row changed together with its timestamp, moved just out of the range, became the range's
  // neighbour, whose stored hash the walk started from (or whose link alone it checked): ok.
  t.test('verify: bounded per call, resumed with the cursor it answered, one short statement a page', async t => {
    await resumedVerifies(t, async () => {
      const { url, store, base, named } = await tenSeconds(t)
      return {
        store,
        base,
        named,
        change: async seq => { await sql(url, `UPDATE bff_audit_entries SET status = 'FORGED' WHERE seq = ${seq}`) },
        remove: async seq => { await sql(url, `DELETE FROM bff_audit_entries WHERE seq = ${seq}`) }
      }
    })
  })

  t.test('verify: a changed row moved just out of a range is found at the range\'s edge', async t => {
    const { url, store, base, named } = await tenSeconds(t)
    const range = { from: new Date(base + 3000), to: new Date(base + 6000) }
    t.same(await store.verify(range), { ok: true, checked: 4, firstBroken: null })
    await sql(url, "UPDATE bff_audit_entries SET status = 'FORGED', \"timestamp\" = \"timestamp\" + interval '10 seconds' WHERE seq = 7")
    t.match(await store.verify(range), { ok: false, firstBroken: named(6) }, 'the last row, moved after the range')
    await sql(url, "UPDATE bff_audit_entries SET status = 'FORGED', \"timestamp\" = \"timestamp\" - interval '10 seconds' WHERE seq = 4")
    t.match(await store.verify(range), { ok: false, firstBroken: named(3) }, 'the first row, moved before the range')
  })
}

// scripts/migrate.ts ran its main only when import.meta.url === `file://${argv[1]}`, which is not
// percent-encoded: from a checkout whose path has a space, `npm run migrate` did nothing and
// exited 0, and a deploy's migration step passed without migrating.
if (await postgresAvailable()) {
  t.test('npm run migrate works from a checkout whose path has a space', async t => {
    const root = fileURLToPath(new URL('../../../', import.meta.url))
    const base = mkdtempSync(join(tmpdir(), 'mantle migrate '))
    t.teardown(() => rmSync(base, { recursive: true, force: true }))
    // The script and what it imports: the migrations, and the check of DATABASE_URL (schemas/config.ts).
    for (const file of MIGRATE_SOURCES) cpSync(join(root, file), join(base, file))
    cpSync(join(root, 'migrations'), join(base, 'migrations'), { recursive: true })
    cpSync(join(root, 'package.json'), join(base, 'package.json'))
    symlinkSync(join(root, 'node_modules'), join(base, 'node_modules'))
    const run = spawnSync(process.execPath, ['--import', 'tsx', 'scripts/migrate.ts', 'status'], { cwd: base, env: { ...process.env, DATABASE_URL: PG_URL }, encoding: 'utf8', timeout: 60_000 })
    t.match(run.stdout, /^version \d+ of \d+/, `it reports the status (exit ${run.status}, ${run.stderr.slice(0, 200)})`)
  })
}
