import t from 'tap'
import { randomUUID } from 'node:crypto'
import WebSocket from 'ws'
import { buildTestApp, startTestKernel, testManifest, bearer, token, json } from '../../helper.js'

// The manifest's per-operation limit runs in the pipeline, so every face counts each call on its
// own (a batch's calls, a document's fields, each frame) and refuses with the same code.

async function setup (t: Parameters<typeof buildTestApp>[0]) {
  const kernel = await startTestKernel(t, {
    'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }),
    'POST /v1/ok': (_req, res) => json(res, 200, { ok: true })
  })
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    limited: { type: 'query', rest: 'GET /limited', kernel: 'GET /v1/ok', input: { type: 'object' }, output, rateLimit: { max: 2, windowMs: 60_000 } },
    poke: { type: 'mutation', rest: 'POST /poke', kernel: 'POST /v1/ok', input: { type: 'object' }, output, rateLimit: { max: 1, windowMs: 60_000 } },
    free: { type: 'query', rest: 'GET /free', kernel: 'GET /v1/ok', input: { type: 'object' }, output }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  return { app, kernel }
}

t.test('the limit is a stage only of the ops that have one', async t => {
  const kernel = await startTestKernel(t)
  const output = { type: 'object' }
  const manifest = testManifest({
    limited: { type: 'query', rest: 'GET /limited', kernel: 'GET /v1/ok', input: { type: 'object' }, output, rateLimit: { max: 2, windowMs: 1000 } },
    free: { type: 'query', rest: 'GET /free', kernel: 'GET /v1/ok', input: { type: 'object' }, output }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  t.ok(app.pipeline.entry('limited').stages.includes('rateLimit'))
  t.notOk(app.pipeline.entry('free').stages.includes('rateLimit'), 'no limit, no stage, no cost')
  t.equal(app.rateLimiter.store, 'memory', 'no REDIS_URL: memory')
  const defaults = testManifest({ free: { type: 'query', rest: 'GET /free', kernel: 'GET /v1/ok', input: { type: 'object' }, output } }, { url: kernel.url }, { defaults: { rateLimit: { max: 5, windowMs: 1000 } } })
  const withDefaults = await buildTestApp(t, {}, { manifest: defaults, kernelUrl: kernel.url })
  t.ok(withDefaults.pipeline.entry('free').stages.includes('rateLimit'), 'the manifest defaults give every op a limit')
  const off = await buildTestApp(t, { BFF_RATE_LIMIT_ENABLED: false }, { manifest, kernelUrl: kernel.url })
  t.notOk(off.pipeline.entry('limited').stages.includes('rateLimit'), 'off: no stage')
  t.notOk(off.hasDecorator('rateLimiter'))
})

t.test('REST: RateLimit-* on success, then 429 RATE_LIMITED with Retry-After', async t => {
  const { app, kernel } = await setup(t)
  const headers = bearer({ tenant: 'f-' + randomUUID() })
  const first = await app.inject({ url: '/api/v1/limited', headers })
  t.equal(first.statusCode, 200)
  t.equal(first.headers['ratelimit-limit'], '2')
  t.equal(first.headers['ratelimit-remaining'], '1')
  t.ok(Number(first.headers['ratelimit-reset']) >= 1)
  t.equal((await app.inject({ url: '/api/v1/limited', headers })).headers['ratelimit-remaining'], '0')
  const refused = await app.inject({ url: '/api/v1/limited', headers })
  t.equal(refused.statusCode, 429)
  t.match(refused.json(), { code: 'RATE_LIMITED', status: 429, detail: 'limited allows 2 calls per 60000 ms' })
  t.ok(Number(refused.headers['retry-after']) >= 1)
  t.equal(refused.headers['ratelimit-limit'], '2')
  t.equal(refused.headers['ratelimit-remaining'], '0')
  t.equal(kernel.requests.length, 2)
  // A mutation's own limit, counted apart; an op without a limit sends no RateLimit-* headers.
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/poke', headers, payload: {} })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/poke', headers, payload: {} })).statusCode, 429)
  for (let i = 0; i < 5; i++) {
    const res = await app.inject({ url: '/api/v1/free', headers })
    t.equal(res.statusCode, 200)
    t.notOk(res.headers['ratelimit-limit'])
  }
  // Limits are per tenant and user: an anonymous caller is refused by identity first, uncounted.
  t.equal((await app.inject({ url: '/api/v1/limited' })).statusCode, 401)
  t.equal((await app.inject({ url: '/api/v1/limited', headers: bearer({ tenant: 'f-' + randomUUID() }) })).statusCode, 200)
})

