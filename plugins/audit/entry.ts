import { hash } from 'node:crypto'
import { setImmediate as nextTurn } from 'node:timers/promises'
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
  /**
   * `requestId` is (or derives from) the client's own x-request-id, which may be taken already:
   * the store looks it up before its INSERT. Neither stored nor hashed; absent (an entry spooled
   * by an earlier version): as false, a taken id is then found by the INSERT's unique index.
   */
  clientRequestId?: boolean
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

// ES2024's String#toWellFormed and #isWellFormed: Node 20 has them, the project's lib is ES2023.
declare global {
  interface String {
    toWellFormed: () => string
    isWellFormed: () => boolean
  }
}

/** Whether PostgreSQL's text and jsonb can hold `s`: no U+0000, no lone surrogate. */
const storable = (s: string): boolean => s.isWellFormed() && !s.includes('\u0000')
/** `s` with each U+0000 and each lone surrogate as U+FFFD. */
const repaired = (s: string): string => s.toWellFormed().replaceAll('\u0000', '\uFFFD')

/** Whether every text in a metadata value (keys included) is storable. */
function storableValue (v: unknown): boolean {
  if (typeof v === 'string') return storable(v)
  if (typeof v !== 'object' || v === null) return true
  if (Array.isArray(v)) return v.every(storableValue)
  for (const k in v) {
    if (!storable(k) || !storableValue((v as Record<string, unknown>)[k])) return false
  }
  return true
}

function repairedValue (v: unknown): unknown {
  if (typeof v === 'string') return repaired(v)
  if (typeof v !== 'object' || v === null) return v
  if (Array.isArray(v)) return v.map(repairedValue)
  const out: Record<string, unknown> = {}
  for (const k in v) out[repaired(k)] = repairedValue((v as Record<string, unknown>)[k])
  return out
}

/**
 * The entry as PostgreSQL's text and jsonb can hold it: each U+0000 and each lone surrogate of
 * its texts (metadata keys and values included) as U+FFFD. Every entry the gateway makes passes
 * here before it is queued, so that its hash is computed over what is stored. Before, an entry
 * whose metadata held a client's NUL or lone surrogate (a tag of an invalidation, the tenant of a
 * published event) was refused by jsonb and quarantined: the call had run, and the trail showed
 * nothing. The entry itself when nothing needs repair (nearly always: a check, no copy).
 */
