// The HTTP guard counts every HTTP request but /healthz, /readyz and /metrics
// (README, Rate limits). /diagz was once registered before the guard's onRoute hook existed,
// and so was never counted.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { buildTestApp, startTestKernel, testManifest, bearer, json } from '../../helper.js'

const op = { type: 'query', rest: 'GET /ping', kernel: 'GET /v1/ok', input: { type: 'object' }, output: { type: 'object', properties: { ok: { type: 'boolean' } } } }

t.test('the HTTP guard counts GET /diagz like every other route', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/ok': (_req, res) => json(res, 200, { ok: true }) })
  const app = await buildTestApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 3, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 60_000, BFF_DIAGZ_ENABLED: true }, {
    manifest: testManifest({ ping: op }, { url: kernel.url }),
    kernelUrl: kernel.url
  })
  const headers = bearer({ tenant: 'g-' + randomUUID() })
  const statuses: number[] = []
  for (let i = 0; i < 5; i++) statuses.push((await app.inject({ url: '/diagz', headers })).statusCode)
  t.same(statuses, [200, 200, 200, 429, 429], 'the fourth request of the tenant in the window is refused')
  t.equal((await app.inject({ url: '/api/v1/ping', headers })).statusCode, 429, 'and /diagz spent the tenant\'s budget')
})
