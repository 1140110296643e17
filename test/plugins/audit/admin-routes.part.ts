import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { connect, type AddressInfo } from 'node:net'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { bearer, buildDemoApp, drained, testConfig, until } from '../../helper.js'
import { buildApp } from '../../../app.js'
import { entries, type Row } from './entries.js'
import { AUDITED_TAG_CHARS } from '../../../plugins/cache/index.js'
import { postgresAvailable, createTestDatabase, databaseUrl, spoolDir, sql } from './db.js'

// Every /admin/* route and /diagz leaves one audit entry, allowed or refused, as the audit
// endpoints did (and only they did): a system token of tenant acme invalidated globex's cache,
// and a viewer was refused on invalidate and on /diagz, and GET /admin/audit answered [].

const SYSTEM = bearer({ tenant: 'acme', user: 'ops', roles: ['system'] })
const VIEWER = bearer({ tenant: 'globex', user: 'eve', roles: ['viewer'] })
const INTERNAL_TOKEN = 'internal-token-of-the-admin-audit-tests'
const INTERNAL = { authorization: `Bearer ${INTERNAL_TOKEN}` }
const EVENT = { topic: 'runs.updated', tenantId: 'globex', payload: { note: 'payload-never-audited' } }
const MANY = Array.from({ length: 300 }, (_, i) => 'agent:' + String(i).padStart(14, '0'))

interface Case { id: string, method: 'GET' | 'POST', url: string, headers: Record<string, string>, payload?: unknown, expect: Row }

const CASES: Case[] = [
  // Another tenant's cache, a tag named twice: the entry says whose and which (once).
  { id: 'inv-other', method: 'POST', url: '/admin/cache/invalidate', headers: SYSTEM, payload: { tenant: 'globex', tags: ['agents', 'agents', 'agent:a1'] }, expect: { action: 'admin.cache.invalidate', category: 'admin', status: 'ok', statusCode: 200, tenantId: 'acme', userId: 'ops', method: 'POST', path: '/admin/cache/invalidate', protocol: 'http', metadata: { tenant: 'globex', tags: ['agents', 'agent:a1'], tagCount: 2 } } },
  { id: 'inv-own', method: 'POST', url: '/admin/cache/invalidate', headers: SYSTEM, payload: { tags: ['agents'] }, expect: { action: 'admin.cache.invalidate', category: 'admin', status: 'ok', statusCode: 200, tenantId: 'acme', metadata: { tenant: 'acme', tags: ['agents'], tagCount: 1 } } },
  // 300 tags of 20 characters: the entry names the first ones up to 2 KB of text, and counts all.
  { id: 'inv-many', method: 'POST', url: '/admin/cache/invalidate', headers: SYSTEM, payload: { tags: MANY }, expect: { action: 'admin.cache.invalidate', category: 'admin', status: 'ok', statusCode: 200, tenantId: 'acme', metadata: { tenant: 'acme', tags: MANY.slice(0, AUDITED_TAG_CHARS / 20), tagCount: 300 } } },
  { id: 'inv-bad', method: 'POST', url: '/admin/cache/invalidate', headers: SYSTEM, payload: { tenant: 'globex', tags: [] }, expect: { action: 'admin.cache.invalidate', category: 'admin', status: 'VALIDATION_FAILED', statusCode: 400, tenantId: 'acme', userId: 'ops', metadata: {} } },
  { id: 'inv-role', method: 'POST', url: '/admin/cache/invalidate', headers: VIEWER, payload: { tenant: 'acme', tags: ['agents'] }, expect: { action: 'admin.cache.invalidate', category: 'auth', status: 'FORBIDDEN', statusCode: 403, tenantId: 'globex', userId: 'eve', metadata: {} } },
  { id: 'inv-anon', method: 'POST', url: '/admin/cache/invalidate', headers: {}, payload: { tags: ['agents'] }, expect: { action: 'admin.cache.invalidate', category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, tenantId: 'public', userId: 'anonymous', metadata: {} } },
  { id: 'diagz-ok', method: 'GET', url: '/diagz', headers: SYSTEM, expect: { action: 'admin.diagz', category: 'admin', status: 'ok', statusCode: 200, tenantId: 'acme', userId: 'ops', method: 'GET', path: '/diagz', protocol: 'http', metadata: {} } },
  { id: 'diagz-role', method: 'GET', url: '/diagz', headers: VIEWER, expect: { action: 'admin.diagz', category: 'auth', status: 'FORBIDDEN', statusCode: 403, tenantId: 'globex', userId: 'eve' } },
  { id: 'diagz-anon', method: 'GET', url: '/diagz', headers: { authorization: 'Bearer not-a-token' }, expect: { action: 'admin.diagz', category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, tenantId: 'public', userId: 'anonymous' } },
  // The Kernel's publish endpoint (BFF_INTERNAL_TOKEN) left no entry at all, allowed or refused.
  // Its entry names the event's topic and tenant, never its payload; the caller is no user.
  { id: 'ev-ok', method: 'POST', url: '/internal/events', headers: INTERNAL, payload: EVENT, expect: { action: 'admin.events.publish', category: 'admin', status: 'ok', statusCode: 202, tenantId: 'public', userId: 'anonymous', method: 'POST', path: '/internal/events', protocol: 'http', metadata: { topic: 'runs.updated', tenant: 'globex' } } },
  { id: 'ev-wrong', method: 'POST', url: '/internal/events', headers: { authorization: 'Bearer internal-token-of-the-admin-audit-test5' }, payload: EVENT, expect: { action: 'admin.events.publish', category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, tenantId: 'public', userId: 'anonymous', path: '/internal/events', metadata: {} } },
  { id: 'ev-none', method: 'POST', url: '/internal/events', headers: {}, payload: EVENT, expect: { action: 'admin.events.publish', category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, metadata: {} } },
  // A user's valid JWT is not the internal token: refused, and the entry names who tried.
  { id: 'ev-jwt', method: 'POST', url: '/internal/events', headers: SYSTEM, payload: EVENT, expect: { action: 'admin.events.publish', category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, tenantId: 'acme', userId: 'ops', metadata: {} } },
  { id: 'ev-bad', method: 'POST', url: '/internal/events', headers: INTERNAL, payload: { topic: '', tenantId: 'globex', payload: { note: 'payload-never-audited' } }, expect: { action: 'admin.events.publish', category: 'admin', status: 'VALIDATION_FAILED', statusCode: 400, metadata: {} } }
]

