import t from 'tap'
import { Validator } from '@seriousme/openapi-schema-validator'
import { Ajv2020 } from 'ajv/dist/2020.js'
import { buildDemoApp, buildTestApp, demoManifest, testManifest, bearer, startTestKernel, json } from '../helper.js'

interface OpenApiDoc {
  openapi: string
  paths: Record<string, Record<string, {
    operationId: string
    security?: unknown
    parameters?: Array<{ name: string, in: string, required?: boolean, schema: Record<string, unknown> }>
    requestBody?: { content: Record<string, { schema: Record<string, unknown> }> }
    responses: Record<string, { content?: Record<string, { schema: Record<string, unknown> }> }>
  }>>
  components: { schemas: Record<string, unknown>, securitySchemes?: Record<string, unknown> }
}

t.test('/openapi.json is a valid OpenAPI 3.1 document of every operation', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/openapi.json' })
  t.equal(res.statusCode, 200)
  const doc = res.json() as OpenApiDoc
  t.equal(doc.openapi, '3.1.0')

  const validator = new Validator()
  const result = await validator.validate(doc as unknown as Record<string, unknown>)
  t.same(result.errors ?? [], [], 'no schema error')
  t.equal(result.valid, true)

  const manifest = await demoManifest()
  const ops = new Map<string, { path: string, method: string }>()
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) ops.set(op.operationId, { path, method })
  }
  for (const op of manifest.operations) {
    const found = ops.get(op.name)
    t.ok(found, `${op.name} is documented`)
    t.equal(found?.method, op.method.toLowerCase())
    t.equal(found?.path, '/api/v1' + op.path.replace(/:([A-Za-z_][A-Za-z0-9_]*)/g, '{$1}'))
  }
  t.same(ops.get('batch-calls'), { path: '/api/v1/batch', method: 'post' }, 'and the batch route')
  t.equal(ops.size, manifest.operations.length + 1, 'nothing but the operations and the batch is documented')
  t.notOk(Object.keys(doc.paths).some(p => p.startsWith('/healthz') || p.startsWith('/metrics')))

  const getAgent = doc.paths['/api/v1/agents/{id}'].get
  t.same(getAgent.security, [{ bearerAuth: [] }])
  t.same(doc.components.securitySchemes, { bearerAuth: { type: 'http', scheme: 'bearer', bearerFormat: 'JWT' } })
  t.match(getAgent.parameters, [{ name: 'id', in: 'path', required: true }])
  t.match(getAgent.responses['2XX'].content?.['application/json'].schema, { type: 'object', required: ['id', 'name', 'model', 'description', 'createdAt', 'updatedAt'] })
  t.match(getAgent.responses['4XX'].content?.['application/problem+json'].schema, { $ref: '#/components/schemas/Problem' })
  t.match(getAgent.responses['5XX'].content?.['application/problem+json'].schema, { $ref: '#/components/schemas/Problem' })
  t.match(doc.components.schemas.Problem, { type: 'object', required: ['type', 'title', 'status', 'code', 'requestId'] })

  // The headers the concerns add (the demo's getAgent is cached, its mutations take a key).
  t.match((getAgent.responses['2XX'] as { headers?: unknown }).headers, { 'x-request-id': { schema: { type: 'string' } }, 'x-cache': { description: /hit, miss or stale/ }, ETag: {}, 'Cache-Control': {}, Vary: { description: /authorization/ } })
  t.match(getAgent.parameters?.find(p => p.name === 'if-none-match'), { in: 'header', schema: { type: 'string' } })
  const updateAgent = doc.paths['/api/v1/agents/{id}'].patch
  t.match(updateAgent.parameters?.find(p => p.name === 'idempotency-key'), { in: 'header', required: false, schema: { type: 'string', maxLength: 255 } })
  t.match((updateAgent.responses['2XX'] as { headers?: Record<string, unknown> }).headers, { 'Idempotent-Replayed': { description: /the stored one of an earlier call/ } })
  t.notOk('x-cache' in ((updateAgent.responses['2XX'] as { headers?: Record<string, unknown> }).headers ?? {}), 'a mutation is never cached')

  const listAgents = doc.paths['/api/v1/agents'].get
  t.match(listAgents.parameters?.find(p => p.name === 'limit'), { in: 'query', schema: { type: 'integer', minimum: 1, maximum: 100 } })
  const runAgent = doc.paths['/api/v1/agents/{id}/runs'].post
  t.match(runAgent.requestBody?.content['application/json'].schema, { type: 'object', required: ['prompt'], properties: { prompt: { type: 'string', maxLength: 20000 } } })
  t.notOk((runAgent.requestBody?.content['application/json'].schema.properties as Record<string, unknown>).id, 'path params are not in the body schema')
  // A body that requires nothing may be left out (an absent body is `{}`); one that does may not.
  t.equal((runAgent.requestBody as { required?: boolean }).required, true)
  t.equal((updateAgent.requestBody as { required?: boolean }).required, false)
  t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/agents/a1', headers: bearer() })).statusCode, 200, 'served without a body')
  // A cached query documents its 304, with the cache headers and no content.
  const notModified = getAgent.responses['304'] as { description: string, headers: Record<string, unknown>, content?: unknown }
  t.match(notModified, { description: /Not Modified/, headers: { ETag: { schema: { type: 'string' } }, 'Cache-Control': {}, Vary: {}, 'x-cache': {}, 'x-request-id': {} } })
  t.notOk(notModified.content)
  t.notOk(updateAgent.responses['304'], 'a mutation has no 304')
  // Refusals carry x-request-id as every answer does (the document said so of 2XX and 304 only).
  for (const op of [getAgent, updateAgent, runAgent]) {
    for (const [status, response] of Object.entries(op.responses) as Array<[string, { headers?: Record<string, unknown> }]>) {
      t.ok(response.headers?.['x-request-id'] !== undefined, `${status}: x-request-id`)
    }
  }
  t.ok((getAgent.responses['429'] as { headers: Record<string, unknown> }).headers['Retry-After'], 'a 429 keeps its own headers')
  // A reload may give any GET query a cache and any operation a limit, and the document is built
  // once: what they add is documented wherever it may apply (getDocument has no cache at start-up).
  const getDocument = doc.paths['/api/v1/documents/{id}'].get
  t.ok(getDocument.responses['304'], 'an uncached GET query documents the 304 a reload may give it')
  t.match(getDocument.parameters?.find(p => p.name === 'if-none-match'), { in: 'header', description: /when the operation is cached/ })
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      t.match(op.responses['429'], { description: /RATE_LIMITED/, headers: { 'Retry-After': {}, 'RateLimit-Limit': {}, 'RateLimit-Remaining': {}, 'RateLimit-Reset': {} }, content: { 'application/problem+json': {} } }, `${method} ${path}: its 429`)
      t.match((op.responses['2XX'] as { headers?: unknown }).headers, { 'RateLimit-Limit': {}, 'RateLimit-Remaining': {}, 'RateLimit-Reset': {} }, `${method} ${path}: RateLimit-*`)
    }
  }
})

