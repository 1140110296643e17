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
