import t from 'tap'
import { connect, type AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { createSigner } from 'fast-jwt'
import WebSocket from 'ws'
import { createTRPCUntypedClient, createWSClient, httpBatchLink, httpBatchStreamLink, httpLink, wsLink, TRPCClientError, type TRPCLink } from '@trpc/client'
import { TRPCError, type AnyTRPCRouter } from '@trpc/server'
import { MantleError } from '../../errors.js'
import { ProblemError, errorShape, trpcCodeOf } from '../../adapters/trpc/index.js'
import { isInternal } from '../../adapters/trpc/errors.js'
import { buildDemoApp, buildTestApp, startTestKernel, testManifest, bearer, token, json, SECRET, type TestKernel } from '../helper.js'

type Headers = Record<string, string>
interface Teardown { teardown: (fn: () => unknown) => void }

async function listen (app: FastifyInstance): Promise<string> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return `http://127.0.0.1:${(app.server.address() as AddressInfo).port}/trpc`
}

/** A tRPC client whose every HTTP request is recorded. */
function client (link: (opts: { url: string, headers: () => Headers, fetch: typeof fetch }) => TRPCLink<AnyTRPCRouter>, url: string, headers: Headers = bearer()) {
  const requests: string[] = []
  const recording: typeof fetch = async (input, init) => {
    requests.push(String(input))
    return await fetch(input, init)
  }
  return { trpc: createTRPCUntypedClient({ links: [link({ url, headers: () => headers, fetch: recording })] }), requests }
}

async function failure (promise: Promise<unknown>): Promise<TRPCClientError<AnyTRPCRouter>> {
  try {
    await promise
  } catch (err) {
    if (err instanceof TRPCClientError) return err as TRPCClientError<AnyTRPCRouter>
    throw err
  }
  throw new Error('the call succeeded')
}

const itemOutput = { type: 'object', required: ['id'], properties: { id: { type: 'string' }, n: { type: 'integer' } } }
const idInput = { type: 'object', required: ['id'], additionalProperties: false, properties: { id: { type: 'string' } } }

/** The gateway in front of a programmable test Kernel. */
async function withKernel (t: Teardown, kernelSettings: Record<string, unknown> = {}, env: Record<string, string | number | boolean> = {}): Promise<{ app: FastifyInstance, kernel: TestKernel }> {
  const kernel = await startTestKernel(t, {
    'GET /v1/items/i1': (_req, res) => json(res, 200, { id: 'i1', n: 1, secret: 'leak' }),
    'GET /v1/items/i2': (_req, res) => json(res, 200, { id: 'i2', n: 2 }),
    'POST /v1/items': (req, res) => json(res, 201, { id: 'new', n: JSON.parse(req.body).n })
  })
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: itemOutput },
    adminItem: { type: 'query', rest: 'GET /admin/items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: itemOutput, roles: ['admin'] },
    putItem: { type: 'mutation', rest: 'POST /items', kernel: 'POST /v1/items', input: { type: 'object', properties: { n: { type: 'integer' } } }, output: itemOutput },
    status: { type: 'query', rest: 'GET /status/:code', kernel: 'GET /v1/status/{code}', input: { type: 'object', required: ['code'], properties: { code: { type: 'string' } } }, output: itemOutput, timeoutMs: 300 }
  }, { url: kernel.url, retries: 0, ...kernelSettings })
  const app = await buildTestApp(t, env, { manifest, kernelUrl: kernel.url })
  return { app, kernel }
}

t.test('httpLink: queries and mutations through the pipeline, answers shaped by the output schema', async t => {
  const app = await buildDemoApp(t)
  const { trpc } = client(httpLink, await listen(app))
  const agent = await trpc.query('getAgent', { id: 'a1' }) as Record<string, unknown>
  t.match(agent, { id: 'a1', name: 'Research Assistant', model: 'mantle-large' })
  t.notOk('internalCostCents' in agent, 'an undeclared Kernel field is removed')
  t.notOk('ownerTenant' in agent)
  const list = await trpc.query('listAgents', { limit: 2 }) as unknown[]
  t.equal(list.length, 2)
  t.equal((await trpc.query('listAgents') as unknown[]).length, 3, 'no input is an empty input')
  const created = await trpc.mutation('createAgent', { name: 'From tRPC' }) as Record<string, unknown>
  t.match(created, { id: String, name: 'From tRPC', model: 'mantle-small' })
  const run = await trpc.mutation('runAgent', { id: 'a1', prompt: 'Summarise the report' }) as Record<string, unknown>
  t.match(run, { agentId: 'a1', status: 'queued', promptChars: 20 })
  t.notOk('prompt' in run)
})

