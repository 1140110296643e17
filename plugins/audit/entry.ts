import { hash } from 'node:crypto'
import { canonicalJson, type Protocol, type RiskLevel } from '../pipeline/index.js'

/** What kind of call an entry records (README, "Audit trail"). */
export type Category = 'read' | 'write' | 'auth' | 'admin' | 'security'

/**
 * One audit entry as the gateway builds it for a call: who, what, how it ended. Never the
 * call's input or output, never a token.
 */
export interface AuditEntry {
  /** uuid, made by the gateway: the identity replay deduplicates on. */
  id: string
  requestId: string
  /** When the call started, ms since the epoch. */
  timestamp: number
  tenantId: string
  userId: string
  /** The HTTP method where the face fixes it (REST, batch); null on tRPC, GraphQL, WebSocket. */
  method: string | null
  /** The route template or the face's endpoint, never a concrete URL with input in it. */
  path: string | null
  protocol: Protocol | 'http'
  /** The operation's name (admin.* for the gateway's own endpoints). */
  action: string
  category: Category
  riskLevel: RiskLevel
  /** `ok` or the contract error code. */
  status: string
  statusCode: number
  durationMs: number
  /** cache outcome, firewall finding kinds, idempotent replay: only the keys that apply. */
  metadata: Record<string, unknown>
}

/** An entry as stored: its place in the chain and its hashes. */
export interface StoredEntry extends AuditEntry {
  seq: number
  hash: string
  previousHash: string
}

/** The previous hash of the first entry ever written. */
export const GENESIS = '0'.repeat(64)

/** An identity refusal (401 UNAUTHENTICATED, 403 FORBIDDEN): category `auth`, on any endpoint. */
export function refusedIdentity (code: string | null): boolean {
  return code === 'UNAUTHENTICATED' || code === 'FORBIDDEN'
}

/**
 * Identity refusals are `auth`, the firewall's blocks, rate limits and high-risk input are
 * `security`; every other call is `read` (query) or `write` (mutation).
 */
export function categoryOf (type: 'query' | 'mutation', code: string | null, risk: RiskLevel): Category {
  if (refusedIdentity(code)) return 'auth'
  if (code === 'FIREWALL_BLOCKED' || code === 'RATE_LIMITED' || risk === 'high' || risk === 'critical') return 'security'
  return type === 'query' ? 'read' : 'write'
}

// The second of the last timestamp formatted, and its ISO 8601 text up to the milliseconds.
let isoSecond = Number.NaN
let isoPrefix = ''
// Years 0000 to 9999: toISOString's fixed-width form, which the prefix reuse relies on.
const ISO_FIXED_MAX = 253402300800000

/**
 * `new Date(ms).toISOString()`, for the entries' timestamps: the text up to the second is reused
 * while the second is the same (the entries of a batch nearly always share it), which costs a
 * tenth of formatting a Date each time. Identical to toISOString for every value.
 */
export function isoTime (ms: number): string {
  if (!Number.isInteger(ms) || ms < 0 || ms >= ISO_FIXED_MAX) return new Date(ms).toISOString()
  const frac = ms % 1000
  const second = ms - frac
  if (second !== isoSecond) {
    isoPrefix = new Date(second).toISOString().slice(0, 20)
    isoSecond = second
  }
  return isoPrefix + (frac < 10 ? '00' : frac < 100 ? '0' : '') + frac + 'Z'
}

/**
 * hash = SHA-256(previous hash, "\n", the canonical encoding of every stored field in a fixed
 * order, the chain position included): a changed field, a changed position or a changed link
 * each changes it. `iso` is the entry's timestamp as isoTime gives it, when the caller has it.
 */
export function hashEntry (previousHash: string, seq: number, e: AuditEntry, iso = isoTime(e.timestamp)): string {
  const fields = [seq, e.id, e.requestId, iso, e.tenantId, e.userId, e.method, e.path,
    e.protocol, e.action, e.category, e.riskLevel, e.status, e.statusCode, e.durationMs, canonicalJson(e.metadata)]
  let text = JSON.stringify(fields)
  // Each text as a UTF-8 column stores it: a lone surrogate (it has no UTF-8 form) as U+FFFD, so
  // that the hash recomputed from the stored row is the same; before, verify reported such an
  // entry as changed. JSON.stringify writes a lone surrogate as \udXXX: only a text holding
  // "\ud" is looked at again (a backslash before "ud" as well, which changes nothing).
  if (text.includes('\\ud')) text = JSON.stringify(fields.map(f => typeof f === 'string' ? f.toWellFormed() : f))
  return hash('sha256', previousHash + '\n' + text, 'hex')
}

// ES2024's String#toWellFormed: Node 20 has it, the project's lib is ES2023.
declare global {
  interface String {
    toWellFormed: () => string
  }
}

/**
 * The entry as stored at `seq` after `previousHash` (under `requestId`, its own or suffixed), its
 * hash computed. One object literal: spreading the entry and overriding its request id made V8
 * copy it property by property (6 µs an entry; this costs 0.2 µs besides the hash).
 */
