// @ts-check
import { checkSync } from 'recheck'
import { RegExpParser, visitRegExpAST } from '@eslint-community/regexpp'

// What the thread of manifest-patterns.ts runs: recheck's check of a pattern. The thread is made
// with RECHECK_SYNC_BACKEND=pure in its own env: recheck's default runs its native binary (a
// process of its own, that hung on a stack overflow), and its worker backend let a stack overflow
// escape as the Worker's 'error', which ended the process. Here the pure JavaScript check runs,
// and what it throws is caught.
//
// JavaScript, type-checked by tsc from its JSDoc (allowJs and `// @ts-check`), not TypeScript:
// the thread then runs it with no loader (execArgv: []), as the build does. From a .ts module, each gateway a process
// started under a TypeScript loader (npm start, every test process) started a thread that
// started that loader's own thread and compiler: about 1 s of CPU per process, the test suite's
// 36 processes each paying it for the demo manifest's one pattern.

/** @typedef {{ readonly source: string, readonly timeoutMs: number }} PatternTask */
/**
 * @typedef {object} PatternAnswer
 * @property {string} source
 * @property {'safe' | 'vulnerable' | 'unknown'} status
 * @property {number | null} degree A polynomial's degree; null when exponential (or not vulnerable).
 * @property {string | null} attack recheck's attack string, as JavaScript (`'a' + 'a'.repeat(31) + '\x00'`), when vulnerable.
 */

/**
 * `source` with each counted repetition left open above (`{1,64}` as `{1,}`, `{13}` as `{13,}`),
 * or null when it has none (or does not parse). recheck's automaton, exact and quick, gives way
 * to fuzzing past 30 counted repeats in all (a second or more for `^[A-Za-z0-9_-]{1,64}$`), and
 * takes a bounded repetition for a constant however large (`^(a|aa){1,300}$`: safe, yet 30 s for
 * 76 characters). Open, a repetition can only backtrack more: what is safe so is safe as written.
 */
/**
 * @param {string} source
 * @returns {string | null}
 */
export function opened (source) {
  /** @type {Array<{ start: number, end: number, text: string }>} */
  const edits = []
  try {
    const pattern = new RegExpParser({ ecmaVersion: 2025 }).parsePattern(source, 0, source.length, { unicode: true })
    visitRegExpAST(pattern, {
      onQuantifierEnter (q) {
        if (q.max === Infinity || q.max <= 1) return
        edits.push({ start: q.element.end, end: q.end, text: `{${q.min},}${q.greedy ? '' : '?'}` })
      }
    })
  } catch {
    return null
  }
  if (edits.length === 0) return null
  // A repetition's own count follows its element, inner ones within it: from the last to the first.
  edits.sort((a, b) => b.start - a.start)
  let text = source
  for (const e of edits) text = text.slice(0, e.start) + e.text + text.slice(e.end)
  return text
}

/**
 * recheck's verdict on `source`, its fuzzing within `timeoutMs` of its own steps.
 * @param {PatternTask} task
 * @returns {PatternAnswer}
 */
export default function checkPattern ({ source, timeoutMs }) {
  try {
    // The automaton alone first, on the pattern with its counts open (as written when it has
    // none): milliseconds, and untimed, so that its verdict does not hang on the machine's load
    // (the thread is cut past its time anyway). Safe so, it is safe as written; vulnerable as
    // written, that is exact.
    const open = opened(source) ?? source
    const automaton = checkSync(open, 'u', { checker: 'automaton', timeout: null })
    if (automaton.status === 'safe') return { source, status: 'safe', degree: null, attack: null }
    /** @type {import('recheck').Diagnostics} */
    let verdict = automaton
    if (automaton.status !== 'vulnerable' || open !== source) {
      // The flags Ajv compiles a schema's pattern with (unicodeRegExp). A fixed seed: the fuzzer
      // finds the same attack, or none, each time a manifest is read.
      const d = checkSync(source, 'u', { timeout: timeoutMs, randomSeed: 0 })
      // Past 30 counted repeats the fuzzer decides, and on a busy machine its time runs out, or
      // its attacks' own timed checks fail and it finds none, "safe (fuzz)" (`^(a|aa){1,300}$`,
      // found in 0.9 s alone, was taken in two loaded test runs). What backtracks with its counts
      // open is then taken to backtrack as written, as it does when its counts are not small:
      // only the automaton's exact check, within its limits, says otherwise.
      const fuzzed = d.status === 'unknown' || (d.status === 'safe' && d.complexity.isFuzz)
      verdict = automaton.status === 'vulnerable' && fuzzed ? automaton : d
    }
    return verdict.status === 'vulnerable'
      ? { source, status: 'vulnerable', degree: verdict.complexity.type === 'polynomial' ? verdict.complexity.degree : null, attack: verdict.attack.pattern }
      : { source, status: verdict.status, degree: null, attack: null }
  } catch {
    // Its analysis of some patterns overflows the stack (a backreference in a repetition).
    return { source, status: 'unknown', degree: null, attack: null }
  }
}
