import t from 'tap'
import { connect as connectTcp } from 'node:net'
import { createSigner } from 'fast-jwt'
import { startTestKernel, testManifest, json, bearer, token, closedPort, SECRET, drained } from '../../helper.js'
import { wsApp, connect, refusedUpgrade, upgrade } from '../websocket-helper.js'

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
const UUID_V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/

t.test('calls answer the same JSON as REST, shaped by the output schema', async t => {
  const { app, url } = await wsApp(t)
  const client = await connect(t, url)
  const frame = await client.request({ id: '1', op: 'getAgent', input: { id: 'a1' } })
  const rest = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  t.same(frame, { id: '1', result: rest.json(), cache: 'miss' }, 'the same agent as REST (getAgent is cached: the frame says how it was answered)')
  t.notOk('internalCostCents' in frame.result, 'an undeclared Kernel field is removed')

  const list = await client.request({ id: 'list', op: 'listAgents', input: { limit: 2 } })
  t.equal(list.id, 'list')
  t.equal(list.result.length, 2)

  const noInput = await client.request({ id: 'n', op: 'listAgents' })
  t.ok(Array.isArray(noInput.result), 'input may be left out')
  const nullInput = await client.request({ id: 'z', op: 'listAgents', input: null })
  t.ok(Array.isArray(nullInput.result), 'input may be null')

  const created = await client.request({ id: 'c', op: 'createAgent', input: { name: 'From a socket' } })
  t.match(created, { id: 'c', result: { name: 'From a socket', model: String } })
  const read = await client.request({ id: 'r', op: 'getAgent', input: { id: created.result.id } })
  t.equal(read.result.name, 'From a socket', 'the mutation reached the Kernel for the token tenant')
})

t.test('calls in flight answer by id, in any order, each with its own request id', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/items/slow': async (req, res) => { await new Promise(resolve => setTimeout(resolve, 100)); json(res, 200, { id: 'slow', rid: req.headers['x-request-id'] }) },
    'GET /v1/items/fast': (req, res) => json(res, 200, { id: 'fast', rid: req.headers['x-request-id'] }),
    'POST /v1/items': (req, res) => json(res, 201, { id: 'n1', key: req.headers['idempotency-key'] ?? null })
  })
  const item = { type: 'object', properties: { id: { type: 'string' }, rid: { type: 'string' }, key: { type: ['string', 'null'] } } }
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: item },
    createItem: { type: 'mutation', rest: 'POST /items', kernel: 'POST /v1/items', input: { type: 'object' }, output: item }
  })
  const { url } = await wsApp(t, { build: { manifest, kernelUrl: kernel.url } })
  const client = await connect(t, url)
  client.send({ id: 's', op: 'getItem', input: { id: 'slow' } })
  client.send({ id: 'f', op: 'getItem', input: { id: 'fast' } })
  const first = await client.next()
  const second = await client.next()
  t.equal(first.id, 'f', 'the fast call answers first')
  t.equal(second.id, 's')
  t.match(first.result.rid, UUID_V7, 'a frame\'s call gets a time-ordered request id')
  t.match(second.result.rid, UUID_V7)
  t.not(first.result.rid, second.result.rid, 'a fresh request id per call')

  const keyed = await client.request({ id: 'k', op: 'createItem', input: {}, idempotencyKey: 'key-1' })
  t.equal(keyed.result.key, 'key-1', 'the idempotency key reaches the Kernel on a mutation')
  const unkeyed = await client.request({ id: 'u', op: 'createItem', input: {} })
  t.equal(unkeyed.result.key, null)
})

