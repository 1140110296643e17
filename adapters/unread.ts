import { getHeapStatistics } from 'node:v8'
import type { WebSocket } from 'ws'

/**
 * The bytes every WebSocket of the instance holds that its client has not read (queued in the
 * gateway, not yet handed to the operating system), all faces together, and each tenant's share
 * of them. Each socket is bound on its own (MAX_BUFFERED_BYTES, 4 MiB), but the bound multiplied:
 * one token's tenant opening its 10,000 connections per face, each sent small calls whose answers
 * it never read, made the gateway hold 4 MiB for each (42 GB for 26 MB sent, measured at 4.2 MiB a
 * socket), outside the V8 heap that load shedding watches by default, until the process was
 * killed with every tenant's calls. A frame is queued while, before it, its tenant holds at most
 * its share and the instance at most its total: what is held stays within them and one frame.
 */
export class UnreadBytes {
  private total = 0
  private readonly tenants = new Map<string, number>()
  /** What each socket holds, and for which tenant; returned when the socket closes. */
  private readonly sockets = new WeakMap<WebSocket, { tenant: string | undefined, bytes: number }>()

  /**
   * @param max the bytes all sockets together may hold unread
   * @param perTenant the bytes one tenant's sockets may hold (undefined: no share, as with
   *   identity off, when every caller is the one tenant `public`)
   */
  constructor (readonly max: number, readonly perTenant: number | undefined) {}

  /** Bytes held now, all sockets together. */
  get size (): number {
    return this.total
  }

  /** Bytes `tenant`'s sockets hold now. */
  heldBy (tenant: string): number {
    return this.tenants.get(tenant) ?? 0
  }

  /**
   * Sends `frame` (a text frame's UTF-8 bytes) on `socket` for `tenant` (undefined: not known
   * yet), counted until ws has handed it to the operating system or the socket has closed; or
   * returns false, sending nothing, when before it the tenant held more than its share or the
   * instance more than its total. `cb` is ws's send callback.
   */
  send (socket: WebSocket, frame: Buffer, tenant: string | undefined, cb?: (err?: Error) => void): boolean {
    if (this.total > this.max) return false
    if (tenant !== undefined && this.perTenant !== undefined && this.heldBy(tenant) > this.perTenant) return false
    let held = this.sockets.get(socket)
    if (held === undefined) {
      held = { tenant, bytes: 0 }
      const record = held
      this.sockets.set(socket, record)
      // Whatever ws still holds when the socket closes is let go with it (a callback of a write
      // the close cut comes later, or never: it finds the record emptied).
      socket.once('close', () => {
        this.take(record.tenant, -record.bytes)
        record.bytes = 0
      })
    } else if (held.tenant !== tenant) {
      // Identified since (GraphQL's connection_init, tRPC's connectionParams): what it holds
      // counts against its tenant from now on.
      this.take(held.tenant, -held.bytes)
      this.take(tenant, held.bytes)
      held.tenant = tenant
    }
    const record = held
    const bytes = frame.length
    record.bytes += bytes
    this.take(record.tenant, bytes)
    socket.send(frame, { binary: false }, (err?: Error) => {
      const back = Math.min(bytes, record.bytes)
      record.bytes -= back
      this.take(record.tenant, -back)
      cb?.(err)
    })
    return true
  }

  private take (tenant: string | undefined, bytes: number): void {
    if (bytes === 0) return
    this.total += bytes
    if (tenant === undefined) return
    const left = this.heldBy(tenant) + bytes
    if (left > 0) this.tenants.set(tenant, left)
    else this.tenants.delete(tenant)
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
