// Schemas compiled once per text in a process (compiled.ts, compiledOnce): a
// manifest read again shares what an earlier one compiled, and /metrics says how many are kept
// (at most COMPILED_SCHEMAS: lru-cache's bound).
import t from 'tap'
import { answerCheck } from '../../../plugins/pipeline/index.js'
import { compiledSchemas } from '../../../compiled.js'
import { buildApp } from '../../../app.js'
import { bearer, testConfig, testManifest } from '../../helper.js'

t.test('two apps built on two readings of one manifest share their operations\' compiled schemas, counted in /metrics', async t => {
  const ops = (): Parameters<typeof testManifest>[0] => ({ getShared: { type: 'query', rest: 'GET /shared', kernel: 'GET /v1/shared', input: { type: 'object', properties: { sharedInput: { type: 'string' } } }, output: { type: 'object', properties: { sharedOutput: { type: 'string' } } } } })
  const before = compiledSchemas()
  const a = await buildApp(testConfig(), { logger: false, manifest: testManifest(ops()) })
  t.teardown(() => a.close())
  const once = compiledSchemas()
  t.ok(once > before, `the first app compiled its operation's schemas (${before} to ${once})`)
  const b = await buildApp(testConfig(), { logger: false, manifest: testManifest(ops()) })
  t.teardown(() => b.close())
  t.equal(compiledSchemas(), once, 'the second app compiled nothing new')
  const metrics = await (await b.inject({ method: 'GET', url: '/metrics' })).body
  t.match(metrics, new RegExp(`^mantle_compiled_schemas ${compiledSchemas()}$`, 'm'))
})

t.test('the same schema text compiles once; another text compiles anew', async t => {
  const schema = { type: 'object', properties: { compiledOnceA: { type: 'integer' } } }
  const first = answerCheck(schema)
  t.equal(answerCheck(structuredClone(schema)), first, 'a copy of the schema (a manifest read again) shares what was compiled')
  t.equal(first({ compiledOnceA: 1 }), true)
  t.equal(first({ compiledOnceA: 'x' }), false)
  const other = answerCheck({ type: 'object', properties: { compiledOnceA: { type: 'string' } } })
  t.not(other, first, 'another schema is compiled on its own')
  t.equal(other({ compiledOnceA: 'x' }), true)
})

t.test('an input schema with an $id at its root and an integer field builds, and its integers are held to the safe range', async t => {
  // Its copy held to safe integers kept the $id, and compiled in the same Ajv it was refused
  // ("schema with key or id ... already exists"): the manifest passed, the gateway did not start.
  const manifest = testManifest({ getById: { type: 'query', rest: 'GET /by-id', kernel: 'GET /v1/by-id', input: { $id: 'https://x.example/by-id', type: 'object', properties: { n: { type: 'integer' } } }, output: { type: 'object' } } })
  const app = await buildApp(testConfig(), { logger: false, manifest })
  t.teardown(() => app.close())
  const res = await app.inject({ method: 'GET', url: `/api/v1/by-id?n=${2 ** 60}`, headers: bearer() })
  t.equal(res.statusCode, 400, 'an integer past the safe range is refused')
  t.match(res.json(), { code: 'VALIDATION_FAILED' })
})
