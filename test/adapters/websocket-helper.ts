// Shared by the WebSocket face's tests: a gateway listening on a port, and a real `ws` client
// that queues the frames it receives so a test can take them in order.
import { connect as connectTcp } from 'node:net'
import { WebSocket, type ClientOptions } from 'ws'
import type { FastifyInstance } from 'fastify'
import websocket from '@fastify/websocket'
import { buildApp, closeWebSockets, type BuildOptions } from '../../app.js'
import { startKernel, type KernelOptions } from '../../kernel/server.js'
import { createWebSocketFace, type WebSocketFaceSettings } from '../../adapters/websocket/index.js'
import type { FaceOptions } from '../../adapters/face.js'
import type { UnreadBytes } from '../../adapters/unread.js'
import { testConfig, token, manifestFor, until, type TokenOptions } from '../helper.js'

interface Teardown { teardown: (fn: () => unknown) => void }
type Env = Record<string, string | number | boolean | undefined>

/** The other upgrading faces are off: these tests hold the WebSocket face alone. */
const ONLY_WS: Env = { BFF_TRPC_ENABLED: false, BFF_GRAPHQL_ENABLED: false }

export interface Frame { [key: string]: any }

export interface WsSetup {
  app: FastifyInstance
  /** ws://127.0.0.1:<port>/ws (or the path of `face`) */
  url: string
}

export interface WsAppOptions {
  env?: Env
  /** Face bounds; with them the face is registered by the test instead of by app.ts. */
  settings?: Partial<WebSocketFaceSettings>
  /**
   * Another face that upgrades, built by the test with its bounds (createTrpcFace(…),
   * createGraphqlFace(…)), registered instead of /ws; `url` is then at its path.
   */
  face?: { plugin: (app: FastifyInstance, opts: FaceOptions) => Promise<void>, path: string }
  /** Runs on the built gateway before the test's face is registered (its hooks reach the face's routes). */
  prepare?: (app: FastifyInstance) => void
  build?: BuildOptions
  /** Options of the demo Kernel started when build.kernelUrl is not given. */
  kernel?: KernelOptions
  /** What the test's face (with `settings` or `face`) counts its sockets' unread bytes in. */
  unread?: UnreadBytes
}

/** A listening gateway with the WebSocket face; everything is closed at teardown. */
export async function wsApp (t: Teardown, options: WsAppOptions = {}): Promise<WsSetup> {
  let kernelUrl = options.build?.kernelUrl
  if (kernelUrl === undefined) {
    const kernel = await startKernel({ port: 0, runDelayMs: 5, ...options.kernel })
    t.teardown(() => kernel.close())
    kernelUrl = kernel.url
  }
  const custom = options.settings !== undefined || options.face !== undefined
  const config = testConfig({ ...ONLY_WS, ...options.env, ...(custom ? { BFF_WEBSOCKET_ENABLED: false } : {}) })
  const app = await buildApp(config, { logger: false, kernelBackoff: { baseMs: 1, capMs: 5 }, manifest: await manifestFor(config), ...options.build, kernelUrl })
  t.teardown(() => app.close())
  if (custom) {
    // What app.ts does, with the test's bounds.
    await app.register(websocket, { options: { maxPayload: config.BFF_BODY_LIMIT }, preClose: closeWebSockets })
    options.prepare?.(app)
    await app.register(options.face?.plugin ?? createWebSocketFace(options.settings), {
      bodyLimit: config.BFF_BODY_LIMIT,
      maxCalls: config.BFF_BATCH_MAX_CALLS,
      maxDepth: config.BFF_GRAPHQL_MAX_DEPTH,
      secured: config.BFF_AUTH_ENABLED,
      development: true,
      maxConnectionsPerTenant: config.BFF_AUTH_ENABLED ? config.BFF_WS_MAX_CONNECTIONS_PER_TENANT : undefined,
      unread: options.unread
    })
  }
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  return { app, url: `ws://127.0.0.1:${port}${options.face?.path ?? '/ws'}` }
}

