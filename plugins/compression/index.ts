import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import compress from '@fastify/compress'
import pick from '@fastify/accept-negotiator'
import { constants, type BrotliOptions, type ZlibOptions } from 'node:zlib'

// Response compression with @fastify/compress, negotiated from Accept-Encoding (br, gzip,
// deflate, in the client's order of preference; identity or no header: none). It must be
// registered before any route: it attaches itself to routes as they are declared.

/** Bodies smaller than this go out as they are: below ~1 KB compression saves less than it costs. */
export const COMPRESSION_THRESHOLD = 1024

/**
 * What gets compressed: JSON (problem+json and GraphQL's response type included), text and XML.
 * Not text/event-stream (a compressor buffers, and events must leave as they happen) and not
 * octet-stream or other binary types, which are usually compressed already.
 */
export const COMPRESSIBLE = /^text\/(?!event-stream)|(?:\+|\/)json(?:;|$)|(?:\+|\/)xml(?:;|$)/

/** The codings offered, in the gateway's order of preference. */
export const ENCODINGS = ['br', 'gzip', 'deflate'] as const
export type Encoding = typeof ENCODINGS[number]

const CODINGS = [...ENCODINGS]
// What @fastify/compress hands its negotiator: `*` (the compression plugin has written any out
// already) and x-gzip read as gzip, the header lowercased.
const GZIP_ALIAS = /\*|x-gzip/gu

/**
 * The coding of ENCODINGS `accept` prefers, as @fastify/compress picks it (the same negotiator,
 * given the header as it gives it): the highest q above 0, on a tie the first of ENCODINGS; null
 * when it takes none of them.
 */
export function negotiate (accept: string): Encoding | null {
  return pick(accept.toLowerCase().replace(GZIP_ALIAS, 'gzip'), CODINGS)
}

/** Brotli's default quality (11) costs tens of ms per 100 KB: 4 is near gzip's speed and smaller. */
export const BROTLI_OPTIONS: BrotliOptions = Object.freeze({ params: Object.freeze({ [constants.BROTLI_PARAM_QUALITY]: 4 }) })
export const ZLIB_OPTIONS: ZlibOptions = Object.freeze({ level: 6 })

/**
 * An Accept-Encoding with its `*` written out as the codings the header does not name, each with
 * the `*`'s parameters: `gzip;q=0, *` is `gzip;q=0, br, deflate`. @fastify/compress reads `*` as
 * gzip, and its negotiator takes the best quality of a coding named twice: a client that refused
 * gzip (q=0) and took anything else got gzip (RFC 9110 §12.5.3: `*` matches any coding not
 * explicitly listed). `x-gzip` names gzip (RFC 9110 §8.4.1.3). Only called with a `*` in it.
 */
export function withoutWildcard (header: string): string {
  const named = new Set<string>()
  const kept: string[] = []
  let wildcard: string | null = null
  for (const member of header.split(',')) {
    const semi = member.indexOf(';')
    const coding = (semi === -1 ? member : member.slice(0, semi)).trim().toLowerCase()
    if (coding === '*') {
      wildcard ??= semi === -1 ? '' : member.slice(semi)
      continue
    }
    named.add(coding === 'x-gzip' ? 'gzip' : coding)
    kept.push(member)
  }
  if (wildcard !== null) for (const coding of ENCODINGS) if (!named.has(coding)) kept.push(coding + wildcard)
  return kept.join(',')
}

async function compressionPlugin (app: FastifyInstance): Promise<void> {
  // Before @fastify/compress negotiates (onSend): only a header with a `*` is rewritten.
  app.addHook('onRequest', (request, _reply, done) => {
    const accept = request.headers['accept-encoding']
    if (accept !== undefined && accept.includes('*')) request.headers['accept-encoding'] = withoutWildcard(accept)
    done()
  })
  await app.register(compress, {
    global: true,
    encodings: [...ENCODINGS],
    threshold: COMPRESSION_THRESHOLD,
    customTypes: COMPRESSIBLE,
    brotliOptions: BROTLI_OPTIONS,
    zlibOptions: ZLIB_OPTIONS,
    // Request bodies are not inflated: a compressed body is refused as it always was, so a small
    // upload can never expand into a large one behind the body limit.
    globalDecompression: false
  })
}

export default fp(compressionPlugin, { name: 'mantle-compression', fastify: '5.x' })
