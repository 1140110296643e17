import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Ajv, type ValidateFunction } from 'ajv'
import { addGatewayFormats } from '../../formats.js'
import { compiledOnce } from '../../compiled.js'
import fastJson from 'fast-json-stringify'
import { ownFieldsOnly } from '../../own-properties.js'
import { canonicalJson, longestTimeoutMs, type Manifest, type Operation } from '../../manifest.js'
import { MantleError, describeValidation } from '../../errors.js'
import type { CallContext } from './context.js'
import { addUniqueItems } from './unique-items.js'
import { SCHEMA_MAPS, eachSchemaObject } from '../../schema-walk.js'

export { canonicalJson }

export { type Caller, Leave, callerGone, isSocket, requestOf, watchCaller, unwatchCaller } from './caller.js'
export { CallContext, type AnswerHold, type Protocol, PROTOCOLS, type RiskLevel, type Finding, type CacheOutcome } from './context.js'

export type Next = (ctx: CallContext) => Promise<unknown>
/**
 * A stage runs around the rest of the pipeline. It may answer itself (a cache hit), refuse by
 * throwing a MantleError, or call `next`. Stages that only check are plain functions returning
 * `next(ctx)`, not `async`, so they add no promise of their own.
 */
export type Stage = (ctx: CallContext, next: Next) => Promise<unknown>

export interface StageDefinition {
  name: string
  order: number
  /** Runs once per operation at start-up; `null` when the concern does not apply to it. */
  build: (op: Operation) => Stage | null
}

/** The fixed order of ARCHITECTURE.md: outermost first. */
export const StageOrder = {
  tracing: -10,
  metrics: 0,
  audit: 10,
  identity: 20,
  authorization: 30,
  validation: 40,
  rateLimit: 50,
  idempotency: 60,
  firewall: 70,
  cache: 80
} as const

/**
 * Wraps a stage when the pipeline is compiled (diagnostics time each stage this way). Only set
 * when a plugin asks for it: without one the chain is built exactly as before, at no cost.
 */
export type StageWrapper = (name: string, op: Operation, stage: Stage) => Stage

export interface OperationEntry {
  /** The operation as the manifest in force declares it (a reload may replace its policies). */
  readonly op: Operation
  /** Runs the call; set when the app is ready. May throw synchronously: await it. */
  run: Next
  stages: readonly string[]
  /**
   * The op's output schema, compiled: JSON holding only what the schema declares, for every
   * face. An answer that breaks the schema is the Kernel's fault: KERNEL_ERROR, on every face.
   */
  readonly serialize: (value: unknown) => string
}

export interface Pipeline {
  /** The manifest in force: the start-up one, or the last one a reload applied. */
  readonly manifest: Manifest
  /**
   * The longest operation `timeoutMs` of every manifest in force since start-up: what a call in
   * flight may still take, a call still running on a chain a reload replaced keeping its own
   * deadline (the manifest in force alone let a shutdown's drain cut it after a reload that
   * shortened a timeout).
   */
  readonly longestTimeoutMs: number
  addStage: (definition: StageDefinition) => void
  setTerminal: (factory: (op: Operation) => Next) => void
  /** Wraps every stage, and the Kernel call as the stage `kernel`, at compile time (one wrapper). */
  instrument: (wrapper: StageWrapper) => void
  /** The entry of an operation, stable from registration on, for adapters to hold. */
  entry: (name: string) => OperationEntry
  /**
   * Applies a changed manifest without dropping a call: every operation's chain is built anew
   * beside the old one, then swapped in; calls in flight finish on the chain they started on.
   * Only policies may change (roles, zone, rate limit, cache, firewall, invalidates, timeout):
   * a change to the operations, routes, schemas, docs, events or Kernel settings needs a
   * restart, because faces have compiled routes, types and the OpenAPI document from them. Returns the reasons a
   * manifest was refused (empty when it was applied).
   */
  reload: (next: Manifest) => string[]
}

declare module 'fastify' {
  interface FastifyInstance {
    pipeline: Pipeline
  }
}

const notReady: Next = () => { throw new Error('the pipeline is not compiled yet: the app is not ready') }

