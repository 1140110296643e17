import pg from 'pg'
import { type AuditEntry, type AuditPage, type AuditQuery, type AuditStore, type ChainSource, type StoredEntry, type VerifyOptions, type VerifyResult, type WalkStart, type WalkedRow, ChainWalker, GENESIS, hashEntry, isoTime, suffixed, walkChain } from './entry.js'

// pg directly rather than @fastify/postgres: the audit writer owns the pool's lifetime (its last
// flush in onClose must run before the pool ends) and must not hold start-up on a database
// that is down: the gateway starts and spools.

export interface PostgresStoreOptions {
  databaseUrl: string
  /** A connection attempt that takes longer fails, and the batch goes to the spool (ms). */
  connectTimeoutMs?: number
  /** A query that takes longer fails (ms). */
  queryTimeoutMs?: number
  /** Most positions one page of GET /admin/audit by `action` or `status` reads (QUERY_SCAN, the default). */
  queryScan?: number
}

/** PostgreSQL's SQLSTATE for a unique index that refused a row. */
const UNIQUE_VIOLATION = '23505'
/**
 * SQLSTATE class 22, data exception: a value of the batch PostgreSQL cannot take (a NUL in a
 * text, a `\u0000` or a lone surrogate in JSON, a timestamp out of range); any other batch would
 * be stored. Not class 23 (a constraint an operator added may refuse every entry; 23505 is handled
 * by `write`), nor 08, 40, 53, 57 or a client error (a timeout): those are the store being away.
 */
const DATA_EXCEPTION = /^22[0-9A-Z]{3}$/

const COLUMNS = 'id, seq, request_id, "timestamp", hash, previous_hash, tenant_id, user_id, method, path, protocol, action, category, risk_level, status, status_code, duration_ms, metadata'
/** Whether a row's timestamp is a whole millisecond, as the gateway writes it (verify). */
const WHOLE_MS = '"timestamp" = date_trunc(\'milliseconds\', "timestamp") AS whole_ms'

/** What a column of the batch holds: its elements' PostgreSQL type. */
type ColumnType = 'uuid' | 'int8' | 'text' | 'timestamptz' | 'int4' | 'float8' | 'jsonb'
// The element type's oid, which PostgreSQL checks against the parameter's type (pg_type.oid).
const OID: Record<ColumnType, number> = { uuid: 2950, int8: 20, text: 25, timestamptz: 1184, int4: 23, float8: 701, jsonb: 3802 }
/** The element types of the batch's columns, in COLUMNS order. */
const COLUMN_TYPES: readonly ColumnType[] = ['uuid', 'int8', 'text', 'timestamptz', 'text', 'text', 'text', 'text', 'text', 'text', 'text', 'text', 'text', 'text', 'text', 'int4', 'float8', 'jsonb']
// One multi-row INSERT for a whole batch (each column travels as one array parameter, its type
// from COLUMN_TYPES), and the chain head moved in the same statement.
const INSERT = `WITH inserted AS (INSERT INTO bff_audit_entries (${COLUMNS})
SELECT * FROM unnest(${COLUMN_TYPES.map((type, i) => `$${i + 1}::${type}[]`).join(', ')})
RETURNING 1)
UPDATE bff_audit_chain SET head_seq = $19, head_hash = $20 WHERE id = 1 AND (SELECT count(*) FROM inserted) = $21`
// Prepared once per connection under this name: PostgreSQL then neither parses the statement
// nor, after its first executions, plans it again for each batch.
const INSERT_STATEMENT = 'mantle-audit-insert'

// PostgreSQL's timestamps count microseconds from 2000-01-01 UTC.
const PG_EPOCH_MS = 946_684_800_000
const TWO_32 = 4_294_967_296
const HEX = new Int8Array(128).fill(-1)
for (let i = 0; i < 16; i++) { HEX['0123456789abcdef'.charCodeAt(i)] = i; HEX['0123456789ABCDEF'.charCodeAt(i)] = i }
// Texts up to this length are copied in the loop: a chain hash (64) is, a path may not be.
const SHORT_TEXT = 64

/**
 * One text element at `at`: its length, then `lead` (jsonb's version byte, 1) when not -1, then
 * its UTF-8. Short ASCII texts (nearly all: names, codes, ids, hashes) are copied a character at
 * a time, which costs less than a call into Buffer#write for each (the 18 columns of an entry
 * cost 1.2-2 µs so, 2.3-2.9 µs with Buffer#write). Returns where the next starts.
 */
function writeText (buf: Buffer, view: DataView, s: string, at: number, lead: number): number {
  let o = at + 4
  if (lead !== -1) buf[o++] = lead
  const n = s.length
  let i = 0
  if (n <= SHORT_TEXT) {
    for (; i < n; i++) {
      const c = s.charCodeAt(i)
      if (c >= 128) break
      buf[o + i] = c
    }
  }
  const end = i === n ? o + n : o + buf.write(s, o)
  view.setInt32(at, end - at - 4)
  return end
}

/**
 * A value refused before it reaches PostgreSQL, with the SQLSTATE PostgreSQL would give it
 * (invalid_text_representation): the batch's own data, as PostgreSQL's refusals of class 22.
 */
export class MalformedValue extends TypeError {
  readonly code = '22P02'
}

/** PostgreSQL answers, but a transaction of this connection may not write (25006, read_only_sql_transaction). */
export class ReadOnlyStore extends Error {
  readonly code = '25006'
  constructor () {
    super('PostgreSQL takes no writes: transaction_read_only is on (a hot standby, or default_transaction_read_only)')
  }
}

/**
 * A column of a batch as a one-dimensional PostgreSQL array in binary format (what array_recv
 * reads: header, then each element's length and bytes; -1 for NULL). Written here because pg
 * has no encoder for binary parameters: it sends a Buffer parameter as it is, flagged binary,
 * and everything else as text. PostgreSQL then copies uuids, numbers and timestamps instead of parsing
 * their text, and no element is scanned for quotes: a batch costs it 3 µs less per entry than
 * text array literals (11.0 against 7.8 µs to read the 18 columns, loopback, 500 entries).
 * Numbers of int8 and timestamptz columns are safe integers (ms for timestamps, truncated as
 * Date does); jsonb elements are JSON text.
 */
