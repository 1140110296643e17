import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { createHash } from 'node:crypto'
import { LRUCache } from 'lru-cache'
import { Gauge } from 'prom-client'
import { CallCounter, CallHistogram } from '../metrics/call-metrics.js'
import { StageOrder, type CallContext, type Next, type Stage } from '../pipeline/index.js'
import { MantleError } from '../../errors.js'
import { scanFields, CLEAN, type Verdict } from './scan.js'
import { INLINE_MAX, largerThan, ScanPool } from './pool.js'
import type { Category } from './detectors.js'

/** ES2024's String.prototype.isWellFormed: no lone surrogate (Node 20 has it; the ES2023 lib does not declare it). */
const wellFormed = (s: string): boolean => (s as unknown as { isWellFormed: () => boolean }).isWellFormed()

// The AI firewall: scans the input fields an operation names in `firewall` for prompt
// injection, secrets and personal data, and blocks, redacts or only records what it finds.
// The detection is plain functions (scan.ts, injection.ts, detectors.ts, normalize.ts); this
// plugin adds the pipeline stage, the verdict cache and the metrics.

export interface FirewallOptions {
  /** Verdicts kept for identical payloads (0: no cache). */
  cacheSize: number
  /** Worker threads that scan inputs larger than INLINE_MAX (0: every input on the event loop). */
  workers: number
}

/** Readable names of the categories, for the refusal's detail. */
const CATEGORY_NAMES: Readonly<Record<Category, string>> = { injection: 'prompt injection', secret: 'secret', pii: 'personal data' }
// The cache also bounds the memory its redacted copies of payloads take.
const CACHE_MAX_CHARS = 32 * 1024 * 1024

