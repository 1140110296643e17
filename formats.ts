// The JSON Schema formats every Ajv of the gateway checks (an operation's input, the REST
// coercion of its path and query, the manifest's own check): ajv-formats' full set, with its
// `url` read in linear time.
import type { Ajv } from 'ajv'
import addFormats from 'ajv-formats'

// ajv-formats' `url` is one regex: a scheme, `(?:\S+(?::\S*)?@)?` (user info), a host, a port and
// `(?:\/[^\s]*)?$` (a path). Searched whole, every `:` in the user info ran `\S*` to the end, and
// every `@` the host and the path to the end again: `http://` and 64 K colons held the event loop
// 3.4 s, a 45 KB string in one call 0.1 s, a whole 1 MiB body minutes. The same language, read
// in parts: the host (and port) is tried, anchored, after the scheme and after each `@` of the
// user info (before its first whitespace), and the path is checked by where the last whitespace
// is. A host reads no `@`, `:` or `/`, so the host attempts cover disjoint stretches.
const URL_REGEX = addFormats.default.get('url') as RegExp
const URL_HEAD = String.raw`^(?:https?|ftp):\/\/(?:\S+(?::\S*)?@)?`
const URL_TAIL = String.raw`(?::\d{2,5})?(?:\/[^\s]*)?$`
const URL_HOST = (() => {
  const source = URL_REGEX.source
  // Another ajv-formats' url would need reading again: refused at start-up, not misread.
  if (!source.startsWith(URL_HEAD) || !source.endsWith(URL_TAIL) || URL_REGEX.flags !== 'iu') throw new Error('ajv-formats changed its url format: formats.ts reads it by parts')
  return new RegExp(`${source.slice(URL_HEAD.length, source.length - URL_TAIL.length)}(?::\\d{2,5})?(?=\\/|$)`, 'iuy')
})()
const URL_SCHEME = /^(?:https?|ftp):\/\//i
const WHITESPACE = /\s/gu
// The last whitespace: each one's `\S*` stops at the next, so the search is linear.
const LAST_WHITESPACE = /\s\S*$/u

/** Whether `s` is a `url` as ajv-formats' regex reads it, in time linear in its length. */
export function isUrl (s: string): boolean {
  const scheme = URL_SCHEME.exec(s)
  if (scheme === null) return false
  const from = scheme[0].length
  WHITESPACE.lastIndex = from
  const userInfoEnd = WHITESPACE.test(s) ? WHITESPACE.lastIndex - 1 : s.length
  const lastSpace = s.search(LAST_WHITESPACE)
  // The host and port at `at`, then the end, or a path with no whitespace to the end.
  const hostAt = (at: number): boolean => {
    URL_HOST.lastIndex = at
    if (!URL_HOST.test(s)) return false
    return URL_HOST.lastIndex === s.length || lastSpace < URL_HOST.lastIndex
  }
  if (hostAt(from)) return true
  // User info is one character or more, with no whitespace, up to an `@`.
  for (let at = s.indexOf('@', from + 1); at !== -1 && at < userInfoEnd; at = s.indexOf('@', at + 1)) if (hostAt(at + 1)) return true
  return false
}

/** ajv-formats' full formats on `ajv`, its `url` read by isUrl. */
export function addGatewayFormats (ajv: Ajv): Ajv {
  addFormats.default(ajv)
  ajv.addFormat('url', isUrl)
  return ajv
}
