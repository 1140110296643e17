import t from 'tap'
import { generateKeyPairSync, type KeyObject } from 'node:crypto'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { createSigner } from 'fast-jwt'
import { Agent, getGlobalDispatcher, setGlobalDispatcher } from 'undici'
import { createIdentityVerifier, mintToken } from '../../../plugins/auth/identity.js'
import { parsePublicKeys, keysOfJwks, JwksFetcher, JWKS_MAX_BYTES } from '../../../plugins/auth/keys.js'
import { loadConfig, productionProblems, ConfigError } from '../../../schemas/config.js'
import { buildDemoApp, buildTestApp, hs256Token, until } from '../../helper.js'
import { wsApp, connect } from '../../adapters/websocket-helper.js'
import { jwksServer } from './jwks-server.js'

const secret = 'keys-test-secret-of-at-least-32-bytes-long'

interface Pair { publicKey: KeyObject, privateKey: KeyObject, pem: string, privatePem: string }
const pair = (kind: 'rsa' | 'ec', modulusLength = 2048): Pair => {
  const { publicKey, privateKey } = kind === 'rsa'
    ? generateKeyPairSync('rsa', { modulusLength })
    : generateKeyPairSync('ec', { namedCurve: 'P-256' })
  return {
    publicKey,
    privateKey,
    pem: publicKey.export({ type: 'spki', format: 'pem' }).toString(),
    privatePem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString()
  }
}
const rsa1 = pair('rsa')
const rsa2 = pair('rsa')
const ec1 = pair('ec')

const claims = (extra: Record<string, unknown> = {}): Record<string, unknown> =>
  ({ sub: 'u1', tid: 't1', roles: ['viewer', 'system'], zone: 'internal', ...extra })
const sign = (key: Pair, algorithm: 'RS256' | 'ES256', kid: string | undefined, extra: Record<string, unknown> = {}): string =>
  createSigner({ key: key.privatePem, algorithm, ...(kid === undefined ? {} : { kid }), expiresIn: 600_000 })(claims(extra))
const b64 = (v: unknown): string => Buffer.from(JSON.stringify(v)).toString('base64url')
const keysJson = (keys: Record<string, Pair>): string => JSON.stringify(Object.fromEntries(Object.entries(keys).map(([k, p]) => [k, p.pem])))
const jwk = (p: Pair, kid: string, extra: Record<string, unknown> = {}): Record<string, unknown> => ({ ...p.publicKey.export({ format: 'jwk' }), kid, ...extra })

t.test('RS256 and ES256 tokens are accepted by kid, each with its own key', async t => {
  const identify = createIdentityVerifier({ publicKeys: parsePublicKeys(keysJson({ r1: rsa1, e1: ec1 })) })
  t.match(identify(`Bearer ${sign(rsa1, 'RS256', 'r1')}`), { tenant: 't1', user: 'u1', zone: 'internal' })
  t.match(identify(`Bearer ${sign(ec1, 'ES256', 'e1', { sub: 'u2' })}`), { tenant: 't1', user: 'u2' })
  t.throws(() => identify(`Bearer ${sign(rsa2, 'RS256', 'r1')}`), { code: 'UNAUTHENTICATED', message: /signature is invalid/ }, 'another RSA key under a known kid')
  t.throws(() => identify(`Bearer ${sign(rsa1, 'RS256', undefined)}`), { code: 'UNAUTHENTICATED', message: /needs a key id/ })
  t.throws(() => identify(`Bearer ${mintToken(secret, { tenant: 't', user: 'u' })}`), { code: 'UNAUTHENTICATED', message: /HS256 tokens are not accepted/ }, 'no secret: no HS256')
})

t.test('rotation: two kids at once, then the old one removed', async t => {
  const both = createIdentityVerifier({ publicKeys: parsePublicKeys(keysJson({ old: rsa1, new: rsa2 })) })
  const oldToken = `Bearer ${sign(rsa1, 'RS256', 'old')}`
  const newToken = `Bearer ${sign(rsa2, 'RS256', 'new')}`
  t.equal(both(oldToken).user, 'u1')
  t.equal(both(newToken).user, 'u1')
  const after = createIdentityVerifier({ publicKeys: parsePublicKeys(keysJson({ new: rsa2 })) })
  t.equal(after(newToken).user, 'u1')
  t.throws(() => after(oldToken), { code: 'UNAUTHENTICATED', message: /unknown key id \(kid\) "old"/ })
})

