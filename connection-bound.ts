// The bound on the connections the gateway accepts, from the file descriptors the process may
// open: without one, clients that held connections open (one request each, then idle for the
// keep-alive's 72 s; no token needed) took every descriptor, and the gateway's own connections
// failed with EMFILE: the Kernel pool's (every call 503, for every client, those on connections
// already open included), Redis's and PostgreSQL's reconnections, the audit spool's file.
import { readFileSync } from 'node:fs'

/**
 * Descriptors kept for the process's own use besides the Kernel pool's connections: Node's own
 * (stdio, epoll, its threads' pipes), Redis's and PostgreSQL's connections, the audit spool and
 * manifest files, the firewall's worker threads, the JWKS and trace exports.
 */
export const RESERVED_FDS = 256

/** The soft limit on open files (RLIMIT_NOFILE), from /proc/self/limits; null when unknown (not Linux) or unlimited. */
export function openFilesLimit (read: () => string = () => readFileSync('/proc/self/limits', 'utf8')): number | null {
  let text: string
  try {
    text = read()
  } catch {
    return null
  }
  const soft = /^Max open files\s+(\d+)\s/m.exec(text)?.[1]
  return soft === undefined ? null : Number(soft)
}

/**
 * The connections to accept at once, all faces and WebSockets together: the descriptors the
 * process may open less those its own connections need (the Kernel pool's `kernelConnections`
 * and RESERVED_FDS), half of them at the least; null (no bound) when the limit is unknown.
 */
export function connectionBound (fdLimit: number | null, kernelConnections: number): number | null {
  if (fdLimit === null) return null
  return Math.max(Math.floor(fdLimit / 2), fdLimit - kernelConnections - RESERVED_FDS)
}
