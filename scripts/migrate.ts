// npm run migrate [-- up | down [version] | status]: the audit database's schema, with the
// same migrations the gateway runs at start-up outside production. Reads DATABASE_URL.
import { resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { migrate, migrationStatus, newerThanRelease } from '../plugins/audit/migrations.js'
import { urlRefusal } from '../schemas/config.js'
import { asksHelp, refuseUsage } from '../cli.js'

export const USAGE = `Usage: npm run migrate [-- up | down [version] | status]
The audit database's schema (DATABASE_URL), with the migrations the gateway runs at start-up
outside production: up (the default) migrates to the newest version; down undoes the newest
migration, or down to the version given (0 undoes them all; refused while the table holds
entries); status prints the version and what is pending.`

/** A command line migrate does not take (exit status 2, with the usage). */
export class UsageError extends Error {}

export async function main (argv: string[], env: Record<string, string | undefined> = process.env): Promise<string> {
  if (asksHelp(argv)) return USAGE
  const [command = 'up', arg, ...more] = argv
  const usage = 'use up, down [version] or status'
  const words = (list: string[]): string => list.map(w => JSON.stringify(w)).join(' ')
  // A word a command does not take is refused before anything runs: `up 3` migrated to the newest
  // version (an operator who meant to stop short of a migration got it), and `status now` or
  // `down 2 1` ran as without their stray word.
  if (command === 'up' && arg !== undefined) throw new UsageError(`up takes no version (it migrates to the newest): got ${words(argv.slice(1))}; ${usage}`)
  if (command === 'status' && arg !== undefined) throw new UsageError(`status takes nothing: got ${words(argv.slice(1))}; ${usage}`)
  if (command === 'down' && more.length > 0) throw new UsageError(`down takes one version at most: got ${words(argv.slice(1))}; ${usage}`)
  if (command !== 'up' && command !== 'down' && command !== 'status') throw new UsageError(`unknown command ${command}: ${usage}`)
  const url = env.DATABASE_URL
  if (url === undefined || url === '') throw new Error('DATABASE_URL is not set')
  const refused = urlRefusal('DATABASE_URL', url)
  if (refused !== null) throw new Error(refused)
  if (command === 'status') {
    const s = await migrationStatus(url)
    const newer = s.current > s.max ? ` (the database is newer than this release, whose newest migration is ${s.max})` : ''
    return `version ${s.current} of ${s.max}; pending: ${s.pending.length === 0 ? 'none' : s.pending.join(', ')}${newer}`
  }
  if (command === 'up') {
    const r = await migrate(url)
    return `migrated up from ${r.from} to ${r.to}${r.ran.length > 0 ? ': ' + r.ran.join(', ') : ' (nothing to do)'}`
  }
  // The command is down.
  const s = await migrationStatus(url)
  // This release has not the undo steps of a newer one's migrations (a rolled-back deploy).
  if (s.current > s.max) throw new Error(newerThanRelease(s.current, s.max))
  // Digits only: Number('') and Number(' ') are 0, and `down "$VERSION"` with VERSION unset
  // dropped the whole audit table.
  const target = arg === undefined ? Math.max(0, s.current - 1) : /^[0-9]+$/.test(arg) ? Number(arg) : NaN
  if (!Number.isInteger(target) || target < 0 || target > s.current) throw new Error(`down needs a version from 0 to ${s.current}, not ${JSON.stringify(arg)}`)
  const r = await migrate(url, target)
  return `migrated down from ${r.from} to ${r.to}${r.ran.length > 0 ? ': ' + r.ran.join(', ') : ' (nothing to do)'}`
}

// As a file URL: `file://${argv[1]}` did not percent-encode, so from a checkout whose path has a
// space the script did nothing and exited 0 (a deploy's migration step "passed" unmigrated).
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).then(out => { process.stdout.write(out + '\n') }, (err: Error) => {
    if (err instanceof UsageError) return refuseUsage('migrate', err.message, USAGE)
    process.stderr.write(`migrate: ${err.message}\n`)
    process.exitCode = 1
  })
}
