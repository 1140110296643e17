import t from 'tap'
import { createSigner } from 'fast-jwt'
import { getIntrospectionQuery, GraphQLError } from 'graphql'
import { setTimeout as sleep } from 'node:timers/promises'
import type { FastifyInstance } from 'fastify'
import { errorFormatter } from '../../../adapters/graphql/errors.js'
import { buildDemoApp, buildTestApp, startTestKernel, testManifest, closedPort, json, bearer, token, SECRET, type TestKernel } from '../../helper.js'

// The GraphQL face over HTTP, with fetch against a listening gateway: root fields as calls
// through the one pipeline, per-field errors with the contract codes, per-request memo,
// limits, and the ugly requests.

type Env = Record<string, string | number | boolean | undefined>
const ONLY_GRAPHQL: Env = { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false }

interface Gql { status: number, body: any, headers: Headers }

async function listen (app: FastifyInstance): Promise<(body: unknown, headers?: Record<string, string>, init?: RequestInit) => Promise<Gql>> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  return async (body, headers = bearer(), init = {}) => {
    const res = await fetch(`http://127.0.0.1:${port}/graphql`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body: typeof body === 'string' ? body : JSON.stringify(body),
      ...init
    })
    const text = await res.text()
    let parsed: unknown
    try {
      parsed = JSON.parse(text)
    } catch {
      parsed = text
    }
    return { status: res.status, body: parsed, headers: res.headers }
  }
}

async function demo (t: Parameters<typeof buildDemoApp>[0], env: Env = {}): Promise<{ app: FastifyInstance, gql: Awaited<ReturnType<typeof listen>>, base: string }> {
  const app = await buildDemoApp(t, { ...ONLY_GRAPHQL, ...env })
  const gql = await listen(app)
  const { port } = app.server.address() as { port: number }
  return { app, gql, base: `http://127.0.0.1:${port}` }
}

t.test('several root fields in one document: each its own call, result and error', async t => {
  const { gql } = await demo(t)
  const res = await gql({
    query: `query Mixed($id: String!) {
      agent: getAgent(id: $id) { id name model description createdAt }
      missing: getAgent(id: "nope") { id }
      listAgents(limit: 2) { id }
      headers: kernelHeaders
      getDocument(id: "d1") { id }
    }`,
    variables: { id: 'a1' },
    operationName: 'Mixed'
  }, bearer({ roles: ['system'], zone: 'internal' }))
  t.equal(res.status, 200)
  t.match(res.headers.get('content-type'), /^application\/json/)
  const { data, errors } = res.body
  t.same(Object.keys(data), ['agent', 'missing', 'listAgents', 'headers', 'getDocument'])
  t.match(data.agent, { id: 'a1', name: 'Research Assistant', model: 'mantle-large', description: String, createdAt: String })
  t.same(data.listAgents, [{ id: 'a1' }, { id: 'a2' }])
  t.equal(data.missing, null)
  t.equal(data.getDocument, null)
  // kernelHeaders is JSON (its keys are not GraphQL names): exactly the op's shaped output.
  t.same(Object.keys(data.headers), ['x-request-id', 'x-tenant-id', 'x-user-id', 'x-user-roles', 'traceparent', 'idempotency-key'])
  t.match(data.headers, { 'x-tenant-id': 't1', 'x-user-id': 'u1', 'x-user-roles': 'system', 'idempotency-key': null })
  const requestId = res.headers.get('x-request-id')
  t.equal(data.headers['x-request-id'], `${requestId}.3`, 'the fourth root field is call n=3 of the request')
  t.equal(errors.length, 2)
  const byPath = Object.fromEntries(errors.map((e: any) => [e.path[0], e]))
  t.match(byPath.missing, { message: 'agent nope not found', extensions: { code: 'NOT_FOUND', status: 404, requestId: `${requestId}.1` } })
  t.match(byPath.getDocument, { message: 'getDocument is in the restricted zone, beyond the caller\'s', extensions: { code: 'FORBIDDEN', status: 403, requestId: `${requestId}.4` } })
})

t.test('answers carry only what the output schema declares, on the first call and once JIT-compiled', async t => {
  const { gql } = await demo(t)
  const query = '{ getAgent(id: "a2") { id name } listAgents { id model } }'
  const first = await gql({ query })
  t.same(first.body.extensions, { cache: { getAgent: 'miss', listAgents: 'miss' } })
  for (let i = 0; i < 3; i++) {
    const again = await gql({ query })
    // The same answer; only the cache's outcome changes (extensions).
    t.same({ ...again.body, extensions: undefined }, { ...first.body, extensions: undefined }, `run ${i + 2} (compiled)`)
    t.same(again.body.extensions, { cache: { getAgent: 'hit', listAgents: 'hit' } })
  }
  t.same(first.body.data.getAgent, { id: 'a2', name: 'Code Reviewer' })
  t.equal(first.body.errors, undefined)
  // Undeclared Kernel fields cannot even be asked for.
  const leak = await gql({ query: '{ getAgent(id: "a1") { id internalCostCents } }' })
  t.equal(leak.status, 400)
  t.match(leak.body.errors[0], { message: 'Cannot query field "internalCostCents" on type "Agent".', extensions: { code: 'VALIDATION_FAILED', status: 400 } })
})