export interface Closed { code: number, reason: string }

/** A real `ws` client whose received frames queue up until a test takes them. */
export class Client {
  readonly closed: Promise<Closed>
  private readonly frames: Frame[] = []
  private waiter: ((f: Frame) => void) | null = null

  constructor (readonly ws: WebSocket) {
    ws.on('message', (data) => {
      const frame = JSON.parse(data.toString()) as Frame
      if (this.waiter !== null) {
        const w = this.waiter
        this.waiter = null
        w(frame)
      } else {
        this.frames.push(frame)
      }
    })
    this.closed = new Promise(resolve => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })))
  }

  /** Frames received and not yet taken. */
  get pending (): number {
    return this.frames.length
  }

  send (frame: unknown): void {
    this.ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame))
  }

  /** The next frame, or a rejection after `ms`. */
  async next (ms = 3000): Promise<Frame> {
    const queued = this.frames.shift()
    if (queued !== undefined) return queued
    return await new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null
        reject(new Error(`no frame within ${ms} ms`))
      }, ms)
      this.waiter = (f) => {
        clearTimeout(timer)
        resolve(f)
      }
    })
  }

  /** Sends a frame and takes the next one (for tests where nothing else is arriving). */
  async request (frame: Record<string, unknown>): Promise<Frame> {
    this.send(frame)
    return await this.next()
  }
}

/** Opens a client; closed at teardown. `auth` is a token, `null` for none. */
export async function connect (t: Teardown, url: string, auth: TokenOptions | string | null = {}, options: ClientOptions = {}): Promise<Client> {
  const headers: Record<string, string> = {}
  if (auth !== null) headers.authorization = `Bearer ${typeof auth === 'string' ? auth : token(auth)}`
  const ws = new WebSocket(url, { ...options, headers: { ...headers, ...options.headers } })
  const client = new Client(ws)
  t.teardown(() => ws.terminate())
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve())
    ws.once('error', reject)
  })
  return client
}

/** An upgrade the gateway refuses: its HTTP status, headers and problem+json body. */
export async function refusedUpgrade (url: string, headers: Record<string, string> = {}): Promise<{ status: number, type: string, body: Frame }> {
  const answer = await upgrade(null, url, headers)
  if (answer.ws !== null) {
    answer.ws.terminate()
    throw new Error('the upgrade was accepted')
  }
  return { status: answer.status, type: answer.type ?? '', body: answer.body ?? {} }
}

export interface Upgrade {
  /** 101 when the upgrade went through, else the refusal's status. */
  status: number
  /** The open client (closed at teardown), when the upgrade went through. */
  ws: WebSocket | null
  /** The refusal's content type and JSON body. */
  type: string | null
  body: Frame | null
  /** The refusal's Retry-After. */
  retryAfter?: string
}

/** An upgrade that may go through or be refused (refusedUpgrade insists on a refusal); `t` closes an open one. */
export async function upgrade (t: Teardown | null, url: string, headers: Record<string, string> = {}, protocol?: string): Promise<Upgrade> {
  const ws = new WebSocket(url, protocol, { headers })
  t?.teardown(() => ws.terminate())
  return await new Promise((resolve, reject) => {
    ws.once('open', () => resolve({ status: 101, ws, type: null, body: null }))
    // Also what follows a refusal (the request destroyed): a no-op once settled.
    ws.on('error', reject)
    ws.once('unexpected-response', (req, res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        req.destroy()
        resolve({ status: res.statusCode ?? 0, ws: null, type: String(res.headers['content-type']), body: JSON.parse(Buffer.concat(chunks).toString()) as Frame, retryAfter: res.headers['retry-after'] })
      })
    })
  })
}

/**
 * An upgrade request written on a raw TCP socket (one a real client would not send, or one it
 * abandons): the gateway's answer as text, '' when `abandon` (the socket is destroyed as soon as
 * the request is written).
 */
