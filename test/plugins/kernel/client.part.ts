import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { createServer, type ServerResponse } from 'node:http'
import { createServer as createTcpServer, type AddressInfo } from 'node:net'
import { buildTestApp, startTestKernel, testManifest, bearer, json, closedPort, until } from '../../helper.js'
import { item, idInput, hits } from './clients.js'

function manifest (kernelSettings: Record<string, unknown> = {}) {
  return testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item },
    listItems: {
      type: 'query',
      rest: 'GET /items',
      kernel: 'GET /v1/items',
      input: { type: 'object', properties: { q: { type: 'string' }, limit: { type: 'integer', maximum: 50 }, tag: { type: 'array', items: { type: 'string' } } } },
      output: { type: 'array', items: item }
    },
    createItem: { type: 'mutation', rest: 'POST /items', kernel: 'POST /v1/items', input: { type: 'object', required: ['name'], properties: { name: { type: 'string' } } }, output: item },
    renameItem: { type: 'mutation', rest: 'PATCH /items/:id', kernel: 'PATCH /v1/items/{id}', input: { type: 'object', required: ['id', 'name'], properties: { id: { type: 'string' }, name: { type: 'string' } } }, output: item },
    deleteItem: { type: 'mutation', rest: 'DELETE /items/:id', kernel: 'DELETE /v1/items/{id}', input: idInput, output: item },
    slowItem: { type: 'query', rest: 'GET /slow/:id', kernel: 'GET /v1/slow/{id}', input: idInput, output: item, timeoutMs: 150 },
    touchItem: { type: 'mutation', rest: 'POST /items/:id/touch', kernel: 'POST /v1/items/{id}/touch', input: idInput, output: { type: 'null' } }
  }, { retries: 2, circuitBreaker: { threshold: 3, resetTimeoutMs: 200 }, ...kernelSettings })
}

async function setup (t: Test, kernelSettings: Record<string, unknown> = {}, env: Record<string, string | boolean> = {}) {
  const kernel = await startTestKernel(t, {
    'GET /v1/items/a1': (_req, res) => json(res, 200, { id: 'a1', name: 'first', secret: 'internal' }),
    'POST /v1/items': (req, res) => json(res, 201, { id: 'n1', name: (JSON.parse(req.body) as { name: string }).name }),
    'GET /v1/items': (_req, res) => json(res, 200, [{ id: 'a1', name: 'first' }])
  })
  const app = await buildTestApp(t, env, { manifest: manifest(kernelSettings), kernelUrl: kernel.url })
  return { kernel, app }
}

type Setup = Awaited<ReturnType<typeof setup>>

t.test('a 2xx JSON answer is the output, with fields the schema does not declare removed', async t => {
  const { app } = await setup(t)
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/a1', headers: bearer() })
  t.equal(res.statusCode, 200)
  t.same(res.json(), { id: 'a1', name: 'first' })
})

t.test('an answer that starts with a BOM is read alike with a length and chunked', async t => {
  // undici's body.json() drops a leading BOM (a length announced), and the chunked reader kept
  // it: the same answer was 200 with a Content-Length and 502 KERNEL_ERROR without one.
  const { kernel, app } = await setup(t)
  const text = '\uFEFF' + JSON.stringify({ id: 'a1', name: 'bom' })
  kernel.on('GET /v1/items/len', (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
    res.end(text)
  })
  kernel.on('GET /v1/items/chunked', (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.write(text.slice(0, 2))
    res.end(text.slice(2))
  })
  for (const id of ['len', 'chunked']) {
    const res = await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers: bearer() })
    t.same([res.statusCode, res.json()], [200, { id: 'a1', name: 'bom' }], id)
  }
  t.notOk(kernel.requests.some(r => r.url === '/v1/items/chunked' && r.headers['content-length'] !== undefined), 'the Kernel answered chunked')
})

t.test('the Kernel 2xx status is passed on (201 for a creation)', async t => {
  const { app, kernel } = await setup(t)
  const res = await app.inject({ method: 'POST', url: '/api/v1/items', headers: bearer(), payload: { name: 'new' } })
  t.equal(res.statusCode, 201)
  t.same(res.json(), { id: 'n1', name: 'new' })
  t.same(JSON.parse(kernel.requests[0].body), { name: 'new' })
  t.equal(kernel.requests[0].headers['content-type'], 'application/json')
})

t.test('a Kernel 206 or 226 is answered 200: the gateway asks for no range or delta, and passes on no Content-Range', async t => {
  const { app, kernel } = await setup(t)
  for (const status of [206, 226, 203, 207]) kernel.on(`GET /v1/items/s${status}`, (_req, res) => json(res, status, { id: `s${status}` }))
  for (const [status, expected] of [[206, 200], [226, 200], [203, 203], [207, 207]]) {
    const res = await app.inject({ method: 'GET', url: `/api/v1/items/s${status}`, headers: bearer() })
    t.same([res.statusCode, res.json(), res.headers['content-range']], [expected, { id: `s${status}` }, undefined], String(status))
  }
})

t.test('the Kernel request carries the request id, tenant, user, roles and a child traceparent', async t => {
  const { app, kernel } = await setup(t)
  const traceId = '4bf92f3577b34da6a3ce929d0e0e4736'
  const res = await app.inject({
    method: 'GET',
    url: '/api/v1/items/a1',
    headers: { ...bearer({ tenant: 'acme', user: 'ann', roles: ['viewer', 'editor'] }), 'x-request-id': 'req-123', traceparent: `00-${traceId}-00f067aa0ba902b7-01` }
  })
  t.equal(res.statusCode, 200)
  t.equal(res.headers['x-request-id'], 'req-123')
  const h = kernel.requests[0].headers
  t.equal(h['x-request-id'], 'req-123')
  t.equal(h['x-tenant-id'], 'acme')
  t.equal(h['x-user-id'], 'ann')
  t.equal(h['x-user-roles'], 'viewer,editor')
  t.match(h.traceparent, new RegExp(`^00-${traceId}-[0-9a-f]{16}-01$`))
  t.not(h.traceparent, `00-${traceId}-00f067aa0ba902b7-01`, 'the gateway is a new span')
})

t.test('without a request id or traceparent, both are generated', async t => {
  const { app, kernel } = await setup(t)
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/a1', headers: { ...bearer(), 'x-request-id': 'bad id with spaces', traceparent: 'junk' } })
  // A UUIDv7 whose time is the call's: generated ids sort as the calls came.
  t.match(res.headers['x-request-id'], /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/)
  const id = res.headers['x-request-id'] as string
  t.ok(Math.abs(parseInt(id.slice(0, 8) + id.slice(9, 13), 16) - Date.now()) < 60_000, 'the time of the call')
  t.equal(kernel.requests[0].headers['x-request-id'], res.headers['x-request-id'])
  t.match(kernel.requests[0].headers.traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/)
})

t.test('query input goes to the query string, path params are encoded', async t => {
  const { app, kernel } = await setup(t)
  kernel.on('GET /v1/items/a%2Fb c', (_req, res) => json(res, 200, { id: 'a/b c' }))
  const list = await app.inject({ method: 'GET', url: '/api/v1/items?q=x%20y&limit=5&tag=a&tag=b', headers: bearer() })
  t.equal(list.statusCode, 200)
  t.equal(kernel.requests[0].url, '/v1/items?q=x+y&limit=5&tag=a&tag=b')
  const one = await app.inject({ method: 'GET', url: '/api/v1/items/a%2Fb%20c', headers: bearer() })
  t.equal(one.statusCode, 404, 'an encoded slash is one segment, sent encoded')
  t.equal(kernel.requests[1].url, '/v1/items/a%2Fb%20c')
})

t.test('a REST path parameter that is no {x} of the Kernel path goes to the Kernel query or body, on every face', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/agents': (_req, res) => json(res, 200, []),
    'POST /v1/runs': (req, res) => json(res, 201, JSON.parse(req.body) as object)
  })
  const run = { type: 'object', properties: { agent: { type: 'string' }, prompt: { type: 'string' } } }
  const manifest = testManifest({
    orgAgents: { type: 'query', rest: 'GET /orgs/:org/agents', kernel: 'GET /v1/agents', input: { type: 'object', required: ['org'], properties: { org: { type: 'string' }, limit: { type: 'integer' } } }, output: { type: 'array' } },
    startRun: { type: 'mutation', rest: 'POST /agents/:agent/runs', kernel: 'POST /v1/runs', input: { type: 'object', required: ['agent', 'prompt'], properties: { agent: { type: 'string' }, prompt: { type: 'string' } } }, output: run }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  t.equal((await app.inject({ url: '/api/v1/orgs/o1/agents?limit=3', headers: bearer() })).statusCode, 200)
  const url = new URL(kernel.requests[0].url, 'http://kernel')
  t.same([url.pathname, url.searchParams.get('org'), url.searchParams.get('limit')], ['/v1/agents', 'o1', '3'])
  const rest = await app.inject({ method: 'POST', url: '/api/v1/agents/a1/runs', headers: bearer(), payload: { prompt: 'hi' } })
  t.same([rest.statusCode, rest.json()], [201, { agent: 'a1', prompt: 'hi' }])
  t.same(JSON.parse(kernel.requests[1].body), { prompt: 'hi', agent: 'a1' })
  const trpc = await app.inject({ method: 'POST', url: '/trpc/startRun', headers: bearer(), payload: { agent: 'a2', prompt: 'yo' } })
  t.same(trpc.json(), { result: { data: { agent: 'a2', prompt: 'yo' } } })
  t.same(JSON.parse(kernel.requests[2].body), { agent: 'a2', prompt: 'yo' })
})

