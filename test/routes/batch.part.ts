import t from 'tap'
import { buildDemoApp, buildTestApp, startTestKernel, testManifest, bearer, json, drained } from '../helper.js'
import { MAX_ANSWER_CHARS } from '../../adapters/face.js'
import { entries } from '../plugins/audit/entries.js'

t.test('a batch runs each call through the pipeline and keeps ids and order', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({
    method: 'POST',
    url: '/api/v1/batch',
    headers: bearer({ roles: ['viewer'], zone: 'public' }),
    payload: {
      calls: [
        { id: 'a', op: 'getAgent', input: { id: 'a1' } },
        { id: 'b', op: 'getAgent', input: { id: 'nope' } },
        { id: 'c', op: 'listAgents', input: { limit: 1000 } },
        { id: 'd', op: 'runAgent', input: { id: 'a1', prompt: 'hi' } },
        { id: 'e', op: 'noSuchOp' },
        { id: 'f', op: 'getDocument', input: { id: 'd1' } },
        { id: 'g', op: 'listAgents' }
      ]
    }
  })
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^application\/json/)
  const { results } = res.json() as { results: Array<{ id: string, result?: Record<string, unknown>, error?: Record<string, unknown> }> }
  t.same(results.map(r => r.id), ['a', 'b', 'c', 'd', 'e', 'f', 'g'])
  t.match(results[0], { result: { id: 'a1', name: String } })
  t.notOk('internalCostCents' in results[0].result!, 'results are shaped by the op output schema')
  t.match(results[1], { error: { code: 'NOT_FOUND', status: 404 } })
  t.match(results[2], { error: { code: 'VALIDATION_FAILED', detail: /limit must be <= 100/ } })
  t.match(results[3], { error: { code: 'FORBIDDEN', detail: /operator/ } })
  t.match(results[4], { error: { code: 'NOT_FOUND', detail: 'No operation noSuchOp' } })
  t.match(results[5], { error: { code: 'FORBIDDEN', detail: /restricted zone/ } })
  t.equal((results[6].result as unknown as unknown[]).length, 3)
  const ids = results.filter(r => r.error !== undefined).map(r => r.error!.requestId as string)
  t.equal(new Set(ids).size, ids.length, 'each call has its own request id')
  for (const id of ids) t.match(id, new RegExp(`^${res.headers['x-request-id'] as string}\\.\\d+$`))
})

t.test('identical query calls in one batch reach the Kernel once; mutations always do', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/things/x': (_req, res) => json(res, 200, { id: 'x', secret: 's' }),
    'POST /v1/things': (_req, res) => json(res, 201, { id: 'new' })
  })
  const manifest = testManifest({
    getThing: { type: 'query', rest: 'GET /things/:id', kernel: 'GET /v1/things/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' }, v: { type: 'integer' } } }, output: { type: 'object', properties: { id: { type: 'string' } } } },
    makeThing: { type: 'mutation', rest: 'POST /things', kernel: 'POST /v1/things', input: { type: 'object', properties: { n: { type: 'integer' } } }, output: { type: 'object', properties: { id: { type: 'string' } } } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const res = await app.inject({
    method: 'POST',
    url: '/api/v1/batch',
    headers: bearer(),
    payload: {
      calls: [
        { id: '1', op: 'getThing', input: { id: 'x' } },
        { id: '2', op: 'getThing', input: { id: 'x' } },
        { id: '3', op: 'makeThing', input: { n: 1 } },
        { id: '4', op: 'makeThing', input: { n: 1 } }
      ]
    }
  })
  t.equal(res.statusCode, 200)
  t.same(res.json(), { results: [{ id: '1', result: { id: 'x' } }, { id: '2', result: { id: 'x' } }, { id: '3', result: { id: 'new' } }, { id: '4', result: { id: 'new' } }] })
  t.equal(kernel.requests.filter(r => r.method === 'GET').length, 1)
  t.equal(kernel.requests.filter(r => r.method === 'POST').length, 2)
  // The memo lives for one request: the next batch calls the Kernel again.
  await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [{ id: '1', op: 'getThing', input: { id: 'x' } }] } })
  t.equal(kernel.requests.filter(r => r.method === 'GET').length, 2)
})

