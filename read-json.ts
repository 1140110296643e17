// Response bodies read as JSON with a bound: the Kernel's answers, the JWKS.
import type { Dispatcher } from 'undici'

/** What readJson returns for a body that is not JSON, or is over its limit. */
export const INVALID = Symbol('invalid')

/** What readJson returns when the bytes its caller may hold (a ByteBudget) would be exceeded: the body is cut, not read. */
export const OVER_BUDGET = Symbol('over budget')

/**
 * Bytes that the bodies read at once, together, may hold: `take` claims `bytes` (false, and
 * nothing claimed, when there is not room for them), `give` hands back what was claimed.
 */
export interface ByteBudget {
  take: (bytes: number) => boolean
  give: (bytes: number) => void
}

/**
 * Decodes a body as undici's body.json() does one with a length (the WHATWG "UTF-8 decode",
 * which drops a leading BOM): Buffer's toString kept it, and the same answer was a 502 chunked.
 */
const UTF8 = new TextDecoder()

/**
 * A JSON body read up to `limit` bytes (null when empty, 204 or 205): INVALID when it is not JSON or is
 * longer. A connection lost mid-body rejects. With a `budget`, its bytes are claimed from it and
 * handed back once it is parsed: OVER_BUDGET, the body cut, when they find no room. A length
 * announced is claimed whole at once (a body that trickles holds it until it ends or its call's
 * deadline), so that such an answer, nearly every one, is still read by undici's own reader: read
 * chunk by chunk here, a REST call through the gateway spent more CPU on it. A body without a
 * length is claimed chunk by chunk as it arrives.
 */
export async function readJson (res: Dispatcher.ResponseData, limit: number, budget?: ByteBudget): Promise<unknown> {
  const length = Number(res.headers['content-length'])
  // A 204 or a 205 has no content (RFC 9110 §15.3.5, §15.3.6), whatever framing it announces.
  if (res.statusCode === 204 || res.statusCode === 205 || length === 0) {
    await res.body.dump()
    return null
  }
  if (length > limit) {
    await res.body.dump()
    return INVALID
  }
  let claimed = 0
  try {
    if (length > 0) {
      if (budget !== undefined) {
        if (!budget.take(length)) return cut(res)
        claimed = length
      }
      return await res.body.json()
    }
    // No length announced: read with a bound rather than trusting the stream.
    const chunks: Buffer[] = []
    let size = 0
    for await (const chunk of res.body) {
      size += (chunk as Buffer).length
      if (size > limit) {
        res.body.destroy()
        return INVALID
      }
      if (budget !== undefined) {
        if (!budget.take((chunk as Buffer).length)) return cut(res)
        claimed += (chunk as Buffer).length
      }
      chunks.push(chunk as Buffer)
    }
    return size === 0 ? null : JSON.parse(UTF8.decode(Buffer.concat(chunks, size)))
  } catch (err) {
    // Only a body that is not JSON is a bad answer; a connection reset mid-body, or the
    // deadline, is the request's failure (for the Kernel, 503 or 504, as before the headers).
    if (err instanceof SyntaxError) return INVALID
    throw err
  } finally {
    if (claimed > 0) budget!.give(claimed)
  }
}

function cut (res: Dispatcher.ResponseData): typeof OVER_BUDGET {
  res.body.on('error', () => {})
  res.body.destroy()
  return OVER_BUDGET
}
