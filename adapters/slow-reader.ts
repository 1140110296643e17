import type { WebSocket } from 'ws'

/** What a WebSocket may hold that its client has not read, on every face (4 MiB by default). */
export const MAX_BUFFERED_BYTES = 4 * 1024 * 1024
/** 1013 (try again later): the code, and the text, a client that does not read is closed with. */
export const CLOSE_SLOW_READER = 1013
export const SLOW_READER = 'The client does not read its frames'

/**
 * Whether `socket` holds more than `max` bytes its client has not read; it is then closed with
 * 1013. One getter read per call; always false without a socket (a call over HTTP).
 */
export function slowReader (socket: WebSocket | null, max = MAX_BUFFERED_BYTES): boolean {
  if (socket === null || socket.bufferedAmount <= max) return false
  socket.close(CLOSE_SLOW_READER, SLOW_READER)
  return true
}

/**
 * The text frame `text` encoded once (UTF-8), or null when queuing it would take the bytes
 * `socket` holds for its client past `max`: the client has stopped reading. The frame is counted
 * before it is queued (checked after, the bound was passed by the frame that crossed it, of any
 * size), in UTF-8 bytes: ws queues a text frame's string, which it counts in characters. A frame
 * larger than the bound alone still goes out on a socket that holds nothing. Send what it
 * returns with `{ binary: false }`.
 */
export function boundedFrame (socket: WebSocket, text: string, max: number): Buffer | null {
  const frame = Buffer.from(text)
  const queued = socket.bufferedAmount
  return queued > 0 && queued + frame.length > max ? null : frame
}

type Send = (data: unknown, options?: unknown, cb?: unknown) => void

/**
 * Holds every text frame a library sends on `socket` (mercurius' graphql-ws server, which calls
 * socket.send itself) to boundedFrame's rule: one that does not fit is not queued, and the
 * socket closes with 1013 instead; a callback gets the error ws gives a send on a closing socket.
 */
export function boundSends (socket: WebSocket, max = MAX_BUFFERED_BYTES): void {
  const send = socket.send as Send
  const bounded: Send = function (this: WebSocket, data, options, cb) {
    if (typeof data !== 'string' || socket.readyState !== socket.OPEN) { send.call(this, data, options, cb); return }
    const callback = typeof options === 'function' ? options : cb
    const frame = boundedFrame(socket, data, max)
    if (frame !== null) {
      send.call(this, frame, typeof options === 'object' && options !== null ? { ...options, binary: false } : { binary: false }, callback)
      return
    }
    socket.close(CLOSE_SLOW_READER, SLOW_READER)
    if (typeof callback === 'function') process.nextTick(callback, new Error(SLOW_READER))
  }
  socket.send = bounded as WebSocket['send']
}
