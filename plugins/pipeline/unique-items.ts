import type { Ajv, SchemaValidateFunction } from 'ajv'
import { canonicalJson } from '../../manifest.js'

/**
 * `uniqueItems` checked in one pass over the array, in place of Ajv's own. Ajv's compares every
 * pair of items (fast-deep-equal) unless the items' schema names only scalar types: an array
 * of 20,000 distinct objects (230 KB) held the event loop for 30 s on an operation whose input
 * has `uniqueItems` over objects or untyped items, and one of the body limit's size (1 MB) for
 * minutes, every call and probe of the instance waiting. Here each item is written once as
 * canonical JSON (keys sorted: two items are equal as JSON Schema says, key order aside), and
 * duplicates are found by their text. The error is Ajv's own (keyword, message and params), for
 * the same pair of items: the last item that repeats an earlier one, and the nearest earlier one.
 * Same place as Ajv's: the last rule of an array, after `items` (and the defaults it inserts).
 */
export function addUniqueItems (ajv: Ajv): void {
  ajv.removeKeyword('uniqueItems')
  const validate: SchemaValidateFunction = (schema: unknown, data: unknown): boolean => {
    validate.errors = undefined
    if (schema !== true || !Array.isArray(data) || data.length < 2) return true
    const pair = duplicate(data)
    if (pair === null) return true
    const [j, i] = pair
    validate.errors = [{ keyword: 'uniqueItems', message: `must NOT have duplicate items (items ## ${j} and ${i} are identical)`, params: { i, j } }]
    return false
  }
  ajv.addKeyword({ keyword: 'uniqueItems', type: 'array', schemaType: 'boolean', errors: true, validate })
}

/** The last item equal to an earlier one and the nearest such earlier one, as [earlier, later]; else null. */
export function duplicate (items: readonly unknown[]): [number, number] | null {
  const last = new Map<string, number>()
  let found: [number, number] | null = null
  for (let i = 0; i < items.length; i++) {
    const text = canonicalJson(items[i])
    const before = last.get(text)
    if (before !== undefined) found = [before, i]
    last.set(text, i)
  }
  return found
}