t.test('refusals: unknown kid, alg none, key confusion, alg not the key\'s, claims', async t => {
  const publicKeys = parsePublicKeys(keysJson({ r1: rsa1, e1: ec1 }))
  const withSecret = createIdentityVerifier({ secret, publicKeys, issuer: 'https://iss', audience: 'mantle', clockToleranceSec: 0 })
  const noSecret = createIdentityVerifier({ publicKeys })
  const now = Math.floor(Date.now() / 1000)
  const iss = { iss: 'https://iss', aud: 'mantle' }
  t.equal(withSecret(`Bearer ${sign(rsa1, 'RS256', 'r1', iss)}`).user, 'u1', 'the good token passes')

  // fast-jwt's signer refuses a claim of the wrong type: signed by hand.
  const hs256 = (payload: Record<string, unknown>): string => hs256Token(secret, payload)
  const none = `Bearer ${b64({ alg: 'none', typ: 'JWT' })}.${b64({ ...claims(), exp: now + 600 })}.`
  // Key confusion: HS256 with the public key's PEM text as the HMAC secret, claiming the RSA kid.
  const confused = createSigner({ key: rsa1.pem, algorithm: 'HS256', kid: 'r1', expiresIn: 600_000 })(claims(iss))
  const cases: Array<[string, string, RegExp]> = [
    ['unknown kid', `Bearer ${sign(rsa1, 'RS256', 'nope', iss)}`, /unknown key id/],
    ['alg none', none, /algorithm "none" is not accepted/],
    ['HS384', `Bearer ${createSigner({ key: secret, algorithm: 'HS384' })(claims(iss))}`, /algorithm "HS384" is not accepted/],
    // String() of this threw: a 500 for any caller, on every face.
    ['alg an object', `Bearer ${b64({ alg: { toString: 1 }, typ: 'JWT' })}.${b64({ ...claims(), exp: now + 600 })}.x`, /algorithm \(a JSON object\) is not accepted/],
    ['alg null', `Bearer ${b64({ alg: null, typ: 'JWT' })}.${b64({ ...claims(), exp: now + 600 })}.x`, /algorithm \(a JSON null\) is not accepted/],
    ['key confusion', `Bearer ${confused}`, /signature is invalid/],
    ['RS256 claiming the ES256 kid', `Bearer ${sign(rsa1, 'RS256', 'e1', iss)}`, /RS256 does not match the key "e1" \(ES256\)/],
    ['ES256 claiming the RS256 kid', `Bearer ${sign(ec1, 'ES256', 'r1', iss)}`, /ES256 does not match the key "r1" \(RS256\)/],
    ['wrong iss', `Bearer ${sign(rsa1, 'RS256', 'r1', { ...iss, iss: 'https://evil' })}`, /claim has a value that is not accepted/],
    ['wrong aud', `Bearer ${sign(rsa1, 'RS256', 'r1', { ...iss, aud: 'other' })}`, /claim has a value that is not accepted/],
    ['expired', `Bearer ${createSigner({ key: rsa1.privatePem, algorithm: 'RS256', kid: 'r1', noTimestamp: true })({ ...claims(iss), exp: now - 10 })}`, /expired/],
    ['not yet valid', `Bearer ${createSigner({ key: rsa1.privatePem, algorithm: 'RS256', kid: 'r1', noTimestamp: true })({ ...claims(iss), exp: now + 600, nbf: now + 300 })}`, /not valid yet/],
    // Refused as "it cannot be verified": fast-jwt's code for it had no reason.
    ['exp a string', `Bearer ${hs256({ ...claims(iss), exp: String(now + 600) })}`, /claim has the wrong type/],
    ['nbf a string', `Bearer ${hs256({ ...claims(iss), exp: now + 600, nbf: String(now - 10) })}`, /claim has the wrong type/],
    ['header not JSON', `Bearer ${Buffer.from('{oops').toString('base64url')}.e30.x`, /malformed/],
    ['header too long', `Bearer ${b64({ alg: 'RS256', kid: 'r1', pad: 'x'.repeat(9000) })}.e30.x`, /malformed/]
  ]
  for (const [name, authorization, detail] of cases) {
    t.throws(() => withSecret(authorization), { code: 'UNAUTHENTICATED', message: detail }, name)
  }
  t.throws(() => noSecret(`Bearer ${confused}`), { code: 'UNAUTHENTICATED', message: /HS256 tokens are not accepted/ }, 'key confusion without a secret')
  t.equal(withSecret(`Bearer ${mintToken(secret, { tenant: 't', user: 'hs', issuer: 'https://iss', audience: 'mantle' })}`).user, 'hs', 'HS256 still works with the secret')
})