t.test('errors carry the contract code, the REST status and the request id', async t => {
  const app = await buildDemoApp(t)
  const url = await listen(app)
  const { trpc } = client(httpLink, url)

  const missing = await failure(trpc.query('getAgent', { id: 'zz' }))
  t.equal(missing.data?.code, 'NOT_FOUND')
  t.equal(missing.data?.httpStatus, 404)
  t.equal(missing.shape?.code, -32004, 'the tRPC code is NOT_FOUND')
  t.match(missing.data?.requestId, /^[0-9a-f-]{36}$/)

  const invalid = await failure(trpc.query('listAgents', { limit: 1000 }))
  t.match(invalid.data, { code: 'VALIDATION_FAILED', httpStatus: 400 })
  t.equal(invalid.message, 'input.limit must be <= 100', 'the message names the field')
  t.equal(invalid.shape?.code, -32600)
  const wrongType = await failure(trpc.mutation('runAgent', { id: 'a1', prompt: 42 }))
  t.equal(wrongType.message, 'input.prompt must be string')
  const absent = await failure(trpc.mutation('runAgent', { id: 'a1' }))
  t.equal(absent.message, 'input.prompt is required')
  const extra = await failure(trpc.mutation('createAgent', { name: 'x', admin: true }))
  t.equal(extra.message, 'input.admin is not allowed')
  const notObject = await failure(trpc.query('getAgent', ['a1']))
  t.match(notObject.data, { code: 'VALIDATION_FAILED' })
  t.equal(notObject.message, 'The input must be a JSON object')

  const role = client(httpLink, url, bearer({ roles: [] })).trpc
  const forbidden = await failure(role.query('getRun', { id: 'r1' }))
  t.match(forbidden.data, { code: 'FORBIDDEN', httpStatus: 403 })
  t.equal(forbidden.shape?.code, -32003)
  t.equal(forbidden.message, 'getRun needs one of the roles: viewer')
  const zone = client(httpLink, url, bearer({ zone: 'public' })).trpc
  t.match((await failure(zone.query('getDocument', { id: 'd1' }))).data, { code: 'FORBIDDEN', httpStatus: 403 })

  for (const e of [missing, invalid, forbidden]) t.notOk('stack' in (e.data ?? {}), 'no stack trace')
})

t.test('identity: missing, malformed, forged and expired tokens are UNAUTHORIZED with data.code UNAUTHENTICATED', async t => {
  const app = await buildDemoApp(t)
  const url = await listen(app)
  const now = Math.floor(Date.now() / 1000)
  const expired = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 't', exp: now - 60 })
  const cases: Array<[string, Headers, RegExp]> = [
    ['no header', {}, /bearer token is required/],
    ['basic auth', { authorization: 'Basic dXNlcjpwYXNz' }, /must be "Bearer <token>"/],
    ['garbage', { authorization: 'Bearer not-a-jwt' }, /malformed/],
    ['forged', { authorization: `Bearer ${token({ secret: 'another-secret-of-sufficient-length-000000' })}` }, /signature is invalid/],
    ['expired', { authorization: `Bearer ${expired}` }, /expired/]
  ]
  for (const [name, headers, message] of cases) {
    const { trpc } = client(httpLink, url, headers)
    const err = await failure(trpc.query('listAgents'))
    t.equal(err.shape?.code, -32001, `${name}: tRPC UNAUTHORIZED`)
    t.match(err.data, { code: 'UNAUTHENTICATED', httpStatus: 401 }, name)
    t.match(err.message, message, name)
    t.equal(err.meta?.response instanceof Response ? err.meta.response.status : 0, 401, `${name}: HTTP 401`)
  }
})

t.test('with identity off every call is anonymous', async t => {
  const app = await buildDemoApp(t, { BFF_AUTH_ENABLED: false })
  const { trpc } = client(httpLink, await listen(app), {})
  t.match(await trpc.query('getAgent', { id: 'a1' }), { id: 'a1' })
})

t.test('httpBatchLink: one HTTP request, each call its own pipeline, result and error', async t => {
  const app = await buildDemoApp(t)
  const { trpc, requests } = client(httpBatchLink, await listen(app), bearer({ roles: ['editor'] }))
  const outcomes = await Promise.allSettled([
    trpc.query('getAgent', { id: 'a1' }),
    trpc.query('getAgent', { id: 'nope' }),
    trpc.query('listAgents', { limit: 0 }),
    trpc.query('getRun', { id: 'r1' }),
    trpc.query('listAgents', { limit: 1 })
  ])
  t.equal(requests.length, 1, 'the five calls went in one request')
  t.match(requests[0], /\/trpc\/getAgent,getAgent,listAgents,getRun,listAgents\?batch=1&input=/)
  t.match(outcomes[0], { status: 'fulfilled', value: { id: 'a1' } })
  const reason = (i: number): TRPCClientError<AnyTRPCRouter> => (outcomes[i] as PromiseRejectedResult).reason
  t.match(reason(1).data, { code: 'NOT_FOUND', httpStatus: 404 })
  t.match(reason(2).data, { code: 'VALIDATION_FAILED', httpStatus: 400 })
  t.equal(reason(2).message, 'input.limit must be >= 1')
  t.match(reason(3).data, { code: 'FORBIDDEN', httpStatus: 403 }, 'each call is authorized on its own')
  t.match(outcomes[4], { status: 'fulfilled', value: [{ id: 'a1' }] })

  const mutations = await Promise.all([trpc.mutation('createAgent', { name: 'one' }), trpc.mutation('createAgent', { name: 'two' })])
  t.equal(requests.length, 2)
  t.match(mutations, [{ name: 'one' }, { name: 'two' }])

  // More calls than the router's parameter limit (256 characters) would route still work.
  const many = await Promise.all(Array.from({ length: 40 }, () => trpc.query('listAgents', { limit: 1 })))
  t.equal(many.length, 40)
  t.equal(requests.length, 3)
})

