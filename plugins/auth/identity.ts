import { createVerifier, createSigner, TokenError } from 'fast-jwt'
import { MantleError } from '../../errors.js'
import type { Zone } from '../../schemas/manifest.js'

export interface Identity {
  readonly tenant: string
  readonly user: string
  readonly roles: readonly string[]
  readonly zone: Zone
}

export interface IdentityOptions {
  secret: string
  issuer?: string | undefined
  audience?: string | undefined
  /** Seconds of clock skew allowed on `exp` and `nbf`. */
  clockToleranceSec?: number
  /** Verified tokens kept (fast-jwt's LRU, bounded; entries never outlive `exp`). */
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
  const verify = createVerifier({
    key: options.secret,
    algorithms: ['HS256'],
    cache: options.cacheSize ?? 10000,
    // Optimization: the token itself is the cache key. fast-jwt's default hashes every token
    // (SHA-256) on every call; the raw token is already in this process's memory anyway.
    cacheKeyBuilder: (token: string) => token,
    clockTolerance: (options.clockToleranceSec ?? 5) * 1000,
    requiredClaims: ['sub', 'tid', 'exp'],
    ...(options.issuer === undefined ? {} : { allowedIss: options.issuer }),
    ...(options.audience === undefined ? {} : { allowedAud: options.audience }),
    ...(options.clockTimestamp === undefined ? {} : { clockTimestamp: options.clockTimestamp })
  })
  const identities = new WeakMap<object, Identity>()

  return function identify (authorization) {
    if (authorization === undefined || authorization === '') throw new MantleError('UNAUTHENTICATED', 'A bearer token is required')
    if (authorization.length < 8 || authorization.slice(0, 7).toLowerCase() !== 'bearer ') {
      throw new MantleError('UNAUTHENTICATED', 'The Authorization header must be "Bearer <token>"')
    }
    let claims: Record<string, unknown>
    try {
      claims = verify(authorization.slice(7).trim())
    } catch (err) {
      const code = err instanceof TokenError ? err.code : ''
      throw new MantleError('UNAUTHENTICATED', 'The token was refused: ' + (reasons[code] ?? 'it cannot be verified'))
    }
    // fast-jwt hands back the same payload object for a cached token: parse its claims once.
    let identity = identities.get(claims)
    if (identity === undefined) {
      identity = toIdentity(claims)
      identities.set(claims, identity)
    }
    return identity
  }
}

function toIdentity (claims: Record<string, unknown>): Identity {
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
  return Object.freeze({ tenant: tid, user: sub, roles: Object.freeze([...roles as string[]]), zone: zone as Zone })
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