t.test('a call frame\'s idempotencyKey may be any JSON value: null is none, another one that is no text a malformed key', async t => {
  // The frame schema asked for a string: `"idempotencyKey":null` or `7` refused the frame before
  // the pipeline, a query's too, and with no audit entry. README: queries ignore the key,
  // malformed or not; a mutation with a malformed one is refused by its own pipeline call.
  const kernel = await startTestKernel(t, {
    'GET /v1/items/x': (_req, res) => json(res, 200, { id: 'x' }),
    'POST /v1/items': (req, res) => json(res, 201, { id: 'n1', key: req.headers['idempotency-key'] ?? null })
  })
  const item = { type: 'object', properties: { id: { type: 'string' }, key: { type: ['string', 'null'] } } }
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: item },
    createItem: { type: 'mutation', rest: 'POST /items', kernel: 'POST /v1/items', input: { type: 'object' }, output: item }
  })
  const { app, url } = await wsApp(t, { build: { manifest, kernelUrl: kernel.url } })
  const client = await connect(t, url)
  const malformed = [7, 0, true, false, {}, ['k'], '', 'two words']
  for (const [n, key] of [null, ...malformed].entries()) {
    t.same(await client.request({ id: `q${n}`, op: 'getItem', input: { id: 'x' }, idempotencyKey: key }), { id: `q${n}`, result: { id: 'x' } }, `a query ignores the key ${JSON.stringify(key)}`)
  }
  t.same(await client.request({ id: 'null', op: 'createItem', input: {}, idempotencyKey: null }), { id: 'null', result: { id: 'n1', key: null } }, 'a mutation with a null key runs without one')
  for (const [n, key] of malformed.entries()) {
    t.match(await client.request({ id: `m${n}`, op: 'createItem', input: {}, idempotencyKey: key }), { id: `m${n}`, error: { code: 'VALIDATION_FAILED', status: 400, detail: /Idempotency-Key must be 1 to 255 visible ASCII characters/ } }, `a mutation with the key ${JSON.stringify(key)} is refused by its pipeline call`)
  }
  await drained(app)
  const refused = (await app.audit.store.query({ status: 'VALIDATION_FAILED', limit: 100 })).entries
  t.equal(refused.length, malformed.length, 'each refusal has its audit entry')
  t.match(refused[0], { protocol: 'websocket', action: 'createItem', statusCode: 400 })
})

t.test('each error code as an error frame with the contract shape', async t => {
  const { url } = await wsApp(t)
  const client = await connect(t, url, { roles: [], zone: 'public' })
  const cases: Array<[string, Record<string, unknown>, number, string, RegExp | undefined]> = [
    ['NOT_FOUND from the Kernel', { op: 'getAgent', input: { id: 'nope' } }, 404, 'NOT_FOUND', undefined],
    ['unknown op', { op: 'noSuchOp' }, 404, 'NOT_FOUND', /No operation noSuchOp/],
    ['role', { op: 'getRun', input: { id: 'r1' } }, 403, 'FORBIDDEN', /getRun needs one of the roles: viewer/],
    ['zone', { op: 'kernelHeaders' }, 403, 'FORBIDDEN', undefined],
    ['field too big', { op: 'listAgents', input: { limit: 1000 } }, 400, 'VALIDATION_FAILED', /input\.limit must be <= 100/],
    ['field of the wrong type', { op: 'listAgents', input: { limit: 'ten' } }, 400, 'VALIDATION_FAILED', /input\.limit must be integer/],
    ['required field', { op: 'getAgent', input: {} }, 400, 'VALIDATION_FAILED', /input\.id is required/],
    ['unknown field', { op: 'getAgent', input: { id: 'a1', extra: 1 } }, 400, 'VALIDATION_FAILED', /input\.extra is not allowed/]
  ]
  const ids = new Set<string>()
  for (const [name, call, status, code, detail] of cases) {
    const frame = await client.request({ id: name, ...call })
    t.same(Object.keys(frame), ['id', 'error'], name)
    t.equal(frame.id, name)
    t.match(frame.error, { code, status, title: String, requestId: UUID, type: `urn:mantle:problem:${code.toLowerCase().replace(/_/g, '-')}` }, name)
    if (detail !== undefined) t.match(frame.error.detail, detail, name)
    ids.add(frame.error.requestId)
  }
  t.equal(ids.size, cases.length, 'every call has its own request id')
})

t.test('Kernel failures: 502, 503, 504 and a passed-on 4xx', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/items/boom': (_req, res) => json(res, 500, { message: 'internal detail' }),
    'GET /v1/items/slow': async (_req, res) => { await new Promise(resolve => setTimeout(resolve, 400)); json(res, 200, { id: 'slow' }) },
    'GET /v1/items/taken': (_req, res) => json(res, 409, { message: 'already taken' })
  })
  // Only the call meant to time out has a short timeout: on a loaded machine (tap's jobs on two
  // cores) 100 ms was sometimes too short for the others too, a 409 or a refused connection.
  const op = { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', properties: { id: { type: 'string' } } }, timeoutMs: 10_000 }
  const slowOp = { ...op, rest: 'GET /slow-items/:id', timeoutMs: 100 }
  const { url } = await wsApp(t, { build: { manifest: testManifest({ getItem: op, getSlowItem: slowOp }, { retries: 0 }), kernelUrl: kernel.url } })
  const client = await connect(t, url)
  const boom = await client.request({ id: '1', op: 'getItem', input: { id: 'boom' } })
  t.match(boom.error, { code: 'KERNEL_ERROR', status: 502 })
  t.notMatch(JSON.stringify(boom), /internal detail/, 'no Kernel internals reach the client')
  const slow = await client.request({ id: '2', op: 'getSlowItem', input: { id: 'slow' } })
  t.match(slow.error, { code: 'KERNEL_TIMEOUT', status: 504 })
  const taken = await client.request({ id: '3', op: 'getItem', input: { id: 'taken' } })
  t.match(taken.error, { code: 'KERNEL_REJECTED', status: 409, detail: 'already taken' })

  const down = await wsApp(t, { build: { manifest: testManifest({ getItem: op }, { retries: 0 }), kernelUrl: `http://127.0.0.1:${await closedPort()}` } })
  const other = await connect(t, down.url)
  const unavailable = await other.request({ id: '4', op: 'getItem', input: { id: 'x' } })
  t.match(unavailable.error, { code: 'KERNEL_UNAVAILABLE', status: 503 })
})

