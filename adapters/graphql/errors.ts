import { GraphQLError, type ExecutionResult, type GraphQLFormattedError } from 'graphql'
import mercurius from 'mercurius'
import { ErrorCodes, MantleError, refusalHeaders, retryAfterOf, toProblem, type ErrorCode, type Problem } from '../../errors.js'

// Every GraphQL error carries the contract's code, the REST status of the same failure and the
// request id in `extensions`, so a client handles GraphQL errors as it handles REST problems.

export interface ErrorExtensions { code: ErrorCode, status: number, requestId: string, retryAfter?: number }

/**
 * A failed call as the error of its field: the problem's detail, code, status and request id,
 * and its headers (Retry-After, RateLimit-*), which go on the HTTP response (errorFormatter).
 * A refusal that asks for a wait also carries it as `retryAfter` (whole seconds), as /ws frames
 * and tRPC errors do: a graphql-ws message has no header to say it in, and over HTTP each field
 * has its own while the header says the longest.
 */
class FieldError extends mercurius.ErrorWithProps {
  constructor (problem: Problem, readonly headers: Record<string, string> | null) {
    const extensions: ErrorExtensions = { code: problem.code, status: problem.status, requestId: problem.requestId }
    const retryAfter = retryAfterOf(headers)
    if (retryAfter !== undefined) extensions.retryAfter = retryAfter
    super(problem.detail ?? problem.title, extensions)
  }
}

export function fieldError (problem: Problem, headers: Record<string, string> | null = null): Error {
  return new FieldError(problem, headers)
}

/** The headers a refusal asks for on the response: a field's, or a hook's (a limit, shutdown). */
function headersOf (error: GraphQLError): Record<string, string> | null {
  const original = error.originalError
  return original instanceof FieldError || original instanceof MantleError ? original.headers : null
}

const isContractCode = (code: unknown): code is ErrorCode => typeof code === 'string' && Object.hasOwn(ErrorCodes, code)

/**
 * Whether an error of execution is graphql's refusal of a field's arguments as the variables make
 * them (graphql-js' getArgumentValues, and graphql-jit's, word for word: `Argument "id" of non-null
 * type "String!" must not be null.`): a variable of a nullable type with a default may stand
 * where a non-null value is wanted, and a `null` the client sends for it is refused only as the
 * field runs, before its resolver. The client's mistake, not an answer the schema cannot carry:
 * it was a KERNEL_ERROR (502), no call having run. Serialization errors never begin so.
 */
function isArgumentError (error: GraphQLError): boolean {
  return error.message.startsWith('Argument "')
}

/** Where mercurius wraps the errors of a refused document (parse, validation, variables). */
interface Wrapped { errors?: unknown, statusCode?: unknown }

/**
 * One error in the contract's shape. Errors that already carry a contract code (a failed call,
 * a limit) keep it. GraphQL's own errors are VALIDATION_FAILED when the document was refused
 * (syntax, validation, variables) or a field's arguments were (isArgumentError), and KERNEL_ERROR
 * when they come from execution otherwise: resolvers
 * only throw contract errors, so these are answers the schema cannot serialize (an enum value
 * the manifest does not list), as runCall says of answers its output schema refuses. Other
 * errors (Fastify's: body too large, wrong media type, malformed JSON) map as REST maps them.
 */
function formatOne (error: GraphQLError, refused: boolean, requestId: string, log: (err: unknown) => void): GraphQLFormattedError {
  // Documents are parsed without locations (PARSE_OPTIONS): graphql-jit's errors then carry an
  // empty `locations`, which says nothing and is left out, as graphql-js' own errors leave it.
  const full = error.toJSON()
  const { locations, ...unlocated } = full
  const json: GraphQLFormattedError = locations?.length === 0 ? unlocated : full
  // graphql-jit's errors (a JIT-compiled document run without a required variable) have no
  // extensions: a 500 before this fallback, found by `npm run fuzz`.
  const ext: GraphQLError['extensions'] = error.extensions ?? {}
  if (isContractCode(ext.code)) {
    return { ...json, extensions: { ...ext, status: typeof ext.status === 'number' ? ext.status : ErrorCodes[ext.code].status, requestId: typeof ext.requestId === 'string' ? ext.requestId : requestId } }
  }
  const original = error.originalError
  if (original === undefined || original instanceof GraphQLError) {
    return { ...json, extensions: refused || isArgumentError(error) ? { code: 'VALIDATION_FAILED', status: 400, requestId } : { code: 'KERNEL_ERROR', status: 502, requestId } }
  }
  const { problem, headers } = toProblem(original, requestId)
  if (problem.code === 'INTERNAL') log(original)
  // A refusal of the whole request (the guard, load shedding, shutdown) that asks for a wait says
  // it here too, as a field's refusal does (FieldError).
  const retryAfter = retryAfterOf(headers)
  const extensions = { code: problem.code, status: problem.status, requestId, ...(retryAfter === undefined ? {} : { retryAfter }) }
  return { ...json, message: problem.detail ?? problem.title, extensions }
}

