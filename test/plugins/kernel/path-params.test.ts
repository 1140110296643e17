import t from 'tap'
import { buildTestApp, startTestKernel, testManifest, bearer, json } from '../../helper.js'

// A path parameter is one segment of the Kernel's path, whatever it holds: `.` and `..` would be
// resolved by a Kernel or a proxy that normalizes paths (`/v1/items/..` is `/v1/`), so they are
// percent-encoded; so are slashes and the rest of what encodeURIComponent encodes.
t.test('path parameters never become path structure at the Kernel', async t => {
  const kernel = await startTestKernel(t, {})
  const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}/detail', input: idInput, output: { type: 'object', properties: { id: { type: 'string' } } } }
  }, { retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const cases: Array<[string, string]> = [['..', '%2E%2E'], ['.', '%2E'], ['...', '...'], ['a/../b', 'a%2F..%2Fb'], ['x.y', 'x.y']]
  for (const [, sent] of cases) kernel.on(`GET /v1/items/${sent}/detail`, (_req, res) => json(res, 200, { id: 'x' }))
  for (const [id] of cases) {
    const res = await app.inject({ url: `/trpc/getItem?input=${encodeURIComponent(JSON.stringify({ id }))}`, headers: bearer() })
    t.equal(res.statusCode, 200, `${id}: ${res.body.slice(0, 120)}`)
  }
  t.same(kernel.requests.map(r => r.url), cases.map(([, sent]) => `/v1/items/${sent}/detail`))
})
