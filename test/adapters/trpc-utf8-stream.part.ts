// The TextEncoderStream the tRPC face puts in place of Node 20's (adapters/trpc/utf8-stream.ts):
// the same bytes as Node's own for any text cut into any chunks, and the one @trpc/server finds.
import t from 'tap'
import { TextEncoderStream as NodeTextEncoderStream } from 'node:stream/web'
import { Utf8EncoderStream } from '../../adapters/trpc/utf8-stream.js'
import { buildApp } from '../../app.js'
import { testConfig, testManifest } from '../helper.js'

async function encoded (stream: { readable: ReadableStream<Uint8Array>, writable: WritableStream<string> }, chunks: string[]): Promise<Buffer> {
  const writer = stream.writable.getWriter()
  const written = (async () => {
    for (const chunk of chunks) await writer.write(chunk)
    await writer.close()
  })()
  const parts: Uint8Array[] = []
  for await (const part of stream.readable) parts.push(part)
  await written
  return Buffer.concat(parts)
}

/** A deterministic generator (mulberry32), for cases that replay. */
function random (seed: number): () => number {
  return () => {
    seed = (seed + 0x6D2B79F5) | 0
    let x = Math.imul(seed ^ (seed >>> 15), 1 | seed)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

// ASCII, two- and three-byte characters, a pair (four bytes), a lone high and a lone low surrogate.
const UNITS = ['a', '{', 'é', '€', '\uD83D\uDE00', '\uD83D', '\uDE00', '\uDBFF', '\uDC00']

t.test('the same bytes as Node\'s TextEncoderStream, whatever the chunks: pairs split across them, lone surrogates, empty chunks', async t => {
  const next = random(20261206)
  let cases = 0
  for (let i = 0; i < 400; i++) {
    let text = ''
    const length = Math.floor(next() * 24)
    for (let j = 0; j < length; j++) text += UNITS[Math.floor(next() * UNITS.length)]
    // Cut at any code unit, a pair's middle included; some chunks empty.
    const chunks: string[] = []
    let at = 0
    while (at < text.length) {
      const size = Math.floor(next() * 4)
      chunks.push(text.slice(at, at + size))
      at += size
    }
    const ours = await encoded(new Utf8EncoderStream(), chunks)
    const node = await encoded(new NodeTextEncoderStream(), chunks)
    if (!ours.equals(node)) {
      t.fail(`${JSON.stringify(chunks)}: ${ours.toString('hex')} against Node's ${node.toString('hex')}`)
      return
    }
    cases++
  }
  t.equal(cases, 400, 'every case agrees')
  t.same(await encoded(new Utf8EncoderStream(), ['a\uD83D']), Buffer.from('a\uFFFD'), 'a high surrogate left at the end is U+FFFD')
  t.same(await encoded(new Utf8EncoderStream(), ['\uD83D', '', '\uDE00']), Buffer.from('😀'), 'a pair split by an empty chunk is one character')
  t.equal(new Utf8EncoderStream().encoding, 'utf-8')
})

t.test('with the tRPC face on, it is the TextEncoderStream @trpc/server finds', async t => {
  const app = await buildApp(testConfig(), { logger: false, manifest: testManifest({ getA: { type: 'query', rest: 'GET /a', kernel: 'GET /v1/a', output: { type: 'object' } } }) })
  t.teardown(() => app.close())
  t.equal(globalThis.TextEncoderStream, Utf8EncoderStream)
})
