// /docs serves Swagger UI's files to anyone, without a token. With compression on, each answer
// of its 1.6 MB bundle was compressed anew: 35-50 ms of CPU per request (br, gzip), which a
// client paid nothing for (it could close each connection at once). Each file is now compressed
// once per coding and answered from memory.
import t from 'tap'
import zlib from 'node:zlib'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { buildTestApp } from '../helper.js'
import { negotiate } from '../../plugins/compression/index.js'

const BUNDLE = '/docs/static/swagger-ui-bundle.js'
const bundle = readFileSync(join(dirname(createRequire(import.meta.url).resolve('@fastify/swagger-ui')), 'static', 'swagger-ui-bundle.js'))

/** Counts every compression zlib starts (streams and one-shot calls) while `fn` runs. */
async function compressions (fn: () => Promise<void>): Promise<number> {
  const names = ['createGzip', 'createDeflate', 'createBrotliCompress', 'gzip', 'deflate', 'brotliCompress']
  // Some are read-only (but configurable): redefined, then put back as they were.
  const saved = names.map(name => Object.getOwnPropertyDescriptor(zlib, name)!)
  let n = 0
  names.forEach((name, i) => {
    const original = saved[i]!.value as (...args: unknown[]) => unknown
    Object.defineProperty(zlib, name, { ...saved[i], value: (...args: unknown[]) => { n++; return original.apply(zlib, args) } })
  })
  try {
    await fn()
  } finally {
    names.forEach((name, i) => { Object.defineProperty(zlib, name, saved[i]!) })
  }
  return n
}

const decoders: Record<string, (b: Buffer) => Buffer> = { br: zlib.brotliDecompressSync, gzip: zlib.gunzipSync, deflate: zlib.inflateSync }

t.test('/docs: each of Swagger UI\'s files is compressed once per coding, however often it is asked for', async t => {
  const app = await buildTestApp(t)
  const n = await compressions(async () => {
    for (let i = 0; i < 5; i++) {
      for (const [coding, decode] of Object.entries(decoders)) {
        const res = await app.inject({ method: 'GET', url: BUNDLE, headers: { 'accept-encoding': coding } })
        t.equal(res.statusCode, 200)
        t.equal(res.headers['content-encoding'], coding)
        t.match(res.headers.vary, /accept-encoding/)
        t.equal(Number(res.headers['content-length']), res.rawPayload.length, 'the compressed length')
        t.ok(decode(res.rawPayload).equals(bundle), `${coding}: the file's bytes`)
      }
    }
  })
  t.equal(n, 3, 'one compression per coding for 15 answers')

  const plain = await app.inject({ method: 'GET', url: BUNDLE })
  t.equal(plain.headers['content-encoding'], undefined, 'no Accept-Encoding: the file as it is')
  t.ok(plain.rawPayload.equals(bundle))
  const range = await app.inject({ method: 'GET', url: BUNDLE, headers: { 'accept-encoding': 'gzip', range: 'bytes=0-99' } })
  t.equal(range.statusCode, 206, 'a range is left alone')
  t.equal(range.headers['content-encoding'], undefined)
  t.ok(range.rawPayload.equals(bundle.subarray(0, 100)))
  const head = await app.inject({ method: 'HEAD', url: BUNDLE, headers: { 'accept-encoding': 'br' } })
  t.equal(head.headers['content-encoding'], 'br', 'HEAD says what GET sends')
  const tag = plain.headers.etag as string
  const cached = await app.inject({ method: 'GET', url: BUNDLE, headers: { 'accept-encoding': 'gzip', 'if-none-match': tag } })
  t.equal(cached.statusCode, 304, 'revalidation still answers 304')
})