export function binaryArray (type: ColumnType, values: readonly unknown[]): Buffer {
  const n = values.length
  let size = 20 + 4 * n
  if (type === 'text' || type === 'jsonb') {
    for (let i = 0; i < n; i++) { const v = values[i]; if (typeof v === 'string') size += 3 * v.length + 1 }
  } else size += 16 * n
  const buf = Buffer.allocUnsafeSlow(size)
  // DataView's setters are compiled inline; Buffer's writeInt32BE and the like check and call.
  const view = new DataView(buf.buffer, buf.byteOffset, size)
  let nulls = 0
  let at = 20
  for (let i = 0; i < n; i++) {
    const v = values[i]
    if (v === null || v === undefined) {
      view.setInt32(at, -1)
      at += 4
      nulls = 1
      continue
    }
    switch (type) {
      case 'text':
        at = writeText(buf, view, v as string, at, -1)
        break
      case 'jsonb':
        // jsonb's binary form: a version byte (1), then the JSON text.
        at = writeText(buf, view, v as string, at, 1)
        break
      case 'int8':
      case 'timestamptz': {
        // int8 as is; a timestamp as microseconds from PostgreSQL's epoch.
        const value = type === 'int8' ? v as number : (Math.trunc(v as number) - PG_EPOCH_MS) * 1000
        const hi = Math.floor(value / TWO_32)
        view.setInt32(at, 8)
        view.setInt32(at + 4, hi)
        view.setUint32(at + 8, value - hi * TWO_32)
        at += 12
        break
      }
      case 'int4':
        view.setInt32(at, 4)
        view.setInt32(at + 4, v as number)
        at += 8
        break
      case 'float8':
        view.setInt32(at, 8)
        view.setFloat64(at + 4, v as number)
        at += 12
        break
      case 'uuid': {
        const id = v as string
        // 8-4-4-4-12 hex digits; anything else would be stored as garbage, so it is refused.
        let bad = id.length === 36 ? 0 : -1
        view.setInt32(at, 16)
        let o = at + 4
        for (let k = 0; k < 36; k++) {
          const c = id.charCodeAt(k)
          if (k === 8 || k === 13 || k === 18 || k === 23) { if (c !== 45) bad = -1; continue }
          const high = HEX[c & 127] | (c >> 7 === 0 ? 0 : -1)
          const d = id.charCodeAt(++k)
          const low = HEX[d & 127] | (d >> 7 === 0 ? 0 : -1)
          bad |= high | low
          buf[o++] = (high << 4) | low
        }
        if (bad < 0) throw new MalformedValue(`not a uuid: ${JSON.stringify(id.slice(0, 40))}`)
        at += 20
        break
      }
    }
  }
  // Header: one dimension, whether any element is NULL, the element type, length, lower bound 1.
  view.setInt32(0, 1)
  view.setInt32(4, nulls)
  view.setInt32(8, OID[type])
  view.setInt32(12, n)
  view.setInt32(16, 1)
  return buf.subarray(0, at)
}

interface Row {
  id: string
  seq: string
  request_id: string
  timestamp: Date
  hash: string
  previous_hash: string
  tenant_id: string
  user_id: string
  method: string | null
  path: string | null
  protocol: StoredEntry['protocol']
  action: string
  category: StoredEntry['category']
  risk_level: StoredEntry['riskLevel']
  status: string
  status_code: number
  duration_ms: number
  metadata: Record<string, unknown>
}

/** A row of a LEFT JOIN that may have matched nothing. */
type Nullable<T> = { [K in keyof T]: T[K] | null }

// The hash covers the timestamp to the millisecond, as the gateway writes it; the column keeps
// microseconds, which Date drops when the row is read. A timestamp that is not a whole
// millisecond was changed after the write, so that row is broken.
// A row read for verify holds its metadata as PostgreSQL's text of the jsonb (VERIFY_TYPES): the
// hash covers the metadata as JavaScript read it, and a number whose stored decimal JavaScript
// cannot tell from another (3.00000000000000000001 for 3) was changed after the write, so that
// row is broken too. Before, such an UPDATE passed verify.
// A timestamp JavaScript cannot represent (`infinity`, a year past 275760: never one the gateway
// wrote) was changed after the write too: that row is broken. Before, hashing it threw, and
// verify answered 500 for every walk that reached it.
function walked (r: Row & { whole_ms: boolean } | Nullable<Row & { whole_ms: boolean }>): WalkedRow {
  const row = r as Row & { whole_ms: boolean }
  const text = row.metadata as unknown as string
  row.metadata = JSON.parse(text) as Record<string, unknown>
  const e = fromRow(row)
  return { e, intact: row.whole_ms && !Number.isNaN(e.timestamp) && numbersAsWritten(text) }
}

/** verify's reads: a jsonb column as PostgreSQL's text of it, every other type as pg parses it. */
const VERIFY_TYPES: pg.CustomTypesConfig = {
  getTypeParser: ((oid: number, format?: 'text' | 'binary') => oid === OID.jsonb ? (v: string) => v : pg.types.getTypeParser(oid, format)) as typeof pg.types.getTypeParser
}

/**
 * Whether every number of a JSON text is the decimal the gateway wrote: the shortest form of a
 * JavaScript number (JSON.stringify's), which jsonb keeps exactly (in its own notation: 1e21 as
 * 1000000000000000000000). One that reads as a number whose shortest form is another decimal
 * (3.00000000000000000001, 1e400) was not written by the gateway.
 */
export function numbersAsWritten (json: string): boolean {
  const n = json.length
  for (let i = 0; i < n; i++) {
    const c = json.charCodeAt(i)
    if (c === 34) {
      // A string: to its closing quote, escapes skipped.
      for (i++; i < n; i++) {
        const d = json.charCodeAt(i)
        if (d === 92) i++
        else if (d === 34) break
      }
    } else if (c === 45 || (c >= 48 && c <= 57)) {
      let j = i + 1
      while (j < n && NUMBER_PART.test(json[j])) j++
      const token = json.slice(i, j)
      if (decimal(token) !== decimal(String(Number(token)))) return false
      i = j - 1
    }
  }
  return true
}

const NUMBER_PART = /[0-9.eE+-]/
const DECIMAL = /^(-?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?[0-9]+))?$/

