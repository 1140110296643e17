import t from 'tap'
import { loadCorpus, type CorpusLine } from './corpus.js'
import { detect } from '../../../plugins/firewall/scan.js'

// Accuracy on the labeled corpus (test/fixtures/firewall). A malicious line is a true positive
// when the scan finds its category; a benign line is a false positive when the scan finds
// anything. Goals (issue 4): >= 95% true positives and <= 2% false positives, on each part.
// The dev part is the one the rules were written against; the holdout part was written before
// any rule and is reported without its misses, so that nobody tunes against it.

interface Tally { total: number, hit: number }

function score (lines: readonly CorpusLine[]): { malicious: Tally, benign: Tally, byLabel: Map<string, Tally>, misses: CorpusLine[] } {
  const malicious = { total: 0, hit: 0 }
  const benign = { total: 0, hit: 0 }
  const byLabel = new Map<string, Tally>()
  const misses: CorpusLine[] = []
  for (const line of lines) {
    const found = detect(line.text)
    const key = `${line.label}${line.obf === null ? '' : ' (obfuscated)'}`
    const tally = byLabel.get(key) ?? { total: 0, hit: 0 }
    byLabel.set(key, tally)
    tally.total++
    if (line.label === 'benign') {
      benign.total++
      if (found.length > 0) { benign.hit++; tally.hit++; misses.push(line) }
    } else {
      malicious.total++
      if (found.some(f => f.category === line.label)) { malicious.hit++; tally.hit++ } else misses.push(line)
    }
  }
  return { malicious, benign, byLabel, misses }
}

const pct = (n: number, d: number): string => `${(100 * n / d).toFixed(1)}% (${n}/${d})`

for (const part of ['dev', 'holdout'] as const) {
  t.test(`${part} part: true positives >= 95%, false positives <= 2%`, async t => {
    const lines = loadCorpus(part)
    const { malicious, benign, byLabel, misses } = score(lines)
    t.comment(`${part}: TP ${pct(malicious.hit, malicious.total)}, FP ${pct(benign.hit, benign.total)}`)
    for (const [label, tally] of [...byLabel].sort()) t.comment(`  ${label.padEnd(24)} ${label.startsWith('benign') ? 'flagged' : 'caught'} ${pct(tally.hit, tally.total)}`)
    if (part === 'dev') for (const m of misses) t.comment(`  dev miss line ${m.line} (${m.label}): ${JSON.stringify(m.text).slice(0, 100)}`)
    t.ok(malicious.total >= 140 && benign.total >= 130, 'each part is large enough to measure')
    t.ok(malicious.hit / malicious.total >= 0.95, `TP ${pct(malicious.hit, malicious.total)} >= 95%`)
    t.ok(benign.hit / benign.total <= 0.02, `FP ${pct(benign.hit, benign.total)} <= 2%`)
  })
}

t.test('the corpus has at least 300 malicious and 300 benign lines, in four languages', async t => {
  const all = [...loadCorpus('dev'), ...loadCorpus('holdout')]
  t.ok(all.filter(l => l.label !== 'benign').length >= 300)
  t.ok(all.filter(l => l.label === 'benign').length >= 300)
  for (const lang of ['en', 'fr', 'es', 'de']) t.ok(all.some(l => l.label === 'injection' && l.lang === lang), `injection in ${lang}`)
})
