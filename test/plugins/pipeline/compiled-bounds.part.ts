// What compiled.ts keeps of schemas compiled by their text is bounded by what it holds, not only
// by their count: 512 large schemas (reloads that changed one, manifests refused) held gigabytes.
import t from 'tap'
import { compiledOnce, COMPILED_SCHEMA_TEXT } from '../../../compiled.js'

const wide = (tag: string, fields: number): Record<string, unknown> => {
  const properties: Record<string, unknown> = {}
  for (let i = 0; i < fields; i++) properties[`${tag}${i}`] = { type: 'object', properties: { a: { type: 'string', maxLength: 10 }, b: { type: 'integer' }, c: { type: 'array', items: { type: 'string' } } } }
  return { type: 'object', properties }
}

t.test('schemas kept by their text are bounded by the text they hold', async t => {
  const bound = COMPILED_SCHEMA_TEXT
  let compiles = 0
  const first = wide('boundFirst', 800)
  const text = JSON.stringify(first).length
  compiledOnce('bound-test', first, () => { compiles++; return {} })
  for (let i = 0; text * (i + 1) <= bound * 1.5; i++) compiledOnce('bound-test', wide(`bound${i}x`, 800), () => ({}))
  compiledOnce('bound-test', structuredClone(first), () => { compiles++; return {} })
  t.equal(compiles, 2, `the first schema (${text} characters) was let go once ${Math.round(bound * 1.5 / 1024)} KiB of others were kept`)
})
