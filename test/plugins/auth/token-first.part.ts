// The token is checked before the body is read, on the routes whose calls need one: a request
// without a valid token cost any caller the reading and parsing of its body (some 30 ms of CPU
// for 1 MB of JSON) before its 401. Shown by bodies that would be refused (400, 413, 415) if read.
import t from 'tap'
import { once } from 'node:events'
import { connect, type AddressInfo } from 'node:net'
import { buildDemoApp, bearer, token } from '../../helper.js'
import { entries, type Row } from '../audit/entries.js'

const forged = { authorization: `Bearer ${token({ secret: 'another-secret-that-is-long-enough-0123456789' })}` }
const expired = { authorization: `Bearer ${token({ ttlSeconds: -60 })}` }
const malformed = { authorization: 'Basic dTpw' }
const json = { 'content-type': 'application/json' }
/** A body that is not JSON: a 400 once read. */
const broken = '{"name": '

t.test('no valid token: a 401 in the face\'s shape before the body, which is never parsed', async t => {
  const app = await buildDemoApp(t, { BFF_BODY_LIMIT: 4096 })
  const faces = [
    ['REST', '/api/v1/agents'],
    ['batch', '/api/v1/batch'],
    ['tRPC', '/trpc/createAgent']
  ] as const
  for (const [face, url] of faces) {
    for (const [name, headers] of [['none', {}], ['forged', forged], ['expired', expired], ['malformed', malformed]] as const) {
      const res = await app.inject({ method: 'POST', url, headers: { ...json, ...headers, 'x-request-id': `${face}-${name}` }, payload: broken })
      t.equal(res.statusCode, 401, `${face}, ${name} token: 401, not the body's 400`)
      const code = face === 'tRPC' ? res.json().error.data.code : res.json().code
      t.equal(code, 'UNAUTHENTICATED', `${face}, ${name} token`)
      t.equal(res.headers['www-authenticate'] !== undefined, true, `${face}, ${name} token: its challenge`)
    }
    // Over the body limit, or of a media type no face reads: the token first as well.
    const big = await app.inject({ method: 'POST', url, headers: { ...json, ...forged }, payload: JSON.stringify({ pad: 'x'.repeat(8192) }) })
    t.equal(big.statusCode, 401, `${face}: 401, not 413`)
    const text = await app.inject({ method: 'POST', url, headers: { 'content-type': 'text/plain', ...forged }, payload: 'hi' })
    t.equal(text.statusCode, 401, `${face}: 401, not 415`)
    // With a valid token, the body is read and judged as before.
    const valid = await app.inject({ method: 'POST', url, headers: { ...json, ...bearer() }, payload: broken })
    t.equal(valid.statusCode, 400, `${face}: a valid token's malformed body is still a 400`)
  }
  const rest = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: { ...json, ...forged }, payload: broken })
  t.same(rest.json(), { type: 'urn:mantle:problem:unauthenticated', title: 'Unauthenticated', status: 401, code: 'UNAUTHENTICATED', detail: 'The token was refused: the token signature is invalid', requestId: rest.headers['x-request-id'] })
  t.equal(rest.headers['www-authenticate'], 'Bearer error="invalid_token"')
  // GraphQL: a document of `__typename` needs no token, so only a token sent is checked first.
  const gqlForged = await app.inject({ method: 'POST', url: '/graphql', headers: { ...json, ...forged }, payload: broken })
  t.equal(gqlForged.statusCode, 401, 'GraphQL, forged token: 401, not 400')
  t.match(gqlForged.json(), { errors: [{ extensions: { code: 'UNAUTHENTICATED', status: 401 } }] }, 'GraphQL-shaped')
  const gqlNone = await app.inject({ method: 'POST', url: '/graphql', headers: json, payload: broken })
  t.equal(gqlNone.statusCode, 400, 'GraphQL without a token: the body is read, as a document may need none')
  const typename = await app.inject({ method: 'POST', url: '/graphql', headers: json, payload: JSON.stringify({ query: '{ __typename }' }) })
  t.equal(typename.statusCode, 200, 'GraphQL without a token: `{ __typename }` still answered')
})

