import type { IncomingMessage, ServerResponse } from 'node:http'
import type { WebSocket } from 'ws'

/**
 * Where a call's answer goes: the HTTP response of the request that carries it (REST, a batch,
 * tRPC and GraphQL over HTTP) or the WebSocket it came on. The faces hand it over as it is, at no
 * cost; only a stage that is about to wait on the Kernel watches it (watchCaller), so cache hits
 * and refusals never pay for it.
 */
export type Caller = ServerResponse | WebSocket

/** Whether the caller is a WebSocket (else the HTTP response of the request). */
export const isSocket = (caller: Caller): caller is WebSocket => 'readyState' in caller

/**
 * The HTTP request of a call that came in one (the request of its response), else undefined:
 * identity remembers a refused token for it (plugins/auth), so that the calls of one request
 * and the checks before them (the rate-limit guard) verify a bad token once.
 */
export const requestOf = (caller: Caller | null): IncomingMessage | undefined => caller === null || isSocket(caller) ? undefined : caller.req

/**
 * Whether the caller has left: the response closed before it was sent, or the WebSocket is
 * closing or closed. A response that was sent is not watched any more: the call is over then.
 */
export function callerGone (caller: Caller): boolean {
  return isSocket(caller) ? caller.readyState !== 1 : caller.destroyed
}

// One 'close' listener per caller, however many of its calls wait on the Kernel at once (the
// calls of a batch, or of a WebSocket, up to their bound): a listener each passed Node's
// MaxListeners warning at 11. Weak: a caller that is gone takes its set with it.
const watchers = new WeakMap<Caller, Set<() => void>>()

/**
 * Calls `left` once, when the caller leaves, until unwatchCaller. False, and nothing watched,
 * when it has already left.
 */
export function watchCaller (caller: Caller, left: () => void): boolean {
  if (callerGone(caller)) return false
  let set = watchers.get(caller)
  if (set === undefined) {
    const calls = new Set<() => void>()
    watchers.set(caller, calls)
    set = calls
    let fired = false
    const fire = (): void => {
      if (fired) return
      fired = true
      watchers.delete(caller)
      for (const call of calls) call()
    }
    // 'close' of a response also comes once it was sent; by then its calls have unwatched.
    caller.once('close', fire)
    if (isSocket(caller)) {
      // A WebSocket the gateway closes (an expired token, a client that does not read, shutdown)
      // emits 'close' only once the client answers, or after ws' 30 s wait for a client that
      // never does: its calls kept their Kernel slots meanwhile. Its close() is where it leaves.
      const close = caller.close
      caller.close = function (this: WebSocket, ...args: Parameters<WebSocket['close']>) {
        close.apply(this, args)
        fire()
      }
    }
  }
  set.add(left)
  return true
}

export function unwatchCaller (caller: Caller, left: () => void): void {
  watchers.get(caller)?.delete(left)
}

/**
 * A call's watch on its caller while it waits (README, "Clients that leave"), made only by a call
 * about to wait: `onLeave` is what it hands watchCaller. When the caller leaves, what is running
 * is cancelled (`cancel`: the Kernel client's attempt deadline) and a pause ends at once.
 */
export class Leave {
  private left = false
  /** What the caller's leaving cancels now (the running attempt's deadline); else null. */
  cancel: { cancel: () => void } | null = null
  private wake: (() => void) | null = null

  /** Watched on the caller (watchCaller): it has left. */
  readonly onLeave = (): void => {
    this.left = true
    this.cancel?.cancel()
    this.wake?.()
  }

  gone (): boolean {
    return this.left
  }

  /** Waits `ms`, cut short when the caller leaves (a backoff before a retry, a repeat's poll). */
  async pause (ms: number): Promise<void> {
    if (this.left) return
    await new Promise<void>(resolve => {
      const timer = setTimeout(() => { this.wake = null; resolve() }, ms)
      this.wake = () => { clearTimeout(timer); this.wake = null; resolve() }
    })
  }
}
