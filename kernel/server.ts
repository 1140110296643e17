// The demo Kernel: the upstream service Mantle fronts by default. AI agents, their runs and
// (confidential) documents, scoped by the `x-tenant-id` header. Deliberately no response
// schemas: the internal fields on agents must really go over the wire so that the gateway's
// output stripping is exercised.
import Fastify from 'fastify'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { AddressInfo } from 'node:net'
import { pathToFileURL } from 'node:url'
import { DECIMAL_TEXT, INTEGER_TEXT } from '../schemas/config.js'
import { noArguments } from '../cli.js'

export interface KernelEvent { topic: string, tenantId: string, payload: unknown }

export interface KernelOptions {
  port?: number
  host?: string
  logger?: boolean
  /** Delay before each run status change (queued -> running -> succeeded). Default 50. */
  runDelayMs?: number
  onEvent?: (e: KernelEvent) => void
  /** Tenants kept in memory; the oldest is evicted beyond it. Default 1000. */
  maxTenants?: number
  /** Runs kept per tenant; the oldest is dropped beyond it. Default 1000. */
  maxRunsPerTenant?: number
  /** Created agents kept per tenant (seed agents excluded); the oldest is dropped. Default 500. */
  maxAgentsPerTenant?: number
}

export interface RunningKernel { url: string, close: () => Promise<void> }

export type RunStatus = 'queued' | 'running' | 'succeeded' | 'failed'

export interface Agent {
  id: string
  name: string
  model: string
  description: string | null
  createdAt: string
  updatedAt: string
  // Internal fields: not in the manifest's schemas, the gateway must strip them.
  internalCostCents: number
  ownerTenant: string
}

export interface Run {
  id: string
  agentId: string
  status: RunStatus
  temperature: number
  promptChars: number
  output: string | null
  error: string | null
  createdAt: string
  updatedAt: string
  startedAt: string | null
  finishedAt: string | null
}

export interface DocumentSummary {
  id: string
  title: string
  classification: string
  tags: string[]
  updatedAt: string
}

export interface KernelDocument extends DocumentSummary {
  author: string
  content: string
  createdAt: string
}

interface TenantStore {
  agents: Map<string, Agent>
  createdAgentIds: string[]
  nextAgent: number
  runs: Map<string, Run>
  runList: Run[]
  nextRun: number
}

const SEED_TIME = '2024-01-01T00:00:00.000Z'
const DEFAULT_MODEL = 'mantle-small'
const FAIL_MARKER = '#fail'
/**
 * The gateway's bound on a token's `tid` (HEADER_SAFE in plugins/auth/identity.ts: 1 to 256
 * characters; README, "Authentication"), matched here rather than imported, so that the Kernel
 * pulls in none of the gateway's code. At 128, a valid tenant id of 129 to 256 characters got
 * 400 on every call.
 */
const MAX_TENANT_ID_LENGTH = 256

const SEED_AGENTS: ReadonlyArray<Pick<Agent, 'id' | 'name' | 'model' | 'description' | 'internalCostCents'>> = [
  { id: 'a1', name: 'Research Assistant', model: 'mantle-large', description: 'Finds sources and summarises them.', internalCostCents: 120 },
  { id: 'a2', name: 'Code Reviewer', model: 'mantle-medium', description: 'Reviews pull requests for bugs and style.', internalCostCents: 340 },
  { id: 'a3', name: 'Support Triage', model: 'mantle-small', description: null, internalCostCents: 45 }
]

// Documents are read-only through this API, so every tenant shares one frozen seed
// (no per-tenant copies to keep memory flat) and the search index is built once.
const DOCUMENTS: ReadonlyMap<string, KernelDocument> = new Map([
  doc('d1', 'Q3 Pricing Strategy', ['pricing', 'finance'], 'Finance Team',
    'Internal pricing proposal for the enterprise tier. Discounts above 20% need CFO approval.'),
  doc('d2', 'Incident Postmortem: Kernel Outage', ['incident', 'engineering'], 'SRE',
    'Root cause: connection pool exhaustion after a retry storm. Action items: circuit breaker, bulkhead.'),
  doc('d3', 'Employee Onboarding Handbook', ['hr', 'onboarding'], 'People Ops',
    'Welcome aboard. This handbook covers accounts, security training and the first week schedule.')
].map((d) => [d.id, d]))

