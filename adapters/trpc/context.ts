import type { FastifyRequest } from 'fastify'
import type { ServerResponse } from 'node:http'
import type { WebSocket } from 'ws'
import { idempotencyKeyOf, single } from '../rest/index.js'
import type { CacheOutcome, Caller } from '../../plugins/pipeline/index.js'
import { AnswerBudget } from '../face.js'
import { queryToken, type UpgradeTrace } from '../upgrade.js'
import { clientRequestId } from '../../ids.js'

/** What every procedure of one request (HTTP) or one connection (WebSocket) shares. */
export interface TrpcContext {
  /** The raw `Authorization` value each call hands the pipeline (identity is checked per call). */
  readonly authorization: string | undefined
  /** The HTTP request's id; null on a WebSocket, where every call gets a fresh one. */
  readonly requestId: string | null
  /** `requestId` is the client's own x-request-id (CallContext.clientRequestId). */
  readonly clientRequestId: boolean
  /** A batch (`?batch=1`): each call gets `${requestId}.${batchIndex}`. */
  readonly batch: boolean
  /**
   * More than one call in the request: each gets the key `<key> <batchIndex>` (see callKey). A batch of one
   * call (httpBatchLink sends one for a lone mutation) keeps the key as sent, as REST does: a
   * repeat over another face found no outcome under `<key>.0`, and the Kernel ran it again.
   */
  readonly keyPerCall: boolean
  /** One per HTTP request: identical queries of a batch reach the Kernel once. */
  readonly memo: Map<string, Promise<unknown>> | null
  /** What a batch's calls have answered (null: one call, or a WebSocket, a message a call). */
  readonly answer: AnswerBudget | null
  readonly traceparent: string | undefined
  readonly tracestate: string | undefined
  readonly idempotencyKey: string | null | undefined
  /** The connection's socket; null over HTTP. Its subscriptions pause while it holds too much; a call closes it. */
  readonly socket: WebSocket | null
  /** Where the answers go (the HTTP response, or the socket): a call whose caller left is cancelled. */
  readonly caller: Caller
  /** Calls of a WebSocket connection running now, and its event subscriptions (both bounded). */
  inFlight: number
  subscriptions: number
  /** Set by the shutdown, which waits for the connection's calls in flight: called once none is left. */
  idle?: () => void
  /**
   * The response cache's outcome of each call of an HTTP request, by batch index (null: no
   * call had one yet); the response's `x-cache` lists them (responseMeta).
   */
  cache: Array<CacheOutcome | undefined> | null
  /**
   * The header fields the stages set on an HTTP request's call (RateLimit-*, Idempotent-Replayed,
   * x-cache; null: none), also when it then failed; the response carries them when it carries
   * that one call alone (responseMeta), a batch of one included, under a refusal's own, as REST's
   * answer does.
   */
  headers: Record<string, string> | null
  /**
   * An SSE subscription's refusal, made before its stream began: its headers (Retry-After) go on
   * the response, which tRPC sends as a 200 stream whose one event is the error (null: none).
   */
  refused: Record<string, string> | null
}

/** The route of tRPC's calls over HTTP (its WebSocket is at `/trpc`). */
export const TRPC_CALLS = '/trpc/*'

/** connectionParams may carry `{ token }` (a bare JWT) or `{ authorization: "Bearer ..." }`. */
function fromParams (params: Readonly<Record<string, string | undefined>> | null): string | undefined {
  if (params === null) return undefined
  if (typeof params.authorization === 'string' && params.authorization !== '') return params.authorization
  if (typeof params.token === 'string' && params.token !== '') return `Bearer ${params.token}`
  return undefined
}

/**
 * The token of an HTTP request: the Authorization header, else connectionParams (which
 * httpSubscriptionLink puts in the URL), else `?access_token=` (EventSource cannot set headers).
 */
export function httpContext (request: FastifyRequest, response: ServerResponse, connectionParams: Readonly<Record<string, string | undefined>> | null, batch: boolean, calls: number): TrpcContext {
  return {
    authorization: httpAuthorization(request, connectionParams),
    requestId: request.id,
    clientRequestId: clientRequestId(request.raw),
    batch,
    keyPerCall: batch && calls > 1,
    memo: batch ? new Map() : null,
    answer: batch ? new AnswerBudget() : null,
    traceparent: single(request.headers.traceparent),
    tracestate: single(request.headers.tracestate),
    idempotencyKey: idempotencyKeyOf(request),
    socket: null,
    caller: response,
    inFlight: 0,
    subscriptions: 0,
    cache: null,
    headers: null,
    refused: null
  }
}

/**
 * An HTTP request's token as httpContext reads it; `connectionParams` as tRPC parsed them, or
 * (undefined) parsed here from the query, for a request refused before tRPC ran (its audit entry).
 */
export function httpAuthorization (request: FastifyRequest, connectionParams?: Readonly<Record<string, string | undefined>> | null): string | undefined {
  const query = request.query as Record<string, unknown> | null
  // An empty header is none, as upgradeAuthorization (and the guard) read it: it hid the token
  // the guard had counted the call by, and the call was refused 401.
  const header = request.headers.authorization
  return (header === '' ? undefined : header) ?? fromParams(connectionParams === undefined ? paramsIn(query?.connectionParams) : connectionParams) ?? queryToken(request)
}

/**
 * `?connectionParams=` as tRPC reads it: the first one (URLSearchParams.get; Fastify's query
 * makes a list of several), a JSON object, or nothing. Read as a list, none: the guard counted
 * the call, its first one's tenant's, towards its address or the `?access_token=` beside it.
 */
function paramsIn (value: unknown): Readonly<Record<string, string | undefined>> | null {
  const text = Array.isArray(value) ? value[0] : value
  if (typeof text !== 'string') return null
  try {
    const value: unknown = JSON.parse(text)
    return value !== null && typeof value === 'object' && !Array.isArray(value) ? value as Record<string, string | undefined> : null
  } catch {
    return null
  }
}

/**
 * A WebSocket connection's token: connectionParams, else the upgrade's (`upgrade`: its header or
 * `?access_token=`, as the upgrade's check read them), and the upgrade's trace context (`trace`).
 */
export function socketContext (socket: WebSocket, upgrade: string | undefined, connectionParams: Readonly<Record<string, string | undefined>> | null, trace: UpgradeTrace): TrpcContext {
  return {
    authorization: fromParams(connectionParams) ?? upgrade,
    requestId: null,
    clientRequestId: false,
    batch: false,
    keyPerCall: false,
    memo: null,
    answer: null,
    traceparent: trace.traceparent,
    tracestate: trace.tracestate,
    idempotencyKey: undefined,
    socket,
    caller: socket,
    inFlight: 0,
    subscriptions: 0,
    cache: null,
    headers: null,
    refused: null
  }
}
