import t from 'tap'
import addFormats from 'ajv-formats'
import { Ajv } from 'ajv'
import { isUrl, addGatewayFormats } from '../formats.js'
import { prng } from '../loadtest/fuzz.js'
import { buildTestApp, startTestKernel, testManifest, json, bearer } from './helper.js'

// ajv-formats' `url` regex, searched whole, was quadratic in its input's colons and at-signs
// (`http://` and 64 K colons: 3.4 s; a 45 KB string sent as one REST call's input: 0.1 s, and a
// whole 1 MiB body minutes). The gateway reads the same language in linear time (formats.ts).
const LIBRARY_URL = addFormats.default.get('url') as RegExp

const PIECES = ['http://', 'https://', 'ftp://', 'HTTPS://', 'example', 'a', 'Z', 'é', '例子', '\u3000', '\u00a0', ' ', '\t', '\n', '.', '-', ':', '@', '/', '?', '#',
  '1', '0', '10', '127', '172', '192', '168', '169', '254', '.1', '.255', '.0', ':80', ':65535', ':123456', '.com', '.co', '.c', '.x1', 'xn--p1ai', '\ud83d\ude00',
  '\uffff', '%20', '_', '[::1]', 'user:pw@', 'a@', '@b.cd', '8.8.8.8', '10.0.0.1', '172.16.0.1', '172.32.0.1', '192.168.1.1', '169.254.1.1', '/path', '/a b', '?q=1']

t.test('isUrl takes exactly the strings ajv-formats\' url regex takes', async t => {
  const random = prng(5)
  const pick = (n: number): number => Math.floor(random() * n)
  let agreed = 0
  let urls = 0
  const disagreed: string[] = []
  const N = 100_000
  for (let i = 0; i < N; i++) {
    let s = random() < 0.9 ? PIECES[pick(4)] : ''
    for (let j = pick(10); j > 0; j--) s += PIECES[pick(PIECES.length)]
    const expected = LIBRARY_URL.test(s)
    if (isUrl(s) === expected) agreed++
    else if (disagreed.length < 5) disagreed.push(s)
    if (expected) urls++
  }
  t.same(disagreed, [])
  t.equal(agreed, N)
  t.ok(urls > 1000, `urls among them: ${urls}`)
  for (const s of ['http://example.com', 'https://user:pw@example.com:8080/a/b?c#d', 'http://a@b@example.com/x', 'http://8.8.8.8', 'http://例子.测试', 'ftp://x.yz:21']) t.ok(isUrl(s), s)
  for (const s of ['http://10.0.0.1', 'http://ex ample.com', 'http://example.com/a b', 'http://@example.com', 'mailto:a@b.cd', 'http://example.com:1']) t.notOk(isUrl(s), s)
})

t.test('the gateway\'s validators never run ajv-formats\' url regex on a call\'s input', async t => {
  // Counted on the library's own regex object, the one ajv-formats registers.
  let runs = 0
  const test = LIBRARY_URL.test
  LIBRARY_URL.test = function (s: string): boolean { runs++; return test.call(this, s) }
  t.teardown(() => { LIBRARY_URL.test = test })
  t.ok(LIBRARY_URL.test('http://example.com') && runs === 1, 'the count sees a run')
  runs = 0

  const kernel = await startTestKernel(t, { 'POST /v1/hooks': (_req, res) => json(res, 200, { ok: true }), 'GET /v1/hooks': (_req, res) => json(res, 200, { ok: true }) })
  const input = { type: 'object', required: ['url'], properties: { url: { type: 'string', format: 'url' } } }
  const output = { type: 'object', properties: { ok: { type: 'boolean' } } }
  const manifest = testManifest({
    addHook: { type: 'mutation', rest: 'POST /hooks', kernel: 'POST /v1/hooks', input, output },
    findHook: { type: 'query', rest: 'GET /hooks', kernel: 'GET /v1/hooks', input, output }
  }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  for (const [url, status] of [['https://example.com/a', 200], ['http://' + ':'.repeat(1000) + ' ', 400], ['http://10.0.0.1/', 400]] as const) {
    const body = await app.inject({ method: 'POST', url: '/api/v1/hooks', headers: bearer(), payload: { url } })
    t.equal(body.statusCode, status, `body ${url.slice(0, 20)}`)
    const query = await app.inject({ url: '/api/v1/hooks?url=' + encodeURIComponent(url), headers: bearer() })
    t.equal(query.statusCode, status, `query ${url.slice(0, 20)}`)
  }
  const ajv = addGatewayFormats(new Ajv())
  t.notOk(ajv.validate({ type: 'string', format: 'url' }, 'http://example.com/a b'))
  t.equal(runs, 0, 'the library\'s url regex was never run')
})
