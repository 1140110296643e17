import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import swagger from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'

export interface OpenApiOptions {
  version: string
  secured: boolean
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
    refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => typeof json.$id === 'string' ? json.$id : `def-${i}` }
  })
  await app.register(swaggerUi, { routePrefix: '/docs', uiConfig: { deepLinking: false } })
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger())
}

export default fp(openapiPlugin, { name: 'mantle-openapi', fastify: '5.x' })