async function firewallPlugin (app: FastifyInstance, opts: FirewallOptions): Promise<void> {
  const registry = app.hasDecorator('metrics') ? app.metrics.registry : null
  const registers = registry === null ? [] : [registry]
  const findingsTotal = new CallCounter({ name: 'mantle_firewall_findings_total', help: 'AI firewall findings, by category and the action of the operation', labelNames: ['category', 'action'], registers })
  const verdictsTotal = new CallCounter({ name: 'mantle_firewall_verdicts_total', help: 'AI firewall verdicts, by action and outcome (blocked, redacted, passed)', labelNames: ['action', 'outcome'], registers })
  const scanDuration = new CallHistogram({ name: 'mantle_firewall_scan_duration_seconds', help: 'Time to scan one call\'s input (verdict cache misses)', labelNames: [], buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25], registers }).series()
  const cacheTotal = new CallCounter({ name: 'mantle_firewall_cache_total', help: 'AI firewall verdict cache lookups, by outcome (hit, miss)', labelNames: ['outcome'], registers })
  const cacheHit = cacheTotal.series('hit')
  const cacheMiss = cacheTotal.series('miss')

  const cache = opts.cacheSize > 0
    ? new LRUCache<string, Verdict>({
      max: opts.cacheSize,
      maxSize: CACHE_MAX_CHARS,
      sizeCalculation: (v, key) => key.length + (v.redacted === null ? 0 : Object.values(v.redacted).reduce<number>((n, s) => n + (s as string).length, 0)) + 64 // strings only: an array or object is never cached
    })
    : null
  if (cache !== null) {
    new Gauge({ name: 'mantle_firewall_cache_entries', help: 'Verdicts in the AI firewall cache', registers, collect () { this.set(cache.size) } }) // eslint-disable-line no-new
  }

  const scan = (fields: readonly string[], input: Readonly<Record<string, unknown>>): Verdict => {
    const started = performance.now()
    const verdict = scanFields(fields, input)
    scanDuration.observe((performance.now() - started) / 1000)
    return verdict
  }

  // Large inputs on threads of their own (pool.ts): made only with the option, a thread only at
  // the first large input.
  const pool = opts.workers > 0 ? new ScanPool({ threads: opts.workers, registers, observe: seconds => { scanDuration.observe(seconds) }, inline: scan, onError: err => { app.log.error({ err }, 'an AI firewall scan thread failed: large inputs are scanned on the event loop from now on') } }) : null
  if (pool !== null) app.addHook('onClose', async () => { await pool.close() })
  if (app.hasDecorator('diagz')) {
    app.diagz.addSection('firewall', () => ({
      verdictCache: cache === null ? null : { entries: cache.size, max: opts.cacheSize },
      // null with BFF_FIREWALL_WORKERS=0: every input is scanned on the event loop.
      pool: pool === null ? null : pool.figures()
    }))
  }

  app.pipeline.addStage({
    name: 'firewall',
    order: StageOrder.firewall,
    build (op) {
      if (op.firewall === null) return null
      const { fields, action } = op.firewall
      // Optimization: label children resolved once per operation.
      const blocked = verdictsTotal.series(action, 'blocked')
      const redacted = verdictsTotal.series(action, 'redacted')
      const passed = verdictsTotal.series(action, 'passed')
      const found = { injection: findingsTotal.series('injection', action), secret: findingsTotal.series('secret', action), pii: findingsTotal.series('pii', action) }
      // The operation's and fields' parts of a verdict's key, made once (see verdictOf).
      const opKey = op.name.length + ':' + op.name
      const names = fields.map(field => field.length + ':' + field)
      /** Whether a field holds an array or an object. */
      const structured = (input: Readonly<Record<string, unknown>>): boolean => {
        for (const field of fields) {
          const value = input[field]
          if (value !== null && typeof value === 'object') return true
        }
        return false
      }

      /** The input scanned: on the pool when it is large (within the call's time), else at once. */
      const scanned = (ctx: CallContext): Verdict | Promise<Verdict> => pool !== null && largerThan(fields, ctx.input, INLINE_MAX)
        ? pool.scan(ctx.tenant, fields, ctx.input, ctx.caller, ctx.startedAt + op.timeoutMs)
        : scan(fields, ctx.input)

      const verdictOf = (ctx: CallContext): Verdict | Promise<Verdict> => {
        const input = ctx.input
        // An array or object is scanned each time, never cached: its JSON text (a key) may be
        // many times the request (GraphQL's [$a, $a, ...]), and its redacted copy takes many times
        // its text's length.
        if (cache === null || structured(input)) return scanned(ctx)
        // The tenant, the operation's name, then each field's name and value (or its absence)
        // after their lengths: no separator would do, since a JSON string may hold any character,
        // \u0000 included. Distinct inputs never share a key, nor do the same values under other
        // fields after a reload changed the operation's `firewall.fields` (the cache outlives
        // reloads: a verdict for a prompt was reused for a note, whose e-mail address then went
        // unredacted). The tenant: a hit (its metric, its time) told one tenant that another had
        // sent that very text.
        const tenant = ctx.tenant
        const hash = createHash('sha256').update(tenant.length + ':' + tenant + opKey)
        for (let i = 0; i < fields.length; i++) {
          const value = input[fields[i]]
          const name = names[i]
          // A number, boolean or null is not scanned: keyed as absent.
          if (typeof value !== 'string') hash.update(name + 'x')
          else if (wellFormed(value)) hash.update(name + 's' + value.length + ':' + value)
          else {
            // UTF-8 writes a lone surrogate as U+FFFD's bytes: such a text is hashed as its UTF-16
            // code units, under another tag. Two texts differing only there shared a verdict.
            hash.update(name + 'u' + value.length + ':')
            hash.update(value, 'utf16le')
          }
        }
        const key = hash.digest('base64')
        const cached = cache.get(key)
        if (cached !== undefined) {
          cacheHit.inc()
          return cached
        }
        cacheMiss.inc()
        const verdict = scanned(ctx)
        if (verdict instanceof Promise) {
          return verdict.then(v => {
            cache.set(key, v)
            return v
          })
        }
        cache.set(key, verdict)
        return verdict
      }

      const decide = (ctx: CallContext, next: Next, verdict: Verdict): Promise<unknown> => {
        if (verdict === CLEAN) {
          passed.inc()
          return next(ctx)
        }
        ctx.findings = verdict.findings
        ctx.risk = verdict.risk
        for (const f of verdict.findings) found[f.category].inc()
        // Redaction cannot take an instruction out of a prompt (it may be spread over obfuscated
        // text): in redact mode an injection is refused like in block mode.
        if (action === 'block' || (action === 'redact' && verdict.categories.includes('injection'))) {
          blocked.inc()
          // The categories only: never the payload, never what matched.
          throw new MantleError('FIREWALL_BLOCKED', 'The AI firewall refused the input: ' + verdict.categories.map(c => CATEGORY_NAMES[c]).join(', ') + ' found')
        }
        if (action === 'redact' && verdict.redacted !== null) {
          ctx.input = { ...ctx.input, ...verdict.redacted }
          redacted.inc()
        } else {
          passed.inc()
        }
        return next(ctx)
      }
      const stage: Stage = (ctx, next) => {
        const verdict = verdictOf(ctx)
        // A verdict made on the event loop is decided at once, without a promise's turn.
        return verdict instanceof Promise ? verdict.then(v => decide(ctx, next, v)) : decide(ctx, next, verdict)
      }
      return stage
    }
  })
}

export default fp(firewallPlugin, { name: 'mantle-firewall', dependencies: ['mantle-pipeline'], fastify: '5.x', encapsulate: true })
