// The REST operation a request refused for its path was made to. find-my-way refuses a parameter
// longer than maxParamLength (Fastify's 414) or a path that is not valid percent-encoding
// (`/agents/%zz`, Fastify's 400 BAD_REQUEST) before any route, through frameworkErrors, so the
// request has no route, and its refusal was not recorded, where the same operation with a bad
// parameter of an allowed length is recorded VALIDATION_FAILED. Asked on such a refusal only: a
// request that is routed pays nothing.

import type { FastifyInstance } from 'fastify'
import { routed } from './allowed-methods.js'
import type { Operation } from './manifest.js'

/**
 * The operation whose REST route `url` (under `prefix`) would reach were each of its segments at
 * most `maxParamLength` characters and valid percent-encoding, or null. The router itself says whether the cut path is
 * routed (Fastify's own route, its constraints); the manifest says which of the method's
 * templates it is: the one whose parameters take the values the router found.
 */
export function overlongOperation (app: FastifyInstance, method: string, url: string, prefix: string, maxParamLength: number): Operation | null {
  const q = url.indexOf('?')
  const path = q === -1 ? url : url.slice(0, q)
  if (!path.startsWith(prefix + '/')) return null
  // Each overlong segment (the router counts its decoded characters), and each one that does not
  // decode, in place of a parameter's value: a text no static segment is, which needs no decoding (a cut of the segment's own
  // text may end inside an escape, or a character). Then, for a segment of several parameters
  // (`/:a-:b`, `/:a.:b`: the router ends a parameter at '-' or '.'), each overlong piece between
  // those separators instead, which keeps them: the whole segment in one stand matches no such
  // template, and a single parameter's value with a '-' in it matches no cut by pieces.
  const stand = '~'.repeat(maxParamLength)
  const long = (s: string): boolean => { const d = decoded(s); return d === null || d.length > maxParamLength }
  const segments = path.split('/')
  const whole = segments.map(s => long(s) ? stand : s).join('/')
  const pieces = segments.map(s => long(s) ? s.split(/([-.])/).map(p => long(p) ? stand : p).join('') : s).join('/')
  return operationAt(app, method, whole, prefix) ?? (pieces === whole ? null : operationAt(app, method, pieces, prefix))
}

function operationAt (app: FastifyInstance, method: string, cut: string, prefix: string): Operation | null {
  const found = routed(app, method, cut)
  if (found === null) return null
  const params = found.params as Record<string, string>
  const served = method === 'HEAD' ? 'GET' : method
  for (const op of app.pipeline.manifest.operations) {
    if (op.method !== served || op.pathParams.length !== Object.keys(params).length || !op.pathParams.every(p => Object.hasOwn(params, p))) continue
    // The template's segments against the cut path's: each static one equal, each one with
    // parameters the segment the router's values (decoded, as it gives them) make of it.
    const template = (prefix + op.path).split('/')
    // ignoreTrailingSlash: `/agents/<id>/` is `/agents/:id`'s.
    const segments = (cut.endsWith('/') ? cut.slice(0, -1) : cut).split('/')
    if (template.length !== segments.length) continue
    if (template.every((t, i) => t.includes(':') ? decoded(segments[i]) === t.replace(PARAM, (_m, name: string) => params[name]) : t === segments[i])) return op
  }
  return null
}

/** A parameter in a template's segment, as manifest.ts reads them. */
const PARAM = /:([A-Za-z_][A-Za-z0-9_]*)/g

function decoded (segment: string): string | null {
  try {
    return decodeURIComponent(segment)
  } catch {
    return null
  }
}
