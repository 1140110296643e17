import { uuidv7 } from '../../ids.js'
import { TRPCError, type TRPC_ERROR_CODE_KEY, type TRPC_ERROR_CODE_NUMBER } from '@trpc/server'
import { TRPC_ERROR_CODES_BY_KEY } from '@trpc/server/rpc'
import { getHTTPStatusCodeFromError } from '@trpc/server/http'
import { MantleError, retryAfterOf, toProblem, type ErrorCode, type Problem } from '../../errors.js'

// The tRPC face encodes the pipeline's problems as tRPC errors, and tRPC's own refusals
// (unknown procedure, malformed input, wrong method) as contract codes: a client reads
// `data.code` and `data.httpStatus` the same whichever side refused.

/** `error.data` of every tRPC error this face sends. */
export interface MantleErrorData {
  /** The contract code (CONTRACT §5), e.g. VALIDATION_FAILED. */
  code: ErrorCode
  /** The status REST answers for the same call; also the HTTP status of the response. */
  httpStatus: number
  requestId: string
  path?: string
  /**
   * Seconds to wait before trying again, when the refusal asks for it (its Retry-After): over
   * WebSocket and SSE there is no header to carry it; over HTTP the header says it too.
   */
  retryAfter?: number
}

export interface MantleErrorShape {
  message: string
  code: TRPC_ERROR_CODE_NUMBER
  data: MantleErrorData
}

const STATUS_TO_TRPC: Readonly<Record<number, TRPC_ERROR_CODE_KEY>> = {
  400: 'BAD_REQUEST',
  401: 'UNAUTHORIZED',
  402: 'PAYMENT_REQUIRED',
  403: 'FORBIDDEN',
  404: 'NOT_FOUND',
  405: 'METHOD_NOT_SUPPORTED',
  408: 'TIMEOUT',
  409: 'CONFLICT',
  412: 'PRECONDITION_FAILED',
  413: 'PAYLOAD_TOO_LARGE',
  415: 'UNSUPPORTED_MEDIA_TYPE',
  422: 'UNPROCESSABLE_CONTENT',
  428: 'PRECONDITION_REQUIRED',
  429: 'TOO_MANY_REQUESTS',
  499: 'CLIENT_CLOSED_REQUEST',
  501: 'NOT_IMPLEMENTED',
  502: 'BAD_GATEWAY',
  503: 'SERVICE_UNAVAILABLE',
  504: 'GATEWAY_TIMEOUT'
}

/** The tRPC code for an HTTP status: another 4xx is BAD_REQUEST, another 5xx INTERNAL_SERVER_ERROR. */
export function trpcCodeOf (status: number): TRPC_ERROR_CODE_KEY {
  return STATUS_TO_TRPC[status] ?? (status >= 500 ? 'INTERNAL_SERVER_ERROR' : 'BAD_REQUEST')
}

/** A pipeline problem as a tRPC error; its headers (Retry-After) go on the HTTP response. */
export class ProblemError extends TRPCError {
  readonly problem: Problem
  readonly headers: Record<string, string> | null

  private constructor (problem: Problem, headers: Record<string, string> | null) {
    super({ code: trpcCodeOf(problem.status), message: problem.detail ?? problem.title })
    this.problem = problem
    this.headers = headers
  }

  /** Refusals come at a high rate and their stack is never shown: none is captured. */
  static of (problem: Problem, headers: Record<string, string> | null = null): ProblemError {
    const limit = Error.stackTraceLimit
    Error.stackTraceLimit = 0
    try {
      return new ProblemError(problem, headers)
    } finally {
      Error.stackTraceLimit = limit
    }
  }

  /** Any thrown value (a MantleError from identity or the event bus) as the contract says. */
  static from (err: unknown, requestId: string): ProblemError {
    if (err instanceof ProblemError) return err
    const { problem, headers } = toProblem(err, requestId)
    return ProblemError.of(problem, headers)
  }
}

const INTERNAL_DETAIL = 'The gateway could not complete the call'