async function callAll (t: Test, app: FastifyInstance, cases: Case[]): Promise<void> {
  for (const c of cases) {
    const res = await app.inject({ method: c.method, url: c.url, headers: { ...c.headers, 'x-request-id': c.id }, ...(c.payload === undefined ? {} : { payload: c.payload as Record<string, unknown> }) })
    t.equal(res.statusCode, c.expect.statusCode, `${c.id}: ${res.body.slice(0, 200)}`)
  }
  await drained(app)
}

async function checkEntries (t: Test, app: FastifyInstance, cases: Case[]): Promise<void> {
  const rows = await entries(app)
  for (const c of cases) {
    const mine = rows.filter(r => r.requestId === c.id)
    t.equal(mine.length, 1, `${c.id}: one entry`)
    t.match(mine[0], c.expect, `${c.id}: its fields`)
    if (c.expect.metadata !== undefined) t.same(mine[0]?.metadata, c.expect.metadata, `${c.id}: its metadata, nothing else`)
  }
}

t.test('memory: invalidate, /diagz and /internal/events, allowed and refused, leave one entry each', async t => {
  const app = await buildDemoApp(t, { BFF_INTERNAL_TOKEN: INTERNAL_TOKEN })
  await callAll(t, app, CASES)
  await checkEntries(t, app, CASES)
  t.notMatch(JSON.stringify(await entries(app)), /payload-never-audited|internal-token/, 'never an event\'s payload, never the token')
})

