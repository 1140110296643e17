import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { connect, type AddressInfo } from 'node:net'
import { fileURLToPath } from 'node:url'
import { createHmac } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import { SerializerSelector, type SerializerFactory } from '@fastify/fast-json-stringify-compiler'
import { LRUCache } from 'lru-cache'
import { buildApp, bodiesStrict, type BuildOptions } from '../app.js'
import { loadConfig, DEMO_MANIFEST, type Config } from '../schemas/config.js'
import { compileManifest, loadManifestFile, type Manifest } from '../manifest.js'
import { mintToken } from '../plugins/auth/index.js'
import { startKernel } from '../kernel/server.js'
import type { Zone } from '../schemas/manifest.js'

export const SECRET = 'test-secret-that-is-long-enough-for-hs256-0123456789'
export const fixture = (name: string): string => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url))

interface Teardown { teardown: (fn: () => unknown) => void }

export function testConfig (overrides: Record<string, string | number | boolean | undefined> = {}): Readonly<Config> {
  // No event-loop-delay shedding by default: a test process runs many gateways, Kernels and
  // clients on a shared machine, whose loop delays are not load (test/plugins/pressure sets it).
  return loadConfig({ NODE_ENV: 'test', LOG_LEVEL: 'silent', BFF_JWT_SECRET: SECRET, BFF_MAX_EVENT_LOOP_DELAY_MS: 0, ...overrides })
}

export interface TokenOptions { tenant?: string, user?: string, roles?: string[], zone?: Zone, ttlSeconds?: number, secret?: string }

export function token (opts: TokenOptions = {}): string {
  return mintToken(opts.secret ?? SECRET, {
    tenant: opts.tenant ?? 't1',
    user: opts.user ?? 'u1',
    roles: opts.roles ?? ['viewer', 'editor', 'operator', 'system'],
    zone: opts.zone ?? 'restricted',
    ttlSeconds: opts.ttlSeconds ?? 600
  })
}

/**
 * An HS256 token signed by hand, independently of the verifier's library, so that its claims can
 * be what fast-jwt's signer refuses: a payload object, or its JSON text as written (`"exp":1e400`,
 * which no object serializes to).
 */
export function hs256Token (secret: string, payload: Record<string, unknown> | string): string {
  const b64 = (text: string): string => Buffer.from(text).toString('base64url')
  const data = b64('{"alg":"HS256","typ":"JWT"}') + '.' + b64(typeof payload === 'string' ? payload : JSON.stringify(payload))
  return data + '.' + createHmac('sha256', secret).update(data).digest('base64url')
}

export const bearer = (opts: TokenOptions = {}): { authorization: string } => ({ authorization: `Bearer ${token(opts)}` })

let demo: Promise<Manifest> | null = null
/**
 * The demo manifest compiled once per test process, for the gateways built on it (a manifest is
 * frozen, and nothing a gateway does to its schemas changes them in meaning): loading and
 * compiling it took a quarter of a gateway's build, and the suite builds hundreds.
 */
export async function manifestFor (config: Readonly<Config>): Promise<Manifest | undefined> {
  return config.BFF_MANIFEST === DEMO_MANIFEST ? await demoManifest() : undefined
}

/**
 * One validator compiler for every 50 gateways a test process builds (see BuildOptions.validators):
 * its Ajv instances keep what they compiled of each gateway's route schemas, 50 gateways' worth.
 */
let validators = bodiesStrict()
let validatorUses = 0
function sharedValidators (): BuildOptions['validators'] {
  if (++validatorUses % 50 === 0) validators = bodiesStrict()
  return validators
}

/**
 * Fastify's serializer compiler, each route's answer serializer kept by its schema's text (and the
 * gateway's shared schemas): the gateways of a test process compiled the same ones again, about
 * a twentieth of the suite's CPU.
 */
const serialized = new LRUCache<string, (doc: unknown) => string>({ max: 5000 })
const serializers: SerializerFactory = (externalSchemas, options) => {
  const compile = SerializerSelector()(externalSchemas, options)
  const shared = JSON.stringify(externalSchemas) + JSON.stringify(options ?? {})
  return (route) => {
    const key = shared + JSON.stringify(route.schema)
    let serialize = serialized.get(key)
    if (serialize === undefined) {
      serialize = compile(route)
      serialized.set(key, serialize)
    }
    return serialize
  }
}

