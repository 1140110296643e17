import fp from 'fastify-plugin'
import { setTimeout as sleep } from 'node:timers/promises'
import type { FastifyInstance, FastifyRequest, FastifyReply } from 'fastify'
import { Counter, Gauge, Histogram } from 'prom-client'
import pg from 'pg'
import { StageOrder, isSocket, type CallContext, type Protocol } from '../pipeline/index.js'
import { MantleError, toProblem } from '../../errors.js'
import { ConfigError } from '../../schemas/config.js'
import type { Operation } from '../../manifest.js'
import { type AuditEntry, type AuditStore, type AuditQuery, type Category, type VerifyCursor, VERIFY_MAX_ENTRIES, categoryOf, refusedIdentity, storableEntry } from './entry.js'
import { unwatchCaller, watchCaller } from '../pipeline/caller.js'
import { clientRequestId, uuidv7 } from '../../ids.js'
import { requestAuthorization } from '../../adapters/credentials.js'
import { MemoryAuditStore } from './memory-store.js'
import { PostgresAuditStore, failureOf } from './postgres-store.js'
import { Spool } from './spool.js'
import { AuditWriter } from './writer.js'
import { migrate, migrationStatus } from './migrations.js'
import { withHook } from '../../route-hooks.js'
import { answeredStraight } from '../../lingering.js'

export { type AuditEntry, type StoredEntry, type VerifyResult, GENESIS, hashEntry, categoryOf } from './entry.js'

export interface AuditHealth {
  store: 'memory' | 'postgres'
  /** The store took the last write (memory: always). */
  up: boolean
  /** Batches wait in the spool for PostgreSQL. */
  spooling: boolean
  queueDepth: number
  /** Entries are off the queue and not yet stored or spooled: a flush or a replay is under way. */
  writing: boolean
  spoolBytes: number
  error: string | null
  /**
   * Neither the store nor the spool's disk takes entries, and the backlog is full: every call
   * is refused (503 OVERLOADED) until one of them takes entries again. This instance's own.
   */
  saturated: boolean
  /**
   * Production found pending migrations once PostgreSQL answered (it was unreachable at
   * start-up): what start-up would have refused, e.g. `pending migrations (4)`. The gateway
   * shuts down (app.fatal); null otherwise.
   */
  refusal: string | null
}

export interface Audit {
  health: () => AuditHealth
  /** Records an entry (off the hot path): for the gateway's own endpoints. */
  enqueue: (entry: AuditEntry) => void
  /**
   * Records a request refused before any face made it a call (a body too large, not JSON, a
   * malformed batch), as `security` (`auth` for a 401 or 403), under `action`: the code and
   * status the client got. `route`: the template of a request no route took that was made to
   * one (a REST path segment too long), as its path.
   */
  refused: (request: FastifyRequest, reply: FastifyReply, action: string, code: string, statusCode: number, route?: string) => void
  /**
   * Marks a request of a call's route as having reached its face's handler: from there on, what
   * it is refused is the calls' own (the audit stage records them) or the face's answer. Before
   * the mark, a refusal is recorded by the route's onError hook (see `earlyRefusal`). False when
   * the request was marked already (by its face, or by that hook as it recorded its refusal).
   */
  reached: (request: FastifyRequest) => boolean
  /**
   * What the entry of a request on a route that audits itself (`config.audit`) says besides who
   * and how it ended: which tenant and tags an invalidation targeted, say. Never input or secrets.
   */
  describe: (request: FastifyRequest, metadata: Record<string, unknown>) => void
  /**
   * Runs `decide`, a decision a face makes outside the pipeline on behalf of a connection (a
   * subscription to an event, a /ws re-auth frame), and records it: one entry, `ok` or the
   * refusal's code. While the trail cannot record, refused OVERLOADED unrun, with no entry, as
   * the stage refuses calls. A face reaches it through adapters/face.ts' `decisions`.
   */
  decide: <T>(decision: Decision, decide: () => T) => T
  readonly store: AuditStore
}

/** What the entry of a face's decision outside the pipeline says (Audit.decide). */
export interface Decision {
  /** The request id the client is answered with (a refusal's `requestId`). */
  requestId: string
  protocol: 'websocket' | 'trpc' | 'graphql'
  /** The face's endpoint (`/ws`, `/trpc/<event>`, `/graphql`). */
  path: string
  /**
   * The event's name, `websocket.auth`, `trpc` (a tRPC WebSocket's connectionParams refused), or
   * `http` (a graphql-ws subscribe refused before its document named an event).
   */
  action: string
  /**
   * Accepted: `read` (a subscription) or `auth` (a re-auth, refused too); `security`: a request
   * refused before it named an event (a graphql-ws subscribe whose document names none), refused
   * only, recorded as Audit.refused records one (`auth` for a 401 or 403).
   */
  category: 'read' | 'auth' | 'security'
  /** Who asked, once known (`decide` may set it); null: none, or refused (public / anonymous). */
  caller: { tenant: string, user: string } | null
  /** The request id is the client's own (AuditEntry.clientRequestId). */
  clientRequestId: boolean
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Present when the audit trail is on (BFF_AUDIT_ENABLED). */
    audit: Audit
  }
  interface FastifyContextConfig {
    /**
     * The action of the one audit entry each request on this route leaves, allowed or refused
     * (the gateway's admin and ops endpoints: `admin.diagz`, `admin.cache.invalidate`). The audit
     * plugin adds the hook that writes it to the routes declared after it; with the audit off,
     * nothing is added.
     */
    audit?: string
  }
}

export interface AuditOptions {
  store: 'memory' | 'postgres'
  databaseUrl?: string
  production: boolean
  retentionDays: number
  batchSize: number
  queueMax: number
  memoryMax: number
  spoolDir: string
  /** How often retention runs (ms); tests shorten it. */
  retentionIntervalMs?: number
  /** How often an idle writer asks PostgreSQL whether it answers (readiness without traffic). */
  probeIntervalMs?: number
  /** How often the writer flushes at least (ms). */
  flushIntervalMs?: number
  /** PostgreSQL connect timeout (ms): how long a batch waits before it is spooled. */
  connectTimeoutMs?: number
  /** How long the start-up waits for the schema's migration or check (SCHEMA_WAIT_MS); tests shorten it. */
  schemaWaitMs?: number
}

