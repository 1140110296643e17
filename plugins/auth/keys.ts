import { X509Certificate, createPublicKey, type KeyObject, type JsonWebKey } from 'node:crypto'
import { request } from 'undici'
import { INVALID, readJson } from '../../read-json.js'

/** The largest JWKS document read. */
export const JWKS_MAX_BYTES = 1024 * 1024

/** The asymmetric algorithms accepted, each bound to one kind of key. */
export type KeyAlgorithm = 'RS256' | 'ES256'

export interface PublicKey {
  readonly alg: KeyAlgorithm
  /** SPKI PEM, what fast-jwt verifies with. */
  readonly pem: string
}

/**
 * The shortest RSA modulus accepted, in bits (RFC 7518 §3.3 for RS256; NIST SP 800-131A). A
 * shorter key was taken as RS256, in production too: a 512-bit one is factored cheaply, and
 * whoever factors it signs tokens with any role.
 */
const MIN_RSA_BITS = 2048

/** The algorithm a public key signs with: RS256 for RSA, ES256 for EC P-256; undefined otherwise. */
export function keyAlgorithm (key: KeyObject): KeyAlgorithm | undefined {
  if (key.type !== 'public') return undefined
  if (key.asymmetricKeyType === 'rsa') return 'RS256'
  if (key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'prime256v1') return 'ES256'
  return undefined
}

/** The key as fast-jwt verifies with it, or why it cannot be used. */
function toPublicKey (key: KeyObject): PublicKey | string {
  const alg = keyAlgorithm(key)
  if (alg === undefined) return 'is neither RSA nor EC P-256'
  if (alg === 'RS256' && !((key.asymmetricKeyDetails?.modulusLength ?? 0) >= MIN_RSA_BITS)) return `is an RSA key shorter than ${MIN_RSA_BITS} bits`
  return { alg, pem: key.export({ type: 'spki', format: 'pem' }).toString() }
}

/** Base64 of a DER key: at least a P-256 SPKI's 91 bytes, lines allowed (a PEM's body). */
const BARE_BASE64 = /^[A-Za-z0-9+/\s]{120,}={0,2}$/

/**
 * Whether `text` is an RSA or EC key rather than a shared secret: a PEM (public key, PKCS#1,
 * certificate, private key), the bare base64 of a DER public key or certificate (a PEM's body, as
 * Keycloak's realm settings show its key and certificate), or a JWK or JWKS of one. Given as the HS256 secret, a public key
 * is a secret anyone holding it has: whoever fetches the IdP's key signs HS256 tokens of any
 * tenant and role (algorithm confusion, by configuration).
 */
export function isAsymmetricKey (text: string): boolean {
  const parses = (key: Parameters<typeof createPublicKey>[0]): boolean => {
    try {
      createPublicKey(key)
      return true
    } catch {
      return false
    }
  }
  if (text.includes('-----BEGIN ')) return parses(text)
  const trimmed = text.trim()
  if (BARE_BASE64.test(trimmed)) {
    const der = Buffer.from(trimmed.replace(/\s/g, ''), 'base64')
    if (parses({ key: der, format: 'der', type: 'spki' }) || parses({ key: der, format: 'der', type: 'pkcs1' })) return true
    try {
      return new X509Certificate(der).publicKey.type === 'public'
    } catch {
      return false
    }
  }
  if (!trimmed.startsWith('{')) return false
  let parsed: unknown
  try {
    parsed = JSON.parse(trimmed)
  } catch {
    return false
  }
  const set = (parsed as { keys?: unknown } | null)?.keys
  const jwks = Array.isArray(set) ? set as unknown[] : [parsed]
  return jwks.some(jwk => jwk !== null && typeof jwk === 'object' && (jwk as { kty?: unknown }).kty !== 'oct' && parses({ key: jwk as JsonWebKey, format: 'jwk' }))
}

/** Why BFF_JWT_SECRET cannot be a key (isAsymmetricKey), in the configuration's and the verifier's refusal. */
export const SECRET_IS_A_KEY = 'it is an RSA or EC key (a PEM, its bare base64, or a JWK), and HS256 keyed with a public key takes tokens anyone holding that public key signs: put public keys in BFF_JWT_PUBLIC_KEYS ({"<kid>": "<PEM public key>"}) or give BFF_JWKS_URL'

/** The entries of `variable`'s JSON object of kid to `what`; throws an Error naming it when the text is no such object. */
function kidEntries (text: string, variable: string, what: string): Array<[string, unknown]> {
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch {
    throw new Error(`${variable} is not valid JSON: expected {"<kid>": "${what}", ...}`)
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new Error(`${variable} must be a JSON object {"<kid>": "${what}", ...}`)
  }
  return Object.entries(parsed)
}

