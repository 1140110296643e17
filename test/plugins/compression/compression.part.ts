import t from 'tap'
import { Readable } from 'node:stream'
import { request, type IncomingHttpHeaders } from 'node:http'
import type { AddressInfo } from 'node:net'
import { brotliDecompressSync, gunzipSync, inflateSync, gzipSync } from 'node:zlib'
import type { FastifyInstance } from 'fastify'
import { buildApp } from '../../../app.js'
import { MantleError } from '../../../errors.js'
import { COMPRESSION_THRESHOLD } from '../../../plugins/compression/index.js'
import { testConfig, startTestKernel, testManifest, json, buildDemoApp, bearer, type TestKernel } from '../../helper.js'

interface Teardown { teardown: (fn: () => unknown) => void }
type Env = Record<string, string | number | boolean | undefined>

// Items of ~40 bytes each: `n` of them make a body of about 40 n bytes.
const items = (n: number): Array<{ id: string, name: string }> => Array.from({ length: n }, (_, i) => ({ id: `item-${i}`, name: `the item number ${i}` }))

const manifest = (kernel: TestKernel) => testManifest({
  listItems: { type: 'query', rest: 'GET /items', kernel: 'GET /v1/items', input: { type: 'object', properties: { n: { type: 'integer', minimum: 0, maximum: 10000 } } }, output: { type: 'array', items: { type: 'object', properties: { id: { type: 'string' }, name: { type: 'string' } } } } },
  rejectItem: { type: 'mutation', rest: 'POST /items', kernel: 'POST /v1/items', input: { type: 'object', properties: { size: { type: 'integer' } } }, output: { type: 'object' } }
}, { url: kernel.url })

async function setup (t: Teardown, env: Env = {}): Promise<FastifyInstance> {
  const kernel = await startTestKernel(t, {
    'GET /v1/items': (req, res) => json(res, 200, items(Number(new URL(req.url, 'http://x').searchParams.get('n') ?? 0))),
    // A Kernel refusal with a long message: the problem+json the client gets is over 1 KB.
    'POST /v1/items': (req, res) => json(res, 422, { message: 'refused: ' + 'x'.repeat(JSON.parse(req.body).size) })
  })
  const app = await buildApp(testConfig({ BFF_AUTH_ENABLED: false, ...env }), { logger: false, manifest: manifest(kernel), kernelUrl: kernel.url })
  t.teardown(() => app.close())
  // Routes of the test's own, to check what must never be compressed.
  app.get('/test/problem', async () => { throw new MantleError('VALIDATION_FAILED', 'bad: ' + 'x'.repeat(3000)) })
  app.get('/test/not-modified', async (_req, reply) => reply.code(304).send())
  // A route compression leaves alone: its HEAD has no compression hook to move.
  app.get('/test/uncompressed-not-modified', { compress: false }, async (_req, reply) => reply.code(304).send())
  app.get('/test/binary', async (_req, reply) => reply.type('application/octet-stream').send(Buffer.alloc(4096, 7)))
  app.get('/test/image', async (_req, reply) => reply.type('image/png').send(Buffer.alloc(4096, 1)))
  app.get('/test/events', async (_req, reply) => reply.type('text/event-stream').send('data: ' + 'e'.repeat(4096) + '\n\n'))
  app.get('/test/gzipped', async (_req, reply) => reply.type('application/json').header('content-encoding', 'gzip').send(gzipSync(JSON.stringify(items(200)))))
  app.get('/test/stream', async (_req, reply) => reply.type('application/json').send(Readable.from((function * () {
    yield '['
    for (let i = 0; i < 2000; i++) yield (i === 0 ? '' : ',') + JSON.stringify({ i, pad: 'p'.repeat(20) })
    yield ']'
  })())))
  await app.ready()
  return app
}

const decoders: Record<string, (b: Buffer) => Buffer> = { br: brotliDecompressSync, gzip: gunzipSync, deflate: inflateSync }

