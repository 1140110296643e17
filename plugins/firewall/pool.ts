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
 * fields' characters (one that NFKC writes as several as that many, see `read`), TEXT_WEIGHT
 * more for each string in an array or object and each entry of an object, and one for each
 * other element.
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
  let structured = false
  for (const field of fields) {
    const value = input[field]
    if (typeof value === 'string') size += read(value, size, limit)
    else if (value !== null && typeof value === 'object') structured = true
  }
  // A call whose fields are strings (the hot path: a prompt) allocates nothing here.
  if (!structured || size > limit) return size > limit
  const open: object[] = []
  for (const field of fields) {
    const value = input[field]
    if (value !== null && typeof value === 'object') open.push(value)
  }
  while (size <= limit && open.length > 0) {
    const holder = open.pop()!
    if (Array.isArray(holder)) {
      for (let i = 0; i < holder.length && size <= limit; i++) {
        const value: unknown = holder[i]
        size += typeof value === 'string' ? TEXT_WEIGHT + read(value, size, limit) : opened(value, open)
      }
    } else {
      const keys = Object.keys(holder)
      for (let i = 0; i < keys.length && size <= limit; i++) {
        // An entry is one text: its key, with its value when that is a string.
        const value = (holder as Record<string, unknown>)[keys[i]]
        size += TEXT_WEIGHT + read(keys[i], size, limit)
        size += typeof value === 'string' ? read(value, size, limit) : opened(value, open) - 1
      }
    }
  }
  return size > limit
}

/**
 * What each text of an array or object (a string element, an entry) counts beyond its
 * characters. Each is scanned on its own, at a cost of its own: a text of one no-break space or
 * full-width letter took 6 µs, as much as 12 characters of the costliest string, and counted
 * one, so that an array of 4,096 of them (8,192) was scanned on the event loop, 32 ms where a
 * string of that size takes 4 at most.
 */
export const TEXT_WEIGHT = 16

// The characters NFKC writes as four or more (U+FDFA as 18, U+FDFB as 8, the squared katakana
// words of U+3300 to U+33FF as up to 6, parenthesized numbers, ...): a superset of them, by
// block. The rules read a text after NFKC, so that such a character costs its scan what that
// many characters cost: 8,192 U+FDFA counted 8,192 and were scanned on the event loop, 15 ms
// each, where 8,192 characters of any other kind take 4 at most.
const EXPANDS = /[\u2057\u2152\u2167\u2177\u247d-\u2487\u2a0c\u321d\u321e\u3300-\u33ff\ufdf2-\ufdfc]/g
/** The most characters NFKC writes for one (U+FDFA). */
const MOST_READ = 18

/**
 * What a text counts: its length, each character NFKC writes as several counting as many. A
 * text that cannot take `size` past `limit` even so (a prompt of a few hundred characters, the
 * hot path) is not searched; the search stops once past the limit.
 */
function read (text: string, size: number, limit: number): number {
  let n = text.length
  if (size + n * MOST_READ <= limit || size + n > limit) return n
  EXPANDS.lastIndex = 0
  let m: RegExpExecArray | null
  while (size + n <= limit && (m = EXPANDS.exec(text)) !== null) n += m[0].normalize('NFKC').length - 1
  return n
}

/** A value that is not a string counts one; an array or object is opened. */
function opened (value: unknown, open: object[]): number {
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
  /** Ends the wait at the call's deadline (its operation's timeoutMs); null: none. */
  timer: NodeJS.Timeout | null
}

/** What refused a scan: the instance's queue, the tenant's, or the call's deadline while it waited. */
type Bound = 'instance' | 'tenant' | 'deadline'

export interface ScanPoolOptions {
  threads: number
  registers: Registry[]
  /** Each scan's own time on its thread. */
  observe: (seconds: number) => void
  /** The scan on the event loop (the plugin's own, timed as it times it): the pool's once no thread can start. */
  inline: (fields: readonly string[], input: Readonly<Record<string, unknown>>) => Verdict
  /** A thread failed outside any scan (it could not start): the scans are made on the event loop from then on. */
  onError?: (err: unknown) => void
  /** The worker module (tests); by default scan-worker beside this module. */
  worker?: string
}

