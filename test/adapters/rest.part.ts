import t from 'tap'
import { mock } from 'node:test'
import { createSigner } from 'fast-jwt'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, buildTestApp, startTestKernel, testManifest, json, bearer, token, SECRET } from '../helper.js'

// The things of the conditional-request tests: a PUT the test Kernel serves, and what it answers.
const THING = { type: 'object', properties: { id: { type: 'string' }, name: { type: 'string' } } }
const PUT_THING = { type: 'mutation', rest: 'PUT /things/:id', kernel: 'PUT /v1/things/{id}', input: { type: 'object', required: ['id', 'name'], properties: { id: { type: 'string' }, name: { type: 'string' } } }, output: THING }

t.test('REST reads reach the Kernel and answer only what the output schema declares', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^application\/json/)
  const agent = res.json()
  t.match(agent, { id: 'a1', name: String, model: String })
  t.notOk('internalCostCents' in agent, 'an undeclared Kernel field is removed')
  t.notOk('ownerTenant' in agent)

  const list = await app.inject({ method: 'GET', url: '/api/v1/agents?limit=2', headers: bearer() })
  t.equal(list.statusCode, 200)
  t.equal(list.json().length, 2, 'the query string is coerced to the integer the schema declares')
  for (const a of list.json()) t.notOk('internalCostCents' in a)
})

t.test('tenants see only their own data', async t => {
  const app = await buildDemoApp(t)
  const created = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: bearer({ tenant: 'A' }), payload: { name: 'only A' } })
  t.equal(created.statusCode, 201)
  const id = created.json().id as string
  const fromA = await app.inject({ method: 'GET', url: `/api/v1/agents/${id}`, headers: bearer({ tenant: 'A' }) })
  t.equal(fromA.statusCode, 200)
  const fromB = await app.inject({ method: 'GET', url: `/api/v1/agents/${id}`, headers: bearer({ tenant: 'B' }) })
  t.equal(fromB.statusCode, 404)
  t.match(fromB.json(), { code: 'NOT_FOUND' })
  // A tenant header sent by the client is not an identity: the token's tid wins.
  const spoof = await app.inject({ method: 'GET', url: `/api/v1/agents/${id}`, headers: { ...bearer({ tenant: 'B' }), 'x-tenant-id': 'A' } })
  t.equal(spoof.statusCode, 404)
})

t.test('mutations: body input, path params win, and the Kernel status is kept', async t => {
  const app = await buildDemoApp(t)
  const run = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: bearer(), payload: { id: 'a2', prompt: 'Summarise the report' } })
  t.equal(run.statusCode, 201)
  t.match(run.json(), { agentId: 'a1', status: 'queued' })
  t.notOk('prompt' in run.json())
  const patched = await app.inject({ method: 'PATCH', url: '/api/v1/agents/a2', headers: bearer(), payload: { name: 'Renamed' } })
  t.equal(patched.statusCode, 200)
  t.equal(patched.json().name, 'Renamed')
  const deleted = await app.inject({ method: 'DELETE', url: '/api/v1/agents/a3', headers: bearer() })
  t.equal(deleted.statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents/a3', headers: bearer() })).statusCode, 404)
})