t.test('an undeclared object field of a query-string Kernel call is 400 VALIDATION_FAILED, not [object Object] or a 500', async t => {
  const { app, kernel } = await setup(t)
  for (const x of [{ a: 1 }, { toString: 1 }, [{ a: 1 }]]) {
    const res = await app.inject({ url: '/trpc/listItems?input=' + encodeURIComponent(JSON.stringify({ x })), headers: bearer() })
    t.same([res.statusCode, res.json().error.data.code], [400, 'VALIDATION_FAILED'], JSON.stringify(x))
  }
  t.equal(hits(kernel, '/v1/items'), 0, 'nothing reached the Kernel')
  const scalars = await app.inject({ url: '/trpc/listItems?input=' + encodeURIComponent(JSON.stringify({ x: 'y', n: [1, 2] })), headers: bearer() })
  t.equal(scalars.statusCode, 200, 'undeclared scalars go on as before')
  t.equal(kernel.requests.at(-1)?.url, '/v1/items?x=y&n=1&n=2')
})

t.test('a Kernel 404 is NOT_FOUND, with the Kernel message', async t => {
  const { app } = await setup(t)
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/zz', headers: bearer() })
  t.equal(res.statusCode, 404)
  t.match(res.headers['content-type'], /^application\/problem\+json/)
  t.match(res.json(), { code: 'NOT_FOUND', status: 404, detail: 'no such route', type: 'urn:mantle:problem:not-found' })
  t.ok(res.json().requestId)
})

t.test('another Kernel 4xx is KERNEL_REJECTED with its status, and is not retried', async t => {
  const { app, kernel } = await setup(t)
  kernel.on('GET /v1/items/c1', (_req, res) => json(res, 409, { message: 'item is locked' }))
  kernel.on('GET /v1/items/c2', (_req, res) => { res.writeHead(422); res.end('not json') })
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/c1', headers: bearer() })
  t.equal(res.statusCode, 409)
  t.match(res.json(), { code: 'KERNEL_REJECTED', status: 409, detail: 'item is locked' })
  t.equal(hits(kernel, '/v1/items/c1'), 1)
  const res2 = await app.inject({ method: 'GET', url: '/api/v1/items/c2', headers: bearer() })
  t.match(res2.json(), { code: 'KERNEL_REJECTED', status: 422, detail: 'The Kernel refused the call (status 422)' })
})

t.test('a Kernel 429 passes its Retry-After on, a Kernel 401 carries a challenge, on every face', async t => {
  const { app, kernel } = await setup(t)
  const soon = new Date(Date.now() + 90_000).toUTCString()
  kernel.on('GET /v1/items/l1', (_req, res) => { res.setHeader('retry-after', '30'); json(res, 429, { message: 'slow down' }) })
  kernel.on('GET /v1/items/l2', (_req, res) => { res.setHeader('retry-after', soon); json(res, 429, {}) })
  kernel.on('GET /v1/items/l3', (_req, res) => { res.setHeader('retry-after', 'soon, please'); json(res, 429, {}) })
  kernel.on('GET /v1/items/l4', (_req, res) => { res.setHeader('retry-after', '99999999'); json(res, 429, {}) })
  kernel.on('GET /v1/items/a1', (_req, res) => { res.setHeader('www-authenticate', 'Basic realm="kernel"'); json(res, 401, { message: 'no' }) })
  const rest = async (id: string) => await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers: bearer() })
  const l1 = await rest('l1')
  t.same([l1.statusCode, l1.json().code, l1.headers['retry-after']], [429, 'KERNEL_REJECTED', '30'], 'delta-seconds passed on')
  const l2 = await rest('l2')
  t.equal(l2.statusCode, 429)
  t.ok(Number(l2.headers['retry-after']) >= 85 && Number(l2.headers['retry-after']) <= 90, `an HTTP-date as the seconds left (${String(l2.headers['retry-after'])})`)
  t.equal((await rest('l3')).headers['retry-after'], undefined, 'neither: none')
  t.equal((await rest('l4')).headers['retry-after'], '86400', 'at most a day')
  const trpc = await app.inject({ url: '/trpc/getItem?input=' + encodeURIComponent(JSON.stringify({ id: 'l1' })), headers: bearer() })
  t.same([trpc.statusCode, trpc.headers['retry-after']], [429, '30'], 'tRPC')
  const a1 = await rest('a1')
  t.same([a1.statusCode, a1.json().code, a1.headers['www-authenticate']], [401, 'KERNEL_REJECTED', 'Bearer'], "a 401 carries the gateway's own challenge, not the Kernel's")
  const gql = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: '{ getItem(id: "a1") { id } }' } })
  t.equal(gql.headers['www-authenticate'], undefined, 'none on a GraphQL 200')
  t.equal(hits(kernel, '/v1/items/l1'), 2, 'a 429 is not retried')
})

// delta-seconds is any run of digits (RFC 9110 §10.2.3): one of 11 digits or more was read as no
// number, then as no HTTP-date, and the client was told no wait at all instead of the day at most.
t.test('a Kernel Retry-After of 11 digits or more is capped at a day, not ignored', async t => {
  const { app, kernel } = await setup(t)
  const waits = { d11: '99999999999', d400: '9'.repeat(400), zeros: '000000000030' }
  for (const [id, wait] of Object.entries(waits)) kernel.on(`GET /v1/items/${id}`, (_req, res) => { res.setHeader('retry-after', wait); json(res, 429, {}) })
  const rest = async (id: string) => await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers: bearer() })
  t.equal((await rest('d11')).headers['retry-after'], '86400', '11 digits: at most a day')
  t.equal((await rest('d400')).headers['retry-after'], '86400', '400 digits: at most a day')
  t.equal((await rest('zeros')).headers['retry-after'], '30', 'leading zeros: 30 s')
})

// RFC 9110 §5.6.7: a recipient MUST accept all three HTTP-date formats. Only the IMF-fixdate was
// read; a Retry-After in the obsolete RFC 850 or asctime form reached the client as no wait at all.
t.test('a Kernel Retry-After in any of the three HTTP-date formats is passed on as seconds', async t => {
  const { app, kernel } = await setup(t)
  const at = new Date(Date.now() + 90_000)
  const two = (n: number) => String(n).padStart(2, '0')
  const time = `${two(at.getUTCHours())}:${two(at.getUTCMinutes())}:${two(at.getUTCSeconds())}`
  const month = at.toUTCString().slice(8, 11)
  const days = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday']
  const dates: Record<string, string> = {
    imf: at.toUTCString(),
    rfc850: `${days[at.getUTCDay()]}, ${two(at.getUTCDate())}-${month}-${two(at.getUTCFullYear() % 100)} ${time} GMT`,
    asctime: `${days[at.getUTCDay()].slice(0, 3)} ${month} ${String(at.getUTCDate()).padStart(2, ' ')} ${time} ${at.getUTCFullYear()}`
  }
  for (const [form, date] of Object.entries(dates)) {
    kernel.on(`GET /v1/items/${form}`, (_req, res) => { res.setHeader('retry-after', date); json(res, 429, {}) })
    const res = await app.inject({ url: `/api/v1/items/${form}`, headers: bearer() })
    const seconds = Number(res.headers['retry-after'])
    t.ok(res.statusCode === 429 && seconds >= 85 && seconds <= 90, `${form} (${date}): ${String(res.headers['retry-after'])}`)
  }
})

t.test('a Kernel 5xx on a GET is retried, then surfaces as 502 KERNEL_ERROR', async t => {
  const { app, kernel } = await setup(t, { circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  kernel.on('GET /v1/items/e1', (_req, res) => json(res, 500, { message: 'boom' }))
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/e1', headers: bearer() })
  t.equal(res.statusCode, 502)
  t.match(res.json(), { code: 'KERNEL_ERROR', status: 502 })
  t.notMatch(res.body, /boom/, 'the Kernel internals do not leak')
  t.equal(hits(kernel, '/v1/items/e1'), 3, 'one call and two retries')
})

// A retry went out whenever more than 1 ms was left after the backoff: it could not be answered
// in time, loaded the Kernel, added a breaker failure and turned the 502 into a 504.
t.test('a 5xx is not retried with less time left than the failed attempt took: the 502 is answered', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/items/e2': (_req, res) => { setTimeout(() => json(res, 500, {}), 200) } })
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 300 }
  }, { retries: 2, circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url, kernelBackoff: { baseMs: 1, capMs: 1 } })
  const res = await app.inject({ url: '/api/v1/items/e2', headers: bearer() })
  t.match([res.statusCode, res.json().code], [502, 'KERNEL_ERROR'])
  t.equal(hits(kernel, '/v1/items/e2'), 1, 'no retry with about 100 ms left after a 200 ms attempt')
})

t.test('a GET that fails once and then succeeds answers 200', async t => {
  const { app, kernel } = await setup(t)
  let n = 0
  kernel.on('GET /v1/items/f1', (_req, res) => { if (n++ === 0) json(res, 503, {}); else json(res, 200, { id: 'f1' }) })
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/f1', headers: bearer() })
  t.equal(res.statusCode, 200)
  t.equal(hits(kernel, '/v1/items/f1'), 2)
})

