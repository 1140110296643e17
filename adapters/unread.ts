import { getHeapStatistics } from 'node:v8'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import { MantleError } from '../errors.js'
import { FRAME_OVERHEAD, queueFrame, slowReaderCuts } from './slow-reader.js'
import { PROBE_PATHS } from '../probes.js'

/**
 * The key under which what clients without a token hold is counted, as one tenant's (no tenant
 * id can be it: a tenant id is visible characters).
 */
const ANONYMOUS = '\u0000anonymous'

/**
 * One frame's bytes sent on many sockets: an event's frame on /ws, the same bytes for each of its
 * tenant's subscribers, encoded once and handed to each socket as is (ws writes a Buffer without
 * copying it). UnreadBytes.send counts its bytes once against its tenant, while any socket holds it,
 * and each socket's send FRAME_OVERHEAD: what is really held.
 */
export class SharedFrame {
  /** Sends of it not yet handed to the operating system (nor cut by their socket's close). */
  holders = 0
  /** The tenant its bytes count against while held (the first send's). */
  tenant: string | undefined = undefined
  constructor (readonly bytes: Buffer) {}
}

/**
 * The bytes the instance holds that its clients have not read (queued in the gateway, not yet
 * handed to the operating system): every WebSocket's frames, all faces together, and the HTTP
 * answers not yet written out (answerBounds); and each tenant's share of them. Each socket is
 * bound on its own (MAX_BUFFERED_BYTES, 4 MiB), but the bound multiplied: one token's tenant
 * opening its 10,000 connections per face, each sent small calls whose answers it never read,
 * made the gateway hold 4 MiB for each (42 GB for 26 MB sent, measured at 4.2 MiB a socket),
 * outside the V8 heap that load shedding watches by default, until the process was killed with
 * every tenant's calls. A frame is queued while, before it, its tenant holds at most its share and
 * the instance at most its total: what is held stays within them and one frame.
 */
export class UnreadBytes {
  private total = 0
  private readonly tenants = new Map<string, number>()
  /** Tenants holding more than their share now: while none does, nothing is looked up. */
  private over = 0
  /** What each socket holds, and for which tenant; returned when the socket closes. */
  private readonly sockets = new WeakMap<WebSocket, { tenant: string | undefined, bytes: number, shared: Map<SharedFrame, number> | null }>()

  /**
   * @param max the bytes all clients together may hold unread
   * @param perTenant the bytes one tenant's clients may hold (undefined: no share, as with
   *   identity off, when every caller is the one tenant `public`)
   */
  constructor (readonly max: number, readonly perTenant: number | undefined) {}

  /** Bytes held now, all clients together. */
  get size (): number {
    return this.total
  }

  /** Bytes `tenant`'s clients hold now. */
  heldBy (tenant: string): number {
    return this.tenants.get(tenant) ?? 0
  }

  /** Whether nothing is over its bound: the instance within its total, every tenant within its share. */
  get within (): boolean {
    return this.over === 0 && this.total <= this.max
  }

  /**
   * Whether more may be queued for `tenant` (undefined: not known, a client without a token,
   * whose share is the one all such clients hold together). Without a share of their own, the
   * answers and frames of clients without a token counted against the instance's total alone: they
   * could fill it (an /openapi.json or /docs/yaml answer left unread on each of many connections),
   * and every tenant's answers and frames were then refused.
   */
  admits (tenant: string | undefined): boolean {
    if (this.total > this.max) return false
    return this.perTenant === undefined || this.heldBy(tenant ?? ANONYMOUS) <= this.perTenant
  }

  /** Counts `bytes` (negative: given back) as held for the tenant `known` (undefined: not known, counted with the other clients without a token). */
  add (known: string | undefined, bytes: number): void {
    if (bytes === 0) return
    this.total += bytes
    if (known === undefined && this.perTenant === undefined) return
    const tenant = known ?? ANONYMOUS
    const was = this.heldBy(tenant)
    const now = was + bytes
    if (now > 0) this.tenants.set(tenant, now)
    else this.tenants.delete(tenant)
    if (this.perTenant !== undefined) this.over += Number(now > this.perTenant) - Number(was > this.perTenant)
  }

