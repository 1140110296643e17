import { Type, type Static } from 'typebox'
import envSchema from 'env-schema'
import { fileURLToPath } from 'node:url'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { isIP } from 'node:net'
import { isAsymmetricKey, parsePublicKeys, parseSecrets, SECRET_IS_A_KEY } from '../plugins/auth/keys.js'

/** The demo manifest: the embedded default when BFF_MANIFEST is not set. */
export const DEMO_MANIFEST = fileURLToPath(new URL('../kernel/manifest.yaml', import.meta.url))
/** Outside production only: a known secret so `npm run token` mints tokens `npm start` accepts. */
export const DEV_JWT_SECRET = 'mantle-dev-secret-not-for-production-0000'
/**
 * The credentials the repository's examples hold (.env.example, deploy/k8s/secret.example.yaml),
 * published with the source as DEV_JWT_SECRET is: production refuses each one (productionProblems).
 * A Secret applied from the example, or a .env copied with its lines uncommented, started a
 * production gateway that took tokens anyone could sign (role system included), or events for any
 * tenant from anyone at /internal/events. test/security/production.part.ts reads the examples'
 * values, so that one added there and not here fails it.
 */
export const EXAMPLE_SECRETS: Readonly<Record<'BFF_JWT_SECRET' | 'BFF_INTERNAL_TOKEN' | 'BFF_METRICS_TOKEN', readonly string[]>> = {
  BFF_JWT_SECRET: ['change-me-to-32-or-more-random-bytes', 'replace-with-48-random-bytes-in-base64-0123456789abcdef'],
  BFF_INTERNAL_TOKEN: ['change-me-internal-token', 'replace-with-a-random-token-0123456789'],
  BFF_METRICS_TOKEN: ['change-me-metrics-token']
}

const Flag = (description: string) => Type.Boolean({ default: true, description })
/**
 * A path: no whitespace around it, nor a line break in it. " " was read as a file or directory
 * named so in the working directory, and a templated value's trailing newline as part of the
 * name: the spool was kept in a directory beside the volume provisioned for it.
 */
const PATH = '^\\S(?:.*\\S)?$'

