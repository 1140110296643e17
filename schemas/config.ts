import { Type, type Static } from 'typebox'
import envSchema from 'env-schema'
import { fileURLToPath } from 'node:url'
import { parsePublicKeys } from '../plugins/auth/keys.js'

/** The demo manifest: the embedded default when BFF_MANIFEST is not set. */
export const DEMO_MANIFEST = fileURLToPath(new URL('../kernel/manifest.yaml', import.meta.url))
/** Outside production only: a known secret so `npm run token` mints tokens `npm start` accepts. */
export const DEV_JWT_SECRET = 'mantle-dev-secret-not-for-production-0000'

const Flag = (description: string) => Type.Boolean({ default: true, description })

export const ConfigSchema = Type.Object({
  PORT: Type.Integer({ minimum: 0, maximum: 65535, default: 3000, description: 'port the gateway listens on' }),
  HOST: Type.String({ minLength: 1, default: '127.0.0.1', description: 'address the gateway listens on' }),
  NODE_ENV: Type.Union([Type.Literal('development'), Type.Literal('production'), Type.Literal('test')], { default: 'development', description: 'development | production | test' }),
  LOG_LEVEL: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map(l => Type.Literal(l)), { default: 'info', description: 'fatal | error | warn | info | debug | trace | silent' }),
  BFF_MANIFEST: Type.String({ minLength: 1, default: DEMO_MANIFEST, description: 'path of the manifest (YAML or JSON)' }),
  KERNEL_URL: Type.Optional(Type.String({ pattern: '^https?://[^\\s/]+$', description: 'Kernel origin, http(s)://host:port, wins over the manifest' })),
  REDIS_URL: Type.Optional(Type.String({ pattern: '^rediss?://', description: 'Redis URL (redis://host:port/db): event fan-out across instances' })),
  BFF_AUTH_ENABLED: Flag('JWT identity, roles and zones'),
  BFF_TRPC_ENABLED: Flag('the tRPC face at /trpc'),
  BFF_GRAPHQL_ENABLED: Flag('the GraphQL face at /graphql'),
  BFF_WEBSOCKET_ENABLED: Flag('the WebSocket face at /ws'),
  BFF_GRAPHQL_MAX_DEPTH: Type.Integer({ minimum: 1, maximum: 100, default: 12, description: 'deepest GraphQL query accepted' }),
  BFF_BATCH_MAX_CALLS: Type.Integer({ minimum: 1, maximum: 1000, default: 50, description: 'most calls in one REST batch, tRPC batch or GraphQL document' }),
  BFF_INTERNAL_TOKEN: Type.Optional(Type.String({ minLength: 16, description: 'bearer token the Kernel uses to POST /internal/events (16 characters or more)' })),
  BFF_METRICS_ENABLED: Flag('Prometheus /metrics'),
  BFF_DIAGZ_ENABLED: Flag('/diagz (role system): rates, latency percentiles, per-stage and per-face figures, stores, breakers, memory'),
  BFF_COMPRESSION_ENABLED: Flag('br / gzip / deflate response compression of bodies over 1 KB'),
  BFF_LOAD_SHEDDING_ENABLED: Flag('503 OVERLOADED past the BFF_MAX_* bounds (@fastify/under-pressure)'),
  BFF_MAX_EVENT_LOOP_DELAY_MS: Type.Integer({ minimum: 0, default: 500, description: 'mean event-loop delay (ms, sampled each second) beyond which requests are shed; 0: not checked' }),
  BFF_MAX_HEAP_BYTES: Type.Optional(Type.Integer({ minimum: 0, description: 'heap used (bytes) beyond which requests are shed; default 90% of the V8 heap limit; 0: not checked' })),
  BFF_MAX_RSS_BYTES: Type.Integer({ minimum: 0, default: 0, description: 'resident memory (bytes) beyond which requests are shed; 0: not checked' }),
  BFF_OPENAPI_ENABLED: Flag('/openapi.json and /docs'),
  BFF_CIRCUIT_BREAKER_ENABLED: Flag('Kernel retries, circuit breaker and bulkhead'),
  BFF_CIRCUIT_BREAKER_THRESHOLD: Type.Optional(Type.Integer({ minimum: 1, description: 'consecutive Kernel failures that open the breaker (overrides the manifest)' })),
  BFF_CIRCUIT_BREAKER_TIMEOUT: Type.Optional(Type.Integer({ minimum: 1, description: 'ms the breaker stays open before one probe (overrides the manifest)' })),
  BFF_JWT_SECRET: Type.Optional(Type.String({ minLength: 1, description: 'HS256 secret (32 bytes or more in production)' })),
  BFF_JWT_PUBLIC_KEYS: Type.Optional(Type.String({ minLength: 1, description: 'RS256 / ES256 public keys by kid, a JSON object {"<kid>": "<PEM public key>"}' })),
  BFF_JWKS_URL: Type.Optional(Type.String({ pattern: '^https?://\\S+$', description: 'JWKS URL whose RS256 / ES256 signing keys are accepted by kid' })),
  BFF_JWT_ISSUER: Type.Optional(Type.String({ minLength: 1, description: 'required `iss` of tokens' })),
  BFF_JWT_AUDIENCE: Type.Optional(Type.String({ minLength: 1, description: 'required `aud` of tokens' })),
  BFF_CORS_ORIGINS: Type.Optional(Type.String({ minLength: 1, description: 'comma-separated allowed CORS origins (https://app.example.com, or *); unset: no CORS headers' })),
  BFF_BODY_LIMIT: Type.Integer({ minimum: 1, default: 1048576, description: 'largest request body in bytes (beyond it 413)' }),
  BFF_DEMO_KERNEL: Type.Boolean({ default: true, description: 'start the demo Kernel when KERNEL_URL is unset and the demo manifest is used' })
}, { additionalProperties: true })