t.test('over HTTP the refusals are 401, never 5xx', async t => {
  const app = await buildDemoApp(t, { BFF_JWT_SECRET: secret, BFF_JWT_PUBLIC_KEYS: keysJson({ r1: rsa1, e1: ec1 }) })
  const call = async (tok: string) => await app.inject({ method: 'GET', url: '/api/v1/kernel/headers', headers: { authorization: `Bearer ${tok}` } })
  const ok = await call(sign(ec1, 'ES256', 'e1', { tid: 'ec-tenant' }))
  t.equal(ok.statusCode, 200)
  t.equal(ok.json()['x-tenant-id'], 'ec-tenant')
  const confused = createSigner({ key: rsa1.pem, algorithm: 'HS256', kid: 'r1', expiresIn: 600_000 })(claims())
  for (const [name, tok] of [['confused', confused], ['unknown kid', sign(rsa1, 'RS256', 'zz')], ['mismatch', sign(rsa1, 'RS256', 'e1')]] as const) {
    const res = await call(tok)
    t.equal(res.statusCode, 401, name)
    t.match(res.json(), { code: 'UNAUTHENTICATED', detail: /refused/ }, name)
  }
})

t.test('JWKS: keys fetched from the URL are accepted; unknown kids refetch at most once per interval', async t => {
  const jwks = await jwksServer(t, {
    keys: [
      jwk(rsa1, 'j-rsa', { use: 'sig', alg: 'RS256' }),
      jwk(ec1, 'j-ec'),
      jwk(rsa2, 'j-enc', { use: 'enc' }),
      { kty: 'oct', kid: 'j-oct', k: 'c2VjcmV0' },
      { kty: 'RSA', kid: 'j-broken', n: 'x', e: 'y' }
    ]
  })
  // The refetch interval runs on a clock the test moves: a slow machine cannot cross it early.
  const clock = { now: Date.now() }
  const identify = createIdentityVerifier({ jwksUrl: jwks.url, jwksRefreshMs: 60_000, jwksMinRefetchMs: 300, jwksClock: () => clock.now })
  t.teardown(() => identify.close())
  await identify.start()
  t.equal(jwks.hits(), 1, 'fetched once at start')
  t.equal(identify(`Bearer ${sign(rsa1, 'RS256', 'j-rsa')}`).user, 'u1')
  const ecToken = `Bearer ${sign(ec1, 'ES256', 'j-ec')}`
  t.equal(identify(ecToken).user, 'u1')
  t.throws(() => identify(`Bearer ${sign(rsa2, 'RS256', 'j-enc')}`), { message: /unknown key id/ }, 'use: enc is not taken')

  // A flood of forged kids right after a fetch causes no fetch at all...
  for (let i = 0; i < 50; i++) t.throws(() => identify(`Bearer ${sign(rsa2, 'RS256', `forged-${i}`)}`), { code: 'UNAUTHENTICATED', message: /unknown key id/ })
  clock.now += 299
  for (let i = 0; i < 5; i++) t.throws(() => identify(`Bearer ${sign(rsa2, 'RS256', `late-${i}`)}`), { message: /unknown key id/ })
  await sleep(50)
  t.equal(jwks.hits(), 1, 'no refetch within the interval')
  // ...and after the interval, one fetch however many unknown kids come.
  clock.now += 2
  jwks.set({ keys: [jwk(rsa1, 'j-rsa'), jwk(rsa2, 'j-new')] })
  const fresh = `Bearer ${sign(rsa2, 'RS256', 'j-new')}`
  for (let i = 0; i < 50; i++) t.throws(() => identify(fresh), { message: /unknown key id/ })
  await until(() => jwks.hits() >= 2, 'the refetch')
  await until(() => { try { return identify(fresh).user === 'u1' } catch { return false } }, 'the new keys')
  t.equal(jwks.hits(), 2, 'exactly one refetch')
  t.equal(identify(fresh).user, 'u1', 'the new kid is known after the refetch')
  t.throws(() => identify(ecToken), { message: /unknown key id/ }, 'a kid removed from the JWKS is refused, even a token verified (cached) before')
})

