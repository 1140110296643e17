import t from 'tap'
import { INJECTION_RULES, RULE_KEYS, matchWordRules } from '../../../plugins/firewall/injection.js'
import { SPAN_RULES, findSpans } from '../../../plugins/firewall/detectors.js'
import { normalizeForRules, normalizeForMarkers, rulesView } from '../../../plugins/firewall/normalize.js'
import { detect } from '../../../plugins/firewall/scan.js'

// Every pattern runs in time linear in its input. The safety is structural: no rule has an
// unbounded quantifier, so the work at each starting position is bounded by a constant (the
// product of the rule's bounds). The test checks that structure on every rule's source, then
// feeds each rule adversarial 100 KB strings built from its own vocabulary and near misses.
// The time bound is generous (2 s for 100 KB, on a shared machine): a catastrophic pattern
// takes seconds on a few dozen characters, orders of magnitude beyond it.

const SIZE = 100 * 1024
const BOUND_MS = 2000
const fill = (unit: string): string => unit.repeat(Math.ceil(SIZE / unit.length)).slice(0, SIZE)

/** The unbounded quantifiers of a regex source (`*`, `+`, `{n,}`), outside character classes. */
function unboundedQuantifiers (source: string): string[] {
  const found: string[] = []
  let inClass = false
  for (let i = 0; i < source.length; i++) {
    const c = source[i]
    if (c === '\\') { i++; continue }
    if (inClass) { if (c === ']') inClass = false; continue }
    if (c === '[') inClass = true
    else if (c === '*' || c === '+') found.push(source.slice(Math.max(0, i - 12), i + 1))
    else if (c === '{') {
      const m = /^\{\d+,\}/.exec(source.slice(i))
      if (m !== null) found.push(source.slice(Math.max(0, i - 12), i + m[0].length))
    }
  }
  return found
}

t.test('no rule has an unbounded quantifier', async t => {
  t.same(unboundedQuantifiers('a+b*[+*]c{2,}d{1,3}\\+'), ['a+', 'a+b*', 'a+b*[+*]c{2,}'], 'the checker itself finds them')
  for (const rule of INJECTION_RULES) t.same(unboundedQuantifiers(rule.pattern.source), [], `injection ${rule.type}: ${rule.pattern.source.slice(0, 50)}`)
  for (const rule of SPAN_RULES) t.same(unboundedQuantifiers(rule.pattern.source), [], `${rule.category} ${rule.type}`)
})

function timed (run: () => void): number {
  const started = performance.now()
  run()
  return performance.now() - started
}

t.test('every injection rule on adversarial 100 KB inputs of its own words', async t => {
  for (const rule of INJECTION_RULES) {
    const words = [...new Set(rule.pattern.source.match(/[a-z]{2,}/g) ?? [])]
    const inputs = [
      fill(words.join(' ') + ' '),
      fill(words.join('')),
      fill((words[0] ?? 'ignore') + ' '),
      fill((words[0] ?? 'ignore') + ' ' + 'abcdefghijklmnopqrst '.repeat(6))
    ]
    let worst = 0
    for (const input of inputs) {
      const view = rule.view === 'markers' ? normalizeForMarkers(input) : normalizeForRules(input)
      worst = Math.max(worst, timed(() => rule.pattern.test(view)))
      // As the scan tries word rules: sticky, at every word a rule can open with (here, most of them).
      if (rule.view === 'words') worst = Math.max(worst, timed(() => matchWordRules(rulesView(input, RULE_KEYS))))
    }
    t.ok(worst < BOUND_MS, `${rule.type} ${rule.pattern.source.slice(0, 40)}: ${worst.toFixed(1)} ms`)
  }
  const markers = ['<|im_start|', '<<sys', '[inst', '### system', 'system', 'user input ']
  for (const m of markers) t.ok(timed(() => INJECTION_RULES.filter(r => r.view === 'markers').forEach(r => r.pattern.test(fill(m)))) < BOUND_MS, `markers on ${m}`)
})

t.test('every secret and personal-data rule on adversarial 100 KB inputs', async t => {
  const nearMisses = ['1', '1 ', '1-', '12 ', '+1 ', '(1) ', '4111 1111 1111 111', '123-45-678', '1 23 45 67 890 123 4', '12345678-', 'X1234567',
    'DE89 3704 0044 ', 'a@', 'a.b@c.', 'AKIA', 'AKIAAAAAAAAAAAAAAAA', 'ghp_', 'github_pat_', 'xoxb-', 'sk-', 'sk-ant-api03-', 'sk_live_', 'AIza', 'glpat-',
    'npm_', 'hf_', 'SG.', 'eyJ', 'eyJa.eyJb.', '-----BEGIN ', '-----BEGIN RSA PRIVATE KEY-----', 'aws_secret_access_key=', 'https://hooks.slack.com/services/T', 'steuer-id 1']
  for (const rule of SPAN_RULES) {
    let worst = 0
    for (const unit of nearMisses) {
      const input = fill(unit)
      worst = Math.max(worst, timed(() => { rule.pattern.lastIndex = 0; while (rule.pattern.exec(input) !== null); }))
    }
    t.ok(worst < BOUND_MS, `${rule.type}: ${worst.toFixed(1)} ms`)
  }
  for (const unit of nearMisses) {
    const input = fill(unit)
    const ms = timed(() => findSpans(input, []))
    t.ok(ms < BOUND_MS, `all span scanners on ${JSON.stringify(unit)} x 100 KB: ${ms.toFixed(1)} ms`)
  }
})

t.test('a whole scan of adversarial 100 KB texts (normalization and decoding included)', async t => {
  const units = ['a', ' ', '\u200b', 'i g n o r e ', 'ı', 'Ａ', '<!--', 'QUFB', '0a', 'ignore all your ', 'eyJ', '1.', 'a\u0301', 'SWdub3Jl']
  for (const unit of units) {
    const ms = timed(() => detect(fill(unit)))
    t.ok(ms < BOUND_MS, `${JSON.stringify(unit)} x 100 KB: ${ms.toFixed(1)} ms`)
  }
})
