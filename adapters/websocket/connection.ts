import type { FastifyInstance } from 'fastify'
import { uuidv7 } from '../../ids.js'
import { WebSocket, type RawData } from 'ws'
import { runCall, callEnvelope, problemJson, type Decide } from '../face.js'
import type { MessageGuard } from '../../plugins/rate-limit/index.js'
import { checkedIdempotencyKey } from '../rest/index.js'
import { MantleError, shuttingDownRefusal, toProblem } from '../../errors.js'
import type { Identity } from '../../plugins/auth/index.js'
import { decodeFrame, type CallFrame, type SubscribeFrame, type UnsubscribeFrame, type AuthFrame, type Refusal } from './frames.js'
import type { CloseReason, WebSocketCounters } from './metrics.js'
import { CLOSE_SLOW_READER, SLOW_READER, boundedFrame, unreadOn } from '../slow-reader.js'
import { untilIdentityEnds, IDENTITY_ENDED } from '../expiry.js'
import type { Heartbeat } from '../heartbeat.js'
import type { UpgradeTrace } from '../upgrade.js'
import type { SharedFrame, UnreadBytes } from '../unread.js'

/** Per-connection bounds (WebSocketFaceSettings in index.ts documents each). */
export interface ConnectionLimits {
  maxSubscriptions: number
  maxInFlight: number
  maxBufferedBytes: number
  maxFrameBytes: number
}

/** What every connection of the face shares, built once at registration. */
export interface FaceShared {
  app: FastifyInstance
  limits: ConnectionLimits
  counters: WebSocketCounters
  /** `{"event":"<name>","data":` per event name: an event frame is this + its JSON + `}`. */
  eventPrefixes: ReadonlyMap<string, string>
  /**
   * The frame of an event (its prefix, its payload's JSON) for a tenant's subscribers, encoded
   * once for all of them: every subscriber's frame is the same bytes (index.ts).
   */
  eventFrame: (prefix: string, json: string, tenant: string) => SharedFrame
  /** Pings every connection; one that misses a pong is dropped. */
  heartbeat: Heartbeat
  /** Runs a subscribe or re-auth frame's decision and records it (the audit trail's). */
  decide: Decide
  /** Counts each subscribe and auth frame towards the HTTP guard's budget; null: no guard. */
  guard: MessageGuard | null
  /** What every socket of the instance holds unread, and each tenant's share (UnreadBytes). */
  unread: UnreadBytes
}

/** Who a connection speaks for, and the header value its calls carry. */
export interface ConnectionAuth {
  identity: Identity
  authorization: string | undefined
  /** The upgrade's client address (clientAddress): the guard's key with identity off. */
  address: string
}

/**
 * A call frame's idempotencyKey as the Idempotency-Key header's rule reads it: JSON null is no
 * key, as an absent one (tRPC and the batch read a null input as none); any other value that is
 * not text is a malformed key (null), refused on a mutation by its pipeline call, ignored on a query.
 */
function frameKey (key: unknown): string | null | undefined {
  if (key === undefined || key === null) return undefined
  return typeof key === 'string' ? checkedIdempotencyKey(key) : null
}

/**
 * One client on /ws. Frames are decoded here and every call goes through runCall, so identity,
 * roles and validation are the pipeline's, per call, as on every other face.
 */
export class Connection {
  private identity: Identity
  private authorization: string | undefined
  private readonly address: string
  /** Set while the guard counts a frame on Redis: the frames read meanwhile are held, in order. */
  private holding = false
  private held: Array<[RawData, boolean]> = []
  private readonly subscriptions = new Map<string, { id: string, unsubscribe: () => void }>()
  private inFlight = 0
  /** Cancels the token's expiry timer and its key's withdrawal listener (null: none armed). */
  private disarmExpiry: (() => void) | null = null
  private reason: CloseReason = 'peer'
  /** Set once the connection is closing: no frame is read and nothing is sent any more. */
  private closing = false
  /** Set by drain (shutdown): called once no call is in flight. */
  private drained: (() => void) | null = null