// The refetch interval is a time between two fetches, not a time of day: on the wall clock, a
// clock stepped back an hour (an NTP correction) after a fetch refused every refetch for that
// hour (until the next background refresh, 10 minutes by default), and the tokens of a key the
// issuer had just rotated to were refused meanwhile.
t.test('JWKS: a wall clock stepped back does not hold up the refetch of an unknown kid', async t => {
  const jwks = await jwksServer(t, { keys: [jwk(rsa1, 'j-rsa')] })
  const identify = createIdentityVerifier({ jwksUrl: jwks.url, jwksRefreshMs: 600_000, jwksMinRefetchMs: 100 })
  t.teardown(() => identify.close())
  await identify.start()
  t.equal(jwks.hits(), 1, 'fetched once at start')
  const now = Date.now
  Date.now = () => now() - 3_600_000
  t.teardown(() => { Date.now = now })
  await sleep(150)
  jwks.set({ keys: [jwk(rsa1, 'j-rsa'), jwk(rsa2, 'j-new')] })
  const fresh = `Bearer ${sign(rsa2, 'RS256', 'j-new')}`
  t.throws(() => identify(fresh), { message: /unknown key id/ }, 'refused until the refetch brings its kid')
  await until(() => jwks.hits() >= 2, 'the refetch')
  await until(() => { try { return identify(fresh).user === 'u1' } catch { return false } }, 'the new keys')
  t.equal(identify(fresh).user, 'u1', 'the new kid is known after the refetch')
})

t.test('JWKS down at start-up: the app starts, tokens are refused, then keys arrive on refresh', async t => {
  const jwks = await jwksServer(t, { keys: [jwk(rsa1, 'k1')] })
  jwks.down(true)
  const app = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url }, { identity: { jwksRefreshMs: 200, jwksMinRefetchMs: 60_000 } })
  t.ok(jwks.hits() >= 1, 'the JWKS was tried at start')
  const tok = `Bearer ${sign(rsa1, 'RS256', 'k1')}`
  t.throws(() => app.identify(tok), { code: 'UNAUTHENTICATED', message: /unknown key id/ })
  t.throws(() => app.identify(`Bearer ${mintToken('mantle-dev-secret-not-for-production-0000', { tenant: 't', user: 'u' })}`),
    { message: /HS256 tokens are not accepted/ }, 'the development secret is not the fallback when a JWKS is configured')
  jwks.down(false)
  await until(() => { try { return app.identify(tok).user === 'u1' } catch { return false } }, 'the refresh to bring the keys')
  t.equal(app.identify(tok).user, 'u1', 'accepted once the refresh brought the keys')
  // Down again: the last good keys are kept.
  jwks.down(true)
  const before = jwks.hits()
  await sleep(450)
  t.ok(jwks.hits() > before, 'refreshes kept trying')
  t.equal(app.identify(`Bearer ${sign(rsa1, 'RS256', 'k1', { sub: 'later' })}`).user, 'later', 'last good keys kept')
})