export function storableEntry (e: AuditEntry): AuditEntry {
  const texts = storable(e.requestId) && storable(e.tenantId) && storable(e.userId) && (e.method === null || storable(e.method)) &&
    (e.path === null || storable(e.path)) && storable(e.action) && storable(e.status)
  if (texts && storableValue(e.metadata)) return e
  return {
    ...e,
    requestId: repaired(e.requestId),
    tenantId: repaired(e.tenantId),
    userId: repaired(e.userId),
    method: e.method === null ? null : repaired(e.method),
    path: e.path === null ? null : repaired(e.path),
    action: repaired(e.action),
    status: repaired(e.status),
    metadata: repairedValue(e.metadata) as Record<string, unknown>
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
  /** Entries this call walked. */
  checked: number
  firstBroken: { id: string, requestId: string } | null
  /** Only when the call stopped at its bound with nothing broken so far: where the next call goes on. */
  next?: VerifyCursor
  /** With `next`: the position of the last entry this call walked. */
  through?: number
  /** Only when some: entries of the range that retention removed before the walk reached them. */
  skipped?: number
}

/**
 * Where a verify stopped at its bound: the position of the next entry to walk, the hash it must
 * link to (the last entry walked), and the position the range ends at. The resumed walk starts
 * from that hash, so the link at the seam is checked as in one walk.
 */
export interface VerifyCursor { seq: number, hash: string, end: number }

export interface VerifyOptions {
  /** Most entries one call walks (at most VERIFY_MAX_ENTRIES, the default). */
  limit?: number
  /** Goes on where an earlier call stopped (its range with it). */
  next?: VerifyCursor
  /** The walk stops, rejecting with the signal's reason, when it aborts (the client left). */
  signal?: AbortSignal
}

/** Most entries one verify call walks. */
export const VERIFY_MAX_ENTRIES = 100_000
/**
 * A verify call stops at its first page after this long (ms), half the reads' timeout: a walk of
 * a large table held one connection, and one snapshot, for hours. Timed on the monotonic clock
 * (performance.now()): on the wall clock, a step (an NTP correction) cut a walk short or let it
 * run past its bound.
 */
export const VERIFY_MAX_MS = 5_000
/**
 * Entries one page reads (PostgreSQL: one statement) and hashes between two turns of the event
 * loop (a few ms): in one piece, a memory verify of 100,000 entries held every other request for 205 ms.
 */
export const VERIFY_PAGE = 2_000

/** A row as a store gives it to the walk: `intact` false when the store sees it was changed (see step). */
export interface WalkedRow { e: StoredEntry, intact: boolean }

/**
 * What a store gives `walkChain`; each answer is read in one snapshot of its own, none held
 * between them. Entries are appended in position order and only ever removed from the oldest
 * end (retention), so each page read later still holds every entry the range had.
 */
export interface ChainSource {
  /**
   * Up to `n` entries after position `after`, up to `end`, in order, and the retention anchor
   * read in the same snapshot (the entries of the page all come after it).
   */
  page: (after: number, end: number, n: number) => Promise<{ anchorSeq: number, anchorHash: string, rows: WalkedRow[] }>
  /** The first entry after `after` (null for none), the chain head and the retention anchor, in one snapshot. */
  tail: (after: number) => Promise<{ next: WalkedRow | null, headSeq: number, headHash: string, anchorSeq: number, anchorHash: string }>
  /** The entry at `seq`, or null. */
  at: (seq: number) => Promise<WalkedRow | null>
}

/** Where a walk of a range starts: its walker, the position before its first entry, its last, and the retention anchor then. */
export interface WalkStart { walker: ChainWalker, after: number, end: number, anchorSeq: number }

/**
 * The walk of a verify call, shared by the stores: from `start` (the walker anchored before the
 * range, and the position before its first entry) up to `end`, or from a cursor an earlier call
 * answered; at most `limit` entries and VERIFY_MAX_MS, page by page. Entries retention removed
 * before the walk reached them are skipped: it goes on from the new anchor, as a walk begun then
 * would, and says how many.
 */
export async function walkChain (source: ChainSource, start: () => Promise<WalkStart>, opts: VerifyOptions = {}): Promise<VerifyResult> {
  const limit = Math.min(opts.limit ?? VERIFY_MAX_ENTRIES, VERIFY_MAX_ENTRIES)
  const deadline = performance.now() + VERIFY_MAX_MS
  const signal = opts.signal
  let walker: ChainWalker
  let after: number
  let end: number
  let seamGone = false
  // The retention anchor the walk knows of: entries up to it were removed before the walk began,
  // and are not counted as skipped by it.
  let known = -Infinity
  if (opts.next === undefined) {
    ({ walker, after, end, anchorSeq: known } = await start())
  } else {
    const c = opts.next
    after = c.seq - 1
    end = c.end
    // The next entry must link to the hash the last call walked up to. That entry is read again
    // for the name of a deleted tail, as in one walk, and held to its own hash (changed since,
    // it is broken now: reported there, or at the next entry, whose link no longer matches).
    const last = await source.at(after)
    walker = last === null ? new ChainWalker(after, c.hash) : ChainWalker.after(last.e, last.intact)
    if (last !== null && last.e.hash !== c.hash) walker.fail(last.e)
    // Gone since, and not by retention (see below): reported at the entry after it, as one walk would.
    seamGone = last === null
  }
  let skipped = 0
  let first = true
  while (after < end) {
    signal?.throwIfAborted()
    if (walker.checked >= limit || (!first && performance.now() >= deadline)) {
      return { ...walker.result(), next: { seq: after + 1, hash: walker.hash, end }, through: after, ...(skipped > 0 ? { skipped } : {}) }
    }
    if (!first) await nextTurn()
    first = false
    const n = Math.min(VERIFY_PAGE, limit - walker.checked)
    const page = await source.page(after, end, n)
    // The entry before the cursor is gone: deleted (the anchor is before it), or the anchor
    // itself (retention cut there, or the genesis), whose hash the cursor must then name. The
    // cursor is the client's to send: one naming a hash of its own choosing would otherwise
    // vouch for a chain rewritten onto another root.
    if (seamGone && (page.anchorSeq < after || (page.anchorSeq === after && walker.hash !== page.anchorHash))) {
      walker.fail(page.rows[0]?.e ?? null)
      return withSkipped(walker.result(), skipped)
    }
    seamGone = false
    if (page.anchorSeq > after) {
      // Only what retention removed since the walk knew the anchor: a row below it (put there
      // by hand: the walk reports it) made `skipped` count every position from 0 to the anchor.
      skipped += Math.max(0, Math.min(page.anchorSeq, end) - Math.max(after, known))
      known = page.anchorSeq
      walker = walker.from(page.anchorSeq, page.anchorHash)
      after = page.anchorSeq
    }
    for (const row of page.rows) {
      if (!walker.step(row.e, row.intact)) return withSkipped(walker.result(), skipped)
    }
    if (page.rows.length < n) break
    after = page.rows[page.rows.length - 1].e.seq
  }
  signal?.throwIfAborted()
  const tail = await source.tail(Math.max(after, end))
  // Retention removed entries past the last one walked since the walk's last read (its last
  // page is a statement of its own): the entry after them links to the new anchor, as a walk
  // begun then would find. Before, that entry was held to the last one walked, and an intact
  // chain was answered broken at it whenever retention ran between the two reads.
  if (tail.anchorSeq > walker.position) {
    skipped += Math.max(0, Math.min(tail.anchorSeq, end) - Math.max(walker.position, known))
    walker = walker.from(tail.anchorSeq, tail.anchorHash)
  }
  walker.endsAt(tail.next?.e ?? null, tail.headSeq, tail.headHash, tail.next?.intact ?? true)
  return withSkipped(walker.result(), skipped)
}

function withSkipped (result: VerifyResult, skipped: number): VerifyResult {
  return skipped > 0 ? { ...result, skipped } : result
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

  /** The hash the next entry must link to. */
  get hash (): string { return this.prevHash }

  /** The position of the last entry walked (or of the anchor the walk starts from). */
  get position (): number { return this.prevSeq }

  /**
   * This walk, going on from an anchor retention moved past it (the entries between were
   * removed): its count kept, no entry of its own to name.
   */
  from (seq: number, hash: string): ChainWalker {
    const walker = new ChainWalker(seq, hash)
    walker.checked = this.checked
    walker.ok = this.ok
    walker.broken = this.broken
    return walker
  }

  result (): VerifyResult {
    return { ok: this.ok, checked: this.checked, firstBroken: this.broken }
  }

  /** Whether `e` comes right after the last entry walked, linked to it, and is what its hash says. */
  private follows (e: StoredEntry, intact: boolean): boolean {
    return e.seq === this.prevSeq + 1 && e.previousHash === this.prevHash && sealed(e, intact)
  }

  /** Marks the chain broken at `e` (null: no entry to name). */
  fail (e: Named | null): void {
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

/**
 * A page of GET /admin/audit: `nextSeq` null at the end of the results. A page may hold fewer
 * than its limit, or none, with a `nextSeq` (PostgreSQL: a page by `action` or `status` stops
 * after the positions it may read); only a null `nextSeq` ends the results.
 */
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
  /** Walks at most one call's bound (see walkChain); `opts.next` goes on where an earlier call stopped. */
  verify: (range: { from?: Date, to?: Date }, opts?: VerifyOptions) => Promise<VerifyResult>
  query: (q: AuditQuery) => Promise<AuditPage>
  /**
   * Removes up to `limit` of the oldest entries (a prefix of the chain) older than `ageMs`, as the
   * store's own clock tells their age (PostgreSQL's: when each row was written); returns how many.
   * An age, not a date: a date would be one gateway's clock's, which the store does not trust.
   */
  prune: (ageMs: number, limit: number) => Promise<number>
  close: () => Promise<void>
}

/** The request id an entry is stored under when its own is taken: `~` never occurs in a client's. */
export const suffixed = (e: AuditEntry): string => `${e.requestId}~${e.id}`
