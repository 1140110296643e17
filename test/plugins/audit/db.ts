import pg from 'pg'
import tap from 'tap'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createServer, connect, type AddressInfo } from 'node:net'
import { sockets } from '../../proxy.js'
import { PostgresAuditStore } from '../../../plugins/audit/postgres-store.js'
import { migrate } from '../../../plugins/audit/migrations.js'

interface Teardown { teardown: (fn: () => unknown) => void }

export const PG_URL = process.env.TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test'
export const PG_PORT = Number(new URL(PG_URL).port || 5432)

/** The server's URL with another database (and optionally another port: a proxy in front). */
export function databaseUrl (name: string, port = PG_PORT): string {
  const url = new URL(PG_URL)
  url.pathname = '/' + name
  url.port = String(port)
  return url.toString()
}

/** True when the shared PostgreSQL answers. With CI=true a missing server fails the test file. */
export async function postgresAvailable (): Promise<boolean> {
  // Three tries of 5 s: one try of 2 s timed out on a loaded machine (4 test processes at once),
  // and the part's tests were skipped, or with CI=true failed, with PostgreSQL up.
  for (let attempt = 1; ; attempt++) {
    const client = new pg.Client({ connectionString: PG_URL, connectionTimeoutMillis: 5000 })
    try {
      await client.connect()
      return true
    } catch (err) {
      if (attempt < 3) continue
      if (process.env.CI === 'true') throw err
      return false
    } finally {
      await client.end().catch(() => {})
    }
  }
}

/** Drops of this process's databases still running: a subtest does not wait for its own. */
const drops = new Set<Promise<void>>()
let template: Promise<string> | null = null

async function admin<T> (run: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: PG_URL })
  await client.connect()
  try {
    return await run(client)
  } finally {
    await client.end()
  }
}

