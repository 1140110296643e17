import t from 'tap'
import { bearer, buildTestApp, json, startTestKernel, testManifest } from '../../helper.js'

// The firewall's verdict cache key once joined field names and values with U+0000,
// but a JSON string may hold U+0000: two different inputs of an operation that names several
// fields can share one key, and the second one gets the first one's verdict.

const SECRET = 'ghp_' + 'a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8'

t.test('a clean input cannot lend its cached verdict to a different input that holds a secret', async t => {
  const kernel = await startTestKernel(t, { 'POST /v1/ask': (_req, res) => json(res, 200, { ok: true }) })
  const manifest = testManifest({
    ask: {
      type: 'mutation',
      rest: 'POST /ask',
      kernel: 'POST /v1/ask',
      input: { type: 'object', properties: { prompt: { type: 'string' }, note: { type: 'string' } } },
      output: { type: 'object', properties: { ok: { type: 'boolean' } } },
      firewall: { fields: ['prompt', 'note'], action: 'block' }
    }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })

  // Control: the secret alone in `note` is refused.
  const control = await app.inject({ method: 'POST', url: '/api/v1/ask', headers: bearer(), payload: { prompt: 'hello', note: SECRET } })
  t.equal(control.statusCode, 403, 'control: a secret in note is blocked')

  // X: one field whose text spells the key of Y; no secret is detected in it ("sghp_" has no word boundary).
  const x = { prompt: `hello\u0000note\u0000s${SECRET}` }
  // Y: the same key material, split over the two fields: `note` holds the secret.
  const y = { prompt: 'hello', note: `${SECRET}\u0000note\u0000x` }
  const first = await app.inject({ method: 'POST', url: '/api/v1/ask', headers: bearer(), payload: x })
  t.equal(first.statusCode, 200, 'X is clean and passes (its verdict is cached)')
  const second = await app.inject({ method: 'POST', url: '/api/v1/ask', headers: bearer(), payload: y })
  t.equal(second.statusCode, 403, `Y, which holds a secret in note, is blocked (got ${second.statusCode})`)
  const leaked = kernel.requests.filter(r => (JSON.parse(r.body) as { note?: string }).note?.startsWith(SECRET) === true)
  t.equal(leaked.length, 0, 'the Kernel never receives the secret')
})
