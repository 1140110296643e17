import { eachSchemaObject } from './schema-walk.js'

// A field named as a member of Object.prototype (`constructor`, `toString`, `valueOf`) and left
// out of an answer was read from the prototype by what reads answers by name: fast-json-stringify
// wrote `"toString":"function toString() { [native code] }"`, and GraphQL answered the same.

const INHERITED = new Set(Object.getOwnPropertyNames(Object.prototype))

/** Whether `name` is a member every plain object has from Object.prototype. */
export function inheritedName (name: string): boolean {
  return INHERITED.has(name)
}

/**
 * `serialize`, compiled from `schema`, as every serializer of an answer is to be called: on the
 * answer copied without prototypes when the schema declares a property so named (decided once,
 * here), else as it is, at no cost.
 */
export function ownFieldsOnly (schema: unknown, serialize: (value: unknown) => string): (value: unknown) => string {
  return declaresInheritedName(schema) ? value => serialize(withoutPrototypes(value)) : serialize
}

/** Whether `schema` declares a property so named anywhere. */
export function declaresInheritedName (schema: unknown): boolean {
  let found = false
  eachSchemaObject(schema, '', node => {
    const props = node.properties
    if (props !== null && typeof props === 'object' && !Array.isArray(props) && Object.keys(props).some(inheritedName)) found = true
  })
  return found
}

/**
 * `value` with each of its objects copied without a prototype, for a serializer of a schema that
 * declaresInheritedName: a field left out then reads as left out. Recursive: an answer nests 512
 * levels at most (checked before it is serialized).
 */
export function withoutPrototypes (value: unknown): unknown {
  if (value === null || typeof value !== 'object') return value
  if (Array.isArray(value)) return value.map(withoutPrototypes)
  const copy = Object.create(null) as Record<string, unknown>
  for (const [k, v] of Object.entries(value)) copy[k] = withoutPrototypes(v)
  return copy
}

/**
 * Whether JSON text may hold a key secure-json-parse refuses (the cheap test: only text that
 * names one is walked by forbiddenKey).
 */
export const MAY_HOLD_FORBIDDEN_KEY = /"(?:__proto__|constructor)"/

/**
 * Whether a parsed JSON value holds a key secure-json-parse refuses (REST's parser): a
 * `__proto__` (JSON.parse keeps it as an own key), or a `constructor` holding a `prototype`.
 * Iterative, at any depth: a reviver on JSON.parse recursed, and a message a few thousand
 * levels deep overflowed the stack. For the WebSocket faces, which parse their frames themselves.
 */
export function forbiddenKey (parsed: object): boolean {
  const stack: unknown[] = [parsed]
  while (stack.length > 0) {
    const value = stack.pop()
    if (value === null || typeof value !== 'object') continue
    if (Object.hasOwn(value, '__proto__')) return true
    const ctor = (value as { constructor?: unknown }).constructor
    if (Object.hasOwn(value, 'constructor') && ctor !== null && typeof ctor === 'object' && Object.hasOwn(ctor, 'prototype')) return true
    for (const v of Object.values(value)) if (v !== null && typeof v === 'object') stack.push(v)
  }
  return false
}