export async function rawUpgrade (url: string, headers: Record<string, string>, abandon = false): Promise<string> {
  const { port, pathname } = new URL(url)
  const lines = Object.entries({ host: 'x', upgrade: 'websocket', connection: 'Upgrade', ...headers }).map(([k, v]) => `${k}: ${v}\r\n`).join('')
  return await new Promise<string>((resolve, reject) => {
    const socket = connectTcp(Number(port), '127.0.0.1', () => {
      socket.write(`GET ${pathname} HTTP/1.1\r\n${lines}\r\n`)
      if (abandon) socket.destroy()
    })
    let text = ''
    socket.on('data', (c: Buffer) => { text += c.toString() })
    socket.on('close', () => resolve(text))
    socket.on('error', reject)
    socket.setTimeout(2000, () => socket.destroy())
  })
}

/**
 * For `prepare`: a step that awaits (50 ms) between a face's onRequest hook and the upgrade, as
 * any step there that waits on I/O would. Many upgrades are then under way at once.
 */
export function slowUpgrades (app: FastifyInstance): void {
  app.addHook('preHandler', async (request) => {
    if (request.ws) await new Promise(resolve => setTimeout(resolve, 50))
  })
}

/** Until the gateway holds no TCP socket: every upgrade, refused, abandoned or closed, has ended on its side. */
export async function drained (app: FastifyInstance, ms = 5000): Promise<void> {
  const count = async (): Promise<number> => await new Promise((resolve, reject) => app.server.getConnections((err, n) => { if (err === null || err === undefined) resolve(n); else reject(err) }))
  const end = Date.now() + ms
  while (await count() > 0) {
    if (Date.now() > end) throw new Error('timed out waiting for the gateway\'s sockets to close')
    await new Promise(resolve => setTimeout(resolve, 10))
  }
}

/** A run as the Kernel publishes it, with one field the event schema does not declare. */
export function run (id: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const at = '2026-01-01T00:00:00.000Z'
  return { id, agentId: 'a1', status: 'running', temperature: 0.7, promptChars: 5, output: null, error: null, createdAt: at, updatedAt: at, startedAt: at, finishedAt: null, internalCost: 42, ...extra }
}

/** The most bytes `server` has held for its client after any send from now on (ws' bufferedAmount). */
export function peakBuffered (server: WebSocket): () => { peak: number, before: number, step: number } {
  // The most queued; the most unread before a frame that was queued; the least a queued frame
  // added once the socket held something (its size as ws counts it).
  let peak = 0
  let before = 0
  let step = Infinity
  const send = server.send.bind(server)
  server.send = ((...args: Parameters<typeof send>) => {
    const was = server.bufferedAmount
    send(...args)
    const now = server.bufferedAmount
    peak = Math.max(peak, now)
    if (now > was) before = Math.max(before, was)
    if (was > 0 && now > was) step = Math.min(step, now - was)
  }) as typeof server.send
  return () => ({ peak, before, step })
}

/** An initialised raw socket on `url` in `protocol` (graphql-transport-ws, or the legacy graphql-ws): the frames it got, a sender, and how it closed. */
export async function openGraphqlWs (t: Teardown, url: string, options: ClientOptions = {}, protocol = 'graphql-transport-ws'): Promise<{ ws: WebSocket, frames: any[], send: (m: unknown) => void, closed: () => [number, string] | null }> {
  const ws = new WebSocket(url, protocol, { headers: { authorization: `Bearer ${token({ roles: ['viewer'] })}` }, ...options })
  t.teardown(() => ws.terminate())
  const frames: any[] = []
  let closed: [number, string] | null = null
  ws.on('message', d => frames.push(JSON.parse(String(d))))
  ws.on('close', (c, r) => { closed = [c, String(r)] })
  await new Promise<void>((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject) })
  ws.send(JSON.stringify({ type: 'connection_init' }))
  await until(() => frames.some(f => f.type === 'connection_ack'), 'ack')
  return { ws, frames, send: m => ws.send(JSON.stringify(m)), closed: () => closed }
}
