import t from 'tap'
import { request as httpRequest } from 'node:http'
import WebSocket from 'ws'
import { generateKeyPairSync, randomUUID } from 'node:crypto'
import type { FastifyInstance, InjectOptions } from 'fastify'
import { buildApp, redactUrl } from '../../app.js'
import { ConfigError, productionProblems } from '../../schemas/config.js'
import { readFileSync } from 'node:fs'
import { parse } from 'yaml'
import { startKernel } from '../../kernel/server.js'
import { buildTestApp, testConfig, testManifest, closedPort, token, SECRET } from '../helper.js'

// Issue 4, item 5: what production refuses, and the guards every face has: security headers on
// every answer, one body limit, and logs that never carry a credential.

interface Teardown { teardown: (fn: () => unknown) => void }
const INTERNAL_TOKEN = 'internal-token-of-the-security-suite'
const PING = { ping: { type: 'query', rest: 'GET /ping', kernel: 'GET /v1/ping', output: { type: 'object' } } }
const HELMET = ['strict-transport-security', 'x-content-type-options', 'x-frame-options', 'referrer-policy', 'cross-origin-opener-policy', 'cross-origin-resource-policy']

async function demo (t: Teardown, env: Record<string, string | number | boolean | undefined> = {}, options: Parameters<typeof buildTestApp>[2] = {}): Promise<{ app: FastifyInstance, port: number }> {
  const kernel = await startKernel({ port: 0, runDelayMs: 600_000 })
  t.teardown(() => kernel.close())
  const app = await buildTestApp(t, { BFF_INTERNAL_TOKEN: INTERNAL_TOKEN, ...env }, { kernelUrl: kernel.url, ...options })
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, port: (app.server.address() as { port: number }).port }
}

/** A WebSocket upgrade's answer: the 101's headers, or the refusal's status and headers. */
async function upgrade (url: string, protocol: string | undefined, headers: Record<string, string>): Promise<{ status: number, headers: Record<string, unknown> }> {
  const ws = new WebSocket(url, protocol, { headers })
  ws.on('error', () => {})
  return await new Promise(resolve => {
    ws.once('upgrade', res => { resolve({ status: 101, headers: res.headers }); ws.terminate() })
    ws.once('unexpected-response', (req, res) => { resolve({ status: res.statusCode ?? 0, headers: res.headers }); req.destroy() })
  })
}

t.test('production refuses to start, naming each reason; a safe setting starts', async t => {
  const rsaPem = generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey.export({ type: 'spki', format: 'pem' }).toString()
  // The audit store's own production rule belongs to the audit concern: off here.
  const prod = { NODE_ENV: 'production', BFF_AUDIT_ENABLED: false, BFF_JWT_SECRET: undefined }
  const refused: Array<[string, Record<string, string | boolean | undefined>, RegExp[]]> = [
    ['no key at all', {}, [/BFF_JWT_SECRET is missing/]],
    ['an HS256 secret of 31 bytes', { BFF_JWT_SECRET: 's'.repeat(31) }, [/BFF_JWT_SECRET is shorter than 32 bytes/]],
    ['CORS *', { BFF_JWT_SECRET: SECRET, BFF_CORS_ORIGINS: '*' }, [/BFF_CORS_ORIGINS contains \*/]],
    ['CORS * among origins', { BFF_JWT_SECRET: SECRET, BFF_CORS_ORIGINS: 'https://app.example.com,*' }, [/BFF_CORS_ORIGINS contains \*/]],
    ['all three at once: one message', { BFF_JWT_SECRET: 'short', BFF_CORS_ORIGINS: '*' }, [/shorter than 32 bytes/, /BFF_CORS_ORIGINS contains \*/]]
  ]
  for (const [name, env, reasons] of refused) {
    const err = await buildApp(testConfig({ ...prod, ...env }), { logger: false }).then(async app => { await app.close(); return null }, (e: unknown) => e)
    t.type(err, ConfigError, `${name}: a ConfigError`)
    t.match((err as Error).message, /^Refusing to start in production: /, name)
    for (const reason of reasons) t.match((err as Error).message, reason, `${name}: names ${String(reason)}`)
  }
  const started: Array<[string, Record<string, string | boolean | undefined>]> = [
    ['a 32-byte secret and listed origins', { BFF_JWT_SECRET: 's'.repeat(32), BFF_CORS_ORIGINS: 'https://app.example.com' }],
    ['public keys only', { BFF_JWT_PUBLIC_KEYS: JSON.stringify({ k1: rsaPem }) }],
    ['a JWKS URL only', { BFF_JWKS_URL: `http://127.0.0.1:${await closedPort()}/jwks.json` }]
  ]
  for (const [name, env] of started) {
    const app = await buildApp(testConfig({ ...prod, ...env }), { logger: false, manifest: testManifest(PING) })
    t.teardown(() => app.close())
    await app.ready()
    t.pass(`${name}: starts`)
  }
})

