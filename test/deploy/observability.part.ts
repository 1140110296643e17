import t from 'tap'
import { readFileSync } from 'node:fs'
import { parse } from 'yaml'
import { buildDemoApp, buildTestApp } from '../helper.js'
import { ConfigSchema } from '../../schemas/config.js'

// The dashboard and the alert rules in deploy/ name only metrics the gateway exports: a renamed
// or removed metric fails here instead of leaving a panel blank or an alert that never fires.

const root = new URL('../../', import.meta.url)
const read = (path: string): string => readFileSync(new URL(path, root), 'utf8')

/** Metric names in a PromQL expression: the gateway's own families and Node's process ones. */
export function metricNames (expr: string): string[] {
  const names = expr.match(/\b(?:mantle|nodejs|process)_[a-zA-Z0-9_]+\b/g) ?? []
  return [...new Set(names)]
}

/** Every series name a scrape can show: each family, and a histogram's _bucket, _count and _sum. */
export function exported (scrape: string): Set<string> {
  const names = new Set<string>()
  for (const line of scrape.split('\n')) {
    const m = /^# TYPE (\S+) (\S+)$/.exec(line)
    if (m === null) continue
    names.add(m[1])
    if (m[2] === 'histogram') for (const s of ['_bucket', '_count', '_sum']) names.add(m[1] + s)
    if (m[2] === 'summary') for (const s of ['_count', '_sum']) names.add(m[1] + s)
  }
  return names
}

interface Rule { alert: string, expr: string, for?: string, labels?: { severity?: string }, annotations?: { summary?: string } }

const rules = (): Rule[] => (parse(read('deploy/prometheus/alerts.yaml')) as { groups: Array<{ name: string, rules: Rule[] }> }).groups.flatMap(g => g.rules)

function dashboardExprs (): string[] {
  const dashboard = JSON.parse(read('deploy/grafana/mantle-dashboard.json')) as { panels: Array<{ targets?: Array<{ expr: string }> }>, templating: { list: Array<{ definition?: string }> } }
  return [
    ...dashboard.panels.flatMap(p => (p.targets ?? []).map(target => target.expr)),
    ...dashboard.templating.list.flatMap(v => v.definition === undefined ? [] : [v.definition])
  ]
}

t.test('the name extraction finds what is missing', async t => {
  t.same(metricNames('sum(rate(mantle_a_total{x="y"}[5m])) / nodejs_b > 1 and up == 0'), ['mantle_a_total', 'nodejs_b'])
  const names = exported('# HELP h x\n# TYPE mantle_h_seconds histogram\nmantle_h_seconds_bucket{le="1"} 0\n# TYPE mantle_g gauge\n')
  t.ok(names.has('mantle_h_seconds_count') && names.has('mantle_h_seconds_bucket') && names.has('mantle_g'))
  t.notOk(names.has('mantle_not_exported'))
})

