import fastJson from 'fast-json-stringify'
import { ownFieldsOnly } from '../../own-properties.js'
import type { EventDefinition } from '../../manifest.js'
import { zoneRefusal, type Identity } from '../auth/identity.js'
import { MantleError } from '../../errors.js'
import type { ValidateFunction } from 'ajv'
import { MAX_ANSWER_DEPTH, answerCheck, jsonNestsDeeperThan, mayNestDeep, openSchema } from '../pipeline/index.js'

/** An event as the Kernel publishes it (CONTRACT §4). */
export interface KernelEventMessage {
  topic: string
  tenantId: string
  payload: unknown
}

/** Receives the cleaned payload and its JSON, serialized once per event for every subscriber. */
export type Listener = (payload: unknown, json: string) => void

export interface BusCounters {
  delivered: (event: string, n: number) => void
  dropped: (reason: 'invalid' | 'slow_consumer' | 'unknown_topic' | 'duplicate') => void
  /** A subscribe refused at a bound: the instance's, or its tenant's share of it. */
  refused: (bound: 'instance' | 'tenant') => void
}

/**
 * The JSON each delivered payload was parsed from (the event's serializer's), by the payload the
 * bus hands every subscriber: for a face whose library encodes its messages itself (tRPC over
 * WebSocket), which then splices it in rather than stringifying the payload again for each
 * subscriber. Forgotten with the payload.
 */
const eventJsons = new WeakMap<object, string>()

/** The JSON of a payload the bus delivered (undefined for any other value). */
export function eventJsonOf (payload: unknown): string | undefined {
  return payload !== null && typeof payload === 'object' ? eventJsons.get(payload) : undefined
}

const noCounters: BusCounters = { delivered () {}, dropped () {}, refused () {} }

interface CompiledPayload { serialize: (payload: unknown) => string, check: ValidateFunction, free: boolean }

/**
 * An event's payload serializer and check, kept for as long as its definition lives: a manifest's
 * events are frozen, so every gateway built on one shares them (as the pipeline's operations do).
 */
const compiledPayloads = new WeakMap<EventDefinition, CompiledPayload>()

function compiledPayload (e: EventDefinition): CompiledPayload {
  let compiled = compiledPayloads.get(e)
  if (compiled === undefined) {
    // Opened as an answer's schema is: an undeclared field is dropped, not refused.
    const opened = openSchema(e.payload)
    compiled = { serialize: ownFieldsOnly(opened, fastJson(opened as Parameters<typeof fastJson>[0])), check: answerCheck(opened), free: mayNestDeep(opened) }
    compiledPayloads.set(e, compiled)
  }
  return compiled
}

export function isKernelEvent (value: unknown): value is KernelEventMessage {
  const v = value as Partial<KernelEventMessage> | null
  return v !== null && typeof v === 'object' && typeof v.topic === 'string' && v.topic !== '' &&
    typeof v.tenantId === 'string' && v.tenantId !== '' && 'payload' in v
}

/**
 * Fan-out of Kernel events to this instance's subscribers, by event name and tenant: a
 * subscriber only ever receives its own tenant's events. Payloads are serialized through the
 * event's schema, so fields it does not declare never reach a client. Bounded: at most
 * `maxSubscriptions` listeners, and at most `maxPerTenant` of them for one tenant, so that one
 * tenant cannot take every subscription of the instance from the others; beyond either a
 * subscribe is refused with OVERLOADED (Retry-After: 5, as either frees up when subscriptions end).
 * While the instance sheds load a subscribe is refused too, as a call is.
 */
export class EventBus {
  readonly definitions: ReadonlyMap<string, EventDefinition>
  private readonly byTopic = new Map<string, EventDefinition[]>()
  private readonly serializers = new Map<string, (payload: unknown) => string>()
  /**
   * Each event's check of its payload against its schema, as a call's answer is checked: the
   * serializer writes what the schema says without checking it (1.5 for an integer went out as 1,
   * "12" for a number as 12, a status its enum does not list as it was on /ws and tRPC, while
   * GraphQL's subscriptions answered an error for the same event).
   */
  private readonly checks = new Map<string, ValidateFunction>()
  /** The events whose payload schema leaves a part free (mayNestDeep): their JSON's depth is checked. */
  private readonly free = new Set<string>()
  private readonly listeners = new Map<string, Map<string, Set<Listener>>>()
  private count = 0
  /** Subscriptions by tenant: bounded by `count` (an entry per tenant holding one, gone at zero). */
  private readonly byTenant = new Map<string, number>()