t.test('mutations run in order, each its own call; GET runs queries only', async t => {
  const { gql, base } = await demo(t)
  const res = await gql({
    query: `mutation {
      created: createAgent(name: "Writer", description: "Writes") { id name model description }
      renamed: updateAgent(id: "a2", name: "Renamed") { id name }
      run: runAgent(id: "a1", prompt: "Summarise the report", temperature: 0.2) { agentId status temperature promptChars output }
      denied: runAgent(id: "a1", prompt: "") { id }
    }`
  })
  t.equal(res.status, 200)
  t.match(res.body.data.created, { id: String, name: 'Writer', model: 'mantle-small', description: 'Writes' })
  t.same(res.body.data.renamed, { id: 'a2', name: 'Renamed' })
  t.same(res.body.data.run, { agentId: 'a1', status: 'queued', temperature: 0.2, promptChars: 20, output: null })
  t.equal(res.body.data.denied, null)
  t.match(res.body.errors, [{ path: ['denied'], message: /input\.prompt must NOT have fewer than 1 characters/, extensions: { code: 'VALIDATION_FAILED', status: 400 } }])

  const url = `${base}/graphql?query=${encodeURIComponent('query ($id: String!) { getAgent(id: $id) { name } }')}&variables=${encodeURIComponent('{"id":"a2"}')}`
  const get = await fetch(url, { headers: bearer() })
  t.equal(get.status, 200)
  t.same(await get.json(), { data: { getAgent: { name: 'Renamed' } } })
  const getMutation = await fetch(`${base}/graphql?query=${encodeURIComponent('mutation { deleteAgent(id: "a3") { id } }')}`, { headers: bearer() })
  t.equal(getMutation.status, 405)
  t.match(await getMutation.json(), { errors: [{ message: 'Operation cannot be performed via a GET request', extensions: { code: 'BAD_REQUEST', status: 405 } }] })
  // HEAD is served by the GET route, and mercurius refused a mutation over GET only: it ran.
  for (const params of ['mutation { deleteAgent(id: "a3") { id } }', 'query Q { listAgents { id } } mutation M { deleteAgent(id: "a3") { id } }&operationName=M']) {
    const [query, name] = params.split('&')
    const head = await fetch(`${base}/graphql?query=${encodeURIComponent(query)}${name === undefined ? '' : '&' + name}`, { method: 'HEAD', headers: bearer() })
    t.equal(head.status, 405, `HEAD: ${params}`)
    t.equal(head.headers.get('allow'), 'POST', `HEAD: ${params}, the method that serves it named (RFC 9110)`)
  }
  t.equal(getMutation.headers.get('allow'), 'POST', 'a 405 names the method that serves it (RFC 9110)')
  const badVariables = await fetch(`${base}/graphql?query=${encodeURIComponent('{ listAgents { id } }')}&variables=%7Bnot`, { headers: bearer() })
  t.equal(badVariables.status, 400)
  t.match(await badVariables.json(), { errors: [{ extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
  const still = await gql({ query: '{ getAgent(id: "a3") { id } }' })
  t.equal(still.body.data.getAgent.id, 'a3', 'the GET mutation did not run')
})

// A token sent and refused is a 401 for the whole request, before its body is read; without a
// token the document is read (one of `__typename` alone needs none), and each field is refused.
t.test('identity: a missing token fails every field with UNAUTHENTICATED; a forged, expired or wrong-scheme one the request', async t => {
  const { gql } = await demo(t)
  const now = Math.floor(Date.now() / 1000)
  const expired = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 't', exp: now - 60 })
  const cases: Array<[string, Record<string, string>, RegExp]> = [
    ['none', {}, /bearer token is required/],
    ['forged', { authorization: `Bearer ${token({ secret: 'another-secret-of-sufficient-length-000000' })}` }, /signature is invalid/],
    ['expired', { authorization: `Bearer ${expired}` }, /expired/],
    ['basic', { authorization: 'Basic dXNlcjpwYXNz' }, /must be "Bearer <token>"/],
    ['garbage', { authorization: 'Bearer a.b.c' }, /malformed|refused/]
  ]
  for (const [what, headers, message] of cases) {
    const res = await gql({ query: '{ listAgents { id } getAgent(id: "a1") { id } }' }, headers)
    if (what !== 'none') {
      t.equal(res.status, 401, what)
      t.equal(res.body.data, undefined, `${what}: no field ran`)
      t.equal(res.body.errors.length, 1)
      t.match(res.body.errors[0], { message, extensions: { code: 'UNAUTHENTICATED', status: 401 } }, what)
      continue
    }
    t.equal(res.status, 200, what)
    t.same(res.body.data, { listAgents: null, getAgent: null })
    t.equal(res.body.errors.length, 2)
    for (const e of res.body.errors) t.match(e, { message, extensions: { code: 'UNAUTHENTICATED', status: 401 } }, what)
  }
})

t.test('identity over GET and HEAD: a forged or wrong-scheme token refuses the request 401, as over POST', async t => {
  // Over GET the token was looked at by each field's call only: a refused one answered 200 with
  // every field's UNAUTHENTICATED (and a document of `__typename` alone ran), where the same
  // document over POST was a 401 with its WWW-Authenticate. A client that renews its token on a
  // 401 (Apollo's GET for queries) never did.
  const { app } = await demo(t)
  const forged = `Bearer ${token({ secret: 'another-secret-of-sufficient-length-000000' })}`
  for (const [what, authorization, challenge] of [['forged', forged, 'invalid_token'], ['basic', 'Basic dXNlcjpwYXNz', 'invalid_request']] as const) {
    for (const query of ['{ listAgents { id } getAgent(id: "a1") { id } }', '{ __typename }']) {
      const url = `/graphql?query=${encodeURIComponent(query)}`
      const get = await app.inject({ method: 'GET', url, headers: { authorization } })
      t.equal(get.statusCode, 401, `GET ${what}: ${query}`)
      t.notOk('data' in get.json(), 'no field ran')
      t.match(get.json().errors, [{ extensions: { code: 'UNAUTHENTICATED', status: 401 } }])
      t.match(get.headers['www-authenticate'], challenge)
      t.equal((await app.inject({ method: 'HEAD', url, headers: { authorization } })).statusCode, 401, `HEAD ${what}`)
    }
  }
  // None sent: each field says so, in a 200, as over POST.
  const none = await app.inject({ method: 'GET', url: `/graphql?query=${encodeURIComponent('{ getAgent(id: "a1") { id } __typename }')}` })
  t.equal(none.statusCode, 200)
  t.match(none.json(), { data: { getAgent: null, __typename: 'Query' }, errors: [{ extensions: { code: 'UNAUTHENTICATED' } }] })
  t.same((await app.inject({ method: 'GET', url: `/graphql?query=${encodeURIComponent('{ getAgent(id: "a1") { id } }')}`, headers: bearer() })).json(), { data: { getAgent: { id: 'a1' } } }, 'a valid token')
})

t.test('with identity off, calls are the public tenant\'s', async t => {
  const { gql } = await demo(t, { BFF_AUTH_ENABLED: false })
  const res = await gql({ query: '{ headers: kernelHeaders }' }, {})
  t.match(res.body.data.headers, { 'x-tenant-id': 'public', 'x-user-id': 'anonymous' })
})

const idInput = { type: 'object', required: ['id'], additionalProperties: false, properties: { id: { type: 'string' } } }
const item = { type: 'object', required: ['id'], properties: { id: { type: 'string' }, n: { type: 'integer', minimum: 0, maximum: 1000 } } }
const ITEMS = {
  getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /items/{id}', input: idInput, output: item, timeoutMs: 300 },
  addItem: {
    type: 'mutation',
    rest: 'POST /items',
    kernel: 'POST /items',
    input: {
      type: 'object',
      additionalProperties: false,
      required: ['id'],
      properties: {
        id: { type: 'string' },
        labels: { type: 'array', items: { type: 'string' } },
        size: { type: 'object', required: ['w'], properties: { w: { type: 'number' }, unit: { type: 'string', enum: ['cm', 'in'] } } },
        extra: { type: 'object' }
      }
    },
    output: item
  }
}

async function items (t: Parameters<typeof buildTestApp>[0], handlers: Parameters<typeof startTestKernel>[1] = {}, env: Env = {}, kernelSettings: Record<string, unknown> = {}): Promise<{ kernel: TestKernel, gql: Awaited<ReturnType<typeof listen>> }> {
  const kernel = await startTestKernel(t, handlers)
  const app = await buildTestApp(t, { ...ONLY_GRAPHQL, ...env }, { manifest: testManifest(ITEMS, kernelSettings), kernelUrl: kernel.url })
  return { kernel, gql: await listen(app) }
}

t.test('identical query fields of one request reach the Kernel once; mutations always do', async t => {
  const { kernel, gql } = await items(t, {
    'GET /items/1': (_req, res) => json(res, 200, { id: '1', n: 1, hidden: true }),
    'GET /items/2': (_req, res) => json(res, 200, { id: '2', n: 2 }),
    'POST /items': (req, res) => json(res, 201, { id: JSON.parse(req.body).id })
  })
  const res = await gql({ query: '{ a: getItem(id: "1") { id n } b: getItem(id: "1") { id } c: getItem(id: "2") { n } d: getItem(id: "1") { n } }' })
  t.same(res.body, { data: { a: { id: '1', n: 1 }, b: { id: '1' }, c: { n: 2 }, d: { n: 1 } } })
  t.equal(kernel.requests.filter(r => r.url === '/items/1').length, 1, 'three identical fields, one Kernel call')
  t.equal(kernel.requests.filter(r => r.url === '/items/2').length, 1)
  await gql({ query: '{ a: getItem(id: "1") { id } }' })
  t.equal(kernel.requests.filter(r => r.url === '/items/1').length, 2, 'the memo lives for one request only')

  const before = kernel.requests.length
  const m = await gql({ query: 'mutation { a: addItem(id: "x") { id } b: addItem(id: "x") { id } }' }, { ...bearer(), 'idempotency-key': 'key-1' })
  t.same(m.body, { data: { a: { id: 'x' }, b: { id: 'x' } } })
  const posts = kernel.requests.slice(before)
  t.equal(posts.length, 2, 'each mutation is its own Kernel call')
  t.same(posts.map(p => p.headers['idempotency-key']), ['key-1 a', 'key-1 b'], 'the key names the field')
  t.not(posts[0].headers['x-request-id'], posts[1].headers['x-request-id'])
  const badKey = await gql({ query: 'mutation { addItem(id: "y") { id } }' }, { ...bearer(), 'idempotency-key': 'has space' })
  // Refused by the field's own pipeline call (so the refusal has its audit entry), as a field error.
  t.equal(badKey.status, 200)
  t.match(badKey.body, { data: { addItem: null }, errors: [{ message: /Idempotency-Key/, path: ['addItem'], extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
  t.equal(kernel.requests.length, before + 2, 'the refused mutation never reached the Kernel')
})

t.test('a document of one mutation field says a replay with Idempotent-Replayed, as REST and a tRPC call alone do; one of several fields does not', async t => {
  // A GraphQL client retrying a keyed mutation could not tell the stored answer from a new run.
  const { kernel, gql } = await items(t, {
    'POST /items': (req, res) => {
      const { id } = JSON.parse(req.body) as { id: string }
      if (id === 'gone') json(res, 404, { message: 'no such list' })
      else json(res, 201, { id })
    }
  })
  const send = async (query: string, key: string) => await gql({ query }, { ...bearer(), 'idempotency-key': key })
  const first = await send('mutation { addItem(id: "r1") { id } }', 'replay-1')
  t.same(first.body, { data: { addItem: { id: 'r1' } } })
  t.equal(first.headers.get('idempotent-replayed'), null, 'the first run is not a replay')
  const again = await send('mutation { addItem(id: "r1") { id } }', 'replay-1')
  t.same(again.body, { data: { addItem: { id: 'r1' } } })
  t.equal(again.headers.get('idempotent-replayed'), 'true', 'the repeat is marked')
  const refused = await send('mutation { addItem(id: "gone") { id } }', 'replay-2')
  t.match(refused.body, { errors: [{ extensions: { code: 'NOT_FOUND' } }] })
  t.equal(refused.headers.get('idempotent-replayed'), null)
  const refusedAgain = await send('mutation { addItem(id: "gone") { id } }', 'replay-2')
  t.match(refusedAgain.body, { errors: [{ extensions: { code: 'NOT_FOUND' } }] })
  t.equal(refusedAgain.headers.get('idempotent-replayed'), 'true', 'a replayed refusal is marked too')
  t.equal(kernel.requests.length, 2, 'each key ran once')
  const two = 'mutation { a: addItem(id: "t1") { id } b: addItem(id: "t2") { id } }'
  await send(two, 'replay-3')
  const twoAgain = await send(two, 'replay-3')
  t.same(twoAgain.body, { data: { a: { id: 't1' }, b: { id: 't2' } } })
  t.equal(twoAgain.headers.get('idempotent-replayed'), null, 'several calls: no one header says which')
})

t.test('arguments become the op input: lists, input objects, enums, JSON, nulls', async t => {
  const { kernel, gql } = await items(t, { 'POST /items': (req, res) => json(res, 201, { id: JSON.parse(req.body).id }) })
  const res = await gql({
    query: 'mutation ($size: AddItemSizeInput) { addItem(id: "i1", labels: ["a", "b"], size: $size, extra: { any: [1, "two", null, { deep: true }] }) { id } }',
    variables: { size: { w: 2.5, unit: 'cm' } }
  })
  t.same(res.body, { data: { addItem: { id: 'i1' } } })
  t.same(JSON.parse(kernel.requests[0].body), { id: 'i1', labels: ['a', 'b'], size: { w: 2.5, unit: 'cm' }, extra: { any: [1, 'two', null, { deep: true }] } })
  // An argument given as null is treated as absent when its schema does not accept null.
  const nulls = await gql({ query: 'mutation { addItem(id: "i2", labels: null, size: null) { id } }' })
  t.same(nulls.body, { data: { addItem: { id: 'i2' } } })
  t.same(JSON.parse(kernel.requests[1].body), { id: 'i2' })
  const badEnum = await gql({ query: 'mutation { addItem(id: "i3", size: { w: 1, unit: mm }) { id } }' })
  t.equal(badEnum.status, 400)
  t.match(badEnum.body.errors[0], { message: /Value "mm" does not exist in "AddItemSizeUnit" enum/, extensions: { code: 'VALIDATION_FAILED' } })
  const wrongType = await gql({ query: 'mutation { addItem(id: 5) { id } }' })
  t.equal(wrongType.status, 400)
  t.match(wrongType.body.errors[0], { message: /String cannot represent a non string value: 5/, extensions: { code: 'VALIDATION_FAILED' } })
  const missing = await gql({ query: 'mutation { addItem(size: { w: 1 }) { id } }' })
  t.match(missing.body.errors[0], { message: /argument "id" of type "String!" is required/ })
  t.equal(kernel.requests.length, 2, 'refused documents never reach the Kernel')
})

t.test('Kernel failures keep their contract codes per field: 404, 409, 502, 504, 503', async t => {
  const { kernel, gql } = await items(t, {
    'GET /items/gone': (_req, res) => json(res, 404, { message: 'no such item' }),
    'GET /items/conflict': (_req, res) => json(res, 409, { message: 'item is locked' }),
    'GET /items/broken': (_req, res) => json(res, 500, { message: 'boom' }),
    'GET /items/slow': async (_req, res) => { await sleep(800); json(res, 200, { id: 'slow' }) },
    'GET /items/bad': (_req, res) => json(res, 200, { n: 1 }),
    'GET /items/ok': (_req, res) => json(res, 200, { id: 'ok' })
    // No retries: the 500's retries and their backoff, on a loaded machine, reached getItem's
    // 300 ms before the last answer came, and the field read KERNEL_TIMEOUT (retries have tests of their own).
  }, {}, { retries: 0 })
  const res = await gql({ query: '{ gone: getItem(id: "gone") { id } conflict: getItem(id: "conflict") { id } broken: getItem(id: "broken") { id } slow: getItem(id: "slow") { id } bad: getItem(id: "bad") { id } ok: getItem(id: "ok") { id } }' })
  t.equal(res.status, 200)
  t.same(res.body.data, { gone: null, conflict: null, broken: null, slow: null, bad: null, ok: { id: 'ok' } })
  const byPath = Object.fromEntries(res.body.errors.map((e: any) => [e.path[0], e.extensions]))
  t.match(byPath, {
    gone: { code: 'NOT_FOUND', status: 404 },
    conflict: { code: 'KERNEL_REJECTED', status: 409 },
    broken: { code: 'KERNEL_ERROR', status: 502 },
    slow: { code: 'KERNEL_TIMEOUT', status: 504 },
    bad: { code: 'KERNEL_ERROR', status: 502 }
  })
  t.equal(res.body.errors.find((e: any) => e.path[0] === 'conflict').message, 'item is locked')
  await kernel.close()
  const down = await gql({ query: '{ getItem(id: "ok") { id } }' })
  t.match(down.body, { data: { getItem: null }, errors: [{ extensions: { code: 'KERNEL_UNAVAILABLE', status: 503 } }] })
})

t.test('a Kernel nobody listens on is KERNEL_UNAVAILABLE', async t => {
  const port = await closedPort()
  const app = await buildTestApp(t, ONLY_GRAPHQL, { manifest: testManifest(ITEMS), kernelUrl: `http://127.0.0.1:${port}` })
  const gql = await listen(app)
  const res = await gql({ query: '{ getItem(id: "1") { id } }' })
  t.match(res.body, { data: { getItem: null }, errors: [{ path: ['getItem'], extensions: { code: 'KERNEL_UNAVAILABLE', status: 503 } }] })
})

t.test('limits: depth, root fields per document, fields, document length, tokens, body size', async t => {
  const { gql } = await demo(t, { BFF_GRAPHQL_MAX_DEPTH: 2, BFF_BATCH_MAX_CALLS: 3, BFF_BODY_LIMIT: 200_000 })
  const ok = await gql({ query: '{ a: getAgent(id: "a1") { id } b: getAgent(id: "a2") { id } ... on Query { c: getAgent(id: "a3") { id } } __typename }' })
  t.equal(ok.status, 200, 'three root fields (and __typename) are allowed')
  t.same(ok.body.data, { a: { id: 'a1' }, b: { id: 'a2' }, c: { id: 'a3' }, __typename: 'Query' })

  const four = await gql({ query: '{ a: getAgent(id: "a1") { id } b: getAgent(id: "a2") { id } ...More } fragment More on Query { c: listAgents { id } d: listAgents { id } }' })
  t.equal(four.status, 413)
  t.match(four.body.errors, [{ message: 'The operation selects 4 root fields; at most 3 are allowed (each one is a call)', extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }])

  // Depth: the demo's types are shallow; introspection is not.
  const deep = await gql({ query: 'query Deep { __type(name: "Agent") { fields { type { name } } } getAgent(id: "a1") { id } }' })
  t.equal(deep.status, 400)
  t.match(deep.body.errors, [{ message: 'Operation Deep is 4 levels deep; at most 2 are allowed', extensions: { code: 'VALIDATION_FAILED', status: 400 } }])
  const introspection = await gql({ query: getIntrospectionQuery() })
  t.equal(introspection.status, 200, 'the standard introspection query (15 deep) is allowed on its own')
  t.ok(introspection.body.data.__schema.types.some((ty: any) => ty.name === 'Agent'))
  const deeper = await gql({ query: '{ __schema { types { fields { type { fields { type { fields { type { fields { type { fields { type { fields { name } } } } } } } } } } } } } }' })
  t.equal(deeper.status, 400, 'introspection deeper than 15 is refused')

  // Fragments spread many times count each time, and counting them stays cheap.
  let doc = '{ listAgents { ...F40 } } fragment F0 on Agent { id name model }'
  for (let i = 1; i <= 40; i++) doc += ` fragment F${i} on Agent { ...F${i - 1} ...F${i - 1} }`
  const started = Date.now()
  const wide = await gql({ query: doc })
  t.equal(wide.status, 413)
  t.match(wide.body.errors, [{ message: 'The operation selects 3298534883329 fields; at most 1000 are allowed', extensions: { code: 'PAYLOAD_TOO_LARGE' } }])
  t.ok(Date.now() - started < 2000, 'measured without expanding the fragments')

  const long = await gql({ query: `{ listAgents(model: "${'x'.repeat(70_000)}") { id } }` })
  t.equal(long.status, 413)
  t.match(long.body, { errors: [{ message: 'The GraphQL document is longer than 65536 characters', extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }] })
  const tokens = await gql({ query: `{ ${'a '.repeat(25_000)}}` })
  t.equal(tokens.status, 400)
  t.match(tokens.body.errors, [{ message: /Document contains more that 2000 tokens/, extensions: { code: 'VALIDATION_FAILED' } }])
  const body = await gql({ query: '{ listAgents { id } }', variables: { pad: 'x'.repeat(250_000) } })
  t.equal(body.status, 413)
  t.match(body.body, { errors: [{ extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }] })
})

t.test('ugly requests are 4xx GraphQL errors with a contract code, never a 5xx', async t => {
  const { gql, base } = await demo(t)
  const cases: Array<[string, string | object, Record<string, string>, number, string, RegExp?]> = [
    ['malformed JSON', '{"query": "{ listAgents { id } }",', {}, 400, 'VALIDATION_FAILED', /not valid JSON/],
    ['empty body', '', {}, 400, 'VALIDATION_FAILED'],
    ['array body', [{ query: '{ __typename }' }], {}, 400, 'VALIDATION_FAILED', /must be a JSON object/],
    ['scalar body', '"text"', {}, 400, 'VALIDATION_FAILED'],
    ['no query', { variables: {} }, {}, 400, 'VALIDATION_FAILED', /needs a `query` string/],
    ['number query', { query: 42 }, {}, 400, 'VALIDATION_FAILED', /needs a `query` string/],
    ['object query', { query: { kind: 'Document' } }, {}, 400, 'VALIDATION_FAILED'],
    ['string variables', { query: '{ __typename }', variables: 'x' }, {}, 400, 'VALIDATION_FAILED', /`variables` must be a JSON object/],
    ['array extensions', { query: '{ __typename }', extensions: [] }, {}, 400, 'VALIDATION_FAILED', /`extensions` must be a JSON object/],
    ['number operationName', { query: '{ __typename }', operationName: 1 }, {}, 400, 'VALIDATION_FAILED', /`operationName` must be a string/],
    ['unknown operationName', { query: 'query A { __typename }', operationName: 'B' }, {}, 400, 'VALIDATION_FAILED', /Unknown operation named "B"/],
    ['two anonymous operations', { query: '{ __typename } { __typename }' }, {}, 400, 'VALIDATION_FAILED'],
    ['variable of the wrong type', { query: 'query ($l: Int) { listAgents(limit: $l) { id } }', variables: { l: 'ten' } }, {}, 400, 'VALIDATION_FAILED', /Int cannot represent/],
    ['missing variable', { query: 'query ($id: String!) { getAgent(id: $id) { id } }' }, {}, 400, 'VALIDATION_FAILED', /was not provided/],
    ['syntax', { query: 'query {' }, {}, 400, 'VALIDATION_FAILED', /Syntax Error/],
    ['cyclic fragments', { query: '{ ...A } fragment A on Query { ...B } fragment B on Query { listAgents { id } ...A }' }, {}, 400, 'VALIDATION_FAILED', /Cannot spread fragment "A" within itself via "B"/],
    ['unknown fragment', { query: '{ ...Nope }' }, {}, 400, 'VALIDATION_FAILED', /Unknown fragment "Nope"/],
    ['subscription over HTTP', { query: 'subscription { runUpdated { id } }' }, {}, 400, 'BAD_REQUEST', /served over WebSocket/],
    ['text/plain', 'query { __typename }', { 'content-type': 'text/plain' }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    ['no content-type', 'x', { 'content-type': '' }, 415, 'UNSUPPORTED_MEDIA_TYPE']
  ]
  for (const [what, body, headers, status, code, message] of cases) {
    const res = await gql(body, { ...bearer(), ...headers })
    t.equal(res.status, status, what)
    t.match(res.body, { errors: [{ extensions: { code, status, requestId: String } }] }, what)
    if (message !== undefined) t.match(res.body.errors[0].message, message, what)
    t.notOk('data' in res.body, `${what}: no data entry`)
  }
  // A failure of the pipeline's own validation is a field error: the document was valid GraphQL.
  const limit = await gql({ query: '{ listAgents(limit: 1000) { id } }' })
  t.equal(limit.status, 200)
  t.match(limit.body, { data: { listAgents: null }, errors: [{ message: 'input.limit must be <= 100', extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
  // null for an argument whose schema refuses null means "absent".
  const nullLimit = await gql({ query: '{ listAgents(limit: null) { id } }' })
  t.equal(nullLimit.body.data.listAgents.length, 3)
  // application/graphql bodies (mercurius) hold the document itself.
  const graphqlBody = await fetch(`${base}/graphql`, { method: 'POST', headers: { ...bearer(), 'content-type': 'application/graphql' }, body: '{ getAgent(id: "a1") { id } }' })
  t.same(await graphqlBody.json(), { data: { getAgent: { id: 'a1' } } })
  const nothing = await fetch(`${base}/graphql`, { headers: bearer() })
  t.equal(nothing.status, 400)
  t.match(await nothing.json(), { errors: [{ extensions: { code: 'VALIDATION_FAILED' } }] })
  const put = await fetch(`${base}/graphql`, { method: 'PUT', headers: bearer() })
  // A 405 naming the methods /graphql is served with (a 404 before: the path exists).
  t.equal(put.status, 405)
  t.equal(put.headers.get('allow'), 'GET, HEAD, POST')
  t.match(await put.json(), { status: 405, code: 'BAD_REQUEST' })
})

t.test('a document holding a subscription and a query runs the query operationName picks over HTTP; the subscription stays refused', async t => {
  // The refusal looked at the whole document: `query A { ... } subscription B { ... }` with
  // operationName A was refused 400 "served over WebSocket", though A is a query.
  const { gql, app } = await demo(t)
  const query = 'query A { getAgent(id: "a1") { id } } subscription B { runUpdated { id } }'
  for (let i = 0; i < 3; i++) { // the document is cached (and compiled) after its first runs
    const a = await gql({ query, operationName: 'A' })
    t.equal(a.status, 200, `run ${i + 1}: the query`)
    t.same(a.body, { data: { getAgent: { id: 'a1' } } })
    const b = await gql({ query, operationName: 'B' })
    t.equal(b.status, 400, `run ${i + 1}: the subscription`)
    t.match(b.body, { errors: [{ message: /served over WebSocket/, extensions: { code: 'BAD_REQUEST', status: 400, requestId: String } }] })
    t.notOk('data' in b.body, 'no data entry')
  }
  const alone = await gql({ query: 'subscription { runUpdated { id } }' })
  t.match([alone.status, alone.body.errors[0].extensions.code], [400, 'BAD_REQUEST'], 'a subscription alone, as before')
  const overGet = async (operationName: string) => await app.inject({ url: '/graphql?' + new URLSearchParams({ query, operationName }).toString(), headers: bearer() })
  t.same((await overGet('A')).json(), { data: { getAgent: { id: 'a1' } } }, 'over GET, the query runs')
  const getB = await overGet('B')
  t.equal(getB.statusCode, 405, 'over GET, the subscription is refused as a mutation is')
  t.match(getB.json(), { errors: [{ message: /GET/, extensions: { code: 'BAD_REQUEST', status: 405 } }] })
})

t.test('media types: application/graphql-response+json when asked for', async t => {
  const { gql } = await demo(t)
  const ok = await gql({ query: '{ __typename }' }, { accept: 'application/graphql-response+json, application/json;q=0.9' })
  t.equal(ok.headers.get('content-type'), 'application/graphql-response+json; charset=utf-8')
  t.same(ok.body, { data: { __typename: 'Query' } })
  const refused = await gql({ query: '{' }, { accept: 'application/graphql-response+json' })
  t.equal(refused.status, 400)
  t.equal(refused.headers.get('content-type'), 'application/graphql-response+json; charset=utf-8')
  const plain = await gql({ query: '{ __typename }' }, { accept: 'application/json' })
  t.match(plain.headers.get('content-type'), /^application\/json/)
  // The Accept header's weights are read (RFC 9110 §12.5.1): q=0 is "not acceptable", and a type
  // the client weighs lower is not chosen over the one it prefers. Any mention of the media type
  // gave it, even `;q=0`.
  for (const accept of ['application/graphql-response+json;q=0, application/json', 'application/json;q=0.5, application/graphql-response+json;q=0.4', 'application/graphql-response+json; q=0.1, */*']) {
    const res = await gql({ query: '{ __typename }' }, { accept })
    t.match(res.headers.get('content-type'), /^application\/json/, accept)
  }
  for (const accept of ['application/json;q=0.9, application/graphql-response+json', 'application/json, application/graphql-response+json', 'APPLICATION/GRAPHQL-RESPONSE+JSON;charset=utf-8']) {
    const res = await gql({ query: '{ __typename }' }, { accept })
    t.equal(res.headers.get('content-type'), 'application/graphql-response+json; charset=utf-8', accept)
  }
})

t.test('the trace continues through every field', async t => {
  const { gql } = await demo(t)
  const traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
  const res = await gql({ query: '{ a: kernelHeaders b: kernelHeaders }' }, { ...bearer(), traceparent })
  for (const key of ['a', 'b']) t.match(res.body.data[key].traceparent, /^00-0af7651916cd43dd8448eb211c80319c-[0-9a-f]{16}-01$/)
})

t.test('GraphiQL outside production only; the face stays out of the OpenAPI document', async t => {
  const { base } = await demo(t)
  t.equal((await fetch(`${base}/graphiql`)).status, 200)
  const openapi = await (await fetch(`${base}/openapi.json`)).json() as { paths: Record<string, unknown> }
  t.notOk(Object.keys(openapi.paths).some(p => p.includes('graphql') || p.includes('graphiql')))
  const prod = await demo(t, { NODE_ENV: 'production', BFF_AUDIT_ENABLED: false })
  t.equal((await fetch(`${prod.base}/graphiql`)).status, 404)
  t.same((await prod.gql({ query: '{ getAgent(id: "a1") { id } }' })).body, { data: { getAgent: { id: 'a1' } } })
})

// Introspection was answered in production: the whole schema (every operation, argument and
// type of the manifest) to any caller. Off there by default now, BFF_GRAPHQL_INTROSPECTION says otherwise.
t.test('introspection: off in production unless BFF_GRAPHQL_INTROSPECTION=true, on elsewhere unless false', async t => {
  const refused = (res: Gql, field: string): void => {
    t.equal(res.status, 400, `${field} is refused`)
    t.match(res.body, { errors: [{ message: `GraphQL introspection has been disabled, but the requested query contained the field "${field}".`, extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
    t.notOk(res.body.data, 'with no data')
  }
  const prod = await demo(t, { NODE_ENV: 'production', BFF_AUDIT_ENABLED: false })
  refused(await prod.gql({ query: getIntrospectionQuery() }), '__schema')
  refused(await prod.gql({ query: '{ __type(name: "Agent") { name } }' }), '__type')
  t.same((await prod.gql({ query: '{ getAgent(id: "a1") { id __typename } }' })).body, { data: { getAgent: { id: 'a1', __typename: 'Agent' } } }, '__typename stays')
  const opened = await demo(t, { NODE_ENV: 'production', BFF_AUDIT_ENABLED: false, BFF_GRAPHQL_INTROSPECTION: true })
  const schema = await opened.gql({ query: getIntrospectionQuery() })
  t.equal(schema.status, 200, 'BFF_GRAPHQL_INTROSPECTION=true answers it in production')
  t.ok(schema.body.data.__schema.types.some((ty: any) => ty.name === 'Agent'))
  const dev = await demo(t)
  t.equal((await dev.gql({ query: '{ __type(name: "Agent") { name } }' })).status, 200, 'on outside production')
  const closed = await demo(t, { BFF_GRAPHQL_INTROSPECTION: false })
  refused(await closed.gql({ query: '{ __schema { queryType { name } } }' }), '__schema')
})

// With introspection refused, graphql's refusal of a misspelt name still named the names near
// it ('Did you mean "getAgent"?'): the schema could be walked a guess at a time. Without
// introspection the suggestion is left out; with it (outside production) it stays.
t.test('introspection off: a refused document names no field, argument or type it was not given', async t => {
  const prod = await demo(t, { NODE_ENV: 'production', BFF_AUDIT_ENABLED: false })
  const messages = async (gql: Awaited<ReturnType<typeof demo>>['gql'], query: string): Promise<string[]> => ((await gql({ query })).body.errors ?? []).map((e: { message: string }) => e.message)
  t.same(await messages(prod.gql, '{ getAgen(id: "a1") { id } }'), ['Cannot query field "getAgen" on type "Query".'], 'a root field')
  t.same(await messages(prod.gql, '{ getAgent(id: "a1") { nam } }'), ['Cannot query field "nam" on type "Agent".'], 'a type\'s field')
  t.same(await messages(prod.gql, '{ getAgent(idd: "a1") { id } }'), ['Unknown argument "idd" on field "Query.getAgent".', 'Field "getAgent" argument "id" of type "String!" is required, but it was not provided.'], 'an argument')
  t.same(await messages(prod.gql, 'query ($x: Strin) { getAgent(id: $x) { id } }'), ['Unknown type "Strin".'], 'a type')
  const res = await prod.gql({ query: '{ getAgen(id: "a1") { id } }' })
  t.match(res, { status: 400, body: { errors: [{ extensions: { code: 'VALIDATION_FAILED', status: 400 } }] } }, 'still a 400 VALIDATION_FAILED')
  const dev = await demo(t)
  t.same(await messages(dev.gql, '{ getAgen(id: "a1") { id } }'), ['Cannot query field "getAgen" on type "Query". Did you mean "getAgent" or "getRun"?'], 'introspection on: the suggestion stays')
})

t.test('the face can be switched off', async t => {
  const app = await buildDemoApp(t, { ...ONLY_GRAPHQL, BFF_GRAPHQL_ENABLED: false })
  const res = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: '{ __typename }' } })
  t.equal(res.statusCode, 404)
})

t.test('the error formatter: a gateway bug is INTERNAL, logged, and tells nothing', async t => {
  const logged: unknown[] = []
  const app = { log: { error: (obj: unknown) => { logged.push(obj) } } }
  const bug = new GraphQLError('x is not a function', { path: ['getAgent'], originalError: new TypeError('x is not a function') })
  const out = errorFormatter({ data: { getAgent: null }, errors: [bug] }, { app, reply: { request: { id: 'req-1' } } })
  t.equal(out.statusCode, 200)
  t.same(out.response.errors, [{ message: 'The gateway could not complete the call', path: ['getAgent'], extensions: { code: 'INTERNAL', status: 500, requestId: 'req-1' } }])
  t.equal(logged.length, 1)
  // A subscription's context has the upgrade request, not a reply.
  const sub = errorFormatter({ errors: [new GraphQLError('bad', { extensions: { code: 'FORBIDDEN' } })] }, { app, request: { id: 'up-1' } })
  t.same(sub, { statusCode: 403, response: { errors: [{ message: 'bad', extensions: { code: 'FORBIDDEN', status: 403, requestId: 'up-1' } }] } })
})

t.test('a document of several operations runs the one each request names, never one compiled for another request', async t => {
  // mercurius compiles a document text once (JIT, on its second run) for the operation that run
  // named, and ran that for every later request of the text: two refused requests naming the
  // mutation made a client naming the query carry it out, over POST, GET and HEAD.
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const gql = await listen(app)
  const count = async (): Promise<number> => (await gql({ query: '{ listAgents { id } }' }, bearer())).body.data.listAgents.length
  const agents = await count()
  const doc = 'query Q { listAgents { id } } mutation M { createAgent(name: "forced") { name } }'
  for (let i = 0; i < 3; i++) {
    const refused = await gql({ query: doc, operationName: 'M' }, {})
    t.equal(refused.body.errors[0].extensions.code, 'UNAUTHENTICATED', `anonymous run ${i + 1} naming M: refused`)
  }
  const asked = await gql({ query: doc, operationName: 'Q' }, bearer())
  t.same(Object.keys(asked.body.data), ['listAgents'], 'POST naming Q: the query')
  const url = `/graphql?operationName=Q&query=${encodeURIComponent(doc)}`
  for (const method of ['GET', 'HEAD'] as const) {
    const res = await app.inject({ method, url, headers: bearer() })
    t.equal(res.statusCode, 200, method)
    if (method === 'GET') t.same(Object.keys(res.json().data), ['listAgents'], 'GET naming Q: the query')
  }
  t.equal(await count(), agents, 'no agent created')
  const mutated = await gql({ query: doc, operationName: 'M' }, bearer())
  t.same(mutated.body, { data: { createAgent: { name: 'forced' } } }, 'naming M with a token: the mutation')
  t.equal(await count(), agents + 1, 'one agent created, for the request that named the mutation')
})

t.test('an empty operationName names no operation: refused the same on every run, over POST and GET', async t => {
  // No operation has the empty name (GraphQL's GetOperation: a name the document does not define
  // is a request error). Over POST, graphql-js refused it on a text's first run, and the form
  // graphql-jit compiled on its second ran the anonymous operation: 400, then 200 for the same
  // request; over GET it was refused every time.
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const gql = await listen(app)
  for (const query of ['{ __typename listAgents(limit: 1) { id } }', 'query A { __typename getAgent(id: "a1") { id } }']) {
    for (let i = 0; i < 3; i++) {
      const res = await gql({ query, operationName: '' }, bearer())
      t.equal(res.status, 400, `POST run ${i + 1}: ${query}`)
      t.equal(res.body.errors[0].extensions.code, 'VALIDATION_FAILED')
      t.notOk('data' in res.body)
    }
    const get = await app.inject({ method: 'GET', url: `/graphql?operationName=&query=${encodeURIComponent(query)}`, headers: bearer() })
    t.equal(get.statusCode, 400, `GET: ${query}`)
    t.equal(get.json().errors[0].message, (await gql({ query, operationName: '' }, bearer())).body.errors[0].message, 'the same words')
  }
})

t.test('an operationName the document does not define is refused on every run, once its text is compiled too', async t => {
  // mercurius runs the compiled form of a text whatever operationName the request gives, and
  // checks the name only with the request's variables: sent without any, a name the document
  // does not define was refused on the text's first run, then answered 200 (its one operation
  // run) once the text was compiled.
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const gql = await listen(app)
  for (const query of ['query A { getAgent(id: "a1") { id } }', '{ getAgent(id: "a2") { id } }']) {
    for (let i = 0; i < 2; i++) {
      const res = await gql({ query, ...(query.startsWith('query A') ? { operationName: 'A' } : {}) }, bearer())
      t.equal(res.status, 200, `run ${i + 1} as sent: ${query}`)
    }
    for (let i = 0; i < 3; i++) {
      const res = await gql({ query, operationName: 'Nope' }, bearer())
      t.equal(res.status, 400, `run ${i + 1} naming Nope: ${query}`)
      t.match(res.body, { errors: [{ message: 'Unknown operation named "Nope".', extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
      t.notOk('data' in res.body)
    }
  }
})

t.test('a document whose values nest thousands deep is refused in the gateway\'s words', async t => {
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const gql = await listen(app)
  // A list overflows graphql-js' recursion within the token bound (2000); an object, three
  // tokens a level, reaches the bound first, and is refused for it.
  for (const [name, literal, message] of [
    ['list', '['.repeat(3000) + '"a"' + ']'.repeat(3000), 'The document nests its values too deeply'],
    ['object', '{a:'.repeat(2000) + '1' + '}'.repeat(2000), 'Syntax Error: Document contains more that 2000 tokens. Parsing aborted.']
  ] as const) {
    const res = await gql({ query: `{ getAgent(id: ${literal}) { id } }` }, bearer())
    t.equal(res.status, 400, name)
    t.match(res.body, { errors: [{ message, extensions: { code: 'VALIDATION_FAILED', status: 400 } }] }, name)
  }
})
