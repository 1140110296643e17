import Postgrator from 'postgrator'
import pg from 'pg'
import { readdir } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { basename } from 'node:path'
import { ConfigError } from '../../schemas/config.js'

/** migrations/ beside the source tree, and beside dist/ in a build (scripts/copy-assets.mjs). */
export const MIGRATIONS_DIR = fileURLToPath(new URL('../../migrations/', import.meta.url))
const SCHEMA_TABLE = 'bff_schema_version'
// Two instances starting at once must not both migrate: a transaction-level advisory lock orders
// them. It is released at COMMIT or ROLLBACK, also behind a transaction-mode pooler (PgBouncer),
// which keeps the server connection, and a session-level lock with it, after the client leaves.
const MIGRATION_LOCK = 0x6d616e746c65 // "mantle"
/** How long a migration waits for the lock (another migration running), or for a table's lock. */
const LOCK_TIMEOUT_MS = 60_000
const LOCK_NOT_AVAILABLE = '55P03'

export interface MigrationStatus {
  current: number
  max: number
  pending: number[]
}

export interface MigrateOptions {
  /** How long a wait for a lock may last (the migration lock, a table's): LOCK_TIMEOUT_MS. */
  lockTimeoutMs?: number
  /** How long the checks before a run may wait for PostgreSQL's answer: ANSWER_TIMEOUT_MS. */
  answerTimeoutMs?: number
}

/**
 * How long a query that reads (the database's encoding and schema, its version, and every query
 * of `status`) waits for PostgreSQL's answer. A PostgreSQL, or a pooler (PgBouncer waiting for a
 * server connection), that takes the connection and then answers nothing held them for ever: a
 * gateway's start-up failed after 30 s with Fastify's "Plugin did not start in time" (one whose
 * PostgreSQL is down starts and spools), and `npm run migrate -- status` never ended. The
 * migrations themselves are not bounded so: an index built on a large table takes its time.
 */
const ANSWER_TIMEOUT_MS = 10_000

/**
 * Runs `fn` with postgrator on one connection of its own (closed afterwards). With `lock`, `fn`
 * runs in one transaction that holds the migration lock: postgrator's statements (DDL is
 * transactional in PostgreSQL) and its version rows commit together, or not at all.
 * The version table is the one in the connection's current schema (DATABASE_URL's search_path),
 * where the migrations create theirs: postgrator looked it up by name in every schema.
 */
