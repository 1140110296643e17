// The HTTP guard (@fastify/rate-limit with the sliding-window store): every request and every
// WebSocket upgrade, per verified tenant, else per address; never the probes.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import WebSocket from 'ws'
import { Redis } from 'ioredis'
import { connect, type AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { buildTestApp, startTestKernel, testManifest, bearer, token, json, testConfig, until } from '../../helper.js'
import { loadConfig, rateLimitStore, ConfigError } from '../../../schemas/config.js'
import { buildApp } from '../../../app.js'
import { tenantKey, ipKey } from '../../../plugins/rate-limit/index.js'

const op = (rest: string) => ({ type: 'query', rest, kernel: 'GET /v1/ok', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } })
const events = { runUpdated: { topic: 'runs.updated', payload: { type: 'object' } } }

async function guarded (t: Parameters<typeof buildTestApp>[0], env: Record<string, string | number | boolean | undefined> = {}): Promise<FastifyInstance> {
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }) })
  return await buildTestApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 3, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 60_000, ...env }, {
    manifest: testManifest({ ping: op('GET /ping'), pong: op('GET /pong') }, { url: kernel.url }, { events }),
    kernelUrl: kernel.url
  })
}

t.test('beyond the limit: 429 RATE_LIMITED problem+json with Retry-After and RateLimit-*', async t => {
  const app = await guarded(t)
  const headers = bearer({ tenant: 'g-' + randomUUID() })
  for (let i = 0; i < 3; i++) {
    const res = await app.inject({ url: i === 1 ? '/api/v1/pong' : '/api/v1/ping', headers })
    t.equal(res.statusCode, 200)
    t.equal(res.headers['ratelimit-limit'], '3')
    t.equal(res.headers['ratelimit-remaining'], String(2 - i))
    const reset = Number(res.headers['ratelimit-reset'])
    // The last place's reset is when a call would pass again: with a sliding window, up to a
    // third of the window past its end here (3 calls, the previous window weighing 2).
    t.ok(reset >= 1 && reset <= (i < 2 ? 60 : 80), `seconds until the window ends, or a place frees (${reset})`)
  }
  const res = await app.inject({ url: '/api/v1/ping', headers })
  t.equal(res.statusCode, 429)
  t.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8')
  t.match(res.json(), { code: 'RATE_LIMITED', status: 429, title: 'Rate limited', requestId: res.headers['x-request-id'] })
  t.ok(Number(res.headers['retry-after']) >= 1 && Number(res.headers['retry-after']) <= 120)
  t.equal(res.headers['ratelimit-limit'], '3')
  t.equal(res.headers['ratelimit-remaining'], '0')
  t.equal(res.headers['ratelimit-reset'], res.headers['retry-after'])
  t.ok(res.headers['x-content-type-options'], 'security headers still on the refusal')
  // Every route, not only the operations': the batch endpoint, the faces, unknown ops of tRPC.
  t.equal((await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [] } })).statusCode, 429)
  t.equal((await app.inject({ url: '/trpc/ping', headers })).statusCode, 429)
  t.equal((await app.inject({ method: 'HEAD', url: '/api/v1/ping', headers })).statusCode, 429, 'HEAD too')
  t.equal((await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ ping { ok } }' } })).statusCode, 429)
  const metrics = (await app.inject({ url: '/metrics' })).body
  t.match(metrics, /mantle_rate_limit_refusals_total\{scope="global",store="memory"\} [1-9]/)
})

t.test('the probes and the metrics scrape are never limited', async t => {
  const app = await guarded(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1 })
  for (let i = 0; i < 5; i++) {
    for (const url of ['/healthz', '/readyz', '/metrics']) {
      const res = await app.inject({ url })
      t.equal(res.statusCode, 200, url)
      t.notOk(res.headers['ratelimit-limit'], `${url} is not counted`)
    }
  }
  t.equal((await app.inject({ url: '/api/v1/ping' })).statusCode, 401, 'the one request the limit allows')
  t.equal((await app.inject({ url: '/api/v1/ping' })).statusCode, 429)
})

