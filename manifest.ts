import { readFile, stat } from 'node:fs/promises'
import type { Stats } from 'node:fs'
import { extname } from 'node:path'
import { parse as parseYaml, parseDocument } from 'yaml'
import { Ajv } from 'ajv'
import { addGatewayFormats } from './formats.js'
import { compiledByText } from './compiled.js'
import { backtrackingFaults } from './manifest-patterns.js'
import { eachSchemaObject, keywordPath } from './schema-walk.js'
import { ManifestSchema, type ManifestDocument, type OperationDocument, type Zone } from './schemas/manifest.js'
import { urlProblemOf } from './schemas/config.js'
import { carriesRole } from './plugins/auth/claims.js'

// The manifest is the one place operations are declared. This module turns the document into
// frozen Operation objects, or throws one ManifestError naming the manifest path of each fault.

export type JsonSchema = Record<string, unknown>
export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE'

export interface Operation {
  readonly name: string
  readonly index: number
  readonly type: 'query' | 'mutation'
  /** REST: the method and the Fastify path under /api/v1, e.g. `/agents/:id`. */
  readonly method: HttpMethod
  readonly path: string
  readonly pathParams: readonly string[]
  /** REST: input comes from the body (POST, PUT, PATCH) or the query string (GET, DELETE). */
  readonly inputInBody: boolean
  readonly kernel: { readonly method: HttpMethod, readonly path: string, readonly pathParams: readonly string[], readonly sendsBody: boolean }
  /** `$ref`s resolved; the document's own form is kept beside it for faces that name types. */
  readonly input: JsonSchema
  readonly output: JsonSchema
  readonly inputDocument: JsonSchema
  readonly outputDocument: JsonSchema
  /**
   * Whether the output schema admits null: else a Kernel 2xx with an empty body, or with the
   * JSON null, is not an answer of the operation (KERNEL_ERROR), except a 204.
   */
  readonly outputAdmitsNull: boolean
  readonly roles: readonly string[]
  readonly zone: Zone
  /** `ttlSeconds` null: the gateway's BFF_CACHE_TTL applies. `scope` user: an answer is the asking user's alone. */
  readonly cache: { readonly ttlSeconds: number | null, readonly swrSeconds: number, readonly tags: readonly string[], readonly scope: 'tenant' | 'user' } | null
  readonly rateLimit: { readonly max: number, readonly windowMs: number } | null
  readonly firewall: { readonly fields: readonly string[], readonly action: 'block' | 'redact' | 'monitor' } | null
  readonly invalidates: readonly string[]
  readonly timeoutMs: number
  readonly summary: string | null
  readonly description: string | null
  readonly deprecated: boolean
}

export interface EventDefinition {
  readonly name: string
  readonly topic: string
  readonly payload: JsonSchema
  readonly payloadDocument: JsonSchema
  readonly roles: readonly string[]
  /** The lowest zone a subscriber's token must reach, as an operation's (defaults.zone, else public). */
  readonly zone: Zone
  readonly description: string | null
}

/**
 * The failure-rate rule (opt-in, kernel.circuitBreaker.failureRate): over the last `windowMs`,
 * once at least `minimumCalls` attempts have ended and `failureRate` of them or more failed, the
 * breaker opens. A Kernel failing most calls but never `threshold` in a row (every other one; or
 * two in three, fail, fail, pass, behind a round-robin balancer with one healthy replica of
 * three) never opened a breaker that counts consecutive failures only.
 */
export interface FailureRateRule {
  readonly failureRate: number
  readonly minimumCalls: number
  readonly windowMs: number
}

export interface BreakerSettings {
  readonly threshold: number
  readonly resetTimeoutMs: number
  /** null: consecutive failures only. */
  readonly rate?: FailureRateRule | null
}

export interface KernelSettings {
  readonly url: string
  readonly connections: number
  readonly timeoutMs: number
  readonly retries: number
  readonly circuitBreaker: BreakerSettings
  readonly maxInFlight: number
}

export interface Manifest {
  readonly source: string
  readonly kernel: KernelSettings
  readonly schemas: Readonly<Record<string, JsonSchema>>
  readonly operations: readonly Operation[]
  readonly byName: ReadonlyMap<string, Operation>
  readonly events: readonly EventDefinition[]
  /**
   * What a reload may not change (plugins/pipeline, reloadProblems), as canonical JSON taken
   * when the manifest was compiled: `operations.<name>.<type|rest|kernel|input|output>`,
   * `events`, `schemas`, `kernel settings`. Taken then because the libraries that compile the
   * schemas may rewrite them in place (fast-json-stringify sorts a `type` array).
   */
  readonly fixed: ReadonlyMap<string, string>
}

/** The longest `timeoutMs` of the manifest's operations (0 without any): what a call in flight may still take. */
export function longestTimeoutMs (manifest: Manifest): number {
  let longest = 0
  for (const op of manifest.operations) longest = Math.max(longest, op.timeoutMs)
  return longest
}