// The Idempotency-Key's description said "for 24 h" whatever BFF_IDEMPOTENCY_TTL_SECONDS was.
t.test('the Idempotency-Key is documented with the TTL in force', async t => {
  const keyOf = async (env: Record<string, number>): Promise<string> => {
    const doc = (await (await buildDemoApp(t, env)).inject({ url: '/openapi.json' })).json() as OpenApiDoc
    return JSON.stringify(doc.paths['/api/v1/agents/{id}'].patch.parameters?.find(p => p.name === 'idempotency-key'))
  }
  t.match(await keyOf({}), /once per tenant and key for 24 h;/, 'the default, 86400 s')
  t.match(await keyOf({ BFF_IDEMPOTENCY_TTL_SECONDS: 120 }), /once per tenant and key for 2 min;/)
  t.match(await keyOf({ BFF_IDEMPOTENCY_TTL_SECONDS: 90 }), /once per tenant and key for 90 s;/)
})

t.test('/docs renders the document', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/docs/' })
  t.equal(res.statusCode, 200)
  t.match(res.body, /swagger-ui/i)
})

// Swagger UI redirected its old address by rewriting the URL's end (`/static/index.html$`): with
// a query string, or a trailing slash the router takes too, nothing matched and the redirect
// named the same URL again, for ever.
t.test('/docs/static/index.html redirects to the page once, with a query string or a trailing slash too', async t => {
  const app = await buildDemoApp(t)
  for (const [url, location] of [['/docs/static/index.html', '/docs/'], ['/docs/static/index.html?v=2', '/docs/?v=2'], ['/docs/static/index.html/', '/docs/'], ['/docs/static/index.html/?v=2', '/docs/?v=2']]) {
    const res = await app.inject({ url })
    t.equal(res.statusCode, 302, url)
    t.equal(res.headers.location, location, url)
    const page = await app.inject({ url: res.headers.location as string })
    t.equal(page.statusCode, 200, `${url}: the page`)
    t.match(page.body, /swagger-ui/i, `${url}: the page`)
  }
  // Its other routes are left alone.
  t.equal((await app.inject({ url: '/docs/static/swagger-initializer.js' })).statusCode, 200)
  t.equal((await app.inject({ url: '/docs/json' })).statusCode, 200)
})

