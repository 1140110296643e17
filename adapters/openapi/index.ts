import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import swagger from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'
import { precompressedAnswers, precompressedFiles } from './precompressed.js'
import { Ajv } from 'ajv'
import type { Operation } from '../../manifest.js'

export interface OpenApiOptions {
  version: string
  secured: boolean
}

type Content = Record<string, { schema?: Record<string, unknown> }>
type DocOperation = {
  operationId?: string
  requestBody?: { required?: boolean, content?: Content }
  parameters?: Array<{ name?: string, in?: string, schema?: Record<string, unknown> }>
  responses?: Record<string, { description?: string, headers?: Record<string, unknown>, content?: Content }>
}

// Keywords whose value is a schema, an array of schemas, or a map of names to schemas.
const SCHEMA_VALUED = new Set(['items', 'additionalItems', 'additionalProperties', 'not', 'if', 'then', 'else', 'contains', 'propertyNames', 'unevaluatedItems', 'unevaluatedProperties'])
const SCHEMA_LISTS = new Set(['allOf', 'anyOf', 'oneOf', 'prefixItems'])
const SCHEMA_MAPS = new Set(['properties', 'patternProperties', 'definitions', '$defs', 'dependentSchemas'])

/**
 * A manifest schema (JSON Schema draft-07, as Ajv checks it) in the dialect OpenAPI 3.1 declares
 * (2020-12): array `items` is `prefixItems` (and `additionalItems` is then `items`),
 * `dependencies` is `dependentRequired` / `dependentSchemas`, `definitions` is `$defs`, and
 * Ajv's `nullable: true` is `null` among the types. Copied into the document as they were, such
 * schemas were invalid there, and a nullable field read as not nullable.
 */
export function dialect2020 (schema: unknown): unknown {
  if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) return schema
  const out: Record<string, unknown> = {}
  const source = schema as Record<string, unknown>
  for (const [key, value] of Object.entries(source)) {
    if (key === 'items' && Array.isArray(value)) {
      out.prefixItems = value.map(dialect2020)
      if (source.additionalItems !== undefined) out.items = dialect2020(source.additionalItems)
    } else if (key === 'additionalItems') {
      // Read with an array `items` above; alone, draft-07 ignores it.
    } else if (key === 'dependencies' && value !== null && typeof value === 'object') {
      for (const [name, dependency] of Object.entries(value)) {
        const target = Array.isArray(dependency) ? 'dependentRequired' : 'dependentSchemas'
        out[target] = { ...(out[target] as object | undefined), [name]: Array.isArray(dependency) ? dependency : dialect2020(dependency) }
      }
    } else if (key === 'nullable') {
      if (value === true && typeof source.type === 'string') out.type = [source.type, 'null']
    } else if (key === 'type' && source.nullable === true && typeof value === 'string') {
      out.type ??= [value, 'null']
    } else if (SCHEMA_VALUED.has(key)) {
      out[key] = dialect2020(value)
    } else if (SCHEMA_LISTS.has(key) && Array.isArray(value)) {
      out[key] = value.map(dialect2020)
    } else if (SCHEMA_MAPS.has(key) && value !== null && typeof value === 'object') {
      out[key === 'definitions' ? '$defs' : key] = Object.fromEntries(Object.entries(value).map(([name, v]) => [name, dialect2020(v)]))
    } else {
      out[key] = value
    }
  }
  return out
}

/** Every schema of a content map, in the document's dialect. */
function contentIn2020 (content: Content | undefined): void {
  for (const media of Object.values(content ?? {})) if (media.schema !== undefined) media.schema = dialect2020(media.schema) as Record<string, unknown>
}

// Only asks whether `{}` is valid; the pipeline validates calls with each operation's own Ajv.
const probe = new Ajv({ strict: false, validateFormats: false })

/**
 * Whether a body schema admits `{}`, the input of an absent body: not only one with no required
 * field (an anyOf of required fields, minProperties: 1 do not).
 */
