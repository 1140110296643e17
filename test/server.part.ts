import t from 'tap'
import { start, banner, shutdownGraceMs, holdHangups, holdShutdowns, type Started } from '../server.js'
import { EventEmitter } from 'node:events'
import { buildApp } from '../app.js'
import { ConfigError } from '../schemas/config.js'
import { ManifestError } from '../manifest.js'
import { connect, type Socket } from 'node:net'
import { testConfig, bearer, startTestKernel, json, fixture, buildTestApp, testManifest, until } from './helper.js'

// A fixed 10 s cut calls in flight whose operation allowed them longer (timeoutMs up to 600 s).
t.test('a shutdown\'s grace covers the longest operation\'s timeoutMs, and 13 s to close', async t => {
  const op = { type: 'query', rest: 'GET /a', kernel: 'GET /v1/a', output: { type: 'object' } }
  // 13 s to close after the longest call: a WebSocket call's answer (1 s) and close (2 s), the audit's 5 s at most (3 s for PostgreSQL, 1 s for the
  // spool's disk, 1 s for the closes), the trace export's 2.5 s and the Redis quits. 5 s, the
  // audit's alone, had the shutdown killed before the hooks after it ran.
  t.equal(shutdownGraceMs(testManifest({ a: op })), 18_000, 'the 5 s default timeout, and 13 s to close')
  t.equal(shutdownGraceMs(testManifest({ a: op, b: { ...op, rest: 'GET /b', timeoutMs: 20_000 } })), 33_000, 'the longest, and 13 s to close')
  t.equal(shutdownGraceMs(testManifest({ a: op }, { timeoutMs: 60_000 })), 73_000, 'the Kernel\'s default')
})

t.test('start() runs the embedded default: the demo Kernel starts alongside', async t => {
  const started = await start(testConfig({ PORT: 0 }))
  t.teardown(() => started.close())
  t.match(started.kernelUrl, /^http:\/\/127\.0\.0\.1:\d+$/)
  t.match(started.url, /^http:\/\/127\.0\.0\.1:\d+$/)
  const res = await fetch(`${started.url}/api/v1/agents/a1`, { headers: bearer() })
  t.equal(res.status, 200)
  t.equal(((await res.json()) as { id: string }).id, 'a1')
})

t.test('start() with KERNEL_URL does not start the demo Kernel', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/agents/a1': (_req, res) => json(res, 200, { id: 'a1', name: 'remote', model: 'm', description: null, createdAt: 'x', updatedAt: 'y' }) })
  const started = await start(testConfig({ PORT: 0, KERNEL_URL: kernel.url }))
  t.teardown(() => started.close())
  t.equal(started.kernelUrl, null)
  const res = await fetch(`${started.url}/api/v1/agents/a1`, { headers: bearer() })
  t.equal(((await res.json()) as { name: string }).name, 'remote')
})

// README: the banner names "the Kernel it calls". Without KERNEL_URL, a manifest's own kernel.url
// was printed as "from the manifest": the one Kernel line of a first run named no Kernel.
t.test('the banner names the Kernel the gateway calls, the manifest\'s own URL included', async t => {
  const started = await start(testConfig({ PORT: 0, BFF_MANIFEST: fixture('slow-manifest.yaml') }))
  t.teardown(() => started.close())
  t.equal(started.kernelUrl, null, 'no demo Kernel')
  t.match(banner(started, testConfig({ BFF_MANIFEST: fixture('slow-manifest.yaml') })), /\n {2}Kernel {6}http:\/\/127\.0\.0\.1:9\n/)
  t.match(banner(started, testConfig({ BFF_MANIFEST: fixture('slow-manifest.yaml'), KERNEL_URL: 'http://kernel.internal:4001' })), /\n {2}Kernel {6}http:\/\/kernel\.internal:4001\n/, 'KERNEL_URL wins')
})

t.test('start() stops the demo Kernel again when the gateway cannot start', async t => {
  await t.rejects(start(testConfig({ PORT: 0, BFF_MANIFEST: fixture('missing.yaml') })), ManifestError)
  await t.rejects(start(testConfig({ PORT: 0, HOST: '203.0.113.1' })), /EADDRNOTAVAIL|EINVAL/)
})

t.test('production refuses a missing or weak JWT secret', async t => {
  await t.rejects(buildApp(testConfig({ NODE_ENV: 'production', BFF_JWT_SECRET: undefined })), ConfigError)
  await t.rejects(buildApp(testConfig({ NODE_ENV: 'production', BFF_JWT_SECRET: 'short' })), /shorter than 32 bytes/)
})

