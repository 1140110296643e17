// The REST operation a request refused for an overlong path segment was made to. find-my-way
// refuses a parameter longer than maxParamLength before any route (Fastify's 414, through
// frameworkErrors), so the request has no route, and its refusal was not recorded, where the
// same operation with a bad parameter of an allowed length is recorded VALIDATION_FAILED. Asked
// on such a refusal only: a request that is routed pays nothing.

import type { FastifyInstance } from 'fastify'
import { routed } from './allowed-methods.js'
import type { Operation } from './manifest.js'

/**
 * The operation whose REST route `url` (under `prefix`) would reach were each of its segments at
 * most `maxParamLength` characters, or null. The router itself says whether the cut path is
 * routed (Fastify's own route, its constraints); the manifest says which of the method's
 * templates it is: the one whose parameters take the values the router found.
 */
export function overlongOperation (app: FastifyInstance, method: string, url: string, prefix: string, maxParamLength: number): Operation | null {
  const q = url.indexOf('?')
  const path = q === -1 ? url : url.slice(0, q)
  if (!path.startsWith(prefix + '/')) return null
  // Each overlong segment (the router counts its decoded characters) in place of a parameter's
  // value: a text no static segment is, which needs no decoding (a cut of the segment's own
  // text may end inside an escape, or a character).
  const stand = '~'.repeat(maxParamLength)
  const cut = path.split('/').map(s => (decoded(s) ?? s).length > maxParamLength ? stand : s).join('/')
  const found = routed(app, method, cut)
  if (found === null) return null
  const params = found.params as Record<string, string>
  const served = method === 'HEAD' ? 'GET' : method
  for (const op of app.pipeline.manifest.operations) {
    if (op.method !== served || op.pathParams.length !== Object.keys(params).length || !op.pathParams.every(p => Object.hasOwn(params, p))) continue
    // The template's segments against the cut path's: each static one equal, each parameter's
    // the value the router found (decoded, as it gives them).
    const template = (prefix + op.path).split('/')
    // ignoreTrailingSlash: `/agents/<id>/` is `/agents/:id`'s.
    const segments = (cut.endsWith('/') ? cut.slice(0, -1) : cut).split('/')
    if (template.length !== segments.length) continue
    if (template.every((t, i) => t.startsWith(':') ? decoded(segments[i]) === params[t.slice(1)] : t === segments[i])) return op
  }
  return null
}

function decoded (segment: string): string | null {
  try {
    return decodeURIComponent(segment)
  } catch {
    return null
  }
}
