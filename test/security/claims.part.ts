import t from 'tap'
import { createSigner } from 'fast-jwt'
import { buildApp } from '../../app.js'
import { buildDemoApp, testConfig, SECRET } from '../helper.js'
import { DEV_JWT_SECRET, ConfigError } from '../../schemas/config.js'

// A token's zone claim is looked up among the three zones only, and production refuses the
// development secret (it is in the source, and npm run token signs with it).

function sign (claims: Record<string, unknown>, secret = SECRET): string {
  return createSigner({ key: secret, algorithm: 'HS256', expiresIn: 600_000 })(claims)
}

t.test('a token whose zone is not public/internal/restricted is refused (401), never escalated', async t => {
  const app = await buildDemoApp(t)
  // getDocument is in the restricted zone; the caller has the role it needs (viewer).
  for (const zone of ['constructor', 'toString', '__proto__', 'hasOwnProperty', 'valueOf']) {
    const tok = sign({ sub: 'u1', tid: 't1', roles: ['viewer'], zone })
    const res = await app.inject({ url: '/api/v1/documents/d1', headers: { authorization: `Bearer ${tok}` } })
    t.equal(res.statusCode, 401, `zone ${JSON.stringify(zone)}: 401 (got ${res.statusCode} ${res.body.slice(0, 120)})`)
  }
  // Control: a public-zone token is refused with 403.
  const pub = sign({ sub: 'u1', tid: 't1', roles: ['viewer'], zone: 'public' })
  const res = await app.inject({ url: '/api/v1/documents/d1', headers: { authorization: `Bearer ${pub}` } })
  t.equal(res.statusCode, 403, 'control: zone public gets 403')
})

t.test('production refuses the well-known development secret as BFF_JWT_SECRET', async t => {
  const config = testConfig({ NODE_ENV: 'production', BFF_AUDIT_ENABLED: false, BFF_JWT_SECRET: DEV_JWT_SECRET })
  const err = await buildApp(config, { logger: false }).then(async app => { await app.close(); return null }, (e: unknown) => e)
  t.type(err, ConfigError, 'the published development secret (in the source, printed by npm run token) is refused in production')
})
