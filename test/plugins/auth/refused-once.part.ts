// A token refused for a request is checked once for it: the rate-limit guard, the route, each
// call of a batch, GraphQL document or tRPC batch asked again, a signature check each.
import t from 'tap'
import { generateKeyPairSync, randomUUID } from 'node:crypto'
import { once } from 'node:events'
import { connect, type AddressInfo } from 'node:net'
import { createSigner } from 'fast-jwt'
import WebSocket from 'ws'
import { createIdentityVerifier, mintToken } from '../../../plugins/auth/identity.js'
import { buildDemoApp, buildTestApp, startTestKernel, testManifest, token, json, until } from '../../helper.js'
import { jwksServer } from './jwks-server.js'

const secret = 'identity-test-secret-of-at-least-32-bytes'
const other = 'another-secret-that-is-long-enough-0123456789'

/**
 * Counts the token checks of tokens for `user`: each check verifies the signature over the
 * token's encoded header and payload, read once as latin1 text (identity.ts, before fast-jwt is
 * asked), and the user is in the payload, base64url-encoded. (It counted fast-jwt's parse of the
 * payload, which a forged token no longer reaches: its signature is checked first.)
 */
function checks (t: { teardown: (fn: () => void) => void }, user: string): () => number {
  // The user's base64url text at each of the three alignments, less the characters its
  // neighbours change.
  const marks = ['', 'x', 'xx'].map(pad => Buffer.from(pad + user).toString('base64url').slice(Math.ceil(pad.length * 4 / 3), -3))
  const from = Buffer.from
  let n = 0
  Buffer.from = function (value: unknown, encoding?: unknown, ...rest: unknown[]): Buffer {
    if (typeof value === 'string' && encoding === 'latin1' && marks.some(m => value.includes(m))) n++
    return (from as (...a: unknown[]) => Buffer).call(Buffer, value, encoding, ...rest)
  } as typeof Buffer.from
  t.teardown(() => { Buffer.from = from })
  return () => n
}

t.test('a refusal is remembered for its request only, and for its token only', async t => {
  const identify = createIdentityVerifier({ secret })
  const user = randomUUID()
  const checked = checks(t, user)
  const forged = `Bearer ${mintToken(other, { tenant: 't', user })}`
  const first = {}
  const refusal = t.throws(() => identify(forged, first), { code: 'UNAUTHENTICATED', message: 'The token was refused: the token signature is invalid' })
  t.equal(checked(), 1)
  t.equal(t.throws(() => identify(forged, first)), refusal, 'the same refusal, for the same request')
  t.equal(checked(), 1, 'not checked again')
  t.throws(() => identify(forged, {}), { message: /signature is invalid/ })
  t.equal(checked(), 2, 'another request checks it again: nothing is kept across requests')
  t.throws(() => identify(forged))
  t.throws(() => identify(forged))
  t.equal(checked(), 4, 'nor for a caller that names no request')
  const real = `Bearer ${mintToken(secret, { tenant: 't', user })}`
  t.equal(identify(real, first).user, user, 'another token of the same request is checked')
})

