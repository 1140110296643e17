import t from 'tap'
import { Ajv } from 'ajv'
import addFormats from 'ajv-formats'
import { MantleError, toProblem, describeValidation, problemType, ErrorCodes, type ErrorCode } from '../errors.js'
import { compileManifest } from '../manifest.js'

const RID = 'req-1'
const INTERNAL_DETAIL = 'The gateway could not complete the call'

t.test('every code has its contract status and a urn type', async t => {
  const expected: Record<ErrorCode, number> = {
    UNAUTHENTICATED: 401,
    FORBIDDEN: 403,
    FIREWALL_BLOCKED: 403,
    NOT_FOUND: 404,
    VALIDATION_FAILED: 400,
    PAYLOAD_TOO_LARGE: 413,
    UNSUPPORTED_MEDIA_TYPE: 415,
    IDEMPOTENCY_CONFLICT: 409,
    IDEMPOTENCY_KEY_REUSED: 422,
    RATE_LIMITED: 429,
    BAD_REQUEST: 400,
    KERNEL_REJECTED: 400,
    KERNEL_ERROR: 502,
    KERNEL_UNAVAILABLE: 503,
    KERNEL_TIMEOUT: 504,
    OVERLOADED: 503,
    INTERNAL: 500,
    // Never sent (the caller is gone): how a cancelled call's audit entry ends.
    CLIENT_CLOSED: 499
  }
  t.same(Object.keys(ErrorCodes).sort(), Object.keys(expected).sort(), 'no code more, no code less')
  for (const [code, status] of Object.entries(expected) as Array<[ErrorCode, number]>) {
    t.equal(ErrorCodes[code].status, status, `${code} table`)
    const err = new MantleError(code)
    t.equal(err.statusCode, status, `${code} default status`)
    t.equal(err.code, code)
    t.equal(err.message, ErrorCodes[code].title, `${code}: the detail defaults to the title`)
    t.equal(err.name, 'MantleError')
    t.equal(err.headers, null)
    t.type(err, Error)
    const { problem, headers } = toProblem(err, RID)
    t.same(problem, { type: problemType(code), title: ErrorCodes[code].title, status, code, detail: ErrorCodes[code].title, requestId: RID }, `${code} problem`)
    // A 401 carries its challenge (RFC 9110 §11.6.1).
    t.same(headers, code === 'UNAUTHENTICATED' ? { 'www-authenticate': 'Bearer' } : null, `${code} headers`)
  }
  t.equal(problemType('NOT_FOUND'), 'urn:mantle:problem:not-found')
  t.equal(problemType('IDEMPOTENCY_KEY_REUSED'), 'urn:mantle:problem:idempotency-key-reused')
  t.equal(problemType('INTERNAL'), 'urn:mantle:problem:internal')
})

t.test('KERNEL_REJECTED carries the Kernel status', async t => {
  const err = new MantleError('KERNEL_REJECTED', 'item is locked', { status: 409 })
  t.equal(err.statusCode, 409)
  t.same(toProblem(err, RID).problem, {
    type: 'urn:mantle:problem:kernel-rejected',
    title: 'Rejected by the Kernel',
    status: 409,
    code: 'KERNEL_REJECTED',
    detail: 'item is locked',
    requestId: RID
  })
})

t.test('headers and cause are carried', async t => {
  const cause = new Error('root')
  const err = new MantleError('RATE_LIMITED', 'slow down', { headers: { 'retry-after': '3' }, cause })
  t.same(err.headers, { 'retry-after': '3' })
  t.equal(err.cause, cause)
  const { problem, headers } = toProblem(err, RID)
  t.same(headers, { 'retry-after': '3' })
  t.match(problem, { code: 'RATE_LIMITED', status: 429, detail: 'slow down' })
  t.equal(new MantleError('INTERNAL').cause, undefined, 'no cause unless given')
})

t.test('the stack trace is omitted by default and kept on request', async t => {
  const limit = Error.stackTraceLimit
  const bare = new MantleError('FORBIDDEN')
  t.notMatch(bare.stack ?? '', /\n\s+at /, 'no frames by default')
  t.equal(Error.stackTraceLimit, limit, 'the global limit is restored')
  const withStack = new MantleError('FORBIDDEN', 'no', { stack: true })
  t.match(withStack.stack, /\n\s+at /, 'frames with { stack: true }')
  t.match(withStack.stack, /errors\.part\.ts/)
  t.equal(Error.stackTraceLimit, limit)
  t.match(new Error('plain').stack, /\n\s+at /, 'other errors still get their stack')
})

t.test('a Fastify validation error is VALIDATION_FAILED naming the field', async t => {
  const err = Object.assign(new Error('body/limit must be <= 100'), {
    statusCode: 400,
    code: 'FST_ERR_VALIDATION',
    validation: [{ instancePath: '/limit', message: 'must be <= 100', params: { limit: 100 } }],
    validationContext: 'body'
  })
  const { problem, headers } = toProblem(err, RID)
  t.same(problem, { type: 'urn:mantle:problem:validation-failed', title: 'Validation failed', status: 400, code: 'VALIDATION_FAILED', detail: 'body.limit must be <= 100', requestId: RID })
  t.equal(headers, null)
  t.equal(toProblem({ validation: [{ instancePath: '', params: { missingProperty: 'id' } }], validationContext: 'querystring' }, RID).problem.detail, 'querystring.id is required')
  t.equal(toProblem({ validation: [{ instancePath: '/id', message: 'must be string' }] }, RID).problem.detail, 'input.id must be string', 'no context: input')
})

