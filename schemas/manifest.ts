import { Type, type Static } from 'typebox'

// The manifest's own JSON Schema (CONTRACT §1). Unknown keys are refused everywhere except
// inside the JSON Schemas a manifest declares (input, output, payload, schemas), which are
// checked by Ajv when they are compiled.

// An operation's or event's name: a tRPC procedure and a GraphQL field, so not `__…`, which
// GraphQL reserves (compileManifest refuses both, each with its own message).
const Name = Type.String({ pattern: '^(?!__)[A-Za-z_][A-Za-z0-9_]*$' })
const JsonSchema = Type.Unsafe<Record<string, unknown>>(Type.Object({}, { additionalProperties: true }))
const ZoneSchema = Type.Union([Type.Literal('public'), Type.Literal('internal'), Type.Literal('restricted')])
const Roles = Type.Array(Type.String({ minLength: 1 }), { uniqueItems: true })
// Maxima: a number the gateway cannot honour is refused at load rather than served (a window of
// 1e300 ms answered 429 with `Retry-After: 2e+297`; a Redis expiry takes a 64-bit integer).
// A day for windows and freshness, as BFF_RATE_LIMIT_GLOBAL_WINDOW_MS and BFF_CACHE_TTL.
const DAY_MS = 86_400_000
const RateLimit = Type.Object({
  max: Type.Integer({ minimum: 1, maximum: 1_000_000_000 }),
  windowMs: Type.Integer({ minimum: 1, maximum: DAY_MS })
}, { additionalProperties: false })
const Cache = Type.Object({
  ttlSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 86_400 })),
  swrSeconds: Type.Optional(Type.Integer({ minimum: 0, maximum: 86_400 })),
  tags: Type.Optional(Type.Array(Type.String({ minLength: 1 }))),
  scope: Type.Optional(Type.Union([Type.Literal('tenant'), Type.Literal('user')], { description: 'Who shares an answer: every user of the tenant (the default), or only the user who asked' }))
}, { additionalProperties: false })
const Firewall = Type.Object({
  fields: Type.Array(Type.String({ minLength: 1 }), { minItems: 1 }),
  action: Type.Union([Type.Literal('block'), Type.Literal('redact'), Type.Literal('monitor')])
}, { additionalProperties: false })

export const RestRoutePattern = '^(GET|POST|PUT|PATCH|DELETE) (/[A-Za-z0-9_.~:-]*)+$'
export const KernelRoutePattern = '^(GET|POST|PUT|PATCH|DELETE) (/[A-Za-z0-9_.~{}-]*)+$'

export const OperationSchema = Type.Object({
  type: Type.Union([Type.Literal('query'), Type.Literal('mutation')]),
  rest: Type.String({ pattern: RestRoutePattern }),
  kernel: Type.String({ pattern: KernelRoutePattern }),
  input: Type.Optional(JsonSchema),
  output: JsonSchema,
  roles: Type.Optional(Roles),
  zone: Type.Optional(ZoneSchema),
  cache: Type.Optional(Cache),
  rateLimit: Type.Optional(RateLimit),
  firewall: Type.Optional(Firewall),
  invalidates: Type.Optional(Type.Array(Type.String({ minLength: 1 }))),
  timeoutMs: Type.Optional(Type.Integer({ minimum: 1, maximum: 600000 })),
  summary: Type.Optional(Type.String()),
  description: Type.Optional(Type.String()),
  deprecated: Type.Optional(Type.Boolean())
}, { additionalProperties: false })

export const EventSchema = Type.Object({
  topic: Type.String({ minLength: 1 }),
  payload: JsonSchema,
  roles: Type.Optional(Roles),
  zone: Type.Optional(ZoneSchema),
  description: Type.Optional(Type.String())
}, { additionalProperties: false })

export const ManifestSchema = Type.Object({
  version: Type.Literal(1),
  kernel: Type.Object({
    url: Type.String({ pattern: '^https?://[^\\s/?#@]+/?$' }),
    connections: Type.Optional(Type.Integer({ minimum: 1, maximum: 4096 })),
    timeoutMs: Type.Optional(Type.Integer({ minimum: 1, maximum: 600000 })),
    retries: Type.Optional(Type.Integer({ minimum: 0, maximum: 10 })),
    circuitBreaker: Type.Optional(Type.Object({
      threshold: Type.Integer({ minimum: 1, maximum: 1_000_000 }),
      resetTimeoutMs: Type.Integer({ minimum: 1, maximum: DAY_MS }),
      // The failure-rate rule (opt-in): minimumCalls and windowMs are read only with failureRate.
      failureRate: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 1 })),
      minimumCalls: Type.Optional(Type.Integer({ minimum: 1, maximum: 1_000_000 })),
      windowMs: Type.Optional(Type.Integer({ minimum: 100, maximum: DAY_MS }))
    }, { additionalProperties: false })),
    maxInFlight: Type.Optional(Type.Integer({ minimum: 1, maximum: 1_000_000 }))
  }, { additionalProperties: false }),
  defaults: Type.Optional(Type.Object({
    roles: Type.Optional(Roles),
    zone: Type.Optional(ZoneSchema),
    rateLimit: Type.Optional(RateLimit),
    timeoutMs: Type.Optional(Type.Integer({ minimum: 1, maximum: 600000 }))
  }, { additionalProperties: false })),
  schemas: Type.Optional(Type.Record(Type.String({ pattern: '^[A-Za-z_][A-Za-z0-9_]*$' }), JsonSchema)),
  operations: Type.Record(Type.String(), OperationSchema, { minProperties: 1 }),
  events: Type.Optional(Type.Record(Type.String(), EventSchema))
}, { additionalProperties: false })

export { Name as OperationNameSchema }
export type ManifestDocument = Static<typeof ManifestSchema>
export type OperationDocument = Static<typeof OperationSchema>
export type EventDocument = Static<typeof EventSchema>
export type Zone = Static<typeof ZoneSchema>

/** RFC 7807 body, as every route declares it for its 4xx and 5xx answers. */
export const ProblemSchema = {
  $id: 'Problem',
  type: 'object',
  required: ['type', 'title', 'status', 'code', 'requestId'],
  properties: {
    type: { type: 'string' },
    title: { type: 'string' },
    status: { type: 'integer' },
    code: { type: 'string' },
    detail: { type: 'string' },
    requestId: { type: 'string' }
  }
} as const
