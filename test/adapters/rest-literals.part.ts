import t from 'tap'
import { buildTestApp, startTestKernel, json, bearer, fixture } from '../helper.js'
import { loadManifestFile } from '../../manifest.js'

// A query or path field declared by `enum` or `const` alone, with values that are no strings, is
// REST material (the manifest takes it), but only fields with a `type` were coerced: ?size=10
// for `size: { enum: [10, 20, 50] }` stayed the text "10" and was refused, where tRPC and batch
// take {"size":10}. Only the text String(value) writes is read as the value.
t.test('a query or path field declared by enum or const alone reads the text of its values', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/sized': (req, res) => json(res, 200, { url: req.url }),
    'GET /v1/sized/20': (req, res) => json(res, 200, { url: req.url })
  })
  const manifest = await loadManifestFile(fixture('literal-manifest.yaml'))
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const get = async (url: string) => await app.inject({ url: '/api/v1' + url, headers: bearer() })

  const ok = await get('/sized?size=10&v=2&flag=true&sizes=10&sizes=20')
  t.same([ok.statusCode, ok.json()], [200, { url: '/v1/sized?size=10&v=2&flag=true&sizes=10&sizes=20' }], 'enum, const, booleans and array items')
  t.equal((await get('/sized?flag=null')).statusCode, 200, 'null')
  const path = await get('/sized/20')
  t.same([path.statusCode, path.json()], [200, { url: '/v1/sized/20' }], 'a path parameter')
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [{ id: 'a', op: 'listSized', input: { size: 10 } }] } })
  t.same(batch.json(), { results: [{ id: 'a', result: { url: '/v1/sized?size=10' } }] }, 'as batch takes it')

  // Only the form String(value) writes: not 1e1, 010, 10.0, 2.0 or TRUE.
  for (const url of ['/sized?size=1e1', '/sized?size=010', '/sized?size=10.0', '/sized?v=2.0', '/sized?flag=TRUE', '/sized?size=11', '/sized?sizes=010', '/sized/1e1']) {
    const res = await get(url)
    t.same([res.statusCode, res.json().code], [400, 'VALIDATION_FAILED'], url)
  }
  // A field that lists the string "1" beside the number 1 keeps the string.
  const mixed = await get('/sized?mixed=1')
  t.equal(mixed.statusCode, 200, 'a string the field lists passes as it is')
  t.equal(kernel.requests.filter(r => r.url.includes('mixed')).length, 1)
})
