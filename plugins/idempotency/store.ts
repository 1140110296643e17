// What an idempotency store keeps per (tenant, op, key), and the interface both stores share.
import type { Finding, RiskLevel } from '../pipeline/index.js'

/**
 * A call with this key is running: `token` names the holder, `hash` the input it runs with,
 * `user` the user it runs for (see DoneRecord).
 */
export interface RunningRecord { readonly state: 'running', readonly hash: string, readonly token: string, readonly user?: string }

/**
 * The final outcome of the first call with a key, as the client saw it: a 2xx with its status and
 * the answer shaped by the op's output schema (JSON), or a definitive Kernel refusal.
 */
export interface DoneRecord {
  readonly state: 'done'
  readonly hash: string
  /**
   * The user the first call ran for (the token's `sub`): the Kernel made the answer for that user,
   * so only that user's repeats replay it. Absent in records of older versions (any user's then).
   */
  readonly user?: string
  readonly status: number
  /** The answer's JSON (2xx), or null for a refusal. */
  readonly body: string | null
  /** A definitive Kernel refusal (KERNEL_REJECTED, NOT_FOUND): code, status and detail. */
  readonly error: { code: 'KERNEL_REJECTED' | 'NOT_FOUND', status: number, detail: string } | null
  /**
   * The AI firewall's verdict on the first call's input (its risk level and findings: kinds and
   * field names, never what matched), for a replay's audit entry: absent when it found nothing.
   */
  readonly risk?: RiskLevel
  readonly findings?: readonly Finding[]
  /**
   * In the memory store only: the Redis claim (its token) of a call whose outcome Redis did not
   * take. The outcome is copied to Redis over that claim once Redis answers (see `seed`).
   */
  readonly heldAs?: string
}

export type IdempotencyRecord = RunningRecord | DoneRecord

/** A claim either wins the key (the caller runs the call) or finds what is there. */
export type Claim = { readonly won: true, readonly token: string } | { readonly won: false, readonly record: IdempotencyRecord }

/**
 * One store of idempotency records. Every method is atomic for its key. A store never runs a
 * call and never decides what is final: the stage does.
 */
export interface IdempotencyStore {
  readonly kind: 'memory' | 'redis'
  /**
   * Claims `key` for a call whose input hashes to `hash`, leased for `leaseMs` (after which a
   * crashed holder's claim lapses and another call may claim it), or returns the record there.
   */
  claim: (key: string, hash: string, leaseMs: number) => Promise<Claim>
  /** Stores the outcome for `ttlMs`, unless another call holds the key now. */
  complete: (key: string, token: string, record: DoneRecord, ttlMs: number) => Promise<void>
  /** Frees the key, if `token` still holds it, so that a retry runs again. */
  release: (key: string, token: string) => Promise<void>
}

/**
 * `bff:idem:{tenant}:{op}:{key}`. Op names cannot hold a colon (the manifest's name pattern) and
 * the tenant is URI-encoded, so no tenant's key can spell another tenant's.
 */
export function storeKey (tenant: string, op: string, key: string): string {
  return PREFIX + encodeURIComponent(tenant) + ':' + op + ':' + key
}

const PREFIX = 'bff:idem:'

/**
 * The Redis store's index of one tenant's records, `bff:idem:{tenant}` (a sorted set of
 * `{op}:{key}` scored by when each record expires), and the member `key` is in it. No record's key
 * is an index's: a record's has two more colons. Null for a key that is not a store key.
 */
export function tenantIndex (key: string): { index: string, member: string } | null {
  const end = key.startsWith(PREFIX) ? key.indexOf(':', PREFIX.length) : -1
  return end < 0 ? null : { index: key.slice(0, end), member: key.slice(end + 1) }
}

/** The tenant of a store key (still URI-encoded: one per tenant all the same), '' for another key. */
export function tenantOfKey (key: string): string {
  if (!key.startsWith(PREFIX)) return ''
  const end = key.indexOf(':', PREFIX.length)
  return end < 0 ? '' : key.slice(PREFIX.length, end)
}
