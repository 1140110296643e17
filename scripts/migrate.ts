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
  const [command = 'up', arg] = argv
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
  throw new Error(`unknown command ${command}: use up, down [version] or status`)
}

// As a file URL: `file://${argv[1]}` did not percent-encode, so from a checkout whose path has a
// space the script did nothing and exited 0 (a deploy's migration step "passed" unmigrated).
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).then(out => { process.stdout.write(out + '\n') }, (err: Error) => {
    process.stderr.write(`migrate: ${err.message}\n`)
    process.exitCode = 1
  })
}