t.test('the dev token is printed only when the gateway takes the development secret', async t => {
  const started = { url: 'http://127.0.0.1:1', kernelUrl: null } as unknown as Started
  const pem = '{"k":"-----BEGIN PUBLIC KEY-----\\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEHJPwIt0Ojw2T3Wp01jbDFN+7+40j\\ntDbrWD+ml2uScVutvETMc+7FJCVxrINjBq8worp3Qvq9CN7+TFq9IZGkwg==\\n-----END PUBLIC KEY-----\\n"}'
  t.match(banner(started, testConfig({ BFF_JWT_SECRET: undefined })), /Dev token/, 'no key source: the development secret')
  t.notMatch(banner(started, testConfig({ BFF_JWT_PUBLIC_KEYS: pem })), /Dev token/, 'a secret besides public keys: never a token signed with it in the logs')
  t.notMatch(banner(started, testConfig({ BFF_JWT_SECRET: 'a-real-staging-secret-0123456789abcdef' })), /Dev token/, 'a configured secret: the same')
  t.notMatch(banner(started, testConfig({ BFF_JWT_SECRET: undefined, BFF_JWT_PUBLIC_KEYS: pem })), /Dev token/, 'public keys only')
  t.notMatch(banner(started, testConfig({ BFF_JWT_SECRET: undefined, BFF_JWKS_URL: 'https://issuer.example/jwks' })), /Dev token/, 'JWKS only')
})

t.test('the banner says who may read /diagz: the role system, or with identity off anyone outside production and no one in it', async t => {
  const started = { url: 'http://127.0.0.1:1', kernelUrl: null } as unknown as Started
  t.match(banner(started, testConfig({})), /\/diagz {3}\(role system\)/)
  t.match(banner(started, testConfig({ BFF_AUTH_ENABLED: false })), /\/diagz {3}\(open: identity is off\)/)
  t.match(banner(started, testConfig({ BFF_AUTH_ENABLED: false, NODE_ENV: 'production' })), /\/diagz {3}\(closed: identity is off, nobody holds the role system\)/)
})

t.test('the banner names every face that is on, with its WebSocket URL', async t => {
  const started = { url: 'http://127.0.0.1:1', kernelUrl: null } as unknown as Started
  const all = banner(started, testConfig())
  t.match(all, /tRPC +http:\/\/127\.0\.0\.1:1\/trpc\/<procedure> +ws:\/\/127\.0\.0\.1:1\/trpc\n/)
  t.match(all, /GraphQL +http:\/\/127\.0\.0\.1:1\/graphql +ws:\/\/127\.0\.0\.1:1\/graphql +IDE: http:\/\/127\.0\.0\.1:1\/graphiql\n/)
  t.match(all, /WebSocket +ws:\/\/127\.0\.0\.1:1\/ws\n/)
  t.notMatch(banner(started, testConfig({ NODE_ENV: 'production', BFF_JWT_SECRET: 'a-real-staging-secret-0123456789abcdef' })), /graphiql/, 'no IDE in production (mercurius serves none there)')
  const none = banner(started, testConfig({ BFF_TRPC_ENABLED: false, BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false }))
  t.notMatch(none, /tRPC|GraphQL|WebSocket/, 'a face that is off is not named')
})