t.test('br, gzip and deflate are negotiated for a REST body over 1 KB, and decode to the same JSON', async t => {
  const app = await setup(t)
  const plain = await app.inject({ method: 'GET', url: '/api/v1/items?n=200' })
  t.equal(plain.headers['content-encoding'], undefined, 'no Accept-Encoding: no compression')
  t.ok(plain.rawPayload.length > 4 * COMPRESSION_THRESHOLD)
  for (const [encoding, decode] of Object.entries(decoders)) {
    const res = await app.inject({ method: 'GET', url: '/api/v1/items?n=200', headers: { 'accept-encoding': encoding } })
    t.equal(res.statusCode, 200)
    t.equal(res.headers['content-encoding'], encoding)
    t.match(res.headers.vary, /accept-encoding/i)
    t.equal(res.headers['content-type'], 'application/json; charset=utf-8')
    t.ok(res.rawPayload.length < plain.rawPayload.length / 3, `${encoding}: ${res.rawPayload.length} bytes for ${plain.rawPayload.length}`)
    t.same(JSON.parse(decode(res.rawPayload).toString()), plain.json())
  }
  // The client's preference wins; identity and unknown codings get the body as it is.
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items?n=200', headers: { 'accept-encoding': 'gzip;q=0.5, deflate;q=1' } })).headers['content-encoding'], 'deflate')
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items?n=200', headers: { 'accept-encoding': 'identity' } })).headers['content-encoding'], undefined)
  const unknown = await app.inject({ method: 'GET', url: '/api/v1/items?n=200', headers: { 'accept-encoding': 'compress' } })
  t.equal(unknown.statusCode, 200)
  t.equal(unknown.headers['content-encoding'], undefined)
  t.same(unknown.json(), plain.json())
})

t.test('a coding refused with q=0 is never used, a * beside it notwithstanding (RFC 9110 §12.5.3)', async t => {
  const app = await setup(t)
  const plain = await app.inject({ method: 'GET', url: '/api/v1/items?n=200' })
  const cases: Array<[string, string | undefined]> = [
    // `*` is every coding the header does not name: gzip refused, the others taken.
    ['gzip;q=0, *', 'br'],
    ['gzip;q=0, x-gzip;q=0, *', 'br'],
    ['x-gzip;q=0, *', 'br'],
    ['br;q=0, gzip;q=0, *', 'deflate'],
    ['*, br;q=0, deflate;q=0', 'gzip'],
    ['GZIP;Q=0, br;q=0, *;q=0.5', 'deflate'],
    ['br;q=0, gzip;q=0, deflate;q=0, *', undefined],
    ['*;q=0', undefined],
    ['identity;q=0, *;q=0', undefined],
    // Named, a coding keeps its own quality over the `*`'s.
    ['deflate;q=0.9, *;q=0.1', 'deflate'],
    ['*', 'br']
  ]
  for (const [accept, expected] of cases) {
    const res = await app.inject({ method: 'GET', url: '/api/v1/items?n=200', headers: { 'accept-encoding': accept } })
    t.equal(res.statusCode, 200, accept)
    t.equal(res.headers['content-encoding'], expected, `${accept}: ${expected ?? 'none'}`)
    const used = res.headers['content-encoding'] as string | undefined
    t.same(JSON.parse((used === undefined ? res.rawPayload : decoders[used](res.rawPayload)).toString()), plain.json(), `${accept}: the same JSON`)
  }
})

t.test('bodies under 1 KB go out as they are', async t => {
  const app = await setup(t)
  const small = await app.inject({ method: 'GET', url: '/api/v1/items?n=5', headers: { 'accept-encoding': 'br, gzip' } })
  t.ok(small.rawPayload.length < COMPRESSION_THRESHOLD)
  t.equal(small.headers['content-encoding'], undefined)
  t.equal(small.json().length, 5)
  // A problem+json under the threshold too.
  const notFound = await app.inject({ method: 'GET', url: '/nowhere', headers: { 'accept-encoding': 'gzip' } })
  t.equal(notFound.statusCode, 404)
  t.equal(notFound.headers['content-encoding'], undefined)
  t.equal(notFound.json().code, 'NOT_FOUND')
})