export class ScanPool {
  private readonly piscina: Piscina<ScanTask, ScanResult>
  private readonly threads: number
  private readonly observe: (seconds: number) => void
  private readonly inline: ScanPoolOptions['inline']
  /** The tenants with scans waiting, each with its own queue, in the order of their turns. */
  private readonly queues = new Map<string, Waiting[]>()
  private waiting = 0
  private running = 0
  private idle: (() => void) | null = null
  /** The close under way: a second close() waits for the same one (it replaced `idle`, and the first never ended). */
  private closing: Promise<void> | null = null
  private readonly refusedMetric: Record<Bound, { inc: () => void }>
  /** Since start, for /diagz: scans made on a thread, and refused by each bound. */
  private scanned = 0
  private readonly refusals: Record<Bound, number> = { instance: 0, tenant: 0, deadline: 0 }
  /** Set once a thread failed outside a scan: piscina then starts no other, and what it was given waited for ever. */
  private broken = false
  /** The running scans' aborts, for when the pool breaks. */
  private readonly aborts = new Set<AbortController>()

  constructor (opts: ScanPoolOptions) {
    this.threads = opts.threads
    this.observe = opts.observe
    this.inline = opts.inline
    this.piscina = new Piscina<ScanTask, ScanResult>({
      // The worker as this module is: scan-worker.ts run through tsx, scan-worker.js as built.
      filename: opts.worker ?? new URL('./scan-worker' + extname(fileURLToPath(import.meta.url)), import.meta.url).href,
      // No thread until a large input comes; one idle for 30 s ends.
      minThreads: 0,
      maxThreads: opts.threads,
      idleTimeout: 30_000,
      // A scan gives way to the event loop when they compete for a core (Linux: per thread).
      niceIncrement: 5,
      recordTiming: false
      // piscina's own queue stays empty: a scan is handed over only when a thread is free.
    })
    // piscina emits 'error' for a thread that failed outside a task: one that could not start (its
    // module did not load, no thread could be made). Unheard, the event was an uncaught exception
    // (the gateway exited), and the scan waiting for that thread never ended, nor did close().
    const onError = opts.onError
    this.piscina.on('error', (err: unknown) => {
      onError?.(err)
      this.broken = true
      for (const abort of this.aborts) abort.abort()
    })
    const registers = opts.registers
    const waiting = (): number => this.waiting
    const running = (): number => this.running
    new Gauge({ name: 'mantle_firewall_pool_waiting', help: `AI firewall scans of large inputs waiting for a thread (at most ${POOL_BOUNDS.waiting}, ${POOL_BOUNDS.waitingPerTenant} a tenant)`, registers, collect () { this.set(waiting()) } }) // eslint-disable-line no-new
    new Gauge({ name: 'mantle_firewall_pool_running', help: 'AI firewall scans of large inputs running on the pool\'s threads', registers, collect () { this.set(running()) } }) // eslint-disable-line no-new
    const refused = new Counter({ name: 'mantle_firewall_pool_refused_total', help: 'AI firewall scans of large inputs refused (503 OVERLOADED): the queue was full for the instance or for the tenant, or the call\'s timeoutMs passed while it waited', labelNames: ['bound'], registers })
    this.refusedMetric = { instance: refused.labels('instance'), tenant: refused.labels('tenant'), deadline: refused.labels('deadline') }
  }

  /**
   * Scans the named fields on a thread, in the tenant's turn. Refuses (OVERLOADED) when the queue
   * is full, or when `deadline` (performance.now()'s clock: the call's start plus its operation's
   * timeoutMs) passes before a thread takes the scan: the call's time is over (README: timeoutMs
   * bounds the whole call, and the shutdown's grace counts on it), a scan for it would be thread
   * time taken from the calls behind it, and the Kernel was not asked (a retry elsewhere is safe).
   */
  async scan (tenant: string, fields: readonly string[], input: Readonly<Record<string, unknown>>, caller: Caller | null, deadline = Infinity): Promise<Verdict> {
    if (this.waiting >= POOL_BOUNDS.waiting) {
      this.refuse('instance')
      throw new MantleError('OVERLOADED', 'Too many large inputs are waiting for the AI firewall on this instance: retry later', { headers: { 'retry-after': '1' } })
    }
    const queue = this.queues.get(tenant)
    if (queue !== undefined && queue.length >= POOL_BOUNDS.waitingPerTenant) {
      this.refuse('tenant')
      throw new MantleError('OVERLOADED', `A tenant has at most ${POOL_BOUNDS.waitingPerTenant} large inputs waiting for the AI firewall on this instance: retry later`, { headers: { 'retry-after': '1' } })
    }
    const values: Record<string, unknown> = {}
    for (const field of fields) if (Object.hasOwn(input, field)) values[field] = input[field]
    return await new Promise<Verdict>((resolve, reject) => {
      const waiting: Waiting = { tenant, task: { fields, values }, caller, resolve, reject, left: () => { this.drop(waiting, callerLeft()) }, timer: null }
      if (caller !== null && !watchCaller(caller, waiting.left)) {
        reject(callerLeft())
        return
      }
      if (queue === undefined) this.queues.set(tenant, [waiting])
      else queue.push(waiting)
      this.waiting++
      this.dispatch()
      if (this.queues.get(tenant)?.includes(waiting) === true && deadline !== Infinity) {
        waiting.timer = setTimeout(() => { if (this.drop(waiting, timedOut())) this.refuse('deadline') }, Math.max(0, deadline - performance.now()))
        waiting.timer.unref()
      }
    })
  }

