import {
  GraphQLSchema, GraphQLObjectType, GraphQLInputObjectType, GraphQLEnumType, GraphQLScalarType, GraphQLList, GraphQLNonNull,
  GraphQLString, GraphQLInt, GraphQLFloat, GraphQLBoolean, valueFromASTUntyped, printSchema, isInputObjectType, isListType, isNonNullType, getNamedType,
  type GraphQLOutputType, type GraphQLInputType, type GraphQLFieldConfigMap, type GraphQLFieldConfigArgumentMap,
  type GraphQLInputFieldConfigMap, type GraphQLFieldResolver
} from 'graphql'
import type { EventDefinition, JsonSchema, Manifest, Operation } from '../../manifest.js'
import { canonicalJson } from '../../plugins/pipeline/index.js'
import { inheritedName } from '../../own-properties.js'

/*
 * The GraphQL schema is generated from the manifest, one rule per case (README.md in this
 * folder says the same for users):
 *
 *  1. Roots. Each query is a `Query` field, each mutation a `Mutation` field, each event a
 *     `Subscription` field, named as the operation or event. Root fields are nullable, so one
 *     failed call nulls its own field and not the whole answer. A manifest without queries gets
 *     `Query { _: Boolean }` (GraphQL needs a query type). The manifest refuses an op or event
 *     whose name starts with `__` (reserved by GraphQL), so every one is a field here.
 *  2. Arguments. The properties of an op's input become the field's arguments. When one of
 *     them is not a valid GraphQL name, or the input declares none and does not refuse others
 *     (a map: `additionalProperties` a schema, `patternProperties`, or no
 *     `additionalProperties: false`), the field takes a single `input: JSON` argument instead.
 *     An argument given as `null` is dropped when its schema does not accept null (GraphQL
 *     clients send null for "unset"; `{}` accepts it), and so is an input object's field, at every level; every
 *     argument is then validated by the pipeline as REST.
 *  3. Named types. A `schemas` entry that is an object becomes an object type of the same name
 *     for outputs and an input type `<Name>Input` for inputs; a string enum keeps its name for
 *     both. An inline schema identical to a named one is that named type.
 *  4. Generated names. An inline object or enum is named after where it sits: an op's output
 *     `<Op>Output`, an event payload `<Event>Payload`, an argument `<Op><Arg>` and a property
 *     `<Parent><Property>` (PascalCase); input objects end in `Input`. Array items take the
 *     array's name. A name already taken gets a number (`Agent2`).
 *  5. Nullability. Required properties and required arguments are non-null (`!`), unless their
 *     schema accepts null: `type: [X, 'null']`, an enum listing null, or `anyOf`/`oneOf` of X and
 *     `{ type: 'null' }`. Array items are non-null unless their schema accepts null.
 *  6. Scalars. string → String (every format stays String), number → Float, boolean → Boolean,
 *     integer → Int when `minimum`/`maximum` keep it within 32 bits, else Float (GraphQL's Int is
 *     32-bit; Float carries every integer up to 2^53 exactly, and input is still checked as an
 *     integer by the pipeline).
 *  7. Enums. A string enum whose values are all valid GraphQL enum names becomes an enum type;
 *     otherwise it is a String.
 *  8. Lists. An array with one `items` schema is a list of that type.
 *  9. JSON. Whatever GraphQL cannot express is the `JSON` scalar, whose value is passed as is:
 *     a schema without `type`, several types, `oneOf`/`anyOf`/`allOf`/`not`, an object without
 *     properties, with `additionalProperties` allowed or `patternProperties`, an array without
 *     `items` or with tuple items, and an object with a property name that is not a valid
 *     GraphQL name (such as the demo's `x-request-id`): the whole object is JSON, so the answer
 *     is exactly the op's shaped output, keys and all.
 * 10. Descriptions. An op's `summary` and `description`, an event's `description`, a schema's or
 *     property's `description` become GraphQL descriptions; a `deprecated` op is `@deprecated`.
 */

const NAME = /^[_A-Za-z][_0-9A-Za-z]*$/
const RESERVED = ['Query', 'Mutation', 'Subscription', 'JSON', 'String', 'Int', 'Float', 'Boolean', 'ID']
const INT32_MIN = -2147483648
const INT32_MAX = 2147483647