t.test('a forged token spends its address\'s budget, never the tenant it names', async t => {
  const app = await guarded(t)
  const tenant = 'g-' + randomUUID()
  const forged = { authorization: `Bearer ${token({ tenant, secret: 'another-secret-that-is-long-enough-0123456789' })}` }
  const statuses: number[] = []
  for (let i = 0; i < 5; i++) statuses.push((await app.inject({ url: '/api/v1/ping', headers: forged })).statusCode)
  t.same(statuses, [401, 401, 401, 429, 429], 'counted by address')
  t.equal((await app.inject({ url: '/api/v1/ping' })).statusCode, 429, 'the same address without a token: the same budget')
  const real = bearer({ tenant })
  for (let i = 0; i < 3; i++) t.equal((await app.inject({ url: '/api/v1/ping', headers: real })).statusCode, 200, 'the real tenant keeps its whole budget')
  t.equal((await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant, user: 'other' }) })).statusCode, 429, 'which every user of the tenant shares')
  t.equal((await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant: 'g-' + randomUUID() }) })).statusCode, 200, 'another tenant has its own')
})

t.test('with identity off, every caller is counted by address', async t => {
  const app = await guarded(t, { BFF_AUTH_ENABLED: false, BFF_RATE_LIMIT_GLOBAL_MAX: 2 })
  const headers = bearer({ tenant: 'g-' + randomUUID() })
  t.equal((await app.inject({ url: '/api/v1/ping', headers })).statusCode, 200)
  t.equal((await app.inject({ url: '/api/v1/ping', remoteAddress: '10.0.0.9' })).statusCode, 200)
  t.equal((await app.inject({ url: '/api/v1/ping', remoteAddress: '10.0.0.9' })).statusCode, 200, 'another address has its own budget')
  t.equal((await app.inject({ url: '/api/v1/ping', headers })).statusCode, 200)
  t.equal((await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant: 'g-' + randomUUID() }) })).statusCode, 429, 'a token changes nothing')
})

t.test('WebSocket upgrades are guarded too (/ws, /graphql, /trpc), before their own checks', async t => {
  const app = await guarded(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const base = `ws://127.0.0.1:${(app.server.address() as { port: number }).port}`
  const tenant = 'g-' + randomUUID()
  const tok = token({ tenant })
  /** Resolves with 101 when the upgrade is accepted, else with the HTTP status and body. */
  const upgrade = async (path: string, protocol?: string): Promise<{ status: number, body: string, headers: Record<string, unknown> }> => await new Promise((resolve, reject) => {
    const ws = new WebSocket(base + path, protocol)
    ws.on('open', () => { ws.close(); resolve({ status: 101, body: '', headers: {} }) })
    ws.on('unexpected-response', (_req, res) => {
      let body = ''
      res.on('data', (c: Buffer) => { body += c.toString() })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }))
    })
    ws.on('error', reject)
  })
  t.equal((await upgrade(`/ws?access_token=${tok}`)).status, 101, 'the token in the query string names the tenant')
  t.equal((await upgrade(`/graphql?access_token=${tok}`, 'graphql-transport-ws')).status, 101)
  t.equal((await upgrade(`/trpc?access_token=${tok}`)).status, 101)
  // Upgrades that may bring their token after it: /graphql in connection_init, /trpc in connectionParams.
  for (const [path, protocol] of [[`/ws?access_token=${tok}`], ['/graphql', 'graphql-transport-ws'], ['/trpc?connectionParams=1']] as Array<[string, string?]>) {
    const refused = await upgrade(path, protocol)
    if (path.startsWith('/ws')) {
      t.equal(refused.status, 429, path)
      t.match(JSON.parse(refused.body), { code: 'RATE_LIMITED', status: 429 })
      t.ok(Number(refused.headers['retry-after']) >= 1)
      t.equal(refused.headers['ratelimit-remaining'], '0')
    } else {
      t.equal(refused.status, 101, `${path} without a token counts by address, whose budget is fresh`)
    }
  }
  // The address's budget: 2 used above; a bad token is refused by the guard before /ws checks it.
  t.equal((await upgrade('/ws?access_token=forged')).status, 401)
  t.equal((await upgrade('/ws?access_token=forged')).status, 429, 'the guard runs before the upgrade\'s own token check')
  t.equal((await upgrade('/graphql', 'graphql-transport-ws')).status, 429)
  t.equal((await upgrade('/trpc')).status, 429)
})

