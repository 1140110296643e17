import { GraphQLError, Kind, type ASTVisitor, type SelectionSetNode, type ValidationContext, type ValidationRule } from 'graphql'

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

/** Subscriptions are served over WebSocket (graphql-transport-ws) on the same path, not over HTTP. */
export const noSubscriptionOverHttp: ValidationRule = (context) => ({
  OperationDefinition (node) {
    if (node.operation === 'subscription') {
      context.reportError(new GraphQLError('Subscriptions are served over WebSocket (graphql-transport-ws) on this path, not over HTTP', { nodes: [node], extensions: { code: 'BAD_REQUEST', status: 400 } }))
    }
    return false
  }
})

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
