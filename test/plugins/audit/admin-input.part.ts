import t, { type Test } from 'tap'
import type { FastifyInstance, LightMyRequestResponse } from 'fastify'
import { buildApp } from '../../../app.js'
import { startKernel } from '../../../kernel/server.js'
import { testConfig, bearer, buildDemoApp, drained } from '../../helper.js'
import { Spool } from '../../../plugins/audit/spool.js'
import { postgresAvailable, createTestDatabase, databaseUrl, spoolDir } from './db.js'

// The admin endpoints' schemas let through two kinds of input the stores cannot use. A leap
// second (23:59:60) is a valid date-time, but JavaScript's Date has no time for it: PostgreSQL
// was sent an Invalid Date (500) and the memory store compared with NaN, which ignored the
// filter. PostgreSQL's text cannot hold a NUL character and fails the whole query for a
// parameter with one (500). Both are refused as input: 400 VALIDATION_FAILED, problem+json.

interface Teardown { teardown: (fn: () => unknown) => void }
async function pgApp (t: Teardown, url: string): Promise<FastifyInstance> {
  const kernel = await startKernel({ port: 0, runDelayMs: 1 })
  t.teardown(() => kernel.close())
  const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t) }), { logger: false, kernelUrl: kernel.url })
  t.teardown(() => app.close())
  await app.ready()
  return app
}

const LEAP = '2016-12-31T23:59:60Z'

function refused (t: Test, res: LightMyRequestResponse, what: string, detail?: RegExp): void {
  t.equal(res.statusCode, 400, `${what}: ${res.statusCode} ${res.body.slice(0, 200)}`)
  t.match(res.headers['content-type'], /^application\/problem\+json/, `${what}: problem+json`)
  t.match(res.json(), { status: 400, code: 'VALIDATION_FAILED', detail: detail ?? /./ }, `${what}: VALIDATION_FAILED`)
}

async function checkRefusals (t: Test, app: FastifyInstance): Promise<void> {
  for (const name of ['from', 'to']) {
    refused(t, await app.inject({ method: 'GET', url: `/admin/audit?${name}=${encodeURIComponent(LEAP)}`, headers: bearer() }), `GET /admin/audit?${name}=<leap second>`, new RegExp(`^querystring\\.${name} `))
    refused(t, await app.inject({ method: 'POST', url: '/admin/audit/verify', headers: bearer(), payload: { [name]: LEAP } }), `POST /admin/audit/verify {${name}: <leap second>}`, new RegExp(`^body\\.${name} `))
  }
  for (const name of ['tenant', 'requestId', 'action', 'status']) {
    refused(t, await app.inject({ method: 'GET', url: `/admin/audit?${name}=a%00b`, headers: bearer() }), `GET /admin/audit?${name}=a%00b`)
  }
  // The checks refuse only what they must: an ordinary date-time and text still answer.
  const ok = await app.inject({ method: 'GET', url: '/admin/audit?tenant=a%01b&from=2016-12-31T23:59:59Z', headers: bearer() })
  t.equal(ok.statusCode, 200, ok.body.slice(0, 200))
}

if (await postgresAvailable()) {
  t.test('postgres: a leap-second date-time or a NUL in a text filter is a 400, never a 500', async t => {
    const app = await pgApp(t, databaseUrl(await createTestDatabase(t, { migrated: true })))
    await checkRefusals(t, app)
  })
}

t.test('memory: a leap-second date-time is a 400, not a filter silently ignored; a NUL is refused alike', async t => {
  const app = await buildDemoApp(t)
  await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  await drained(app)
  await checkRefusals(t, app)
})