/** A valid GraphQL name that GraphQL does not reserve (`__*` is for introspection). */
export const isGraphqlName = (name: string): boolean => NAME.test(name) && !name.startsWith('__')

export const JSONScalar = new GraphQLScalarType({
  name: 'JSON',
  description: 'Any JSON value, passed as is. Used where GraphQL types cannot express the schema.',
  serialize: (value) => value,
  parseValue: (value) => value,
  parseLiteral: (ast, variables) => valueFromASTUntyped(ast, variables)
})

export interface SchemaResolvers {
  /** The resolver of an op's root field; `toInput` turns the field's arguments into the op's input. */
  operation: (op: Operation, toInput: (args: Record<string, unknown>) => Record<string, unknown>) => GraphQLFieldResolver<unknown, any>
  /** The source stream of an event's Subscription field. */
  subscribe: (event: EventDefinition) => GraphQLFieldResolver<unknown, any>
}

type Kind =
  | { kind: 'scalar', type: GraphQLScalarType }
  | { kind: 'enum', values: string[] }
  | { kind: 'list', items: JsonSchema }
  | { kind: 'object', properties: Record<string, JsonSchema>, required: Set<string> }

const pascal = (s: string): string => s.replace(/[^A-Za-z0-9]+(.)?/g, (_m, c: string | undefined) => (c ?? '').toUpperCase()).replace(/^./, c => c.toUpperCase())

/** Accepts null, and the schema that remains once null is set aside. */
function splitNull (schema: JsonSchema): { schema: JsonSchema, nullable: boolean } {
  let nullable = false
  let s = schema
  for (const key of ['anyOf', 'oneOf'] as const) {
    const branches = s[key]
    if (!Array.isArray(branches)) continue
    const rest = (branches as JsonSchema[]).filter(b => !(b !== null && typeof b === 'object' && b.type === 'null' && Object.keys(b).length === 1))
    if (rest.length === branches.length) continue
    nullable = true
    const { [key]: _dropped, ...others } = s
    // Only `X | null` with nothing else beside it is X; a wider union stays a union (JSON).
    s = rest.length === 1 && Object.keys(others).every(k => k === 'description') ? { ...(rest[0]), ...others } : { ...others, [key]: rest }
  }
  if (Array.isArray(s.type) && s.type.includes('null')) {
    nullable = true
    const types = (s.type as string[]).filter(t => t !== 'null')
    s = { ...s, type: types.length === 1 ? types[0] : types }
  }
  if (Array.isArray(s.enum) && s.enum.includes(null)) {
    nullable = true
    s = { ...s, enum: s.enum.filter(v => v !== null) }
  }
  if (s.nullable === true) nullable = true
  return { schema: s, nullable }
}

/** Keywords that may keep null out of a schema's values: a schema with none of them (`{}`) admits null as any value. */
const TYPE_KEYWORDS = ['type', 'enum', 'const', '$ref', 'not', 'allOf', 'anyOf', 'oneOf', 'if']

/**
 * Whether a null given for `schema` is kept (rule 2): the schema accepts null (rule 5), or says
 * nothing of its values' type. Dropped, `meta: null` for a `meta: {}` (clear it, in a PATCH)
 * reached the Kernel as no `meta` at all, where REST sent it null.
 */
function keepsNull (schema: JsonSchema): boolean {
  return splitNull(schema).nullable || TYPE_KEYWORDS.every(k => schema[k] === undefined)
}

function fitsInt32 (s: JsonSchema): boolean {
  const low = typeof s.minimum === 'number' ? s.minimum : typeof s.exclusiveMinimum === 'number' ? s.exclusiveMinimum : -Infinity
  const high = typeof s.maximum === 'number' ? s.maximum : typeof s.exclusiveMaximum === 'number' ? s.exclusiveMaximum : Infinity
  return low >= INT32_MIN && high <= INT32_MAX
}

const UNEXPRESSIBLE = ['oneOf', 'anyOf', 'allOf', 'not', 'if', 'patternProperties', 'prefixItems', '$ref']

