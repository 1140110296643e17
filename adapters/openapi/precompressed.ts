import type { FastifyReply, FastifyRequest } from 'fastify'
import { ReadStream } from 'node:fs'
import { Readable } from 'node:stream'
import { readFile } from 'node:fs/promises'
import zlib from 'node:zlib'
import { promisify } from 'node:util'
import { BROTLI_OPTIONS, COMPRESSION_THRESHOLD, ZLIB_OPTIONS, negotiate, type Encoding } from '../../plugins/compression/index.js'

/**
 * The files of /docs (Swagger UI's bundle, its CSS, ...) compressed once per file and coding,
 * then answered from memory. @fastify/compress compressed each answer anew, as it must a Kernel
 * answer: the 1.6 MB bundle cost 35-50 ms of CPU per request (br, gzip), for anyone without a
 * token, and a client that closed each connection once asked paid nothing for it.
 */

/** Codings × files kept: Swagger UI's static directory has about a dozen files. */
const MAX_ENTRIES = 64
/** Files larger than this are left to @fastify/compress (none of Swagger UI's is near it). */
const MAX_FILE_BYTES = 8 * 1024 * 1024
/** What is compressed here: the text files (JavaScript, CSS, HTML, SVG, JSON); images are compressed already. */
const TEXT = /^(?:text\/|application\/(?:javascript|json)|image\/svg\+xml)/

const compressors: Record<Encoding, (data: Buffer) => Promise<Buffer>> = {
  // Looked up on zlib at each call, not bound once.
  br: async data => await promisify(zlib.brotliCompress)(data, BROTLI_OPTIONS),
  gzip: async data => await promisify(zlib.gzip)(data, ZLIB_OPTIONS),
  deflate: async data => await promisify(zlib.deflate)(data, ZLIB_OPTIONS)
}

/**
 * An onSend hook for @fastify/static's answers: a whole file (200, no range) of a text type,
 * whose client takes a coding, is answered with that coding's bytes, compressed once and kept
 * (at most MAX_ENTRIES). Set before @fastify/compress's own onSend, which then leaves it alone
 * (it has a Content-Encoding). Such a file says `Vary: accept-encoding` whatever the client
 * takes, and so does a 304, which goes on with no body. Anything else goes on as it came.
 *
 * The files are `Cache-Control: public`, which a shared cache may keep. The file as it is (a
 * client that takes no coding) said no Vary: a cache could hand it to every client. And a 304's
 * empty body (@fastify/static's stream of no bytes, with no Content-Type, which @fastify/compress
 * reads as JSON) was compressed: the 304 said `Content-Encoding: br`, and a cache that updates
 * the answer it keeps with a 304's header fields (RFC 9111 §4.3.4) labelled the file as it is br.
 */
export function precompressedFiles (): (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: Error | null, payload?: unknown) => void) => void {
  const kept = new Map<string, Promise<Buffer | null>>()
  const compressed = (path: string, coding: Encoding): Promise<Buffer | null> | null => {
    const key = coding + ' ' + path
    let entry = kept.get(key)
    if (entry === undefined) {
      if (kept.size >= MAX_ENTRIES) return null
      entry = readFile(path).then(async data => data.length > MAX_FILE_BYTES ? null : await compressors[coding](data), () => null)
      kept.set(key, entry)
    }
    return entry
  }
  return function precompressed (request, reply, payload, done) {
    if (reply.statusCode === 304) {
      if (payload instanceof Readable) payload.destroy()
      varyOnCoding(reply)
      done(null, null)
      return
    }
    if (!(payload instanceof ReadStream) || typeof payload.path !== 'string' || reply.statusCode !== 200 ||
        reply.hasHeader('content-encoding') || reply.hasHeader('content-range') ||
        !TEXT.test(String(reply.getHeader('content-type') ?? '')) || Number(reply.getHeader('content-length') ?? 0) < COMPRESSION_THRESHOLD) {
      done(null, payload)
      return
    }
    varyOnCoding(reply)
    const accept = request.headers['accept-encoding']
    if (accept === undefined || request.headers['x-no-compression'] !== undefined) {
      done(null, payload)
      return
    }
    const coding = negotiate(accept)
    const pending = coding === null ? null : compressed(payload.path, coding)
    if (coding === null || pending === null) {
      done(null, payload)
      return
    }
    pending.then(body => {
      if (body === null) {
        done(null, payload)
        return
      }
      // The file's stream is not read: closed, its descriptor with it.
      payload.destroy()
      done(null, coded(reply, coding, body))
    }, (err: Error) => { done(err) })
  }
}

/**
 * The answer `body`, compressed with `coding` and kept, with its headers: as a stream over the
 * one kept Buffer. Every connection shares it, so it is not counted as each connection's unread
 * answer (answerBounds counts a Buffer answer, not a stream).
 */
function coded (reply: FastifyReply, coding: Encoding, body: Buffer): Readable {
  varyOnCoding(reply)
  reply.header('content-encoding', coding)
  reply.header('content-length', body.length)
  return Readable.from([body], { objectMode: false })
}

/** Adds accept-encoding to the answer's Vary, once. */
function varyOnCoding (reply: FastifyReply): void {
  const vary = reply.getHeader('vary')
  if (vary === undefined || vary === '') reply.header('vary', 'accept-encoding')
  else if (!/\baccept-encoding\b/i.test(String(vary))) reply.header('vary', `${String(vary)}, accept-encoding`)
}

/**
 * An onSend hook for routes whose 200 answer is the same text for the life of the process (the
 * OpenAPI document, as JSON and YAML: @fastify/swagger builds it once): compressed once per route
 * and coding, and kept (the routes it is set on, times ENCODINGS). Each request for it, with no
 * token, cost a serialization and a compression of the whole document: about 2 ms of CPU with br,
 * 500 answers a second on a core. Anything else (another status, a client that takes no coding, a
 * short answer) goes on as it came, to @fastify/compress.
 */
export function precompressedAnswers (): (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: Error | null, payload?: unknown) => void) => void {
  const kept = new Map<string, Promise<Buffer>>()
  return function precompressed (request, reply, payload, done) {
    const accept = request.headers['accept-encoding']
    if (typeof payload !== 'string' || reply.statusCode !== 200 || accept === undefined || request.headers['x-no-compression'] !== undefined ||
        reply.hasHeader('content-encoding') || payload.length < COMPRESSION_THRESHOLD) {
      done(null, payload)
      return
    }
    const coding = negotiate(accept)
    if (coding === null) {
      done(null, payload)
      return
    }
    const key = coding + ' ' + request.routeOptions.url
    let pending = kept.get(key)
    if (pending === undefined) {
      pending = compressors[coding](Buffer.from(payload))
      kept.set(key, pending)
    }
    pending.then(body => { done(null, coded(reply, coding, body)) }, (err: Error) => { done(err) })
  }
}