t.test('batch: each call is counted on its own', async t => {
  const { app } = await setup(t)
  const headers = bearer({ tenant: 'f-' + randomUUID() })
  const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: 'a', op: 'limited' }, { id: 'b', op: 'limited', input: { x: 1 } }, { id: 'c', op: 'limited', input: { x: 2 } }] } })
  t.equal(res.statusCode, 200)
  const [a, b, c] = res.json().results
  t.same(a.result, { ok: true })
  t.same(b.result, { ok: true })
  t.match(c.error, { code: 'RATE_LIMITED', status: 429 })
})

t.test('tRPC: data.code RATE_LIMITED, httpStatus 429, Retry-After on the response', async t => {
  const { app } = await setup(t)
  const headers = bearer({ tenant: 'f-' + randomUUID() })
  const url = '/trpc/limited?input=' + encodeURIComponent('{}')
  const ok = await app.inject({ url, headers })
  t.equal(ok.statusCode, 200)
  await app.inject({ url, headers })
  const refused = await app.inject({ url, headers })
  t.equal(refused.statusCode, 429)
  t.match(refused.json(), { error: { data: { code: 'RATE_LIMITED', httpStatus: 429 } } })
  t.ok(Number(refused.headers['retry-after']) >= 1)
  t.equal(refused.headers['ratelimit-remaining'], '0')
  // In a tRPC batch, each call is its own.
  const other = bearer({ tenant: 'f-' + randomUUID() })
  const batch = await app.inject({ url: '/trpc/limited,limited,limited?batch=1&input=' + encodeURIComponent(JSON.stringify({ 0: {}, 1: { x: 1 }, 2: { x: 2 } })), headers: other })
  const results = batch.json() as Array<{ result?: unknown, error?: { data: { code: string } } }>
  t.equal(results.filter(r => r.result !== undefined).length, 2)
  t.equal(results[2].error?.data.code, 'RATE_LIMITED')
})

t.test('tRPC: a call alone in its request carries its operation\'s RateLimit-* on success, a batch of one (httpBatchLink\'s lone call) too', async t => {
  const { app } = await setup(t)
  const headers = bearer({ tenant: 'f-' + randomUUID() })
  const single = await app.inject({ url: '/trpc/limited?input=' + encodeURIComponent('{}'), headers })
  t.equal(single.statusCode, 200)
  t.equal(single.headers['ratelimit-limit'], '2')
  t.equal(single.headers['ratelimit-remaining'], '1')
  // Before, a batch of one answered no RateLimit-* (the guard's, with the guard on) while the call was counted.
  for (const method of ['GET', 'POST'] as const) {
    const other = bearer({ tenant: 'f-' + randomUUID() })
    const ofOne = method === 'GET'
      ? await app.inject({ url: '/trpc/limited?batch=1&input=' + encodeURIComponent(JSON.stringify({ 0: {} })), headers: other })
      : await app.inject({ method, url: '/trpc/limited?batch=1', headers: { ...other, 'content-type': 'application/json' }, payload: JSON.stringify({ 0: {} }) })
    t.equal(ofOne.statusCode, 200, method)
    t.equal(ofOne.headers['ratelimit-limit'], '2', method)
    t.equal(ofOne.headers['ratelimit-remaining'], '1', method)
    t.ok(Number(ofOne.headers['ratelimit-reset']) >= 1, method)
  }
  // A batch of several has no one call's RateLimit-* to carry.
  const several = await app.inject({ url: '/trpc/limited,free?batch=1&input=' + encodeURIComponent(JSON.stringify({ 0: {}, 1: {} })), headers: bearer({ tenant: 'f-' + randomUUID() }) })
  t.equal(several.statusCode, 200)
  t.notOk(several.headers['ratelimit-limit'])
})

