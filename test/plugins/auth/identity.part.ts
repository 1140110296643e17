import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { generateKeyPairSync, type KeyObject } from 'node:crypto'
import { createSigner } from 'fast-jwt'
import { createIdentityVerifier, mintToken, IDENTITY_CACHE_BYTES } from '../../../plugins/auth/identity.js'

const secret = 'identity-test-secret-of-at-least-32-bytes'

t.test('a cached identity is refused once its token expires', async t => {
  const identify = createIdentityVerifier({ secret, clockToleranceSec: 0 })
  // exp is whole seconds: 2 s of life leaves at least 1 s for the first calls.
  const header = `Bearer ${mintToken(secret, { tenant: 't1', user: 'u1', roles: ['viewer'], ttlSeconds: 2 })}`
  const first = identify(header)
  t.match(first, { tenant: 't1', user: 'u1', roles: ['viewer'], zone: 'public', expiresAt: Number })
  t.ok(first.expiresAt > Date.now() && first.expiresAt <= Date.now() + 2000)
  t.equal(identify(header), first, 'the second call is served from the cache')
  t.ok(Object.isFrozen(first) && Object.isFrozen(first.roles))
  await sleep(first.expiresAt - Date.now() + 50)
  t.throws(() => identify(header), { code: 'UNAUTHENTICATED', message: /expired/ })
})

t.test('the cache is bounded and failures are not cached', async t => {
  const identify = createIdentityVerifier({ secret, cacheSize: 2 })
  const tokens = ['a', 'b', 'c'].map(u => `Bearer ${mintToken(secret, { tenant: 't', user: u })}`)
  const ids = tokens.map(tok => identify(tok))
  t.not(identify(tokens[0]), ids[0], 'the oldest entry was evicted and verified again')
  t.same(identify(tokens[0]), ids[0])
  const forged = `Bearer ${mintToken('another-secret-of-at-least-32-bytes-long', { tenant: 't', user: 'x' })}`
  for (let i = 0; i < 2; i++) t.throws(() => identify(forged), { code: 'UNAUTHENTICATED', message: /signature is invalid/ })
})

// Bounded by count alone (10,000), the cache's size followed its tokens': an issuer's tokens of
// 200 roles (18 KB each; a WebSocket auth frame or connectionParams may carry more than a
// header's 16 KB) held 385 MB of heap at 10,000, past the Deployment's 384 MB heap. It is
// bounded in bytes too: the tokens' and their identities' text.
t.test('the cache is bounded in bytes too: large tokens are kept fewer', async t => {
  const identify = createIdentityVerifier({ secret })
  const roles = Array.from({ length: 120 }, (_, i) => `role-${i}-${'r'.repeat(60)}`)
  const tokens = Array.from({ length: 2000 }, (_, i) => `Bearer ${mintToken(secret, { tenant: 't', user: `u${i}`, roles })}`)
  t.ok(tokens[0].length > 10_000, `tokens of ${tokens[0].length} characters`)
  for (const token of tokens) identify(token)
  t.ok(identify.cached() > 0 && identify.cached() < 2000, `${identify.cached()} of the 2,000 kept`)
  t.ok(identify.cachedBytes() <= IDENTITY_CACHE_BYTES, `${identify.cachedBytes()} bytes counted, ${IDENTITY_CACHE_BYTES} at most`)
  t.equal(identify(tokens[1999]).user, 'u1999', 'the latest is served')
})

t.test('the scheme is case-insensitive and the token may be padded', async t => {
  const identify = createIdentityVerifier({ secret })
  const token = mintToken(secret, { tenant: 't', user: 'u' })
  t.equal(identify(`bearer ${token}`).user, 'u')
  t.equal(identify(`BEARER   ${token}  `).user, 'u')
  t.throws(() => identify('Bearer'), { message: /must be "Bearer <token>"/ })
  t.throws(() => identify(''), { message: /bearer token is required/ })
})

