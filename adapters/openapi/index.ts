import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import swagger from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'
import { Ajv } from 'ajv'

export interface OpenApiOptions {
  version: string
  secured: boolean
}

type DocOperation = {
  requestBody?: { required?: boolean, content?: Record<string, { schema?: { required?: unknown } }> }
  parameters?: Array<{ name?: string, in?: string }>
  responses?: Record<string, { description?: string, headers?: Record<string, unknown> }>
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
 * What @fastify/swagger cannot know from a route's schemas, set on the document it builds:
 * - a body whose schema requires nothing may be left out (the gateway reads an absent body as
 *   `{}`), while @fastify/swagger marks every requestBody required;
 * - a cached query (one that takes If-None-Match) answers 304 with no body while the tag still
 *   matches, with the 2XX answer's cache headers: a 304 is not a 2XX, and clients generated from
 *   the document took it for an undocumented status.
 */
export function completeDocument (doc: { paths?: Record<string, Record<string, DocOperation>> }): void {
  for (const methods of Object.values(doc.paths ?? {})) {
    for (const op of Object.values(methods)) {
      const body = op.requestBody?.content?.['application/json']?.schema
      if (op.requestBody !== undefined && body !== undefined && acceptsEmpty(body)) op.requestBody.required = false
      if (op.responses !== undefined && op.parameters?.some(p => p.in === 'header' && p.name === 'if-none-match') === true) {
        const { 'x-cache': xCache, ETag, 'Cache-Control': cacheControl, Vary, 'x-request-id': requestId } = op.responses['2XX']?.headers ?? {}
        op.responses['304'] = {
          description: 'Not Modified: If-None-Match still matches the answer\'s ETag; no body',
          headers: { 'x-request-id': requestId, 'x-cache': xCache, ETag, 'Cache-Control': cacheControl, Vary }
        }
      }
    }
  }
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
      tags: [{ name: 'queries', description: 'Read operations' }, { name: 'mutations', description: 'Write operations' }],
      ...(opts.secured ? { components: { securitySchemes: { bearerAuth: { type: 'http', scheme: 'bearer', bearerFormat: 'JWT' } } } } : {})
    },
    // Shared schemas keep their own names (`Problem`) in components.
    transformObject: (document) => {
      const openapiObject = 'openapiObject' in document ? document.openapiObject : document.swaggerObject
      completeDocument(openapiObject as Parameters<typeof completeDocument>[0])
      return openapiObject
    },
    refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => typeof json.$id === 'string' ? json.$id : `def-${i}` }
  })
  await app.register(swaggerUi, { routePrefix: '/docs', uiConfig: { deepLinking: false } })
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger())
}

export default fp(openapiPlugin, { name: 'mantle-openapi', fastify: '5.x' })