  /**
   * @param reqId the id of the upgrade request (its access-log lines' `reqId`): the log lines of
   *   the connection's calls carry it too
   * @param trace the upgrade request's traceparent and tracestate, which each call continues
   */
  constructor (private readonly face: FaceShared, readonly socket: WebSocket, auth: ConnectionAuth, private readonly reqId: string, private readonly trace: UpgradeTrace, onClose: (c: Connection) => void) {
    this.identity = auth.identity
    this.authorization = auth.authorization
    this.address = auth.address
    socket.on('message', (data, isBinary) => this.onMessage(data, isBinary))
    // A peer that misses a pong is terminated, its reason recorded and its subscriptions let go first.
    face.heartbeat.watch(socket, () => {
      this.reason = 'heartbeat'
      this.release()
    })
    // ws has already answered a protocol error with its own close code; remember why. A frame over
    // its maxPayload (BFF_BODY_LIMIT, the face's own bound by default) is one too large (1009):
    // counted as a protocol error, the face's `too_large` never showed with the defaults.
    socket.on('error', (err: Error & { code?: string }) => {
      if (this.reason === 'peer') this.reason = err.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH' ? 'too_large' : 'protocol'
    })
    socket.once('close', () => {
      this.drained?.()
      this.release()
      face.counters.closed(this.reason)
      onClose(this)
    })
    this.armExpiry()
  }

  /**
   * The shutdown's first step, once the gateway says it is shutting down (so calls sent from now
   * on are refused OVERLOADED, through their pipeline, audited): resolves once the calls in
   * flight have sent their answers (or the socket closed). Before, the socket closed at once with
   * 1001 and the answer of a call in flight was lost, a mutation carried out at the Kernel and
   * its client never told. Frames held while the guard counts one (guarded) are waited for too:
   * they were received, and a call among them is answered (refused OVERLOADED, audited) like one
   * that came a moment later; they were dropped unanswered.
   */
  async drain (): Promise<void> {
    if ((this.inFlight === 0 && !this.holding) || this.closing) return
    await new Promise<void>(resolve => { this.drained = resolve })
  }

  /** Tells a drain waiting that no call is in flight and no frame held any more. */
  private settled (): void {
    if (this.inFlight === 0 && !this.holding) this.drained?.()
  }

  /** Closes with 1001 (going away) and resolves once the socket is closed. */
  async shutdown (): Promise<void> {
    if (this.socket.readyState === WebSocket.CLOSED) return
    // Not events.once: it rejects on the socket's 'error', which ws emits when a client answers
    // the close with an invalid frame; the shutdown then failed (exit 1) and skipped terminating
    // the clients that had stopped reading, so the process was killed at its limit.
    const closed = new Promise<void>(resolve => this.socket.once('close', () => { resolve() }))
    this.close(1001, 'shutdown', 'The gateway is shutting down')
    await closed
  }

  private close (code: number, reason: CloseReason, text: string): void {
    if (this.closing) return
    this.reason = reason
    this.release()
    this.socket.close(code, text)
  }

  /** Stops every subscription, the expiry timer and the key's listener; idempotent. */
  private release (): void {
    this.closing = true
    this.disarmExpiry?.()
    this.disarmExpiry = null
    for (const sub of this.subscriptions.values()) sub.unsubscribe()
    this.subscriptions.clear()
  }

  /**
   * Times the current token's expiry and watches its JWKS key's withdrawal (4401 either way), in
   * place of the previous token's: a token replaced by one of another key follows the new key.
   */
  private armExpiry (): void {
    this.disarmExpiry?.()
    this.disarmExpiry = untilIdentityEnds(this.identity, why => this.close(4401, why === 'expired' ? 'expired' : 'key_withdrawn', IDENTITY_ENDED[why]))
  }