  /**
   * Sends `frame` (a text frame's UTF-8 bytes, or a SharedFrame's) on `socket` for `tenant`
   * (undefined: not known yet), counted until ws has handed it to the operating system or the
   * socket has closed; or returns false, sending nothing, when before it the tenant held more than
   * its share or the instance more than its total. `cb` is ws's send callback.
   */
  send (socket: WebSocket, frame: Buffer | SharedFrame, tenant: string | undefined, cb?: (err?: Error) => void): boolean {
    if (!this.admits(tenant)) return false
    let held = this.sockets.get(socket)
    if (held === undefined) {
      held = { tenant, bytes: 0, shared: null }
      const record = held
      this.sockets.set(socket, record)
      // Whatever ws still holds when the socket closes is let go with it (a callback of a write
      // the close cut comes later, or never: it finds the record emptied).
      socket.once('close', () => {
        this.add(record.tenant, -record.bytes)
        record.bytes = 0
        if (record.shared === null) return
        for (const [shared, sends] of record.shared) this.unhold(shared, sends)
        record.shared = null
      })
    } else if (held.tenant !== tenant) {
      // Identified since (GraphQL's connection_init, tRPC's connectionParams): what it holds
      // counts against its tenant from now on.
      this.add(held.tenant, -held.bytes)
      this.add(tenant, held.bytes)
      held.tenant = tenant
    }
    const record = held
    const shared = frame instanceof SharedFrame ? frame : null
    // With what queuing it holds besides its bytes: small frames cost far more than their size. A
    // shared frame's bytes count once, however many sockets hold it (until unhold).
    const bytes = shared === null ? (frame as Buffer).length + FRAME_OVERHEAD : FRAME_OVERHEAD
    record.bytes += bytes
    this.add(record.tenant, bytes)
    if (shared !== null) {
      record.shared ??= new Map()
      record.shared.set(shared, (record.shared.get(shared) ?? 0) + 1)
      if (shared.holders++ === 0) {
        shared.tenant = record.tenant
        this.add(shared.tenant, shared.bytes.length)
      }
    }
    const sent = queueFrame(socket)
    // Once: at ws's callback, or at once when the frame went straight to the operating system.
    let owed = bytes
    let holding = shared !== null
    const release = (): void => {
      sent()
      const back = Math.min(owed, record.bytes)
      owed = 0
      record.bytes -= back
      this.add(record.tenant, -back)
      if (!holding) return
      holding = false
      // Not when the socket's close let it go already (its record's shared frames emptied).
      const sends = record.shared?.get(shared!)
      if (sends === undefined) return
      if (sends > 1) record.shared!.set(shared!, sends - 1)
      else record.shared!.delete(shared!)
      this.unhold(shared!, 1)
    }
    socket.send(shared === null ? frame as Buffer : shared.bytes, { binary: false }, (err?: Error) => {
      release()
      cb?.(err)
    })
    // Nothing left queued on the socket: the operating system took the frame as it was sent, and
    // ws's callback only comes on the next tick. Counted until then, one event's frames to many
    // readers of a tenant added up within its fan-out: 40 readers of a 64 KiB event passed a
    // share of 1 MiB, and most of them, reading all along, were closed with 1013.
    if (socket.bufferedAmount === 0) release()
    return true
  }

  /** `sends` sends of `shared` held no more: its bytes are given back once none holds it. */
  private unhold (shared: SharedFrame, sends: number): void {
    shared.holders -= sends
    if (shared.holders === 0) this.add(shared.tenant, -shared.bytes.length)
  }
}

/**
 * The instance's bound: half of V8's heap limit (`--max-old-space-size`, which Node derives from
 * the container's memory when it is not set: the one memory figure every instance has), of which
 * a tenant holds a tenth, as with connections: at least ten tenants fill their shares before the
 * instance's is full.
 */
export function defaultUnreadBytes (perTenant: boolean): UnreadBytes {
  const max = Math.floor(getHeapStatistics().heap_size_limit / 2)
  return new UnreadBytes(max, perTenant ? Math.floor(max / 10) : undefined)
}

/**
 * Answers shorter than this are not counted: Node hands them to the operating system at once
 * (a socket's high-water mark is 16 KiB), and counting every small answer would cost each request
 * a listener for nothing.
 */
export const COUNTED_ANSWER_BYTES = 16 * 1024

