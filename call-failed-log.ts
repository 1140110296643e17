// The `call failed` warn lines (a call the Kernel failed: errors.ts logLevelOf), bounded per
// operation and code. Written here because pino has no per-key sampling (its hooks see lines,
// not a count per key, and a level is all or nothing): one client calling an id the Kernel
// answers badly wrote a warn line per call, 1,700 lines/s from one /ws connection.
import type { FastifyBaseLogger } from 'fastify'

/** Lines written per (operation, code) in an interval; those past it are counted, not written. */
const CALL_FAILED_LINES = 10
const CALL_FAILED_INTERVAL_MS = 10_000
/**
 * Keys held at once. Operations x codes is bounded by the manifest; a key past this bound (a
 * manifest of more than 300 operations all failing in one interval) shares the key of op `*`.
 */
const CALL_FAILED_MAX_KEYS = 1000

interface Key {
  readonly op: string
  readonly code: string
  written: number
  suppressed: number
}

export interface CallFailedLogOptions {
  lines?: number
  intervalMs?: number
  maxKeys?: number
  /** Told the lines left out of a key in an interval that ended (a metric). */
  onSuppressed?: (op: string, code: string, n: number) => void
}

/**
 * Writes at most `lines` `call failed` lines per (operation, code) in each interval, then, when
 * the interval ends, one line per key that had more, `{ op, code, suppressed: n }`. The
 * intervals are one shared timer's, running only while some key wrote a line in the last one:
 * no timer per key, and nothing at all for a call that succeeds (only a failure calls this).
 */
export class CallFailedLog {
  private readonly keys = new Map<string, Key>()
  private timer: NodeJS.Timeout | null = null
  private readonly lines: number
  private readonly intervalMs: number
  private readonly maxKeys: number

  /** @param log where the lines that say how many were left out go (the app's logger) */
  constructor (private readonly log: FastifyBaseLogger, private readonly options: CallFailedLogOptions = {}) {
    this.lines = options.lines ?? CALL_FAILED_LINES
    this.intervalMs = options.intervalMs ?? CALL_FAILED_INTERVAL_MS
    this.maxKeys = options.maxKeys ?? CALL_FAILED_MAX_KEYS
  }

  /** Writes `fields` as a `call failed` warn line on `logger`, unless its key has had its lines this interval. */
  warn (logger: FastifyBaseLogger, op: string, code: string, fields: Record<string, unknown>): void {
    let id = op + '\n' + code
    let key = this.keys.get(id)
    if (key === undefined) {
      if (this.keys.size >= this.maxKeys) {
        op = '*'
        id = op + '\n' + code
        key = this.keys.get(id)
      }
      if (key === undefined) {
        key = { op, code, written: 0, suppressed: 0 }
        this.keys.set(id, key)
        if (this.timer === null) {
          this.timer = setInterval(() => { this.tick() }, this.intervalMs)
          this.timer.unref()
        }
      }
    }
    if (key.written < this.lines) {
      key.written++
      logger.warn(fields, 'call failed')
    } else {
      key.suppressed++
    }
  }

  /** The interval ended: says what was left out, and starts the next; stops once an interval wrote nothing. */
  private tick (): void {
    if (this.keys.size === 0) {
      this.stop()
      return
    }
    this.flush()
  }

  private flush (): void {
    for (const key of this.keys.values()) {
      if (key.suppressed === 0) continue
      this.log.warn({ op: key.op, code: key.code, suppressed: key.suppressed, intervalMs: this.intervalMs }, 'call failed lines suppressed')
      this.options.onSuppressed?.(key.op, key.code, key.suppressed)
    }
    this.keys.clear()
  }

  private stop (): void {
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }

  /** At close: says what the interval under way left out, and stops the timer. */
  close (): void {
    this.flush()
    this.stop()
  }
}
