import t from 'tap'
import { createVerifier } from 'fast-jwt'
import { buildDemoApp, buildTestApp, bearer, json, startTestKernel, until, SECRET, closedPort } from '../helper.js'
import { tokenFromArgs } from '../../scripts/token.js'
import { generateKeyPairSync } from 'node:crypto'

t.test('/healthz answers without asking any dependency', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/healthz' })
  t.equal(res.statusCode, 200)
  t.same(res.json(), { status: 'ok' })
  t.ok(res.headers['x-request-id'])
})

t.test('/readyz reports the Kernel breaker', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/readyz' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { status: 'ready', failing: [], checks: { kernel: 'breaker closed', identity: 'keys loaded' } })
})

t.test('/readyz?scope=instance fails only for what is the instance\'s own; shared dependencies are degraded', async t => {
  // Redis configured and unreachable: every instance shares it. A readiness probe on plain
  // /readyz took every replica out of service at once, though each still answered from memory.
  const app = await buildDemoApp(t, { REDIS_URL: `redis://127.0.0.1:${await closedPort()}` })
  t.equal((await app.inject({ url: '/api/v1/agents/a1', headers: bearer() })).statusCode, 200, 'the instance answers')
  const all = await app.inject({ url: '/readyz' })
  t.equal(all.statusCode, 503)
  t.match(all.json(), { status: 'not-ready', failing: ['redis'] })
  const instance = await app.inject({ url: '/readyz?scope=instance' })
  t.equal(instance.statusCode, 200)
  t.match(instance.json(), { status: 'degraded', failing: [], degraded: ['redis'], checks: { redis: /^down/ } })
  t.equal((await app.inject({ url: '/readyz?scope=everything' })).statusCode, 400)
  const healthy = await buildDemoApp(t)
  t.match((await healthy.inject({ url: '/readyz?scope=instance' })).json(), { status: 'ready', failing: [], degraded: [] })
})

t.test('/metrics: call durations by protocol, op and status class; Kernel and pool metrics', async t => {
  const app = await buildDemoApp(t)
  await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  await app.inject({ method: 'GET', url: '/api/v1/agents/nope', headers: bearer() })
  await app.inject({ method: 'GET', url: '/api/v1/agents/a1' })
  await app.inject({ method: 'GET', url: '/api/v1/not-an-op/xyz', headers: bearer() })
  const res = await app.inject({ method: 'GET', url: '/metrics' })
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^text\/plain/)
  const body = res.body
  t.match(body, /mantle_request_duration_seconds_count\{protocol="rest",op="getAgent",status_class="2xx"\} 1/)
  t.match(body, /mantle_request_duration_seconds_count\{protocol="rest",op="getAgent",status_class="4xx"\} 2/)
  t.match(body, /mantle_kernel_request_duration_seconds_count\{op="getAgent",outcome="ok"\} 1/)
  t.match(body, /mantle_kernel_request_duration_seconds_count\{op="getAgent",outcome="client_error"\} 1/)
  t.match(body, /mantle_kernel_breaker_state\{origin="http:\/\/127\.0\.0\.1:\d+"\} 0/)
  t.match(body, /mantle_kernel_pool\{state="connected"\} \d+/)
  t.match(body, /mantle_requests_in_flight 0/)
  t.match(body, /process_cpu_seconds_total/)
  t.notMatch(body, /not-an-op|xyz|\/api\/v1/, 'no raw path becomes a label')
  t.notMatch(body, /tenant[a-z_]*=|t1"|u1"/, 'no tenant or user becomes a label')
})

t.test('/metrics: mantle_requests_in_flight counts the calls in the pipeline when scraped', async t => {
  let release: () => void = () => {}
  const held = new Promise<void>(resolve => { release = resolve })
  const kernel = await startTestKernel(t, {
    'GET /v1/agents/a1': async (_req, res) => {
      await held
      json(res, 200, { id: 'a1', name: 'n', model: 'm', description: null, createdAt: '2026-01-01T00:00:00Z', updatedAt: '2026-01-01T00:00:00Z' })
    }
  })
  const app = await buildTestApp(t, {}, { kernelUrl: kernel.url })
  const scrape = async (): Promise<string> => (await app.inject({ method: 'GET', url: '/metrics' })).body
  const calls = [0, 1].map(async () => await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() }))
  await until(() => kernel.requests.length >= 1, 'a call at the Kernel')
  t.match(await scrape(), /mantle_requests_in_flight [12]\n/, 'held at the Kernel: in flight')
  release()
  for (const res of await Promise.all(calls)) t.equal(res.statusCode, 200)
  t.match(await scrape(), /mantle_requests_in_flight 0\n/, 'answered: none')
})

t.test('the Kernel pool reuses its connections', async t => {
  const app = await buildDemoApp(t)
  for (let i = 0; i < 20; i++) await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })
  const body = (await app.inject({ method: 'GET', url: '/metrics' })).body
  const opened = Number(/mantle_kernel_pool_connections_opened_total (\d+)/.exec(body)?.[1])
  t.ok(opened >= 1 && opened <= 3, `20 sequential calls opened ${opened} connections`)
})

t.test('with metrics off there is no /metrics and no metrics stage', async t => {
  const app = await buildDemoApp(t, { BFF_METRICS_ENABLED: false })
  t.equal((await app.inject({ method: 'GET', url: '/metrics' })).statusCode, 404)
  t.notOk(app.pipeline.entry('getAgent').stages.includes('metrics'))
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: bearer() })).statusCode, 200)
})

