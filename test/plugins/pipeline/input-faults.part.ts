// Every face forwards only input its schema accepts: a number JSON cannot carry, and a key an
// upstream would take for a prototype, are refused (inputFault, in the validation stage).
import t from 'tap'
import { once } from 'node:events'
import WebSocket from 'ws'
import { inputFault } from '../../../plugins/pipeline/index.js'
import { buildTestApp, startTestKernel, testManifest, json, bearer, until } from '../../helper.js'

t.test('a number too large for a double (1e400) is not turned into null or "Infinity" on its way to the Kernel', async t => {
  // JSON.parse('1e400') is Infinity and a query's "1e400" is coerced to Infinity; Ajv's `number`
  // admits Infinity. Sent on, the Kernel would receive `null` in a JSON body (what
  // JSON.stringify makes of Infinity) for a field the schema says is a number, or the string
  // "Infinity" in a query: the validation stage refuses such input.
  const kernel = await startTestKernel(t, {
    'POST /v1/m': (req, res) => json(res, 200, { body: req.body }),
    'GET /v1/q': (req, res) => json(res, 200, { url: req.url })
  })
  const output = { type: 'object', additionalProperties: true }
  const manifest = testManifest({
    m: { type: 'mutation', rest: 'POST /m', kernel: 'POST /v1/m', input: { type: 'object', properties: { amount: { type: 'number' } } }, output },
    q: { type: 'query', rest: 'GET /q', kernel: 'GET /v1/q', input: { type: 'object', properties: { amount: { type: 'number' } } }, output }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })

  const body = await app.inject({ method: 'POST', url: '/api/v1/m', headers: { ...bearer(), 'content-type': 'application/json' }, payload: '{"amount":1e400}' })
  t.equal(body.statusCode, 400, 'refused: not a finite number')
  t.match(body.json(), { code: 'VALIDATION_FAILED' })
  const query = await app.inject({ url: '/api/v1/q?amount=1e400', headers: bearer() })
  t.equal(query.statusCode, 400, 'refused: not a finite number')
  t.same(kernel.requests.map(r => `${r.method} ${r.url} ${r.body}`), [], 'the Kernel never sees {"amount":null} nor amount=Infinity')
})

t.test('inputFault: anywhere in the input, and a deep input does not exhaust the stack', async t => {
  t.equal(inputFault({ a: 1, b: [1, 2, { c: -0 }], d: 'Infinity' }), null)
  t.match(inputFault({ a: [{ b: [Infinity] }] }), /finite/)
  t.match(inputFault({ a: -Infinity }), /finite/)
  t.match(inputFault({ a: Number.NaN }), /finite/)
  let deep: unknown = [1e308]
  for (let i = 0; i < 200_000; i++) deep = [deep]
  t.match(inputFault({ deep }), /more than 256 levels deep/, 'refused, without exhausting the stack')
  // The input object is level 1: 255 arrays inside it are 256 levels, one more is too deep.
  let edge: unknown = []
  for (let i = 1; i < 255; i++) edge = [edge]
  t.equal(inputFault({ edge }), null)
  t.match(inputFault({ edge: [edge] }), /levels deep/)
})