// httpBatchLink and httpBatchStreamLink send every call started in one tick in one batch, with
// no bound unless given maxItems: README tells clients to set it to BFF_BATCH_MAX_CALLS.
t.test('httpBatchLink and httpBatchStreamLink with maxItems BFF_BATCH_MAX_CALLS (README): more calls at once than a batch takes are all answered', async t => {
  const app = await buildDemoApp(t, { BFF_BATCH_MAX_CALLS: 5 })
  const url = await listen(app)
  for (const [name, link] of [['httpBatchLink', httpBatchLink], ['httpBatchStreamLink', httpBatchStreamLink]] as const) {
    const calls = async (maxItems?: number): Promise<{ codes: unknown[], requests: string[] }> => {
      const { trpc, requests } = client(opts => link({ ...opts, ...(maxItems === undefined ? {} : { maxItems }) }), url)
      const outcomes = await Promise.allSettled(Array.from({ length: 6 }, () => trpc.query('listAgents', { limit: 1 })))
      return { codes: outcomes.map(o => o.status === 'fulfilled' ? 'ok' : (o.reason as TRPCClientError<AnyTRPCRouter>).data?.code), requests }
    }
    const unbounded = await calls()
    t.same(unbounded.codes, Array(6).fill('PAYLOAD_TOO_LARGE'), `${name} without maxItems: one batch of 6, refused whole`)
    const bounded = await calls(5)
    t.same(bounded.codes, Array(6).fill('ok'), `${name} with maxItems 5: every call answered`)
    t.equal(bounded.requests.length, 2, `${name}: in two batches`)
  }
})

t.test('httpBatchStreamLink answers each call as it completes', async t => {
  const app = await buildDemoApp(t)
  const { trpc } = client(httpBatchStreamLink, await listen(app))
  const [a, b] = await Promise.allSettled([trpc.query('getAgent', { id: 'a2' }), trpc.query('getAgent', { id: '!!' })])
  t.match(a, { status: 'fulfilled', value: { id: 'a2' } })
  t.match((b as PromiseRejectedResult).reason.data, { code: 'VALIDATION_FAILED' })
})

t.test('a batch: identical queries reach the Kernel once, each call has its own request id', async t => {
  const { app, kernel } = await withKernel(t)
  const url = await listen(app)
  const { trpc } = client(httpBatchLink, url, { ...bearer(), 'x-request-id': 'batch-42' })
  const outcomes = await Promise.allSettled([
    trpc.query('getItem', { id: 'i1' }),
    trpc.query('getItem', { id: 'i1' }),
    trpc.query('getItem', { id: 'i2' }),
    trpc.query('adminItem', { id: 'i1' }),
    trpc.query('getItem', { id: 'i1' })
  ])
  t.match(outcomes.map(o => o.status), ['fulfilled', 'fulfilled', 'fulfilled', 'rejected', 'fulfilled'])
  t.same((outcomes[0] as PromiseFulfilledResult<unknown>).value, { id: 'i1', n: 1 }, 'undeclared fields removed')
  t.match((outcomes[3] as PromiseRejectedResult).reason.data, { code: 'FORBIDDEN', requestId: 'batch-42.3' })
  const urls = kernel.requests.map(r => r.url).sort()
  t.same(urls, ['/v1/items/i1', '/v1/items/i2'], 'i1 asked three times reached the Kernel once')
  const ids = kernel.requests.map(r => r.headers['x-request-id']).sort()
  t.same(ids, ['batch-42.0', 'batch-42.2'], 'calls carry <request id>.<index>')

  // The memo lives for one request only: a second batch asks the Kernel again.
  await Promise.all([trpc.query('getItem', { id: 'i1' }), trpc.query('getItem', { id: 'i1' })])
  t.equal(kernel.requests.length, 3)

  // A call alone keeps the request id as it is.
  const single = client(httpLink, url, { ...bearer(), 'x-request-id': 'one-call' }).trpc
  await single.query('getItem', { id: 'i2' })
  t.equal(kernel.requests[3].headers['x-request-id'], 'one-call')
})

t.test('mutations: Idempotency-Key (per call in a batch) and traceparent reach the Kernel', async t => {
  const { app, kernel } = await withKernel(t)
  const url = await listen(app)
  const trace = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
  const single = client(httpLink, url, { ...bearer(), 'idempotency-key': 'key-1', traceparent: trace }).trpc
  t.same(await single.mutation('putItem', { n: 7 }), { id: 'new', n: 7 })
  t.equal(kernel.requests[0].headers['idempotency-key'], 'key-1')
  t.match(kernel.requests[0].headers.traceparent, /^00-0af7651916cd43dd8448eb211c80319c-[0-9a-f]{16}-01$/)
  const batch = client(httpBatchLink, url, { ...bearer(), 'idempotency-key': 'key-2' }).trpc
  await Promise.all([batch.mutation('putItem', { n: 1 }), batch.mutation('putItem', { n: 2 })])
  t.same(kernel.requests.slice(1).map(r => r.headers['idempotency-key']).sort(), ['key-2 0', 'key-2 1'])
  const badKey = await failure(client(httpLink, url, { ...bearer(), 'idempotency-key': 'has space' }).trpc.mutation('putItem', { n: 1 }))
  t.match(badKey.data, { code: 'VALIDATION_FAILED', httpStatus: 400 })
  t.equal(kernel.requests.length, 3, 'refused before the Kernel')
})