// A Kernel 5xx's Retry-After (a 503 of a Kernel restarting or shedding load) was ignored: the
// retries went out within milliseconds, and the client was told nothing of the wait.
t.test('a Kernel 5xx\'s Retry-After is waited for before a retry, and passed on when there is no time for one', async t => {
  const { app, kernel } = await setup(t, { circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  const at: number[] = []
  kernel.on('GET /v1/items/w1', (_req, res) => {
    at.push(Date.now())
    if (at.length === 1) { res.setHeader('retry-after', '1'); json(res, 503, {}) } else json(res, 200, { id: 'w1' })
  })
  const res = await app.inject({ url: '/api/v1/items/w1', headers: bearer() })
  t.same([res.statusCode, res.json()], [200, { id: 'w1' }])
  t.equal(at.length, 2)
  t.ok(at[1] - at[0] >= 950, `the retry waited for the Retry-After (${at[1] - at[0]} ms)`)
  kernel.on('GET /v1/items/w2', (_req, res) => { res.setHeader('retry-after', '120'); json(res, 503, {}) })
  const started = Date.now()
  const rest = await app.inject({ url: '/api/v1/items/w2', headers: bearer() })
  t.same([rest.statusCode, rest.json().code, rest.headers['retry-after']], [502, 'KERNEL_ERROR', '120'], 'REST')
  t.ok(Date.now() - started < 1000, 'answered at once')
  t.equal(hits(kernel, '/v1/items/w2'), 1, 'no retry the wait leaves no time for')
  const trpc = await app.inject({ url: '/trpc/getItem?input=' + encodeURIComponent(JSON.stringify({ id: 'w2' })), headers: bearer() })
  t.same([trpc.statusCode, trpc.json().error.data.code, trpc.json().error.data.retryAfter], [502, 'KERNEL_ERROR', 120], 'tRPC')
  kernel.on('POST /v1/items', (_req, res) => { res.setHeader('retry-after', '7'); json(res, 500, {}) })
  const post = await app.inject({ method: 'POST', url: '/api/v1/items', headers: bearer(), payload: { name: 'x' } })
  t.same([post.statusCode, post.headers['retry-after']], [502, '7'], 'a mutation without a key: not retried, the wait passed on')
})

t.test('a POST without an Idempotency-Key is never retried', async t => {
  const { app, kernel } = await setup(t, { circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  kernel.on('POST /v1/items', (_req, res) => json(res, 502, {}))
  const res = await app.inject({ method: 'POST', url: '/api/v1/items', headers: bearer(), payload: { name: 'x' } })
  t.equal(res.statusCode, 502)
  t.equal(hits(kernel, '/v1/items'), 1)
})

t.test('a POST with an Idempotency-Key is retried and carries the key to the Kernel', async t => {
  const { app, kernel } = await setup(t, { circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  kernel.on('POST /v1/items', (_req, res) => json(res, 502, {}))
  const res = await app.inject({ method: 'POST', url: '/api/v1/items', headers: { ...bearer(), 'idempotency-key': 'k-1' }, payload: { name: 'x' } })
  t.equal(res.statusCode, 502)
  t.equal(hits(kernel, '/v1/items'), 3)
  t.equal(kernel.requests[0].headers['idempotency-key'], 'k-1')
  const bad = await app.inject({ method: 'POST', url: '/api/v1/items', headers: { ...bearer(), 'idempotency-key': 'has space' }, payload: { name: 'x' } })
  t.equal(bad.statusCode, 400)
  t.match(bad.json(), { code: 'VALIDATION_FAILED' })
})

t.test('a slow Kernel is a 504 KERNEL_TIMEOUT within the op timeout, not retried', async t => {
  const { app, kernel } = await setup(t)
  kernel.on('GET /v1/slow/s1', async (_req, res) => { await sleep(600); json(res, 200, { id: 's1' }) })
  const started = Date.now()
  const res = await app.inject({ method: 'GET', url: '/api/v1/slow/s1', headers: bearer() })
  t.equal(res.statusCode, 504)
  t.match(res.json(), { code: 'KERNEL_TIMEOUT', status: 504 })
  t.ok(Date.now() - started < 550, 'the gateway answered before the Kernel did')
  t.equal(hits(kernel, '/v1/slow/s1'), 1)
})

t.test('a Kernel that stalls in the middle of its body is a timeout too', async t => {
  const { app, kernel } = await setup(t)
  kernel.on('GET /v1/slow/s2', (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': '100' })
    res.write('{"id":')
  })
  const res = await app.inject({ method: 'GET', url: '/api/v1/slow/s2', headers: bearer() })
  t.equal(res.statusCode, 504)
})

t.test('a Kernel that refuses connections is 503 KERNEL_UNAVAILABLE', async t => {
  const port = await closedPort()
  const app = await buildTestApp(t, {}, { manifest: manifest({ circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } }), kernelUrl: `http://127.0.0.1:${port}` })
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/a1', headers: bearer() })
  t.equal(res.statusCode, 503)
  t.match(res.json(), { code: 'KERNEL_UNAVAILABLE', status: 503 })
})

t.test('a 2xx body that is not JSON, or none, is handled', async t => {
  const { app, kernel } = await setup(t, { circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  kernel.on('GET /v1/items/j1', (_req, res) => { res.writeHead(200, { 'content-type': 'text/html' }); res.end('<html>') })
  kernel.on('GET /v1/items/j2', (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': '5' }); res.end('{"id"') })
  kernel.on('DELETE /v1/items/d1', (_req, res) => { res.writeHead(204); res.end() })
  const r1 = await app.inject({ method: 'GET', url: '/api/v1/items/j1', headers: bearer() })
  t.equal(r1.statusCode, 502)
  t.match(r1.json(), { code: 'KERNEL_ERROR' })
  const r2 = await app.inject({ method: 'GET', url: '/api/v1/items/j2', headers: bearer() })
  t.equal(r2.statusCode, 502)
  const r3 = await app.inject({ method: 'DELETE', url: '/api/v1/items/d1', headers: bearer() })
  t.equal(r3.statusCode, 204)
  t.equal(r3.body, '')
  t.equal(kernel.requests.at(-1)?.url, '/v1/items/d1', 'DELETE input goes to the path and query, no body')
  // A 205 carries no content either (RFC 9110 §15.3.6): answered as a 204 is. It was a 502 for
  // an output that does not admit null, and a 205 with the content `null` for one that does.
  kernel.on('DELETE /v1/items/d2', (_req, res) => { res.writeHead(205, { 'content-length': '0' }); res.end() })
  const reset = await app.inject({ method: 'DELETE', url: '/api/v1/items/d2', headers: bearer() })
  t.equal(reset.statusCode, 205)
  t.equal(reset.body, '', 'a 205 with no content')
  kernel.on('POST /v1/items/e5/touch', (_req, res) => { res.writeHead(205, { 'content-length': '0' }); res.end() })
  const touchedReset = await app.inject({ method: 'POST', url: '/api/v1/items/e5/touch', headers: bearer(), payload: {} })
  t.equal(touchedReset.statusCode, 205)
  t.equal(touchedReset.body, '', 'a 205 with no content, whatever the output schema admits')

  // An empty 200, or the JSON null, is no answer of an op whose output is an object: before, the
  // client got 200 with the body null. A 204 stays a 204, and an output that admits null has it.
  kernel.on('GET /v1/items/e1', (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': '0' }); res.end() })
  kernel.on('GET /v1/items/e2', (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }); res.end() })
  kernel.on('GET /v1/items/e3', (_req, res) => json(res, 200, null))
  kernel.on('POST /v1/items/e4/touch', (_req, res) => { res.writeHead(200, { 'content-length': '0' }); res.end() })
  for (const id of ['e1', 'e2', 'e3']) {
    const res = await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers: bearer() })
    t.equal(res.statusCode, 502, `${id}: 502`)
    t.match(res.json(), { code: 'KERNEL_ERROR', detail: /empty or null/ })
  }
  const trpc = await app.inject({ method: 'GET', url: '/trpc/getItem?input=' + encodeURIComponent(JSON.stringify({ id: 'e1' })), headers: bearer() })
  t.equal(trpc.statusCode, 502, 'the same on tRPC')
  const touched = await app.inject({ method: 'POST', url: '/api/v1/items/e4/touch', headers: bearer(), payload: {} })
  t.equal(touched.statusCode, 200, 'an output schema that admits null takes an empty body as null')
  t.equal(touched.body, 'null')
})

t.test('a Kernel answer larger than the bound is refused', async t => {
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const kernel = await startTestKernel(t, {
    'GET /v1/items/big': (_req, res) => json(res, 200, { id: 'x'.repeat(5000) }),
    'GET /v1/items/chunked': (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }); res.write('{"id":"'); res.end('y'.repeat(5000) + '"}') },
    'GET /v1/items/small': (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }); res.end('{"id":"s"}') }
  })
  const client = new KernelClient({ origin: kernel.url, connections: 2, retries: 0, maxInFlight: 10, resilience: null, maxResponseBytes: 1000 })
  t.teardown(() => client.close())
  const op = manifest().byName.get('getItem')!
  const run = client.forOperation(op)
  await t.rejects(run(new CallContext('r1', 'rest', op, { id: 'big' }, undefined, undefined, undefined)), { code: 'KERNEL_ERROR' })
  await t.rejects(run(new CallContext('r2', 'rest', op, { id: 'chunked' }, undefined, undefined, undefined)), { code: 'KERNEL_ERROR' })
  t.same(await run(new CallContext('r3', 'rest', op, { id: 'small' }, undefined, undefined, undefined)), { id: 's' }, 'a chunked answer within the bound is read')
})

t.test('a request undici refuses to send is the gateway\'s fault: not retried, not a breaker failure', async t => {
  // Before, undici's refusal of a header value counted as the Kernel being unreachable: 503,
  // retried with a key, and a breaker failure, so a few such calls opened the breaker for all.
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const kernel = await startTestKernel(t, { 'POST /v1/items': (_req, res) => json(res, 201, { id: 'n1' }) })
  // undici 7 keeps a pool slot for each request it refused so (three refusals wedged a pool of
  // two connections in a probe): hence callKey, which never lets such a key reach the client.
  const client = new KernelClient({ origin: kernel.url, connections: 8, retries: 2, maxInFlight: 10, resilience: { threshold: 1, resetTimeoutMs: 60_000 }, maxResponseBytes: 1000 })
  t.teardown(() => client.close())
  const op = manifest().byName.get('createItem')!
  const run = client.forOperation(op)
  // The pipeline refuses such a key before; the client is the last line.
  for (const key of ['a\nb', 'caf\u00e9\u65e5']) {
    await t.rejects(run(new CallContext('r1', 'rest', op, { name: 'x' }, undefined, undefined, key)), { code: 'INTERNAL' })
  }
  t.equal(client.breaker!.state, 'closed', 'the breaker stays closed')
  t.equal(kernel.requests.length, 0, 'nothing reached the Kernel, and nothing was retried')
  t.same(await run(new CallContext('r2', 'rest', op, { name: 'x' }, undefined, undefined, 'good-key')), { id: 'n1' })
  // A half-open probe that could not be sent is handed back: the next call probes.
  client.breaker!.failure(client.breaker!.acquire())
  t.equal(client.breaker!.state, 'open')
  ;(client.breaker as unknown as { openedAt: number }).openedAt = -Infinity
  await t.rejects(run(new CallContext('r3', 'rest', op, { name: 'x' }, undefined, undefined, 'a\nb')), { code: 'INTERNAL' })
  t.same(await run(new CallContext('r4', 'rest', op, { name: 'x' }, undefined, undefined, 'good-key')), { id: 'n1' }, 'the next call is the probe')
  t.equal(client.breaker!.state, 'closed')
})

t.test('a call whose time ran out before it reached the Kernel is a timeout, but no breaker failure', async t => {
  // It counted as one: calls that had waited out their time elsewhere (behind an idempotent first
  // call, say) could open the breaker although the Kernel was never asked.
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const kernel = await startTestKernel(t, { 'GET /v1/items/a1': (_req, res) => json(res, 200, { id: 'a1' }) })
  const client = new KernelClient({ origin: kernel.url, connections: 2, retries: 0, maxInFlight: 10, resilience: { threshold: 1, resetTimeoutMs: 60_000 }, maxResponseBytes: 1000 })
  t.teardown(() => client.close())
  const op = manifest().byName.get('getItem')!
  const run = client.forOperation(op)
  const late = new CallContext('r1', 'rest', op, { id: 'a1' }, undefined, undefined, undefined)
  ;(late as { startedAt: number }).startedAt -= op.timeoutMs + 1
  await t.rejects(run(late), { code: 'KERNEL_TIMEOUT' })
  t.equal(client.breaker!.state, 'closed')
  t.equal(kernel.requests.length, 0)
  t.same(await run(new CallContext('r2', 'rest', op, { id: 'a1' }, undefined, undefined, undefined)), { id: 'a1' })
})

t.test('a call that reaches the Kernel stage with less than 10 ms left is not sent: a timeout, no breaker failure', async t => {
  // Sent with what it had left, as a call handed a connection so is not, it timed out, sent: the
  // Kernel carried a mutation out for a 504, and such calls opened the breaker on a healthy Kernel.
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const kernel = await startTestKernel(t, { 'POST /v1/items': (_req, res) => { setTimeout(() => json(res, 201, { id: 'n1' }), 30) } })
  const client = new KernelClient({ origin: kernel.url, connections: 2, retries: 0, maxInFlight: 10, resilience: { threshold: 1, resetTimeoutMs: 60_000 } })
  t.teardown(() => client.close())
  const op = manifest().byName.get('createItem')!
  const run = client.forOperation(op)
  const late = new CallContext('r1', 'rest', op, { name: 'x' }, undefined, undefined, undefined)
  ;(late as { startedAt: number }).startedAt -= op.timeoutMs - 9
  await t.rejects(run(late), { code: 'KERNEL_TIMEOUT' })
  t.equal(late.sent, false, 'not sent')
  t.equal(kernel.requests.length, 0, 'the Kernel never got the mutation')
  t.equal(client.breaker!.state, 'closed')
  t.same(await run(new CallContext('r2', 'rest', op, { name: 'x' }, undefined, undefined, undefined)), { id: 'n1' }, 'a call with its time is sent')
})

t.test('a Kernel redirect is 502 KERNEL_ERROR, not retried and not a breaker failure', async t => {
  // Before, a 3xx counted as a 5xx: retried, and one misrouted operation opened the breaker on all.
  const { app, kernel } = await setup(t, { retries: 2, circuitBreaker: { threshold: 3, resetTimeoutMs: 60000 } })
  kernel.on('GET /v1/items/moved', (_req, res) => { res.writeHead(301, { location: '/v2/items/moved' }); res.end() })
  kernel.on('GET /v1/items/other', (_req, res) => { res.writeHead(307); res.end('elsewhere') })
  for (let i = 0; i < 4; i++) {
    const res = await app.inject({ method: 'GET', url: '/api/v1/items/moved', headers: bearer() })
    t.equal(res.statusCode, 502)
    t.match(res.json(), { code: 'KERNEL_ERROR', detail: /redirected getItem \(status 301\)/ })
    t.notMatch(res.body, /v2/, 'not where to: a Location may name hosts inside the network')
  }
  const other = await app.inject({ method: 'GET', url: '/api/v1/items/other', headers: bearer() })
  t.match(other.json(), { code: 'KERNEL_ERROR', detail: /status 307\)/ })
  t.equal(hits(kernel, '/v1/items/moved'), 4, 'one attempt per call: a redirect is not retried')
  t.equal(app.kernel.breakerState(), 'closed', 'the breaker stays closed')
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a1', headers: bearer() })).statusCode, 200, 'the other operations are served')
  t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_kernel_request_duration_seconds_count\{op="getItem",outcome="redirect"\} 5/)
})

/** Writes a status line and the start of a body, then a space every 20 ms, never ending it. */
function trickle (res: ServerResponse, status: number, start: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': 'application/json', ...headers })
  res.write(start)
  const timer = setInterval(() => res.write(' '), 20)
  res.on('close', () => clearInterval(timer))
}

// The status line classifies the attempt: its body was read under the call's deadline, and a
// 4xx whose body trickled was a 504 and a breaker failure (two such calls opened the breaker), a
// 4xx cut mid-body a 503, retried, and a trickling 5xx or 3xx a 504 (its body drained until the
// deadline), the 5xx then not retried.
t.test('a Kernel status is answered as it is, however its body trickles or breaks off', async t => {
  const { app, kernel } = await setup(t, { retries: 2, circuitBreaker: { threshold: 1, resetTimeoutMs: 60000 } })
  kernel.on('GET /v1/items/gone', (_req, res) => trickle(res, 404, '{"message":"no such item"'))
  kernel.on('GET /v1/slow/gone', (_req, res) => trickle(res, 404, '{"message":"no such item"'))
  kernel.on('GET /v1/slow/busy', (_req, res) => trickle(res, 429, '{"message":"later"', { 'retry-after': '7' }))
  kernel.on('GET /v1/items/cut', (req, res) => {
    res.writeHead(409, { 'content-type': 'application/json', 'content-length': '100' })
    res.write('{"message":"x"', () => setTimeout(() => res.destroy(), 20))
  })
  kernel.on('GET /v1/slow/moved', (_req, res) => trickle(res, 302, 'moved', { location: '/v2/moved' }))
  const get = async (url: string) => { const res = await app.inject({ url, headers: bearer() }); return [res.statusCode, res.json().code, res.headers['retry-after']] }
  t.same(await get('/api/v1/items/gone'), [404, 'NOT_FOUND', undefined], 'a 4xx whose body trickles: answered without its message')
  t.same(await get('/api/v1/slow/gone'), [404, 'NOT_FOUND', undefined], 'the same with less time left than the read of its message may take')
  t.same(await get('/api/v1/slow/busy'), [429, 'KERNEL_REJECTED', '7'], 'with its Retry-After')
  t.same(await get('/api/v1/items/cut'), [409, 'KERNEL_REJECTED', undefined], 'a 4xx whose connection drops mid-body')
  t.same(await get('/api/v1/slow/moved'), [502, 'KERNEL_ERROR', undefined], 'a 3xx whose body trickles is a redirect')
  t.equal(hits(kernel, '/v1/items/cut'), 1, 'a 4xx cut mid-body is not retried')
  t.equal(app.kernel.breakerState(), 'closed', 'none was a breaker failure')
  const metrics = (await app.inject({ url: '/metrics' })).body
  t.match(metrics, /mantle_kernel_request_duration_seconds_count\{op="getItem",outcome="client_error"\} 2/)
  t.match(metrics, /mantle_kernel_request_duration_seconds_count\{op="slowItem",outcome="client_error"\} 2/)
  t.match(metrics, /mantle_kernel_request_duration_seconds_count\{op="slowItem",outcome="redirect"\} 1/)
  t.notMatch(metrics, /outcome="(timeout|unavailable)"\}/)
})

t.test('a Kernel 5xx whose body trickles is a 5xx at once: retried, a 502', async t => {
  const { app, kernel } = await setup(t, { retries: 2, circuitBreaker: { threshold: 100, resetTimeoutMs: 60000 } })
  kernel.on('GET /v1/items/e1', (_req, res) => trickle(res, 500, '<html>'))
  const res = await app.inject({ url: '/api/v1/items/e1', headers: bearer() })
  t.same([res.statusCode, res.json().code], [502, 'KERNEL_ERROR'])
  t.equal(hits(kernel, '/v1/items/e1'), 3, 'one call and two retries')
  t.match((await app.inject({ url: '/metrics' })).body, /mantle_kernel_request_duration_seconds_count\{op="getItem",outcome="server_error"\} 3/)
})

t.test('a 2xx body that is not JSON or is too large is 502 KERNEL_ERROR, not retried and not a breaker failure', async t => {
  // Before, it counted as a 5xx: retried, and two calls to one operation answering a huge list
  // opened the breaker on every other operation, and /readyz went down with it.
  const { app, kernel } = await setup(t, { retries: 2, circuitBreaker: { threshold: 3, resetTimeoutMs: 60000 } })
  kernel.on('GET /v1/items/html', (_req, res) => { res.writeHead(200, { 'content-type': 'text/html' }); res.end('<html>') })
  kernel.on('GET /v1/items/huge', (_req, res) => json(res, 200, { id: 'x'.repeat(11 * 1024 * 1024) }))
  for (const id of ['html', 'huge', 'html', 'huge']) {
    const res = await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers: bearer() })
    t.same([res.statusCode, res.json().code], [502, 'KERNEL_ERROR'], id)
  }
  t.equal(hits(kernel, '/v1/items/html') + hits(kernel, '/v1/items/huge'), 4, 'one attempt per call')
  t.equal(app.kernel.breakerState(), 'closed', 'the breaker stays closed')
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a1', headers: bearer() })).statusCode, 200, 'the other operations are served')
  t.equal((await app.inject({ url: '/readyz' })).statusCode, 200)
  t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_kernel_request_duration_seconds_count\{op="getItem",outcome="bad_answer"\} 4/)
})

