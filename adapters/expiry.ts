import type { Identity } from '../plugins/auth/identity.js'

/**
 * Longest wait before the deadline is looked at again. Timers run on the monotonic clock, the
 * deadline (a token's exp) is on the wall clock: one timer armed for the whole time left fired
 * that long, however far the wall clock stepped forward meanwhile (an NTP correction, a VM
 * resumed after a pause, during which the monotonic clock stood still), and a connection stayed
 * open on a token expired an hour (the step) before. One timer callback a minute per connection.
 */
const RECHECK_MS = 60_000

/**
 * Calls `fn` once `expiresAt` (ms since the epoch, a token's expiry) has passed; returns the
 * canceller, which the caller runs when its connection ends. A deadline further than RECHECK_MS
 * is waited in steps, re-armed until Date.now() reaches it: a wall clock stepped forward past it
 * ends it within RECHECK_MS. `fn` always runs from a timer, never from this call, even for a
 * deadline already past. Nothing is armed for Infinity (a token that never expires: identity
 * off). The timer does not hold the process open.
 */
export function atExpiry (expiresAt: number, fn: () => void): () => void {
  if (expiresAt === Infinity) return () => {}
  let timer: NodeJS.Timeout
  const arm = (): void => {
    timer = setTimeout(() => {
      if (Date.now() < expiresAt) arm()
      else fn()
    }, Math.min(Math.max(expiresAt - Date.now(), 0), RECHECK_MS))
    timer.unref()
  }
  arm()
  // Ref'd before it is cleared: Node frees the list of timers of a delay when its last timer is
  // cleared only for a ref'd timer (it keeps an unref'd one's for the next, as http's come back).
  // A delay is RECHECK_MS, shared, until the token's last minute, then the time left (in ms), a
  // connection's own: when each delay was the whole time left, each closed connection left a
  // list (150-260 bytes) until its token would have expired, and a client reconnecting in a loop
  // with a 24 h token grew the heap without bound. ref() then clearTimeout() leaves the process's
  // ref count as it was.
  return () => { timer.ref(); clearTimeout(timer) }
}

/** Why a connection's identity ended. */
export type IdentityEnd = 'expired' | 'withdrawn'

/** The close reason (and SSE error's detail) of each end, the same on every face. */
export const IDENTITY_ENDED: Readonly<Record<IdentityEnd, string>> = Object.freeze({
  expired: 'The token has expired',
  withdrawn: 'The token\'s signing key was withdrawn'
})

/**
 * Calls `onEnd` once, when the identity a stream was opened with ends: its token expires
 * ('expired', atExpiry), or the JWKS key it was verified with is withdrawn or replaced
 * ('withdrawn', its lease). Returns the one canceller of both, which the caller runs when its
 * stream ends: the timer is cleared and the lease's listener let go, so a lease holds a listener
 * per open stream only. `onEnd` never runs from this call.
 */
export function untilIdentityEnds (identity: Pick<Identity, 'expiresAt' | 'lease'>, onEnd: (why: IdentityEnd) => void): () => void {
  let ended = false
  let cancelExpiry = (): void => {}
  let release = (): void => {}
  const cancel = (): void => {
    ended = true
    cancelExpiry()
    release()
  }
  const end = (why: IdentityEnd): void => {
    if (ended) return
    cancel()
    onEnd(why)
  }
  cancelExpiry = atExpiry(identity.expiresAt, () => { end('expired') })
  if (identity.lease !== undefined) release = identity.lease.onWithdrawn(() => { end('withdrawn') })
  return cancel
}