t.test('a forged token costs one check per request, however many ask; the 401 is unchanged', async t => {
  const op = { type: 'query', rest: 'GET /ping', kernel: 'GET /v1/ok', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }) })
  for (const guard of [true, false]) {
    const app = await buildTestApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: guard ? 1000 : undefined, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 60_000 }, { manifest: testManifest({ ping: op }, { url: kernel.url }), kernelUrl: kernel.url })
    const requests = {
      rest: { url: '/api/v1/ping' },
      batch: { method: 'POST', url: '/api/v1/batch', payload: { calls: ['1', '2', '3', '4', '5'].map(id => ({ id, op: 'ping' })) } },
      graphql: { method: 'POST', url: '/graphql', payload: { query: '{ a: ping { ok } b: ping { ok } c: ping { ok } }' } },
      trpc: { url: '/trpc/ping,ping,ping?batch=1' }
    } as const
    for (const [face, request] of Object.entries(requests)) {
      const user = randomUUID()
      const checked = checks(t, user)
      const res = await app.inject({ ...request, headers: { authorization: `Bearer ${token({ user, secret: other })}` } })
      t.equal(checked(), 1, `${face}, guard ${guard ? 'on' : 'off'}: one check`)
      if (face === 'graphql') {
        // A token sent to /graphql is checked before the body: one refusal, the request's.
        t.equal(res.statusCode, 401)
        t.match(res.json(), { errors: [{ message: 'The token was refused: the token signature is invalid', extensions: { code: 'UNAUTHENTICATED', status: 401 } }] })
      } else if (face === 'rest' || face === 'batch') {
        // A batch without a valid token is refused whole before its body is read, as a REST call.
        t.equal(res.statusCode, 401)
        t.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8')
        t.equal(res.headers['www-authenticate'], 'Bearer error="invalid_token"')
        t.same(res.json(), { type: 'urn:mantle:problem:unauthenticated', title: 'Unauthenticated', status: 401, code: 'UNAUTHENTICATED', detail: 'The token was refused: the token signature is invalid', requestId: res.headers['x-request-id'] })
      } else {
        t.equal(res.body.split('The token was refused: the token signature is invalid').length - 1, 3, `${face}: each call refused as before`)
      }
    }
  }
})

// A tRPC subscription over SSE: the guard checked the token at the request's head, and the
// subscription's decision checked it again (2 with the guard on). Over WebSocket, a token
// refused at the upgrade gets a 401 there; one in connectionParams is checked once, by
// createContext (tRPC calls it once a connection), and the connection closes 4401.
t.test('tRPC subscriptions: a forged token costs one check per request, or per connection', async t => {
  for (const guard of [true, false]) {
    const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: guard ? 1000 : undefined, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 60_000 })
    const user = randomUUID()
    const checked = checks(t, user)
    const res = await app.inject({ url: '/trpc/runUpdated', headers: { accept: 'text/event-stream', authorization: `Bearer ${token({ user, secret: other })}` } })
    t.equal(checked(), 1, `SSE, guard ${guard ? 'on' : 'off'}: one check`)
    // As before: a 200 whose one event is the refusal.
    t.equal(res.statusCode, 200)
    t.match(res.body, /event: serialized-error\ndata: \{"message":"The token was refused: the token signature is invalid","code":-32001,"data":\{"code":"UNAUTHENTICATED","httpStatus":401/)
    await app.listen({ port: 0, host: '127.0.0.1' })
    const { port } = app.server.address() as AddressInfo
    const wsUser = randomUUID()
    const wsChecked = checks(t, wsUser)
    const socket = new WebSocket(`ws://127.0.0.1:${port}/trpc?connectionParams=1`)
    t.teardown(() => socket.terminate())
    await once(socket, 'open')
    const closed = once(socket, 'close')
    socket.send(JSON.stringify({ method: 'connectionParams', data: { authorization: `Bearer ${token({ user: wsUser, secret: other })}` } }))
    socket.send(JSON.stringify({ id: 1, method: 'subscription', params: { path: 'runUpdated' } }))
    socket.send(JSON.stringify({ id: 2, method: 'subscription', params: { path: 'runUpdated' } }))
    t.equal((await closed)[0], 4401, `WebSocket, guard ${guard ? 'on' : 'off'}: closed 4401`)
    t.equal(wsChecked(), 1, `WebSocket, guard ${guard ? 'on' : 'off'}: one check`)
  }
})

