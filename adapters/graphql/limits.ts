import { GraphQLError, Kind, NoFragmentCyclesRule, NoUnusedFragmentsRule, getOperationAST, type ASTVisitor, type DocumentNode, type OperationDefinitionNode, type FieldNode, type SelectionSetNode, type ValidationContext, type ValidationRule } from 'graphql'

export interface Limits {
  /** Deepest selection (BFF_GRAPHQL_MAX_DEPTH): `{ a { b } }` is 2 deep. */
  maxDepth: number
  /** Most root fields an operation may select: each is a call (BFF_BATCH_MAX_CALLS). */
  maxRootFields: number
  /** Most fields an operation may select, fragments counted each time they are spread. */
  maxFields: number
}

/** Fields one document may select, all levels and fragment spreads counted. */
export const MAX_FIELDS = 1000
/**
 * The standard introspection query (GraphiQL's) is 15 deep: an operation that selects only
 * introspection fields may go that deep even when BFF_GRAPHQL_MAX_DEPTH is lower.
 */
export const INTROSPECTION_DEPTH = 15
/**
 * Fields one selection set may select under one response key, fragments included where they
 * are spread (`x: id x: name`, `a: getAgent(id: "1") { id } a: getAgent(id: "2") { id }`), but
 * for repeats of one field without arguments or selections (`id id id`, which cost nothing).
 * graphql-js' OverlappingFieldsCanBeMerged compares every two of them: 660 `x: id` / `x: name`
 * (a 4.6 KB document within MAX_TOKENS) cost it 200 ms, 660 long distinct names 400 ms.
 */
export const MAX_SAME_KEY = 20
/**
 * Fragments one selection set may spread, those they spread counted (each once). graphql-js
 * compares the fields of each selection set with those of every fragment it reaches, and the
 * fragments two by two: a chain of 220 (`fragment F1 on Agent { id ...F2 }`, within MAX_TOKENS)
 * cost it 50 ms, fields that are all `id` notwithstanding.
 */
export const MAX_SPREAD_FRAGMENTS = 50
/** Fields and fragments (each where it is spread) the check of response keys walks in one document. */
export const MAX_KEY_WALK = 10 * MAX_FIELDS

interface Measure { fields: number, depth: number, dataRoots: number }
const EMPTY: Measure = { fields: 0, depth: 0, dataRoots: 0 }

/**
 * A validation rule that bounds the work one operation asks for: root fields (calls), all
 * fields, and depth. Written here rather than taken from mercurius' `queryDepth` so that the
 * same rule covers HTTP and subscriptions, counts fragments once each (memoized, so a document
 * of fragments spread many times cannot make the count itself expensive), and reports errors
 * with the contract codes.
 */
export function limitsRule (limits: Limits): ValidationRule {
  return (context: ValidationContext): ASTVisitor => {
    const memo = new Map<string, Measure>()
    const visiting = new Set<string>()

    const measure = (set: SelectionSetNode): Measure => {
      let fields = 0
      let depth = 0
      let dataRoots = 0
      for (const selection of set.selections) {
        let m: Measure
        if (selection.kind === Kind.FIELD) {
          const child = selection.selectionSet === undefined ? EMPTY : measure(selection.selectionSet)
          m = { fields: 1 + child.fields, depth: 1 + child.depth, dataRoots: selection.name.value.startsWith('__') ? 0 : 1 }
        } else if (selection.kind === Kind.INLINE_FRAGMENT) {
          m = measure(selection.selectionSet)
        } else {
          const name = selection.name.value
          const fragment = context.getFragment(name)
          const known = memo.get(name)
          // Cycles and unknown fragments are reported by the standard rules.
          if (known !== undefined) m = known
          else if (fragment === undefined || fragment === null || visiting.has(name)) m = EMPTY
          else {
            visiting.add(name)
            m = measure(fragment.selectionSet)
            visiting.delete(name)
            memo.set(name, m)
          }
        }
        fields += m.fields
        depth = Math.max(depth, m.depth)
        dataRoots += m.dataRoots
      }
      return { fields, depth, dataRoots }
    }

    return {
      OperationDefinition (node) {
        const m = measure(node.selectionSet)
        const what = node.name === undefined ? 'The operation' : `Operation ${node.name.value}`
        if (m.dataRoots > limits.maxRootFields) {
          context.reportError(new GraphQLError(`${what} selects ${m.dataRoots} root fields; at most ${limits.maxRootFields} are allowed (each one is a call)`, { nodes: [node], extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }))
        }
        if (m.fields > limits.maxFields) {
          context.reportError(new GraphQLError(`${what} selects ${m.fields} fields; at most ${limits.maxFields} are allowed`, { nodes: [node], extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }))
        }
        const maxDepth = m.dataRoots === 0 ? Math.max(limits.maxDepth, INTROSPECTION_DEPTH) : limits.maxDepth
        if (m.depth > maxDepth) {
          context.reportError(new GraphQLError(`${what} is ${m.depth} levels deep; at most ${maxDepth} are allowed`, { nodes: [node], extensions: { code: 'VALIDATION_FAILED', status: 400 } }))
        }
        // Nothing below an operation concerns this rule.
        return false
      }
    }
  }
}