t.test('Fastify client errors map to contract codes with our own detail', async t => {
  const cases: Array<[string, number, ErrorCode, string]> = [
    ['FST_ERR_CTP_BODY_TOO_LARGE', 413, 'PAYLOAD_TOO_LARGE', 'The request body is larger than the limit'],
    ['FST_ERR_CTP_INVALID_MEDIA_TYPE', 415, 'UNSUPPORTED_MEDIA_TYPE', 'The request body must be application/json'],
    ['FST_ERR_CTP_EMPTY_JSON_BODY', 400, 'VALIDATION_FAILED', 'The JSON body is empty'],
    ['FST_ERR_CTP_INVALID_JSON_BODY', 400, 'VALIDATION_FAILED', 'The body is not valid JSON'],
    ['FST_ERR_CTP_INVALID_CONTENT_LENGTH', 400, 'BAD_REQUEST', 'The Content-Length header does not match the body'],
    ['FST_ERR_BAD_URL', 400, 'BAD_REQUEST', 'The URL path is not valid percent-encoding'],
    ['FST_ERR_MAX_PARAM_LENGTH', 414, 'BAD_REQUEST', 'A path segment is longer than 256 characters']
  ]
  for (const [fst, status, code, detail] of cases) {
    const err = Object.assign(new Error('fastify says something internal'), { code: fst, statusCode: status })
    const { problem, headers } = toProblem(err, RID)
    t.same(problem, { type: problemType(code), title: ErrorCodes[code].title, status, code, detail, requestId: RID }, fst)
    t.equal(headers, null)
  }
  t.match(toProblem({ code: 'FST_ERR_CTP_BODY_TOO_LARGE' }, RID).problem, { code: 'PAYLOAD_TOO_LARGE', status: 413 }, 'by code alone, without statusCode')
})

t.test('a SyntaxError with status 400 is a bad JSON body', async t => {
  const err = Object.assign(new SyntaxError('Unexpected token } in JSON at position 9'), { statusCode: 400 })
  t.same(toProblem(err, RID).problem, { type: 'urn:mantle:problem:validation-failed', title: 'Validation failed', status: 400, code: 'VALIDATION_FAILED', detail: 'The body is not valid JSON', requestId: RID })
  const bare = toProblem(new SyntaxError('Unexpected token'), RID).problem
  t.same(bare, { type: 'urn:mantle:problem:internal', title: 'Internal error', status: 500, code: 'INTERNAL', detail: INTERNAL_DETAIL, requestId: RID }, 'without a status it is our own bug')
})

t.test('a generic error with a 4xx status keeps the status', async t => {
  const cases: Array<[number, ErrorCode]> = [
    [400, 'VALIDATION_FAILED'],
    [401, 'UNAUTHENTICATED'],
    [403, 'FORBIDDEN'],
    [404, 'NOT_FOUND'],
    [413, 'PAYLOAD_TOO_LARGE'],
    [415, 'UNSUPPORTED_MEDIA_TYPE'],
    [429, 'RATE_LIMITED'],
    [418, 'BAD_REQUEST'],
    [405, 'BAD_REQUEST']
  ]
  for (const [status, code] of cases) {
    const err = Object.assign(new Error(`secret internal message ${status}`), { statusCode: status })
    const { problem, headers } = toProblem(err, RID)
    t.same(problem, { type: problemType(code), title: ErrorCodes[code].title, status, code, detail: ErrorCodes[code].title, requestId: RID }, `${status} → ${code}`)
    t.notMatch(JSON.stringify(problem), /secret internal/, 'the message is not passed on')
    t.equal(headers, null)
  }
})

t.test('anything else is INTERNAL 500 and never shows its message', async t => {
  const internal = { type: 'urn:mantle:problem:internal', title: 'Internal error', status: 500, code: 'INTERNAL', detail: INTERNAL_DETAIL, requestId: RID }
  const values: Array<[string, unknown]> = [
    ['an Error', new Error('db password is hunter2')],
    ['a TypeError', new TypeError('cannot read hunter2 of undefined')],
    ['a 5xx error', Object.assign(new Error('upstream hunter2'), { statusCode: 503 })],
    ['a 3xx status', Object.assign(new Error('hunter2'), { statusCode: 302 })],
    ['a string status', Object.assign(new Error('hunter2'), { statusCode: '404' })],
    ['an unknown code', Object.assign(new Error('hunter2'), { code: 'ECONNRESET' })],
    ['a string', 'hunter2'],
    ['undefined', undefined],
    ['null', null],
    ['a number', 42],
    ['a plain object', { message: 'hunter2' }]
  ]
  for (const [what, value] of values) {
    const { problem, headers } = toProblem(value, RID)
    t.same(problem, internal, what)
    t.notMatch(JSON.stringify(problem), /hunter2/, `${what}: nothing leaks`)
    t.equal(headers, null)
  }
})