/**
 * Parses BFF_JWT_PUBLIC_KEYS: a JSON object of kid to PEM public key (RSA or EC P-256).
 * Throws an Error naming the variable and the bad kid, or saying it holds no key: `{}` started a
 * gateway that refused every token (401 on every call, /readyz ready) with no word at start-up.
 */
export function parsePublicKeys (text: string): Map<string, PublicKey> {
  const keys = new Map<string, PublicKey>()
  for (const [kid, pem] of kidEntries(text, 'BFF_JWT_PUBLIC_KEYS', '<PEM public key>')) {
    if (kid === '' || typeof pem !== 'string' || !pem.includes('-----BEGIN PUBLIC KEY-----')) {
      throw new Error(`BFF_JWT_PUBLIC_KEYS: the key ${JSON.stringify(kid)} is not a PEM public key`)
    }
    let key: PublicKey | string
    try {
      key = toPublicKey(createPublicKey(pem))
    } catch {
      throw new Error(`BFF_JWT_PUBLIC_KEYS: the key ${JSON.stringify(kid)} is not a valid PEM public key`)
    }
    if (typeof key === 'string') throw new Error(`BFF_JWT_PUBLIC_KEYS: the key ${JSON.stringify(kid)} ${key}`)
    keys.set(kid, key)
  }
  if (keys.size === 0) throw new Error('BFF_JWT_PUBLIC_KEYS holds no key: expected {"<kid>": "<PEM public key>", ...}')
  return keys
}

/**
 * Parses BFF_JWT_SECRETS: a JSON object of kid to HS256 secret, several at once so that a shared
 * secret is rotated without a window of 401s (issuers and gateway pods move to the new kid one by
 * one). Throws an Error naming the variable and the bad kid, never a secret; each secret is
 * refused as BFF_JWT_SECRET is when it is an RSA or EC key (isAsymmetricKey).
 */
export function parseSecrets (text: string): Map<string, string> {
  const secrets = new Map<string, string>()
  for (const [kid, secret] of kidEntries(text, 'BFF_JWT_SECRETS', '<HS256 secret>')) {
    if (kid === '' || typeof secret !== 'string' || secret === '') {
      throw new Error(`BFF_JWT_SECRETS: the secret ${JSON.stringify(kid)} is not a non-empty string`)
    }
    if (isAsymmetricKey(secret)) throw new Error(`BFF_JWT_SECRETS: the secret ${JSON.stringify(kid)} cannot be an HS256 secret: ${SECRET_IS_A_KEY}`)
    secrets.set(kid, secret)
  }
  if (secrets.size === 0) throw new Error('BFF_JWT_SECRETS holds no secret: expected {"<kid>": "<HS256 secret>", ...}')
  return secrets
}

/**
 * The signing keys of a JWKS document: RSA (of MIN_RSA_BITS or more) and EC P-256 keys with
 * `use: sig` or no use, and `key_ops` holding `verify` or none, by kid.
 */
export function keysOfJwks (doc: unknown): Map<string, PublicKey> {
  const keys = new Map<string, PublicKey>()
  const list = (doc as { keys?: unknown } | null)?.keys
  if (!Array.isArray(list)) throw new Error('the JWKS document has no "keys" array')
  for (const jwk of list as Array<Record<string, unknown>>) {
    if (jwk === null || typeof jwk !== 'object' || typeof jwk.kid !== 'string' || jwk.kid === '') continue
    if (jwk.use !== undefined && jwk.use !== 'sig') continue
    // key_ops (RFC 7517 §4.3) as use: a key not for `verify` (an encryption key with no use and no
    // alg) is another protocol's, and was taken for checking signatures.
    if (jwk.key_ops !== undefined && !(Array.isArray(jwk.key_ops) && jwk.key_ops.includes('verify'))) continue
    if (jwk.kty !== 'RSA' && !(jwk.kty === 'EC' && jwk.crv === 'P-256')) continue
    let key: PublicKey | string
    try {
      key = toPublicKey(createPublicKey({ key: jwk as JsonWebKey, format: 'jwk' }))
    } catch {
      continue
    }
    if (typeof key === 'string' || (jwk.alg !== undefined && jwk.alg !== key.alg)) continue
    keys.set(jwk.kid, key)
  }
  return keys
}

interface Log { info: (obj: object, msg: string) => void, warn: (obj: object, msg: string) => void }