// While the gateway drains (close waits for a call in flight), a request arriving on a connection
// still open got Fastify's own 503 (return503OnClosing): plain JSON, no x-request-id, no
// security headers. Each face answers in its own envelope, with the refusal's Retry-After
// (GraphQL's, from mercurius' error handler, had dropped it). With CORS on, CORS's headers too
// (the refusal came before @fastify/cors's hook: a browser saw a CORS failure, not the 503).
const ORIGIN = 'https://app.example'
const DRAIN_REFUSALS: Array<[string, string, RegExp, RegExp]> = [
  ['REST', 'GET /api/v1/fast HTTP/1.1\r\n', /\r\ncontent-type: application\/problem\+json/i, /"code":"OVERLOADED".*shutting down/],
  ['tRPC', 'GET /trpc/fast HTTP/1.1\r\n', /\r\ncontent-type: application\/json/i, /shutting down.*"code":"OVERLOADED"/],
  ['GraphQL', 'POST /graphql HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 18\r\n', /\r\ncontent-type: application\/json/i, /"code":"OVERLOADED"/],
  // A load balancer's readiness probe: the refusal went through /readyz's own 503 schema, which
  // kept its `status` alone, so the body was {"status":"503"}: neither the problem nor a readiness.
  ['readiness probe', 'GET /readyz?scope=instance HTTP/1.1\r\n', /\r\ncontent-type: application\/problem\+json/i, /\{"type":"urn:mantle:problem:overloaded".*"code":"OVERLOADED".*shutting down/]
]
for (const [face, request, type, code] of DRAIN_REFUSALS) {
  t.test(`a request refused while draining is a problem+json with a request id (${face})`, async t => {
    const kernel = await startTestKernel(t, {
      'GET /v1/slow': (_req, res) => { setTimeout(() => json(res, 200, { ok: true }), 600) },
      'GET /v1/fast': (_req, res) => json(res, 200, { ok: true })
    })
    const manifest = testManifest({
      slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', input: { type: 'object', properties: {} }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } },
      fast: { type: 'query', rest: 'GET /fast', kernel: 'GET /v1/fast', input: { type: 'object', properties: {} }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
    })
    const app = await buildTestApp(t, { BFF_CACHE_ENABLED: false, BFF_CORS_ORIGINS: ORIGIN }, { manifest, kernelUrl: kernel.url })
    await app.listen({ port: 0, host: '127.0.0.1' })
    const { port } = app.server.address() as { port: number }
    const auth = bearer().authorization
    const socket = connect(port, '127.0.0.1')
    let data = ''
    socket.on('data', (c: Buffer) => { data += c.toString() })
    const ended = new Promise<void>(resolve => { socket.on('close', () => resolve()) })
    // The slow call holds the close; the second call is pipelined behind it and parsed later.
    socket.write(`GET /api/v1/slow HTTP/1.1\r\nHost: x\r\nAuthorization: ${auth}\r\n\r\n`)
    await until(() => kernel.requests.some(r => r.url === '/v1/slow'), 'the slow call to reach the Kernel')
    const closing = app.close()
    await until(() => !app.server.listening, 'the server to stop listening')
    socket.write(`${request}Host: x\r\nOrigin: ${ORIGIN}\r\nAuthorization: ${auth}\r\n\r\n${face === 'GraphQL' ? '{"query":"{fast}"}' : ''}`)
    await Promise.race([ended, new Promise(resolve => setTimeout(resolve, 3000))])
    socket.destroy()
    await closing
    const answers = data.split(/(?=HTTP\/1\.1 )/)
    t.comment(JSON.stringify(answers.map(a => a.slice(0, 600))))
    t.match(answers[0], /^HTTP\/1\.1 200/, 'the call in flight finishes')
    const refused = answers.find(a => a.startsWith('HTTP/1.1 503'))
    t.ok(refused !== undefined, 'the call that came while closing is refused')
    const head = (refused ?? '').slice(0, (refused ?? '').indexOf('\r\n\r\n'))
    t.match(head, type, 'the face\'s envelope')
    t.match(head, /\r\nx-request-id: /i, 'x-request-id')
    t.match(head, /\r\nx-content-type-options: nosniff/i, 'security headers')
    t.match(head, /\r\nconnection: close/i)
    t.match(head, /\r\nretry-after: 1\r\n/i)
    t.match(head, /\r\naccess-control-allow-origin: https:\/\/app\.example\r\n/i, 'CORS\'s headers')
    t.match(refused, code)
    t.equal(kernel.requests.filter(r => r.url === '/v1/fast').length, 0, 'it ran nothing')
  })
}

// The shutdown refusal came before @fastify/websocket's hook, which marks a refused upgrade's
// socket to be closed: the 503 went out and the socket stayed open (no HTTP connection of Node's
// any more), holding the close.
t.test('a WebSocket upgrade while draining is refused 503 with CORS\'s headers, and its socket closed', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/slow': (_req, res) => { setTimeout(() => json(res, 200, { ok: true }), 600) } })
  const manifest = testManifest({ slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', input: { type: 'object', properties: {} }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } } })
  const app = await buildTestApp(t, { BFF_CACHE_ENABLED: false, BFF_CORS_ORIGINS: ORIGIN }, { manifest, kernelUrl: kernel.url })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const auth = bearer().authorization
  const slow = connect(port, '127.0.0.1')
  slow.on('data', () => {})
  slow.write(`GET /api/v1/slow HTTP/1.1\r\nHost: x\r\nAuthorization: ${auth}\r\n\r\n`)
  await until(() => kernel.requests.some(r => r.url === '/v1/slow'), 'the slow call to reach the Kernel')
  let served: Socket | null = null
  app.server.once('connection', (s: Socket) => { served = s })
  const socket = connect(port, '127.0.0.1')
  await new Promise(resolve => socket.once('connect', resolve))
  let data = ''
  socket.on('data', (c: Buffer) => { data += c.toString() })
  let closed = false
  socket.on('close', () => { closed = true })
  // Its first byte before the close: a connection that never sent one is reaped while draining
  // (nothing was asked), and on a loaded machine the reaper could come before the request did.
  socket.write('G')
  await until(() => served !== null && (served as Socket).bytesRead > 0, 'the first byte to be read')
  const closing = app.close()
  await until(() => !app.server.listening, 'the server to stop listening')
  socket.write(`ET /ws HTTP/1.1\r\nHost: x\r\nOrigin: ${ORIGIN}\r\nAuthorization: ${auth}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`)
  try {
    await until(() => closed, 'the refused upgrade\'s socket to close', 3000)
  } finally {
    socket.destroy()
    slow.destroy()
    await closing
  }
  t.match(data, /^HTTP\/1\.1 503 /)
  t.match(data, /\r\naccess-control-allow-origin: https:\/\/app\.example\r\n/i, 'CORS\'s headers')
  t.match(data, /"code":"OVERLOADED"/)
})

t.test('a SIGHUP while the gateway starts is held, then applied once, once it serves', async t => {
  // Its default action ended the process (exit 129) when a ConfigMap update met a starting pod.
  const before = process.listenerCount('SIGHUP')
  const hangups = holdHangups()
  t.equal(process.listenerCount('SIGHUP'), before + 1, 'taken while starting')
  process.emit('SIGHUP', 'SIGHUP')
  let reloads = 0
  const reload = (): void => { reloads++ }
  hangups.serve(reload)
  t.equal(reloads, 1, 'the one that came meanwhile, applied')
  process.emit('SIGHUP', 'SIGHUP')
  t.equal(reloads, 2, 'and every later one')
  process.off('SIGHUP', reload)
  t.equal(process.listenerCount('SIGHUP'), before)
  const quiet = holdHangups()
  let none = 0
  const count = (): void => { none++ }
  quiet.serve(count)
  t.equal(none, 0, 'none came: none applied')
  process.off('SIGHUP', count)
})

// As PID 1 in a container, a signal with no listener is dropped: a SIGTERM sent while the gateway
// started was lost, and it came up and served until the kubelet's SIGKILL.
t.test('a shutdown signal while the gateway starts is held, then shuts it down once it can', async t => {
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGQUIT'] as const) {
    const signals = new EventEmitter()
    const shutdowns = holdShutdowns(signals as unknown as NodeJS.Process)
    t.equal(signals.listenerCount(signal), 1, `${signal} taken while starting`)
    signals.emit(signal)
    let closes = 0
    shutdowns.serve(() => { closes++ })
    t.equal(closes, 1, `${signal} that came meanwhile: the shutdown, once it is wired`)
    t.equal(signals.listenerCount(signal), 0, 'no longer taken: close-with-grace\'s listeners take over')
  }
  const quiet = new EventEmitter()
  let none = 0
  holdShutdowns(quiet as unknown as NodeJS.Process).serve(() => { none++ })
  t.equal(none, 0, 'none came: no shutdown')
  // Ctrl-C twice while it starts: the second exits at once, as close-with-grace's second does.
  const twice = new EventEmitter()
  let exits = 0
  holdShutdowns(twice as unknown as NodeJS.Process, () => { exits++ })
  twice.emit('SIGINT')
  t.equal(exits, 0, 'the first is held')
  twice.emit('SIGINT')
  t.equal(exits, 1, 'the second exits')
})

t.test('production refuses the demo Kernel, with every other reason in one line', async t => {
  // Forgotten settings in production served the demo's agents, mutations included, as ready.
  await t.rejects(start(testConfig({ PORT: 0, NODE_ENV: 'production', BFF_JWT_SECRET: undefined })), /Refusing to start in production: BFF_JWT_SECRET is missing.*; BFF_MANIFEST is the demo manifest and KERNEL_URL is unset/)
})