t.test('GraphQL without a token: a body no larger than a document that calls no operation needs', async t => {
  const app = await buildDemoApp(t)
  // Read whole up to the body limit (1 MB), anyone could have a megabyte of JSON parsed.
  const padded = JSON.stringify({ query: '{ __typename }', variables: { pad: 'x'.repeat(17 * 1024) } })
  const gqlLarge = await app.inject({ method: 'POST', url: '/graphql', headers: { ...json, 'x-request-id': 'gql-anonymous-large' }, payload: padded })
  t.equal(gqlLarge.statusCode, 401, 'GraphQL without a token, a body over 16 KiB: 401 before it is read')
  t.match(gqlLarge.json(), { errors: [{ message: /A token is required for a body over 16 KiB/, extensions: { code: 'UNAUTHENTICATED', status: 401 } }] })
  const gqlLargeValid = await app.inject({ method: 'POST', url: '/graphql', headers: { ...json, ...bearer() }, payload: padded })
  t.equal(gqlLargeValid.statusCode, 200, 'with a token, the same body is read')
  const { getIntrospectionQuery } = await import('graphql')
  const introspection = await app.inject({ method: 'POST', url: '/graphql', headers: json, payload: JSON.stringify({ query: getIntrospectionQuery({ descriptions: true }) }) })
  t.equal(introspection.statusCode, 200, 'the whole introspection query fits (outside production, where it is answered)')
  t.match((await entries(app)).filter((r: Row) => r.requestId === 'gql-anonymous-large'), [{ category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, protocol: 'graphql' }], 'recorded once')
})

t.test('the refused body is never awaited: the 401 comes after the head alone, and the connection ends', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  for (const [path, authorization] of [['/api/v1/agents', forged.authorization], ['/api/v1/batch', undefined]] as const) {
    const socket = connect(port, '127.0.0.1')
    t.teardown(() => socket.destroy())
    let answer = ''
    socket.on('data', (chunk: Buffer) => { answer += chunk.toString('latin1') })
    await once(socket, 'connect')
    // A megabyte announced, none of it sent: the answer cannot wait for it.
    socket.write(`POST ${path} HTTP/1.1\r\nHost: x\r\n${authorization === undefined ? '' : `Authorization: ${authorization}\r\n`}Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n`)
    await once(socket, 'end')
    t.match(answer, /^HTTP\/1\.1 401 /, `${path}: answered`)
    t.match(answer, /\r\nconnection: close\r\n/i, `${path}: its connection ends`)
  }
})

t.test('a request refused before its body leaves one audit entry, as a call refused so did', async t => {
  const app = await buildDemoApp(t)
  for (const [id, url] of [['rest-forged', '/api/v1/agents'], ['batch-forged', '/api/v1/batch'], ['trpc-forged', '/trpc/createAgent'], ['gql-forged', '/graphql']] as const) {
    t.equal((await app.inject({ method: 'POST', url, headers: { ...json, ...forged, 'x-request-id': id }, payload: broken })).statusCode, 401)
  }
  const rows = await entries(app)
  const of = (id: string): Row[] => rows.filter(r => r.requestId === id)
  t.match(of('rest-forged'), [{ category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, action: 'createAgent', protocol: 'rest', method: 'POST', path: '/api/v1/agents', tenantId: 'public', userId: 'anonymous' }])
  t.match(of('batch-forged'), [{ category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, action: 'http', protocol: 'batch' }])
  t.match(of('trpc-forged'), [{ category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, action: 'createAgent', protocol: 'trpc' }])
  t.match(of('gql-forged'), [{ category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, action: 'http', protocol: 'graphql' }])
  for (const id of ['rest-forged', 'batch-forged', 'trpc-forged', 'gql-forged']) t.equal(of(id).length, 1, `${id}: one entry`)
})