/** JSON with object keys sorted, so `{a,b}` and `{b,a}` are the same input. */
export function canonicalJson (value: unknown): string {
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const flat = flatObjectJson(value as Record<string, unknown>)
    if (flat !== null) return flat
  }
  // Iterative, not recursive: uniqueItems (unique-items.ts) writes each item so before the
  // input's depth is checked, and an item nested 100,000 levels deep overflowed the stack.
  let out = ''
  const stack: Array<string | { value: unknown }> = [{ value }]
  while (stack.length > 0) {
    const top = stack.pop()!
    if (typeof top === 'string') {
      out += top
      continue
    }
    const v = top.value
    if (v === null || typeof v !== 'object') {
      out += JSON.stringify(v) ?? 'null'
    } else if (Array.isArray(v)) {
      stack.push(']')
      for (let i = v.length - 1; i >= 0; i--) {
        stack.push({ value: v[i] })
        if (i > 0) stack.push(',')
      }
      out += '['
    } else {
      const record = v as Record<string, unknown>
      const keys = Object.keys(record).filter(k => record[k] !== undefined).sort()
      stack.push('}')
      for (let i = keys.length - 1; i >= 0; i--) {
        stack.push({ value: record[keys[i]] })
        stack.push((i > 0 ? ',' : '') + JSON.stringify(keys[i]) + ':')
      }
      out += '{'
    }
  }
  return out
}

/**
 * canonicalJson of an object none of whose values is an object or array (most calls' inputs,
 * `{"id":"a1"}`, and an audit entry's metadata), written in one pass: the general walk's stack
 * of pieces took 2 to 3 times as long (a cache key and an audit hash on every call). The same
 * text as the walk writes; null for any other object.
 */
function flatObjectJson (record: Record<string, unknown>): string | null {
  const keys = Object.keys(record)
  for (let i = 0; i < keys.length; i++) {
    const v = record[keys[i]]
    if (v !== null && typeof v === 'object') return null
  }
  keys.sort()
  let out = '{'
  for (let i = 0; i < keys.length; i++) {
    const v = record[keys[i]]
    if (v === undefined) continue
    out += (out.length === 1 ? '' : ',') + JSON.stringify(keys[i]) + ':' + (JSON.stringify(v) ?? 'null')
  }
  return out + '}'
}

export class ManifestError extends Error {
  readonly faults: readonly string[]
  constructor (source: string, faults: string[]) {
    super(`Invalid manifest ${source}:\n  - ${faults.join('\n  - ')}`)
    this.name = 'ManifestError'
    this.faults = faults
  }
}

/** Paths the gateway serves itself under /api/v1; an operation may not take them. */
const RESERVED_REST = new Set(['POST /batch'])
/** Procedure names tRPC's router refuses (they are a function's own: a proxy's `then`, `call`, `apply`). */
const TRPC_RESERVED = new Set(['then', 'call', 'apply'])
/** Schema ids the gateway registers with Fastify itself: one in a manifest's schema clashed at start-up. */
const GATEWAY_SCHEMA_IDS = new Set(['Problem'])
const NAME = /^[A-Za-z_][A-Za-z0-9_]*$/
const SCHEMA_REF = /^#\/schemas\/([A-Za-z_][A-Za-z0-9_]*)$/

const ajv = new Ajv({ allErrors: true, strict: false })
const validateDocument = ajv.compile(ManifestSchema)
// A second Ajv, strict about JSON Schema itself, checks each declared schema compiles.
// One per manifest compiled: an Ajv instance keeps every schema it compiled (its cache and its
// scope of values), so one that lived as long as the process would keep each reloaded
// manifest's schemas for good.
function schemaChecker (): Ajv {
  const checker = new Ajv({ strict: true, strictRequired: false, allowUnionTypes: true, strictTypes: false, allErrors: true })
  addGatewayFormats(checker)
  checker.addVocabulary(['example', 'externalDocs', 'xml'])
  return checker
}

/** The longest event topic, in characters (code points): POST /internal/events takes no longer one. */
export const MAX_TOPIC_LENGTH = 256

/** How long a manifest file must stay unchanged to be read as written whole (a reload's read). */
export const SETTLE_MS = 250
/** Reads of a file that keeps changing before a reload gives up on it. */
const SETTLE_READS = 8

/**
 * The file's text once it has stayed unchanged (its inode, size and mtime) for `settleMs` after
 * its read: a file written in place and read between two writes is often a valid manifest, cut
 * short (before the last operation's `roles`, it was applied with none, open to every caller).
 * One changed since its read is read again. Always a wait after the read: a file whose mtime
 * looked older than `settleMs` was read at once, and an mtime is the file system's clock, not
 * this process's (a file server, a container's bind mount behind by seconds stamped a file
 * being written as long settled). Only a regular file: the read of a FIFO waited for a writer,
 * for ever, and every reload asked for after it waited behind it.
 */
async function readSettled (file: string, settleMs: number): Promise<string> {
  const same = (a: Stats, b: Stats): boolean => a.ino === b.ino && a.dev === b.dev && a.size === b.size && a.mtimeMs === b.mtimeMs
  for (let read = 0; read < SETTLE_READS; read++) {
    const before = await stat(file)
    if (!before.isFile()) throw new Error('not a regular file: a reload reads a file written whole')
    const text = await readFile(file, 'utf8')
    await new Promise(resolve => setTimeout(resolve, settleMs))
    if (same(before, await stat(file))) return text
  }
  throw new Error(`it kept changing while it was read (${SETTLE_READS} reads, ${settleMs} ms apart): write the new manifest beside it, then rename it into place`)
}

/**
 * Loads and compiles a manifest file. With `settleMs` (a reload's read), the file is read once
 * it has stayed unchanged that long (readSettled).
 */
