import { Piscina } from 'piscina'
import { compiledByText, keptByText } from './compiled.js'
import { eachSchemaObject } from './schema-walk.js'
import type { Manifest } from './manifest.js'
import type { PatternAnswer, PatternTask } from './manifest-patterns-worker.mjs'

/**
 * A manifest's `pattern`s and `patternProperties` are matched against what clients send by V8's
 * backtracking engine, on the event loop: a pattern that backtracks (`^([a-z0-9_.-])+@(([a-z0-9-])+\.)+[a-z]{2,4}$`,
 * `\s*#?\s*$`) let one request hold the whole gateway for seconds to minutes (a 60-character
 * string: 4.8 s; 10,000 tabs: 233 s). Such a manifest is refused when it is read (start-up and
 * reload), naming the pattern and an input that shows it. The analysis is recheck's (automata
 * theory, then fuzzing where that does not reach), on a thread: some patterns take it seconds,
 * and a reload's check must not stop the gateway answering. Mantle's own part is only which
 * patterns are run on what, and the bound below. A pattern recheck cannot decide in
 * PATTERN_CHECK_MS (or whose analysis fails, as with some backreferences) is let through.
 */
export const PATTERN_CHECK_MS = 2000
/**
 * The backtracking steps a field's worst input may cost: about 25 ms of V8's matching. A
 * vulnerable pattern passes when its string's `maxLength` keeps it within: n^degree for a
 * polynomial, 2^n for an exponential.
 */
export const PATTERN_STEPS = 1e8

/**
 * Past this, a pattern's check is cut, its thread ended (recheck's own timeout is checked between
 * its steps): a thread's start and recheck's load are in it too, seconds on a loaded machine (5 s
 * cut a check of the test suite's, run with coverage beside three other test processes).
 */
export const PATTERN_CUT_MS = PATTERN_CHECK_MS + 15_000

/** For tests: the worker module, the time a pattern's fuzzing has, and when its check is cut. */
export interface CheckOptions { readonly worker?: string, readonly checkMs?: number, readonly cutMs?: number }

interface Found { readonly at: string, readonly source: string, readonly maxLength: number | null, readonly name: boolean }
type Verdict = Omit<PatternAnswer, 'source'>

/** The patterns of `schema`, each with where it is and the `maxLength` beside it. */
function patternsIn (schema: unknown, at: string, found: Found[]): void {
  eachSchemaObject(schema, at, (node, where) => {
    if (typeof node.pattern === 'string') found.push({ at: `${where}.pattern`, source: node.pattern, maxLength: typeof node.maxLength === 'number' ? node.maxLength : null, name: false })
    const named = node.patternProperties
    // A property's name has no maxLength of its own here.
    if (named !== null && typeof named === 'object' && !Array.isArray(named)) for (const name of Object.keys(named)) found.push({ at: `${where}.patternProperties`, source: name, maxLength: null, name: true })
  })
}

/** recheck's verdicts on `sources`, on a thread, PATTERN_CHECK_MS each; none for those it could not give in time. */
async function checkOnThread (sources: string[], opts: CheckOptions): Promise<Map<string, Verdict>> {
  const verdicts = new Map<string, Verdict>()
  const checkMs = opts.checkMs ?? PATTERN_CHECK_MS
  const pool = new Piscina<PatternTask, PatternAnswer>({
    // JavaScript beside this module, in the sources and in the build alike, run with no loader:
    // a TypeScript loader the process runs under (tsx, the tests' ts-node) would start a thread and
    // a compiler of its own in the worker, for a module that needs neither (see the worker).
    filename: opts.worker ?? new URL('./manifest-patterns-worker.mjs', import.meta.url).href,
    execArgv: [],
    minThreads: 0,
    maxThreads: 1,
    env: { ...process.env, RECHECK_SYNC_BACKEND: 'pure' },
    recordTiming: false
  })
  // A thread that failed outside a task (its module missing from a build): piscina emits 'error'
  // and its task waited for ever. It is aborted, and the failure said, not passed over as every
  // pattern taken.
  const failed = new AbortController()
  pool.on('error', (err: unknown) => { failed.abort(err) })
  try {
    for (const source of sources) {
      try {
        const signal = AbortSignal.any([failed.signal, AbortSignal.timeout(opts.cutMs ?? PATTERN_CUT_MS)])
        verdicts.set(source, await pool.run({ source, timeoutMs: checkMs }, { signal }))
      } catch (err) {
        if (failed.signal.aborted) throw failed.signal.reason
        // Past its time: no verdict, the pattern is taken.
        if ((err as Error).name !== 'AbortError') throw err
      }
    }
  } finally {
    await pool.destroy()
  }
  return verdicts
}

/** The fault for a pattern `verdict` finds vulnerable, unless its field's maxLength bounds it within PATTERN_STEPS. */
function faultOf (f: Found, verdict: Verdict): string | null {
  if (verdict.status !== 'vulnerable') return null
  const longest = verdict.degree === null ? Math.floor(Math.log2(PATTERN_STEPS)) : Math.floor(PATTERN_STEPS ** (1 / verdict.degree) + 1e-9)
  if (f.maxLength !== null && f.maxLength <= longest) return null
  const how = verdict.degree === null ? 'exponentially' : `in n^${verdict.degree} steps`
  const remedy = f.name
    ? 'rewrite it (a property name has no maxLength to bound it)'
    : `rewrite it, or bound the string with maxLength ${longest} or less (${f.maxLength === null ? 'it has none' : `it has ${f.maxLength}`})`
  return `${f.at}: the pattern ${JSON.stringify(f.source)} backtracks ${how}: an input like ${verdict.attack ?? '(none given)'} holds the gateway's event loop for seconds or more; ${remedy}`
}

/**
 * The faults of `manifest`'s patterns that backtrack beyond PATTERN_STEPS on an input a client
 * may send (or the Kernel, in an output or event). Verdicts are kept by pattern with the compiled
 * schemas (`mantle_compiled_schemas`): a reload checks only the patterns it has not seen.
 */
export async function backtrackingFaults (manifest: Manifest, opts: CheckOptions = {}): Promise<string[]> {
  const found: Found[] = []
  for (const op of manifest.operations) {
    patternsIn(op.input, `operations.${op.name}.input`, found)
    patternsIn(op.output, `operations.${op.name}.output`, found)
  }
  for (const ev of manifest.events) patternsIn(ev.payload, `events.${ev.name}.payload`, found)
  if (found.length === 0) return []
  // Each pattern's verdict: kept from an earlier read, or made now (read from here, not from where
  // it is kept: a manifest of more patterns than that holds would lose some of its own).
  const verdicts = new Map<string, Verdict>()
  const unseen: string[] = []
  for (const source of new Set(found.map(f => f.source))) {
    const kept = keptByText<Verdict>('pattern verdict', source)
    if (kept === undefined) unseen.push(source)
    else verdicts.set(source, kept)
  }
  if (unseen.length > 0) {
    try {
      for (const [source, verdict] of await checkOnThread(unseen, opts)) {
        verdicts.set(source, verdict)
        // An unknown is not kept: a check cut short on a busy machine is made again at the next read.
        if (verdict.status !== 'unknown') compiledByText('pattern verdict', source, () => verdict)
      }
    } catch (err) {
      return [`the patterns could not be checked: ${(err as Error).message}`]
    }
  }
  const faults: string[] = []
  for (const f of found) {
    const verdict = verdicts.get(f.source)
    const fault = verdict === undefined ? null : faultOf(f, verdict)
    if (fault !== null) faults.push(fault)
  }
  return faults
}
