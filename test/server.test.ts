import t from 'tap'
import { start, banner, type Started } from '../server.js'
import { buildApp } from '../app.js'
import { ConfigError } from '../schemas/config.js'
import { ManifestError } from '../manifest.js'
import { testConfig, bearer, startTestKernel, json, fixture } from './helper.js'

t.test('start() runs the embedded default: the demo Kernel starts alongside', async t => {
  const started = await start(testConfig({ PORT: 0 }))
  t.teardown(() => started.close())
  t.match(started.kernelUrl, /^http:\/\/127\.0\.0\.1:\d+$/)
  t.match(started.url, /^http:\/\/127\.0\.0\.1:\d+$/)
  const res = await fetch(`${started.url}/api/v1/agents/a1`, { headers: bearer() })
  t.equal(res.status, 200)
  t.equal(((await res.json()) as { id: string }).id, 'a1')
})

t.test('start() with KERNEL_URL does not start the demo Kernel', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/agents/a1': (_req, res) => json(res, 200, { id: 'a1', name: 'remote', model: 'm', description: null, createdAt: 'x', updatedAt: 'y' }) })
  const started = await start(testConfig({ PORT: 0, KERNEL_URL: kernel.url }))
  t.teardown(() => started.close())
  t.equal(started.kernelUrl, null)
  const res = await fetch(`${started.url}/api/v1/agents/a1`, { headers: bearer() })
  t.equal(((await res.json()) as { name: string }).name, 'remote')
})

t.test('start() stops the demo Kernel again when the gateway cannot start', async t => {
  await t.rejects(start(testConfig({ PORT: 0, BFF_MANIFEST: fixture('missing.yaml') })), ManifestError)
  await t.rejects(start(testConfig({ PORT: 0, HOST: '203.0.113.1' })), /EADDRNOTAVAIL|EINVAL/)
})

t.test('production refuses a missing or weak JWT secret', async t => {
  await t.rejects(buildApp(testConfig({ NODE_ENV: 'production', BFF_JWT_SECRET: undefined })), ConfigError)
  await t.rejects(buildApp(testConfig({ NODE_ENV: 'production', BFF_JWT_SECRET: 'short' })), /shorter than 32 bytes/)
})

t.test('the dev token is printed only when the gateway takes HS256 tokens', async t => {
  const started = { url: 'http://127.0.0.1:1', kernelUrl: null } as unknown as Started
  const pem = '{"k":"-----BEGIN PUBLIC KEY-----\\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEHJPwIt0Ojw2T3Wp01jbDFN+7+40j\\ntDbrWD+ml2uScVutvETMc+7FJCVxrINjBq8worp3Qvq9CN7+TFq9IZGkwg==\\n-----END PUBLIC KEY-----\\n"}'
  t.match(banner(started, testConfig({ BFF_JWT_SECRET: undefined })), /Dev token/, 'no key source: the development secret')
  t.match(banner(started, testConfig({ BFF_JWT_PUBLIC_KEYS: pem })), /Dev token/, 'a secret besides public keys')
  t.notMatch(banner(started, testConfig({ BFF_JWT_SECRET: undefined, BFF_JWKS_URL: 'https://issuer.example/jwks' })), /Dev token/, 'JWKS only')
})
