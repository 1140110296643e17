// The stated targets of `npm run bench` (the README's, for one instance on 2 cores), evaluated
// from the spine and faces sections' rows. Apart from bench.ts, which runs when imported, so
// that test/loadtest/ can check them. A row whose calls failed (flagged) is not a result: an
// error is answered fast, and p99 is read from 2xx answers only, so no target it feeds is met.
import { fmt } from './measure.js'
import type { FaceRow } from './bench-faces.js'

/** The targets the README states for a 2-core machine, each marked met or not (issue 7). */
export const STATED_TARGETS = { maxP99Ms: 10, minRestReqPerSec: 8000, minTrpcReqPerSec: 10_000, maxRssBytes: 256e6 } as const

export interface StatedTarget { text: string, evaluated: boolean, met: boolean }

/** What the stated targets read of the spine section's gateway-spine row. */
export interface SpineTargetRow { reqPerSec: number, p99FineMs: number, flagged: boolean, peakRssMiB: number | null }

/** What the stated targets read of the faces section. */
export interface FacesTargetReport { faces: ReadonlyArray<Pick<FaceRow, 'face' | 'skipped' | 'reqPerSec' | 'p99Ms' | 'flagged' | 'peakRssMiB'>> }

const LABEL: Record<string, string> = { rest: 'REST', trpc: 'tRPC', graphql: 'GraphQL', websocket: 'WebSocket' }

/**
 * The stated targets from the gateway as deployed (gateway-spine): REST throughput and p99 from
 * the spine section (else the faces' REST), tRPC from the faces, p99 on every face, and the
 * largest RSS the gateway reached in either section. A target is met only when none of the rows
 * it reads is flagged (and, for p99 on every face, when every face the faces section tried was
 * measured: a face left out because its preflight failed is a failed face, not a fast one).
 */
export function statedTargets (spine: SpineTargetRow | undefined, faces: FacesTargetReport | undefined): StatedTarget[] {
  const T = STATED_TARGETS
  const out: StatedTarget[] = []
  /** The verdict of a target whose figures pass `ok`, read from rows named by `failed` when flagged. */
  const verdict = (ok: boolean, failed: readonly string[]): { met: boolean, mark: string } => {
    if (failed.length > 0) return { met: false, mark: `NOT met: calls failed (${failed.join(', ')} flagged)` }
    return ok ? { met: true, mark: 'met' } : { met: false, mark: 'NOT met' }
  }
  const faceRow = (face: string): FacesTargetReport['faces'][number] | undefined => faces?.faces.find((r) => r.face === face && r.skipped === null)
  const restFace = faceRow('rest')
  const rest = spine === undefined ? (restFace === undefined ? undefined : { ...restFace, name: 'REST (faces)' }) : { ...spine, name: 'REST (spine)' }
  if (rest === undefined) out.push({ text: `REST > ${T.minRestReqPerSec} req/s: not evaluated (neither spine nor faces ran)`, evaluated: false, met: false })
  else {
    const { met, mark } = verdict(rest.reqPerSec > T.minRestReqPerSec, rest.flagged ? [rest.name] : [])
    out.push({ text: `REST > ${T.minRestReqPerSec} req/s: ${mark} (${fmt(rest.reqPerSec, 0)})`, evaluated: true, met })
  }
  const trpc = faceRow('trpc')
  if (trpc === undefined) out.push({ text: `tRPC > ${T.minTrpcReqPerSec} req/s: not evaluated (the faces section did not measure it)`, evaluated: false, met: false })
  else {
    const { met, mark } = verdict(trpc.reqPerSec > T.minTrpcReqPerSec, trpc.flagged ? ['tRPC'] : [])
    out.push({ text: `tRPC > ${T.minTrpcReqPerSec} req/s: ${mark} (${fmt(trpc.reqPerSec, 0)})`, evaluated: true, met })
  }
  // Every row measured: the spine's gateway-spine and each face.
  const rows: Array<{ name: string, p99Ms: number, flagged: boolean, peakRssMiB: number | null }> = []
  if (spine !== undefined) rows.push({ name: 'REST (spine)', p99Ms: spine.p99FineMs, flagged: spine.flagged, peakRssMiB: spine.peakRssMiB })
  for (const row of faces?.faces ?? []) if (row.skipped === null) rows.push({ name: LABEL[row.face] ?? row.face, p99Ms: row.p99Ms, flagged: row.flagged, peakRssMiB: row.peakRssMiB })
  const flagged = rows.filter((r) => r.flagged).map((r) => r.name)
  const skipped = (faces?.faces ?? []).filter((r) => r.skipped !== null).map((r) => LABEL[r.face] ?? r.face)
  if (rows.length === 0) out.push({ text: `p99 < ${T.maxP99Ms} ms: not evaluated`, evaluated: false, met: false })
  else {
    let { met, mark } = verdict(rows.every((r) => r.p99Ms < T.maxP99Ms), flagged)
    if (met && skipped.length > 0) {
      met = false
      mark = `NOT met: ${skipped.join(', ')} not measured`
    }
    out.push({ text: `p99 < ${T.maxP99Ms} ms on every face: ${mark} (${rows.map((r) => `${r.name} ${fmt(r.p99Ms, 2)}`).join(', ')})`, evaluated: true, met })
  }
  const rss = rows.filter((r) => r.peakRssMiB !== null)
  if (rss.length === 0) out.push({ text: 'RSS under load < 256 MB: not evaluated (no gateway process was read)', evaluated: false, met: false })
  else {
    const peak = Math.max(...rss.map((r) => r.peakRssMiB!))
    // A gateway that answers errors holds less than one that does the work.
    const { met, mark } = verdict(peak * 2 ** 20 < T.maxRssBytes, rss.filter((r) => r.flagged).map((r) => r.name))
    out.push({ text: `RSS under load < 256 MB: ${mark} (peak ${fmt(peak * 2 ** 20 / 1e6, 0)} MB)`, evaluated: true, met })
  }
  return out
}