  constructor (
    events: readonly EventDefinition[],
    private readonly checkRoles: boolean,
    private readonly maxSubscriptions = 100_000,
    private readonly counters: BusCounters = noCounters,
    private readonly maxPerTenant = Infinity,
    /** While the instance sheds load, the refusal of a subscribe (null: load shedding off). */
    private readonly shedding: (() => Error | null) | null = null
  ) {
    this.definitions = new Map(events.map(e => [e.name, e]))
    for (const e of events) {
      const list = this.byTopic.get(e.topic) ?? []
      list.push(e)
      this.byTopic.set(e.topic, list)
      const compiled = compiledPayload(e)
      this.serializers.set(e.name, compiled.serialize)
      this.checks.set(e.name, compiled.check)
      if (compiled.free) this.free.add(e.name)
      this.listeners.set(e.name, new Map())
    }
  }

  get subscriptions (): number {
    return this.count
  }

  /** The event a caller may subscribe to, or NOT_FOUND / FORBIDDEN. */
  authorize (name: string, identity: Identity): EventDefinition {
    const def = this.definitions.get(name)
    if (def === undefined) throw new MantleError('NOT_FOUND', `No event ${name}`)
    // As an operation's zone is checked by the authorization stage.
    const outside = this.checkRoles ? zoneRefusal(name, def.zone, identity.zone) : null
    if (outside !== null) throw outside
    if (this.checkRoles && def.roles.length > 0 && !def.roles.some(r => identity.roles.includes(r))) {
      throw new MantleError('FORBIDDEN', `${name} needs one of the roles: ${def.roles.join(', ')}`)
    }
    return def
  }

  /** Subscriptions `tenant` holds on this instance. */
  subscriptionsOf (tenant: string): number {
    return this.byTenant.get(tenant) ?? 0
  }

  /**
   * OVERLOADED when this instance holds its most subscriptions, or `tenant` its share of them,
   * or while the instance sheds load (a subscribe on a socket already open never passed the
   * shedding of HTTP requests, and a subscription costs for as long as it lasts), as `subscribe`
   * would refuse: for a face that answers before its subscription starts (an SSE response's
   * status and headers). `pending`, `pendingOfTenant`: subscriptions the face has granted and not
   * yet subscribed (tRPC's, from their first pull), counted as held.
   */
  checkRoom (tenant: string, pending = 0, pendingOfTenant = 0): void {
    if (this.shedding !== null) {
      const shed = this.shedding()
      if (shed !== null) throw shed
    }
    if (this.count + pending >= this.maxSubscriptions) {
      this.counters.refused('instance')
      throw new MantleError('OVERLOADED', 'Too many event subscriptions on this instance', { headers: { 'retry-after': '5' } })
    }
    if (this.subscriptionsOf(tenant) + pendingOfTenant >= this.maxPerTenant) {
      this.counters.refused('tenant')
      throw new MantleError('OVERLOADED', `A tenant holds at most ${this.maxPerTenant} event subscriptions on this instance`, { headers: { 'retry-after': '5' } })
    }
  }

  subscribe (name: string, tenant: string, listener: Listener): () => void {
    const byTenant = this.listeners.get(name)
    if (byTenant === undefined) throw new MantleError('NOT_FOUND', `No event ${name}`)
    this.checkRoom(tenant)
    let set = byTenant.get(tenant)
    if (set === undefined) {
      set = new Set()
      byTenant.set(tenant, set)
    }
    set.add(listener)
    this.count++
    this.byTenant.set(tenant, this.subscriptionsOf(tenant) + 1)
    let active = true
    return () => {
      if (!active) return
      active = false
      set.delete(listener)
      this.count--
      if (set.size === 0) byTenant.delete(tenant)
      const left = this.subscriptionsOf(tenant) - 1
      if (left > 0) this.byTenant.set(tenant, left)
      else this.byTenant.delete(tenant)
    }
  }