// Swagger UI's files are `Cache-Control: public`, which a shared cache may keep. The file as it
// is said no Vary (a cache could hand it to every client), and a 304 was run through brotli or
// gzip: its empty body came labelled `Content-Encoding: br`, which a cache that updates the
// answer it keeps with a 304's fields put on the file it kept as it is.
t.test('/docs: a file says Vary: accept-encoding whatever the client takes, and a 304 carries no Content-Encoding', async t => {
  const app = await buildTestApp(t)
  for (const headers of [{}, { 'accept-encoding': 'identity' }, { 'accept-encoding': 'gzip;q=0' }, { 'accept-encoding': 'br', 'x-no-compression': '1' }]) {
    const res = await app.inject({ method: 'GET', url: BUNDLE, headers })
    t.equal(res.headers['content-encoding'], undefined, JSON.stringify(headers))
    t.equal(res.headers.vary, 'accept-encoding', 'the file as it is varies with Accept-Encoding too')
    t.ok(res.rawPayload.equals(bundle))
  }
  const tag = (await app.inject({ method: 'GET', url: BUNDLE })).headers.etag as string
  for (const method of ['GET', 'HEAD'] as const) {
    for (const headers of [{ 'accept-encoding': 'br', 'if-none-match': tag }, { 'accept-encoding': 'gzip', 'if-modified-since': new Date(Date.now() + 60_000).toUTCString() }, { 'if-none-match': tag }]) {
      const res = await app.inject({ method, url: BUNDLE, headers })
      t.equal(res.statusCode, 304, `${method} ${JSON.stringify(headers)}`)
      t.equal(res.headers['content-encoding'], undefined, 'a 304 names no coding')
      t.equal(res.headers.vary, 'accept-encoding', 'and the Vary its 200 carries')
      t.equal(res.rawPayload.length, 0)
    }
  }
})

t.test('the coding chosen is the one @fastify/compress would choose', async t => {
  t.equal(negotiate('gzip, deflate, br'), 'br', 'on a tie, the gateway\'s order')
  t.equal(negotiate('gzip;q=1, br;q=0.5'), 'gzip', 'the highest q')
  t.equal(negotiate('br;q=0, x-gzip'), 'gzip', 'q=0 refuses; x-gzip is gzip')
  t.equal(negotiate('identity'), null)
  t.equal(negotiate('BR;Q=0.1, deflate;q=junk'), 'br', 'case-insensitive; a q that is no number is 0')
})

t.test('/docs with compression off: the files as they are', async t => {
  const app = await buildTestApp(t, { BFF_COMPRESSION_ENABLED: false })
  const res = await app.inject({ method: 'GET', url: BUNDLE, headers: { 'accept-encoding': 'gzip' } })
  t.equal(res.headers['content-encoding'], undefined)
  t.ok(res.rawPayload.equals(bundle))
})

// The OpenAPI document is the same text for the life of the process, and anyone may ask for it:
// each answer cost a compression of the whole document (about 2 ms of CPU with br).
t.test('the OpenAPI document (/openapi.json, /docs/json, /docs/yaml) is compressed once per route and coding', async t => {
  const app = await buildTestApp(t)
  const plain: Record<string, string> = {}
  for (const url of ['/openapi.json', '/docs/json', '/docs/yaml']) plain[url] = (await app.inject({ method: 'GET', url })).body
  t.ok(plain['/openapi.json']!.length > 1024 && plain['/docs/yaml']!.startsWith('openapi:'), 'the documents, large enough to compress')
  const n = await compressions(async () => {
    for (let i = 0; i < 4; i++) {
      for (const url of Object.keys(plain)) {
        for (const [coding, decode] of Object.entries(decoders)) {
          const res = await app.inject({ method: 'GET', url, headers: { 'accept-encoding': coding } })
          t.equal(res.statusCode, 200)
          t.equal(res.headers['content-encoding'], coding)
          t.match(res.headers.vary, /accept-encoding/)
          t.equal(Number(res.headers['content-length']), res.rawPayload.length, 'the compressed length')
          t.equal(decode(res.rawPayload).toString(), plain[url], `${url}, ${coding}: the document`)
        }
      }
    }
  })
  t.equal(n, 9, 'one compression per route and coding for 36 answers')
  const none = await app.inject({ method: 'GET', url: '/openapi.json', headers: { 'accept-encoding': 'identity' } })
  t.equal(none.headers['content-encoding'], undefined, 'a client that takes no coding: the text')
  t.equal(none.body, plain['/openapi.json'])
})
