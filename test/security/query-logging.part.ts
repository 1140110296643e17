import t from 'tap'
import { buildApp } from '../../app.js'
import { bearer, json, startTestKernel, testConfig, testManifest } from '../helper.js'

// "The firewall never logs text. A call's input is never logged by the
// gateway" (README). A query's input travels in the URL (REST GET query string, tRPC
// `?input=`, GraphQL GET `?variables=`), and the request log line carries the URL.

const SECRET = 'ghp_' + 'a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8'

t.test('a firewall field of a query operation never reaches a log line through the URL', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/search': (_req, res) => json(res, 200, { ok: true }) })
  const op = (action: string, rest: string): Record<string, unknown> => ({
    type: 'query',
    rest,
    kernel: 'GET /v1/search',
    input: { type: 'object', required: ['q'], properties: { q: { type: 'string' } } },
    output: { type: 'object', properties: { ok: { type: 'boolean' } } },
    firewall: { fields: ['q'], action }
  })
  const manifest = testManifest({ search: op('block', 'GET /search'), searchRedact: op('redact', 'GET /search-redact') }, { url: kernel.url })
  const lines: string[] = []
  const app = await buildApp(testConfig({ LOG_LEVEL: 'info' }), { manifest, kernelUrl: kernel.url, logger: undefined, logStream: { write: (line: string) => { lines.push(line) } } })
  t.teardown(() => app.close())
  await app.ready()

  const rest = await app.inject({ url: `/api/v1/search?q=${encodeURIComponent('my key ' + SECRET)}`, headers: bearer() })
  t.equal(rest.statusCode, 403, 'REST: blocked')
  const trpc = await app.inject({ url: `/trpc/search?input=${encodeURIComponent(JSON.stringify({ q: 'my key ' + SECRET }))}`, headers: bearer() })
  t.equal(trpc.statusCode, 403, 'tRPC: blocked')
  const graphql = await app.inject({ url: `/graphql?query=${encodeURIComponent('query ($q: String!) { search(q: $q) { ok } }')}&variables=${encodeURIComponent(JSON.stringify({ q: 'my key ' + SECRET }))}`, headers: bearer() })
  t.equal(graphql.statusCode, 200, `GraphQL GET: answered (the field carries the refusal): ${graphql.body.slice(0, 200)}`)
  t.match(graphql.body, /FIREWALL_BLOCKED/, 'GraphQL GET: the firewall refused the field')
  const redacted = await app.inject({ url: `/api/v1/search-redact?q=${encodeURIComponent('my key ' + SECRET)}`, headers: bearer() })
  t.equal(redacted.statusCode, 200, 'REST redact: passes redacted')
  t.notOk(kernel.requests.some(r => r.url.includes(SECRET)), 'the Kernel never saw the secret')

  t.ok(lines.length > 0, 'lines were written')
  const leaking = lines.filter(l => l.includes(SECRET) || l.includes(encodeURIComponent(SECRET)))
  t.equal(leaking.length, 0, `no log line holds the secret (leaking: ${leaking.map(l => l.slice(0, 220)).join(' | ')})`)
})