t.test('a mutation sent with an If-Match no tag of the gateway can satisfy is a 412, and does not run (RFC 9110 §13.1.1)', async t => {
  const app = await buildDemoApp(t)
  const got = await app.inject({ method: 'GET', url: '/api/v1/agents/a2', headers: bearer() })
  const etag = got.headers.etag as string
  t.match(etag, /^W\//, 'the gateway\'s tags are weak')
  // A client guarding its update with the tag it read (optimistic concurrency): the gateway has
  // no strong tag, and If-Match compares strongly, so the condition cannot hold. It was ignored,
  // and the update ran: the lost update the client asked to be kept from.
  for (const ifMatch of [etag, '"stale"', `"stale", ${etag}`]) {
    const res = await app.inject({ method: 'PATCH', url: '/api/v1/agents/a2', headers: { ...bearer(), 'if-match': ifMatch }, payload: { name: 'Overwritten' } })
    t.equal(res.statusCode, 412, ifMatch)
    t.match(res.headers['content-type'], /^application\/problem\+json/)
    t.match(res.json(), { status: 412, code: 'BAD_REQUEST', detail: /If-Match/ })
  }
  const deleted = await app.inject({ method: 'DELETE', url: '/api/v1/agents/a2', headers: { ...bearer(), 'if-match': '"stale"' } })
  t.equal(deleted.statusCode, 412)
  const after = await app.inject({ method: 'GET', url: '/api/v1/agents/a2', headers: bearer() })
  t.equal(after.statusCode, 200)
  t.not(after.json().name, 'Overwritten', 'no refused update ran')
  // `*` holds when the target exists, which the Kernel decides: the call runs.
  const any = await app.inject({ method: 'PATCH', url: '/api/v1/agents/a2', headers: { ...bearer(), 'if-match': '*' }, payload: { name: 'Renamed' } })
  t.equal(any.statusCode, 200)
  t.equal(any.json().name, 'Renamed')
  // A query ignores it, as before.
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents/a2', headers: { ...bearer(), 'if-match': '"stale"' } })).statusCode, 200)
})

t.test('a REST mutation\'s If-None-Match and If-Match: * reach the Kernel, which evaluates them (RFC 9110 §13.2.1)', async t => {
  // A create-only PUT (If-None-Match: *): the gateway cannot tell whether the target exists, and
  // did not say the condition to the Kernel either, so the PUT overwrote what was there.
  const things = new Map<string, string>([['t1', 'first']])
  const kernel = await startTestKernel(t)
  for (const id of ['t1', 't2', 't3']) {
    kernel.on(`PUT /v1/things/${id}`, (req, res) => {
      const exists = things.has(id)
      if ((req.headers['if-none-match'] === '*' && exists) || (req.headers['if-match'] === '*' && !exists)) return json(res, 412, { message: 'precondition failed' })
      things.set(id, (JSON.parse(req.body) as { name: string }).name)
      json(res, exists ? 200 : 201, { id, name: things.get(id) })
    })
  }
  const manifest = testManifest({
    putThing: PUT_THING,
    getThing: { type: 'query', rest: 'GET /things/:id', kernel: 'GET /v1/things/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: THING }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const put = async (id: string, headers: Record<string, string>) => await app.inject({ method: 'PUT', url: `/api/v1/things/${id}`, headers: { ...bearer(), ...headers }, payload: { name: 'second' } })
  const createOnly = await put('t1', { 'if-none-match': '*' })
  t.equal(createOnly.statusCode, 412, 'a create-only PUT of a thing that exists is refused by the Kernel')
  t.match(createOnly.json(), { status: 412, code: 'KERNEL_REJECTED' })
  t.equal(things.get('t1'), 'first', 'nothing was overwritten')
  t.equal((await put('t2', { 'if-none-match': '*' })).statusCode, 201, 'and creates one that does not')
  const updateOnly = await put('t3', { 'if-match': '*' })
  t.equal(updateOnly.statusCode, 412, 'If-Match: * of a thing that does not exist: refused by the Kernel')
  t.notOk(things.has('t3'), 'nothing was created')
  const sent = kernel.requests.filter(r => r.method === 'PUT')
  t.same(sent.map(r => [r.headers['if-none-match'], r.headers['if-match']]), [['*', undefined], ['*', undefined], [undefined, '*']], 'each condition went as sent')
  // A query's conditions are the gateway's own (its cache's ETags): none goes to the Kernel.
  kernel.on('GET /v1/things/t1', (req, res) => json(res, 200, { id: 't1', name: 'first' }))
  await app.inject({ url: '/api/v1/things/t1', headers: { ...bearer(), 'if-none-match': '*', 'if-match': '*' } })
  const got = kernel.requests.at(-1)!
  t.same([got.method, got.headers['if-none-match'], got.headers['if-match']], ['GET', undefined, undefined], 'a query forwards none')
})

t.test('a REST mutation the Kernel serves over GET, its If-None-Match not holding there (a 304), is refused 412 KERNEL_REJECTED, never a 502', async t => {
  // The conditions go on to the Kernel (7b68d9a); a Kernel serving the mutation over GET answers a
  // false If-None-Match with 304 (RFC 9110 §13.1.2), and the method is not performed. The gateway
  // took that 304 for a redirect it does not follow: 502 KERNEL_ERROR, a 5xx a client's header
  // chose, for what RFC 9110 answers 412 to the client's own method.
  const kernel = await startTestKernel(t)
  let performed = 0
  kernel.on('GET /v1/things/t1/touch', (req, res) => {
    if (req.headers['if-none-match'] === '*') { res.writeHead(304); res.end(); return }
    performed++
    json(res, 200, { id: 't1', name: 'touched' })
  })
  const manifest = testManifest({
    touchThing: { type: 'mutation', rest: 'POST /things/:id/touch', kernel: 'GET /v1/things/{id}/touch', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: THING }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const refused = await app.inject({ method: 'POST', url: '/api/v1/things/t1/touch', headers: { ...bearer(), 'if-none-match': '*' }, payload: {} })
  t.same([refused.statusCode, refused.json().code], [412, 'KERNEL_REJECTED'], 'the condition did not hold: 412, as to a PUT')
  t.equal(performed, 0, 'the Kernel did not perform it')
  const plain = await app.inject({ method: 'POST', url: '/api/v1/things/t1/touch', headers: bearer(), payload: {} })
  t.same([plain.statusCode, performed], [200, 1], 'without the condition it runs')
})

t.test('an Idempotency-Key names the request with its conditions: the same key with other conditions is 422, with the same ones a replay', async t => {
  // The stored request's hash covered the input only: a key reused without the create-only
  // condition replayed the first call's 412, and one reused with it the first call's 201.
  const kernel = await startTestKernel(t)
  let exists = false
  kernel.on('PUT /v1/things/t1', (req, res) => {
    if (req.headers['if-none-match'] === '*' && exists) return json(res, 412, { message: 'precondition failed' })
    const created = !exists
    exists = true
    json(res, created ? 201 : 200, { id: 't1', name: 'n' })
  })
  const manifest = testManifest({
    putThing: PUT_THING
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const put = async (key: string, headers: Record<string, string> = {}) => await app.inject({ method: 'PUT', url: '/api/v1/things/t1', headers: { ...bearer(), 'idempotency-key': key, ...headers }, payload: { name: 'n' } })
  t.equal((await put('k-1', { 'if-none-match': '*' })).statusCode, 201, 'created')
  const replay = await put('k-1', { 'if-none-match': '*' })
  t.same([replay.statusCode, replay.headers['idempotent-replayed']], [201, 'true'], 'the same request again: a replay')
  const other = await put('k-1')
  t.same([other.statusCode, other.json().code], [422, 'IDEMPOTENCY_KEY_REUSED'], 'the key without its condition: another request')
  t.same([(await put('k-2')).statusCode, (await put('k-2', { 'if-match': '*' })).json().code], [200, 'IDEMPOTENCY_KEY_REUSED'], 'a condition added to a key used without')
  t.equal(kernel.requests.length, 2, 'two requests ran')
})

t.test('bad input is a 400 VALIDATION_FAILED that names the field', async t => {
  const app = await buildDemoApp(t)
  const cases: Array<[string, string, unknown, RegExp]> = [
    ['GET', '/api/v1/agents?limit=1000', undefined, /limit must be <= 100/],
    ['GET', '/api/v1/agents?limit=abc', undefined, /input\.limit must be integer/],
    ['GET', '/api/v1/agents?unknown=1', undefined, /input\.unknown is not allowed/],
    ['POST', '/api/v1/agents/a1/runs', {}, /input\.prompt is required/],
    ['POST', '/api/v1/agents/a1/runs', { prompt: 42 }, /input\.prompt must be string/],
    ['POST', '/api/v1/agents/a1/runs', { prompt: 'x'.repeat(20001) }, /input\.prompt must NOT have more than 20000 characters/],
    ['POST', '/api/v1/agents', { name: 'x', extra: true }, /input\.extra is not allowed/]
  ]
  for (const [method, url, payload, detail] of cases) {
    const res = await app.inject({ method: method as 'GET', url, headers: bearer(), ...(payload === undefined ? {} : { payload: payload as object }) })
    t.equal(res.statusCode, 400, `${method} ${url}`)
    t.match(res.headers['content-type'], /^application\/problem\+json/)
    t.match(res.json(), { code: 'VALIDATION_FAILED', status: 400, detail })
  }
})

t.test('ugly bodies: malformed JSON, not an object, wrong media type, oversized', async t => {
  const app = await buildDemoApp(t, { BFF_BODY_LIMIT: 2048 })
  const h = { ...bearer(), 'content-type': 'application/json' }
  const malformed = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: h, payload: '{"prompt": "x",' })
  t.equal(malformed.statusCode, 400)
  t.match(malformed.json(), { code: 'VALIDATION_FAILED', detail: 'The body is not valid JSON' })
  const array = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: h, payload: '[1,2]' })
  t.equal(array.statusCode, 400)
  t.match(array.json(), { code: 'VALIDATION_FAILED', detail: 'The input must be a JSON object' })
  const scalar = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: h, payload: '"text"' })
  t.equal(scalar.statusCode, 400)
  // The JSON null is a body that is no object too: it was read as {}, and a PATCH of null ran.
  const before = (await app.inject({ url: '/api/v1/agents/a1', headers: bearer() })).json()
  const nul = await app.inject({ method: 'PATCH', url: '/api/v1/agents/a1', headers: h, payload: 'null' })
  t.same([nul.statusCode, nul.json().detail], [400, 'The input must be a JSON object'], 'a null body')
  t.same((await app.inject({ url: '/api/v1/agents/a1', headers: bearer() })).json(), before, 'the agent is as it was')
  const empty = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: h, payload: '' })
  t.equal(empty.statusCode, 400)
  t.match(empty.json(), { code: 'VALIDATION_FAILED' })
  const text = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: { ...bearer(), 'content-type': 'text/plain' }, payload: 'hello' })
  t.equal(text.statusCode, 415)
  t.match(text.json(), { code: 'UNSUPPORTED_MEDIA_TYPE' })
  // A body of no bytes has no media type to be wrong: an absent body, as under application/json
  // (`curl -d ''` labels it form-encoded, fetch's `body: ''` text/plain). It was a 415.
  for (const type of ['application/x-www-form-urlencoded', 'text/plain;charset=UTF-8']) {
    const res = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: { ...bearer(), 'content-type': type, 'content-length': '0' } })
    t.match([res.statusCode, res.json()], [400, { code: 'VALIDATION_FAILED', detail: /prompt is required/ }], `an empty ${type} body`)
  }
  const big = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: h, payload: JSON.stringify({ prompt: 'x'.repeat(5000) }) })
  t.equal(big.statusCode, 413)
  t.match(big.json(), { code: 'PAYLOAD_TOO_LARGE', status: 413 })
  const none = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: bearer() })
  t.equal(none.statusCode, 400, 'no body is an empty input, refused by the schema')
  t.match(none.json(), { detail: /prompt is required/ })
})

