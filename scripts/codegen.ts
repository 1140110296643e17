// npm run codegen [-- --manifest path] [--out path]
//
// Writes a TypeScript declaration of the tRPC face's router, `AppRouter`, from the manifest:
// a client imports it into `createTRPCClient<AppRouter>` and gets typed inputs and outputs
// without the gateway's source. Named schemas become named interfaces (or types), of the
// same name, except a name the file could not declare or would shadow: a word TypeScript
// reserves (`string`, `class`, ...) or a name the file itself uses (`Record`, `Array`,
// `AsyncIterable`, `Root`, `AppRouter`, `MantleErrorCode`, ... : RESERVED_NAMES). Such a schema
// is named `<Name>2` (or 3, ..., the first that no other schema has), as the GraphQL face
// numbers a taken name. Before, `Record` was declared as is, and the file did not compile
// (`Type 'Record' is not generic`). A schema named like another global (`Date`, `Promise`)
// keeps its name: it shadows the global in this file only, which does not use it.
//
// The JSON Schema to TypeScript mapping is ours: json-schema-to-typescript is not among the
// project's packages, and the subset the manifest uses for faces is small (objects, arrays,
// enums, consts, unions, nullable type arrays; anything else is `unknown`).
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { dirname, extname, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { pathToFileURL } from 'node:url'
import { parse as parseYaml } from 'yaml'
import { loadManifestFile, withoutBom, type JsonSchema, type Manifest } from '../manifest.js'
import { ErrorCodes } from '../errors.js'
import { inputAjv } from '../plugins/pipeline/index.js'
import { answerHelp, refusedByParseArgs, refuseUsage } from '../cli.js'

const REF = /^#\/schemas\/([A-Za-z_][A-Za-z0-9_]*)$/
const IDENTIFIER = /^[A-Za-z_$][A-Za-z0-9_$]*$/

/** What a named schema may not be called in the generated file (see the top of this file). */
export const RESERVED_NAMES: ReadonlySet<string> = new Set([
  // Declared or used by the file itself.
  'TRPCBuiltRouter', 'TRPCMutationProcedure', 'TRPCQueryProcedure', 'TRPCSubscriptionProcedure', 'TRPC_ERROR_CODE_NUMBER',
  'MantleErrorCode', 'MantleErrorShape', 'Root', 'AppRouter', 'Record', 'Array', 'AsyncIterable',
  // TypeScript's own type names, and the words no type may take.
  'any', 'unknown', 'never', 'void', 'undefined', 'null', 'object', 'string', 'number', 'boolean', 'symbol', 'bigint',
  'break', 'case', 'catch', 'class', 'const', 'continue', 'debugger', 'default', 'delete', 'do', 'else', 'enum', 'export',
  'extends', 'false', 'finally', 'for', 'function', 'if', 'import', 'in', 'instanceof', 'new', 'return', 'super', 'switch',
  'this', 'throw', 'true', 'try', 'typeof', 'var', 'while', 'with', 'implements', 'interface', 'let', 'package',
  'private', 'protected', 'public', 'static', 'yield', 'await',
  // Contextual words that may name a type but not stand where a type is written (`output:
  // readonly` is a syntax error), or, `as`, not name a type alias at all.
  'as', 'keyof', 'readonly', 'unique', 'infer',
  // Declared, it stands for a type the compiler provides (TS2795 wherever else it is used).
  'intrinsic'
])

/** The TypeScript name of each named schema: its own, or `<Name>2`, ... when RESERVED_NAMES holds it. */
export function typeNames (schemaNames: readonly string[]): ReadonlyMap<string, string> {
  const taken = new Set(schemaNames)
  const names = new Map<string, string>()
  for (const name of schemaNames) {
    if (!RESERVED_NAMES.has(name)) {
      names.set(name, name)
      continue
    }
    let n = 2
    while (taken.has(`${name}${n}`) || RESERVED_NAMES.has(`${name}${n}`)) n++
    taken.add(`${name}${n}`)
    names.set(name, `${name}${n}`)
  }
  return names
}

const NO_NAMES: ReadonlyMap<string, string> = new Map()

/** A single-quoted TypeScript string literal (the project's style), escaped as JSON escapes it. */
const quote = (text: string): string => `'${JSON.stringify(text).slice(1, -1).replace(/\\"/g, '"').replace(/'/g, "\\'")}'`

const key = (name: string): string => IDENTIFIER.test(name) ? name : quote(name)

function literal (value: unknown): string {
  if (typeof value === 'string') return quote(value)
  return value === null || typeof value === 'number' || typeof value === 'boolean' ? String(value) : 'unknown'
}

function union (types: string[]): string {
  const unique = [...new Set(types)]
  if (unique.includes('unknown')) return 'unknown'
  return unique.length === 0 ? 'never' : unique.join(' | ')
}

/** A JSDoc line from a schema's description (never closing the comment early). */
function doc (schema: unknown, indent: string): string {
  const text = (schema as JsonSchema | null)?.description
  return typeof text === 'string' && text.trim() !== '' ? `${indent}/** ${text.trim().replace(/\*\//g, '*\\/').replace(/\s*\n\s*/g, ' ')} */\n` : ''
}

function objectType (schema: JsonSchema, indent: string, names: ReadonlyMap<string, string>): string {
  const props = (schema.properties ?? {}) as Record<string, unknown>
  const required = new Set(Array.isArray(schema.required) ? schema.required as string[] : [])
  const extra = schema.additionalProperties
  const declared = Object.keys(props)
  // A required key the schema does not declare in `properties` (JSON Schema allows it: its value
  // is then the additionalProperties' or a patternProperties'): it must be there all the same.
  // Before, it was left out of the type, and a call without it type-checked, to be refused
  // VALIDATION_FAILED ("input.tag is required").
  const undeclared = [...required].filter(name => !Object.hasOwn(props, name))
  const extraType = typeof extra === 'object' && extra !== null ? toType(extra, indent, names) : 'unknown'
  if (declared.length === 0 && undeclared.length === 0) {
    if (extra === false) return 'Record<string, never>'
    return `Record<string, ${extraType}>`
  }
  const inner = indent + '  '
  const lines = declared.map(name => `${doc(props[name], inner)}${inner}${key(name)}${required.has(name) ? '' : '?'}: ${toType(props[name], inner, names)}`)
  const undeclaredTypes = undeclared.map(name => undeclaredType(schema, name, inner, names))
  undeclared.forEach((name, i) => lines.push(`${inner}${key(name)}: ${undeclaredTypes[i]}`))
  if (declared.length === 0) {
    // No declared key: any other key is the additionalProperties' (as `Record<string, ...>` above),
    // typed so that the required ones fit the index (a patternProperties' type may differ).
    const others = extra === false ? 'never' : extraType
    const index = undeclaredTypes.every(type => type === others) ? others : 'unknown'
    lines.push(`${inner}[key: string]: ${index}`)
  } else if (extra === true || (typeof extra === 'object' && extra !== null)) {
    // Extra keys only where the schema says so outright; declared keys stay checked either way.
    lines.push(`${inner}[key: string]: unknown`)
  }
  return `{\n${lines.join('\n')}\n${indent}}`
}

/**
 * The type of a required key that `properties` does not declare: that of each patternProperties
 * whose pattern it matches, else the additionalProperties' (`never` under `false`: no value of
 * the schema has it, nor lacks it), else `unknown`.
 */
function undeclaredType (schema: JsonSchema, name: string, indent: string, names: ReadonlyMap<string, string>): string {
  const patterns = schema.patternProperties
  if (typeof patterns === 'object' && patterns !== null) {
    const matched: string[] = []
    for (const [pattern, sub] of Object.entries(patterns as Record<string, unknown>)) {
      let matches: boolean
      try {
        matches = new RegExp(pattern, 'u').test(name)
      } catch {
        return 'unknown'
      }
      if (matches) matched.push(toType(sub, indent, names))
    }
    if (matched.length === 1) return matched[0]
    if (matched.length > 1) return matched.map(type => `(${type})`).join(' & ')
  }
  const extra = schema.additionalProperties
  if (extra === false) return 'never'
  return typeof extra === 'object' && extra !== null ? toType(extra, indent, names) : 'unknown'
}

function typeFor (type: unknown, schema: JsonSchema, indent: string, names: ReadonlyMap<string, string>): string {
  switch (type) {
    case 'string': return 'string'
    case 'number':
    case 'integer': return 'number'
    case 'boolean': return 'boolean'
    case 'null': return 'null'
    case 'array': {
      const items = schema.items
      if (typeof items !== 'object' || items === null || Array.isArray(items)) return 'unknown[]'
      return `Array<${toType(items, indent, names)}>`
    }
    case 'object': return objectType(schema, indent, names)
    default: return 'unknown'
  }
}

/**
 * The TypeScript type of a JSON Schema, with `{ $ref: "#/schemas/Name" }` as `Name` (or the
 * name `names` gives it). Ajv's `nullable: true` (beside a `type`) adds `null`, as the gateway
 * answers it; before, `note: { type: string, nullable: true }` was `note?: string`.
 */
export function toType (schema: unknown, indent = '', names: ReadonlyMap<string, string> = NO_NAMES): string {
  if (schema === false) return 'never'
  if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) return 'unknown'
  const s = schema as JsonSchema
  if (typeof s.$ref === 'string') {
    const name = REF.exec(s.$ref)?.[1]
    return name === undefined ? 'unknown' : names.get(name) ?? name
  }
  if ('const' in s) return literal(s.const)
  if (Array.isArray(s.enum)) return union(s.enum.map(literal))
  const alternatives = Array.isArray(s.anyOf) ? s.anyOf : Array.isArray(s.oneOf) ? s.oneOf : null
  if (alternatives !== null) return union(alternatives.map(a => toType(a, indent, names)))
  if (Array.isArray(s.allOf) && s.allOf.length > 0) return s.allOf.map(a => `(${toType(a, indent, names)})`).join(' & ')
  const types: unknown[] = Array.isArray(s.type) ? [...s.type] : s.type !== undefined ? [s.type] : s.properties !== undefined ? ['object'] : []
  if (types.length === 0) return 'unknown'
  if (s.nullable === true) types.push('null')
  return union(types.map(t => typeFor(t, s, indent, names)))
}