  /** The pool's state and counts since start, for /diagz's `firewall` section. */
  figures (): { threads: number, threadsStarted: number, running: number, waiting: number, waitingMax: number, waitingPerTenantMax: number, tenantsWaiting: number, scanned: number, refused: Record<Bound, number>, broken: boolean } {
    return {
      threads: this.threads,
      threadsStarted: this.piscina.threads.length,
      running: this.running,
      waiting: this.waiting,
      waitingMax: POOL_BOUNDS.waiting,
      waitingPerTenantMax: POOL_BOUNDS.waitingPerTenant,
      tenantsWaiting: this.queues.size,
      scanned: this.scanned,
      refused: { ...this.refusals },
      broken: this.broken
    }
  }

  /** Waits for every scan taken to end, then ends the threads. */
  async close (): Promise<void> {
    this.closing ??= (async () => {
      if (this.waiting + this.running > 0) await new Promise<void>(resolve => { this.idle = resolve })
      await this.piscina.destroy()
    })()
    await this.closing
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
    if (w.timer !== null) clearTimeout(w.timer)
    const abort = new AbortController()
    this.aborts.add(abort)
    const onThread = this.broken ? Promise.reject(new Error('the scan pool is broken')) : this.piscina.run(w.task, { signal: abort.signal })
    onThread.then(result => {
      this.scanned++
      this.observe(result.seconds)
      w.resolve(verdictOf(result.verdict))
    }, (err: unknown) => {
      if (!this.broken) {
        w.reject(err)
        return
      }
      // No thread to be had: scanned on the event loop, as with BFF_FIREWALL_WORKERS=0.
      try {
        w.resolve(this.inline(w.task.fields, w.task.values))
      } catch (scanErr) {
        w.reject(scanErr)
      }
    }).finally(() => {
      this.aborts.delete(abort)
      this.running--
      this.dispatch()
      this.settled()
    })
  }

  /** A waiting scan is dropped (its caller left, or its deadline passed); false when it was not waiting (it runs, or was dropped already). */
  private drop (w: Waiting, err: MantleError): boolean {
    const queue = this.queues.get(w.tenant)
    const at = queue === undefined ? -1 : queue.indexOf(w)
    if (at < 0) return false
    queue!.splice(at, 1)
    if (queue!.length === 0) this.queues.delete(w.tenant)
    this.waiting--
    if (w.caller !== null) unwatchCaller(w.caller, w.left)
    if (w.timer !== null) clearTimeout(w.timer)
    w.reject(err)
    this.settled()
    return true
  }

  private refuse (bound: Bound): void {
    this.refusedMetric[bound].inc()
    this.refusals[bound]++
  }

  private settled (): void {
    if (this.idle !== null && this.waiting + this.running === 0) this.idle()
  }
}

const timedOut = (): MantleError => new MantleError('OVERLOADED', 'The input waited for the AI firewall until its operation\'s timeout: retry later', { headers: { 'retry-after': '1' } })
const callerLeft = (): MantleError => new MantleError('CLIENT_CLOSED', 'The caller left while its input waited for the AI firewall')

/** A thread's verdict as one made on the event loop: CLEAN itself when nothing was found, frozen as scanFields makes it. */
function verdictOf (v: Verdict): Verdict {
  if (v.findings.length === 0 && v.redacted === null) return CLEAN
  for (const f of v.findings) Object.freeze(f)
  return Object.freeze({ findings: Object.freeze(v.findings), risk: v.risk, categories: Object.freeze(v.categories), redacted: v.redacted === null ? null : Object.freeze(v.redacted) })
}