t.test('Kernel failures map to tRPC codes with the REST status; Retry-After reaches the client', async t => {
  const { app, kernel } = await withKernel(t, { circuitBreaker: { threshold: 2, resetTimeoutMs: 60_000 } })
  kernel.on('GET /v1/status/409', (_req, res) => json(res, 409, { message: 'locked' }))
  kernel.on('GET /v1/status/422', (_req, res) => json(res, 422, { message: 'cannot' }))
  kernel.on('GET /v1/status/slow', (_req, res) => { setTimeout(() => json(res, 200, { id: 'late' }), 600).unref() })
  kernel.on('GET /v1/status/500', (_req, res) => json(res, 500, { message: 'boom' }))
  const { trpc } = client(httpLink, await listen(app))
  const expect: Array<[string, string, number, number]> = [
    ['409', 'KERNEL_REJECTED', 409, -32009],
    ['422', 'KERNEL_REJECTED', 422, -32022],
    ['404', 'NOT_FOUND', 404, -32004]
  ]
  for (const [code, contract, status, rpc] of expect) {
    const err = await failure(trpc.query('status', { code }))
    t.match(err.data, { code: contract, httpStatus: status }, code)
    t.equal(err.shape?.code, rpc, `${code}: tRPC code`)
    t.equal((err.meta?.response as Response).status, status)
  }
  const slow = await failure(trpc.query('status', { code: 'slow' }))
  t.match(slow.data, { code: 'KERNEL_TIMEOUT', httpStatus: 504 })
  const broken = await failure(trpc.query('status', { code: '500' }))
  t.match(broken.data, { code: 'KERNEL_ERROR', httpStatus: 502 })
  t.notMatch(broken.message, /boom/, 'no Kernel internals')
  // Two failures (the timeout, the 500) opened the breaker: fail fast, with Retry-After on the HTTP response.
  const open = await failure(trpc.query('getItem', { id: 'i1' }))
  t.match(open.data, { code: 'KERNEL_UNAVAILABLE', httpStatus: 503 })
  const response = open.meta?.response as Response
  t.equal(response.status, 503)
  t.match(response.headers.get('retry-after'), /^\d+$/)
})