t.test('tRPC batch: of several refused calls, the longest wait is the response\'s Retry-After and RateLimit-*, whatever their order', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }) })
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    hourly: { type: 'query', rest: 'GET /hourly', kernel: 'GET /v1/ok', input: { type: 'object' }, output, rateLimit: { max: 1, windowMs: 3_600_000 } },
    brief: { type: 'query', rest: 'GET /brief', kernel: 'GET /v1/ok', input: { type: 'object' }, output, rateLimit: { max: 3, windowMs: 2_000 } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const headers = bearer({ tenant: 'f-' + randomUUID() })
  t.equal((await app.inject({ url: '/api/v1/hourly', headers })).statusCode, 200)
  for (let i = 0; i < 3; i++) t.equal((await app.inject({ url: '/api/v1/brief', headers })).statusCode, 200)
  for (const path of ['hourly,brief', 'brief,hourly']) {
    const res = await app.inject({ url: `/trpc/${path}?batch=1&input=` + encodeURIComponent(JSON.stringify({ 0: {}, 1: {} })), headers })
    t.equal(res.statusCode, 429, path)
    t.same((res.json() as Array<{ error?: { data: { code: string } } }>).map(r => r.error?.data.code), ['RATE_LIMITED', 'RATE_LIMITED'], path)
    t.ok(Number(res.headers['retry-after']) > 60, `${path}: the hour's wait (${String(res.headers['retry-after'])} s), not the 2 s window's`)
    t.equal(res.headers['ratelimit-limit'], '1', `${path}: the RateLimit-* of the same call`)
    t.equal(res.headers['ratelimit-reset'], res.headers['retry-after'], path)
  }
})

t.test('GraphQL: each field is a call (identical ones too, which share one Kernel call); the third carries extensions.code RATE_LIMITED', async t => {
  const { app } = await setup(t)
  const headers = bearer({ tenant: 'f-' + randomUUID() })
  const res = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ a: limited { ok } b: limited { ok } c: limited { ok } }' } })
  const body = res.json()
  t.same(body.data.a, { ok: true })
  t.same(body.data.b, { ok: true })
  t.equal(body.data.c, null)
  t.match(body.errors, [{ path: ['c'], extensions: { code: 'RATE_LIMITED', status: 429 } }])
  t.ok(Number(res.headers['retry-after']) >= 1, `the refusal's Retry-After on the response, as on tRPC (${String(res.headers['retry-after'])})`)
  // And the field's own wait in its error, as tRPC's data.retryAfter beside the header (and as
  // a subscription's error over graphql-ws, which has no header).
  t.equal(body.errors[0].extensions.retryAfter, Number(res.headers['retry-after']))
  t.equal(res.headers['ratelimit-limit'], '2', 'and its RateLimit-*')
  t.equal(res.headers['ratelimit-remaining'], '0')
  // Once mercurius runs the document JIT-compiled (after its first run), the same.
  const again = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ a: limited { ok } b: limited { ok } c: limited { ok } }' } })
  t.match(again.json().errors, [{ extensions: { code: 'RATE_LIMITED' } }, { extensions: { code: 'RATE_LIMITED' } }, { extensions: { code: 'RATE_LIMITED' } }])
  t.ok(Number(again.headers['retry-after']) >= 1, 'JIT-compiled: Retry-After')
  const free = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ free { ok } }' } })
  t.notOk(free.headers['retry-after'], 'none on an answer without a refusal')
})

