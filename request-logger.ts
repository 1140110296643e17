// The logger of each request (request.log, reply.log): a pino child, made only when the request
// writes a line at a level in force. Written here because neither Fastify nor pino offers a lazy
// child: pino's child() serializes its bindings (the request id) through the redaction at once,
// and with redaction paths that start with a wildcard (`*.input`) that runs the redactor on
// every request, 2 µs a call in a cache hit's profile, for a logger that production's level
// (warn) almost never writes to.
import type { FastifyBaseLogger } from 'fastify'
import type { Bindings, ChildLoggerOptions } from 'pino'

type Level = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace'

/** What a request's logger reads from its parent besides the log methods: pino's level values. */
type PinoParent = FastifyBaseLogger & { levels: { values: Record<string, number> } }

class RequestLogger implements FastifyBaseLogger {
  #child: FastifyBaseLogger | null = null
  #level: string

  constructor (private readonly parent: PinoParent, private readonly bindings: Bindings, private readonly options: ChildLoggerOptions) {
    this.#level = options.level ?? parent.level
  }

  /** The pino child, made on first use with the bindings and options Fastify gave. */
  private get real (): FastifyBaseLogger {
    if (this.#child === null) {
      this.#child = this.parent.child(this.bindings, this.options)
      if (this.#child.level !== this.#level) this.#child.level = this.#level
    }
    return this.#child
  }

  /** Whether a line at this level is written (an unknown level: the child decides). */
  private enabled (level: Level): boolean {
    const values = this.parent.levels.values
    const threshold = values[this.#level]
    return threshold === undefined || values[level] >= threshold
  }

  // The child, once made, always has this level (made with it, or set to it by the setter).
  get level (): string { return this.#level }
  set level (level: string) {
    this.#level = level
    if (this.#child !== null) this.#child.level = level
  }

  fatal (...args: unknown[]): void { this.write('fatal', args) }
  error (...args: unknown[]): void { this.write('error', args) }
  warn (...args: unknown[]): void { this.write('warn', args) }
  info (...args: unknown[]): void { this.write('info', args) }
  debug (...args: unknown[]): void { this.write('debug', args) }
  trace (...args: unknown[]): void { this.write('trace', args) }
  silent (): void {}

  private write (level: Level, args: unknown[]): void {
    if (!this.enabled(level)) return
    const real = this.real
    ;(real[level] as (...a: unknown[]) => void).apply(real, args)
  }

  child (bindings: Bindings, options?: ChildLoggerOptions): FastifyBaseLogger {
    return this.real.child(bindings, options)
  }
}

/**
 * Fastify's childLoggerFactory: a RequestLogger under a pino logger; under any other (Fastify's
 * null logger when logging is off) what Fastify's own factory gives.
 */
export function requestLoggerFactory (logger: FastifyBaseLogger, bindings: Bindings, options: ChildLoggerOptions): FastifyBaseLogger {
  const values = (logger as Partial<PinoParent>).levels?.values
  return values === undefined ? logger.child(bindings, options) : new RequestLogger(logger as PinoParent, bindings, options)
}
