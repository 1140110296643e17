import { extname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Piscina } from 'piscina'
import { Counter, Gauge, type Registry } from 'prom-client'
import { MantleError } from '../../errors.js'
import { unwatchCaller, watchCaller, type Caller } from '../pipeline/caller.js'
import { CLEAN, type Verdict } from './scan.js'
import type { ScanResult, ScanTask } from './scan-worker.js'

// Large inputs are scanned on worker threads. A scan is linear in its text, but a character
// costs from 0.02 to about 0.75 µs (text that NFKC rewrites, or full of invisible characters):
// a 1 MiB prompt held the event loop, and every call of every tenant behind it, for up to 0.78 s.
// piscina runs the threads; the queue in front of it is Mantle's own, because piscina's is one
// FIFO for every caller: here each tenant waits in a queue of its own and the threads take the
// tenants in turn, so that one tenant's flood of large prompts waits behind itself, and a scan
// whose caller has left is dropped before it runs.

/**
 * Inputs up to this size are scanned on the event loop (at most a few milliseconds even for the
 * costliest text, and no copy to a thread); larger ones on the pool. The size counts the named
 * fields' characters, and one for each element, key and value of an array or object.
 */
export const INLINE_MAX = 8192

/** Scans waiting for a thread on one instance, and for one tenant. */
export const POOL_BOUNDS = Object.freeze({ waiting: 256, waitingPerTenant: 64 })

/**
 * Whether the input's named fields are larger than `limit` (see INLINE_MAX). The walk stops as
 * soon as they are; without recursion, since a field's schema may admit any value.
 */
export function largerThan (fields: readonly string[], input: Readonly<Record<string, unknown>>, limit: number): boolean {
  let size = 0
  const open: object[] = []
  for (const field of fields) {
    const value = input[field]
    if (typeof value === 'string') size += value.length
    else if (value !== null && typeof value === 'object') open.push(value)
  }
  while (size <= limit && open.length > 0) {
    const holder = open.pop()!
    if (Array.isArray(holder)) {
      for (let i = 0; i < holder.length && size <= limit; i++) size += sizeOf(holder[i] as unknown, open)
    } else {
      const keys = Object.keys(holder)
      for (let i = 0; i < keys.length && size <= limit; i++) size += keys[i].length + sizeOf((holder as Record<string, unknown>)[keys[i]], open)
    }
  }
  return size > limit
}

function sizeOf (value: unknown, open: object[]): number {
  if (typeof value === 'string') return 1 + value.length
  if (value !== null && typeof value === 'object') open.push(value)
  return 1
}

interface Waiting {
  readonly tenant: string
  readonly task: ScanTask
  readonly caller: Caller | null
  readonly resolve: (verdict: Verdict) => void
  readonly reject: (err: unknown) => void
  /** Watched on the caller while it waits. */
  readonly left: () => void
}

export interface ScanPoolOptions {
  threads: number
  registers: Registry[]
  /** Each scan's own time on its thread. */
  observe: (seconds: number) => void
}

export class ScanPool {
  private readonly piscina: Piscina<ScanTask, ScanResult>
  private readonly threads: number
  private readonly observe: (seconds: number) => void
  /** The tenants with scans waiting, each with its own queue, in the order of their turns. */
  private readonly queues = new Map<string, Waiting[]>()
  private waiting = 0
  private running = 0
  private idle: (() => void) | null = null
  private readonly refusedInstance: { inc: () => void }
  private readonly refusedTenant: { inc: () => void }

  constructor (opts: ScanPoolOptions) {
    this.threads = opts.threads
    this.observe = opts.observe
    this.piscina = new Piscina<ScanTask, ScanResult>({
      // The worker as this module is: scan-worker.ts run through tsx, scan-worker.js as built.
      filename: new URL('./scan-worker' + extname(fileURLToPath(import.meta.url)), import.meta.url).href,
      // No thread until a large input comes; one idle for 30 s ends.
      minThreads: 0,
      maxThreads: opts.threads,
      idleTimeout: 30_000,
      // A scan gives way to the event loop when they compete for a core (Linux: per thread).
      niceIncrement: 5,
      recordTiming: false
      // piscina's own queue stays empty: a scan is handed over only when a thread is free.
    })
    const registers = opts.registers
    const waiting = (): number => this.waiting
    const running = (): number => this.running
    new Gauge({ name: 'mantle_firewall_pool_waiting', help: `AI firewall scans of large inputs waiting for a thread (at most ${POOL_BOUNDS.waiting}, ${POOL_BOUNDS.waitingPerTenant} a tenant)`, registers, collect () { this.set(waiting()) } }) // eslint-disable-line no-new
    new Gauge({ name: 'mantle_firewall_pool_running', help: 'AI firewall scans of large inputs running on the pool\'s threads', registers, collect () { this.set(running()) } }) // eslint-disable-line no-new
    const refused = new Counter({ name: 'mantle_firewall_pool_refused_total', help: 'AI firewall scans of large inputs refused (503 OVERLOADED): the queue was full for the instance, or for the tenant', labelNames: ['bound'], registers })
    this.refusedInstance = refused.labels('instance')
    this.refusedTenant = refused.labels('tenant')
  }

