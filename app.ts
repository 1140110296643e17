import Fastify, { type FastifyInstance, type FastifyServerOptions, type FastifyError, type FastifyRequest, type FastifyReply } from 'fastify'
import { randomUUID } from 'node:crypto'
import { readFileSync } from 'node:fs'
import type { Duplex } from 'node:stream'
import { type Config, ConfigError, DEV_JWT_SECRET, productionProblems, corsOrigins } from './schemas/config.js'
import { ProblemSchema } from './schemas/manifest.js'
import { loadManifestFile, type Manifest } from './manifest.js'
import { toProblem, MantleError } from './errors.js'
import pipeline from './plugins/pipeline/index.js'
import metrics from './plugins/metrics/index.js'
import auth, { ANONYMOUS, parsePublicKeys } from './plugins/auth/index.js'
import kernel from './plugins/kernel/index.js'
import events from './plugins/events/index.js'
import redis from './plugins/redis/index.js'
import openapi from './adapters/openapi/index.js'
import rest from './adapters/rest/index.js'
import trpc from './adapters/trpc/index.js'
import graphql from './adapters/graphql/index.js'
import websocketFace from './adapters/websocket/index.js'
import type { FaceOptions } from './adapters/face.js'
import websocket from '@fastify/websocket'
import helmet from 'helmet'
import cors from '@fastify/cors'
import health from './routes/health.js'
import batch from './routes/batch.js'

/** The package version, read once at start-up (from the source tree or from dist/). */
export const VERSION: string = ((): string => {
  for (const candidate of ['./package.json', '../package.json']) {
    try {
      return (JSON.parse(readFileSync(new URL(candidate, import.meta.url), 'utf8')) as { version: string }).version
    } catch {}
  }
  return '0.0.0'
})()

export interface BuildOptions {
  /** A compiled manifest; by default the file named by BFF_MANIFEST is loaded. */
  manifest?: Manifest
  /** Overrides the Kernel origin (the demo Kernel's, or a test's). */
  kernelUrl?: string
  logger?: FastifyServerOptions['logger']
  /** Where the gateway's own logger writes (default stdout); tests capture lines with it. */
  logStream?: { write: (line: string) => void }
  /** Kernel retry backoff (tests shorten it). */
  kernelBackoff?: { baseMs: number, capMs: number }
  /** JWKS timings (tests shorten them). */
  identity?: { jwksRefreshMs?: number, jwksMinRefetchMs?: number }
}

/**
 * Security headers on every answer (errors and 404s included), as helmet computes them. Without
 * CSP nonces they are the same for every response, so helmet runs once here: @fastify/helmet
 * runs helmet's middleware chain per request, which cost the spine 14 points of throughput
 * (0.86 -> 0.72 of the pass-through). No Content-Security-Policy: the gateway answers JSON,
 * where CSP protects nothing, and a strict one breaks the inline scripts of /docs and
 * /graphiql. HSTS, nosniff, X-Frame-Options, Referrer-Policy and the cross-origin policies stay.
 */
export const SECURITY_HEADERS: Readonly<Record<string, string>> = ((): Record<string, string> => {
  const headers: Record<string, string> = {}
  const res = {
    setHeader: (name: string, value: unknown) => { headers[name.toLowerCase()] = String(value) },
    removeHeader: (name: string) => { delete headers[name.toLowerCase()] },
    getHeader: () => undefined
  }
  helmet({ contentSecurityPolicy: false })({} as never, res as never, () => {})
  return Object.freeze(headers)
})()

// A client's request id is kept only when it is short and plain: it goes into logs and headers.
const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/