let waiting = false
/** Once per process: its last test waits for the drops still running, then drops the template. */
function waitAtEnd (): void {
  if (waiting) return
  waiting = true
  tap.teardown(async () => {
    while (drops.size > 0) await Promise.all([...drops])
    if (template !== null) {
      const name = await template.catch(() => null)
      if (name !== null) await admin(async c => { await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`) }).catch(() => {})
    }
  })
}

function dropLater (name: string): void {
  waitAtEnd()
  const drop: Promise<void> = admin(async c => { await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`) })
    .catch(() => {})
    .then(() => { drops.delete(drop) })
  drops.add(drop)
}

/**
 * One migrated database per test process, dropped when the process's tests end: a migrated
 * database for a test is a copy of it (about 0.2 s, where creating one and migrating it took
 * about 1 s). Only migrate() writes it, and nothing connects to it after.
 */
async function migratedTemplate (): Promise<string> {
  template ??= (async () => {
    const name = 'mantle_tpl_' + randomUUID().replace(/-/g, '').slice(0, 16)
    waitAtEnd()
    await admin(async c => { await c.query(`CREATE DATABASE ${name}`) })
    await migrate(databaseUrl(name))
    return name
  })()
  return await template
}

/**
 * A fresh database for one test, dropped after it. Returns its name. With `migrated`, a copy of
 * a database migrated to the latest version (what `migrate(url)` on a fresh one gives); without,
 * empty (`encoding`: in that encoding, not the server's). The DROP (0.3 to 1 s) runs behind the next tests; the process's last test waits for it.
 */
export async function createTestDatabase (t: Teardown, { migrated = false, encoding }: { migrated?: boolean, encoding?: string } = {}): Promise<string> {
  const name = 'mantle_t_' + randomUUID().replace(/-/g, '').slice(0, 16)
  const from = migrated ? ` TEMPLATE ${await migratedTemplate()}` : encoding === undefined ? '' : ` ENCODING '${encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0`
  await admin(async c => { await c.query(`CREATE DATABASE ${name}${from}`) })
  t.teardown(() => { dropLater(name) })
  return name
}

/** Runs one query on its own connection. */
export async function sql<T extends pg.QueryResultRow = Record<string, unknown>> (url: string, text: string, params: unknown[] = []): Promise<T[]> {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  try {
    return (await client.query<T>(text, params)).rows
  } finally {
    await client.end()
  }
}

/** A spool directory of its own for one gateway, removed at teardown. */
export function spoolDir (t: Teardown): string {
  const dir = mkdtempSync(join(tmpdir(), 'mantle-audit-test-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** A PostgreSQL store on a new, migrated database. */
export async function pgStore (t: Teardown): Promise<{ url: string, store: PostgresAuditStore }> {
  const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
  const store = new PostgresAuditStore({ databaseUrl: url })
  t.teardown(() => store.close())
  return { url, store }
}

/** The ids of the stored entries, in the chain's order. */
export const storedIds = async (url: string): Promise<string[]> => (await sql<{ id: string }>(url, 'SELECT id FROM bff_audit_entries ORDER BY seq')).map(r => r.id)

/** The startup parameters PgBouncer takes from a client (its other ones refuse the connection). */
const POOLER_PARAMETERS = new Set(['user', 'database', 'application_name', 'client_encoding', 'datestyle', 'timezone', 'standard_conforming_strings'])

/**
 * A TCP proxy in front of the shared PostgreSQL that reads each connection's startup packet and,
 * as PgBouncer does, refuses one carrying a parameter it does not know (FATAL 08P01
 * "unsupported startup parameter: <name>"); others are forwarded. `startups` holds each packet's
 * parameters.
 */
export async function startPoolerProxy (t: Teardown): Promise<{ port: number, startups: Array<Record<string, string>> }> {
  const startups: Array<Record<string, string>> = []
  const { open, track } = sockets()
  const server = createServer(client => {
    track(client)
    let head = Buffer.alloc(0)
    const startup = (chunk: Buffer): void => {
      head = Buffer.concat([head, chunk])
      if (head.length < 8 || head.length < head.readInt32BE(0)) return
      client.off('data', startup)
      const length = head.readInt32BE(0)
      // user\0name\0database\0name\0...\0 after the length and the protocol version.
      const fields = head.subarray(8, length - 1).toString('utf8').split('\0')
      const parameters: Record<string, string> = {}
      for (let i = 0; i + 1 < fields.length; i += 2) parameters[fields[i]] = fields[i + 1]
      startups.push(parameters)
      const unknown = Object.keys(parameters).find(name => !POOLER_PARAMETERS.has(name.toLowerCase()))
      if (unknown !== undefined) {
        const body = Buffer.from(`SFATAL\0VFATAL\0C08P01\0Munsupported startup parameter: ${unknown}\0\0`)
        const header = Buffer.alloc(5)
        header.write('E')
        header.writeInt32BE(body.length + 4, 1)
        client.end(Buffer.concat([header, body]))
        return
      }
      const upstream = connect(PG_PORT, '127.0.0.1')
      track(upstream)
      upstream.write(head)
      client.pipe(upstream)
      upstream.pipe(client)
    }
    client.on('data', startup)
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const s of open) s.destroy()
    await new Promise(resolve => server.close(resolve))
  })
  return { port: (server.address() as AddressInfo).port, startups }
}

/**
 * The sources `npm run migrate` loads (scripts/migrate.ts and what it imports), for the tests that
 * run it from a copy of the checkout holding only them. One list: the two such tests each kept
 * their own, and a new import of the script's (cli.ts) failed one of them.
 */
export const MIGRATE_SOURCES: readonly string[] = ['scripts/migrate.ts', 'plugins/audit/migrations.ts', 'schemas/config.ts', 'plugins/auth/keys.ts', 'read-json.ts', 'cli.ts']

/**
 * The statements `run` sends PostgreSQL (reads and writes: every query of a pg client meanwhile),
 * each with its parameters.
 */
export async function statementsOf (run: () => Promise<unknown>, match = /^\s*(WITH|SELECT|DELETE)/): Promise<Array<{ text: string, values: unknown[] }>> {
  const seen: Array<{ text: string, values: unknown[] }> = []
  const query = pg.Client.prototype.query
  pg.Client.prototype.query = function (this: pg.Client, q: string | pg.QueryConfig, values?: unknown) {
    const text = typeof q === 'string' ? q : q.text
    if (match.test(text)) seen.push({ text, values: (typeof q === 'string' ? values : q.values) as unknown[] ?? [] })
    return (query as (...args: unknown[]) => unknown).apply(this, [...arguments])
  } as typeof query
  try {
    await run()
  } finally {
    pg.Client.prototype.query = query
  }
  return seen
}
