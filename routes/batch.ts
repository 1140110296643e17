import type { FastifyInstance } from 'fastify'
import { Ajv } from 'ajv'
import { AnswerBudget, runCall, callEnvelope } from '../adapters/face.js'
import { MantleError, refusalHeaders } from '../errors.js'
import { COMPRESSED_VARY, callKey, failureHeaders, headerConcerns, idempotencyKeyHeader, idempotencyKeyOf, problemResponse, refusalHeaderDoc, single, tooManyRequests, type HeaderConcerns } from '../adapters/rest/index.js'
import { ProblemSchema } from '../schemas/manifest.js'
import { clientRequestId } from '../ids.js'
import { addJsonBodyParser } from '../json-body.js'

// The batch body's own validator, without the coercion Fastify's Ajv does: a call id 1 was
// answered as "1", and ["x"] as "x" (a client matching results to its ids found none).
const strict = new Ajv({ coerceTypes: false, removeAdditional: false, strict: false })

export interface BatchOptions {
  maxCalls: number
  /** Adds the bearer security requirement to the OpenAPI document. */
  secured?: boolean
}

const CallSchema = {
  type: 'object',
  required: ['id', 'op'],
  additionalProperties: false,
  properties: {
    id: { type: 'string', minLength: 1, maxLength: 128, description: 'The call\'s id, distinct within the batch: its result carries it' },
    op: { type: 'string', minLength: 1, maxLength: 128, description: 'The operation\'s name (one the document does not list is that call\'s NOT_FOUND)' },
    // Any JSON value: one that is no object is that call's refusal, the pipeline's (audited), as
    // on every face, and null is no input (runCall); the batch's other calls run.
    input: { description: 'The operation\'s input, as one object (path parameters, query and body fields together); null or none: {}' }
  }
}

/**
 * The OpenAPI document's batch route (it was left out: a client generated from the document
 * could not send one). Its schemas are for the document only: the 200 is written by hand, and
 * the body is checked by the strict validator below, which the descriptions do not change.
 */
function documented (maxCalls: number, secured: boolean, on: HeaderConcerns): Record<string, unknown> {
  const error = {
    type: 'object',
    required: ProblemSchema.required,
    properties: { ...ProblemSchema.properties, retryAfter: { type: 'integer', description: 'Seconds to wait before sending the call again, on a refusal that asks for a wait' } }
  }
  const result = {
    type: 'object',
    required: ['id'],
    oneOf: [{ required: ['result'] }, { required: ['error'] }],
    properties: {
      id: { type: 'string' },
      result: { description: 'The operation\'s answer, shaped by its output schema' },
      error,
      replayed: { type: 'boolean', description: 'true when the outcome is the stored one of an earlier call with the same key (Idempotency-Key and call id)' },
      cache: { type: 'string', enum: ['hit', 'miss', 'stale'], description: 'Where a cached query\'s answer came from' }
    }
  }
  const refusals = ['VALIDATION_FAILED 400 (the body: not `{"calls":[...]}`, a key it does not take, call ids that repeat)']
  if (secured) refusals.push('UNAUTHENTICATED 401')
  refusals.push(`PAYLOAD_TOO_LARGE 413 (more than ${maxCalls} calls, or a body past the limit)`, 'UNSUPPORTED_MEDIA_TYPE 415')
  return {
    // Not a name an operation of the manifest may have (no `-` in those): two operations of one
    // document may not share an operationId.
    operationId: 'batch-calls',
    tags: ['batch'],
    summary: 'Several calls in one request',
    description: `At most ${maxCalls} calls, each run as if it came alone (its identity, roles, validation, limits, cache and audit entry), identical queries reaching the Kernel once. Each result carries its call's id, in the calls' order; a call refused or failed is its own error, and the batch answers 200.`,
    ...(secured ? { security: [{ bearerAuth: [] }] } : {}),
    headers: { type: 'object', properties: { 'idempotency-key': idempotencyKeyHeader(on, 'Each mutation of the batch runs, under the key and its call id,') } },
    response: {
      '2xx': {
        description: 'The calls\' results, in their order. Retry-After and RateLimit-* are those of the refused call that asks the longest wait, else RateLimit-* the HTTP guard\'s',
        // A refused call's wait: what a 5XX may carry (failureHeaders).
        headers: { 'x-request-id': { type: 'string', description: 'The request id; the calls\' are it, a dot and the call\'s index' }, ...failureHeaders(on), ...(on.compression ? { Vary: COMPRESSED_VARY } : {}) },
        type: 'object',
        required: ['results'],
        properties: { results: { type: 'array', items: result } }
      },
      ...(on.rateLimit ? { 429: tooManyRequests } : {}),
      '4xx': problemResponse(`A refusal of the whole batch (its code is stable): ${refusals.join(', ')}`, refusalHeaderDoc(secured, on)),
      // The Kernel's failures are the calls' own errors.
      '5xx': problemResponse(`A failure of the whole batch (its code is stable): INTERNAL 500${on.shedding ? ', OVERLOADED 503 (the instance sheds load)' : ''}`, failureHeaders(on))
    }
  }
}

