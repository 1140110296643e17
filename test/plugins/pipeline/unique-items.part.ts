// `uniqueItems` over objects (or untyped items) is checked in one pass: Ajv's own compared every
// pair of items, and one call of 20,000 distinct objects held the event loop for 30 s.
import t from 'tap'
import { answerCheck, inputAjv } from '../../../plugins/pipeline/index.js'
import { buildTestApp, startTestKernel, testManifest, json, bearer } from '../../helper.js'

/** `n` distinct objects that count every read the check makes of them. */
function counted (n: number): { items: object[], reads: () => number } {
  let reads = 0
  const items = Array.from({ length: n }, (_, i) => new Proxy({ k: i }, {
    get (target, key, receiver) { reads++; return Reflect.get(target, key, receiver) },
    ownKeys (target) { reads++; return Reflect.ownKeys(target) },
    getOwnPropertyDescriptor (target, key) { reads++; return Reflect.getOwnPropertyDescriptor(target, key) },
    has (target, key) { reads++; return Reflect.has(target, key) }
  }))
  return { items, reads: () => reads }
}

t.test('uniqueItems reads each item a bounded number of times, not once per pair of items', async t => {
  const n = 1000
  const input = inputAjv().compile({ type: 'object', properties: { tags: { type: 'array', uniqueItems: true } } })
  const one = counted(n)
  t.equal(input({ tags: one.items }), true, 'distinct objects pass')
  t.ok(one.reads() < 20 * n, `the input check read the items ${one.reads()} times for ${n} items`)

  const answer = answerCheck({ type: 'array', items: { type: 'object' }, uniqueItems: true })
  const two = counted(n)
  t.equal(answer(two.items), true, 'distinct objects pass')
  t.ok(two.reads() < 20 * n, `the answer check read the items ${two.reads()} times for ${n} items`)
})

t.test('uniqueItems refuses what it refused, naming the same items, on every face; a deep item is refused as too deep, not a 500', async t => {
  const kernel = await startTestKernel(t, { 'POST /v1/tags': (req, res) => json(res, 200, { n: (JSON.parse(req.body) as { tags: unknown[] }).tags.length }) })
  const manifest = testManifest({
    putTags: {
      type: 'mutation',
      rest: 'POST /tags',
      kernel: 'POST /v1/tags',
      input: { type: 'object', properties: { tags: { type: 'array', uniqueItems: true, items: { type: 'object', properties: { k: {}, w: { type: 'integer', default: 1 } } } } } },
      output: { type: 'object', properties: { n: { type: 'integer' } } }
    }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const call = async (tags: unknown): Promise<{ status: number, body: { code?: string, detail?: string, n?: number } }> => {
    const res = await app.inject({ method: 'POST', url: '/api/v1/tags', headers: { ...bearer(), 'content-type': 'application/json' }, payload: typeof tags === 'string' ? `{"tags":${tags}}` : JSON.stringify({ tags }) })
    return { status: res.statusCode, body: res.json() }
  }

  // Key order aside, and after the defaults `items` inserts, as Ajv compared them.
  const dup = await call([{ k: { a: 1, b: [1, 2] } }, { k: 2 }, { k: 3 }, { k: { b: [1, 2], a: 1 } }, { k: 2, w: 1 }])
  t.equal(dup.status, 400)
  t.match(dup.body, { code: 'VALIDATION_FAILED', detail: 'input.tags must NOT have duplicate items (items ## 1 and 4 are identical)' }, 'the last item that repeats one, and the nearest it repeats')
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: bearer(), payload: { calls: [{ id: 'a', op: 'putTags', input: { tags: [{ k: 0 }, { k: 0 }] } }] } })
  t.match(batch.json(), { results: [{ id: 'a', error: { code: 'VALIDATION_FAILED', detail: 'input.tags must NOT have duplicate items (items ## 0 and 1 are identical)' } }] })
  t.match(await call([{ k: 1 }, { k: 1, w: 2 }, { k: '1' }, { k: [1] }, { k: { a: null } }, { k: {} }]), { status: 200, body: { n: 6 } }, 'items that differ pass')
  t.match(await call(Array.from({ length: 40_000 }, (_, k) => ({ k }))), { status: 200, body: { n: 40_000 } }, '40,000 distinct objects pass')

  // As text: JSON.stringify of it would overflow the test's own stack.
  const deep = (n: number): string => '['.repeat(100_000) + String(n) + ']'.repeat(100_000)
  t.match(await call(`[{"k":${deep(1)}},{"k":${deep(1)}}]`), { status: 400, body: { code: 'VALIDATION_FAILED', detail: 'input.tags must NOT have duplicate items (items ## 0 and 1 are identical)' } }, 'two equal items nested 100,000 levels deep: refused, not a 500')
  t.match(await call(`[{"k":${deep(1)}},{"k":${deep(2)}}]`), { status: 400, body: { code: 'VALIDATION_FAILED', detail: /more than 256 levels deep/ } }, 'two that differ at the bottom: refused for their depth')
})