  /**
   * Sends a frame unless the client has left more than the bound unread (in UTF-8 bytes, see
   * boundedFrame), or its tenant's sockets, or the instance's, more than theirs (UnreadBytes):
   * it has stopped reading, and the connection ends with 1013 instead.
   */
  private send (text: string | SharedFrame): void {
    if (this.closing) return
    const { maxBufferedBytes } = this.face.limits
    const frame = typeof text === 'string' ? boundedFrame(this.socket, text, maxBufferedBytes) : unreadOn(this.socket) > maxBufferedBytes ? null : text
    if (frame === null || !this.face.unread.send(this.socket, frame, this.identity.tenant)) {
      this.close(CLOSE_SLOW_READER, 'slow_reader', SLOW_READER)
      return
    }
    this.face.counters.frameOut()
  }

  private refuse (id: string | null, err: unknown, requestId = uuidv7()): void {
    const { problem, headers } = toProblem(err, requestId)
    this.send('{"id":' + JSON.stringify(id) + ',"error":' + problemJson(problem, headers) + '}')
  }

  private onMessage (data: RawData, isBinary: boolean): void {
    if (this.closing) return
    this.face.counters.frameIn()
    if (this.holding) this.held.push([data, isBinary])
    else this.read(data, isBinary)
  }

  private read (data: RawData, isBinary: boolean): void {
    if (isBinary) {
      this.refuse(null, new MantleError('VALIDATION_FAILED', 'Binary frames are not accepted: send JSON text frames'))
      return
    }
    // With the default binaryType, a text frame is one Buffer, fragments already joined.
    const buffer = data as Buffer
    if (buffer.length > this.face.limits.maxFrameBytes) {
      this.close(1009, 'too_large', `A frame may carry at most ${this.face.limits.maxFrameBytes} bytes`)
      return
    }
    const frame = decodeFrame(buffer.toString('utf8'))
    switch (frame.kind) {
      case 'call': return this.call(frame)
      case 'subscribe': return this.subscribe(frame)
      case 'unsubscribe': return this.unsubscribe(frame)
      case 'auth': return this.auth(frame)
      default: return this.refused(frame)
    }
  }

  /**
   * A frame refused for its form. One that names an op of the manifest is that call's refusal,
   * through its pipeline (its identity and roles first, then this refusal in validation's place),
   * and one that names a known event is that subscription's, decided as a subscribe is: each
   * leaves its one audit entry, as a call or subscription refused for its input does on every
   * face; so does an `auth` frame, as each re-auth frame does. Before, a subscribe frame with an
   * input (which a tRPC subscription refuses, audited) or a call frame with a key too many left
   * none. A frame that names nothing known is junk, answered unrecorded (README, "Audit trail").
   */
  private refused (frame: Refusal): void {
    const error = new MantleError('VALIDATION_FAILED', frame.detail)
    const names = frame.names
    if (names?.kind === 'call' && this.face.app.pipeline.manifest.byName.has(names.name)) {
      this.call({ id: frame.id, op: names.name }, error)
      return
    }
    const subscribe = names?.kind === 'subscribe' && this.face.eventPrefixes.has(names.name)
    if (!subscribe && names?.kind !== 'auth') {
      this.refuse(frame.id, error)
      return
    }
    this.guarded(beyond => {
      const requestId = uuidv7()
      const decision = subscribe
        ? { requestId, protocol: 'websocket', path: '/ws', action: names.name, category: 'read', caller: this.identity, clientRequestId: false } as const
        : { requestId, protocol: 'websocket', path: '/ws', action: 'websocket.auth', category: 'auth', caller: this.identity, clientRequestId: false } as const
      try {
        this.face.decide(decision, () => {
          if (beyond !== null) throw beyond
          if (subscribe) this.face.app.events.bus.authorize(names.name, this.identity)
          throw error
        })
      } catch (err) {
        this.refuse(frame.id, err, requestId)
      }
    })
  }