function acceptsEmpty (schema: { required?: unknown }): boolean {
  if (Array.isArray(schema.required) && schema.required.length > 0) return false
  try {
    return probe.validate(schema, {})
  } catch {
    // A schema this Ajv cannot compile (a $ref into the document's components, say).
    return true
  }
}

/**
 * The operations whose body may not be left out though its documented schema admits `{}`: with
 * path parameters, the body is documented without the rules over the whole input (anyOf,
 * minProperties, dependencies, ...), which the server checks on the path parameters and the
 * body together. When those rules refuse the path parameters alone (any values), an absent body
 * is refused whatever the path: `minProperties: 2` over an `id` in the path and a body field,
 * or `dependencies: { id: [name] }`, was documented an optional body, and the call without one
 * was a 400.
 */
export function bodiesNeeded (operations: readonly Operation[]): Set<string> {
  const needed = new Set<string>()
  // An Ajv of its own: an input's `$id`, compiled here, would be one acceptsEmpty's probe then
  // refuses to compile again with the body (and reads as a body that may be left out).
  const ajv = new Ajv({ strict: false, validateFormats: false })
  for (const op of operations) {
    if (!op.inputInBody || op.pathParams.length === 0) continue
    // Any value of a path parameter passes its own schema here: only the rules over the whole input are asked.
    const properties = { ...(op.input.properties as Record<string, unknown> | undefined), ...Object.fromEntries(op.pathParams.map(p => [p, true])) }
    try {
      if (!ajv.validate({ ...op.input, properties }, Object.fromEntries(op.pathParams.map(p => [p, ''])))) needed.add(op.name)
    } catch {
      // A schema this Ajv cannot compile: left to acceptsEmpty, as before.
    }
  }
  return needed
}

/**
 * What @fastify/swagger cannot know from a route's schemas, set on the document it builds
 * (and every schema in it in the dialect it declares, dialect2020):
 * - a body whose schema requires nothing may be left out (the gateway reads an absent body as
 *   `{}`), while @fastify/swagger marks every requestBody required; but not one whose
 *   operation's rules over the whole input refuse its path parameters alone (`needsBody`);
 * - every answer carries x-request-id, refusals too (the routes declare it on 2XX only);
 * - a cached GET query (one that takes If-None-Match) answers 304 with no body while the tag still
 *   matches, with the 2XX answer's cache headers: a 304 is not a 2XX, and clients generated from
 *   the document took it for an undocumented status; and the RateLimit-* of the 2XX, which a
 *   304 carries as its 200 would.
 */
export function completeDocument (doc: { paths?: Record<string, Record<string, DocOperation>>, components?: { schemas?: Record<string, unknown> } }, needsBody: ReadonlySet<string> = new Set()): void {
  const schemas = doc.components?.schemas
  if (schemas !== undefined) for (const name of Object.keys(schemas)) schemas[name] = dialect2020(schemas[name])
  for (const methods of Object.values(doc.paths ?? {})) {
    for (const [method, op] of Object.entries(methods)) {
      const body = op.requestBody?.content?.['application/json']?.schema
      if (op.requestBody !== undefined && body !== undefined && acceptsEmpty(body) && !(op.operationId !== undefined && needsBody.has(op.operationId))) op.requestBody.required = false
      contentIn2020(op.requestBody?.content)
      for (const parameter of op.parameters ?? []) if (parameter.schema !== undefined) parameter.schema = dialect2020(parameter.schema) as Record<string, unknown>
      for (const response of Object.values(op.responses ?? {})) contentIn2020(response.content)
      // Every answer carries x-request-id, a refusal too: the routes' schemas declare it on 2XX only.
      const requestIdHeader = op.responses?.['2XX']?.headers?.['x-request-id']
      if (requestIdHeader !== undefined) {
        for (const [status, response] of Object.entries(op.responses ?? {})) {
          if (status !== '2XX' && response.headers?.['x-request-id'] === undefined) response.headers = { 'x-request-id': requestIdHeader, ...response.headers }
        }
      }
      // A mutation's If-None-Match is the Kernel's, sent on to it: a 412, never a 304 (RFC 9110 §13.1.2).
      if (op.responses !== undefined && method === 'get' && op.parameters?.some(p => p.in === 'header' && p.name === 'if-none-match') === true) {
        const { 'x-cache': xCache, ETag, 'Cache-Control': cacheControl, Vary, 'x-request-id': requestId, ...others } = op.responses['2XX']?.headers ?? {}
        // RateLimit-* too (rate limits on): a 304 has passed the limits as its 200 would.
        const rateLimit = Object.fromEntries(Object.entries(others).filter(([name]) => name.startsWith('RateLimit-')))
        op.responses['304'] = {
          description: 'Not Modified: If-None-Match still matches the answer\'s ETag; no body',
          headers: { 'x-request-id': requestId, 'x-cache': xCache, ETag, 'Cache-Control': cacheControl, Vary, ...rateLimit }
        }
      }
    }
  }
}