export async function buildApp (config: Readonly<Config>, options: BuildOptions = {}): Promise<FastifyInstance> {
  const refused = productionProblems(config)
  if (refused.length > 0) throw new ConfigError('Refusing to start in production: ' + refused.join('; '))
  const manifest = options.manifest ?? await loadManifestFile(config.BFF_MANIFEST)

  const app = Fastify({
    logger: options.logger ?? {
      level: config.LOG_LEVEL,
      redact: {
        paths: ['req.headers.authorization', 'req.headers.cookie', 'req.headers["proxy-authorization"]', 'req.headers["x-api-key"]', 'res.headers["set-cookie"]'],
        censor: '[redacted]'
      },
      serializers: { req: requestForLog },
      ...(options.logStream === undefined ? {} : { stream: options.logStream })
    },
    bodyLimit: config.BFF_BODY_LIMIT,
    requestIdHeader: false,
    genReqId: (req) => {
      const id = req.headers['x-request-id']
      return typeof id === 'string' && REQUEST_ID.test(id) ? id : randomUUID()
    },
    return503OnClosing: true,
    routerOptions: { ignoreTrailingSlash: true, maxParamLength: 256 },
    ajv: { customOptions: { strict: false } }
  })

  app.addSchema(ProblemSchema)
  // Every face speaks JSON: any other body is a 415, not a string handed to the pipeline.
  app.removeContentTypeParser('text/plain')
  app.setErrorHandler(errorHandler)
  app.setNotFoundHandler((request, reply) => {
    errorHandler(new MantleError('NOT_FOUND', `No route ${request.method} ${request.url.split('?')[0]}`), request, reply)
  })
  // Node hands a CONNECT request to 'connect' listeners, and without one drops the connection
  // unanswered (found by `npm run fuzz`): the gateway is no proxy, so it answers 405.
  app.server.on('connect', (_req, socket: Duplex) => {
    const body = JSON.stringify(toProblem(new MantleError('BAD_REQUEST', 'CONNECT is not served', { status: 405 }), randomUUID()).problem)
    socket.on('error', () => {})
    socket.end(`HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/problem+json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
  })
  app.addHook('onRequest', (request, reply, done) => {
    reply.header('x-request-id', request.id)
    reply.headers(SECURITY_HEADERS)
    done()
  })
  // Fastify closes idle keep-alive sockets once, when closing starts; a socket busy then would
  // hold the shutdown until its keep-alive timeout. Reap sockets as they turn idle instead.
  let reaper: NodeJS.Timeout | null = null
  app.addHook('preClose', (done) => {
    reaper = setInterval(() => app.server.closeIdleConnections(), 50)
    reaper.unref()
    done()
  })
  app.addHook('onClose', (_instance, done) => {
    if (reaper !== null) clearInterval(reaper)
    done()
  })

  // CORS only when origins are configured: unset, no CORS header at all (same-origin only).
  if (config.BFF_CORS_ORIGINS !== undefined) {
    const origins = corsOrigins(config.BFF_CORS_ORIGINS)
    await app.register(cors, {
      origin: origins.includes('*') ? '*' : origins,
      credentials: false,
      methods: ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'],
      allowedHeaders: ['Authorization', 'Content-Type', 'Idempotency-Key', 'traceparent', 'x-request-id'],
      exposedHeaders: ['x-request-id', 'Retry-After', 'RateLimit', 'RateLimit-Policy', 'RateLimit-Limit', 'RateLimit-Remaining', 'RateLimit-Reset'],
      maxAge: 600,
      strictPreflight: false
    })
  }

  // Every concern, its order and its switch, in one place (ARCHITECTURE.md).
  await app.register(pipeline, { manifest })
  if (config.BFF_METRICS_ENABLED) await app.register(metrics)
  // One shared Redis connection for the stores that use Redis; absent without REDIS_URL.
  if (config.REDIS_URL !== undefined) await app.register(redis, { url: config.REDIS_URL })
  if (config.BFF_AUTH_ENABLED) {
    // The development secret is the fallback only when no key source is configured.
    const noKeys = config.BFF_JWT_SECRET === undefined && config.BFF_JWT_PUBLIC_KEYS === undefined && config.BFF_JWKS_URL === undefined
    if (noKeys) app.log.warn('no token key is configured: using the well-known development secret')
    await app.register(auth, {
      secret: noKeys ? DEV_JWT_SECRET : config.BFF_JWT_SECRET,
      publicKeys: config.BFF_JWT_PUBLIC_KEYS === undefined ? undefined : parsePublicKeys(config.BFF_JWT_PUBLIC_KEYS),
      jwksUrl: config.BFF_JWKS_URL,
      issuer: config.BFF_JWT_ISSUER,
      audience: config.BFF_JWT_AUDIENCE,
      ...options.identity
    })
  } else {
    app.decorate('identify', () => ANONYMOUS)
    // No identity, no roles: the gateway's own endpoints are open on a developer's machine and
    // closed in production, where nobody could prove the role they need.
    const production = config.NODE_ENV === 'production'
    app.decorate('requireRole', (role: string) => (_request, _reply, done) => {
      done(production ? new MantleError('FORBIDDEN', `identity is off: nobody holds the role ${role}`) : undefined)
    })
  }
  await app.register(kernel, {
    url: options.kernelUrl ?? config.KERNEL_URL,
    resilience: config.BFF_CIRCUIT_BREAKER_ENABLED,
    threshold: config.BFF_CIRCUIT_BREAKER_THRESHOLD,
    resetTimeoutMs: config.BFF_CIRCUIT_BREAKER_TIMEOUT,
    ...(options.kernelBackoff === undefined ? {} : { backoff: options.kernelBackoff })
  })
  await app.register(events, { redisUrl: config.REDIS_URL, internalToken: config.BFF_INTERNAL_TOKEN, checkRoles: config.BFF_AUTH_ENABLED })
  if (config.BFF_OPENAPI_ENABLED) await app.register(openapi, { version: VERSION, secured: config.BFF_AUTH_ENABLED })
  await app.register(rest, { prefix: '/api/v1', secured: config.BFF_AUTH_ENABLED })
  await app.register(batch, { prefix: '/api/v1', maxCalls: config.BFF_BATCH_MAX_CALLS })
  const face: FaceOptions = {
    bodyLimit: config.BFF_BODY_LIMIT,
    maxCalls: config.BFF_BATCH_MAX_CALLS,
    maxDepth: config.BFF_GRAPHQL_MAX_DEPTH,
    secured: config.BFF_AUTH_ENABLED,
    development: config.NODE_ENV !== 'production'
  }
  // One WebSocket server for every face that upgrades (/ws, GraphQL and tRPC subscriptions).
  if (config.BFF_WEBSOCKET_ENABLED || config.BFF_GRAPHQL_ENABLED || config.BFF_TRPC_ENABLED) {
    await app.register(websocket, {
      options: { maxPayload: config.BFF_BODY_LIMIT },
      // A frame ws refuses (too large, bad UTF-8) is the client's doing, and ws has already
      // closed with the right code: not a gateway error, or any client could fill the log.
      errorHandler: (err, socket, request) => {
        const code = (err as { code?: unknown }).code
        if (typeof code === 'string' && code.startsWith('WS_ERR_')) request.log.debug({ err }, 'websocket protocol error')
        else request.log.error({ err }, 'websocket error')
        socket.terminate()
      }
    })
  }
  if (config.BFF_TRPC_ENABLED) await app.register(trpc, face)
  if (config.BFF_GRAPHQL_ENABLED) await app.register(graphql, face)
  if (config.BFF_WEBSOCKET_ENABLED) await app.register(websocketFace, face)
  await app.register(health)
  return app
}

/**
 * The request as logs show it. A WebSocket upgrade may carry its token as `?access_token=`, and
 * the default serializer logs the raw URL, which redact paths cannot reach into.
 */
export function requestForLog (req: FastifyRequest): Record<string, unknown> {
  return { method: req.method, url: req.url.replace(/([?&]access_token=)[^&#]*/gi, '$1[redacted]'), host: req.host, remoteAddress: req.ip, remotePort: req.socket?.remotePort }
}

function errorHandler (err: FastifyError | MantleError | Error, request: FastifyRequest, reply: FastifyReply): void {
  const { problem, headers } = toProblem(err, request.id)
  if (problem.code === 'INTERNAL') request.log.error({ err }, 'unexpected error')
  else if (problem.status >= 500) request.log.warn({ code: problem.code, detail: problem.detail }, 'call failed')
  if (headers !== null) reply.headers(headers)
  reply.code(problem.status).type('application/problem+json').send(problem)
}