// A JWKS-only gateway whose JWKS had not answered was ready while it refused every token: in a
// rolling deploy whose new pods could not reach the IdP, every pod was ready and 401'd every call.
t.test('/readyz fails with identity while no key is held, and is ready once the JWKS answers', async t => {
  const jwks = await jwksServer(t, { keys: [jwk(rsa1, 'k1')] })
  jwks.down(true)
  const app = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url }, { identity: { jwksRefreshMs: 200, jwksMinRefetchMs: 60_000 } })
  for (const url of ['/readyz', '/readyz?scope=instance']) {
    const res = await app.inject({ url })
    t.equal(res.statusCode, 503, url)
    t.match(res.json(), { status: 'not-ready', failing: ['identity'], checks: { identity: /^no key/ } }, url)
  }
  jwks.down(false)
  const tok = `Bearer ${sign(rsa1, 'RS256', 'k1')}`
  await until(() => { try { return app.identify(tok).user === 'u1' } catch { return false } }, 'the refresh to bring the keys')
  for (const url of ['/readyz', '/readyz?scope=instance']) {
    const res = await app.inject({ url })
    t.equal(res.statusCode, 200, `${url} once the keys arrived`)
    t.match(res.json(), { status: 'ready', failing: [], checks: { identity: 'keys loaded' } }, url)
  }
})

// Before, a fetch had no deadline of its own: a JWKS that answered a byte now and then held
// start-up past Fastify's plugin timeout (or, in flight later, every refresh after it).
t.test('a JWKS that never finishes its answer: start-up goes on, and later refreshes still run', async t => {
  const jwks = await jwksServer(t, { keys: [jwk(rsa1, 'k1')] })
  jwks.trickle(true)
  const started = Date.now()
  const app = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url }, { identity: { jwksRefreshMs: 300, jwksMinRefetchMs: 60_000, jwksTimeoutMs: 500 } })
  t.ok(Date.now() - started < 5000, `started in ${Date.now() - started} ms`)
  const tok = `Bearer ${sign(rsa1, 'RS256', 'k1')}`
  t.throws(() => app.identify(tok), { code: 'UNAUTHENTICATED' }, 'no keys yet')
  await until(() => jwks.hits() >= 3, 'refreshes to go on while each fetch is cut at its deadline')
  jwks.trickle(false)
  await until(() => { try { return app.identify(tok).user === 'u1' } catch { return false } }, 'the keys, once the JWKS answers')
})

t.test('a token whose header carries a certificate chain (x5c, some IdPs) is read', async t => {
  const jwks = await jwksServer(t, { keys: [jwk(rsa1, 'k1')] })
  const app = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWKS_URL: jwks.url })
  const chain = ['A'.repeat(1400)]
  const tok = createSigner({ key: rsa1.privatePem, algorithm: 'RS256', kid: 'k1', header: { alg: 'RS256', x5c: chain }, expiresIn: 600_000 })(claims())
  t.ok(tok.indexOf('.') > 1024, 'a header over 1 KB')
  t.equal(app.identify(`Bearer ${tok}`).user, 'u1', 'before, refused as malformed')
})

t.test('a JWKS host that never completes the connection: the fetch gives up at its deadline', async t => {
  // undici acts on a request's signal only once it has a connection: connecting ran on to its
  // own 10 s timeout, and a JWKS host that dropped packets held start-up past Fastify's plugin
  // timeout. A dispatcher whose connections never open stands for that host.
  const previous = getGlobalDispatcher()
  setGlobalDispatcher(new Agent({ connect: () => {} }))
  // AbortSignal.timeout's timer does not hold the process open (the gateway's server does).
  const awake = setInterval(() => {}, 1000)
  t.teardown(() => { setGlobalDispatcher(previous); clearInterval(awake) })
  const warnings: string[] = []
  const log = { info: () => {}, warn: (obj: object) => { warnings.push(JSON.stringify(obj)) } }
  const started = Date.now()
  await new JwksFetcher({ url: 'http://jwks.invalid/jwks.json', onKeys: () => {}, log, timeoutMs: 300 }).fetch()
  t.ok(Date.now() - started < 2000, `gave up after ${Date.now() - started} ms`)
  t.equal(warnings.length, 1, 'and said so')
})