t.test('a batch without a valid token is a 401 before its body is read; a bad envelope is a 400 or 413', async t => {
  const app = await buildDemoApp(t, { BFF_BATCH_MAX_CALLS: 3 })
  // Every call of a batch needs a token: without one the batch is refused whole, its body unread
  // (it was read, parsed and answered 200 with each call's UNAUTHENTICATED).
  const anonymous = await app.inject({ method: 'POST', url: '/api/v1/batch', payload: { calls: [{ id: 'a', op: 'getAgent', input: { id: 'a1' } }] } })
  t.equal(anonymous.statusCode, 401)
  t.match(anonymous.json(), { code: 'UNAUTHENTICATED', status: 401, detail: 'A bearer token is required' })
  const tooMany = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [1, 2, 3, 4].map(n => ({ id: String(n), op: 'listAgents' })) } })
  t.equal(tooMany.statusCode, 413)
  t.match(tooMany.json(), { code: 'PAYLOAD_TOO_LARGE', detail: 'A batch carries at most 3 calls' })
  for (const payload of [{}, { calls: [] }, { calls: [{ op: 'listAgents' }] }, { calls: 'x' },
    // An unknown key, in the envelope or a call (a misspelt `input` went unnoticed: dropped).
    { calls: [{ id: 'a', op: 'listAgents' }], atomic: true }, { calls: [{ id: 'a', op: 'getAgent', inputs: { id: 'a1' } }] }]) {
    const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload })
    t.equal(res.statusCode, 400, JSON.stringify(payload))
    t.match(res.json(), { code: 'VALIDATION_FAILED' })
  }
  const malformed = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: { ...bearer(), 'content-type': 'application/json' }, payload: '{"calls":[' })
  t.equal(malformed.statusCode, 400)
  // Not coerced: an id 1 was answered as "1", ["x"] as "x", and an op true looked for "true".
  for (const call of [{ id: 1, op: 'listAgents' }, { id: ['x'], op: 'listAgents' }, { id: 'a', op: true }, { id: null, op: 'listAgents' }]) {
    const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [call] } })
    t.equal(res.statusCode, 400, JSON.stringify(call))
    t.match(res.json(), { code: 'VALIDATION_FAILED', detail: /must be string/ }, JSON.stringify(call))
  }
})

t.test('a call whose input is no object is refused on its own, as on the other faces; a null input is none', async t => {
  // The call schema asked for an object: `"input":[]` refused the whole batch 400, so its other
  // calls never ran and none was audited, where REST, tRPC and /ws refuse that one call.
  const kernel = await startTestKernel(t, { 'GET /v1/things': (_req, res) => json(res, 200, { ok: true }) })
  const manifest = testManifest({
    listThings: { type: 'query', rest: 'GET /things', kernel: 'GET /v1/things', input: { type: 'object', properties: { q: { type: 'string' } } }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const inputs = [null, [], ['x'], 'x', '', 0, 1, true, false]
  const calls = [{ id: 'ok', op: 'listThings', input: { q: 'a' } }, ...inputs.map((input, n) => ({ id: String(n), op: 'listThings', input }))]
  const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls } })
  t.equal(res.statusCode, 200)
  const { results } = res.json() as { results: Array<{ id: string, result?: unknown, error?: { code: string, detail: string } }> }
  t.same(results.map(r => r.id), calls.map(c => c.id), 'every call answered, in order')
  t.same(results[0].result, { ok: true }, 'the other calls run')
  t.same(results[1].result, { ok: true }, 'null: no input, as on tRPC and /ws')
  for (const r of results.slice(2)) t.match(r, { error: { code: 'VALIDATION_FAILED', detail: 'The input must be a JSON object' } }, `input ${JSON.stringify(inputs[Number(r.id)])}`)
  await drained(app)
  const audited = (await app.audit.store.query({ status: 'VALIDATION_FAILED', limit: 100 })).entries
  t.equal(audited.length, inputs.length - 1, 'each refused call has its audit entry')
})