export async function loadManifestFile (file: string, options: { settleMs?: number } = {}): Promise<Manifest> {
  let text: string
  try {
    text = options.settleMs === undefined ? await readFile(file, 'utf8') : await readSettled(file, options.settleMs)
  } catch (err) {
    throw new ManifestError(file, [`cannot be read: ${(err as Error).message}`])
  }
  text = withoutBom(text)
  let doc: unknown
  try {
    doc = extname(file) === '.json' ? JSON.parse(text) : parseYaml(text, { prettyErrors: true })
  } catch (err) {
    throw new ManifestError(file, [`is not valid ${extname(file) === '.json' ? 'JSON' : 'YAML'}: ${(err as Error).message.split('\n')[0]}`])
  }
  // JSON.parse keeps the last of a key given twice in one object: a merge that left an
  // operation twice, the first with `roles: [admin]`, opened it to every caller. YAML's parser
  // refuses a repeated key; a JSON text is read by it too (JSON is YAML 1.2) to find one, when
  // the text names more keys than the parsed document holds (YAML's parse of a JSON text costs
  // 50 times JSON's, on every start and reload).
  if (extname(file) === '.json' && keysIn(text) !== membersOf(doc)) {
    const repeated = parseDocument(text, { prettyErrors: true, uniqueKeys: true }).errors.find(e => e.code === 'DUPLICATE_KEY')
    if (repeated !== undefined) throw new ManifestError(file, [`gives a key twice in one object (JSON would keep the last silently): ${repeated.message.split('\n')[0].replace(/:$/, '')}`])
  }
  // YAML has values JSON has not (`.inf`, `.nan`; under `%YAML 1.1`, a timestamp, binary, a set):
  // a schema holding one was compiled, and misread (a `default: 2024-01-01` of a string field,
  // a Date, refused every call that left the field out: "input.since must be string").
  const notJson = nonJsonValues(doc, '')
  if (notJson.length > 0) throw new ManifestError(file, notJson)
  const manifest = compileManifest(doc, file)
  const faults = await backtrackingFaults(manifest)
  if (faults.length > 0) throw new ManifestError(file, faults)
  return manifest
}

/**
 * A manifest's text without the byte order mark an editor may write first (Windows' Notepad
 * does): JSON.parse refused such a JSON manifest, "Unexpected token '\uFEFF'", the character
 * invisible in the message (RFC 8259 §8.1 lets a parser ignore it; YAML's does).
 */
export function withoutBom (text: string): string {
  return text.charCodeAt(0) === 0xfeff ? text.slice(1) : text
}

/** Faults for the values of a parsed document that are no JSON values (YAML's), at their manifest paths; at most 20. */
function nonJsonValues (value: unknown, at: string, faults: string[] = []): string[] {
  if (faults.length >= 20) return faults
  const where = at === '' ? '(root)' : at
  if (typeof value === 'number' && !Number.isFinite(value)) faults.push(`${where}: ${String(value)} is not a JSON number (a manifest holds JSON values only)`)
  else if (Array.isArray(value)) value.forEach((v, i) => nonJsonValues(v, at === '' ? String(i) : `${at}.${i}`, faults))
  else if (value !== null && typeof value === 'object') {
    const proto = Object.getPrototypeOf(value) as unknown
    if (proto !== Object.prototype && proto !== null) faults.push(`${where}: a ${(value as object).constructor?.name ?? 'value'} is not a JSON value (a YAML 1.1 timestamp, binary or set: write it as a string or an array)`)
    else for (const [k, v] of Object.entries(value)) nonJsonValues(v, at === '' ? k : `${at}.${k}`, faults)
  } else if (typeof value !== 'string' && typeof value !== 'boolean' && typeof value !== 'number' && value !== null) faults.push(`${where}: a ${typeof value} is not a JSON value`)
  return faults
}

/** The keys a JSON text names: each string followed, past whitespace, by a colon. */
function keysIn (text: string): number {
  let keys = 0
  for (let i = 0; i < text.length; i++) {
    if (text.charCodeAt(i) !== 34) continue
    // A string: to its closing quote (a backslash escapes the next character).
    for (i++; i < text.length && text.charCodeAt(i) !== 34; i++) if (text.charCodeAt(i) === 92) i++
    let j = i + 1
    while (j < text.length && (text[j] === ' ' || text[j] === '\n' || text[j] === '\r' || text[j] === '\t')) j++
    if (text[j] === ':') keys++
  }
  return keys
}

/** The members of every object in a parsed JSON document. */
function membersOf (value: unknown): number {
  if (value === null || typeof value !== 'object') return 0
  let n = 0
  if (Array.isArray(value)) {
    for (const v of value) n += membersOf(v)
    return n
  }
  for (const v of Object.values(value)) n += 1 + membersOf(v)
  return n
}