t.test('a deeply nested input is a 400 on every path, never the 500 of a stack overflow after validation', async t => {
  // Validation walked it iteratively, but the Kernel request's JSON and the keys of the cache and
  // the idempotency store recurse: 40 KB of nested arrays in a free-form field was a 500.
  const kernel = await startTestKernel(t, { 'POST /v1/items': (_req, res) => json(res, 201, { ok: true }) })
  const data = { type: 'object', properties: { data: { type: 'array' } } }
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    createItem: { type: 'mutation', rest: 'POST /items', kernel: 'POST /v1/items', input: data, output },
    findItems: { type: 'query', rest: 'POST /items/find', kernel: 'POST /v1/items', input: data, output, cache: { ttlSeconds: 10 } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const nested = (n: number): string => '{"data":' + '['.repeat(n) + ']'.repeat(n) + '}' // by hand: JSON.stringify would overflow too
  const headers = { ...bearer(), 'content-type': 'application/json' }
  for (const [url, extra] of [['/api/v1/items', {}], ['/api/v1/items', { 'idempotency-key': 'deep-1' }], ['/api/v1/items/find', {}]] as const) {
    const res = await app.inject({ method: 'POST', url, headers: { ...headers, ...extra }, payload: nested(20_000) })
    t.equal(res.statusCode, 400, `${url} ${JSON.stringify(extra)}`)
    t.match(res.json(), { code: 'VALIDATION_FAILED', detail: /levels deep/ })
    t.equal((await app.inject({ method: 'POST', url, headers: { ...headers, ...extra }, payload: nested(255) })).statusCode < 300, true, 'at the bound: served')
  }
  t.equal(kernel.requests.length, 3, 'only the calls at the bound reached the Kernel')
})

// An input with a "__proto__" key is refused on every face (by the pipeline, after the token and
// the roles; REST's parser keeps the key for it): an upstream that merges its input into an
// object would take the key as a prototype.

t.test('an input holding "__proto__" or constructor.prototype is refused on every face, and never reaches the Kernel', async t => {
  const kernel = await startTestKernel(t, { 'POST /v1/things': (req, res) => json(res, 200, { body: req.body }) })
  const manifest = testManifest({
    makeThing: { type: 'mutation', rest: 'POST /things', kernel: 'POST /v1/things', input: { type: 'object', properties: { meta: { type: 'object' } } }, output: { type: 'object', additionalProperties: true } }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const headers = { ...bearer(), 'content-type': 'application/json' }
  for (const body of ['{"meta":{"__proto__":{"polluted":true}}}', '{"meta":{"constructor":{"prototype":{"polluted":true}}}}', '{"__proto__":{"meta":1}}']) {
    const rest = await app.inject({ method: 'POST', url: '/api/v1/things', headers, payload: body })
    t.equal(rest.statusCode, 400, `REST: ${body}`)
    const single = await app.inject({ method: 'POST', url: '/trpc/makeThing', headers, payload: body })
    t.equal(single.statusCode, 400, `tRPC: ${body}`)
    t.match(single.json(), { error: { data: { code: 'VALIDATION_FAILED' } } })
    const batch = await app.inject({ method: 'POST', url: '/trpc/makeThing,makeThing?batch=1', headers, payload: `{"0":${body},"1":{"meta":{}}}` })
    const answers = batch.json() as Array<{ result?: unknown, error?: { data: { code: string } } }>
    t.match(answers[0], { error: { data: { code: 'VALIDATION_FAILED' } } }, `tRPC batch: ${body}`)
    t.ok(answers[1].result !== undefined, 'the batch\'s other call is answered')
  }
  t.same(kernel.requests.map(r => r.body), ['{"meta":{}}', '{"meta":{}}', '{"meta":{}}'], 'only the clean calls reached the Kernel')

  // A REST batch refused such a call's batch whole (its parser refused the body): now that call
  // alone, as a tRPC batch does; the batch's own keys stay closed.
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: '{"calls":[{"id":"a","op":"makeThing","input":{"meta":{"__proto__":{"polluted":true}}}},{"id":"b","op":"makeThing","input":{"meta":{}}}]}' })
  t.equal(batch.statusCode, 200)
  t.match(batch.json().results, [{ id: 'a', error: { code: 'VALIDATION_FAILED', detail: 'The input contains a forbidden prototype property' } }, { id: 'b', result: {} }])
  for (const body of ['{"calls":[],"__proto__":{"x":1}}', '{"calls":[{"id":"a","op":"makeThing","input":{},"__proto__":{"x":1}}]}']) {
    const refused = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: body })
    t.match([refused.statusCode, refused.json().code], [400, 'VALIDATION_FAILED'], `a batch's own __proto__ key: ${body}`)
  }
  t.equal(kernel.requests.length, 4, 'the clean call of the batch alone reached the Kernel')
  t.equal(Object.getPrototypeOf({}).polluted, undefined, 'nothing polluted')
})

t.test('inputFault: the first thing wrong with a parsed input, anywhere in it', async t => {
  t.equal(inputFault({ a: 1, b: [1, { c: 'x' }], constructor: 'fine', d: { constructor: { name: 'x' } } }), null)
  t.match(inputFault(JSON.parse('{"a":[{"b":{"__proto__":{}}}]}') as object), /prototype/)
  t.match(inputFault(JSON.parse('{"constructor":{"prototype":{}}}') as object), /prototype/)
  t.match(inputFault({ a: [Infinity] }), /finite/)
  t.equal(inputFault({ a: '\ud83d\ude00', '\u{1F600}': ['\uFFFD'] }), null, 'surrogate pairs are well formed')
  t.equal(inputFault({ a: 1, b: [{ c: 'x' }, { d: ['y', 'z\udc00'] }] }), 'input.b.1.d.1 must be well-formed Unicode text: it holds a lone surrogate')
  t.equal(inputFault({ '\ud800': 1 }), 'input has a key that is not well-formed Unicode text: it holds a lone surrogate')
  t.equal(inputFault({ a: { b: { 'x\udbff': 'y' } } }), 'input.a.b has a key that is not well-formed Unicode text: it holds a lone surrogate')
})