/** What a (null-free) schema is in GraphQL terms (rules 6 to 9). */
function classify (s: JsonSchema): Kind {
  const json: Kind = { kind: 'scalar', type: JSONScalar }
  if (UNEXPRESSIBLE.some(k => s[k] !== undefined)) return json
  if (Array.isArray(s.enum)) {
    const values = s.enum
    if (values.length > 0 && values.every(v => typeof v === 'string' && isGraphqlName(v) && v !== 'true' && v !== 'false' && v !== 'null')) {
      return { kind: 'enum', values: [...new Set(values as string[])] }
    }
    if (values.every(v => typeof v === 'string')) return { kind: 'scalar', type: GraphQLString }
  }
  const type = Array.isArray(s.type) && s.type.length === 1 ? s.type[0] : s.type
  switch (type) {
    case 'string': return { kind: 'scalar', type: GraphQLString }
    case 'boolean': return { kind: 'scalar', type: GraphQLBoolean }
    case 'number': return { kind: 'scalar', type: GraphQLFloat }
    case 'integer': return { kind: 'scalar', type: fitsInt32(s) ? GraphQLInt : GraphQLFloat }
    case 'array':
      return s.items !== null && typeof s.items === 'object' && !Array.isArray(s.items) ? { kind: 'list', items: s.items as JsonSchema } : json
    case 'object': {
      const properties = (s.properties ?? {}) as Record<string, JsonSchema>
      const names = Object.keys(properties)
      const open = s.additionalProperties !== undefined && s.additionalProperties !== false
      if (names.length === 0 || open || !names.every(isGraphqlName)) return json
      return { kind: 'object', properties, required: new Set(Array.isArray(s.required) ? s.required as string[] : []) }
    }
    default: return json
  }
}

/** Builds GraphQL types from JSON Schemas, once per manifest, naming them by rules 3 and 4. */
class TypeFactory {
  private readonly taken = new Set<string>(RESERVED)
  /** Named schemas by their resolved form, so an inlined `$ref` finds its name again. */
  private readonly namedByShape = new Map<string, string>()
  private readonly typeNames = new Map<string, string>()
  private readonly outputs = new Map<string, GraphQLOutputType>()
  private readonly inputs = new Map<string, GraphQLInputType>()
  private readonly enums = new Map<string, GraphQLEnumType>()

  constructor (private readonly manifest: Manifest) {
    for (const [name, schema] of Object.entries(manifest.schemas)) {
      const kind = classify(splitNull(schema).schema).kind
      if (kind !== 'object' && kind !== 'enum') continue
      const shape = canonicalJson(schema)
      if (!this.namedByShape.has(shape)) this.namedByShape.set(shape, name)
      this.typeNames.set(name, this.claim(name))
    }
  }

  /** A free type name: `base`, else `base2`, `base3`... */
  claim (base: string): string {
    // A GraphQL name never begins with a digit (pascal drops `_1x`'s underscore: `1xOutput`) nor
    // with `__`, GraphQL's own: such a manifest stopped the start with GraphQL's error.
    let name = /^[0-9]/.test(base) ? '_' + base : base.replace(/^__+/, '_')
    base = name
    for (let n = 2; this.taken.has(name); n++) name = `${base}${n}`
    this.taken.add(name)
    return name
  }

  /** The schemas entry a node is (by `$ref` or by shape), if any. */
  private named (schema: JsonSchema): string | undefined {
    if (typeof schema.$ref === 'string') return /^#\/schemas\/(.+)$/.exec(schema.$ref)?.[1]
    return this.namedByShape.get(canonicalJson(schema))
  }

  private resolve (schema: JsonSchema): JsonSchema {
    if (typeof schema.$ref !== 'string') return schema
    const name = this.named(schema)
    return name === undefined ? {} : this.manifest.schemas[name] ?? {}
  }

  output (raw: JsonSchema, hint: string): { type: GraphQLOutputType, nullable: boolean } {
    const named = this.named(raw)
    const { schema, nullable } = splitNull(this.resolve(raw))
    const kind = classify(schema)
    return { type: this.outputOf(kind, schema, named, hint), nullable }
  }

