import { LRUCache } from 'lru-cache'

/** Schemas compiled (validators and serializers) kept by their text beyond the operations that hold them. */
export const COMPILED_SCHEMAS = 512
/**
 * And at most this much of their text (characters): what is compiled of a schema grows with it
 * (about 18 times its text for Ajv's code), and 512 large ones kept from reloads, or manifests
 * refused, held gigabytes (a 222 KB schema changed 60 times: 480 MB that nothing used). A schema
 * larger than this is compiled and not kept.
 */
export const COMPILED_SCHEMA_TEXT = 2 * 1024 * 1024

/**
 * What was compiled from a schema, kept by the schema's text (and what was made of it, `kind`):
 * an operation declaring a schema already compiled in the process shares it, whichever manifest
 * or app it belongs to. A manifest read again (a reload, or each app a test process builds on a
 * manifest of its own) made new operations, and compiled all their schemas again: the input
 * checks, answer checks and serializers, and the manifest's own check of each schema, were a
 * sixth of the test suite's CPU in a profile. The operations of a manifest in use hold theirs
 * too (the pipeline's WeakMaps): this only spares compiling again, within COMPILED_SCHEMAS
 * (`mantle_compiled_schemas`), about 14 KiB each for a small schema. What `compile` throws is not
 * kept: the next asks again.
 */
const bySchemaText = new LRUCache<string, object>({ max: COMPILED_SCHEMAS, maxSize: COMPILED_SCHEMA_TEXT, sizeCalculation: (_value, key) => key.length })

/** Schemas compiled and kept by their text now. */
export function compiledSchemas (): number {
  return bySchemaText.size
}

/** What `compile` makes of `schema` for `kind`, compiled once per schema text while kept (see bySchemaText). */
export function compiledOnce<T extends object> (kind: string, schema: unknown, compile: () => T): T {
  let text: string
  try {
    text = JSON.stringify(schema)
  } catch {
    return compile()
  }
  return compiledByText(kind, text, compile)
}

/** compiledOnce for a caller that has the schema's text (JSON.stringify) already. */
export function compiledByText<T extends object> (kind: string, text: string, compile: () => T): T {
  const key = kind + '\u0000' + text
  let compiled = bySchemaText.get(key) as T | undefined
  if (compiled === undefined) {
    compiled = compile()
    bySchemaText.set(key, compiled)
  }
  return compiled
}

/** What was compiled by compiledByText for `kind` from `text`, if it is kept: nothing is compiled. */
export function keptByText<T extends object> (kind: string, text: string): T | undefined {
  return bySchemaText.get(kind + '\u0000' + text) as T | undefined
}