const PRUNE_BATCH = 1000
/**
 * How long the start-up waits for the schema's migration (or, in production, its check) before
 * it starts without it, spooling: well within Fastify's 30 s for a plugin to start (app.ts).
 */
const SCHEMA_WAIT_MS = 20_000
/** The longest a shutdown waits for the audit store to close, once every entry is stored or spooled. */
const STORE_CLOSE_MS = 1000
const NO_METADATA: Readonly<Record<string, unknown>> = Object.freeze({})

/** Where each face's calls arrive: the route template, never a URL with input in it. */
function endpoints (op: Operation): Record<Protocol, readonly [string | null, string]> {
  return {
    rest: [op.method, '/api/v1' + op.path],
    batch: ['POST', '/api/v1/batch'],
    trpc: [null, '/trpc/' + op.name],
    graphql: [null, '/graphql'],
    websocket: [null, '/ws']
  }
}

/** The entry of one call through the pipeline: built from the context, nothing awaited. */
export function callEntry (ctx: CallContext, where: readonly [string | null, string], err: unknown): AuditEntry {
  const elapsed = performance.now() - ctx.startedAt
  let status = 'ok'
  let statusCode = ctx.status
  if (err !== null) {
    const { problem } = toProblem(err, ctx.requestId)
    status = problem.code
    statusCode = problem.status
  }
  let metadata = NO_METADATA as Record<string, unknown>
  if (ctx.cache !== null || ctx.replayed || ctx.findings !== null) {
    metadata = {}
    if (ctx.cache !== null) metadata.cache = ctx.cache
    // The kinds of what the firewall found, never the text it matched.
    if (ctx.findings !== null) metadata.findings = ctx.findings.map(f => ({ category: f.category, type: f.type }))
    if (ctx.replayed) metadata.replayed = true
  }
  return {
    id: uuidv7(),
    requestId: ctx.requestId,
    timestamp: Math.round(Date.now() - elapsed),
    tenantId: ctx.tenant,
    userId: ctx.user,
    // The request's own method on REST: a HEAD of a GET operation is a HEAD (the op's was recorded).
    method: where[0] === 'GET' && ctx.protocol === 'rest' && ctx.caller !== null && !isSocket(ctx.caller) ? ctx.caller.req.method ?? 'GET' : where[0],
    path: where[1],
    protocol: ctx.protocol,
    action: ctx.op.name,
    category: categoryOf(ctx.op.type, status === 'ok' ? null : status, ctx.risk),
    riskLevel: ctx.risk,
    status,
    statusCode,
    durationMs: Math.round(elapsed * 1000) / 1000,
    metadata,
    clientRequestId: ctx.clientRequestId
  }
}

/**
 * The entry of a face's decision outside the pipeline, begun at `startedAt` (performance.now()):
 * `ok` (status 200), or the refusal's code and status, categorised as a call's (auth for 401 and
 * 403), a re-auth's always `auth`.
 */
function decisionEntry (d: Decision, startedAt: number, err: unknown): AuditEntry {
  const elapsed = performance.now() - startedAt
  let status = 'ok'
  let statusCode = 200
  let category: Category = d.category
  if (err !== null) {
    const { problem } = toProblem(err, d.requestId)
    status = problem.code
    statusCode = problem.status
    if (category === 'read') category = categoryOf('query', status, 'none')
    else if (category === 'security' && refusedIdentity(status)) category = 'auth'
  }
  return {
    id: uuidv7(),
    requestId: d.requestId,
    timestamp: Math.round(Date.now() - elapsed),
    tenantId: d.caller?.tenant ?? 'public',
    userId: d.caller?.user ?? 'anonymous',
    method: null,
    path: d.path,
    protocol: d.protocol,
    action: d.action,
    category,
    riskLevel: 'none',
    status,
    statusCode,
    durationMs: Math.round(elapsed * 1000) / 1000,
    metadata: NO_METADATA as Record<string, unknown>,
    clientRequestId: d.clientRequestId
  }
}

/**
 * The entry of a call that ran, whose result its face left out of a bounded answer: the code and
 * status the client got, and `leftOut` (the call ran: a mutation was carried out).
 */
function leftOutEntry (entry: AuditEntry, leftOut: { code: string, status: number }, ctx: CallContext): AuditEntry {
  return { ...entry, status: leftOut.code, statusCode: leftOut.status, category: categoryOf(ctx.op.type, leftOut.code, ctx.risk), metadata: { ...entry.metadata, leftOut: true } }
}

/** tRPC's routes, by path (a refused request's procedure, trpcAction). */
const TRPC_ROUTE = /^\/trpc(?:[/?]|$)/

/**
 * The face of a route template (or a request's path) by its path; `http` for the gateway's other
 * routes. A refused request's is read from its route's template: its URL may say otherwise (`/ws/`,
 * which reaches /ws, was `http`), and `/api/v1/batch` is the batch route alone (an operation's
 * REST route `/api/v1/batches/:id` was `batch`).
 */
function protocolOf (url: string): AuditEntry['protocol'] {
  if (url === '/api/v1/batch' || url.startsWith('/api/v1/batch?')) return 'batch'
  if (url.startsWith('/api/v1/')) return 'rest'
  if (url.startsWith('/trpc')) return 'trpc'
  if (url.startsWith('/graphql')) return 'graphql'
  if (url === '/ws' || url.startsWith('/ws?')) return 'websocket'
  return 'http'
}

/**
 * Where a refused request arrived, as a call's entry says it: the HTTP method and route
 * template on REST, batch and the gateway's own endpoints; the face's endpoint and no method on
 * the others (`/trpc/<op>`, or `/trpc` for a request naming no one procedure).
 */
function endpointOf (request: FastifyRequest, protocol: AuditEntry['protocol'], action: string): readonly [string | null, string | null] {
  switch (protocol) {
    case 'trpc': return [null, action === 'trpc' ? '/trpc' : '/trpc/' + action]
    case 'graphql': return [null, '/graphql']
    case 'websocket': return [null, '/ws']
    default: return [request.method, request.routeOptions.url ?? null]
  }
}

/** Set on a request of a call's route once its face's handler has it (Audit.reached). */
const REACHED = Symbol('mantle.audit.reached')
type Marked = FastifyRequest & { [REACHED]: boolean }