export function createPipeline (manifest: Manifest): Pipeline & { compile: () => void } {
  const definitions: StageDefinition[] = [validationStage()]
  let terminal: ((op: Operation) => Next) | null = null
  // Entries are the adapters' handles: stable objects whose op and chain a reload replaces.
  const entries = new Map<string, { op: Operation, run: Next, stages: readonly string[], readonly serialize: (value: unknown) => string }>()
  let wrap: StageWrapper | null = null
  for (const op of manifest.operations) entries.set(op.name, { op, run: notReady, stages: [], serialize: outputSerializer(op) })
  let compiled = false
  let current = manifest
  let longest = longestTimeoutMs(manifest)
  let ordered: StageDefinition[] = []

  return {
    get manifest () { return current },
    get longestTimeoutMs () { return longest },
    addStage (definition) {
      if (compiled) throw new Error(`stage ${definition.name} added after the pipeline was compiled`)
      if (definitions.some(d => d.name === definition.name)) throw new Error(`stage ${definition.name} is added twice`)
      definitions.push(definition)
    },
    setTerminal (factory) {
      if (terminal !== null) throw new Error('the pipeline already has its terminal (the Kernel call)')
      terminal = factory
    },
    instrument (wrapper) {
      if (compiled) throw new Error('the pipeline is instrumented after it was compiled')
      if (wrap !== null) throw new Error('the pipeline is already instrumented')
      wrap = wrapper
    },
    entry (name) {
      const entry = entries.get(name)
      if (entry === undefined) throw new Error(`no operation ${name} in the manifest`)
      return entry
    },
    compile () {
      if (terminal === null) throw new Error('the pipeline has no terminal: register the kernel plugin')
      ordered = [...definitions].sort((a, b) => a.order - b.order)
      for (const entry of entries.values()) {
        const built = chain(entry.op)
        entry.run = built.run
        entry.stages = built.stages
      }
      compiled = true
    },
    reload (next) {
      if (!compiled) return ['the pipeline is not compiled yet']
      const refused = reloadProblems(current, next)
      if (refused.length > 0) return refused
      // Build every chain first: a stage that throws while building leaves the old ones in force.
      const built = next.operations.map(op => ({ op, ...chain(op) }))
      for (const b of built) {
        const entry = entries.get(b.op.name)!
        entry.op = b.op
        entry.run = b.run
        entry.stages = b.stages
      }
      current = next
      longest = Math.max(longest, longestTimeoutMs(next))
      return []
    }
  }

  function chain (op: Operation): { run: Next, stages: readonly string[] } {
    // Optimization: each operation keeps only the stages that apply to it, chained once.
    const stages = ordered.map(d => [d.name, d.build(op)] as const).filter((s): s is readonly [string, Stage] => s[1] !== null)
    const call = terminal!(op)
    const serialize = entries.get(op.name)!.serialize
    // The answer is serialized inside the chain, as its innermost step: one that breaks the
    // output schema is then a KERNEL_ERROR every stage sees (the audit records what the client
    // gets), not a failure after the pipeline has settled.
    const empty = `The Kernel's answer to ${op.name} is empty or null, which its output schema does not admit`
    const mismatch = `The Kernel's answer to ${op.name} does not match its output schema: `
    const conforms = outputValidator(op)
    const deep = mayNestDeep(openedOutput(op))
    const tooDeep = `The Kernel's answer to ${op.name} nests objects and arrays more than ${MAX_ANSWER_DEPTH} levels deep`
    let run: Next = memoized(op, async (ctx) => {
      const value = await call(ctx)
      ctx.answered = true
      if (value === null || value === undefined) {
        // An empty 2xx body reads as null (a 204 or a 205 is answered with no body, whatever the schema).
        if (!op.outputAdmitsNull && ctx.status !== 204 && ctx.status !== 205) throw new MantleError('KERNEL_ERROR', empty)
      } else if (!conforms(value)) {
        // The client is told the field at fault in its own answer; a log line is told the path
        // without the answer's own keys (a map's: e-mail addresses, names), as it never holds a
        // call's input or answer.
        const errors = conforms.errors ?? []
        const subject = { schema: conforms.schema, value }
        throw new MantleError('KERNEL_ERROR', mismatch + describeValidation(errors, 'output', subject), { logDetail: mismatch + describeValidation(errors, 'output', { ...subject, hideDataKeys: true }) })
      }
      if (ctx.json === null) {
        const json = serialize(value)
        // Free-form parts are written as they are: what the client gets is bounded here, on every
        // face, not by where a face serializes it again (GraphQL, a few levels deeper than REST,
        // answered 500 INTERNAL below the depth at which the serializer itself fails).
        if (deep && jsonNestsDeeperThan(json, MAX_ANSWER_DEPTH)) throw new MantleError('KERNEL_ERROR', tooDeep)
        ctx.json = json
      }
      return value
    })
    if (wrap !== null) {
      // The Kernel call is the innermost stage: all of its time is its own.
      const inner = run
      const kernel = wrap('kernel', op, (ctx) => inner(ctx))
      run = (ctx) => kernel(ctx, inner)
    }
    for (let i = stages.length - 1; i >= 0; i--) {
      const stage = wrap === null ? stages[i][1] : wrap(stages[i][0], op, stages[i][1])
      const next = run
      run = (ctx) => stage(ctx, next)
    }
    return { run, stages: Object.freeze(stages.map(s => s[0])) }
  }
}