/**
 * Bounds what HTTP answers hold unread, in `unread` beside the WebSockets' frames. Each connection
 * holds at most an answer or two (Node reads no further pipelined request while one is unwritten),
 * but connections are not bounded, nor what they hold together: one token's client that sent 40
 * batches of 50 cached 208 KB answers (120 KB sent) on 40 connections and read none made the
 * gateway hold 400 MB until the connections closed, and a heap of 256 MiB ran out: the process
 * died with every tenant's calls.
 *
 * An answer of COUNTED_ANSWER_BYTES or more (UTF-8 bytes) counts against the request's tenant (`tenantOf`,
 * undefined when it has none: the instance's total alone) until its response closes (written out,
 * or its connection gone). While a tenant's answers and its sockets' frames hold more than its
 * share, or the instance more than its total, its requests are refused 503 OVERLOADED
 * (`Retry-After: 5`) before anything runs, and an answer that finds them so (of requests that came
 * together, all admitted before any answer was counted) is not sent: 503 OVERLOADED instead, its
 * call having run. A request with no tenant is never refused before it runs (it runs nothing but
 * its refusal, or a document's answer), but its answer of COUNTED_ANSWER_BYTES or more counts in
 * the share all clients without a token hold together, and is left out beyond it (503), except a
 * probe's or the scrape's. While nothing is over its bound, a request costs one comparison.
 */
export function answerBounds (app: FastifyInstance, unread: UnreadBytes, tenantOf: (request: FastifyRequest) => string | undefined): void {
  const leftOut = (): MantleError => overloaded('This answer was left out: this tenant\'s clients have too many answers unread on this instance. The call did run (a mutation was carried out)')
  const anonymousLeftOut = (): MantleError => overloaded('This answer was left out: clients without a token have too many answers unread on this instance')
  // A streamed answer cut past the share, counted as a WebSocket or an SSE stream cut so, and no
  // warn line (an OVERLOADED refusal writes none): it wrote one per stream, counted nowhere.
  const streamCuts = slowReaderCuts(app, 'trpc_stream')
  app.addHook('onRequest', (request, _reply, done) => {
    if (unread.within) {
      done()
      return
    }
    const tenant = tenantOf(request)
    if (tenant === undefined || unread.admits(tenant)) done()
    else done(overloaded('This tenant\'s clients have too many answers unread on this instance'))
  })
  app.addHook('onSend', (request, reply, payload, done) => {
    if (payload instanceof Response) {
      // A streamed answer (tRPC's jsonl batch), counted as it is made. Not an SSE subscription's,
      // whose response is written only as fast as its client reads: what it holds of its own
      // (the events tRPC took and has not written, and writableLength) is counted by its
      // subscription (adapters/trpc/subscriptions.ts, LiveSubscriptions.bounded).
      if (payload.body === null || payload.headers.get('content-type')?.startsWith('text/event-stream') === true || reply.raw.destroyed) {
        done(null, payload)
        return
      }
      const tenant = tenantOf(request)
      if (!unread.admits(tenant) && !PROBE_PATHS.has(request.routeOptions.url ?? '')) {
        payload.body.cancel().catch(() => {})
        done(tenant === undefined ? anonymousLeftOut() : leftOut())
        return
      }
      const cut = (): void => {
        streamCuts?.inc()
        reply.raw.destroy()
      }
      const made = (): void => { madeWhole.add(reply.raw) }
      done(null, new Response(countedStream(payload.body, unread, tenant, cut, made), { status: payload.status, headers: payload.headers }))
      return
    }
    // A string in the UTF-8 bytes it is sent as: by its characters, an answer of text in three-byte
    // characters was counted at a third of what it holds. Measured only when it may reach the
    // bound: a UTF-16 code unit is three UTF-8 bytes at most.
    const length = typeof payload === 'string' || Buffer.isBuffer(payload) ? payload.length : 0
    if (length * 3 < COUNTED_ANSWER_BYTES || reply.raw.destroyed) {
      done(null, payload)
      return
    }
    const bytes = typeof payload === 'string' ? Buffer.byteLength(payload) : length
    if (bytes < COUNTED_ANSWER_BYTES) {
      done(null, payload)
      return
    }
    const tenant = tenantOf(request)
    // A client without a token, beyond the share all of them hold together: its answer (the
    // OpenAPI document, say) is left out. Not a probe's or the scrape's: a monitor is never refused.
    if (!unread.admits(tenant) && !PROBE_PATHS.has(request.routeOptions.url ?? '')) {
      done(tenant === undefined ? anonymousLeftOut() : leftOut())
      return
    }
    unread.add(tenant, bytes)
    reply.raw.once('close', () => { unread.add(tenant, -bytes) })
    done(null, payload)
  })
}