// The refusals the handlers make themselves (a reversed range, a leap second, a cursor or a next
// they never gave, a next beside a range) are problem+json answers like the schema's, and
// mantle_http_errors_total counts every such answer: they were sent from the handler, past the
// error handler, and no metric counted them (an operator's dashboard showed no 400 at all).
t.test('the audit endpoints\' own 400s are counted in mantle_http_errors_total, as their schema\'s are', async t => {
  const app = await buildDemoApp(t)
  const counted = async (): Promise<number> => {
    const line = (await app.inject({ url: '/metrics' })).body.split('\n').find(l => l.startsWith('mantle_http_errors_total{code="VALIDATION_FAILED",status="400"}'))
    return line === undefined ? 0 : Number(line.split(' ')[1])
  }
  const system = bearer({ roles: ['system'] })
  const requests: Array<{ method: 'GET' | 'POST', url: string, payload?: Record<string, unknown> }> = [
    { method: 'GET', url: '/admin/audit?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z' },
    { method: 'GET', url: `/admin/audit?to=${encodeURIComponent(LEAP)}` },
    { method: 'GET', url: '/admin/audit?cursor=bm90LWEtY3Vyc29y' },
    { method: 'POST', url: '/admin/audit/verify', payload: { from: '2026-01-02T00:00:00Z', to: '2026-01-01T00:00:00Z' } },
    { method: 'POST', url: '/admin/audit/verify', payload: { next: 'bm90LWEtcG9zaXRpb24' } },
    { method: 'POST', url: '/admin/audit/verify', payload: { next: 'bm90LWEtcG9zaXRpb24', from: '2026-01-01T00:00:00Z' } }
  ]
  for (const r of requests) {
    const before = await counted()
    refused(t, await app.inject({ ...r, headers: system }), `${r.method} ${r.url} ${JSON.stringify(r.payload ?? '')}`)
    t.equal(await counted(), before + 1, `${r.method} ${r.url} ${JSON.stringify(r.payload ?? '')}: counted`)
  }
})

// The audit endpoints record themselves (category admin; auth for a 401 or 403). A body Fastify refused there was
// recorded twice (once more as `security`, action `http`), and a refusal other than 400, 401
// and 403 was recorded as INTERNAL.
t.test('a refusal on an audit endpoint leaves one entry, with the refusal\'s code', async t => {
  const app = await buildDemoApp(t, { BFF_BODY_LIMIT: 1024 })
  const cases: Array<[string, Record<string, string>, string, number, string]> = [
    ['adm-bad-json', { 'content-type': 'application/json' }, '{bad', 400, 'VALIDATION_FAILED'],
    ['adm-not-json', { 'content-type': 'text/plain' }, 'x', 415, 'UNSUPPORTED_MEDIA_TYPE'],
    ['adm-too-large', { 'content-type': 'application/json' }, JSON.stringify({ from: 'x'.repeat(2000) }), 413, 'PAYLOAD_TOO_LARGE'],
    ['adm-no-role', { 'content-type': 'application/json', ...bearer({ roles: ['viewer'] }) }, '{}', 403, 'FORBIDDEN'],
    ['adm-ok', { 'content-type': 'application/json' }, '{}', 200, 'ok']
  ]
  for (const [id, headers, payload, code] of cases) {
    const res = await app.inject({ method: 'POST', url: '/admin/audit/verify', headers: { ...bearer(), ...headers, 'x-request-id': id }, payload })
    t.equal(res.statusCode, code, id)
  }
  await drained(app)
  for (const [id, , , code, status] of cases) {
    const res = await app.inject({ method: 'GET', url: `/admin/audit?requestId=${id}`, headers: bearer() })
    const rows = (res.json().entries as Array<{ action: string, category: string, status: string, statusCode: number }>).map(r => [r.action, r.category, r.status, r.statusCode])
    t.same(rows, [['admin.audit.verify', code === 403 ? 'auth' : 'admin', status, code]], `${id}: one entry, ${status}`)
  }
})

