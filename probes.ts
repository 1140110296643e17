// The gateway's probe paths, one list for every concern that leaves them alone.

/**
 * Liveness, readiness and the metrics scrape: never counted by the rate-limit guard (a CORS
 * preflight to them neither), never shed (plugins/pressure adds /diagz), and never refused for
 * a query string that is not valid percent-encoding (app.ts): a probe must always answer.
 */
export const PROBE_PATHS: ReadonlySet<string> = new Set(['/healthz', '/readyz', '/metrics'])

/**
 * Whether a request's target names a probe, as the router matches it (ignoreTrailingSlash): for a
 * request routed elsewhere (a preflight, on CORS's `OPTIONS *` route), where the route's URL says nothing.
 */
export function targetsProbe (url: string): boolean {
  const query = url.indexOf('?')
  let path = query === -1 ? url : url.slice(0, query)
  if (path.length > 1 && path.endsWith('/')) path = path.slice(0, -1)
  return PROBE_PATHS.has(path)
}