/** What a reload may not change, because faces compiled routes, types or pools from it. */
export function reloadProblems (current: Manifest, next: Manifest): string[] {
  const problems: string[] = []
  const names = (m: Manifest): string => m.operations.map(o => o.name).sort().join(',')
  if (names(current) !== names(next)) problems.push('operations were added or removed')
  // An operation added or removed has no counterpart to compare: reported just above.
  for (const [key, value] of next.fixed) {
    const was = current.fixed.get(key)
    if (was !== undefined && was !== value) problems.push(`${key} changed`)
  }
  return problems
}

const compiledOutputs = new WeakMap<Operation, ValidateFunction>()

/**
 * The check of a Kernel answer against its operation's output schema, before any face answers
 * it. fast-json-stringify writes what the schema says without checking it: a null for a required
 * string went out as "", 1.5 for an integer as 1, "12" for a number as 12, and a status the
 * schema's enum does not list went out on REST, tRPC and /ws while GraphQL, which checks enums,
 * answered KERNEL_ERROR for the same call. Formats are not checked (a date-time's text costs a
 * regular expression per field, and no face reads it); properties the schema does not declare
 * are dropped by the serializer, not refused (a Kernel may add a field before the manifest
 * names it), `additionalProperties: false` included.
 */
function outputValidator (op: Operation): ValidateFunction {
  let compiled = compiledOutputs.get(op)
  if (compiled === undefined) {
    compiled = answerCheck(openedOutput(op))
    compiledOutputs.set(op, compiled)
  }
  return compiled
}

/**
 * The check of what the Kernel sends (a call's answer, an event's payload) against `opened`, a
 * schema as openSchema leaves it. One Ajv per schema, as for inputs (a shared one keeps each
 * reloaded manifest's schemas). strictNumbers: a `number` admits no Infinity (JSON.parse's
 * reading of 1e400), which the serializer wrote as null where the schema wants a number. Its
 * integers are held to ±(2^53 - 1) (safeIntegers), as an input's are: JSON.parse reads
 * 9007199254740993 as 9007199254740992, and an `integer` id of the Kernel's past the range reached
 * the client as another number, on every face, which it then asked for (another resource).
 */
export function answerCheck (opened: unknown): ValidateFunction {
  return compiledOnce('answer', opened, () => {
    // ownProperties: as for inputs (an answer without an optional `toString` was a 502).
    const ajv = new Ajv({ allErrors: false, strict: false, coerceTypes: false, validateFormats: false, strictNumbers: true, ownProperties: true })
    addUniqueItems(ajv)
    return ajv.compile(safeIntegers(opened) as Record<string, unknown>)
  })
}

/**
 * Where an object's `additionalProperties: false` is kept: where it decides which of several
 * schemas an answer matches (`if`'s branch, how many items `contains` counts, and the branches of
 * a `oneOf` or an `anyOf` of which more than one may hold an object). Opened there, a right
 * answer of a `oneOf` of closed objects matched two branches and was refused. A `oneOf` or an
 * `anyOf` with one object among its branches (a nullable object, `anyOf: [{...}, {type: null}]`)
 * is opened: closing it decides nothing. Elsewhere opening one only admits more (`allOf`,
 * properties, items).
 */
const choosing: Apart = (keyword, schema) => {
  if (keyword === 'if' || keyword === 'contains') return true
  if (keyword !== 'oneOf' && keyword !== 'anyOf') return false
  const branches = schema[keyword] as unknown[]
  return branches.filter(mayHoldObject).length > 1
}