t.test('a batch\'s answer is bounded: query results past it are left out, a mutation\'s kept', async t => {
  // 50 calls of one 9.5 MB query made a 475 MB answer from a 2.4 KB request, and 57 a 500.
  const blob = 'x'.repeat(3 * 1024 * 1024)
  const kernel = await startTestKernel(t, {
    'GET /v1/big': (_req, res) => json(res, 200, { blob }),
    'POST /v1/poke': (_req, res) => json(res, 200, { poked: true })
  })
  const manifest = testManifest({
    getBig: { type: 'query', rest: 'GET /big', kernel: 'GET /v1/big', output: { type: 'object', properties: { blob: { type: 'string' } } } },
    poke: { type: 'mutation', rest: 'POST /poke', kernel: 'POST /v1/poke', output: { type: 'object', properties: { poked: { type: 'boolean' } } } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const calls = [...Array.from({ length: 11 }, (_, n) => ({ id: `q${n}`, op: 'getBig' })), { id: 'm', op: 'poke' }, { id: 'q11', op: 'getBig' }]
  const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls } })
  t.equal(res.statusCode, 200)
  t.ok(res.body.length <= MAX_ANSWER_CHARS, `${res.body.length} characters`)
  const results = res.json().results as Array<{ id: string, result?: { blob?: string, poked?: boolean }, error?: { code: string, status: number } }>
  t.same(results.map(r => r.id), calls.map(c => c.id), 'every call answered, in order')
  const kept = results.filter(r => r.result?.blob === blob).length
  t.equal(kept, Math.floor(MAX_ANSWER_CHARS / (blob.length + 20)), 'the query results that fit')
  t.ok(results.slice(kept).filter(r => r.id !== 'm').every(r => r.error?.code === 'PAYLOAD_TOO_LARGE' && r.error.status === 413), 'the rest left out')
  t.same(results.find(r => r.id === 'm')?.result, { poked: true }, 'the mutation\'s result kept')
  t.equal(kernel.requests.filter(r => r.method === 'GET').length, 1, 'one Kernel call for the identical queries')
  // Each call's audit entry records what its client got: the results left out were entered as
  // ok/200, the stage having recorded them before the budget cut them.
  const id = res.headers['x-request-id'] as string
  const recorded = new Map((await entries(app)).filter(e => e.protocol === 'batch').map(e => [e.requestId, [e.status, e.statusCode, e.metadata.leftOut]]))
  t.same(calls.map((_, n) => recorded.get(`${id}.${n}`)), results.map(r => r.error === undefined ? ['ok', 200, undefined] : [r.error.code, r.error.status, true]), 'each entry as its call was answered')
  // The metrics too: the results left out were counted 2xx.
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(metrics, new RegExp(`^mantle_request_duration_seconds_count\\{protocol="batch",op="getBig",status_class="2xx"\\} ${kept}$`, 'm'), 'the query results kept, counted 2xx')
  t.match(metrics, new RegExp(`^mantle_request_duration_seconds_count\\{protocol="batch",op="getBig",status_class="4xx"\\} ${12 - kept}$`, 'm'), 'the query results left out, counted 4xx')
})