t.test('every metric the alert rules and the dashboard name is one the gateway exports', async t => {
  // Everything on, with Redis, so that every metric family is registered.
  const app = await buildDemoApp(t, { REDIS_URL: 'redis://127.0.0.1:6379' })
  const scrape = await app.inject({ method: 'GET', url: '/metrics' })
  t.equal(scrape.statusCode, 200)
  const names = exported(scrape.body)

  const alertRules = rules()
  const byAlert = new Map(alertRules.map(r => [r.alert, r]))
  // The rules the issue asks for are there.
  for (const alert of ['MantleLatencyP99High', 'MantleErrorRateHigh', 'MantleKernelBreakerOpen', 'MantleRedisFallbackActive', 'MantleAuditSpoolGrowing']) t.ok(byAlert.has(alert), alert)
  // Every bound has its alert where crossing it costs users: lost invalidations serve dropped answers.
  t.match(byAlert.get('MantleCacheInvalidationsLost')?.expr, /increase\(mantle_cache_invalidations_lost_total\[10m\]\)\) > 0/)
  // A breaker that opens again and again is never open a minute on end: the openings are counted.
  t.match(byAlert.get('MantleKernelBreakerFlapping')?.expr, /increase\(mantle_kernel_breaker_opened_total\[15m\]\)\) >= 3/)
  // A refused reload leaves the manifest in force unlike the one mounted: a pod started later (a
  // scale-up, a restart) reads the mounted one, and fails on it or serves another catalog.
  t.match(byAlert.get('MantleManifestReloadRefused')?.expr, /increase\(mantle_manifest_reloads_total\{outcome="refused"\}\[\w+\]\)\) > 0/)
  // A quarantined audit entry is never retried and lives in the spool directory, an emptyDir in
  // deploy/k8s that goes with its pod: an operator must be told to read it while it is there.
  t.match(byAlert.get('MantleAuditEntriesQuarantined')?.expr, /increase\(mantle_audit_quarantined_total\[\w+\]\)\) > 0/)
  // A connection closed as soon as accepted (the descriptor bound) is no call and no HTTP answer:
  // in no other metric the rules read.
  t.match(byAlert.get('MantleConnectionsDropped')?.expr, /increase\(mantle_connections_dropped_total\[\w+\]\)\) > 0/)
  t.match(byAlert.get('MantleLatencyP99High')!.expr, /histogram_quantile\(0\.99,.*mantle_request_duration_seconds_bucket.*\) > 0\.010/s)
  t.match(byAlert.get('MantleErrorRateHigh')!.expr, /status_class="5xx".*> 0\.001/s)
  for (const rule of alertRules) {
    t.ok(rule.expr.trim() !== '' && ['critical', 'warning', 'info'].includes(rule.labels?.severity ?? ''), `${rule.alert} has an expression and a severity`)
    const used = metricNames(rule.expr)
    t.ok(used.length > 0, `${rule.alert} names a metric`)
    t.same(used.filter(n => !names.has(n)), [], `${rule.alert}: every metric is exported`)
  }

  const exprs = dashboardExprs()
  t.ok(exprs.length >= 15)
  const used = [...new Set(exprs.flatMap(metricNames))]
  t.same(used.filter(n => !names.has(n)), [], 'dashboard: every metric is exported')
  // The golden signals are on the dashboard: latency, traffic, errors, saturation.
  for (const n of ['mantle_request_duration_seconds_bucket', 'mantle_request_duration_seconds_count', 'nodejs_eventloop_lag_p99_seconds', 'nodejs_heap_size_used_bytes', 'mantle_requests_in_flight', 'mantle_kernel_pool', 'mantle_websocket_connections', 'mantle_load_shed_total']) {
    t.ok(used.includes(n), `the dashboard shows ${n}`)
  }
})

t.test('an alert fires when no instance\'s metrics reach Prometheus, whatever the gateway\'s configuration', async t => {
  // Every other rule reads the gateway's own series: with every replica down (a crash loop, a
  // bad manifest in every pod) or every scrape refused (BFF_METRICS_TOKEN set and Prometheus
  // without it: 401), those series end and every rule stays quiet, the outage unannounced.
  const rule = rules().find(r => r.alert === 'MantleMetricsAbsent')
  t.ok(rule, 'MantleMetricsAbsent')
  const absent = /^absent\((\w+)\)$/.exec(rule?.expr.trim() ?? '')
  t.ok(absent, `an absent() of one metric: ${rule?.expr ?? ''}`)
  t.equal(rule?.labels?.severity, 'critical')
  t.ok(rule?.for !== undefined, 'not on one failed scrape')
  // A metric every instance exports, every other concern off: absent only when nothing is scraped.
  const off = Object.fromEntries(Object.keys(ConfigSchema.properties).filter(k => k.endsWith('_ENABLED') && k !== 'BFF_METRICS_ENABLED').map(k => [k, false]))
  const app = await buildTestApp(t, off)
  t.ok(exported((await app.inject({ method: 'GET', url: '/metrics' })).body).has(absent?.[1] ?? ''), `${absent?.[1] ?? ''} is exported with every concern off`)
})

t.test('on the embedded default (no Redis) no Redis gauge is exported: MantleRedisFallbackActive stays quiet', async t => {
  // mantle_events_redis_up was exported at 0 without Redis, and the alert fired on every
  // instance that runs on memory stores by choice.
  const app = await buildDemoApp(t)
  const names = exported((await app.inject({ method: 'GET', url: '/metrics' })).body)
  t.notOk(names.has('mantle_redis_up'))
  t.notOk(names.has('mantle_events_redis_up'))
  t.ok(names.has('mantle_events_published_total'), 'the events metrics are there')
})