// A kid not fetched yet (keys rotated at the IdP) waits for the JWKS fetch under way, and is
// checked again once it ends; a kid no fetch brings, or made up while no fetch is under way, is
// refused before the body all the same.
t.test('a kid not held: checked again once the JWKS fetch under way ends, else refused before the body', async t => {
  const { generateKeyPairSync } = await import('node:crypto')
  const { createSigner } = await import('fast-jwt')
  const { jwksServer } = await import('./jwks-server.js')
  const { buildTestApp, startTestKernel, testManifest, json: answer } = await import('../../helper.js')
  const rsa = (): { pem: string, jwk: (kid: string) => Record<string, unknown> } => {
    const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
    return { pem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), jwk: kid => ({ ...publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' }) }
  }
  const signed = (key: { pem: string }, kid: string): string => 'Bearer ' + createSigner({ key: key.pem, algorithm: 'RS256', kid, expiresIn: 600_000 })({ sub: 'u1', tid: 't1' })
  const first = rsa()
  const second = rsa()
  const jwks = await jwksServer(t, { keys: [first.jwk('k1')] })
  const kernel = await startTestKernel(t, { 'POST /v1/things': (_req, res) => answer(res, 200, { ok: true }) })
  const op = { type: 'mutation', rest: 'POST /things', kernel: 'POST /v1/things', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  const app = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url },
    { manifest: testManifest({ things: op }, { url: kernel.url }), kernelUrl: kernel.url, identity: { jwksRefreshMs: 600_000, jwksMinRefetchMs: 0 } })
  const post = async (authorization: string): Promise<number> => (await app.inject({ method: 'POST', url: '/api/v1/things', headers: { ...json, authorization }, payload: broken })).statusCode
  jwks.set({ keys: [first.jwk('k1'), second.jwk('k2')] })
  const hits = jwks.hits()
  // k2 unknown: a fetch starts, the request waits for it, and its body (malformed) is then read.
  t.equal(await post(signed(second, 'k2')), 400, 'the fetch brought k2: the body is read (and refused 400)')
  t.equal(jwks.hits(), hits + 1)
  // A kid the fetch does not bring: refused once it ends, the body unread.
  t.equal(await post(signed(second, 'k9')), 401, 'a kid no fetch brings: 401')
  t.equal(jwks.hits(), hits + 2)
  // Refetches no longer allowed (minRefetchMs): a made-up kid is refused at once, no fetch asked for.
  const limited = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url },
    { manifest: testManifest({ things: op }, { url: kernel.url }), kernelUrl: kernel.url, identity: { jwksRefreshMs: 600_000, jwksMinRefetchMs: 600_000 } })
  const before = jwks.hits()
  const res = await limited.inject({ method: 'POST', url: '/api/v1/things', headers: { ...json, authorization: signed(second, 'k8') }, payload: broken })
  t.equal(res.statusCode, 401)
  t.match(res.json(), { code: 'UNAUTHENTICATED', detail: /unknown key id/ })
  t.equal(jwks.hits(), before, 'no fetch asked for')
})

// A kid the issuer has just rotated to, on a call without a body (REST GET, tRPC GET query): the
// calls waited for the JWKS fetch under way only when their body was read after the check
// (tokenFirst), and a GET was refused 401 at once while the fetch its own token had started was
// bringing the key, which many front ends take for a lost session.
t.test('a kid not held on a call without a body: checked again once the JWKS fetch under way ends', async t => {
  const { generateKeyPairSync } = await import('node:crypto')
  const { createSigner } = await import('fast-jwt')
  const { jwksServer } = await import('./jwks-server.js')
  const { buildTestApp, startTestKernel, testManifest, json: answer } = await import('../../helper.js')
  const rsa = (): { pem: string, jwk: (kid: string) => Record<string, unknown> } => {
    const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
    return { pem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), jwk: kid => ({ ...publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' }) }
  }
  const signed = (key: { pem: string }, kid: string): string => 'Bearer ' + createSigner({ key: key.pem, algorithm: 'RS256', kid, expiresIn: 600_000 })({ sub: 'u1', tid: 't1' })
  const first = rsa()
  const jwks = await jwksServer(t, { keys: [first.jwk('k1')] })
  const kernel = await startTestKernel(t, { 'GET /v1/things': (_req, res) => answer(res, 200, { ok: true }) })
  const op = { type: 'query', rest: 'GET /things', kernel: 'GET /v1/things', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }
  const app = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url, BFF_CACHE_ENABLED: false },
    { manifest: testManifest({ things: op }, { url: kernel.url }), kernelUrl: kernel.url, identity: { jwksRefreshMs: 600_000, jwksMinRefetchMs: 0 } })
  const get = async (url: string, authorization: string): Promise<{ status: number, body: string }> => {
    const res = await app.inject({ url, headers: { authorization } })
    return { status: res.statusCode, body: res.body }
  }
  t.equal((await get('/api/v1/things', signed(first, 'k1'))).status, 200, 'the key held: 200')
  // The issuer rotates: each call below brings a kid the gateway has not fetched yet.
  for (const [face, url] of [['REST GET', '/api/v1/things'], ['tRPC GET', '/trpc/things']] as const) {
    const next = rsa()
    const kid = `k-${face.replace(/\W/g, '')}`
    jwks.set({ keys: [first.jwk('k1'), next.jwk(kid)] })
    const hits = jwks.hits()
    const got = await get(url, signed(next, kid))
    t.equal(got.status, 200, `${face}: the fetch its token started brought the key: 200 (${got.body.slice(0, 160)})`)
    t.equal(jwks.hits(), hits + 1, `${face}: one fetch`)
  }
  // A kid no fetch brings is refused once the fetch ends, as before.
  const got = await get('/api/v1/things', signed(rsa(), 'k-nowhere'))
  t.equal(got.status, 401, 'a kid no fetch brings: 401')
  t.match(JSON.parse(got.body), { code: 'UNAUTHENTICATED', detail: /unknown key id/ })
})
