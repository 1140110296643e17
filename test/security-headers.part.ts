import t from 'tap'
import WebSocket from 'ws'
import { buildApp } from '../app.js'
import { ConfigError } from '../schemas/config.js'
import { buildDemoApp, buildTestApp, testConfig, bearer, SECRET } from './helper.js'

const ALLOWED = 'https://app.example.com'
const OTHER = 'https://evil.example'
const preflight = (origin: string): Record<string, string> => ({ origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type,idempotency-key' })

t.test('no CORS header at all when BFF_CORS_ORIGINS is unset', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), origin: ALLOWED } })
  t.equal(res.statusCode, 200)
  t.notOk(Object.keys(res.headers).some(h => h.startsWith('access-control-')), 'no access-control-* header')
  const pre = await app.inject({ method: 'OPTIONS', url: '/api/v1/agents', headers: preflight(ALLOWED) })
  t.equal(pre.headers['access-control-allow-origin'], undefined)
  t.equal(pre.headers['access-control-allow-methods'], undefined)
})

t.test('with CORS on, a plain OPTIONS (no preflight) names the path\'s methods in Allow (RFC 9110 §9.3.7)', async t => {
  const app = await buildDemoApp(t, { BFF_CORS_ORIGINS: ALLOWED })
  // A client asking what a resource is served with (no Access-Control-Request-Method): the 204
  // said nothing, while the 405 of the same path names them.
  const plain = await app.inject({ method: 'OPTIONS', url: '/api/v1/agents/a1?x=1' })
  t.equal(plain.statusCode, 204)
  t.equal(plain.headers.allow, 'GET, HEAD, PATCH, DELETE, OPTIONS')
  t.equal((await app.inject({ method: 'OPTIONS', url: '/graphql' })).headers.allow, 'GET, HEAD, POST, OPTIONS')
  // A preflight is CORS's: its methods are in Access-Control-Allow-Methods.
  const pre = await app.inject({ method: 'OPTIONS', url: '/api/v1/agents/a1', headers: preflight(ALLOWED) })
  t.equal(pre.statusCode, 204)
  t.equal(pre.headers.allow, undefined)
  // A path no route serves has no methods to name.
  t.equal((await app.inject({ method: 'OPTIONS', url: '/api/v1/nothing' })).headers.allow, undefined)
})

t.test('CORS: an allowed origin gets the headers, another origin does not', async t => {
  const app = await buildDemoApp(t, { BFF_CORS_ORIGINS: ` ${ALLOWED}, http://localhost:5173 ` })

  const pre = await app.inject({ method: 'OPTIONS', url: '/api/v1/agents', headers: preflight(ALLOWED) })
  t.equal(pre.statusCode, 204, 'preflight answered')
  t.equal(pre.headers['access-control-allow-origin'], ALLOWED)
  t.match(pre.headers['access-control-allow-methods'], /POST/)
  const allowed = String(pre.headers['access-control-allow-headers']).toLowerCase().split(/,\s*/)
  // If-None-Match too: a browser's conditional request on a cached query failed its preflight.
  // trpc-accept: httpBatchStreamLink sends it by default, and a browser's preflight failed
  // without it; tracestate: the gateway forwards it beside traceparent.
  for (const h of ['authorization', 'content-type', 'idempotency-key', 'if-none-match', 'traceparent', 'tracestate', 'trpc-accept', 'x-request-id']) t.ok(allowed.includes(h), `allows ${h}`)
  t.equal(pre.headers['access-control-allow-credentials'], undefined, 'no credentials')

  const second = await app.inject({ method: 'OPTIONS', url: '/graphql', headers: preflight('http://localhost:5173') })
  t.equal(second.headers['access-control-allow-origin'], 'http://localhost:5173', 'every listed origin')

  const simple = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), origin: ALLOWED } })
  t.equal(simple.statusCode, 200)
  t.equal(simple.headers['access-control-allow-origin'], ALLOWED)
  t.equal(simple.headers.vary, 'Origin, authorization', 'CORS\'s Vary and the cache\'s, both')
  const exposed = String(simple.headers['access-control-expose-headers']).toLowerCase()
  for (const h of ['x-request-id', 'retry-after', 'ratelimit-remaining', 'etag', 'x-cache', 'www-authenticate']) t.ok(exposed.includes(h), `exposes ${h}`)

  const badPre = await app.inject({ method: 'OPTIONS', url: '/api/v1/agents', headers: preflight(OTHER) })
  t.equal(badPre.headers['access-control-allow-origin'], undefined, 'preflight of another origin: no allow-origin')
  const bad = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { ...bearer(), origin: OTHER } })
  t.equal(bad.statusCode, 200, 'the call itself is not refused (the browser enforces CORS)')
  t.equal(bad.headers['access-control-allow-origin'], undefined, 'another origin: no allow-origin')
})