t.test('the circuit breaker opens after the threshold, fails fast, and closes after one good probe', async t => {
  const { app, kernel } = await setup(t, { retries: 0, circuitBreaker: { threshold: 3, resetTimeoutMs: 150 } })
  let healthy = false
  kernel.on('GET /v1/items/b1', (_req, res) => healthy ? json(res, 200, { id: 'b1' }) : json(res, 500, {}))
  for (let i = 0; i < 3; i++) {
    const res = await app.inject({ method: 'GET', url: '/api/v1/items/b1', headers: bearer() })
    t.equal(res.statusCode, 502)
  }
  t.equal(app.kernel.breakerState(), 'open')
  const ready = await app.inject({ method: 'GET', url: '/readyz' })
  t.equal(ready.statusCode, 503)
  t.same(ready.json().failing, ['kernel'])

  const fast = await app.inject({ method: 'GET', url: '/api/v1/items/b1', headers: bearer() })
  t.equal(fast.statusCode, 503)
  t.match(fast.json(), { code: 'KERNEL_UNAVAILABLE' })
  t.ok(Number(fast.headers['retry-after']) >= 1)
  t.equal(hits(kernel, '/v1/items/b1'), 3, 'an open breaker does not call the Kernel')

  await sleep(200)
  // Past its reset time, with no call since, the breaker reads half-open: /readyz read the stored
  // state (open), and an instance its Service no longer sent calls to never became ready again.
  t.equal(app.kernel.breakerState(), 'half-open')
  t.equal((await app.inject({ method: 'GET', url: '/readyz' })).statusCode, 200)
  const scraped = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(scraped, /mantle_kernel_breaker_state\{origin="[^"]+"\} 1/)
  t.match(scraped, /mantle_kernel_breaker_opened_total\{origin="[^"]+",reason="consecutive"\} 1/, 'opened once, by failures in a row')
  healthy = true
  // Half-open: two calls at once, only one probe reaches the Kernel.
  const slowProbe = new Promise<void>(resolve => kernel.on('GET /v1/items/b1', async (_req, res) => { await sleep(50); json(res, 200, { id: 'b1' }); resolve() }))
  const [probe, other] = await Promise.all([
    app.inject({ method: 'GET', url: '/api/v1/items/b1', headers: bearer() }),
    sleep(10).then(async () => await app.inject({ method: 'GET', url: '/api/v1/items/b1', headers: bearer() }))
  ])
  await slowProbe
  t.equal(probe.statusCode, 200)
  t.equal(other.statusCode, 503, 'a second call while the probe is out fails fast')
  t.equal(hits(kernel, '/v1/items/b1'), 4)
  t.equal(app.kernel.breakerState(), 'closed')
  const after = await app.inject({ method: 'GET', url: '/api/v1/items/b1', headers: bearer() })
  t.equal(after.statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/readyz' })).statusCode, 200)
})

t.test('a failed probe opens the breaker again', async t => {
  const { app, kernel } = await setup(t, { retries: 0, circuitBreaker: { threshold: 1, resetTimeoutMs: 100 } })
  kernel.on('GET /v1/items/p1', (_req, res) => json(res, 500, {}))
  await app.inject({ method: 'GET', url: '/api/v1/items/p1', headers: bearer() })
  t.equal(app.kernel.breakerState(), 'open')
  await sleep(130)
  const probe = await app.inject({ method: 'GET', url: '/api/v1/items/p1', headers: bearer() })
  t.equal(probe.statusCode, 502)
  t.equal(app.kernel.breakerState(), 'open')
  t.equal(hits(kernel, '/v1/items/p1'), 2)
})

t.test('the failure-rate rule opens the breaker on a Kernel failing every other call, and the metric says why', async t => {
  const { app, kernel } = await setup(t, { retries: 0, circuitBreaker: { threshold: 3, resetTimeoutMs: 60_000, failureRate: 0.5, minimumCalls: 10 } })
  let n = 0
  kernel.on('GET /v1/items/f1', (_req, res) => (n++ % 2 === 0) ? json(res, 503, {}) : json(res, 200, { id: 'f1' }))
  const statuses: number[] = []
  const call = async (): Promise<void> => { statuses.push((await app.inject({ method: 'GET', url: '/api/v1/items/f1', headers: bearer() })).statusCode) }
  const diagzWindow = async (): Promise<unknown> => (await app.inject({ method: 'GET', url: '/diagz', headers: bearer({ roles: ['system'] }) })).json().breakers.kernel.failureWindow
  for (let i = 0; i < 5; i++) await call()
  t.same(await diagzWindow(), { calls: 5, failures: 3, failureRate: 0.5, minimumCalls: 10, windowMs: 10_000 }, '/diagz shows the window as it stands')
  for (let i = 0; i < 7; i++) await call()
  // Never two failures in a row; the 11th call's failure is the 6th of 11, past minimumCalls and at least half.
  t.same(statuses, [502, 200, 502, 200, 502, 200, 502, 200, 502, 200, 502, 503], 'open once 10 calls or more have failed half or more')
  t.equal(app.kernel.breakerState(), 'open')
  t.equal(hits(kernel, '/v1/items/f1'), 11, 'an open breaker does not call the Kernel')
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(metrics, /mantle_kernel_breaker_opened_total\{origin="[^"]+",reason="failure_rate"\} 1/)
  t.match(metrics, /mantle_kernel_breaker_opened_total\{origin="[^"]+",reason="consecutive"\} 0/, 'each reason\'s series is there from 0 (increase() misses a series first seen at 1)')
  t.match(await diagzWindow(), { calls: 0, failures: 0 }, 'the window starts again when the breaker opens')
})

t.test('retries stop when the breaker opens', async t => {
  const { app, kernel } = await setup(t, { retries: 5, circuitBreaker: { threshold: 2, resetTimeoutMs: 10000 } })
  kernel.on('GET /v1/items/r1', (_req, res) => json(res, 500, {}))
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/r1', headers: bearer() })
  t.equal(res.statusCode, 503, 'the retry found the breaker open')
  t.equal(hits(kernel, '/v1/items/r1'), 2)
})

t.test('the retry budget bounds retries under a failing Kernel', async t => {
  const { app, kernel } = await setup(t, { retries: 2, circuitBreaker: { threshold: 100000, resetTimeoutMs: 1000 } })
  kernel.on('GET /v1/items/x1', (_req, res) => json(res, 500, {}))
  const calls = 100
  for (let i = 0; i < calls; i++) await app.inject({ method: 'GET', url: '/api/v1/items/x1', headers: bearer() })
  const retries = hits(kernel, '/v1/items/x1') - calls
  // Reserve of 10 plus 0.2 per call: well under the 200 retries a naive policy would send.
  t.ok(retries <= 10 + calls * 0.2 + 1, `retries (${retries}) stay within the budget`)
  t.ok(retries >= 20, `retries (${retries}) do happen`)
  const metrics = await app.inject({ method: 'GET', url: '/metrics' })
  t.match(metrics.body, /mantle_kernel_retry_budget_exhausted_total [1-9]/)
})

t.test('the bulkhead fails fast beyond maxInFlight', async t => {
  const { app, kernel } = await setup(t, { maxInFlight: 2 })
  const release: Array<() => void> = []
  kernel.on('GET /v1/items/h1', async (_req, res) => { await new Promise<void>(resolve => release.push(resolve)); json(res, 200, { id: 'h1' }) })
  const first = [1, 2].map(async () => await app.inject({ method: 'GET', url: '/api/v1/items/h1', headers: bearer() }))
  while (release.length < 2) await sleep(5)
  const third = await app.inject({ method: 'GET', url: '/api/v1/items/h1', headers: bearer() })
  t.equal(third.statusCode, 503)
  t.match(third.json(), { code: 'KERNEL_UNAVAILABLE', detail: 'Too many calls are in flight to the Kernel' })
  for (const r of release) r()
  for (const res of await Promise.all(first)) t.equal(res.statusCode, 200)
  t.equal(app.kernel.inFlight(), 0)
})

t.test('with the breaker off the bulkhead still bounds the calls waiting for a connection', async t => {
  // BFF_CIRCUIT_BREAKER_ENABLED=false took the bulkhead with it, and nothing else bounded the
  // calls waiting in the gateway for a free connection: behind a slow Kernel they grew by
  // rate x timeout (20,000 calls at once, 19,998 waiting on 2 connections).
  const { app, kernel } = await setup(t, { connections: 1, maxInFlight: 3 }, { BFF_CIRCUIT_BREAKER_ENABLED: false })
  let open = false
  const release: Array<() => void> = []
  kernel.on('GET /v1/items/q1', async (_req, res) => {
    if (!open) await new Promise<void>(resolve => release.push(resolve))
    json(res, 200, { id: 'q1' })
  })
  const call = async () => await app.inject({ url: '/api/v1/items/q1', headers: bearer() })
  const admitted = [1, 2, 3].map(call)
  while (app.kernel.inFlight() < 3 || release.length < 1) await sleep(5)
  const beyond = [4, 5].map(call)
  const metrics = (await app.inject({ url: '/metrics' })).body
  t.match(metrics, /mantle_kernel_pool\{state="queued"\} 2\n/, 'two wait for the one connection, no more')
  open = true
  for (const r of release) r()
  for (const res of await Promise.all(beyond)) {
    t.same([res.statusCode, res.headers['retry-after'], res.json().code, res.json().detail], [503, '1', 'KERNEL_UNAVAILABLE', 'Too many calls are in flight to the Kernel'], 'refused at once, as the bulkhead refuses')
    t.match(res.headers['content-type'], /^application\/problem\+json/)
  }
  t.same((await Promise.all(admitted)).map(r => r.statusCode), [200, 200, 200], 'the calls within the bound are served, in turn')
  t.equal(hits(kernel, '/v1/items/q1'), 3)
  t.equal(app.kernel.inFlight(), 0)
  t.match((await app.inject({ url: '/metrics' })).body, /mantle_kernel_rejected_total\{reason="bulkhead_full"\} 2\n/)
})

t.test('a call whose time runs out in the middle of the connection queue leaves it; the rest are served first come first served', async t => {
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const kernel = await startTestKernel(t, {})
  let open = false
  const release: Array<() => void> = []
  for (const id of ['h', 'a', 'b', 'c']) {
    kernel.on(`GET /v1/items/${id}`, async (_req, res) => {
      if (!open) await new Promise<void>(resolve => release.push(resolve))
      json(res, 200, { id: 'x' })
    })
  }
  const client = new KernelClient({ origin: kernel.url, connections: 1, retries: 0, maxInFlight: 10, resilience: null })
  t.teardown(() => client.close())
  const op = manifest().byName.get('getItem')!
  const run = client.forOperation(op)
  const call = (id: string, msLeft = op.timeoutMs) => {
    const ctx = new CallContext(id, 'rest', op, { id }, undefined, undefined, undefined)
    ;(ctx as { startedAt: number }).startedAt -= op.timeoutMs - msLeft
    return run(ctx)
  }
  const held = call('h')
  while (release.length < 1) await sleep(5)
  const [a, b, c] = [call('a'), call('b', 50), call('c')]
  t.equal(client.queued, 3)
  await t.rejects(b, { code: 'KERNEL_TIMEOUT' })
  t.equal(client.queued, 2, 'the one whose time ran out left the queue')
  open = true
  release[0]()
  t.same(await Promise.all([held, a, c]), [{ id: 'x' }, { id: 'x' }, { id: 'x' }])
  t.same(kernel.requests.map(r => r.url), ['/v1/items/h', '/v1/items/a', '/v1/items/c'], 'in the order they came')
  t.equal(client.queued, 0)
})

t.test('with resilience off: no retry, no breaker, same status mapping', async t => {
  const { app, kernel } = await setup(t, { maxInFlight: 1, circuitBreaker: { threshold: 1, resetTimeoutMs: 10000 } }, { BFF_CIRCUIT_BREAKER_ENABLED: false })
  kernel.on('GET /v1/items/o1', (_req, res) => json(res, 500, {}))
  for (let i = 0; i < 3; i++) {
    const res = await app.inject({ method: 'GET', url: '/api/v1/items/o1', headers: bearer() })
    t.equal(res.statusCode, 502)
  }
  t.equal(hits(kernel, '/v1/items/o1'), 3)
  t.equal(app.kernel.breakerState(), 'disabled')
  t.equal((await app.inject({ method: 'GET', url: '/readyz' })).json().checks.kernel, 'breaker disabled')
  // Off, the breaker is in no metric, as every concern that is off: its state read 0, closed.
  const scrape = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.notMatch(scrape, /mantle_kernel_breaker_state/)
  t.notMatch(scrape, /mantle_kernel_breaker_opened_total/)
  t.match(scrape, /mantle_kernel_in_flight/, 'the Kernel\'s other metrics stay')
})

t.test('env overrides the manifest breaker settings', async t => {
  const { app, kernel } = await setup(t, { retries: 0, circuitBreaker: { threshold: 50, resetTimeoutMs: 10000 } }, { BFF_CIRCUIT_BREAKER_THRESHOLD: '1', BFF_CIRCUIT_BREAKER_TIMEOUT: '60000' })
  kernel.on('GET /v1/items/v1', (_req, res) => json(res, 500, {}))
  await app.inject({ method: 'GET', url: '/api/v1/items/v1', headers: bearer() })
  t.equal(app.kernel.breakerState(), 'open')
  const res = await app.inject({ method: 'GET', url: '/api/v1/items/v1', headers: bearer() })
  t.ok(Number(res.headers['retry-after']) > 50, 'the reset timeout is the env one')
})

t.test('closing the app waits for a call in flight', async t => {
  const { app, kernel }: Setup = await setup(t)
  let reached = false
  kernel.on('GET /v1/items/w1', async (_req, res) => { reached = true; await sleep(100); json(res, 200, { id: 'w1' }) })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const pending = fetch(`http://127.0.0.1:${port}/api/v1/items/w1`, { headers: bearer() })
  // In flight once the Kernel has it: after a fixed 30 ms, on a loaded machine, the request had
  // not yet arrived, and the closing gateway refused it 503, as it should.
  await until(() => reached, 'the call at the Kernel')
  const closing = app.close()
  const res = await pending
  t.equal(res.status, 200)
  t.same(await res.json(), { id: 'w1' })
  await closing
})

// A path parameter is one segment of the Kernel's path, whatever it holds: slashes and the rest of
// what encodeURIComponent encodes are percent-encoded. A segment `.` or `..` is refused: a Kernel
// or a proxy that normalizes paths resolves it (`/v1/items/../detail` is `/v1/detail`), and no
// encoding of it is safe (`%2E%2E` was sent, which WHATWG's URL parser and RFC 3986 normalization
// resolve as `..`: a Kernel reading `new URL(req.url, base)` served another route).
t.test('path parameters never become path structure at the Kernel', async t => {
  const kernel = await startTestKernel(t, {})
  const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}/detail', input: idInput, output: { type: 'object', properties: { id: { type: 'string' } } } },
    getPair: { type: 'query', rest: 'GET /pairs/:a/:b', kernel: 'GET /v1/pairs/{a}{b}/x', input: { type: 'object', required: ['a', 'b'], properties: { a: { type: 'string' }, b: { type: 'string' } } }, output: { type: 'object', properties: { id: { type: 'string' } } } }
  }, { retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const cases: Array<[string, string]> = [['...', '...'], ['a/../b', 'a%2F..%2Fb'], ['x.y', 'x.y'], ['%2E%2E', '%252E%252E']]
  for (const [, sent] of cases) kernel.on(`GET /v1/items/${sent}/detail`, (_req, res) => json(res, 200, { id: 'x' }))
  for (const [id] of cases) {
    const res = await app.inject({ url: `/trpc/getItem?input=${encodeURIComponent(JSON.stringify({ id }))}`, headers: bearer() })
    t.equal(res.statusCode, 200, `${id}: ${res.body.slice(0, 120)}`)
  }
  t.same(kernel.requests.map(r => r.url), cases.map(([, sent]) => `/v1/items/${sent}/detail`))
  for (const id of ['..', '.']) {
    const trpc = await app.inject({ url: `/trpc/getItem?input=${encodeURIComponent(JSON.stringify({ id }))}`, headers: bearer() })
    t.equal(trpc.statusCode, 400, `${id} over tRPC: ${trpc.body.slice(0, 160)}`)
    t.match(trpc.json(), { error: { message: "input.id must not make a segment of the Kernel's path '.' or '..'", data: { code: 'VALIDATION_FAILED' } } })
    const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [{ id: 'c', op: 'getItem', input: { id } }] } })
    t.match(batch.json(), { results: [{ id: 'c', error: { code: 'VALIDATION_FAILED', status: 400 } }] }, `${id} in a batch`)
  }
  const pair = await app.inject({ url: `/trpc/getPair?input=${encodeURIComponent(JSON.stringify({ a: '.', b: '.' }))}`, headers: bearer() })
  t.match([pair.statusCode, pair.json()], [400, { error: { message: "input.a, input.b must not make a segment of the Kernel's path '.' or '..'" } }], 'two parameters of one segment')
  t.equal(kernel.requests.length, cases.length, 'none of them reached the Kernel')
})

// README "The Kernel side": "a refused or reset connection | 503 KERNEL_UNAVAILABLE".
// A connection the Kernel resets after the 2xx headers, in the middle of the body, too (it was
// once reported as 502 KERNEL_ERROR, "a body that is not JSON or too large").
t.test('a connection reset in the middle of a 2xx body is 503 KERNEL_UNAVAILABLE', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/items/r1': (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': '100' })
      res.write('{"id":"r1"')
      setTimeout(() => res.socket?.destroy(), 20)
    },
    'GET /v1/items/r2': (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' }) // chunked
      res.write('{"id":"r2"')
      setTimeout(() => res.socket?.destroy(), 20)
    }
  })
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 2000 }
  }, { retries: 0, circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  for (const id of ['r1', 'r2']) {
    const res = await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers: bearer() })
    t.equal(res.statusCode, 503, `${id}: ${res.body}`)
    t.match(res.json(), { code: 'KERNEL_UNAVAILABLE' })
  }
})