t.test('forged-token upgrades of /graphql are counted and refused by the guard, as on /ws', async t => {
  // The GraphQL face checked an upgrade's token in a hook of its instance, which Fastify runs
  // before every route hook, the guard's included: each forged upgrade was a 401, never counted.
  const app = await guarded(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const base = `ws://127.0.0.1:${(app.server.address() as { port: number }).port}`
  const status = async (path: string, protocol?: string): Promise<number> => await new Promise((resolve, reject) => {
    const ws = new WebSocket(base + path, protocol)
    ws.on('open', () => { ws.close(); resolve(101) })
    ws.on('unexpected-response', (_req, res) => { res.resume(); res.on('end', () => resolve(res.statusCode ?? 0)) })
    ws.on('error', reject)
  })
  const graphql: number[] = []
  for (let i = 0; i < 5; i++) graphql.push(await status('/graphql?access_token=forged', 'graphql-transport-ws'))
  t.same(graphql, [401, 401, 401, 429, 429])
  t.equal(await status('/ws?access_token=forged'), 429, 'the same address\'s budget')
})

// The HTTP guard counts every HTTP request but /healthz, /readyz and /metrics
// (README, Rate limits). /diagz was once registered before the guard's onRoute hook existed,
// and so was never counted.

t.test('the HTTP guard counts GET /diagz like every other route', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }) })
  const app = await buildTestApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 3, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 60_000, BFF_DIAGZ_ENABLED: true }, {
    manifest: testManifest({ ping: op('GET /ping') }, { url: kernel.url }),
    kernelUrl: kernel.url
  })
  const headers = bearer({ tenant: 'g-' + randomUUID() })
  const statuses: number[] = []
  for (let i = 0; i < 5; i++) statuses.push((await app.inject({ url: '/diagz', headers })).statusCode)
  t.same(statuses, [200, 200, 200, 429, 429], 'the fourth request of the tenant in the window is refused')
  t.equal((await app.inject({ url: '/api/v1/ping', headers })).statusCode, 429, 'and /diagz spent the tenant\'s budget')
})