  /**
   * Runs a subscribe or auth frame (of a known event, well-formed or not) once the HTTP guard
   * has counted it as one request (MessageGuard), given the guard's refusal when the tenant is
   * beyond its budget (null: within it, or no guard), which the frame's decision throws first.
   * On Redis the count is a promise: the socket is paused and the frames read meanwhile are held,
   * then handled in the order they came once it is decided, so a call sent after an `auth` frame
   * still runs with its new token and an unsubscribe after its subscribe finds it. Held frames
   * are bounded: paused, the socket reads no more, and ws emits only the frames of the data it
   * had already read.
   */
  private guarded (run: (beyond: MantleError | null) => void): void {
    const guard = this.face.guard
    const beyond = guard === null ? null : guard(this.identity, this.address)
    if (!(beyond instanceof Promise)) {
      run(beyond)
      return
    }
    this.holding = true
    this.socket.pause()
    beyond.then(refusal => {
      this.holding = false
      const held = this.held
      this.held = []
      // Resumed whatever happened meanwhile: a socket left paused by a connection that began to
      // close (its token expired, a slow reader, a frame too large) never read the client's answer
      // to the close, which then waited for ws's own 30 s timer, holding the connection's place.
      this.socket.resume()
      if (this.closing) return
      run(refusal)
      for (let i = 0; i < held.length; i++) {
        // A frame before it may have closed the connection (1009): the rest are not read.
        if (this.closing) return
        // A held frame the guard counts in turn holds the rest again, still in order.
        if (this.holding) {
          this.held.push(...held.slice(i))
          return
        }
        this.read(held[i][0], held[i][1])
      }
      this.settled()
    }).catch((err: unknown) => {
      // The guard never rejects, nor do the frames' handlers throw: a failure here is a bug of this face.
      this.face.app.log.error({ reqId: this.reqId, err }, 'websocket frame failed')
    })
  }

  /** `formRefusal`: the frame's own refusal (refused), which its pipeline makes in validation's place. */
  private call (frame: Pick<CallFrame, 'op' | 'input' | 'idempotencyKey'> & { id: string | null }, formRefusal?: MantleError): void {
    const { maxInFlight } = this.face.limits
    // Beyond the bound the pipeline refuses the call before anything that costs (it never
    // reaches the Kernel), so that the refusal has its audit entry like every other.
    // A second's wait, as tRPC's bound asks: the calls in flight end and make room.
    // Once the shutdown has begun a call is refused as well (drain): the gateway is going away.
    const refusal = this.face.app.shuttingDown()
      ? shuttingDownRefusal()
      : this.inFlight >= maxInFlight ? new MantleError('OVERLOADED', `A connection may have at most ${maxInFlight} calls in flight`, { headers: { 'retry-after': '1' } }) : formRefusal
    if (refusal === undefined) this.inFlight++
    const id = JSON.stringify(frame.id)
    runCall(this.face.app, {
      requestId: uuidv7(),
      reqId: this.reqId,
      protocol: 'websocket',
      op: frame.op,
      input: frame.input,
      authorization: this.authorization,
      traceparent: this.trace.traceparent,
      tracestate: this.trace.tracestate,
      idempotencyKey: frameKey(frame.idempotencyKey),
      refusal,
      caller: this.socket
    }).then(outcome => {
      if (refusal === undefined) this.inFlight--
      // The answer is already JSON shaped by the op's output schema: it is spliced in as is.
      // A replayed idempotent call and the cache's outcome say so, as REST's headers do.
      this.send(callEnvelope(id, outcome))
      this.settled()
    }).catch((err: unknown) => {
      // runCall never throws; a failure here is a bug of this face, not of the client.
      this.face.app.log.error({ reqId: this.reqId, err }, 'websocket call failed')
    })
  }