t.test('GraphQL: a document of one operation field carries its operation\'s RateLimit-*, as REST and tRPC do; one of several, the guard\'s', async t => {
  // Before, such a document answered the HTTP guard's RateLimit-* while the operation's limit
  // counted its call: a client pacing itself by RateLimit-Remaining got 429 RATE_LIMITED.
  const kernel = await startTestKernel(t, {
    'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }),
    'GET /v1/gone': (_req, res) => json(res, 404, { message: 'gone' })
  })
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    limited: { type: 'query', rest: 'GET /limited', kernel: 'GET /v1/ok', input: { type: 'object' }, output, rateLimit: { max: 3, windowMs: 60_000 } },
    gone: { type: 'query', rest: 'GET /gone', kernel: 'GET /v1/gone', input: { type: 'object' }, output, rateLimit: { max: 5, windowMs: 60_000 } },
    free: { type: 'query', rest: 'GET /free', kernel: 'GET /v1/ok', input: { type: 'object' }, output }
  }, { url: kernel.url })
  const app = await buildTestApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1000 }, { manifest, kernelUrl: kernel.url })
  const headers = bearer({ tenant: 'g-' + randomUUID() })
  const post = async (query: string) => await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query } })
  // The same document twice: the second runs JIT-compiled (mercurius compiles after one run).
  for (const [res, remaining] of [[await post('{ limited { ok } }'), '2'], [await post('{ limited { ok } }'), '1']] as const) {
    t.same(res.json(), { data: { limited: { ok: true } } })
    t.equal(res.headers['ratelimit-limit'], '3', 'the operation\'s limit, not the guard\'s')
    t.equal(res.headers['ratelimit-remaining'], remaining)
    t.ok(Number(res.headers['ratelimit-reset']) >= 1)
  }
  // Over GET, and beside __typename, which calls nothing: still one call.
  const get = await app.inject({ url: '/graphql?query=' + encodeURIComponent('{ __typename limited { ok } }'), headers })
  t.equal(get.statusCode, 200)
  t.same([get.headers['ratelimit-limit'], get.headers['ratelimit-remaining']], ['3', '0'], 'GET, beside __typename')
  // A call counted, then failed (the Kernel's 404): its operation's RateLimit-*, as REST's.
  const gone = await post('{ gone { ok } }')
  t.match(gone.json().errors, [{ extensions: { code: 'NOT_FOUND' } }])
  t.same([gone.headers['ratelimit-limit'], gone.headers['ratelimit-remaining']], ['5', '4'], 'counted, then failed')
  // Refused by its limit: the refusal's own, as before.
  const refused = await post('{ limited { ok } }')
  t.match(refused.json().errors, [{ extensions: { code: 'RATE_LIMITED' } }])
  t.same([refused.headers['ratelimit-limit'], refused.headers['ratelimit-remaining']], ['3', '0'])
  t.ok(Number(refused.headers['retry-after']) >= 1)
  // A document of several fields has no one call's RateLimit-* to carry: the guard's, as before.
  const several = await post('{ a: gone { ok } b: free { ok } }')
  t.equal(several.headers['ratelimit-limit'], '1000', 'several fields: the guard\'s')
  // One field of an operation without a limit: the guard's.
  t.equal((await post('{ free { ok } }')).headers['ratelimit-limit'], '1000', 'no limit of its own: the guard\'s')
})