if (await postgresAvailable()) {
  t.test('postgres: the entries of invalidate, /diagz and /internal/events are stored, metadata included', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const app = await buildDemoApp(t, { BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: spoolDir(t), BFF_INTERNAL_TOKEN: INTERNAL_TOKEN })
    const cases = CASES.filter(c => c.id === 'inv-other' || c.id === 'diagz-role' || c.id === 'ev-ok' || c.id === 'ev-wrong')
    await callAll(t, app, cases)
    await checkEntries(t, app, cases)
    const stored = await sql(url, 'SELECT request_id, action, category, status, status_code, tenant_id, metadata FROM bff_audit_entries WHERE request_id = ANY($1) ORDER BY seq', [cases.map(c => c.id)])
    t.same(stored, [
      { request_id: 'inv-other', action: 'admin.cache.invalidate', category: 'admin', status: 'ok', status_code: 200, tenant_id: 'acme', metadata: { tenant: 'globex', tags: ['agents', 'agent:a1'], tagCount: 2 } },
      { request_id: 'diagz-role', action: 'admin.diagz', category: 'auth', status: 'FORBIDDEN', status_code: 403, tenant_id: 'globex', metadata: {} },
      { request_id: 'ev-ok', action: 'admin.events.publish', category: 'admin', status: 'ok', status_code: 202, tenant_id: 'public', metadata: { topic: 'runs.updated', tenant: 'globex' } },
      { request_id: 'ev-wrong', action: 'admin.events.publish', category: 'auth', status: 'UNAUTHENTICATED', status_code: 401, tenant_id: 'public', metadata: {} }
    ])
  })

  t.test('postgres: a NUL or a lone surrogate in what an admin call names is stored as U+FFFD, never quarantined; the chain verifies', async t => {
    // jsonb refuses \u0000 and lone surrogates: such an entry was quarantined (the file in the
    // spool directory), while the invalidation had run, and GET /admin/audit showed nothing.
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const dir = spoolDir(t)
    const app = await buildDemoApp(t, { BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: dir, BFF_INTERNAL_TOKEN: INTERNAL_TOKEN })
    const calls = [
      { id: 'inv-nul', url: '/admin/cache/invalidate', headers: SYSTEM, payload: { tenant: 'victim', tags: ['agents', 'x\u0000'] }, status: 200, metadata: { tenant: 'victim', tags: ['agents', 'x\uFFFD'], tagCount: 2 } },
      { id: 'inv-surrogate', url: '/admin/cache/invalidate', headers: SYSTEM, payload: { tenant: 'victim', tags: ['y\ud800', 'z\udfff\u0000', '\u{1F600}'] }, status: 200, metadata: { tenant: 'victim', tags: ['y\uFFFD', 'z\uFFFD\uFFFD', '\u{1F600}'], tagCount: 3 } },
      { id: 'ev-nul', url: '/internal/events', headers: INTERNAL, payload: { topic: 'runs.\ud800', tenantId: 't1\u0000', payload: {} }, status: 202, metadata: { topic: 'runs.\uFFFD', tenant: 't1\uFFFD' } }
    ]
    for (const c of calls) {
      const res = await app.inject({ method: 'POST', url: c.url, headers: { ...c.headers, 'x-request-id': c.id }, payload: c.payload })
      t.equal(res.statusCode, c.status, `${c.id}: ${res.body.slice(0, 200)}`)
    }
    await drained(app)
    for (const c of calls) {
      t.same((await entries(app, '&requestId=' + c.id)).map(r => r.metadata), [c.metadata], `${c.id}: found by GET /admin/audit, U+FFFD in place of what jsonb cannot hold`)
    }
    t.equal(existsSync(join(dir, 'audit.quarantine')), false, 'nothing quarantined')
    const verified = await app.inject({ method: 'POST', url: '/admin/audit/verify', headers: bearer(), payload: {} })
    t.match(verified.json(), { ok: true, firstBroken: null }, 'the hash covers what is stored')
  })
}

// The guard counts a publish without the Kernel's token by its address (the Kernel's own, with it,
// is not counted, 06bca92).
t.test('a publish the HTTP guard refuses leaves its one entry too', async t => {
  const app = await buildDemoApp(t, { BFF_INTERNAL_TOKEN: INTERNAL_TOKEN, BFF_RATE_LIMIT_GLOBAL_MAX: 1 })
  const statuses: number[] = []
  const stranger = { authorization: 'Bearer not-the-internal-token' }
  for (const id of ['ev-rl-1', 'ev-rl-2']) statuses.push((await app.inject({ method: 'POST', url: '/internal/events', headers: { ...stranger, 'x-request-id': id }, payload: EVENT })).statusCode)
  t.same(statuses, [401, 429])
  t.match(await entries(app, '&requestId=ev-rl-2'), [{ action: 'admin.events.publish', category: 'admin', status: 'RATE_LIMITED', statusCode: 429, metadata: {} }], 'its one entry')
})

