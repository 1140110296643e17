// The gateway's lingering close of a connection, shared by app.ts and the refusals of an
// upgrade made before @fastify/websocket's own hook runs (the root hooks, load shedding).
import type { IncomingMessage } from 'node:http'
import type { Duplex } from 'node:stream'
import type { FastifyReply, FastifyRequest } from 'fastify'

// How long the gateway still reads a connection it closes (RFC 9112 §9.6, "lingering close"):
// closing it while the client's bytes are unread resets it, and the reset can reach the client
// before the answer, which it then never reads (found by `npm run fuzz`: a 413, a 400 for junk
// in the head or a 431 before a 3 MB body, lost to a reset while the client still sent it).
// The gateway half-closes, drops what still comes, and closes when the client does or after
// this long. No library does this for Node's HTTP server.
const LINGER_MS = 2000
/** The connections closing so: what they still bring is read and dropped. */
export const lingering = new WeakSet<Duplex>()

/**
 * The answer written straight to the connection of a request whose body was still arriving
 * (app.ts's clientErrorHandler: a 408 for a body too slow, a 400 for a chunk the parser refuses), by that request: its status and
 * contract code. The request then ends as if its client had left (Node's 'aborted'), and what
 * records it records this answer instead: an admin call's audit entry said CLIENT_CLOSED 499 where
 * its client was answered 408.
 */
export const answeredStraight = new WeakMap<IncomingMessage, readonly [status: number, code: string]>()

/** Half-closes `socket` (nothing more it brings is served: app.ts) and destroys it when the client closes, or after LINGER_MS. */
export function lingeringClose (socket: Duplex): void {
  if (lingering.has(socket)) return
  lingering.add(socket)
  if (socket.writable) socket.end()
  const timer = setTimeout(() => socket.destroy(), LINGER_MS)
  timer.unref()
  socket.once('close', () => clearTimeout(timer))
}

/**
 * Closes a refused WebSocket upgrade's connection once its answer is written: @fastify/websocket
 * marks an upgrade's socket to be closed in its own onRequest hook, which a refusal in an earlier
 * hook keeps from running, and the socket (no HTTP connection of Node's any more) stayed open,
 * holding the app's close.
 */
export function closeAfterAnswer (request: FastifyRequest, reply: FastifyReply): void {
  const socket = request.raw.socket
  reply.header('connection', 'close')
  reply.raw.once('finish', () => { lingeringClose(socket) })
}

/**
 * Whether a request announces a body not yet all read: Node emits a request before its parser
 * has seen even a bodyless one end (`complete` is false for a GET here), so the head decides.
 * A request refused so ends its connection after the answer: Node would otherwise read the
 * refused body to its end, however long, to reach the next request.
 */
export function framesBody (req: IncomingMessage): boolean {
  if (req.complete) return false
  const length = req.headers['content-length']
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && Number(length) !== 0)
}