/** Whether a schema may admit an object: any but one whose `type` names no object (or `false`). */
function mayHoldObject (schema: unknown): boolean {
  if (schema === false) return false
  if (schema === null || typeof schema !== 'object') return true
  const type = (schema as { type?: unknown }).type
  if (type === undefined) return true
  return Array.isArray(type) ? type.includes('object') : type === 'object'
}

const openedOutputs = new WeakMap<Operation, unknown>()

/**
 * The output schema as the check and the serializer both read it: its objects opened, but where
 * they choose (`choosing`). One schema for both: the serializer picks an `anyOf` branch by its
 * own schemas, and refused (a 502 naming no field) an answer the check passed.
 */
function openedOutput (op: Operation): unknown {
  let opened = openedOutputs.get(op)
  if (opened === undefined) {
    opened = openSchema(op.output)
    openedOutputs.set(op, opened)
  }
  return opened
}

/** A schema of what the Kernel sends with its objects opened, but where they choose (see `choosing`): for its check and its serializer both. */
export function openSchema (schema: unknown): unknown {
  return mapSchema(schema, openObject, choosing)
}

/** A schema that admits properties it does not declare (the serializer drops them). */
function openObject (s: Readonly<Record<string, unknown>>): Readonly<Record<string, unknown>> {
  if (s.additionalProperties !== false && s.unevaluatedProperties !== false) return s
  const open: Record<string, unknown> = { ...s }
  if (open.additionalProperties === false) delete open.additionalProperties
  if (open.unevaluatedProperties === false) delete open.unevaluatedProperties
  return open
}

function outputSerializer (op: Operation): (value: unknown) => string {
  const opened = openedOutput(op)
  const compiled = ownFieldsOnly(opened, compiledOnce('serializer', opened, () => fastJson(opened as Parameters<typeof fastJson>[0])))
  return (value) => {
    if (value === null || value === undefined) return 'null'
    try {
      return compiled(value)
    } catch {
      throw new MantleError('KERNEL_ERROR', `The Kernel's answer does not match the output schema of ${op.name}`)
    }
  }
}

/**
 * Within one request that carries several calls, identical query calls share one Kernel call:
 * the memo is keyed by operation and canonical input (the tenant is the request's own).
 * Mutations always reach the Kernel. Each call sharing it gets what the first call's context
 * holds of the answer: the Kernel's status (a Kernel 204 was a 502 KERNEL_ERROR for the others,
 * their null answer checked as a 200's) and its JSON, serialized once (50 copies of one 9.5 MB
 * answer in one batch).
 */
function memoized (op: Operation, call: Next): Next {
  if (op.type !== 'query') return call
  return (ctx) => {
    const memo = ctx.memo
    if (memo === null) return call(ctx)
    const key = op.name + '\u0000' + canonicalJson(ctx.input)
    let shared = memo.get(key) as Promise<{ value: unknown, status: number, json: string | null }> | undefined
    if (shared === undefined) {
      shared = call(ctx).then(value => ({ value, status: ctx.status, json: ctx.json }))
      memo.set(key, shared)
    }
    return shared.then(answer => {
      ctx.status = answer.status
      ctx.answered = true
      ctx.json = answer.json
      return answer.value
    })
  }
}

interface InputValidators {
  validate: ValidateFunction
  /**
   * The same schema with its integer fields held to the safe range, run only on an input that
   * holds an integer beyond it (inputFault finds those on its walk): it can only refuse.
   */
  safe: ValidateFunction | null
}

/**
 * An operation's compiled input validators, kept for as long as the operation lives: a
 * manifest's operations are frozen, so every gateway built on one shares them (compiling them
 * was half the CPU time of a gateway's build, and a test process builds a gateway per test).
 * Keyed by the operation itself: a reloaded manifest's are new objects, and the validators of
 * one no longer held go with it.
 */
const compiledInputs = new WeakMap<Operation, InputValidators>()

/** The Ajv an input is checked with (codegen asks it whether a call may leave its input out). */
export function inputAjv (): Ajv {
  // ownProperties: a field named as a member of Object.prototype (`toString`, `constructor`) was
  // read from the prototype when left out, and the call refused ("input.toString must be string").
  const ajv = new Ajv({ allErrors: false, strict: false, coerceTypes: false, useDefaults: true, ownProperties: true })
  addGatewayFormats(ajv)
  // uniqueItems in one pass: Ajv's compares every pair of items (unique-items.ts).
  addUniqueItems(ajv)
  return ajv
}

