import t from 'tap'
import { buildSchema as parseSdl, validateSchema } from 'graphql'
import { manifestSdl } from '../../../adapters/graphql/index.js'
import { loadManifestFile } from '../../../manifest.js'
import { buildTestApp, startTestKernel, testManifest, demoManifest, fixture, json, bearer } from '../../helper.js'

// The SDL generated from a manifest, one documented rule per case (adapters/graphql/README.md),
// and a second manifest of another domain served end to end.

const ONLY_GRAPHQL = { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false }
const str = { type: 'string' }

const SHAPE = {
  type: 'object',
  description: 'A shape with one property per rule.',
  required: ['id', 'count', 'maybe', 'list', 'level'],
  properties: {
    id: { type: 'string', format: 'uuid', description: 'Its id.' },
    level: { type: 'string', enum: ['low', 'high'] },
    kind: { type: 'string', enum: ['x-y', 'z'] },
    flag: { enum: ['true', 'other'] },
    count: { type: 'integer' },
    small: { type: 'integer', minimum: -5, maximum: 10 },
    big: { type: 'integer', minimum: 0, maximum: 3000000000 },
    ratio: { type: 'number' },
    ok: { type: 'boolean' },
    maybe: { type: ['string', 'null'] },
    union: { anyOf: [{ type: 'integer', minimum: 0, maximum: 9 }, { type: 'null' }] },
    state: { enum: ['on', 'off', null] },
    mixed: { oneOf: [{ type: 'string' }, { type: 'number' }] },
    multi: { type: ['string', 'number'] },
    free: { type: 'object' },
    map: { type: 'object', additionalProperties: { type: 'string' } },
    tuple: { type: 'array', items: [{ type: 'string' }], minItems: 1, additionalItems: false },
    bare: { type: 'array' },
    dashed: { type: 'object', properties: { 'a-b': str } },
    anything: {},
    nested: { type: 'object', properties: { inner: { type: 'object', required: ['deep'], properties: { deep: str } } } },
    list: { type: 'array', items: { type: 'object', properties: { v: { type: 'number' } } } },
    holes: { type: 'array', items: { type: ['string', 'null'] } }
  }
}

const RULES = {
  schemas: {
    Shape: SHAPE,
    Query: { type: 'object', properties: { q: str } },
    JSON: { type: 'string', enum: ['a', 'b'] },
    ListShapesOutput: { type: 'object', properties: { taken: str } },
    Id: { type: 'string', pattern: '^[a-z]+$' }
  },
  operations: {
    getShape: { type: 'query', rest: 'GET /shapes/:id', kernel: 'GET /shapes/{id}', summary: 'Get a shape', description: 'One shape.', input: { type: 'object', required: ['id'], properties: { id: { $ref: '#/schemas/Id' } } }, output: { $ref: '#/schemas/Shape' } },
    listShapes: { type: 'query', rest: 'GET /shapes', kernel: 'GET /shapes', input: { type: 'object', properties: { mode: { $ref: '#/schemas/JSON' } } }, output: { type: 'array', items: { type: 'object', properties: { q: { $ref: '#/schemas/Query' }, total: { type: 'integer', maximum: 100, minimum: 0 } } } } },
    putShape: {
      type: 'mutation',
      rest: 'PUT /shapes/:id',
      kernel: 'PUT /shapes/{id}',
      deprecated: true,
      input: { type: 'object', required: ['id', 'shape'], properties: { id: str, shape: { $ref: '#/schemas/Shape' }, note: { type: 'object', properties: { text: str } } } },
      output: { $ref: '#/schemas/Shape' }
    },
    oddArgs: { type: 'mutation', rest: 'POST /odd', kernel: 'POST /odd', input: { type: 'object', required: ['x-key'], properties: { 'x-key': str } }, output: { type: 'object', additionalProperties: true } }
  },
  events: {
    shapeChanged: { topic: 'shapes', payload: { type: 'object', properties: { id: str } }, description: 'A shape changed.' }
  }
}

const rulesManifest = (): ReturnType<typeof testManifest> => testManifest(RULES.operations, {}, { schemas: RULES.schemas, events: RULES.events })