// README "The Kernel side": "An operation's timeoutMs bounds the whole call, retries and backoff
// included, from the moment the gateway received it." A call queued in the undici Pool behind
// busy connections answers 504 KERNEL_TIMEOUT at its own deadline (undici acts on an abort
// signal only once the request has a connection).
t.test('a call queued for a Kernel connection answers within its own timeoutMs', async t => {
  const kernel = await startTestKernel(t, {
    // A Kernel endpoint that takes its time (within the long op's 3 s budget), long after the
    // fast op's 200 ms deadline (2.5 s until 2026-12: 1.2 s keeps a second of margin).
    'GET /v1/long/l1': async (_req, res) => { await sleep(1200); json(res, 200, { id: 'l1' }) },
    'GET /v1/fast/f1': (_req, res) => json(res, 200, { id: 'f1' })
  })
  const manifest = testManifest({
    longOp: { type: 'query', rest: 'GET /long/:id', kernel: 'GET /v1/long/{id}', input: idInput, output: item, timeoutMs: 3000 },
    fastOp: { type: 'query', rest: 'GET /fast/:id', kernel: 'GET /v1/fast/{id}', input: idInput, output: item, timeoutMs: 200 }
  }, { connections: 1, retries: 0, circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  let longDone = false
  const long = app.inject({ method: 'GET', url: '/api/v1/long/l1', headers: bearer() }).then(res => { longDone = true; return res })
  // The long call holds the connection once the Kernel has it (a 50 ms sleep let a loaded
  // machine's fast call come first and take the connection).
  await until(() => hits(kernel, '/v1/long/l1') === 1, 'the long call to reach the Kernel')
  const fast = await app.inject({ method: 'GET', url: '/api/v1/fast/f1', headers: bearer() })
  t.equal(fast.statusCode, 504, 'the queued call times out')
  t.match(fast.json(), { code: 'KERNEL_TIMEOUT' })
  t.notOk(longDone, 'at its own deadline, not when the connection it waited for came free')
  t.equal((await long).statusCode, 200)
})

// Before, calls waited for a connection in undici's queue: one whose deadline passed there was
// aborted once it got a connection, and undici destroyed that healthy connection; each counted
// as a Kernel timeout, so a slow operation filling the pool opened the breaker for every one.
t.test('calls whose time runs out waiting for a connection: no connection torn down, no breaker failure', async t => {
  // A Kernel of its own, to count its connections (keep-alive long enough to outlast the test).
  let connections = 0
  let longs = 0
  const fast: string[] = []
  const server = createServer((req, res) => {
    if (req.url === '/v1/long/l1') {
      longs++
      setTimeout(() => json(res, 200, { id: 'l1' }), 2000)
    } else { fast.push(req.url ?? ''); json(res, 200, { id: 'f1' }) }
  })
  server.keepAliveTimeout = 30_000
  server.on('connection', () => { connections++ })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise(resolve => { server.close(resolve); server.closeAllConnections() }))
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  const manifest = testManifest({
    longOp: { type: 'query', rest: 'GET /long/:id', kernel: 'GET /v1/long/{id}', input: idInput, output: item, timeoutMs: 3000 },
    // 400 ms, not 100: on a loaded CI run a call served at once (the warm-up's, the last one's)
    // took over 100 ms; the long calls hold both connections for 2 s, long after it.
    fastOp: { type: 'query', rest: 'GET /fast/:id', kernel: 'GET /v1/fast/{id}', input: idInput, output: item, timeoutMs: 400 }
  }, { url, connections: 2, retries: 0, circuitBreaker: { threshold: 3, resetTimeoutMs: 60_000 } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: url })
  // Two connections, warmed.
  await Promise.all([0, 1].map(async () => await app.inject({ url: '/api/v1/fast/f1', headers: bearer() })))
  t.equal(connections, 2)
  const long = [0, 1].map(async () => await app.inject({ url: '/api/v1/long/l1', headers: bearer() }))
  // Both connections held once the Kernel has both long calls (not after a 50 ms sleep).
  await until(() => longs === 2, 'both long calls to reach the Kernel')
  const queued = await Promise.all(Array.from({ length: 5 }, async () => await app.inject({ url: '/api/v1/fast/f1', headers: bearer() })))
  t.same(queued.map(r => r.json().code), Array(5).fill('KERNEL_TIMEOUT'), 'each times out at its own deadline')
  t.same((await Promise.all(long)).map(r => r.statusCode), [200, 200])
  t.equal(app.kernel.breakerState(), 'closed', 'the Kernel was never asked: no breaker failure')
  t.equal(fast.length, 2, 'the queued calls never reached the Kernel')
  t.equal((await app.inject({ url: '/api/v1/fast/f1', headers: bearer() })).statusCode, 200, 'the next call is served')
  t.equal(connections, 2, 'on the same connections: none was torn down')
  t.match((await app.inject({ url: '/metrics' })).body, /mantle_kernel_rejected_total\{reason="queue_timeout"\} 5/)
})

t.test('an empty path parameter is 400, never another Kernel route', async t => {
  // DELETE /v1/items/{id} with id "" was DELETE /v1/items/, the collection to a Kernel that
  // ignores trailing slashes; REST refuses the empty segment itself, the other faces did not.
  const { app, kernel } = await setup(t)
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [{ id: 'a', op: 'deleteItem', input: { id: '' } }, { id: 'b', op: 'touchItem', input: { id: '' } }] } })
  t.match(batch.json().results, [{ error: { code: 'VALIDATION_FAILED', detail: /input\.id must not be empty/ } }, { error: { code: 'VALIDATION_FAILED' } }])
  const trpc = await app.inject({ method: 'POST', url: '/trpc/deleteItem', headers: { ...bearer(), 'content-type': 'application/json' }, payload: { id: '' } })
  t.match(trpc.json(), { error: { data: { code: 'VALIDATION_FAILED', httpStatus: 400 } } })
  t.equal(kernel.requests.length, 0, 'nothing reached the Kernel')
})