// A lone surrogate has no UTF-8 form: REST's path and query string cannot carry one (invalid
// percent-encoding, refused 400), but JSON can ("x\ud800"), on every face. Into the Kernel's path
// it was a 500 (encodeURIComponent throws), into its query string U+FFFD (another input), into
// its JSON body the escape as sent. The validation stage refuses it, in a value or a key.
t.test('a text that is not well-formed UTF-16 (a lone surrogate) is refused 400 on every face, as REST refuses it', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/things': (req, res) => json(res, 200, { url: req.url }),
    'POST /v1/things': (req, res) => json(res, 200, { body: req.body })
  })
  const output = { type: 'object', additionalProperties: true }
  const name = { type: 'object', properties: { name: { type: 'string' } } }
  const manifest = testManifest({
    getThing: { type: 'query', rest: 'GET /things/:name', kernel: 'GET /v1/things/{name}', input: { ...name, required: ['name'] }, output },
    listThings: { type: 'query', rest: 'GET /things', kernel: 'GET /v1/things', input: name, output },
    makeThing: { type: 'mutation', rest: 'POST /things', kernel: 'POST /v1/things', input: { type: 'object', properties: { name: { type: 'string' }, meta: { type: 'object' }, tags: { type: 'array' } } }, output }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const headers = { ...bearer(), 'content-type': 'application/json' }

  // REST: a path or query string holding one is not valid percent-encoding of UTF-8 (a path
  // that is not is refused before routing, BAD_REQUEST).
  for (const [url, code] of [['/api/v1/things/x%ED%A0%80', 'BAD_REQUEST'], ['/api/v1/things?name=x%ED%A0%80y', 'VALIDATION_FAILED']]) {
    const res = await app.inject({ url, headers: bearer() })
    t.equal(res.statusCode, 400, `REST ${url}`)
    t.match(res.json(), { code })
  }

  // Each input as JSON text, the lone surrogate escaped, and the field the refusal names.
  const cases = [
    { op: 'getThing', input: '{"name":"x\\ud800"}', field: /^input\.name /, graphql: 'query Q($name: String!) { getThing(name: $name) }' },
    { op: 'listThings', input: '{"name":"x\\udc00y"}', field: /^input\.name /, graphql: 'query Q($name: String) { listThings(name: $name) }' },
    { op: 'makeThing', input: '{"name":"ok","tags":["a","b\\ud83d"]}', field: /^input\.tags\.1 /, graphql: 'mutation M($name: String, $tags: JSON) { makeThing(name: $name, tags: $tags) }' },
    { op: 'makeThing', input: '{"meta":{"k\\udfff":1}}', field: /^input\.meta /, graphql: 'mutation M($meta: JSON) { makeThing(meta: $meta) }' }
  ]
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers: bearer() })
  t.teardown(() => ws.terminate())
  await once(ws, 'open')
  const frames: Array<Record<string, any>> = []
  ws.on('message', data => frames.push(JSON.parse(String(data)) as Record<string, any>))
  for (const [n, c] of cases.entries()) {
    const rest = c.op === 'makeThing' ? await app.inject({ method: 'POST', url: '/api/v1/things', headers, payload: c.input }) : null
    if (rest !== null) {
      t.equal(rest.statusCode, 400, `REST body ${c.input}`)
      t.match(rest.json(), { code: 'VALIDATION_FAILED', detail: c.field })
    }
    const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: `{"calls":[{"id":"a","op":"${c.op}","input":${c.input}}]}` })
    t.match(batch.json(), { results: [{ id: 'a', error: { code: 'VALIDATION_FAILED', status: 400, detail: c.field } }] }, `batch ${c.input}`)
    const trpc = c.op === 'makeThing'
      ? await app.inject({ method: 'POST', url: `/trpc/${c.op}`, headers, payload: c.input })
      : await app.inject({ url: `/trpc/${c.op}?input=${encodeURIComponent(c.input)}`, headers })
    t.equal(trpc.statusCode, 400, `tRPC ${c.input}`)
    t.match(trpc.json(), { error: { data: { code: 'VALIDATION_FAILED' }, message: c.field } })
    const graphql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: `{"query":${JSON.stringify(c.graphql)},"variables":${c.input}}` })
    t.match(graphql.json(), { errors: [{ message: c.field, extensions: { code: 'VALIDATION_FAILED', status: 400 } }] }, `GraphQL ${c.input}`)
    ws.send(`{"id":"${n}","op":"${c.op}","input":${c.input}}`)
    await until(() => frames.some(f => f.id === String(n)), 'the /ws answer')
    t.match(frames.find(f => f.id === String(n)), { error: { code: 'VALIDATION_FAILED', status: 400, detail: c.field } }, `/ws ${c.input}`)
  }
  t.same(kernel.requests.map(r => `${r.method} ${r.url}`), [], 'none reached the Kernel')
  // A surrogate pair is one character, well formed: served.
  const pair = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: '{"calls":[{"id":"a","op":"listThings","input":{"name":"\\ud83d\\ude00"}}]}' })
  t.match(pair.json(), { results: [{ id: 'a', result: { url: '/v1/things?name=%F0%9F%98%80' } }] })
})

