import t from 'tap'
import { createIdentityVerifier, mintToken } from '../../../plugins/auth/identity.js'
import { buildDemoApp, SECRET } from '../../helper.js'

// Found by `npm run fuzz`: sub, tid and roles travel to the Kernel as headers (x-user-id,
// x-tenant-id, x-user-roles). A validly signed token whose sub held a character no header can
// carry ("李", a lone surrogate) failed every call with 503 KERNEL_UNAVAILABLE; spaces at the
// ends would be trimmed by the Kernel (' acme' became tenant 'acme'); a comma in a role would
// split it in two for the Kernel. Such a token is refused: 401 UNAUTHENTICATED.

const secret = 'identity-test-secret-of-at-least-32-bytes'
const header = (claims: { tenant?: string, user?: string, roles?: string[] }): string =>
  `Bearer ${mintToken(secret, { tenant: claims.tenant ?? 't1', user: claims.user ?? 'u1', roles: claims.roles ?? ['viewer'] })}`

t.test('claims a header cannot carry as they are are refused', async t => {
  const identify = createIdentityVerifier({ secret })
  for (const user of ['李', 'u\ud800', 'a\u0000b', 'a\nb', ' u1', 'u1 ', 'u'.repeat(257), '\u202eu1', 'e\u0301']) {
    t.throws(() => identify(header({ user })), { code: 'UNAUTHENTICATED', message: /sub and tid must be visible characters/ }, `sub ${JSON.stringify(user)}`)
  }
  for (const tenant of [' acme', 'acme\t', '💥', 'a\r\nx-injected: 1']) {
    t.throws(() => identify(header({ tenant })), { code: 'UNAUTHENTICATED', message: /sub and tid/ }, `tid ${JSON.stringify(tenant)}`)
  }
  for (const role of ['viewer,system', '', ' viewer', 'vi\newer', '管理者']) {
    t.throws(() => identify(header({ roles: ['viewer', role] })), { code: 'UNAUTHENTICATED', message: /each role must be visible characters without a comma/ }, `role ${JSON.stringify(role)}`)
  }
})

t.test('ordinary ids, Latin-1 and inner spaces pass', async t => {
  const identify = createIdentityVerifier({ secret })
  for (const user of ['u1', 'josé', 'user@example.com', 'auth0|5f7c8ec7c33c6c004bbafe82', 'Ann Lee', 'u'.repeat(256), 'x']) {
    t.equal(identify(header({ user })).user, user)
  }
  t.same(identify(header({ tenant: 'acme-eu.1', roles: ['viewer', 'org:admin', 'rôle'] })).roles, ['viewer', 'org:admin', 'rôle'])
})

t.test('over the wire: such a token is a 401, never a 503', async t => {
  const app = await buildDemoApp(t)
  const bad = `Bearer ${mintToken(SECRET, { tenant: 't1', user: '李', roles: ['viewer'] })}`
  const res = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { authorization: bad } })
  t.equal(res.statusCode, 401, res.body)
  t.match(res.json(), { code: 'UNAUTHENTICATED' })
  const ok = await app.inject({ method: 'GET', url: '/api/v1/agents/a1', headers: { authorization: `Bearer ${mintToken(SECRET, { tenant: 't1', user: 'josé', roles: ['viewer'] })}` } })
  t.equal(ok.statusCode, 200, 'a Latin-1 user id still reaches the Kernel')
})