/** Whether a schema's type is one object type alone (declared as an interface, not a type alias). */
function objectOnly (schema: unknown): boolean {
  if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) return false
  const s = schema as JsonSchema
  if (typeof s.$ref === 'string' || 'const' in s || Array.isArray(s.enum) || Array.isArray(s.anyOf) || Array.isArray(s.oneOf) || Array.isArray(s.allOf) || s.nullable === true) return false
  const type = Array.isArray(s.type) && s.type.length === 1 ? s.type[0] : s.type ?? (s.properties !== undefined ? 'object' : undefined)
  return type === 'object'
}

/**
 * Whether a call may leave out its input: the gateway takes none (or null) as `{}`, so exactly
 * when the op's input schema, its references resolved, admits `{}`, as the pipeline's validation
 * reads it (defaults filled in, own properties only). Before, only the `required` of the schema
 * as written, or of the one named schema it referred to, was read: an input naming a schema that
 * names another (`IdsAlias: { $ref: "#/schemas/Ids" }`), or one with `minProperties`, was typed
 * `| void`, and `api.op.query()` type-checked, to be refused VALIDATION_FAILED.
 */
function inputOptional (schema: JsonSchema): boolean {
  return inputAjv().compile(schema)({}) === true
}

/**
 * The declaration file. `namedSchemas` are the manifest's `schemas` as written (references
 * between them kept); by default the compiled ones, whose references are inlined.
 */