  /** Scans the named fields on a thread, in the tenant's turn. Refuses (OVERLOADED) when the queue is full. */
  async scan (tenant: string, fields: readonly string[], input: Readonly<Record<string, unknown>>, caller: Caller | null): Promise<Verdict> {
    if (this.waiting >= POOL_BOUNDS.waiting) {
      this.refusedInstance.inc()
      throw new MantleError('OVERLOADED', 'Too many large inputs are waiting for the AI firewall on this instance: retry later', { headers: { 'retry-after': '1' } })
    }
    const queue = this.queues.get(tenant)
    if (queue !== undefined && queue.length >= POOL_BOUNDS.waitingPerTenant) {
      this.refusedTenant.inc()
      throw new MantleError('OVERLOADED', `A tenant has at most ${POOL_BOUNDS.waitingPerTenant} large inputs waiting for the AI firewall on this instance: retry later`, { headers: { 'retry-after': '1' } })
    }
    const values: Record<string, unknown> = {}
    for (const field of fields) if (Object.hasOwn(input, field)) values[field] = input[field]
    return await new Promise<Verdict>((resolve, reject) => {
      const waiting: Waiting = { tenant, task: { fields, values }, caller, resolve, reject, left: () => { this.leave(waiting) } }
      if (caller !== null && !watchCaller(caller, waiting.left)) {
        reject(callerLeft())
        return
      }
      if (queue === undefined) this.queues.set(tenant, [waiting])
      else queue.push(waiting)
      this.waiting++
      this.dispatch()
    })
  }

  /** Waits for every scan taken to end, then ends the threads. */
  async close (): Promise<void> {
    if (this.waiting + this.running > 0) await new Promise<void>(resolve => { this.idle = resolve })
    await this.piscina.destroy()
  }

  /** Hands scans to free threads, one tenant's at a time in turn. */
  private dispatch (): void {
    while (this.running < this.threads && this.waiting > 0) {
      const [tenant, queue] = this.queues.entries().next().value as [string, Waiting[]]
      const next = queue.shift()!
      // The tenant's turn is over: it goes to the back, or out when it has nothing waiting.
      this.queues.delete(tenant)
      if (queue.length > 0) this.queues.set(tenant, queue)
      this.waiting--
      this.run(next)
    }
  }

  private run (w: Waiting): void {
    this.running++
    // A running scan ends: piscina stops a task it is told to abort by ending its thread.
    if (w.caller !== null) unwatchCaller(w.caller, w.left)
    this.piscina.run(w.task).then(result => {
      this.observe(result.seconds)
      w.resolve(verdictOf(result.verdict))
    }, (err: unknown) => {
      w.reject(err)
    }).finally(() => {
      this.running--
      this.dispatch()
      this.settled()
    })
  }

  /** The caller of a waiting scan left: the scan is dropped. */
  private leave (w: Waiting): void {
    const queue = this.queues.get(w.tenant)
    const at = queue === undefined ? -1 : queue.indexOf(w)
    if (at < 0) return
    queue!.splice(at, 1)
    if (queue!.length === 0) this.queues.delete(w.tenant)
    this.waiting--
    w.reject(callerLeft())
    this.settled()
  }

  private settled (): void {
    if (this.idle !== null && this.waiting + this.running === 0) this.idle()
  }
}

const callerLeft = (): MantleError => new MantleError('CLIENT_CLOSED', 'The caller left while its input waited for the AI firewall')

/** A thread's verdict as one made on the event loop: CLEAN itself when nothing was found, frozen as scanFields makes it. */
function verdictOf (v: Verdict): Verdict {
  if (v.findings.length === 0 && v.redacted === null) return CLEAN
  for (const f of v.findings) Object.freeze(f)
  return Object.freeze({ findings: Object.freeze(v.findings), risk: v.risk, categories: Object.freeze(v.categories), redacted: v.redacted === null ? null : Object.freeze(v.redacted) })
}
