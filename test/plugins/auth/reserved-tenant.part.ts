import t from 'tap'
import { createIdentityVerifier, mintToken } from '../../../plugins/auth/identity.js'
import { tokenFromArgs } from '../../../scripts/token.js'
import { bearer, buildDemoApp } from '../../helper.js'
import { entries } from '../audit/entries.js'

// The audit trail records a call without a token, or refused before its token was accepted,
// under tenant `public`, user `anonymous` (README: "`public` / `anonymous` when there is none or
// it was refused"), and identity off makes every caller that tenant. A token whose tid was
// "public" was accepted: its calls were recorded under the same tenant (its user `anonymous`
// too, when its sub said so), and GET /admin/audit?tenant=public could not tell them from
// anonymous calls. The name is reserved: such a token is refused, 401 UNAUTHENTICATED.

const secret = 'identity-test-secret-of-at-least-32-bytes'

t.test('a token whose tenant is the reserved `public` is refused', async t => {
  const identify = createIdentityVerifier({ secret })
  const header = (tenant: string): string => `Bearer ${mintToken(secret, { tenant, user: 'anonymous', roles: ['viewer'] })}`
  t.throws(() => identify(header('public')), { code: 'UNAUTHENTICATED', message: /tid "public" is reserved/ })
  for (const tenant of ['Public', 'public1', 'tpublic']) t.equal(identify(header(tenant)).tenant, tenant, `${tenant} is a tenant like any`)
  // `npm run token` mints none the gateway would refuse.
  t.throws(() => tokenFromArgs(['--tenant', 'public'], {}), /--tenant public is reserved/)
  t.ok(tokenFromArgs(['--tenant', 'Public'], {}))
})

t.test('its call is refused 401, and recorded as a call without an accepted token', async t => {
  const app = await buildDemoApp(t)
  const forged = await app.inject({ url: '/api/v1/agents', headers: { ...bearer({ tenant: 'public', user: 'anonymous' }), 'x-request-id': 'reserved' } })
  t.equal(forged.statusCode, 401)
  t.equal(forged.json().code, 'UNAUTHENTICATED')
  const rows = (await entries(app, '&tenant=public')).filter(r => r.requestId === 'reserved')
  t.match(rows, [{ category: 'auth', status: 'UNAUTHENTICATED', statusCode: 401, userId: 'anonymous' }], 'every entry of tenant public is a call without an accepted token')
})