t.test('describeValidation names the field', async t => {
  t.equal(describeValidation([{ instancePath: '/a', message: "must have required property 'b'", params: { missingProperty: 'b' } }]), 'input.a.b is required')
  t.equal(describeValidation([{ instancePath: '', message: "must have required property 'id'", params: { missingProperty: 'id' } }]), 'input.id is required')
  t.equal(describeValidation([{ instancePath: '', message: 'must NOT have additional properties', params: { additionalProperty: 'x' } }]), 'input.x is not allowed')
  t.equal(describeValidation([{ instancePath: '/a', params: { additionalProperty: 'x' } }], 'body'), 'body.a.x is not allowed')
  t.equal(describeValidation([{ instancePath: '/a/b', message: 'must be <= 5', params: { comparison: '<=', limit: 5 } }]), 'input.a.b must be <= 5')
  t.equal(describeValidation([{ instancePath: '/items/0', message: 'must be string' }], 'body'), 'body.items.0 must be string')
  t.equal(describeValidation([{ instancePath: '', message: 'must be object' }]), 'input must be object')
  t.equal(describeValidation([{}]), 'input is not valid')
  t.equal(describeValidation([{ instancePath: '/x', message: 'first' }, { instancePath: '/y', message: 'second' }]), 'input.x first', 'the first error only')
  t.equal(describeValidation([]), 'The input is not valid')
  t.equal(describeValidation([], 'body'), 'The input is not valid')
})

// Ajv's errors of anyOf [null, object] with { id: 1 }, {} and 'text' (allErrors off: each
// branch's first error, then anyOf's own): the first was named, "must be null".
t.test('describeValidation names the error of the branch the value came closest to', async t => {
  const nullBranch = { instancePath: '', schemaPath: '#/anyOf/0/type', keyword: 'type', params: { type: 'null' }, message: 'must be null' }
  const anyOf = { instancePath: '', schemaPath: '#/anyOf', keyword: 'anyOf', params: {}, message: 'must match a schema in anyOf' }
  t.equal(describeValidation([nullBranch, { instancePath: '/id', schemaPath: '#/anyOf/1/properties/id/type', keyword: 'type', params: { type: 'string' }, message: 'must be string' }, anyOf], 'output'), 'output.id must be string', 'the deepest error')
  t.equal(describeValidation([nullBranch, { instancePath: '', schemaPath: '#/anyOf/1/required', keyword: 'required', params: { missingProperty: 'id' }, message: "must have required property 'id'" }, anyOf], 'output'), 'output.id is required', 'a missing field is one level down')
  t.equal(describeValidation([nullBranch, { instancePath: '', schemaPath: '#/anyOf/1/minProperties', keyword: 'minProperties', params: { limit: 1 }, message: 'must NOT have fewer than 1 properties' }, anyOf]), 'input must NOT have fewer than 1 properties', 'a wrong type ranks last')
  t.equal(describeValidation([nullBranch, { instancePath: '', schemaPath: '#/anyOf/1/type', keyword: 'type', params: { type: 'object' }, message: 'must be object' }, { ...anyOf, instancePath: '' }], 'output'), 'output must be null or object', 'no branch took its type: all are named')
  t.equal(describeValidation([{ instancePath: '/a', schemaPath: '#/properties/a/oneOf/0/type', keyword: 'type', params: { type: 'string' }, message: 'must be string' }, { instancePath: '/a', schemaPath: '#/properties/a/oneOf/1/type', keyword: 'type', params: { type: 'integer' }, message: 'must be integer' }, { instancePath: '/a', schemaPath: '#/properties/a/oneOf/2/type', keyword: 'type', params: { type: 'null,boolean' }, message: 'must be null,boolean' }, { instancePath: '/a', schemaPath: '#/properties/a/oneOf', keyword: 'oneOf', params: { passingSchemas: null }, message: 'must match exactly one schema in oneOf' }]), 'input.a must be string, integer, null or boolean', 'oneOf too')
  t.equal(describeValidation([{ instancePath: '', schemaPath: '#/oneOf', keyword: 'oneOf', params: { passingSchemas: [0, 1] }, message: 'must match exactly one schema in oneOf' }], 'output'), 'output must match exactly one schema in oneOf', 'a value two branches of a oneOf match')
  // A tagged union (OpenAPI's oneOf by `kind`), Ajv's errors of { shape: { kind: 'a', x: 5 } }:
  // the fault is in the branch `kind` chose, not the other branch's required field or constant.
  const xType = { instancePath: '/shape/x', schemaPath: '#/properties/shape/oneOf/0/properties/x/type', keyword: 'type', params: { type: 'string' }, message: 'must be string' }
  const tagged = { instancePath: '/shape', schemaPath: '#/properties/shape/oneOf', keyword: 'oneOf', params: { passingSchemas: null }, message: 'must match exactly one schema in oneOf' }
  t.equal(describeValidation([xType, { instancePath: '/shape', schemaPath: '#/properties/shape/oneOf/1/required', keyword: 'required', params: { missingProperty: 'y' }, message: "must have required property 'y'" }, tagged], 'output'), 'output.shape.x must be string', 'not the other branch\'s required field')
  t.equal(describeValidation([xType, { instancePath: '/shape/kind', schemaPath: '#/properties/shape/oneOf/1/properties/kind/const', keyword: 'const', params: { allowedValue: 'b' }, message: 'must be equal to constant' }, tagged], 'output'), 'output.shape.x must be string', 'not the other branch\'s discriminator')
  // anyOf by an enum, { shape: { kind: 'b', y: 'z' } }: the second branch's fault.
  t.equal(describeValidation([
    { instancePath: '/shape/kind', schemaPath: '#/properties/shape/anyOf/0/properties/kind/enum', keyword: 'enum', params: { allowedValues: ['a'] }, message: 'must be equal to one of the allowed values' },
    { instancePath: '/shape/y', schemaPath: '#/properties/shape/anyOf/1/properties/y/type', keyword: 'type', params: { type: 'number' }, message: 'must be number' },
    { instancePath: '/shape', schemaPath: '#/properties/shape/anyOf', keyword: 'anyOf', params: {}, message: 'must match a schema in anyOf' }], 'output'), 'output.shape.y must be number', 'a discriminator of the first branch refused: the second\'s fault')
  // A nullable object whose field breaks its enum (or const): the object's fault, not "must be null".
  t.equal(describeValidation([
    { instancePath: '/item', schemaPath: '#/properties/item/anyOf/0/type', keyword: 'type', params: { type: 'null' }, message: 'must be null' },
    { instancePath: '/item/status', schemaPath: '#/properties/item/anyOf/1/properties/status/enum', keyword: 'enum', params: { allowedValues: ['active', 'idle'] }, message: 'must be equal to one of the allowed values' },
    { instancePath: '/item', schemaPath: '#/properties/item/anyOf', keyword: 'anyOf', params: {}, message: 'must match a schema in anyOf' }], 'output'), 'output.item.status must be equal to one of the allowed values', 'a nullable object\'s enum field')
  t.equal(describeValidation([{ instancePath: '', schemaPath: '#/anyOf/0/type', keyword: 'type', message: 'must be null' }, { instancePath: '', schemaPath: '#/anyOf/1/type', keyword: 'type', params: { type: 'object' }, message: 'must be object' }, { instancePath: '', schemaPath: '#/anyOf', keyword: 'anyOf', params: {}, message: 'must match a schema in anyOf' }]), 'input must be null', 'a type error without params names no "undefined"')
})