/** Whether the fields of one response key are all one field without arguments or selections. */
function sameLeaf (fields: readonly FieldNode[]): boolean {
  const name = fields[0].name.value
  return fields.every(f => f.name.value === name && f.selectionSet === undefined && (f.arguments === undefined || f.arguments.length === 0))
}

/**
 * A validation rule that bounds the fields one selection set selects under one response key
 * (MAX_SAME_KEY) and the fragments it spreads (MAX_SPREAD_FRAGMENTS), fields merged as the executor merges them: through inline fragments and
 * fragment spreads (each fragment once per selection set), and the sub-selections of the fields
 * of one key together. That is what graphql-js' OverlappingFieldsCanBeMerged compares two by two.
 * The walk stops at the deepest level the face allows (deeper is refused by limitsRule, or is a
 * fragment cycle) and after MAX_KEY_WALK fields and fragments, where the document is refused.
 */
export function responseKeysRule (limits: Pick<Limits, 'maxDepth'>): ValidationRule {
  const deepest = Math.max(limits.maxDepth, INTROSPECTION_DEPTH)
  return (context: ValidationContext): ASTVisitor => ({
    Document: {
      leave (document) {
        let work = 0
        const collect = (set: SelectionSetNode, into: Map<string, FieldNode[]>, visited: Set<string>): boolean => {
          for (const selection of set.selections) {
            if (++work > MAX_KEY_WALK) return false
            if (selection.kind === Kind.FIELD) {
              const key = selection.alias?.value ?? selection.name.value
              const fields = into.get(key)
              if (fields === undefined) into.set(key, [selection])
              else fields.push(selection)
            } else if (selection.kind === Kind.INLINE_FRAGMENT) {
              if (!collect(selection.selectionSet, into, visited)) return false
            } else if (!visited.has(selection.name.value)) {
              visited.add(selection.name.value)
              const fragment = context.getFragment(selection.name.value)
              if (fragment != null && !collect(fragment.selectionSet, into, visited)) return false
            }
          }
          return true
        }
        // The first key or selection set over a bound, or null; `false` once the walk is over its own bound.
        const walk = (sets: readonly SelectionSetNode[], depth: number): { key: string, count: number } | { fragments: number } | null | false => {
          const keys = new Map<string, FieldNode[]>()
          const visited = new Set<string>()
          for (const set of sets) if (!collect(set, keys, visited)) return false
          if (visited.size > MAX_SPREAD_FRAGMENTS) return { fragments: visited.size }
          for (const [key, fields] of keys) {
            if (fields.length > MAX_SAME_KEY && !sameLeaf(fields)) return { key, count: fields.length }
            if (depth >= deepest) continue
            const below: SelectionSetNode[] = []
            for (const field of fields) if (field.selectionSet !== undefined) below.push(field.selectionSet)
            if (below.length === 0) continue
            const found = walk(below, depth + 1)
            if (found !== null) return found
          }
          return null
        }
        for (const definition of document.definitions) {
          if (definition.kind !== Kind.OPERATION_DEFINITION) continue
          const found = walk([definition.selectionSet], 1)
          if (found === null) continue
          const what = definition.name === undefined ? 'The operation' : `Operation ${definition.name.value}`
          const extensions = { code: 'PAYLOAD_TOO_LARGE', status: 413 }
          context.reportError(found === false
            ? new GraphQLError(`The document's operations select more than ${MAX_KEY_WALK} fields and fragments, a fragment counted in each selection set that spreads it`, { extensions })
            : 'fragments' in found
              ? new GraphQLError(`${what} spreads ${found.fragments} fragments in one selection set, those they spread included; at most ${MAX_SPREAD_FRAGMENTS} are allowed`, { nodes: [definition], extensions })
              : new GraphQLError(`${what} selects "${found.key.slice(0, 100)}" ${found.count} times in one selection set; at most ${MAX_SAME_KEY} are allowed, unless each is the same field without arguments or selections`, { nodes: [definition], extensions }))
          return
        }
      }
    }
  })
}

/**
 * The rules run before graphql-js' own (which may cost hundreds of milliseconds on a document
 * within MAX_TOKENS: see MAX_SAME_KEY): a document they refuse is refused with their errors
 * alone, and graphql-js' validation never runs on it. Unused fragments and fragment cycles are
 * refused first, as graphql-js would: the other walks start from the operations, and stop at
 * the deepest level allowed.
 */