t.test('an unknown route is a 404 problem', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/api/v1/nothing?x=1', headers: bearer() })
  t.equal(res.statusCode, 404)
  t.match(res.json(), { code: 'NOT_FOUND', detail: 'No route GET /api/v1/nothing', requestId: String })
})

t.test('a method the path is not served with is a 405 problem naming those it is, on every route', async t => {
  const cases: Array<[string, string, string]> = [
    ['PUT', '/api/v1/agents', 'GET, HEAD, POST'],
    ['POST', '/api/v1/agents/a1?x=1', 'GET, HEAD, PATCH, DELETE'],
    ['HEAD', '/api/v1/batch', 'POST'],
    ['PROPFIND', '/api/v1/agents/a1/runs', 'GET, HEAD, POST'],
    ['PUT', '/trpc/getAgent', 'GET, HEAD, POST'],
    ['DELETE', '/trpc', 'GET, HEAD'],
    ['PUT', '/graphql', 'GET, HEAD, POST'],
    ['GET', '/admin/audit/verify', 'POST'],
    ['DELETE', '/admin/audit', 'GET, HEAD'],
    ['POST', '/openapi.json', 'GET, HEAD'],
    ['POST', '/docs', 'GET, HEAD'],
    ['POST', '/ws', 'GET, HEAD'],
    ['OPTIONS', '/healthz', 'GET, HEAD']
  ]
  const check = async (app: FastifyInstance, method: string, url: string, allow: string, what: string): Promise<void> => {
    const res = await app.inject({ method: method as 'GET', url, headers: bearer() })
    t.equal(res.statusCode, 405, what)
    t.equal(res.headers.allow, allow, what)
    t.match(res.headers['content-type'], /^application\/problem\+json/, what)
    t.ok(res.headers['x-request-id'], what)
    if (method !== 'HEAD') t.match(res.json(), { status: 405, code: 'BAD_REQUEST', detail: `${method} is not served at ${url.split('?')[0]}: ${allow}`, requestId: res.headers['x-request-id'] }, what)
  }
  const app = await buildDemoApp(t)
  for (const [method, url, allow] of cases) await check(app, method, url, allow, `${method} ${url}`)
  // A path no route has, whatever the method, stays a 404 (one Fastify's router refuses for a
  // path segment too long is refused as such, whatever the method: the test below).
  for (const [method, url] of [['PUT', '/api/v1/nothing'], ['OPTIONS', '/nothing']]) {
    const res = await app.inject({ method: method as 'GET', url, headers: bearer() })
    t.equal(res.statusCode, 404, `${method} ${url.slice(0, 40)}`)
    t.equal(res.headers.allow, undefined)
    t.match(res.json(), { code: 'NOT_FOUND' })
  }
  // With CORS on, its preflight route (OPTIONS on every path) is one more method served, and no
  // path of its own: an unknown path stays a 404.
  const cors = await buildDemoApp(t, { BFF_CORS_ORIGINS: 'https://app.example' })
  await check(cors, 'PUT', '/api/v1/agents', 'GET, HEAD, POST, OPTIONS', 'with CORS')
  t.equal((await cors.inject({ method: 'PUT', url: '/api/v1/nothing', headers: bearer() })).statusCode, 404, 'with CORS, an unknown path')
})