// JSON's null has no form in a URL: String(null) made it the text "null", so a nullable path
// parameter sent as null named the resource "null" at the Kernel, and a null item of a query-string
// array the item "null": what a client sending the text would get. Refused, on every face.
t.test('a null path parameter or query-string item is 400, never the text "null" at the Kernel', async t => {
  const kernel = await startTestKernel(t, {})
  const anything = { type: 'object', additionalProperties: true }
  const manifest = testManifest({
    getThing: { type: 'query', rest: 'GET /things/:id', kernel: 'GET /v1/things/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: ['string', 'null'] } } }, output: anything },
    listThings: { type: 'query', rest: 'GET /things', kernel: 'GET /v1/things', input: { type: 'object', properties: { tags: { type: 'array', items: { type: ['string', 'null'] } } } }, output: anything },
    runThing: { type: 'mutation', rest: 'POST /things/:id/runs', kernel: 'POST /v1/things/{id}/runs', input: { type: 'object', required: ['id'], properties: { id: { type: ['integer', 'null'] } } }, output: anything }
  }, { retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const headers = { ...bearer(), 'content-type': 'application/json' }
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: 'a', op: 'getThing', input: { id: null } }, { id: 'b', op: 'listThings', input: { tags: ['x', null] } }, { id: 'c', op: 'runThing', input: { id: null } }] } })
  t.match(batch.json().results, [
    { id: 'a', error: { code: 'VALIDATION_FAILED', status: 400, detail: "input.id must not be null: it is a segment of the Kernel's path" } },
    { id: 'b', error: { code: 'VALIDATION_FAILED', status: 400, detail: "input.tags.1 is null, which the Kernel's query string cannot carry" } },
    { id: 'c', error: { code: 'VALIDATION_FAILED', status: 400, detail: "input.id must not be null: it is a segment of the Kernel's path" } }
  ])
  const trpc = await app.inject({ url: `/trpc/getThing?input=${encodeURIComponent('{"id":null}')}`, headers })
  t.match([trpc.statusCode, trpc.json()], [400, { error: { data: { code: 'VALIDATION_FAILED' } } }], 'tRPC')
  const graphql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ getThing(id: null) }' } })
  t.match(graphql.json(), { errors: [{ extensions: { code: 'VALIDATION_FAILED', status: 400 } }] }, 'GraphQL')
  t.same(kernel.requests.map(r => r.url), [], 'none reached the Kernel')
  // The text "null" is a text like any: sent as it is.
  kernel.on('GET /v1/things/null', (req, res) => json(res, 200, { url: req.url }))
  t.same((await app.inject({ url: '/api/v1/things/null', headers: bearer() })).json(), { url: '/v1/things/null' })
})