// A union inside a branch of another (a nullable object with a union field, a tagged union under a
// nullable one), with Ajv's own errors as the pipeline gets them (allErrors off): the inner union's
// type errors ranked with the outer null branch's ("output must be null" for { a: true }).
t.test('a union nested in a branch of another is named by its own fault', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false })
  const named = (schema: object, value: unknown): string => {
    const validate = ajv.compile(schema)
    t.notOk(validate(value), `${JSON.stringify(value)} is refused`)
    return describeValidation(validate.errors ?? [], 'output')
  }
  const nullable = (schema: object): object => ({ anyOf: [{ type: 'null' }, schema] })
  t.equal(named(nullable({ type: 'object', properties: { a: { anyOf: [{ type: 'string' }, { type: 'number' }] } } }), { a: true }), 'output.a must be string or number', 'a union field of a nullable object')
  t.equal(named(nullable({ type: 'object', properties: { a: nullable({ type: 'string' }) } }), { a: 5 }), 'output.a must be null or string', 'a nullable field of a nullable object')
  t.equal(named({ type: 'array', items: nullable({ type: 'object', properties: { tags: { type: 'array', items: { oneOf: [{ type: 'string' }, { type: 'integer' }] } } } }) }, [{ tags: ['x', false] }]), 'output.0.tags.1 must be string or integer', 'arrays of unions under a nullable item')
  const A = { type: 'object', required: ['kind', 'x'], properties: { kind: { const: 'a' }, x: { type: 'string' } } }
  const B = { type: 'object', required: ['kind', 'y'], properties: { kind: { const: 'b' }, y: { type: 'string' } } }
  t.equal(named(nullable({ type: 'object', properties: { shape: { oneOf: [B, A] } } }), { shape: { kind: 'a', x: 5 } }), 'output.shape.x must be string', 'a tagged union under a nullable object')
  t.equal(named(nullable({ type: 'object', properties: { shape: { oneOf: [A, B] } } }), { shape: 7 }), 'output.shape must be object', 'a number where the tagged union wants an object')
  t.equal(named(nullable({ type: 'object', properties: { a: { type: 'string' } } }), 5), 'output must be null or object', 'a flat nullable object as before')
})