t.test('each rule of the generator, on one manifest', async t => {
  const sdl = manifestSdl(rulesManifest())
  t.same(validateSchema(parseSdl(sdl)), [], 'the SDL is a valid schema')
  const block = (name: string): string => {
    const match = new RegExp(`(?:type|input|enum) ${name} \\{[^}]*\\}`).exec(sdl)
    if (match === null) throw new Error(`no ${name} in\n${sdl}`)
    return match[0].replace(/\s*"""[^"]*"""/g, '').replace(/\s+/g, ' ')
  }
  t.equal(block('Shape'), 'type Shape { id: String! level: ShapeLevel! kind: String flag: String count: Float! small: Int big: Float ratio: Float ok: Boolean maybe: String union: Int state: ShapeState mixed: JSON multi: JSON free: JSON map: JSON tuple: JSON bare: JSON dashed: JSON anything: JSON nested: ShapeNested list: [ShapeList!]! holes: [String] }')
  t.equal(block('ShapeNested'), 'type ShapeNested { inner: ShapeNestedInner }')
  t.equal(block('ShapeNestedInner'), 'type ShapeNestedInner { deep: String! }')
  t.equal(block('ShapeLevel'), 'enum ShapeLevel { low high }')
  t.equal(block('ShapeState'), 'enum ShapeState { on off }')
  t.equal(block('ShapeInput'), 'input ShapeInput { id: String! level: ShapeLevel! kind: String flag: String count: Float! small: Int big: Float ratio: Float ok: Boolean maybe: String union: Int state: ShapeState mixed: JSON multi: JSON free: JSON map: JSON tuple: JSON bare: JSON dashed: JSON anything: JSON nested: ShapeNestedInput list: [ShapeListInput!]! holes: [String] }', 'inputs share the enums and get Input types')
  t.equal(block('ShapeNestedInput'), 'input ShapeNestedInput { inner: ShapeNestedInnerInput }')
  t.equal(block('Query2'), 'type Query2 { q: String }', 'a schema named like a reserved type gets a number')
  t.equal(block('JSON2'), 'enum JSON2 { a b }')
  t.equal(block('ListShapesOutput2'), 'type ListShapesOutput2 { q: Query2 total: Int }', 'an inline type whose name is taken gets a number')
  t.match(sdl, /getShape\(id: String!\): Shape\n/)
  t.match(sdl, /"""\n {2}Get a shape\n {2}\n {2}One shape\.\n {2}"""\n {2}getShape/, 'summary and description')
  t.match(sdl, /"""A shape with one property per rule\."""\ntype Shape/)
  t.match(sdl, /"""Its id\."""\n {2}id: String!/)
  t.match(sdl, /listShapes\(mode: JSON2\): \[ListShapesOutput2!\]/)
  t.match(sdl, /putShape\(\n {4}id: String!\n\n {4}"""A shape with one property per rule\."""\n {4}shape: ShapeInput!\n {4}note: PutShapeNoteInput\n {2}\): Shape @deprecated\(reason: "Deprecated in the manifest"\)/)
  t.match(sdl, /input PutShapeNoteInput \{\n {2}text: String\n\}/)
  t.match(sdl, /oddArgs\(\n {4}"""\n {4}The whole input of the operation \(its property names are not GraphQL names\)\.\n {4}"""\n {4}input: JSON!\n {2}\): JSON/)
  t.match(sdl, /type Subscription \{\n {2}"""A shape changed\."""\n {2}shapeChanged: ShapeChangedPayload\n\}/)
  t.match(sdl, /type ShapeChangedPayload \{\n {2}id: String\n\}/)
  t.match(sdl, /scalar JSON/)
})

