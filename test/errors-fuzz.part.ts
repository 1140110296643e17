// describeValidation over a seeded corpus of manifest-like schemas (objects, arrays, nullable
// objects, tagged unions, their branches plain or composed with allOf, anyOf/oneOf/allOf,
// enum/const, if/then/else, not, propertyNames, names that need escaping or quoting, keys of
// 5,000 characters), compiled with the pipeline's Ajv options and fed near-valid values: it never
// throws, always names something, never echoes a value of the input (strings hold Ω and numbers
// 86753xx here, which no schema holds), only paths and rules, and stays short (keys are cut).
import t from 'tap'
import { Ajv } from 'ajv'
import addFormats from 'ajv-formats'
import { describeValidation } from '../errors.js'

function rng (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let x = Math.imul(a ^ (a >>> 15), a | 1)
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61)
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

t.test('describeValidation never throws, names a fault and echoes no value, over seeded schemas and values', async t => {
  const r = rng(20261205)
  const int = (n: number): number => Math.floor(r() * n)
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]
  const KEYS = ['a', 'b', 'kind', 'x', 'y', 'a/b', 'p~q', 'sp ace', 'pct%25', 'é', '0', 'a.b', 'c[1]', '', 'q"t']
  const LONG = 'L'.repeat(5000)
  const NAMES = [{ pattern: '^[a-z]+$' }, { maxLength: 3 }, { enum: ['a', 'b', 'kind', 'version'] }, { anyOf: [{ pattern: '^[a-z]+$' }, { const: 'x' }] }]
  const TAGS = ['a', 'b', 'c', 1, true, null]
  type Schema = Record<string, unknown> | boolean
  const prim = (): Record<string, unknown> => pick<() => Record<string, unknown>>([
    () => ({ type: 'string', ...(r() < 0.3 ? { maxLength: 4, pattern: '^[a-z]+$' } : {}), ...(r() < 0.1 ? { format: 'email' } : {}) }),
    () => ({ type: 'number', minimum: 0, maximum: 100 }),
    () => ({ type: 'integer' }),
    () => ({ type: 'boolean' }),
    () => ({ type: 'null' }),
    () => ({ type: pick([['string', 'null'], ['integer', 'string']]) }),
    () => ({ enum: [...new Set([pick(TAGS), pick(TAGS), 'z'])] }),
    () => ({ const: pick(TAGS) }),
    () => ({ type: 'string', nullable: true })
  ])()
  const object = (d: number, tag?: [string, unknown]): Record<string, unknown> => {
    const properties: Record<string, Schema> = {}
    const required: string[] = []
    if (tag !== undefined) { properties[tag[0]] = r() < 0.2 ? { enum: [tag[1], 'z'] } : { const: tag[1] }; required.push(tag[0]) }
    for (let i = int(4); i > 0; i--) {
      const k = pick(KEYS)
      if (k in properties) continue
      properties[k] = gen(d + 1)
      if (r() < 0.5) required.push(k)
    }
    return { type: 'object', properties, required, ...(r() < 0.25 ? { additionalProperties: r() < 0.7 ? false : gen(d + 1) } : {}), ...(r() < 0.1 ? { minProperties: 1 } : {}), ...(r() < 0.1 ? { propertyNames: pick(NAMES) } : {}) }
  }
  function gen (d: number): Schema {
    const c = d > 3 ? 0 : r()
    if (c < 0.25) return prim()
    if (c < 0.45) return object(d)
    if (c < 0.55) return { type: 'array', items: gen(d + 1), ...(r() < 0.2 ? { minItems: 1 } : {}) }
    if (c < 0.65) return { anyOf: [{ type: 'null' }, gen(d + 1)] }
    if (c < 0.77) {
      const name = pick(['kind', 'k/t'])
      const branches = ['a', 'b', 'c'].slice(0, 2 + int(2)).map(v => object(d + 1, [name, v]))
      // Now and then a second field that tells the branches apart, as a version would.
      if (r() < 0.3) branches.forEach((b, i) => { (b.properties as Record<string, Schema>).version = { const: i } })
      // Now and then composed as OpenAPI writes them: a base (a $ref the manifest inlines), then the branch.
      const base = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
      return { [pick(['oneOf', 'anyOf'])]: r() < 0.3 ? branches.map(b => ({ allOf: [base, r() < 0.3 ? { allOf: [b] } : b] })) : branches }
    }
    if (c < 0.85) return { [pick(['anyOf', 'oneOf'])]: Array.from({ length: 2 + int(2) }, () => gen(d + 1)) }
    if (c < 0.9) return { allOf: [gen(d + 1), gen(d + 1)] }
    if (c < 0.93) return { not: prim() }
    if (c < 0.96) return { if: { type: 'object', required: ['a'] }, then: object(d + 1), else: gen(d + 1) }
    return r() < 0.5
  }
  let serial = 0
  const deep = (): unknown => { let v: unknown = []; for (let i = 0; i < 20_000; i++) v = [v]; return v }
  const junk = (): unknown => pick<() => unknown>([() => 'Ω' + String(serial++), () => 8675300 + (serial++ % 99), () => r() < 0.5, () => null, () => [], () => ({}), () => ['Ω'], () => ({ zq: 'Ω' })])()
  function value (s: unknown, d: number): unknown {
    if (r() < 0.12 || d > 8 || typeof s !== 'object' || s === null) return r() < 0.01 ? deep() : junk()
    const o = s as Record<string, unknown>
    if ('const' in o) return r() < 0.8 ? o.const : junk()
    if (Array.isArray(o.enum)) return r() < 0.8 ? pick(o.enum) : junk()
    for (const k of ['anyOf', 'oneOf', 'allOf'] as const) if (Array.isArray(o[k])) return value(pick(o[k] as unknown[]), d + 1)
    if ('then' in o) return value(r() < 0.5 ? o.then : o.else, d + 1)
    if ('not' in o) return junk()
    switch (Array.isArray(o.type) ? pick(o.type as string[]) : o.type) {
      case 'string': return 'Ω' + (r() < 0.5 ? 'abc' : String(serial++))
      case 'number': return r() < 0.5 ? 8675300.5 : 50
      case 'integer': return r() < 0.5 ? 8675301 : 3
      case 'boolean': return r() < 0.5
      case 'null': return null
      case 'array': return Array.from({ length: int(4) }, () => value(o.items, d + 1))
      case 'object': {
        const out: Record<string, unknown> = {}
        for (const [k, sub] of Object.entries(o.properties as Record<string, unknown>)) if (r() < 0.8) out[k] = value(sub, d + 1)
        if (r() < 0.15) out[pick(['extra', 'kind', 'version', 'Bad Key', LONG, LONG + '.x'])] = junk()
        return out
      }
      default: return junk()
    }
  }
  const input = new Ajv({ allErrors: false, strict: false, coerceTypes: false, useDefaults: true })
  addFormats.default(input)
  const output = new Ajv({ allErrors: false, strict: false, coerceTypes: false, validateFormats: false })
  let refused = 0
  const shown = (v: unknown): string => { try { return String(JSON.stringify(v)).slice(0, 200) } catch { return 'a deeply nested value' } }
  const bad: string[] = []
  for (let i = 0; i < 150; i++) {
    const schema = gen(0)
    const context = i % 2 === 0 ? 'input' : 'output'
    const validate = (context === 'input' ? input : output).compile(schema as object)
    for (let j = 0; j < 12; j++) {
      const given = value(schema, 0)
      if (validate(given)) continue
      refused++
      let message: string
      try {
        message = describeValidation(validate.errors ?? [], context, { schema: validate.schema, value: given })
      } catch (err) {
        message = `threw ${(err as Error).message}`
      }
      if (!message.startsWith(context) || /undefined|Ω|86753|threw|L{65}/.test(message) || message.length > 1000) bad.push(`${message} for ${shown(given)} under ${JSON.stringify(schema)}`)
    }
  }
  t.ok(refused > 500, `${refused} refusals described`)
  t.same(bad, [], 'every message names a path and a rule, and no value')
})