t.test('CORS * allows any origin outside production', async t => {
  const app = await buildTestApp(t, { BFF_CORS_ORIGINS: '*' })
  const res = await app.inject({ method: 'GET', url: '/healthz', headers: { origin: OTHER } })
  t.equal(res.headers['access-control-allow-origin'], '*')
})

t.test('a bad BFF_CORS_ORIGINS stops start-up, naming it; * is refused in production only', async t => {
  t.throws(() => testConfig({ BFF_CORS_ORIGINS: 'https://app.example.com/path' }), { name: 'ConfigError', message: /BFF_CORS_ORIGINS/ })
  await t.rejects(buildApp(testConfig({ NODE_ENV: 'production', BFF_JWT_SECRET: SECRET, BFF_CORS_ORIGINS: `${ALLOWED},*` })), ConfigError)
  await t.rejects(buildApp(testConfig({ NODE_ENV: 'production', BFF_JWT_SECRET: SECRET, BFF_CORS_ORIGINS: '*' })), /BFF_CORS_ORIGINS contains \*/)
})

t.test('helmet headers on a REST answer, an error answer and a 404; no CSP', async t => {
  const app = await buildDemoApp(t)
  const ok = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  const err = await app.inject({ method: 'GET', url: '/api/v1/agents/a1' })
  const missing = await app.inject({ method: 'GET', url: '/nope' })
  t.equal(ok.statusCode, 200)
  t.equal(err.statusCode, 401)
  t.equal(missing.statusCode, 404)
  for (const [name, res] of [['200', ok], ['401', err], ['404', missing]] as const) {
    t.equal(res.headers['x-content-type-options'], 'nosniff', `${name}: nosniff`)
    t.match(res.headers['strict-transport-security'], /max-age=\d+/, `${name}: HSTS`)
    t.equal(res.headers['x-frame-options'], 'SAMEORIGIN', `${name}: frameguard`)
    t.equal(res.headers['referrer-policy'], 'no-referrer', `${name}: referrer-policy`)
    t.equal(res.headers['content-security-policy'], undefined, `${name}: no CSP (JSON API; /docs and /graphiql run inline scripts)`)
  }
  const docs = await app.inject({ method: 'GET', url: '/docs/' })
  t.equal(docs.statusCode, 200, '/docs serves')
  t.equal(docs.headers['content-security-policy'], undefined, '/docs: no CSP to break Swagger UI')
})

t.test('WebSocket upgrades still work with helmet (and CORS) on', async t => {
  const app = await buildDemoApp(t, { BFF_CORS_ORIGINS: ALLOWED })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  for (const [path, protocol] of [['/ws', undefined], ['/graphql', 'graphql-transport-ws'], ['/trpc', undefined]] as const) {
    const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`, protocol, { headers: { ...bearer(), origin: ALLOWED } })
    t.teardown(() => ws.terminate())
    const opened = await new Promise<boolean>((resolve) => {
      ws.once('open', () => resolve(true))
      ws.once('error', () => resolve(false))
    })
    t.ok(opened, `${path} upgrades`)
  }
})

t.test('a URL Fastify cannot route is a problem+json 4xx with the request id and the security headers, and never echoes the URL', async t => {
  const app = await buildDemoApp(t)
  const cases: Array<[string, number, string]> = [
    ['/api/v1/agents/%E0%A4%A?access_token=secret-token', 400, 'The URL path is not valid percent-encoding'],
    ['/nope/%zz', 400, 'The URL path is not valid percent-encoding'],
    ['/api/v1/agents/' + 'a'.repeat(300), 414, 'A path segment is longer than 256 characters']
  ]
  for (const [url, status, detail] of cases) {
    const res = await app.inject({ method: 'GET', url, headers: { 'x-request-id': 'bad-url-1' } })
    t.equal(res.statusCode, status, url.slice(0, 40))
    t.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8')
    t.match(res.json(), { code: 'BAD_REQUEST', status, detail, requestId: 'bad-url-1' })
    t.equal(res.headers['x-request-id'], 'bad-url-1')
    t.equal(res.headers['x-content-type-options'], 'nosniff')
    t.notMatch(res.body, /secret-token|%E0|aaaa/, 'the URL is not echoed')
  }
})