// describeValidation compared a tagged union's `kind` with each branch's const by JSON.stringify
// of the value: a deeply nested `kind` (the depth bound is checked after the schema) overflowed
// the stack, and the refusal was a 500 INTERNAL instead of the schema's 400.
t.test('a refused input holding a deeply nested value where a tagged union wants its kind is a 400, not a 500', async t => {
  const kernel = await startTestKernel(t, { 'POST /v1/shapes': (_req, res) => json(res, 201, { ok: true }) })
  const A = { type: 'object', required: ['kind', 'x'], properties: { kind: { const: 'a' }, x: { type: 'string' } } }
  const B = { type: 'object', required: ['kind', 'y'], properties: { kind: { enum: ['b', 'c'] }, y: { type: 'string' } } }
  const manifest = testManifest({
    makeShape: { type: 'mutation', rest: 'POST /shapes', kernel: 'POST /v1/shapes', input: { type: 'object', properties: { shape: { oneOf: [A, B] } } }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const headers = { ...bearer(), 'content-type': 'application/json' }
  const payload = '{"shape":{"kind":' + '['.repeat(100_000) + ']'.repeat(100_000) + '}}' // by hand: JSON.stringify would overflow
  const res = await app.inject({ method: 'POST', url: '/api/v1/shapes', headers, payload })
  t.equal(res.statusCode, 400)
  t.match(res.json(), { code: 'VALIDATION_FAILED', detail: /^input\.shape\./ })
  t.equal(kernel.requests.length, 0)
})

// A tagged union whose branches are composed with allOf, as manifests written from OpenAPI do
// (a base by $ref, then the branch's kind and fields): the refusal named the first branch's
// missing field for a value whose kind chose the second ("input.shape.radius is required" for a square).
t.test('a tagged union of allOf branches by $ref names, on every face, the fault of the branch the kind chose', async t => {
  const kernel = await startTestKernel(t, { 'POST /v1/draw': (_req, res) => json(res, 200, { ok: true }) })
  const manifest = testManifest({
    draw: { type: 'mutation', rest: 'POST /draw', kernel: 'POST /v1/draw', input: { type: 'object', required: ['shape'], properties: { shape: { oneOf: [{ $ref: '#/schemas/Circle' }, { $ref: '#/schemas/Square' }] } } }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  }, { url: kernel.url, retries: 0 }, {
    schemas: {
      Shape: { type: 'object', required: ['id', 'kind'], properties: { id: { type: 'string' }, kind: { type: 'string' } } },
      Circle: { allOf: [{ $ref: '#/schemas/Shape' }, { type: 'object', required: ['radius'], properties: { kind: { const: 'circle' }, radius: { type: 'number' } } }] },
      Square: { allOf: [{ $ref: '#/schemas/Shape' }, { type: 'object', required: ['side'], properties: { kind: { const: 'square' }, side: { type: 'number' } } }] }
    }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const headers = { ...bearer(), 'content-type': 'application/json' }
  const input = '{"shape":{"id":"s1","kind":"square"}}'
  const detail = 'input.shape.side is required'
  const rest = await app.inject({ method: 'POST', url: '/api/v1/draw', headers, payload: input })
  t.equal(rest.statusCode, 400)
  t.match(rest.json(), { code: 'VALIDATION_FAILED', detail })
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: `{"calls":[{"id":"a","op":"draw","input":${input}}]}` })
  t.match(batch.json(), { results: [{ id: 'a', error: { code: 'VALIDATION_FAILED', detail } }] })
  const trpc = await app.inject({ method: 'POST', url: '/trpc/draw', headers, payload: input })
  t.match(trpc.json(), { error: { data: { code: 'VALIDATION_FAILED' }, message: detail } })
  const graphql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: `{"query":"mutation M($shape: JSON!) { draw(shape: $shape) { ok } }","variables":${input}}` })
  t.match(graphql.json(), { errors: [{ message: detail, extensions: { code: 'VALIDATION_FAILED' } }] })
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers: bearer() })
  t.teardown(() => ws.terminate())
  await once(ws, 'open')
  ws.send(`{"id":"1","op":"draw","input":${input}}`)
  const [frame] = await once(ws, 'message')
  t.match(JSON.parse(String(frame)), { id: '1', error: { code: 'VALIDATION_FAILED', status: 400, detail } })
  t.equal(kernel.requests.length, 0)
})
