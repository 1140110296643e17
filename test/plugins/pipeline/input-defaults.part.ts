// The input schema's defaults are written into the call's own copy of its input, never into the
// object the face handed over: GraphQL hands every field that names one variable the same value.
import t from 'tap'
import { copyInput, declaresDefault } from '../../../plugins/pipeline/index.js'
import { buildTestApp, startTestKernel, testManifest, json, bearer } from '../../helper.js'

t.test('two fields of one GraphQL document that share a variable each get their own operation\'s defaults', async t => {
  const kernel = await startTestKernel(t, {
    'POST /v1/a': (req, res) => json(res, 200, { got: req.body }),
    'POST /v1/b': (req, res) => json(res, 200, { got: req.body }),
    'POST /v1/qa': (req, res) => json(res, 200, { got: req.body }),
    'POST /v1/qb': (req, res) => json(res, 200, { got: req.body })
  })
  // An object with additionalProperties is GraphQL's JSON scalar: one value for every use of $o.
  const options = (mode: string): object => ({ type: 'object', properties: { mode: { type: 'string', default: mode } }, additionalProperties: true })
  const output = { type: 'object', properties: { got: { type: 'string' } } }
  const manifest = testManifest({
    runA: { type: 'mutation', rest: 'POST /a', kernel: 'POST /v1/a', input: { type: 'object', properties: { options: options('fast') } }, output },
    runB: { type: 'mutation', rest: 'POST /b', kernel: 'POST /v1/b', input: { type: 'object', properties: { options: options('safe') } }, output },
    readA: { type: 'query', rest: 'POST /qa', kernel: 'POST /v1/qa', input: { type: 'object', properties: { options: options('fast') } }, output },
    readB: { type: 'query', rest: 'POST /qb', kernel: 'POST /v1/qb', input: { type: 'object', properties: { options: options('safe') } }, output }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })

  const mutation = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: 'mutation($o: JSON) { a: runA(options: $o) { got } b: runB(options: $o) { got } }', variables: { o: { n: 1 } } } })
  t.same(mutation.json(), { data: { a: { got: '{"options":{"n":1,"mode":"fast"}}' }, b: { got: '{"options":{"n":1,"mode":"safe"}}' } } }, 'runB runs with its own default, not runA\'s')
  const rest = await app.inject({ method: 'POST', url: '/api/v1/b', headers: bearer(), payload: { options: { n: 1 } } })
  t.same(rest.json(), { got: '{"options":{"n":1,"mode":"safe"}}' }, 'as REST sends the same input')

  kernel.requests.length = 0
  const query = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: 'query($o: JSON) { b: readB(options: $o) { got } a: readA(options: $o) { got } b2: readB(options: $o) { got } }', variables: { o: { n: 1 } } } })
  t.equal(query.statusCode, 200)
  const data = query.json().data as Record<string, { got: string }>
  t.equal(data.a.got, '{"options":{"n":1,"mode":"fast"}}', 'readA with its default')
  t.equal(data.b.got, '{"options":{"n":1,"mode":"safe"}}', 'readB with its default')
  t.same(data.b2, data.b, 'the same call twice is the same call')
  t.equal(kernel.requests.length, 2, 'and reaches the Kernel once')
})

t.test('copyInput copies every object and array, keeps own __proto__ keys as keys, and any depth', async t => {
  const input = JSON.parse('{"a":{"b":[1,{"c":null}]},"__proto__":{"x":1},"d":"s"}') as Record<string, unknown>
  const copy = copyInput(input)
  t.same(JSON.stringify(copy), JSON.stringify(input), 'the same JSON, keys in their order')
  t.not(copy.a, input.a)
  t.not((copy.a as { b: unknown[] }).b[1], (input.a as { b: unknown[] }).b[1])
  t.ok(Object.hasOwn(copy, '__proto__'), '__proto__ is an own key')
  t.equal(Object.getPrototypeOf(copy), Object.prototype, 'and not the copy\'s prototype')
  const deep = JSON.parse('{"d":' + '['.repeat(200_000) + ']'.repeat(200_000) + '}') as Record<string, unknown>
  t.doesNotThrow(() => copyInput(deep), 'a deep input does not exhaust the stack')
  t.equal(declaresDefault({ type: 'object', properties: { a: { type: 'string' } } }), false)
  t.equal(declaresDefault({ type: 'object', properties: { a: { type: 'array', items: { type: 'object', properties: { b: { default: 1 } } } } } }), true)
  t.equal(declaresDefault({ type: 'object', properties: { a: { enum: [{ default: 1 }] } } }), false, 'not inside a literal')
})

t.test('an operation with defaults refuses a deep input for its depth, not with a 500', async t => {
  const kernel = await startTestKernel(t, { 'POST /v1/a': (_req, res) => json(res, 200, {}) })
  const manifest = testManifest({
    runA: { type: 'mutation', rest: 'POST /a', kernel: 'POST /v1/a', input: { type: 'object', properties: { mode: { type: 'string', default: 'x' }, free: {} } }, output: { type: 'object' } }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const res = await app.inject({ method: 'POST', url: '/api/v1/a', headers: { ...bearer(), 'content-type': 'application/json' }, payload: '{"free":' + '['.repeat(100_000) + ']'.repeat(100_000) + '}' })
  t.equal(res.statusCode, 400)
  t.match(res.json(), { code: 'VALIDATION_FAILED', detail: /more than 256 levels deep/ })
})