/** Production's refusal of an audit database with pending migrations. */
class PendingMigrations extends ConfigError {
  /** `pending migrations (4, 5)` */
  readonly what: string
  constructor (pending: number[]) {
    const what = `pending migrations (${pending.join(', ')})`
    super(`Refusing to start in production: the audit database has ${what}: run npm run migrate from a checkout, or node dist/scripts/migrate.js up in the image`)
    this.what = what
  }
}

// SQLSTATE classes of a PostgreSQL that cannot answer now: connection exceptions (08),
// insufficient resources (53), operator intervention (57: a cancelled statement, a shutdown).
const UNAVAILABLE_STATES = /^(?:08|53|57)/
// The system errors of a connection that cannot be made or was lost, and node-postgres' own
// errors when it stops waiting or its connection ends.
const NETWORK_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'ENETUNREACH', 'EHOSTUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'EPIPE'])
const CLIENT_GAVE_UP = /^(?:Query read timeout|timeout exceeded when trying to connect|Connection terminated\b)/

/**
 * A read of the audit trail whose PostgreSQL could not answer (unreachable, or past the reads'
 * timeout: a filter by action or status alone is a scan of the whole table) is a 503 with
 * Retry-After: nothing is wrong with the request, nor with the gateway. It was a 500 INTERNAL.
 * A SQLSTATE is read only from PostgreSQL's own errors (EPIPE is five letters too). A host name
 * with several addresses (localhost as ::1 and 127.0.0.1, a name with AAAA and A records) fails,
 * each refused, as Node's AggregateError (autoSelectFamily: code ECONNREFUSED, no message), which
 * was a 500 too.
 */
export async function answered<T> (read: () => Promise<T>): Promise<T> {
  try {
    return await read()
  } catch (err) {
    // Production found pending migrations once PostgreSQL answered: the instance shuts down.
    // It was a 500 INTERNAL.
    if (err instanceof PendingMigrations) throw new MantleError('OVERLOADED', `The audit database has ${err.what}: this instance is shutting down (run the migrations)`, { headers: { 'retry-after': '5' }, cause: err })
    const { code, message } = err as { code?: unknown, message?: unknown }
    const unavailable = err instanceof pg.DatabaseError
      ? typeof code === 'string' && UNAVAILABLE_STATES.test(code)
      : err instanceof Error && (err.constructor === Error || err instanceof AggregateError) && ((typeof code === 'string' && NETWORK_CODES.has(code)) || (typeof message === 'string' && CLIENT_GAVE_UP.test(message)))
    if (!unavailable) throw err
    throw new MantleError('OVERLOADED', 'The audit trail\'s database did not answer in time: retry later, or narrow the query (from and to, tenant)', { headers: { 'retry-after': '5' }, cause: err })
  }
}

const DateTime = { type: 'string', format: 'date-time' } as const
// A filter compared with a text column. PostgreSQL's text cannot hold a NUL character and fails
// the whole query for a parameter with one, so it is refused as input.
const textFilter = (maxLength: number) => ({ type: 'string', minLength: 1, maxLength, pattern: '^[^\\u0000]*$' }) as const
const EntrySchema = {
  type: 'object',
  properties: {
    id: { type: 'string' },
    seq: { type: 'integer' },
    requestId: { type: 'string' },
    // null for a stored timestamp JavaScript cannot represent (changed after the write: verify reports it)
    timestamp: { type: ['string', 'null'] },
    hash: { type: 'string' },
    previousHash: { type: 'string' },
    tenantId: { type: 'string' },
    userId: { type: 'string' },
    method: { type: ['string', 'null'] },
    path: { type: ['string', 'null'] },
    protocol: { type: 'string' },
    action: { type: 'string' },
    category: { type: 'string' },
    riskLevel: { type: 'string' },
    status: { type: 'string' },
    statusCode: { type: 'integer' },
    durationMs: { type: 'number' },
    metadata: { type: 'object', additionalProperties: true }
  }
} as const
const problem = { content: { 'application/problem+json': { schema: { $ref: 'Problem#' } } } }

/** A verify's `next`: the cursor as base64url JSON. */
const encodeVerifyCursor = (c: VerifyCursor): string => Buffer.from(JSON.stringify({ s: c.seq, h: c.hash, e: c.end })).toString('base64url')
function decodeVerifyCursor (next: string): VerifyCursor | null {
  try {
    const { s, h, e } = JSON.parse(Buffer.from(next, 'base64url').toString('utf8')) as { s?: unknown, h?: unknown, e?: unknown }
    if (typeof s !== 'number' || !Number.isSafeInteger(s) || s < 1 || typeof e !== 'number' || !Number.isSafeInteger(e) || e < s) return null
    if (typeof h !== 'string' || !/^[0-9a-f]{64}$/.test(h)) return null
    return { seq: s, hash: h, end: e }
  } catch {
    return null
  }
}

const encodeCursor = (seq: number): string => Buffer.from(JSON.stringify({ s: seq })).toString('base64url')
function decodeCursor (cursor: string): number | null {
  try {
    const s = (JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as { s?: unknown }).s
    return typeof s === 'number' && Number.isSafeInteger(s) && s > 0 ? s : null
  } catch {
    return null
  }
}

/**
 * A date-time of the endpoints' format as a Date. An offset of hours alone (`+05`), which ISO
 * 8601 and the format admit, is read as `+05:00`: Date read it as no time at all, and the request
 * was refused 400 as if it named a leap second.
 */
function timeOf (text: string): Date {
  return new Date(HOURS_OFFSET.test(text) ? text + ':00' : text)
}
const HOURS_OFFSET = /[+-][0-9]{2}$/

/**
 * A range's start (`date`, read from `text`) as its text says it, to the whole millisecond the
 * entries are stamped with: Date keeps the first three digits of a second's fraction, so
 * `…05.0005Z` read as `…05.000Z`, and the entry of that millisecond, which came before the range,
 * was in it. One finer than the millisecond starts at the next one. (A range's end needs
 * nothing: `…05.0009Z` holds `…05.000Z`.)
 */
function rangeStart (date: Date, text: string): Date {
  const fraction = FRACTION.exec(text)?.[1] ?? ''
  return /[1-9]/.test(fraction.slice(3)) ? new Date(date.getTime() + 1) : date
}
const FRACTION = /\.([0-9]+)/