export function generateRouterTypes (manifest: Manifest, namedSchemas: Readonly<Record<string, unknown>> = manifest.schemas): string {
  const out: string[] = [
    `// Generated by \`npm run codegen\` from ${manifest.source}. Do not edit: run it again.`,
    '// The tRPC face of the Mantle gateway: createTRPCClient<AppRouter>({ links: [httpBatchLink({ url: \'.../trpc\', maxItems: 50 /* BFF_BATCH_MAX_CALLS */ })] })',
    "import type { TRPCBuiltRouter, TRPCMutationProcedure, TRPCQueryProcedure, TRPCSubscriptionProcedure, TRPC_ERROR_CODE_NUMBER } from '@trpc/server'",
    ''
  ]
  const names = typeNames(Object.keys(namedSchemas))
  for (const [schemaName, schema] of Object.entries(namedSchemas)) {
    const name = names.get(schemaName)!
    const type = toType(schema, '', names)
    const description = (schema as JsonSchema | null)?.description
    const renamed = name === schemaName ? '' : `The manifest's schema ${schemaName} (a name TypeScript reserves or this file uses).`
    const comment = doc({ description: [typeof description === 'string' ? description.trim() : '', renamed].filter(d => d !== '').join(' ') }, '')
    out.push(comment + (objectOnly(schema) && type.startsWith('{') ? `export interface ${name} ${type}` : `export type ${name} = ${type}`), '')
  }
  out.push(
    '/** The contract codes (CONTRACT §5) carried in `error.data.code`. */',
    `export type MantleErrorCode = ${Object.keys(ErrorCodes).filter(c => c !== 'CLIENT_CLOSED').map(quote).join(' | ')}`,
    '',
    'export interface MantleErrorShape {',
    '  message: string',
    '  code: TRPC_ERROR_CODE_NUMBER',
    '  data: {',
    '    code: MantleErrorCode',
    '    /** The status REST answers for the same call. */',
    '    httpStatus: number',
    '    requestId: string',
    '    path?: string',
    '    /** Seconds to wait before trying again, when the refusal asks for it (its Retry-After). */',
    '    retryAfter?: number',
    '  }',
    '}',
    '',
    'interface Root { ctx: object, meta: object, errorShape: MantleErrorShape, transformer: false }',
    '',
    'export type AppRouter = TRPCBuiltRouter<Root, {'
  )
  for (const op of manifest.operations) {
    const input = toType(op.inputDocument, '    ', names)
    const kind = op.type === 'query' ? 'TRPCQueryProcedure' : 'TRPCMutationProcedure'
    const summary = op.summary ?? op.description
    if (summary !== null) out.push(doc({ description: summary }, '  ').trimEnd())
    out.push(`  ${key(op.name)}: ${kind}<{`)
    out.push(`    input: ${input}${inputOptional(op.input) ? ' | void' : ''}`)
    out.push(`    output: ${toType(op.outputDocument, '    ', names)}`)
    out.push('    meta: object', '  }>')
  }
  for (const event of manifest.events) {
    if (event.description !== null) out.push(doc(event, '  ').trimEnd())
    out.push(`  ${key(event.name)}: TRPCSubscriptionProcedure<{`)
    out.push('    input: void')
    out.push(`    output: AsyncIterable<${toType(event.payloadDocument, '    ', names)}, void, any>`)
    out.push('    meta: object', '  }>')
  }
  out.push('}>', '')
  return out.join('\n')
}

