// Every face forwards only input its schema accepts: a number JSON cannot carry is refused.
import t from 'tap'
import { inputFault } from '../../../plugins/pipeline/index.js'
import { buildTestApp, startTestKernel, testManifest, json, bearer } from '../../helper.js'

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
  t.equal(inputFault({ deep }), null)
})