/** Swagger UI's old address of its page, which it redirects to the page itself. */
const DOCS_INDEX = '/docs/static/index.html'

/**
 * Swagger UI redirects `/docs/static/index.html` to `/docs/` by rewriting the URL's end: one with
 * a query string or a trailing slash (which the router also takes) was redirected to itself, for
 * ever (a browser's "too many redirects"). Redirected here instead, its query string kept; its
 * other routes go on.
 */
function toDocsRoot (request: FastifyRequest, reply: FastifyReply, done: () => void): void {
  if (request.routeOptions.url !== DOCS_INDEX) {
    done()
    return
  }
  const query = request.url.indexOf('?')
  reply.redirect('/docs/' + (query === -1 ? '' : request.url.slice(query)))
}

/**
 * `/openapi.json` (OpenAPI 3.1 of every operation, built by @fastify/swagger from the routes'
 * compiled schemas) and `/docs`. Registered before the REST adapter so it sees its routes.
 */
async function openapiPlugin (app: FastifyInstance, opts: OpenApiOptions): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Mantle gateway',
        version: opts.version,
        description: 'Every Kernel operation of the manifest, served under /api/v1. Errors are RFC 7807 application/problem+json with a stable `code`.'
      },
      servers: [],
      tags: [{ name: 'queries', description: 'Read operations' }, { name: 'mutations', description: 'Write operations' }, { name: 'batch', description: 'Several operations\' calls in one request' }],
      ...(opts.secured ? { components: { securitySchemes: { bearerAuth: { type: 'http', scheme: 'bearer', bearerFormat: 'JWT' } } } } : {})
    },
    // Shared schemas keep their own names (`Problem`) in components.
    transformObject: (document) => {
      const openapiObject = 'openapiObject' in document ? document.openapiObject : document.swaggerObject
      completeDocument(openapiObject as Parameters<typeof completeDocument>[0], bodiesNeeded(app.pipeline.manifest.operations))
      return openapiObject
    },
    refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => typeof json.$id === 'string' ? json.$id : `def-${i}` }
  })
  // Swagger UI's files, compressed once each (precompressed.ts) when compression is on: a hook
  // of their own context, which runs before @fastify/compress's (a hook of each route).
  // The document itself, as JSON (/openapi.json, /docs/json) and YAML (/docs/yaml), is the same
  // text for the life of the process: compressed once per route and coding (precompressedAnswers).
  const compressing = app.hasPlugin('mantle-compression')
  const documents = compressing ? precompressedAnswers() : null
  const DOCUMENT_ROUTES = new Set(['/docs/json', '/docs/yaml'])
  await app.register(async (docs) => {
    if (compressing) {
      const files = precompressedFiles()
      docs.addHook('onSend', (request, reply, payload, done) => {
        if (DOCUMENT_ROUTES.has(request.routeOptions.url ?? '')) documents!(request, reply, payload, done)
        else files(request, reply, payload, done)
      })
    }
    await docs.register(swaggerUi, { routePrefix: '/docs', uiConfig: { deepLinking: false }, uiHooks: { preHandler: toDocsRoot } })
  })
  app.get('/openapi.json', { schema: { hide: true }, ...(documents === null ? {} : { onSend: documents }) }, async () => app.swagger())
}

export default fp(openapiPlugin, { name: 'mantle-openapi', fastify: '5.x' })