/**
 * POST /api/v1/batch (CONTRACT §3): several calls in one request. Each runs the whole pipeline
 * on its own (identity, roles, validation, ... as if it came alone); identical query calls share
 * one Kernel call; results keep their ids and order. A call's failure is its own error entry.
 */
export default async function batchRoute (app: FastifyInstance, opts: BatchOptions): Promise<void> {
  // A call's input may hold a prototype key: that call's refusal, by its pipeline (json-body.ts).
  addJsonBodyParser(app, 'keep')
  // With the audit on: once the batch is whole, each call's refusal is its own (the audit stage).
  const reached = app.hasDecorator('audit') ? app.audit.reached : null
  app.post('/batch', {
    // Every call needs a token: none, or a refused one, is a 401 before the body is read.
    config: { identity: 'required' },
    schema: {
      ...documented(opts.maxCalls, opts.secured === true, headerConcerns(app)),
      body: {
        type: 'object',
        required: ['calls'],
        additionalProperties: false,
        properties: { calls: { type: 'array', minItems: 1, items: CallSchema } }
      }
    },
    // The headers' schema is the document's: a malformed Idempotency-Key is each mutation's own refusal.
    validatorCompiler: ({ schema, httpPart }) => httpPart === 'headers' ? () => true : strict.compile(schema),
    // Checked before validation: an oversized batch is refused whole, without running any call.
    preValidation: async (request) => {
      const calls = (request.body as { calls?: unknown } | null)?.calls
      if (Array.isArray(calls) && calls.length > opts.maxCalls) {
        throw new MantleError('PAYLOAD_TOO_LARGE', `A batch carries at most ${opts.maxCalls} calls`)
      }
    }
  }, async (request, reply) => {
    const { calls } = request.body as { calls: Array<{ id: string, op: string, input?: unknown }> }
    const memo = new Map<string, Promise<unknown>>()
    const authorization = request.headers.authorization
    const traceparent = single(request.headers.traceparent)
    const tracestate = single(request.headers.tracestate)
    const idempotencyKey = idempotencyKeyOf(request)
    const fromClient = clientRequestId(request.raw)
    // Results are matched to calls by id, and a call's idempotency key is made of its id.
    if (new Set(calls.map(call => call.id)).size !== calls.length) throw new MantleError('VALIDATION_FAILED', 'Each call of a batch needs an id of its own')
    reached?.(request)
    // Each call's audit entry waits for the budget's decision on its result (admit, below).
    const budget = new AnswerBudget()
    const outcomes = await Promise.all(calls.map(async (call, n) => await runCall(app, { requestId: `${request.id}.${n}`, reqId: request.id, protocol: 'batch', op: call.op, input: call.input, authorization, traceparent, tracestate, clientRequestId: fromClient, idempotencyKey: callKey(idempotencyKey, call.id), memo, caller: reply.raw, answer: budget })))
    // In the calls' order: which results are left out does not depend on when they came.
    const parts = outcomes.map((outcome, n) => callEnvelope(JSON.stringify(calls[n].id), budget.admit(outcome, app.pipeline.manifest.byName.get(calls[n].op)?.type === 'query', `${request.id}.${n}`)))
    // The refusals' Retry-After and RateLimit-* (the longest wait's), as on tRPC and GraphQL: a
    // client told RATE_LIMITED or OVERLOADED in the batch had no wait to go by. Never a call's
    // WWW-Authenticate: the answer is a 200, and the challenge belongs on a 401.
    const refused = refusalHeaders(outcomes.map(outcome => outcome.ok ? null : outcome.headers), false, false)
    if (refused !== null) reply.headers(refused)
    reply.type('application/json; charset=utf-8')
    return `{"results":[${parts.join(',')}]}`
  })
}
