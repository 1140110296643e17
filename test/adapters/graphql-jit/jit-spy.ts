import Module from 'node:module'

// Counts graphql-jit's compileQuery calls of the process: mercurius takes it from require() when
// it loads, so this must be imported before the gateway is.
export const compiled: string[] = []
const loader = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown }
const load = loader._load
loader._load = function (request: string, ...rest: unknown[]) {
  const exported = load.call(this, request, ...rest)
  if (request !== 'graphql-jit') return exported
  const jit = exported as { compileQuery: (schema: unknown, document: { definitions: Array<{ name?: { value: string } }> }, ...more: unknown[]) => unknown }
  return {
    ...jit,
    compileQuery: (schema: unknown, document: { definitions: Array<{ name?: { value: string } }> }, ...more: unknown[]) => {
      compiled.push(document.definitions[0]?.name?.value ?? '')
      return jit.compileQuery(schema, document, ...more)
    }
  }
}