const dotted = (instancePath: string): string => instancePath.replace(/^\//, '').split('/').map(s => s.replace(/~1/g, '/').replace(/~0/g, '~')).join('.')

/** Validates a parsed manifest document and builds the frozen catalog. */
export function compileManifest (doc: unknown, source = 'manifest'): Manifest {
  // Unknown keys alone leave a document the checks below can read (they read only the keys they
  // know): they are named with those checks' faults, in one message, as README says. A misspelt
  // key (rateLimt) was named alone, the other faults one start-up later.
  const shapeErrors = validateDocument(doc) ? [] : validateDocument.errors ?? []
  const unknownKey = (e: typeof shapeErrors[number]): string => {
    const at = dotted(e.instancePath)
    return `${at === '' ? '' : at + '.'}${String(e.params.additionalProperty)}: unknown key`
  }
  const unknownKeysOnly = shapeErrors.every(e => e.keyword === 'additionalProperties')
  if (!unknownKeysOnly) {
    const faults = shapeErrors.filter(e => e.keyword !== 'anyOf' && e.keyword !== 'const').map(e => {
      const at = dotted(e.instancePath)
      if (e.keyword === 'additionalProperties') return unknownKey(e)
      if (e.keyword === 'required') return `${at === '' ? '' : at + '.'}${String(e.params.missingProperty)}: is required`
      return `${at === '' ? '(root)' : at}: ${e.message ?? 'is invalid'}`
    })
    const unions = shapeErrors.filter(e => e.keyword === 'anyOf' || e.keyword === 'const')
    for (const e of unions) {
      const at = dotted(e.instancePath)
      if (e.keyword === 'const' && at === 'version') faults.push('version: must be 1')
      else if (e.keyword === 'anyOf') faults.push(`${at}: must be one of the allowed values`)
    }
    throw new ManifestError(source, [...new Set(faults)])
  }
  const m = doc as ManifestDocument
  const faults: string[] = [...new Set(shapeErrors.map(unknownKey))]
  let made: Ajv | undefined
  const checker = (): Ajv => {
    made ??= schemaChecker()
    return made
  }
  const schemas = m.schemas ?? {}

  for (const name of Object.keys(schemas)) {
    if (!NAME.test(name)) faults.push(`schemas.${name}: the name must match ${NAME.source}`)
    // JSON.parse and YAML keep it as an own key, but it is an object's prototype wherever the
    // gateway stores the named schemas by name (a plain object's `__proto__` is its prototype).
    else if (name === '__proto__') faults.push(`schemas.${name}: __proto__ cannot name a schema`)
  }
  // Each named schema is checked at its own path, its references read as any value (each is
  // checked at its own): a fault of one was reported at every operation and event using it, in
  // Ajv's words from there (`operations.a.output: ... data/properties/name/type ...`), and one
  // that none used was never checked. A use of one found invalid inlines {}: its fault is said once.
  const anySchema = Object.fromEntries(Object.keys(schemas).map(name => [name, {}]))
  const invalid = new Set<string>()
  for (const [name, schema] of Object.entries(schemas)) {
    if (name === '__proto__' || !NAME.test(name)) continue
    // Without its own $id, as each use inlines it (resolveRefs); one holding an `$id` further in
    // on a checker of its own, as the operations' checker refuses an `$id` it has compiled once.
    const { $id: _id, ...own } = resolveRefs(schema, anySchema, `schemas.${name}`, [], [])
    if (checkSchema(JSON.stringify(own).includes('"$id"') ? schemaChecker : checker, own, `schemas.${name}`, faults) === null) invalid.add(name)
  }
  const usable = Object.fromEntries(Object.entries(schemas).map(([name, schema]) => [name, invalid.has(name) ? {} : schema]))
  // Resolve named schemas first, so a cycle or a missing ref is reported once, at its place.
  const resolvedSchemas: Record<string, JsonSchema> = {}
  for (const [name, schema] of Object.entries(schemas)) {
    if (name === '__proto__') continue
    const resolved = resolveRefs(schema, usable, `schemas.${name}`, faults, [name])
    resolvedSchemas[name] = invalid.has(name) ? {} : resolved
  }

  const defaults = m.defaults ?? {}
  checkRoles(defaults.roles, 'defaults.roles', faults)
  const kernelTimeout = m.kernel.timeoutMs ?? 5000
  const operations: Operation[] = []
  const routes = new Map<string, string>()
  let index = 0
  for (const [name, op] of Object.entries(m.operations)) {
    const at = `operations.${name}`
    if (!NAME.test(name)) faults.push(`${at}: the operation name must match ${NAME.source} (it is a tRPC procedure and a GraphQL field)`)
    else if (name.startsWith('__')) faults.push(`${at}: an operation name may not begin with __ (GraphQL reserves it for introspection, and the operation is a GraphQL field)`)
    if (TRPC_RESERVED.has(name)) faults.push(`${at}: ${name} cannot name a tRPC procedure (tRPC reserves then, call and apply)`)
    checkRoles(op.roles, `${at}.roles`, faults)
    const built = buildOperation(name, index++, op, at, resolvedSchemas, defaults, kernelTimeout, faults, checker)
    if (built === null) continue
    // Routes as Fastify tells them apart: it ignores a trailing slash (`GET /a/` is `GET /a`).
    const route = `${built.method} ${built.path.length > 1 ? built.path.replace(/\/+$/, '') : built.path}`
    // A parameter's name is not part of the route (`/a/:id` and `/a/:key` are one), the text
    // beside it in its segment is: Fastify serves `/a/:id` and `/a/:id.json` apart (both were
    // refused as one route, `/a/:`).
    const routeKey = route.replace(/:[A-Za-z_][A-Za-z0-9_]*/g, ':')
    const seen = routes.get(routeKey)
    if (seen !== undefined) faults.push(`${at}.rest: duplicate REST route ${op.rest} (also ${seen}.rest)`)
    else routes.set(routeKey, at)
    if (RESERVED_REST.has(route)) faults.push(`${at}.rest: ${op.rest} is reserved by the gateway`)
    operations.push(built)
  }

  const events: EventDefinition[] = []
  for (const [name, ev] of Object.entries(m.events ?? {})) {
    const at = `events.${name}`
    if (!NAME.test(name)) faults.push(`${at}: the event name must match ${NAME.source}`)
    else if (name.startsWith('__')) faults.push(`${at}: an event name may not begin with __ (GraphQL reserves it for introspection, and the event is a GraphQL subscription field)`)
    if (Object.hasOwn(m.operations, name)) faults.push(`${at}: an operation has the same name`)
    // An event is a tRPC subscription procedure, in the same router as the operations.
    if (TRPC_RESERVED.has(name)) faults.push(`${at}: ${name} cannot name a tRPC subscription (tRPC reserves then, call and apply)`)
    checkRoles(ev.roles, `${at}.roles`, faults)
    // POST /internal/events refuses a longer topic: the manifest loaded, and every post of its events was a 400.
    // (Counted in code points, as Ajv's maxLength counts them.)
    if ([...ev.topic].length > MAX_TOPIC_LENGTH) faults.push(`${at}.topic: ${JSON.stringify(ev.topic)} is longer than ${MAX_TOPIC_LENGTH} characters, more than POST /internal/events takes, so no event of it could be posted`)
    const payload = resolveRefs(ev.payload, resolvedSchemas, `${at}.payload`, faults, [])
    checkSchema(checker, payload, `${at}.payload`, faults)
    events.push(Object.freeze({ name, topic: ev.topic, payload, payloadDocument: ev.payload, roles: Object.freeze([...(ev.roles ?? defaults.roles ?? [])]), zone: ev.zone ?? defaults.zone ?? 'public', description: ev.description ?? null }))
  }

  // The pattern checks the URL's shape only: a port past 65535 (or not a number) stopped
  // start-up later, in the Kernel client, with a bare "Invalid URL" that named nothing, and
  // port 0 was taken (every call then failed), where KERNEL_URL refuses both.
  const kernelUrl = urlProblemOf('KERNEL_URL', m.kernel.url)
  if (kernelUrl !== null) faults.push(`kernel.url: ${kernelUrl}`)

  const breaker = m.kernel.circuitBreaker
  if (breaker !== undefined && breaker.failureRate === undefined) {
    for (const key of ['minimumCalls', 'windowMs'] as const) {
      if (breaker[key] !== undefined) faults.push(`kernel.circuitBreaker.${key}: needs failureRate (it belongs to the failure-rate rule)`)
    }
  }

  if (faults.length > 0) throw new ManifestError(source, faults)

  const kernel: KernelSettings = Object.freeze({
    url: m.kernel.url.replace(/\/$/, ''),
    connections: m.kernel.connections ?? 128,
    timeoutMs: kernelTimeout,
    retries: m.kernel.retries ?? 2,
    circuitBreaker: Object.freeze({
      threshold: breaker?.threshold ?? 5,
      resetTimeoutMs: breaker?.resetTimeoutMs ?? 30000,
      rate: breaker?.failureRate === undefined ? null : Object.freeze({ failureRate: breaker.failureRate, minimumCalls: breaker.minimumCalls ?? 20, windowMs: breaker.windowMs ?? 10_000 })
    }),
    maxInFlight: m.kernel.maxInFlight ?? 1024
  })
  const fixed = new Map<string, string>()
  for (const op of operations) {
    const at = `operations.${op.name}`
    fixed.set(`${at}.type`, op.type)
    fixed.set(`${at}.rest`, `${op.method} ${op.path}`)
    fixed.set(`${at}.kernel`, canonicalJson(op.kernel))
    fixed.set(`${at}.input`, canonicalJson([op.input, op.inputDocument]))
    fixed.set(`${at}.output`, canonicalJson([op.output, op.outputDocument]))
    // The OpenAPI document is built from these once, at start-up: a reload that changed them
    // was applied, and the document went on showing the old ones.
    fixed.set(`${at}.docs (summary, description, deprecated)`, canonicalJson([op.summary, op.description, op.deprecated]))
  }
  // An event's roles apart: one that has none of its own takes defaults.roles, and a reload that
  // changed only those was refused as 'events changed', naming nothing the operator had edited.
  // Its zone too, which one without its own takes from defaults.zone.
  fixed.set('events', canonicalJson(events.map(({ roles: _roles, zone: _zone, ...rest }) => rest)))
  for (const ev of events) {
    fixed.set(`events.${ev.name}.roles (an event without roles of its own takes defaults.roles; subscriptions hold theirs)`, canonicalJson(ev.roles))
    fixed.set(`events.${ev.name}.zone (an event without a zone of its own takes defaults.zone; subscriptions hold theirs)`, ev.zone)
  }
  fixed.set('schemas', canonicalJson(resolvedSchemas))
  fixed.set('kernel settings', canonicalJson(kernel))
  return Object.freeze({
    source,
    kernel,
    schemas: Object.freeze(resolvedSchemas),
    operations: Object.freeze(operations),
    byName: new Map(operations.map(o => [o.name, o])),
    events: Object.freeze(events),
    fixed
  })
}

function buildOperation (
  name: string, index: number, op: OperationDocument, at: string, schemas: Record<string, JsonSchema>,
  defaults: NonNullable<ManifestDocument['defaults']>, kernelTimeout: number, faults: string[], checker: () => Ajv
): Operation | null {
  const before = faults.length
  const [method, path] = op.rest.split(' ') as [HttpMethod, string]
  const [kMethod, kPath] = op.kernel.split(' ') as [HttpMethod, string]
  const inputDocument = op.input ?? { type: 'object', properties: {}, additionalProperties: false }
  const input = resolveRefs(inputDocument, schemas, `${at}.input`, faults, [])
  const output = resolveRefs(op.output, schemas, `${at}.output`, faults, [])
  checkSchema(checker, input, `${at}.input`, faults)
  const outputCheck = checkSchema(checker, output, `${at}.output`, faults)
  checkGatewayIds(input, `${at}.input`, faults)
  checkGatewayIds(output, `${at}.output`, faults)
  if (input.type !== 'object') faults.push(`${at}.input: must be a schema of type object (its properties are the call's arguments)`)
  const props = (input.properties ?? {}) as Record<string, JsonSchema>
  const declared = new Set(Object.keys(props))

  const pathParams = [...path.matchAll(/:([A-Za-z_][A-Za-z0-9_]*)/g)].map(x => x[1])
  if (/:(?![A-Za-z_])/.test(path)) faults.push(`${at}.rest: a path parameter needs a name`)
  // Fastify's router (find-my-way) ends a parameter's name only at '/', '-', '.' or the end of
  // the path: `/:a:b` or `/:a~b` is one parameter to it ("a:b", "a~b") and two or one other to
  // us, and every call to the route was refused ("input.a is required").
  for (const m of path.matchAll(/:([A-Za-z_][A-Za-z0-9_]*)([^/.-]?)/g)) {
    if (m[2] !== '') faults.push(`${at}.rest: path parameter :${m[1]} in ${path} is followed by '${m[2]}': a parameter ends at '/', '-', '.' or the end of the path`)
  }
  for (const p of pathParams) {
    if (!declared.has(p)) faults.push(`${at}.rest: path parameter :${p} is not declared in ${at}.input.properties`)
  }
  // One input property has one value: `/a/:id/:id` sent the Kernel the last segment only.
  for (const p of new Set(pathParams)) {
    if (pathParams.indexOf(p) !== pathParams.lastIndexOf(p)) faults.push(`${at}.rest: path parameter :${p} appears twice`)
  }
  // The Kernel, or a proxy before it, resolves a `.` or `..` segment: the call would reach another
  // route than the one written (a parameter's are refused when a call makes one, plugins/kernel).
  if (kPath.split('/').some(s => s === '.' || s === '..')) faults.push(`${at}.kernel: a '.' or '..' segment, which the Kernel or a proxy before it resolves to another path`)
  // The same on the REST side: browsers, fetch and curl resolve one before they send the request
  // (RFC 3986 §5.2.4), so no client reached the route as written (GET /a/./b was asked as /a/b).
  if (path.split('/').some(s => s === '.' || s === '..')) faults.push(`${at}.rest: a '.' or '..' segment, which clients resolve before sending (the route could not be reached)`)
  // A brace outside a `{name}` would reach the Kernel as it is.
  if (/[{}]/.test(kPath.replace(/\{[^{}]*\}/g, ''))) faults.push(`${at}.kernel: a { or } outside a {name}`)
  const kernelParams = [...kPath.matchAll(/\{([^}]*)\}/g)].map(x => x[1])
  for (const p of kernelParams) {
    if (!declared.has(p)) faults.push(`${at}.kernel: path parameter {${p}} is not declared in ${at}.input.properties`)
  }
  const required = new Set(Array.isArray(input.required) ? input.required as string[] : [])
  for (const p of new Set([...pathParams, ...kernelParams])) {
    if (declared.has(p) && !required.has(p)) faults.push(`${at}.input.required: path parameter ${p} must be required`)
  }
  const inputInBody = method === 'POST' || method === 'PUT' || method === 'PATCH'
  const kernelBody = kMethod === 'POST' || kMethod === 'PUT' || kMethod === 'PATCH'
  // The query string carries only scalars and arrays of scalars, on either side: the REST face's
  // (a GET or DELETE route) and the Kernel call's (a GET or DELETE, whose input the client puts
  // in the query string). Before, only the first was checked: an object field of a POST route
  // served by a Kernel GET reached the Kernel as "[object Object]" (and {"toString": 1} was a 500).
  for (const [prop, schema] of Object.entries(props)) {
    // A property that is no schema (YAML's `limit:` with nothing after it is null) is a fault of
    // the schema check's own; read on, it stopped start-up with a bare TypeError.
    if (schema === null || typeof schema !== 'object') continue
    if (!inputInBody && !pathParams.includes(prop) && !isQueryable(schema)) {
      faults.push(`${at}.input.properties.${prop}: ${method} takes its input from the query string, which carries only scalars and arrays of scalars`)
    } else if (!kernelBody && !kernelParams.includes(prop) && !isQueryable(schema)) {
      faults.push(`${at}.input.properties.${prop}: the Kernel call (${kMethod}) takes its input from the query string, which carries only scalars and arrays of scalars`)
    }
    if ((pathParams.includes(prop) || kernelParams.includes(prop)) && !isScalar(schema)) {
      faults.push(`${at}.input.properties.${prop}: a path parameter is a scalar (string, number, integer or boolean)`)
    }
  }
  if (op.type === 'query' && method !== 'GET' && method !== 'POST') {
    faults.push(`${at}.rest: a query is served by GET, or by POST when its input needs a body`)
  }
  if (op.type === 'mutation' && method === 'GET') faults.push(`${at}.rest: a mutation cannot be served by GET`)
  if (op.cache !== undefined && op.type !== 'query') faults.push(`${at}.cache: only queries are cached`)
  const tags = [...(op.cache?.tags ?? []), ...(op.invalidates ?? [])]
  for (const tag of tags) {
    for (const [, p] of tag.matchAll(/\{([^}]*)\}/g)) {
      if (!declared.has(p)) faults.push(`${at}: tag "${tag}" uses {${p}}, which is not declared in ${at}.input.properties`)
    }
  }
  for (const f of op.firewall?.fields ?? []) {
    if (!declared.has(f)) faults.push(`${at}.firewall.fields: ${f} is not declared in ${at}.input.properties`)
    else if (!mayHoldText(props[f])) faults.push(`${at}.firewall.fields: ${f} never holds a string (nor an array or object, whose strings would be scanned), and the firewall scans strings only`)
  }
  // Only a change invalidates: beside a query's cache its `invalidates` was never applied, and
  // without one it dropped the tags on every read.
  if (op.invalidates !== undefined && op.type !== 'mutation') faults.push(`${at}.invalidates: only a mutation invalidates`)
  if (faults.length > before) return null
  const rateLimit = op.rateLimit ?? defaults.rateLimit

  return Object.freeze({
    name,
    index,
    type: op.type,
    method,
    path,
    pathParams: Object.freeze(pathParams),
    inputInBody,
    kernel: Object.freeze({ method: kMethod, path: kPath, pathParams: Object.freeze(kernelParams), sendsBody: kMethod === 'POST' || kMethod === 'PUT' || kMethod === 'PATCH' }),
    input,
    output,
    inputDocument,
    outputDocument: op.output,
    outputAdmitsNull: outputCheck!.admitsNull,
    roles: Object.freeze([...(op.roles ?? defaults.roles ?? [])]),
    zone: op.zone ?? defaults.zone ?? 'public',
    cache: op.cache === undefined ? null : Object.freeze({ ttlSeconds: op.cache.ttlSeconds ?? null, swrSeconds: op.cache.swrSeconds ?? 0, tags: Object.freeze([...(op.cache.tags ?? [])]), scope: op.cache.scope ?? 'tenant' }),
    rateLimit: rateLimit === undefined ? null : Object.freeze({ max: rateLimit.max, windowMs: rateLimit.windowMs }),
    firewall: op.firewall === undefined ? null : Object.freeze({ fields: Object.freeze([...op.firewall.fields]), action: op.firewall.action }),
    invalidates: Object.freeze([...(op.invalidates ?? [])]),
    timeoutMs: op.timeoutMs ?? defaults.timeoutMs ?? kernelTimeout,
    summary: op.summary ?? null,
    description: op.description ?? null,
    deprecated: op.deprecated ?? false
  })
}