export function limitRules (limits: Limits): ValidationRule[] {
  return [NoUnusedFragmentsRule, NoFragmentCyclesRule, limitsRule(limits), responseKeysRule(limits)]
}

function subscriptionOverHttp (node: OperationDefinitionNode): GraphQLError {
  return new GraphQLError('Subscriptions are served over WebSocket (graphql-transport-ws) on this path, not over HTTP', { nodes: [node], extensions: { code: 'BAD_REQUEST', status: 400 } })
}

/**
 * Subscriptions are served over WebSocket (graphql-transport-ws) on the same path, not over HTTP.
 * A document of subscriptions only is refused by the validation rule (cached by mercurius with the
 * document). One that also holds a query or a mutation is valid: which operation runs is the
 * request's `operationName`, not the document's, so `refuseSelected` refuses it at execution, for
 * such documents only (the rule marks them). The rule refused the whole document, and a query
 * picked by operationName beside a subscription was refused too.
 */
export function subscriptionsOverHttp (): { rule: ValidationRule, refuseSelected: (document: DocumentNode, operationName: string | undefined) => void } {
  const mixed = new WeakSet<DocumentNode>()
  const rule: ValidationRule = (context) => {
    const document = context.getDocument()
    const subscriptions: OperationDefinitionNode[] = []
    let others = false
    for (const definition of document.definitions) {
      if (definition.kind !== Kind.OPERATION_DEFINITION) continue
      if (definition.operation === 'subscription') subscriptions.push(definition)
      else others = true
    }
    if (subscriptions.length > 0) {
      if (others) mixed.add(document)
      else for (const node of subscriptions) context.reportError(subscriptionOverHttp(node))
    }
    return {}
  }
  const refuseSelected = (document: DocumentNode, operationName: string | undefined): void => {
    if (!mixed.has(document)) return
    const operation = getOperationAST(document, operationName)
    if (operation?.operation === 'subscription') {
      throw Object.assign(new Error('Graphql validation error'), { errors: [subscriptionOverHttp(operation)], statusCode: 400 })
    }
  }
  return { rule, refuseSelected }
}

// Characters JSON.stringify writes escaped: controls, `"`, `\\`, and surrogates (paired ones as
// they are, a lone one as \uXXXX).
// eslint-disable-next-line no-control-regex -- control characters are what is looked for
const ESCAPED = /[\u0000-\u001f"\\\ud800-\udfff]/

/** Characters `text` takes as a JSON string, quotes included. */
function stringLength (text: string): number {
  if (!ESCAPED.test(text)) return text.length + 2
  let size = 2
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c === 0x22 || c === 0x5c || c === 0x08 || c === 0x09 || c === 0x0a || c === 0x0c || c === 0x0d) size += 2
    else if (c < 0x20) size += 6
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length && (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      size += 2
      i++
    } else if (c >= 0xd800 && c <= 0xdfff) size += 6
    else size++
  }
  return size
}

/** Characters a JSON primitive (or undefined, written null in an array) takes. */
function primitiveLength (v: unknown): number {
  if (typeof v === 'string') return stringLength(v)
  if (v === null || v === undefined) return 4
  return String(v).length
}

/**
 * How many characters `value` takes as JSON, counted only until it passes `limit`: the walk
 * stops there, so a result that repeats one large value under many aliases costs a visit per
 * copy up to the limit, not a serialization of every copy. Long strings are measured once per
 * walk (aliases repeat the same one). Iterative: a `JSON` scalar's value may nest deeper than the
 * stack allows.
 */
export function jsonLength (value: unknown, limit: number): number {
  let size = 0
  // Made for the first long string only: every GraphQL call's input is measured, and most hold none.
  let measured: Map<string, number> | null = null
  const stack: unknown[] = [value]
  while (stack.length > 0 && size <= limit) {
    const v = stack.pop()
    if (typeof v !== 'object' || v === null) {
      if (typeof v === 'string' && v.length > 1024) {
        measured ??= new Map()
        let n = measured.get(v)
        if (n === undefined) measured.set(v, n = stringLength(v))
        size += n
      } else size += primitiveLength(v)
    } else if (Array.isArray(v)) {
      size += v.length === 0 ? 2 : 1 + v.length
      // Elements that are primitives are counted here, without a visit each.
      for (let i = 0; i < v.length && size <= limit; i++) {
        const item: unknown = v[i]
        if (typeof item === 'object' && item !== null) stack.push(item)
        else size += primitiveLength(item)
      }
    } else {
      size += 1
      let first = true
      for (const key in v) {
        // `"key":` and the `,` or `}` after the value.
        size += stringLength(key) + 2
        first = false
        stack.push((v as Record<string, unknown>)[key])
        if (size > limit) break
      }
      if (first) size++
    }
  }
  return size
}