/** A decimal number's text in one form (sign, digits without leading or trailing zeros, exponent); null for none. */
function decimal (text: string): string | null {
  const m = DECIMAL.exec(text)
  if (m === null) return null
  const frac = m[3] ?? ''
  let digits = m[2] + frac
  let exp = Number(m[4] ?? 0) - frac.length
  let start = 0
  while (start < digits.length && digits.charCodeAt(start) === 48) start++
  if (start === digits.length) return '0'
  let end = digits.length
  while (digits.charCodeAt(end - 1) === 48) { end--; exp++ }
  digits = digits.slice(start, end)
  return `${m[1]}${digits}e${exp}`
}

/**
 * A stored timestamp in ms; NaN for one JavaScript cannot represent: pg reads `infinity` and
 * `-infinity` as numbers, and a year past 275760 as an Invalid Date.
 */
function msOf (v: unknown): number {
  return v instanceof Date ? v.getTime() : Number.NaN
}

function fromRow (r: Row): StoredEntry {
  return {
    id: r.id,
    seq: Number(r.seq),
    requestId: r.request_id,
    timestamp: msOf(r.timestamp),
    hash: r.hash,
    previousHash: r.previous_hash,
    tenantId: r.tenant_id,
    userId: r.user_id,
    method: r.method,
    path: r.path,
    protocol: r.protocol,
    action: r.action,
    category: r.category,
    riskLevel: r.risk_level,
    status: r.status,
    statusCode: r.status_code,
    durationMs: r.duration_ms,
    metadata: r.metadata
  }
}

/**
 * GET /admin/audit with a time bound looks first at this many positions below its cursor (the
 * newest entries): a few ms through the seq index.
 */
const QUERY_WINDOW = 10_000

/**
 * Most positions one page of GET /admin/audit by `action` or `status` (which no index serves)
 * reads (a few hundred ms): a page of a filter that matches little in them ends there, short or
 * empty, with a cursor to go on from the position reached.
 */
const QUERY_SCAN = 1_000_000

/**
 * A stored position as the walk and GET /admin/audit compute with it: one past 2^53 - 1 either
 * way (put there by hand: the gateway would have to write 2^53 entries first) as the nearest safe
 * integer. As it was, Number() rounded 2^63 - 1 up to 2^63, and the statement that carried it back
 * failed (22003, out of range for bigint): every verify, and every GET /admin/audit with a time
 * range, answered 500. The row itself is still read with its own position, which no walk accepts.
 */
const SAFE = Number.MAX_SAFE_INTEGER
const position = (v: string | number): number => Math.min(Math.max(Number(v), -SAFE), SAFE)

/** The time conditions of a range (`"timestamp" >= $1 AND ...`, '' for none) and their parameters, numbered from $1. */
function timeRange (range: { from?: Date, to?: Date }): { inRange: string, params: unknown[] } {
  const where: string[] = []
  const params: unknown[] = []
  if (range.from !== undefined) { params.push(range.from); where.push(`"timestamp" >= $${params.length}`) }
  if (range.to !== undefined) { params.push(range.to); where.push(`"timestamp" <= $${params.length}`) }
  return { inRange: where.join(' AND '), params }
}

/**
 * Where a page of GET /admin/audit starts reading: below its cursor, or past the newest entry
 * (`newest`), whichever is lower. A cursor above the newest entry (kept across a restore of an
 * older backup, or made by hand) had windows read positions that hold nothing, page after page.
 */
function below (cursor: number | undefined, newest: string): number {
  return Math.min(cursor ?? Infinity, position(newest) + 1)
}

/**
 * Whether a page filters on what no index serves (an `action` or `status`, without a request id,
 * whose own index finds it): such a page reads at most its store's `scan` positions.
 */
function unindexed (q: AuditQuery): boolean {
  return q.requestId === undefined && (q.action !== undefined || q.status !== undefined)
}

/** The positions of a range's first and last entries by time (`first`, `last`), through the timestamp index. */
function rangeEnds (inRange: string): string {
  return `(SELECT seq FROM bff_audit_entries WHERE ${inRange} ORDER BY "timestamp" LIMIT 1) AS first,
    (SELECT seq FROM bff_audit_entries WHERE ${inRange} ORDER BY "timestamp" DESC LIMIT 1) AS last`
}

/**
 * The positions a verify of `range` walks, `lo` to `hi` (`hi` = `lo` - 1 for none): from the
 * first to the last position holding an entry whose timestamp is in the range. With no entry in
 * it, nothing is walked, and `lo` is where the range would be: the position of the first entry
 * (by timestamp) after `from`, or after the newest.
 *
 * PostgreSQL, asked for min(seq) of the entries at or after `from`, walked the seq index from
 * the oldest entry and filtered each on its timestamp, as if positions and timestamps were
 * unrelated: a verify of the last 7 days read the 82 days before (1.8 million rows of 2
 * million, 0.9 s; past the read timeout at 15-20 million). Positions and timestamps rise
 * together, but not strictly (several instances, a replayed spool): the bounds are exact, each
 * found by whichever costs less, the entries before the range (or after it) walked by position,
 * or the range itself through the timestamp index (`seq + 0`: never the seq index's order).
 * Where the range starts and ends, and so how large it is, comes from the timestamp index first.
 */