export const ConfigSchema = Type.Object({
  PORT: Type.Integer({ minimum: 0, maximum: 65535, default: 3000, description: 'port the gateway listens on' }),
  HOST: Type.String({ pattern: '^\\S+$', default: '127.0.0.1', description: 'address the gateway listens on, a host name or IP address (no spaces)' }),
  NODE_ENV: Type.Union([Type.Literal('development'), Type.Literal('production'), Type.Literal('test')], { default: 'development', description: 'development | production | test' }),
  LOG_LEVEL: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map(l => Type.Literal(l)), { default: 'info', description: 'fatal | error | warn | info | debug | trace | silent' }),
  BFF_MANIFEST: Type.String({ minLength: 1, pattern: PATH, default: DEMO_MANIFEST, description: 'path of the manifest (YAML or JSON), without spaces around it' }),
  // A slash after the origin is taken, as the manifest's kernel.url takes it (the Kernel client drops it).
  KERNEL_URL: Type.Optional(Type.String({ pattern: '^https?://[^\\s/?#@]+/?$', description: 'Kernel origin, http(s)://host:port, wins over the manifest' })),
  REDIS_URL: Type.Optional(Type.String({ pattern: '^rediss?://', description: 'Redis URL (redis://host:port/db): shared rate limits, cache, idempotency and event fan-out across instances' })),
  BFF_REDIS_COMMAND_TIMEOUT_MS: Type.Integer({ minimum: 10, maximum: 60000, default: 500, description: 'a Redis command slower than this fails and the store falls back to memory (ms)' }),
  BFF_AUTH_ENABLED: Flag('JWT identity, roles and zones'),
  BFF_TRPC_ENABLED: Flag('the tRPC face at /trpc'),
  BFF_GRAPHQL_ENABLED: Flag('the GraphQL face at /graphql'),
  BFF_WEBSOCKET_ENABLED: Flag('the WebSocket face at /ws'),
  BFF_GRAPHQL_MAX_DEPTH: Type.Integer({ minimum: 1, maximum: 100, default: 12, description: 'deepest GraphQL query accepted' }),
  // No default here: unset, it follows NODE_ENV (app.ts).
  BFF_GRAPHQL_INTROSPECTION: Type.Optional(Type.Boolean({ description: 'whether GraphQL introspection (__schema, __type) is answered; unset: on outside production, off in production' })),
  BFF_BATCH_MAX_CALLS: Type.Integer({ minimum: 1, maximum: 1000, default: 50, description: 'most calls in one REST batch, tRPC HTTP batch or GraphQL document' }),
  BFF_INTERNAL_TOKEN: Type.Optional(Type.String({ minLength: 16, pattern: '^[\\x21-\\x7e]+$', description: 'bearer token the Kernel uses to POST /internal/events (16 or more visible ASCII characters)' })),
  // At most the instance's own bound on event subscriptions (100,000), which a larger share could never reach.
  BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT: Type.Integer({ minimum: 1, maximum: 100000, default: 10000, description: 'event subscriptions one tenant may hold on an instance, its share of the instance\'s 100000 (beyond it 503 OVERLOADED); not applied with BFF_AUTH_ENABLED=false' }),
  // At most each face's own bound on WebSocket connections (100,000), which a larger share could never reach.
  BFF_WS_MAX_CONNECTIONS_PER_TENANT: Type.Integer({ minimum: 1, maximum: 100000, default: 10000, description: 'WebSocket connections one tenant may hold on an instance at each of /ws, /trpc and /graphql, its share of the face\'s 100000 (beyond it 503 OVERLOADED); not applied with BFF_AUTH_ENABLED=false' }),
  BFF_METRICS_ENABLED: Flag('Prometheus /metrics'),
  BFF_METRICS_TOKEN: Type.Optional(Type.String({ minLength: 16, pattern: '^[\\x21-\\x7e]+$', description: 'bearer token GET /metrics then requires (16 or more visible ASCII characters); unset: /metrics is open' })),
  BFF_DIAGZ_ENABLED: Flag('/diagz (role system): rates, latency percentiles, per-stage and per-face figures, stores, breakers, memory'),
  BFF_COMPRESSION_ENABLED: Flag('br / gzip / deflate response compression of bodies over 1 KB'),
  BFF_LOAD_SHEDDING_ENABLED: Flag('503 OVERLOADED past the BFF_MAX_* bounds (@fastify/under-pressure)'),
  BFF_MAX_EVENT_LOOP_DELAY_MS: Type.Integer({ minimum: 0, default: 500, description: 'mean event-loop delay (ms, sampled each second) beyond which requests are shed; 0: not checked' }),
  BFF_MAX_HEAP_BYTES: Type.Optional(Type.Integer({ minimum: 0, description: 'heap used (bytes) beyond which requests are shed; default 90% of the V8 old-generation limit (--max-old-space-size); 0: not checked' })),
  BFF_MAX_RSS_BYTES: Type.Integer({ minimum: 0, default: 0, description: 'resident memory (bytes) beyond which requests are shed; 0: not checked' }),
  BFF_OPENAPI_ENABLED: Flag('/openapi.json and /docs'),
  BFF_CIRCUIT_BREAKER_ENABLED: Flag('Kernel retries and circuit breaker (the bulkhead, kernel.maxInFlight, always applies)'),
  BFF_AI_FIREWALL_ENABLED: Flag('the AI firewall on the input fields operations name in `firewall`'),
  BFF_FIREWALL_CACHE_SIZE: Type.Integer({ minimum: 0, maximum: 1000000, default: 10000, description: 'AI firewall verdicts cached for identical payloads (0: no cache)' }),
  BFF_FIREWALL_WORKERS: Type.Integer({ minimum: 0, maximum: 64, default: 1, description: 'Worker threads that scan inputs over 8,192 characters for the AI firewall (0: every input on the event loop)' }),
  // The same bounds as the manifest's kernel.circuitBreaker, which these override.
  BFF_CIRCUIT_BREAKER_THRESHOLD: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000000, description: 'consecutive Kernel failures that open the breaker (overrides the manifest)' })),
  BFF_CIRCUIT_BREAKER_TIMEOUT: Type.Optional(Type.Integer({ minimum: 1, maximum: 86400000, description: 'ms the breaker stays open before one probe (overrides the manifest)' })),
  BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS: Type.Integer({ minimum: 100, maximum: 600000, default: 4000, description: 'ms an idle Kernel connection is kept for reuse when the Kernel sends no Keep-Alive timeout; keep it below the Kernel\'s own idle timeout' }),
  BFF_JWT_SECRET: Type.Optional(Type.String({ minLength: 1, description: 'HS256 secret of tokens without a kid (32 bytes or more in production)' })),
  BFF_JWT_SECRETS: Type.Optional(Type.String({ minLength: 1, description: 'HS256 secrets by kid, a JSON object {"<kid>": "<secret>"} (each 32 bytes or more in production); an HS256 token with a kid is verified with its secret' })),
  BFF_JWT_PUBLIC_KEYS: Type.Optional(Type.String({ minLength: 1, description: 'RS256 / ES256 public keys by kid, a JSON object {"<kid>": "<PEM public key>"}' })),
  BFF_JWKS_URL: Type.Optional(Type.String({ pattern: '^https?://\\S+$', description: 'JWKS URL whose RS256 / ES256 signing keys are accepted by kid' })),
  BFF_JWT_ISSUER: Type.Optional(Type.String({ minLength: 1, description: 'required `iss` of tokens' })),
  BFF_JWT_AUDIENCE: Type.Optional(Type.String({ minLength: 1, description: 'required `aud` of tokens' })),
  BFF_CORS_ORIGINS: Type.Optional(Type.String({ minLength: 1, description: 'comma-separated allowed CORS origins (https://app.example.com, or *); unset: no CORS headers' })),
  // At most 256 MiB: a JSON body is read into one string, and V8 strings stop at 2^29 - 24 characters.
  BFF_TRUST_PROXY: Type.Optional(Type.String({ minLength: 1, description: 'addresses and CIDR ranges of the proxies in front of the gateway whose X-Forwarded-For is believed, comma-separated' })),
  BFF_BODY_LIMIT: Type.Integer({ minimum: 1, maximum: 268435456, default: 1048576, description: 'largest request body in bytes (beyond it 413)' }),
  // A client that never finished sending its request held its connection for ever, and the shutdown with it.
  BFF_REQUEST_TIMEOUT_MS: Type.Integer({ minimum: 100, maximum: 3600000, default: 30000, description: 'longest a request (its head and body) may take to arrive, ms; beyond it 408 and the connection is closed' }),
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: Type.Optional(Type.String({ pattern: '^https?://\\S+$', description: 'OTLP/HTTP traces URL (e.g. http://collector:4318/v1/traces); with it, a span per call is exported' })),
  OTEL_EXPORTER_OTLP_ENDPOINT: Type.Optional(Type.String({ pattern: '^https?://\\S+$', description: 'OTLP/HTTP base URL; traces go to <it>/v1/traces (the _TRACES_ variable wins)' })),
  OTEL_SERVICE_NAME: Type.String({ minLength: 1, default: 'mantle', description: 'service.name of exported spans' }),
  BFF_TRACE_SAMPLE_RATIO: Type.Number({ minimum: 0, maximum: 1, default: 1, description: 'share of new traces recorded, 0..1 (a caller\'s sampled flag is followed)' }),
  BFF_RATE_LIMIT_ENABLED: Flag('rate limits: the manifest\'s per-operation limits and the HTTP guard'),
  BFF_RATE_LIMIT_STORE: Type.Optional(Type.Union([Type.Literal('memory'), Type.Literal('redis')], { description: 'memory | redis (default: redis when REDIS_URL is set, else memory)' })),
  BFF_RATE_LIMIT_GLOBAL_MAX: Type.Optional(Type.Integer({ minimum: 1, description: 'requests per window the HTTP guard lets through per tenant (per address without a valid token); unset: no guard' })),
  // At most a day, far beyond any useful guard window: Redis' sliding window sets PEXPIRE to twice the
  // window, which Redis refuses past its largest expiry (every check would then fall back to memory).
  BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: Type.Integer({ minimum: 1, maximum: 86400000, default: 60000, description: 'the HTTP guard\'s sliding window, ms' }),
  BFF_IDEMPOTENCY_ENABLED: Flag('idempotency keys for mutations (Idempotency-Key header, WebSocket idempotencyKey)'),
  BFF_IDEMPOTENCY_STORE: Type.Optional(Type.Union([Type.Literal('memory'), Type.Literal('redis')], { description: 'memory | redis (default: redis when REDIS_URL is set, else memory)' })),
  // At most 30 days: * 1000 is the PX of every stored outcome, and Redis refuses an expiry past 2^63 ms.
  BFF_IDEMPOTENCY_TTL_SECONDS: Type.Integer({ minimum: 1, maximum: 2592000, default: 86400, description: 'seconds a stored outcome answers repeats of its key' }),
  // At most 10 million: the LRU allocates its index arrays for `max` keys at start-up (1e9 runs out of heap).
  BFF_IDEMPOTENCY_MAX_KEYS: Type.Integer({ minimum: 1, maximum: 10000000, default: 100000, description: 'most keys the memory idempotency store holds, for all tenants together, shared fairly' }),
  // Unset: BFF_IDEMPOTENCY_MAX_KEYS, what the memory store holds for all tenants together.
  BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT: Type.Optional(Type.Integer({ minimum: 1, maximum: 100000000, description: 'most idempotency records (running or stored) one tenant holds in Redis; past it its new keys are refused 429 (default: BFF_IDEMPOTENCY_MAX_KEYS)' })),
  BFF_IDEMPOTENCY_WAIT_MS: Type.Optional(Type.Integer({ minimum: 0, maximum: 600000, description: 'longest a repeat waits for the first call with its key before 409 (default: the op timeout)' })),
  BFF_CACHE_ENABLED: Flag('the response cache of query operations that declare `cache`'),
  BFF_CACHE_STORE: Type.Optional(Type.Union([Type.Literal('memory'), Type.Literal('redis')], { description: 'memory | redis (default: redis when REDIS_URL is set, else memory)' })),
  BFF_CACHE_TTL: Type.Integer({ minimum: 1, maximum: 86400, default: 60, description: 'seconds an answer stays fresh when the operation\'s cache sets no ttlSeconds' }),
  BFF_CACHE_MAX_SIZE: Type.Integer({ minimum: 1, maximum: 10000000, default: 10000, description: 'most entries of the in-process cache tier (LRU)' }),
  BFF_CACHE_MAX_BYTES: Type.Integer({ minimum: 1048576, maximum: 17179869184, default: 67108864, description: 'most bytes of answers the in-process cache tier holds (about; an answer over an eighth of it is not kept there)' }),
  // Unset: BFF_CACHE_MAX_BYTES, what the in-process tier holds for all tenants together.
  BFF_CACHE_REDIS_MAX_BYTES_PER_TENANT: Type.Optional(Type.Integer({ minimum: 1024, maximum: 1099511627776, description: 'most bytes one tenant\'s cached answers take in Redis (each counted as its key three times, its stored text, and 192 more); past it an answer is not written there (default: BFF_CACHE_MAX_BYTES)' })),
  DATABASE_URL: Type.Optional(Type.String({ pattern: '^postgres(ql)?://', description: 'PostgreSQL URL (postgres://user@host:5432/db): the audit trail with BFF_AUDIT_STORE=postgres' })),
  BFF_AUDIT_ENABLED: Flag('the hash-chained audit trail of every call'),
  BFF_AUDIT_STORE: Type.Union([Type.Literal('memory'), Type.Literal('postgres')], { default: 'memory', description: 'memory | postgres (postgres needs DATABASE_URL)' }),
  // At most 100 years: now - days is a Date, and past ~1e8 days it is an Invalid Date every prune fails on.
  BFF_AUDIT_RETENTION_DAYS: Type.Integer({ minimum: 1, maximum: 36500, default: 90, description: 'days audit entries are kept' }),
  BFF_AUDIT_BATCH_SIZE: Type.Integer({ minimum: 1, maximum: 10000, default: 500, description: 'most audit entries in one INSERT' }),
  // At most a million (20 times the default): the queue lives in the heap, and a bound much past it
  // would let the heap run out before the queue is ever spooled.
  BFF_AUDIT_QUEUE_MAX: Type.Integer({ minimum: 1, maximum: 1000000, default: 50000, description: 'audit entries waiting in memory before the queue is spooled to disk' }),
  BFF_AUDIT_SPOOL_DIR: Type.String({ minLength: 1, pattern: PATH, default: join(tmpdir(), 'mantle-audit-spool'), description: 'directory of the audit spool file (one per gateway instance), without spaces around it' }),
  // At most 10 million: the store indexes its entries in Sets, which V8 caps at 2^24 (16.7 million) entries.
  BFF_AUDIT_MEMORY_MAX: Type.Integer({ minimum: 1, maximum: 10000000, default: 100000, description: 'most entries the memory audit store keeps (the oldest are dropped)' }),
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