// @fastify/cors answered every OPTIONS request in its own onRequest hook, on a route declared
// before the guard's: ten preflights from one address passed a limit of 3, and left its GETs
// their whole budget.
t.test('CORS preflights and other OPTIONS requests are counted and refused like every request', async t => {
  const origin = 'https://app.example'
  const app = await guarded(t, { BFF_CORS_ORIGINS: origin })
  const preflight = { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type' }
  const statuses: number[] = []
  for (let i = 0; i < 3; i++) {
    const res = await app.inject({ method: 'OPTIONS', url: i === 2 ? '/nope' : '/api/v1/ping', headers: i === 1 ? {} : preflight })
    statuses.push(res.statusCode)
    t.equal(res.headers['ratelimit-remaining'], String(2 - i), 'counted, with RateLimit-* as any request')
  }
  t.same(statuses, [204, 204, 204], 'answered as CORS answers them, to any path')
  const allowed = await app.inject({ method: 'OPTIONS', url: '/api/v1/ping', headers: preflight, remoteAddress: '10.0.0.9' })
  t.equal(allowed.statusCode, 204)
  t.equal(allowed.headers['content-length'], '0')
  t.equal(allowed.headers['access-control-allow-origin'], origin)
  t.match(allowed.headers['access-control-allow-methods'], /POST/)

  const refused = await app.inject({ method: 'OPTIONS', url: '/api/v1/ping', headers: preflight })
  t.equal(refused.statusCode, 429, 'the fourth request of the address')
  t.equal(refused.headers['content-type'], 'application/problem+json; charset=utf-8')
  t.match(refused.json(), { code: 'RATE_LIMITED', status: 429, requestId: refused.headers['x-request-id'] })
  t.ok(Number(refused.headers['retry-after']) >= 1)
  t.equal(refused.headers['ratelimit-limit'], '3')
  t.equal(refused.headers['ratelimit-remaining'], '0')
  t.equal(refused.headers['access-control-allow-origin'], origin, 'a browser sees the refused preflight\'s status, not a CORS failure')
  t.equal((await app.inject({ method: 'OPTIONS', url: '/api/v1/ping' })).statusCode, 429, 'an OPTIONS request without CORS headers too')
  t.equal((await app.inject({ url: '/api/v1/ping' })).statusCode, 429, 'the OPTIONS requests spent the address\'s budget of GETs')
  for (let i = 0; i < 3; i++) t.equal((await app.inject({ url: '/api/v1/ping', remoteAddress: '10.0.0.8' })).statusCode, 401, 'another address keeps its own')
})

// The guard's preflight hook counted every OPTIONS request, to the probes too: README says they
// are never counted.
t.test('a preflight to a probe is answered as CORS answers it, uncounted', async t => {
  const origin = 'https://app.example'
  const app = await guarded(t, { BFF_CORS_ORIGINS: origin, BFF_RATE_LIMIT_GLOBAL_MAX: 1 })
  for (let i = 0; i < 3; i++) {
    for (const url of ['/healthz', '/readyz?scope=instance', '/metrics', '/healthz/']) {
      const res = await app.inject({ method: 'OPTIONS', url, headers: { origin, 'access-control-request-method': 'GET' } })
      t.equal(res.statusCode, 204, url)
      t.equal(res.headers['content-length'], '0')
      t.equal(res.headers['access-control-allow-origin'], origin)
      t.notOk(res.headers['ratelimit-limit'], `${url} is not counted`)
    }
  }
  t.equal((await app.inject({ method: 'OPTIONS', url: '/healthzz' })).statusCode, 204, 'the one request the limit allows: any other path is counted')
  t.equal((await app.inject({ url: '/api/v1/ping' })).statusCode, 429)
})

t.test('without the guard, CORS answers every preflight, uncounted', async t => {
  const origin = 'https://app.example'
  const app = await guarded(t, { BFF_CORS_ORIGINS: origin, BFF_RATE_LIMIT_GLOBAL_MAX: undefined })
  for (let i = 0; i < 5; i++) {
    const res = await app.inject({ method: 'OPTIONS', url: '/api/v1/ping', headers: { origin, 'access-control-request-method': 'GET' } })
    t.equal(res.statusCode, 204)
    t.equal(res.headers['access-control-allow-origin'], origin)
    t.notOk(res.headers['ratelimit-limit'])
  }
})

t.test('rate-limit configuration', async t => {
  const base = { NODE_ENV: 'test' }
  const plain = loadConfig(base)
  t.equal(plain.BFF_RATE_LIMIT_ENABLED, true, 'on by default')
  t.equal(plain.BFF_RATE_LIMIT_GLOBAL_MAX, undefined, 'no guard by default')
  t.equal(plain.BFF_RATE_LIMIT_GLOBAL_WINDOW_MS, 60000)
  t.equal(rateLimitStore(plain), 'memory', 'no REDIS_URL: memory')
  t.equal(rateLimitStore(loadConfig({ ...base, REDIS_URL: 'redis://127.0.0.1:6379' })), 'redis', 'REDIS_URL: Redis')
  t.equal(rateLimitStore(loadConfig({ ...base, REDIS_URL: 'redis://127.0.0.1:6379', BFF_RATE_LIMIT_STORE: 'memory' })), 'memory', 'unless told otherwise')
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_STORE: 'redis' }), { name: 'ConfigError', message: /BFF_RATE_LIMIT_STORE="redis" needs REDIS_URL/ })
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_STORE: 'postgres' }), { message: /BFF_RATE_LIMIT_STORE="postgres" is invalid: expected memory \| redis/ })
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_GLOBAL_MAX: '0' }), { message: /BFF_RATE_LIMIT_GLOBAL_MAX="0" is invalid: expected an integer \(1 or more\)/ })
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 'soon' }), { message: /BFF_RATE_LIMIT_GLOBAL_WINDOW_MS="soon" is invalid/ })
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_ENABLED: 'maybe' }), { message: /BFF_RATE_LIMIT_ENABLED="maybe" is invalid: expected true or false/ })
  t.equal(loadConfig({ ...base, BFF_RATE_LIMIT_GLOBAL_MAX: '100' }).BFF_RATE_LIMIT_GLOBAL_MAX, 100)
  t.ok(ConfigError)
})

t.test('the plugin refuses a Redis store without the Redis connection', async t => {
  const config = { ...testConfig(), BFF_RATE_LIMIT_STORE: 'redis' as const }
  await t.rejects(buildApp(config, { logger: false }), /BFF_RATE_LIMIT_STORE=redis needs REDIS_URL/)
})