t.test('a 401 carries its challenge: WWW-Authenticate, with RFC 6750\'s error when a token was sent', async t => {
  const { buildDemoApp, bearer } = await import('../../helper.js')
  const app = await buildDemoApp(t)
  const forged = `Bearer ${mintToken('another-secret-of-at-least-32-bytes-long', { tenant: 't', user: 'x' })}`
  for (const [authorization, challenge] of [[undefined, 'Bearer'], [forged, 'Bearer error="invalid_token"'], ['Basic dXNlcjpwYXNz', 'Bearer error="invalid_request"']] as const) {
    for (const url of ['/api/v1/agents/a1', '/diagz', '/trpc/getAgent?input=%7B%22id%22%3A%22a1%22%7D']) {
      const res = await app.inject({ url, headers: authorization === undefined ? {} : { authorization } })
      t.equal(res.statusCode, 401, `${url} ${authorization ?? '(none)'}`)
      t.equal(res.headers['www-authenticate'], challenge, `${url} ${authorization ?? '(none)'}: the challenge`)
    }
  }
  t.equal((await app.inject({ url: '/api/v1/agents/a1', headers: bearer() })).headers['www-authenticate'], undefined, 'none on an answer')
  // A GraphQL document without a token whose calls ran is a 200 whatever its fields' codes: the
  // 401 is the field's (extensions.status), and a challenge belongs on a 401 only (RFC 9110
  // §11.6.1). A token sent and refused is a 401 before the body is read, as a REST batch
  // without a valid token is (every call of a batch needs one), each with its challenge.
  for (const authorization of [undefined, forged]) {
    const res = await app.inject({ method: 'POST', url: '/graphql', headers: authorization === undefined ? {} : { authorization }, payload: { query: '{ getAgent(id: "a1") { id } }' } })
    if (authorization === undefined) {
      t.equal(res.statusCode, 200)
      t.match(res.json(), { data: { getAgent: null }, errors: [{ extensions: { code: 'UNAUTHENTICATED', status: 401 } }] })
      t.equal(res.headers['www-authenticate'], undefined, 'GraphQL (none): no challenge on a 200')
    } else {
      t.equal(res.statusCode, 401)
      t.match(res.json(), { errors: [{ extensions: { code: 'UNAUTHENTICATED', status: 401 } }] })
      t.equal(res.headers['www-authenticate'], 'Bearer error="invalid_token"', 'GraphQL forged: refused before the body, with the challenge')
    }
    const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: authorization === undefined ? {} : { authorization }, payload: { calls: [{ id: 'a', op: 'getAgent', input: { id: 'a1' } }] } })
    t.equal(batch.statusCode, 401)
    t.match(batch.json(), { code: 'UNAUTHENTICATED', status: 401 })
    t.equal(batch.headers['www-authenticate'], authorization === undefined ? 'Bearer' : 'Bearer error="invalid_token"', `REST batch ${authorization === undefined ? '(none)' : 'forged'}: refused before the body, with the challenge`)
    // A tRPC batch of a refused call and another error is a 207: no challenge either; all refused, a 401 with it.
    const headers = authorization === undefined ? {} : { authorization }
    const mixed = await app.inject({ url: '/trpc/getAgent,nosuch?batch=1&input=%7B%220%22%3A%7B%22id%22%3A%22a1%22%7D%7D', headers })
    t.equal(mixed.statusCode, 207)
    t.equal(mixed.headers['www-authenticate'], undefined, `tRPC batch ${authorization === undefined ? '(none)' : 'forged'}: no challenge on a 207`)
    const all = await app.inject({ url: '/trpc/getAgent,getAgent?batch=1&input=%7B%220%22%3A%7B%22id%22%3A%22a1%22%7D%2C%221%22%3A%7B%22id%22%3A%22a2%22%7D%7D', headers })
    t.equal(all.statusCode, 401)
    t.equal(all.headers['www-authenticate'], authorization === undefined ? 'Bearer' : 'Bearer error="invalid_token"')
  }
})

// A signature's base64url text has bits past its bytes (2 for HS256's 32 bytes, 4 for RS256's
// 256 and ES256's 64): Node's decoder ignores them, so one token had 4 to 16 spellings that all
// verified. Each is a distinct token to everything keyed by the token's text (the verified-token
// cache took each as a new entry and a new signature check), though none is a genuine token's.
t.test('a token whose signature is spelt in non-canonical base64url is refused', async t => {
  const identify = createIdentityVerifier({ secret })
  const token = mintToken(secret, { tenant: 't', user: 'u' })
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
  const last = alphabet.indexOf(token.at(-1) as string)
  t.equal(last & 3, 0, 'the genuine signature\'s spare bits are zero')
  t.equal(identify(`Bearer ${token}`).user, 'u')
  for (const spare of [1, 2, 3]) {
    const variant = token.slice(0, -1) + alphabet[last | spare]
    t.not(variant, token)
    t.throws(() => identify(`Bearer ${variant}`), { code: 'UNAUTHENTICATED', message: /signature is invalid/ }, `spare bits ${spare}`)
  }
  t.equal(identify.cached(), 1, 'only the genuine token is kept')
})