t.test('without identity there is no security scheme; with OpenAPI off there is no document', async t => {
  const open = await buildDemoApp(t, { BFF_AUTH_ENABLED: false })
  const doc = (await open.inject({ method: 'GET', url: '/openapi.json' })).json() as OpenApiDoc
  t.notOk(doc.components?.securitySchemes)
  t.notOk(doc.paths['/api/v1/agents'].get.security)
  const off = await buildDemoApp(t, { BFF_OPENAPI_ENABLED: false })
  t.equal((await off.inject({ method: 'GET', url: '/openapi.json' })).statusCode, 404)
  t.equal((await off.inject({ method: 'GET', url: '/docs' })).statusCode, 404)
})

t.test('the document keeps every rule of an input, and calls a body optional only when {} passes them', async t => {
  // Only properties, required and additionalProperties: false were kept: the document called
  // valid (and a body optional) what the pipeline refuses.
  const pair = { type: 'object', additionalProperties: false, properties: { a: { type: 'string' }, b: { type: 'string' } }, anyOf: [{ required: ['a'] }, { required: ['b'] }] }
  const some = { type: 'object', minProperties: 1, additionalProperties: { type: 'integer' } }
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    onePost: { type: 'mutation', rest: 'POST /one', kernel: 'POST /v1/one', input: pair, output },
    somePost: { type: 'mutation', rest: 'POST /some', kernel: 'POST /v1/some', input: some, output },
    someGet: { type: 'query', rest: 'GET /some', kernel: 'GET /v1/some', input: { ...pair, properties: { ...pair.properties, n: { type: 'integer' } } }, output }
  })
  const app = await buildTestApp(t, {}, { manifest })
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  const one = doc.paths['/api/v1/one'].post.requestBody
  t.match(one, { required: true, content: { 'application/json': { schema: { anyOf: [{ required: ['a'] }, { required: ['b'] }], additionalProperties: false } } } }, 'anyOf kept; {} fails it: required')
  const body = doc.paths['/api/v1/some'].post.requestBody
  t.match(body, { required: true, content: { 'application/json': { schema: { minProperties: 1, additionalProperties: { type: 'integer' } } } } })
  // What the document says matches what the server does.
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/one', headers: bearer(), payload: {} })).statusCode, 400, '{} is refused, as documented')
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/some', headers: bearer(), payload: { x: 'text' } })).statusCode, 400, 'an additional field of the wrong type is refused, as documented')
  // Query strings are still coerced field by field only.
  const some2 = await app.inject({ url: '/api/v1/some?n=0x10&a=x', headers: bearer() })
  t.equal(some2.statusCode, 400, 'a loose number is still refused')
  const result = await new Validator().validate(doc)
  t.equal(result.valid, true, JSON.stringify(result.errors))
})