export function storedEntry (e: AuditEntry, requestId: string, seq: number, previousHash: string): StoredEntry {
  const stored: StoredEntry = {
    id: e.id,
    requestId,
    timestamp: e.timestamp,
    tenantId: e.tenantId,
    userId: e.userId,
    method: e.method,
    path: e.path,
    protocol: e.protocol,
    action: e.action,
    category: e.category,
    riskLevel: e.riskLevel,
    status: e.status,
    statusCode: e.statusCode,
    durationMs: e.durationMs,
    metadata: e.metadata,
    seq,
    hash: '',
    previousHash
  }
  stored.hash = hashEntry(previousHash, seq, stored)
  return stored
}

export interface VerifyResult {
  ok: boolean
  checked: number
  firstBroken: { id: string, requestId: string } | null
}

/** An entry as verify names it. */
type Named = Pick<StoredEntry, 'id' | 'requestId'>

/** Whether an entry's fields hash to its stored hash, and the store saw the row intact. */
function sealed (e: StoredEntry, intact: boolean): boolean {
  return intact && hashEntry(e.previousHash, e.seq, e) === e.hash
}

/**
 * Walks entries in chain order from an anchor (the hash the first one must link to, and its
 * position). Stops at the first entry whose position, link or hash is wrong.
 */
export class ChainWalker {
  checked = 0
  private ok = true
  private broken: Named | null = null
  /** From an anchor with no entry of its own: retention's, or the genesis. */
  constructor (private prevSeq: number, private prevHash: string, private last: Named | null = null) {}

  /**
   * From the entry just before a range, which the range's first entry links to: its own hash is
   * checked too. A row changed together with its timestamp, moved just out of the range, became
   * this neighbour, and a range verify walking from its stored hash said ok.
   */
  static after (before: StoredEntry, intact = true): ChainWalker {
    const walker = new ChainWalker(before.seq, before.hash, before)
    if (!sealed(before, intact)) walker.fail(before)
    return walker
  }

  /**
   * Returns false once the chain is broken. `intact` is false when the store itself sees that the
   * row was changed in a way the hash cannot show (a timestamp finer than the millisecond hashed).
   */
  step (e: StoredEntry, intact = true): boolean {
    if (!this.ok) return false
    this.checked++
    if (!this.follows(e, intact)) {
      this.fail(e)
      return false
    }
    this.prevSeq = e.seq
    this.prevHash = e.hash
    this.last = e
    return true
  }

  /**
   * Where the range ends: the entry after it (`next`, null for none) must link to the last one
   * walked, and with none after it, that one must be the head the writers recorded. Rows removed
   * at the end of a range, or the whole range, or the tail, show here: at the entry after the gap,
   * or at the last entry left (none when no entry is left: ok false, firstBroken null). Before,
   * only a range reaching the newest entry was held to the head, and an empty range was ok.
   * The entry after the range is held to its own hash as well (see `after`).
   */
  endsAt (next: StoredEntry | null, headSeq: number, headHash: string, nextIntact = true): void {
    if (!this.ok) return
    if (next !== null) {
      if (!this.follows(next, nextIntact)) this.fail(next)
    } else if (this.prevSeq !== headSeq || this.prevHash !== headHash) {
      this.fail(this.last)
    }
  }

  result (): VerifyResult {
    return { ok: this.ok, checked: this.checked, firstBroken: this.broken }
  }

  /** Whether `e` comes right after the last entry walked, linked to it, and is what its hash says. */
  private follows (e: StoredEntry, intact: boolean): boolean {
    return e.seq === this.prevSeq + 1 && e.previousHash === this.prevHash && sealed(e, intact)
  }

  private fail (e: Named | null): void {
    this.ok = false
    this.broken = e === null ? null : { id: e.id, requestId: e.requestId }
  }
}

export interface AuditQuery {
  tenant?: string
  from?: Date
  to?: Date
  requestId?: string
  action?: string
  status?: string
  limit: number
  /** Entries older (lower seq) than this position; from an opaque cursor. */
  beforeSeq?: number
}

export interface AuditPage { entries: StoredEntry[], nextSeq: number | null }

export interface AuditStore {
  readonly kind: 'memory' | 'postgres'
  /**
   * Chains and stores a batch in order; an entry whose id is already stored is skipped. Resolves
   * to the entries it stored (those skipped not counted: the metrics count each entry once).
   */
  write: (batch: AuditEntry[]) => Promise<number>
  /**
   * Whether an error `write` threw is about the batch's own data: another batch would be stored,
   * so the writer isolates the entries refused rather than spooling everything after them (an
   * error it does not refuse is the store being away). A store that cannot fail needs none.
   */
  refuses?: (err: unknown) => boolean
  verify: (range: { from?: Date, to?: Date }) => Promise<VerifyResult>
  query: (q: AuditQuery) => Promise<AuditPage>
  /** Removes up to `limit` of the oldest entries before `before`; returns how many. */
  prune: (before: Date, limit: number) => Promise<number>
  close: () => Promise<void>
}

/** The request id an entry is stored under when its own is taken: `~` never occurs in a client's. */
export const suffixed = (e: AuditEntry): string => `${e.requestId}~${e.id}`
