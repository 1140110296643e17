import type { IncomingMessage } from 'node:http'
import fp from 'fastify-plugin'
import type { FastifyInstance, onRequestHookHandler, preParsingHookHandler } from 'fastify'
import { Gauge } from 'prom-client'
import { MantleError } from '../../errors.js'
import { requestAuthorization } from '../../adapters/credentials.js'
import { framesBody } from '../../lingering.js'
import { withHook } from '../../route-hooks.js'
import { StageOrder, requestOf, type CallContext } from '../pipeline/index.js'
import { createIdentityVerifier, zoneRefusal, IDENTITY_CACHE_BYTES, type Identity, type IdentityOptions } from './identity.js'

export { mintToken, ANONYMOUS, KeyLease, type Identity } from './identity.js'
export { parsePublicKeys, parseSecrets, type PublicKey } from './keys.js'

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * The same verification every face, connection and admin route uses: `Bearer <token>` to
     * an identity, or UNAUTHENTICATED. With identity off, app.ts decorates it with the
     * anonymous identity instead. Given the HTTP request the token came with (request.raw), a
     * token refused once for that request is refused again without a second signature check
     * (the rate-limit guard, then the route, each call of a batch); nothing is kept past it.
     */
    identify: (authorization: string | undefined, request?: IncomingMessage) => Identity
    /**
     * An onRequest hook for the gateway's own endpoints (/diagz, /admin/*): 401 without a valid
     * token, 403 without `role`. With identity off, app.ts decorates one that lets every caller
     * through outside production and refuses all in production.
     */
    requireRole: (role: string) => onRequestHookHandler
    /**
     * Whether identity holds any key to verify tokens with (a JWKS-only gateway holds none until
     * its JWKS answers): /readyz fails with `identity` meanwhile. Absent with identity off.
     */
    identityHasKeys?: () => boolean
  }
  interface FastifyContextConfig {
    /**
     * What the route's calls ask of a request's token, checked before its body is read when
     * identity is on (tokenFirst): `required`, every call it serves needs one (REST, batch, tRPC
     * over HTTP); `presented`, a token sent must be valid, but none may be sent (GraphQL over
     * HTTP: a document of `__typename` alone calls no operation).
     */
    identity?: 'required' | 'presented'
  }
}

/**
 * The largest body read without a token on a route where none is required (`presented`: GraphQL,
 * whose `__typename` or introspection documents call no operation; graphql-js' whole
 * introspection query is about 2 KB).
 */
export const ANONYMOUS_BODY_BYTES = 16 * 1024

/** Whether a body announced so may be read without a token: a length, at most ANONYMOUS_BODY_BYTES. */
function anonymousBodyFits (length: string | undefined): boolean {
  if (length === undefined || !/^\d{1,9}$/.test(length)) return false
  return Number(length) <= ANONYMOUS_BODY_BYTES
}

/**
 * The methods Fastify reads no body for (handle-request.js): on a `required` route nothing to
 * check before, its calls refuse the request themselves.
 */
const BODYLESS = new Set(['GET', 'HEAD', 'TRACE'])

/**
 * A preParsing hook of the call routes (their `config.identity`): a request whose method carries
 * a body is refused 401 before its body is read when its token (where the face reads it:
 * requestAuthorization) is missing (`required` routes) or refused: missing, malformed, forged,
 * expired. Before, the body was read and parsed first (a 1 MB JSON body cost some 30 ms of CPU),
 * and anyone without a token could send them; a malformed, oversized or wrong-type body was a
 * 400, 413 or 415 rather than the 401. A verified token's identity is then a lookup in the
 * verifier's cache for the route, and a refused one is refused for the rest of the request
 * without another check (after the rate-limit guard, which asks first). The refused body is left
 * unread: the connection ends after the answer, as after the root hook's refusals.
 * A `presented` route's bodyless requests (GraphQL over GET and HEAD) are checked too: a refused
 * token refused each field of the document alone, a 200 where the same document over POST was
 * the 401 (with its WWW-Authenticate) a client renews its token on.
 */
export function tokenFirst (identify: (authorization: string | undefined, request?: IncomingMessage) => Identity, keysFor: (refusal: unknown) => Promise<void> | null, mode: 'required' | 'presented'): preParsingHookHandler {
  const required = mode === 'required'
  return function tokenFirst (request, reply, payload, done) {
    const bodyless = BODYLESS.has(request.method)
    if (bodyless && required) {
      done(null, payload)
      return
    }
    const authorization = requestAuthorization(request)
    const refused = (err: unknown): void => {
      if (framesBody(request.raw)) reply.header('connection', 'close')
      done(err as Error)
    }
    if (authorization === undefined && !required) {
      // None sent (GraphQL): a document that calls no operation is small. Read whole, up to the
      // body limit, anyone could have the gateway parse a megabyte of JSON per request.
      if (!bodyless && !anonymousBodyFits(request.headers['content-length'])) {
        refused(new MantleError('UNAUTHENTICATED', `A token is required for a body over ${ANONYMOUS_BODY_BYTES / 1024} KiB or of no announced length: without one, a document may call no operation`))
        return
      }
      done(null, payload)
      return
    }
    try {
      identify(authorization, request.raw)
    } catch (err) {
      // A kid the JWKS fetch under way may bring (keys rotated at the IdP): checked again once
      // it ends (within the JWKS timeout), as the route checked it once the body was in. A kid
      // no fetch is under way for is refused at once: a made-up kid never waits.
      const keys = keysFor(err)
      if (keys === null) {
        refused(err)
        return
      }
      const again = (): void => {
        try {
          identify(authorization, request.raw)
        } catch (refusal) {
          refused(refusal)
          return
        }
        done(null, payload)
      }
      keys.then(again, again)
      return
    }
    done(null, payload)
  }
}