/**
 * Faults for the roles no token can carry: identity refuses a token whose role has a comma,
 * spaces around it, a character outside Latin-1's visible ones or more than 256 of them (roles
 * travel to the Kernel as x-user-roles), so no caller ever held such a role, and an operation
 * or event that named only it (`roles: ["viewer, editor"]`) was refused 403 to every caller.
 */
function checkRoles (roles: readonly string[] | undefined, at: string, faults: string[]): void {
  roles?.forEach((role, i) => {
    if (!carriesRole(role)) {
      faults.push(`${at}.${i}: ${JSON.stringify(role)} is a role no token can carry (a role is visible characters, at most 256, without a comma or spaces around it), so no caller would hold it`)
    }
  })
}

function isScalar (s: JsonSchema): boolean {
  const t = s.type
  const types = Array.isArray(t) ? t : [t]
  if (s.enum !== undefined || s.const !== undefined) return true
  return t !== undefined && types.every(x => x === 'string' || x === 'integer' || x === 'number' || x === 'boolean' || x === 'null')
}

function isQueryable (schema: JsonSchema): boolean {
  if (isScalar(schema)) return true
  return schema.type === 'array' && typeof schema.items === 'object' && schema.items !== null && isScalar(schema.items as JsonSchema)
}

/** What the manifest's strict check learnt of a schema that compiled. */
interface Checked { admitsNull: boolean }

