import type { FastifyInstance } from 'fastify'
import { Ajv } from 'ajv'
import { AnswerBudget, runCall, callEnvelope } from '../adapters/face.js'
import { MantleError, refusalHeaders } from '../errors.js'
import { callKey, idempotencyKeyOf, single } from '../adapters/rest/index.js'
import { clientRequestId } from '../ids.js'

// The batch body's own validator, without the coercion Fastify's Ajv does: a call id 1 was
// answered as "1", and ["x"] as "x" (a client matching results to its ids found none).
const strict = new Ajv({ coerceTypes: false, removeAdditional: false, strict: false })

export interface BatchOptions {
  maxCalls: number
}

const CallSchema = {
  type: 'object',
  required: ['id', 'op'],
  additionalProperties: false,
  properties: {
    id: { type: 'string', minLength: 1, maxLength: 128 },
    op: { type: 'string', minLength: 1, maxLength: 128 },
    // Any JSON value: one that is no object is that call's refusal, the pipeline's (audited), as
    // on every face, and null is no input (runCall); the batch's other calls run.
    input: {}
  }
}

const problemContent = { content: { 'application/problem+json': { schema: { $ref: 'Problem#' } } } }

/**
 * POST /api/v1/batch (CONTRACT §3): several calls in one request. Each runs the whole pipeline
 * on its own (identity, roles, validation, ... as if it came alone); identical query calls share
 * one Kernel call; results keep their ids and order. A call's failure is its own error entry.
 */
export default async function batchRoute (app: FastifyInstance, opts: BatchOptions): Promise<void> {
  // With the audit on: once the batch is whole, each call's refusal is its own (the audit stage).
  const reached = app.hasDecorator('audit') ? app.audit.reached : null
  app.post('/batch', {
    // Every call needs a token: none, or a refused one, is a 401 before the body is read.
    config: { identity: 'required' },
    schema: {
      hide: true,
      body: {
        type: 'object',
        required: ['calls'],
        additionalProperties: false,
        properties: { calls: { type: 'array', minItems: 1, items: CallSchema } }
      },
      // 200 is written by hand below: each result is already JSON shaped by its op's schema.
      response: {
        '4xx': problemContent,
        '5xx': problemContent
      }
    },
    validatorCompiler: ({ schema }) => strict.compile(schema),
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
