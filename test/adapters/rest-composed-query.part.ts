import t from 'tap'
import { buildTestApp, startTestKernel, testManifest, json, bearer } from '../helper.js'

// A GET's input may take its fields from a shared schema (`allOf: [{ $ref: "#/schemas/Paging" }]`)
// or declare them in its branches (`oneOf`). Only the input's own `properties` were coerced from
// the query string: `?limit=5` stayed the text "5" and was refused (`input.limit must be
// integer`) where tRPC took {"limit":5}, and the document had no parameter for the field.
t.test('a query string field the input is composed of is coerced and documented', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/items': (req, res) => json(res, 200, { url: req.url }),
    'GET /v1/items/a': (req, res) => json(res, 200, { url: req.url })
  })
  const manifest = testManifest({
    listItems: {
      type: 'query',
      rest: 'GET /items',
      kernel: 'GET /v1/items',
      input: { type: 'object', allOf: [{ $ref: '#/schemas/Paging' }], properties: { q: { type: 'string' } } },
      output: { type: 'object', properties: { url: { type: 'string' } } }
    },
    findItem: {
      type: 'query',
      rest: 'GET /items/:id',
      kernel: 'GET /v1/items/{id}',
      input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } }, oneOf: [{ required: ['n'], properties: { n: { type: 'integer' } } }, { required: ['s'], properties: { s: { type: 'string' } } }] },
      output: { type: 'object', properties: { url: { type: 'string' } } }
    },
    // A closed input lets the composed fields through by naming them `true`: the typed declaration is read.
    closedItems: {
      type: 'query',
      rest: 'GET /closed-items',
      kernel: 'GET /v1/items',
      input: { type: 'object', additionalProperties: false, properties: { limit: true, all: true }, allOf: [{ $ref: '#/schemas/Paging' }] },
      output: { type: 'object', properties: { url: { type: 'string' } } }
    }
  }, { url: kernel.url }, { schemas: { Paging: { type: 'object', required: ['limit'], properties: { limit: { type: 'integer', maximum: 10 }, all: { type: 'boolean' } } } } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const get = async (url: string) => await app.inject({ url: '/api/v1' + url, headers: bearer() })

  const listed = await get('/items?limit=5&all=true&q=a')
  t.same([listed.statusCode, listed.json()], [200, { url: '/v1/items?limit=5&all=true&q=a' }], 'the fields of a schema in allOf')
  const found = await get('/items/a?n=5')
  t.same([found.statusCode, found.json()], [200, { url: '/v1/items/a?n=5' }], 'a field of a oneOf branch')
  const closed = await get('/closed-items?limit=5&all=false')
  t.same([closed.statusCode, closed.json()], [200, { url: '/v1/items?limit=5&all=false' }], 'a field named `true` by a closed input, typed in allOf')
  // Refused as on every other face, by the rules of the schema that declares the field.
  t.match((await get('/items?limit=50')).json(), { code: 'VALIDATION_FAILED', detail: 'input.limit must be <= 10' })
  t.match((await get('/items?limit=0x1')).json(), { code: 'VALIDATION_FAILED', detail: 'input.limit must be integer' })
  t.match((await get('/items?all=true')).json(), { code: 'VALIDATION_FAILED', detail: /limit/ })

  const doc = (await app.inject({ url: '/openapi.json' })).json()
  const parameters = (path: string): unknown[] => doc.paths[path].get.parameters
    .filter((p: { in: string }) => p.in === 'query')
    .map((p: { name: string, required: boolean, schema: unknown }) => [p.name, p.required, p.schema])
  t.same(parameters('/api/v1/items'), [['q', false, { type: 'string' }], ['limit', true, { type: 'integer', maximum: 10 }], ['all', false, { type: 'boolean' }]], 'allOf\'s fields, and its required')
  t.same(parameters('/api/v1/closed-items'), [['limit', true, { type: 'integer', maximum: 10 }], ['all', false, { type: 'boolean' }]], 'the typed declarations')
  t.same(parameters('/api/v1/items/{id}'), [['n', false, { type: 'integer' }], ['s', false, { type: 'string' }]], 'a branch\'s required is not always')
})
