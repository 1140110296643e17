import type { EventBus } from '../../plugins/events/index.js'
import type { Identity } from '../../plugins/auth/index.js'
import { MantleError } from '../../errors.js'
import { ProblemError } from './errors.js'
import { untilIdentityEnds, IDENTITY_ENDED, type IdentityEnd } from '../expiry.js'
import { markMade, type UnreadBytes } from '../unread.js'
import { MAX_BUFFERED_BYTES } from '../slow-reader.js'
import type { ServerResponse } from 'node:http'

/**
 * The event subscriptions served over tRPC on this instance. Each is a pull stream on the
 * bus, for its caller's tenant only; it ends when the client leaves, when the gateway shuts
 * down (an open SSE response would otherwise hold the close), or, over SSE, with an
 * UNAUTHENTICATED error when the token expires or the JWKS withdraws (or replaces) the key it was
 * verified with. Bounded by the bus's own subscription limit.
 */
export class LiveSubscriptions {
  /** Each open stream's controller, and its SSE response (null over WebSocket). */
  private readonly open = new Map<AbortController, ServerResponse | null>()
  private closing = false

  /**
   * @param endedGraceMs how long an SSE response whose identity ended (its token expired, its key
   *   withdrawn) may take to be read to its end (the UNAUTHENTICATED event) before its connection
   *   is closed
   * @param cut called for each stream cut past maxBufferedBytes (mantle_slow_reader_cuts_total)
   * @param unread the instance's count of what clients leave unread, each tenant a share of it
   */
  constructor (private readonly bus: EventBus, private readonly endedGraceMs = 30_000, private readonly maxBufferedBytes = MAX_BUFFERED_BYTES, private readonly cut?: () => void, private readonly unread?: UnreadBytes) {}

  /** `response`: the SSE response the stream is sent on; null over WebSocket (ended by its socket's close). */
  async * stream (name: string, identity: Identity, signal: AbortSignal | undefined, requestId: string, response: ServerResponse | null): AsyncGenerator<unknown, void, unknown> {
    const overSse = response !== null
    const controller = new AbortController()
    const stop = (): void => controller.abort()
    let ended: IdentityEnd | null = null
    signal?.addEventListener('abort', stop, { once: true })
    if (signal?.aborted === true) stop()
    this.open.set(controller, response)
    const disarm = overSse ? untilIdentityEnds(identity, why => { ended = why; stop(); this.endSoon(response) }) : () => {}
    try {
      for await (const payload of this.bus.stream(name, identity.tenant, controller.signal, undefined, overSse ? this.bounded(response, stop, identity.tenant) : undefined)) yield payload
      if (ended !== null) throw new MantleError('UNAUTHENTICATED', `${IDENTITY_ENDED[ended]}: subscribe again with a fresh token`)
      // An SSE stream that simply ends is complete to httpSubscriptionLink, which then never
      // reconnects: at every deploy, browsers stopped getting events. A 503 it retries.
      if (this.closing && overSse) throw new MantleError('OVERLOADED', 'The gateway is shutting down: subscribe again', { headers: { 'retry-after': '1' } })
    } catch (err) {
      throw ProblemError.from(err, requestId)
    } finally {
      disarm()
      signal?.removeEventListener('abort', stop)
      this.open.delete(controller)
    }
  }