t.test('a Kernel answer that breaks the output schema is a KERNEL_ERROR for that call only', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/things/bad': (_req, res) => json(res, 200, { name: 'no id' }),
    'GET /v1/things/good': (_req, res) => json(res, 200, { id: 'good' })
  })
  const manifest = testManifest({
    getThing: { type: 'query', rest: 'GET /things/:id', kernel: 'GET /v1/things/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [{ id: 'b', op: 'getThing', input: { id: 'bad' } }, { id: 'g', op: 'getThing', input: { id: 'good' } }] } })
  t.match(res.json(), { results: [{ id: 'b', error: { code: 'KERNEL_ERROR', status: 502 } }, { id: 'g', result: { id: 'good' } }] })
})

// Identical query calls in one batch share one Kernel call (the memo); only the first call's
// context got the Kernel's status. A query the Kernel answered 204 was then fine for the first
// call and a KERNEL_ERROR for the second: one call changed another's outcome.
t.test('identical queries in one batch answered 204 by the Kernel get the same outcome', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/things/x': (_req, res) => { res.writeHead(204); res.end() }
  })
  const manifest = testManifest({
    getThing: { type: 'query', rest: 'GET /things/:id', kernel: 'GET /v1/things/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })

  // Alone, the call is fine: REST answers 204.
  const alone = await app.inject({ method: 'GET', url: '/api/v1/things/x', headers: bearer() })
  t.equal(alone.statusCode, 204)

  const res = await app.inject({
    method: 'POST',
    url: '/api/v1/batch',
    headers: bearer(),
    payload: { calls: [{ id: '1', op: 'getThing', input: { id: 'x' } }, { id: '2', op: 'getThing', input: { id: 'x' } }] }
  })
  t.equal(res.statusCode, 200)
  const [first, second] = res.json().results as Array<Record<string, unknown>>
  t.same(first, { id: '1', result: null }, 'the first call succeeds')
  t.same(second, first === undefined ? undefined : { ...first, id: '2' }, 'the identical second call gets the same outcome')
  t.equal(kernel.requests.length, 2, 'one Kernel call for the two')
})

// README: the answer carries the `Retry-After` and `RateLimit-*` of its refused calls, "of
// several, the longest wait's". They were merged from every refused call, the longest wait's
// on top: a call refused with a wait and no window (a Kernel 423 with Retry-After: 30) beside one
// refused RATE_LIMITED (Retry-After: 2, RateLimit-Limit: 1) gave an answer whose Retry-After
// was the one and whose RateLimit-* the other's: a window that the wait did not belong to.
t.test('a batch\'s Retry-After and RateLimit-* come from one refused call, the longest wait\'s', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/limited': (_req, res) => json(res, 200, { ok: true }),
    'POST /v1/locked': (_req, res) => { res.setHeader('retry-after', '30'); json(res, 423, { message: 'locked' }) }
  })
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    limited: { type: 'query', rest: 'GET /limited', kernel: 'GET /v1/limited', input: { type: 'object', properties: { n: { type: 'integer' } } }, output, rateLimit: { max: 1, windowMs: 2000 } },
    locked: { type: 'mutation', rest: 'POST /locked', kernel: 'POST /v1/locked', input: { type: 'object' }, output }
  })
  const app = await buildTestApp(t, { BFF_RATE_LIMIT_ENABLED: true }, { manifest, kernelUrl: kernel.url })
  const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [{ id: 'a', op: 'limited', input: { n: 1 } }, { id: 'b', op: 'limited', input: { n: 2 } }, { id: 'c', op: 'locked', input: {} }] } })
  t.equal(res.statusCode, 200)
  const { results } = res.json() as { results: Array<{ id: string, error?: { code: string, retryAfter?: number } }> }
  t.same(results.map(r => r.error?.code ?? 'ok').sort(), ['KERNEL_REJECTED', 'RATE_LIMITED', 'ok'], 'one call ran, one refused by its limit, one by the Kernel')
  t.equal(res.headers['retry-after'], '30', 'the longest wait')
  for (const name of ['ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset']) t.equal(res.headers[name], undefined, `no ${name}: the call that asks the longest wait has none`)
})