function inputValidators (op: Operation): InputValidators {
  let compiled = compiledInputs.get(op)
  if (compiled === undefined) {
    // An Ajv per schema: an instance keeps every schema it compiled (its cache and its scope of
    // values), so a shared one would keep each reloaded manifest's for good.
    compiled = compiledOnce('input', op.input, () => {
      const bounded = safeIntegers(op.input)
      // The copy held to safe integers in an Ajv of its own: it keeps the schema's `$id`, which
      // one Ajv takes once ("schema with key or id ... already exists": the gateway did not start).
      return { validate: inputAjv().compile(op.input), safe: bounded === op.input ? null : inputAjv().compile(bounded as typeof op.input) }
    })
    compiledInputs.set(op, compiled)
  }
  return compiled
}

/** Input validation is not a switchable concern: every face validates with the op's compiled schema. */
function validationStage (): StageDefinition {
  return {
    name: 'validation',
    order: StageOrder.validation,
    build (op) {
      const { validate, safe } = inputValidators(op)
      const defaults = declaresDefault(op.input)
      return (ctx, next) => {
        if (ctx.refusal !== null) throw ctx.refusal
        const given: unknown = ctx.input
        if (typeof given !== 'object' || given === null || Array.isArray(given)) throw new MantleError('VALIDATION_FAILED', 'The input must be a JSON object')
        if (ctx.idempotencyKey === null) throw new MantleError('VALIDATION_FAILED', 'The Idempotency-Key must be 1 to 255 visible ASCII characters (a batch call\'s id, appended to it, visible ASCII too)')
        // The schema's defaults go into the call's own copy: the face's object may be another
        // call's too (GraphQL hands every field that names one variable the same value), and a
        // mutation of one document got the defaults of the field before it, another operation's.
        const input = defaults ? copyInput(given as Record<string, unknown>) : given
        ctx.input = input as Record<string, unknown>
        if (!validate(input)) throw new MantleError('VALIDATION_FAILED', describeValidation(validate.errors ?? [], 'input', { schema: validate.schema, value: input }))
        const fault = inputFault(input)
        if (fault === UNSAFE_INTEGER) {
          if (safe !== null && !safe(input)) throw new MantleError('VALIDATION_FAILED', describeValidation(safe.errors ?? [], 'input', { schema: safe.schema, value: input }))
        } else if (fault !== null) throw new MantleError('VALIDATION_FAILED', fault)
        return next(ctx)
      }
    }
  }
}

/**
 * Whether a schema declares a `default` anywhere (a property so named counts too: it only costs
 * a copy), which Ajv's useDefaults then writes into the input.
 */
export function declaresDefault (schema: unknown): boolean {
  let found = false
  eachSchemaObject(schema, '', node => { if (Object.hasOwn(node, 'default')) found = true })
  return found
}

/**
 * A copy of a parsed input, its objects and arrays each copied, keys in their order (`__proto__`
 * as an own key, as JSON.parse keeps it: the validation stage refuses it). Iterative: the input's
 * depth is checked after its schema.
 */
export function copyInput (input: Record<string, unknown>): Record<string, unknown> {
  const stack: Array<[from: object, to: Record<string, unknown> | unknown[]]> = []
  const take = (value: unknown): unknown => {
    if (value === null || typeof value !== 'object') return value
    const to = Array.isArray(value) ? [] : {}
    stack.push([value, to])
    return to
  }
  const root = take(input) as Record<string, unknown>
  while (stack.length > 0) {
    const [from, to] = stack.pop()!
    if (Array.isArray(from)) {
      const list = to as unknown[]
      for (let i = 0; i < from.length; i++) list.push(take(from[i]))
    } else {
      const record = to as Record<string, unknown>
      for (const key of Object.keys(from)) {
        const value = take((from as Record<string, unknown>)[key])
        if (key === '__proto__') Object.defineProperty(record, key, { value, writable: true, enumerable: true, configurable: true })
        else record[key] = value
      }
    }
  }
  return root
}

const NON_FINITE = 'The input holds a number out of range: numbers must be finite'