t.test('with BFF_METRICS_TOKEN, /metrics answers only that bearer token, and the calls it counts are not refused', async t => {
  const app = await buildTestApp(t, { BFF_METRICS_TOKEN: 'prometheus-scrape-token' })
  for (const authorization of [undefined, 'Bearer prometheus-scrape-tokeN', 'Bearer prometheus-scrape-token ', bearer().authorization]) {
    const res = await app.inject({ method: 'GET', url: '/metrics', headers: authorization === undefined ? {} : { authorization } })
    t.equal(res.statusCode, 401, String(authorization))
    t.match(res.json(), { code: 'UNAUTHENTICATED', detail: 'The metrics token is missing or wrong' })
  }
  const scrape = await app.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer prometheus-scrape-token' } })
  t.equal(scrape.statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'bearer prometheus-scrape-token' } })).statusCode, 200, 'the scheme in any case (RFC 9110)')
  t.match(scrape.body, /mantle_requests_in_flight/)
  t.equal((await app.inject({ method: 'GET', url: '/healthz' })).statusCode, 200, 'the other operations endpoints are as they were')
})

t.test('npm run token mints a token the gateway accepts', async t => {
  const token = tokenFromArgs(['--tenant', 'acme', '--user', 'bob', '--roles', 'viewer, editor', '--zone', 'internal', '--ttl', '120'], { BFF_JWT_SECRET: SECRET })
  const claims = createVerifier({ key: SECRET })(token) as Record<string, unknown>
  t.match(claims, { sub: 'bob', tid: 'acme', roles: ['viewer', 'editor'], zone: 'internal' })
  t.equal((claims.exp as number) - (claims.iat as number), 120)
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'GET', url: '/api/v1/agents', headers: { authorization: `Bearer ${token}` } })
  t.equal(res.statusCode, 200)
  t.throws(() => tokenFromArgs(['--zone', 'space'], {}), /--zone must be/)
  t.throws(() => tokenFromArgs(['--ttl=-1'], {}), /--ttl must be/)
  t.throws(() => tokenFromArgs(['--ttl=1e3'], {}), /--ttl must be .*decimal digits/)
  t.throws(() => tokenFromArgs(['--ttl=0x10'], {}), /--ttl must be/)
  // Tokens the gateway refuses 401 (identity's rule for tid, sub and roles) were printed.
  t.throws(() => tokenFromArgs(['--tenant='], {}), /^--tenant must be .*the gateway refuses a token with ""/)
  t.throws(() => tokenFromArgs(['--tenant', ' acme'], {}), /^--tenant must be .*" acme"/)
  t.throws(() => tokenFromArgs(['--user', '李'], {}), /^--user must be .*"李"/)
  t.throws(() => tokenFromArgs(['--roles', 'viewer,ops\u200b'], {}), /^--roles must be .*"ops\u200b"/)
  const spaced = tokenFromArgs(['--tenant', 'acme corp', '--user', 'José', '--roles', 'team lead'], { BFF_JWT_SECRET: SECRET })
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/agents', headers: { authorization: `Bearer ${spaced}` } })).statusCode, 200, 'inner spaces and Latin-1 letters are taken')
  t.throws(() => tokenFromArgs(['--help'], {}), /Usage/)
  t.throws(() => tokenFromArgs(['--bogus'], {}), /Unknown option/)
  t.ok(tokenFromArgs([], {}).split('.').length === 3, 'defaults work with the development secret')
})

t.test('npm run token refuses to sign when the gateway takes public-key tokens only', async t => {
  // It signed with the development secret, which such a gateway refuses 401.
  const pem = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'pem' }).toString()
  const keys = JSON.stringify({ k1: pem })
  t.throws(() => tokenFromArgs([], { BFF_JWT_PUBLIC_KEYS: keys }), /^cannot sign: BFF_JWT_PUBLIC_KEYS is set and BFF_JWT_SECRET is not, .*private keys/)
  t.throws(() => tokenFromArgs([], { BFF_JWKS_URL: 'https://idp.example.com/jwks' }), /^cannot sign: BFF_JWKS_URL is set/)
  t.throws(() => tokenFromArgs([], { BFF_JWT_PUBLIC_KEYS: keys, BFF_JWKS_URL: 'https://idp.example.com/jwks' }), /^cannot sign: BFF_JWT_PUBLIC_KEYS and BFF_JWKS_URL are set/)
  const token = tokenFromArgs([], { BFF_JWT_PUBLIC_KEYS: keys, BFF_JWT_SECRET: SECRET })
  t.match(createVerifier({ key: SECRET })(token), { sub: 'dev' }, 'with a secret beside them, it signs with the secret')
})

t.test('logs never carry a token: header, cookie or ?access_token=', async t => {
  const lines: string[] = []
  const { buildApp } = await import('../../app.js')
  const { testConfig } = await import('../helper.js')
  const app = await buildApp(testConfig({ LOG_LEVEL: 'info' }), { logStream: { write: (line: string) => { lines.push(line) } } })
  t.teardown(() => app.close())
  const jwt = bearer().authorization
  await app.inject({ method: 'GET', url: '/healthz?x=1&access_token=SECRET-TOKEN-1&y=2', headers: { authorization: jwt, cookie: 'session=SECRET-COOKIE' } })
  await app.inject({ method: 'GET', url: '/healthz?ACCESS_TOKEN=SECRET-TOKEN-2' })
  const text = lines.join('')
  t.match(text, /incoming request/)
  t.match(text, /\?x=\[redacted\]&access_token=\[redacted\]&y=\[redacted\]/)
  t.notMatch(text, /SECRET-TOKEN|SECRET-COOKIE/)
  t.notOk(text.includes(jwt.slice(7)), 'the bearer token is not logged')
})
