// One convention for the arguments of Mantle's commands (npm start, npm run kernel, token,
// migrate, codegen, bench, fuzz, chaos): `--help` or `-h` prints the command's usage on stdout
// and exits 0 before anything runs; an argument the command does not take is refused on stderr
// with the usage, exit status 2. Before, `npm start -- --help` started the gateway and `--port
// 8080` was ignored without a word, `npm run fuzz -- -h` died with a stack trace, `token --help`
// printed its usage as an error (exit 2), and codegen, migrate and chaos knew no --help.
// node:util's parseArgs reads the options of the commands that take some; this is only the
// part it leaves to each command.

/** Whether `argv` asks for help: `--help` or `-h`, before any `--`. */
export function asksHelp (argv: readonly string[]): boolean {
  for (const arg of argv) {
    if (arg === '--') return false
    if (arg === '--help' || arg === '-h') return true
  }
  return false
}

const line = (text: string): string => text.endsWith('\n') ? text : text + '\n'

/** Prints `usage` on stdout when `argv` asks for help: true when it did (the command then does nothing else). */
export function answerHelp (argv: readonly string[], usage: string): boolean {
  if (!asksHelp(argv)) return false
  process.stdout.write(line(usage))
  return true
}

/** Whether `err` is node:util's parseArgs refusing the command line (an option it does not take, a value missing). */
export function refusedByParseArgs (err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && code.startsWith('ERR_PARSE_ARGS_')
}

/** Refuses a command line: `<name>: <message>` and the usage on stderr, exit status 2. */
export function refuseUsage (name: string, message: string, usage: string): void {
  process.stderr.write(`${name}: ${message}\n${line(usage)}`)
  process.exitCode = 2
}

/**
 * For a command configured by its environment alone: true when it may run (no arguments);
 * otherwise it answered, with its usage for `--help`, or refused what it was given.
 */
export function noArguments (name: string, argv: readonly string[], usage: string): boolean {
  if (answerHelp(argv, usage)) return false
  if (argv.length === 0) return true
  refuseUsage(name, `takes no arguments, got ${argv.map(a => JSON.stringify(a)).join(' ')}: it is configured by its environment`, usage)
  return false
}