t.test('a request whose client reset the connection at once is no 500 of the guard', async t => {
  // request.ip is undefined once the socket is gone: @fastify/rate-limit's normalizeIP threw on it.
  const lines: string[] = []
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }) })
  const app = await buildTestApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1000, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 60_000, LOG_LEVEL: 'error' }, {
    manifest: testManifest({ ping: op('GET /ping') }, { url: kernel.url }),
    kernelUrl: kernel.url,
    logger: undefined,
    logStream: { write: (line: string) => { lines.push(line) } }
  })
  let parsed = 0
  await app.listen({ port: 0, host: '127.0.0.1' })
  app.server.on('request', () => { parsed++ })
  const { port } = app.server.address() as AddressInfo
  for (let i = 0; i < 50; i++) {
    const socket = connect(port, '127.0.0.1')
    socket.on('error', () => {})
    await new Promise(resolve => socket.once('connect', resolve))
    socket.write('GET /api/v1/ping HTTP/1.1\r\nHost: x\r\n\r\n')
    socket.resetAndDestroy()
  }
  // Each reaches the guard once Node has parsed it (before, each such request was a 500).
  await until(() => parsed === 50, 'every request to be parsed')
  await new Promise(resolve => setTimeout(resolve, 200))
  t.same(lines.filter(l => l.includes('"level":50')), [], 'no error logged')
})

