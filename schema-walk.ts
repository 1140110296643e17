// Keywords whose values are data, not schemas: nothing in them is a schema's `$id` or `pattern`.
const DATA_KEYWORDS = new Set(['const', 'default', 'enum', 'example', 'examples'])

/**
 * Calls `visit` with each object of the JSON Schema `schema` and its manifest path (`at`, then
 * `.key` and `.index` down), past the values of data keywords. A map of named schemas
 * (`properties`) is visited as an object too: its keys are names, its values schemas.
 */
export function eachSchemaObject (schema: unknown, at: string, visit: (node: Record<string, unknown>, at: string) => void): void {
  if (Array.isArray(schema)) {
    schema.forEach((v, i) => { eachSchemaObject(v, `${at}.${i}`, visit) })
    return
  }
  if (schema === null || typeof schema !== 'object') return
  const node = schema as Record<string, unknown>
  visit(node, at)
  for (const [k, v] of Object.entries(node)) if (!DATA_KEYWORDS.has(k)) eachSchemaObject(v, `${at}.${k}`, visit)
}

/** Keywords whose value maps names (not keywords) to schemas (the pipeline's walks read it too). */
export const SCHEMA_MAPS = ['properties', 'patternProperties', '$defs', 'definitions', 'dependentSchemas', 'dependencies'] as const
const MAP_KEYWORDS = new Set<string>(SCHEMA_MAPS)

/**
 * The manifest path (`at`, then `.key` and `.index` down) of the first schema in `schema` that
 * holds the keyword `key`, or null: past the values of data keywords, and reading the keys of a
 * map of named schemas (`properties`) as names, not keywords.
 */
export function keywordPath (schema: unknown, at: string, key: string): string | null {
  if (Array.isArray(schema)) {
    for (let i = 0; i < schema.length; i++) {
      const found = keywordPath(schema[i], `${at}.${i}`, key)
      if (found !== null) return found
    }
    return null
  }
  if (schema === null || typeof schema !== 'object') return null
  if (Object.hasOwn(schema, key)) return at
  for (const [k, v] of Object.entries(schema)) {
    if (DATA_KEYWORDS.has(k)) continue
    if (MAP_KEYWORDS.has(k) && v !== null && typeof v === 'object' && !Array.isArray(v)) {
      for (const [name, named] of Object.entries(v)) {
        const found = keywordPath(named, `${at}.${k}.${name}`, key)
        if (found !== null) return found
      }
      continue
    }
    const found = keywordPath(v, `${at}.${k}`, key)
    if (found !== null) return found
  }
  return null
}

/**
 * A copy of the JSON Schema `schema` without the keyword `key` in any of its schemas (the values
 * of data keywords are copied as they are, and a property named as `key` stays).
 */
export function withoutKeyword (schema: unknown, key: string): unknown {
  if (Array.isArray(schema)) return schema.map(v => withoutKeyword(v, key))
  if (schema === null || typeof schema !== 'object') return schema
  const out: Record<string, unknown> = {}
  for (const [k, v] of Object.entries(schema)) {
    if (k === key) continue
    const value = DATA_KEYWORDS.has(k)
      ? v
      : MAP_KEYWORDS.has(k) && v !== null && typeof v === 'object' && !Array.isArray(v)
        ? Object.fromEntries(Object.entries(v).map(([name, s]) => [name, withoutKeyword(s, key)]))
        : withoutKeyword(v, key)
    // A key `__proto__` (JSON.parse keeps one as an own key) stays an own key.
    Object.defineProperty(out, k, { value, enumerable: true, writable: true, configurable: true })
  }
  return out
}