  input (raw: JsonSchema, hint: string): { type: GraphQLInputType, nullable: boolean } {
    const named = this.named(raw)
    const { schema, nullable } = splitNull(this.resolve(raw))
    const kind = classify(schema)
    return { type: this.inputOf(kind, schema, named, hint), nullable }
  }

  private outputOf (kind: Kind, schema: JsonSchema, named: string | undefined, hint: string): GraphQLOutputType {
    switch (kind.kind) {
      case 'scalar': return kind.type
      case 'enum': return this.enumOf(kind.values, schema, named, hint)
      case 'list': {
        const item = this.output(kind.items, hint)
        return new GraphQLList(item.nullable ? item.type : new GraphQLNonNull(item.type))
      }
      case 'object': {
        const key = named === undefined ? null : 'named:' + named
        const cached = key === null ? undefined : this.outputs.get(key)
        if (cached !== undefined) return cached
        const name = named === undefined ? this.claim(hint) : this.typeNames.get(named)!
        const type: GraphQLObjectType = new GraphQLObjectType({
          name,
          description: describe(schema),
          fields: () => {
            const fields: GraphQLFieldConfigMap<unknown, unknown> = {}
            for (const [prop, propSchema] of Object.entries(kind.properties)) {
              const field = this.output(propSchema, name + pascal(prop))
              fields[prop] = { type: field.nullable || !kind.required.has(prop) ? field.type : new GraphQLNonNull(field.type), description: describe(propSchema) }
              // Read as the object's own: left out, the default resolver read Object.prototype's.
              if (inheritedName(prop)) fields[prop].resolve = (source: unknown) => Object.hasOwn(source as object, prop) ? (source as Record<string, unknown>)[prop] : null
            }
            return fields
          }
        })
        if (key !== null) this.outputs.set(key, type)
        return type
      }
    }
  }

  private inputOf (kind: Kind, schema: JsonSchema, named: string | undefined, hint: string): GraphQLInputType {
    switch (kind.kind) {
      case 'scalar': return kind.type
      case 'enum': return this.enumOf(kind.values, schema, named, hint)
      case 'list': {
        const item = this.input(kind.items, hint)
        return new GraphQLList(item.nullable ? item.type : new GraphQLNonNull(item.type))
      }
      case 'object': {
        const key = named === undefined ? null : 'named:' + named
        const cached = key === null ? undefined : this.inputs.get(key)
        if (cached !== undefined) return cached
        const base = named === undefined ? hint : this.typeNames.get(named)!
        const name = this.claim(base + 'Input')
        const type: GraphQLInputObjectType = new GraphQLInputObjectType({
          name,
          description: describe(schema),
          fields: () => this.inputFields(kind.properties, kind.required, base)
        })
        NULL_DROPPED.set(type, new Set(Object.keys(kind.properties).filter(p => !keepsNull(this.resolve(kind.properties[p])))))
        if (key !== null) this.inputs.set(key, type)
        return type
      }
    }
  }

  /** Input fields, or field arguments: required and null-free → non-null (rule 5). */
  inputFields (properties: Record<string, JsonSchema>, required: Set<string>, parent: string): GraphQLInputFieldConfigMap & GraphQLFieldConfigArgumentMap {
    const fields: GraphQLInputFieldConfigMap = {}
    for (const [prop, propSchema] of Object.entries(properties)) {
      const field = this.input(propSchema, parent + pascal(prop))
      fields[prop] = { type: field.nullable || !required.has(prop) ? field.type : new GraphQLNonNull(field.type), description: describe(propSchema) }
    }
    return fields
  }

  /** One enum type per named schema, or per place and value set, shared by inputs and outputs. */
  private enumOf (values: string[], schema: JsonSchema, named: string | undefined, hint: string): GraphQLEnumType {
    const key = named === undefined ? `${hint}\u0000${values.join('\u0000')}` : 'named:' + named
    let type = this.enums.get(key)
    if (type === undefined) {
      type = new GraphQLEnumType({
        name: named === undefined ? this.claim(hint) : this.typeNames.get(named)!,
        description: describe(schema),
        values: Object.fromEntries(values.map(v => [v, { value: v }]))
      })
      this.enums.set(key, type)
    }
    return type
  }
}