// fast-jwt decodes and parses a token's payload before it checks the signature: a forged token
// from anyone, its payload arrays nested deep, cost that parse (JSON.parse takes some 0.1 ms per
// KB of `[[[[...`, against 4 µs for plain text; a 16 KB header some 1 ms, a tRPC connectionParams
// or GraphQL connection_init of 1 MB some 120 ms of the event loop). The signature is now checked
// first, over the encoded text: a forged token's payload is never decoded.
t.test('a forged token\'s payload is not parsed: the signature is checked first', async t => {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 })
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' })
  const pem = (k: KeyObject): string => k.export({ type: 'spki', format: 'pem' }).toString()
  const identify = createIdentityVerifier({ secret, publicKeys: new Map([['r', { alg: 'RS256' as const, pem: pem(rsa.publicKey) }], ['e', { alg: 'ES256' as const, pem: pem(ec.publicKey) }]]) })
  const b64 = (s: string): string => Buffer.from(s).toString('base64url')
  const nested = b64('{"sub":"u","tid":"t","exp":9999999999,"x":' + '['.repeat(20000) + ']'.repeat(20000) + '}')
  const parse = JSON.parse
  let parsed = 0
  JSON.parse = function (text: string, ...rest: unknown[]) {
    if (typeof text === 'string' && text.length > 20000) parsed++
    return (parse as (...a: unknown[]) => unknown)(text, ...rest)
  } as typeof JSON.parse
  t.teardown(() => { JSON.parse = parse })
  for (const [header, sigBytes] of [[{ alg: 'HS256' }, 32], [{ alg: 'RS256', kid: 'r' }, 256], [{ alg: 'ES256', kid: 'e' }, 64]] as const) {
    const forged = `Bearer ${b64(JSON.stringify(header))}.${nested}.${Buffer.alloc(sigBytes, 7).toString('base64url')}`
    t.throws(() => identify(forged), { code: 'UNAUTHENTICATED', message: /signature is invalid/ }, header.alg)
  }
  JSON.parse = parse
  t.equal(parsed, 0, 'no forged payload was parsed')
  // Genuine tokens of each kind still verify, and malformed ones are still called so.
  const signed = (alg: 'RS256' | 'ES256', kid: string, key: KeyObject): string => createSigner({ key: key.export({ type: 'pkcs8', format: 'pem' }).toString(), algorithm: alg, kid, expiresIn: 60_000 })({ sub: 'u', tid: 't' })
  t.equal(identify(`Bearer ${signed('RS256', 'r', rsa.privateKey)}`).user, 'u')
  t.equal(identify(`Bearer ${signed('ES256', 'e', ec.privateKey)}`).user, 'u')
  t.equal(identify(`Bearer ${mintToken(secret, { tenant: 't', user: 'u' })}`).user, 'u')
  for (const malformed of ['a.b', 'a.b.c.d', `${b64('{"alg":"HS256"}')}.x!y.AAAA`]) {
    t.throws(() => identify(`Bearer ${malformed}`), { code: 'UNAUTHENTICATED', message: /malformed/ }, malformed)
  }
})

// Algorithm confusion by configuration: a public key given as the HS256 secret (an IdP's PEM put
// in BFF_JWT_SECRET) verified HS256 tokens that anyone holding the public key signed, with any
// tenant and role. The verifier refuses such a secret (the configuration refuses it first).
t.test('a public key given as the HS256 secret is refused, never used to verify', async t => {
  const { createHmac } = await import('node:crypto')
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 })
  const pem = rsa.publicKey.export({ type: 'spki', format: 'pem' }).toString()
  const b64 = (o: unknown): string => Buffer.from(JSON.stringify(o)).toString('base64url')
  const input = b64({ alg: 'HS256', typ: 'JWT' }) + '.' + b64({ sub: 'attacker', tid: 'victim', roles: ['system'], zone: 'restricted', exp: Math.floor(Date.now() / 1000) + 60 })
  const forged = `Bearer ${input}.${createHmac('sha256', pem).update(input).digest('base64url')}`
  let identify: ReturnType<typeof createIdentityVerifier> | undefined
  t.throws(() => { identify = createIdentityVerifier({ secret: pem }) }, /public key.*BFF_JWT_PUBLIC_KEYS/)
  if (identify !== undefined) t.throws(() => identify!(forged), { code: 'UNAUTHENTICATED' }, 'the forged token is refused')
})