t.test('the generated schema answers: JSON passes through exactly, inputs arrive as the op input', async t => {
  const shape = { id: '6f1c2a5e-8d3b-4c1a-9e2f-0a1b2c3d4e5f', level: 'high', count: 5000000000, small: 3, maybe: null, union: null, state: 'on', mixed: 'm', multi: 2, free: { any: [1, { b: null }] }, map: { k: 'v' }, tuple: ['t'], bare: [1, 'x'], dashed: { 'a-b': 'dash' }, anything: [true], nested: { inner: { deep: 'd' } }, list: [{ v: 1.5 }], holes: ['h', null] }
  const kernel = await startTestKernel(t, {
    'GET /shapes/abc': (_req, res) => json(res, 200, { ...shape, undeclared: 'x' }),
    'PUT /shapes/abc': (req, res) => json(res, 200, JSON.parse(req.body).shape),
    'POST /odd': (req, res) => json(res, 200, { echo: JSON.parse(req.body) }),
    'GET /shapes': (_req, res) => json(res, 200, [{ q: { q: 'inner' }, total: 1 }])
  })
  const app = await buildTestApp(t, ONLY_GRAPHQL, { manifest: rulesManifest(), kernelUrl: kernel.url })
  const fields = 'id level count small maybe union state mixed multi free map tuple bare dashed anything nested { inner { deep } } list { v } holes'
  const got = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: `{ getShape(id: "abc") { ${fields} } listShapes(mode: a) { q { q } total } }` } })
  // `free` declares no properties: the op's output schema keeps none of them (as REST does).
  t.same(got.json(), { data: { getShape: { ...shape, free: {} }, listShapes: [{ q: { q: 'inner' }, total: 1 }] } })
  const put = await app.inject({
    method: 'POST',
    url: '/graphql',
    headers: bearer(),
    payload: { query: `mutation ($s: ShapeInput!) { putShape(id: "abc", shape: $s) { ${fields} } oddArgs(input: { "x-key": "v" }) }`.replace('{ "x-key": "v" }', '$odd'), variables: { s: shape, odd: { 'x-key': 'v' } } }
  })
  t.equal(put.statusCode, 400, 'a variable not declared in the operation is refused')
  const put2 = await app.inject({
    method: 'POST',
    url: '/graphql',
    headers: bearer(),
    payload: { query: `mutation ($s: ShapeInput!, $odd: JSON!) { putShape(id: "abc", shape: $s) { ${fields} } oddArgs(input: $odd) }`, variables: { s: shape, odd: { 'x-key': 'v' } } }
  })
  t.same(put2.json(), { data: { putShape: { ...shape, free: {} }, oddArgs: { echo: { 'x-key': 'v' } } } })
  // An answer the output schema refuses (an enum value the manifest does not list) fails its
  // field as KERNEL_ERROR, as it fails the call on REST: it was refused by GraphQL's enum alone,
  // and answered as sent on the other faces.
  kernel.on('GET /shapes/odd', (_req, res) => json(res, 200, { ...shape, level: 'medium' }))
  const odd = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: '{ getShape(id: "odd") { id level } }' } })
  t.equal(odd.statusCode, 200)
  t.match(odd.json(), { data: { getShape: null }, errors: [{ message: "The Kernel's answer to getShape does not match its output schema: output.level must be equal to one of the allowed values", path: ['getShape'], extensions: { code: 'KERNEL_ERROR', status: 502 } }] })
  const oddRest = await app.inject({ method: 'GET', url: '/api/v1/shapes/odd', headers: bearer() })
  t.match([oddRest.statusCode, oddRest.json()], [502, { code: 'KERNEL_ERROR' }], 'the same answer on REST')
  const putBody = JSON.parse(kernel.requests.find(r => r.method === 'PUT')!.body)
  t.same(putBody, { shape }, 'the input object arrives as sent (id went to the path)')
})

t.test('a manifest without queries still has a Query type', async t => {
  const manifest = testManifest({ poke: { type: 'mutation', rest: 'POST /poke', kernel: 'POST /poke', output: { type: 'boolean' } } })
  const sdl = manifestSdl(manifest)
  t.match(sdl, /type Query \{\n {2}"""A placeholder: this manifest declares no query\."""\n {2}_: Boolean\n\}/)
  t.match(sdl, /poke: Boolean/)
  const kernel = await startTestKernel(t, { 'POST /poke': (_req, res) => json(res, 200, true) })
  const app = await buildTestApp(t, ONLY_GRAPHQL, { manifest, kernelUrl: kernel.url })
  const res = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: 'mutation { poke }' } })
  t.same(res.json(), { data: { poke: true } })
  const q = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: '{ _ }' } })
  t.same(q.json(), { data: { _: null } })
})

