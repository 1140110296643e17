// With compression on, an answer of 1 KiB or more to a request whose Accept-Encoding names br,
// gzip or deflate goes out compressed with `Vary: accept-encoding` (so that a shared cache keeps
// the encodings apart). /openapi.json declared Vary only on a cached query's 2XX and 304: a
// mutation's 2XX, an uncached query's and the batch's 200 sent a Vary their entries did not name.
import t from 'tap'
import { buildTestApp, bearer, startTestKernel, testManifest, json } from '../helper.js'

type Headers = Record<string, unknown>
type Doc = { paths: Record<string, Record<string, { responses: Record<string, { headers?: Headers }> }>> }
const declares = (headers: Headers | undefined, name: string): boolean => Object.keys(headers ?? {}).some(h => h.toLowerCase() === name)

for (const compression of [true, false]) {
  t.test(`every 2XX the gateway may compress declares the Vary it carries (compression ${compression ? 'on' : 'off'})`, async t => {
    const big = { ok: true, pad: 'x'.repeat(3000) }
    const kernel = await startTestKernel(t, {
      'POST /v1/big': (_req, res) => json(res, 200, big),
      'GET /v1/big': (_req, res) => json(res, 200, big)
    })
    const output = { type: 'object', properties: { ok: { type: 'boolean' }, pad: { type: 'string' } } }
    const manifest = testManifest({
      bigWrite: { type: 'mutation', rest: 'POST /big', kernel: 'POST /v1/big', input: { type: 'object' }, output },
      bigRead: { type: 'query', rest: 'GET /big', kernel: 'GET /v1/big', input: { type: 'object' }, output }
    }, { url: kernel.url })
    // The cache off: a query answers no Vary of its own, only compression's.
    const app = await buildTestApp(t, { BFF_CACHE_ENABLED: false, BFF_COMPRESSION_ENABLED: compression }, { manifest, kernelUrl: kernel.url })
    const doc = (await app.inject({ url: '/openapi.json' })).json() as Doc
    const headers = { ...bearer(), 'accept-encoding': 'gzip' }
    const answers = {
      'POST /api/v1/big': await app.inject({ method: 'POST', url: '/api/v1/big', headers, payload: {} }),
      'GET /api/v1/big': await app.inject({ method: 'GET', url: '/api/v1/big', headers }),
      'POST /api/v1/batch': await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: 'w', op: 'bigWrite' }, { id: 'r', op: 'bigRead' }] } })
    }
    for (const [route, res] of Object.entries(answers)) {
      const [method, path] = route.split(' ')
      t.equal(res.statusCode, 200, `${route}: 200`)
      t.equal(res.headers['content-encoding'], compression ? 'gzip' : undefined, `${route}: compressed only with compression on`)
      t.equal(res.headers.vary, compression ? 'accept-encoding' : undefined, `${route}: its Vary`)
      const entry = doc.paths[path][method.toLowerCase()].responses['2XX']
      t.equal(declares(entry.headers, 'vary'), compression, `${route}: its 2XX declares Vary only when it may carry one`)
    }
  })
}
