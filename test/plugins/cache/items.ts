// Shared by the response cache's tests: a manifest of cached item reads and a Kernel that counts them.
import type { FastifyInstance } from 'fastify'
import { startTestKernel, testManifest, json, type TestKernel, type RecordedRequest } from '../../helper.js'

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
export const STORES = [
  { store: 'memory', env: { BFF_CACHE_STORE: 'memory' } },
  { store: 'redis', env: { REDIS_URL, BFF_CACHE_STORE: 'redis' } }
] as const

const Item = { type: 'object', properties: { id: { type: 'string' }, n: { type: 'integer' }, tenant: { type: 'string' } } }
// An answer that names who asked: cached per user.
const Mine = { type: 'object', properties: { ...Item.properties, user: { type: 'string' } } }
const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' }, q: { type: 'string' } } }

/** `changes`: fields to set on some of the operations (a timeout, say); `kernel`: the manifest's kernel settings beside its url (retries 0 unless set). */
export function itemManifest (kernelUrl: string, changes: Record<string, Record<string, unknown>> = {}, kernel: Record<string, unknown> = {}): ReturnType<typeof testManifest> {
  const ops: Record<string, Record<string, unknown>> = {
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: Item, cache: { ttlSeconds: 10, tags: ['item:{id}', 'items'] } },
    getFresh: { type: 'query', rest: 'GET /fresh/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: Item, cache: { ttlSeconds: 10, swrSeconds: 20, tags: ['item:{id}'] } },
    getDefault: { type: 'query', rest: 'GET /default/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: Item, cache: { tags: ['item:{id}'] } },
    getMine: { type: 'query', rest: 'GET /mine/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: Mine, cache: { ttlSeconds: 10, tags: ['item:{id}'], scope: 'user' } },
    getPlain: { type: 'query', rest: 'GET /plain/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: Item },
    getBroken: { type: 'query', rest: 'GET /broken/:id', kernel: 'GET /v1/broken/{id}', input: idInput, output: Item, cache: { ttlSeconds: 10 } },
    updateItem: { type: 'mutation', rest: 'PATCH /items/:id', kernel: 'PATCH /v1/items/{id}', input: idInput, output: Item, invalidates: ['item:{id}'] },
    failItem: { type: 'mutation', rest: 'POST /items/:id/fail', kernel: 'POST /v1/broken/{id}', input: idInput, output: Item, invalidates: ['item:{id}'] }
  }
  for (const [name, fields] of Object.entries(changes)) ops[name] = { ...ops[name], ...fields }
  return testManifest(ops, { url: kernelUrl, retries: 0, ...kernel })
}

/** A Kernel whose item reads count up, so a test sees which answer it got. */
export async function itemKernel (t: { teardown: (fn: () => unknown) => void }): Promise<TestKernel & { reads: () => number }> {
  let n = 0
  const answer = (req: RecordedRequest, res: Parameters<typeof json>[0]): void => json(res, 200, { id: req.url.split('?')[0].split('/').pop(), n: ++n, tenant: req.headers['x-tenant-id'], user: req.headers['x-user-id'], secret: 'undeclared' })
  const kernel = await startTestKernel(t, {})
  for (const id of ['a', 'b', 'c', 'd']) {
    kernel.on(`GET /v1/items/${id}`, answer)
    kernel.on(`PATCH /v1/items/${id}`, (_req, res) => json(res, 200, { id, n: 0 }))
  }
  return Object.assign(kernel, { reads: () => kernel.requests.filter(r => r.method === 'GET' && r.url.startsWith('/v1/items/')).length })
}

/**
 * Item c at the Kernel with a version: reads answer the version they saw, and a read of version
 * `slow` answers only once `release` is called; a PATCH moves the item to the next version.
 */
export function versionedItem (kernel: TestKernel, slow: number): { release: () => void } {
  let release!: () => void
  const gate = new Promise<void>(resolve => { release = resolve })
  let version = slow
  kernel.on('GET /v1/items/c', async (_req, res) => {
    const seen = version // what the Kernel reads now, answered later
    if (seen === slow) await gate
    json(res, 200, { id: 'c', n: seen })
  })
  kernel.on('PATCH /v1/items/c', (_req, res) => { version = slow + 1; json(res, 200, { id: 'c', n: slow + 1 }) })
  return { release }
}

export async function metric (app: FastifyInstance, name: string, labels: Record<string, string> = {}): Promise<number> {
  const m = app.metrics.registry.getSingleMetric(name)
  if (m === undefined) return 0
  const { values } = await m.get()
  return values.filter(v => Object.entries(labels).every(([k, l]) => (v.labels as Record<string, unknown>)[k] === l)).reduce((s, v) => s + v.value, 0)
}

/** Polls an asynchronous check every 10 ms until it holds (prom-client reads are async). */
export async function eventually (check: () => Promise<boolean>, what: string, ms = 20000): Promise<void> {
  const end = Date.now() + ms
  while (!await check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 10))
  }
}
