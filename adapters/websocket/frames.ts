// The client frames of the WebSocket face (CONTRACT §3) and their decoding. Each kind has a
// JSON Schema compiled once; refusals name the field the way REST names input fields.
import { Ajv, type ValidateFunction } from 'ajv'
import { describeValidation } from '../../errors.js'
import { forbiddenKey, MAY_HOLD_FORBIDDEN_KEY } from '../../own-properties.js'

/** Longest frame id echoed back: ids go into every answer frame. */
export const MAX_ID_LENGTH = 128

export interface CallFrame { kind: 'call', id: string, op: string, input?: unknown, idempotencyKey?: unknown }
export interface SubscribeFrame { kind: 'subscribe', id: string, subscribe: string }
export interface UnsubscribeFrame { kind: 'unsubscribe', id: string, unsubscribe: string }
export interface AuthFrame { kind: 'auth', id: string, auth: string }
/**
 * A frame refused before it reaches any handler; `id` is the client's when it was valid. `names`:
 * the kind of frame it is (the key it carries) and, for a call or a subscribe, the op or event it
 * names when that is a name a frame may carry: its refusal is that call's or subscription's,
 * recorded as theirs are (connection.ts), where a frame that names none is junk.
 */
export interface Refusal { kind: 'refused', id: string | null, detail: string, names?: { kind: 'call' | 'subscribe' | 'auth', name: string } }
export type Frame = CallFrame | SubscribeFrame | UnsubscribeFrame | AuthFrame

const id = { type: 'string', minLength: 1, maxLength: MAX_ID_LENGTH }
const MAX_NAME_LENGTH = 128
const name = { type: 'string', minLength: 1, maxLength: MAX_NAME_LENGTH }
const frame = (key: string, value: object, extra: Record<string, object> = {}): object => ({
  type: 'object',
  required: ['id', key],
  additionalProperties: false,
  properties: { id, [key]: value, ...extra }
})

// The key that names a frame's kind, in the order they are looked for.
const KINDS = [
  ['op', 'call', frame('op', name, {
    // Any value: null is no input, and one that is no object is the call's refusal, its
    // pipeline's (audited), as on every other face; the frame's id is answered either way.
    input: {},
    // Any value: null is no key, and a key no store could key on (any other value that is not
    // text included) is refused by the pipeline, and only for a mutation (queries ignore the
    // key), as REST's Idempotency-Key header (connection.ts).
    idempotencyKey: {}
  })],
  ['subscribe', 'subscribe', frame('subscribe', name)],
  ['unsubscribe', 'unsubscribe', frame('unsubscribe', name)],
  // A JWT well past any real one's size is junk; the frame bound alone would allow megabytes.
  ['auth', 'auth', frame('auth', { type: 'string', minLength: 1, maxLength: 16384 })]
] as const

const ajv = new Ajv({ allErrors: false })
const validators: ReadonlyArray<readonly [string, Frame['kind'], ValidateFunction]> = KINDS.map(([key, kind, schema]) => [key, kind, ajv.compile(schema)] as const)

// JSON.parse keeps "__proto__" as an own key; REST refuses such bodies (secure-json-parse), so
// this face does too. Only frames that mention one are looked at, after parsing, iteratively: a
// reviver on JSON.parse recurses, and a frame a few thousand levels deep (10 KB) overflowed the
// stack, refused as "not valid JSON" with id null, its call never answered.

/** A text frame to a frame, or a refusal that says what is wrong with it. Never throws. */
export function decodeFrame (text: string): Frame | Refusal {
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch {
    return { kind: 'refused', id: null, detail: 'The frame is not valid JSON' }
  }
  // Refused with the frame's id when it has a valid one, as every other refusal of a frame with
  // a valid id (before, `"id":null`, and the client's call never settled). JSON.parse makes
  // `__proto__` an own key, never a prototype: the id is read from the frame's own keys.
  if (value !== null && typeof value === 'object' && MAY_HOLD_FORBIDDEN_KEY.test(text) && forbiddenKey(value)) {
    return refused(givenId(value), 'The frame contains a forbidden prototype property', Array.isArray(value) ? undefined : namesOf(value as Record<string, unknown>))
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return { kind: 'refused', id: null, detail: 'A frame must be a JSON object' }
  }
  const object = value as Record<string, unknown>
  const given = givenId(object)
  for (const [key, kind, validate] of validators) {
    if (!(key in object)) continue
    if (!validate(object)) return refused(given, describeValidation(validate.errors ?? [], 'frame', { schema: validate.schema, value: object }), namesOf(object))
    object.kind = kind
    return object as unknown as Frame
  }
  return { kind: 'refused', id: given, detail: 'A frame must carry one of op, subscribe, unsubscribe or auth' }
}

function refused (id: string | null, detail: string, names: Refusal['names']): Refusal {
  return names === undefined ? { kind: 'refused', id, detail } : { kind: 'refused', id, detail, names }
}

/**
 * What a frame refused for its form names (Refusal.names): the kind its first key of a kind says,
 * and the op or event it names when that is a name a frame may carry; `auth` names the re-auth.
 */
function namesOf (object: Record<string, unknown>): Refusal['names'] {
  for (const [key, kind] of validators) {
    if (!Object.hasOwn(object, key)) continue
    if (kind === 'auth') return { kind, name: 'websocket.auth' }
    const named = object[key]
    if (kind === 'unsubscribe' || typeof named !== 'string' || named.length === 0 || named.length > MAX_NAME_LENGTH) return undefined
    return { kind, name: named }
  }
  return undefined
}

/** The frame's own `id` when it is one a frame may carry (a top-level string within bounds), else null. */
function givenId (value: unknown): string | null {
  if (typeof value !== 'object' || value === null || Array.isArray(value) || !Object.hasOwn(value, 'id')) return null
  const { id } = value as { id: unknown }
  return typeof id === 'string' && id !== '' && id.length <= MAX_ID_LENGTH ? id : null
}