/** The keywords under which a schema holds other schemas (one, a list, or a map of them). */
const ONE = ['items', 'additionalProperties', 'if', 'then', 'else', 'contains', 'propertyNames', 'unevaluatedItems', 'unevaluatedProperties'] as const
const LISTS = ['allOf', 'anyOf', 'oneOf', 'prefixItems'] as const

/**
 * `schema` with its integers held to what a JavaScript number carries exactly, ±(2^53 - 1), or
 * `schema` itself when it has no integer field. JSON.parse and REST's coercion read
 * 1234567890123456789 as 1234567890123456800, which the Kernel then got, for another resource (a
 * GET answered another item, a DELETE removed it). The validation stage runs it, after the
 * schema itself, on an input holding an integer beyond the range: a field declared `integer`
 * with one is refused (VALIDATION_FAILED, naming the bound) rather than rounded. Only where
 * `integer` is the schema's one numeric type (a `number` may be any finite value); not under
 * `not`, where a bound would only admit more; a `default` beyond the range keeps its field's
 * bound at it (the manifest's own value, inserted by the stage).
 */
export function safeIntegers (schema: unknown): unknown {
  return mapSchema(schema, (s) => {
    const types = Array.isArray(s.type) ? s.type : [s.type]
    if (!types.includes('integer') || types.includes('number')) return s
    const d = typeof s.default === 'number' ? s.default : 0
    return {
      ...s,
      maximum: Math.min(typeof s.maximum === 'number' ? s.maximum : Infinity, Math.max(Number.MAX_SAFE_INTEGER, d)),
      minimum: Math.max(typeof s.minimum === 'number' ? s.minimum : -Infinity, Math.min(Number.MIN_SAFE_INTEGER, d))
    }
  })
}

/** Whether mapSchema leaves alone what `keyword` of `schema` holds. */
type Apart = (keyword: string, schema: Readonly<Record<string, unknown>>) => boolean

/**
 * `schema` with `visit` applied to each schema in it, innermost first (not under `not`, where a
 * change would turn its meaning over, nor where `apart` says), or `schema` itself where `visit`
 * changed nothing.
 */
function mapSchema (schema: unknown, visit: (s: Readonly<Record<string, unknown>>) => Readonly<Record<string, unknown>>, apart: Apart = () => false): unknown {
  if (schema === null || typeof schema !== 'object') return schema
  if (Array.isArray(schema)) {
    const list = schema.map(sub => mapSchema(sub, visit, apart))
    return list.every((x, i) => x === schema[i]) ? schema : list
  }
  const node = schema as Record<string, unknown>
  const s = { ...node }
  let changed = false
  const put = (k: string, v: unknown): void => { if (v !== s[k]) { s[k] = v; changed = true } }
  for (const k of ONE) if (k in s && !apart(k, node)) put(k, mapSchema(s[k], visit, apart))
  for (const k of LISTS) if (Array.isArray(s[k]) && !apart(k, node)) put(k, mapSchema(s[k], visit, apart))
  for (const k of SCHEMA_MAPS) {
    const map = s[k]
    if (map === null || typeof map !== 'object' || Array.isArray(map) || apart(k, node)) continue
    const entries = Object.entries(map).map(([name, sub]) => [name, mapSchema(sub, visit, apart)] as const)
    if (entries.some(([name, sub]) => sub !== (map as Record<string, unknown>)[name])) put(k, Object.fromEntries(entries))
  }
  const mine = changed ? s : schema as Record<string, unknown>
  const visited = visit(mine)
  return visited === mine && !changed ? schema : visited
}

/** inputFault's answer for an input whose only fault may be an integer beyond ±(2^53 - 1): the schema decides (safeIntegers). */
export const UNSAFE_INTEGER = 'The input holds an integer beyond what a JavaScript number carries exactly'
const PROTOTYPE = 'The input contains a forbidden prototype property'
/** How deeply objects and arrays may nest in an input: what goes after (the Kernel request's JSON, the keys of the cache, idempotency and batch memo) recurses. */
export const MAX_INPUT_DEPTH = 256
const TOO_DEEP = `The input nests objects and arrays more than ${MAX_INPUT_DEPTH} levels deep`
/** inputFault's mark for a text or key holding a lone surrogate; illFormed names it. */
const ILL_FORMED = Symbol('ill-formed')