export type Config = Static<typeof ConfigSchema>

export class ConfigError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'ConfigError'
  }
}

const describe = (name: string): string => {
  const prop = (ConfigSchema.properties as Record<string, { description?: string, type?: string, minimum?: number, maximum?: number }>)[name]
  if (prop === undefined) return 'a valid value'
  const range = prop.minimum !== undefined ? ` (${prop.minimum}${prop.maximum !== undefined ? '..' + prop.maximum : ' or more'})` : ''
  const kind = prop.type === 'boolean' ? 'true or false' : prop.type === 'integer' ? 'an integer' + range : (prop.description ?? 'a valid value')
  return kind
}

/**
 * Reads and validates the configuration once. A bad value throws one ConfigError whose message
 * names every bad variable and what it accepts; the returned object is frozen.
 */
export function loadConfig (env: Record<string, string | number | boolean | undefined> = process.env): Readonly<Config> {
  const data: Record<string, unknown> = {}
  for (const key of Object.keys(ConfigSchema.properties)) {
    const value = env[key]
    if (value !== undefined && value !== '') data[key] = value
  }
  let config: Config
  try {
    config = envSchema<Config>({ schema: ConfigSchema, data, dotenv: false })
  } catch (err) {
    const errors = (err as { errors?: Array<{ instancePath?: string, params?: { missingProperty?: string } }> }).errors ?? []
    const names = [...new Set(errors.map(e => (e.instancePath ?? '').replace(/^\//, '') || e.params?.missingProperty || '?'))]
    const parts = names.map(n => `${n}=${JSON.stringify(String(data[n] ?? ''))} is invalid: expected ${describe(n)}`)
    throw new ConfigError('Invalid configuration: ' + (parts.length > 0 ? parts.join('; ') : (err as Error).message))
  }
  if (config.BFF_JWT_PUBLIC_KEYS !== undefined) {
    try {
      parsePublicKeys(config.BFF_JWT_PUBLIC_KEYS)
    } catch (err) {
      throw new ConfigError('Invalid configuration: ' + (err as Error).message)
    }
  }
  if (config.BFF_CORS_ORIGINS !== undefined) {
    const bad = corsOrigins(config.BFF_CORS_ORIGINS).filter(o => o !== '*' && !ORIGIN.test(o))
    if (bad.length > 0 || corsOrigins(config.BFF_CORS_ORIGINS).length === 0) {
      throw new ConfigError(`Invalid configuration: BFF_CORS_ORIGINS=${JSON.stringify(config.BFF_CORS_ORIGINS)} is invalid: expected a comma-separated list of * or http(s) origins without a path` +
        (bad.length > 0 ? ` (bad: ${bad.map(b => JSON.stringify(b)).join(', ')})` : ''))
    }
  }
  return Object.freeze(config)
}

// An origin as browsers send it: scheme, host, optional port; no path, query, user or trailing slash.
const ORIGIN = /^https?:\/\/(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$/

/** The entries of BFF_CORS_ORIGINS, trimmed, empty ones dropped. */
export function corsOrigins (value: string): string[] {
  return value.split(',').map(o => o.trim()).filter(o => o !== '')
}

/** Production refuses settings that are only safe on a developer's machine. */
export function productionProblems (config: Config): string[] {
  if (config.NODE_ENV !== 'production') return []
  const problems: string[] = []
  if (config.BFF_AUTH_ENABLED) {
    if (config.BFF_JWT_SECRET !== undefined) {
      if (Buffer.byteLength(config.BFF_JWT_SECRET) < 32) problems.push('BFF_JWT_SECRET is shorter than 32 bytes')
    } else if (config.BFF_JWT_PUBLIC_KEYS === undefined && config.BFF_JWKS_URL === undefined) {
      problems.push('BFF_JWT_SECRET is missing (or set BFF_JWT_PUBLIC_KEYS or BFF_JWKS_URL)')
    }
  }
  if (config.BFF_CORS_ORIGINS !== undefined && corsOrigins(config.BFF_CORS_ORIGINS).includes('*')) {
    problems.push('BFF_CORS_ORIGINS contains * (any site could call the API from a browser): list the allowed origins')
  }
  return problems
}
