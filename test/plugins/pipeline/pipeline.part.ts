import t from 'tap'
import { createPipeline, canonicalJson, CallContext, jsonNestsDeeperThan, mayNestDeep } from '../../../plugins/pipeline/index.js'
import { testManifest } from '../../helper.js'

const manifest = () => testManifest({
  getX: { type: 'query', rest: 'GET /x/:id', kernel: 'GET /x/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', properties: { id: { type: 'string' } } } },
  setX: { type: 'mutation', rest: 'POST /x', kernel: 'POST /x', input: { type: 'object', properties: { v: { type: 'integer' } } }, output: { type: 'object' } }
})

t.test('canonical JSON sorts keys at every depth and skips undefined', async t => {
  t.equal(canonicalJson({ b: 1, a: { d: [1, { z: 1, y: 2 }], c: null }, u: undefined }), '{"a":{"c":null,"d":[1,{"y":2,"z":1}]},"b":1}')
  t.equal(canonicalJson(undefined), 'null')
  t.equal(canonicalJson('s'), '"s"')
})

// A flat object (no value an object or array) is written in one pass: the same text as the
// general walk, which writes it when it is an array's item.
t.test('canonical JSON of a flat object is the text the general walk writes', async t => {
  const values: unknown[] = ['', 'a', 'é"\\\n\u2028', '\ud800', 0, -0, 1.5, -1e300, NaN, Infinity, true, false, null, undefined, () => 1, Symbol('s')]
  const keys = ['a', 'b', 'B', '', 'é', '\u0000', '__proto__', 'constructor', '10', '9', 'z z']
  let seed = 7
  const next = (n: number): number => { seed = (seed * 1103515245 + 12345) % 2147483648; return (seed >>> 16) % n }
  for (let i = 0; i < 500; i++) {
    const record: Record<string, unknown> = {}
    for (let k = next(6); k > 0; k--) Object.defineProperty(record, keys[next(keys.length)], { value: values[next(values.length)], enumerable: true, configurable: true, writable: true })
    const walked = canonicalJson([record]).slice(1, -1)
    if (canonicalJson(record) !== walked) t.fail(`${walked} written as ${canonicalJson(record)}`)
  }
  t.equal(canonicalJson({ b: 1, a: 'x', u: undefined, n: null, f: () => 1 }), '{"a":"x","b":1,"f":null,"n":null}')
  t.equal(canonicalJson({}), '{}')
  t.equal(canonicalJson({ u: undefined }), '{}')
  t.equal(canonicalJson({ z: 1, a: [] }), '{"a":[],"z":1}', 'an array value: the walk')
  t.throws(() => canonicalJson({ big: 1n }), TypeError, 'a BigInt throws, as in the walk')
  t.throws(() => canonicalJson([{ big: 1n }]), TypeError)
})

t.test('the pipeline guards its own assembly', async t => {
  const p = createPipeline(manifest())
  t.throws(() => p.compile(), /no terminal/)
  const calls: string[] = []
  p.setTerminal(op => (ctx) => { calls.push(op.name + ':' + JSON.stringify(ctx.input)); return Promise.resolve({ id: 'k' }) })
  t.throws(() => p.setTerminal(() => async () => null), /already has its terminal/)
  const ctx = new CallContext('r', 'rest', manifest().byName.get('getX')!, { id: 'a' }, undefined, undefined, undefined)
  t.throws(() => p.entry('getX').run(ctx), /not compiled yet/)
  const order: string[] = []
  p.addStage({ name: 'second', order: 50, build: () => (c, next) => { order.push('second'); return next(c) } })
  p.addStage({ name: 'first', order: 10, build: op => op.type === 'query' ? (c, next) => { order.push('first'); return next(c) } : null })
  t.throws(() => p.addStage({ name: 'first', order: 5, build: () => null }), /added twice/)
  p.compile()
  t.throws(() => p.addStage({ name: 'late', order: 1, build: () => null }), /after the pipeline was compiled/)
  t.same(p.entry('getX').stages, ['first', 'validation', 'second'])
  t.same(p.entry('setX').stages, ['validation', 'second'])
  t.same(await p.entry('getX').run(ctx), { id: 'k' })
  t.same(order, ['first', 'second'])

  // Within one memo, identical queries share a call; mutations never do.
  const memo = new Map<string, Promise<unknown>>()
  const q = (input: Record<string, unknown>) => { const c = new CallContext('r', 'batch', manifest().byName.get('getX')!, input, undefined, undefined, undefined); c.memo = memo; return p.entry('getX').run(c) }
  const m = () => { const c = new CallContext('r', 'batch', manifest().byName.get('setX')!, { v: 1 }, undefined, undefined, undefined); c.memo = memo; return p.entry('setX').run(c) }
  calls.length = 0
  await Promise.all([q({ id: 'a' }), q({ id: 'a' }), q({ id: 'b' }), m(), m()])
  t.same(calls.sort(), ['getX:{"id":"a"}', 'getX:{"id":"b"}', 'setX:{"v":1}', 'setX:{"v":1}'])
  t.equal(p.entry('getX').serialize({ id: 'x', extra: 1 }), '{"id":"x"}')
})

t.test('mayNestDeep: a schema that leaves a part free, and the depth of a JSON text', async t => {
  const closed = [
    { type: 'string' },
    { type: 'object', properties: { a: { type: 'object', properties: { b: { type: 'array', items: { type: 'integer' } } } } } },
    // An object without properties is written {}: its undeclared properties are dropped.
    { type: 'object' },
    { type: 'object', additionalProperties: false, properties: { a: { type: ['string', 'null'] } } },
    { enum: [{ a: [[1]] }, 'b'] },
    { anyOf: [{ type: 'string' }, { type: 'null' }] },
    { type: 'array', items: [{ type: 'string' }, { type: 'number' }] },
    false
  ]
  for (const schema of closed) t.notOk(mayNestDeep(schema), JSON.stringify(schema))
  const free = [
    {},
    true,
    { type: 'array' },
    { type: 'object', properties: { a: {} } },
    { type: 'object', additionalProperties: true },
    { type: 'object', additionalProperties: { type: 'array' } },
    { type: 'object', patternProperties: { '^x': {} } },
    { type: 'array', items: { type: 'object', properties: { deep: { type: ['object', 'array'] } } } },
    { anyOf: [{ type: 'string' }, {}] },
    { type: 'object', properties: { a: { type: 'string' } }, if: { required: ['a'] }, then: {} },
    { description: 'no type' }
  ]
  for (const schema of free) t.ok(mayNestDeep(schema), JSON.stringify(schema))

  t.notOk(jsonNestsDeeperThan('[[[]]]', 3))
  t.ok(jsonNestsDeeperThan('[[[[]]]]', 3))
  t.notOk(jsonNestsDeeperThan('{"a":"[[[[[[\\"[[[[","b":[{}]}', 3), 'brackets in strings, escaped quotes included, are text')
  t.ok(jsonNestsDeeperThan('{"a\\\\":[[[1]]]}', 3), 'an escaped backslash ends before the quote')
  t.notOk(jsonNestsDeeperThan('[' + '[],'.repeat(10_000) + '[]]', 2), 'wide is not deep')
  t.ok(jsonNestsDeeperThan('['.repeat(100_000) + ']'.repeat(100_000), 512))
})