/**
 * What is wrong with a parsed input that its schema admits, or null. A number that is not finite:
 * JSON.parse reads 1e400 as Infinity, which the schema's `number` admits and JSON cannot carry on
 * to the Kernel (it would arrive as null, or as the text "Infinity"). A `__proto__` key, or a
 * `constructor` holding a `prototype`: JSON.parse keeps them as own keys, and an upstream that
 * merges the input into an object would take them as its prototype (REST's parser refuses such
 * a body, as secure-json-parse does: every face refuses it here). Nesting deeper than
 * MAX_INPUT_DEPTH: 40 KB of nested arrays in a free-form field overflowed the stack of the steps
 * after this one (a 500). An integer-valued number beyond ±(2^53 - 1): UNSAFE_INTEGER, once no
 * other fault is found (whether it is refused is its schema's: a `number` field may hold it).
 * A text or a key that is not well-formed UTF-16 (a lone surrogate, JSON's "x\ud800"), which
 * UTF-8 cannot carry: put in the Kernel's path it was a 500 (encodeURIComponent throws), in its
 * query string U+FFFD (another input), while REST's path and query string cannot hold one at all.
 * Iterative itself: the work is one step per value, bounded by the body limit.
 */
export function inputFault (input: object): string | null {
  const fault = walk(input)
  return fault === ILL_FORMED ? illFormed(input) : fault
}

function walk (input: object): string | typeof ILL_FORMED | null {
  const stack: unknown[] = [input]
  const depths: number[] = [1]
  let unsafe = false
  while (stack.length > 0) {
    const value = stack.pop()
    const depth = depths.pop()!
    if (typeof value === 'string') {
      if (!value.isWellFormed()) return ILL_FORMED
    } else if (typeof value === 'number') {
      if (!Number.isFinite(value)) return NON_FINITE
      if (!Number.isSafeInteger(value) && Number.isInteger(value)) unsafe = true
    } else if (value !== null && typeof value === 'object') {
      if (depth > MAX_INPUT_DEPTH) return TOO_DEEP
      if (Array.isArray(value)) {
        for (const v of value) {
          stack.push(v)
          depths.push(depth + 1)
        }
      } else {
        for (const k in value) {
          const v = (value as Record<string, unknown>)[k]
          if (k === '__proto__' || (k === 'constructor' && v !== null && typeof v === 'object' && Object.hasOwn(v, 'prototype'))) return PROTOTYPE
          if (!k.isWellFormed()) return ILL_FORMED
          stack.push(v)
          depths.push(depth + 1)
        }
      }
    }
  }
  return unsafe ? UNSAFE_INTEGER : null
}

/**
 * Whether objects and arrays nest in `value` more than `max` levels deep (a top-level object is
 * one level). Iterative, and it stops at the first value past `max`: JSON.parse reads any depth
 * without recursing, but what serializes a value again (JSON.stringify, a face's serializer)
 * recurses, and overflows the stack a few thousand levels down.
 */
export function nestsDeeperThan (value: unknown, max: number): boolean {
  if (value === null || typeof value !== 'object') return false
  const stack: unknown[] = [value]
  const depths: number[] = [1]
  while (stack.length > 0) {
    const v = stack.pop() as object
    const depth = depths.pop()!
    if (depth > max) return true
    if (Array.isArray(v)) {
      for (const item of v) {
        if (item !== null && typeof item === 'object') {
          stack.push(item)
          depths.push(depth + 1)
        }
      }
    } else {
      for (const k in v) {
        const item = (v as Record<string, unknown>)[k]
        if (item !== null && typeof item === 'object') {
          stack.push(item)
          depths.push(depth + 1)
        }
      }
    }
  }
  return false
}

/**
 * How deeply objects and arrays may nest in what the Kernel sends on (an answer as the output
 * schema shapes it, an event's payload): twice an input's bound, so that an input the Kernel
 * keeps and gives back inside an answer or a list still passes. Deeper, what serializes it again
 * after the output check (GraphQL's answer, a few levels deeper than REST's) overflowed the stack,
 * a 500 INTERNAL, a few thousand levels down.
 */
export const MAX_ANSWER_DEPTH = 2 * MAX_INPUT_DEPTH

/**
 * Whether objects and arrays nest in the JSON `text` more than `max` levels deep. A scan of its
 * characters (strings skipped): one pass, no recursion, nothing allocated; a text shorter than
 * two characters a level is not read.
 */