/** The manifest's `schemas` as written, for named interfaces that name each other. */
async function rawSchemas (file: string): Promise<Record<string, unknown>> {
  const text = withoutBom(await readFile(file, 'utf8'))
  const doc = (extname(file) === '.json' ? JSON.parse(text) : parseYaml(text)) as { schemas?: Record<string, unknown> }
  return doc.schemas ?? {}
}

/** The CLI: returns the path written. */
export async function codegen (args: string[], env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const { values } = parseArgs({ args, options: { manifest: { type: 'string' }, out: { type: 'string' } }, strict: true })
  const manifestPath = values.manifest ?? (env.BFF_MANIFEST === undefined || env.BFF_MANIFEST === '' ? 'kernel/manifest.yaml' : env.BFF_MANIFEST)
  const outPath = resolve(values.out ?? 'generated/trpc-router.d.ts')
  const manifest = await loadManifestFile(manifestPath)
  await mkdir(dirname(outPath), { recursive: true })
  await writeFile(outPath, generateRouterTypes(manifest, await rawSchemas(manifestPath)))
  return outPath
}

const USAGE = `Usage: npm run codegen -- [--manifest <file>] [--out <file>]
Writes the typed tRPC router declaration of a manifest (--manifest, else BFF_MANIFEST, else
kernel/manifest.yaml) to --out (generated/trpc-router.d.ts).`

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href && !answerHelp(process.argv.slice(2), USAGE)) {
  codegen(process.argv.slice(2)).then(
    out => { console.log(`mantle: wrote ${out}`) },
    (err: Error) => {
      // An option it does not take (node:util's parseArgs) is the command line's fault: exit 2, with the usage.
      if (refusedByParseArgs(err)) refuseUsage('mantle', err.message, USAGE)
      else {
        console.error(`mantle: ${err.message}`)
        process.exitCode = 1
      }
    }
  )
}
