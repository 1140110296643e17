/** setTimeout's largest delay (24.8 days): a longer one would fire at once (TimeoutOverflowWarning). */
const MAX_TIMER_MS = 2 ** 31 - 1

/**
 * Calls `fn` once `expiresAt` (ms since the epoch, a token's expiry) has passed; returns the
 * canceller, which the caller runs when its connection ends. A deadline beyond setTimeout's
 * largest delay is waited in steps, re-armed until Date.now() reaches it. `fn` always runs from
 * a timer, never from this call, even for a deadline already past. Nothing is armed for
 * Infinity (a token that never expires: identity off). The timer does not hold the process open.
 */
export function atExpiry (expiresAt: number, fn: () => void): () => void {
  if (expiresAt === Infinity) return () => {}
  let timer: NodeJS.Timeout
  const arm = (): void => {
    timer = setTimeout(() => {
      if (Date.now() < expiresAt) arm()
      else fn()
    }, Math.min(Math.max(expiresAt - Date.now(), 0), MAX_TIMER_MS))
    timer.unref()
  }
  arm()
  return () => clearTimeout(timer)
}