t.test('the upgrade needs a valid token: header or ?access_token=', async t => {
  const { app, url } = await wsApp(t)
  const now = Math.floor(Date.now() / 1000)
  const expired = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u1', tid: 't1', exp: now - 60 })
  const forged = token({ secret: 'another-secret-of-sufficient-length-000000' })
  const cases: Array<[string, string, Record<string, string>, RegExp]> = [
    ['no token', url, {}, /bearer token is required/],
    ['expired', url, { authorization: `Bearer ${expired}` }, /expired/],
    ['forged', url, { authorization: `Bearer ${forged}` }, /signature is invalid/],
    ['not bearer', url, { authorization: 'Basic dXNlcjpwYXNz' }, /must be "Bearer <token>"/],
    ['expired in the query', `${url}?access_token=${expired}`, {}, /expired/],
    ['empty query token', `${url}?access_token=`, {}, /bearer token is required/],
    ['repeated query token', `${url}?access_token=a&access_token=b`, {}, /bearer token is required/]
  ]
  for (const [name, target, headers, detail] of cases) {
    const refused = await refusedUpgrade(target, headers)
    t.equal(refused.status, 401, name)
    t.match(refused.type, /^application\/problem\+json/, name)
    t.match(refused.body, { code: 'UNAUTHENTICATED', status: 401, detail }, name)
  }

  const viaQuery = await connect(t, `${url}?access_token=${token({ tenant: 'q' })}`, null)
  const frame = await viaQuery.request({ id: 'q', op: 'kernelHeaders' })
  t.equal(frame.result['x-tenant-id'], 'q', 'the query token is the connection identity')

  const plain = await app.inject({ method: 'GET', url: '/ws', headers: bearer() })
  t.equal(plain.statusCode, 426, 'a plain GET is told to upgrade')
  t.equal(plain.headers.upgrade, 'websocket')
  t.match(plain.json(), { code: 'BAD_REQUEST', status: 426 })
})

t.test('a plain GET of /ws is a 426 whose Upgrade is named in Connection (RFC 9110 §7.8)', async t => {
  const { url } = await wsApp(t)
  const { port } = new URL(url)
  // Raw, as an intermediary reads it: Upgrade is hop-by-hop only when Connection names it, and a
  // sender of Upgrade MUST send that option. The 426 sent Upgrade with Connection: keep-alive.
  const answer = async (head: string): Promise<string> => await new Promise((resolve, reject) => {
    const socket = connectTcp(Number(port), '127.0.0.1', () => socket.write(head))
    let text = ''
    socket.setEncoding('latin1')
    socket.on('data', (chunk: string) => {
      text += chunk
      if (text.includes('\r\n\r\n')) { socket.destroy(); resolve(text.slice(0, text.indexOf('\r\n\r\n'))) }
    })
    socket.on('error', reject)
  })
  const header = (head: string, name: string): string | undefined => head.split('\r\n').find(line => line.toLowerCase().startsWith(name + ':'))?.slice(name.length + 1).trim().toLowerCase()
  const kept = await answer(`GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token()}\r\n\r\n`)
  t.match(kept, /^HTTP\/1\.1 426 /)
  t.equal(header(kept, 'upgrade'), 'websocket')
  t.match(header(kept, 'connection'), /(?:^|,)\s*upgrade\s*(?:,|$)/, 'Connection names upgrade')
  t.notMatch(header(kept, 'connection'), /close/, 'and the connection is kept')
  const once = await answer(`GET /ws HTTP/1.0\r\nAuthorization: Bearer ${token()}\r\n\r\n`)
  t.match(header(once, 'connection'), /(?:^|,)\s*upgrade\s*(?:,|$)/)
  t.match(header(once, 'connection'), /close/, 'an HTTP/1.0 request without keep-alive still has its connection closed')
})