t.test('an input that declares no property but takes some is one input: JSON argument', async t => {
  // A map (`additionalProperties` a schema), `patternProperties`, properties only in `anyOf`'s
  // branches: the field had no argument, and every call reached the Kernel with `{}` (a
  // mutation ran with nothing), while REST and tRPC sent what the client gave.
  const echo = { type: 'object', properties: { got: {} } }
  const manifest = testManifest({
    setLabels: { type: 'mutation', rest: 'PUT /labels', kernel: 'PUT /labels', input: { type: 'object', minProperties: 1, additionalProperties: { type: 'string' } }, output: echo },
    byPattern: { type: 'mutation', rest: 'POST /pattern', kernel: 'POST /pattern', input: { type: 'object', required: ['x-a'], patternProperties: { '^x-': { type: 'string' } }, additionalProperties: false }, output: echo },
    either: { type: 'query', rest: 'GET /either', kernel: 'GET /either', input: { type: 'object', anyOf: [{ required: ['a'], properties: { a: str } }, { required: ['b'], properties: { b: str } }] }, output: echo },
    none: { type: 'query', rest: 'GET /none', kernel: 'GET /none', output: echo },
    closed: { type: 'query', rest: 'GET /closed', kernel: 'GET /closed', input: { type: 'object', additionalProperties: false }, output: echo }
  })
  const sdl = manifestSdl(manifest)
  t.same(validateSchema(parseSdl(sdl)), [])
  t.match(sdl, /setLabels\(\n(?: {4}.*\n)* {4}input: JSON\n {2}\): SetLabelsOutput/)
  t.match(sdl, /The whole input of the operation \(it declares no property, and takes\s+properties\)\./)
  t.match(sdl, /byPattern\(\n(?: {4}.*\n)* {4}input: JSON!\n {2}\): ByPatternOutput/, 'required when the input requires a name')
  t.match(sdl, /either\(\n(?: {4}.*\n)* {4}input: JSON\n {2}\): EitherOutput/)
  t.match(sdl, / {2}none: NoneOutput\n/, 'an input left out (closed, no property) takes no argument')
  t.match(sdl, / {2}closed: ClosedOutput\n/)
  const sent = (req: { body: string, url: string }): unknown => req.body === '' ? Object.fromEntries(new URL(req.url, 'http://k').searchParams) : JSON.parse(req.body)
  const kernel = await startTestKernel(t, {
    'PUT /labels': (req, res) => json(res, 200, { got: sent(req) }),
    'POST /pattern': (req, res) => json(res, 200, { got: sent(req) }),
    'GET /either': (req, res) => json(res, 200, { got: sent(req) })
  })
  const app = await buildTestApp(t, ONLY_GRAPHQL, { manifest, kernelUrl: kernel.url })
  const res = await app.inject({
    method: 'POST',
    url: '/graphql',
    headers: bearer(),
    payload: { query: 'mutation ($l: JSON) { setLabels(input: $l) { got } byPattern(input: { x_b: "no" }) { got } }', variables: { l: { env: 'prod', team: 'core' } } }
  })
  t.match(res.json(), { data: { setLabels: { got: { env: 'prod', team: 'core' } }, byPattern: null }, errors: [{ path: ['byPattern'], extensions: { code: 'VALIDATION_FAILED' } }] })
  const pattern = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: 'mutation ($p: JSON!) { byPattern(input: $p) { got } }', variables: { p: { 'x-a': '1', 'x-b': '2' } } } })
  t.same(pattern.json(), { data: { byPattern: { got: { 'x-a': '1', 'x-b': '2' } } } })
  const q = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: '{ either(input: { b: "2" }) { got } }' } })
  t.same(q.json(), { data: { either: { got: { b: '2' } } } })
  const empty = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: 'mutation { setLabels { got } }' } })
  t.match(empty.json(), { data: { setLabels: null }, errors: [{ extensions: { code: 'VALIDATION_FAILED' } }] }, 'no input is {}, refused by the schema as on REST')
})

t.test('names the manifest allows that GraphQL does not are made GraphQL names', async t => {
  // `_1x` became `1xOutput` (pascal drops the underscore), `__Foo` stayed `__Foo`, GraphQL's
  // own prefix: the start stopped with GraphQL's error, naming no place in the manifest.
  const obj = { type: 'object', properties: { v: str } }
  const manifest = testManifest({
    _1x: { type: 'query', rest: 'GET /x', kernel: 'GET /x', output: obj },
    foo: { type: 'query', rest: 'GET /foo', kernel: 'GET /foo', output: { $ref: '#/schemas/__Foo' } }
  }, {}, { schemas: { __Foo: { type: 'object', properties: { w: str } } }, events: { _9e: { topic: 't', payload: obj } } })
  const sdl = manifestSdl(manifest)
  t.same(validateSchema(parseSdl(sdl)), [])
  for (const type of ['type _1xOutput {', 'type _Foo {', 'type _9ePayload {']) t.ok(sdl.includes(type), type)
  t.match(sdl, /_1x: _1xOutput/)
  t.match(sdl, /foo: _Foo/)
})

