import t from 'tap'
import type { Test } from 'tap'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { readFile } from 'node:fs/promises'
import { createServer } from 'node:http'
import type { IncomingHttpHeaders, OutgoingHttpHeaders, Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { fileURLToPath } from 'node:url'
import { Ajv } from 'ajv'
import { parse } from 'yaml'
import type { FastifyInstance, InjectOptions } from 'fastify'
import { buildKernel, forwardEvents, kernelSettings, startKernel } from '../../kernel/server.js'
import { HEADER_SAFE } from '../../plugins/auth/identity.js'
import type { Agent, DocumentSummary, KernelDocument, KernelEvent, KernelOptions, Run } from '../../kernel/server.js'

const serverFile = fileURLToPath(new URL('../../kernel/server.ts', import.meta.url))
const manifestFile = fileURLToPath(new URL('../../kernel/manifest.yaml', import.meta.url))

type Method = 'GET' | 'POST' | 'PATCH' | 'DELETE'
interface CallOptions { tenant?: string, body?: unknown, headers?: Record<string, string> }
interface Answer<T> { status: number, body: T, headers: OutgoingHttpHeaders }
interface ErrorBody { error: string, message: string }

function kernel (t: Test, opts: KernelOptions = {}): FastifyInstance {
  const app = buildKernel({ runDelayMs: 5, ...opts })
  t.teardown(() => app.close())
  return app
}

async function call<T = unknown> (app: FastifyInstance, method: Method, url: string, opts: CallOptions = {}): Promise<Answer<T>> {
  const headers: Record<string, string> = { ...opts.headers }
  if (opts.tenant !== undefined) headers['x-tenant-id'] = opts.tenant
  const req: InjectOptions = { method, url, headers }
  if (opts.body !== undefined) req.payload = opts.body as InjectOptions['payload']
  const res = await app.inject(req)
  return { status: res.statusCode, body: res.body === '' ? (undefined as T) : res.json<T>(), headers: res.headers }
}

async function waitFor (cond: () => boolean, timeoutMs = 2000): Promise<void> {
  const start = Date.now()
  while (!cond()) {
    if (Date.now() - start > timeoutMs) throw new Error('timed out waiting for condition')
    await new Promise((resolve) => setTimeout(resolve, 2))
  }
}

const sleep = async (ms: number): Promise<void> => { await new Promise((resolve) => setTimeout(resolve, ms)) }

t.test('health, request id echo and unknown routes', async (t) => {
  const app = kernel(t)
  const health = await call(app, 'GET', '/v1/health', { headers: { 'x-request-id': 'req-1' } })
  t.equal(health.status, 200)
  t.same(health.body, { status: 'ok' })
  t.equal(health.headers['x-request-id'], 'req-1')

  const bare = await call(app, 'GET', '/v1/health')
  t.notOk('x-request-id' in bare.headers, 'no request id header when none was sent')

  const missing = await call<ErrorBody>(app, 'GET', '/v1/nope', { headers: { 'x-request-id': 'req-2' } })
  t.equal(missing.status, 404)
  t.same(missing.body, { error: 'not_found', message: 'Route GET /v1/nope not found' })
  t.equal(missing.headers['x-request-id'], 'req-2', 'echoed on 404 too')

  const invalid = await call<ErrorBody>(app, 'GET', '/v1/agents?limit=0', { headers: { 'x-request-id': 'req-3' } })
  t.equal(invalid.status, 400)
  t.equal(invalid.headers['x-request-id'], 'req-3', 'echoed on validation errors too')
})

t.test('echo-headers returns the context headers, null when absent', async (t) => {
  const app = kernel(t)
  const full = await call<Record<string, string | null>>(app, 'GET', '/v1/echo-headers', {
    headers: {
      'x-request-id': 'rid',
      'x-tenant-id': 't1',
      'x-user-id': 'u1',
      'x-user-roles': 'viewer,editor',
      traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
      'idempotency-key': 'k1',
      'x-other': 'not echoed'
    }
  })
  t.equal(full.status, 200)
  t.same(full.body, {
    'x-request-id': 'rid',
    'x-tenant-id': 't1',
    'x-user-id': 'u1',
    'x-user-roles': 'viewer,editor',
    traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
    'idempotency-key': 'k1'
  })
  const empty = await call<Record<string, string | null>>(app, 'GET', '/v1/echo-headers')
  t.same(empty.body, {
    'x-request-id': null,
    'x-tenant-id': null,
    'x-user-id': null,
    'x-user-roles': null,
    traceparent: null,
    'idempotency-key': null
  })
})

t.test('agents: list, filter, limit and internal fields', async (t) => {
  const app = kernel(t)
  const list = await call<Agent[]>(app, 'GET', '/v1/agents')
  t.equal(list.status, 200)
  t.same(list.body.map((a) => a.id), ['a1', 'a2', 'a3'])
  for (const a of list.body) {
    t.type(a.internalCostCents, 'number', 'internal cost is sent (the gateway strips it)')
    t.equal(a.ownerTenant, 'public', 'no tenant header means tenant public')
  }
  const limited = await call<Agent[]>(app, 'GET', '/v1/agents?limit=2')
  t.same(limited.body.map((a) => a.id), ['a1', 'a2'])
  const byModel = await call<Agent[]>(app, 'GET', '/v1/agents?model=mantle-small')
  t.same(byModel.body.map((a) => a.id), ['a3'])
  const none = await call<Agent[]>(app, 'GET', '/v1/agents?model=unknown')
  t.same(none.body, [])
  for (const bad of ['0', '101', 'abc', '1.5']) {
    const res = await call<ErrorBody>(app, 'GET', `/v1/agents?limit=${bad}`)
    t.equal(res.status, 400, `limit=${bad} is refused`)
    t.equal(res.body.error, 'bad_request')
    t.match(res.body.message, /limit/)
  }
})

t.test('agents: get and 404', async (t) => {
  const app = kernel(t)
  const one = await call<Agent>(app, 'GET', '/v1/agents/a2')
  t.equal(one.status, 200)
  t.match(one.body, { id: 'a2', name: 'Code Reviewer', model: 'mantle-medium', createdAt: '2024-01-01T00:00:00.000Z' })
  const a3 = await call<Agent>(app, 'GET', '/v1/agents/a3')
  t.equal(a3.body.description, null)
  const missing = await call<ErrorBody>(app, 'GET', '/v1/agents/zz')
  t.equal(missing.status, 404)
  t.same(missing.body, { error: 'not_found', message: 'agent zz not found' })
  const badId = await call<ErrorBody>(app, 'GET', '/v1/agents/a%20b')
  t.equal(badId.status, 400, 'ids are restricted to a safe alphabet')
})

t.test('agents: create', async (t) => {
  const app = kernel(t)
  const created = await call<Agent>(app, 'POST', '/v1/agents', { body: { name: 'Writer', extra: 'dropped' } })
  t.equal(created.status, 201)
  t.match(created.body, { id: 'a4', name: 'Writer', model: 'mantle-small', description: null, internalCostCents: 0, ownerTenant: 'public' })
  t.notOk('extra' in created.body, 'unknown body fields are dropped')
  t.ok(Date.parse(created.body.createdAt) > 0)
  t.equal(created.body.createdAt, created.body.updatedAt)

  const second = await call<Agent>(app, 'POST', '/v1/agents', { body: { name: 'Planner', model: 'mantle-large', description: 'Plans.' } })
  t.match(second.body, { id: 'a5', model: 'mantle-large', description: 'Plans.' })
  const list = await call<Agent[]>(app, 'GET', '/v1/agents')
  t.same(list.body.map((a) => a.id), ['a1', 'a2', 'a3', 'a4', 'a5'])
  const got = await call<Agent>(app, 'GET', '/v1/agents/a5')
  t.same(got.body, second.body)

  for (const body of [{}, { name: '' }, { name: 'x'.repeat(201) }, { name: 'ok', model: '' }, { name: 'ok', description: { text: 'x' } }]) {
    const res = await call<ErrorBody>(app, 'POST', '/v1/agents', { body })
    t.equal(res.status, 400, `refused: ${JSON.stringify(body)}`)
    t.equal(res.body.error, 'bad_request')
  }
  const noBody = await call<ErrorBody>(app, 'POST', '/v1/agents')
  t.equal(noBody.status, 400)
  const notJson = await call<ErrorBody>(app, 'POST', '/v1/agents', { body: '{bad', headers: { 'content-type': 'application/json' } })
  t.equal(notJson.status, 400)
  t.equal(notJson.body.error, 'bad_request')
  t.match(notJson.body.message, /JSON/)
  const wrongType = await call<ErrorBody>(app, 'POST', '/v1/agents', { body: 'name=x', headers: { 'content-type': 'text/csv' } })
  t.equal(wrongType.status, 415)
  t.equal(wrongType.body.error, 'bad_request')
})

t.test('agents: update', async (t) => {
  const app = kernel(t)
  const updated = await call<Agent>(app, 'PATCH', '/v1/agents/a1', { body: { name: 'Researcher', model: 'mantle-xl', description: 'New.' } })
  t.equal(updated.status, 200)
  t.match(updated.body, { id: 'a1', name: 'Researcher', model: 'mantle-xl', description: 'New.', createdAt: '2024-01-01T00:00:00.000Z' })
  t.not(updated.body.updatedAt, '2024-01-01T00:00:00.000Z')
  const cleared = await call<Agent>(app, 'PATCH', '/v1/agents/a1', { body: { description: null } })
  t.match(cleared.body, { name: 'Researcher', description: null })
  const noop = await call<Agent>(app, 'PATCH', '/v1/agents/a2', { body: {} })
  t.match(noop.body, { id: 'a2', name: 'Code Reviewer' })
  const got = await call<Agent>(app, 'GET', '/v1/agents/a1')
  t.equal(got.body.name, 'Researcher')

  const missing = await call<ErrorBody>(app, 'PATCH', '/v1/agents/zz', { body: { name: 'x' } })
  t.equal(missing.status, 404)
  t.equal(missing.body.error, 'not_found')
  const bad = await call<ErrorBody>(app, 'PATCH', '/v1/agents/a1', { body: { name: '' } })
  t.equal(bad.status, 400)
})

t.test('agents: delete returns the deleted agent', async (t) => {
  const app = kernel(t)
  const deleted = await call<Agent>(app, 'DELETE', '/v1/agents/a2')
  t.equal(deleted.status, 200)
  t.match(deleted.body, { id: 'a2', name: 'Code Reviewer' })
  t.equal((await call(app, 'GET', '/v1/agents/a2')).status, 404)
  t.equal((await call(app, 'DELETE', '/v1/agents/a2')).status, 404)
  const list = await call<Agent[]>(app, 'GET', '/v1/agents')
  t.same(list.body.map((a) => a.id), ['a1', 'a3'])
})

t.test('tenants are isolated', async (t) => {
  const app = kernel(t)
  const created = await call<Agent>(app, 'POST', '/v1/agents', { tenant: 't1', body: { name: 'Only t1' } })
  t.equal(created.body.ownerTenant, 't1')
  await call(app, 'DELETE', '/v1/agents/a1', { tenant: 't1' })
  await call(app, 'PATCH', '/v1/agents/a2', { tenant: 't1', body: { name: 'Renamed in t1' } })

  t.equal((await call(app, 'GET', `/v1/agents/${created.body.id}`, { tenant: 't2' })).status, 404)
  const t2 = await call<Agent[]>(app, 'GET', '/v1/agents', { tenant: 't2' })
  t.same(t2.body.map((a) => [a.id, a.name, a.ownerTenant]), [
    ['a1', 'Research Assistant', 't2'], ['a2', 'Code Reviewer', 't2'], ['a3', 'Support Triage', 't2']
  ])
  const t1 = await call<Agent[]>(app, 'GET', '/v1/agents', { tenant: 't1' })
  t.same(t1.body.map((a) => a.name), ['Renamed in t1', 'Support Triage', 'Only t1'])
  const pub = await call<Agent[]>(app, 'GET', '/v1/agents', { tenant: '' })
  t.same(pub.body.map((a) => a.ownerTenant), ['public', 'public', 'public'], 'an empty header means public')

  const run = await call<Run>(app, 'POST', '/v1/agents/a3/runs', { tenant: 't1', body: { prompt: 'hi' } })
  t.equal(run.status, 201)
  t.equal((await call(app, 'GET', `/v1/runs/${run.body.id}`, { tenant: 't2' })).status, 404)
  t.same((await call<Run[]>(app, 'GET', '/v1/agents/a3/runs', { tenant: 't2' })).body, [])
})

// The Kernel capped x-tenant-id at 128 characters while the gateway accepts a tid of 1 to 256:
// a valid tenant of 129 characters got 400 KERNEL_REJECTED on every call.
t.test('the demo Kernel accepts every tenant id the gateway accepts: up to 256 characters', async (t) => {
  const app = kernel(t)
  for (const n of [129, 256]) {
    const tenant = 'x'.repeat(n)
    t.ok(HEADER_SAFE.test(tenant), `the gateway accepts a tid of ${n}`)
    const created = await call<Agent>(app, 'POST', '/v1/agents', { tenant, body: { name: 'long' } })
    t.equal(created.status, 201, `${n} characters`)
    t.equal(created.body.ownerTenant, tenant)
  }
  t.notOk(HEADER_SAFE.test('x'.repeat(257)), 'nor the gateway one of 257')
  const tooLong = await call<ErrorBody>(app, 'GET', '/v1/agents', { tenant: 'x'.repeat(257) })
  t.equal(tooLong.status, 400)
  t.same(tooLong.body, { error: 'bad_request', message: 'x-tenant-id longer than 256 characters' })
})

t.test('runs: status progression, events and output', async (t) => {
  const events: KernelEvent[] = []
  const app = kernel(t, { onEvent: (e) => { events.push(e) } })
  const prompt = 'Summarise the quarterly report for the board'
  const created = await call<Run>(app, 'POST', '/v1/agents/a1/runs', { tenant: 't1', body: { prompt, temperature: 0.2 } })
  t.equal(created.status, 201)
  t.match(created.body, {
    id: 'r1',
    agentId: 'a1',
    status: 'queued',
    temperature: 0.2,
    promptChars: prompt.length,
    output: null,
    error: null,
    startedAt: null,
    finishedAt: null
  })
  t.equal(events.length, 1, 'queued is announced at once')

  await waitFor(() => events.length === 3)
  t.same(events.map((e) => [e.topic, e.tenantId, (e.payload as Run).status]), [
    ['runs.updated', 't1', 'queued'], ['runs.updated', 't1', 'running'], ['runs.updated', 't1', 'succeeded']
  ])
  const running = events[1].payload as Run
  t.ok(running.startedAt, 'running has a start time')
  t.equal(running.finishedAt, null, 'payloads are snapshots, not the live object')
  const done = events[2].payload as Run
  t.type(done.output, 'string')
  t.notMatch(done.output ?? '', prompt, 'the output never echoes the prompt')
  t.match(done.output ?? '', /Research Assistant \(mantle-large\) processed a 7-word prompt \(44 characters, digest [0-9a-f]{8}\) at temperature 0\.2\./)

  const got = await call<Run>(app, 'GET', '/v1/runs/r1', { tenant: 't1' })
  t.same(got.body, done)
  t.notOk('prompt' in got.body, 'the prompt is not stored')

  // Same prompt, same output: the summary is deterministic.
  await call(app, 'POST', '/v1/agents/a1/runs', { tenant: 't1', body: { prompt, temperature: 0.2 } })
  await waitFor(() => events.length === 6)
  t.equal((events[5].payload as Run).output, done.output)

  const defaults = await call<Run>(app, 'POST', '/v1/agents/a1/runs', { tenant: 't1', body: { prompt: '  spaced\tout\nwords  ' } })
  t.equal(defaults.body.temperature, 0.7)
  await waitFor(() => events.length === 9)
  t.match((events[8].payload as Run).output, /processed a 3-word prompt/)
})

t.test('runs: a #fail prompt ends failed', async (t) => {
  const events: KernelEvent[] = []
  const app = kernel(t, { onEvent: (e) => { events.push(e) } })
  const created = await call<Run>(app, 'POST', '/v1/agents/a2/runs', { body: { prompt: 'please #fail now' } })
  t.equal(created.status, 201)
  await waitFor(() => events.length === 3)
  const failed = await call<Run>(app, 'GET', `/v1/runs/${created.body.id}`)
  t.match(failed.body, { status: 'failed', output: null, error: /Simulated failure/ })
  t.ok(failed.body.finishedAt)
})

t.test('runs: list, filter and errors', async (t) => {
  const app = kernel(t, { runDelayMs: 10_000 })
  for (let i = 0; i < 3; i++) await call(app, 'POST', '/v1/agents/a1/runs', { body: { prompt: `p${i}` } })
  await call(app, 'POST', '/v1/agents/a2/runs', { body: { prompt: 'other agent' } })

  const list = await call<Run[]>(app, 'GET', '/v1/agents/a1/runs')
  t.equal(list.status, 200)
  t.same(list.body.map((r) => r.id), ['r3', 'r2', 'r1'], 'newest first, this agent only')
  t.same((await call<Run[]>(app, 'GET', '/v1/agents/a1/runs?limit=2')).body.map((r) => r.id), ['r3', 'r2'])
  t.same((await call<Run[]>(app, 'GET', '/v1/agents/a1/runs?status=queued')).body.length, 3)
  t.same((await call<Run[]>(app, 'GET', '/v1/agents/a1/runs?status=succeeded')).body, [])
  t.equal((await call(app, 'GET', '/v1/agents/a1/runs?status=done')).status, 400)
  t.equal((await call(app, 'GET', '/v1/agents/a1/runs?limit=500')).status, 400)
  const noAgent = await call<ErrorBody>(app, 'GET', '/v1/agents/zz/runs')
  t.same(noAgent.body, { error: 'not_found', message: 'agent zz not found' })
  const noRun = await call<ErrorBody>(app, 'GET', '/v1/runs/r99')
  t.equal(noRun.status, 404)
  t.same(noRun.body, { error: 'not_found', message: 'run r99 not found' })

  const runMissing = await call<ErrorBody>(app, 'POST', '/v1/agents/zz/runs', { body: { prompt: 'x' } })
  t.equal(runMissing.status, 404)
  for (const body of [{}, { prompt: '' }, { prompt: 'x'.repeat(20001) }, { prompt: 'x', temperature: 3 }, { prompt: 'x', temperature: 'hot' }]) {
    const res = await call<ErrorBody>(app, 'POST', '/v1/agents/a1/runs', { body })
    t.equal(res.status, 400, `refused: ${JSON.stringify(body).slice(0, 60)}`)
  }
  t.equal((await call(app, 'POST', '/v1/agents/a1/runs', { body: { prompt: 'x'.repeat(20000) } })).status, 201)

  // A deleted agent's runs stay readable; the agent cannot run any more.
  await call(app, 'DELETE', '/v1/agents/a1')
  t.equal((await call(app, 'GET', '/v1/runs/r1')).status, 200)
  t.equal((await call(app, 'POST', '/v1/agents/a1/runs', { body: { prompt: 'x' } })).status, 404)
  t.equal((await call(app, 'GET', '/v1/agents/a1/runs')).status, 404)
})

t.test('runs progress without a listener, and a throwing listener is contained', async (t) => {
  const quiet = kernel(t)
  const run = await call<Run>(quiet, 'POST', '/v1/agents/a1/runs', { body: { prompt: 'hello' } })
  let status = run.body.status
  const start = Date.now()
  while (status !== 'succeeded' && Date.now() - start < 2000) {
    await sleep(5)
    status = (await call<Run>(quiet, 'GET', '/v1/runs/r1')).body.status
  }
  t.equal(status, 'succeeded')

  let calls = 0
  const noisy = kernel(t, { onEvent: () => { calls++; throw new Error('listener broke') } })
  const created = await call<Run>(noisy, 'POST', '/v1/agents/a1/runs', { body: { prompt: 'hello' } })
  t.equal(created.status, 201, 'the request still succeeds')
  await waitFor(() => calls === 3)
  t.equal((await call<Run>(noisy, 'GET', '/v1/runs/r1')).body.status, 'succeeded')
})

t.test('closing cancels pending run timers', async (t) => {
  const events: KernelEvent[] = []
  const app = buildKernel({ runDelayMs: 30, onEvent: (e) => { events.push(e) } })
  await call(app, 'POST', '/v1/agents/a1/runs', { body: { prompt: 'x' } })
  t.equal(events.length, 1)
  await app.close()
  await sleep(100)
  t.equal(events.length, 1, 'no status change after close')
})

t.test('bounds: tenants, runs and created agents', async (t) => {
  t.test('oldest tenant is evicted beyond maxTenants', async (t) => {
    const app = kernel(t, { maxTenants: 3 })
    await call(app, 'POST', '/v1/agents', { tenant: 't1', body: { name: 'kept?' } })
    await call(app, 'POST', '/v1/agents', { tenant: 't2', body: { name: 'kept' } })
    await call(app, 'GET', '/v1/agents', { tenant: 't3' })
    t.equal((await call(app, 'GET', '/v1/agents/a4', { tenant: 't1' })).status, 200, 'within the bound')
    await call(app, 'GET', '/v1/agents', { tenant: 't4' })
    t.equal((await call(app, 'GET', '/v1/agents/a4', { tenant: 't1' })).status, 404, 't1 was evicted and comes back freshly seeded')
    t.equal((await call<Agent[]>(app, 'GET', '/v1/agents', { tenant: 't1' })).body.length, 3)
    // Re-creating t1 evicted t2, the oldest now.
    t.equal((await call(app, 'GET', '/v1/agents/a4', { tenant: 't2' })).status, 404)
  })

  t.test('the default bound is 1000 tenants', async (t) => {
    const app = kernel(t)
    await call(app, 'POST', '/v1/agents', { tenant: 'first', body: { name: 'x' } })
    for (let i = 1; i < 1000; i++) await call(app, 'GET', '/v1/documents?limit=1', { tenant: `t${i}` })
    t.equal((await call(app, 'GET', '/v1/agents/a4', { tenant: 'first' })).status, 200)
    await call(app, 'GET', '/v1/health', { tenant: 'ignored' })
    await call(app, 'GET', '/v1/documents/d1', { tenant: 't1000' })
    t.equal((await call(app, 'GET', '/v1/agents/a4', { tenant: 'first' })).status, 404)
  })

  t.test('oldest runs are dropped beyond maxRunsPerTenant', async (t) => {
    const app = kernel(t, { maxRunsPerTenant: 3, runDelayMs: 10_000 })
    for (let i = 0; i < 5; i++) await call(app, 'POST', '/v1/agents/a1/runs', { body: { prompt: `p${i}` } })
    t.equal((await call(app, 'GET', '/v1/runs/r1')).status, 404)
    t.equal((await call(app, 'GET', '/v1/runs/r2')).status, 404)
    t.equal((await call(app, 'GET', '/v1/runs/r3')).status, 200)
    t.same((await call<Run[]>(app, 'GET', '/v1/agents/a1/runs')).body.map((r) => r.id), ['r5', 'r4', 'r3'])
  })

  t.test('the default bound is 1000 runs', async (t) => {
    const app = kernel(t, { runDelayMs: 10_000 })
    for (let i = 0; i < 1001; i++) await call(app, 'POST', '/v1/agents/a1/runs', { body: { prompt: 'p' } })
    t.equal((await call(app, 'GET', '/v1/runs/r1')).status, 404)
    t.equal((await call(app, 'GET', '/v1/runs/r2')).status, 200)
    t.equal((await call<Run[]>(app, 'GET', '/v1/agents/a1/runs?limit=100')).body.length, 100)
  })

  t.test('oldest created agents are dropped beyond maxAgentsPerTenant, seeds stay', async (t) => {
    const app = kernel(t, { maxAgentsPerTenant: 2 })
    for (const name of ['one', 'two', 'three']) await call(app, 'POST', '/v1/agents', { body: { name } })
    t.same((await call<Agent[]>(app, 'GET', '/v1/agents')).body.map((a) => a.id), ['a1', 'a2', 'a3', 'a5', 'a6'])
  })
})

t.test('documents: search and get', async (t) => {
  const app = kernel(t)
  const all = await call<DocumentSummary[]>(app, 'GET', '/v1/documents')
  t.equal(all.status, 200)
  t.same(all.body.map((d) => d.id), ['d1', 'd2', 'd3'])
  for (const d of all.body) {
    t.equal(d.classification, 'confidential')
    t.notOk('content' in d, 'summaries carry no content')
  }
  t.same((await call<DocumentSummary[]>(app, 'GET', '/v1/documents?q=POOL')).body.map((d) => d.id), ['d2'], 'content, case-insensitive')
  t.same((await call<DocumentSummary[]>(app, 'GET', '/v1/documents?q=handbook')).body.map((d) => d.id), ['d3'], 'title')
  t.same((await call<DocumentSummary[]>(app, 'GET', '/v1/documents?q=finance')).body.map((d) => d.id), ['d1'], 'tags')
  t.same((await call<DocumentSummary[]>(app, 'GET', '/v1/documents?q=zebra')).body, [])
  t.same((await call<DocumentSummary[]>(app, 'GET', '/v1/documents?q=')).body.length, 3, 'empty q matches all')
  t.same((await call<DocumentSummary[]>(app, 'GET', '/v1/documents?limit=1')).body.map((d) => d.id), ['d1'])
  t.equal((await call(app, 'GET', `/v1/documents?q=${'x'.repeat(201)}`)).status, 400)

  const one = await call<KernelDocument>(app, 'GET', '/v1/documents/d2', { tenant: 't9' })
  t.equal(one.status, 200)
  t.match(one.body, { id: 'd2', title: 'Incident Postmortem: Kernel Outage', classification: 'confidential', author: 'SRE', content: /retry storm/ })
  const missing = await call<ErrorBody>(app, 'GET', '/v1/documents/d9')
  t.same(missing.body, { error: 'not_found', message: 'document d9 not found' })
  t.equal(missing.status, 404)
})

t.test('unexpected errors answer 500 without details', async (t) => {
  const app = kernel(t)
  app.get('/v1/boom', () => { throw new Error('secret internals') })
  const res = await call<ErrorBody>(app, 'GET', '/v1/boom')
  t.equal(res.status, 500)
  t.same(res.body, { error: 'internal', message: 'Internal Server Error' })
})

t.test('startKernel listens on 127.0.0.1 and closes cleanly', async (t) => {
  const k = await startKernel({ runDelayMs: 5 })
  t.match(k.url, /^http:\/\/127\.0\.0\.1:\d+$/)
  const res = await fetch(`${k.url}/v1/health`, { headers: { 'x-request-id': 'over-http' } })
  t.equal(res.status, 200)
  t.equal(res.headers.get('x-request-id'), 'over-http')
  t.same(await res.json(), { status: 'ok' })
  await k.close()
  await t.rejects(fetch(`${k.url}/v1/health`), 'nothing listens any more')
})

t.test('startKernel brackets an IPv6 address', async (t) => {
  let k
  try {
    k = await startKernel({ host: '::1' })
  } catch {
    t.pass('skipped: no IPv6 loopback here')
    return
  }
  t.match(k.url, /^http:\/\/\[::1\]:\d+$/)
  await k.close()
})

interface Receiver { url: string, received: Array<{ headers: IncomingHttpHeaders, body: KernelEvent }>, status: number, server: Server }

async function receiver (t: Test): Promise<Receiver> {
  const r: Receiver = { url: '', received: [], status: 202, server: createServer() }
  r.server.on('request', (req, res) => {
    let data = ''
    req.setEncoding('utf8')
    req.on('data', (chunk: string) => { data += chunk })
    req.on('end', () => {
      r.received.push({ headers: req.headers, body: JSON.parse(data) as KernelEvent })
      res.statusCode = r.status
      res.end()
    })
  })
  r.server.listen(0, '127.0.0.1')
  await once(r.server, 'listening')
  r.url = `http://127.0.0.1:${(r.server.address() as AddressInfo).port}/internal/events`
  t.teardown(() => { r.server.closeAllConnections(); r.server.close() })
  return r
}

t.test('forwardEvents posts events to the gateway', async (t) => {
  const r = await receiver(t)
  const errors: unknown[] = []
  const send = forwardEvents(r.url, 'sekret', (err) => { errors.push(err) })
  const event: KernelEvent = { topic: 'runs.updated', tenantId: 't1', payload: { id: 'r1' } }
  send(event)
  await waitFor(() => r.received.length === 1)
  t.same(r.received[0].body, event)
  t.equal(r.received[0].headers.authorization, 'Bearer sekret')
  t.equal(r.received[0].headers['content-type'], 'application/json')
  await sleep(20)
  t.same(errors, [])

  r.status = 401
  send(event)
  await waitFor(() => errors.length === 1)
  t.match(String(errors[0]), /answered 401/)

  const anonymous = forwardEvents(r.url, undefined, (err) => { errors.push(err) })
  r.status = 202
  anonymous(event)
  await waitFor(() => r.received.length === 3)
  t.notOk('authorization' in r.received[2].headers, 'no token, no authorization header')

  const capped = forwardEvents(r.url, '', (err) => { errors.push(err) }, 1)
  capped(event)
  capped(event)
  t.match(String(errors[1]), /dropped runs\.updated event: 1 deliveries already in flight/)
  await waitFor(() => r.received.length === 4)

  const unreachable = forwardEvents('http://127.0.0.1:1/internal/events', 'x', (err) => { errors.push(err) })
  unreachable(event)
  await waitFor(() => errors.length === 3)
  t.type(errors[2], Error)
})

t.test('forwardEvents logs to the console by default', async (t) => {
  const logged: unknown[][] = []
  const original = console.error
  console.error = (...args: unknown[]) => { logged.push(args) }
  t.teardown(() => { console.error = original })
  forwardEvents('http://127.0.0.1:1/internal/events', undefined)({ topic: 'runs.updated', tenantId: 't', payload: null })
  await waitFor(() => logged.length === 1)
  t.equal(logged[0][0], 'kernel: event delivery failed')
})

interface Child { code: number | null, stdout: string, stderr: string }

function runMain (env: Record<string, string>, onStdout?: (text: string, kill: (signal: NodeJS.Signals) => void) => void): Promise<Child> {
  return new Promise((resolve, reject) => {
    // The parent's own loader flags: the child transpiles server.ts exactly as this process did,
    // so tap can merge the child's coverage with ours.
    const child = spawn(process.execPath, [...process.execArgv, serverFile], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe']
    })
    let stdout = ''
    let stderr = ''
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
      stdout += chunk
      onStdout?.(stdout, (signal) => child.kill(signal))
    })
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
    child.on('error', reject)
    child.on('close', (code) => { resolve({ code, stdout, stderr }) })
  })
}