t.test('a problem+json over 1 KB is compressed like any JSON and keeps its status and type', async t => {
  const app = await setup(t)
  const res = await app.inject({ method: 'GET', url: '/test/problem', headers: { 'accept-encoding': 'gzip' } })
  t.equal(res.statusCode, 400)
  t.equal(res.headers['content-encoding'], 'gzip')
  t.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8')
  t.match(JSON.parse(gunzipSync(res.rawPayload).toString()), { code: 'VALIDATION_FAILED', status: 400, detail: /^bad: x{3000}$/ })
  // The Kernel's refusal, a REST string payload through the error handler: its detail is capped
  // (300 characters), so it stays under the threshold.
  const refused = await app.inject({ method: 'POST', url: '/api/v1/items', payload: { size: 3000 }, headers: { 'accept-encoding': 'gzip' } })
  t.equal(refused.statusCode, 422)
  t.equal(refused.headers['content-encoding'], undefined)
  t.equal(refused.json().code, 'KERNEL_REJECTED')
})

t.test('the other faces are compressed too', async t => {
  const app = await setup(t)
  const trpc = await app.inject({ method: 'GET', url: '/trpc/listItems?input=' + encodeURIComponent('{"n":200}'), headers: { 'accept-encoding': 'br' } })
  t.equal(trpc.headers['content-encoding'], 'br')
  t.equal(JSON.parse(brotliDecompressSync(trpc.rawPayload).toString()).result.data.length, 200)
  const graphql = await app.inject({ method: 'POST', url: '/graphql', payload: { query: '{ listItems(n: 200) { id name } }' }, headers: { 'accept-encoding': 'gzip' } })
  t.equal(graphql.headers['content-encoding'], 'gzip')
  t.equal(JSON.parse(gunzipSync(graphql.rawPayload).toString()).data.listItems.length, 200)
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', payload: { calls: [{ id: 'a', op: 'listItems', input: { n: 200 } }] }, headers: { 'accept-encoding': 'deflate' } })
  t.equal(batch.headers['content-encoding'], 'deflate')
  t.equal(JSON.parse(inflateSync(batch.rawPayload).toString()).results[0].result.length, 200)
  const openapi = await app.inject({ method: 'GET', url: '/openapi.json', headers: { 'accept-encoding': 'gzip' } })
  t.equal(openapi.headers['content-encoding'], 'gzip')
  t.equal(JSON.parse(gunzipSync(openapi.rawPayload).toString()).openapi, '3.1.0')
})

t.test('a streamed body is compressed as it streams', async t => {
  const app = await setup(t)
  const res = await app.inject({ method: 'GET', url: '/test/stream', headers: { 'accept-encoding': 'br' } })
  t.equal(res.headers['content-encoding'], 'br')
  t.equal(res.headers['content-length'], undefined, 'chunked: the size is not known up front')
  t.equal(JSON.parse(brotliDecompressSync(res.rawPayload).toString()).length, 2000)
})

t.test('never on a 304, on already compressed or binary types, or on an event stream', async t => {
  const app = await setup(t)
  const headers = { 'accept-encoding': 'br, gzip, deflate' }
  const notModified = await app.inject({ method: 'GET', url: '/test/not-modified', headers })
  t.equal(notModified.statusCode, 304)
  t.equal(notModified.headers['content-encoding'], undefined)
  t.equal(notModified.rawPayload.length, 0)
  for (const path of ['/test/binary', '/test/image', '/test/events']) {
    const res = await app.inject({ method: 'GET', url: path, headers })
    t.equal(res.headers['content-encoding'], undefined, `${path} is not compressed`)
    t.ok(res.rawPayload.length >= 4096)
  }
  const gzipped = await app.inject({ method: 'GET', url: '/test/gzipped', headers })
  t.equal(gzipped.headers['content-encoding'], 'gzip', 'kept as it was, not compressed twice')
  t.equal(JSON.parse(gunzipSync(gzipped.rawPayload).toString()).length, 200)
})

