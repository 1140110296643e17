import t from 'tap'
import { createIdentityVerifier } from '../../../plugins/auth/identity.js'
import { buildDemoApp, hs256Token, SECRET } from '../../helper.js'

// RFC 7519 §2: `exp` is a NumericDate, a number of seconds. JSON's grammar lets a number be as
// large as it likes: `1e400` parses to Infinity, and a token so signed was taken as valid for
// ever (kept in the verifier's cache for good, its WebSocket connections never closed at expiry).
// A claim that is no finite number of seconds is refused: 401 UNAUTHENTICATED.

const secret = 'identity-test-secret-of-at-least-32-bytes'
const now = Math.floor(Date.now() / 1000)
const claims = (exp: string): string => `{"sub":"u1","tid":"t1","roles":["viewer"],"iat":${now},"exp":${exp}}`

t.test('an exp that is no finite number of seconds is refused', async t => {
  const identify = createIdentityVerifier({ secret })
  for (const exp of ['1e400', '1.7976931348623157e309']) {
    t.throws(() => identify(`Bearer ${hs256Token(secret, claims(exp))}`), { code: 'UNAUTHENTICATED', message: /exp must be a finite number of seconds/ }, `exp ${exp}`)
  }
  // -Infinity: fast-jwt refuses it itself (an exp must be positive).
  t.throws(() => identify(`Bearer ${hs256Token(secret, claims('-1e400'))}`), { code: 'UNAUTHENTICATED' }, 'exp -1e400')
  t.equal(identify(`Bearer ${hs256Token(secret, claims(String(now + 600)))}`).tenant, 't1', 'a finite exp in the future passes')
  t.equal(identify(`Bearer ${hs256Token(secret, claims('1e10'))}`).tenant, 't1', 'a far but finite exp (year 2286) passes')
})

t.test('over the wire: a 401, on REST and on a WebSocket upgrade', async t => {
  const app = await buildDemoApp(t)
  const forever = `Bearer ${hs256Token(SECRET, claims('1e400'))}`
  const rest = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { authorization: forever } })
  t.equal(rest.statusCode, 401, rest.body)
  t.equal(rest.json().code, 'UNAUTHENTICATED')
  const upgrade = await app.inject({ method: 'GET', url: '/ws', headers: { authorization: forever, connection: 'upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==' } })
  t.equal(upgrade.statusCode, 401, upgrade.body)
})
