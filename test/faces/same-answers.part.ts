import t, { type Test } from 'tap'
import { randomUUID } from 'node:crypto'
import WebSocket from 'ws'
import {
  buildClientSchema, getIntrospectionQuery, getNamedType, isObjectType, isLeafType,
  type GraphQLSchema, type GraphQLField, type GraphQLOutputType, type IntrospectionQuery
} from 'graphql'
import type { FastifyInstance } from 'fastify'
import { buildTestApp, startTestKernel, testManifest, token, json, closedPort, type TokenOptions } from '../helper.js'
import { startKernel } from '../../kernel/server.js'
import type { Operation } from '../../manifest.js'

// CONTRACT §3: "The same input gives the same result and the same error code on every face."
// Every op of the demo manifest and of a test-only manifest runs over REST, the REST batch,
// tRPC, GraphQL and WebSocket; results and error codes must be the same on each.

type Outcome = { ok: true, value: unknown } | { ok: false, code: string, status: number }
type Face = (op: Operation, input: Record<string, unknown>, auth: string | undefined) => Promise<Outcome>
const FACES = ['rest', 'batch', 'trpc', 'graphql', 'websocket'] as const

/** GraphQL answers absent nullable fields with null where REST leaves them out: compare without. */
function normalize (value: unknown): unknown {
  if (Array.isArray(value)) return value.map(normalize)
  if (value === null || typeof value !== 'object') return value
  const out: Record<string, unknown> = {}
  for (const [k, v] of Object.entries(value)) if (v !== null && v !== undefined) out[k] = normalize(v)
  return out
}