async function rangeOf (client: pg.PoolClient, range: { from?: Date, to?: Date }, anchorSeq: number): Promise<{ lo: number, hi: number }> {
  const { inRange, params } = timeRange(range)
  const num = (v: string | null): number | null => v === null ? null : position(v)
  const ends = (await client.query<{ bottom: string | null, top: string | null, first: string | null, last: string | null }>(
    `SELECT (SELECT min(seq) FROM bff_audit_entries) AS bottom, (SELECT max(seq) FROM bff_audit_entries) AS top, ${inRange === ''
      ? 'NULL AS first, NULL AS last'
      : rangeEnds(inRange)}`, params)).rows[0]
  const bottom = num(ends.bottom)
  const top = num(ends.top)
  if (bottom === null || top === null) return { lo: anchorSeq + 1, hi: anchorSeq }
  if (inRange === '') return { lo: bottom, hi: top }
  const first = num(ends.first)
  const last = num(ends.last)
  if (first === null || last === null) {
    // Nothing in the range: where it would be.
    const at = range.from === undefined
      ? bottom
      : num((await client.query<{ seq: string | null }>('SELECT (SELECT seq FROM bff_audit_entries WHERE "timestamp" >= $1 ORDER BY "timestamp" LIMIT 1) AS seq', [range.from])).rows[0].seq) ?? top + 1
    return { lo: at, hi: at - 1 }
  }
  // Positions are gapless: their differences count entries.
  const span = Math.abs(last - first)
  let lo: number | null = null
  let hi: number | null = null
  if (first - bottom <= span) {
    lo = num((await client.query<{ lo: string | null }>(`SELECT min(seq) AS lo FROM bff_audit_entries WHERE seq <= $${params.length + 1} AND ${inRange}`, [...params, first])).rows[0].lo)
  }
  if (top - last <= span) {
    hi = num((await client.query<{ hi: string | null }>(`SELECT max(seq) AS hi FROM bff_audit_entries WHERE seq >= $${params.length + 1} AND ${inRange}`, [...params, last])).rows[0].hi)
  }
  if (lo === null || hi === null) {
    const both = (await client.query<{ lo: string | null, hi: string | null }>(`SELECT min(seq + 0) AS lo, max(seq + 0) AS hi FROM bff_audit_entries WHERE ${inRange}`, params)).rows[0]
    lo ??= num(both.lo) ?? first
    hi ??= num(both.hi) ?? last
  }
  return { lo, hi: Math.max(hi, lo - 1) }
}

/**
 * The audit trail in PostgreSQL, one hash chain for every gateway instance. A write holds the
 * chain head's row lock for one transaction: it reads the head, skips entries already stored
 * (by id: replay is idempotent), suffixes request ids already taken, chains the batch, inserts
 * it with one statement and moves the head. It never leaves a gap or a fork in the chain; it
 * never updates or deletes an entry except retention's removal of the oldest.
 */
export class PostgresAuditStore implements AuditStore {
  readonly kind = 'postgres' as const
  /** The writer's connections: batches, retention, the health ping. */
  readonly pool: pg.Pool
  /**
   * GET /admin/audit and verify's connections, apart: with one pool a few verifies of a large
   * table at once took every connection, so that the writer waited past its connect timeout and
   * spooled. A verify holds one of them for one page at a time.
   */
  private readonly reads: pg.Pool

  /**
   * What opens a writer transaction (batches, retention), and a read's: BEGIN, then its timeouts
   * as SET LOCAL, in one round trip. Not as connection startup parameters: PgBouncer refuses a
   * connection that sends one it does not know ("unsupported startup parameter"), and a session
   * SET does not hold behind a pooler in transaction mode (the next transaction may run on
   * another server connection). SET LOCAL lasts for its transaction, wherever it runs.
   */
  private readonly begin: string
  private readonly readTimeout: string
  /** Most positions a page by `action` or `status` reads (QUERY_SCAN). */
  private readonly scan: number

  constructor (opts: PostgresStoreOptions) {
    const timeout = Math.trunc(opts.queryTimeoutMs ?? 10000)
    this.scan = Math.max(QUERY_WINDOW, Math.trunc(opts.queryScan ?? QUERY_SCAN))
    // Statements end on the server too: pg's query_timeout only stops waiting, and a query of a
    // large table went on scanning (with its parallel workers) after its 500, each retry adding
    // one more.
    const statements = `SET LOCAL statement_timeout = ${timeout}`
    // The writer's transactions hold the chain head's row lock, which every instance's writer
    // takes. One whose connection was lost unseen (a network partition between its INSERT and its
    // COMMIT) stayed open on the server, lock held, until TCP keepalive ended it (2 h by default):
    // every write and replay of every instance waited on it and was spooled. The server now ends
    // such a transaction, and a wait for the lock, after the query timeout.
    // READ COMMITTED whatever the database's default_transaction_isolation: every writer waits
    // for the chain head's row lock, and under repeatable read or serializable one that waited
    // while another instance moved the head failed with 40001 (could not serialize access due to
    // concurrent update). With two instances writing, a third of the batches went to the spool,
    // the store read as down in turn, and retention failed whenever a write committed meanwhile.
    // Each statement under the lock reads what the holder before it committed, as `write` needs.
    this.begin = `BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = ${timeout}; SET LOCAL idle_in_transaction_session_timeout = ${timeout}; ${statements}`
    // A read's transaction too: lost unseen between its BEGIN and COMMIT, it held its snapshot
    // and a lock that migrations' DDL waits on until TCP keepalive ended it.
    this.readTimeout = `${statements}; SET LOCAL idle_in_transaction_session_timeout = ${timeout}`
    const pool = (max: number, name: string): pg.Pool => {
      const p = new pg.Pool({
        connectionString: opts.databaseUrl,
        max,
        connectionTimeoutMillis: opts.connectTimeoutMs ?? 2000,
        query_timeout: timeout,
        idleTimeoutMillis: 10000,
        keepAlive: true,
        // With user, database and pg's client_encoding, the only startup parameters: PgBouncer knows them.
        application_name: name
      })
      // A connection that breaks (PostgreSQL restarted, network cut), idle or checked out, must
      // not crash the process: the query in flight fails (a batch is then spooled).
      p.on('error', () => {})
      p.on('connect', client => { client.on('error', () => {}) })
      return p
    }
    this.pool = pool(2, 'mantle-audit')
    this.reads = pool(2, 'mantle-audit-reads')
  }

  /**
   * Stores a batch. The first try assumes what is nearly always true: no entry of the batch is
   * stored yet, and no request id the gateway made is taken (a uuidv7, or one derived from it);
   * only the request ids that are the clients' own (`clientRequestId`), which a client may send
   * again, are looked up first, under the chain lock. Looking every id up on every batch cost as
   * much PostgreSQL time as the insert itself; letting the INSERT fail on a reused client id and
   * writing the batch again cost 3 times the batch, and a new connection each time. The unique
   * indexes on id and request_id are still the judge: when one refuses (a replay of entries a
   * lost COMMIT had stored, an entry spooled by an earlier version), the batch is written again,
   * that time looking every id up first. Resolves to the entries inserted (those already stored
   * are skipped, and not counted).
   */
  async write (batch: AuditEntry[]): Promise<number> {
    if (batch.length === 0) return 0
    try {
      return await this.writeBatch(batch, false)
    } catch (err) {
      if ((err as { code?: unknown }).code !== UNIQUE_VIOLATION) throw err
      return await this.writeBatch(batch, true)
    }
  }