t.test('schemas are written in the dialect OpenAPI 3.1 declares (JSON Schema 2020-12)', async t => {
  // Manifest schemas are draft-07: copied as they were, array items, dependencies and nullable
  // were invalid or misread in the document.
  const input = {
    type: 'object',
    properties: { pair: { type: 'array', items: [{ type: 'string' }, { type: 'integer' }], additionalItems: false, minItems: 2 }, note: { type: 'string', nullable: true }, a: { type: 'string' }, b: { type: 'string' }, dependencies: { type: 'string' } },
    dependencies: { a: ['b'], b: { properties: { note: { minLength: 1 } } } }
  }
  const manifest = testManifest({ shapes: { type: 'mutation', rest: 'POST /shapes', kernel: 'POST /v1/shapes', input, output: { type: 'object', properties: { ok: { type: 'boolean', nullable: true } } } } })
  const app = await buildTestApp(t, {}, { manifest })
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  const op = doc.paths['/api/v1/shapes'].post
  const body = op.requestBody.content['application/json'].schema
  t.same(body.properties.pair, { type: 'array', prefixItems: [{ type: 'string' }, { type: 'integer' }], items: false, minItems: 2 })
  t.same(body.properties.note, { type: ['string', 'null'] })
  t.same(body.properties.dependencies, { type: 'string' }, 'a field named like a keyword is left as it is')
  t.same(body.dependentRequired, { a: ['b'] })
  t.same(body.dependentSchemas, { b: { properties: { note: { minLength: 1 } } } })
  t.notOk('dependencies' in body)
  t.same(op.responses['2XX'].content['application/json'].schema.properties.ok, { type: ['boolean', 'null'] })
  const ajv = new Ajv2020({ strict: false })
  t.doesNotThrow(() => ajv.compile(body), 'a valid 2020-12 schema')
  t.equal(ajv.validate(body, { pair: ['x', 1], a: 'x', b: 'y', note: null }), true)
  t.equal(ajv.validate(body, { pair: ['x', 1, 2] }), false, 'no item beyond the pair, as the manifest says')
  t.equal(ajv.validate(body, { a: 'x' }), false, 'a needs b, as the manifest says')
  t.equal((await new Validator().validate(doc)).valid, true)
})

t.test('rules over the whole input stay out of a body that shares it with path parameters; patternProperties stays out', async t => {
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    // The server checks anyOf with the path parameter merged in: a body-less PATCH passes.
    pathed: { type: 'mutation', rest: 'PATCH /pathed/:id', kernel: 'PATCH /v1/pathed/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' }, name: { type: 'string' } }, anyOf: [{ required: ['id'] }, { required: ['name'] }] }, output },
    // @fastify/swagger wrote patternProperties as an additionalProperties, over the false.
    patterned: { type: 'mutation', rest: 'POST /patterned', kernel: 'POST /v1/patterned', input: { type: 'object', additionalProperties: false, properties: { name: { type: 'string' } }, patternProperties: { '^x-': { type: 'string' } } }, output }
  })
  const app = await buildTestApp(t, {}, { manifest })
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  const pathed = doc.paths['/api/v1/pathed/{id}'].patch.requestBody
  t.equal(pathed.required, false, 'documented optional')
  t.notOk('anyOf' in pathed.content['application/json'].schema)
  t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/pathed/x1', headers: bearer() })).statusCode, 503, 'the gateway takes it: past validation, to the Kernel (which is not there)')
  const patterned = doc.paths['/api/v1/patterned'].post.requestBody.content['application/json'].schema
  t.notOk('patternProperties' in patterned)
  t.notOk('additionalProperties' in patterned, 'without patternProperties, a false additionalProperties would refuse the x- fields the server admits')
})