/**
 * `schema` compiled by the manifest's strict checker (made at its first use), or null with a
 * fault. A schema compiled by an earlier manifest of the process is not compiled again
 * (compiledByText), but one with an `$id`: the checker refuses an `$id` that two schemas of the
 * manifest give, which it sees only by compiling both.
 */
function checkSchema (checker: () => Ajv, schema: JsonSchema, at: string, faults: string[]): Checked | null {
  try {
    // What is kept is what was learnt, not the validator: that one closes over the manifest's
    // checker, which holds every schema the manifest compiled (kept past the manifest's life).
    const compile = (): Checked => ({ admitsNull: checker().compile(schema)(null) })
    const text = JSON.stringify(schema)
    return text.includes('"$id"') ? compile() : compiledByText('declared', text, compile)
  } catch (err) {
    faults.push(...refusedSchema(schema, at, (err as Error).message))
    return null
  }
}

/**
 * The faults of a schema Ajv refused with `message`, each where it is. Ajv names an unknown
 * keyword (a misspelt one: maxLenght) without saying where, and stops at the first pattern that is
 * no regular expression, also without saying where: the keyword is named at the schema holding
 * it (operations.a.input.properties.name), and every such pattern (and patternProperties name)
 * at its own path, not all at the whole schema's, one per start.
 */