// The children of the checks that need nothing of their subtest, started side by side with the
// first one's: each starts through the loaders of this process, seconds each, and one group after
// another they were most of this file's time. Started when the first "run directly" subtest
// begins, not at load, so that they do not compete with the in-process subtests' waits. Each
// setting's own refusal is checked in this process (kernelSettings); one child checks that a bad
// configuration stops the process with all of them in one line.
const stop = (text: string, kill: (signal: NodeJS.Signals) => void): void => { if (text.includes('kernel listening on')) kill('SIGTERM') }
let spawned: { sigint: Promise<Child>, bad: Promise<Child> } | undefined
function children (): NonNullable<typeof spawned> {
  let sent = false
  spawned ??= {
    sigint: runMain({ KERNEL_PORT: '0', KERNEL_LOGGER: '1' }, (text, kill) => {
      if (!sent && text.includes('kernel listening on')) {
        sent = true
        kill('SIGINT')
      }
    }),
    // Number() read KERNEL_PORT=0x10 as 16 and 1e3 as 1000, and KERNEL_HOST=' ' failed at listen.
    // A Kernel that starts all the same is stopped, and the test fails on what it printed.
    bad: runMain({ KERNEL_PORT: '0x10', KERNEL_RUN_DELAY_MS: '1e3', KERNEL_HOST: ' ' }, stop)
  }
  return spawned
}