// Ajv checks `required` before `properties` and stops at a branch's first error: a branch of a
// tagged union that wants other fields never got to its `kind`, and its "x is required" was named
// for a value whose `kind` chose the other branch ({kind: "b"} missing y: "input.x is required").
t.test('a tagged union names the branch the value\'s kind chose, whatever the other branch wants', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false })
  const named = (schema: object, value: unknown, context = 'input'): string => {
    const validate = ajv.compile(schema)
    t.notOk(validate(value), `${JSON.stringify(value)} is refused`)
    return describeValidation(validate.errors ?? [], context, { schema: validate.schema, value })
  }
  const A = { type: 'object', required: ['kind', 'x'], properties: { kind: { const: 'a' }, x: { type: 'string' } } }
  const B = { type: 'object', required: ['kind', 'y'], properties: { kind: { const: 'b' }, y: { type: 'string' } } }
  t.equal(named({ oneOf: [A, B] }, { kind: 'b' }), 'input.y is required', 'the second branch\'s missing field')
  t.equal(named({ anyOf: [{ type: 'null' }, { type: 'object', properties: { s: { oneOf: [A, B] } } }] }, { s: { kind: 'b' } }, 'output'), 'output.s.y is required', 'under a nullable object')
  // The union field listed before `kind` in the other branch: its wrong type is not this value's fault.
  const circle = { type: 'object', required: ['kind'], properties: { size: { anyOf: [{ type: 'number' }, { type: 'object' }] }, kind: { const: 'circle' } } }
  const label = { type: 'object', required: ['kind', 'text'], properties: { kind: { enum: ['label', 'note'] }, size: { type: 'string' }, text: { type: 'string' } } }
  t.equal(named({ oneOf: [circle, label] }, { kind: 'label', size: 'big' }), 'input.text is required', 'an enum discriminator, a union field before kind')
  // As before: the value's kind matches no branch; the value is of the first's kind; no kind at all.
  t.equal(named({ oneOf: [A, B] }, { kind: 'c' }), 'input.x is required', 'no branch of its kind: every branch is weighed')
  t.equal(named({ oneOf: [A, B] }, { kind: 'a', x: 5 }), 'input.x must be string', 'the first branch\'s fault')
  t.equal(named({ oneOf: [A, B] }, { x: 'q' }), 'input.kind is required', 'no kind')
  t.equal(named({ oneOf: [A, B] }, 7), 'input must be object', 'not an object')
  // A const or enum no other branch tells by is the value's fault, not another kind's (13cce55).
  t.equal(named({ anyOf: [{ type: 'null' }, { type: 'object', properties: { version: { const: 2 }, status: { enum: ['on', 'off'] } } }] }, { version: 1 }, 'output'), 'output.version must be equal to constant', 'a nullable object\'s const field')
  t.equal(named({ anyOf: [{ type: 'null' }, { type: 'object', properties: { status: { enum: ['on', 'off'] } } }] }, { status: 'x' }, 'output'), 'output.status must be equal to one of the allowed values', 'a nullable object\'s enum field')
  // Ajv's paths escape a slash (a~1b), for the schema and the value alike.
  t.match(named({ anyOf: [{ type: 'null' }, { type: 'object', properties: { 'a/b': { oneOf: [A, B] } } }] }, { 'a/b': { kind: 'b' } }), /\.y is required$/, 'a field whose name has a slash')
})

// A value whose fields tell two kinds (kind a, version 2 of a union whose branches are a/1 and
// b/2) is of no branch's kind more than another's: e5eb5c4 set every branch aside, nothing of the
// union was left to name, and under a nullable object the null branch's "output must be null" won.
t.test('a value whose fields point at different branches of a tagged union names a fault of the union', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false })
  const named = (schema: object, value: unknown): string => {
    const validate = ajv.compile(schema)
    t.notOk(validate(value), `${JSON.stringify(value)} is refused`)
    return describeValidation(validate.errors ?? [], 'output', { schema: validate.schema, value })
  }
  const A = { type: 'object', required: ['kind', 'x'], properties: { kind: { const: 'a' }, version: { const: 1 }, x: { type: 'string' } } }
  const B = { type: 'object', required: ['kind', 'y'], properties: { kind: { const: 'b' }, version: { const: 2 }, y: { type: 'string' } } }
  const C = { type: 'object', required: ['kind', 'z'], properties: { kind: { const: 'c' }, version: { const: 3 }, z: { type: 'string' } } }
  const nullable = (schema: object): object => ({ anyOf: [{ type: 'null' }, { type: 'object', properties: { s: schema } }] })
  t.equal(named(nullable({ oneOf: [A, B] }), { s: { kind: 'a', version: 2, x: 'q' } }), 'output.s.y is required', 'not "must be null"')
  t.match(named(nullable({ oneOf: [A, B] }), { s: { kind: 'b', version: 1, y: 5 } }), /^output\.s\.\S+ /, 'a fault of a branch, not "must be null"')
  t.equal(named(nullable({ oneOf: [C, A, B] }), { s: { kind: 'a', version: 2, x: 'q' } }), 'output.s.y is required', 'a branch of neither kind stays aside (not "z is required")')
  t.equal(named({ oneOf: [C, A, B] }, { kind: 'a', version: 2, x: 'q' }), 'output.y is required', 'at the root: not the first branch\'s "z is required"')
})

// Ajv's instance paths are JSON pointers: a field "a/b" is "/a~1b" there, and the message named
// "input.a~1b", a field the client never sent nor the schema declared.
t.test('a field whose name holds a slash or a tilde is named as written', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false })
  const named = (schema: object, value: unknown): string => {
    const validate = ajv.compile(schema)
    t.notOk(validate(value), `${JSON.stringify(value)} is refused`)
    return describeValidation(validate.errors ?? [], 'input', { schema: validate.schema, value })
  }
  t.equal(named({ type: 'object', properties: { 'a/b': { type: 'string' } } }, { 'a/b': 5 }), 'input.a/b must be string')
  t.equal(named({ type: 'object', properties: { 'p~q': { type: 'object', required: ['x'] } } }, { 'p~q': {} }), 'input.p~q.x is required')
  t.equal(named({ type: 'object', properties: { 'c/d': { type: 'object', additionalProperties: false } } }, { 'c/d': { e: 1 } }), 'input.c/d.e is not allowed')
  t.equal(named({ type: 'array', items: { type: 'object', properties: { '~1': { type: 'integer' } } } }, [{ '~1': 'x' }]), 'input.0.~1 must be integer')
})