/** The guard of the gateway's own endpoints, from the identify every face uses. */
export function roleGuard (identify: (authorization: string | undefined, request?: IncomingMessage) => Identity, role: string): onRequestHookHandler {
  return (request, _reply, done) => {
    try {
      const id = identify(request.headers.authorization, request.raw)
      if (!id.roles.includes(role)) throw new MantleError('FORBIDDEN', `${request.url.split('?')[0]} needs the role ${role}`)
      done()
    } catch (err) {
      done(err as Error)
    }
  }
}

async function authPlugin (app: FastifyInstance, opts: IdentityOptions): Promise<void> {
  const verifier = createIdentityVerifier({ log: app.log, ...opts })
  // An unreachable JWKS is logged, not fatal: tokens are refused until its keys arrive.
  await verifier.start()
  app.addHook('onClose', (_instance, done) => { verifier.close(); done() })
  if (app.hasDecorator('metrics')) {
    // eslint-disable-next-line no-new
    new Gauge({ name: 'mantle_identity_cache_entries', help: 'Verified tokens whose identity is kept, in a bounded LRU (10,000 by default)', registers: [app.metrics.registry], collect () { this.set(verifier.cached()) } })
    // eslint-disable-next-line no-new
    new Gauge({ name: 'mantle_identity_cache_bytes', help: `Bytes of text the verified tokens kept and their identities count as (at most ${IDENTITY_CACHE_BYTES})`, registers: [app.metrics.registry], collect () { this.set(verifier.cachedBytes()) } })
  }
  const identify = (authorization: string | undefined, request?: IncomingMessage): Identity => verifier(authorization, request)
  app.decorate('identify', identify)
  app.decorate('requireRole', (role: string) => roleGuard(identify, role))
  app.decorate('identityHasKeys', verifier.hasKeys)
  // The token before the body, on the call routes declared after this plugin (every face's).
  const hooks = { required: tokenFirst(identify, verifier.keysFor, 'required'), presented: tokenFirst(identify, verifier.keysFor, 'presented') }
  app.addHook('onRoute', (route) => {
    const mode = route.config?.identity
    if (mode === undefined) return
    const methods = Array.isArray(route.method) ? route.method : [route.method]
    if (mode === 'required' && methods.every(method => BODYLESS.has(method))) return
    route.preParsing = withHook(route.preParsing, hooks[mode], true)
  })

  app.pipeline.addStage({
    name: 'identity',
    order: StageOrder.identity,
    build: () => (ctx, next) => {
      let id: Identity
      try {
        id = identify(ctx.authorization, requestOf(ctx.caller))
      } catch (err) {
        // A kid the JWKS fetch under way may bring (keys rotated at the IdP, the fetch most often
        // started by this very token): checked again once it ends (within the JWKS timeout), as
        // tokenFirst does before a body. A call without one (a REST or tRPC GET, a /ws call frame)
        // was refused 401 at once, while the key was on its way.
        const keys = verifier.keysFor(err)
        if (keys === null) throw err
        const again = async (): Promise<unknown> => await next(identified(ctx, identify(ctx.authorization, requestOf(ctx.caller))))
        return keys.then(again, again)
      }
      return next(identified(ctx, id))
    }
  })

  app.pipeline.addStage({
    name: 'authorization',
    order: StageOrder.authorization,
    build (op) {
      // `roles: []` and the public zone ask only for an authenticated caller: nothing to check.
      if (op.roles.length === 0 && op.zone === 'public') return null
      const needed = op.roles
      return (ctx, next) => {
        const outside = zoneRefusal(op.name, op.zone, ctx.zone)
        if (outside !== null) throw outside
        if (needed.length > 0 && !needed.some(r => ctx.roles.includes(r))) {
          throw new MantleError('FORBIDDEN', `${op.name} needs one of the roles: ${needed.join(', ')}`)
        }
        return next(ctx)
      }
    }
  })
}

/** The call's context, its caller's identity set. */
function identified (ctx: CallContext, id: Identity): CallContext {
  ctx.tenant = id.tenant
  ctx.user = id.user
  ctx.roles = id.roles
  ctx.zone = id.zone
  return ctx
}

export default fp(authPlugin, { name: 'mantle-auth', dependencies: ['mantle-pipeline'], fastify: '5.x' })
