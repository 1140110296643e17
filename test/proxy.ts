import { createServer, connect, type Socket } from 'node:net'
import type { AddressInfo } from 'node:net'

interface Teardown { teardown: (fn: () => unknown) => void }

export interface TcpProxy {
  /** The port clients connect to (127.0.0.1). */
  port: number
  /** Connections made through the proxy so far. */
  readonly connections: number
  /**
   * Cuts the link: open connections are destroyed, and new ones are `reset` at once or, with
   * `stall`, accepted and never answered (a server that hangs, the harder case for clients).
   */
  cut: (mode?: 'reset' | 'stall') => void
  /** Holds every chunk from the server back this long (0: none): a slow upstream. */
  delay: (ms: number) => void
  /**
   * Calls `fn` with each chunk a client sends, as it is forwarded: a `delay` set there holds
   * back the server's answer to that chunk (null: no watcher).
   */
  watch: (fn: ((chunk: Buffer) => void) | null) => void
  /**
   * From the first chunk a client sends that `match` accepts, holds that connection's chunks
   * back from the server (the command never reaches it) until `release()` or `restore()`
   * (null: holds nothing more from now on).
   */
  holdSends: (match: ((chunk: Buffer) => boolean) | null) => void
  /** Forwards the chunks `holdSends` held back, in order, and forwards again. */
  release: () => void
  /** Connections whose chunks to the server are held back now. */
  readonly holding: number
  /**
   * The connections whose client has sent something `match` accepts (of its first 4 KiB) get
   * nothing more from the server until `restore()`: what it sends them is dropped, as on a flow
   * a failover left half-open (the client's chunks still reach the server). `lasting`: so do the
   * connections made later, as soon as what they send matches (until `restore()`): a client that
   * can never get through again (its server full, a path that stays broken).
   */
  deafen: (match: (sent: string) => boolean, lasting?: boolean) => void
  /** Forwards again from now on (and without delay). */
  restore: () => void
  close: () => Promise<void>
}

/** The open sockets of a test's server, each tracked until it closes; an error destroys it. */
export function sockets (): { open: Set<Socket>, track: (s: Socket) => void } {
  const open = new Set<Socket>()
  return {
    open,
    track (s) {
      open.add(s)
      s.on('close', () => open.delete(s))
      s.on('error', () => s.destroy())
    }
  }
}

/**
 * The Redis URL of a proxy (or another server) on `port` of this host, with the database
 * REDIS_URL names: a test that reads through its own client on REDIS_URL then reads what the
 * gateway behind the proxy wrote (without it, database 0 whatever REDIS_URL said).
 */
export function redisVia (port: number): string {
  return `redis://127.0.0.1:${port}${new URL(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379').pathname}`
}

/**
 * A TCP proxy on port 0 in front of `target` (a real Redis or PostgreSQL) that a test can cut
 * and restore, so an outage is made without stopping the machine's shared server.
 */
export async function startTcpProxy (t: Teardown, targetPort: number, targetHost = '127.0.0.1'): Promise<TcpProxy> {
  let mode: 'open' | 'reset' | 'stall' = 'open'
  let delayMs = 0
  let connections = 0
  let watcher: ((chunk: Buffer) => void) | null = null
  let holder: ((chunk: Buffer) => boolean) | null = null
  /** deafen's match for the connections made later (lasting), null: none. */
  let deafening: ((sent: string) => boolean) | null = null
  /** The held connections' flushes (holdSends). */
  const holding = new Set<() => void>()
  /** What each open connection's client sent first (4 KiB at most), and whether it is deaf (deafen). */
  const links = new Set<{ sent: string, deaf: boolean }>()
  const { open, track } = sockets()
  /** Chunks held back by `delay`: dropped on close, so that a long delay does not hold the process. */
  const held = new Set<NodeJS.Timeout>()
  const server = createServer(client => {
    track(client)
    if (mode === 'reset') { client.resetAndDestroy(); return }
    if (mode === 'stall') { client.pause(); return }
    connections++
    const upstream = connect(targetPort, targetHost)
    track(upstream)
    const link = { sent: '', deaf: false }
    links.add(link)
    client.on('close', () => links.delete(link))
    // Forwarded by hand, not piped, so that holdSends can keep a chunk from the server.
    let out: Buffer[] | null = null
    // The client ended or closed while chunks were held: the server gets the end after them.
    let ended = false
    const flush = (): void => {
      holding.delete(flush)
      const chunks = out ?? []
      out = null
      for (const chunk of chunks) if (!upstream.destroyed) upstream.write(chunk)
      if (ended) upstream.end()
      else client.resume()
    }
    client.on('data', (chunk: Buffer) => {
      if (link.sent.length < 4096) link.sent += chunk.toString('latin1', 0, 4096 - link.sent.length)
      if (deafening?.(link.sent) === true) link.deaf = true
      watcher?.(chunk)
      if (out === null && holder?.(chunk) === true) {
        out = []
        holding.add(flush)
      }
      if (out !== null) out.push(chunk)
      else if (!upstream.write(chunk)) client.pause()
    })
    upstream.on('drain', () => { if (out === null) client.resume() })
    // Not before the chunks held back: ended first, the server never got them (a write after end).
    client.on('end', () => { if (out === null) upstream.end(); else ended = true })
    // Chunks keep their order, also across a change of delay: one queue per connection, written
    // in order as each one's time comes. (A timer per chunk wrote the chunks of a restore()
    // before those still held back: a client then took one command's answer for another's.)
    const queue: Array<{ at: number, chunk: Buffer }> = []
    let timer: NodeJS.Timeout | null = null
    const drain = (): void => {
      if (timer !== null) held.delete(timer)
      timer = null
      const now = performance.now()
      while (queue.length > 0 && queue[0].at <= now) {
        const { chunk } = queue.shift()!
        if (!client.destroyed) client.write(chunk)
      }
      if (queue.length > 0) {
        timer = setTimeout(drain, queue[0].at - now)
        held.add(timer)
      }
    }
    upstream.on('data', (chunk: Buffer) => {
      if (link.deaf) return
      if (delayMs === 0 && queue.length === 0) client.write(chunk)
      else {
        queue.push({ at: performance.now() + delayMs, chunk })
        if (timer === null) drain()
      }
    })
    // Closed (its end makes it close: the server socket is not half-open) with chunks held: the
    // server gets them, then the end, on release (or loses them at a cut or close, as the rest).
    client.on('close', () => { if (out === null) upstream.destroy(); else ended = true })
    upstream.on('close', () => client.destroy())
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  const destroyAll = (): void => { for (const s of open) s.destroy() }
  const release = (): void => { for (const flush of [...holding]) flush() }
  let closed = false
  const close = async (): Promise<void> => {
    if (closed) return
    closed = true
    for (const timer of held) clearTimeout(timer)
    held.clear()
    destroyAll()
    await new Promise<void>(resolve => server.close(() => resolve()))
  }
  t.teardown(close)
  return {
    port,
    get connections () { return connections },
    get holding () { return holding.size },
    cut (how = 'reset') { mode = how; holding.clear(); destroyAll() },
    delay (ms) { delayMs = ms },
    watch (fn) { watcher = fn },
    holdSends (match) { holder = match },
    release,
    deafen (match, lasting = false) {
      if (lasting) deafening = match
      for (const link of links) if (match(link.sent)) link.deaf = true
    },
    restore () { mode = 'open'; delayMs = 0; holder = null; deafening = null; for (const link of links) link.deaf = false; release() },
    close
  }
}