// find-my-way refuses a path whose parameter is over 256 characters (414) only for a method it has
// a parametric route at that place for: `PUT /api/v1/agents/<300 characters>` (no PUT route at all)
// was a 404 "No route", where the same path was a 414 to GET, POST, PATCH and DELETE. A path that
// is not valid percent-encoding (400) was already refused alike: kept here as the other half.
t.test('a path the router refuses (a parameter too long, bad percent-encoding) is refused the same whatever the method', async t => {
  const app = await buildDemoApp(t)
  const long = 'a'.repeat(300)
  for (const url of [`/api/v1/agents/${long}`, `/api/v1/runs/${long}?x=1`, `/api/v1/agents/${long}/nothing`, '/api/v1/agents/%zz', '/nothing/%C3']) {
    const get = await app.inject({ url, headers: bearer() })
    t.ok(get.statusCode === 414 || get.statusCode === 400, `GET ${url.slice(0, 40)}: ${get.statusCode}`)
    for (const method of ['PUT', 'PATCH', 'DELETE', 'POST', 'PROPFIND']) {
      const res = await app.inject({ method: method as 'GET', url, headers: bearer() })
      const what = `${method} ${url.slice(0, 40)}`
      t.same([res.statusCode, res.json().code, res.json().detail], [get.statusCode, get.json().code, get.json().detail], what)
      t.equal(res.headers.allow, undefined, what)
      t.ok(res.headers['x-request-id'], what)
      t.match(res.headers['content-type'], /^application\/problem\+json/, what)
    }
  }
  // At the bound, a method the path is not served with is still its 405.
  t.equal((await app.inject({ method: 'PUT', url: `/api/v1/agents/${'a'.repeat(256)}`, headers: bearer() })).statusCode, 405)
})

// A route that took the request and found nothing to answer hands it to the not-found handler
// (@fastify/static, for a file missing under /docs/static/*): its path is served with the
// request's own method, and it was a 405 "GET is not served at /docs/static/x.js: GET, HEAD".
t.test('a file missing under /docs/static is a 404, not a 405 naming its own method', async t => {
  const app = await buildDemoApp(t)
  for (const [method, url] of [['GET', '/docs/static/no-such-file.js'], ['HEAD', '/docs/static/no-such-file.js'], ['GET', '/docs/static/a/b/c.css?v=1'], ['GET', '/docs/static/..%2f..%2fpackage.json']]) {
    const res = await app.inject({ method: method as 'GET', url })
    t.equal(res.statusCode, 404, `${method} ${url}`)
    t.equal(res.headers.allow, undefined, `${method} ${url}: no Allow`)
    t.match(res.headers['content-type'], /^application\/problem\+json/, `${method} ${url}`)
    if (method !== 'HEAD') t.match(res.json(), { status: 404, code: 'NOT_FOUND', detail: `Nothing is served at GET ${url.split('?')[0]}` }, `${method} ${url}`)
  }
  // The files that are there are served; another method on that path is still its 405.
  t.equal((await app.inject({ url: '/docs/static/swagger-ui.css' })).statusCode, 200)
  const post = await app.inject({ method: 'POST', url: '/docs/static/no-such-file.js' })
  t.equal(post.statusCode, 405)
  t.equal(post.headers.allow, 'GET, HEAD')
})