// A body is JSON, whose values have their types: Fastify's one Ajv coerced bodies as it coerces
// query strings, so {"tags":true} invalidated the tag "true" and a tenant ["x"] became "x".
t.test('admin bodies are not coerced: a boolean, number or array where a string is due is refused', async t => {
  const app = await buildDemoApp(t)
  const system = bearer({ roles: ['system'] })
  const post = async (url: string, payload: unknown): Promise<LightMyRequestResponse> =>
    await app.inject({ method: 'POST', url, headers: { ...system, 'content-type': 'application/json' }, payload: JSON.stringify(payload) })
  refused(t, await post('/admin/cache/invalidate', { tags: true }), 'tags: true')
  refused(t, await post('/admin/cache/invalidate', { tags: [5] }), 'tags: [5]')
  refused(t, await post('/admin/cache/invalidate', { tags: ['agents'], tenant: ['x'] }), 'tenant: ["x"]')
  refused(t, await post('/admin/cache/invalidate', { tags: ['agents'], tenant: 5 }), 'tenant: 5')
  refused(t, await post('/admin/audit/verify', { limit: true }), 'verify limit: true')
  refused(t, await post('/admin/audit/verify', { limit: [3] }), 'verify limit: [3]')
  refused(t, await post('/admin/audit/verify', { limit: '3' }), 'verify limit: "3"')
  const ok = await post('/admin/cache/invalidate', { tags: ['agents'], tenant: 'x' })
  t.equal(ok.statusCode, 200, 'well-typed bodies pass')
  // A query string is text: its integers are still read.
  const page = await app.inject({ url: '/admin/audit?limit=2', headers: system })
  t.equal(page.statusCode, 200)
})

// A spool whose disk does not answer at shutdown: the writer's close gives up on it after its
// bound, but the plugin's onClose then awaited spool.close(), which waits for the append under way
// (the spool runs one at a time): the shutdown hung until it was killed at its grace.
t.test('shutdown: an audit spool whose disk does not answer does not hold app.close for ever', async t => {
  const appendMany = Spool.prototype.appendMany
  let appends = 0
  Spool.prototype.appendMany = async function (this: Spool, batches: Parameters<Spool['appendMany']>[0]) {
    appends++
    // The disk stops answering: the fsync never returns.
    const fh = (this as unknown as { fh: { datasync: () => Promise<void> } }).fh
    fh.datasync = async () => { await new Promise(() => {}) }
    return await appendMany.call(this, batches)
  }
  t.teardown(() => { Spool.prototype.appendMany = appendMany })
  // PostgreSQL away from the start: every entry goes to the spool.
  const app = await buildApp(testConfig({ BFF_AUDIT_STORE: 'postgres', DATABASE_URL: 'postgres://postgres@127.0.0.1:1/none', BFF_AUDIT_SPOOL_DIR: spoolDir(t) }), { logger: false, audit: { connectTimeoutMs: 200 } })
  await app.ready()
  const res = await app.inject({ url: '/admin/audit' })
  t.equal(res.statusCode, 401, 'an audited refusal')
  const closed = await Promise.race([app.close().then(() => true), new Promise<boolean>(resolve => setTimeout(resolve, 15_000, false))])
  t.equal(closed, true, 'app.close resolved')
  t.ok(appends > 0, `the entry went to the spool (${appends} appends)`)
})

// An offset of hours alone (`+05`, which ISO 8601 and the endpoints' date-time format admit) was
// no time to Date: the request was refused 400 "(a leap second?)". It is read as `+05:00`.
t.test('memory: a date-time whose offset is hours alone (+05) is read as +05:00, not refused', async t => {
  const app = await buildDemoApp(t)
  await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  await drained(app)
  const hour = new Date(Date.now() + 5 * 3_600_000).toISOString().slice(0, 13)
  for (const [offset, entries] of [['+05', 1], ['-05', 0]] as const) {
    // The hour that began five hours ahead of UTC's, written in UTC+05: a time an hour ago at most.
    const from = `${hour}:00:00${offset}`
    const res = await app.inject({ method: 'GET', url: `/admin/audit?action=getAgent&from=${encodeURIComponent(from)}`, headers: bearer() })
    t.equal(res.statusCode, 200, `GET /admin/audit?from=${from}: ${res.body.slice(0, 200)}`)
    if (res.statusCode === 200) t.equal(res.json().entries.length, entries, `from=${from}: ${entries} entry`)
    const verify = await app.inject({ method: 'POST', url: '/admin/audit/verify', headers: bearer(), payload: { from, to: new Date(Date.now() + 86_400_000).toISOString().slice(0, 19) + '+05' } })
    t.equal(verify.statusCode, 200, `POST /admin/audit/verify {from: ${from}}: ${verify.body.slice(0, 200)}`)
  }
})