function refusedSchema (schema: JsonSchema, at: string, message: string): string[] {
  const unknown = /^strict mode: unknown keyword: "(.*)"$/.exec(message)
  if (unknown !== null) return [`${keywordPath(schema, at, unknown[1]) ?? at}: not a valid JSON Schema: ${message}`]
  const patterns: string[] = []
  if (message.startsWith('Invalid regular expression')) {
    const check = (source: string, where: string): void => {
      try {
        // As Ajv compiles a pattern (its unicodeRegExp, on by default).
        RegExp(source, 'u')
      } catch (err) {
        patterns.push(`${where}: not a valid JSON Schema: ${(err as Error).message}`)
      }
    }
    eachSchemaObject(schema, at, (node, where) => {
      if (typeof node.pattern === 'string') check(node.pattern, `${where}.pattern`)
      const named = node.patternProperties
      if (named !== null && typeof named === 'object' && !Array.isArray(named)) for (const name of Object.keys(named)) check(name, `${where}.patternProperties`)
    })
  }
  return patterns.length > 0 ? patterns : [`${at}: not a valid JSON Schema: ${message}`]
}

/** Whether a field may hold a string, or an array or object (the firewall scans the strings in it): its `type` admits one, or it has none. */
function mayHoldText (schema: JsonSchema): boolean {
  // Not a schema (YAML's `prompt:` with nothing after it is null): checkSchema said so.
  if (schema === null || typeof schema !== 'object') return true
  const type = schema.type
  const text = (t: unknown): boolean => t === 'string' || t === 'array' || t === 'object'
  return type === undefined || text(type) || (Array.isArray(type) && type.some(text))
}

