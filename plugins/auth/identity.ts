import { createHmac, createPublicKey, timingSafeEqual, verify as verifySignature } from 'node:crypto'
import { createVerifier, createSigner, TokenError } from 'fast-jwt'
import { LRUCache } from 'lru-cache'
import { MantleError } from '../../errors.js'
import { JwksFetcher, isAsymmetricKey, SECRET_IS_A_KEY, type PublicKey } from './keys.js'
import { HEADER_SAFE, carriesRole } from './claims.js'
import type { Zone } from '../../schemas/manifest.js'

export interface Identity {
  readonly tenant: string
  readonly user: string
  readonly roles: readonly string[]
  readonly zone: Zone
  /** When the token stops being valid, in ms since the epoch (connections close then). */
  readonly expiresAt: number
  /**
   * The JWKS key the token was verified with, withdrawn when the JWKS withdraws or replaces it
   * (connections close then); absent for the HS256 secrets (BFF_JWT_SECRET, BFF_JWT_SECRETS) and
   * BFF_JWT_PUBLIC_KEYS, which change only by restart.
   */
  readonly lease?: KeyLease
}

/**
 * One version of one JWKS key (its kid and PEM), shared by every identity verified with it.
 * The verifier withdraws it when a fetch no longer holds that kid, or holds another key under it:
 * once withdrawn, every listener is called once and let go. A stream holds one listener while it
 * is open (adapters/expiry.ts), so the set is bounded by the open streams.
 */
export class KeyLease {
  #withdrawn = false
  readonly #listeners = new Set<() => void>()

  constructor (readonly kid: string) {}

  get withdrawn (): boolean {
    return this.#withdrawn
  }

  /** Listeners held (streams open on this key). */
  get listeners (): number {
    return this.#listeners.size
  }