// Manifests written from OpenAPI compose a tagged union's branches with allOf (a base schema by
// $ref, then the branch's own `kind` and fields). The manifest inlines each $ref before Ajv sees
// the schema, but the kind was looked for in a branch's own `properties` only: an allOf branch had
// none, every branch was weighed, and {id, kind: "b"} was named by the first branch's "x is required".
t.test('a tagged union whose branches are composed with allOf names the branch the value\'s kind chose', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false, coerceTypes: false, useDefaults: true })
  const named = (schema: object, value: unknown, context = 'input'): string => {
    const validate = ajv.compile(schema)
    t.notOk(validate(value), `${JSON.stringify(value)} is refused`)
    return describeValidation(validate.errors ?? [], context, { schema: validate.schema, value })
  }
  const base = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
  const A = { allOf: [base, { type: 'object', required: ['kind', 'x'], properties: { kind: { const: 'a' }, x: { type: 'string' } } }] }
  const B = { allOf: [base, { type: 'object', required: ['kind', 'y'], properties: { kind: { const: 'b' }, y: { type: 'string' } } }] }
  t.equal(named({ oneOf: [A, B] }, { id: 'i', kind: 'b' }), 'input.y is required', 'the second branch\'s missing field')
  t.equal(named({ anyOf: [A, B] }, { id: 'i', kind: 'b' }), 'input.y is required', 'anyOf too')
  t.equal(named({ oneOf: [A, B] }, { kind: 'b', y: 'q' }), 'input.id is required', 'the base\'s missing field')
  t.equal(named({ oneOf: [A, B] }, { id: 'i', kind: 'a', x: 5 }), 'input.x must be string', 'the first branch\'s fault')
  t.equal(named({ oneOf: [A, B] }, { id: 'i', kind: 'c' }), 'input.x is required', 'no branch of its kind: every branch is weighed')
  t.equal(named({ anyOf: [{ type: 'null' }, { type: 'object', properties: { s: { oneOf: [A, B] } } }] }, { s: { id: 'i', kind: 'b' } }, 'output'), 'output.s.y is required', 'under a nullable object')
  // The kind a level further down (allOf in allOf), and a base that declares the kind's enum the branch narrows.
  const deepB = { allOf: [base, { allOf: [{ properties: { kind: { const: 'b' } } }, { required: ['kind', 'y'], properties: { y: { type: 'string' } } }] }] }
  t.equal(named({ oneOf: [A, deepB] }, { id: 'i', kind: 'b' }), 'input.y is required', 'a kind in a nested allOf')
  const kinded = { type: 'object', required: ['id', 'kind'], properties: { id: { type: 'string' }, kind: { enum: ['a', 'b'] } } }
  const A2 = { allOf: [kinded, { required: ['x'], properties: { kind: { const: 'a' }, x: { type: 'string' } } }] }
  const B2 = { allOf: [kinded, { required: ['y'], properties: { kind: { const: 'b' }, y: { type: 'string' } } }] }
  t.equal(named({ oneOf: [A2, B2] }, { id: 'i', kind: 'b' }), 'input.y is required', 'the base\'s enum admits both kinds, the branch\'s const one')
  // As the manifest gives it: each $ref to a named schema inlined before the validator compiles it.
  const manifest = compileManifest({
    version: 1,
    kernel: { url: 'http://127.0.0.1:1' },
    schemas: {
      Shape: { type: 'object', required: ['id', 'kind'], properties: { id: { type: 'string' }, kind: { type: 'string' } } },
      Circle: { allOf: [{ $ref: '#/schemas/Shape' }, { type: 'object', required: ['radius'], properties: { kind: { const: 'circle' }, radius: { type: 'number' } } }] },
      Square: { allOf: [{ $ref: '#/schemas/Shape' }, { type: 'object', required: ['side'], properties: { kind: { const: 'square' }, side: { type: 'number' } } }] }
    },
    operations: {
      draw: { type: 'mutation', rest: 'POST /draw', kernel: 'POST /v1/draw', input: { type: 'object', required: ['shape'], properties: { shape: { oneOf: [{ $ref: '#/schemas/Circle' }, { $ref: '#/schemas/Square' }] } } }, output: { type: 'object' } }
    }
  }, 'test-manifest')
  const input = manifest.operations.find(op => op.name === 'draw')?.input
  t.ok(input !== undefined)
  t.equal(named(input as object, { shape: { id: 's', kind: 'square' } }), 'input.shape.side is required', 'not the circle\'s "radius is required"')
  t.equal(named(input as object, { shape: { id: 's', kind: 'square', side: 'big' } }), 'input.shape.side must be number')
  t.equal(named(input as object, { shape: { id: 's', kind: 'circle' } }), 'input.shape.radius is required')
})