t.test('production refuses the credentials the examples publish (.env.example, the k8s Secret example)', async t => {
  const root = new URL('../../', import.meta.url)
  const names = ['BFF_JWT_SECRET', 'BFF_INTERNAL_TOKEN', 'BFF_METRICS_TOKEN']
  const published: Array<[string, string, string]> = []
  // Commented out or not: a copy of the file is edited by uncommenting its lines.
  for (const line of readFileSync(new URL('.env.example', root), 'utf8').split('\n')) {
    const m = /^#?\s*([A-Z_]+)=(.+)$/.exec(line)
    if (m !== null && names.includes(m[1])) published.push(['.env.example', m[1], m[2]])
  }
  const secret = (parse(readFileSync(new URL('deploy/k8s/secret.example.yaml', root), 'utf8')) as { stringData: Record<string, string> }).stringData
  for (const [name, value] of Object.entries(secret)) if (names.includes(name)) published.push(['secret.example.yaml', name, value])
  t.equal(published.length, 5, 'the examples hold five such values')
  const prod = { NODE_ENV: 'production', BFF_AUDIT_ENABLED: false, BFF_JWT_SECRET: SECRET }
  for (const [file, name, value] of published) {
    const err = await buildApp(testConfig({ ...prod, [name]: value }), { logger: false, manifest: testManifest(PING) }).then(async app => { await app.close(); return null }, (e: unknown) => e)
    t.type(err, ConfigError, `${file}'s ${name} is refused`)
    t.match((err as Error | null)?.message, new RegExp(`^Refusing to start in production: .*${name} is the example's placeholder`), `${file}'s ${name}: named`)
    // Control: a value of one's own, the same length, is accepted.
    t.same(productionProblems(testConfig({ ...prod, [name]: randomUUID().replaceAll('-', '').padEnd(value.length, 'x') })), [], `${name} of one's own: accepted`)
  }
})