t.test('the demo manifest: schemas names become type names', async t => {
  const sdl = manifestSdl(await demoManifest())
  t.same(validateSchema(parseSdl(sdl)), [])
  for (const type of ['type Agent {', 'type Run {', 'type DocumentSummary {', 'type Document {', 'enum RunStatus {', 'enum ListRunsStatus {']) t.ok(sdl.includes(type), type)
  t.match(sdl, /kernelHeaders: JSON/)
  t.match(sdl, /listRuns\(\n(?:.*\n)*? {4}status: ListRunsStatus\n/)
  t.match(sdl, /runUpdated: Run\n/)
  t.match(sdl, /status: RunStatus!/)
  t.notMatch(sdl, /type KernelHeaders/, 'an object whose keys are not GraphQL names is JSON')
})

t.test('the library manifest (another domain) yields a valid schema and answers', async t => {
  const manifest = await loadManifestFile(fixture('library-manifest.yaml'))
  const sdl = manifestSdl(manifest)
  t.same(validateSchema(parseSdl(sdl)), [])
  t.match(sdl, /findBooks\(author: String, format: \[FindBooksFormat!\], available: Boolean, page: Float\): \[Book!\]/)
  t.match(sdl, /borrow\(member: String!, isbn: String!, days: Int\): Loan/)
  t.match(sdl, /type Book \{\n {2}isbn: String!\n {2}title: String!\n {2}authors: \[String!\]\n {2}copies: Float!\n {2}format: BookFormat\n\}/)
  t.notMatch(sdl, /Subscription/, 'no events, no Subscription type')

  const book = { isbn: '9780000000001', title: 'Dune', authors: ['Herbert'], copies: 2, format: 'paperback' }
  const kernel = await startTestKernel(t, {
    'GET /books': (_req, res) => json(res, 200, [{ ...book, shelf: 'B4' }]),
    'PUT /members/m1/loans/9780000000001': (req, res) => json(res, 201, { id: 7, isbn: '9780000000001', member: 'm1', due: '2026-02-01', days: JSON.parse(req.body).days }),
    'POST /loans/7/return': (_req, res) => json(res, 200, { id: 7, isbn: '9780000000001', member: 'm1', due: '2026-02-01', returned: true })
  })
  const app = await buildTestApp(t, ONLY_GRAPHQL, { manifest, kernelUrl: kernel.url })
  const call = async (query: string, roles = ['member'], zone: 'public' | 'internal' = 'public'): Promise<any> =>
    (await app.inject({ method: 'POST', url: '/graphql', headers: bearer({ roles, zone }), payload: { query } })).json()
  t.same(await call('{ findBooks(author: "Herbert", format: [paperback, ebook], page: 2) { isbn title authors copies format } }'), { data: { findBooks: [book] } })
  t.equal(kernel.requests[0].url, '/books?author=Herbert&format=paperback&format=ebook&page=2')
  t.same(await call('mutation { borrow(member: "m1", isbn: "9780000000001") { id due } back: giveBack(id: 7) { id returned } }'), { data: { borrow: { id: 7, due: '2026-02-01' }, back: { id: 7, returned: true } } })
  t.same(JSON.parse(kernel.requests[1].body), { days: 14 }, 'the input default is applied by the pipeline')
  const bad = await call('{ getBook(isbn: "123") { title } }')
  t.match(bad, { data: { getBook: null }, errors: [{ message: /input\.isbn must match pattern/, extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
  const fractional = await call('mutation { giveBack(id: 1.5) { id } }')
  t.match(fractional, { errors: [{ message: 'input.id must be integer', extensions: { code: 'VALIDATION_FAILED' } }] }, 'Float arguments are still checked as integers')
  const denied = await call('mutation { changeLoan(id: 7, days: 3) { id } }', ['member'])
  t.match(denied, { errors: [{ extensions: { code: 'FORBIDDEN', status: 403 } }] })
  const noRole = await call('mutation { giveBack(id: 7) { id } }', [])
  t.match(noRole, { errors: [{ message: 'giveBack needs one of the roles: member', extensions: { code: 'FORBIDDEN' } }] })
})
