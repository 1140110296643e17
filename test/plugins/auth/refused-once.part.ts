// A token refused for a request is checked once for it: the rate-limit guard, the route, each
// call of a batch, GraphQL document or tRPC batch asked again, a signature check each.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { createIdentityVerifier, mintToken } from '../../../plugins/auth/identity.js'
import { buildTestApp, startTestKernel, testManifest, token, json } from '../../helper.js'

const secret = 'identity-test-secret-of-at-least-32-bytes'
const other = 'another-secret-that-is-long-enough-0123456789'

/**
 * Counts the token checks of tokens for `user`: fast-jwt parses a token's payload once per
 * check (identity parses only its header), and the user is in the payload.
 */
function checks (t: { teardown: (fn: () => void) => void }, user: string): () => number {
  const parse = JSON.parse
  let n = 0
  JSON.parse = function (text: string, reviver?: Parameters<typeof JSON.parse>[1]): unknown {
    if (typeof text === 'string' && text.includes(user)) n++
    return parse(text, reviver)
  }
  t.teardown(() => { JSON.parse = parse })
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
      if (face === 'rest') {
        t.equal(res.statusCode, 401)
        t.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8')
        t.equal(res.headers['www-authenticate'], 'Bearer error="invalid_token"')
        t.same(res.json(), { type: 'urn:mantle:problem:unauthenticated', title: 'Unauthenticated', status: 401, code: 'UNAUTHENTICATED', detail: 'The token was refused: the token signature is invalid', requestId: res.headers['x-request-id'] })
      } else {
        t.equal(res.body.split('The token was refused: the token signature is invalid').length - 1, face === 'batch' ? 5 : 3, `${face}: each call refused as before`)
      }
    }
  }
})