  /**
   * One audit entry per subscribe frame of a known event, accepted or refused (an unknown name is
   * answered NOT_FOUND unrecorded, as an unknown op).
   */
  private subscribe (frame: SubscribeFrame): void {
    const name = frame.subscribe
    const { bus } = this.face.app.events
    const prefix = this.face.eventPrefixes.get(name)
    if (prefix === undefined) {
      this.refuse(frame.id, new MantleError('NOT_FOUND', `No event ${name}`))
      return
    }
    this.guarded(beyond => {
      const requestId = uuidv7()
      try {
        this.face.decide({ requestId, protocol: 'websocket', path: '/ws', action: name, category: 'read', caller: this.identity, clientRequestId: false }, () => {
          if (beyond !== null) throw beyond
          bus.authorize(name, this.identity)
          if (this.subscriptions.has(name)) return
          const { maxSubscriptions } = this.face.limits
          if (this.subscriptions.size >= maxSubscriptions) throw new MantleError('OVERLOADED', `A connection holds at most ${maxSubscriptions} subscriptions`)
          // The bus serializes each event once for all its subscribers, and its frame is encoded
          // once for all of them too (eventFrame): each socket holds the same bytes, counted once.
          const tenant = this.identity.tenant
          const unsubscribe = bus.subscribe(name, tenant, (_payload, json) => { this.send(this.face.eventFrame(prefix, json, tenant)) })
          this.subscriptions.set(name, { id: frame.id, unsubscribe })
        })
      } catch (err) {
        this.refuse(frame.id, err, requestId)
        return
      }
      this.send('{"id":' + JSON.stringify(frame.id) + ',"subscribed":' + JSON.stringify(name) + '}')
    })
  }

  private unsubscribe (frame: UnsubscribeFrame): void {
    const name = frame.unsubscribe
    if (!this.face.eventPrefixes.has(name)) {
      this.refuse(frame.id, new MantleError('NOT_FOUND', `No event ${name}`))
      return
    }
    const sub = this.subscriptions.get(name)
    if (sub !== undefined) {
      sub.unsubscribe()
      this.subscriptions.delete(name)
    }
    this.send('{"id":' + JSON.stringify(frame.id) + ',"unsubscribed":' + JSON.stringify(name) + '}')
  }

  /**
   * A fresh token for the same tenant and user; the old one stays if it is refused. One audit
   * entry per frame (`websocket.auth`, under the connection's tenant and user), never the token.
   */
  private auth (frame: AuthFrame): void {
    this.guarded(beyond => { this.reauth(frame, beyond) })
  }

  private reauth (frame: AuthFrame, beyond: MantleError | null): void {
    const authorization = 'Bearer ' + frame.auth
    const requestId = uuidv7()
    let identity: Identity
    try {
      identity = this.face.decide({ requestId, protocol: 'websocket', path: '/ws', action: 'websocket.auth', category: 'auth', caller: this.identity, clientRequestId: false }, () => {
        if (beyond !== null) throw beyond
        const id = this.face.app.identify(authorization)
        if (id.tenant !== this.identity.tenant || id.user !== this.identity.user) {
          throw new MantleError('FORBIDDEN', 'The new token must be for the same tenant and user as the connection')
        }
        return id
      })
    } catch (err) {
      this.refuse(frame.id, err, requestId)
      return
    }
    this.identity = identity
    this.authorization = authorization
    this.armExpiry()
    const expiresAt = identity.expiresAt === Infinity ? 'null' : String(identity.expiresAt)
    this.send('{"id":' + JSON.stringify(frame.id) + ',"authenticated":true,"expiresAt":' + expiresAt + '}')
    // Roles may have changed: a subscription the new token does not allow ends with an error
    // frame carrying the id of the subscribe frame that opened it, and is recorded as a subscribe
    // refused for it is (one entry, its code and the requestId the frame carries). The ones kept
    // are not: nothing was decided about them that their subscribe's entry does not say.
    const { bus } = this.face.app.events
    for (const [name, sub] of this.subscriptions) {
      try {
        bus.authorize(name, identity)
      } catch (err) {
        sub.unsubscribe()
        this.subscriptions.delete(name)
        const ending = uuidv7()
        try {
          this.face.decide({ requestId: ending, protocol: 'websocket', path: '/ws', action: name, category: 'read', caller: identity, clientRequestId: false }, () => { throw err })
        } catch {
          // The refusal rethrown, or the trail's OVERLOADED when it cannot record (no entry then,
          // as for any decision): the subscription ends FORBIDDEN either way.
        }
        this.refuse(sub.id, err, ending)
      }
    }
  }
}