async function faces (t: Test, app: FastifyInstance): Promise<Record<typeof FACES[number], Face>> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as { port: number }).port
  const headers = (auth: string | undefined): Record<string, string> => auth === undefined ? {} : { authorization: auth }

  const rest: Face = async (op, input, auth) => {
    let url = '/api/v1' + op.path
    const rest: Record<string, unknown> = { ...input }
    for (const p of op.pathParams) { url = url.replace(`:${p}`, encodeURIComponent(String(input[p]))); delete rest[p] }
    const res = op.inputInBody
      ? await app.inject({ method: op.method, url, headers: headers(auth), payload: rest })
      : await app.inject({ method: op.method, url: url + '?' + new URLSearchParams(Object.entries(rest).map(([k, v]): [string, string] => [k, String(v)])).toString(), headers: headers(auth) })
    if (res.statusCode < 300) return { ok: true, value: res.statusCode === 204 ? null : res.json() }
    return { ok: false, code: res.json().code, status: res.statusCode }
  }

  const batch: Face = async (op, input, auth) => {
    const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: headers(auth), payload: { calls: [{ id: 'x', op: op.name, input }] } })
    // Refused whole before its body is read (no valid token): the batch's own problem.
    if (res.statusCode !== 200) return { ok: false, code: res.json().code, status: res.statusCode }
    const [r] = res.json().results as Array<{ result?: unknown, error?: { code: string, status: number } }>
    return r.error === undefined ? { ok: true, value: r.result } : { ok: false, code: r.error.code, status: r.error.status }
  }

  const trpc: Face = async (op, input, auth) => {
    const res = op.type === 'query'
      ? await app.inject({ method: 'GET', url: `/trpc/${op.name}?input=${encodeURIComponent(JSON.stringify(input))}`, headers: headers(auth) })
      : await app.inject({ method: 'POST', url: `/trpc/${op.name}`, headers: headers(auth), payload: input })
    const body = res.json() as { result?: { data: unknown }, error?: { data: { code: string, httpStatus: number } } }
    return body.error === undefined ? { ok: true, value: body.result!.data } : { ok: false, code: body.error.data.code, status: body.error.data.httpStatus }
  }

  const introspection = await app.inject({ method: 'POST', url: '/graphql', headers: { authorization: `Bearer ${token()}` }, payload: { query: getIntrospectionQuery() } })
  const schema: GraphQLSchema = buildClientSchema((introspection.json() as { data: IntrospectionQuery }).data)
  const selection = (type: GraphQLOutputType, depth = 0): string => {
    const named = getNamedType(type)
    if (isLeafType(named) || !isObjectType(named) || depth > 8) return ''
    return '{ ' + Object.values(named.getFields()).map(f => f.name + ' ' + selection(f.type, depth + 1)).join(' ') + ' }'
  }
  const graphql: Face = async (op, input, auth) => {
    const root = op.type === 'query' ? schema.getQueryType()! : schema.getMutationType()!
    const field: GraphQLField<unknown, unknown> = root.getFields()[op.name]
    const single = field.args.length === 1 && field.args[0].name === 'input' && !('input' in ((op.input.properties ?? {}) as object))
    const variables: Record<string, unknown> = single ? { input } : input
    const args = field.args.filter(a => a.name in variables)
    const decl = args.length === 0 ? '' : '(' + args.map(a => `$${a.name}: ${String(a.type)}`).join(', ') + ')'
    const pass = args.length === 0 ? '' : '(' + args.map(a => `${a.name}: $${a.name}`).join(', ') + ')'
    const query = `${op.type === 'query' ? 'query' : 'mutation'} Call${decl} { ${op.name}${pass} ${selection(field.type)} }`
    const res = await app.inject({ method: 'POST', url: '/graphql', headers: headers(auth), payload: { query, variables } })
    const body = res.json() as { data?: Record<string, unknown> | null, errors?: Array<{ message: string, extensions?: { code: string, status: number } }> }
    if (body.errors !== undefined && body.errors.length > 0) {
      const e = body.errors[0]
      if (e.extensions === undefined) throw new Error(`GraphQL error without extensions for ${op.name}: ${e.message} (${query})`)
      return { ok: false, code: e.extensions.code, status: e.extensions.status }
    }
    return { ok: true, value: body.data![op.name] }
  }

  // One connection per token; a token the upgrade refuses gives the refusal's problem instead.
  const sockets = new Map<string, WebSocket | { code: string, status: number }>()
  t.teardown(() => { for (const s of sockets.values()) if (s instanceof WebSocket) s.terminate() })
  const connect = async (auth: string | undefined): Promise<WebSocket | { code: string, status: number }> => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers: headers(auth) })
    ws.on('error', () => {})
    return await new Promise(resolve => {
      ws.once('open', () => resolve(ws))
      ws.once('unexpected-response', (req, res) => {
        let text = ''
        res.on('data', (c: Buffer) => { text += c.toString() })
        res.on('end', () => { req.destroy(); resolve(JSON.parse(text) as { code: string, status: number }) })
      })
    })
  }
  const websocket: Face = async (op, input, auth) => {
    const key = auth ?? ''
    let ws = sockets.get(key)
    if (ws === undefined) {
      ws = await connect(auth)
      sockets.set(key, ws)
    }
    if (!(ws instanceof WebSocket)) return { ok: false, code: ws.code, status: ws.status }
    const socket = ws
    const id = randomUUID()
    const answer = new Promise<{ result?: unknown, error?: { code: string, status: number } }>(resolve => {
      const onMessage = (data: WebSocket.RawData): void => {
        const frame = JSON.parse(String(data)) as { id?: string, result?: unknown, error?: { code: string, status: number } }
        if (frame.id === id) { socket.off('message', onMessage); resolve(frame) }
      }
      socket.on('message', onMessage)
    })
    socket.send(JSON.stringify({ id, op: op.name, input }))
    const frame = await answer
    return frame.error === undefined ? { ok: true, value: frame.result } : { ok: false, code: frame.error.code, status: frame.error.status }
  }
  return { rest, batch, trpc, graphql, websocket }
}

interface Case { name: string, op: string, input: Record<string, unknown>, auth?: TokenOptions | 'none', expect: { ok: true, strip?: string[] } | { code: string, status: number } }