t.test('BFF_TRUST_PROXY: behind a proxy, callers without a token count by their own address', async t => {
  // Before, nothing could set trustProxy: behind an ingress, every caller without a valid token
  // (anonymous, expired, a WebSocket whose token comes in connection_init) shared the ingress's
  // one budget, and one flood got every other such caller refused.
  const flood = async (app: FastifyInstance): Promise<number> => {
    for (let i = 0; i < 3; i++) await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': `203.0.113.${i + 1}` } })
    return (await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': '198.51.100.7' } })).statusCode
  }
  t.equal(await flood(await guarded(t)), 429, 'unset: one address for all, the connection\'s')
  t.equal(await flood(await guarded(t, { BFF_TRUST_PROXY: '127.0.0.1' })), 401, 'the proxy by its address: the victim\'s own budget, so its 401')
  t.equal(await flood(await guarded(t, { BFF_TRUST_PROXY: '127.0.0.0/8,::1' })), 401, 'by its range')
  t.equal(await flood(await guarded(t, { BFF_TRUST_PROXY: '10.0.0.0/8' })), 429, 'another proxy\'s range: not believed')
  // A hop count believed a client that reached the gateway directly (Fastify itself no longer
  // honours one); /0 believes everyone; a bad range stopped start-up without naming the variable.
  for (const bad of ['true', '1', '2', 'any', '10.0.0.0/33', '0.0.0.0/0', '::/0', '.', 'a:b', '10.0.0.1/8/1', ',', ' , ']) {
    t.throws(() => testConfig({ BFF_TRUST_PROXY: bad }), /BFF_TRUST_PROXY=.* is invalid/, bad)
  }
  t.equal(testConfig({ BFF_TRUST_PROXY: '10.0.0.0/8,::1,2001:db8::/32' }).BFF_TRUST_PROXY, '10.0.0.0/8,::1,2001:db8::/32')
})

t.test('BFF_TRUST_PROXY: a list written with spaces after its commas is read as BFF_CORS_ORIGINS is', async t => {
  // Before, `10.0.0.0/8, 127.0.0.1` stopped start-up (" 127.0.0.1" is no address), where
  // BFF_CORS_ORIGINS of the same shape started: its entries are trimmed, empty ones dropped.
  const app = await guarded(t, { BFF_TRUST_PROXY: '10.0.0.0/8, 127.0.0.1 ,' })
  for (let i = 0; i < 3; i++) await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': `203.0.113.${i + 1}` } })
  t.equal((await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': '198.51.100.7' } })).statusCode, 401, 'the proxy after the space is believed: the victim\'s own budget')
})

// Some balancers write X-Forwarded-For as IP:port (Azure's Application Gateway): each client
// connection was a key of its own, and a client that opened a new one per request was never limited.
t.test('BFF_TRUST_PROXY: an X-Forwarded-For entry with a port counts by its address', async t => {
  const app = await guarded(t, { BFF_TRUST_PROXY: '127.0.0.1' })
  const codes: number[] = []
  for (let i = 0; i < 4; i++) codes.push((await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': `203.0.113.9:${5000 + i}` } })).statusCode)
  t.same(codes, [401, 401, 401, 429], 'IPv4 with a port: one budget')
  const six: number[] = []
  for (let i = 0; i < 4; i++) six.push((await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': `[2001:db8:1::1]:${5000 + i}` } })).statusCode)
  t.same(six, [401, 401, 401, 429], 'IPv6 with a port: one budget')
  const junk: number[] = []
  for (let i = 0; i < 4; i++) junk.push((await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': `not-an-address-${i}` } })).statusCode)
  t.same(junk, [401, 401, 401, 429], 'an entry that is no address: the proxy\'s budget, never one per value')
})

// The guard read the token from the raw URL and took an empty header as one: a tenant's token
// sent as %61ccess_token, or beside an empty Authorization, was verified by the route but counted
// against the caller's address, a budget on top of the tenant's.
t.test('the guard reads the token as the routes do', async t => {
  const app = await guarded(t)
  const tenant = 'g-' + randomUUID()
  const raw = bearer({ tenant }).authorization.slice('Bearer '.length)
  for (let i = 0; i < 3; i++) t.equal((await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant }) })).statusCode, 200)
  // tRPC's calls, which take `?access_token=` (REST takes the header alone: below).
  t.equal((await app.inject({ url: `/trpc/ping?%61ccess_token=${raw}` })).statusCode, 429, 'a percent-encoded name: the tenant\'s budget, spent')
  t.equal((await app.inject({ url: `/trpc/ping?access_token=${raw}`, headers: { authorization: '' } })).statusCode, 429, 'beside an empty header: the tenant\'s budget, spent')
  // REST reads no `?access_token=` (a 401): such a request counts by address, as the audit logs it.
  t.equal((await app.inject({ url: `/api/v1/ping?access_token=${raw}` })).statusCode, 401, 'a token REST does not read: the address\'s budget')
})

// The guard read a token from the Authorization header or `?access_token=` only, where tRPC
// also takes one from `?connectionParams=` (httpSubscriptionLink puts it there: an EventSource
// sets no header). Such calls counted towards their address: every tenant behind one NAT or
// egress shared one budget (one tenant's calls got another's refused), and a tenant had one
// more budget on each address it called from. Counted in memory and in the real Redis alike.
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
for (const store of ['memory', 'redis'] as const) {
  t.test(`${store}: a token in tRPC's ?connectionParams= counts towards its tenant`, async t => {
    // A day's window: windows are aligned to the clock, and Redis's `c` checks below count
    // the window's own calls (a minute's could end between them).
    const day = { BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 86_400_000 }
    const app = await guarded(t, store === 'redis' ? { ...day, REDIS_URL, BFF_REDIS_COMMAND_TIMEOUT_MS: 10_000 } : day)
    t.equal(app.rateLimiter.store, store)
    // Addresses of this test alone (the Redis is shared): 10.x.y.z from a UUID's bytes.
    const address = (): string => '10.' + randomUUID().replace(/-/g, '').slice(0, 6).match(/../g)!.map(h => parseInt(h, 16)).join('.')
    const [nat, other, third, fourth] = [address(), address(), address(), address()]
    const tenants = Array.from({ length: 5 }, () => 'g-' + randomUUID())
    const [one, two, three, four, spent] = tenants
    const redis = store === 'redis' ? new Redis(REDIS_URL) : null
    if (redis !== null) {
      t.teardown(async () => {
        await redis.del(...tenants.map(tenantKey), ...[nat, other, third, fourth].map(ipKey))
        redis.disconnect()
      })
    }
    const params = (value: Record<string, string>): string => encodeURIComponent(JSON.stringify(value))
    const call = async (remoteAddress: string, query: string, method: 'GET' | 'HEAD' = 'GET'): Promise<number> =>
      (await app.inject({ method, url: `/trpc/ping?input=%7B%7D&${query}`, remoteAddress })).statusCode
    // An SSE subscription (HEAD: its status alone) and two calls, all by connectionParams.
    t.equal((await app.inject({ method: 'HEAD', url: `/trpc/runUpdated?connectionParams=${params({ token: token({ tenant: one }) })}`, remoteAddress: nat })).statusCode, 200, 'an SSE subscription')
    t.equal(await call(nat, `connectionParams=${params({ token: token({ tenant: one }) })}`), 200)
    t.equal(await call(nat, `connectionParams=${params({ authorization: `Bearer ${token({ tenant: one, user: 'u2' })}` })}`), 200, '{ authorization } too')
    t.equal(await call(other, `connectionParams=${params({ token: token({ tenant: one }) })}`), 429, 'the tenant from another address: its one budget, spent')
    for (let i = 0; i < 3; i++) t.equal(await call(nat, `connectionParams=${params({ token: token({ tenant: two }) })}`), 200, 'another tenant behind the same address has its own budget')
    t.equal((await app.inject({ url: '/api/v1/ping', remoteAddress: nat })).statusCode, 401, 'and the address its own, untouched')
    // connectionParams before ?access_token=, as tRPC reads them: the call is the third tenant's,
    // not the one whose budget its header calls spent.
    for (let i = 0; i < 3; i++) t.equal((await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant: spent }), remoteAddress: third })).statusCode, 200)
    t.equal(await call(third, `connectionParams=${params({ token: token({ tenant: three }) })}&access_token=${token({ tenant: spent })}`), 200, 'the token tRPC takes, not the query\'s')
    // A token that fails verification counts by address, whatever it names: rotating junk or
    // forged ones does not escape the address's budget.
    const forged = (i: number): string => token({ tenant: 'g-' + randomUUID(), user: `u${i}`, secret: 'another-secret-that-is-long-enough-0123456789' })
    const junk: number[] = []
    for (let i = 0; i < 5; i++) junk.push(await call(fourth, `connectionParams=${params({ token: i % 2 === 0 ? forged(i) : `junk.${randomUUID()}` })}`))
    t.same(junk, [401, 401, 401, 429, 429], 'forged and junk tokens, each new: the address\'s budget')
    t.equal(await call(fourth, `connectionParams=${params({ token: token({ tenant: four }) })}`), 200, 'a valid token from that address: its tenant\'s')
    if (redis !== null) {
      t.equal(await redis.hget(tenantKey(one as string), 'c'), '3', 'counted in Redis, under the tenant\'s key')
      t.equal(await redis.hget(ipKey(fourth), 'c'), '3', 'and under the address\'s')
    }
  })
}