export function jsonNestsDeeperThan (text: string, max: number): boolean {
  if (text.length <= 2 * max) return false
  let depth = 0
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c === 0x22) {
      // A string: to its closing quote, over escaped characters.
      for (i++; i < text.length; i++) {
        const d = text.charCodeAt(i)
        if (d === 0x5c) i++
        else if (d === 0x22) break
      }
    } else if (c === 0x7b || c === 0x5b) {
      if (++depth > max) return true
    } else if (c === 0x7d || c === 0x5d) depth--
  }
  return false
}

/**
 * Whether what the serializer writes under `schema` may nest deeper than the schema itself: it
 * writes a value as it is (JSON.stringify) where the schema leaves it free (no type, an array
 * without items, an object's additionalProperties or patternProperties that are), and only what
 * the schema declares elsewhere (an object's undeclared properties are dropped, `$ref`s are
 * inlined and never cyclic). Errs towards yes: a keyword it does not weigh makes it say yes.
 * Checked once per operation or event: one whose schema is closed pays nothing per answer.
 */
export function mayNestDeep (schema: unknown): boolean {
  if (schema === false) return false
  if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) return true
  const s = schema as Record<string, unknown>
  // A value the check passed equals one of the manifest's literals.
  if ('const' in s || 'enum' in s) return false
  for (const keyword of ['$ref', 'if', 'then', 'else', 'dependentSchemas', 'dependencies', 'unevaluatedProperties', 'unevaluatedItems', 'prefixItems', 'contains', 'additionalItems']) {
    if (keyword in s && s[keyword] !== false) return true
  }
  const parts = [s.anyOf, s.oneOf, s.allOf].filter((p): p is unknown[] => Array.isArray(p))
  if (parts.some(list => list.some(mayNestDeep))) return true
  if (s.type === undefined) return parts.length === 0
  const types = Array.isArray(s.type) ? s.type as unknown[] : [s.type]
  if (types.includes('object')) {
    const properties = (s.properties ?? {}) as Record<string, unknown>
    if (Object.values(properties).some(mayNestDeep)) return true
    if (s.additionalProperties !== undefined && mayNestDeep(s.additionalProperties)) return true
    if (s.patternProperties !== undefined && Object.values(s.patternProperties as Record<string, unknown>).some(mayNestDeep)) return true
  }
  if (types.includes('array')) {
    const items = s.items
    if (items === undefined || (Array.isArray(items) ? items.some(mayNestDeep) : mayNestDeep(items))) return true
  }
  return false
}

/** Where a value sits in the input: its key or index, under its parent's. */
interface Place { up: Place | null, key: string }

/**
 * The refusal of an input that walk found a lone surrogate in, naming its field as Ajv's
 * refusals do (`input.tags.1`). Only for such an input: the walk that found it keeps no path.
 * This one visits the values in walk's order, so it stops where walk stopped, within its depth.
 */
function illFormed (input: object): string {
  const stack: Array<[unknown, Place | null]> = [[input, null]]
  const name = (at: Place | null): string => {
    const keys: string[] = []
    for (let p = at; p !== null; p = p.up) keys.push(p.key)
    return ['input', ...keys.reverse()].join('.')
  }
  while (stack.length > 0) {
    const [value, at] = stack.pop()!
    if (typeof value === 'string') {
      if (!value.isWellFormed()) return `${name(at)} must be well-formed Unicode text: it holds a lone surrogate`
    } else if (value !== null && typeof value === 'object') {
      if (Array.isArray(value)) {
        value.forEach((v, i) => { stack.push([v, { up: at, key: String(i) }]) })
      } else {
        for (const k in value) {
          if (!k.isWellFormed()) return `${name(at)} has a key that is not well-formed Unicode text: it holds a lone surrogate`
          stack.push([(value as Record<string, unknown>)[k], { up: at, key: k }])
        }
      }
    }
  }
  return 'The input holds a text that is not well-formed Unicode'
}

async function pipelinePlugin (app: FastifyInstance, opts: { manifest: Manifest }): Promise<void> {
  const pipeline = createPipeline(opts.manifest)
  app.decorate('pipeline', pipeline)
  app.addHook('onReady', async () => { pipeline.compile() })
}

export default fp(pipelinePlugin, { name: 'mantle-pipeline', fastify: '5.x' })