t.test('with identity off, connections are anonymous', async t => {
  const { url } = await wsApp(t, { env: { BFF_AUTH_ENABLED: false } })
  const client = await connect(t, url, null)
  const frame = await client.request({ id: '1', op: 'kernelHeaders' })
  t.match(frame.result, { 'x-tenant-id': 'public', 'x-user-id': 'anonymous' })
  const auth = await client.request({ id: '2', auth: 'anything' })
  t.same(auth, { id: '2', authenticated: true, expiresAt: null }, 'an anonymous connection never expires')
  const sub = await client.request({ id: '3', subscribe: 'runUpdated' })
  t.same(sub, { id: '3', subscribed: 'runUpdated' }, 'no role is checked')
})

// With identity off the network in front authenticates callers (a proxy's cookie, perhaps, which
// a browser sends with a cross-site upgrade too), and CORS keeps other sites from reading REST's
// answers; every upgrade was accepted whatever its Origin, so any site a user inside that network
// opened read every operation's answers over /ws, /graphql and /trpc.
t.test('with identity off, an upgrade from another site\'s page is refused 403 on every face; same-origin, listed and non-browser ones are not', async t => {
  const env = { BFF_AUTH_ENABLED: false, BFF_TRPC_ENABLED: true, BFF_GRAPHQL_ENABLED: true }
  const { url } = await wsApp(t, { env })
  const { host } = new URL(url)
  const faces: Array<[string, string | undefined]> = [[url, undefined], [url.replace('/ws', '/graphql'), 'graphql-transport-ws'], [url.replace('/ws', '/trpc'), undefined]]
  for (const [at, protocol] of faces) {
    for (const origin of ['https://evil.example', 'null', `http://${host}.evil.example`, 'http://127.0.0.1:1', 'chrome-extension://abc']) {
      const refused = await upgrade(null, at, { origin }, protocol)
      t.equal(refused.status, 403, `${at} from ${origin}`)
      // In the face's error shape (problem+json on /ws): its text names the reason on every face.
      t.match(JSON.stringify(refused.body), /FORBIDDEN.*another site|another site.*FORBIDDEN/, `${at} from ${origin}`)
    }
    for (const headers of [{}, { origin: `http://${host}` }, { origin: `https://${host}` }] as Array<Record<string, string>>) {
      const open = await upgrade(t, at, headers, protocol)
      t.equal(open.status, 101, `${at} ${JSON.stringify(headers)}`)
      open.ws?.terminate()
    }
  }
  const client = await connect(t, url, null, { headers: { origin: `http://${host}` } })
  t.match(await client.request({ id: '1', op: 'kernelHeaders' }), { id: '1', result: { 'x-tenant-id': 'public' } }, 'a same-origin page is served')

  const listed = await wsApp(t, { env: { ...env, BFF_CORS_ORIGINS: 'https://app.example' } })
  t.equal((await upgrade(t, listed.url, { origin: 'https://app.example' })).status, 101, 'an origin BFF_CORS_ORIGINS names')
  t.equal((await upgrade(null, listed.url, { origin: 'https://evil.example' })).status, 403, 'and no other')

  const secured = await wsApp(t)
  t.equal((await upgrade(t, secured.url, { origin: 'https://evil.example', authorization: bearer().authorization })).status, 101, 'with identity on, a token is what a page needs, whatever its origin')
})

t.test('the face is off when BFF_WEBSOCKET_ENABLED=false', async t => {
  const { url } = await wsApp(t, { env: { BFF_WEBSOCKET_ENABLED: false, BFF_TRPC_ENABLED: false, BFF_GRAPHQL_ENABLED: false } })
  const res = await fetch(url.replace('ws:', 'http:'), { headers: bearer() })
  t.equal(res.status, 404)
  await res.body?.cancel()
})

t.test('the face as app.ts wires it, beside the other upgrading faces', async t => {
  const { url } = await wsApp(t, { env: { BFF_TRPC_ENABLED: true, BFF_GRAPHQL_ENABLED: true } })
  const client = await connect(t, url)
  t.match(await client.request({ id: '1', op: 'getAgent', input: { id: 'a1' } }), { id: '1', result: { id: 'a1' } })
})