t.test('security headers on every answer of every face, errors and upgrades included', async t => {
  const { app, port } = await demo(t, { BFF_CORS_ORIGINS: 'https://app.example.com', BFF_BODY_LIMIT: 4096 })
  const auth = { authorization: `Bearer ${token()}` }
  const json = { ...auth, 'content-type': 'application/json' }
  const big = JSON.stringify({ name: 'x'.repeat(8192) })
  const answers: Array<[string, InjectOptions, number]> = [
    ['REST 200', { url: '/api/v1/agents/a1', headers: auth }, 200],
    ['REST 201', { method: 'POST', url: '/api/v1/agents', headers: json, payload: { name: 'n' } }, 201],
    ['REST 401', { url: '/api/v1/agents/a1' }, 401],
    ['REST 403', { url: '/api/v1/documents/d1', headers: { authorization: `Bearer ${token({ zone: 'public' })}` } }, 403],
    ['REST 400', { url: '/api/v1/agents?limit=1000', headers: auth }, 400],
    ['REST 404 from the Kernel', { url: '/api/v1/agents/zz', headers: auth }, 404],
    ['REST 413', { method: 'POST', url: '/api/v1/agents', headers: json, payload: big }, 413],
    ['REST 415', { method: 'POST', url: '/api/v1/agents', headers: { ...auth, 'content-type': 'text/plain' }, payload: 'x' }, 415],
    ['no such route', { url: '/nope' }, 404],
    ['batch 200', { method: 'POST', url: '/api/v1/batch', headers: json, payload: { calls: [{ id: 'a', op: 'getAgent', input: { id: 'a1' } }] } }, 200],
    ['batch 400', { method: 'POST', url: '/api/v1/batch', headers: json, payload: { calls: 'x' } }, 400],
    ['tRPC 200', { url: `/trpc/getAgent?input=${encodeURIComponent('{"id":"a1"}')}`, headers: auth }, 200],
    ['tRPC 401', { url: `/trpc/getAgent?input=${encodeURIComponent('{"id":"a1"}')}` }, 401],
    ['tRPC batch', { url: `/trpc/getAgent,getAgent?batch=1&input=${encodeURIComponent('{"0":{"id":"a1"},"1":{"id":"zz"}}')}`, headers: auth }, 207],
    ['tRPC 413', { method: 'POST', url: '/trpc/createAgent', headers: json, payload: big }, 413],
    ['GraphQL 200', { method: 'POST', url: '/graphql', headers: json, payload: { query: '{ getAgent(id: "a1") { id } }' } }, 200],
    ['GraphQL 400', { method: 'POST', url: '/graphql', headers: json, payload: { query: '{ nope' } }, 400],
    ['GraphQL GET', { url: `/graphql?query=${encodeURIComponent('{ listAgents { id } }')}` }, 200],
    ['/ws without an upgrade', { url: '/ws', headers: auth }, 426],
    ['internal events 401', { method: 'POST', url: '/internal/events', headers: { 'content-type': 'application/json' }, payload: {} }, 401],
    ['CORS preflight', { method: 'OPTIONS', url: '/api/v1/agents', headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST' } }, 204],
    ['healthz', { url: '/healthz' }, 200],
    ['readyz', { url: '/readyz' }, 200],
    ['metrics', { url: '/metrics' }, 200],
    ['openapi.json', { url: '/openapi.json' }, 200]
  ]
  for (const [name, req, status] of answers) {
    const res = await app.inject(req)
    t.equal(res.statusCode, status, `${name}: ${status}`)
    for (const h of HELMET) t.ok(res.headers[h] !== undefined, `${name}: ${h}`)
    t.equal(res.headers['x-content-type-options'], 'nosniff')
  }
  // A Kernel failure (5xx) carries them too.
  const down = await buildTestApp(t, {}, { manifest: testManifest(PING, { retries: 0 }), kernelUrl: `http://127.0.0.1:${await closedPort()}` })
  const failed = await down.inject({ url: '/api/v1/ping', headers: auth })
  t.equal(failed.statusCode, 503)
  for (const h of HELMET) t.ok(failed.headers[h] !== undefined, `503: ${h}`)

  // Upgrades: accepted (101, written by ws) and refused (401), on every face that upgrades.
  for (const [path, protocol] of [['/ws', undefined], ['/graphql', 'graphql-transport-ws'], ['/trpc', undefined]] as const) {
    const ok = await upgrade(`ws://127.0.0.1:${port}${path}`, protocol, auth)
    t.equal(ok.status, 101, `${path} upgrades`)
    for (const h of HELMET) t.ok(ok.headers[h] !== undefined, `${path} 101: ${h}`)
  }
  for (const [path, protocol] of [['/ws', undefined], ['/graphql', 'graphql-transport-ws']] as const) {
    const refused = await upgrade(`ws://127.0.0.1:${port}${path}`, protocol, { authorization: 'Bearer junk' })
    t.equal(refused.status, 401, `${path} refuses a bad token`)
    for (const h of HELMET) t.ok(refused.headers[h] !== undefined, `${path} 401: ${h}`)
  }
})

t.test('body limits: every face refuses beyond BFF_BODY_LIMIT with a 413 of its own shape, never a 5xx', async t => {
  const LIMIT = 4096
  const { app, port } = await demo(t, { BFF_BODY_LIMIT: LIMIT })
  const json = { authorization: `Bearer ${token()}`, 'content-type': 'application/json' }
  const pad = 'x'.repeat(LIMIT * 2)

  // What test/body-limits.part.ts does not already cover: other methods, tRPC's batch handler,
  // GraphQL over GET, the internal events route, and anonymous callers.
  const patch = await app.inject({ method: 'PATCH', url: '/api/v1/agents/a1', headers: json, payload: JSON.stringify({ name: pad }) })
  t.match({ status: patch.statusCode, body: patch.json() }, { status: 413, body: { code: 'PAYLOAD_TOO_LARGE' } }, 'REST PATCH')
  const anonymous = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: { 'content-type': 'application/json' }, payload: JSON.stringify({ name: pad }) })
  t.ok([401, 413].includes(anonymous.statusCode), `REST without a token: ${anonymous.statusCode}`)
  const trpcBatch = await app.inject({ method: 'POST', url: '/trpc/createAgent,createAgent?batch=1', headers: json, payload: JSON.stringify({ 0: { name: pad }, 1: { name: 'b' } }) })
  t.equal(trpcBatch.statusCode, 413, 'tRPC batch')
  t.match(trpcBatch.json(), { error: { data: { code: 'PAYLOAD_TOO_LARGE', httpStatus: 413 } } }, 'tRPC batch: tRPC-shaped')
  const gqlGet = await app.inject({ method: 'GET', url: `/graphql?query=${encodeURIComponent(`{ listAgents(model: "${pad}") { id } }`)}`, headers: json })
  t.ok(gqlGet.statusCode === 413, `GraphQL GET: ${gqlGet.statusCode}`)
  t.match(gqlGet.json(), { errors: [{ extensions: { code: 'PAYLOAD_TOO_LARGE' } }] }, 'GraphQL GET: GraphQL-shaped')
  const internal = await app.inject({ method: 'POST', url: '/internal/events', headers: { authorization: `Bearer ${INTERNAL_TOKEN}`, 'content-type': 'application/json' }, payload: JSON.stringify({ topic: 'runs.updated', tenantId: 't', payload: { pad } }) })
  t.equal(internal.statusCode, 413, '/internal/events')

  // A chunked body has no Content-Length to refuse up front: it is cut off while it streams.
  const chunked = async (path: string): Promise<{ status: number, body: string }> => await new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, path, method: 'POST', headers: { ...json, 'transfer-encoding': 'chunked' } }, res => {
      let body = ''
      res.on('data', (c: Buffer) => { body += c.toString() })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject)
    req.write('{"name":"')
    for (let i = 0; i < 4; i++) req.write('y'.repeat(LIMIT / 2))
    req.end('"}')
  })
  for (const path of ['/api/v1/agents', '/api/v1/batch', '/trpc/createAgent', '/graphql']) {
    const res = await chunked(path)
    t.equal(res.status, 413, `chunked ${path}: 413`)
    t.match(res.body, /PAYLOAD_TOO_LARGE/, `chunked ${path}: the contract code`)
  }
})