t.test('identity: missing, malformed, forged, expired, not yet valid, alg none, wrong claims', async t => {
  const app = await buildDemoApp(t)
  const call = async (authorization?: string) => await app.inject({ method: 'GET', url: '/api/v1/agents', headers: authorization === undefined ? {} : { authorization } })
  const now = Math.floor(Date.now() / 1000)
  const sign = (payload: Record<string, unknown>, key = SECRET) => createSigner({ key, algorithm: 'HS256', noTimestamp: true })(payload)
  const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url')
  const cases: Array<[string, string | undefined, RegExp]> = [
    ['no header', undefined, /bearer token is required/],
    ['basic auth', 'Basic dXNlcjpwYXNz', /must be "Bearer <token>"/],
    ['garbage', 'Bearer not-a-jwt', /malformed/],
    ['forged (other secret)', `Bearer ${token({ secret: 'another-secret-of-sufficient-length-000000' })}`, /signature is invalid/],
    ['expired', `Bearer ${sign({ sub: 'u', tid: 't', exp: now - 60 })}`, /expired/],
    ['not yet valid', `Bearer ${sign({ sub: 'u', tid: 't', exp: now + 600, nbf: now + 300 })}`, /not valid yet/],
    ['alg none', `Bearer ${b64({ alg: 'none', typ: 'JWT' })}.${b64({ sub: 'u', tid: 't', exp: now + 600 })}.`, /refused/],
    ['no tenant', `Bearer ${sign({ sub: 'u', exp: now + 600 })}`, /required token claim is missing/],
    ['no expiry', `Bearer ${sign({ sub: 'u', tid: 't' })}`, /required token claim is missing/],
    ['roles not strings', `Bearer ${sign({ sub: 'u', tid: 't', exp: now + 600, roles: [1] })}`, /roles must be an array of strings/],
    ['unknown zone', `Bearer ${sign({ sub: 'u', tid: 't', exp: now + 600, zone: 'galaxy' })}`, /zone must be/],
    ['empty tenant', `Bearer ${sign({ sub: 'u', tid: '', exp: now + 600 })}`, /refused/]
  ]
  for (const [name, authorization, detail] of cases) {
    const res = await call(authorization)
    t.equal(res.statusCode, 401, name)
    t.match(res.json(), { code: 'UNAUTHENTICATED', status: 401, detail }, name)
  }
  // A token that expired only within the allowed clock skew still passes.
  const skewed = await call(`Bearer ${sign({ sub: 'u', tid: 't', exp: now - 2 })}`)
  t.equal(skewed.statusCode, 200)
})

t.test('issuer and audience are checked when configured', async t => {
  const app = await buildDemoApp(t, { BFF_JWT_ISSUER: 'https://issuer.example', BFF_JWT_AUDIENCE: 'mantle' })
  const now = Math.floor(Date.now() / 1000)
  const sign = (payload: Record<string, unknown>) => createSigner({ key: SECRET, algorithm: 'HS256' })(payload)
  const good = await app.inject({ method: 'GET', url: '/api/v1/agents', headers: { authorization: `Bearer ${sign({ sub: 'u', tid: 't', exp: now + 60, iss: 'https://issuer.example', aud: 'mantle' })}` } })
  t.equal(good.statusCode, 200)
  const wrongAud = await app.inject({ method: 'GET', url: '/api/v1/agents', headers: { authorization: `Bearer ${sign({ sub: 'u', tid: 't', exp: now + 60, iss: 'https://issuer.example', aud: 'other' })}` } })
  t.equal(wrongAud.statusCode, 401)
  const wrongIss = await app.inject({ method: 'GET', url: '/api/v1/agents', headers: { authorization: `Bearer ${sign({ sub: 'u', tid: 't', exp: now + 60, iss: 'https://evil.example', aud: 'mantle' })}` } })
  t.equal(wrongIss.statusCode, 401)
  t.match(wrongIss.json(), { detail: /claim has a value that is not accepted/ })
})

t.test('authorization: roles and zones are 403 FORBIDDEN', async t => {
  const app = await buildDemoApp(t)
  const viewerOnly = bearer({ roles: ['viewer'], zone: 'restricted' })
  const run = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: viewerOnly, payload: { prompt: 'hi' } })
  t.equal(run.statusCode, 403)
  t.match(run.json(), { code: 'FORBIDDEN', detail: 'runAgent needs one of the roles: operator' })
  const anyone = await app.inject({ method: 'GET', url: '/api/v1/agents', headers: bearer({ roles: [], zone: 'public' }) })
  t.equal(anyone.statusCode, 200, 'roles [] lets any authenticated caller in')

  const publicZone = await app.inject({ method: 'GET', url: '/api/v1/documents/d1', headers: bearer({ roles: ['viewer'], zone: 'internal' }) })
  t.equal(publicZone.statusCode, 403)
  t.match(publicZone.json(), { code: 'FORBIDDEN', detail: /restricted zone/ })
  const restricted = await app.inject({ method: 'GET', url: '/api/v1/documents/d1', headers: bearer({ roles: ['viewer'], zone: 'restricted' }) })
  t.equal(restricted.statusCode, 200)
  const rightZoneWrongRole = await app.inject({ method: 'GET', url: '/api/v1/documents/d1', headers: bearer({ roles: ['editor'], zone: 'restricted' }) })
  t.equal(rightZoneWrongRole.statusCode, 403)
  // 401 comes before 400: an anonymous caller learns nothing about the input rules.
  const anonymousBadInput = await app.inject({ method: 'GET', url: '/api/v1/agents?limit=1000' })
  t.equal(anonymousBadInput.statusCode, 401)
})

t.test('the Kernel sees the caller identity', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/api/v1/kernel/headers', headers: { ...bearer({ tenant: 'acme', user: 'zoe', roles: ['system', 'viewer'], zone: 'internal' }), 'x-request-id': 'trace-me-1' } })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { 'x-request-id': 'trace-me-1', 'x-tenant-id': 'acme', 'x-user-id': 'zoe', 'x-user-roles': 'system,viewer', traceparent: /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/ })
})

