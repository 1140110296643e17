import { hash } from 'node:crypto'
import { canonicalJson } from '../pipeline/index.js'
import type { Operation } from '../../manifest.js'

// Key shapes. The tenant is URI-encoded so that it never contains ':' and a key always reads
// back as exactly one (op, tenant, input) or (tenant, tag): two tenants can never share a key.

export const KEY_PREFIX = 'bff:cache:'
/** Tag versions live beside the entries, under a prefix no operation name can produce. */
export const TAG_PREFIX = 'bff:cache-tag:'
/** The Redis channel invalidations travel on, to every instance's in-process tier. */
export const INVALIDATE_CHANNEL = 'bff:cache:invalidate'

/** `bff:cache:{op}:{tenant}:{hash of the canonical input}`. */
export function entryKey (op: string, tenant: string, input: unknown): string {
  return sharedKey(op, tenant, canonicalJson(input))
}

/**
 * What an op's cached answers are made under: its output schema, its Kernel call and its cache
 * policy (tags, scope, lifetimes), as a short hash. Entries made under another are not served:
 * during a rolling deploy that changed an output schema, the new version served the old one's
 * entries from Redis (a field it no longer declares included), and after a reload that changed
 * an op's tags, entries stored before it were checked against their old tags only.
 */
export function policyOf (op: Operation, spec: NonNullable<Operation['cache']>, defaultTtlSeconds: number): string {
  // The ttl in force, the instance's default (BFF_CACHE_TTL) for an op that sets none: instances
  // with other defaults made entries of one policy that lived for different times, and one
  // served the other's day-long entries as its own minute-long ones (an instance that lost an
  // invalidation read them back once its spell, as long as its own entries live, was over).
  // The same hash as before for an op that sets its ttl.
  const effective = spec.ttlSeconds === null ? { ...spec, ttlSeconds: defaultTtlSeconds } : spec
  return hash('sha256', canonicalJson([op.output, op.kernel, effective]), 'base64url').slice(0, 16)
}

/** The Redis key of an input already in canonical form (see entryKey). */
export function sharedKey (op: string, tenant: string, canonical: string): string {
  return KEY_PREFIX + op + ':' + encodeURIComponent(tenant) + ':' + hash('sha256', canonical, 'base64url')
}

/** Longest canonical input the in-process tier keys by as it is; a longer one is keyed by its hash. */
export const LOCAL_KEY_MAX_INPUT = 256

/**
 * The in-process tier's key: `{op}:{tenant}:{canonical input}`, the same shape as the shared key
 * with the input itself in place of its hash (which costs a hit 1.5 to 2 µs), so that a short
 * key stays short. A longer input is keyed by the shared key, so an entry's key stays bounded.
 */
export function localKey (op: string, tenant: string, canonical: string): string {
  if (canonical.length > LOCAL_KEY_MAX_INPUT) return sharedKey(op, tenant, canonical)
  return op + ':' + encodeURIComponent(tenant) + ':' + canonical
}

/** Longest tag a tag key holds as it is; a longer one is keyed by its hash (see tagKey). */
export const TAG_KEY_MAX = 256

/**
 * The key of one tenant's tag: the version every entry tagged with it was stored under. A tag
 * longer than TAG_KEY_MAX (its `{x}` filled from a long input) is keyed by `#` and its SHA-256:
 * kept as it was, a read with a 1 MB id (a GraphQL POST) wrote a 1 MB tag key to Redis for the
 * tag's lifetime (minutes), even when the Kernel refused the call, and each entry, tag mark and
 * known version held it in memory uncounted by BFF_CACHE_MAX_BYTES.
 */
export function tagKey (tenant: string, tag: string): string {
  return TAG_PREFIX + encodeURIComponent(tenant) + ':' + (tag.length > TAG_KEY_MAX ? '#' + hash('sha256', tag, 'base64url') : tag)
}

/**
 * A manifest tag such as `agent:{id}`, compiled once: `{x}` is filled from the call's input
 * (an absent value fills as the empty string, an object or array as its canonical JSON).
 */
export function tagTemplate (template: string): (input: Record<string, unknown>) => string {
  const parts = template.split(/\{([^}]*)\}/) // even indexes: literal text, odd: input names
  if (parts.length === 1) return () => template
  return (input) => {
    let out = parts[0]
    for (let i = 1; i < parts.length; i += 2) {
      // The input's own field only: a REST query's input (the query string's) has no prototype,
      // a JSON body's has Object's, and a field named as one of its members (`constructor`,
      // `toString`) absent filled '' for the one and that member's source for the other, so a
      // mutation sent with a body never dropped the entry a GET had stored under it.
      const v = Object.hasOwn(input, parts[i]) ? input[parts[i]] : undefined
      // An object or array fills as its canonical JSON: String() made "[object Object]" of every
      // object (one tag for all), and threw for {"toString": 1} (a 500, after the Kernel had
      // carried a mutation out, with nothing invalidated).
      out += (v === undefined || v === null ? '' : typeof v === 'object' ? canonicalJson(v) : String(v)) + parts[i + 1]
    }
    return out
  }
}

/**
 * A weak ETag of an answer's JSON. Weak because the tag names the answer, not its bytes: with
 * compression on, the same answer goes out as br, gzip or plain, and a strong tag must differ
 * between such representations (RFC 9110 §8.8.3). If-None-Match compares weakly anyway.
 */
export function etagOf (json: string): string {
  return 'W/"' + hash('sha256', json, 'base64url').slice(0, 27) + '"'
}

/**
 * Whether a REST call of `op` reads If-None-Match: a query over GET (and HEAD, served by GET's
 * route). To any other method a matching If-None-Match is a 412, not a 304 (RFC 9110 §13.1.2),
 * so a cached query over POST reads none, and its answer carries no ETag (it could never give a
 * 304). The REST adapter and the cache both ask this.
 */
export function takesIfNoneMatch (op: Pick<Operation, 'type' | 'method'>): boolean {
  return op.type === 'query' && op.method === 'GET'
}

/** RFC 9110 If-None-Match: `*` or a list of tags, compared weakly (a `W/` prefix is ignored). */
export function matchesIfNoneMatch (header: string, etag: string): boolean {
  const opaque = etag.startsWith('W/') ? etag.slice(2) : etag
  for (const part of header.split(',')) {
    const candidate = part.trim()
    if (candidate === '*' || candidate === opaque || (candidate.startsWith('W/') && candidate.slice(2) === opaque)) return true
  }
  return false
}