const DOCUMENT_INDEX: ReadonlyArray<{ text: string, summary: DocumentSummary }> = [...DOCUMENTS.values()].map((d) => ({
  text: `${d.title}\n${d.content}\n${d.tags.join(' ')}`.toLowerCase(),
  summary: Object.freeze({ id: d.id, title: d.title, classification: d.classification, tags: d.tags, updatedAt: d.updatedAt })
}))

function doc (id: string, title: string, tags: string[], author: string, content: string): KernelDocument {
  return Object.freeze({ id, title, classification: 'confidential', tags: Object.freeze(tags) as string[], author, content, createdAt: SEED_TIME, updatedAt: SEED_TIME })
}

const ID_PATTERN = '^[A-Za-z0-9_-]{1,64}$'
const idParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', pattern: ID_PATTERN } }
} as const
const limitSchema = { type: 'integer', minimum: 1, maximum: 100, default: 20 } as const

interface IdParams { id: string }

class KernelHttpError extends Error {
  readonly statusCode: number
  readonly error: string
  constructor (statusCode: number, error: string, message: string) {
    super(message)
    this.statusCode = statusCode
    this.error = error
  }
}

function notFound (reply: FastifyReply, what: string, id: string): { error: string, message: string } {
  reply.code(404)
  return { error: 'not_found', message: `${what} ${id} not found` }
}

function headerValue (v: string | string[] | undefined): string | null {
  if (v === undefined) return null
  return typeof v === 'string' ? v : v.join(', ')
}

// FNV-1a: a cheap deterministic digest so the output can refer to the prompt without echoing it.
function digest (s: string): string {
  let h = 0x811c9dc5
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i)
    h = Math.imul(h, 0x01000193)
  }
  return (h >>> 0).toString(16).padStart(8, '0')
}

function countWords (s: string): number {
  let words = 0
  let inWord = false
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i)
    const space = c === 32 || (c >= 9 && c <= 13)
    if (!space && !inWord) words++
    inWord = !space
  }
  return words
}

