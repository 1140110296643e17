import Postgrator from 'postgrator'
import pg from 'pg'
import { fileURLToPath } from 'node:url'
import { basename } from 'node:path'

/** migrations/ beside the source tree, and beside dist/ in a build (scripts/copy-assets.mjs). */
export const MIGRATIONS_DIR = fileURLToPath(new URL('../../migrations/', import.meta.url))
const SCHEMA_TABLE = 'bff_schema_version'
// Two instances starting at once must not both migrate: a session-level advisory lock orders them.
const MIGRATION_LOCK = 0x6d616e746c65 // "mantle"

export interface MigrationStatus {
  current: number
  max: number
  pending: number[]
}

/**
 * Runs `fn` with postgrator on one connection of its own (closed afterwards) while holding the
 * migration lock.
 */
async function withMigrator<T> (databaseUrl: string, fn: (m: Postgrator) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: databaseUrl, connectionTimeoutMillis: 5000 })
  client.on('error', () => {})
  await client.connect()
  try {
    await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK])
    const migrator = new Postgrator({
      migrationPattern: MIGRATIONS_DIR + '*',
      driver: 'pg',
      schemaTable: SCHEMA_TABLE,
      execQuery: async (query: string) => await client.query(query)
    })
    return await fn(migrator)
  } finally {
    await client.end().catch(() => {})
  }
}

export async function migrationStatus (databaseUrl: string): Promise<MigrationStatus> {
  return await withMigrator(databaseUrl, async m => {
    const [current, max, all] = await Promise.all([m.getDatabaseVersion(), m.getMaxVersion(), m.getMigrations()])
    const pending = [...new Set(all.filter(x => x.action === 'do' && x.version > current).map(x => x.version))].sort((a, b) => a - b)
    return { current, max, pending }
  })
}

/** Migrates up to the latest version, or to `target` (down when it is lower). */
export async function migrate (databaseUrl: string, target?: number): Promise<{ from: number, to: number, ran: string[] }> {
  return await withMigrator(databaseUrl, async m => {
    const from = await m.getDatabaseVersion()
    const ran = await m.migrate(target === undefined ? 'max' : String(target))
    return { from, to: await m.getDatabaseVersion(), ran: ran.map(r => basename(r.filename)) }
  })
}