// GraphQL over WebSocket: connection_init's token is the connection's (a second connection_init
// closes it, 4429), and is checked at connection_init and again by each subscribe. Refused, the
// connection closed 4401 after the first subscribe's error, but the subscribes read meanwhile
// each checked it again: 51 checks for 50 subscribes. Now refused at connection_init itself
// (4403, no ack), and nothing sent behind it is read.
t.test('GraphQL over WebSocket: a forged connection_init token costs one check per connection', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const user = randomUUID()
  const checked = checks(t, user)
  const socket = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws')
  t.teardown(() => socket.terminate())
  const messages: Array<{ type: string, id?: string, payload?: Array<{ message: string, extensions: { code: string } }> }> = []
  socket.on('message', (data: Buffer) => messages.push(JSON.parse(data.toString())))
  await once(socket, 'open')
  const closed = once(socket, 'close')
  socket.send(JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token({ user, secret: other })}` } }))
  for (let i = 0; i < 50; i++) socket.send(JSON.stringify({ id: String(i), type: 'subscribe', payload: { query: 'subscription { runUpdated { id status } }' } }))
  const [code, reason] = await closed
  t.equal(code, 4403, 'closed 4403 at connection_init')
  t.equal(String(reason), 'Forbidden: The token was refused: the token signature is invalid', 'the refusal in the close')
  t.equal(checked(), 1, 'one check')
  t.same(messages, [], 'no ack, and no subscribe answered')
})

const rsa = (): { pem: string, jwk: (kid: string) => Record<string, unknown> } => {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
  return { pem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), jwk: kid => ({ ...publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' }) }
}
/** The user of an identity, else the refusal's message: an assertion that fails does not end the test. */
const userOf = (identify: () => { user: string }): string => {
  try {
    return identify().user
  } catch (err) {
    return (err as Error).message
  }
}
const signed = (key: { pem: string }, kid: string, claims: Record<string, unknown>): string =>
  createSigner({ key: key.pem, algorithm: 'RS256', kid, expiresIn: 600_000 })({ tid: 't1', roles: [], zone: 'public', ...claims })

// A refusal that holds only until the keys change (a kid not fetched yet, a key replaced under
// its kid) or time passes (`nbf`) is not the request's to keep: the guard, at the request's
// head, refused it; the route, once the body was in, must check it again.
t.test('a refusal is not kept past new keys, nor for a token not valid yet', async t => {
  const first = rsa()
  const second = rsa()
  const jwks = await jwksServer(t, { keys: [first.jwk('k1')] })
  const identify = createIdentityVerifier({ jwksUrl: jwks.url, jwksRefreshMs: 60_000, jwksMinRefetchMs: 0 })
  t.teardown(() => identify.close())
  await identify.start()
  const request = {}
  // A kid the gateway has not fetched yet: refused, and a refetch asked for.
  jwks.set({ keys: [first.jwk('k1'), second.jwk('k2')] })
  const fresh = `Bearer ${signed(second, 'k2', { sub: 'fresh' })}`
  t.throws(() => identify(fresh, request), { message: /unknown key id/ })
  await until(() => userOf(() => identify(`Bearer ${signed(second, 'k2', { sub: 'probe' })}`)) === 'probe', 'the refetch')
  t.equal(userOf(() => identify(fresh, request)), 'fresh', 'the kid fetched since: accepted for the same request')
  // A key replaced under its kid: a token of the new key was refused under the old one.
  const replaced = `Bearer ${signed(second, 'k1', { sub: 'replaced' })}`
  t.throws(() => identify(replaced, request), { message: /signature is invalid/ })
  jwks.set({ keys: [second.jwk('k1')] })
  t.throws(() => identify(`Bearer ${signed(second, 'k0', { sub: 'x' })}`), { message: /unknown key id/ }, 'a refetch asked for')
  await until(() => userOf(() => identify(`Bearer ${signed(second, 'k1', { sub: 'probe2' })}`)) === 'probe2', 'the rotation')
  t.equal(userOf(() => identify(replaced, request)), 'replaced', 'the key replaced since: accepted for the same request')
  // Not valid yet (nbf, beyond the 5 s of tolerance): valid a moment later, in the same request.
  const hs = createIdentityVerifier({ secret })
  const nbf = Math.floor(Date.now() / 1000) + 6
  const early = (sub: string): string => `Bearer ${createSigner({ key: secret, expiresIn: 600_000 })({ sub, tid: 't1', nbf })}`
  const soon = early('early')
  t.throws(() => hs(soon, request), { message: /not valid yet/ })
  // Another token of the same nbf tells when it is valid (the token itself would be kept verified).
  await until(() => userOf(() => hs(early('probe'))) === 'probe', 'the nbf', 8000)
  t.equal(userOf(() => hs(soon, request)), 'early', 'valid since: accepted for the same request')
})

// A connection's upgrade request lives as long as the connection (GraphQL over WebSocket): a kid
// refused while a refetch was not allowed yet (minRefetchMs) must ask for one when seen again
// later, as it does for a new request, or a valid token stays refused until the next refresh.
t.test('a kid refused while a refetch waits asks for one when seen again for the same request', async t => {
  const first = rsa()
  const second = rsa()
  const jwks = await jwksServer(t, { keys: [first.jwk('k1')] })
  let clock = 1_000_000
  const identify = createIdentityVerifier({ jwksUrl: jwks.url, jwksRefreshMs: 600_000, jwksMinRefetchMs: 30_000, jwksClock: () => clock })
  t.teardown(() => identify.close())
  await identify.start()
  t.equal(jwks.hits(), 1)
  const request = {}
  jwks.set({ keys: [first.jwk('k1'), second.jwk('k2')] })
  const fresh = `Bearer ${signed(second, 'k2', { sub: 'fresh' })}`
  t.throws(() => identify(fresh, request), { message: /unknown key id/ }, 'refused: the last fetch is too recent to refetch')
  t.equal(jwks.hits(), 1, 'no refetch yet')
  clock += 31_000
  t.throws(() => identify(fresh, request), { message: /unknown key id/ }, 'seen again, past minRefetchMs')
  await until(() => jwks.hits() === 2, 'the refetch', 2000).catch(() => {})
  t.equal(jwks.hits(), 2, 'a refetch asked for')
  // Asked for the same request only (another token, or no request, would ask for a refetch itself).
  await until(() => userOf(() => identify(fresh, request)) === 'fresh', 'the keys', 2000).catch(() => {})
  t.equal(userOf(() => identify(fresh, request)), 'fresh', 'accepted for the same request once fetched')
})

t.test('over HTTP: the guard refuses a kid not fetched yet, the route accepts it once its body is in', async t => {
  const first = rsa()
  const second = rsa()
  const jwks = await jwksServer(t, { keys: [first.jwk('k1')] })
  const kernel = await startTestKernel(t, { 'POST /v1/things': (_req, res) => json(res, 200, { ok: true }) })
  const op = { type: 'mutation', rest: 'POST /things', kernel: 'POST /v1/things', input: { type: 'object', properties: { name: { type: 'string' } } }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  const app = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url, BFF_RATE_LIMIT_GLOBAL_MAX: 1000, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 60_000 },
    { manifest: testManifest({ things: op }, { url: kernel.url }), kernelUrl: kernel.url, identity: { jwksRefreshMs: 60_000, jwksMinRefetchMs: 0 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  jwks.set({ keys: [first.jwk('k1'), second.jwk('k2')] })
  const body = JSON.stringify({ name: 'x' })
  const socket = connect(port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  let answer = ''
  socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
  await once(socket, 'connect')
  // The head: the guard checks the token (a kid not fetched yet: refused, a refetch asked for).
  socket.write(`POST /api/v1/things HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${signed(second, 'k2', { sub: 'u1' })}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`)
  await until(() => jwks.hits() >= 2, 'the refetch')
  await until(() => userOf(() => app.identify(`Bearer ${signed(second, 'k2', { sub: 'probe' })}`)) === 'probe', 'the new keys')
  socket.write(body)
  await once(socket, 'end')
  t.match(answer, /^HTTP\/1\.1 200 /, 'the route checked the token again, with the keys it holds now')
})