async function withMigrator<T> (databaseUrl: string, lock: { timeoutMs: number } | null, answerTimeoutMs: number, fn: (m: Postgrator) => Promise<T>): Promise<T> {
  // A build without its SQL files migrated nothing and reported success.
  const files = await readdir(MIGRATIONS_DIR).catch(() => [])
  if (!files.some(f => f.endsWith('.sql'))) throw new ConfigError(`no migrations found in ${MIGRATIONS_DIR}`)
  const client = new pg.Client({ connectionString: databaseUrl, connectionTimeoutMillis: 5000 })
  client.on('error', () => {})
  await client.connect()
  // A query that reads, bounded by answerTimeoutMs (pg's query_timeout), its expiry said as such.
  const read = async <R extends pg.QueryResultRow>(text: string): Promise<pg.QueryResult<R>> => {
    try {
      // query_timeout per query is pg's (Client#query reads it), not in its types.
      const query: pg.QueryConfig & { query_timeout: number } = { text, query_timeout: answerTimeoutMs }
      return await client.query<R>(query)
    } catch (err) {
      if ((err as Error).message === 'Query read timeout') throw new Error(`PostgreSQL did not answer within ${answerTimeoutMs} ms (${text})`, { cause: err })
      throw err
    }
  }
  try {
    // Entries carry what clients send (tags, tenants, paths): a database in another encoding
    // (LATIN1, ...) refused each entry holding a character it lacks (22P05), and such entries
    // were taken out of the trail into the quarantine file. SQL_ASCII stores the bytes as sent.
    const encoding = (await read<{ server_encoding: string }>('SHOW server_encoding')).rows[0].server_encoding
    if (encoding !== 'UTF8' && encoding !== 'SQL_ASCII') throw new ConfigError(`the audit database's encoding is ${encoding}: it must be UTF8 (entries holding a character ${encoding} lacks would be refused and kept out of the trail); create it with ENCODING 'UTF8'`)
    const schema = (await read<{ s: string | null }>('SELECT current_schema() AS s')).rows[0].s
    if (schema === null) throw new Error('the search_path of DATABASE_URL names no existing schema')
    // postgrator splits the table's name at a dot and writes the schema's name into SQL unescaped.
    if (/[."'\\]/.test(schema)) throw new Error(`the current schema ${JSON.stringify(schema)} has a dot, a quote or a backslash in its name: migrations need a plain one`)
    const migrator = new Postgrator({
      migrationPattern: MIGRATIONS_DIR + '*',
      driver: 'pg',
      schemaTable: `${schema}.${SCHEMA_TABLE}`,
      // `status` only reads (its every query bounded); a run's migrations are not.
      execQuery: async (query: string) => lock === null ? await read(query) : await client.query(query)
    })
    if (lock === null) return await fn(migrator)
    await client.query('BEGIN')
    try {
      await client.query(`SET LOCAL lock_timeout = ${Math.max(1, Math.round(lock.timeoutMs))}`)
      await client.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK]).catch((err: { code?: string }) => {
        if (err.code === LOCK_NOT_AVAILABLE) throw new Error(`another migration of this database is running: the migration lock was not free after ${lock.timeoutMs} ms; try again once it has finished`)
        throw err
      })
      const result = await fn(migrator)
      await client.query('COMMIT')
      return result
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {})
      if ((err as { code?: string }).code === LOCK_NOT_AVAILABLE) throw new Error(`a migration waited ${lock.timeoutMs} ms for a lock another transaction holds (on a table or a row) and was rolled back (${(err as Error).message}); try again`)
      throw err
    }
  } finally {
    await client.end().catch(() => {})
  }
}

/** Reads the schema's version without the migration lock. */
export async function migrationStatus (databaseUrl: string, opts: Pick<MigrateOptions, 'answerTimeoutMs'> = {}): Promise<MigrationStatus> {
  return await withMigrator(databaseUrl, null, opts.answerTimeoutMs ?? ANSWER_TIMEOUT_MS, async m => {
    const [current, max, all] = await Promise.all([m.getDatabaseVersion(), m.getMaxVersion(), m.getMigrations()])
    const pending = [...new Set(all.filter(x => x.action === 'do' && x.version > current).map(x => x.version))].sort((a, b) => a - b)
    return { current, max, pending }
  })
}

/** The refusal of `down` on a database migrated past this release (a rolled-back deploy). */
export function newerThanRelease (current: number, max: number): string {
  return `the database is at version ${current}, newer than this release (its newest migration is ${max}): run down from the release that has migration ${current}`
}

/**
 * Migrates up to the latest version, or to `target` (down when it is lower), in one transaction.
 * A database newer than this release (a rolled-back deploy) is left as it is by `up`, and a
 * `target` is refused there: this release has not the undo steps of the newer migrations.
 */
export async function migrate (databaseUrl: string, target?: number, opts: MigrateOptions = {}): Promise<{ from: number, to: number, ran: string[] }> {
  return await withMigrator(databaseUrl, { timeoutMs: opts.lockTimeoutMs ?? LOCK_TIMEOUT_MS }, opts.answerTimeoutMs ?? ANSWER_TIMEOUT_MS, async m => {
    const [from, max] = await Promise.all([m.getDatabaseVersion(), m.getMaxVersion()])
    if (from > max) {
      if (target === undefined) return { from, to: from, ran: [] }
      throw new Error(newerThanRelease(from, max))
    }
    const ran = await m.migrate(target === undefined ? 'max' : String(target))
    return { from, to: await m.getDatabaseVersion(), ran: ran.map(r => basename(r.filename)) }
  })
}