export function buildKernel (opts: KernelOptions = {}): FastifyInstance {
  const runDelayMs = opts.runDelayMs ?? 50
  const maxTenants = opts.maxTenants ?? 1000
  const maxRuns = opts.maxRunsPerTenant ?? 1000
  const maxAgents = opts.maxAgentsPerTenant ?? 500
  const onEvent = opts.onEvent

  const app = Fastify({ logger: opts.logger ?? false })
  const tenants = new Map<string, TenantStore>()
  const timers = new Set<NodeJS.Timeout>()

  function storeOf (req: FastifyRequest): { tenantId: string, store: TenantStore } {
    const header = req.headers['x-tenant-id']
    let tenantId = 'public'
    if (typeof header === 'string' && header !== '') {
      if (header.length > MAX_TENANT_ID_LENGTH) throw new KernelHttpError(400, 'bad_request', `x-tenant-id longer than ${MAX_TENANT_ID_LENGTH} characters`)
      tenantId = header
    }
    let store = tenants.get(tenantId)
    if (store === undefined) {
      store = createStore(tenantId)
      // Map keeps insertion order: the first key is the oldest tenant.
      if (tenants.size >= maxTenants) tenants.delete(tenants.keys().next().value as string)
      tenants.set(tenantId, store)
    }
    return { tenantId, store }
  }

  function createStore (tenantId: string): TenantStore {
    const agents = new Map<string, Agent>()
    for (const a of SEED_AGENTS) {
      agents.set(a.id, { ...a, createdAt: SEED_TIME, updatedAt: SEED_TIME, ownerTenant: tenantId })
    }
    return { agents, createdAgentIds: [], nextAgent: SEED_AGENTS.length + 1, runs: new Map(), runList: [], nextRun: 1 }
  }

  function emit (tenantId: string, run: Run): void {
    if (onEvent === undefined) return
    try {
      // A snapshot: the run object keeps changing after the event is handed over.
      onEvent({ topic: 'runs.updated', tenantId, payload: { ...run } })
    } catch (err) {
      app.log.error({ err }, 'kernel onEvent listener failed')
    }
  }

  function later (fn: () => void): void {
    const timer = setTimeout(() => {
      timers.delete(timer)
      fn()
    }, runDelayMs)
    // Runs in flight must never keep the process alive.
    timer.unref()
    timers.add(timer)
  }

  app.addHook('onClose', (_instance, done) => {
    for (const t of timers) clearTimeout(t)
    timers.clear()
    done()
  })

  app.addHook('onRequest', (req, reply, done) => {
    const rid = req.headers['x-request-id']
    if (typeof rid === 'string') reply.header('x-request-id', rid)
    done()
  })

  app.setErrorHandler((err: FastifyError | KernelHttpError, req, reply) => {
    const status = err.statusCode ?? 500
    if (status >= 500) {
      req.log.error({ err }, 'kernel error')
      reply.code(500).send({ error: 'internal', message: 'Internal Server Error' })
      return
    }
    const error = err instanceof KernelHttpError ? err.error : status === 404 ? 'not_found' : 'bad_request'
    reply.code(status).send({ error, message: err.message })
  })

  app.setNotFoundHandler((req, reply) => {
    reply.code(404).send({ error: 'not_found', message: `Route ${req.method} ${req.url} not found` })
  })

  app.get('/v1/health', () => ({ status: 'ok' }))

  app.get('/v1/echo-headers', (req) => {
    const h = req.headers
    return {
      'x-request-id': headerValue(h['x-request-id']),
      'x-tenant-id': headerValue(h['x-tenant-id']),
      'x-user-id': headerValue(h['x-user-id']),
      'x-user-roles': headerValue(h['x-user-roles']),
      traceparent: headerValue(h.traceparent),
      'idempotency-key': headerValue(h['idempotency-key'])
    }
  })

  // --- agents ---------------------------------------------------------------------------

  app.get<{ Querystring: { limit: number, model?: string } }>('/v1/agents', {
    schema: {
      querystring: {
        type: 'object',
        properties: { limit: limitSchema, model: { type: 'string', maxLength: 100 } }
      }
    }
  }, (req) => {
    const { store } = storeOf(req)
    const { limit, model } = req.query
    const out: Agent[] = []
    for (const a of store.agents.values()) {
      if (model !== undefined && a.model !== model) continue
      out.push(a)
      if (out.length >= limit) break
    }
    return out
  })

  app.get<{ Params: IdParams }>('/v1/agents/:id', { schema: { params: idParams } }, (req, reply) => {
    const agent = storeOf(req).store.agents.get(req.params.id)
    return agent ?? notFound(reply, 'agent', req.params.id)
  })

  // One body schema for creating and changing an agent; creation also requires the name.
  const agentBody = {
    type: 'object',
    additionalProperties: false,
    properties: {
      name: { type: 'string', minLength: 1, maxLength: 200 },
      model: { type: 'string', minLength: 1, maxLength: 100 },
      description: { type: ['string', 'null'], maxLength: 2000 }
    }
  }

  app.post<{ Body: { name: string, model?: string, description?: string | null } }>('/v1/agents', {
    schema: {
      body: { ...agentBody, required: ['name'] }
    }
  }, (req, reply) => {
    const { tenantId, store } = storeOf(req)
    const now = new Date().toISOString()
    const agent: Agent = {
      id: `a${store.nextAgent++}`,
      name: req.body.name,
      model: req.body.model ?? DEFAULT_MODEL,
      description: req.body.description ?? null,
      createdAt: now,
      updatedAt: now,
      internalCostCents: 0,
      ownerTenant: tenantId
    }
    store.agents.set(agent.id, agent)
    store.createdAgentIds.push(agent.id)
    if (store.createdAgentIds.length > maxAgents) store.agents.delete(store.createdAgentIds.shift() as string)
    reply.code(201)
    return agent
  })

  app.patch<{ Params: IdParams, Body: { name?: string, model?: string, description?: string | null } }>('/v1/agents/:id', {
    schema: {
      params: idParams,
      body: agentBody
    }
  }, (req, reply) => {
    const agent = storeOf(req).store.agents.get(req.params.id)
    if (agent === undefined) return notFound(reply, 'agent', req.params.id)
    const { name, model, description } = req.body
    if (name !== undefined) agent.name = name
    if (model !== undefined) agent.model = model
    if (description !== undefined) agent.description = description
    agent.updatedAt = new Date().toISOString()
    return agent
  })

  app.delete<{ Params: IdParams }>('/v1/agents/:id', { schema: { params: idParams } }, (req, reply) => {
    const { store } = storeOf(req)
    const agent = store.agents.get(req.params.id)
    if (agent === undefined) return notFound(reply, 'agent', req.params.id)
    store.agents.delete(agent.id)
    return agent
  })

  // --- runs -----------------------------------------------------------------------------

  app.post<{ Params: IdParams, Body: { prompt: string, temperature?: number } }>('/v1/agents/:id/runs', {
    schema: {
      params: idParams,
      body: {
        type: 'object',
        required: ['prompt'],
        additionalProperties: false,
        properties: {
          prompt: { type: 'string', minLength: 1, maxLength: 20000 },
          temperature: { type: 'number', minimum: 0, maximum: 2 }
        }
      }
    }
  }, (req, reply) => {
    const { tenantId, store } = storeOf(req)
    const agent = store.agents.get(req.params.id)
    if (agent === undefined) return notFound(reply, 'agent', req.params.id)
    const { prompt } = req.body
    const temperature = req.body.temperature ?? 0.7
    const now = new Date().toISOString()
    const run: Run = {
      id: `r${store.nextRun++}`,
      agentId: agent.id,
      status: 'queued',
      temperature,
      promptChars: prompt.length,
      output: null,
      error: null,
      createdAt: now,
      updatedAt: now,
      startedAt: null,
      finishedAt: null
    }
    store.runs.set(run.id, run)
    store.runList.push(run)
    if (store.runList.length > maxRuns) store.runs.delete((store.runList.shift() as Run).id)

    // Computed now so the prompt itself is never retained (memory stays bounded).
    const fail = prompt.includes(FAIL_MARKER)
    const output = `${agent.name} (${agent.model}) processed a ${countWords(prompt)}-word prompt ` +
      `(${prompt.length} characters, digest ${digest(prompt)}) at temperature ${temperature}.`

    emit(tenantId, run)
    later(() => {
      run.status = 'running'
      run.startedAt = run.updatedAt = new Date().toISOString()
      emit(tenantId, run)
      later(() => {
        run.finishedAt = run.updatedAt = new Date().toISOString()
        if (fail) {
          run.status = 'failed'
          run.error = `Simulated failure: the prompt contains ${FAIL_MARKER}`
        } else {
          run.status = 'succeeded'
          run.output = output
        }
        emit(tenantId, run)
      })
    })
    reply.code(201)
    return run
  })

  app.get<{ Params: IdParams }>('/v1/runs/:id', { schema: { params: idParams } }, (req, reply) => {
    const run = storeOf(req).store.runs.get(req.params.id)
    return run ?? notFound(reply, 'run', req.params.id)
  })

  app.get<{ Params: IdParams, Querystring: { status?: RunStatus, limit: number } }>('/v1/agents/:id/runs', {
    schema: {
      params: idParams,
      querystring: {
        type: 'object',
        properties: {
          status: { type: 'string', enum: ['queued', 'running', 'succeeded', 'failed'] },
          limit: limitSchema
        }
      }
    }
  }, (req, reply) => {
    const { store } = storeOf(req)
    const { id } = req.params
    if (!store.agents.has(id)) return notFound(reply, 'agent', id)
    const { status, limit } = req.query
    const out: Run[] = []
    // Newest first.
    for (let i = store.runList.length - 1; i >= 0 && out.length < limit; i--) {
      const run = store.runList[i]
      if (run.agentId === id && (status === undefined || run.status === status)) out.push(run)
    }
    return out
  })

  // --- documents ------------------------------------------------------------------------

  app.get<{ Querystring: { q?: string, limit: number } }>('/v1/documents', {
    schema: {
      querystring: {
        type: 'object',
        properties: { q: { type: 'string', maxLength: 200 }, limit: limitSchema }
      }
    }
  }, (req) => {
    storeOf(req)
    const { limit } = req.query
    const q = req.query.q === undefined || req.query.q === '' ? undefined : req.query.q.toLowerCase()
    const out: DocumentSummary[] = []
    for (const entry of DOCUMENT_INDEX) {
      if (q !== undefined && !entry.text.includes(q)) continue
      out.push(entry.summary)
      if (out.length >= limit) break
    }
    return out
  })

  app.get<{ Params: IdParams }>('/v1/documents/:id', { schema: { params: idParams } }, (req, reply) => {
    storeOf(req)
    return DOCUMENTS.get(req.params.id) ?? notFound(reply, 'document', req.params.id)
  })

  return app
}

