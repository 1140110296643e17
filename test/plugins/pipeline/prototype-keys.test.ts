// REST refuses a body with a "__proto__" key (Fastify's secure-json-parse), and so must every
// face: an upstream that merges its input into an object would take the key as a prototype.
import t from 'tap'
import { inputFault } from '../../../plugins/pipeline/index.js'
import { buildTestApp, startTestKernel, testManifest, json, bearer } from '../../helper.js'

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
})

t.test('inputFault: the first thing wrong with a parsed input, anywhere in it', async t => {
  t.equal(inputFault({ a: 1, b: [1, { c: 'x' }], constructor: 'fine', d: { constructor: { name: 'x' } } }), null)
  t.match(inputFault(JSON.parse('{"a":[{"b":{"__proto__":{}}}]}') as object), /prototype/)
  t.match(inputFault(JSON.parse('{"constructor":{"prototype":{}}}') as object), /prototype/)
  t.match(inputFault({ a: [Infinity] }), /finite/)
})