t.test('with the audit off the admin routes answer as before and carry no audit hook', async t => {
  const off = await buildDemoApp(t, { BFF_AUDIT_ENABLED: false })
  t.equal((await off.inject({ method: 'GET', url: '/diagz', headers: SYSTEM })).statusCode, 200)
  t.equal((await off.inject({ method: 'POST', url: '/admin/cache/invalidate', headers: SYSTEM, payload: { tags: ['agents'] } })).statusCode, 200)
  t.notMatch(off.printRoutes({ includeHooks: true }), /auditAdminCall/, 'no per-request work')
  // On, the hook is on each of them (GET and HEAD of /diagz and /admin/audit, the two POSTs).
  const on = await buildDemoApp(t)
  t.equal(on.printRoutes({ includeHooks: true }).match(/auditAdminCall/g)?.length, 6)
})

t.test('an admin call whose client leaves before the answer still leaves its one entry', async t => {
  // onResponse never runs for a response whose client left first: a system caller who
  // invalidated another tenant's cache and hung up early left no entry.
  const app = await buildDemoApp(t, { BFF_CACHE_ENABLED: true })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const cache = (app as unknown as { responseCache: { cache: { invalidate: (...a: unknown[]) => Promise<unknown> } } }).responseCache.cache
  const invalidate = cache.invalidate.bind(cache)
  let done = false
  cache.invalidate = async (...a: unknown[]) => { await sleep(200); const r = await invalidate(...a); done = true; return r }
  const body = JSON.stringify({ tags: ['agents'], tenant: 'victim' })
  const socket = connect(port, '127.0.0.1')
  await once(socket, 'connect')
  socket.on('error', () => {})
  socket.write(`POST /admin/cache/invalidate HTTP/1.1\r\nhost: x\r\nauthorization: ${SYSTEM.authorization}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nx-request-id: left-early\r\n\r\n${body}`)
  await sleep(50)
  socket.destroy()
  await until(() => done, 'the invalidation to be carried out')
  await sleep(50)
  t.match(await entries(app, '&requestId=left-early'), [{ action: 'admin.cache.invalidate', tenantId: 'acme', status: 'ok', metadata: { tenant: 'victim', tags: ['agents'] } }], 'its one entry')
})