/** Flattens mercurius' wrapper of a refused document (parse, validation, GET mutation) into its errors. */
function flatten (errors: readonly GraphQLError[], requestId: string): GraphQLError[] {
  const out: GraphQLError[] = []
  for (const error of errors) {
    const wrapped = error.originalError as Wrapped | undefined
    if (wrapped === undefined || !Array.isArray(wrapped.errors)) {
      out.push(error)
      continue
    }
    const { problem } = toProblem(wrapped, requestId)
    for (const inner of wrapped.errors as Error[]) {
      // A document whose values nest thousands deep overflows graphql-js's recursion: the
      // runtime's own words ("Maximum call stack size exceeded") are no answer to a client.
      const message = inner instanceof RangeError ? 'The document nests its values too deeply' : inner.message
      out.push(inner instanceof GraphQLError ? inner : new GraphQLError(message, { extensions: { code: problem.code, status: problem.status } }))
    }
  }
  return out
}

/**
 * graphql-js' suggestion at the end of a message (didYouMean: ' Did you mean "a", "b", or "c"?',
 * 'the enum value "X"', 'to use an inline fragment on "T"'): names of the schema, quoted.
 */
const SUGGESTION = / Did you mean (?:the enum value |to use an inline fragment on )?"[_A-Za-z][_0-9A-Za-z]*"(?:, "[_A-Za-z][_0-9A-Za-z]*")*(?:,? or "[_A-Za-z][_0-9A-Za-z]*")?\?$/

/**
 * `message` without graphql-js' suggestion of names near a misspelt one: with introspection
 * off, 'Did you mean "getAgent"?' let a client walk the schema a guess at a time.
 */
export function withoutSuggestion (message: string): string {
  return message.replace(SUGGESTION, '')
}

interface FormatterContext { reply?: { request: { id: string }, sent: boolean, headers: (h: Record<string, string>) => unknown }, request?: { id: string }, app: { log: { error: (obj: unknown, msg: string) => void }, errorAnswered?: (code: string, status: number) => void } }

/**
 * mercurius' errorFormatter. An answer with data (calls ran; some fields failed) is a 200, as
 * GraphQL over HTTP asks; a document refused before execution (no data) gets the status of its
 * first error: 400 for syntax, validation and variables, 413, 415 and 405 as Fastify and
 * mercurius say, and then no `data` entry at all.
 */
export function errorFormatter (execution: ExecutionResult & { errors: readonly GraphQLError[] }, context: unknown): { statusCode: number, response: ExecutionResult } {
  const ctx = context as FormatterContext
  const requestId = ctx.reply?.request.id ?? ctx.request?.id ?? ''
  const log = (err: unknown): void => ctx.app.log.error({ err, requestId }, 'unexpected GraphQL error')
  const errors = flatten(execution.errors, requestId)
  const refused = execution.data === undefined || execution.data === null
  const formatted = errors.map(e => formatOne(e, refused, requestId, log))
  const first = formatted[0]?.extensions?.status
  const statusCode = !refused ? 200 : typeof first === 'number' ? first : 400
  // Over HTTP, the refusals' Retry-After and RateLimit-* go on the response, as on tRPC: of
  // several, the longest wait's. Their WWW-Authenticate only on a 401, as REST and tRPC send
  // it: a 200 with an UNAUTHENTICATED field says so in the field's error. A subscription's
  // errors (over WebSocket) have no reply. The replayed calls of a document of several calls
  // are not marked (README); one of one call is, by its resolver.
  const headers = refusalHeaders(errors.map(headersOf), false, statusCode === 401)
  if (headers !== null && ctx.reply !== undefined && !ctx.reply.sent) ctx.reply.headers(headers)
  // A document refused whole over HTTP (no call answered): counted as REST's refusals are
  // (mantle_http_errors_total); its calls' own errors are in their call metrics.
  if (refused && ctx.reply !== undefined) {
    const code = formatted[0]?.extensions?.code
    ctx.app.errorAnswered?.(typeof code === 'string' ? code : 'VALIDATION_FAILED', statusCode)
  }
  if (!refused) return { statusCode, response: { data: execution.data, errors: formatted as unknown as GraphQLError[] } }
  return { statusCode, response: { errors: formatted as unknown as GraphQLError[] } }
}

/** errorFormatter, leaving out graphql-js' suggestions unless `suggest` (introspection on). */
export function errorFormatterOf (suggest: boolean): typeof errorFormatter {
  if (suggest) return errorFormatter
  return (execution, context) => {
    const formatted = errorFormatter(execution, context)
    const errors = formatted.response.errors?.map(e => {
      const message = withoutSuggestion(e.message)
      return message === e.message ? e : { ...e, message }
    })
    return { statusCode: formatted.statusCode, response: { ...formatted.response, errors: errors as GraphQLError[] | undefined } }
  }
}
