import type { FastifyInstance } from 'fastify'
import type { Registry } from 'prom-client'
import type { WebSocket } from 'ws'
import type { UnreadBytes } from './unread.js'
import { CallCounter, type CounterSeries } from '../plugins/metrics/call-metrics.js'

/** What a WebSocket may hold that its client has not read, on every face (4 MiB by default). */
export const MAX_BUFFERED_BYTES = 4 * 1024 * 1024
/** 1013 (try again later): the code, and the text, a client that does not read is closed with. */
export const CLOSE_SLOW_READER = 1013
export const SLOW_READER = 'The client does not read its frames'

/**
 * What a frame queued for a client that does not read holds of the heap besides its own bytes:
 * ws's header and write entries, the socket's queue entry and the send's callbacks. Measured at
 * 1.2 KB for a 15-byte frame through the faces (370 B through ws alone). Counted by its bytes
 * alone, a socket held 250,000 such frames within its 4 MiB: a client without a token that sent
 * graphql-transport-ws pings and read no pong made the gateway hold 300 MB of heap on one socket.
 */
export const FRAME_OVERHEAD = 1024

/** Frames queued on each socket through UnreadBytes.send whose send has not completed. */
const queuedFrames = new WeakMap<WebSocket, number>()

/**
 * Counts a frame queued on `socket`; the function returned counts it out (once), when ws has
 * handed it to the operating system or the socket has closed.
 */
export function queueFrame (socket: WebSocket): () => void {
  queuedFrames.set(socket, (queuedFrames.get(socket) ?? 0) + 1)
  let done = false
  return () => {
    if (done) return
    done = true
    const left = (queuedFrames.get(socket) ?? 1) - 1
    if (left > 0) queuedFrames.set(socket, left)
    else queuedFrames.delete(socket)
  }
}

/**
 * What `socket` holds that its client has not read: ws's bufferedAmount (bytes), and
 * FRAME_OVERHEAD for each frame counted queued (queueFrame).
 */
export function unreadOn (socket: WebSocket): number {
  return socket.bufferedAmount + (queuedFrames.get(socket) ?? 0) * FRAME_OVERHEAD
}

/**
 * Whether `socket` holds more than `max` bytes its client has not read (unreadOn), with
 * `unsent` more bytes waiting for it elsewhere (a subscription's queue); it is then closed with
 * 1013. Always false without a socket (a call over HTTP).
 */
export function slowReader (socket: WebSocket | null, max = MAX_BUFFERED_BYTES, unsent = 0): boolean {
  if (socket === null || unreadOn(socket) + unsent <= max) return false
  cutSlowReader(socket)
  return true
}

/** Where a client that did not read is cut: a face, and how its client reads it. */
export type SlowReaderFace = 'ws' | 'graphql' | 'trpc' | 'trpc_sse' | 'trpc_stream'
const FACES: ReadonlyArray<[SlowReaderFace, string, string]> = [['ws', 'ws', 'websocket'], ['graphql', 'graphql', 'websocket'], ['trpc', 'trpc', 'websocket'], ['trpc_sse', 'trpc', 'sse'], ['trpc_stream', 'trpc', 'stream']]
/** The counter of each registry (one per app), made by the first face that asks for it. */
const cutCounters = new WeakMap<Registry, Map<SlowReaderFace, CounterSeries>>()
/** The counter each socket's cut is counted in (only while metrics are on). */
const socketCounters = new WeakMap<WebSocket, CounterSeries>()

/**
 * `face`'s series of mantle_slow_reader_cuts_total on the app's registry (every face's series made
 * at 0 with the first), or null when metrics are off.
 */