t.test('a JWKS body over JWKS_MAX_BYTES is not read whole: the last good keys are kept', async t => {
  // Read whole, a JWKS host answering gigabytes within the fetch's deadline took the memory.
  const big = JSON.stringify({ keys: [jwk(rsa1, 'k1')], pad: 'x'.repeat(JWKS_MAX_BYTES) })
  for (const announced of [true, false]) {
    const server = createServer((_req, res) => {
      res.writeHead(200, announced ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(big) } : { 'content-type': 'application/json' })
      res.end(big)
    })
    await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
    t.teardown(() => new Promise(resolve => server.close(resolve)))
    const warnings: string[] = []
    const loaded: Array<Map<string, unknown>> = []
    const log = { info: () => {}, warn: (obj: object, msg: string) => { warnings.push(JSON.stringify(obj) + msg) } }
    await new JwksFetcher({ url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/jwks`, onKeys: keys => { loaded.push(keys) }, log }).fetch()
    t.same(loaded, [], `no keys taken (length ${announced ? 'announced' : 'not announced'})`)
    t.match(warnings, [/over 1048576 bytes/])
  }
})

t.test('a JWKS with no usable key is a failed fetch: the last good keys are kept, with a warning', async t => {
  // Taken, it dropped every key at an info line, and every call was 401.
  const jwks = await jwksServer(t, { keys: [jwk(rsa1, 'k1')] })
  const warnings: string[] = []
  const loaded: string[][] = []
  const log = { info: () => {}, warn: (obj: object, msg: string) => { warnings.push(JSON.stringify(obj) + msg) } }
  const fetcher = new JwksFetcher({ url: jwks.url, onKeys: keys => { loaded.push([...keys.keys()]) }, log })
  await fetcher.fetch()
  for (const doc of [{ keys: [] }, { keys: [{ kty: 'OKP', crv: 'Ed25519', kid: 'e', x: 'AAAA' }] }, { keys: [{ ...jwk(rsa1, 'k1'), use: 'enc' }] }]) {
    jwks.set(doc)
    await fetcher.fetch()
  }
  t.same(loaded, [['k1']], 'the first keys only')
  t.equal(warnings.length, 3)
  for (const w of warnings) t.match(w, /holds no usable signing key.*keeping the last good keys/)
})

// RSA keys shorter than 2048 bits (RFC 7518 §3.3) were taken as RS256, in production too: a token
// signed with a 512-bit key, factored cheaply, got /diagz with the role system.
t.test('an RSA key shorter than 2048 bits is refused: at start-up in BFF_JWT_PUBLIC_KEYS, skipped in a JWKS', async t => {
  const weak = pair('rsa', 1024)
  const tiny = pair('rsa', 512)
  for (const env of [{}, { NODE_ENV: 'production', BFF_AUDIT_ENABLED: 'false' }]) {
    t.throws(() => loadConfig({ ...env, BFF_JWT_PUBLIC_KEYS: keysJson({ good: rsa1, weak }) }),
      { name: 'ConfigError', message: /BFF_JWT_PUBLIC_KEYS: the key "weak" is an RSA key shorter than 2048 bits/ }, `1024 bits ${JSON.stringify(env)}`)
    t.throws(() => loadConfig({ ...env, BFF_JWT_PUBLIC_KEYS: keysJson({ tiny }) }),
      { name: 'ConfigError', message: /the key "tiny" is an RSA key shorter than 2048 bits/ }, `512 bits ${JSON.stringify(env)}`)
  }
  t.throws(() => parsePublicKeys(keysJson({ weak })), /the key "weak" is an RSA key shorter than 2048 bits/)
  t.same([...parsePublicKeys(keysJson({ good: rsa1 }))].map(([kid, k]) => [kid, k.alg]), [['good', 'RS256']], '2048 bits is enough')

  t.same([...keysOfJwks({ keys: [jwk(weak, 'weak'), jwk(tiny, 'tiny', { alg: 'RS256' }), jwk(rsa1, 'good'), jwk(ec1, 'ec')] }).keys()], ['good', 'ec'], 'the short RSA keys of a JWKS are skipped')
  // A JWKS left with no usable key is a failed fetch, as one with none: the last good keys stay.
  const jwks = await jwksServer(t, { keys: [jwk(weak, 'weak')] })
  const warnings: string[] = []
  const loaded: string[][] = []
  const log = { info: () => {}, warn: (obj: object, msg: string) => { warnings.push(JSON.stringify(obj) + msg) } }
  await new JwksFetcher({ url: jwks.url, onKeys: keys => { loaded.push([...keys.keys()]) }, log }).fetch()
  t.same(loaded, [])
  t.match(warnings, [/holds no usable signing key \(RSA of 2048 bits or more/])
  const identify = createIdentityVerifier({ jwksUrl: jwks.url, jwksMinRefetchMs: 60_000 })
  t.teardown(() => identify.close())
  await identify.start()
  t.throws(() => identify(`Bearer ${sign(weak, 'RS256', 'weak')}`), { code: 'UNAUTHENTICATED', message: /unknown key id \(kid\) "weak"/ }, 'a token of the short key is refused')
})

t.test('the JWKS URL is logged without its credentials', async t => {
  const jwks = await jwksServer(t, { keys: [jwk(rsa1, 'k1')] })
  const lines: string[] = []
  const log = { info: (obj: object, msg: string) => { lines.push(JSON.stringify(obj) + msg) }, warn: (obj: object, msg: string) => { lines.push(JSON.stringify(obj) + msg) } }
  const secretUrl = jwks.url.replace('http://', 'http://svc:s3cr3t@') + '?api_key=k3y'
  await new JwksFetcher({ url: secretUrl, onKeys: () => {}, log }).fetch()
  jwks.down(true)
  await new JwksFetcher({ url: secretUrl, onKeys: () => {}, log }).fetch()
  t.equal(lines.length, 2)
  t.match(lines[0], /JWKS keys loaded/)
  t.match(lines[1], /could not be fetched/)
  for (const line of lines) {
    t.notMatch(line, /s3cr3t|k3y/, 'no password, no query')
    t.match(line, jwks.url, 'the origin and path')
  }
})

t.test('an unreachable JWKS (nothing listening) does not stop start-up', async t => {
  const server = createServer()
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  await new Promise(resolve => server.close(resolve))
  const app = await buildTestApp(t, { BFF_JWKS_URL: `http://127.0.0.1:${port}/jwks` })
  const res = await app.inject({ method: 'GET', url: '/api/v1/agents', headers: { authorization: `Bearer ${sign(rsa1, 'RS256', 'k1')}` } })
  t.equal(res.statusCode, 401)
  t.match(res.json(), { code: 'UNAUTHENTICATED', detail: /unknown key id/ })
})

t.test('the same RS256 identity on REST and on the WebSocket face', async t => {
  const { app, url } = await wsApp(t, { env: { BFF_JWT_PUBLIC_KEYS: keysJson({ r1: rsa1 }) } })
  const tok = sign(rsa1, 'RS256', 'r1', { tid: 'rs-tenant' })
  const rest = await app.inject({ method: 'GET', url: '/api/v1/kernel/headers', headers: { authorization: `Bearer ${tok}` } })
  t.equal(rest.statusCode, 200)
  t.equal(rest.json()['x-tenant-id'], 'rs-tenant')
  const client = await connect(t, `${url}?access_token=${tok}`, null)
  const frame = await client.request({ id: 'h', op: 'kernelHeaders' })
  t.equal(frame.result['x-tenant-id'], 'rs-tenant')
})

t.test('BFF_JWT_PUBLIC_KEYS is validated at start-up', async t => {
  const bad: Array<[string, RegExp]> = [
    ['{not json', /BFF_JWT_PUBLIC_KEYS is not valid JSON/],
    ['["a"]', /BFF_JWT_PUBLIC_KEYS must be a JSON object/],
    // A key set with no key refused every token while the gateway said it was ready.
    ['{}', /^Invalid configuration: BFF_JWT_PUBLIC_KEYS holds no key/],
    [' { } ', /BFF_JWT_PUBLIC_KEYS holds no key/],
    [JSON.stringify({ k: 'hello' }), /BFF_JWT_PUBLIC_KEYS: the key "k" is not a PEM public key/],
    [JSON.stringify({ k: '-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n' }), /BFF_JWT_PUBLIC_KEYS: the key "k" is not a valid PEM public key/],
    [JSON.stringify({ k: generateKeyPairSync('ed25519').publicKey.export({ type: 'spki', format: 'pem' }).toString() }), /neither RSA nor EC P-256/],
    [JSON.stringify({ k: generateKeyPairSync('ec', { namedCurve: 'secp384r1' }).publicKey.export({ type: 'spki', format: 'pem' }).toString() }), /neither RSA nor EC P-256/]
  ]
  for (const [value, message] of bad) {
    t.throws(() => loadConfig({ BFF_JWT_PUBLIC_KEYS: value }), { name: 'ConfigError', message }, value.slice(0, 30))
  }
  const keys = parsePublicKeys(keysJson({ r: rsa1, e: ec1 }))
  t.same([...keys].map(([kid, k]) => [kid, k.alg]), [['r', 'RS256'], ['e', 'ES256']])
  t.ok(loadConfig({ BFF_JWT_PUBLIC_KEYS: keysJson({ r: rsa1 }) }).BFF_JWT_PUBLIC_KEYS)
  t.throws(() => loadConfig({ BFF_JWKS_URL: 'ftp://x' }), ConfigError)
  t.throws(() => keysOfJwks({}), /no "keys" array/)
})

t.test('production: at least one key source; a given secret must be 32+ bytes', async t => {
  const prod = (env: Record<string, string>) => productionProblems(loadConfig({ NODE_ENV: 'production', BFF_AUDIT_ENABLED: 'false', ...env }))
  t.match(prod({}), [/BFF_JWT_SECRET is missing/])
  t.same(prod({ BFF_JWT_PUBLIC_KEYS: keysJson({ r: rsa1 }) }), [], 'public keys are enough')
  t.same(prod({ BFF_JWKS_URL: 'https://issuer.example/jwks.json' }), [], 'a JWKS URL is enough')
  t.same(prod({ BFF_JWKS_URL: 'https://issuer.example/jwks.json', BFF_JWT_SECRET: 'short' }), ['BFF_JWT_SECRET is shorter than 32 bytes'], 'a weak secret is refused even with other keys')
  t.same(prod({ BFF_JWT_SECRET: 'a'.repeat(32) }), [])
  // And buildApp follows it: public keys alone start a production gateway, without the dev secret.
  const app = await buildTestApp(t, { NODE_ENV: 'production', BFF_AUDIT_ENABLED: false, BFF_JWT_SECRET: undefined, BFF_JWT_PUBLIC_KEYS: keysJson({ r1: rsa1 }) })
  t.equal(app.identify(`Bearer ${sign(rsa1, 'RS256', 'r1')}`).user, 'u1')
  t.throws(() => app.identify(`Bearer ${mintToken('mantle-dev-secret-not-for-production-0000', { tenant: 't', user: 'u' })}`), { message: /HS256 tokens are not accepted/ })
  await t.rejects(buildTestApp(t, { NODE_ENV: 'production', BFF_JWT_SECRET: undefined }), ConfigError)
})

// RFC 7517 §4.3: `key_ops` says what a key is for, as `use` does (`verify` for checking
// signatures). A key published for encryption alone (`key_ops: ["encrypt", "wrapKey"]`, no
// `use`, no `alg`) was taken as a signing key: the key of another protocol, whose private half
// may answer as an oracle there, verified tokens here.
t.test('a JWKS key whose key_ops leave out verify is skipped', async t => {
  const keys = keysOfJwks({
    keys: [
      jwk(rsa1, 'enc-only', { key_ops: ['encrypt', 'wrapKey'] }),
      jwk(rsa2, 'not-a-list', { key_ops: 'verify' }),
      jwk(ec1, 'verifies', { key_ops: ['verify'] }),
      jwk(rsa1, 'no-ops')
    ]
  })
  t.same([...keys.keys()], ['verifies', 'no-ops'])
})