/** Responses whose streamed body (countedStream) is wholly made: what is left is the client's to read. */
const madeWhole = new WeakSet<object>()

/**
 * Marks `res`'s streamed answer as wholly made (streamMade): an SSE subscription ended at shutdown,
 * which makes nothing more but its end, the client's to read.
 */
export function markMade (res: object): void {
  madeWhole.add(res)
}

/**
 * Whether `res`'s streamed answer (a jsonl batch, or an SSE subscription ended at shutdown) is wholly made, its calls all done: at shutdown
 * it is left as an answer sent whole is (app.ts's reap), not waited for as a call in flight.
 */
export function streamMade (res: object): boolean {
  return madeWhole.has(res)
}

function overloaded (detail: string): MantleError {
  return new MantleError('OVERLOADED', detail, { headers: { 'retry-after': '5' } })
}

/**
 * A streamed answer's body (tRPC's jsonl batch, each result sent as it completes), counted in
 * `unread` against `tenant` as answerBounds counts an answer sent whole. Read from `source` as fast
 * as it is made, not as fast as the client reads: pulled at the client's pace, the results made
 * but not yet sent waited in @trpc/server, counted nowhere, and a streamed batch of large answers
 * left unread held them all, as a batch sent whole did before it was counted. Each chunk counts
 * from the moment it is made until Fastify asks for the next one, which it does once the response
 * has handed the chunk to the operating system (to within the socket's high-water mark), or until
 * the answer ends. A chunk made while, before it, the tenant holds more than its share (or the
 * instance more than its total) is not counted: `cut` is called with the reason, to end the
 * response there (as a WebSocket frame closes its socket), and all the answer held is given back.
 * What it holds is given back too when it ends, fails or is cancelled (its connection gone).
 * `whole` is called once the source has ended (every chunk made).
 *
 * By hand: a web stream's own queue counts its chunks (a size strategy) but says nothing when one
 * leaves it, nor when the response has written it out.
 */
export function countedStream (source: ReadableStream<Uint8Array>, unread: UnreadBytes, tenant: string | undefined, cut: (reason: MantleError) => void, whole: () => void): ReadableStream<Uint8Array> {
  const reader = source.getReader()
  const made: Uint8Array[] = []
  /** Bytes counted: the chunks made and not yet handed on, and the one handed on last. */
  let held = 0
  /** The chunk handed on last: given back when the next is asked for. */
  let handed = 0
  let ended = false
  let failed: unknown
  let stopped = false
  let wake: (() => void) | undefined
  const giveBack = (bytes: number): void => {
    held -= bytes
    unread.add(tenant, -bytes)
  }
  const release = (): void => {
    made.length = 0
    handed = 0
    giveBack(held)
  }
  const readAll = async (): Promise<void> => {
    try {
      for (;;) {
        const { done, value } = await reader.read()
        if (stopped) return
        if (done) break
        if (!unread.admits(tenant)) {
          const reason = overloaded('This streamed answer was cut: this tenant\'s clients have too many answers unread on this instance. Its calls did run (a mutation was carried out)')
          stopped = true
          failed = reason
          release()
          reader.cancel().catch(() => {})
          cut(reason)
          wake?.()
          return
        }
        held += value.byteLength
        unread.add(tenant, value.byteLength)
        made.push(value)
        wake?.()
      }
      ended = true
      whole()
    } catch (err) {
      failed = err
    }
    wake?.()
  }
  readAll().catch(() => {}) // it catches what it meets
  return new ReadableStream<Uint8Array>({
    async pull (controller) {
      giveBack(handed)
      handed = 0
      // Until a chunk is made, or the source ends or fails (readAll wakes it).
      while (made.length === 0) {
        if (ended || failed !== undefined) break
        await new Promise<void>(resolve => { wake = resolve })
      }
      wake = undefined
      if (failed !== undefined) {
        release()
        controller.error(failed)
        return
      }
      const chunk = made.shift()
      if (chunk === undefined) {
        controller.close()
        return
      }
      handed = chunk.byteLength
      controller.enqueue(chunk)
    },
    async cancel (reason) {
      stopped = true
      release()
      await reader.cancel(reason)
    }
  }, { highWaterMark: 0 })
}
