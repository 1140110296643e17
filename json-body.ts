// The text of a JSON request body, on every face that reads one over HTTP (REST, batch, tRPC,
// GraphQL). JSON is UTF-8 (RFC 8259 §8.1): a body that is not, or whose media type names
// another charset, is refused, never read with U+FFFD for each bad byte (a name "caf\xE9"
// reached the Kernel as "caf\uFFFD"), as a query string and a path already were.
import { Transform, pipeline, type Readable } from 'node:stream'
import type { FastifyInstance } from 'fastify'
import { BodyRefused } from './errors.js'

/** One strict decoder for every body: bytes that are not UTF-8 throw. The BOM is kept, for the JSON parser to judge. */
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })
/** A media type's parameter: its name, and its value as a token or a quoted string (RFC 9110 §5.6.6). */
const MEDIA_PARAMETER = /;\s*([!#$%&'*+.^`|~\w-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)/g

/**
 * Whether a media type names no charset but UTF-8 (case-insensitive, quoted or not), by either
 * of the labels clients send for it (`utf-8`, and `utf8`, which the WHATWG Encoding Standard
 * also reads as UTF-8).
 */
function utf8Charset (type: string): boolean {
  for (const [, name, value] of type.matchAll(MEDIA_PARAMETER)) {
    if (name.toLowerCase() !== 'charset') continue
    const charset = value.startsWith('"') ? value.slice(1, -1).replace(/\\(.)/g, '$1') : value
    const label = charset.toLowerCase()
    if (label !== 'utf-8' && label !== 'utf8') return false
  }
  return true
}

/**
 * A JSON body's bytes as text ('' for none), or why it is refused: 415 for a charset other than
 * UTF-8, 400 for bytes that are not UTF-8. A media type without parameters is not parsed.
 */
export function jsonText (contentType: string | undefined, bytes: Buffer): string | BodyRefused {
  // An empty body has no encoding to get wrong: it is an absent body, whatever the type names.
  if (bytes.length === 0) return ''
  if (otherCharset(contentType)) return new BodyRefused('UNSUPPORTED_MEDIA_TYPE', 'The request body must be application/json in UTF-8')
  try {
    return UTF8.decode(bytes)
  } catch {
    return notUtf8()
  }
}

const otherCharset = (contentType: string | undefined): boolean => contentType !== undefined && contentType.includes(';') && !utf8Charset(contentType)
const notUtf8 = (): BodyRefused => new BodyRefused('VALIDATION_FAILED', 'The body is not valid UTF-8')

/**
 * The body `payload` checked as jsonText checks one, on its bytes as they pass, unchanged: for a
 * body whose parser is not the gateway's (the GraphQL face's `application/graphql`, which
 * mercurius parses as text in a scope of its own, where it takes precedence over any parser of
 * ours: its bad bytes reached the Kernel as U+FFFD). The stream fails with the refusal, which
 * Fastify answers as it answers a parser's.
 */
export function checkedUtf8 (contentType: string | undefined, payload: Readable): Readable {
  const decoder = new TextDecoder('utf-8', { fatal: true })
  let first = true
  const check = new Transform({
    transform (chunk: Buffer, _encoding, done) {
      if (first && chunk.length > 0) {
        first = false
        if (otherCharset(contentType)) {
          done(new BodyRefused('UNSUPPORTED_MEDIA_TYPE', 'The request body must be UTF-8'))
          return
        }
      }
      try {
        decoder.decode(chunk, { stream: true })
      } catch {
        done(notUtf8())
        return
      }
      done(null, chunk)
    },
    flush (done) {
      try {
        decoder.decode()
      } catch {
        done(notUtf8())
        return
      }
      done()
    }
  })
  // A client that leaves mid-body fails the check too, as it failed the payload.
  return pipeline(payload, check, () => {})
}

/**
 * The gateway's JSON body parser, in `app`'s scope: an empty body is an absent one (many clients
 * set the type on every request), a body not in UTF-8 is refused (jsonText). `prototypeKeys`:
 * 'error' refuses a `__proto__` key or a `constructor` holding a `prototype` anywhere in the body
 * (secure-json-parse, Fastify's own), 'keep' keeps them as the own keys JSON.parse makes, for a
 * face whose body is a call's input: the pipeline refuses them there after the token, the roles
 * and the limits, as on every other face (a viewer's such body to an editor's mutation was a 400
 * over REST, a 403 everywhere else), and a REST batch refuses that call alone.
 */
export function addJsonBodyParser (app: FastifyInstance, prototypeKeys: 'error' | 'keep'): void {
  const action = prototypeKeys === 'keep' ? 'ignore' : 'error'
  const parseJson = app.getDefaultJsonParser(action, action)
  if (app.hasContentTypeParser('application/json')) app.removeContentTypeParser('application/json')
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body, done) => {
    const text = jsonText(request.headers['content-type'], body as Buffer)
    if (typeof text !== 'string') done(text, undefined)
    else if (text === '') done(null, undefined)
    else parseJson(request, text, done)
  })
}