const describe = (schema: JsonSchema): string | undefined => typeof schema.description === 'string' ? schema.description : undefined

function describeOp (op: Operation): string | undefined {
  const text = [op.summary, op.description].filter((s): s is string => s !== null && s !== '').join('\n\n')
  return text === '' ? undefined : text
}

/** The fields of each input object type whose schema does not accept null (rule 2: a null given them is dropped). */
const NULL_DROPPED = new WeakMap<GraphQLInputObjectType, ReadonlySet<string>>()

/** Whether a value of `type` may hold an input object (whose nulls withoutNulls drops). */
function holdsInputObject (type: GraphQLInputType): boolean {
  const t = isNonNullType(type) ? type.ofType : type
  return isInputObjectType(t) || (isListType(t) && holdsInputObject(t.ofType as GraphQLInputType))
}

/**
 * `value` of `type` without the nulls GraphQL admits where the manifest's schema does not: an
 * input object's field given null is dropped when its schema does not accept null, at every
 * level (a copy is made of what changes; nothing else is touched).
 */
function withoutNulls (value: unknown, type: GraphQLInputType): unknown {
  const t = isNonNullType(type) ? type.ofType : type
  if (value === null || typeof value !== 'object') return value
  if (isListType(t)) {
    if (!Array.isArray(value)) return value
    let out: unknown[] = value
    for (let i = 0; i < value.length; i++) {
      const item = withoutNulls(value[i], t.ofType as GraphQLInputType)
      if (item === value[i]) continue
      if (out === value) out = [...value]
      out[i] = item
    }
    return out
  }
  if (!isInputObjectType(t)) return value
  const source = value as Record<string, unknown>
  const dropped = NULL_DROPPED.get(t)
  let out = source
  for (const [name, field] of Object.entries(t.getFields())) {
    if (!Object.hasOwn(source, name)) continue
    const v = source[name]
    const w = v === null ? (dropped?.has(name) === true ? undefined : null) : withoutNulls(v, field.type)
    if (w === v) continue
    if (out === source) out = { ...source }
    if (w === undefined) delete out[name]
    else out[name] = w
  }
  return out
}

/**
 * The input object types of `schema` that hold, at any depth, a field named as a member of
 * Object.prototype (`constructor`, `toString`, `valueOf`): none for most manifests.
 */
export function inputsNamingInherited (schema: GraphQLSchema): ReadonlySet<GraphQLInputObjectType> {
  const inputs = Object.values(schema.getTypeMap()).filter(isInputObjectType)
  const found = new Set<GraphQLInputObjectType>()
  // Until no type is added: a type holds one when one of its fields is so named, or holds one.
  for (let grew = true; grew;) {
    grew = false
    for (const type of inputs) {
      if (found.has(type)) continue
      if (Object.values(type.getFields()).some(f => inheritedName(f.name) || found.has(getNamedType(f.type) as GraphQLInputObjectType))) {
        found.add(type)
        grew = true
      }
    }
  }
  return found
}

/**
 * `value` of `type` with each input object of one of `types` copied without a prototype, its own
 * fields only (lists followed; nothing else is touched). graphql-js and graphql-jit read an input
 * object's fields by name, the inherited ones included: a field `valueOf` left out of a variable
 * was the inherited function, and the request was refused 400 ("Float cannot represent non
 * numeric value: [function valueOf]"). Their coercion makes a new object of what it reads.
 */
export function withOwnFields (value: unknown, type: GraphQLInputType, types: ReadonlySet<GraphQLInputObjectType>): unknown {
  const t = isNonNullType(type) ? type.ofType : type
  if (isListType(t)) {
    const item = t.ofType as GraphQLInputType
    return Array.isArray(value) ? value.map(v => withOwnFields(v, item, types)) : withOwnFields(value, item, types)
  }
  if (!isInputObjectType(t) || !types.has(t) || value === null || typeof value !== 'object' || Array.isArray(value)) return value
  const fields = t.getFields()
  const copy = Object.create(null) as Record<string, unknown>
  for (const [name, v] of Object.entries(value)) copy[name] = Object.hasOwn(fields, name) ? withOwnFields(v, fields[name].type, types) : v
  return copy
}