t.test('a body beside path parameters documents the fields the input is composed of', async t => {
  // allOf is a rule over the whole input, left out of such a body: the document named no field
  // the input took from a shared schema, and a client generated from it could not send `name`,
  // which the server requires.
  const manifest = testManifest({
    rename: { type: 'mutation', rest: 'PUT /things/:id', kernel: 'PUT /v1/things/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } }, allOf: [{ $ref: '#/schemas/ThingFields' }] }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  }, {}, { schemas: { ThingFields: { type: 'object', required: ['name'], properties: { name: { type: 'string' }, note: { type: 'string' } } } } })
  const app = await buildTestApp(t, {}, { manifest })
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  const body = doc.paths['/api/v1/things/{id}'].put.requestBody
  t.same(body.content['application/json'].schema, { type: 'object', properties: { name: { type: 'string' }, note: { type: 'string' } }, required: ['name'] })
  t.equal(body.required, true)
  const refused = await app.inject({ method: 'PUT', url: '/api/v1/things/t1', headers: bearer(), payload: { note: 'x' } })
  t.match([refused.statusCode, refused.json()], [400, { detail: 'input.name is required' }], 'as the server reads it')
  t.equal((await new Validator().validate(doc)).valid, true)
})

t.test('a body is documented optional only when the path parameters alone pass the rules over the whole input', async t => {
  // Those rules are left out of a body shared with path parameters; the body was then
  // documented optional whenever its own schema took {}, though the server refuses an absent
  // body when they refuse the path alone (minProperties counts the path's id, dependencies ask a
  // body field for it).
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    counted: { type: 'mutation', rest: 'PUT /counted/:id', kernel: 'PUT /v1/counted/{id}', input: { type: 'object', required: ['id'], minProperties: 2, properties: { id: { type: 'string' }, name: { type: 'string' }, note: { type: 'string' } } }, output },
    dependent: { type: 'mutation', rest: 'PATCH /dependent/:id', kernel: 'PATCH /v1/dependent/{id}', input: { type: 'object', required: ['id'], dependencies: { id: ['name'] }, properties: { id: { type: 'string', minLength: 3 }, name: { type: 'string' } } }, output },
    // Met by the path alone: still optional (the case the rules were left out for).
    pathed: { type: 'mutation', rest: 'PATCH /pathed/:id', kernel: 'PATCH /v1/pathed/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' }, name: { type: 'string' } }, anyOf: [{ required: ['id'] }, { required: ['name'] }] }, output }
  })
  const app = await buildTestApp(t, {}, { manifest })
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  t.equal(doc.paths['/api/v1/counted/{id}'].put.requestBody.required, true, 'minProperties over the path and the body')
  t.equal(doc.paths['/api/v1/dependent/{id}'].patch.requestBody.required, true, 'a dependency of the path parameter')
  t.equal(doc.paths['/api/v1/pathed/{id}'].patch.requestBody.required, false, 'anyOf met by the path')
  // What the document says matches what the server does.
  for (const [method, url] of [['PUT', '/api/v1/counted/x1'], ['PATCH', '/api/v1/dependent/x1']] as const) {
    const res = await app.inject({ method, url, headers: bearer() })
    t.same([res.statusCode, res.json().code], [400, 'VALIDATION_FAILED'], `${method} ${url} without a body is refused, as documented`)
  }
  t.equal((await new Validator().validate(doc)).valid, true)
})