t.test('logs never carry a credential: headers, cookies, URL tokens, tRPC connectionParams', async t => {
  const lines: string[] = []
  const { app, port } = await demo(t, { LOG_LEVEL: 'trace' }, { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } } })
  const jwt = token()
  const secrets = [jwt, 'COOKIE-SECRET', 'PROXY-SECRET', 'API-KEY-SECRET', 'SET-COOKIE-SECRET']
  const other = token({ user: `other-${randomUUID()}` })
  secrets.push(other)

  await app.inject({ url: '/api/v1/agents/a1', headers: { authorization: `Bearer ${jwt}`, cookie: 'session=COOKIE-SECRET', 'proxy-authorization': 'Basic PROXY-SECRET', 'x-api-key': 'API-KEY-SECRET' } })
  await app.inject({ url: '/api/v1/agents/zz', headers: { authorization: `Bearer ${jwt}` } })
  // A REST path parameter is input: the route is logged by its pattern.
  await app.inject({ url: '/api/v1/agents/PATH-SECRET-ghp_a1B2c3D4?x=1', headers: { authorization: `Bearer ${jwt}` } })
  secrets.push('PATH-SECRET')
  // So may a path no route took: a 404, or a parameter over 256 characters (a 414).
  t.equal((await app.inject({ url: '/api/v1/agents/NOROUTE-SECRET/extra', headers: { authorization: `Bearer ${jwt}` } })).statusCode, 404)
  t.equal((await app.inject({ url: `/api/v1/agents/LONG-SECRET${'x'.repeat(300)}`, headers: { authorization: `Bearer ${jwt}` } })).statusCode, 414)
  secrets.push('NOROUTE-SECRET', 'LONG-SECRET')
  await app.inject({ url: '/api/v1/agents/a1', headers: { authorization: 'Bearer junk.junk.junk' } })
  for (const q of [`access_token=${jwt}`, `ACCESS_TOKEN=${jwt}`, `access%5Ftoken=${jwt}`, `%61ccess_token=${jwt}`, `x=1&access_token=${jwt}&y=2`]) {
    await app.inject({ url: `/healthz?${q}` })
  }
  // httpSubscriptionLink sends the token inside connectionParams, in the URL.
  const params = encodeURIComponent(JSON.stringify({ token: jwt }))
  await app.inject({ url: `/trpc/getAgent?input=${encodeURIComponent('{"id":"a1"}')}&connectionParams=${params}` })
  // Upgrades over real sockets: the token in the URL of every face that upgrades, and in frames.
  for (const [path, protocol] of [['/ws', undefined], ['/graphql', 'graphql-transport-ws'], ['/trpc', undefined]] as const) {
    for (const key of ['access_token', 'access%5Ftoken']) {
      const res = await upgrade(`ws://127.0.0.1:${port}${path}?${key}=${jwt}`, protocol, {})
      t.equal(res.status, 101, `${path}?${key}= upgrades`)
    }
  }
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?access_token=${jwt}`)
  await new Promise(resolve => ws.once('open', resolve))
  const answered = new Promise(resolve => ws.once('message', resolve))
  ws.send(JSON.stringify({ id: 'a', auth: other }))
  await answered
  ws.terminate()
  await app.close()

  const text = lines.join('')
  t.match(text, /incoming request/, 'requests are logged')
  t.match(text, /access_token=\[redacted\]/)
  t.match(text, /access%5Ftoken=\[redacted\]/)
  t.match(text, /connectionParams=\[redacted\]/)
  t.match(text, /"url":"\/api\/v1\/agents\/:id\?x=\[redacted\]"/, 'a REST route with path parameters: its pattern')
  t.match(text, /"url":"\/healthz\?x=\[redacted\]/, 'other routes: their path')
  for (const secret of secrets) t.notOk(text.includes(secret), `no line carries ${secret.slice(0, 12)}...`)
  // Nor any recognisable piece of a token: its signature.
  t.notOk(text.includes(jwt.split('.')[2]), 'no token signature in the logs')
})

t.test('redactUrl: every query value redacted, the names kept', async t => {
  const cases: Array<[string, string]> = [
    ['/healthz', '/healthz'],
    ['/healthz?', '/healthz?'],
    ['/healthz?x=1&y=2', '/healthz?x=[redacted]&y=[redacted]'],
    ['/ws?access_token=abc&x=1', '/ws?access_token=[redacted]&x=[redacted]'],
    ['/ws?access%5Ftoken=abc', '/ws?access%5Ftoken=[redacted]'],
    ['/ws?access_token', '/ws?[redacted]'],
    ['/ws?access_token=a&access_token=b', '/ws?access_token=[redacted]&access_token=[redacted]'],
    ['/trpc/x?input=%7B%7D&connectionParams=%7B%22token%22%3A%22abc%22%7D', '/trpc/x?input=[redacted]&connectionParams=[redacted]'],
    ['/graphql?query=%7Bx%7D&variables=%7B%22q%22%3A%22ghp_abc%22%7D', '/graphql?query=[redacted]&variables=[redacted]'],
    ['/api/v1/search?q=my+key+ghp_abc&&limit=5', '/api/v1/search?q=[redacted]&&limit=[redacted]'],
    ['/ws?%E0%A4%A=1&access_token=abc', '/ws?%E0%A4%A=[redacted]&access_token=[redacted]'],
    ['/x?a=b=c', '/x?a=[redacted]']
  ]
  for (const [url, logged] of cases) t.equal(redactUrl(url), logged, url)
})

t.test('a BFF_JWT_SECRET with white space around it is warned of at start-up', async t => {
  const warned = async (secret: string): Promise<string[]> => {
    const lines: string[] = []
    const app = await buildTestApp(t, { BFF_JWT_SECRET: secret, LOG_LEVEL: 'warn' }, { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } } })
    await app.close()
    return lines.filter(l => l.includes('BFF_JWT_SECRET begins or ends with white space'))
  }
  t.equal((await warned(SECRET + '\n')).length, 1, 'a trailing line break: warned of once')
  t.equal((await warned(' ' + SECRET)).length, 1, 'a leading space too')
  t.same(await warned(SECRET), [], 'none for a secret without')
  t.notMatch((await warned(SECRET + '\n'))[0], SECRET, 'the secret itself is not logged')
})