export interface JwksOptions {
  url: string
  /** Background refresh period (ms). */
  refreshMs?: number | undefined
  /** Least time between two fetches triggered by an unknown kid (ms). */
  minRefetchMs?: number | undefined
  /** Longest a fetch may take, connecting and reading included (ms; default 5 s). */
  timeoutMs?: number | undefined
  /**
   * The clock of the refetch interval, ms (tests move it by hand). By default performance.now():
   * an interval, not a time of day; on the wall clock, one stepped back an hour after a fetch
   * refused every refetch of an unknown kid until the next background refresh.
   */
  now?: (() => number) | undefined
  /** Called with every new key set (to build verifiers once per key). */
  onKeys: (keys: Map<string, PublicKey>) => void
  log?: Log | undefined
}

/**
 * Keeps the keys of a JWKS URL: fetched at start, refreshed in the background, re-fetched on
 * an unknown kid at most once per `minRefetchMs`. A failed fetch keeps the last good keys.
 */
export class JwksFetcher {
  #options: JwksOptions
  #timer: NodeJS.Timeout | null = null
  #lastFetch = -Infinity
  #inFlight: Promise<void> | null = null
  #closed = false

  constructor (options: JwksOptions) {
    this.#options = options
  }

  /** First fetch (never throws) and the background refresh. */
  async start (): Promise<void> {
    await this.fetch()
    if (this.#closed) return
    this.#timer = setInterval(() => { this.fetch().catch(() => {}) }, this.#options.refreshMs ?? 10 * 60_000)
    this.#timer.unref()
  }

  /** An unknown kid was seen: re-fetch, unless a fetch started less than minRefetchMs ago. */
  unknownKid (): void {
    if (this.#closed || this.#inFlight !== null) return
    if ((this.#options.now?.() ?? performance.now()) - this.#lastFetch < (this.#options.minRefetchMs ?? 30_000)) return
    this.fetch().catch(() => {})
  }

  /** The fetch under way, if any: a kid it may bring is worth waiting for (tokenFirst). */
  get inFlight (): Promise<void> | null {
    return this.#inFlight
  }

  fetch (): Promise<void> {
    if (this.#inFlight !== null) return this.#inFlight
    this.#lastFetch = (this.#options.now?.() ?? performance.now())
    this.#inFlight = this.#load().finally(() => { this.#inFlight = null })
    return this.#inFlight
  }

  async #load (): Promise<void> {
    const { url, log } = this.#options
    try {
      // One deadline for the whole fetch: undici's own timeouts leave connecting to 10 s and a
      // body that trickles in to never time out. A JWKS host that dropped packets then held
      // start-up past Fastify's plugin timeout (the gateway did not start), and a fetch in
      // flight for ever held every later refresh and refetch (rotated keys never arrived).
      // undici acts on the signal only once it has a connection: the race bounds connecting too.
      const signal = AbortSignal.timeout(this.#options.timeoutMs ?? 5000)
      const pending = request(url, { signal, headers: { accept: 'application/json' } })
      let res: Awaited<typeof pending>
      try {
        res = await Promise.race([pending, new Promise<never>((_resolve, reject) => { signal.addEventListener('abort', () => { reject(new Error(`no answer within ${this.#options.timeoutMs ?? 5000} ms`)) }, { once: true }) })])
      } catch (err) {
        pending.then(late => { late.body.destroy() }, () => {})
        throw err
      }
      if (res.statusCode !== 200) {
        await res.body.dump()
        throw new Error(`status ${res.statusCode}`)
      }
      // Bounded: read whole, a JWKS host that answered gigabytes within the deadline took the
      // gateway's memory (a JWKS is a few KB; an x5c chain a key adds 1-2 KB).
      const jwks = await readJson(res, JWKS_MAX_BYTES)
      if (jwks === INVALID) throw new Error(`the JWKS is not JSON or is over ${JWKS_MAX_BYTES} bytes`)
      const keys = keysOfJwks(jwks)
      // As a key set with no key is in BFF_JWT_PUBLIC_KEYS: taken, it dropped every key at an
      // info line, and every call was 401 until a later fetch found keys again.
      if (keys.size === 0) throw new Error(`the JWKS holds no usable signing key (RSA of ${MIN_RSA_BITS} bits or more, or EC P-256, with a kid)`)
      if (this.#closed) return
      this.#options.onKeys(keys)
      log?.info({ url: shownUrl(url), kids: [...keys.keys()] }, 'JWKS keys loaded')
    } catch (err) {
      log?.warn({ url: shownUrl(url), err: (err as Error).message }, 'the JWKS could not be fetched or used: keeping the last good keys')
    }
  }

  close (): void {
    this.#closed = true
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
  }
}

/** A URL as the logs show it: without credentials, in its user part or its query. */
function shownUrl (url: string): string {
  try {
    const u = new URL(url)
    return u.origin + u.pathname
  } catch {
    return '(a URL that does not parse)'
  }
}
