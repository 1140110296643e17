import { createVerifier, createSigner, TokenError } from 'fast-jwt'
import { LRUCache } from 'lru-cache'
import { MantleError } from '../../errors.js'
import type { Zone } from '../../schemas/manifest.js'

export interface Identity {
  readonly tenant: string
  readonly user: string
  readonly roles: readonly string[]
  readonly zone: Zone
  /** When the token stops being valid, in ms since the epoch (connections close then). */
  readonly expiresAt: number
}

/** Who calls when identity is off: every call is the public tenant's anonymous user. */
export const ANONYMOUS: Identity = Object.freeze({ tenant: 'public', user: 'anonymous', roles: Object.freeze([]), zone: 'public', expiresAt: Infinity })

export interface IdentityOptions {
  secret: string
  issuer?: string | undefined
  audience?: string | undefined
  /** Seconds of clock skew allowed on `exp` and `nbf`. */
  clockToleranceSec?: number
  /** Verified tokens kept (a bounded LRU; an entry never outlives its token's `exp`). */
  cacheSize?: number
  /** For tests: the verifier's clock, in ms. */
  clockTimestamp?: number
}

export const ZONE_RANK: Readonly<Record<Zone, number>> = { public: 0, internal: 1, restricted: 2 }

const reasons: Record<string, string> = {
  FAST_JWT_EXPIRED: 'the token has expired',
  FAST_JWT_INACTIVE: 'the token is not valid yet',
  FAST_JWT_INVALID_SIGNATURE: 'the token signature is invalid',
  FAST_JWT_INVALID_ALGORITHM: 'the token algorithm is not accepted',
  FAST_JWT_MALFORMED: 'the token is malformed',
  FAST_JWT_INVALID_CLAIM_VALUE: 'a token claim has a value that is not accepted',
  FAST_JWT_MISSING_REQUIRED_CLAIM: 'a required token claim is missing'
}

/** A verifier of bearer tokens to identities (CONTRACT §2). Throws UNAUTHENTICATED. */
export function createIdentityVerifier (options: IdentityOptions): (authorization: string | undefined) => Identity {
  const toleranceMs = (options.clockToleranceSec ?? 5) * 1000
  const verify = createVerifier({
    key: options.secret,
    algorithms: ['HS256'],
    clockTolerance: toleranceMs,
    requiredClaims: ['sub', 'tid', 'exp'],
    ...(options.issuer === undefined ? {} : { allowedIss: options.issuer }),
    ...(options.audience === undefined ? {} : { allowedAud: options.audience }),
    ...(options.clockTimestamp === undefined ? {} : { clockTimestamp: options.clockTimestamp })
  })
  // Verified identities by token. fast-jwt's own cache hashes every token (SHA-256) per call;
  // keyed by the token itself, a hit costs one map lookup. Failures are never cached.
  const verified = new LRUCache<string, { identity: Identity, expiresAt: number }>({ max: options.cacheSize ?? 10000 })
  const now = (): number => options.clockTimestamp ?? Date.now()

  return function identify (authorization) {
    if (authorization === undefined || authorization === '') throw new MantleError('UNAUTHENTICATED', 'A bearer token is required')
    if (authorization.length < 8 || authorization.slice(0, 7).toLowerCase() !== 'bearer ') {
      throw new MantleError('UNAUTHENTICATED', 'The Authorization header must be "Bearer <token>"')
    }
    const token = authorization.slice(7).trim()
    const hit = verified.get(token)
    if (hit !== undefined) {
      if (now() < hit.expiresAt) return hit.identity
      verified.delete(token)
    }
    let claims: Record<string, unknown>
    try {
      claims = verify(token)
    } catch (err) {
      const code = err instanceof TokenError ? err.code : ''
      throw new MantleError('UNAUTHENTICATED', 'The token was refused: ' + (reasons[code] ?? 'it cannot be verified'))
    }
    const identity = toIdentity(claims, toleranceMs)
    verified.set(token, { identity, expiresAt: identity.expiresAt })
    return identity
  }
}

function toIdentity (claims: Record<string, unknown>, toleranceMs: number): Identity {
  const { sub, tid, roles = [], zone = 'public' } = claims
  if (typeof sub !== 'string' || sub === '' || typeof tid !== 'string' || tid === '') {
    throw new MantleError('UNAUTHENTICATED', 'The token was refused: sub and tid must be non-empty strings')
  }
  if (!Array.isArray(roles) || !roles.every(r => typeof r === 'string')) {
    throw new MantleError('UNAUTHENTICATED', 'The token was refused: roles must be an array of strings')
  }
  if (typeof zone !== 'string' || !(zone in ZONE_RANK)) {
    throw new MantleError('UNAUTHENTICATED', 'The token was refused: zone must be public, internal or restricted')
  }
  return Object.freeze({ tenant: tid, user: sub, roles: Object.freeze([...roles as string[]]), zone: zone as Zone, expiresAt: (claims.exp as number) * 1000 + toleranceMs })
}

export interface TokenClaims {
  tenant: string
  user: string
  roles?: string[]
  zone?: Zone
  ttlSeconds?: number
  issuer?: string | undefined
  audience?: string | undefined
}

/** Mints an HS256 token with the CONTRACT §2 claims (dev tokens, `npm run token`, tests). */
export function mintToken (secret: string, claims: TokenClaims): string {
  const sign = createSigner({
    key: secret,
    algorithm: 'HS256',
    expiresIn: (claims.ttlSeconds ?? 3600) * 1000,
    ...(claims.issuer === undefined ? {} : { iss: claims.issuer }),
    ...(claims.audience === undefined ? {} : { aud: claims.audience })
  })
  return sign({ sub: claims.user, tid: claims.tenant, roles: claims.roles ?? [], zone: claims.zone ?? 'public' })
}