/**
 * Faults for an `$id` of a schema the gateway registers itself, anywhere in `schema` as it
 * reaches Fastify (resolved: a named schema's own `$id` is gone once inlined).
 */
function checkGatewayIds (schema: unknown, at: string, faults: string[]): void {
  eachSchemaObject(schema, at, (node, where) => {
    if (typeof node.$id === 'string' && GATEWAY_SCHEMA_IDS.has(node.$id)) faults.push(`${where}.$id: "${node.$id}" is the id of a schema of the gateway's own`)
  })
}

/**
 * Inlines `{ $ref: "#/schemas/Name" }` with a copy of the named schema. A missing name or a
 * cycle is a fault at the path where it is used.
 */
function resolveRefs (node: unknown, schemas: Record<string, JsonSchema>, at: string, faults: string[], stack: string[]): JsonSchema {
  const walk = (value: unknown, path: string, names: string[]): unknown => {
    if (Array.isArray(value)) return value.map((v, i) => walk(v, `${path}.${i}`, names))
    if (value === null || typeof value !== 'object') return value
    const obj = value as Record<string, unknown>
    if (typeof obj.$ref === 'string') {
      const match = SCHEMA_REF.exec(obj.$ref)
      if (match === null) {
        faults.push(`${path}.$ref: "${obj.$ref}" must have the form #/schemas/Name`)
        return {}
      }
      // Only a declared schema: `#/schemas/toString` (or constructor, __proto__) found
      // Object.prototype's member, and a $ref to no schema was read as `{}`.
      const target = Object.hasOwn(schemas, match[1]) ? schemas[match[1]] : undefined
      if (target === undefined) {
        faults.push(`${path}.$ref: "${obj.$ref}" names a schema that is not declared in schemas`)
        return {}
      }
      if (names.includes(match[1])) {
        faults.push(`${path}.$ref: "${obj.$ref}" is cyclic (${[...names, match[1]].join(' -> ')}), which the faces cannot express`)
        return {}
      }
      const { $ref: _ignored, ...rest } = obj
      // Without its $id: a copy is inlined wherever the schema is used, and an $id declared twice
      // made Ajv refuse the second use (a named schema with an $id could serve one operation only).
      // Only #/schemas/ references exist, so nothing resolves against it.
      const { $id: _id, ...resolved } = walk(target, path, [...names, match[1]]) as Record<string, unknown>
      return Object.keys(rest).length === 0 ? resolved : { ...resolved, ...(walk(rest, path, names) as Record<string, unknown>) }
    }
    const out: Record<string, unknown> = {}
    for (const [k, v] of Object.entries(obj)) {
      // JSON.parse and YAML keep it as an own key, but assigned here it set the copy's prototype:
      // the key was lost, and the schema read as another (a property named so made the input's
      // `properties` read as the property's schema: "data/properties/type must be object,boolean").
      if (k === '__proto__') faults.push(`${path}.__proto__: __proto__ cannot be a key in a schema (it is an object's prototype wherever the gateway copies the schema)`)
      else out[k] = walk(v, `${path}.${k}`, names)
    }
    return out
  }
  return walk(node, at, stack) as JsonSchema
}