export async function startKernel (opts: KernelOptions = {}): Promise<RunningKernel> {
  const app = buildKernel(opts)
  await app.listen({ port: opts.port ?? 0, host: opts.host ?? '127.0.0.1' })
  const addr = app.server.address() as AddressInfo
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address
  return {
    url: `http://${host}:${addr.port}`,
    close: async () => { await app.close() }
  }
}

/**
 * Posts Kernel events to the gateway's `/internal/events` endpoint (CONTRACT §4).
 * Fire-and-forget with a cap on requests in flight so a slow gateway cannot pile them up.
 */
export function forwardEvents (
  url: string,
  token: string | undefined,
  onError: (err: unknown) => void = (err) => { console.error('kernel: event delivery failed', err) },
  maxInFlight = 256
): (e: KernelEvent) => void {
  const headers: Record<string, string> = { 'content-type': 'application/json' }
  if (token !== undefined && token !== '') headers.authorization = `Bearer ${token}`
  let inFlight = 0
  return (e) => {
    if (inFlight >= maxInFlight) {
      onError(new Error(`dropped ${e.topic} event: ${maxInFlight} deliveries already in flight`))
      return
    }
    inFlight++
    fetch(url, { method: 'POST', headers, body: JSON.stringify(e) })
      .then(async (res) => {
        await res.body?.cancel()
        if (!res.ok) onError(new Error(`event delivery answered ${res.status}`))
      }, onError)
      .finally(() => { inFlight-- })
  }
}

