import { scanFields, type Verdict } from './scan.js'

// What a worker thread of the firewall's scan pool runs (pool.ts): the named fields of one
// call's input, scanned as the event loop would scan them.

export interface ScanTask {
  readonly fields: readonly string[]
  /** The named fields' values only, not the whole input: what is sent to the thread is copied. */
  readonly values: Readonly<Record<string, unknown>>
}

export interface ScanResult {
  readonly verdict: Verdict
  /** The scan's own time on the thread, for mantle_firewall_scan_duration_seconds. */
  readonly seconds: number
}

export default function scanTask (task: ScanTask): ScanResult {
  const started = performance.now()
  const verdict = scanFields(task.fields, task.values)
  return { verdict, seconds: (performance.now() - started) / 1000 }
}