  /** True when `err` is PostgreSQL's refusal of the batch's own data (see DATA_EXCEPTION). */
  refuses (err: unknown): boolean {
    const code = (err as { code?: unknown } | null)?.code
    return (err instanceof pg.DatabaseError || err instanceof MalformedValue) && typeof code === 'string' && DATA_EXCEPTION.test(code)
  }

  private async writeBatch (batch: AuditEntry[], lookUp: boolean): Promise<number> {
    const client = await this.pool.connect()
    let broken = false
    try {
      // One round trip: open the transaction, set its timeouts and take the chain head's row lock.
      const opened = await client.query(`${this.begin}; SELECT head_seq, head_hash FROM bff_audit_chain WHERE id = 1 FOR UPDATE`) as unknown as Array<pg.QueryResult<{ head_seq: string, head_hash: string }>>
      const head = opened[opened.length - 1]
      let seq = Number(head.rows[0].head_seq)
      let prev = head.rows[0].head_hash
      // The clients' own request ids of the batch: only they may be taken on the first try.
      let clients: string[] | null = null
      if (!lookUp) {
        for (const e of batch) if (e.clientRequestId === true) (clients ??= []).push(e.requestId)
      }
      const known: Array<{ id?: string, request_id: string }> = lookUp
        ? (await client.query<{ id: string, request_id: string }>(
            'SELECT id, request_id FROM bff_audit_entries WHERE id = ANY($1::uuid[]) OR request_id = ANY($2::text[])',
            [batch.map(e => e.id), batch.map(e => e.requestId)])).rows
        : clients !== null
          ? (await client.query<{ request_id: string }>('SELECT request_id FROM bff_audit_entries WHERE request_id = ANY($1::text[])', [clients])).rows
          : []
      // The second try keeps track of ids and request ids, the first of request ids only when the
      // batch holds a client's (a client's repeated within the batch, or the same as one the
      // gateway made, is suffixed as on the second try). Otherwise a duplicate within the batch
      // makes the unique index refuse it, as one already stored does, and the second try sorts it out.
      const seen = lookUp || clients !== null ? { ids: lookUp ? new Set(known.map(r => r.id)) : null, requestIds: new Set(known.map(r => r.request_id)) } : null
      const cols: unknown[][] = Array.from({ length: 18 }, () => [])
      for (const e of batch) {
        let requestId = e.requestId
        if (seen !== null) {
          if (seen.ids !== null) {
            if (seen.ids.has(e.id)) continue
            seen.ids.add(e.id)
          }
          if (seen.requestIds.has(requestId)) requestId = suffixed(e)
          seen.requestIds.add(requestId)
        }
        seq++
        const entry = requestId === e.requestId ? e : { ...e, requestId }
        const iso = isoTime(e.timestamp)
        const hash = hashEntry(prev, seq, entry, iso)
        // In COLUMNS order.
        cols[0].push(e.id); cols[1].push(seq); cols[2].push(requestId); cols[3].push(e.timestamp); cols[4].push(hash); cols[5].push(prev)
        cols[6].push(e.tenantId); cols[7].push(e.userId); cols[8].push(e.method); cols[9].push(e.path); cols[10].push(e.protocol)
        cols[11].push(e.action); cols[12].push(e.category); cols[13].push(e.riskLevel); cols[14].push(e.status)
        cols[15].push(e.statusCode); cols[16].push(e.durationMs); cols[17].push(JSON.stringify(e.metadata))
        prev = hash
      }
      if (cols[0].length > 0) {
        const moved = await client.query({ name: INSERT_STATEMENT, text: INSERT, values: [...cols.map((col, k) => binaryArray(COLUMN_TYPES[k], col)), seq, prev, cols[0].length] })
        if (moved.rowCount !== 1) throw new Error('the audit chain head did not move with the batch')
      }
      await client.query('COMMIT')
      return cols[0].length
    } catch (err) {
      // A statement PostgreSQL refused (a unique index, a value of the batch) and a ROLLBACK it
      // took leave the connection as good as new: it is kept. Any other failure (no answer, a
      // cut) destroys it. Destroying it on every error made each batch with a reused request id
      // open a new connection.
      broken = !await rollBack(client, err)
      throw err
    } finally {
      client.release(broken)
    }
  }

  /**
   * Resolves when PostgreSQL answers and takes writes; rejects with why not (failureOf). A server
   * that answers but takes no writes (a hot standby the URL points at after a failover, or
   * default_transaction_read_only) refuses every batch with 25006; answering `SELECT 1`, it read
   * as up (/readyz ready, mantle_audit_store_up 1) for as long as no call came.
   */
  async ping (): Promise<void> {
    const { rows } = await this.pool.query<{ ro: string }>("SELECT current_setting('transaction_read_only') AS ro")
    if (rows[0].ro === 'on') throw new ReadOnlyStore()
  }

  /**
   * One read statement in a read-only transaction of its own, its statement_timeout set there
   * (SET LOCAL: see `begin`). A connection whose statement failed without PostgreSQL's answer (a
   * query timeout) is destroyed, as one that may still be inside the transaction.
   */
  private async read<R extends pg.QueryResultRow> (q: pg.QueryConfig): Promise<pg.QueryResult<R>> {
    const client = await this.reads.connect()
    let broken = false
    try {
      await client.query(`BEGIN READ ONLY; ${this.readTimeout}`)
      const result = await client.query<R>(q)
      await client.query('COMMIT')
      return result
    } catch (err) {
      broken = !await rollBack(client, err)
      throw err
    } finally {
      client.release(broken)
    }
  }

  /**
   * Walks at most one call's bound (walkChain), each page one statement of its own on a read
   * connection given back between pages: no snapshot is held for the walk. One snapshot held for
   * a whole walk (8 s for 200,000 entries, hours for a 90-day trail) kept every version of the
   * chain head's row that writers left meanwhile: the head lookup under the chain lock, which
   * every writer takes, slowed with each batch.
   */
  async verify (range: { from?: Date, to?: Date }, opts: VerifyOptions = {}): Promise<VerifyResult> {
    return await walkChain(this.source, async () => await this.start(range), opts)
  }