/** @trpc/server's refusal of a WebSocket message of more calls than its maxBatchSize. */
export const BATCH_TOO_LONG = 'Batch call exceeds maximum size'

/** How @trpc/server's refusal of a WebSocket subscription whose id its connection runs begins. */
export const DUPLICATE_ID = 'Duplicate id '

/** What tRPC itself refused, in contract terms. */
function fromTrpc (error: TRPCError): { code: ErrorCode, status: number, detail: string } {
  const cause = error.cause
  if (cause instanceof SyntaxError) return { code: 'VALIDATION_FAILED', status: 400, detail: 'The input is not valid JSON' }
  switch (error.code) {
    case 'PARSE_ERROR':
      return { code: 'VALIDATION_FAILED', status: 400, detail: error.message === 'PARSE_ERROR' ? 'The message could not be parsed' : error.message }
    case 'BAD_REQUEST':
      // A WebSocket message batch over BFF_BATCH_MAX_CALLS: refused as an HTTP batch is.
      if (error.message === BATCH_TOO_LONG) return { code: 'PAYLOAD_TOO_LARGE', status: 413, detail: error.message }
      // `"input" needs to be an object when doing a batch call` is about the input's shape.
      return { code: error.message.includes('"input"') ? 'VALIDATION_FAILED' : 'BAD_REQUEST', status: 400, detail: error.message }
    case 'NOT_FOUND':
      return { code: 'NOT_FOUND', status: 404, detail: error.message }
    case 'UNAUTHORIZED':
      return { code: 'UNAUTHENTICATED', status: 401, detail: error.message }
    case 'FORBIDDEN':
      return { code: 'FORBIDDEN', status: 403, detail: error.message }
    case 'PAYLOAD_TOO_LARGE':
      return { code: 'PAYLOAD_TOO_LARGE', status: 413, detail: 'The request body is larger than the limit' }
    case 'UNSUPPORTED_MEDIA_TYPE':
      return { code: 'UNSUPPORTED_MEDIA_TYPE', status: 415, detail: error.message }
    case 'TOO_MANY_REQUESTS':
      return { code: 'RATE_LIMITED', status: 429, detail: error.message }
  }
  const status = getHTTPStatusCodeFromError(error)
  // METHOD_NOT_SUPPORTED (405), CLIENT_CLOSED_REQUEST (499), ...: other malformed requests.
  if (status < 500) return { code: 'BAD_REQUEST', status, detail: error.message }
  return { code: 'INTERNAL', status: 500, detail: INTERNAL_DETAIL }
}

/**
 * The one error shape of this face, for tRPC's errorFormatter and for the refusals Fastify
 * makes before tRPC runs. No stack trace, ever: `data` carries the contract fields only.
 */
export function errorShape (error: TRPCError, requestId: string | undefined, path?: string): MantleErrorShape {
  let code: ErrorCode
  let status: number
  let detail: string
  let id = requestId
  let headers: Record<string, string> | null = null
  if (error instanceof ProblemError) {
    ({ code, status } = error.problem)
    detail = error.problem.detail ?? error.problem.title
    id = error.problem.requestId
    headers = error.headers
  } else if (error.cause instanceof MantleError) {
    code = error.cause.code
    status = error.cause.statusCode
    detail = error.cause.message
    headers = error.cause.headers
  } else {
    ({ code, status, detail } = fromTrpc(error))
  }
  const data: MantleErrorData = { code, httpStatus: status, requestId: id ?? uuidv7() }
  if (path !== undefined) data.path = path
  const retryAfter = retryAfterOf(headers)
  if (retryAfter !== undefined) data.retryAfter = retryAfter
  return { message: detail, code: TRPC_ERROR_CODES_BY_KEY[trpcCodeOf(status)], data }
}

/** Whether an error is the gateway's own fault (logged), rather than a refusal. */
export function isInternal (error: TRPCError): boolean {
  if (error instanceof ProblemError) return error.problem.code === 'INTERNAL'
  if (error.cause instanceof MantleError) return error.cause.code === 'INTERNAL'
  return fromTrpc(error).code === 'INTERNAL'
}