  /**
   * The bus's `behind` for an SSE response: an event that finds its client holding more than
   * maxBufferedBytes unread, written to the response and not yet sent (writableLength), taken from
   * the bus and not yet written (`pulled`), or queued on the bus, ends the subscription and closes
   * the connection, as a WebSocket's is closed with 1013. A client that read nothing (its socket
   * full) had the bus queue up to 256 events for it, 256 MB of 1 MB events, for each subscription
   * its tenant's share allows. Judged by what it held before the event, not with it: a client a
   * moment behind is not cut for one large event.
   *
   * `pulled`: tRPC takes events from the bus ahead of its client (withPing asks for the next one
   * before it hands on the one it holds, and the web streams between it and the response hold one
   * each): with them uncounted, a client that read nothing held 3 events past the bound (3 MiB of
   * 1 MiB events, measured: 8 MiB taken from the bus, 4 MiB in the kernel's buffers, 1 MiB in
   * writableLength). Counted in the bytes of the events' JSON as the bus gives them back, and let
   * go as the response is written to (its SSE framing and pings included: never below zero).
   *
   * What it holds of its own (taken and not yet written, and writableLength: the bus's queue
   * holds the events every subscriber shares) counts in `unread` against `tenant` until the
   * response closes, as a WebSocket's frames do, and an event that finds the tenant's share or the
   * instance's total passed cuts it too. Uncounted, one tenant's 10,000 subscriptions (its share
   * of the bus's) that read nothing each held up to 4 MiB outside the bound that keeps a tenant's
   * sockets within a tenth of half the heap.
   */
  private bounded (response: ServerResponse, stop: () => void, tenant: string): (bytes: number) => void {
    let queued = 0
    let pulled = 0
    const unread = this.unread
    /** Bytes counted in `unread` (null once the response has closed: all given back). */
    let counted: number | null = response.closed || response.destroyed ? null : 0
    const sync = (): void => {
      if (unread === undefined || counted === null) return
      const now = pulled + response.writableLength
      if (now !== counted) unread.add(tenant, now - counted)
      counted = now
    }
    if (unread !== undefined) {
      response.once('close', () => {
        if (counted !== null) unread.add(tenant, -counted)
        counted = null
      })
    }
    const write = response.write
    response.write = function (this: ServerResponse, chunk: unknown, ...rest: unknown[]): boolean {
      const length = typeof chunk === 'string' ? Buffer.byteLength(chunk) : (chunk as Uint8Array | null)?.byteLength ?? 0
      pulled = Math.max(0, pulled - length)
      const flowing = (write as (...args: unknown[]) => boolean).call(this, chunk, ...rest)
      sync()
      return flowing
    } as ServerResponse['write']
    return (bytes) => {
      const before = queued + pulled
      queued += bytes
      if (bytes < 0) pulled -= bytes
      if (bytes > 0 && !response.destroyed && (before + response.writableLength > this.maxBufferedBytes || unread?.admits(tenant) === false)) {
        stop()
        response.destroy()
        this.cut?.()
        return
      }
      sync()
    }
  }

  /**
   * Closes `response`'s connection unless it is read to its end (the identity's error) within
   * endedGraceMs, as a WebSocket closed with 4401 is cut once its close handshake times out. Its
   * subscription has left the bus, which bounds the streams open per tenant: a client that read
   * nothing (its socket full) kept its connection, and the events the gateway held for it, for as
   * long as it liked, and could open as many more as its fresh tokens allowed.
   */
  private endSoon (response: ServerResponse | null): void {
    if (response === null || response.writableFinished || response.destroyed) return
    const timer = setTimeout(() => { if (!response.writableFinished) response.destroy() }, this.endedGraceMs)
    timer.unref()
    response.once('close', () => { clearTimeout(timer) })
  }

  /**
   * Ends every stream (at shutdown): SSE clients are told to subscribe again (elsewhere). An SSE
   * response then makes nothing more but its end: marked made (markMade), its connection is
   * closed by the shutdown (app.ts's reap) if its client has not read it to that end. Waited for
   * as a call in flight, a client that read nothing (its socket full) held the shutdown until the
   * process was killed at its grace (exit 1).
   */
  closeAll (): void {
    this.closing = true
    for (const [controller, response] of this.open) {
      controller.abort()
      if (response !== null) markMade(response)
    }
  }
}

/**
 * `stream` as tRPC's SSE producer may pull it: every pull's promise is marked handled as it is
 * made, and still settles for tRPC as it would. tRPC's ping (withPing) asks for the next event
 * before it hands on the one it holds, and looks at that promise only once its reader pulls
 * again: while a client reads nothing (its socket full), none does. A subscription that ended
 * meanwhile with its error (the token expired, its key withdrawn, the gateway shutting down)
 * rejected a promise no one held, an unhandled rejection: close-with-grace shut the instance
 * down for it (at shutdown, exited at once), with every tenant's calls.
 */
export function pulledSafely<T> (stream: AsyncGenerator<T, void, unknown>): AsyncGenerator<T, void, unknown> {
  const noop = (): void => {}
  const mark = <R>(promise: Promise<R>): Promise<R> => {
    promise.catch(noop)
    return promise
  }
  // The very promises the generator gives, not ones of an async function around them: those
  // would reject unhandled in their turn.
  const safe: AsyncGenerator<T, void, unknown> = {
    next: (...args: [] | [unknown]) => mark(stream.next(...args)),
    return: (value: void | PromiseLike<void>) => mark(stream.return(value)),
    throw: (err: unknown) => mark(stream.throw(err)),
    [Symbol.asyncIterator]: () => safe
  }
  return safe
}
