import t from 'tap'
import { buildTestApp, startTestKernel, testManifest, json, bearer } from '../helper.js'

// A GET's input may take fields it does not name (`patternProperties`, an `additionalProperties`
// schema). Only named fields were coerced from the query string: `?f_size=5` stayed the text "5"
// and was refused (`input.f_size must be integer`) where tRPC took {"f_size":5}.
t.test('a query string field the input does not name is read by the schema that takes it', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/items': (req, res) => json(res, 200, { url: req.url }) })
  const output = { type: 'object', properties: { url: { type: 'string' } } }
  const manifest = testManifest({
    byPattern: { type: 'query', rest: 'GET /by-pattern', kernel: 'GET /v1/items', input: { type: 'object', patternProperties: { '^f_': { type: 'integer' }, '^e_': { enum: [1, 2] } } }, output },
    byRest: { type: 'query', rest: 'GET /by-rest', kernel: 'GET /v1/items', input: { type: 'object', properties: { q: { type: 'string' } }, additionalProperties: { type: 'array', items: { type: 'integer' } } }, output }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const get = async (url: string) => await app.inject({ url: '/api/v1' + url, headers: bearer() })

  const patterned = await get('/by-pattern?f_size=5&e_kind=2&other=x')
  t.same([patterned.statusCode, patterned.json()], [200, { url: '/v1/items?f_size=5&e_kind=2&other=x' }], 'patternProperties: a number, an enum\'s number, a key no pattern takes')
  const rest = await get('/by-rest?q=a&ids=5&ids=6&one=7')
  t.same([rest.statusCode, rest.json()], [200, { url: '/v1/items?q=a&ids=5&ids=6&one=7' }], 'an additionalProperties schema: an array of integers, one item alone')
  // Read only as JSON writes a number, as a named field is.
  for (const [url, detail] of [['/by-pattern?f_size=0x10', 'input.f_size must be integer'], ['/by-pattern?e_kind=3', 'input.e_kind must be equal to one of the allowed values'], ['/by-rest?ids=1&ids=+2', 'input.ids.1 must be integer']]) {
    t.match((await get(url)).json(), { code: 'VALIDATION_FAILED', detail }, url)
  }
  t.equal(kernel.requests.length, 2, 'no refused call reached the Kernel')
})
