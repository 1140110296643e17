// What clients without a token leave unread is one share, as one tenant's (adapters/unread.ts).
// Their answers counted against the instance's total alone and were never refused: anyone could
// ask for a large document (/openapi.json, /docs/yaml) on many connections and read none of it,
// until the total was passed; every tenant's requests were then refused 503 OVERLOADED, and
// every WebSocket frame closed its socket with 1013.
import t from 'tap'
import { unreadGet } from './unread-client.js'
import { buildApp } from '../../app.js'
import { startTestKernel, testManifest, testConfig, json, token } from '../helper.js'

// A schema whose description makes the OpenAPI document some 8 MB (it is written twice): more than a socket's buffers take.
const LONG = 'd'.repeat(4 * 1024 * 1024)
const SHARE = 1024 * 1024
const TOTAL = 20 * 1024 * 1024

t.test('clients without a token hold at most one share unread together; tenants are served', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/small': (_req, res) => json(res, 200, { data: 'small' }) })
  const manifest = testManifest({
    getSmall: { type: 'query', rest: 'GET /small', kernel: 'GET /v1/small', output: { type: 'object', description: LONG, properties: { data: { type: 'string' } } } }
  }, { url: kernel.url })
  const app = await buildApp(testConfig({ BFF_WEBSOCKET_ENABLED: false, BFF_COMPRESSION_ENABLED: false }), { logger: false, manifest, kernelUrl: kernel.url, unreadBytes: { max: TOTAL, perTenant: SHARE } })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const base = `http://127.0.0.1:${port}`

  const size = Buffer.byteLength(JSON.stringify(app.swagger()))
  t.ok(size * 3 > TOTAL && size * 2 < TOTAL, `a document of ${size} bytes: three of them pass the instance's total, two do not`)
  const first = await unreadGet(t, port, '/openapi.json')
  t.equal(first.status, 'HTTP/1.1 200 OK', 'the first document is sent')
  const next = await unreadGet(t, port, '/openapi.json')
  t.equal(next.status, 'HTTP/1.1 503 Service Unavailable', 'the next one, beyond the share of clients without a token, is left out')
  const third = await unreadGet(t, port, '/openapi.json')
  t.equal(third.status, 'HTTP/1.1 503 Service Unavailable')

  const tenant = await fetch(`${base}/api/v1/small`, { headers: { authorization: `Bearer ${token({ tenant: 'acme', roles: ['viewer'] })}` } })
  t.equal(tenant.status, 200, 'a tenant is served meanwhile')
  const scrape = await fetch(`${base}/metrics`)
  t.equal(scrape.status, 200, 'and the scrape')
  t.ok(Number(/^mantle_unread_bytes (\d+)$/m.exec(await scrape.text())?.[1]) <= TOTAL, 'the instance holds less than its total')

  first.socket.destroy()
  let again = 0
  for (let i = 0; i < 250 && again !== 200; i++) {
    const res = await fetch(`${base}/openapi.json`)
    again = res.status
    await res.arrayBuffer()
    if (again !== 200) await new Promise(resolve => setTimeout(resolve, 20))
  }
  t.equal(again, 200, 'the document is sent again once the first client is gone')
})