// tRPC takes the first ?connectionParams= of a request (URLSearchParams.get); the guard read
// Fastify's query, where two make a list, and took none: the call, its first one's tenant's,
// was counted towards its address (a budget more on each address, shared with whoever calls
// from there), or towards the tenant of the ?access_token= beside it, which tRPC does not read.
t.test('the guard takes the first ?connectionParams=, as tRPC does', async t => {
  const app = await guarded(t)
  const tenant = 'g-' + randomUUID()
  const other = 'g-' + randomUUID()
  const params = (value: Record<string, string>): string => encodeURIComponent(JSON.stringify(value))
  const twice = `connectionParams=${params({ token: token({ tenant }) })}&connectionParams=${params({ token: 'junk' })}`
  const statuses: number[] = []
  for (let i = 0; i < 4; i++) statuses.push((await app.inject({ url: `/trpc/ping?input=%7B%7D&${twice}`, remoteAddress: `10.9.8.${i}` })).statusCode)
  t.same(statuses, [200, 200, 200, 429], 'the tenant\'s calls from four addresses: its one budget')
  // Beside another tenant's ?access_token=: the call is the first connectionParams' tenant's.
  for (let i = 0; i < 3; i++) t.equal((await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant: other }), remoteAddress: '10.9.9.1' })).statusCode, 200)
  const fresh = 'g-' + randomUUID()
  const beside = `connectionParams=${params({ token: token({ tenant: fresh }) })}&connectionParams=x&access_token=${token({ tenant: other })}`
  t.equal((await app.inject({ url: `/trpc/ping?input=%7B%7D&${beside}`, remoteAddress: '10.9.9.2' })).statusCode, 200, 'not the spent budget of the tenant tRPC does not run it as')
})