  private readonly source: ChainSource = {
    page: async (after, end, n) => {
      // The anchor and the page in one statement, one snapshot: entries retention removed
      // between two pages show as an anchor past the walk's place, not as a gap.
      const rows = (await this.read<{ anchor_seq: string, anchor_hash: string } & Nullable<Row & { whole_ms: boolean }>>({
        text: `SELECT c.anchor_seq, c.anchor_hash, e.* FROM bff_audit_chain c LEFT JOIN LATERAL
           (SELECT ${COLUMNS}, ${WHOLE_MS} FROM bff_audit_entries WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3) e ON true
         WHERE c.id = 1 ORDER BY e.seq`,
        values: [after, end, n],
        types: VERIFY_TYPES
      })).rows
      return { anchorSeq: Number(rows[0].anchor_seq), anchorHash: rows[0].anchor_hash, rows: rows.filter(r => r.id !== null).map(walked) }
    },
    tail: async (after) => {
      const row = (await this.read<{ head_seq: string, head_hash: string, anchor_seq: string, anchor_hash: string } & Nullable<Row & { whole_ms: boolean }>>({
        text: `SELECT c.head_seq, c.head_hash, c.anchor_seq, c.anchor_hash, e.* FROM bff_audit_chain c LEFT JOIN LATERAL
           (SELECT ${COLUMNS}, ${WHOLE_MS} FROM bff_audit_entries WHERE seq > $1 ORDER BY seq LIMIT 1) e ON true
         WHERE c.id = 1`,
        values: [after],
        types: VERIFY_TYPES
      })).rows[0]
      return { next: row.id === null ? null : walked(row), headSeq: Number(row.head_seq), headHash: row.head_hash, anchorSeq: Number(row.anchor_seq), anchorHash: row.anchor_hash }
    },
    at: async (seq) => {
      const row = (await this.read<Row & { whole_ms: boolean }>({ text: `SELECT ${COLUMNS}, ${WHOLE_MS} FROM bff_audit_entries WHERE seq = $1`, values: [seq], types: VERIFY_TYPES })).rows[0]
      return row === undefined ? null : walked(row)
    }
  }

  /** Where a walk of `range` starts: a few index lookups in one short snapshot. */
  private async start (range: { from?: Date, to?: Date }): Promise<WalkStart> {
    const client = await this.reads.connect()
    let broken = false
    try {
      await client.query(`BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; ${this.readTimeout}`)
      const chain = (await client.query<{ anchor_seq: string, anchor_hash: string }>(
        'SELECT anchor_seq, anchor_hash FROM bff_audit_chain WHERE id = 1')).rows[0]
      const { lo, hi } = await rangeOf(client, range, Number(chain.anchor_seq))
      // The anchor: the entry before the range, or the last one retention removed, or the genesis.
      let walker = new ChainWalker(0, GENESIS)
      // The range starts below every safe position: a row was put there by hand, before the
      // first of the chain, where no page reaches it. It is the first broken.
      const below = lo === -SAFE
        ? (await client.query<Row & { whole_ms: boolean }>({ text: `SELECT ${COLUMNS}, ${WHOLE_MS} FROM bff_audit_entries WHERE seq < $1 ORDER BY seq LIMIT 1`, values: [-SAFE], types: VERIFY_TYPES })).rows[0]
        : undefined
      if (below !== undefined) walker.fail(walked(below).e)
      else if (lo - 1 === Number(chain.anchor_seq)) walker = new ChainWalker(lo - 1, chain.anchor_hash)
      else if (lo > 1) {
        const before = await client.query<Row & { whole_ms: boolean }>({ text: `SELECT ${COLUMNS}, ${WHOLE_MS} FROM bff_audit_entries WHERE seq < $1 ORDER BY seq DESC LIMIT 1`, values: [lo], types: VERIFY_TYPES })
        const row = before.rows[0]
        if (row === undefined) walker = new ChainWalker(Number(chain.anchor_seq), chain.anchor_hash)
        else {
          const { e, intact } = walked(row)
          walker = ChainWalker.after(e, intact)
        }
      }
      return { walker, after: lo - 1, end: hi, anchorSeq: Number(chain.anchor_seq) }
    } catch (err) {
      broken = true
      throw err
    } finally {
      if (!broken) await client.query('COMMIT').catch(() => { broken = true })
      // A connection whose query failed (a timeout, say: pg then drops the COMMIT queued behind
      // it) may still be inside the read-only transaction: handed out again, GET /admin/audit
      // read its old snapshot and missed every entry written since. It is destroyed instead.
      client.release(broken)
    }
  }