t.test('Kernel answer headers over 16 KiB are 502 KERNEL_ERROR, not retried and not a breaker failure', async t => {
  const { app, kernel } = await setup(t, { retries: 2, circuitBreaker: { threshold: 3, resetTimeoutMs: 60000 } })
  kernel.on('GET /v1/items/big', (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', link: 'x'.repeat(20_000) }); res.end('{"id":"big"}') })
  for (let i = 0; i < 3; i++) {
    const res = await app.inject({ url: '/api/v1/items/big', headers: bearer() })
    t.same([res.statusCode, res.json().code], [502, 'KERNEL_ERROR'])
  }
  t.equal(hits(kernel, '/v1/items/big'), 3, 'one attempt per call (before: retried, 503)')
  t.equal(app.kernel.breakerState(), 'closed', 'the breaker stays closed (before: open, for every operation)')
})

t.test('a mutation the Kernel serves over GET is not retried without a key', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/bump/b1': (_req, res) => json(res, 503, { message: 'busy' }) })
  const manifest = testManifest({
    bump: { type: 'mutation', rest: 'POST /bump/:id', kernel: 'GET /v1/bump/{id}', input: idInput, output: item }
  }, { retries: 2, circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/bump/b1', headers: bearer() })).statusCode, 502)
  t.equal(hits(kernel, '/v1/bump/b1'), 1, 'one call: it changes state (before: three, without a key)')
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/bump/b1', headers: { ...bearer(), 'idempotency-key': 'k-1' } })).statusCode, 502)
  t.equal(hits(kernel, '/v1/bump/b1'), 4, 'with a key it is retried, as a POST is')
})

// The pool kept an idle connection 10 s, past the 5 s after which uvicorn (or Node) closes one
// without a Keep-Alive hint: about 1% of calls went out on a connection the Kernel had just closed,
// a 503 and a breaker failure each, a mutation without a key not retried. The gateway must be the
// side that closes an idle connection, after BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS.
t.test('the gateway closes an idle Kernel connection after BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS, before a Kernel without a Keep-Alive hint would', async t => {
  // A raw HTTP/1.1 Kernel: keep-alive, no Keep-Alive header, and it never closes a connection itself.
  const sockets: Array<{ closedByGateway: boolean }> = []
  const server = createTcpServer(socket => {
    const conn = { closedByGateway: false }
    sockets.push(conn)
    let head = ''
    socket.on('data', (d: Buffer) => {
      head += d.toString('latin1')
      let end: number
      while ((end = head.indexOf('\r\n\r\n')) !== -1) {
        const length = Number(/content-length:\s*(\d+)/i.exec(head.slice(0, end))?.[1] ?? 0)
        if (head.length < end + 4 + length) return
        head = head.slice(end + 4 + length)
        const body = JSON.stringify({ id: 'n' + String(sockets.length), name: 'x' })
        socket.write(`HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`)
      }
    })
    socket.on('end', () => { conn.closedByGateway = true; socket.end() })
    socket.on('error', () => {})
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { server.close() })
  const app = await buildTestApp(t, { BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS: 200 }, { manifest: manifest(), kernelUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}` })
  const post = async () => (await app.inject({ method: 'POST', url: '/api/v1/items', headers: bearer(), payload: { name: 'x' } })).statusCode
  t.equal(await post(), 201)
  await until(() => sockets[0]?.closedByGateway === true, 'the gateway to close its idle Kernel connection', 5000)
  t.equal(await post(), 201, 'the next call goes out on a new connection')
  t.equal(sockets.length, 2)
})

// Each answer was bounded (10 MB), not the answers read at once: 24 calls answered 9.4 MB lists
// together took the heap past the Deployment's 384 MB and the process died (every call of every
// tenant with it). What the answers being read hold, all together, is bounded now.
t.test('the 2xx answers read at once are bounded together: past the bound a call is 503 OVERLOADED, no breaker failure, no retry', async t => {
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const body = JSON.stringify({ id: 'big', name: 'x'.repeat(1000) })
  const held: Array<() => void> = []
  /** Writes the headers and most of the body, and the rest once the test lets it go. */
  const halfThenHold = (chunked: boolean) => (_req: unknown, res: ServerResponse): void => {
    res.writeHead(200, { 'content-type': 'application/json', ...(chunked ? {} : { 'content-length': String(Buffer.byteLength(body)) }) })
    res.write(body.slice(0, 900))
    held.push(() => res.end(body.slice(900)))
  }
  const kernel = await startTestKernel(t, {
    'GET /v1/items/len': halfThenHold(false),
    'GET /v1/items/chunked': halfThenHold(true),
    'GET /v1/items/small': (_req, res) => json(res, 200, { id: 'small' })
  })
  const dropped: string[] = []
  const nothing = (): void => {}
  const calls = { ok: nothing, client_error: nothing, redirect: nothing, bad_answer: nothing, server_error: nothing, timeout: nothing, unavailable: nothing, client_closed: nothing }
  const client = new KernelClient({
    origin: kernel.url,
    connections: 4,
    retries: 2,
    maxInFlight: 100,
    resilience: { threshold: 1, resetTimeoutMs: 60_000 },
    maxResponseBytes: 1500,
    maxAnswerBytes: 1500,
    metrics: { forOperation: () => ({ call: calls, retry: nothing }), budgetExhausted: nothing, rejected: nothing, answerDropped: () => dropped.push('dropped'), connected: nothing }
  })
  t.teardown(() => client.close())
  const op = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 5000 }
  }).byName.get('getItem')!
  const run = client.forOperation(op)
  const call = async (id: string): Promise<unknown> => await run(new CallContext(id, 'rest', op, { id }, undefined, undefined, undefined)).then(
    (value) => value,
    (err: { code: string, headers?: Record<string, string> }) => [err.code, err.headers?.['retry-after']]
  )
  for (const [first, second] of [['len', 'len'], ['chunked', 'len'], ['len', 'chunked']]) {
    held.length = 0
    const holding = call(first)
    // The length it announced, or without one what has come of it.
    await until(() => client.answerBytes === (first === 'len' ? Buffer.byteLength(body) : 900), `the answer to ${first} is being read`)
    t.same(await call(second), ['OVERLOADED', '1'], `${second}'s answer finds no room while ${first}'s is read`)
    t.same(await call('small'), { id: 'small' }, 'a small answer that fits is read')
    held[0]()
    t.same(await holding, { id: 'big', name: 'x'.repeat(1000) }, `${first}'s answer is whole`)
    t.equal(client.answerBytes, 0, 'its bytes are handed back once read')
  }
  held.length = 0
  const last = call('len')
  await until(() => held.length === 1, 'the last answer is being written')
  held[0]()
  t.same(await last, { id: 'big', name: 'x'.repeat(1000) }, 'with room again, it is read')
  t.equal(dropped.length, 3)
  t.equal(hits(kernel, '/v1/items/len') + hits(kernel, '/v1/items/chunked'), 7, 'none of the answers cut was retried')
  t.equal(client.breaker!.state, 'closed', 'and none was a breaker failure (threshold 1)')
})

t.test('the bytes of the answers being read and those cut are in /metrics', async t => {
  const { app } = await setup(t)
  const metrics = (await app.inject({ url: '/metrics' })).body
  t.match(metrics, /^mantle_kernel_answer_bytes 0$/m)
  t.match(metrics, /^mantle_kernel_answers_dropped_total 0$/m)
})
