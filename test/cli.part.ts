import t from 'tap'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { answerHelp, asksHelp, noArguments, refusedByParseArgs, refuseUsage } from '../cli.js'
import { main as migrate, UsageError, USAGE as MIGRATE_USAGE } from '../scripts/migrate.js'

// One convention for every command's arguments (cli.ts): --help or -h prints the usage on stdout
// and exits 0 before anything runs; an argument the command does not take is refused on stderr
// with the usage, exit status 2. Before, `npm start -- --help` started the gateway and `--port`
// was ignored, `fuzz -h` died with a stack trace, token's --help exited 2 on stderr, and codegen,
// migrate and chaos knew no --help.

const root = fileURLToPath(new URL('..', import.meta.url))

interface Ran { code: number | null, out: string, err: string }

/** Runs a command as `npm run` does (node --import tsx <script>), without tap's instrumentation (see server-signals.part.ts). */
async function run (script: string, args: string[]): Promise<Ran> {
  const child = spawn('/usr/bin/env', ['-u', 'NODE_OPTIONS', '-u', 'NODE_V8_COVERAGE', process.execPath, '--import', 'tsx', script, ...args], {
    cwd: root,
    // No DATABASE_URL: migrate's --help and its refusals need none.
    env: { PATH: process.env.PATH, NODE_ENV: 'test', PORT: '0', HOST: '127.0.0.1', KERNEL_PORT: '0' },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let out = ''
  let err = ''
  child.stdout.on('data', (chunk: Buffer) => { out += chunk.toString() })
  child.stderr.on('data', (chunk: Buffer) => { err += chunk.toString() })
  // A command that ran instead of answering (the gateway, the Kernel) is stopped: the test then fails on its exit.
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000)
  const code = await new Promise<number | null>(resolve => child.once('exit', code => resolve(code)))
  clearTimeout(timer)
  return { code, out, err }
}

const COMMANDS: Array<{ script: string, usage: RegExp, bad: string[], refusal: RegExp }> = [
  { script: 'server.ts', usage: /^Usage: npm start/, bad: ['--port', '8080'], refusal: /^mantle: takes no arguments, got "--port" "8080"/ },
  { script: 'kernel/server.ts', usage: /^Usage: npm run kernel/, bad: ['4001'], refusal: /^kernel: takes no arguments, got "4001"/ },
  { script: 'scripts/token.ts', usage: /^Usage: npm run token/, bad: ['--nope'], refusal: /^token: Unknown option '--nope'/ },
  { script: 'scripts/codegen.ts', usage: /^Usage: npm run codegen/, bad: ['--nope'], refusal: /^mantle: Unknown option '--nope'/ },
  { script: 'scripts/migrate.ts', usage: /^Usage: npm run migrate/, bad: ['sideways'], refusal: /^migrate: unknown command sideways/ },
  { script: 'loadtest/fuzz.ts', usage: /^Usage: npm run fuzz/, bad: ['--nope'], refusal: /^fuzz: Unknown option '--nope'/ },
  { script: 'loadtest/chaos.ts', usage: /^Usage: npm run chaos/, bad: ['--nope'], refusal: /^chaos: Unknown option '--nope'/ },
  { script: 'loadtest/bench.ts', usage: /^Usage: npm run bench/, bad: ['--nope'], refusal: /^bench: Unknown option '--nope'/ }
]

t.test('every command answers --help with its usage on stdout, exit 0, and refuses an argument it does not take with exit 2', async t => {
  // Two commands at a time: each loads its sources through tsx. -h is read by the same function
  // as --help (asksHelp, tested below): it is run once, where it died with a stack trace.
  const pending = COMMANDS.flatMap(c => [['--help'], c.bad].map(args => ({ c, args })))
  pending.push({ c: COMMANDS.find(c => c.script === 'loadtest/fuzz.ts')!, args: ['-h'] })
  const results: Array<{ c: typeof COMMANDS[number], args: string[], ran: Ran }> = []
  while (pending.length > 0) {
    const batch = pending.splice(0, 2)
    results.push(...await Promise.all(batch.map(async ({ c, args }) => ({ c, args, ran: await run(c.script, args) }))))
  }
  for (const { c, args, ran } of results) {
    const what = `${c.script} ${args.join(' ')}`
    if (args === c.bad) {
      t.equal(ran.code, 2, `${what}: exit status 2`)
      t.match(ran.err, c.refusal, `${what}: says what it refused`)
      t.match(ran.err, /Usage: npm /, `${what}: with the usage`)
      t.equal(ran.out, '', `${what}: nothing on stdout`)
    } else {
      t.equal(ran.code, 0, `${what}: exit status 0`)
      t.match(ran.out, c.usage, `${what}: the usage on stdout`)
      t.equal(ran.err, '', `${what}: nothing on stderr`)
    }
  }
})

t.test('cli.ts: what a command line asks', async t => {
  t.ok(asksHelp(['--help']))
  t.ok(asksHelp(['--tenant', 'a', '-h']))
  t.notOk(asksHelp([]))
  t.notOk(asksHelp(['--', '--help']), 'not after --')
  t.notOk(asksHelp(['--helpful', '-hh']))
  let thrown: unknown = null
  try { parseArgs({ args: ['--nope'], options: {} }) } catch (err) { thrown = err }
  t.ok(refusedByParseArgs(thrown), 'parseArgs refusing an option')
  t.notOk(refusedByParseArgs(new Error('--zone must be public')), 'a command\'s own refusal')
  t.notOk(refusedByParseArgs(null))

  const written: string[] = []
  const stdout = process.stdout.write
  const stderr = process.stderr.write
  const exitCode = process.exitCode
  process.stdout.write = ((chunk: string) => { written.push('out:' + chunk); return true }) as typeof process.stdout.write
  process.stderr.write = ((chunk: string) => { written.push('err:' + chunk); return true }) as typeof process.stderr.write
  const codes: Array<number | string | undefined | null> = []
  const answers: boolean[] = []
  try {
    // No assertion while stdout is taken: tap writes its own there.
    answers.push(answerHelp(['x'], 'U'), answerHelp(['-h'], 'U'), answerHelp(['--help'], 'V\n'), noArguments('cmd', [], 'U'), noArguments('cmd', ['--help'], 'U'))
    codes.push(process.exitCode)
    answers.push(noArguments('cmd', ['a b'], 'U'))
    codes.push(process.exitCode)
    process.exitCode = exitCode
    refuseUsage('cmd', 'no', 'U\n')
    codes.push(process.exitCode)
  } finally {
    process.stdout.write = stdout
    process.stderr.write = stderr
    process.exitCode = exitCode
  }
  t.same(answers, [false, true, true, true, false, false], 'help answered for -h and --help; no arguments: it runs; --help or an argument: it does not')
  t.same(written, ['out:U\n', 'out:V\n', 'out:U\n', 'err:cmd: takes no arguments, got "a b": it is configured by its environment\nU\n', 'err:cmd: no\nU\n'], 'the usage on stdout, refusals on stderr, each line ended once')
  t.same(codes, [exitCode, 2, 2], 'help leaves the exit status; a refusal sets 2')
})

t.test('npm run migrate: --help needs no database, and a command line it does not take is refused before DATABASE_URL is read', async t => {
  t.equal(await migrate(['--help'], {}), MIGRATE_USAGE)
  t.equal(await migrate(['down', '-h'], {}), MIGRATE_USAGE)
  const refused = await Promise.all([migrate(['sideways'], {}), migrate(['status', 'now'], {})].map(async p => await p.then(() => null, (err: Error) => err)))
  t.ok(refused.every(err => err instanceof UsageError), 'refused as a usage error (exit status 2)')
  t.same(refused.map(err => err?.message), ['unknown command sideways: use up, down [version] or status', 'status takes nothing: got "now"; use up, down [version] or status'])
  await t.rejects(migrate([], {}), { message: 'DATABASE_URL is not set' }, 'a command line it takes still needs the database')
})
