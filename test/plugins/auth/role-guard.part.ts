import t from 'tap'
import { buildApp } from '../../../app.js'
import { testConfig, bearer } from '../../helper.js'

interface Teardown { teardown: (fn: () => unknown) => void }

// The guard of /diagz and /admin/*: the same identity as every face, then the role.
t.test('requireRole: 401 without a valid token, 403 without the role, through with it', async t => {
  const guarded = await buildGuarded(t, {})
  t.equal((await guarded.inject({ url: '/admin/x' })).statusCode, 401)
  t.equal((await guarded.inject({ url: '/admin/x', headers: { authorization: 'Bearer junk' } })).statusCode, 401)
  const forbidden = await guarded.inject({ url: '/admin/x', headers: bearer({ roles: ['viewer'] }) })
  t.equal(forbidden.statusCode, 403)
  t.match(forbidden.json(), { code: 'FORBIDDEN', detail: /system/ })
  const ok = await guarded.inject({ url: '/admin/x', headers: bearer({ roles: ['system'] }) })
  t.equal(ok.statusCode, 200)
})

t.test('with identity off the guard opens outside production and closes in production', async t => {
  const dev = await buildGuarded(t, { BFF_AUTH_ENABLED: false })
  t.equal((await dev.inject({ url: '/admin/x' })).statusCode, 200)
  const prod = await buildGuarded(t, { BFF_AUTH_ENABLED: false, NODE_ENV: 'production', BFF_AUDIT_ENABLED: false })
  const res = await prod.inject({ url: '/admin/x' })
  t.equal(res.statusCode, 403)
  t.equal(res.json().code, 'FORBIDDEN')
})

async function buildGuarded (t: Teardown, overrides: Record<string, string | boolean | undefined>): Promise<Awaited<ReturnType<typeof buildApp>>> {
  const app = await buildApp(testConfig(overrides), { logger: false })
  app.after(() => {
    app.get('/admin/x', { onRequest: app.requireRole('system') }, async () => ({ ok: true }))
  })
  t.teardown(() => app.close())
  await app.ready()
  return app
}