  async query (q: AuditQuery): Promise<AuditPage> {
    const where: string[] = []
    const params: unknown[] = []
    const add = (sql: string, value: unknown): void => { params.push(value); where.push(sql.replace('?', '$' + params.length)) }
    // A page by tenant (with no request id, whose own index finds it) is read through the
    // (tenant_id, seq) index alone (migration 005), which holds the tenant's entries in position
    // order (with a time range, `action` or `status`, window by window: see `windows`). Asked for as tenant_id = X ORDER BY seq DESC, PostgreSQL, which takes a
    // tenant's entries to be spread evenly over the table, read a tenant of a large share by the
    // seq index backwards: one that has left, its entries all old, had every entry since passed
    // over (900,000 of a million rows for a tenant of a tenth). As tenant_id = ANY(ARRAY[X])
    // ordered by tenant_id then seq, no other index's order serves it (tenant_id = X made the
    // order by tenant_id void in PostgreSQL's eyes, and left it the seq index's).
    const byTenant = q.tenant !== undefined && q.requestId === undefined
    if (q.tenant !== undefined) add(byTenant ? 'tenant_id = ANY(?)' : 'tenant_id = ?', byTenant ? [q.tenant] : q.tenant)
    if (q.from !== undefined) add('"timestamp" >= ?', q.from)
    if (q.to !== undefined) add('"timestamp" <= ?', q.to)
    if (q.requestId !== undefined) {
      // The request id as sent, or as stored with its collision suffix.
      params.push(q.requestId, q.requestId.replace(/[\\%_]/g, '\\$&') + '~%')
      where.push(`(request_id = $${params.length - 1} OR request_id LIKE $${params.length})`)
    }
    if (q.action !== undefined) add('action = ?', q.action)
    if (q.status !== undefined) add('status = ?', q.status)
    if (q.beforeSeq !== undefined) add('seq < ?', q.beforeSeq)
    const filter = where.length > 0 ? 'WHERE ' + where.join(' AND ') : ''
    // The order of a page: its tenant's first, so that the (tenant_id, seq) index serves it.
    const order = `${byTenant ? 'tenant_id DESC, ' : ''}seq DESC`
    const want = q.limit + 1
    let rows: StoredEntry[]
    // Where a short page's scan stopped, entries below it not yet read (windows).
    let resume: number | null = null
    if (q.from === undefined && q.to === undefined && unindexed(q)) {
      // An `action` or `status`, which no index serves, with no time range: windows of the
      // positions below the cursor, as with one, down to the oldest entry. In one statement,
      // PostgreSQL read the table newest first by position filtering each row (or all of it, then
      // sorted), and a value found rarely or never, or the last page of any rare one, had the
      // whole table read (0.2 s at a million rows; a 503 past the reads' timeout at tens of millions).
      const ends = (await this.read<{ top: string | null, bottom: string | null }>({
        text: 'SELECT (SELECT max(seq) FROM bff_audit_entries) AS top, (SELECT min(seq) FROM bff_audit_entries) AS bottom'
      })).rows[0]
      rows = []
      if (ends.top !== null && ends.bottom !== null) {
        ({ rows, resume } = await this.windows(filter, params, order, below(q.beforeSeq, ends.top), position(ends.bottom), false, want, this.scan))
      }
    } else if (q.from === undefined && q.to === undefined) {
      rows = (await this.read<Row>({ text: `SELECT ${COLUMNS} FROM bff_audit_entries ${filter} ORDER BY ${order} LIMIT $${params.length + 1}`, values: [...params, want] })).rows.map(fromRow)
    } else {
      ({ rows, resume } = await this.timeBounded(q, where, params, order, want))
    }
    const more = rows.length > q.limit
    if (more) rows.pop()
    // A cursor names a safe position (see `position`).
    return { entries: rows, nextSeq: more ? position(rows[rows.length - 1].seq) : resume }
  }

  /**
   * A page of GET /admin/audit with a time bound, newest first by position. PostgreSQL, asked
   * for it in one statement, took the entries newest first by position (the seq index) and
   * filtered each on its timestamp, as if positions and timestamps were unrelated: a week 80
   * days ago read every entry of the 73 days since (1.6 million of 2 million rows, 0.8 s; past
   * the read timeout at 15-20 million); read through the timestamp index instead, every page of a
   * selective filter (`action`, `status`) read the whole range below its cursor (20 pages of a
   * 89-day range: 3.5 s against 0.18 s). Where the range lies comes first from the timestamp
   * index (its first and last entries by time): a range farther below the cursor than it is long
   * is read through the timestamp index (`seq + 0`: never in the seq index's order); otherwise
   * the positions below the cursor are read by the seq index in windows (see `windows`), down
   * to the range's first entry, until a page is full, and what lies below them (entries whose
   * timestamps are out of position order: several instances, a replayed spool) through the
   * timestamp index. A page of an `action` or `status` reads at most `scan` positions: one not
   * full by then ends there, with `resume`, the position to go on below; one whose range spans
   * more than `scan` reads none of it through the timestamp index (which reads it whole), its
   * windows going on below the range down to the oldest entry. The cost follows the page, never
   * the table.
   */
  private async timeBounded (q: AuditQuery, where: readonly string[], params: readonly unknown[], order: string, want: number): Promise<{ rows: StoredEntry[], resume: number | null }> {
    const filter = 'WHERE ' + where.join(' AND ')
    // The range's own bounds, numbered for the statement that reads where it lies.
    const { inRange, params: bounds } = timeRange(q)
    const ends = (await this.read<{ top: string | null, bottom: string | null, first: string | null, last: string | null }>({
      text: `SELECT (SELECT max(seq) FROM bff_audit_entries) AS top, (SELECT min(seq) FROM bff_audit_entries) AS bottom, ${rangeEnds(inRange)}`,
      values: bounds
    })).rows[0]
    if (ends.top === null || ends.bottom === null || ends.first === null || ends.last === null) return { rows: [], resume: null }
    const first = position(ends.first)
    const last = position(ends.last)
    const top = below(q.beforeSeq, ends.top)
    const floor = Math.min(first, last)
    // Entries below the range's first position, none when it is the oldest.
    const under = floor > position(ends.bottom)
    // Past the windows a page reads only matches (the range's positions, its tenant's entries or
    // its request id's through their index) but for an `action` or `status`: those are bounded.
    const bounded = unindexed(q)
    // Read through the timestamp index (a range far below, the entries below its first position),
    // a range has its every entry read: not by a bounded page whose range spans more positions
    // than it may read, which walks its windows instead, down to the range, and below it down to
    // the oldest entry (until 2026-12-08 a rare action over an old month read the whole month on
    // every page, and a walk over the last month read it whole on its last page).
    if (bounded && Math.abs(last - first) >= this.scan) return await this.windows(filter, params, order, top, position(ends.bottom), false, want, this.scan)
    if (top - 1 - Math.max(first, last) > Math.abs(last - first)) return { rows: await this.belowByIndex(filter, params, top, want), resume: null }
    return await this.windows(filter, params, order, top, floor, under, want, bounded ? this.scan : Infinity)
  }

  /** Up to `n` entries of `filter` below position `below`, newest first, through an index of the filter (`seq + 0`: never the seq index's order). */
  private async belowByIndex (filter: string, params: readonly unknown[], below: number, n: number): Promise<StoredEntry[]> {
    return (await this.read<Row>({
      text: `SELECT ${COLUMNS} FROM bff_audit_entries ${filter} AND seq < $${params.length + 1} ORDER BY seq + 0 DESC LIMIT $${params.length + 2}`,
      values: [...params, below, n]
    })).rows.map(fromRow)
  }