/** Turns a field's arguments into the op's input (rule 2), built once per op. */
function inputMapper (op: Operation, whole: boolean, args: GraphQLFieldConfigArgumentMap): (args: Record<string, unknown>) => Record<string, unknown> {
  if (whole) return (args) => (args.input ?? {}) as Record<string, unknown>
  const properties = (op.input.properties ?? {}) as Record<string, JsonSchema>
  const dropNull = Object.keys(properties).filter(p => !keepsNull(properties[p]))
  // Arguments that hold input objects, whose fields' nulls are dropped as the arguments' are.
  const nested = Object.entries(args).filter(([, arg]) => holdsInputObject(arg.type))
  if (dropNull.length === 0 && nested.length === 0) return (args) => args
  return (args) => {
    let input = args
    for (const p of dropNull) {
      if (input[p] === null) {
        if (input === args) input = { ...args }
        delete input[p]
      }
    }
    for (const [p, arg] of nested) {
      const v = input[p]
      const w = withoutNulls(v, arg.type)
      if (w === v) continue
      if (input === args) input = { ...args }
      input[p] = w
    }
    return input
  }
}

/** Whether an input schema admits properties it does not declare: it does not close itself with `additionalProperties: false`, or names them by pattern. */
function takesUndeclared (input: JsonSchema): boolean {
  return input.additionalProperties !== false || input.patternProperties !== undefined
}

export function buildSchema (manifest: Manifest, resolvers: SchemaResolvers): GraphQLSchema {
  const types = new TypeFactory(manifest)
  const roots: Record<'query' | 'mutation', GraphQLFieldConfigMap<unknown, unknown>> = { query: {}, mutation: {} }
  for (const op of manifest.operations) {
    const properties = (op.input.properties ?? {}) as Record<string, JsonSchema>
    const required = new Set(Array.isArray(op.input.required) ? op.input.required as string[] : [])
    const names = Object.keys(properties)
    const named = names.every(isGraphqlName)
    // An input that declares no property but takes some (a map, `additionalProperties: { ... }`,
    // `patternProperties`, or properties given in an `anyOf`'s branches) had no argument at all: a
    // call could send the op nothing but `{}`, which a mutation then ran with.
    const whole = !named || (names.length === 0 && takesUndeclared(op.input))
    const hint = pascal(op.name)
    const why = named ? 'it declares no property, and takes properties' : 'its property names are not GraphQL names'
    const args = whole
      ? { input: { type: required.size > 0 ? new GraphQLNonNull(JSONScalar) : JSONScalar, description: `The whole input of the operation (${why}).` } }
      : types.inputFields(properties, required, hint)
    roots[op.type][op.name] = {
      type: types.output(op.outputDocument, hint + 'Output').type,
      args,
      description: describeOp(op),
      ...(op.deprecated ? { deprecationReason: 'Deprecated in the manifest' } : {}),
      resolve: resolvers.operation(op, inputMapper(op, whole, args))
    }
  }
  const subscription: GraphQLFieldConfigMap<unknown, unknown> = {}
  for (const event of manifest.events) {
    subscription[event.name] = {
      type: types.output(event.payloadDocument, pascal(event.name) + 'Payload').type,
      description: event.description ?? undefined,
      subscribe: resolvers.subscribe(event),
      resolve: (payload: unknown) => payload
    }
  }
  if (Object.keys(roots.query).length === 0) {
    roots.query._ = { type: GraphQLBoolean, description: 'A placeholder: this manifest declares no query.', resolve: () => null }
  }
  return new GraphQLSchema({
    query: new GraphQLObjectType({ name: 'Query', fields: roots.query }),
    mutation: Object.keys(roots.mutation).length === 0 ? null : new GraphQLObjectType({ name: 'Mutation', fields: roots.mutation }),
    subscription: Object.keys(subscription).length === 0 ? null : new GraphQLObjectType({ name: 'Subscription', fields: subscription })
  })
}

/** The SDL of a manifest's GraphQL face (for documentation and tests). */
export function manifestSdl (manifest: Manifest): string {
  const none = (): never => { throw new Error('not executable') }
  return printSchema(buildSchema(manifest, { operation: () => none, subscribe: () => none }))
}