/**
 * The first of `dates` that is no time at all: the date-time format admits a leap second
 * (`23:59:60`), which Date cannot represent (its time is NaN).
 */
function unplaceable (dates: { from?: Date, to?: Date }): 'from' | 'to' | null {
  if (dates.from !== undefined && Number.isNaN(dates.from.getTime())) return 'from'
  if (dates.to !== undefined && Number.isNaN(dates.to.getTime())) return 'to'
  return null
}

/**
 * `refused`: production found pending migrations only once PostgreSQL answered (it was
 * unreachable at start-up). From then on every use of the store fails at once with that
 * refusal, without a connection: each write retried the check (a connection of its own and the
 * migration lock), and its refusal was taken for a write failure, so the gateway ran on and
 * spooled every entry for good.
 */
async function openStore (app: FastifyInstance, opts: AuditOptions, evicted: (n: number) => void, refused: (err: PendingMigrations) => void): Promise<{ store: AuditStore, spool: Spool | null, ping: () => Promise<void>, reachable: boolean, startError: string | null }> {
  if (opts.store === 'memory') return { store: new MemoryAuditStore({ max: opts.memoryMax, onEvict: evicted }), spool: null, ping: async () => {}, reachable: true, startError: null }
  const databaseUrl = opts.databaseUrl
  if (databaseUrl === undefined) throw new ConfigError('BFF_AUDIT_STORE=postgres needs DATABASE_URL')
  // Outside production the gateway migrates; in production it only checks, and refuses to run
  // on an older schema (`npm run migrate` is a deploy step there).
  const ensureSchema = async (): Promise<void> => {
    if (!opts.production) {
      await migrate(databaseUrl)
      return
    }
    const status = await migrationStatus(databaseUrl)
    if (status.pending.length > 0) throw new PendingMigrations(status.pending)
  }
  let started = false
  let refusal: PendingMigrations | null = null
  let schema: Promise<void> | null = null
  const prepare = async (): Promise<void> => {
    if (refusal !== null) throw refusal
    schema ??= ensureSchema().catch(err => {
      if (!(err instanceof PendingMigrations) || !started) {
        schema = null
        throw err
      }
      refusal = err
      refused(err)
      throw err
    })
    await schema
  }
  let reachable = true
  let startError: string | null = null
  try {
    // Waited for SCHEMA_WAIT_MS at most, then left to end meanwhile: the start-up had Fastify's
    // 30 s for the audit plugin (PLUGIN_TIMEOUT_MS), and a migration that took longer (an index
    // built on a large table), or a wait for another instance's, failed the start with "Plugin did
    // not start in time: 'mantle-audit'"; the migration was rolled back with the process, and cut
    // again at each restart. Every use of the store waits for it (prepare), so entries are spooled
    // until it has ended; in production, pending migrations it finds then end the gateway as when
    // PostgreSQL answers late (`refused`).
    // Its failure once the start stopped waiting is its next use's to say (handled here: an
    // unhandled rejection would end the process).
    const ended = prepare().then(() => true)
    ended.catch(() => {})
    const waitMs = opts.schemaWaitMs ?? SCHEMA_WAIT_MS
    if (!await Promise.race([ended, sleep(waitMs, false, { ref: false })])) {
      reachable = false
      startError = `the audit schema's ${opts.production ? 'check' : 'migration'} had not ended after ${waitMs} ms (another instance's migration, or a long one, holds it)`
      app.log.warn({ err: startError }, 'PostgreSQL failed at start-up: audit entries are spooled until it works')
    }
  } catch (err) {
    if (err instanceof ConfigError) throw err
    reachable = false
    startError = failureOf(err)
    // Down at start-up: the gateway starts and spools; the schema is checked once it answers.
    // Said as it is: a PostgreSQL (or pooler) that answered with an error (a missing relation, a
    // refused connection) read as unreachable.
    app.log.warn({ err: startError }, 'PostgreSQL failed at start-up: audit entries are spooled until it works')
  }
  started = true
  // Named by its variable, as every bad setting is: a file there, or a directory the gateway may
  // not create, stopped the start with Node's words alone ("EEXIST: file already exists, mkdir").
  const spool = await Spool.open(opts.spoolDir).catch((err: Error) => {
    throw new ConfigError(err.message.includes('BFF_AUDIT_SPOOL_DIR') ? err.message : `BFF_AUDIT_SPOOL_DIR=${opts.spoolDir}: ${err.message}`)
  })
  const pg = new PostgresAuditStore({ databaseUrl, connectTimeoutMs: opts.connectTimeoutMs })
  // Every use waits for the schema first (a no-op once it is there).
  const store: AuditStore = {
    kind: 'postgres',
    write: async (batch) => { await prepare(); return await pg.write(batch) },
    refuses: (err) => pg.refuses(err),
    verify: async (range, o) => { await prepare(); return await pg.verify(range, o) },
    query: async (q) => { await prepare(); return await pg.query(q) },
    prune: async (ageMs, limit) => { await prepare(); return await pg.prune(ageMs, limit) },
    close: async () => { await pg.close() }
  }
  // The first answer after start-up checks (or migrates) the schema at once, traffic or not.
  const ping = async (): Promise<void> => {
    try {
      await pg.ping()
      await prepare()
    } catch (err) {
      // Pending migrations are said as they are (and end the gateway: see `refused`).
      throw err instanceof PendingMigrations ? err : new Error(failureOf(err), { cause: err })
    }
  }
  return { store, spool, ping, reachable, startError }
}