t.test('raw HTTP: the ugly cases are 4xx tRPC errors with contract codes, never 5xx', async t => {
  const { app, kernel } = await withKernel(t, {}, { BFF_BODY_LIMIT: 1024, BFF_BATCH_MAX_CALLS: 5 })
  const h = bearer()
  const input = (v: unknown): string => encodeURIComponent(JSON.stringify(v))
  const call = async (opts: { method?: 'GET' | 'POST' | 'PUT' | 'HEAD', url: string, headers?: Headers, payload?: string }) => {
    const res = await app.inject({ method: opts.method ?? 'GET', url: opts.url, headers: opts.headers ?? h, ...(opts.payload === undefined ? {} : { payload: opts.payload }) })
    return { status: res.statusCode, body: res.body === '' ? null : res.json(), headers: res.headers }
  }
  const jsonHeaders = { ...h, 'content-type': 'application/json' }
  const cases: Array<[string, Parameters<typeof call>[0], number, string, RegExp?]> = [
    ['malformed input JSON', { url: '/trpc/getItem?input=%7B%22id%22' }, 400, 'VALIDATION_FAILED', /not valid JSON/],
    ['malformed body JSON', { method: 'POST', url: '/trpc/putItem', headers: jsonHeaders, payload: '{"n":' }, 400, 'VALIDATION_FAILED', /not valid JSON/],
    ['malformed batch input', { url: '/trpc/getItem,getItem?batch=1&input=%5B' }, 400, 'VALIDATION_FAILED', /not valid JSON/],
    ['batch input not an object', { url: `/trpc/getItem?batch=1&input=${input(5)}` }, 400, 'VALIDATION_FAILED', /"input" needs to be an object/],
    ['input a string', { url: `/trpc/getItem?input=${input('i1')}` }, 400, 'VALIDATION_FAILED', /input must be a JSON object/],
    ['validation names the field', { url: `/trpc/getItem?input=${input({ id: 1 })}` }, 400, 'VALIDATION_FAILED', /^input\.id must be string$/],
    ['unknown procedure', { url: '/trpc/dropTables' }, 404, 'NOT_FOUND', /dropTables/],
    ['nested path', { url: '/trpc/a/b' }, 404, 'NOT_FOUND'],
    ['no procedure', { url: '/trpc' }, 404, 'NOT_FOUND', /\/trpc\/<name>/],
    ['GET on a mutation', { url: '/trpc/putItem' }, 405, 'BAD_REQUEST', /Unsupported GET-request to mutation/],
    // A query over POST (methodOverride) runs as its GET: this input lacks its id.
    ['POST on a query', { method: 'POST', url: '/trpc/getItem', headers: jsonHeaders, payload: '{}' }, 400, 'VALIDATION_FAILED', /^input\.id is required$/],
    ['mixed batch', { url: '/trpc/getItem,putItem?batch=1' }, 400, 'BAD_REQUEST', /Cannot mix procedure types/],
    // httpBatchStreamLink's header on a call that is no batch: tRPC answered text/plain.
    ['a stream request not batched', { url: `/trpc/getItem?input=${input({ id: 'i1' })}`, headers: { ...h, 'trpc-accept': 'application/jsonl' } }, 400, 'BAD_REQUEST', /must be batched/],
    ['oversized batch', { url: '/trpc/getItem,getItem,getItem,getItem,getItem,getItem?batch=1' }, 413, 'PAYLOAD_TOO_LARGE', /at most 5 calls/],
    // tRPC decodes the path once more before it splits it at commas: %252C is a comma to it.
    ['oversized batch, commas encoded twice', { url: '/trpc/' + Array(6).fill('getItem').join('%252C') + '?batch=1' }, 413, 'PAYLOAD_TOO_LARGE', /at most 5 calls/],
    ['oversized batch, commas encoded once', { url: '/trpc/' + Array(6).fill('getItem').join('%2C') + '?batch=1' }, 413, 'PAYLOAD_TOO_LARGE', /at most 5 calls/],
    ['oversized body', { method: 'POST', url: '/trpc/putItem', headers: jsonHeaders, payload: JSON.stringify({ n: 1, pad: 'x'.repeat(2000) }) }, 413, 'PAYLOAD_TOO_LARGE'],
    ['not JSON', { method: 'POST', url: '/trpc/putItem', headers: { ...h, 'content-type': 'text/plain' }, payload: 'n=1' }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    ['multipart', { method: 'POST', url: '/trpc/putItem', headers: { ...h, 'content-type': 'multipart/form-data; boundary=x' }, payload: '--x--' }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    ['no content type', { method: 'POST', url: '/trpc/putItem', headers: h }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    // tRPC read the first of two inputs (URLSearchParams.get) and dropped the other unseen, where
    // REST refuses a repeated scalar field and GraphQL a repeated query or variables.
    ['input repeated', { url: `/trpc/getItem?input=${input({ id: 'i1' })}&input=${input({ id: 'i2' })}` }, 400, 'VALIDATION_FAILED', /^The query string names `input` more than once/],
    ['a batch, input repeated', { url: `/trpc/getItem,getItem?batch=1&input=${input({ 0: { id: 'i1' }, 1: { id: 'i1' } })}&input=${input({ 0: { id: 'i2' }, 1: { id: 'i2' } })}` }, 400, 'VALIDATION_FAILED', /^The query string names `input` more than once/],
    // A POST's input is its body (a query's too, methodOverride): one in its query string was
    // dropped unread, and the mutation ran without it, as REST refuses a POST whose query string
    // names a field of its input.
    ['a POST with its input in the query string', { method: 'POST', url: `/trpc/putItem?input=${input({ n: 1 })}`, headers: jsonHeaders }, 400, 'VALIDATION_FAILED', /^A POST takes its input from its body, not the query string/],
    ['a POST batch with its input in the query string', { method: 'POST', url: `/trpc/putItem,putItem?batch=1&input=${input({ 0: { n: 1 }, 1: { n: 2 } })}`, headers: jsonHeaders, payload: '{}' }, 400, 'VALIDATION_FAILED', /^A POST takes its input from its body, not the query string/],
    // A key of a batch's input that is no index of its calls was dropped unread, the call it was
    // meant for run without it (tRPC reads inputs[0], inputs[1], ...), where the REST batch refuses
    // a key it does not take.
    ['a batch input naming a third call', { url: `/trpc/getItem,getItem?batch=1&input=${input({ 0: { id: 'i1' }, 1: { id: 'i1' }, 2: { id: 'i2' } })}` }, 400, 'VALIDATION_FAILED', /^The batch's input names no call of it: "2"/],
    ['a batch input keyed 00 and 01', { url: `/trpc/getItem,getItem?batch=1&input=${input({ '00': { id: 'i1' }, '01': { id: 'i2' } })}` }, 400, 'VALIDATION_FAILED', /^The batch's input names no call of it: "00"/],
    ['a batch body naming no call', { method: 'POST', url: '/trpc/putItem,putItem?batch=1', headers: jsonHeaders, payload: '{"0":{"n":1},"x":{"n":2}}' }, 400, 'VALIDATION_FAILED', /^The batch's input names no call of it: "x"/],
    ['bad connectionParams', { url: '/trpc/getItem?connectionParams=%7B' }, 400, 'VALIDATION_FAILED'],
    ['connectionParams not strings', { url: `/trpc/getItem?connectionParams=${input({ token: 1 })}` }, 400, 'VALIDATION_FAILED'],
    ['bad Host', { url: '/trpc/getItem', headers: { ...h, host: 'a b' } }, 400, 'BAD_REQUEST'],
    // tRPC threw making a URL with credentials of it: a 500, logged with the query string.
    ['a Host with credentials', { url: `/trpc/getItem?input=${input({ id: 'i1' })}`, headers: { ...h, host: 'a@b' } }, 400, 'BAD_REQUEST', /Host/],
    ['a batch, Host with credentials', { url: `/trpc/getItem,getItem?batch=1&input=${input({ 0: { id: 'i1' } })}`, headers: { ...h, host: 'u:p@x' } }, 400, 'BAD_REQUEST', /Host/],
    ['a mutation, Host with credentials', { method: 'POST', url: '/trpc/putItem', headers: { ...jsonHeaders, host: 'a@b' }, payload: '{"n":1}' }, 400, 'BAD_REQUEST', /Host/],
    ['a Host with a path', { url: `/trpc/getItem?input=${input({ id: 'i1' })}`, headers: { ...h, host: 'a/b' } }, 400, 'BAD_REQUEST', /Host/],
    ['role', { url: `/trpc/adminItem?input=${input({ id: 'i1' })}` }, 403, 'FORBIDDEN', /admin/],
    ['no token', { url: `/trpc/getItem?input=${input({ id: 'i1' })}`, headers: {} }, 401, 'UNAUTHENTICATED'],
    ['connectionParams without a token', { url: `/trpc/getItem?input=${input({ id: 'i1' })}&connectionParams=${input({ lang: 'en' })}`, headers: {} }, 401, 'UNAUTHENTICATED']
  ]
  for (const [name, request, status, code, message] of cases) {
    const res = await call(request)
    t.equal(res.status, status, `${name}: HTTP ${status}`)
    t.match(res.headers['content-type'], /^application\/json/, `${name}: JSON`)
    // A batch answers one error per call; a request refused whole, one error.
    const calls = Array.isArray(res.body) ? res.body : [res.body]
    for (const body of calls) {
      t.match(body, { error: { code: Number, data: { code, httpStatus: status, requestId: String } } }, name)
      if (message !== undefined) t.match(body.error.message, message, name)
      t.notOk('stack' in body.error.data, `${name}: no stack`)
    }
  }
  t.equal(kernel.requests.length, 0, 'none of them reached the Kernel')

  // The token also comes from connectionParams or ?access_token= (EventSource sets no headers).
  const viaParams = await call({ url: `/trpc/getItem?input=${input({ id: 'i2' })}&connectionParams=${input({ token: token() })}`, headers: {} })
  t.equal(viaParams.status, 200)
  const viaQuery = await call({ url: `/trpc/getItem?input=${input({ id: 'i2' })}&access_token=${token()}`, headers: {} })
  t.same(viaQuery.body, { result: { data: { id: 'i2', n: 2 } } })
  // An empty Authorization header is none, as the guard reads it: it hid the query's token (401).
  const besideEmpty = await call({ url: `/trpc/getItem?input=${input({ id: 'i2' })}&access_token=${token()}`, headers: { authorization: '' } })
  t.same(besideEmpty.body, { result: { data: { id: 'i2', n: 2 } } }, 'a token beside an empty header')
  // Host names of every kind a deployment has: a compose service's underscore, an IPv6
  // literal, upper case, a trailing dot, an IDN, and one in Punycode.
  for (const host of ['my_service:8080', '[::1]:3000', 'API.Example.COM', 'example.com.', 'bücher.example', 'xn--bcher-kva.example']) {
    const named = await call({ url: `/trpc/getItem?input=${input({ id: 'i2' })}`, headers: { ...h, host } })
    t.equal(named.status, 200, `Host ${host}`)
  }
  const put = await call({ method: 'PUT', url: '/trpc/putItem', headers: jsonHeaders, payload: '{}' })
  // Another method is a 405 naming those the procedures are served with (a 404 before: the
  // path exists).
  t.equal(put.status, 405, 'other methods are not served')
  t.equal(put.headers.allow, 'GET, HEAD, POST')
})

t.test('no stack traces outside production either', async t => {
  const app = await buildDemoApp(t, { NODE_ENV: 'development' })
  const res = await app.inject({ method: 'GET', url: '/trpc/getAgent?input=%7B%7D', headers: bearer() })
  t.equal(res.statusCode, 400)
  t.same(Object.keys(res.json().error.data).sort(), ['code', 'httpStatus', 'path', 'requestId'])
  t.notMatch(res.body, /at .*\.(ts|js):\d+/)
})

t.test('error mapping: statuses to tRPC codes, tRPC\'s own codes to contract codes', async t => {
  t.equal(trpcCodeOf(400), 'BAD_REQUEST')
  t.equal(trpcCodeOf(418), 'BAD_REQUEST', 'another 4xx')
  t.equal(trpcCodeOf(429), 'TOO_MANY_REQUESTS')
  t.equal(trpcCodeOf(504), 'GATEWAY_TIMEOUT')
  t.equal(trpcCodeOf(507), 'INTERNAL_SERVER_ERROR', 'another 5xx')
  const cases: Array<[TRPCError, string, number, string | RegExp]> = [
    [new TRPCError({ code: 'UNAUTHORIZED', message: 'who' }), 'UNAUTHENTICATED', 401, 'who'],
    [new TRPCError({ code: 'FORBIDDEN', message: 'no' }), 'FORBIDDEN', 403, 'no'],
    [new TRPCError({ code: 'PAYLOAD_TOO_LARGE' }), 'PAYLOAD_TOO_LARGE', 413, 'The request body is larger than the limit'],
    [new TRPCError({ code: 'UNSUPPORTED_MEDIA_TYPE', message: 'Missing content-type header' }), 'UNSUPPORTED_MEDIA_TYPE', 415, 'Missing content-type header'],
    [new TRPCError({ code: 'TOO_MANY_REQUESTS', message: 'slow down' }), 'RATE_LIMITED', 429, 'slow down'],
    [new TRPCError({ code: 'PARSE_ERROR' }), 'VALIDATION_FAILED', 400, 'The message could not be parsed'],
    [new TRPCError({ code: 'CLIENT_CLOSED_REQUEST', message: 'gone' }), 'BAD_REQUEST', 499, 'gone'],
    [new TRPCError({ code: 'INTERNAL_SERVER_ERROR', message: 'secret internals' }), 'INTERNAL', 500, 'The gateway could not complete the call'],
    [new TRPCError({ code: 'INTERNAL_SERVER_ERROR', cause: new MantleError('OVERLOADED', 'busy') }), 'OVERLOADED', 503, 'busy']
  ]
  for (const [error, code, status, message] of cases) {
    const shape = errorShape(error, 'rid-1', 'getAgent')
    t.match(shape, { message, data: { code, httpStatus: status, requestId: 'rid-1', path: 'getAgent' } }, code)
    t.equal(isInternal(error), code === 'INTERNAL')
  }
  t.match(errorShape(new TRPCError({ code: 'NOT_FOUND' }), undefined).data.requestId, /^[0-9a-f-]{36}$/, 'a request id even without a request')
  const problem = ProblemError.from(new MantleError('INTERNAL', 'bug'), 'rid-2')
  t.ok(isInternal(problem))
  t.equal(ProblemError.from(problem, 'other'), problem, 'a ProblemError stays as it is')
  t.equal(problem.stack?.includes('\n    at '), false, 'no stack captured')
})

t.test('HTTP batch: as many calls as BFF_BATCH_MAX_CALLS allows, beyond the 64 calls a WebSocket connection runs at once', async t => {
  const { app } = await withKernel(t, {}, { BFF_BATCH_MAX_CALLS: 100 })
  const n = 100
  const input = encodeURIComponent(JSON.stringify(Object.fromEntries(Array.from({ length: n }, (_, i) => [i, { id: i % 2 === 0 ? 'i1' : 'i2' }]))))
  const res = await app.inject({ url: `/trpc/${Array(n).fill('getItem').join(',')}?batch=1&input=${input}`, headers: bearer() })
  t.equal(res.statusCode, 200, 'before, the calls past the 64th were refused OVERLOADED (207)')
  t.equal((res.json() as Array<{ result?: unknown }>).filter(r => r.result !== undefined).length, n)
})

t.test('a request target in absolute form with credentials is refused 400, never a 500 that logs the query', async t => {
  // tRPC makes its URL of the target when it is absolute: `http://u:p@x/...` made it throw, a
  // 500 logged at error with the whole query string, access_token included.
  const { app } = await withKernel(t)
  const base = await listen(app)
  const { port } = new URL(base)
  const input = encodeURIComponent(JSON.stringify({ 0: { id: 'i1' }, 1: { id: 'i1' } }))
  const raw = async (target: string): Promise<string> => await new Promise((resolve, reject) => {
    const socket = connect({ port: Number(port), host: '127.0.0.1' })
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString('latin1') })
    socket.on('error', reject)
    socket.on('end', () => { resolve(data) })
    socket.on('connect', () => { socket.write(`GET ${target} HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer().authorization}\r\nConnection: close\r\n\r\n`) })
  })
  const refused = await raw(`http://u:p@x/trpc/getItem,getItem?batch=1&input=${input}&access_token=secret-token`)
  t.match(refused, /^HTTP\/1\.1 400 /)
  t.match(refused, /"code":"BAD_REQUEST"/)
  t.match(await raw(`http://x/trpc/getItem,getItem?batch=1&input=${input}`), /^HTTP\/1\.1 200 /, 'absolute form without credentials: served')
})

// tRPC answers every HEAD 204 (resolveResponse): an unknown procedure, a call without a token,
// all were "No Content", where REST and GraphQL answer HEAD as their GET (RFC 9110 §9.3.2).
t.test('HEAD is answered as GET would be: its status and header fields, no body', async t => {
  const { app, kernel } = await withKernel(t)
  const base = (await listen(app)).replace(/\/trpc$/, '')
  const input = (v: unknown): string => encodeURIComponent(JSON.stringify(v))
  // Fields that differ between any two requests, whatever their method, and the framing of a
  // streamed body (chunked), which Node leaves off an answer that has none (RFC 9112 §6.1 allows it).
  const own = new Set(['date', 'x-request-id', 'keep-alive', 'connection', 'transfer-encoding'])
  const fields = (res: Response): Record<string, string> => Object.fromEntries([...res.headers].filter(([name]) => !own.has(name)))
  const cases: Array<[string, string, Headers, number]> = [
    ['an unknown procedure', '/trpc/doesNotExist', bearer(), 404],
    ['a query without a token', `/trpc/getItem?input=${input({ id: 'i1' })}`, {}, 401],
    ['a query', `/trpc/getItem?input=${input({ id: 'i1' })}`, bearer(), 200],
    ['a query, compressed', `/trpc/getItem?input=${input({ id: 'i1' })}`, { ...bearer(), 'accept-encoding': 'gzip' }, 200],
    ['input that is not JSON', '/trpc/getItem?input=%7B', bearer(), 400],
    ['a batch', `/trpc/getItem,getItem?batch=1&input=${input({ 0: { id: 'i1' }, 1: { id: 'i2' } })}`, bearer(), 200],
    ['a batch, compressed', `/trpc/getItem,getItem?batch=1&input=${input({ 0: { id: 'i1' }, 1: { id: 'i2' } })}`, { ...bearer(), 'accept-encoding': 'gzip' }, 200],
    ['a mutation', '/trpc/putItem', bearer(), 405]
  ]
  for (const [name, path, headers, status] of cases) {
    const get = await fetch(base + path, { headers })
    await get.arrayBuffer()
    const head = await fetch(base + path, { method: 'HEAD', headers })
    t.equal(head.status, status, `${name}: HEAD ${status}`)
    t.equal(get.status, status, `${name}: GET ${status}`)
    t.same(fields(head), fields(get), `${name}: the header fields GET has`)
    t.equal(await head.text(), '', `${name}: no body`)
  }
  t.equal(kernel.requests.length, 12, 'a HEAD query runs as its GET does (REST\'s HEAD too): 2 queries and 2 batches of 2, each twice')
})

t.test('HEAD on a subscription: the SSE response\'s status and header fields, and no subscription left open', async t => {
  const app = await buildDemoApp(t)
  const base = (await listen(app)).replace(/\/trpc$/, '')
  const headers = { ...bearer({ roles: ['viewer'] }), accept: 'text/event-stream' }
  const controller = new AbortController()
  const get = await fetch(`${base}/trpc/runUpdated`, { headers, signal: controller.signal })
  controller.abort()
  const head = await fetch(`${base}/trpc/runUpdated`, { method: 'HEAD', headers })
  t.equal(head.status, 200)
  t.equal(get.status, 200)
  t.equal(head.headers.get('content-type'), get.headers.get('content-type'))
  t.match(head.headers.get('content-type'), /^text\/event-stream/)
  t.equal(await head.text(), '', 'no body')
  for (let i = 0; i < 200 && app.events.bus.subscriptions > 0; i++) await new Promise(resolve => setTimeout(resolve, 10))
  t.equal(app.events.bus.subscriptions, 0, 'nothing is held for the HEAD (nor the aborted GET)')
})

// tRPC's remedy for a query input too long for a URL is `methodOverride: 'POST'` (httpLink,
// httpBatchLink): refused 405 before, and past Node's 16 KB head limit such a query could not
// be sent over tRPC HTTP at all (431), while batch, GraphQL and /ws took it.
t.test('methodOverride: \'POST\': a query over POST is answered as over GET, a long input too', async t => {
  const kernel = await startTestKernel(t, {
    'POST /v1/find': (req, res) => json(res, 200, { id: 'found', n: (JSON.parse(req.body) as { q: string }).q.length })
  })
  const manifest = testManifest({
    find: { type: 'query', rest: 'POST /find', kernel: 'POST /v1/find', input: { type: 'object', required: ['q'], properties: { q: { type: 'string' } } }, output: itemOutput, cache: { ttlSeconds: 60 } }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const url = await listen(app)
  const long = 'x'.repeat(20_000)
  const single = client(opts => httpLink({ ...opts, methodOverride: 'POST' }), url)
  t.same(await single.trpc.query('find', { q: long }), { id: 'found', n: 20_000 }, 'httpLink: a 20 KB input')
  const batch = client(opts => httpBatchLink({ ...opts, methodOverride: 'POST', maxURLLength: 14_000 }), url)
  t.same(await Promise.all([batch.trpc.query('find', { q: long + 'y' }), batch.trpc.query('find', { q: 'short' })]), [{ id: 'found', n: 20_001 }, { id: 'found', n: 5 }], 'httpBatchLink: one POST')
  t.equal(batch.requests.length, 1)
  t.equal(kernel.requests.length, 3)

  // The same call over GET and POST: one cache entry, the same answer and header fields; an
  // Idempotency-Key is ignored, as on every query.
  const own = new Set(['date', 'x-request-id', 'keep-alive', 'connection', 'content-length', 'x-cache'])
  const fields = (res: Response): Record<string, string> => Object.fromEntries([...res.headers].filter(([name]) => !own.has(name)))
  const input = JSON.stringify({ q: 'same' })
  const get = await fetch(`${url}/find?input=${encodeURIComponent(input)}`, { headers: bearer() })
  const post = await fetch(`${url}/find`, { method: 'POST', headers: { ...bearer(), 'content-type': 'application/json', 'idempotency-key': 'two words' }, body: input })
  t.equal(post.status, 200)
  t.equal(await post.text(), await get.text(), 'the same answer')
  t.same([get.headers.get('x-cache'), post.headers.get('x-cache')], ['miss', 'hit'], 'the POST is served by the GET\'s cache entry')
  t.same(fields(post), fields(get), 'the header fields of the GET')
  t.equal(kernel.requests.length, 4)
  t.notOk(kernel.requests[3].headers['idempotency-key'])
  const batchGet = await fetch(`${url}/find,find?batch=1&input=${encodeURIComponent(JSON.stringify({ 0: { q: 'same' }, 1: { q: 'b' } }))}`, { headers: bearer() })
  const batchPost = await fetch(`${url}/find,find?batch=1`, { method: 'POST', headers: { ...bearer(), 'content-type': 'application/json' }, body: JSON.stringify({ 0: { q: 'same' }, 1: { q: 'b' } }) })
  t.equal(await batchPost.text(), await batchGet.text(), 'a batch: the same answers')
  t.same([batchGet.headers.get('x-cache'), batchPost.headers.get('x-cache')], ['hit, miss', 'hit, hit'])
  t.equal(kernel.requests.length, 5)
})

// wsLink sends every call started in one tick in one message, and has no option to cap it: the
// WebSocket held such a message to BFF_BATCH_MAX_CALLS (maxBatchSize), and a page that started
// 51 queries at once had all of them refused PAYLOAD_TOO_LARGE.
t.test('wsLink: a tick\'s calls in one message, past BFF_BATCH_MAX_CALLS; past 64 in flight each refused OVERLOADED', async t => {
  const { app } = await withKernel(t)
  const port = new URL(await listen(app)).port
  const socket = createWSClient({
    url: `ws://127.0.0.1:${port}/trpc`,
    WebSocket: WebSocket as unknown as typeof globalThis.WebSocket,
    connectionParams: { token: token() },
    retryDelayMs: () => 60_000
  })
  t.teardown(async () => { await socket.close() })
  const trpc = createTRPCUntypedClient({ links: [wsLink({ client: socket })] })
  const page = async (n: number) => await Promise.allSettled(Array.from({ length: n }, async (_, i) => await trpc.query('getItem', { id: i % 2 === 0 ? 'i1' : 'i2' })))
  const sixty = await page(60)
  t.same(sixty.filter(o => o.status === 'rejected').map(o => (o as PromiseRejectedResult).reason.data?.code), [], '60 calls at once, more than BFF_BATCH_MAX_CALLS (50): all answered')
  t.match(sixty[59], { status: 'fulfilled', value: { id: 'i2', n: 2 } })
  const hundred = await page(100)
  t.equal(hundred.filter(o => o.status === 'fulfilled').length, 64, '100 at once: the 64 a connection runs at once are answered')
  const refused = hundred.filter(o => o.status === 'rejected').map(o => (o as PromiseRejectedResult).reason.data)
  t.equal(refused.length, 36)
  t.ok(refused.every(d => d?.code === 'OVERLOADED' && d.retryAfter === 1), 'the others are refused OVERLOADED, each with retryAfter')
})
