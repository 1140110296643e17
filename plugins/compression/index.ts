import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import compress from '@fastify/compress'
import { constants } from 'node:zlib'

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

async function compressionPlugin (app: FastifyInstance): Promise<void> {
  await app.register(compress, {
    global: true,
    encodings: ['br', 'gzip', 'deflate'],
    threshold: COMPRESSION_THRESHOLD,
    customTypes: COMPRESSIBLE,
    // Brotli's default quality (11) costs tens of ms per 100 KB: 4 is near gzip's speed and smaller.
    brotliOptions: { params: { [constants.BROTLI_PARAM_QUALITY]: 4 } },
    zlibOptions: { level: 6 },
    // Request bodies are not inflated: a compressed body is refused as it always was, so a small
    // upload can never expand into a large one behind the body limit.
    globalDecompression: false
  })
}

export default fp(compressionPlugin, { name: 'mantle-compression', fastify: '5.x' })
