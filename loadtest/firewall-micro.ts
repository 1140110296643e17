// The firewall's own cost per call, without HTTP: scanFields (normalization, every injection
// rule, every secret and personal-data rule, decoding) on prompts of 1 KB, 4 KB and 20 KB, with
// no verdict cache. A child process of the harness (startWorker): it prints one JSON report.
// Each call scans a different text (a counter changes it), as distinct prompts would be.
import { scanFields } from '../plugins/firewall/scan.js'
import { nearestRank } from './histogram.js'

/**
 * Per-call times: wall clock (performance.now()) and CPU time of this process (process.cpuUsage,
 * user + system). On a shared, oversubscribed machine the wall-clock p99 is the scheduler's
 * (a call preempted mid-scan counts the other processes' time); the CPU time is the scan's cost.
 */
export interface FirewallMicroRow { bytes: number, calls: number, p50Ms: number, p99Ms: number, meanMs: number, cpuP50Ms: number, cpuP99Ms: number, cpuMeanMs: number, findings: number }
export interface FirewallMicroReport { rows: FirewallMicroRow[] }

// Prose of the kind a prompt holds: instructions, figures, dates, a code fragment, punctuation.
const PARAGRAPHS = [
  'Summarise the quarterly report for the board in five bullet points. Revenue grew 12% to 4.2 million, driven by the new subscription tier; costs rose in support and cloud hosting. ',
  'The previous quarter had a one-off charge of 310,000 for the office move, which should be called out separately. Compare with Q3 2024 and explain the difference in gross margin. ',
  'Please list risks, opportunities and the three actions you recommend, with owners and due dates (e.g. 2025-03-31). Keep the tone neutral and avoid jargon where you can. ',
  'Context from the ticket: the export job failed at step 7 with `TimeoutError: read ETIMEDOUT` after 30 s; the retry policy is 3 attempts with exponential backoff. ',
  'function total(items) { return items.filter(i => i.active).reduce((sum, i) => sum + i.amount, 0) } // used by the billing page, version 2.14.1 ',
  'Translate the final summary into French and German as well, and add a short glossary of the financial terms used (EBITDA, churn, ARR, net retention). '
]

function prompt (bytes: number, n: number): string {
  let text = `Request ${n}. `
  for (let i = n; text.length < bytes; i++) text += PARAGRAPHS[i % PARAGRAPHS.length]
  return text.slice(0, bytes)
}

const FIELDS = ['prompt'] as const
const rows: FirewallMicroRow[] = []
for (const [bytes, calls] of [[1024, 4000], [4096, 4000], [20480, 1000]] as const) {
  const texts = Array.from({ length: 64 }, (_, i) => prompt(bytes, i))
  for (let i = 0; i < 500; i++) scanFields(FIELDS, { prompt: texts[i % texts.length] + i })
  const times: number[] = []
  const cpu: number[] = []
  let findings = 0
  // Each input as the gateway gets it: parsed from a JSON body (a flat string; a string built by
  // `+` is a rope that the first scan would flatten, a cost the gateway never pays).
  const inputs = Array.from({ length: calls }, (_, i) => JSON.parse(JSON.stringify({ prompt: texts[i % texts.length] + String(i) })) as { prompt: string })
  for (let i = 0; i < calls; i++) {
    const input = inputs[i]
    const cpu0 = process.cpuUsage()
    const started = performance.now()
    const verdict = scanFields(FIELDS, input)
    times.push(performance.now() - started)
    const used = process.cpuUsage(cpu0)
    cpu.push((used.user + used.system) / 1000)
    findings += verdict.findings.length
  }
  times.sort((a, b) => a - b)
  cpu.sort((a, b) => a - b)
  const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length
  rows.push({ bytes, calls, p50Ms: nearestRank(times, 0.5), p99Ms: nearestRank(times, 0.99), meanMs: mean(times), cpuP50Ms: nearestRank(cpu, 0.5), cpuP99Ms: nearestRank(cpu, 0.99), cpuMeanMs: mean(cpu), findings })
}
process.stdout.write(JSON.stringify({ rows } satisfies FirewallMicroReport) + '\n')