  /**
   * Calls `fn` once the key is withdrawn, never from this call (from a later turn when it already
   * is); returns the remover, which the caller runs when its stream ends.
   */
  onWithdrawn (fn: () => void): () => void {
    if (this.#withdrawn) {
      const immediate = setImmediate(fn)
      return () => { clearImmediate(immediate) }
    }
    // A wrapper of its own: the same fn given twice is two listeners, each removed by its remover.
    const listener = (): void => { fn() }
    this.#listeners.add(listener)
    return () => { this.#listeners.delete(listener) }
  }

  /** The verifier's: marks the key withdrawn and calls each listener once (a throw is the listener's alone). */
  withdraw (onError: (err: unknown) => void): void {
    if (this.#withdrawn) return
    this.#withdrawn = true
    const listeners = [...this.#listeners]
    this.#listeners.clear()
    for (const listener of listeners) {
      try {
        listener()
      } catch (err) {
        onError(err)
      }
    }
  }
}

/**
 * Bytes of text the verified-token cache holds at most (each entry counted as its token, its
 * identity's tenant and user, its roles and 16 more for each, and 256 more). Bounded by count
 * alone, its size followed its tokens': 10,000 tokens of 200 roles (18 KB each; a WebSocket auth
 * frame or tRPC's connectionParams may carry more than a header's 16 KB) held 385 MB of heap.
 */
export const IDENTITY_CACHE_BYTES = 16 * 1024 * 1024

/** What an entry of the verified-token cache counts against IDENTITY_CACHE_BYTES. */
function cachedSize (token: string, identity: Identity): number {
  let n = 256 + token.length + identity.tenant.length + identity.user.length
  for (const role of identity.roles) n += 16 + role.length
  return n
}

/** Who calls when identity is off: every call is the public tenant's anonymous user. */
export const ANONYMOUS: Identity = Object.freeze({ tenant: 'public', user: 'anonymous', roles: Object.freeze([]), zone: 'public', expiresAt: Infinity })

export interface IdentityOptions {
  /** HS256 secret of tokens without a kid; such tokens are refused without it. */
  secret?: string | undefined
  /**
   * HS256 secrets by kid (see parseSecrets). When given, an HS256 token with a kid is verified
   * with that kid's secret only (an unknown kid is refused); without them, an HS256 token's kid is
   * ignored and `secret` verifies it.
   */
  secrets?: ReadonlyMap<string, string> | undefined
  /** RS256 / ES256 public keys by kid (see parsePublicKeys). */
  publicKeys?: ReadonlyMap<string, PublicKey> | undefined
  /** A JWKS URL whose signing keys are accepted by kid. */
  jwksUrl?: string | undefined
  /** JWKS background refresh period, ms (10 minutes). */
  jwksRefreshMs?: number | undefined
  /** Least time between two JWKS fetches caused by an unknown kid, ms (30 s). */
  jwksMinRefetchMs?: number | undefined
  /** Longest one JWKS fetch may take, ms (5 s). */
  jwksTimeoutMs?: number | undefined
  /** The clock of the JWKS refetch interval, ms (tests move it by hand; performance.now() by default). */
  jwksClock?: (() => number) | undefined
  log?: { info: (obj: object, msg: string) => void, warn: (obj: object, msg: string) => void } | undefined
  issuer?: string | undefined
  audience?: string | undefined
  /** Seconds of clock skew allowed on `exp` and `nbf`. */
  clockToleranceSec?: number
  /** Verified tokens kept (a bounded LRU; an entry never outlives its token's `exp`). */
  cacheSize?: number
  /** Bytes of text those tokens and their identities take at most (IDENTITY_CACHE_BYTES). */
  cacheBytes?: number
  /** For tests: the verifier's clock, in ms. */
  clockTimestamp?: number
}

// No prototype: `constructor`, `toString` and the like are not zones (a token's zone is looked up here).
export const ZONE_RANK: Readonly<Record<Zone, number>> = Object.freeze(Object.assign(Object.create(null) as Record<Zone, number>, { public: 0, internal: 1, restricted: 2 }))

/**
 * The refusal of a caller whose zone is below `zone`, the zone of `name` (an operation's or an
 * event's), or null when it reaches it. Fails closed: a zone with no rank is below every zone.
 */
export function zoneRefusal (name: string, zone: Zone, callerZone: Zone): MantleError | null {
  return ZONE_RANK[callerZone] >= ZONE_RANK[zone] ? null : new MantleError('FORBIDDEN', `${name} is in the ${zone} zone, beyond the caller's`)
}

const reasons: Record<string, string> = {
  FAST_JWT_EXPIRED: 'the token has expired',
  FAST_JWT_INACTIVE: 'the token is not valid yet',
  FAST_JWT_INVALID_SIGNATURE: 'the token signature is invalid',
  FAST_JWT_INVALID_ALGORITHM: 'the token algorithm is not accepted',
  FAST_JWT_MALFORMED: 'the token is malformed',
  FAST_JWT_INVALID_CLAIM_TYPE: 'a token claim has the wrong type',
  FAST_JWT_INVALID_CLAIM_VALUE: 'a token claim has a value that is not accepted',
  FAST_JWT_MISSING_REQUIRED_CLAIM: 'a required token claim is missing'
}

/** identify, plus the JWKS lifecycle (start: first fetch, never throws; close: stop refreshing). */
export interface IdentityVerifier {
  /**
   * @param request the HTTP request the token came with (Node's IncomingMessage), when the caller
   *   has it: a token refused for it is refused again for it without being checked again.
   */
  (authorization: string | undefined, request?: object): Identity
  start: () => Promise<void>
  close: () => void
  /** Tokens whose verified identity is kept (bounded by `cacheSize`). */
  readonly cached: () => number
  /** Bytes those entries count as (bounded by `cacheBytes`, see IDENTITY_CACHE_BYTES). */
  readonly cachedBytes: () => number
  /** Whether it holds any key (a secret, configured or fetched public keys): without, every token is refused. */
  readonly hasKeys: () => boolean
  /**
   * For a refusal of a kid not fetched (yet), the JWKS fetch under way, which may bring it (the
   * token is then worth checking again once it ends); null for any other refusal, or none under way.
   */
  readonly keysFor: (refusal: unknown) => Promise<void> | null
}

type Verify = (token: string) => Record<string, unknown>
/** Whether `signature` (its bytes) signs `input` (the token's encoded header and payload). */
type Signed = (input: Buffer, signature: Buffer) => boolean
/** `lease`: a JWKS key's (the identities it verifies carry it). */
interface KeyVerifier { alg: string, verify: Verify, signed: Signed, lease?: KeyLease }

/**
 * The signature check alone, as fast-jwt makes it (HMAC-SHA256 of the secret's UTF-8, RSASSA
 * PKCS#1 v1.5 SHA-256, ECDSA P-256 SHA-256 in JOSE's r||s form), made before fast-jwt is asked:
 * fast-jwt decodes and parses the payload first, which a forged token made anyone's to fill.
 */
function signedBy (key: string, alg: string): Signed {
  if (alg === 'HS256') {
    return (input, signature) => {
      const mac = createHmac('sha256', key).update(input).digest()
      return signature.length === mac.length && timingSafeEqual(signature, mac)
    }
  }
  const publicKey = createPublicKey(key)
  const verifyKey = alg === 'ES256' ? { key: publicKey, dsaEncoding: 'ieee-p1363' as const } : publicKey
  return (input, signature) => {
    try {
      return verifySignature('sha256', input, verifyKey, signature)
    } catch {
      return false
    }
  }
}

// A token's three parts: base64url text, none empty but the signature's (fast-jwt calls the rest malformed).
const JWS_SHAPE = /^[\w-]+\.[\w-]+\.[\w-]*$/

// The encoded JOSE header's bound: an IdP that adds its certificate chain (x5c) makes 1-2 KB.
const MAX_HEADER = 8192

/** The token's JOSE header (alg, kid), decoded without trusting it; undefined when malformed. */
function tokenHeader (token: string): { alg: unknown, kid: unknown } | undefined {
  const dot = token.indexOf('.')
  if (dot <= 0 || dot > MAX_HEADER) return undefined
  try {
    const header: unknown = JSON.parse(Buffer.from(token.slice(0, dot), 'base64url').toString('utf8'))
    if (header === null || typeof header !== 'object' || Array.isArray(header)) return undefined
    return header as { alg: unknown, kid: unknown }
  } catch {
    return undefined
  }
}

// RFC 6750 §3.1: a token that was sent and refused is an invalid_token, a header that is not
// "Bearer <token>" an invalid_request (a missing token gets the bare challenge, errors.ts).
const INVALID_TOKEN = Object.freeze({ 'www-authenticate': 'Bearer error="invalid_token"' })
const INVALID_REQUEST = Object.freeze({ 'www-authenticate': 'Bearer error="invalid_request"' })
const refuse = (why: string): MantleError => new MantleError('UNAUTHENTICATED', 'The token was refused: ' + why, { headers: INVALID_TOKEN })

/**
 * A verifier of bearer tokens to identities (CONTRACT §2). Throws UNAUTHENTICATED.
 * HS256 is checked only against a secret: the one its `kid` names when secrets by kid are given
 * (`secret` for a token without a kid); RS256 / ES256 only against the public key its `kid`
 * names, with that key's own algorithm. The kids of the two are apart: an HS256 token naming a
 * public key's kid is refused (a public key is never an HMAC secret). Verification stays synchronous: keys live in
 * memory, and the JWKS fetcher fills them in the background.
 */
export function createIdentityVerifier (options: IdentityOptions): IdentityVerifier {
  // The configuration refuses it first (loadConfig); here for any other caller.
  if (options.secret !== undefined && isAsymmetricKey(options.secret)) throw new Error('BFF_JWT_SECRET cannot be the HS256 secret: ' + SECRET_IS_A_KEY)
  for (const [kid, secret] of options.secrets ?? []) {
    if (isAsymmetricKey(secret)) throw new Error(`BFF_JWT_SECRETS: the secret ${JSON.stringify(kid)} cannot be an HS256 secret: ${SECRET_IS_A_KEY}`)
  }
  const toleranceMs = (options.clockToleranceSec ?? 5) * 1000
  const verifierFor = (key: string, alg: string): Verify => createVerifier({
    key,
    algorithms: [alg as 'HS256'],
    clockTolerance: toleranceMs,
    // fast-jwt checks iss and aud only when the token carries them: a configured one is required.
    requiredClaims: ['sub', 'tid', 'exp', ...(options.issuer === undefined ? [] : ['iss']), ...(options.audience === undefined ? [] : ['aud'])],
    ...(options.issuer === undefined ? {} : { allowedIss: options.issuer }),
    ...(options.audience === undefined ? {} : { allowedAud: options.audience }),
    ...(options.clockTimestamp === undefined ? {} : { clockTimestamp: options.clockTimestamp })
  })
  const hs: KeyVerifier | undefined = options.secret === undefined ? undefined : { alg: 'HS256', verify: verifierFor(options.secret, 'HS256'), signed: signedBy(options.secret, 'HS256') }
  const hsByKid = new Map<string, KeyVerifier>([...options.secrets ?? []].map(([kid, secret]) => [kid, { alg: 'HS256', verify: verifierFor(secret, 'HS256'), signed: signedBy(secret, 'HS256') }]))
  const toVerifiers = (keys: ReadonlyMap<string, PublicKey>): Map<string, KeyVerifier> =>
    new Map([...keys].map(([kid, k]) => [kid, { alg: k.alg, verify: verifierFor(k.pem, k.alg), signed: signedBy(k.pem, k.alg) }]))
  // Verified identities by token. fast-jwt's own cache hashes every token (SHA-256) per call;
  // keyed by the token itself, a hit costs one map lookup. Failures are never cached (below).
  // Bounded in number and in bytes (IDENTITY_CACHE_BYTES): a token larger than the whole bound is not kept.
  const verified = new LRUCache<string, { identity: Identity, expiresAt: number }>({ max: options.cacheSize ?? 10000, maxSize: options.cacheBytes ?? IDENTITY_CACHE_BYTES, sizeCalculation: (v, token) => cachedSize(token, v.identity) })
  // A refusal is remembered for the one request it was made for, nothing longer: the rate-limit
  // guard, the route, each call of a batch, GraphQL document or tRPC batch, and the audit of a
  // refused request each asked again, a signature check each for a forged or expired token (a
  // batch of 50 calls made 51). Across requests nothing is kept: such a memo would be the
  // attacker's to fill, and would go on refusing a token that has become valid since (`nbf`).
  // Weak: an entry goes with its request. Only a refusal that holds for the rest of the request:
  // one made under other keys than those held now (a kid fetched since, a key replaced under its
  // kid) is checked again, and one for a token not valid yet (`nbf`) is never kept (a slow body
  // after the guard's check at the request's head; only a genuine token gets that far).
  // An unknown kid is never kept either (pick): no signature check to save, and a refetch to ask for.
  const refusals = new WeakMap<object, { token: string, keys: number, error: MantleError }>()
  const passing = new WeakSet<MantleError>()
  // The refusals of a kid not held: a JWKS fetch under way may bring it (keysFor).
  const unknownKids = new WeakSet<MantleError>()
  // Bumped each time the fetched keys change.
  let keysVersion = 0
  const configured = toVerifiers(options.publicKeys ?? new Map())
  let fetched = new Map<string, KeyVerifier>()
  let fetchedKeys: ReadonlyMap<string, PublicKey> = new Map()
  const jwks = options.jwksUrl === undefined
    ? undefined
    : new JwksFetcher({
      url: options.jwksUrl,
      refreshMs: options.jwksRefreshMs,
      minRefetchMs: options.jwksMinRefetchMs,
      timeoutMs: options.jwksTimeoutMs,
      now: options.jwksClock,
      log: options.log,
      onKeys: keys => {
        // A key kept (same kid, same PEM) keeps its verifier and its lease; a kid new or
        // replaced gets a new lease.
        const next = new Map<string, KeyVerifier>()
        for (const [kid, k] of keys) {
          const kept = fetchedKeys.get(kid)?.pem === k.pem ? fetched.get(kid) : undefined
          next.set(kid, kept ?? { alg: k.alg, verify: verifierFor(k.pem, k.alg), signed: signedBy(k.pem, k.alg), lease: new KeyLease(kid) })
        }
        // A kid withdrawn or replaced: identities verified with it are forgotten, and the
        // streams they opened end (their lease's listeners), once the new keys are in place.
        const withdrawn = [...fetched].filter(([kid, v]) => next.get(kid) !== v).map(([, v]) => v.lease as KeyLease)
        fetchedKeys = keys
        fetched = next
        keysVersion++
        if (withdrawn.length === 0) return
        verified.clear()
        for (const lease of withdrawn) {
          lease.withdraw(err => options.log?.warn({ err, kid: lease.kid }, 'a stream failed to end at its key\'s withdrawal'))
        }
        options.log?.info({ kids: withdrawn.map(l => l.kid) }, 'JWKS keys withdrawn or replaced: their identities are dropped and the streams they opened closed')
      }
    })

  const now = (): number => options.clockTimestamp ?? Date.now()

  const pick = (token: string): KeyVerifier => {
    const header = tokenHeader(token)
    if (header === undefined) throw refuse(reasons.FAST_JWT_MALFORMED as string)
    const { alg, kid } = header
    if (alg === 'HS256') {
      // With secrets by kid, a kid names one of them: never BFF_JWT_SECRET, nor a public key's kid.
      if (hsByKid.size > 0 && kid !== undefined) {
        if (typeof kid !== 'string' || kid === '') throw refuse('an HS256 token\'s key id (kid) must be a non-empty string')
        const key = hsByKid.get(kid)
        if (key === undefined) throw refuse(`unknown key id (kid) ${JSON.stringify(kid.slice(0, 64))}`)
        return key
      }
      if (hs === undefined) throw refuse(hsByKid.size > 0 ? 'an HS256 token needs a key id (kid)' : 'HS256 tokens are not accepted here')
      return hs
    }
    // Named only when it is a string: String() of {"toString": 1} threw (a 500 for any caller).
    if (alg !== 'RS256' && alg !== 'ES256') throw refuse(`the algorithm ${typeof alg === 'string' ? JSON.stringify(alg.slice(0, 32)) : `(a JSON ${alg === null ? 'null' : typeof alg})`} is not accepted`)
    if (typeof kid !== 'string' || kid === '') throw refuse(`an ${alg} token needs a key id (kid)`)
    const key = configured.get(kid) ?? fetched.get(kid)
    if (key === undefined) {
      jwks?.unknownKid()
      // Never kept (passing): it costs no signature check, and seen again it asks for a refetch
      // again. Kept, a request that outlives minRefetchMs (a GraphQL connection's upgrade, for
      // its life) refused a kid refused while a refetch had to wait, never asking again.
      const refusal = refuse(`unknown key id (kid) ${JSON.stringify(kid.slice(0, 64))}`)
      passing.add(refusal)
      unknownKids.add(refusal)
      throw refusal
    }
    if (key.alg !== alg) throw refuse(`the algorithm ${alg} does not match the key ${JSON.stringify(kid)} (${key.alg})`)
    return key
  }

  const check = (token: string): Identity => {
    const key = pick(token)
    // The signature spelt in canonical base64url only: its last character holds bits past the
    // signature's bytes (2 for HS256, 4 for RS256 and ES256), which the decoder ignores, so each
    // token had 4 to 16 spellings that all verified, each a new token to whatever is keyed by its
    // text (this verifier's cache: an entry and a signature check per spelling).
    if (!JWS_SHAPE.test(token)) throw refuse(reasons.FAST_JWT_MALFORMED as string)
    const dot = token.lastIndexOf('.')
    const signature = token.slice(dot + 1)
    if (Buffer.from(signature, 'base64url').toString('base64url') !== signature) throw refuse(reasons.FAST_JWT_INVALID_SIGNATURE as string)
    // The signature before anything of the payload is decoded: fast-jwt parses the payload first,
    // and a forged one of arrays nested deep cost anyone's request some 0.1 ms of CPU per KB (a
    // tRPC connectionParams or GraphQL connection_init of 1 MB, 120 ms of the event loop). A
    // genuine token is so checked twice, once: its identity is kept (verified, below).
    if (!key.signed(Buffer.from(token.slice(0, dot), 'latin1'), Buffer.from(signature, 'base64url'))) throw refuse(reasons.FAST_JWT_INVALID_SIGNATURE as string)
    let claims: Record<string, unknown>
    try {
      claims = key.verify(token)
    } catch (err) {
      const code = err instanceof TokenError ? err.code : ''
      const refusal = refuse(reasons[code] ?? 'it cannot be verified')
      if (code === 'FAST_JWT_INACTIVE') passing.add(refusal)
      throw refusal
    }
    return toIdentity(claims, toleranceMs, key.lease)
  }

  const identify = function identify (authorization: string | undefined, request?: object): Identity {
    if (authorization === undefined || authorization === '') throw new MantleError('UNAUTHENTICATED', 'A bearer token is required')
    if (authorization.length < 8 || authorization.slice(0, 7).toLowerCase() !== 'bearer ') {
      throw new MantleError('UNAUTHENTICATED', 'The Authorization header must be "Bearer <token>"', { headers: INVALID_REQUEST })
    }
    const token = authorization.slice(7).trim()
    const hit = verified.get(token)
    if (hit !== undefined) {
      if (now() < hit.expiresAt) return hit.identity
      verified.delete(token)
    }
    if (request === undefined) return remember(token, check(token))
    const refused = refusals.get(request)
    // The same error: the same problem the first refusal answered (MantleError is immutable).
    if (refused !== undefined && refused.token === token && refused.keys === keysVersion) throw refused.error
    let identity: Identity
    try {
      identity = check(token)
    } catch (err) {
      if (err instanceof MantleError && !passing.has(err)) refusals.set(request, { token, keys: keysVersion, error: err })
      throw err
    }
    return remember(token, identity)
  }
  const remember = (token: string, identity: Identity): Identity => {
    verified.set(token, { identity, expiresAt: identity.expiresAt })
    return identity
  }
  return Object.assign(identify, {
    start: async (): Promise<void> => { await jwks?.start() },
    close: (): void => { jwks?.close() },
    cached: (): number => verified.size,
    cachedBytes: (): number => verified.calculatedSize,
    hasKeys: (): boolean => hs !== undefined || hsByKid.size > 0 || configured.size > 0 || fetched.size > 0,
    keysFor: (refusal: unknown): Promise<void> | null => refusal instanceof MantleError && unknownKids.has(refusal) ? jwks?.inFlight ?? null : null
  })
}

// HEADER_SAFE, where it was: claims.ts, a module of its own that the manifest reads too.
export { HEADER_SAFE } from './claims.js'

function toIdentity (claims: Record<string, unknown>, toleranceMs: number, lease: KeyLease | undefined): Identity {
  const { sub, tid, roles = [], zone = 'public' } = claims
  if (typeof sub !== 'string' || sub === '' || typeof tid !== 'string' || tid === '') {
    throw refuse('sub and tid must be non-empty strings')
  }
  if (!HEADER_SAFE.test(sub) || !HEADER_SAFE.test(tid)) {
    throw refuse('sub and tid must be visible characters (they travel as x-user-id and x-tenant-id)')
  }
  // The tenant of calls without an accepted token (the audit trail's `public` / `anonymous`) and
  // of every call with identity off (ANONYMOUS): a token's calls under it could not be told
  // from those in GET /admin/audit?tenant=public.
  if (tid === ANONYMOUS.tenant) {
    throw refuse(`tid "${ANONYMOUS.tenant}" is reserved for calls without a token`)
  }
  if (!Array.isArray(roles) || !roles.every(r => typeof r === 'string')) {
    throw refuse('roles must be an array of strings')
  }
  if (!roles.every(carriesRole)) {
    throw refuse('each role must be visible characters without a comma (they travel as x-user-roles)')
  }
  if (typeof zone !== 'string' || !Object.hasOwn(ZONE_RANK, zone)) {
    throw refuse('zone must be public, internal or restricted')
  }
  // A NumericDate (RFC 7519) is seconds; JSON lets `1e400` through, which parses to Infinity: a
  // token valid for ever, kept in the cache for good, its sockets never closed at expiry.
  if (typeof claims.exp !== 'number' || !Number.isFinite(claims.exp)) {
    throw refuse('exp must be a finite number of seconds')
  }
  const identity = { tenant: tid, user: sub, roles: Object.freeze([...roles as string[]]), zone: zone as Zone, expiresAt: claims.exp * 1000 + toleranceMs }
  return Object.freeze(lease === undefined ? identity : { ...identity, lease })
}

export interface TokenClaims {
  tenant: string
  user: string
  roles?: string[]
  zone?: Zone
  ttlSeconds?: number
  issuer?: string | undefined
  audience?: string | undefined
  /** The `kid` of the token's header (a secret of BFF_JWT_SECRETS); none when absent. */
  kid?: string | undefined
}

/** Mints an HS256 token with the CONTRACT §2 claims (dev tokens, `npm run token`, tests). */
export function mintToken (secret: string, claims: TokenClaims): string {
  const sign = createSigner({
    key: secret,
    algorithm: 'HS256',
    expiresIn: (claims.ttlSeconds ?? 3600) * 1000,
    ...(claims.issuer === undefined ? {} : { iss: claims.issuer }),
    ...(claims.audience === undefined ? {} : { aud: claims.audience }),
    ...(claims.kid === undefined ? {} : { kid: claims.kid })
  })
  return sign({ sub: claims.user, tid: claims.tenant, roles: claims.roles ?? [], zone: claims.zone ?? 'public' })
}