// A body its client stops sending (the connection closed mid-body, or answered 408 and closed
// when it came too slowly) reaches the gateway as Node's 'aborted', which Fastify passes on as a
// 400: an admin call was recorded VALIDATION_FAILED 400 (the client got a 408, or nothing), a
// call's route left a `security` entry for a malformed body that never was, and each counted a
// 400 in mantle_http_errors_total that no one was sent.
t.test('a request whose client leaves before its body arrived is no malformed body: CLIENT_CLOSED on an admin route, no entry on a call\'s route', async t => {
  const app = await buildDemoApp(t, { BFF_REQUEST_TIMEOUT_MS: 500 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const caller = bearer({ tenant: 'acme', user: 'ops', roles: ['system', 'editor', 'operator'] })
  const partial = async (path: string, id: string, leave: boolean): Promise<string> => {
    const socket = connect(port, '127.0.0.1')
    await once(socket, 'connect')
    socket.on('error', () => {})
    let answer = ''
    socket.on('data', (d: Buffer) => { answer += d.toString('latin1') })
    socket.write(`POST ${path} HTTP/1.1\r\nhost: x\r\nauthorization: ${caller.authorization}\r\ncontent-type: application/json\r\ncontent-length: 100\r\nx-request-id: ${id}\r\n\r\n{"tags":`)
    if (leave) {
      await sleep(100)
      socket.destroy()
    } else {
      await once(socket, 'close')
    }
    return answer.split('\r\n')[0]
  }
  await partial('/admin/cache/invalidate', 'admin-left', true)
  t.equal(await partial('/admin/cache/invalidate', 'admin-slow', false), 'HTTP/1.1 408 Request Timeout', 'a body too slow is answered 408')
  // A body Node's parser refuses midway (a chunk size that is no number) is answered 400 on its
  // connection, and recorded so, not as the client's leaving.
  const junk = connect(port, '127.0.0.1')
  await once(junk, 'connect')
  junk.on('error', () => {})
  let junkAnswer = ''
  junk.on('data', (d: Buffer) => { junkAnswer += d.toString('latin1') })
  junk.write(`POST /admin/cache/invalidate HTTP/1.1\r\nhost: x\r\nauthorization: ${caller.authorization}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nx-request-id: admin-junk\r\n\r\n2\r\n{"\r\nzz\r\n`)
  await once(junk, 'close')
  t.equal(junkAnswer.split('\r\n')[0], 'HTTP/1.1 400 Bad Request', 'a chunk the parser refuses is answered 400')
  await partial('/api/v1/agents/a1/runs', 'call-left', true)
  t.equal(await partial('/api/v1/agents/a1/runs', 'call-slow', false), 'HTTP/1.1 408 Request Timeout')
  await sleep(100)
  const rows = await entries(app)
  t.match(rows.filter(r => r.requestId === 'admin-left'), [{ action: 'admin.cache.invalidate', category: 'admin', status: 'CLIENT_CLOSED', statusCode: 499, tenantId: 'acme' }], 'its one entry says the client left')
  // The one answered 408 is recorded as what its client was answered: it was CLIENT_CLOSED 499,
  // as if the client had gone unanswered.
  t.match(rows.filter(r => r.requestId === 'admin-slow'), [{ action: 'admin.cache.invalidate', category: 'admin', status: 'BAD_REQUEST', statusCode: 408, tenantId: 'acme' }], 'its one entry says the 408 its client was answered')
  t.match(rows.filter(r => r.requestId === 'admin-junk'), [{ action: 'admin.cache.invalidate', category: 'admin', status: 'BAD_REQUEST', statusCode: 400, tenantId: 'acme' }], 'and the 400 its client was answered')
  for (const id of ['call-left', 'call-slow']) t.same(rows.filter(r => r.requestId === id), [], `${id}: no entry, nothing was refused`)
  const metrics = (await app.inject({ url: '/metrics' })).body
  t.notMatch(metrics, /mantle_http_errors_total\{code="VALIDATION_FAILED"/, 'no 400 counted that no one was sent')
})

// A body that arrives whole after its 408 runs nothing (app.ts): no answer, so no onSend, and the
// request to the gateway's own endpoint left no entry at all.
t.test('an admin request answered 408 whose body then arrives whole leaves its one entry, and runs nothing', async t => {
  const app = await buildDemoApp(t, { BFF_REQUEST_TIMEOUT_MS: 300 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const caller = bearer({ tenant: 'acme', user: 'ops', roles: ['system'] })
  const body = '{"tags":["agents"]}'
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
  t.teardown(() => socket.destroy())
  await once(socket, 'connect')
  socket.on('error', () => {})
  let answer = ''
  socket.on('data', (d: Buffer) => { answer += d.toString('latin1') })
  socket.write(`POST /admin/cache/invalidate HTTP/1.1\r\nhost: x\r\nauthorization: ${caller.authorization}\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\nx-request-id: late-body\r\n\r\n${body.slice(0, 4)}`)
  await until(() => answer.includes('\r\n\r\n'), 'the 408', 3000)
  t.match(answer, /^HTTP\/1\.1 408 /)
  socket.write(body.slice(4))
  let rows: Row[] = []
  const deadline = Date.now() + 3000
  while (rows.length === 0 && Date.now() < deadline) {
    await sleep(50)
    rows = (await entries(app)).filter(r => r.requestId === 'late-body')
  }
  // metadata empty: the handler, which describes the invalidation, never ran.
  t.match(rows, [{ action: 'admin.cache.invalidate', category: 'admin', status: 'BAD_REQUEST', statusCode: 408, tenantId: 'acme', metadata: {} }], 'its one entry, as what it was answered')
  t.same(rows[0]?.metadata, {}, 'nothing ran')
  t.equal((answer.match(/HTTP\/1\.1 \d+/g) ?? []).length, 1, 'one answer')
})

t.test('an answer sent again after an onSend hook failed leaves one entry, not one per try', async t => {
  const app = await buildApp(testConfig(), { logger: false })
  t.teardown(async () => await app.close())
  // A hook that fails as the answer is written (writeHead refuses the header): Fastify sends an
  // error answer instead, which runs every onSend hook again (three entries before).
  app.addHook('onSend', async (request, reply) => { if (request.url === '/diagz' && reply.statusCode === 200) reply.header('x-bad', 'a\nb') })
  await app.ready()
  const res = await app.inject({ method: 'GET', url: '/diagz', headers: { ...SYSTEM, 'x-request-id': 'sent-twice' } })
  t.equal(res.statusCode, 500)
  await drained(app)
  t.equal((await entries(app, '&requestId=sent-twice')).length, 1, 'one entry')
})