t.test('with identity off, every call is the public tenant and no role is checked', async t => {
  const app = await buildDemoApp(t, { BFF_AUTH_ENABLED: false })
  const res = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', payload: { prompt: 'hello' } })
  t.equal(res.statusCode, 201)
  const headers = await app.inject({ method: 'GET', url: '/api/v1/kernel/headers', headers: { authorization: 'Bearer whatever' } })
  t.match(headers.json(), { 'x-tenant-id': 'public', 'x-user-id': 'anonymous', 'x-user-roles': '' })
  t.same(app.identify('Bearer anything'), { tenant: 'public', user: 'anonymous', roles: [], zone: 'public', expiresAt: Infinity })
})

t.test('the pipeline keeps only the stages that apply to each operation', async t => {
  const app = await buildDemoApp(t)
  t.same(app.pipeline.entry('listAgents').stages, ['diagz', 'metrics', 'audit', 'identity', 'validation', 'cache'])
  t.same(app.pipeline.entry('getDocument').stages, ['diagz', 'metrics', 'audit', 'identity', 'authorization', 'validation'])
  const off = await buildDemoApp(t, { BFF_AUTH_ENABLED: false, BFF_METRICS_ENABLED: false, BFF_AUDIT_ENABLED: false, BFF_DIAGZ_ENABLED: false })
  t.same(off.pipeline.entry('getDocument').stages, ['validation'])
  t.throws(() => off.pipeline.entry('nope'), /no operation nope/)
})

t.test('an empty body under a JSON content type is an absent body', async t => {
  // Before: 400 "The JSON body is empty", a DELETE (whose input is its path) included, from any
  // client that sets Content-Type: application/json on every request.
  const app = await buildDemoApp(t)
  const h = { ...bearer({ roles: ['viewer', 'editor', 'operator', 'admin'] }), 'content-type': 'application/json' }
  const created = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: h, payload: { name: 'to delete' } })
  t.equal(created.statusCode, 201)
  const id = created.json().id as string
  const patched = await app.inject({ method: 'PATCH', url: `/api/v1/agents/${id}`, headers: h, payload: '' })
  t.equal(patched.statusCode, 200, 'PATCH with no field: the agent as it is')
  const deleted = await app.inject({ method: 'DELETE', url: `/api/v1/agents/${id}`, headers: h, payload: '' })
  t.ok(deleted.statusCode < 300, `DELETE: ${deleted.statusCode}`)
  const junk = await app.inject({ method: 'PATCH', url: `/api/v1/agents/${id}`, headers: h, payload: '{' })
  t.same([junk.statusCode, junk.json().detail], [400, 'The body is not valid JSON'], 'a body that is not JSON is still refused')
  const proto = await app.inject({ method: 'PATCH', url: `/api/v1/agents/${id}`, headers: h, payload: '{"__proto__":{"x":1}}' })
  t.equal(proto.statusCode, 400, 'and __proto__ too')
})

t.test('a DELETE whose body holds fields is refused, never run without them', async t => {
  // A DELETE takes its input from its path and query string (the contract): a body's fields were
  // parsed and then dropped without a word, and the mutation ran with other input than the client
  // sent (axios' `delete(url, { data })`, fetch with a body).
  const app = await buildDemoApp(t)
  const h = { ...bearer({ roles: ['viewer', 'editor'] }), 'content-type': 'application/json' }
  const created = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: h, payload: { name: 'kept' } })
  const id = created.json().id as string
  for (const payload of ['{"force":true}', '{"id":"a1"}', '[]', 'null', '"x"']) {
    const res = await app.inject({ method: 'DELETE', url: `/api/v1/agents/${id}`, headers: h, payload })
    t.equal(res.statusCode, 400, payload)
    t.match(res.json(), { code: 'VALIDATION_FAILED', detail: /query string/ }, payload)
  }
  t.equal((await app.inject({ method: 'GET', url: `/api/v1/agents/${id}`, headers: h })).statusCode, 200, 'the agent is still there')
  // An empty object is no field, as an absent or empty body is none.
  const deleted = await app.inject({ method: 'DELETE', url: `/api/v1/agents/${id}`, headers: h, payload: '{}' })
  t.equal(deleted.statusCode, 200, 'DELETE with {}')
})

t.test('a POST, PUT or PATCH naming one of its input\'s fields in the query string is refused, never run without it; other query parameters are let be', async t => {
  // Their input is the path and the JSON body (the contract): `POST /agents?model=x` created an
  // agent of the default model, `PATCH /agents/a1?name=x` renamed nothing and answered 200.
  const app = await buildDemoApp(t)
  const h = { ...bearer({ roles: ['viewer', 'editor'] }), 'content-type': 'application/json' }
  const created = await app.inject({ method: 'POST', url: '/api/v1/agents?model=mantle-large', headers: h, payload: { name: 'n' } })
  t.equal(created.statusCode, 400)
  t.match(created.json(), { code: 'VALIDATION_FAILED', detail: /input\.model.*body/ })
  const patched = await app.inject({ method: 'PATCH', url: '/api/v1/agents/a1?name=Renamed', headers: h, payload: {} })
  t.equal(patched.statusCode, 400, 'PATCH too')
  t.not((await app.inject({ url: '/api/v1/agents/a1', headers: h })).json().name, 'Renamed', 'nothing ran')
  // A parameter the input does not name (a cache-buster, a tracking tag) is no input: let be.
  const busted = await app.inject({ method: 'POST', url: '/api/v1/agents?_=1733600000&utm_source=x', headers: h, payload: { name: 'n' } })
  t.equal(busted.statusCode, 201, 'an unnamed parameter is let be')
  // A path parameter's name in the query string is the path's, as before (the path wins).
  t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/agents/a1?id=a2', headers: h, payload: { name: 'x' } })).statusCode, 200)
})

