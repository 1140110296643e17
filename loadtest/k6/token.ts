// The suites' check of their TOKEN, in k6 (k6/encoding; the reckoning is tokenShortfall in
// ./common.ts, which the Node tests import).
import encoding from 'k6/encoding'
import { tokenShortfall } from './common.ts'

/** A JWT's `exp` claim, or null (no token, or one that does not say). */
export function tokenExpiry (token: string): number | null {
  const payload = token.split('.')[1]
  if (payload === undefined) return null
  try {
    const exp = (JSON.parse(encoding.b64decode(payload, 'rawurl', 's')) as { exp?: unknown }).exp
    return typeof exp === 'number' ? exp : null
  } catch {
    return null
  }
}

/** Throws (so k6 ends in setup, before any load) when `token` expires within `runS` seconds. */
export function refuseShortToken (token: string, runS: number): void {
  const why = tokenShortfall(tokenExpiry(token), Date.now() / 1000, runS)
  if (why !== null) throw new Error(why)
}