/**
 * The Kernel's settings from `env`, as the gateway reads its own (schemas/config.ts): decimal
 * digits only (Number() took 0x10 as 16), an empty value is unset (Number('') was port 0, a
 * random one), and every bad one is named in `problems`.
 */
export function kernelSettings (env: NodeJS.ProcessEnv): { port: number, host: string, runDelayMs: number | undefined, problems: string[] } {
  const set = (name: string): string | undefined => env[name] === '' ? undefined : env[name]
  const problems: string[] = []
  const portText = set('KERNEL_PORT')
  const port = portText === undefined ? 4001 : INTEGER_TEXT.test(portText) ? Number(portText) : NaN
  if (!(port <= 65535)) problems.push(`KERNEL_PORT must be an integer in 0..65535, got ${portText} (decimal digits only)`)
  const delayText = set('KERNEL_RUN_DELAY_MS')
  const runDelayMs = delayText === undefined ? undefined : DECIMAL_TEXT.test(delayText) ? Number(delayText) : NaN
  if (runDelayMs !== undefined && !Number.isFinite(runDelayMs)) problems.push(`KERNEL_RUN_DELAY_MS must be a number >= 0, got ${delayText} (decimal digits only)`)
  const host = set('KERNEL_HOST') ?? '127.0.0.1'
  if (!/^\S+$/.test(host)) problems.push(`KERNEL_HOST must be a host name or IP address (no spaces), got ${JSON.stringify(host)}`)
  return { port, host, runDelayMs, problems }
}

async function main (): Promise<void> {
  const env = process.env
  const { port, host, runDelayMs, problems } = kernelSettings(env)
  if (problems.length > 0) {
    console.error(`kernel: ${problems.join('; ')}`)
    process.exitCode = 1
    return
  }
  const eventsUrl = env.KERNEL_EVENTS_URL
  const kernel = await startKernel({
    port,
    host,
    logger: env.KERNEL_LOGGER === 'true' || env.KERNEL_LOGGER === '1',
    runDelayMs,
    onEvent: eventsUrl === undefined || eventsUrl === '' ? undefined : forwardEvents(eventsUrl, env.BFF_INTERNAL_TOKEN)
  })
  console.log(`kernel listening on ${kernel.url}`)
  const shutdown = (signal: string): void => {
    console.log(`kernel: ${signal}, shutting down`)
    kernel.close().then(() => process.exit(0), (err: unknown) => {
      console.error('kernel: close failed', err)
      process.exit(1)
    })
  }
  process.once('SIGTERM', shutdown)
  process.once('SIGINT', shutdown)
}

const USAGE = `Usage: npm run kernel
The demo Kernel takes no arguments: it is configured by its environment: KERNEL_PORT (4001),
KERNEL_HOST (127.0.0.1), KERNEL_RUN_DELAY_MS (50), KERNEL_EVENTS_URL (where it POSTs its events,
with BFF_INTERNAL_TOKEN as its bearer token), KERNEL_LOGGER=true (README.md, "Other scripts").`

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  if (noArguments('kernel', process.argv.slice(2), USAGE)) await main()
}