  /**
   * The events of one name and tenant as an async iterable, for faces that pull (tRPC, GraphQL).
   * It ends when `signal` aborts. A consumer more than `highWaterMark` events behind loses the
   * oldest ones (counted as slow_consumer): memory stays bounded.
   *
   * `behind`, if given, is told how far the consumer is behind, in UTF-8 bytes of the events'
   * JSON: +n when an event is queued, -n when it is taken, and what it lost (dropped events) once
   * it has caught up (the queue is empty) or the stream ends. For a face whose library waits for
   * each frame to be written before it takes the next event (mercurius): the socket never holds
   * more than about one frame, and what its client has not read waits here.
   */
  stream (name: string, tenant: string, signal: AbortSignal, highWaterMark = 256, behind?: (bytes: number) => void): AsyncIterable<unknown> {
    const bus = this
    return {
      [Symbol.asyncIterator] () {
        const queue: unknown[] = []
        // With `behind`: each queued event's size, and the bytes owed in all (lost ones included).
        const sizes: number[] = []
        let owed = 0
        let wake: (() => void) | null = null
        const unsubscribe = bus.subscribe(name, tenant, (payload, json) => {
          if (queue.length >= highWaterMark) {
            queue.shift()
            sizes.shift()
            bus.counters.dropped('slow_consumer')
          }
          queue.push(payload)
          if (behind !== undefined) {
            const size = Buffer.byteLength(json)
            sizes.push(size)
            owed += size
            behind(size)
          }
          wake?.()
        })
        const onAbort = (): void => { unsubscribe(); wake?.() }
        if (signal.aborted) unsubscribe()
        else signal.addEventListener('abort', onAbort, { once: true })
        const settle = (bytes: number): void => {
          if (bytes === 0) return
          owed -= bytes
          behind!(-bytes)
        }
        const finish = (): IteratorResult<unknown> => {
          unsubscribe()
          signal.removeEventListener('abort', onAbort)
          settle(owed)
          return { done: true, value: undefined }
        }
        return {
          async next (): Promise<IteratorResult<unknown>> {
            while (queue.length === 0) {
              if (signal.aborted) return finish()
              await new Promise<void>(resolve => { wake = resolve })
              wake = null
            }
            const value = queue.shift()
            if (behind !== undefined) settle(queue.length === 0 ? owed : sizes.shift()!)
            if (queue.length === 0) sizes.length = 0
            return { done: false, value }
          },
          async return (): Promise<IteratorResult<unknown>> {
            return finish()
          }
        }
      }
    }
  }

  /** Delivers an event to this instance's subscribers of its tenant. */
  dispatch (message: KernelEventMessage): void {
    const defs = this.byTopic.get(message.topic)
    if (defs === undefined) {
      this.counters.dropped('unknown_topic')
      return
    }
    for (const def of defs) {
      const set = this.listeners.get(def.name)!.get(message.tenantId)
      if (set === undefined || set.size === 0) continue
      let json: string
      let payload: unknown
      try {
        if (!this.checks.get(def.name)!(message.payload)) throw new Error('not of its schema')
        json = this.serializers.get(def.name)!(message.payload)
        // Bounded as a call's answer is (MAX_ANSWER_DEPTH), whatever way the event came.
        if (this.free.has(def.name) && jsonNestsDeeperThan(json, MAX_ANSWER_DEPTH)) throw new Error('nested too deep')
        payload = JSON.parse(json)
      } catch {
        this.counters.dropped('invalid')
        continue
      }
      if (payload !== null && typeof payload === 'object') eventJsons.set(payload, json)
      // A copy: a listener that unsubscribes while we deliver does not skip its neighbour.
      for (const listener of [...set]) listener(payload, json)
      this.counters.delivered(def.name, set.size)
    }
  }
}