t.test('an integer beyond what a JavaScript number carries exactly is refused on every face, never rounded', async t => {
  // Before, 1234567890123456789 reached the Kernel as 1234567890123456800: a GET answered
  // another item, a DELETE removed another one.
  const kernel = await startTestKernel(t, {
    'GET /v1/things': (req, res) => json(res, 200, { url: req.url }),
    'GET /v1/things/9007199254740991': (req, res) => json(res, 200, { url: req.url })
  })
  const manifest = testManifest({
    listThings: { type: 'query', rest: 'GET /things', kernel: 'GET /v1/things', input: { type: 'object', properties: { n: { type: 'integer', maximum: 1e30 }, x: { type: 'number' }, ns: { type: 'array', items: { type: ['integer', 'null'] } } } }, output: { type: 'object', properties: { url: { type: 'string' } } } },
    getThing: { type: 'query', rest: 'GET /things/:id', kernel: 'GET /v1/things/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'integer' } } }, output: { type: 'object', properties: { url: { type: 'string' } } } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const get = async (url: string) => await app.inject({ url: '/api/v1' + url, headers: bearer() })
  for (const url of ['/things/1234567890123456789', '/things?n=9007199254740993', '/things?n=-9007199254740993', '/things?ns=1&ns=9007199254740993']) {
    const res = await get(url)
    t.same([res.statusCode, res.json().code], [400, 'VALIDATION_FAILED'], url)
  }
  t.match((await get('/things/1234567890123456789')).json().detail, /input\.id must be <= 9007199254740991/)
  const trpc = await app.inject({ url: '/trpc/listThings?input=' + encodeURIComponent('{"n":9007199254740993}'), headers: bearer() })
  t.equal(trpc.statusCode, 400, 'tRPC too')
  t.equal(kernel.requests.length, 0, 'nothing reached the Kernel')
  t.same((await get('/things/9007199254740991')).json(), { url: '/v1/things/9007199254740991' }, 'the largest exact integer goes on')
  t.same((await get('/things?x=1e20')).json(), { url: '/v1/things?x=100000000000000000000' }, 'a number is any finite value')
})

t.test('the bound on integers only refuses: under dependencies too, never admitting what the schema refused, nor refusing a default', async t => {
  const kernel = await startTestKernel(t, { 'POST /v1/things': (req, res) => json(res, 200, { body: req.body }) })
  const output = { type: 'object', properties: { body: { type: 'string' } } }
  const manifest = testManifest({
    deps: { type: 'mutation', rest: 'POST /deps', kernel: 'POST /v1/things', input: { type: 'object', properties: { a: { type: 'string' }, n: {} }, dependencies: { a: { properties: { n: { type: 'integer' } } } } }, output },
    notInt: { type: 'mutation', rest: 'POST /not-int', kernel: 'POST /v1/things', input: { type: 'object', properties: { f: { type: 'number', not: { type: 'integer' } } } }, output },
    either: { type: 'mutation', rest: 'POST /either', kernel: 'POST /v1/things', input: { type: 'object', properties: { g: { oneOf: [{ type: 'integer' }, { type: 'number', minimum: 1e16 }] } } }, output },
    long: { type: 'mutation', rest: 'POST /long', kernel: 'POST /v1/things', input: { type: 'object', properties: { lim: { type: 'integer', default: 2 ** 63 } } }, output }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const post = async (url: string, body: string) => await app.inject({ method: 'POST', url: '/api/v1' + url, headers: { ...bearer(), 'content-type': 'application/json' }, payload: body })
  // draft-07's dependencies: 1234567890123456789 reached the Kernel as ...800.
  t.equal((await post('/deps', '{"a":"x","n":1234567890123456789}')).statusCode, 400, 'an integer under dependencies')
  // A bound under not, oneOf or if would admit what the schema refuses: these stay refused.
  t.equal((await post('/not-int', '{"f":1e20}')).statusCode, 400, 'not: an integer-valued 1e20 is still no non-integer')
  t.equal((await post('/either', '{"g":1e17}')).statusCode, 400, 'oneOf: 1e17 still matches both')
  // A default beyond the range, the manifest's own, is not refused when the stage inserts it.
  t.equal((await post('/long', '{}')).statusCode, 200, 'a default beyond the range')
})

t.test('query and path numbers are read as on every other face: decimal only', async t => {
  // Before, Ajv's coercion read whatever Number() reads: ?n=0x10, ' 16 ', 1.6e1 and 0b11 went to
  // the Kernel as 16 or 3, and ?nn= as null, where tRPC, GraphQL and WebSocket refuse them.
  const kernel = await startTestKernel(t, {
    'GET /v1/things': (req, res) => json(res, 200, { url: req.url }),
    'GET /v1/things/5': (req, res) => json(res, 200, { url: req.url })
  })
  const manifest = testManifest({
    listThings: { type: 'query', rest: 'GET /things', kernel: 'GET /v1/things', input: { type: 'object', properties: { n: { type: 'integer' }, x: { type: 'number' }, nn: { type: ['integer', 'null'] }, ns: { type: 'array', items: { type: 'integer' } } } }, output: { type: 'object', properties: { url: { type: 'string' } } } },
    getThing: { type: 'query', rest: 'GET /things/:id', kernel: 'GET /v1/things/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'integer' } } }, output: { type: 'object', properties: { url: { type: 'string' } } } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const get = async (url: string) => await app.inject({ url: '/api/v1' + url, headers: bearer() })
  for (const url of ['/things?n=0x10', '/things?n=%2016%20', '/things?n=0b11', '/things?n=%2B5', '/things?x=1.', '/things?nn=', '/things?ns=1&ns=0x2', '/things/0x5']) {
    const res = await get(url)
    t.same([res.statusCode, res.json().code], [400, 'VALIDATION_FAILED'], url)
  }
  t.match((await get('/things?n=0x10')).json().detail, /input\.n must be integer/, 'the message every face gives')
  for (const [url, sent] of [['/things?n=16&x=-1.5e3&nn=0', '/v1/things?n=16&x=-1500&nn=0'], ['/things?ns=1&ns=2', '/v1/things?ns=1&ns=2'], ['/things/5', '/v1/things/5']]) {
    const res = await get(url)
    t.same([res.statusCode, res.json().url], [200, sent], `${url}: decimal numbers still read`)
  }
  const trpc = await app.inject({ url: '/trpc/listThings?input=' + encodeURIComponent(JSON.stringify({ n: '0x10' })), headers: bearer() })
  t.equal(trpc.statusCode, 400, 'as tRPC')
})

t.test('a loose number among a query array\'s items is named as the item it is, as on every other face', async t => {
  // The whole array was held out of the coercion for one loose item, and its first item named:
  // ?ns=1&ns=x was refused as input.ns.0 (the 1), ?ns=0x10 as "input.ns must be array".
  const kernel = await startTestKernel(t, { 'GET /v1/things': (req, res) => json(res, 200, { url: req.url }) })
  const manifest = testManifest({
    listThings: { type: 'query', rest: 'GET /things', kernel: 'GET /v1/things', input: { type: 'object', properties: { ns: { type: 'array', items: { type: 'integer' } } } }, output: { type: 'object', properties: { url: { type: 'string' } } } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const detail = async (query: string): Promise<unknown> => (await app.inject({ url: '/api/v1/things?' + query, headers: bearer() })).json().detail
  t.equal(await detail('ns=1&ns=x'), 'input.ns.1 must be integer')
  t.equal(await detail('ns=1&ns=2&ns=0x10'), 'input.ns.2 must be integer')
  t.equal(await detail('ns=0x10'), 'input.ns.0 must be integer', 'a lone value is the one-item array')
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [{ id: 'a', op: 'listThings', input: { ns: [1, 'x'] } }] } })
  t.equal(batch.json().results[0].error.detail, 'input.ns.1 must be integer', 'as the batch names it')
  const ok = await app.inject({ url: '/api/v1/things?ns=1&ns=2', headers: bearer() })
  t.same([ok.statusCode, ok.json().url], [200, '/v1/things?ns=1&ns=2'], 'decimal items still read')
  t.equal(kernel.requests.length, 1, 'no refused call reached the Kernel')
})

t.test('a field\'s pattern is not run on text its maxLength refuses, in the path or the query string', async t => {
  // The manifest lets a pattern that backtracks through when the field's maxLength bounds it
  // (manifest-patterns.ts), since the pipeline's check reads maxLength first. The REST face's
  // coercion of the path and query (an Ajv that reads every keyword) ran the pattern on text of
  // any length: `^(a|a)*$` with maxLength 20 held the event loop 0.8 s for 26 characters, twice
  // that for each more. Counted here by the pattern's runs, not timed.
  const short = { type: 'string', maxLength: 3, pattern: '^[ab]+$' }
  const manifest = testManifest({
    find: { type: 'query', rest: 'GET /find/:key/:n', kernel: 'GET /find', input: { type: 'object', required: ['key', 'n'], properties: { key: short, n: { type: 'integer' }, q: short, limit: { type: 'integer' } } }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  })
  const kernel = await startTestKernel(t, { 'GET /find': (_req, res) => json(res, 200, { ok: true }) })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const test = mock.method(RegExp.prototype, 'test')
  t.teardown(() => { test.mock.restore() })
  const runs = (longer: number): number => test.mock.calls.filter(c => (c.this as RegExp).source === '^[ab]+$' && String(c.arguments[0]).length > longer).length
  const ok = await app.inject({ url: '/api/v1/find/ab/1?q=ba&limit=2', headers: bearer() })
  t.equal(ok.statusCode, 200, ok.body)
  t.ok(runs(0) >= 2, `the pattern is checked on text within maxLength (${runs(0)} runs)`)
  for (const url of ['/api/v1/find/abababab/1?limit=2', '/api/v1/find/ab/1?q=abababab&limit=2']) {
    const res = await app.inject({ url, headers: bearer() })
    t.match([res.statusCode, res.json()], [400, { code: 'VALIDATION_FAILED', detail: /must NOT have more than 3 characters/ }], url)
    t.equal(runs(3), 0, `${url}: the pattern is not run on text longer than maxLength`)
  }
  t.equal(kernel.requests.length, 1)
})

t.test('routes that differ by the text beside a parameter are served apart', async t => {
  // `/items/:id` and `/items/:id.json` were refused as one duplicate route (`/items/:`), though
  // Fastify's router serves them apart.
  const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
  const out = { type: 'object', properties: { route: { type: 'string' }, id: { type: 'string' } } }
  const manifest = testManifest({
    item: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /item/{id}', input: idInput, output: out },
    itemJson: { type: 'query', rest: 'GET /items/:id.json', kernel: 'GET /json/{id}', input: idInput, output: out }
  })
  const kernel = await startTestKernel(t, {
    'GET /item/a1': (_req, res) => json(res, 200, { route: 'item', id: 'a1' }),
    'GET /json/a1': (_req, res) => json(res, 200, { route: 'json', id: 'a1' })
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  t.same((await app.inject({ url: '/api/v1/items/a1', headers: bearer() })).json(), { route: 'item', id: 'a1' })
  t.same((await app.inject({ url: '/api/v1/items/a1.json', headers: bearer() })).json(), { route: 'json', id: 'a1' })
})