  /**
   * Up to `want` entries of `filter` below position `top`, newest first: the positions from
   * `top` down to `floor` by the seq index in windows of QUERY_WINDOW, doubling, until the page
   * is full, then what lies below `floor` (if any entry does, `under`) through an index of the
   * filter (belowByIndex). At most `scan` positions are read (Infinity: down to `floor`): a page
   * not full by then ends there, `resume` the position reached.
   * A tenant's page (`order` by tenant_id, then seq) reads each window through the (tenant_id,
   * seq) index, the tenant's entries alone: by the seq index PostgreSQL, which takes a tenant's
   * entries to be spread evenly, passed over every other tenant's (900,000 rows for a window of a
   * tenant that has left).
   */
  private async windows (filter: string, params: readonly unknown[], order: string, top: number, floor: number, under: boolean, want: number, scan: number): Promise<{ rows: StoredEntry[], resume: number | null }> {
    const rows: StoredEntry[] = []
    // Three windows at most (10,000, 20,000, then what is left of `scan`): a filter that matches
    // little or nothing reads `scan` positions in a few statements rather than window after
    // window (8 statements over 500,000 rows, 3 times the time of one). Until 2026-12-08,
    // after three windows, the rest of the range was read through the timestamp index, on every
    // page: a rare `action` or `status` over 89 days read 400,000 of a million rows per page
    // (0.15 s; past the reads' timeout, a 503, at tens of millions).
    let left = scan
    for (let size = QUERY_WINDOW, n = 1; top > floor && rows.length < want && left > 0; size *= 2, n++) {
      const bottom = Math.max(top - (n >= 3 ? left : Math.min(size, left)), floor)
      const page = await this.read<Row>({
        text: `SELECT ${COLUMNS} FROM bff_audit_entries ${filter} AND seq < $${params.length + 1} AND seq >= $${params.length + 2} ORDER BY ${order} LIMIT $${params.length + 3}`,
        values: [...params, top, bottom, want - rows.length]
      })
      for (const r of page.rows) rows.push(fromRow(r))
      left -= top - bottom
      top = bottom
    }
    if (rows.length >= want) return { rows, resume: null }
    if (top > floor) return { rows, resume: top }
    if (!under) return { rows, resume: null }
    // Below the range's first position: entries stamped out of position order (several
    // instances, a replayed spool), through an index of the filter.
    for (const e of await this.belowByIndex(filter, params, top, want - rows.length)) rows.push(e)
    return { rows, resume: null }
  }

  /**
   * Removes the oldest entries (a prefix of the chain, so no gap opens) written more than `ageMs`
   * ago, at most `limit` in one short transaction, and moves the verification anchor to the last
   * one removed. An entry's age is PostgreSQL's alone: from its `created_at` (PostgreSQL's
   * `now()` when its row was written, never before the call it records) to PostgreSQL's `now()`.
   * No gateway's clock is asked: judged by the entry's `timestamp` too (the clock of the gateway
   * that made it), a gateway whose clock ran behind had its entries removed early (one reading
   * 1970 at the next prune), and judged against the pruning gateway's clock, one whose clock ran
   * ahead removed entries early. An entry replayed from a spool long after its call is kept
   * `ageMs` from its replay.
   */
  async prune (ageMs: number, limit: number): Promise<number> {
    const client = await this.pool.connect()
    let broken = false
    try {
      // One round trip: pg answers a text of several statements with each one's result.
      const opened = await client.query(`${this.begin}; SELECT anchor_seq FROM bff_audit_chain WHERE id = 1 FOR UPDATE`) as unknown as Array<pg.QueryResult<{ anchor_seq: string }>>
      const anchor = opened[opened.length - 1].rows[0].anchor_seq
      // Both statements bounded below by the anchor (every entry up to it is gone): without
      // statistics, or with many dead rows, PostgreSQL read the whole table for each batch
      // (a DELETE of 1,000 rows by `seq <= $1` alone: 184 ms, 3.1 ms with the bound), while every
      // writer waited on the lock held here.
      const oldest = await client.query<{ seq: string, hash: string, old: boolean }>(
        'SELECT seq, hash, created_at < now() - $3 * interval \'1 millisecond\' AS old FROM bff_audit_entries WHERE seq > $2 ORDER BY seq LIMIT $1', [limit, anchor, ageMs])
      let n = 0
      while (n < oldest.rows.length && oldest.rows[n].old) n++
      if (n > 0) {
        const last = oldest.rows[n - 1]
        await client.query('DELETE FROM bff_audit_entries WHERE seq > $1 AND seq <= $2', [anchor, last.seq])
        await client.query('UPDATE bff_audit_chain SET anchor_seq = $1, anchor_hash = $2 WHERE id = 1', [last.seq, last.hash])
      }
      await client.query('COMMIT')
      return n
    } catch (err) {
      broken = true
      await rollBack(client, err)
      throw err
    } finally {
      client.release(broken)
    }
  }

  async close (): Promise<void> {
    await Promise.all([this.pool.end(), this.reads.end()])
  }
}

/**
 * What a failure of PostgreSQL was, for the log: `answered but failed: <its error>` when it (or a
 * pooler in front of it) answered with an error (a missing relation, a refused connection, a
 * failed login), `no answer: <why>` when nothing answered (refused, cut, timed out).
 */
export function failureOf (err: unknown): string {
  const e = err as { message?: unknown, code?: unknown } | null
  const message = typeof e?.message === 'string' && e.message !== '' ? e.message : typeof e?.code === 'string' ? e.code : String(err)
  return err instanceof pg.DatabaseError || err instanceof ReadOnlyStore ? `answered but failed: ${message}` : `no answer: ${message}`
}

/**
 * Ends a failed transaction: a ROLLBACK only when PostgreSQL itself refused a statement, or a
 * value was refused before it was sent (MalformedValue); true when PostgreSQL took it, and the
 * connection can be handed out again. Otherwise (or when the ROLLBACK fails) the connection is
 * to be destroyed (PostgreSQL rolls back what a closed connection left open). On a connection
 * that did not answer (a query timeout, a cut), a ROLLBACK waited out a second query timeout,
 * 20 s in all before the batch was spooled, past a shutdown's grace.
 */
async function rollBack (client: pg.PoolClient, err: unknown): Promise<boolean> {
  if (!(err instanceof pg.DatabaseError) && !(err instanceof MalformedValue)) return false
  try {
    await client.query('ROLLBACK')
    return true
  } catch {
    return false
  }
}