// A map whose keys must match a pattern (propertyNames): the message named the map with the key's
// rule as if the map were the string ("input.m must match pattern ..."), and not which key broke it.
t.test('a key refused by propertyNames is named with its rule, bounded', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false, coerceTypes: false, useDefaults: true })
  addFormats.default(ajv)
  const named = (schema: object, value: unknown, context = 'input'): string => {
    const validate = ajv.compile(schema)
    t.notOk(validate(value), 'a value is refused')
    return describeValidation(validate.errors ?? [], context, { schema: validate.schema, value })
  }
  const map = (names: object): object => ({ type: 'object', properties: { m: { type: 'object', propertyNames: names, additionalProperties: { type: 'integer' } } } })
  t.equal(named(map({ pattern: '^[a-z]+$' }), { m: { ok: 1, Bad: 2 } }), 'input.m.Bad is not allowed: the key must match pattern "^[a-z]+$"')
  t.equal(named(map({ pattern: '^[a-z]+$' }), { m: { 'Bad Key': 2 } }), 'input.m["Bad Key"] is not allowed: the key must match pattern "^[a-z]+$"', 'a key with a space, quoted')
  t.equal(named(map({ enum: ['a', 'b'] }), { m: { c: 1 } }), 'input.m.c is not allowed: the key must be equal to one of the allowed values')
  t.equal(named(map({ format: 'email' }), { m: { c: 1 } }), 'input.m.c is not allowed: the key must match format "email"')
  t.equal(named({ type: 'object', propertyNames: { maxLength: 3 } }, { abcd: 1 }), 'input.abcd is not allowed: the key must NOT have more than 3 characters', 'at the root')
  t.equal(named({ anyOf: [{ type: 'null' }, map({ anyOf: [{ pattern: '^[a-z]+$' }, { maxLength: 2 }] })] }, { m: { 'Bad Key': 1 } }, 'output'), 'output.m["Bad Key"] is not allowed: the key must match pattern "^[a-z]+$"', 'a union of rules under a nullable object')
  const long = 'K'.repeat(10_000)
  const message = named(map({ maxLength: 8 }), { m: { [long]: 1 } })
  t.ok(message.length < 200, `bounded: ${message.length} characters`)
  t.match(message, /^input\.m\.K+… is not allowed: the key must NOT have more than 8 characters$/)
  // Ajv's outer error alone (as a list cut short would give it).
  t.equal(describeValidation([{ instancePath: '/m', schemaPath: '#/properties/m/propertyNames', keyword: 'propertyNames', params: { propertyName: 'x y' }, message: 'property name must be valid' }]), 'input.m["x y"] is not allowed: the key is not valid')
})

// Keys are joined with dots: a key "a.b" read as a.b, "a[0]" or "sp ace" as a path and words, a
// key of 10,000 characters made a message of 20,000, and a key "0" as an array's index.
t.test('a key that is not a plain name is quoted in a path, and every key and path is bounded', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false, coerceTypes: false, useDefaults: true })
  const named = (schema: object, value: unknown, context = 'input'): string => {
    const validate = ajv.compile(schema)
    t.notOk(validate(value), 'a value is refused')
    return describeValidation(validate.errors ?? [], context, { schema: validate.schema, value })
  }
  const strings = { type: 'object', additionalProperties: { type: 'string' } }
  t.equal(named(strings, { 'a.b': 1 }), 'input["a.b"] must be string', 'a dot')
  t.equal(named(strings, { 'a[0]': 1 }), 'input["a[0]"] must be string', 'brackets')
  t.equal(named(strings, { 'sp ace': 1 }), 'input["sp ace"] must be string', 'a space')
  t.equal(named(strings, { '': 1 }), 'input[""] must be string', 'the empty key')
  t.equal(named(strings, { 'a"b\n': 1 }), 'input["a\\"b\\n"] must be string', 'a quote and a newline, escaped')
  t.equal(named(strings, { 0: 1 }), 'input["0"] must be string', 'an object\'s key "0" is not an index')
  t.equal(named({ type: 'object', properties: { items: { type: 'array', items: { type: 'object', required: ['name'], properties: { name: { type: 'string' } } } } } }, { items: [{ name: 'a' }, { name: 'b' }, { name: 'c' }, { name: 7 }] }), 'input.items.3.name must be string', 'an index as before')
  t.equal(named({ type: 'object', properties: { 'a.b': { type: 'object', required: ['c d'] } } }, { 'a.b': {} }), 'input["a.b"]["c d"] is required', 'a missing field')
  t.equal(named({ type: 'object', properties: { a: { type: 'object', additionalProperties: false } } }, { a: { 'x.y': 1 } }), 'input.a["x.y"] is not allowed', 'a field not allowed')
  const long = 'k'.repeat(10_000)
  for (const [what, schema, value] of [
    ['a long key not allowed', { type: 'object', properties: { a: {} }, additionalProperties: false }, { [long]: 1 }],
    ['a long key in the path', strings, { [long]: 1 }],
    ['a long key with a space in the path', strings, { [' ' + long]: 1 }],
    ['a long missing field', { type: 'object', required: [long] }, {}],
    ['a long key under a long key', { type: 'object', additionalProperties: { type: 'object', additionalProperties: false } }, { [long]: { [long + '2']: 1 } }]
  ] as const) {
    const message = named(schema, value)
    t.ok(message.length < 300, `${what}: ${message.length} characters`)
    t.match(message, /^input[.[]/, what)
  }
  t.match(named(strings, { [long]: 1 }), /^input\.k{64}… must be string$/, 'the key\'s start, and a mark that it is cut')
  t.match(named(strings, { [' ' + long]: 1 }), /^input\[" k{63}"…\] must be string$/, 'quoted, and cut outside the quotes')
  // A deep path of long keys keeps its first and last segments.
  let schema: object = { type: 'string' }
  let value: unknown = 1
  for (let i = 0; i < 30; i++) { schema = { type: 'object', additionalProperties: schema }; value = { [`key ${i} ` + 'x'.repeat(80)]: value } }
  const deep = named(schema, value)
  t.ok(deep.length < 600, `a deep path: ${deep.length} characters`)
  t.match(deep, /^input\["key 29 x+"…\]\.….*\["key 0 x+"…\] must be string$/)
  // Without the value (Fastify's errors), a number is an index.
  t.equal(describeValidation([{ instancePath: '/items/3/a.b', message: 'must be string' }]), 'input.items.3["a.b"] must be string')
})