t.test('WebSocket: every frame is counted; the error frame carries RATE_LIMITED', async t => {
  const { app } = await setup(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?access_token=${token({ tenant: 'f-' + randomUUID() })}`)
  t.teardown(() => ws.terminate())
  const frames: Array<Record<string, any>> = []
  ws.on('message', (m) => frames.push(JSON.parse(String(m))))
  await new Promise(resolve => ws.on('open', resolve))
  for (const id of ['1', '2', '3']) {
    ws.send(JSON.stringify({ id, op: 'limited', input: { n: id } }))
    const n = Number(id)
    while (frames.length < n) await new Promise(resolve => setTimeout(resolve, 5))
  }
  t.same(frames[0], { id: '1', result: { ok: true } })
  t.same(frames[1], { id: '2', result: { ok: true } })
  t.match(frames[2], { id: '3', error: { code: 'RATE_LIMITED', status: 429, title: 'Rate limited' } })
  // A frame has no Retry-After header: the wait goes in the error (before: no hint at all).
  const wait = frames[2].error.retryAfter
  t.ok(Number.isInteger(wait) && wait >= 1 && wait <= 120, `retryAfter ${String(wait)}`)
  t.notOk('retryAfter' in frames[0], 'none on an answer')
})

t.test('tRPC: a refusal\'s wait is data.retryAfter over WebSocket, where no header carries it, and over HTTP as its Retry-After says', async t => {
  const { app } = await setup(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const ws = new WebSocket(`ws://127.0.0.1:${port}/trpc`, { headers: bearer({ tenant: 'f-' + randomUUID() }) })
  t.teardown(() => ws.terminate())
  const messages: Array<Record<string, any>> = []
  ws.on('message', (m) => messages.push(JSON.parse(String(m))))
  await new Promise(resolve => ws.on('open', resolve))
  for (const id of [1, 2, 3]) {
    ws.send(JSON.stringify({ id, method: 'query', params: { path: 'limited', input: { n: id } } }))
    while (messages.length < id) await new Promise(resolve => setTimeout(resolve, 5))
  }
  t.match(messages[2], { id: 3, error: { data: { code: 'RATE_LIMITED', httpStatus: 429 } } })
  const wait = messages[2].error.data.retryAfter
  t.ok(Number.isInteger(wait) && wait >= 1 && wait <= 120, `retryAfter ${String(wait)}`)

  const headers = bearer({ tenant: 'f-' + randomUUID() })
  const url = '/trpc/limited?input=' + encodeURIComponent('{}')
  await app.inject({ url, headers })
  const notYet = await app.inject({ url, headers })
  t.notOk('retryAfter' in (notYet.json().result ?? {}), 'none on an answer')
  const refused = await app.inject({ url, headers })
  t.equal(refused.json().error.data.retryAfter, Number(refused.headers['retry-after']), 'over HTTP, the header\'s value')
  const invalid = await app.inject({ url: '/trpc/limited?input=' + encodeURIComponent('[1]'), headers: bearer() })
  t.match(invalid.json().error.data, { code: 'VALIDATION_FAILED' })
  t.notOk('retryAfter' in invalid.json().error.data, 'none on a refusal that asks no wait')
})

t.test('REST: a counted call answered with an error still carries the operation\'s RateLimit-*', async t => {
  // The headers were applied on success only: a call that used part of the limit and then failed
  // (a Kernel 404 here) answered none, or the guard's.
  const kernel = await startTestKernel(t, { 'POST /v1/gone': (_req, res) => json(res, 404, { message: 'gone' }) })
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    poke: { type: 'mutation', rest: 'POST /poke', kernel: 'POST /v1/gone', input: { type: 'object' }, output, rateLimit: { max: 5, windowMs: 60_000 } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const headers = bearer({ tenant: 'h-' + randomUUID() })
  for (const remaining of ['4', '3']) {
    const res = await app.inject({ method: 'POST', url: '/api/v1/poke', headers, payload: {} })
    t.equal(res.statusCode, 404)
    t.match(res.json(), { code: 'NOT_FOUND' })
    t.equal(res.headers['ratelimit-limit'], '5')
    t.equal(res.headers['ratelimit-remaining'], remaining)
  }
})

t.test('tRPC: a call alone in its request, counted then failed, carries its operation\'s RateLimit-* as REST\'s does', async t => {
  // Only the refusal's own header fields went out: a Kernel 404 answered the HTTP guard's
  // RateLimit-* (or none) over tRPC, while REST answered the operation's, which the call had used.
  const kernel = await startTestKernel(t, { 'POST /v1/gone': (_req, res) => json(res, 404, { message: 'gone' }) })
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    poke: { type: 'mutation', rest: 'POST /poke', kernel: 'POST /v1/gone', input: { type: 'object' }, output, rateLimit: { max: 5, windowMs: 60_000 } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1000 }, { manifest, kernelUrl: kernel.url })
  const headers = { ...bearer({ tenant: 'h-' + randomUUID() }), 'content-type': 'application/json' }
  const calls = [['single', '/trpc/poke', '{}'], ['batch of one', '/trpc/poke?batch=1', '{"0":{}}']] as const
  for (const [[name, url, payload], remaining] of calls.map((c, i) => [c, String(4 - i)] as const)) {
    const res = await app.inject({ method: 'POST', url, headers, payload })
    t.equal(res.statusCode, 404, name)
    t.match(JSON.stringify(res.json()), /"code":"NOT_FOUND"/, name)
    t.equal(res.headers['ratelimit-limit'], '5', `${name}: the operation's limit, not the guard's`)
    t.equal(res.headers['ratelimit-remaining'], remaining, name)
  }
  // A refusal's own RateLimit-* still have the last word: the operation's limit, spent.
  for (let i = 0; i < 3; i++) await app.inject({ method: 'POST', url: '/trpc/poke', headers, payload: '{}' })
  for (const [name, url, payload] of calls) {
    const refused = await app.inject({ method: 'POST', url, headers, payload })
    t.equal(refused.statusCode, 429, name)
    t.equal(refused.headers['ratelimit-remaining'], '0', name)
    t.ok(Number(refused.headers['retry-after']) >= 1, name)
  }
})

t.test('REST batch: a refused call\'s Retry-After and RateLimit-* go on the response, as on tRPC and GraphQL', async t => {
  const { app } = await setup(t)
  const headers = bearer({ tenant: 'f-' + randomUUID() })
  const calls = ['a', 'b', 'c'].map(id => ({ id, op: 'limited', input: { n: id } }))
  const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls } })
  t.equal(res.statusCode, 200)
  t.match(res.json().results, [{ result: { ok: true } }, { result: { ok: true } }, { error: { code: 'RATE_LIMITED' } }])
  t.ok(Number(res.headers['retry-after']) >= 1, `Retry-After ${String(res.headers['retry-after'])} (before: none)`)
  // Each refused call's own wait, as a /ws frame's error carries it (the header: the longest's).
  t.equal(res.json().results[2].error.retryAfter, Number(res.headers['retry-after']))
  t.equal(res.headers['ratelimit-limit'], '2')
  const fine = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: 'f', op: 'free', input: {} }] } })
  t.notOk(fine.headers['retry-after'], 'none without a refusal')
})
