import t from 'tap'
import { buildTestApp, startTestKernel, testManifest, bearer } from '../../helper.js'

const item = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' } }, additionalProperties: false }

// README "The Kernel side": "a refused or reset connection | 503 KERNEL_UNAVAILABLE".
// A connection the Kernel resets after the 2xx headers, in the middle of the body, too (it was
// once reported as 502 KERNEL_ERROR, "a body that is not JSON or too large").
t.test('a connection reset in the middle of a 2xx body is 503 KERNEL_UNAVAILABLE', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/items/r1': (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': '100' })
      res.write('{"id":"r1"')
      setTimeout(() => res.socket?.destroy(), 20)
    },
    'GET /v1/items/r2': (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' }) // chunked
      res.write('{"id":"r2"')
      setTimeout(() => res.socket?.destroy(), 20)
    }
  })
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 2000 }
  }, { retries: 0, circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  for (const id of ['r1', 'r2']) {
    const res = await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers: bearer() })
    t.equal(res.statusCode, 503, `${id}: ${res.body}`)
    t.match(res.json(), { code: 'KERNEL_UNAVAILABLE' })
  }
})