async function auditPlugin (app: FastifyInstance, opts: AuditOptions): Promise<void> {
  const metrics = app.hasDecorator('metrics') ? app.metrics.registry : null
  const entries = metrics === null
    ? null
    : new Counter({ name: 'mantle_audit_entries_total', help: 'Audit entries by what became of them: stored, spooled, replayed (stored from the spool; entries already stored are not counted), evicted (memory ring full), pruned (retention); refused: calls refused because neither the store nor the spool took entries; dropped: entries of requests refused before any face then; lost: entries neither stored nor spooled at shutdown (the disk refused them, logged at error)', labelNames: ['outcome'] as const, registers: [metrics] })
  let probing: NodeJS.Timeout | null = null
  let refusal: string | null = null
  const { store, spool, ping, reachable, startError } = await openStore(app, opts, n => entries?.inc({ outcome: 'evicted' }, n), err => {
    // What start-up would have refused: the gateway shuts down (its entries are spooled by
    // onClose). No more pings meanwhile: the store is not used again.
    refusal = err.what
    if (probing !== null) clearInterval(probing)
    app.fatal(err)
  })

  const flushSeconds = metrics === null ? null : new Histogram({ name: 'mantle_audit_flush_duration_seconds', help: 'Time to write one audit batch to the store', buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5], registers: [metrics] })
  const failures = metrics === null ? null : new Counter({ name: 'mantle_audit_write_failures_total', help: 'Audit batch writes the store refused (the batch went to the spool)', registers: [metrics] })
  const quarantined = metrics === null ? null : new Counter({ name: 'mantle_audit_quarantined_total', help: 'Audit entries the store refused for their own data, set aside in the quarantine file of the spool directory (never retried: an operator reads it)', registers: [metrics] })
  // What /diagz shows of the writer since start (the same figures as /metrics, for one instance).
  const tally = { stored: 0, spooled: 0, replayed: 0, quarantined: 0, flushes: 0, failures: 0, lastFlushMs: 0, slowestFlushMs: 0 }
  const writer = new AuditWriter({
    store,
    spool,
    batchSize: opts.batchSize,
    queueMax: opts.queueMax,
    intervalMs: opts.flushIntervalMs,
    log: app.log,
    hooks: {
      stored: (n, s) => {
        tally.stored += n
        tally.flushes++
        tally.lastFlushMs = s * 1000
        tally.slowestFlushMs = Math.max(tally.slowestFlushMs, tally.lastFlushMs)
        entries?.inc({ outcome: 'stored' }, n)
        flushSeconds?.observe(s)
      },
      spooled: n => { tally.spooled += n; entries?.inc({ outcome: 'spooled' }, n) },
      replayed: n => { tally.replayed += n; entries?.inc({ outcome: 'replayed' }, n) },
      found: n => { tally.stored += n; entries?.inc({ outcome: 'stored' }, n) },
      failed: () => { tally.failures++; failures?.inc() },
      quarantined: n => { tally.quarantined += n; quarantined?.inc(n) },
      dropped: n => { entries?.inc({ outcome: 'dropped' }, n) },
      lost: n => { entries?.inc({ outcome: 'lost' }, n) }
    }
  })
  if (metrics !== null) {
    /* eslint-disable no-new */
    new Gauge({ name: 'mantle_audit_queue_depth', help: 'Audit entries waiting in memory for the writer', registers: [metrics], collect () { this.set(writer.depth) } })
    new Gauge({ name: 'mantle_audit_spool_bytes', help: 'Bytes of audit batches in the spool file, waiting for PostgreSQL', registers: [metrics], collect () { this.set(writer.spoolBytes) } })
    new Gauge({ name: 'mantle_audit_store_up', help: '1 when the audit store took the last write', registers: [metrics], collect () { this.set(writer.up ? 1 : 0) } })
    new Gauge({ name: 'mantle_audit_spool_corrupt_batches', help: 'Spool lines skipped on replay (torn by a crash or failing their checksum)', registers: [metrics], collect () { this.set(spool?.corrupt ?? 0) } })
    if (store instanceof MemoryAuditStore) new Gauge({ name: 'mantle_audit_memory_entries', help: 'Audit entries the memory store holds (bounded by BFF_AUDIT_MEMORY_MAX; the oldest are evicted beyond it)', registers: [metrics], collect () { this.set(store.size) } })
    /* eslint-enable no-new */
  }
  // Every entry the gateway makes goes through here or `refused`: its texts made storable first
  // (storableEntry), so that what is hashed is what PostgreSQL holds.
  const enqueue = (entry: AuditEntry): void => writer.enqueue(storableEntry(entry))

  // Neither PostgreSQL nor the spool's disk takes entries, and the backlog is full: what would
  // leave an entry is refused rather than done without one (counted as refused).
  const unrecordable = (): MantleError => {
    entries?.inc({ outcome: 'refused' })
    return new MantleError('OVERLOADED', 'The audit trail cannot record calls now: retry later', { headers: { 'retry-after': '5' } })
  }
  function decide<T> (decision: Decision, run: () => T): T {
    if (writer.saturated) throw unrecordable()
    const startedAt = performance.now()
    let value: T
    try {
      value = run()
    } catch (err) {
      enqueue(decisionEntry(decision, startedAt, err))
      throw err
    }
    enqueue(decisionEntry(decision, startedAt, null))
    return value
  }

  const health = (): AuditHealth => ({ store: store.kind, up: writer.up, spooling: writer.spoolBytes > 0, queueDepth: writer.depth, writing: writer.writing, spoolBytes: writer.spoolBytes, error: writer.error, saturated: writer.saturated, refusal })
  app.decorate('audit', { store, enqueue, health, refused, describe, decide, reached })

  if (app.hasDecorator('diagz')) {
    app.diagz.addStore('audit', () => {
      const h = health()
      if (h.refusal !== null) return { type: h.store, healthy: false, detail: `${h.refusal}: the gateway shuts down` }
      if (!h.up) return { type: h.store, healthy: false, detail: `spooling to disk: ${h.error ?? 'write failed'}` }
      return { type: h.store, healthy: true, ...(h.spooling ? { detail: `replaying ${h.spoolBytes} spooled bytes` } : {}) }
    })
    app.diagz.addSection('audit', () => {
      const h = health()
      return {
        store: h.store,
        up: h.up,
        queueDepth: h.queueDepth,
        queueMax: opts.queueMax,
        spoolBytes: h.spoolBytes,
        ...tally,
        lastFlushMs: Math.round(tally.lastFlushMs * 1000) / 1000,
        slowestFlushMs: Math.round(tally.slowestFlushMs * 1000) / 1000,
        lastError: h.error
      }
    })
  }

  app.pipeline.addStage({
    name: 'audit',
    order: StageOrder.audit,
    build (op) {
      const where = endpoints(op)
      // Not async: the call's own promise is passed on, the entry is built when it settles.
      return (ctx, next) => {
        // Neither PostgreSQL nor the spool's disk takes entries, and the backlog is full: a call
        // is refused rather than served without its entry (which would have nowhere to go).
        if (writer.saturated) throw unrecordable()
        let result: Promise<unknown>
        try {
          result = next(ctx)
        } catch (err) {
          enqueue(callEntry(ctx, where[ctx.protocol], err))
          throw err
        }
        return result.then(value => {
          const entry = callEntry(ctx, where[ctx.protocol], null)
          // One call of several whose answer is bounded as a whole: its entry waits for the face,
          // which may answer PAYLOAD_TOO_LARGE in its result's place (adapters/face.ts).
          if (ctx.answer === null) enqueue(entry)
          else ctx.answer.hold(ctx.requestId, leftOut => { enqueue(leftOut === null ? entry : leftOutEntry(entry, leftOut, ctx)) })
          return value
        }, (err: unknown) => {
          enqueue(callEntry(ctx, where[ctx.protocol], err))
          throw err
        })
      }
    }
  })

  /**
   * Tenant and user of a request outside the pipeline, from its token when it has a valid one,
   * read where the face reads it (requestAuthorization, the rate-limit guard's too): a WebSocket
   * upgrade's header or `?access_token=`; a tRPC call's header, connectionParams or
   * `?access_token=` (such a call refused before it ran was audited as public/anonymous); any
   * other request's header.
   */
  const who = (request: FastifyRequest): { tenant: string, user: string } => {
    try {
      const id = app.identify(requestAuthorization(request), request.raw)
      return { tenant: id.tenant, user: id.user }
    } catch {
      return { tenant: 'public', user: 'anonymous' }
    }
  }
  const httpEntry = (request: FastifyRequest, reply: FastifyReply, action: string, category: Category, status: string, statusCode: number, metadata = NO_METADATA as Record<string, unknown>): AuditEntry => {
    const { tenant, user } = who(request)
    const elapsed = reply.elapsedTime
    const protocol = protocolOf(request.routeOptions.url ?? request.url)
    const [method, path] = endpointOf(request, protocol, action)
    return {
      id: uuidv7(),
      requestId: request.id,
      timestamp: Math.round(Date.now() - elapsed),
      tenantId: tenant,
      userId: user,
      method,
      path,
      protocol,
      action,
      category,
      riskLevel: 'none',
      status,
      statusCode,
      durationMs: Math.round(elapsed * 1000) / 1000,
      metadata,
      clientRequestId: clientRequestId(request.raw)
    }
  }

  // Droppable: an entry of no call, which the writer may drop while saturated. (A declaration:
  // the decorator above hands it out.)
  function refused (request: FastifyRequest, reply: FastifyReply, action: string, code: string, statusCode: number, route?: string): void {
    const entry = httpEntry(request, reply, action, refusedIdentity(code) ? 'auth' : 'security', code, statusCode)
    // A request no route took, made to `route` (a REST path segment too long: overlong-route.ts).
    if (route !== undefined) entry.path = route
    writer.enqueue(storableEntry(entry), true)
  }
  function reached (request: FastifyRequest): boolean {
    const marked = request as Marked
    if (marked[REACHED]) return false
    marked[REACHED] = true
    return true
  }
  // A field of every request, set as it is made (one hidden class), rather than a WeakSet.
  app.decorateRequest(REACHED, false)

  // The contract code of a refusal thrown on a route that audits itself (role, body, rate limit,
  // load shedding), and what its handler described, for its one entry, which onResponse writes.
  const refusals = new WeakMap<FastifyRequest, string>()
  const descriptions = new WeakMap<FastifyRequest, Record<string, unknown>>()
  function describe (request: FastifyRequest, metadata: Record<string, unknown>): void {
    descriptions.set(request, metadata)
  }

  // A refusal thrown on a route that audits itself: its code, for the entry onSend writes.
  const noteRefusal = function noteRefusal (request: FastifyRequest, _reply: FastifyReply, error: Error, done: () => void): void {
    refusals.set(request, toProblem(error, request.id).problem.code)
    done()
  }

  // A request on a call's route (REST, batch, tRPC, GraphQL, /ws) refused before its face's
  // handler has it never becomes a call, and no stage records it: the HTTP guard's 429, a body
  // too large or not JSON, a content or transfer coding, a malformed query string, a WebSocket
  // upgrade of a route that serves none or without valid credentials, a batch of the wrong
  // shape or too long. It is recorded here, once, as `security` (`auth` for a 401 or 403),
  // under the operation the route or tRPC path names, else `http` (`trpc` on tRPC). Before, only
  // bodies were, and a flood the guard refused left no entry. Not a refusal for load
  // (OVERLOADED: shutdown, load shedding, a bound of connections), nor a 404, nor a body its client
  // stopped sending (CLIENT_CLOSED: nothing was refused, nothing ran). Once the handler
  // has the request (reached), what follows is the calls' (recorded by the stage) or the face's
  // own answer. An onError hook of those routes only: nothing on a request that is not refused.
  const earlyRefusal = (operationId: string | undefined) => function auditEarlyRefusal (request: FastifyRequest, reply: FastifyReply, error: Error, done: () => void): void {
    const marked = request as Marked
    if (marked[REACHED]) { done(); return }
    marked[REACHED] = true
    const { problem: p } = toProblem(error, request.id)
    if (p.code !== 'OVERLOADED' && p.code !== 'CLIENT_CLOSED' && p.status !== 404) refused(request, reply, operationId ?? trpcAction(request) ?? 'http', p.code, p.status)
    done()
  }
  // The procedure a tRPC request names, an operation or an event (`trpc` for a batch, or no
  // procedure); null off tRPC. A reload changes no event. Before, an event's subscription refused
  // here (the HTTP guard's 429) was recorded as `trpc`, at `/trpc`.
  const events = new Set(app.pipeline.manifest.events.map(e => e.name))
  const trpcAction = (request: FastifyRequest): string | null => {
    if (!TRPC_ROUTE.test(request.url)) return null
    const path = (request.params as { '*'?: string } | undefined)?.['*']
    return path !== undefined && (app.pipeline.manifest.byName.has(path) || events.has(path)) ? path : 'trpc'
  }

  // The gateway's own endpoints (every /admin/* route and /diagz, each declaring its action as
  // `config.audit`) are audited, refusals included: one entry each, category admin (auth for a
  // 401 or 403, as a call's), with the refusal's code. Before, a body Fastify refused there was
  // recorded twice (once as `security`), every refusal but 400, 401 and 403 was recorded as
  // INTERNAL, and only the audit endpoints were audited at all: a system caller invalidating
  // another tenant's cache, or refused on /diagz, left no entry. Not the probes and the scrape
  // (/healthz, /readyz, /metrics). Routes declared before this plugin are not reached (app.ts
  // registers /diagz after it). Written as the answer goes out (onSend), whether or not the
  // client is still there: onResponse never runs for a client that left first, and a system
  // caller who invalidated another tenant's cache and hung up early left no entry.
  // Once per request: an onSend hook that fails after this one (a header writeHead refuses) has
  // Fastify send an error answer, which runs the onSend hooks again.
  const audited = new WeakSet<FastifyRequest>()
  // Refused (503) because neither the store nor the spool takes entries: no entry, as the stage's
  // refusals leave none (counted as refused).
  const overloaded = new WeakSet<FastifyRequest>()
  const adminAudit = (action: string) => function auditAdminCall (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void): void {
    recordAdmin(request, reply, action)
    done(null, payload)
  }
  // A request answered on its connection already (a 408 for a body too slow) whose body then
  // arrived whole runs nothing (app.ts, notAnsweredAlready: no answer, no onSend): it left no
  // entry. Recorded here, ahead of that hook, as what it was answered.
  const answeredFirst = (action: string) => function auditAnsweredAdminCall (request: FastifyRequest, reply: FastifyReply, done: () => void): void {
    if (answeredStraight.has(request.raw)) recordAdmin(request, reply, action)
    done()
  }
  function recordAdmin (request: FastifyRequest, reply: FastifyReply, action: string): void {
    if (audited.has(request) || overloaded.has(request)) return
    audited.add(request)
    // Answered on its connection already (a 408 for a body too slow), it ends as its client's
    // leaving (499 CLIENT_CLOSED here): recorded as what it was answered.
    const straight = answeredStraight.get(request.raw)
    const statusCode = straight?.[0] ?? reply.statusCode
    const status = straight?.[1] ?? (statusCode < 400 ? 'ok' : (refusals.get(request) ?? (statusCode === 400 ? 'VALIDATION_FAILED' : 'INTERNAL')))
    const category = refusedIdentity(status) ? 'auth' : 'admin'
    enqueue(httpEntry(request, reply, action, category, status, statusCode, descriptions.get(request)))
  }
  // A route that audits itself is refused, as the stage refuses calls, while neither the store
  // nor the spool takes entries and the backlog is full: before, its entries (not droppable) were
  // queued on and on while the admin routes, /diagz and /internal/events were served. First of
  // its onRequest hooks: before the token is checked, so that no caller grows the backlog.
  const auditGuard = function auditGuard (request: FastifyRequest, reply: FastifyReply, done: (err?: Error) => void): void {
    if (!writer.saturated) { done(); return }
    overloaded.add(request)
    done(unrecordable())
  }
  app.addHook('onRoute', (route) => {
    const action = route.config?.audit
    if (action !== undefined) {
      route.onRequest = withHook(route.onRequest, auditGuard, true)
      route.onError = withHook(route.onError, noteRefusal)
      route.onSend = withHook(route.onSend, adminAudit(action))
      route.preValidation = withHook(route.preValidation, answeredFirst(action), true)
    } else if (protocolOf(route.url) !== 'http') {
      // The operation a REST route serves (config.op), not its document's operationId: the batch
      // route has one too, and is no operation.
      route.onError = withHook(route.onError, earlyRefusal(route.config?.op))
    }
  })

  app.get('/admin/audit', {
    config: { audit: 'admin.audit.query' },
    onRequest: app.requireRole('system'),
    schema: {
      hide: true,
      querystring: {
        type: 'object',
        additionalProperties: false,
        properties: {
          tenant: textFilter(256),
          from: DateTime,
          to: DateTime,
          requestId: textFilter(256),
          action: textFilter(256),
          status: textFilter(64),
          limit: { type: 'integer', minimum: 1, maximum: 500, default: 50 },
          cursor: { type: 'string', minLength: 1, maxLength: 200 }
        }
      },
      response: {
        200: { type: 'object', properties: { entries: { type: 'array', items: EntrySchema }, nextCursor: { type: ['string', 'null'] } } },
        '4xx': problem,
        '5xx': problem
      }
    }
  }, async (request, reply) => {
    const q = request.query as { tenant?: string, from?: string, to?: string, requestId?: string, action?: string, status?: string, limit: number, cursor?: string }
    const query: AuditQuery = { limit: q.limit, tenant: q.tenant, requestId: q.requestId, action: q.action, status: q.status }
    if (q.from !== undefined) query.from = timeOf(q.from)
    if (q.to !== undefined) query.to = timeOf(q.to)
    const bad = unplaceable(query)
    if (bad !== null) throw new MantleError('VALIDATION_FAILED', `querystring.${bad} is not a time this endpoint can use (a leap second?)`)
    // As verify refuses it: a reversed range answered 200 with nothing, as if no entry were there.
    if (query.from !== undefined && query.to !== undefined && query.from > query.to) throw new MantleError('VALIDATION_FAILED', 'querystring.from is after querystring.to')
    // Its start to the whole millisecond, once the range is known not to be reversed (a range
    // within one millisecond then holds nothing).
    if (q.from !== undefined && query.from !== undefined) query.from = rangeStart(query.from, q.from)
    if (q.cursor !== undefined) {
      const seq = decodeCursor(q.cursor)
      if (seq === null) throw new MantleError('VALIDATION_FAILED', 'querystring.cursor is not a cursor this endpoint gave')
      query.beforeSeq = seq
    }
    const page = await answered(() => store.query(query))
    return {
      // A timestamp changed after the write to one JavaScript cannot represent is answered null
      // (it was a 500 for every page holding it).
      entries: page.entries.map(e => ({ ...e, timestamp: Number.isNaN(e.timestamp) ? null : new Date(e.timestamp).toISOString() })),
      nextCursor: page.nextSeq === null ? null : encodeCursor(page.nextSeq)
    }
  })

  // One verify at a time per instance: a second is answered 503 OVERLOADED with Retry-After (the
  // contract's code for "busy, retry later"; 409 is a conflict of idempotent calls), and a verify
  // uses at most one of the two read connections, one page at a time, so that GET /admin/audit
  // always has one. Two at once held both for the whole walk: GET waited out its connect timeout.
  let verifying = false
  app.post('/admin/audit/verify', {
    config: { audit: 'admin.audit.verify' },
    onRequest: app.requireRole('system'),
    schema: {
      hide: true,
      body: {
        type: ['object', 'null'],
        additionalProperties: false,
        properties: {
          from: DateTime,
          to: DateTime,
          next: { type: 'string', minLength: 1, maxLength: 300 },
          limit: { type: 'integer', minimum: 1, maximum: VERIFY_MAX_ENTRIES }
        }
      },
      response: {
        200: {
          type: 'object',
          properties: {
            ok: { type: 'boolean' },
            checked: { type: 'integer' },
            firstBroken: { anyOf: [{ type: 'null' }, { type: 'object', properties: { id: { type: 'string' }, requestId: { type: 'string' } } }] },
            next: { type: 'string' },
            through: { type: 'integer' },
            skipped: { type: 'integer' }
          }
        },
        '4xx': problem,
        '5xx': problem
      }
    }
  }, async (request, reply) => {
    const body = (request.body ?? {}) as { from?: string, to?: string, next?: string, limit?: number }
    let from = body.from === undefined ? undefined : timeOf(body.from)
    const to = body.to === undefined ? undefined : timeOf(body.to)
    const bad = unplaceable({ from, to })
    if (bad !== null) throw new MantleError('VALIDATION_FAILED', `body.${bad} is not a time this endpoint can use (a leap second?)`)
    if (from !== undefined && to !== undefined && from > to) throw new MantleError('VALIDATION_FAILED', 'body.from is after body.to')
    if (body.from !== undefined && from !== undefined) from = rangeStart(from, body.from)
    let next: VerifyCursor | undefined
    if (body.next !== undefined) {
      // The range travels in the cursor: a from or to beside it would be ignored, so it is refused.
      if (from !== undefined || to !== undefined) throw new MantleError('VALIDATION_FAILED', 'body.next carries its range: send it without from and to')
      const cursor = decodeVerifyCursor(body.next)
      if (cursor === null) throw new MantleError('VALIDATION_FAILED', 'body.next is not a position this endpoint gave')
      next = cursor
    }
    if (verifying) throw new MantleError('OVERLOADED', 'A verify is running on this instance: retry when it ends (one call walks at most 5 s)', { headers: { 'retry-after': '5' } })
    verifying = true
    // A client that leaves stops the walk at its next page.
    const left = new AbortController()
    const leave = (): void => { left.abort() }
    if (!watchCaller(reply.raw, leave)) leave()
    try {
      const result = await answered(async () => await store.verify({ from, to }, { next, limit: body.limit, signal: left.signal }))
      return result.next === undefined ? result : { ...result, next: encodeVerifyCursor(result.next) }
    } catch (err) {
      // Its one entry says so (the route's onSend writes it, the client gone or not).
      if (left.signal.aborted) throw new MantleError('CLIENT_CLOSED', 'The client left: the verify was stopped', { cause: err })
      throw err
    } finally {
      unwatchCaller(reply.raw, leave)
      verifying = false
    }
  })

  // Retention: the oldest entries go in small batches, each its own short transaction.
  let pruning = false
  const prune = async (): Promise<void> => {
    if (pruning) return
    pruning = true
    try {
      // An age, which the store measures by its own clock (PostgreSQL's), not this instance's.
      const ageMs = opts.retentionDays * 86_400_000
      let n: number
      do {
        n = await store.prune(ageMs, PRUNE_BATCH)
        if (n > 0) entries?.inc({ outcome: 'pruned' }, n)
      } while (n === PRUNE_BATCH)
    } catch (err) {
      app.log.warn({ err: (err as Error).message }, 'audit retention failed: retried at the next run')
    } finally {
      pruning = false
    }
  }
  const retention = setInterval(() => { prune().catch(() => {}) }, opts.retentionIntervalMs ?? 3_600_000)
  // Readiness without traffic: an idle writer asks the store whether it answers (see probe).
  if (opts.store === 'postgres' && refusal === null) {
    probing = setInterval(() => { writer.probe(ping).catch(() => {}) }, opts.probeIntervalMs ?? 2000)
    probing.unref()
  }
  // PostgreSQL unreachable at start-up: down from the start, not up until a write fails.
  if (!reachable) await writer.probe(async () => { throw new Error(startError ?? 'no answer') })
  retention.unref()
  app.addHook('onReady', async () => { prune().catch(() => {}) })

  // Runs after the HTTP server has closed (Fastify closes it in its first onClose): every call
  // has been answered and enqueued; what is left is stored or spooled before the process ends.
  app.addHook('onClose', async () => {
    clearInterval(retention)
    if (probing !== null) clearInterval(probing)
    try {
      await writer.close()
    } catch (err) {
      // The writer itself logs, with their count, and counts (outcome "lost") the entries neither
      // the store nor the spool's disk took; this is any other failure, said so. The shutdown
      // goes on (it stopped here, and every later onClose hook with it: connections stayed open
      // and the process never ended by itself).
      app.log.error({ err: (err as Error).message }, 'audit writer failed at shutdown')
    } finally {
      // Every entry is stored, spooled or counted lost by now. A connection still held by a write
      // PostgreSQL does not answer keeps the pool's end() waiting out its query timeout, and a
      // spool whose disk does not answer keeps its close waiting for the append under way (it
      // runs one at a time) for ever: the shutdown waits for neither beyond a second (it ended
      // killed, past its grace, every later onClose hook unrun).
      const spoolClosed = spool?.close().catch((err: Error) => app.log.warn({ err: err.message }, 'audit spool close failed'))
      const closed = store.close().catch((err: Error) => app.log.warn({ err: err.message }, 'audit store close failed'))
      await Promise.race([Promise.all([spoolClosed, closed]), sleep(STORE_CLOSE_MS, undefined, { ref: false })])
    }
  })
}

export default fp(auditPlugin, { name: 'mantle-audit', dependencies: ['mantle-pipeline'], fastify: '5.x' })