export function slowReaderCuts (app: FastifyInstance, face: SlowReaderFace): CounterSeries | null {
  if (!app.hasDecorator('metrics')) return null
  const registry = app.metrics.registry
  let series = cutCounters.get(registry)
  if (series === undefined) {
    const counter = new CallCounter({
      name: 'mantle_slow_reader_cuts_total',
      help: 'Clients cut for leaving more than their bound unread (a WebSocket closed with 1013: over its 4 MiB, or its tenant\'s or the instance\'s share of the unread bytes; a tRPC SSE stream ended past its 4 MiB or its tenant\'s share, a tRPC streamed batch cut past its tenant\'s share), by face and transport',
      labelNames: ['face', 'transport'],
      registers: [registry]
    })
    series = new Map(FACES.map(([key, face, transport]) => {
      const one = counter.series(face, transport)
      one.inc(0)
      return [key, one]
    }))
    cutCounters.set(registry, series)
  }
  return series.get(face)!
}

/** Counts `socket`'s cut as a slow reader (cutSlowReader) in `counter`; nothing when it is null (metrics off). */
export function countSlowReaderCuts (socket: WebSocket, counter: CounterSeries | null): void {
  if (counter !== null) socketCounters.set(socket, counter)
}

/** Closes `socket` with 1013, counted once (while open) in its face's counter (countSlowReaderCuts). */
export function cutSlowReader (socket: WebSocket): void {
  if (socket.readyState === socket.OPEN) socketCounters.get(socket)?.inc()
  socket.close(CLOSE_SLOW_READER, SLOW_READER)
}

/**
 * The text frame `text` encoded once (UTF-8), or null when `socket` already holds more than
 * `max` bytes its client has not read: the client has stopped reading. What a client has not
 * read is counted in UTF-8 bytes: ws counts a queued string in characters (text in two-byte
 * characters was counted at half its size), and counts a Buffer in bytes. A client is judged by
 * what it left unread before this frame, not with it: one that reads, a moment behind (its
 * network's buffers full), is not closed for two large answers in a row; what is queued stays
 * within the bound and one frame. Send what it returns with `{ binary: false }`.
 */
export function boundedFrame (socket: WebSocket, text: string, max: number): Buffer | null {
  return unreadOn(socket) > max ? null : Buffer.from(text)
}

type Send = (data: unknown, options?: unknown, cb?: unknown) => void

/**
 * Makes every text frame a library sends on `socket` itself (tRPC's WebSocket adapter,
 * mercurius' graphql-ws server) go out as its UTF-8 bytes, so that ws counts what the client
 * has not read (bufferedAmount) in bytes: it counts a queued string in characters, and text in
 * two- or three-byte characters was counted at a half or a third of its size. Data that is not
 * a string, and anything sent on a socket that is not open, pass through as they are. With
 * `max`, each frame is also held to boundedFrame's rule: one sent to a client that has stopped
 * reading is not queued, and the socket closes with 1013 instead; a callback gets the error ws
 * gives a send on a closing socket. Without it, what the bound does is the caller's. With
 * `budget`, each frame is counted in the instance's unread bytes against the socket's tenant
 * (`tenant()`, undefined while not known), and one that finds the tenant's share or the
 * instance's total passed is not queued either: the socket closes with 1013 (UnreadBytes).
 */
export function utf8Sends (socket: WebSocket, max?: number, budget?: { unread: UnreadBytes, tenant: () => string | undefined }): void {
  const send = socket.send as Send
  const utf8: Send = function (this: WebSocket, data, options, cb) {
    if (typeof data !== 'string' || socket.readyState !== socket.OPEN) { send.call(this, data, options, cb); return }
    const callback = typeof options === 'function' ? options : cb
    const frame = max === undefined ? Buffer.from(data) : boundedFrame(socket, data, max)
    if (frame !== null) {
      if (budget === undefined) {
        send.call(this, frame, typeof options === 'object' && options !== null ? { ...options, binary: false } : { binary: false }, callback)
        return
      }
      // The libraries send text frames with no options but `binary` (tRPC, mercurius, graphql-ws).
      if (budget.unread.send(socket, frame, budget.tenant(), typeof callback === 'function' ? callback as (err?: Error) => void : undefined)) return
    }
    cutSlowReader(socket)
    if (typeof callback === 'function') process.nextTick(callback, new Error(SLOW_READER))
  }
  socket.send = utf8 as WebSocket['send']
}
