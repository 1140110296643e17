import { buildTestApp, json, startTestKernel, testManifest, type TestKernel } from '../../helper.js'

type App = Awaited<ReturnType<typeof buildTestApp>>

/**
 * A gateway whose `ask` mutation (POST /api/v1/ask, string fields prompt and note) is scanned by
 * the firewall in `fields`, blocking on what it finds unless `action` says otherwise, in front of
 * a Kernel that answers { ok: true }; `env` goes to the gateway's configuration.
 */
export async function askApp (t: Parameters<typeof buildTestApp>[0], fields: string[], opts: { action?: 'block' | 'redact' | 'monitor', env?: Record<string, string | number | boolean> } = {}): Promise<{ kernel: TestKernel, app: App, manifest: ReturnType<typeof testManifest> }> {
  const kernel = await startTestKernel(t, { 'POST /v1/ask': (_req, res) => json(res, 200, { ok: true }) })
  const manifest = testManifest({
    ask: {
      type: 'mutation',
      rest: 'POST /ask',
      kernel: 'POST /v1/ask',
      input: { type: 'object', properties: { prompt: { type: 'string' }, note: { type: 'string' } } },
      output: { type: 'object', properties: { ok: { type: 'boolean' } } },
      firewall: { fields, action: opts.action ?? 'block' }
    }
  }, { url: kernel.url })
  return { kernel, manifest, app: await buildTestApp(t, opts.env ?? {}, { manifest, kernelUrl: kernel.url }) }
}