async function runTable (t: Test, app: FastifyInstance, cases: Case[]): Promise<void> {
  const byFace = await faces(t, app)
  for (const c of cases) {
    const op = app.pipeline.manifest.byName.get(c.op)!
    const outcomes: Partial<Record<typeof FACES[number], Outcome>> = {}
    for (const face of FACES) {
      // Each face works in a tenant of its own, so the same mutation gives the same answer.
      const tokenOptions = c.auth === 'none' ? undefined : { tenant: `same-${face}`, ...c.auth }
      const auth = tokenOptions === undefined ? undefined : `Bearer ${token(tokenOptions)}`
      outcomes[face] = await byFace[face](op, structuredClone(c.input), auth)
    }
    const strip = 'ok' in c.expect ? c.expect.strip ?? [] : []
    const view = (o: Outcome): unknown => o.ok ? { ok: true, value: normalize(JSON.parse(JSON.stringify(o.value, (k, v) => strip.includes(k) ? undefined : v))) } : o
    if ('ok' in c.expect) t.ok(outcomes.rest!.ok, `${c.name}: REST succeeds`)
    else t.same(outcomes.rest, { ok: false, ...c.expect }, `${c.name}: REST answers ${c.expect.code}`)
    for (const face of FACES) t.same(view(outcomes[face]!), view(outcomes.rest!), `${c.name}: ${face} answers as REST`)
  }
}

t.test('the demo manifest answers the same on every face', async t => {
  // Runs stay queued (no background change) so every face reads the same run.
  const kernel = await startKernel({ port: 0, runDelayMs: 600_000 })
  t.teardown(() => kernel.close())
  const app = await buildTestApp(t, {}, { kernelUrl: kernel.url })
  const times = ['createdAt', 'updatedAt']
  await runTable(t, app, [
    { name: 'list agents', op: 'listAgents', input: { limit: 2 }, expect: { ok: true } },
    { name: 'get an agent', op: 'getAgent', input: { id: 'a1' }, expect: { ok: true } },
    { name: 'search documents', op: 'searchDocuments', input: { q: 'a' }, expect: { ok: true } },
    { name: 'a restricted document', op: 'getDocument', input: { id: 'd1' }, expect: { ok: true } },
    { name: 'create an agent', op: 'createAgent', input: { name: 'Same everywhere', model: 'm1' }, expect: { ok: true, strip: times } },
    { name: 'update an agent', op: 'updateAgent', input: { id: 'a2', name: 'Renamed' }, expect: { ok: true, strip: times } },
    { name: 'start a run', op: 'runAgent', input: { id: 'a1', prompt: 'Summarise the report' }, expect: { ok: true, strip: times } },
    { name: 'read the run', op: 'getRun', input: { id: 'r1' }, expect: { ok: true, strip: times } },
    { name: 'list the runs', op: 'listRuns', input: { id: 'a1' }, expect: { ok: true, strip: times } },
    { name: 'delete an agent', op: 'deleteAgent', input: { id: 'a3' }, expect: { ok: true, strip: times } },
    { name: 'no token', op: 'getAgent', input: { id: 'a1' }, auth: 'none', expect: { code: 'UNAUTHENTICATED', status: 401 } },
    { name: 'expired token', op: 'getAgent', input: { id: 'a1' }, auth: { ttlSeconds: -60 }, expect: { code: 'UNAUTHENTICATED', status: 401 } },
    { name: 'forged token', op: 'listAgents', input: {}, auth: { secret: 'a-different-secret-that-is-long-enough-0000' }, expect: { code: 'UNAUTHENTICATED', status: 401 } },
    { name: 'missing role', op: 'runAgent', input: { id: 'a1', prompt: 'x' }, auth: { roles: ['viewer'] }, expect: { code: 'FORBIDDEN', status: 403 } },
    { name: 'zone too low', op: 'getDocument', input: { id: 'd1' }, auth: { roles: ['viewer'], zone: 'internal' }, expect: { code: 'FORBIDDEN', status: 403 } },
    { name: 'not system', op: 'kernelHeaders', input: {}, auth: { roles: ['viewer'], zone: 'restricted' }, expect: { code: 'FORBIDDEN', status: 403 } },
    { name: 'limit out of range', op: 'listAgents', input: { limit: 1000 }, expect: { code: 'VALIDATION_FAILED', status: 400 } },
    { name: 'prompt missing', op: 'runAgent', input: { id: 'a1' }, expect: { code: 'VALIDATION_FAILED', status: 400 } },
    { name: 'unknown agent', op: 'getAgent', input: { id: 'zz' }, expect: { code: 'NOT_FOUND', status: 404 } },
    { name: 'unknown run', op: 'getRun', input: { id: 'r999' }, expect: { code: 'NOT_FOUND', status: 404 } }
  ])
})