t.test('refusals document the Retry-After they may carry whatever concern is on, and a 401 its challenge', async t => {
  // Only the 429 documented a Retry-After, and only with the rate limits on; a 409
  // IDEMPOTENCY_CONFLICT, a 503 of an open breaker or of load shedding, and a Kernel 4xx passed
  // on carry one too, and every 401 a WWW-Authenticate.
  const kernel = await startTestKernel(t, {
    'POST /v1/busy': (_req, res) => { res.writeHead(409, { 'content-type': 'application/json', 'retry-after': '7' }); res.end('{"message":"busy"}') },
    'POST /v1/down': (_req, res) => json(res, 500, { message: 'down' })
  })
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    busy: { type: 'mutation', rest: 'POST /busy', kernel: 'POST /v1/busy', input: { type: 'object' }, output },
    down: { type: 'mutation', rest: 'POST /down', kernel: 'POST /v1/down', input: { type: 'object' }, output }
  }, { url: kernel.url, retries: 0, circuitBreaker: { threshold: 1, resetTimeoutMs: 30000 } })
  const app = await buildTestApp(t, { BFF_RATE_LIMIT_ENABLED: false }, { manifest, kernelUrl: kernel.url })
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  const responses = doc.paths['/api/v1/busy'].post.responses
  t.notOk(responses['429'], 'no rate limits: no 429 of their own')
  t.match(responses['4XX'].headers, { 'Retry-After': { schema: { type: 'string' } }, 'WWW-Authenticate': { schema: { type: 'string' } }, 'x-request-id': {} })
  t.match(responses['5XX'].headers, { 'Retry-After': { schema: { type: 'string' } }, 'x-request-id': {} })
  t.notOk('RateLimit-Limit' in responses['4XX'].headers || 'RateLimit-Limit' in responses['5XX'].headers, 'no rate limits: no RateLimit-* on a refusal')
  t.equal((await new Validator().validate(doc)).valid, true)
  // What the document says matches what the server does.
  const busy = await app.inject({ method: 'POST', url: '/api/v1/busy', headers: bearer(), payload: {} })
  t.same([busy.statusCode, busy.headers['retry-after']], [409, '7'], 'a Kernel 4xx\'s Retry-After, passed on')
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/down', headers: bearer(), payload: {} })).statusCode, 502)
  const open = await app.inject({ method: 'POST', url: '/api/v1/down', headers: bearer(), payload: {} })
  t.equal(open.statusCode, 503, 'the breaker is open')
  t.ok(open.headers['retry-after'], 'a 503 with Retry-After')
  const unauthenticated = await app.inject({ method: 'POST', url: '/api/v1/busy', payload: {} })
  t.same([unauthenticated.statusCode, unauthenticated.headers['www-authenticate']], [401, 'Bearer'])
  // Without identity there is no challenge to document.
  const open2 = await buildTestApp(t, { BFF_AUTH_ENABLED: false }, { manifest, kernelUrl: kernel.url })
  const doc2 = (await open2.inject({ url: '/openapi.json' })).json()
  t.notOk('WWW-Authenticate' in doc2.paths['/api/v1/busy'].post.responses['4XX'].headers)
})