t.test('a compressed request body is not inflated: refused as a 4xx, never a 5xx', async t => {
  const app = await setup(t)
  const res = await app.inject({ method: 'POST', url: '/api/v1/items', payload: gzipSync(JSON.stringify({ size: 1 })), headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' } })
  t.ok(res.statusCode >= 400 && res.statusCode < 500, `status ${res.statusCode}`)
  t.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8')
})

t.test('BFF_COMPRESSION_ENABLED=false: nothing is compressed', async t => {
  const app = await setup(t, { BFF_COMPRESSION_ENABLED: false })
  const res = await app.inject({ method: 'GET', url: '/api/v1/items?n=200', headers: { 'accept-encoding': 'br, gzip' } })
  t.equal(res.statusCode, 200)
  t.equal(res.headers['content-encoding'], undefined)
  t.equal(res.json().length, 200)
})

// RFC 9110 §15.4.5: a 304 MUST carry the Vary the 200 to the same request would have carried.
// A cached REST answer over 1 KB, asked for with Accept-Encoding: gzip, is 200 with
// `Vary: accept-encoding`; the same request with a matching If-None-Match was 304 without it
// (@fastify/compress leaves empty bodies alone, and nothing else set Vary).
t.test('a 304 carries the Vary its 200 carries', async t => {
  const app = await buildDemoApp(t)
  const created = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: bearer(), payload: { name: 'big', description: 'x'.repeat(2000) } })
  const url = `/api/v1/agents/${created.json().id as string}`
  const headers = { ...bearer(), 'accept-encoding': 'gzip' }
  const full = await app.inject({ method: 'GET', url, headers })
  t.equal(full.statusCode, 200)
  t.equal(full.headers['content-encoding'], 'gzip')
  t.equal(full.headers.vary, 'authorization, accept-encoding')
  const etag = full.headers.etag as string
  const notModified = await app.inject({ method: 'GET', url, headers: { ...headers, 'if-none-match': etag } })
  t.equal(notModified.statusCode, 304)
  t.equal(notModified.headers.vary, full.headers.vary, 'the 304 has the 200\'s Vary')
  // A small answer, or one asked for without an encoding, is compressed by no one: its 200 has no
  // accept-encoding in Vary, and its 304 had one (found using the gateway as a client would).
  for (const [what, path, asked] of [['under the threshold', '/api/v1/agents/a1', 'gzip, deflate, br'], ['no encoding asked for', url, 'identity']] as const) {
    const small = await app.inject({ method: 'GET', url: path, headers: { ...bearer(), 'accept-encoding': asked } })
    t.equal(small.headers['content-encoding'], undefined, what)
    const again = await app.inject({ method: 'GET', url: path, headers: { ...bearer(), 'accept-encoding': asked, 'if-none-match': small.headers.etag as string } })
    t.equal(again.statusCode, 304, what)
    t.equal(again.headers.vary, small.headers.vary, `${what}: the 304 has the 200's Vary (${String(small.headers.vary)})`)
  }
  // The gzip and plain answers are different representations of one answer: a strong ETag would
  // have to differ between them (RFC 9110 §8.8.3), so the tag, the same for both, is weak.
  const plain = await app.inject({ method: 'GET', url, headers: bearer() })
  t.equal(plain.headers['content-encoding'], undefined)
  t.equal(plain.headers.etag, etag)
  t.match(etag, /^W\//, 'weak')
})

// RFC 9110 §9.3.2: HEAD carries the header fields GET would. Fastify's HEAD route dropped the
// body before @fastify/compress saw it: HEAD said `content-length: 2142` and no Content-Encoding
// nor `Vary: accept-encoding`, where GET said gzip, 130 and `Vary: authorization, accept-encoding`.
t.test('HEAD answers with the headers of GET, compressed or not', async t => {
  const app = await buildDemoApp(t)
  const created = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: bearer(), payload: { name: 'big', description: 'x'.repeat(2000) } })
  const url = `/api/v1/agents/${created.json().id as string}`
  const fields = (headers: Record<string, unknown>): Record<string, unknown> => {
    const { date, 'x-request-id': id, 'x-cache': cache, ...rest } = headers
    return rest
  }
  for (const acceptEncoding of ['gzip', 'br', 'identity', undefined]) {
    const headers = acceptEncoding === undefined ? bearer() : { ...bearer(), 'accept-encoding': acceptEncoding }
    const get = await app.inject({ method: 'GET', url, headers })
    const head = await app.inject({ method: 'HEAD', url, headers })
    t.equal(head.statusCode, 200)
    t.equal(head.rawPayload.length, 0, 'no body')
    t.same(fields(head.headers), fields(get.headers), `${acceptEncoding ?? 'no Accept-Encoding'}: the same fields`)
  }
  const get = await app.inject({ method: 'GET', url, headers: { ...bearer(), 'accept-encoding': 'gzip' } })
  t.equal(get.headers['content-encoding'], 'gzip')
  t.equal(get.headers.vary, 'authorization, accept-encoding')
  // And a streamed body, whose length is not known: neither says one.
  const stream = await setup(t)
  const headers = { 'accept-encoding': 'br' }
  const streamedGet = await stream.inject({ method: 'GET', url: '/test/stream', headers })
  const streamedHead = await stream.inject({ method: 'HEAD', url: '/test/stream', headers })
  t.equal(streamedHead.headers['content-encoding'], 'br')
  t.equal(streamedHead.headers['content-length'], undefined)
  // Transfer-Encoding is the framing of a body, which HEAD has none of.
  const { 'transfer-encoding': framing, ...streamedFields } = fields(streamedGet.headers)
  t.equal(framing, 'chunked')
  t.same(fields(streamedHead.headers), streamedFields)
  // A 304 to HEAD keeps the 200's Vary, without a length.
  const etag = get.headers.etag as string
  const notModified = await app.inject({ method: 'HEAD', url, headers: { ...bearer(), 'accept-encoding': 'gzip', 'if-none-match': etag } })
  t.equal(notModified.statusCode, 304)
  t.equal(notModified.headers.vary, 'authorization, accept-encoding')
  t.equal(notModified.headers['content-length'], undefined)
})

