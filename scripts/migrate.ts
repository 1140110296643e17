// npm run migrate [-- up | down [version] | status]: the audit database's schema, with the
// same migrations the gateway runs at start-up outside production. Reads DATABASE_URL.
import { resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { migrate, migrationStatus, newerThanRelease } from '../plugins/audit/migrations.js'
import { urlRefusal } from '../schemas/config.js'

export async function main (argv: string[], env: Record<string, string | undefined> = process.env): Promise<string> {
  const url = env.DATABASE_URL
  if (url === undefined || url === '') throw new Error('DATABASE_URL is not set')
  const refused = urlRefusal('DATABASE_URL', url)
  if (refused !== null) throw new Error(refused)
  const [command = 'up', arg, ...more] = argv
  const usage = 'use up, down [version] or status'
  const words = (list: string[]): string => list.map(w => JSON.stringify(w)).join(' ')
  // A word a command does not take is refused before anything runs: `up 3` migrated to the newest
  // version (an operator who meant to stop short of a migration got it), and `status now` or
  // `down 2 1` ran as without their stray word.
  if (command === 'up' && arg !== undefined) throw new Error(`up takes no version (it migrates to the newest): got ${words(argv.slice(1))}; ${usage}`)
  if (command === 'status' && arg !== undefined) throw new Error(`status takes nothing: got ${words(argv.slice(1))}; ${usage}`)
  if (command === 'down' && more.length > 0) throw new Error(`down takes one version at most: got ${words(argv.slice(1))}; ${usage}`)
  if (command === 'status') {
    const s = await migrationStatus(url)
    const newer = s.current > s.max ? ` (the database is newer than this release, whose newest migration is ${s.max})` : ''
    return `version ${s.current} of ${s.max}; pending: ${s.pending.length === 0 ? 'none' : s.pending.join(', ')}${newer}`
  }
  if (command === 'up') {
    const r = await migrate(url)
    return `migrated up from ${r.from} to ${r.to}${r.ran.length > 0 ? ': ' + r.ran.join(', ') : ' (nothing to do)'}`
  }
  if (command === 'down') {
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
  throw new Error(`unknown command ${command}: ${usage}`)
}

// As a file URL: `file://${argv[1]}` did not percent-encode, so from a checkout whose path has a
// space the script did nothing and exited 0 (a deploy's migration step "passed" unmigrated).
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).then(out => { process.stdout.write(out + '\n') }, (err: Error) => {
    process.stderr.write(`migrate: ${err.message}\n`)
    process.exitCode = 1
  })
}
