import t, { type Test } from 'tap'
import { MAX_ANSWER_CHARS } from '../../adapters/face.js'
import { buildTestApp, startTestKernel, testManifest, bearer, json } from '../helper.js'

// Identical queries of one request share one Kernel call: 30 tRPC batch calls or GraphQL fields
// of one 3 MB query made a 94 MB answer, from a request of under 1 KB (as the REST batch's did).
const blob = 'x'.repeat(3 * 1024 * 1024)
const FIT = Math.floor(MAX_ANSWER_CHARS / blob.length)

async function bigApp (t: Test) {
  const kernel = await startTestKernel(t, {
    'GET /v1/big': (_req, res) => json(res, 200, { blob }),
    'POST /v1/big': (_req, res) => json(res, 200, { blob })
  })
  const output = { type: 'object', properties: { blob: { type: 'string' } } }
  const manifest = testManifest({
    getBig: { type: 'query', rest: 'GET /big', kernel: 'GET /v1/big', output },
    makeBig: { type: 'mutation', rest: 'POST /big', kernel: 'POST /v1/big', output }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  return { app, kernel }
}

t.test('a tRPC batch answers at most MAX_ANSWER_CHARS of query results, the rest PAYLOAD_TOO_LARGE', async t => {
  const { app, kernel } = await bigApp(t)
  const n = FIT + 4
  const input = JSON.stringify(Object.fromEntries(Array.from({ length: n }, (_, i) => [i, {}])))
  const res = await app.inject({ method: 'GET', url: `/trpc/${Array(n).fill('getBig').join(',')}?batch=1&input=${encodeURIComponent(input)}`, headers: bearer() })
  t.ok(res.body.length <= MAX_ANSWER_CHARS + 100_000, `${res.body.length} characters`)
  const results = res.json() as Array<{ result?: { data: { blob: string } }, error?: { data: { code: string, httpStatus: number } } }>
  t.equal(results.length, n, 'every call answered')
  t.equal(results.filter(r => r.result?.data.blob === blob).length, FIT, 'the query results that fit')
  t.equal(results.filter(r => r.error?.data.code === 'PAYLOAD_TOO_LARGE' && r.error.data.httpStatus === 413).length, n - FIT, 'the rest left out')
  t.equal(kernel.requests.length, 1, 'one Kernel call for the identical queries')
})

t.test('a GraphQL answer holds at most MAX_ANSWER_CHARS, as serialized: root fields past it are null, PAYLOAD_TOO_LARGE', async t => {
  const { app, kernel } = await bigApp(t)
  const n = FIT + 4
  const query = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: `{ ${Array.from({ length: n }, (_, i) => `a${i}: getBig { blob }`).join(' ')} }` } })
  t.ok(query.body.length <= MAX_ANSWER_CHARS + 100_000, `${query.body.length} characters`)
  const { data, errors } = query.json() as { data: Record<string, { blob: string } | null>, errors: Array<{ path: string[], message: string, extensions: { code: string, status: number } }> }
  t.equal(Object.values(data).filter(v => v?.blob === blob).length, FIT, 'the query results that fit')
  t.same(errors.map(e => [e.path[0], e.extensions.code, e.extensions.status]), Array.from({ length: n - FIT }, (_, i) => [`a${FIT + i}`, 'PAYLOAD_TOO_LARGE', 413]), 'the rest left out, each named')
  t.equal(kernel.requests.length, 1, 'one Kernel call for the identical queries')

  // One root field, one call, its large value selected under 30 aliases: counted once per call,
  // it made a 94 MB answer.
  const aliases = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: `{ one: getBig { ${Array.from({ length: 30 }, (_, i) => `b${i}: blob`).join(' ')} } }` } })
  t.ok(aliases.body.length < 10_000, `${aliases.body.length} characters`)
  t.match(aliases.json(), { data: { one: null }, errors: [{ path: ['one'], message: /ask for it again/, extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }] })

  const mutation = await app.inject({ method: 'POST', url: '/graphql', headers: bearer({ roles: ['viewer', 'operator', 'admin'] }), payload: { query: `mutation { ${Array.from({ length: FIT + 1 }, (_, i) => `m${i}: makeBig { blob }`).join(' ')} }` } })
  const made = mutation.json() as { data: Record<string, { blob: string } | null>, errors: Array<{ path: string[], message: string, extensions: { code: string } }> }
  t.equal(kernel.requests.filter(r => r.method === 'POST').length, FIT + 1, 'every mutation carried out')
  t.equal(Object.values(made.data).filter(v => v?.blob === blob).length, FIT, 'the results that fit')
  t.match(made.errors, [{ path: [`m${FIT}`], message: /mutation was carried out/, extensions: { code: 'PAYLOAD_TOO_LARGE' } }], 'the one past it says the mutation ran')
})
