// Shared by the idempotency tests: a test Kernel whose item creation counts its calls and can be
// held open, and a gateway on a manifest with mutations for it, on either store. Records live
// 2 minutes (not 24 h): the tests share the machine's Redis.
import { randomUUID } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import { buildTestApp, startTestKernel, testManifest, json, bearer, type TestKernel } from '../../helper.js'
import type { BuildOptions } from '../../../app.js'

interface Teardown { teardown: (fn: () => unknown) => void }

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
export const STORES = ['memory', 'redis'] as const
export type StoreKind = typeof STORES[number]

const item = { type: 'object', required: ['id'], properties: { id: { type: 'string' }, name: { type: 'string' }, n: { type: 'integer' } } }

export function idempotencyManifest (kernel: Record<string, unknown> = {}) {
  return testManifest({
    createItem: { type: 'mutation', rest: 'POST /items', kernel: 'POST /v1/items', input: { type: 'object', required: ['name'], properties: { name: { type: 'string' }, tags: { type: 'array', items: { type: 'string' } }, size: { type: 'integer' } } }, output: item, timeoutMs: 10000 },
    renameItem: { type: 'mutation', rest: 'PATCH /items/:id', kernel: 'PATCH /v1/items/{id}', input: { type: 'object', required: ['id', 'name'], properties: { id: { type: 'string' }, name: { type: 'string' } } }, output: item },
    safeItem: { type: 'mutation', rest: 'POST /safe', kernel: 'POST /v1/safe', input: { type: 'object', properties: { name: { type: 'string' } } }, output: item, timeoutMs: 10000 },
    quickItem: { type: 'mutation', rest: 'POST /quick', kernel: 'POST /v1/quick', input: { type: 'object', properties: { name: { type: 'string' } } }, output: item, timeoutMs: 1000 },
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: item }
  }, { retries: 0, ...kernel })
}

/** What a test reads of an injected answer. */
export interface Answer { statusCode: number, headers: Record<string, unknown>, body: string, json: () => any }

export interface Gate { open: () => void, readonly closed: boolean }

export interface IdemSetup {
  app: FastifyInstance
  kernel: TestKernel
  /** Kernel calls of `METHOD /path` so far. */
  calls: (route?: string) => number
  /** Holds every creation until `open()`; a fresh gate per call of `hold`. */
  hold: () => Gate
  /** A fresh tenant per setup: tests on the shared Redis never meet. */
  tenant: string
  headers: (key?: string, tenant?: string) => Record<string, string>
  create: (input: Record<string, unknown>, key?: string, tenant?: string) => Promise<Answer>
}

export async function idemSetup (t: Teardown, store: StoreKind, env: Record<string, string | number | boolean | undefined> = {}, kernelSettings: Record<string, unknown> = {}, existing?: TestKernel, options: BuildOptions = {}): Promise<IdemSetup> {
  let gate: Promise<void> | null = null
  let created = 0
  const kernel = existing ?? await startTestKernel(t, {
    'POST /v1/items': async (req, res) => {
      const n = ++created
      if (gate !== null) await gate
      json(res, 201, { id: `item-${n}`, name: (JSON.parse(req.body) as { name: string }).name, n, secret: 'not in the schema' })
    },
    'PATCH /v1/items/x': (req, res) => json(res, 200, { id: 'x', name: (JSON.parse(req.body) as { name: string }).name })
  })
  const app = await buildTestApp(t, { BFF_IDEMPOTENCY_STORE: store, BFF_IDEMPOTENCY_TTL_SECONDS: 120, ...(store === 'redis' ? { REDIS_URL } : {}), ...env }, { ...options, manifest: idempotencyManifest(kernelSettings), kernelUrl: kernel.url })
  const tenant = 'idem-' + randomUUID()
  const headers = (key?: string, who = tenant): Record<string, string> => ({ ...bearer({ tenant: who }), ...(key === undefined ? {} : { 'idempotency-key': key }) })
  return {
    app,
    kernel,
    tenant,
    calls: (route = 'POST /v1/items') => kernel.requests.filter(r => `${r.method} ${r.url.split('?')[0]}` === route).length,
    hold: () => {
      let open!: () => void
      gate = new Promise<void>(resolve => { open = resolve })
      const g = { closed: true, open: () => { g.closed = false; gate = null; open() } }
      return g
    },
    headers,
    create: async (input, key, who) => await app.inject({ method: 'POST', url: '/api/v1/items', headers: headers(key, who), payload: input })
  }
}