/** Builds the gateway from a test config; closed when the test ends. */
export async function buildTestApp (t: Teardown, overrides: Record<string, string | number | boolean | undefined> = {}, options: BuildOptions = {}): Promise<FastifyInstance> {
  const config = testConfig(overrides)
  const app = await buildApp(config, { logger: false, kernelBackoff: { baseMs: 1, capMs: 5 }, manifest: await manifestFor(config), validators: sharedValidators(), serializers, ...options })
  t.teardown(() => app.close())
  await app.ready()
  return app
}

/** The gateway on the demo manifest, in front of a real demo Kernel on a free port. */
export async function buildDemoApp (t: Teardown, overrides: Record<string, string | number | boolean | undefined> = {}, options: BuildOptions = {}): Promise<FastifyInstance> {
  const kernel = await startKernel({ port: 0, runDelayMs: 5 })
  t.teardown(() => kernel.close())
  return await buildTestApp(t, overrides, { ...options, kernelUrl: kernel.url })
}

export interface RecordedRequest {
  method: string
  url: string
  headers: IncomingMessage['headers']
  body: string
}

export type TestHandler = (req: RecordedRequest, res: ServerResponse) => void | Promise<void>

export interface TestKernel {
  url: string
  /** Every request the test Kernel received, in order. */
  requests: RecordedRequest[]
  /** Replaces the handler of `METHOD /path` (path without query). */
  on: (route: string, handler: TestHandler) => void
  close: () => Promise<void>
}

export function json (res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

/**
 * A real upstream on port 0 whose answers a test chooses per route: it can answer any status,
 * slowly, or with a broken body. Unknown routes answer 404.
 */
export async function startTestKernel (t: Teardown, handlers: Record<string, TestHandler> = {}): Promise<TestKernel> {
  const routes = new Map(Object.entries(handlers))
  const requests: RecordedRequest[] = []
  const server = createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      const rec: RecordedRequest = { method: req.method ?? 'GET', url: req.url ?? '/', headers: req.headers, body: Buffer.concat(chunks).toString('utf8') }
      requests.push(rec)
      const handler = routes.get(`${rec.method} ${rec.url.split('?')[0]}`)
      if (handler === undefined) return json(res, 404, { message: 'no such route' })
      Promise.resolve(handler(rec, res)).catch(() => { res.destroy() })
    })
  })
  server.keepAliveTimeout = 1000
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  let closed = false
  const close = async (): Promise<void> => {
    if (closed) return
    closed = true
    server.closeAllConnections()
    await new Promise<void>(resolve => server.close(() => resolve()))
  }
  t.teardown(close)
  return { url: `http://127.0.0.1:${port}`, requests, on: (route, handler) => { routes.set(route, handler) }, close }
}

/** A manifest for a test Kernel, from an object (the same checks as a file). */
export function testManifest (operations: Record<string, unknown>, kernel: Record<string, unknown> = {}, extra: Record<string, unknown> = {}): Manifest {
  return compileManifest({ version: 1, kernel: { url: 'http://127.0.0.1:1', ...kernel }, operations, ...extra }, 'test-manifest')
}

export async function demoManifest (): Promise<Manifest> {
  demo ??= loadManifestFile(DEMO_MANIFEST)
  return await demo
}

/** A port nothing listens on: connections to it are refused. */
export async function closedPort (): Promise<number> {
  const server = createServer()
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  await new Promise<void>(resolve => server.close(() => resolve()))
  return port
}

/** Polls `check` every 10 ms until it holds, or fails naming `what` after `ms`. */
export async function until (check: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 10))
  }
}

/** Reads a streamed answer's body until its text holds `marker` (or the stream ends): the text read. */
export async function readUntil (res: Response, marker: string): Promise<string> {
  const reader = res.body!.getReader()
  let text = ''
  while (!text.includes(marker)) {
    const chunk = await reader.read()
    if (chunk.done) break
    text += Buffer.from(chunk.value).toString()
  }
  return text
}

/**
 * Until every audit entry enqueued so far is stored or spooled: the queue is empty and no batch
 * is being written. The turn first lets the hooks of answers just sent enqueue theirs.
 */
export async function drained (app: FastifyInstance): Promise<void> {
  await new Promise(resolve => setImmediate(resolve))
  await until(() => { const h = app.audit.health(); return h.queueDepth === 0 && !h.writing }, 'the audit queue to drain and its last batch to land')
}

/** What the gateway answers `request` written on a raw socket, up to its close. */
export async function rawAnswer (port: number, request: string): Promise<string> {
  return await new Promise<string>((resolve, reject) => {
    const socket = connect(port, '127.0.0.1')
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString() })
    socket.on('end', () => resolve(data))
    socket.on('error', reject)
    socket.write(request)
  })
}