t.test('run directly: listens on KERNEL_PORT, forwards events, stops on SIGTERM', async (t) => {
  children()
  const r = await receiver(t)
  const exercise = async (url: string): Promise<void> => {
    const res = await fetch(`${url}/v1/agents/a1/runs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-tenant-id': 'acme' },
      body: JSON.stringify({ prompt: 'hello' })
    })
    t.equal(res.status, 201)
    await waitFor(() => r.received.length === 3, 5000)
  }
  let started = false
  let failure: unknown
  const result = await runMain({
    KERNEL_PORT: '0',
    KERNEL_HOST: '127.0.0.1',
    KERNEL_RUN_DELAY_MS: '5',
    KERNEL_EVENTS_URL: r.url,
    BFF_INTERNAL_TOKEN: 'tok'
  }, (text, kill) => {
    const m = /kernel listening on (http:\/\/\S+)/.exec(text)
    if (m === null || started) return
    started = true
    exercise(m[1]).catch((err: unknown) => { failure = err }).finally(() => { kill('SIGTERM') })
  })
  t.equal(failure, undefined)
  t.equal(result.code, 0, result.stderr)
  t.match(result.stdout, /kernel: SIGTERM, shutting down/)
  t.same(r.received.map((e) => [e.body.tenantId, (e.body.payload as Run).status]), [['acme', 'queued'], ['acme', 'running'], ['acme', 'succeeded']])
  t.equal(r.received[0].headers.authorization, 'Bearer tok')
})

t.test('run directly: SIGINT also stops it', async (t) => {
  const result = await children().sigint
  t.equal(result.code, 0, result.stderr)
  t.match(result.stdout, /kernel: SIGINT, shutting down/)
})

t.test('bad configuration is refused with a message naming each setting', async (t) => {
  t.match(kernelSettings({ KERNEL_PORT: 'abc' }).problems, [/^KERNEL_PORT must be an integer in 0\.\.65535, got abc/])
  t.match(kernelSettings({ KERNEL_PORT: '0', KERNEL_RUN_DELAY_MS: '-1' }).problems, [/^KERNEL_RUN_DELAY_MS must be a number >= 0, got -1/])
  for (const port of [' 80', '+80', '80.0', '65536']) {
    t.same(kernelSettings({ KERNEL_PORT: port }).problems, [`KERNEL_PORT must be an integer in 0..65535, got ${port} (decimal digits only)`], `KERNEL_PORT=${JSON.stringify(port)}`)
  }
  // An empty value is unset: the default port (Number('') was port 0, a random one).
  t.same(kernelSettings({ KERNEL_PORT: '', KERNEL_RUN_DELAY_MS: '', KERNEL_HOST: '' }), { port: 4001, host: '127.0.0.1', runDelayMs: undefined, problems: [] })
  t.same(kernelSettings({ KERNEL_PORT: '0', KERNEL_RUN_DELAY_MS: '2.5', KERNEL_HOST: 'localhost' }), { port: 0, host: 'localhost', runDelayMs: 2.5, problems: [] })
})

t.test('run directly: a port or delay not in decimal digits, or a blank host, is refused, every one in one line, and it exits 1', async (t) => {
  const bad = await children().bad
  t.equal(bad.code, 1)
  t.match(bad.stderr, /^kernel: KERNEL_PORT must be an integer in 0\.\.65535, got 0x10 \(decimal digits only\); KERNEL_RUN_DELAY_MS must be a number >= 0, got 1e3 \(decimal digits only\); KERNEL_HOST must be a host name or IP address \(no spaces\), got " "$/m)
})

// The manifest must describe what the Kernel really does: validate real answers against the
// output schemas and sample inputs against the input schemas.
interface ManifestOperation {
  type: 'query' | 'mutation'
  rest: string
  kernel: string
  input: Record<string, unknown>
  output: Record<string, unknown>
  roles?: string[]
  zone?: string
}
interface Manifest {
  schemas: Record<string, unknown>
  operations: Record<string, ManifestOperation>
  events: Record<string, { topic: string, payload: Record<string, unknown> }>
}

t.test('the manifest describes the Kernel', async (t) => {
  const manifest = parse(await readFile(manifestFile, 'utf8')) as Manifest
  const ajv = new Ajv({ allErrors: true, strict: false })
  ajv.addFormat('date-time', { type: 'string', validate: (s: string) => /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/.test(s) })
  ajv.addSchema({ $id: 'manifest', schemas: manifest.schemas })
  const rewrite = (schema: unknown): unknown => JSON.parse(JSON.stringify(schema).replaceAll('"#/schemas/', '"manifest#/schemas/'))

  const expected = ['listAgents', 'getAgent', 'createAgent', 'updateAgent', 'deleteAgent', 'runAgent', 'getRun', 'listRuns', 'searchDocuments', 'getDocument', 'kernelHeaders']
  t.same(Object.keys(manifest.operations).sort(), [...expected].sort())
  t.same(manifest.events.runUpdated.topic, 'runs.updated')

  const samples: Record<string, Record<string, unknown>> = {
    listAgents: { limit: 5, model: 'mantle-small' },
    getAgent: { id: 'a1' },
    createAgent: { name: 'Writer', model: 'mantle-large', description: 'Writes.' },
    updateAgent: { id: 'a1', name: 'Renamed' },
    runAgent: { id: 'a1', prompt: 'hello there', temperature: 1 },
    getRun: { id: 'r1' },
    listRuns: { id: 'a1', status: 'succeeded', limit: 10 },
    searchDocuments: { q: 'pool', limit: 10 },
    getDocument: { id: 'd1' },
    kernelHeaders: {},
    deleteAgent: { id: 'a2' }
  }
  const order = ['listAgents', 'getAgent', 'createAgent', 'updateAgent', 'runAgent', 'getRun', 'listRuns', 'searchDocuments', 'getDocument', 'kernelHeaders', 'deleteAgent']
  const events: KernelEvent[] = []
  const app = kernel(t, { onEvent: (e) => { events.push(e) } })
  const validateEvent = ajv.compile(rewrite(manifest.events.runUpdated.payload) as object)

  for (const name of order) {
    const op = manifest.operations[name]
    const input = samples[name]
    const validInput = ajv.compile(rewrite(op.input) as object)
    t.ok(validInput(input), `${name}: sample input is valid ${ajv.errorsText(validInput.errors)}`)
    t.notOk(validInput({ ...input, unexpected: 1 }), `${name}: unknown input is refused`)

    const [method, path] = op.kernel.split(' ') as [Method, string]
    const rest = { ...input }
    const url = path.replace(/\{(\w+)\}/g, (_m, key: string) => {
      const v = String(rest[key])
      delete rest[key]
      return encodeURIComponent(v)
    })
    const params = new URLSearchParams(Object.entries(rest).map(([k, v]): [string, string] => [k, String(v)]))
    const body = method === 'GET' || method === 'DELETE' ? undefined : rest
    const query = body === undefined && params.size > 0 ? `?${params.toString()}` : ''
    if (name === 'getRun' || name === 'listRuns') await waitFor(() => events.length === 3)
    const res = await call(app, method, url + query, { tenant: 'acme', body, headers: { 'x-request-id': 'r' } })
    t.ok(res.status === 200 || res.status === 201, `${name}: ${res.status}`)
    if (name === 'listRuns' || name === 'searchDocuments') t.ok((res.body as unknown[]).length > 0, `${name}: non-empty answer`)
    const validOutput = ajv.compile(rewrite(op.output) as object)
    t.ok(validOutput(res.body), `${name}: output matches the schema ${ajv.errorsText(validOutput.errors)}`)
  }
  for (const e of events) t.ok(validateEvent(e.payload), `event payload matches: ${ajv.errorsText(validateEvent.errors)}`)

  // Every path param is declared and required; rest and kernel paths name the same params.
  for (const [name, op] of Object.entries(manifest.operations)) {
    const restParams = [...op.rest.matchAll(/:(\w+)/g)].map((m) => m[1])
    const kernelParams = [...op.kernel.matchAll(/\{(\w+)\}/g)].map((m) => m[1])
    t.same(restParams, kernelParams, `${name}: same path params`)
    const required = (op.input.required as string[] | undefined) ?? []
    for (const p of restParams) t.ok(required.includes(p), `${name}: ${p} is required`)
    t.equal(op.input.additionalProperties, false, `${name}: closed input`)
  }
  t.equal(manifest.operations.getDocument.zone, 'restricted')
  t.equal(manifest.operations.kernelHeaders.zone, 'internal')
  t.same(manifest.operations.kernelHeaders.roles, ['system'])
})