// A quoted key was JSON.stringify's, which leaves every character above U+001F as it is: a key
// holding U+2028 or U+0085 put a line break in the detail (and in the problem+json body: valid
// JSON, not one line), U+202E turned the rest of the message around on screen, and U+200B or
// U+FEFF hid in it. A key of control characters, each shown as \u0001, made a key of 64 characters
// 386 long, and a path of two such keys 800; without the value, a key of 10,000 digits was taken
// for an index and shown whole (10,023 characters).
t.test('a key\'s invisible, bidi and line-breaking characters are escaped, and what a key shows is bounded', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false, coerceTypes: false, useDefaults: true })
  const named = (schema: object, value: unknown): string => {
    const validate = ajv.compile(schema)
    t.notOk(validate(value), 'a value is refused')
    return describeValidation(validate.errors ?? [], 'input', { schema: validate.schema, value })
  }
  const strings = { type: 'object', additionalProperties: { type: 'string' } }
  for (const [key, shown] of [
    ['a\u2028b', 'a\\u2028b'], ['a\u2029b', 'a\\u2029b'], ['a\u0085b', 'a\\u0085b'], ['a\u007fb', 'a\\u007fb'],
    ['a\u202eevil', 'a\\u202eevil'], ['x\u2066y', 'x\\u2066y'], ['x\u200by', 'x\\u200by'], ['\ufeffa', '\\ufeffa'], ['a\u00adb', 'a\\u00adb'],
    ['p\u{f0000}', 'p\\udb80\\udc00'], ['a\ud800', 'a\\ud800'], ['a\nb', 'a\\nb'], ['é ü', 'é ü']
  ] as const) {
    const message = named(strings, { [key]: 1 })
    // Compared in ASCII: tap's own report of a raw U+2028 cut its stream.
    const ascii = (text: string): string => text.replace(/[^\x20-\x7e]/g, c => '<' + c.charCodeAt(0).toString(16) + '>')
    t.equal(ascii(message), ascii(`input["${shown}"] must be string`), `${ascii(key)} is shown ${ascii(shown)}`)
    const body = JSON.stringify(toProblem(new MantleError('VALIDATION_FAILED', message), RID).problem)
    t.notOk(/[\n\r\u0085\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]/u.test(body), `${ascii(shown)}: the problem+json body is one line, with nothing hidden`)
    t.same(JSON.parse(body).detail, message, 'and valid JSON')
  }
  const ctl = '\u0001'.repeat(10_000)
  t.ok(named(strings, { [ctl]: 1 }).length < 160, `a key of control characters: ${named(strings, { [ctl]: 1 }).length} characters`)
  const two = named({ type: 'object', additionalProperties: strings }, { [ctl]: { [ctl]: 1 } })
  t.ok(two.length < 300, `two of them: ${two.length} characters`)
  const three = named({ type: 'object', additionalProperties: { type: 'object', additionalProperties: strings } }, { [ctl]: { [ctl]: { [ctl]: 1 } } })
  t.ok(three.length < 300, `three of them: ${three.length} characters`)
  // Without the value (Fastify's errors), a number of more digits than an array's index has is a key.
  const digits = describeValidation([{ instancePath: '/' + '1'.repeat(10_000) + '/a', message: 'must be string' }])
  t.match(digits, /^input\["1{64}"…\]\.a must be string$/, `a key of 10,000 digits: ${digits.length} characters`)
  t.equal(describeValidation([{ instancePath: '/items/4294967294', message: 'must be string' }]), 'input.items.4294967294 must be string', 'an array\'s last index is an index')
})

t.test('describeValidation with hideDataKeys shows the keys the schema names, and [<key>] for the value\'s own', async t => {
  const ajv = new Ajv({ allErrors: false, strict: false })
  const schema = {
    type: 'object',
    required: ['byUser'],
    properties: {
      byUser: { type: 'object', additionalProperties: { type: 'object', required: ['score'], properties: { score: { type: 'integer' } } } },
      closed: { type: 'object', properties: { a: { type: 'string' } }, additionalProperties: false },
      names: { type: 'object', propertyNames: { pattern: '^[a-z]+$' } }
    }
  }
  const validate = ajv.compile(schema)
  const say = (value: unknown, hide: boolean): string => {
    t.notOk(validate(value))
    return describeValidation(validate.errors ?? [], 'output', { schema, value, hideDataKeys: hide })
  }
  const deep = { byUser: { 'bob@example.com': { score: 'high' } } }
  t.equal(say(deep, false), 'output.byUser["bob@example.com"].score must be integer', 'shown whole to the client')
  t.equal(say(deep, true), 'output.byUser[<key>].score must be integer')
  t.equal(say({ byUser: { 'bob@example.com': {} } }, true), 'output.byUser[<key>].score is required', 'a required name is the schema\'s')
  t.equal(say({ byUser: {}, closed: { 'carol@example.com': 1 } }, true), 'output.closed[<key>] is not allowed', 'an additional property is the value\'s')
  t.equal(say({ byUser: {}, names: { 'Dave Smith': 1 } }, true), 'output.names[<key>] is not allowed: the key must match pattern "^[a-z]+$"', 'a key propertyNames refused is the value\'s')
  t.equal(say({ byUser: { score: { score: 'x' } } }, true), 'output.byUser.score.score must be integer', 'a key that is a name the schema declares is shown')
})
