// Ids the gateway makes: request and audit entry ids, the Kernel calls' trace and span ids.
import { randomFillSync } from 'node:crypto'

// The millisecond of the last id made, and the text of its first 15 characters.
let idMs = Number.NaN
let idPrefix = ''
const HEX_BYTE = Array.from({ length: 256 }, (_, b) => b.toString(16).padStart(2, '0'))
// Random bytes for every id the gateway makes (UUIDv7s here, the Kernel calls' trace and span
// ids), cut from one buffer refilled from the CSPRNG 4 KiB at a time: randomBytes per id was a
// syscall per request (5% of the gateway's CPU under load).
const pool = Buffer.allocUnsafe(4096)
let used = pool.length

/** Where `n` fresh random bytes start in `pool`. */
function draw (n: number): number {
  if (used + n > pool.length) {
    randomFillSync(pool)
    used = 0
  }
  const at = used
  used += n
  return at
}

/** `bytes` random bytes as lowercase hex (trace and span ids). */
export function randomHex (bytes: number): string {
  const at = draw(bytes)
  return pool.toString('hex', at, at + bytes)
}

/**
 * A UUIDv7 (RFC 9562): the time in ms in its first 48 bits, then 74 random bits (of 10 random
 * bytes), the version and variant in their places. Ids that grow with time sort as the calls
 * came (logs, the audit trail) and are added at the end of a B-tree index instead of all over
 * it: random entry ids cost PostgreSQL 2.5 to 4.6 µs more per audit entry at 300,000 rows
 * (index pages read and written again, each logged whole after a checkpoint). The uuid package's v7 cost 3.5 µs a call
 * here (fresh random bytes each time), 14 times randomUUID; this one costs what randomUUID does
 * (0.11 µs in a tight loop; 0.30 µs when it cut randomUUID's text up).
 */
export function uuidv7 (ms: number = Date.now()): string {
  if (ms !== idMs) {
    // 48 bits as 12 hex digits, a byte at a time (Number#toString(16) cost 0.5 µs a call).
    const high = Math.floor(ms / 4_294_967_296) & 0xffff
    const low = ms >>> 0
    idPrefix = HEX_BYTE[high >>> 8] + HEX_BYTE[high & 255] + HEX_BYTE[low >>> 24] + HEX_BYTE[(low >>> 16) & 255] + '-' +
      HEX_BYTE[(low >>> 8) & 255] + HEX_BYTE[low & 255] + '-7'
    idMs = ms
  }
  const b = pool
  const i = draw(10)
  // 12 bits after the version (one hex digit of the first byte), then the variant's 2 bits and 62 more.
  return idPrefix + HEX_BYTE[b[i] & 15][1] + HEX_BYTE[b[i + 1]] + '-' + HEX_BYTE[(b[i + 2] & 0x3f) | 0x80] + HEX_BYTE[b[i + 3]] + '-' +
    HEX_BYTE[b[i + 4]] + HEX_BYTE[b[i + 5]] + HEX_BYTE[b[i + 6]] + HEX_BYTE[b[i + 7]] + HEX_BYTE[b[i + 8]] + HEX_BYTE[b[i + 9]]
}

// Version 00 is exactly these 55 characters. A higher version (not ff, which is invalid) is read
// by its first 55 characters, which must be followed by the end or a '-' (W3C Trace Context §3.3).
const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-|$)/
const ZERO_TRACE = '0'.repeat(32)
const ZERO_SPAN = '0'.repeat(16)

/**
 * A W3C traceparent's parts, or null when it is absent or invalid (an all-zero trace id or
 * parent id included, which the spec says to ignore). One parser for the Kernel client and the
 * tracing plugin: the client's own did not reject an all-zero parent id, and continued it. The
 * flags keep only `sampled`, the one flag version 00 defines: the others are set to zero, as W3C
 * Trace Context §3.2.2.5 asks (with tracing off, a version 00 header's went to the Kernel as sent).
 */
export function parseTraceparent (header: string | undefined): { traceId: string, spanId: string, flags: string } | null {
  const m = header === undefined ? null : TRACEPARENT.exec(header)
  if (m === null || m[2] === ZERO_TRACE || m[3] === ZERO_SPAN || m[1] === 'ff') return null
  if (m[1] === '00' && header!.length !== 55) return null
  return { traceId: m[2], spanId: m[3], flags: (parseInt(m[4], 16) & 1) === 1 ? '01' : '00' }
}

/** Most characters and list members of a tracestate forwarded (W3C Trace Context §3.3.1.1, §3.3.1.5). */
export const TRACESTATE_MAX_CHARS = 512
export const TRACESTATE_MAX_MEMBERS = 32
// A list member, OWS trimmed: a simple key or tenant@system, '=', a value of printable ASCII but
// ',' and '=' that does not end in a space (W3C Trace Context §3.3.1.3).
const TRACESTATE_MEMBER = /^(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]$/
const OWS = /^[ \t]+|[ \t]+$/g

/**
 * A caller's tracestate as it may go on with its traceparent: as received when it is well
 * formed (list members as the spec writes them, no key twice, empty members allowed) and within
 * TRACESTATE_MAX_CHARS and TRACESTATE_MAX_MEMBERS; otherwise undefined, and none is forwarded.
 * Only called when the header is present and the traceparent valid.
 */
export function checkedTracestate (header: string): string | undefined {
  if (header.length > TRACESTATE_MAX_CHARS) return undefined
  const keys: string[] = []
  for (const raw of header.split(',')) {
    const member = raw.replace(OWS, '')
    if (member === '') continue
    if (!TRACESTATE_MEMBER.test(member)) return undefined
    const key = member.slice(0, member.indexOf('='))
    if (keys.includes(key) || keys.push(key) > TRACESTATE_MAX_MEMBERS) return undefined
  }
  return keys.length === 0 ? undefined : header
}

const REQUEST_ID = Symbol('mantle.requestId')

/**
 * Keeps a request's id on its raw IncomingMessage (Fastify's genReqId): an answer written to its
 * socket past Fastify (a 408 for a body too slow, a 503 at shutdown) carries the id its request's
 * log lines and audit entry carry, not one made for the answer.
 */
export function keepRequestId (raw: object, id: string): string {
  (raw as Record<symbol, string>)[REQUEST_ID] = id
  return id
}

/** The id genReqId gave this request, if it became one. */
export function requestIdOf (raw: object | null | undefined): string | undefined {
  return raw == null ? undefined : (raw as Record<symbol, string | undefined>)[REQUEST_ID]
}

const CLIENT_REQUEST_ID = Symbol('mantle.clientRequestId')

/**
 * Marks a request (its raw IncomingMessage) whose id is the client's own `x-request-id`, which
 * the client may send again: the audit store looks such ids up before its INSERT, and only them
 * (README, "Request ids"). The ids the gateway makes never collide.
 */
export function markClientRequestId (raw: object): void {
  (raw as Record<symbol, boolean>)[CLIENT_REQUEST_ID] = true
}

/** Whether the request's id (and so every id derived from it: `.n`, `.refresh`) is the client's own. */
export function clientRequestId (raw: object): boolean {
  return (raw as Record<symbol, boolean | undefined>)[CLIENT_REQUEST_ID] === true
}