// proxy-addr trusts no hop written with a port: a trusted proxy behind the balancer that added
// one (Front Door, then Application Gateway writing IP:port) was taken for the client, and every
// client behind it shared its key.
t.test('BFF_TRUST_PROXY: a trusted hop written with a port is still trusted', async t => {
  const app = await guarded(t, { BFF_TRUST_PROXY: '127.0.0.1,198.51.100.0/24' })
  const codes: number[] = []
  for (let i = 0; i < 4; i++) codes.push((await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': `203.0.113.${i + 1}, 198.51.100.7:443` } })).statusCode)
  t.same(codes, [401, 401, 401, 401], 'each client behind the trusted proxy has its own budget')
  const ported: number[] = []
  for (let i = 0; i < 4; i++) ported.push((await app.inject({ url: '/api/v1/ping', headers: { 'x-forwarded-for': `203.0.113.${i + 11}:80, 198.51.100.7:443` } })).statusCode)
  t.same(ported, [401, 401, 401, 401], 'and with ports on both')
})

t.test('a REST request offering h2c is counted as REST reads it: its ?access_token= is not its token', async t => {
  // Node marks any request with `Connection: upgrade` as an upgrade (a GET offering HTTP/2 in
  // cleartext, which REST serves as HTTP/1.1): the guard read such a request's token the
  // WebSocket way, and counted a REST request's ?access_token=, which REST never reads, towards
  // the tenant it names rather than the address. (Such an offer is now taken off before anything
  // reads the request: servePlainUpgrades.)
  const app = await guarded(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const h2c = async (path: string, authorization?: string): Promise<{ status: number, remaining: string | undefined }> => {
    const socket = connect(port, '127.0.0.1')
    const chunks: Buffer[] = []
    socket.on('data', (c: Buffer) => chunks.push(c))
    socket.setTimeout(3000, () => socket.destroy())
    socket.write(`GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n${authorization === undefined ? '' : `Authorization: ${authorization}\r\n`}\r\n`)
    await new Promise(resolve => socket.once('close', resolve))
    const head = Buffer.concat(chunks).toString('latin1').split('\r\n\r\n')[0] ?? ''
    return { status: Number(head.split(' ')[1]), remaining: /\r\nratelimit-remaining: (\d+)/i.exec(head)?.[1] }
  }
  const tenant = 'g-' + randomUUID()
  const tok = token({ tenant })
  t.same(await h2c(`/api/v1/ping?access_token=${tok}`), { status: 401, remaining: '2' }, 'REST reads no token there: the address\'s budget')
  const anonymous = await app.inject({ url: '/api/v1/ping' })
  t.equal(anonymous.headers['ratelimit-remaining'], '1', 'the same address, one more')
  const real = await app.inject({ url: '/api/v1/ping', headers: bearer({ tenant }) })
  t.equal(real.statusCode, 200)
  t.equal(real.headers['ratelimit-remaining'], '2', 'the tenant\'s budget untouched')
  t.same(await h2c('/api/v1/ping', `Bearer ${tok}`), { status: 200, remaining: '1' }, 'its Authorization header is read, as REST reads it')
})

t.test('addresses flooding the memory store never reset a tenant\'s counts: keys are evicted from whoever holds the most', async t => {
  // One LRU for all: 100,000 requests from as many addresses (an IPv6 /48 holds 65,536 /64s)
  // pushed out every counter older than them, a tenant's too: its spent limit started afresh.
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }) })
  const app = await buildTestApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 1000, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 60_000 }, {
    manifest: testManifest({ ping: { ...op('GET /ping'), rateLimit: { max: 2, windowMs: 60_000 } } }, { url: kernel.url }, { events }),
    kernelUrl: kernel.url,
    rateLimit: { memoryMaxKeys: 40 }
  })
  const headers = bearer({ tenant: 'evict-' + randomUUID() })
  t.equal((await app.inject({ url: '/api/v1/ping', headers })).statusCode, 200)
  t.equal((await app.inject({ url: '/api/v1/ping', headers })).statusCode, 200)
  t.equal((await app.inject({ url: '/api/v1/ping', headers })).statusCode, 429)
  for (let i = 0; i < 100; i++) {
    t.equal((await app.inject({ url: '/api/v1/ping', remoteAddress: `2001:db8:${i.toString(16)}::1` })).statusCode, 401)
  }
  t.ok(app.rateLimiter.memoryKeys <= 40, 'the store stays within its bound')
  t.equal((await app.inject({ url: '/api/v1/ping', headers })).statusCode, 429, 'the tenant\'s spent limit still refuses')
})

t.test('the Kernel\'s events are not counted by the guard; a stranger posting them is, by address', async t => {
  // Counted by the Kernel's address, its events were refused 429 past the clients' budget
  // (BFF_RATE_LIMIT_GLOBAL_MAX per window), and lost.
  const internal = 'internal-token-' + randomUUID()
  const app = await guarded(t, { BFF_INTERNAL_TOKEN: internal })
  const publish = async (authorization: string): Promise<number> => (await app.inject({
    method: 'POST',
    url: '/internal/events',
    headers: { authorization },
    payload: { topic: 'runs.updated', tenantId: 't1', payload: {} }
  })).statusCode
  for (let i = 0; i < 6; i++) t.equal(await publish(`Bearer ${internal}`), 202, `event ${i + 1}`)
  t.same([await publish('Bearer wrong'), await publish('Bearer wrong'), await publish('Bearer wrong'), await publish('Bearer wrong')], [401, 401, 401, 429])
  t.equal(await publish(`Bearer ${internal}`), 202, 'the Kernel still publishes')
})