/** How a numeric variable is written: decimal digits (Ajv's coercion also took 0x10, 1e3, " 80", +80, 80.0). */
export const INTEGER_TEXT = /^[0-9]+$/
/** Decimal digits with a point (the demo Kernel's delay). */
export const DECIMAL_TEXT = /^(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)$/
/** A ratio may also be written with an exponent, as OpenTelemetry's examples do (1e-2). */
export const NUMBER_TEXT = /^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$/

/**
 * Reads and validates the configuration once. A bad value throws one ConfigError whose message
 * names every bad variable and what it accepts, from every check at once (the schema's, then
 * those it cannot express, on the values it accepted); the returned object is frozen.
 * With `starting` (the gateway's start-up) and NODE_ENV=production, that message also names what
 * production refuses (productionProblems, and the demo Kernel's refusal) among the valid values:
 * with a bad value beside them, they were named only on the next run.
 */
export function loadConfig (env: Record<string, string | number | boolean | undefined> = process.env, options: { starting?: boolean } = {}): Readonly<Config> {
  const data: Record<string, unknown> = {}
  for (const key of Object.keys(ConfigSchema.properties)) {
    const value = env[key]
    if (value !== undefined && value !== '') data[key] = value
  }
  // As given: Ajv coerces `data` in place.
  const given: Readonly<Record<string, unknown>> = { ...data }
  const problems: string[] = []
  const bad = new Set<string>()
  const refuse = (name: string, expected: string, why?: string): void => {
    bad.add(name)
    problems.push(refusalOf(name, String(given[name] ?? ''), expected, why))
  }
  const fail = (): ConfigError => new ConfigError('Invalid configuration: ' + problems.join('; '))
  let config: Config
  try {
    config = envSchema<Config>({ schema: ConfigSchema, data, dotenv: false, env: false })
  } catch (err) {
    const errors = (err as { errors?: Array<{ instancePath?: string, params?: { missingProperty?: string } }> }).errors ?? []
    const names = [...new Set(errors.map(e => (e.instancePath ?? '').replace(/^\//, '') || e.params?.missingProperty || '?'))]
    if (names.length === 0) problems.push((err as Error).message)
    for (const name of names) refuse(name, describe(name))
    // The rest is validated again without the refused values, by the same validator, so that
    // the checks below run on every value it accepts: one message names every bad variable.
    const rest = Object.fromEntries(Object.entries(given).filter(([name]) => !bad.has(name)))
    try {
      config = envSchema<Config>({ schema: ConfigSchema, data: rest, dotenv: false, env: false })
    } catch {
      throw fail()
    }
  }
  for (const [name, schema] of Object.entries(ConfigSchema.properties) as Array<[keyof Config, { type?: unknown }]>) {
    if (bad.has(name) || (schema.type !== 'integer' && schema.type !== 'number')) continue
    const text = given[name]
    if (typeof text === 'string' && !(schema.type === 'integer' ? INTEGER_TEXT : NUMBER_TEXT).test(text)) {
      refuse(name, describe(name), schema.type === 'integer' ? 'written in decimal digits only' : 'written as a decimal number')
    } else if (typeof config[name] === 'number' && !(schema.type === 'integer' ? Number.isSafeInteger(config[name]) : Number.isFinite(config[name]))) {
      // Ajv coerces "Infinity" and "1e400" to Infinity, which its integer type admits and its bounds
      // then compare as the text they were: BFF_RATE_LIMIT_GLOBAL_MAX=Infinity became a guard of 1000.
      refuse(name, describe(name))
    }
  }
  // The schema's patterns only check the scheme: a URL the gateway cannot use (a port past 65535,
  // a Redis database that is not a number) must stop start-up here, naming the variable, not
  // fail later inside a client with a bare "Invalid URL" or an uncaught Redis error.
  for (const { name, expected, check } of URL_VARIABLES) {
    const value = config[name]
    const why = value === undefined || bad.has(name) ? null : urlProblem(value, check)
    if (why !== null) refuse(name, expected, why)
  }
  // The schema only refuses spaces: HOST=0.0.0.0:3000, http://0.0.0.0 or foo_bar! failed at
  // listen with a bare "getaddrinfo ENOTFOUND ..." that did not name HOST. HOST=0, the shorthand
  // of some tools for 0.0.0.0, is no port written in HOST: its hint names the address to write.
  // Any other name of numbers (127.0.1, 0x7f.1, 10.0.0.256) is an IPv4 address written wrong.
  if (!bad.has('HOST') && !isListenHost(config.HOST)) {
    const host = config.HOST
    refuse('HOST', 'an IP address (0.0.0.0, ::, 127.0.0.1, ...) or a host name (localhost, ...), without a scheme or port',
      host.includes('://') ? 'a URL, not an address' : /^\[.*\]$/.test(host) ? 'an IPv6 address is written without brackets' : /^0+$/.test(host) ? 'every IPv4 address is 0.0.0.0, every address ::' : /:\d*$/.test(host) || /^[0-9]+$/.test(host) ? 'the port goes in PORT' : host.split('.').every(label => NUMBER_LABEL.test(label)) ? 'an IPv4 address is four numbers 0..255' : undefined)
  }
  // fast-jwt compares a token's iss and aud with these exactly: blank, or with spaces around it
  // (a secret's trailing newline), every token an identity provider signs was refused 401.
  for (const [name, claim] of [['BFF_JWT_ISSUER', 'iss'], ['BFF_JWT_AUDIENCE', 'aud']] as const) {
    const value = config[name]
    if (value === undefined || bad.has(name)) continue
    if (value.trim() !== value) {
      refuse(name, `the \`${claim}\` tokens must carry, without spaces around it`, value.trim() === ''
        ? `blank: no token carries it, so every token would be refused; leave ${name} unset for no ${claim} check`
        : 'tokens carry it without them, so every token would be refused')
      continue
    }
    // Copied from a console, a zero-width space or a control character stays invisible in the
    // value (trim() keeps it) and in its echo; and a list (api-a,api-b) is compared whole with a
    // token's one value: either way every token was refused 401, with no word at start-up.
    const hidden = /[\p{Cc}\p{Cf}\u2028\u2029]/u.exec(value)
    if (hidden !== null) {
      refuse(name, `the \`${claim}\` tokens must carry`, `it holds an invisible character, U+${hidden[0].codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}: tokens do not carry it, so every token would be refused`)
    } else if (name === 'BFF_JWT_AUDIENCE' && value.includes(',')) {
      refuse(name, 'the one `aud` tokens must carry', 'a list is not supported: the whole value is compared with a token\'s `aud`, so every token would be refused; set the audience your identity provider puts in tokens for this gateway')
    }
  }
  if (config.BFF_JWT_PUBLIC_KEYS !== undefined) {
    try {
      parsePublicKeys(config.BFF_JWT_PUBLIC_KEYS)
    } catch (err) {
      bad.add('BFF_JWT_PUBLIC_KEYS')
      problems.push((err as Error).message)
    }
  }
  // Its messages name the kid, never a secret (parseSecrets).
  if (config.BFF_JWT_SECRETS !== undefined && !bad.has('BFF_JWT_SECRETS')) {
    try {
      parseSecrets(config.BFF_JWT_SECRETS)
    } catch (err) {
      bad.add('BFF_JWT_SECRETS')
      problems.push((err as Error).message)
    }
  }
  // HS256 is an HMAC keyed with the secret's text: an IdP's public key put here (its PEM, the bare
  // base64 Keycloak shows, its JWK) made a secret anyone who fetched that key had, who then signed
  // HS256 tokens of any tenant and role that the gateway took.
  if (config.BFF_JWT_SECRET !== undefined && !bad.has('BFF_JWT_SECRET') && isAsymmetricKey(config.BFF_JWT_SECRET)) {
    refuse('BFF_JWT_SECRET', 'an HS256 secret (32 random bytes or more), not a key', SECRET_IS_A_KEY)
  }
  if (config.BFF_CORS_ORIGINS !== undefined) {
    // URL.canParse: the pattern takes any 5 digits as a port, WHATWG URL only 0..65535.
    const entries = corsOrigins(config.BFF_CORS_ORIGINS)
    // @fastify/cors compares an entry with the Origin header exactly, and browsers send an origin
    // in its one form (host in lower case, no default port, an IDN in punycode, no path):
    // https://App.Example.com or https://app.example.com:443 matched no request, and the front end
    // got opaque CORS errors. An entry of which a browser's origin can be told is named with it.
    const unlike = new Map(entries.filter(o => o !== '*').map(o => [o, browserOrigin(o)] as const).filter((e): e is readonly [string, string] => e[1] !== null))
    const wrong = entries.filter(o => o !== '*' && !unlike.has(o) && !(ORIGIN.test(o) && URL.canParse(o)))
    // "null" is what a file:// page or a sandboxed frame sends (the commonest try for a page opened
    // from disk): refused as any non-origin is, with why, as allowing it allows every such page.
    const hints = [...unlike].map(([o, origin]) => `${JSON.stringify(o)} matches no browser's Origin: write ${JSON.stringify(origin)}`)
    if (wrong.some(o => o.toLowerCase() === 'null')) hints.push('"null", the Origin of file:// pages and sandboxed frames, which any site can open, is never allowed: serve the page from an http(s) origin and name that')
    if (wrong.length > 0 || unlike.size > 0 || entries.length === 0) {
      refuse('BFF_CORS_ORIGINS', 'a comma-separated list of * or http(s) origins without a path, as browsers send them' +
        (wrong.length > 0 ? ` (bad: ${wrong.map(b => JSON.stringify(b)).join(', ')})` : ''),
      hints.length > 0 ? hints.join('; ') : undefined)
    }
  }
  if (config.BFF_TRUST_PROXY !== undefined) {
    const entries = listEntries(config.BFF_TRUST_PROXY)
    const wrong = entries.filter(entry => !isProxyRange(entry))
    if (wrong.length > 0 || entries.length === 0) {
      refuse('BFF_TRUST_PROXY', 'comma-separated addresses and CIDR ranges of the proxies (no hop count, no /0: a client reaching the gateway directly could then pick its own address)',
        wrong.length > 0 ? `bad: ${wrong.map(b => JSON.stringify(b)).join(', ')}` : 'it names none')
    }
  }
  // A store named redis needs the Redis to talk to (a REDIS_URL refused above is named already);
  // its feature off, it talks to nothing, and startWarnings says the setting is not used.
  for (const name of STORE_VARIABLES) {
    if (config[name] === 'redis' && featureOn(config, name) && config.REDIS_URL === undefined && !bad.has('REDIS_URL')) {
      problems.push(`${name}="redis" needs REDIS_URL: set REDIS_URL, or ${name}=memory`)
    }
  }
  if (config.BFF_AUDIT_ENABLED && config.BFF_AUDIT_STORE === 'postgres' && config.DATABASE_URL === undefined && !bad.has('DATABASE_URL')) {
    problems.push('BFF_AUDIT_STORE=postgres needs DATABASE_URL')
  }
  if (problems.length > 0 && options.starting === true) {
    // The refusals start() and buildApp make later, in the same words, on the values given well.
    const refused = [...productionProblems(config, bad), demoKernelRefusal(config, bad)].filter(p => p !== null)
    if (refused.length > 0) problems.push('Refusing to start in production: ' + refused.join('; '))
  }
  if (problems.length > 0) throw fail()
  return Object.freeze(config)
}

/** How a refused value is named: `NAME="value" is invalid: expected ... (why)`, secrets masked. */
function refusalOf (name: string, value: string, expected: string, why?: string): string {
  return `${name}=${JSON.stringify(shown(name, value))} is invalid: expected ${expected}${why === undefined ? '' : ` (${why})`}`
}

interface UrlCheck {
  /** Accepted schemes, with their colon (`redis:`). */
  schemes: string[]
  /** A host is required (DATABASE_URL may leave it to PGHOST or the local socket). */
  host: boolean
  /** What the path (and query) may hold; returns why not, or null. */
  rest?: (url: URL) => string | null
}

const HTTP: UrlCheck = { schemes: ['http:', 'https:'], host: true }
const DB_INDEX = /^(0|[1-9]\d*)$/

type UrlVariable = 'KERNEL_URL' | 'REDIS_URL' | 'DATABASE_URL' | 'BFF_JWKS_URL' | 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT' | 'OTEL_EXPORTER_OTLP_ENDPOINT'

/** The URL-valued variables and what each accepts beyond its schema pattern. */
const URL_VARIABLES: Array<{ name: UrlVariable, expected: string, check: UrlCheck }> = [
  { name: 'KERNEL_URL', expected: 'an http(s)://host[:port] origin', check: HTTP },
  {
    name: 'REDIS_URL',
    expected: 'redis://[user:password@]host[:port][/db] or rediss://...',
    check: {
      schemes: ['redis:', 'rediss:'],
      host: true,
      // ioredis sends SELECT with the path's number (or ?db=): anything else is SELECT NaN.
      rest: url => {
        const db = url.pathname.replace(/^\//, '')
        if (db !== '' && !DB_INDEX.test(db)) return `the database ${JSON.stringify(db)} is not a non-negative integer`
        const query = url.searchParams.get('db')
        if (query !== null && !DB_INDEX.test(query)) return `the database db=${JSON.stringify(query)} is not a non-negative integer`
        return null
      }
    }
  },
  { name: 'DATABASE_URL', expected: 'postgres://[user:password@]host[:port]/database (or postgresql://)', check: { schemes: ['postgres:', 'postgresql:'], host: false } },
  { name: 'BFF_JWKS_URL', expected: 'an http(s) URL', check: HTTP },
  { name: 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT', expected: 'an http(s) URL', check: HTTP },
  { name: 'OTEL_EXPORTER_OTLP_ENDPOINT', expected: 'an http(s) URL', check: HTTP }
]

/**
 * The refusal of a URL-valued variable as loadConfig words it, or null when the gateway can use
 * it: for the scripts that read one variable alone (`npm run migrate` passed DATABASE_URL raw to
 * pg, whose errors were a bare "Invalid URL" or "getaddrinfo ENOTFOUND base").
 */
export function urlRefusal (name: UrlVariable, value: string): string | null {
  const why = urlProblemOf(name, value)
  return why === null ? null : refusalOf(name, value, URL_VARIABLES.find(v => v.name === name)!.expected, why)
}

/**
 * Why a URL is unusable as a value of `name`, or null: for a manifest's URL that stands for one
 * (kernel.url, which KERNEL_URL overrides), named at its manifest path.
 */
export function urlProblemOf (name: UrlVariable, value: string): string | null {
  return urlProblem(value, URL_VARIABLES.find(v => v.name === name)!.check)
}

/** Why a URL is unusable, or null. */
function urlProblem (value: string, check: UrlCheck): string | null {
  let url: URL
  try {
    url = new URL(value)
  } catch {
    // WHATWG URL refuses a port past 65535 or not a number, which is the usual reason.
    // The user part runs to the last @, never backtracked into (the lookahead): a password with
    // an @, / or # left unencoded was read as a host and port, and its first part named as the port.
    const port = /^[a-z][a-z0-9+.-]*:\/\/(?:(?=(.*@))\1|(?!.*@))(?:\[[^\]]*\]|[^/?#:[\]]*):([^/?#]*)/is.exec(value)?.[2]
    if (port !== undefined && port !== '' && !(/^\d+$/.test(port) && Number(port) >= 1 && Number(port) <= 65535)) return `the port ${JSON.stringify(port)} is not 1..65535`
    return 'not a valid URL'
  }
  if (!check.schemes.includes(url.protocol)) return `the scheme ${JSON.stringify(url.protocol.slice(0, -1))} is not ${check.schemes.map(p => p.slice(0, -1)).join(' or ')}`
  if (check.host && url.hostname === '') return 'no host'
  if (url.port === '0') return 'the port "0" is not 1..65535'
  try {
    decodeURIComponent(url.username)
    decodeURIComponent(url.password)
  } catch {
    return 'the user or password is not valid percent-encoding'
  }
  return check.rest?.(url) ?? null
}

// Secrets an error message never shows (a refused internal token is still someone's token).
const SECRET_VARIABLES = new Set(['BFF_JWT_SECRET', 'BFF_JWT_SECRETS', 'BFF_INTERNAL_TOKEN', 'BFF_METRICS_TOKEN'])

/**
 * A value as an error message may show it: a secret as ***, a URL's password masked. The password
 * runs from the user's `:` to the last @: one with an @, / or # left unencoded (the usual reason
 * such a URL is refused) was shown from its first one on, or whole.
 */
function shown (name: string, value: string): string {
  if (SECRET_VARIABLES.has(name)) return '***'
  return URL_VARIABLES.some(v => v.name === name) ? shownUrl(value) : value
}

/**
 * A URL with its credentials masked: the password of its user part; all before the last @ of one
 * whose scheme has no `//` (`redis:pw@cache`, which the schema refuses, was shown whole); and the
 * value of a query parameter that names a credential (`?password=`, which pg and ioredis both
 * take as the password, `?token=`, `?sslpassword=`), which was shown as written.
 */
function shownUrl (value: string): string {
  const masked = /^[a-z][a-z0-9+.-]*:\/\//i.test(value)
    ? value.replace(/^([a-z][a-z0-9+.-]*:\/\/[^/?#@:]*:).*@/is, '$1***@')
    : value.replace(/^([a-z][a-z0-9+.-]*:)?[^/?#]*@/is, (_all, scheme: string | undefined) => (scheme ?? '') + '***@')
  return masked.replace(CREDENTIAL_PARAMETER, '$1***')
}

/** A query parameter whose name says it holds a credential, and its value (up to the next & or #). */
const CREDENTIAL_PARAMETER = /([?&][^=&#]*(?:pass|secret|token|key|auth|sig|cred)[^=&#]*=)[^&#]*/gi

/** The BFF_*_STORE variables, whose default is redis when REDIS_URL is set, else memory. */
const STORE_VARIABLES: ReadonlyArray<keyof Config> = ['BFF_RATE_LIMIT_STORE', 'BFF_CACHE_STORE', 'BFF_IDEMPOTENCY_STORE']

/** Where a concern keeps its state: its BFF_*_STORE, else Redis when REDIS_URL is set. */
export function storeFor (config: Config, variable: 'BFF_RATE_LIMIT_STORE' | 'BFF_CACHE_STORE' | 'BFF_IDEMPOTENCY_STORE'): 'memory' | 'redis' {
  return config[variable] ?? (config.REDIS_URL === undefined ? 'memory' : 'redis')
}

/** Where rate limits are counted. */
export const rateLimitStore = (config: Config): 'memory' | 'redis' => storeFor(config, 'BFF_RATE_LIMIT_STORE')

// An origin as browsers send it: scheme, host, optional port; no path, query, user or trailing slash.
const ORIGIN = /^https?:\/\/(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$/

/**
 * The origin a browser sends for a page at `entry`, when `entry` is an http(s) URL and not that
 * origin as written (https://App.Example.com/, https://bücher.example), else null.
 */
function browserOrigin (entry: string): string | null {
  if (!URL.canParse(entry)) return null
  const url = new URL(entry)
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return null
  return url.origin !== entry && ORIGIN.test(url.origin) ? url.origin : null
}

/**
 * A label of a host name as resolvers take one: letters, digits, hyphens and underscores, no
 * hyphen at either end, 1..63 of them. The underscore is in no host name of RFC 952/1123, but DNS
 * names may hold it (RFC 2181 §11), and resolvers look such a name up as any other (glibc's
 * res_hnok takes [0-9A-Za-z_-], musl's too), so Node listens on it: a docker compose service or
 * network named my_service is resolved by Docker's DNS, and refusing it refused a HOST that works.
 */
const HOST_LABEL = /^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$/
/** A label inet_aton reads as a number: decimal, octal (0...) or hexadecimal (0x...). */
const NUMBER_LABEL = /^(?:[0-9]+|0[xX][0-9A-Fa-f]*)$/

/**
 * Whether HOST is an address the gateway can listen on: an IPv4 or IPv6 address, or a host name.
 * getaddrinfo reads a name whose every label is a number as an IPv4 address, in inet_aton's
 * shorthand (3000 is 0.0.11.184, 127.0.1 and 0x7f.1 are 127.0.0.1, 0 is 0.0.0.0), and such a
 * name (10.0.0.256 too) is a slip for an address, never a host's name: refused. Any other name
 * it looks up, its search domains included. RFC 1123 §2.1 (and RFC 3696 §2) keep digits out of a
 * top-level label only, so a label of digits is refused last in a name ending with a dot (one
 * whose last label is top-level), not in node-1.10: a relative name, whose search domain follows
 * (the service node-1 of the Kubernetes namespace 10).
 */
function isListenHost (host: string): boolean {
  if (isIP(host) !== 0) return true
  const absolute = host.endsWith('.')
  const name = absolute ? host.slice(0, -1) : host
  const labels = name.split('.')
  const last = labels[labels.length - 1]
  return name.length > 0 && name.length <= 253 && labels.every(label => HOST_LABEL.test(label)) &&
    !labels.every(label => NUMBER_LABEL.test(label)) && !(absolute && /^[0-9]+$/.test(last))
}

/**
 * An address or CIDR range of BFF_TRUST_PROXY: an IPv4 or IPv6 address, with a prefix from 1 to
 * its width. Not a hop count, which Fastify itself refuses to honour (a client reaching the
 * gateway directly would be believed), nor /0 (everyone).
 */
function isProxyRange (entry: string): boolean {
  const [address, prefix, extra] = entry.split('/')
  const family = isIP(address)
  if (family === 0 || extra !== undefined) return false
  if (prefix === undefined) return true
  const bits = /^[0-9]{1,3}$/.test(prefix) ? Number(prefix) : -1
  return bits >= 1 && bits <= (family === 4 ? 32 : 128)
}

/**
 * The entries of a comma-separated variable (BFF_CORS_ORIGINS, BFF_TRUST_PROXY), trimmed, empty
 * ones dropped: `a, b,` is `a,b`, as people write lists.
 */
export function listEntries (value: string): string[] {
  return value.split(',').map(o => o.trim()).filter(o => o !== '')
}

/** The entries of BFF_CORS_ORIGINS. */
export const corsOrigins = listEntries

/** An https URL, or http to this host (a sidecar): what no one on the network can answer in its place. */
function fetchedSafely (url: string): boolean {
  const { protocol, hostname } = new URL(url)
  return protocol === 'https:' || hostname === 'localhost' || hostname === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(hostname)
}

/**
 * Production refuses settings that are only safe on a developer's machine. A check reading a
 * variable named in `bad` (refused by loadConfig, so read here as its default) is skipped.
 */
export function productionProblems (config: Config, bad: ReadonlySet<string> = new Set()): string[] {
  if (config.NODE_ENV !== 'production' || bad.has('NODE_ENV')) return []
  const problems: string[] = []
  const valid = (...names: string[]): boolean => names.every(name => !bad.has(name))
  if (config.BFF_AUTH_ENABLED && valid('BFF_AUTH_ENABLED', 'BFF_JWT_SECRET', 'BFF_JWT_SECRETS', 'BFF_JWT_PUBLIC_KEYS', 'BFF_JWKS_URL')) {
    // Each secret by kid is held to BFF_JWT_SECRET's checks, named by its kid (never shown).
    const secrets: Array<[string, string]> = [
      ...(config.BFF_JWT_SECRET === undefined ? [] : [['BFF_JWT_SECRET', config.BFF_JWT_SECRET] as [string, string]]),
      ...[...(config.BFF_JWT_SECRETS === undefined ? [] : parseSecrets(config.BFF_JWT_SECRETS))].map(([kid, secret]): [string, string] => [`BFF_JWT_SECRETS: the secret ${JSON.stringify(kid)}`, secret])
    ]
    for (const [what, secret] of secrets) {
      if (Buffer.byteLength(secret) < 32) problems.push(`${what} is shorter than 32 bytes`)
      else if (secret === DEV_JWT_SECRET) problems.push(`${what} is the development secret, which is published in the source (anyone could sign tokens): set a secret of your own`)
      else if (EXAMPLE_SECRETS.BFF_JWT_SECRET.includes(secret)) problems.push(`${what} is the example's placeholder, which is published in the repository (anyone could sign tokens): set a secret of your own`)
    }
    if (secrets.length === 0 && config.BFF_JWT_PUBLIC_KEYS === undefined && config.BFF_JWKS_URL === undefined) {
      problems.push('BFF_JWT_SECRET is missing (or set BFF_JWT_SECRETS, BFF_JWT_PUBLIC_KEYS or BFF_JWKS_URL)')
    }
    if (config.BFF_JWKS_URL !== undefined && !fetchedSafely(config.BFF_JWKS_URL)) {
      problems.push('BFF_JWKS_URL is plain http to another host (keys fetched in clear can be replaced on the way, and whoever replaces them can sign tokens): use https')
    }
  }
  if (config.BFF_INTERNAL_TOKEN !== undefined && valid('BFF_INTERNAL_TOKEN') && EXAMPLE_SECRETS.BFF_INTERNAL_TOKEN.includes(config.BFF_INTERNAL_TOKEN)) {
    problems.push('BFF_INTERNAL_TOKEN is the example\'s placeholder, which is published in the repository (anyone could post events to any tenant\'s subscribers): set a token of your own')
  }
  if (config.BFF_METRICS_ENABLED && config.BFF_METRICS_TOKEN !== undefined && valid('BFF_METRICS_ENABLED', 'BFF_METRICS_TOKEN') && EXAMPLE_SECRETS.BFF_METRICS_TOKEN.includes(config.BFF_METRICS_TOKEN)) {
    problems.push('BFF_METRICS_TOKEN is the example\'s placeholder, which is published in the repository (anyone could read /metrics): set a token of your own')
  }
  if (config.BFF_CORS_ORIGINS !== undefined && valid('BFF_CORS_ORIGINS') && corsOrigins(config.BFF_CORS_ORIGINS).includes('*')) {
    problems.push('BFF_CORS_ORIGINS contains * (any site could call the API from a browser): list the allowed origins')
  }
  if (config.BFF_AUDIT_ENABLED && config.BFF_AUDIT_STORE === 'memory' && valid('BFF_AUDIT_ENABLED', 'BFF_AUDIT_STORE')) {
    problems.push('BFF_AUDIT_STORE is memory (the audit trail would be lost at every restart): set BFF_AUDIT_STORE=postgres and DATABASE_URL')
  }
  return problems
}

/** Whether `npm start` starts the demo Kernel beside the gateway (the embedded default). */
export function demoKernel (config: Readonly<Config>): boolean {
  return config.KERNEL_URL === undefined && config.BFF_DEMO_KERNEL && resolve(config.BFF_MANIFEST) === DEMO_MANIFEST
}

/**
 * Production's refusal of the demo Kernel (forgotten settings served its demo agents, mutations
 * included, as ready), or null; null too when a variable it reads is named in `bad`.
 */
export function demoKernelRefusal (config: Readonly<Config>, bad: ReadonlySet<string> = new Set()): string | null {
  if (config.NODE_ENV !== 'production' || !demoKernel(config) || ['NODE_ENV', 'KERNEL_URL', 'BFF_DEMO_KERNEL', 'BFF_MANIFEST'].some(name => bad.has(name))) return null
  return 'BFF_MANIFEST is the demo manifest and KERNEL_URL is unset, so the demo Kernel would serve its demo data: set BFF_MANIFEST to your catalog (and KERNEL_URL), or BFF_DEMO_KERNEL=false'
}

/**
 * The BFF_* variables of `env` the gateway does not know (a misspelt one leaves its setting at
 * its default: BFF_RATE_LIMIT_GLOBALMAX=1 meant no guard at all), with the known name nearest
 * each, for the start-up's warning.
 */
export function unknownVariables (env: Record<string, string | undefined> = process.env): string[] {
  const known = Object.keys(ConfigSchema.properties)
  return Object.keys(env).filter(name => name.startsWith('BFF_') && !known.includes(name)).sort().map(name => {
    const near = known.filter(k => k.startsWith('BFF_')).map(k => [k, distance(name, k)] as const).sort((a, b) => a[1] - b[1])[0]
    return near !== undefined && near[1] <= 3 ? `${name} (did you mean ${near[0]}?)` : name
  })
}

/**
 * The settings of each feature a BFF_*_ENABLED switches off: the one table of what is not used
 * while its feature is off. Set then, a setting is named in a start-up warning beside its switch
 * (it was accepted silently, and BFF_CACHE_STORE=redis alone was refused for want of a Redis the
 * cache would never use); set to its default, it is not.
 */
export const FEATURE_SETTINGS: ReadonlyArray<{ flag: keyof Config, settings: ReadonlyArray<keyof Config> }> = [
  { flag: 'BFF_AUTH_ENABLED', settings: ['BFF_JWT_SECRET', 'BFF_JWT_SECRETS', 'BFF_JWT_PUBLIC_KEYS', 'BFF_JWKS_URL', 'BFF_JWT_ISSUER', 'BFF_JWT_AUDIENCE', 'BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT', 'BFF_WS_MAX_CONNECTIONS_PER_TENANT'] },
  { flag: 'BFF_RATE_LIMIT_ENABLED', settings: ['BFF_RATE_LIMIT_STORE', 'BFF_RATE_LIMIT_GLOBAL_MAX', 'BFF_RATE_LIMIT_GLOBAL_WINDOW_MS'] },
  { flag: 'BFF_METRICS_ENABLED', settings: ['BFF_METRICS_TOKEN'] },
  { flag: 'BFF_CIRCUIT_BREAKER_ENABLED', settings: ['BFF_CIRCUIT_BREAKER_THRESHOLD', 'BFF_CIRCUIT_BREAKER_TIMEOUT'] },
  { flag: 'BFF_AUDIT_ENABLED', settings: ['BFF_AUDIT_STORE', 'BFF_AUDIT_RETENTION_DAYS', 'BFF_AUDIT_BATCH_SIZE', 'BFF_AUDIT_QUEUE_MAX', 'BFF_AUDIT_SPOOL_DIR', 'BFF_AUDIT_MEMORY_MAX'] },
  { flag: 'BFF_CACHE_ENABLED', settings: ['BFF_CACHE_STORE', 'BFF_CACHE_TTL', 'BFF_CACHE_MAX_SIZE', 'BFF_CACHE_MAX_BYTES', 'BFF_CACHE_REDIS_MAX_BYTES_PER_TENANT'] },
  { flag: 'BFF_IDEMPOTENCY_ENABLED', settings: ['BFF_IDEMPOTENCY_STORE', 'BFF_IDEMPOTENCY_TTL_SECONDS', 'BFF_IDEMPOTENCY_MAX_KEYS', 'BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT', 'BFF_IDEMPOTENCY_WAIT_MS'] },
  { flag: 'BFF_AI_FIREWALL_ENABLED', settings: ['BFF_FIREWALL_CACHE_SIZE', 'BFF_FIREWALL_WORKERS'] },
  { flag: 'BFF_GRAPHQL_ENABLED', settings: ['BFF_GRAPHQL_MAX_DEPTH', 'BFF_GRAPHQL_INTROSPECTION'] },
  { flag: 'BFF_LOAD_SHEDDING_ENABLED', settings: ['BFF_MAX_EVENT_LOOP_DELAY_MS', 'BFF_MAX_HEAP_BYTES', 'BFF_MAX_RSS_BYTES'] }
]

/** Whether the feature a setting belongs to is on (a setting of no feature is always used). */
function featureOn (config: Readonly<Config>, setting: keyof Config): boolean {
  const feature = FEATURE_SETTINGS.find(f => f.settings.includes(setting))
  return feature === undefined || config[feature.flag] === true
}

/**
 * Security settings an empty value switches off, as it leaves any variable unset (a template
 * rendered empty): what the check then no longer does, for the start-up's warning.
 */
const EMPTY_SWITCHES_OFF: ReadonlyArray<{ name: keyof Config, off: string }> = [
  { name: 'BFF_JWT_ISSUER', off: 'the iss claim of tokens is not checked' },
  { name: 'BFF_JWT_AUDIENCE', off: 'the aud claim of tokens is not checked' },
  { name: 'BFF_METRICS_TOKEN', off: '/metrics is open to anyone' },
  { name: 'BFF_RATE_LIMIT_GLOBAL_MAX', off: 'there is no HTTP guard' }
]

/**
 * The warnings of the start-up, one a line: each unknown BFF_ variable (unknownVariables); a
 * DATABASE_URL the audit trail does not use (BFF_AUDIT_STORE defaults to memory whatever
 * DATABASE_URL says: setting it alone kept the audit in the process, lost at every restart);
 * identity off in production (allowed, behind a network that authenticates callers itself: it
 * started with no word, every call anonymous); a security setting set empty, which counts as
 * unset; and each setting of a feature that is off (FEATURE_SETTINGS), which is not used.
 */
export function startWarnings (config: Readonly<Config>, env: Record<string, string | undefined> = process.env): string[] {
  const warnings = unknownVariables(env).map(name => `${name} is not a setting of the gateway: it is ignored`)
  if (config.DATABASE_URL !== undefined && config.BFF_AUDIT_ENABLED && config.BFF_AUDIT_STORE === 'memory') {
    warnings.push('DATABASE_URL is set but BFF_AUDIT_STORE is memory: the audit trail is kept in this process only and lost at restart; set BFF_AUDIT_STORE=postgres to keep it in PostgreSQL')
  }
  if (config.NODE_ENV === 'production' && !config.BFF_AUTH_ENABLED) {
    warnings.push('BFF_AUTH_ENABLED=false in production: identity is off, every call is anonymous and no role or zone is checked (any caller may call every operation, restricted ones included); run it so only behind a network that authenticates callers itself')
  }
  // An identity provider's keys sign tokens for every application it serves (RFC 8725 §3.9): with
  // no audience checked, a token issued to any other of them was taken, with the roles it gives.
  if (config.NODE_ENV === 'production' && config.BFF_AUTH_ENABLED && config.BFF_JWT_AUDIENCE === undefined) {
    const sources = (['BFF_JWKS_URL', 'BFF_JWT_PUBLIC_KEYS'] as const).filter(name => config[name] !== undefined)
    if (sources.length > 0) warnings.push(`BFF_JWT_AUDIENCE is not set: every token the keys of ${sources.join(' and ')} sign is taken, whatever application the identity provider issued it to (any application's token, with the roles it gives, passes); set BFF_JWT_AUDIENCE to the \`aud\` it puts in this gateway's tokens`)
  }
  for (const { name, off } of EMPTY_SWITCHES_OFF) {
    if (env[name] === '' && featureOn(config, name)) warnings.push(`${name} is set but empty, which counts as unset: ${off}`)
  }
  // Tracing's switch is an OTLP endpoint (app.ts's tracesUrl): without one, no span is recorded
  // and the ratio samples nothing (the Kernel gets each new trace marked sampled, as ever).
  if (config.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT === undefined && config.OTEL_EXPORTER_OTLP_ENDPOINT === undefined &&
    env.BFF_TRACE_SAMPLE_RATIO !== undefined && env.BFF_TRACE_SAMPLE_RATIO !== '' && config.BFF_TRACE_SAMPLE_RATIO !== (ConfigSchema.properties.BFF_TRACE_SAMPLE_RATIO as { default?: number }).default) {
    warnings.push('BFF_TRACE_SAMPLE_RATIO is set but neither OTEL_EXPORTER_OTLP_TRACES_ENDPOINT nor OTEL_EXPORTER_OTLP_ENDPOINT is: tracing is off, it is not used')
  }
  for (const { flag, settings } of FEATURE_SETTINGS) {
    if (config[flag] === true) continue
    for (const name of settings) {
      // Its default restated (.env.example writes most out) changes nothing: not a word about it.
      // A store's default is not in the schema: redis with REDIS_URL, else memory (storeFor).
      const byDefault = STORE_VARIABLES.includes(name) ? (config.REDIS_URL === undefined ? 'memory' : 'redis') : (ConfigSchema.properties as Record<string, { default?: unknown }>)[name].default
      if (env[name] !== undefined && env[name] !== '' && config[name] !== byDefault) warnings.push(`${name} is set but ${flag}=false: it is not used`)
    }
  }
  return warnings
}

/** Levenshtein distance, for the nearest known name of a misspelt variable (a few dozen names). */
function distance (a: string, b: string): number {
  let row = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const next = [i]
    for (let j = 1; j <= b.length; j++) next[j] = Math.min(row[j] + 1, next[j - 1] + 1, row[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1))
    row = next
  }
  return row[b.length]
}