t.test('a test-only manifest answers the same on every face, Kernel failures included', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/parcels/p1': (_req, res) => json(res, 200, { id: 'p1', weightGrams: 1200, fragile: true, tags: ['glass'], internal: 'x' }),
    'GET /v1/parcels/broken': (_req, res) => json(res, 500, { message: 'database on fire' }),
    'GET /v1/parcels/slow': (_req, res) => { setTimeout(() => json(res, 200, { id: 'slow' }), 2000).unref() },
    'POST /v1/parcels': (req, res) => json(res, 201, { id: 'p2', ...(JSON.parse(req.body) as object) }),
    'POST /v1/parcels/locked/deliveries': (_req, res) => json(res, 409, { message: 'parcel is locked' })
  })
  const parcel = { type: 'object', required: ['id'], properties: { id: { type: 'string' }, weightGrams: { type: 'integer', minimum: 0, maximum: 100000 }, fragile: { type: 'boolean' }, tags: { type: 'array', items: { type: 'string' } } } }
  const manifest = testManifest({
    trackParcel: { type: 'query', rest: 'GET /parcels/:id', kernel: 'GET /v1/parcels/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { $ref: '#/schemas/Parcel' }, timeoutMs: 750 },
    sendParcel: { type: 'mutation', rest: 'POST /parcels', kernel: 'POST /v1/parcels', input: { type: 'object', required: ['weightGrams'], additionalProperties: false, properties: { weightGrams: { type: 'integer', minimum: 1, maximum: 100000 }, fragile: { type: 'boolean' }, tags: { type: 'array', items: { type: 'string' } } } }, output: { $ref: '#/schemas/Parcel' } },
    deliver: { type: 'mutation', rest: 'POST /parcels/:id/deliveries', kernel: 'POST /v1/parcels/{id}/deliveries', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { $ref: '#/schemas/Parcel' } }
  }, { retries: 0, circuitBreaker: { threshold: 1000, resetTimeoutMs: 1000 } }, { schemas: { Parcel: parcel } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  await runTable(t, app, [
    { name: 'track', op: 'trackParcel', input: { id: 'p1' }, expect: { ok: true } },
    { name: 'send', op: 'sendParcel', input: { weightGrams: 500, fragile: false, tags: ['a', 'b'] }, expect: { ok: true } },
    { name: 'too heavy', op: 'sendParcel', input: { weightGrams: 1e6 }, expect: { code: 'VALIDATION_FAILED', status: 400 } },
    { name: 'wrong type', op: 'sendParcel', input: { weightGrams: 5, fragile: 'yes' }, expect: { code: 'VALIDATION_FAILED', status: 400 } },
    { name: 'Kernel 404', op: 'trackParcel', input: { id: 'nowhere' }, expect: { code: 'NOT_FOUND', status: 404 } },
    { name: 'Kernel 409', op: 'deliver', input: { id: 'locked' }, expect: { code: 'KERNEL_REJECTED', status: 409 } },
    { name: 'Kernel 500', op: 'trackParcel', input: { id: 'broken' }, expect: { code: 'KERNEL_ERROR', status: 502 } },
    { name: 'Kernel too slow', op: 'trackParcel', input: { id: 'slow' }, expect: { code: 'KERNEL_TIMEOUT', status: 504 } }
  ])
})

t.test('an unreachable Kernel is 503 on every face', async t => {
  const port = await closedPort()
  const manifest = testManifest({
    ping: { type: 'query', rest: 'GET /ping', kernel: 'GET /v1/ping', output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  }, { retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: `http://127.0.0.1:${port}` })
  await runTable(t, app, [{ name: 'refused', op: 'ping', input: {}, expect: { code: 'KERNEL_UNAVAILABLE', status: 503 } }])
})

// The serializer wrote what the schema says without checking it: a null for a required string
// went out as "", 1.5 for an integer as 1, "12" for a number as 12, and an enum value the
// manifest does not list went out as sent everywhere but GraphQL, which answered KERNEL_ERROR.
t.test('a Kernel answer that breaks the output schema is KERNEL_ERROR on every face', async t => {
  const shape = { id: 's', name: 'n', sides: 3, size: 1.5, level: 'low' }
  const answers: Record<string, unknown> = {
    s1: { name: 'no id' },
    nullName: { ...shape, name: null },
    halfSides: { ...shape, sides: 1.5 },
    textSize: { ...shape, size: '12' },
    numberId: { ...shape, id: 12 },
    newLevel: { ...shape, level: 'medium' },
    listed: { ...shape, undeclared: 'dropped' }
  }
  // Numbers past a double's range: JSON.parse reads them as Infinity, which JSON cannot carry.
  const texts: Record<string, string> = {
    hugeSize: '{"id":"s","name":"n","sides":3,"size":1e400,"level":"low"}',
    hugeSides: '{"id":"s","name":"n","sides":-1e400,"size":1.5,"level":"low"}',
    // Integers past 2^53 - 1: JSON.parse reads them rounded (9007199254740993 as ...992), and
    // the client was answered another number, another id, as an input beyond them would be.
    unsafeSides: '{"id":"s","name":"n","sides":9007199254740993,"size":1.5,"level":"low"}',
    unsafeNegative: '{"id":"s","name":"n","sides":-9007199254740992,"size":1.5,"level":"low"}',
    safeSides: '{"id":"s","name":"n","sides":9007199254740991,"size":1.5,"level":"low"}',
    bigSize: '{"id":"s","name":"n","sides":3,"size":9007199254740993,"level":"low"}'
  }
  const kernel = await startTestKernel(t, {
    ...Object.fromEntries(Object.entries(answers).map(([id, answer]) => [`GET /v1/shapes/${id}`, (_req, res) => json(res, 200, answer)])),
    ...Object.fromEntries(Object.entries(texts).map(([id, text]) => [`GET /v1/shapes/${id}`, (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(text) }]))
  })
  const manifest = testManifest({
    getShape: { type: 'query', rest: 'GET /shapes/:id', kernel: 'GET /v1/shapes/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', required: ['id'], additionalProperties: false, properties: { id: { type: 'string' }, name: { type: 'string' }, sides: { type: 'integer' }, size: { type: 'number' }, level: { type: 'string', enum: ['low', 'high'] } } } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const broken = { code: 'KERNEL_ERROR', status: 502 }
  await runTable(t, app, [
    { name: 'broken answer', op: 'getShape', input: { id: 's1' }, expect: broken },
    { name: 'null for a string', op: 'getShape', input: { id: 'nullName' }, expect: broken },
    { name: 'a fraction for an integer', op: 'getShape', input: { id: 'halfSides' }, expect: broken },
    { name: 'text for a number', op: 'getShape', input: { id: 'textSize' }, expect: broken },
    { name: 'a number for a string', op: 'getShape', input: { id: 'numberId' }, expect: broken },
    { name: 'an enum value not listed', op: 'getShape', input: { id: 'newLevel' }, expect: broken },
    // Written null by the serializer (REST, tRPC, /ws) where the schema wants a number, while
    // GraphQL refused it (Float cannot represent Infinity).
    { name: 'a number beyond a double', op: 'getShape', input: { id: 'hugeSize' }, expect: broken },
    { name: 'an integer beyond a double', op: 'getShape', input: { id: 'hugeSides' }, expect: broken },
    { name: 'an integer beyond 2^53 - 1', op: 'getShape', input: { id: 'unsafeSides' }, expect: broken },
    { name: 'an integer below -(2^53 - 1)', op: 'getShape', input: { id: 'unsafeNegative' }, expect: broken },
    { name: 'an integer of 2^53 - 1', op: 'getShape', input: { id: 'safeSides' }, expect: { ok: true } },
    // A `number` is a double: the schema asks for no more than JSON.parse reads.
    { name: 'a number beyond 2^53', op: 'getShape', input: { id: 'bigSize' }, expect: { ok: true } },
    // A Kernel may add a field before the manifest names it: dropped, even under additionalProperties false.
    { name: 'an undeclared field', op: 'getShape', input: { id: 'listed' }, expect: { ok: true } }
  ])
  const listed = await app.inject({ method: 'GET', url: '/api/v1/shapes/listed', headers: { authorization: `Bearer ${token()}` } })
  t.same(listed.json(), shape, 'the undeclared field is dropped')
  const unsafe = await app.inject({ method: 'GET', url: '/api/v1/shapes/unsafeSides', headers: { authorization: `Bearer ${token()}` } })
  t.match(unsafe.json().detail, /output\.sides must be <= 9007199254740991/, 'the field at fault is named')
})

t.test('a Kernel answer nested more than 512 levels deep where its schema leaves it free is KERNEL_ERROR on every face', async t => {
  // Objects and arrays n levels deep in all, the answer's own object counted.
  const arrays = (n: number): string => '['.repeat(n) + ']'.repeat(n)
  const texts: Record<string, string> = {
    free512: `{"id":"x","data":${arrays(511)}}`,
    free513: `{"id":"x","data":${arrays(512)}}`,
    // Deep, and well within what the serializer writes: every face sent it.
    free1000: `{"id":"x","data":${arrays(999)}}`,
    freeDeepest: `{"id":"x","data":${arrays(100_000)}}`,
    list1000: `{"id":"x","list":[${arrays(998)}]}`,
    more1000: `{"id":"x","more":{"k":${arrays(998)}}}`,
    // Undeclared: dropped by the serializer, whatever its depth.
    undeclared: `{"id":"x","zzz":${arrays(100_000)}}`
  }
  const kernel = await startTestKernel(t, Object.fromEntries(Object.entries(texts).map(([id, text]) => [`GET /v1/blobs/${id}`, (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(text) }])))
  const manifest = testManifest({
    getBlob: { type: 'query', rest: 'GET /blobs/:id', kernel: 'GET /v1/blobs/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', required: ['id'], properties: { id: { type: 'string' }, data: {}, list: { type: 'array' }, more: { type: 'object', additionalProperties: true } } } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const tooDeep = { code: 'KERNEL_ERROR', status: 502 }
  await runTable(t, app, [
    { name: '512 levels', op: 'getBlob', input: { id: 'free512' }, expect: { ok: true } },
    { name: '513 levels', op: 'getBlob', input: { id: 'free513' }, expect: tooDeep },
    { name: '1,000 levels', op: 'getBlob', input: { id: 'free1000' }, expect: tooDeep },
    { name: '100,001 levels', op: 'getBlob', input: { id: 'freeDeepest' }, expect: tooDeep },
    { name: 'an array without items', op: 'getBlob', input: { id: 'list1000' }, expect: tooDeep },
    { name: 'additionalProperties', op: 'getBlob', input: { id: 'more1000' }, expect: tooDeep },
    { name: 'an undeclared field', op: 'getBlob', input: { id: 'undeclared' }, expect: { ok: true } }
  ])
  const res = await app.inject({ method: 'GET', url: '/api/v1/blobs/free1000', headers: { authorization: `Bearer ${token()}` } })
  t.equal(res.json().detail, "The Kernel's answer to getBlob nests objects and arrays more than 512 levels deep")

  // GraphQL serializes its answer again, a few levels deeper than REST's: just below the depth
  // at which the serializer itself fails (about where JSON.stringify does), the output check
  // passed it and GraphQL answered 500 INTERNAL (4,112 levels on one machine). Around that depth,
  // found in this process, it is KERNEL_ERROR like any answer too deep.
  let lo = 1
  let hi = 1_000_000
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2)
    try {
      JSON.stringify(JSON.parse(arrays(mid)))
      lo = mid
    } catch {
      hi = mid
    }
  }
  let depth = 0
  kernel.on('GET /v1/blobs/sweep', (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(`{"id":"x","data":${arrays(depth)}}`) })
  const codes = new Map<string, number>()
  for (depth = lo - 60; depth <= lo + 20; depth++) {
    const gql = await app.inject({ method: 'POST', url: '/graphql', headers: { authorization: `Bearer ${token()}` }, payload: { query: '{ getBlob(id: "sweep") { id data } }' } })
    const code = gql.statusCode !== 200 ? `status ${gql.statusCode} ${String(gql.json().errors?.[0]?.extensions?.code)}` : String(gql.json().errors?.[0]?.extensions?.code)
    codes.set(code, (codes.get(code) ?? 0) + 1)
  }
  t.same([...codes], [['KERNEL_ERROR', 81]], `GraphQL answers KERNEL_ERROR from ${lo - 60} to ${lo + 20} levels`)
})

// Undeclared fields are opened (dropped, not refused) only where that admits more: under a
// oneOf whose branches are told apart by additionalProperties false, opened, a right answer
// matched both branches and was refused.
t.test('an output schema whose oneOf branches are closed objects serves each branch on every face', async t => {
  const answers: Record<string, unknown> = { a: { x: 'one' }, b: { y: 2 }, both: { x: 'one', y: 2 }, neither: { z: true } }
  const kernel = await startTestKernel(t, Object.fromEntries(Object.entries(answers).map(([id, answer]) => [`GET /v1/one/${id}`, (_req, res) => json(res, 200, answer)])))
  const manifest = testManifest({
    getOne: { type: 'query', rest: 'GET /one/:id', kernel: 'GET /v1/one/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { oneOf: [{ type: 'object', additionalProperties: false, properties: { x: { type: 'string' } } }, { type: 'object', additionalProperties: false, properties: { y: { type: 'number' } } }] } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  await runTable(t, app, [
    { name: 'the first branch', op: 'getOne', input: { id: 'a' }, expect: { ok: true } },
    { name: 'the second branch', op: 'getOne', input: { id: 'b' }, expect: { ok: true } },
    { name: 'no branch', op: 'getOne', input: { id: 'neither' }, expect: { code: 'KERNEL_ERROR', status: 502 } }
  ])
  const a = await app.inject({ method: 'GET', url: '/api/v1/one/a', headers: { authorization: `Bearer ${token()}` } })
  t.same(a.json(), { x: 'one' })
})

// The serializer picks an anyOf branch by its closed schemas: an answer the opened check passed
// was refused there, a 502 that named no field.
t.test('an output schema whose anyOf branches are closed objects is checked as written, naming the field at fault', async t => {
  const answers: Record<string, unknown> = { a: { x: 'one' }, b: { y: 2 }, extra: { x: 'one', extra: 1 } }
  const kernel = await startTestKernel(t, Object.fromEntries(Object.entries(answers).map(([id, answer]) => [`GET /v1/any/${id}`, (_req, res) => json(res, 200, answer)])))
  const manifest = testManifest({
    getAny: { type: 'query', rest: 'GET /any/:id', kernel: 'GET /v1/any/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { anyOf: [{ type: 'object', additionalProperties: false, properties: { x: { type: 'string' } } }, { type: 'object', additionalProperties: false, properties: { y: { type: 'number' } } }] } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  await runTable(t, app, [
    { name: 'the first branch', op: 'getAny', input: { id: 'a' }, expect: { ok: true } },
    { name: 'the second branch', op: 'getAny', input: { id: 'b' }, expect: { ok: true } },
    { name: 'a field no branch declares', op: 'getAny', input: { id: 'extra' }, expect: { code: 'KERNEL_ERROR', status: 502 } }
  ])
  const extra = await app.inject({ method: 'GET', url: '/api/v1/any/extra', headers: { authorization: `Bearer ${token()}` } })
  t.match(extra.json(), { code: 'KERNEL_ERROR', detail: /output\.extra is not allowed/ }, 'the field at fault is named')
})

// A nullable object written as OpenAPI 3.1 does with a $ref, anyOf [object, null]: with one object
// among the branches, closing it decides nothing. It was kept closed, and a field the Kernel added
// was a 502 on every face, where type [object, null] dropped it.
t.test('a nullable object written anyOf [object, null] drops a field the Kernel adds, on every face', async t => {
  const answers: Record<string, unknown> = { added: { item: { x: 'one', extra: 1 } }, none: { item: null }, wrong: { item: { x: 5 } } }
  const kernel = await startTestKernel(t, Object.fromEntries(Object.entries(answers).map(([id, answer]) => [`GET /v1/maybe/${id}`, (_req, res) => json(res, 200, answer)])))
  const manifest = testManifest({
    getMaybe: { type: 'query', rest: 'GET /maybe/:id', kernel: 'GET /v1/maybe/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', properties: { item: { anyOf: [{ type: 'object', additionalProperties: false, properties: { x: { type: 'string' } } }, { type: 'null' }] } } } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  await runTable(t, app, [
    { name: 'an added field', op: 'getMaybe', input: { id: 'added' }, expect: { ok: true } },
    { name: 'null', op: 'getMaybe', input: { id: 'none' }, expect: { ok: true } },
    { name: 'a wrong type', op: 'getMaybe', input: { id: 'wrong' }, expect: { code: 'KERNEL_ERROR', status: 502 } }
  ])
  const added = await app.inject({ method: 'GET', url: '/api/v1/maybe/added', headers: { authorization: `Bearer ${token()}` } })
  t.same(added.json(), { item: { x: 'one' } }, 'the added field is dropped')
  const wrong = await app.inject({ method: 'GET', url: '/api/v1/maybe/wrong', headers: { authorization: `Bearer ${token()}` } })
  t.match(wrong.json(), { code: 'KERNEL_ERROR', detail: /output\.item\.x must be string/ }, 'the field at fault is named')
})

// Ajv reports each anyOf branch's first error: the null branch's, listed first, was named for an
// object that failed inside the object branch ("output.item must be null").
t.test('an answer an anyOf refuses names the error of the branch it came closest to, on REST and GraphQL alike', async t => {
  const answers: Record<string, unknown> = { wrong: { item: { x: 5 } }, missing: { item: {} }, text: { item: 'text' } }
  const kernel = await startTestKernel(t, Object.fromEntries(Object.entries(answers).map(([id, answer]) => [`GET /v1/maybe/${id}`, (_req, res) => json(res, 200, answer)])))
  const manifest = testManifest({
    getMaybe: { type: 'query', rest: 'GET /maybe/:id', kernel: 'GET /v1/maybe/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', properties: { item: { anyOf: [{ type: 'null' }, { type: 'object', required: ['x'], properties: { x: { type: 'string' } } }] } } } }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const expected: Record<string, string> = { wrong: 'output.item.x must be string', missing: 'output.item.x is required', text: 'output.item must be null or object' }
  for (const [id, detail] of Object.entries(expected)) {
    const message = `The Kernel's answer to getMaybe does not match its output schema: ${detail}`
    const rest = await app.inject({ method: 'GET', url: `/api/v1/maybe/${id}`, headers: { authorization: `Bearer ${token()}` } })
    t.match(rest.json(), { code: 'KERNEL_ERROR', detail: message }, `REST: ${id}`)
    const gql = await app.inject({ method: 'POST', url: '/graphql', headers: { authorization: `Bearer ${token()}` }, payload: { query: `{ getMaybe(id: "${id}") { item { x } } }` } })
    t.match(gql.json(), { errors: [{ message, extensions: { code: 'KERNEL_ERROR' } }] }, `GraphQL: ${id}`)
  }
})