t.test('HEAD of a route with compress: false keeps its hooks in their order: a 304 without a length', async t => {
  // Compression's hook was taken to be the route's last onSend: on a route compression leaves
  // alone, the gateway's withoutBodyLength was moved before Fastify's HEAD handler instead, which
  // then set content-length: 0 on the 304.
  const app = await setup(t)
  for (const url of ['/test/uncompressed-not-modified', '/test/not-modified']) {
    const head = await app.inject({ method: 'HEAD', url, headers: { 'accept-encoding': 'gzip' } })
    t.equal(head.statusCode, 304)
    t.equal(head.headers['content-length'], undefined, `${url}: no Content-Length`)
  }
})

// httpBatchStreamLink (`trpc-accept: application/jsonl`) gets each result as it completes. The
// stream went out as application/json, and gzip and brotli held it until its end: with
// Accept-Encoding, the fast call's result came only when the slow one had completed.
t.test('a streamed tRPC batch is not compressed: each result leaves as it completes', async t => {
  let release = (): void => {}
  const released = new Promise<void>(resolve => { release = resolve })
  const kernel = await startTestKernel(t, {
    'GET /v1/fast': (_req, res) => json(res, 200, { v: 'fast' }),
    // Answers once the fast result has reached the client, or after 3 s at the latest.
    'GET /v1/slow': async (_req, res) => {
      await Promise.race([released, new Promise(resolve => setTimeout(resolve, 3000))])
      json(res, 200, { v: 'slow' })
    }
  })
  const output = { type: 'object', properties: { v: { type: 'string' } } }
  const app = await buildApp(testConfig({ BFF_AUTH_ENABLED: false }), {
    logger: false,
    kernelUrl: kernel.url,
    manifest: testManifest({
      fast: { type: 'query', rest: 'GET /fast', kernel: 'GET /v1/fast', input: { type: 'object' }, output },
      slow: { type: 'query', rest: 'GET /slow', kernel: 'GET /v1/slow', input: { type: 'object' }, output, timeoutMs: 10000 }
    }, { url: kernel.url, retries: 0 })
  })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  let fastFirst = false
  const { headers, body } = await new Promise<{ headers: IncomingHttpHeaders, body: string }>((resolve, reject) => {
    const path = '/trpc/fast,slow?batch=1&input=' + encodeURIComponent('{"0":{},"1":{}}')
    request({ port, path, headers: { 'trpc-accept': 'application/jsonl', 'accept-encoding': 'gzip, br' } }, res => {
      let text = ''
      res.on('data', (chunk: Buffer) => {
        text += chunk.toString('latin1')
        if (!fastFirst && text.includes('"fast"') && !text.includes('"slow"')) {
          fastFirst = true
          release()
        }
      })
      res.on('end', () => resolve({ headers: res.headers, body: text }))
      res.on('error', reject)
    }).on('error', reject).end()
  })
  release()
  t.ok(fastFirst, 'the fast result came before the slow call had completed')
  t.equal(headers['content-encoding'], undefined)
  t.match(body, /"slow"/)
})