t.test('a path parameter that may be text is documented with the router\'s bound on its length', async t => {
  // The router refuses a path parameter over 256 characters (414 BAD_REQUEST, before any route),
  // while the document said an id of any length (or of the manifest's maxLength: 1000) was served.
  const kernel = await startTestKernel(t)
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    free: { type: 'query', rest: 'GET /free/:id', kernel: 'GET /v1/free/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output },
    wide: { type: 'query', rest: 'GET /wide/:id', kernel: 'GET /v1/wide/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 1000 } } }, output },
    tight: { type: 'query', rest: 'GET /tight/:id', kernel: 'GET /v1/tight/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 64 } } }, output },
    numbered: { type: 'query', rest: 'GET /numbered/:n', kernel: 'GET /v1/numbered/{n}', input: { type: 'object', required: ['n'], properties: { n: { type: 'integer' } } }, output }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  const param = (path: string, name: string): Record<string, unknown> => doc.paths[path].get.parameters.find((p: { in: string, name: string }) => p.in === 'path' && p.name === name).schema
  t.same(param('/api/v1/free/{id}', 'id'), { type: 'string', maxLength: 256 })
  t.same(param('/api/v1/wide/{id}', 'id'), { type: 'string', maxLength: 256 }, 'the tighter of the two')
  t.same(param('/api/v1/tight/{id}', 'id'), { type: 'string', maxLength: 64 })
  t.same(param('/api/v1/numbered/{n}', 'n'), { type: 'integer' }, 'a number has no length')
  t.equal((await new Validator().validate(doc)).valid, true)
  // What the document says matches what the server does.
  const long = await app.inject({ url: '/api/v1/wide/' + 'a'.repeat(257), headers: bearer() })
  t.same([long.statusCode, long.json().code], [414, 'BAD_REQUEST'], 'one character more is refused')
  t.equal((await app.inject({ url: '/api/v1/wide/' + 'a'.repeat(256), headers: bearer() })).statusCode, 404, 'at the bound, the Kernel is asked (it has no such route)')
  t.equal(kernel.requests.length, 1)
})

t.test('a mutation\'s 4XX documents the Idempotent-Replayed of a stored Kernel refusal answered again', async t => {
  // A Kernel 4xx under an Idempotency-Key is stored and answered again with Idempotent-Replayed:
  // true, which only the 2XX documented.
  const app = await buildDemoApp(t)
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  t.match(doc.paths['/api/v1/agents/{id}'].patch.responses['4XX'].headers, { 'Idempotent-Replayed': { schema: { type: 'string' } } })
  t.notOk('Idempotent-Replayed' in doc.paths['/api/v1/agents/{id}'].get.responses['4XX'].headers, 'a query takes no key')
  const call = async () => await app.inject({ method: 'PATCH', url: '/api/v1/agents/nope', headers: { ...bearer(), 'idempotency-key': 'replayed-refusal' }, payload: { name: 'x' } })
  const first = await call()
  t.same([first.statusCode, first.headers['idempotent-replayed']], [404, undefined])
  const again = await call()
  t.same([again.statusCode, again.headers['idempotent-replayed']], [404, 'true'], 'as documented')
  const off = await buildDemoApp(t, { BFF_IDEMPOTENCY_ENABLED: false })
  const docOff = (await off.inject({ url: '/openapi.json' })).json()
  t.notOk('Idempotent-Replayed' in docOff.paths['/api/v1/agents/{id}'].patch.responses['4XX'].headers, 'idempotency off: none')
  // Retry-After's description names idempotency's refusals only while it is on: off, they cannot happen.
  for (const status of ['4XX', '5XX']) {
    t.match(doc.paths['/api/v1/agents/{id}'].patch.responses[status].headers['Retry-After'].description, /IDEMPOTENCY_CONFLICT 409/, `${status}, idempotency on`)
    t.notMatch(docOff.paths['/api/v1/agents/{id}'].patch.responses[status].headers['Retry-After'].description, /IDEMPOTENCY|RATE_LIMITED/, `${status}, idempotency off`)
  }
})

t.test('an operation named batch keeps its operationId: the batch route\'s is one no operation may have', async t => {
  const op = { type: 'query', rest: 'GET /batch/:id', kernel: 'GET /v1/batch/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object' } }
  const app = await buildTestApp(t, {}, { manifest: testManifest({ batch: op }) })
  const doc = (await app.inject({ url: '/openapi.json' })).json() as OpenApiDoc
  t.equal((await new Validator().validate(doc as unknown as Record<string, unknown>)).valid, true, 'a valid document: no two operations share an id')
  const ids = Object.values(doc.paths).flatMap(methods => Object.values(methods).map(o => o.operationId))
  t.equal(new Set(ids).size, ids.length, 'operationIds are unique, as OpenAPI asks')
  t.equal(doc.paths['/api/v1/batch/{id}'].get.operationId, 'batch')
  t.equal(doc.paths['/api/v1/batch'].post.operationId, 'batch-calls')
})
