import t from 'tap'
import { buildTestApp, startTestKernel, testManifest, json, bearer, token } from './helper.js'
import { refusedUpgrade } from './adapters/websocket-helper.js'
import { parseQuery, MALFORMED_QUERY } from '../query-string.js'

// A query string that is not valid percent-encoding of UTF-8 was taken literally (Fastify's
// parser keeps what it cannot decode): `?q=%ff` reached the Kernel as the text `%ff`.
const MALFORMED = ['q=%ff', 'q=%E0%A4%A', 'q=%zz', 'q=%', 'q%zz=1', 'q=ok&limit=%E0%A4']

t.test('parseQuery: Fastify\'s fields for a well-formed query string, MALFORMED_QUERY otherwise', async t => {
  t.same(parseQuery(''), {})
  t.same({ ...parseQuery('q=a+b%20c&n=1&n=2&e=') }, { q: 'a b c', n: ['1', '2'], e: '' })
  t.same({ ...parseQuery('q=%25zz&k%C3%A9=%E2%82%AC') }, { q: '%zz', ké: '€' }, 'an escaped % and UTF-8 are decoded')
  for (const query of MALFORMED) t.equal(parseQuery(query), MALFORMED_QUERY, query)
})

t.test('a malformed query string is refused 400 VALIDATION_FAILED on every face, and never reaches the Kernel', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/things': (req, res) => json(res, 200, { url: req.url }) })
  const manifest = testManifest({
    listThings: { type: 'query', rest: 'GET /things', kernel: 'GET /v1/things', input: { type: 'object', properties: { q: { type: 'string' }, limit: { type: 'integer' } } }, output: { type: 'object', properties: { url: { type: 'string' } } } }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const detail = 'The query string is not valid percent-encoding (UTF-8)'

  for (const query of MALFORMED) {
    const res = await app.inject({ url: '/api/v1/things?' + query, headers: { ...bearer(), 'x-request-id': 'bad-query-1' } })
    t.equal(res.statusCode, 400, query)
    t.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8')
    t.match(res.json(), { code: 'VALIDATION_FAILED', status: 400, detail, requestId: 'bad-query-1' })
    t.equal(res.headers['x-request-id'], 'bad-query-1')
    t.equal(res.headers['x-content-type-options'], 'nosniff', 'the security headers')
  }
  const trpc = await app.inject({ url: '/trpc/listThings?input=' + encodeURIComponent('{"q":"') + '%ff' + encodeURIComponent('"}'), headers: bearer() })
  t.equal(trpc.statusCode, 400, 'tRPC GET')
  t.match(trpc.json(), { error: { message: detail, data: { code: 'VALIDATION_FAILED', httpStatus: 400 } } })
  const graphql = await app.inject({ url: '/graphql?query=' + encodeURIComponent('{ listThings(q: "') + '%E0%A4%A' + encodeURIComponent('") { url } }'), headers: bearer() })
  t.equal(graphql.statusCode, 400, 'GraphQL GET')
  t.match(graphql.json(), { errors: [{ message: detail, extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
  t.equal(kernel.requests.length, 0, 'nothing reached the Kernel')

  const ok = await app.inject({ url: '/api/v1/things?q=%25zz%20%E2%82%AC&limit=5', headers: bearer() })
  t.same(ok.json(), { url: '/v1/things?q=%25zz+%E2%82%AC&limit=5' }, 'a well-formed one goes on, decoded')

  // A path's bad percent-encoding is refused before routing, as before: 400 problem+json too.
  const path = await app.inject({ url: '/api/v1/things/%zz?q=%ff' })
  t.match([path.statusCode, path.headers['content-type'], path.json().code], [400, 'application/problem+json; charset=utf-8', 'BAD_REQUEST'])
})

t.test('a WebSocket upgrade with a malformed query string is refused 400 before any socket, on each path', async t => {
  const app = await buildTestApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  for (const path of ['/ws', '/graphql', '/trpc']) {
    // A valid token beside the bad escape: the refusal is the query's, not the token's.
    const refused = await refusedUpgrade(`ws://127.0.0.1:${port}${path}?access_token=${token()}&x=%ff`)
    t.equal(refused.status, 400, path)
    t.equal(JSON.stringify(refused.body).includes('VALIDATION_FAILED'), true, `${path}: VALIDATION_FAILED`)
  }
})

// A liveness probe with junk in its query (a monitor's cache buster, `?x=%zz`) was refused 400.
t.test('the probes take a malformed query string literally and answer', async t => {
  const app = await buildTestApp(t)
  for (const url of ['/healthz?x=%zz', '/healthz/?x=%ff', '/metrics?x=%E0%A4%A']) {
    t.equal((await app.inject({ url })).statusCode, 200, url)
  }
  const ready = await app.inject({ url: '/readyz?scope=instance&x=%zz' })
  t.equal(ready.statusCode, 200)
  t.ok(Array.isArray(ready.json().degraded), 'its well-formed scope is read')
  const scope = await app.inject({ url: '/readyz?scope=%zz' })
  t.equal(scope.statusCode, 400, 'a scope that is no scope is still refused, by /readyz\'s own schema')
  t.equal((await app.inject({ url: '/diagz?x=%zz', headers: bearer({ roles: ['operator'] }) })).statusCode, 400, 'no other route of the gateway\'s own')
})

// The refusal came in app.ts's first onRequest hook, before @fastify/cors's: it had no CORS
// header, and a browser reported a CORS failure instead of the 400.
for (const guard of [3, undefined]) {
  t.test(`with CORS on, a malformed query's refusal carries CORS's headers, and its preflight is answered (guard ${guard === undefined ? 'off' : 'on'})`, async t => {
    const origin = 'https://app.example'
    const app = await buildTestApp(t, { BFF_CORS_ORIGINS: origin, BFF_RATE_LIMIT_GLOBAL_MAX: guard })
    const preflight = await app.inject({ method: 'OPTIONS', url: '/api/v1/agents?q=%zz', headers: { origin, 'access-control-request-method': 'GET', 'access-control-request-headers': 'authorization' } })
    t.equal(preflight.statusCode, 204, 'the preflight, as any: the request it asks for is refused, which a script can read')
    t.equal(preflight.headers['access-control-allow-origin'], origin)
    t.match(preflight.headers['access-control-allow-headers'], /Authorization/)
    const res = await app.inject({ url: '/api/v1/agents?q=%zz', headers: { origin, ...bearer() } })
    t.equal(res.statusCode, 400)
    t.match(res.json(), { code: 'VALIDATION_FAILED' })
    t.equal(res.headers['access-control-allow-origin'], origin, 'the refusal carries CORS\'s headers')
    t.match(res.headers['access-control-expose-headers'], /x-request-id/)
    t.equal(res.headers['x-content-type-options'], 'nosniff')
    t.equal(res.headers['ratelimit-limit'], undefined, 'refused before the guard counts it')
  })
}
