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
