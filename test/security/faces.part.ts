import t, { type Test } from 'tap'
import { generateKeyPairSync, createHmac, sign, randomUUID, type KeyObject } from 'node:crypto'
import WebSocket from 'ws'
import type { FastifyInstance } from 'fastify'
import { buildTestApp, SECRET } from '../helper.js'
import { mintToken } from '../../plugins/auth/index.js'
import { startKernel } from '../../kernel/server.js'
import type { Zone } from '../../schemas/manifest.js'

// Issue 4, "How it is checked": forged, expired, not-yet-valid, wrong audience, wrong issuer,
// `alg: none`, key-confusion, unknown-kid and malformed tokens; role and zone escalation; a token
// of tenant A trying to reach tenant B's data. Each on every face and every way a face takes a
// token, each a 401/403 in the face's own shape, never a 5xx. One gateway serves every table.

// About a thousand sequential probes over real sockets: quick alone (10-25 s), but under a
// fully loaded shared machine the file has taken 110 s, close to tap's 120 s default.
t.setTimeout(300_000)

const ISSUER = 'https://issuer.security.test'
const AUDIENCE = 'mantle-security-suite'
const EVERY_ROLE = ['viewer', 'editor', 'operator', 'system']

const keyPair = (kind: 'rsa' | 'ec'): { publicKey: KeyObject, privateKey: KeyObject } =>
  kind === 'rsa' ? generateKeyPairSync('rsa', { modulusLength: 2048 }) : generateKeyPairSync('ec', { namedCurve: 'P-256' })
const rsa = keyPair('rsa')
const ec = keyPair('ec')
const otherRsa = keyPair('rsa')
const pem = (key: KeyObject): string => key.export({ type: 'spki', format: 'pem' }).toString()
const PUBLIC_KEYS = JSON.stringify({ r1: pem(rsa.publicKey), e1: pem(ec.publicKey) })

// Tokens are written by hand with node:crypto, independently of the verifier's library, so that
// they can be anything an attacker could send.
const b64 = (value: unknown): string => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url')
type Signer = { hs: string | Buffer } | { rs: KeyObject } | { es: KeyObject } | null
function jwt (header: Record<string, unknown>, payload: Record<string, unknown>, key: Signer): string {
  const input = `${b64(header)}.${b64(payload)}`
  let signature = ''
  if (key !== null && 'hs' in key) signature = createHmac('sha256', key.hs).update(input).digest('base64url')
  if (key !== null && 'rs' in key) signature = sign('sha256', Buffer.from(input), key.rs).toString('base64url')
  if (key !== null && 'es' in key) signature = sign('sha256', Buffer.from(input), { key: key.es, dsaEncoding: 'ieee-p1363' }).toString('base64url')
  return `${input}.${signature}`
}
const now = (): number => Math.floor(Date.now() / 1000)
interface Who { tenant?: string, user?: string, roles?: string[], zone?: Zone }
const claims = (who: Who = {}, extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  sub: who.user ?? 'u1', tid: who.tenant ?? 'tA', roles: who.roles ?? EVERY_ROLE, zone: who.zone ?? 'restricted', iss: ISSUER, aud: AUDIENCE, iat: now(), exp: now() + 600, ...extra
})
/** A good HS256 token, from the gateway's own minting function. */
const hs256 = (who: Who = {}): string => mintToken(SECRET, { tenant: who.tenant ?? 'tA', user: who.user ?? 'u1', roles: who.roles ?? EVERY_ROLE, zone: who.zone ?? 'restricted', issuer: ISSUER, audience: AUDIENCE, ttlSeconds: 600 })
const rs256 = (who: Who = {}, extra: Record<string, unknown> = {}, kid = 'r1'): string => jwt({ alg: 'RS256', typ: 'JWT', kid }, claims(who, extra), { rs: rsa.privateKey })

/** How a probe presents credentials: the header value, and the bare token for query/params/frames. */
interface Auth {
  header?: string | undefined
  token?: string | undefined
  /** For header-only cases (a non-Bearer scheme): query-string carriers skip it. */
  headerOnly?: boolean
  /** Identity claims a client adds of its own: headers, URL parameters, connection payloads. */
  spoof?: { headers: Record<string, string>, params: Record<string, string> }
}
const bearer = (token: string | undefined): Auth => ({ header: token === undefined ? undefined : `Bearer ${token}`, token })

type Outcome = { ok: true, value: unknown } | { ok: false, status: number, code: string, close?: number }
interface Call { op: string, type: 'query' | 'mutation', input: Record<string, unknown> }
/** A subscription as a probe opened it: refused, or open and collecting event payloads. */
interface Subscription { outcome: Outcome, events: Array<Record<string, unknown>>, close: () => Promise<void> }

interface Probe {
  name: string
  /** 'param': the token travels in a URL parameter, a connection payload or a frame. */
  carrier: 'header' | 'param'
  call?: (call: Call, auth: Auth) => Promise<Outcome>
  /** Only queries (GraphQL over GET). */
  queriesOnly?: boolean
  /** Needs a token to present at all (an empty `auth` frame is a malformed frame, 400). */
  needsToken?: boolean
  subscribe?: (auth: Auth) => Promise<Subscription>
}

// --- sockets ---------------------------------------------------------------------------------

interface Socket { ws: WebSocket, messages: any[], closed: Promise<number> }
type Opened = { refused: { status: number, code: string } } | { socket: Socket }
const sockets = new Set<WebSocket>()

/** Opens a WebSocket; a refused upgrade gives its status and problem code instead. */
async function open (url: string, protocol: string | undefined, headers: Record<string, string>): Promise<Opened> {
  const ws = new WebSocket(url, protocol, { headers, maxPayload: 64 * 1024 * 1024 })
  sockets.add(ws)
  const socket: Socket = { ws, messages: [], closed: new Promise(resolve => ws.once('close', (code: number) => resolve(code))) }
  ws.on('message', data => {
    try { socket.messages.push(JSON.parse(String(data))) } catch { socket.messages.push(String(data)) }
  })
  ws.on('error', () => {})
  return await new Promise(resolve => {
    ws.once('open', () => resolve({ socket }))
    ws.once('unexpected-response', (req, res) => {
      let text = ''
      res.on('data', (c: Buffer) => { text += c.toString() })
      res.on('end', () => {
        req.destroy()
        sockets.delete(ws)
        // problem+json, a GraphQL error on /graphql, a tRPC error on /trpc.
        let code = 'NOT_JSON'
        try {
          const body = JSON.parse(text) as { code?: string, errors?: Array<{ extensions?: { code: string } }>, error?: { data?: { code: string } } }
          code = body.code ?? body.errors?.[0]?.extensions?.code ?? body.error?.data?.code ?? 'NO_CODE'
        } catch {}
        resolve({ refused: { status: res.statusCode ?? 0, code } })
      })
    })
  })
}

/**
 * Polls `check` every millisecond (the helper's `until` polls every 10 ms, which over a
 * thousand sequential probes is most of the run).
 */
async function soon (check: () => boolean, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 1))
  }
}

async function message (socket: Socket, match: (m: any) => boolean, what: string): Promise<any> {
  await soon(() => socket.messages.some(match), what, 10_000)
  return socket.messages.find(match)
}

async function shut (ws: WebSocket): Promise<void> {
  sockets.delete(ws)
  if (ws.readyState === WebSocket.CLOSED) return
  const closed = new Promise(resolve => ws.once('close', resolve))
  ws.terminate()
  await closed
}

const query = (params: Record<string, string | undefined>): string => {
  const entries = Object.entries(params).filter((e): e is [string, string] => e[1] !== undefined)
  return entries.length === 0 ? '' : '?' + new URLSearchParams(entries).toString()
}
const problem = (p: { status: number, code: string }, close?: number): Outcome => ({ ok: false, status: p.status, code: p.code, ...(close === undefined ? {} : { close }) })
const trpcError = (e: { data: { code: string, httpStatus: number } }): Outcome => ({ ok: false, status: e.data.httpStatus, code: e.data.code })
const gqlError = (e: { extensions?: { code: string, status: number }, message: string }): Outcome =>
  e.extensions === undefined ? { ok: false, status: 0, code: `NO_EXTENSIONS: ${e.message}` } : { ok: false, status: e.extensions.status, code: e.extensions.code }
/** Several calls in one request: every one must answer alike. */
const alike = (outcomes: Outcome[]): Outcome => {
  const first = JSON.stringify(outcomes[0].ok ? { ok: true } : outcomes[0])
  return outcomes.every(o => JSON.stringify(o.ok ? { ok: true } : o) === first) ? outcomes[0] : { ok: false, status: -1, code: 'MIXED ' + JSON.stringify(outcomes) }
}
const RUN_SELECTION = '{ id agentId status }'

// --- the faces -------------------------------------------------------------------------------

function probes (app: FastifyInstance, port: number): { list: Probe[], reset: () => Promise<void> } {
  // One connection per probe, credential and case: a case's calls and subscription share it,
  // and a refused upgrade is tried once. reset() closes them all between cases.
  const cache = new Map<string, Promise<unknown>>()
  const once = async <T>(key: string, make: () => Promise<T>): Promise<T> => {
    let made = cache.get(key) as Promise<T> | undefined
    if (made === undefined) {
      made = make()
      cache.set(key, made)
    }
    return await made
  }
  const keyOf = (name: string, auth: Auth): string => JSON.stringify([name, auth.header, auth.token, auth.spoof])
  const reset = async (): Promise<void> => {
    const made = await Promise.allSettled([...cache.values()])
    cache.clear()
    for (const m of made) {
      const value = m.status === 'fulfilled' ? m.value as { ws?: unknown, socket?: { ws?: unknown } } | null : null
      const ws = value?.ws ?? value?.socket?.ws
      if (ws instanceof WebSocket) await shut(ws)
    }
  }
  let nextId = 1
  const headers = (auth: Auth): Record<string, string> => ({ ...auth.spoof?.headers, ...(auth.header === undefined ? {} : { authorization: auth.header }) })
  const spoofed = (auth: Auth): Record<string, string> => auth.spoof?.params ?? {}
  const wsBase = `ws://127.0.0.1:${port}`

  const rest: Probe = {
    name: 'REST',
    carrier: 'header',
    async call (call, auth) {
      const op = app.pipeline.manifest.byName.get(call.op)!
      let url = '/api/v1' + op.path
      const rest = { ...call.input }
      for (const p of op.pathParams) { url = url.replace(`:${p}`, encodeURIComponent(String(rest[p]))); delete rest[p] }
      const res = op.inputInBody
        ? await app.inject({ method: op.method, url, headers: headers(auth), payload: rest })
        : await app.inject({ method: op.method, url: url + query(Object.fromEntries(Object.entries(rest).map(([k, v]) => [k, String(v)]))), headers: headers(auth) })
      return res.statusCode < 300 ? { ok: true, value: res.statusCode === 204 ? null : res.json() } : problem(res.json())
    }
  }

  const batch: Probe = {
    name: 'REST batch',
    carrier: 'header',
    async call (call, auth) {
      const calls = [{ id: 'one', op: call.op, input: call.input }, { id: 'two', op: call.op, input: call.input }]
      const res = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: headers(auth), payload: { calls } })
      if (res.statusCode !== 200) return problem(res.json())
      return alike((res.json().results as Array<{ result?: unknown, error?: { status: number, code: string } }>).map(r => r.error === undefined ? { ok: true, value: r.result } : problem(r.error)))
    }
  }

  const trpcSingle = (name: string, carrier: 'header' | 'param'): Probe => ({
    name,
    carrier,
    async call (call, auth) {
      const extra = { ...spoofed(auth), ...(carrier === 'param' ? { access_token: auth.token } : {}) }
      const h = carrier === 'header' ? headers(auth) : { ...auth.spoof?.headers }
      const res = call.type === 'query'
        ? await app.inject({ method: 'GET', url: `/trpc/${call.op}` + query({ input: JSON.stringify(call.input), ...extra }), headers: h })
        : await app.inject({ method: 'POST', url: `/trpc/${call.op}` + query(extra), headers: h, payload: call.input })
      const body = res.json() as { result?: { data: unknown }, error?: { data: { code: string, httpStatus: number } } }
      return body.error === undefined ? { ok: true, value: body.result!.data } : trpcError(body.error)
    }
  })

  const trpcBatch: Probe = {
    name: 'tRPC batch',
    carrier: 'header',
    async call (call, auth) {
      const input = JSON.stringify({ 0: call.input, 1: call.input })
      const path = `/trpc/${call.op},${call.op}`
      const res = call.type === 'query'
        ? await app.inject({ method: 'GET', url: path + query({ batch: '1', input, ...spoofed(auth) }), headers: headers(auth) })
        : await app.inject({ method: 'POST', url: path + query({ batch: '1', ...spoofed(auth) }), headers: { ...headers(auth), 'content-type': 'application/json' }, payload: input })
      const body = res.json() as Array<{ result?: { data: unknown }, error?: { data: { code: string, httpStatus: number } } }>
      if (!Array.isArray(body)) return { ok: false, status: res.statusCode, code: 'NOT_A_BATCH ' + res.body }
      return alike(body.map(r => r.error === undefined ? { ok: true, value: r.result!.data } : trpcError(r.error)))
    }
  }

  const graphqlDocument = (call: Call): string => {
    const args = Object.entries(call.input).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join(', ')
    // kernelHeaders answers the JSON scalar: no selection.
    const selection = call.op === 'kernelHeaders' ? '' : call.op === 'listAgents' ? '{ id name }' : '{ id }'
    return `${call.type} { ${call.op}${args === '' ? '' : `(${args})`} ${selection} }`
  }
  const graphql = (name: string, method: 'GET' | 'POST'): Probe => ({
    name,
    carrier: 'header',
    queriesOnly: method === 'GET',
    async call (call, auth) {
      const document = graphqlDocument(call)
      const res = method === 'GET'
        ? await app.inject({ method: 'GET', url: '/graphql' + query({ query: document, ...spoofed(auth) }), headers: headers(auth) })
        : await app.inject({ method: 'POST', url: '/graphql' + query(spoofed(auth)), headers: headers(auth), payload: { query: document, extensions: { tenant: 'spoof' } } })
      const body = res.json() as { data?: Record<string, unknown> | null, errors?: Array<{ message: string, extensions?: { code: string, status: number } }> }
      if (body.errors !== undefined && body.errors.length > 0) return gqlError(body.errors[0])
      return { ok: true, value: body.data?.[call.op] }
    }
  })

  // /ws: the token on the upgrade (header or ?access_token=); a refused upgrade is the outcome.
  const wsConnect = async (auth: Auth, carrier: 'header' | 'param'): Promise<Opened> => await once(keyOf(`/ws ${carrier}`, auth), async () => {
    const url = `${wsBase}/ws` + query({ ...spoofed(auth), ...(carrier === 'param' ? { access_token: auth.token } : {}) })
    return await open(url, undefined, carrier === 'header' ? headers(auth) : { ...auth.spoof?.headers })
  })
  const wsCall = async (socket: Socket, call: Call): Promise<Outcome> => {
    const id = randomUUID()
    socket.ws.send(JSON.stringify({ id, op: call.op, input: call.input }))
    const frame = await message(socket, m => m.id === id, `/ws answer to ${call.op}`)
    return frame.error === undefined ? { ok: true, value: frame.result } : problem(frame.error)
  }
  const wsSubscribe = async (socket: Socket): Promise<Subscription> => {
    const id = randomUUID()
    const events: Array<Record<string, unknown>> = []
    socket.ws.on('message', data => {
      const frame = JSON.parse(String(data)) as { event?: string, data?: Record<string, unknown> }
      if (frame.event === 'runUpdated') events.push(frame.data!)
    })
    socket.ws.send(JSON.stringify({ id, subscribe: 'runUpdated' }))
    const frame = await message(socket, m => m.id === id, '/ws subscribe answer')
    return { outcome: frame.error === undefined ? { ok: true, value: frame.subscribed } : problem(frame.error), events, close: async () => await shut(socket.ws) }
  }
  const ws = (name: string, carrier: 'header' | 'param'): Probe => ({
    name,
    carrier,
    async call (call, auth) {
      const opened = await wsConnect(auth, carrier)
      if ('refused' in opened) return problem(opened.refused)
      return await wsCall(opened.socket, call)
    },
    async subscribe (auth) {
      const opened = await wsConnect(auth, carrier)
      if ('refused' in opened) return { outcome: problem(opened.refused), events: [], close: async () => {} }
      return await wsSubscribe(opened.socket)
    }
  })
  // /ws `auth` frame: a connection opened with a full-rights token of the same tenant and user
  // presents the case's token; a refused one must leave the connection's identity as it was.
  const wsAuthFrame: Probe = {
    name: '/ws auth frame',
    carrier: 'param',
    needsToken: true,
    async call (call, auth) {
      const { socket, outcome } = await once(keyOf('/ws auth', auth), async () => await wsReauth(auth))
      return outcome ?? await wsCall(socket, call)
    },
    async subscribe (auth) {
      const { socket, outcome } = await once(keyOf('/ws auth', auth), async () => await wsReauth(auth))
      if (outcome !== undefined) return { outcome, events: [], close: async () => {} }
      return await wsSubscribe(socket)
    }
  }
  const wsReauth = async (auth: Auth): Promise<{ socket: Socket, outcome?: Outcome }> => {
    // The connection is opened for the tenant and user the token names, when they are plain.
    let payload: Record<string, unknown> | null = null
    try { payload = JSON.parse(Buffer.from(auth.token?.split('.')[1] ?? '', 'base64url').toString()) as Record<string, unknown> } catch {}
    const plain = (v: unknown): v is string => typeof v === 'string' && /^[\w-]+$/.test(v)
    const who = { tenant: plain(payload?.tid) ? payload.tid : 'tA', user: plain(payload?.sub) ? payload.sub : 'u1' }
    const opened = await open(`${wsBase}/ws`, undefined, { authorization: `Bearer ${hs256(who)}` })
    if ('refused' in opened) throw new Error('a good token was refused on /ws')
    const socket = opened.socket
    const id = randomUUID()
    socket.ws.send(JSON.stringify({ id, auth: auth.token ?? '' }))
    const frame = await message(socket, m => m.id === id, '/ws auth answer')
    if (frame.error !== undefined) {
      // The refused token changed nothing: the connection still speaks for its first identity.
      const still = await wsCall(socket, { op: 'listAgents', type: 'query', input: { limit: 1 } })
      if (!still.ok) throw new Error('a refused auth frame broke the connection')
      return { socket, outcome: problem(frame.error) }
    }
    return { socket }
  }

  // GraphQL subscriptions (graphql-transport-ws): the token on the upgrade or in connection_init.
  const graphqlWs = (name: string, carrier: 'header' | 'param' | 'init'): Probe => ({
    name,
    carrier: carrier === 'header' ? 'header' : 'param',
    async subscribe (auth) {
      const url = `${wsBase}/graphql` + query({ ...spoofed(auth), ...(carrier === 'param' ? { access_token: auth.token } : {}) })
      const opened = await open(url, 'graphql-transport-ws', carrier === 'header' ? headers(auth) : { ...auth.spoof?.headers })
      if ('refused' in opened) return { outcome: problem(opened.refused), events: [], close: async () => {} }
      const { socket } = opened
      const init = carrier === 'init' ? { ...auth.spoof?.params, ...(auth.token === undefined ? {} : { authorization: `Bearer ${auth.token}` }) } : { ...auth.spoof?.params }
      socket.ws.send(JSON.stringify({ type: 'connection_init', payload: init }))
      // connection_init's token refused: the socket is closed at once with 4403, never acked (a
      // close carries no problem code: the refusal is its token's, UNAUTHENTICATED as recorded).
      let refusedInit = false
      socket.ws.once('close', () => { refusedInit = !socket.messages.some(m => m.type === 'connection_ack') })
      await soon(() => refusedInit || socket.messages.some(m => m.type === 'connection_ack'), 'connection_ack or the refusal')
      if (refusedInit) {
        const close = await socket.closed
        await shut(socket.ws)
        return { outcome: { ok: false, status: 401, code: 'UNAUTHENTICATED', close }, events: [], close: async () => {} }
      }
      const before = app.events.bus.subscriptions
      socket.ws.send(JSON.stringify({ id: 's1', type: 'subscribe', payload: { query: `subscription { runUpdated ${RUN_SELECTION} }` } }))
      const events: Array<Record<string, unknown>> = []
      socket.ws.on('message', data => {
        const m = JSON.parse(String(data)) as { type: string, payload?: { data?: { runUpdated: Record<string, unknown> } } }
        if (m.type === 'next' && m.payload?.data !== undefined) events.push(m.payload.data.runUpdated)
      })
      await soon(() => app.events.bus.subscriptions > before || socket.messages.some(m => m.type === 'error' || m.type === 'next'), `${name}: subscribed or refused`, 10_000)
      const error = socket.messages.find(m => m.type === 'error' || (m.type === 'next' && m.payload?.errors !== undefined))
      if (error !== undefined) {
        const outcome = gqlError((error.type === 'error' ? error.payload : error.payload.errors)[0])
        // Nothing can succeed without an identity: the connection is closed with 4401.
        const close = outcome.ok === false && outcome.code === 'UNAUTHENTICATED' ? await socket.closed : undefined
        await shut(socket.ws)
        return { outcome: close === undefined ? outcome : { ...outcome, close } as Outcome, events, close: async () => {} }
      }
      return { outcome: { ok: true, value: null }, events, close: async () => await shut(socket.ws) }
    }
  })

  // tRPC subscriptions over SSE (httpSubscriptionLink): header, connectionParams or ?access_token=.
  const trpcSse = (name: string, carrier: 'header' | 'params' | 'query'): Probe => ({
    name,
    carrier: carrier === 'header' ? 'header' : 'param',
    async subscribe (auth) {
      const params: Record<string, string | undefined> = { ...spoofed(auth) }
      if (carrier === 'params') params.connectionParams = JSON.stringify({ ...auth.spoof?.params, ...(auth.token === undefined ? {} : { token: auth.token }) })
      if (carrier === 'query') params.access_token = auth.token
      const controller = new AbortController()
      const before = app.events.bus.subscriptions
      const res = await fetch(`http://127.0.0.1:${port}/trpc/runUpdated` + query(params), { headers: carrier === 'header' ? headers(auth) : { ...auth.spoof?.headers }, signal: controller.signal })
      const events: Array<Record<string, unknown>> = []
      let error: Outcome | undefined
      let ended = false
      const reader = res.body!.getReader()
      let text = ''
      ;(async () => {
        try {
          for (;;) {
            const { done, value } = await reader.read()
            if (done) break
            text += Buffer.from(value).toString()
            let end: number
            while ((end = text.indexOf('\n\n')) !== -1) {
              const block = text.slice(0, end)
              text = text.slice(end + 2)
              const kind = /^event: (.*)$/m.exec(block)?.[1]
              const data = /^data: (.*)$/m.exec(block)?.[1]
              if (data === undefined) continue
              if (kind === 'serialized-error') error = trpcError(JSON.parse(data) as { data: { code: string, httpStatus: number } })
              else if (kind === undefined) events.push(JSON.parse(data) as Record<string, unknown>)
            }
          }
        } catch {}
        ended = true
      })().catch(() => {})
      const close = async (): Promise<void> => {
        controller.abort()
        await soon(() => ended, 'the SSE stream to end')
      }
      if (res.status !== 200) { await close(); return { outcome: { ok: false, status: res.status, code: 'HTTP' }, events, close: async () => {} } }
      await soon(() => app.events.bus.subscriptions > before || error !== undefined, `${name}: subscribed or refused`, 10_000)
      if (error !== undefined) { await close(); return { outcome: error, events, close: async () => {} } }
      return { outcome: { ok: true, value: null }, events, close }
    }
  })

  // tRPC over WebSocket at /trpc: header, ?access_token= or connectionParams.
  const trpcWsOpen = async (auth: Auth, carrier: 'header' | 'params' | 'query'): Promise<Socket | Outcome> => await once(keyOf(`/trpc ${carrier}`, auth), async () => {
    const params: Record<string, string | undefined> = { ...spoofed(auth) }
    if (carrier === 'params') params.connectionParams = '1'
    if (carrier === 'query') params.access_token = auth.token
    const opened = await open(`${wsBase}/trpc` + query(params), undefined, carrier === 'header' ? headers(auth) : { ...auth.spoof?.headers })
    if ('refused' in opened) return problem(opened.refused)
    if (carrier === 'params') {
      opened.socket.ws.send(JSON.stringify({ method: 'connectionParams', data: { ...auth.spoof?.params, ...(auth.token === undefined ? {} : { token: auth.token }) } }))
    }
    return opened.socket
  })
  const trpcWsRefusal = async (socket: Socket): Promise<Outcome | undefined> => {
    const refusal = socket.messages.find(m => m.id === null && m.error !== undefined)
    if (refusal === undefined) return undefined
    const close = await socket.closed
    return { ...trpcError(refusal.error), close } as Outcome
  }
  const trpcWs = (name: string, carrier: 'header' | 'params' | 'query'): Probe => ({
    name,
    carrier: carrier === 'header' ? 'header' : 'param',
    async call (call, auth) {
      const socket = await trpcWsOpen(auth, carrier)
      if (!('ws' in socket)) return socket
      const id = nextId++
      socket.ws.send(JSON.stringify({ id, method: call.type, params: { path: call.op, input: call.input } }))
      const answer = await message(socket, m => m.id === id || (m.id === null && m.error !== undefined), `${name} answer`)
      if (answer.id === null) return (await trpcWsRefusal(socket))!
      return answer.error === undefined ? { ok: true, value: answer.result.data } : trpcError(answer.error)
    },
    async subscribe (auth) {
      const socket = await trpcWsOpen(auth, carrier)
      if (!('ws' in socket)) return { outcome: socket, events: [], close: async () => {} }
      const events: Array<Record<string, unknown>> = []
      const id = nextId++
      socket.ws.on('message', data => {
        const m = JSON.parse(String(data)) as { id: unknown, result?: { type: string, data?: Record<string, unknown> } }
        if (m.id === id && m.result?.type === 'data') events.push(m.result.data!)
      })
      const before = app.events.bus.subscriptions
      socket.ws.send(JSON.stringify({ id, method: 'subscription', params: { path: 'runUpdated', input: null } }))
      const failed = (m: any): boolean => (m.id === id || m.id === null) && m.error !== undefined
      await soon(() => app.events.bus.subscriptions > before || socket.messages.some(failed), `${name}: subscribed or refused`, 10_000)
      const refused = await trpcWsRefusal(socket)
      const own = socket.messages.find(m => m.id === id && m.error !== undefined)
      const error = refused ?? (own === undefined ? undefined : trpcError(own.error))
      if (error !== undefined) return { outcome: error, events, close: async () => {} }
      return { outcome: { ok: true, value: null }, events, close: async () => await shut(socket.ws) }
    }
  })

  const list = [
    rest,
    batch,
    trpcSingle('tRPC', 'header'),
    trpcSingle('tRPC ?access_token=', 'param'),
    trpcBatch,
    graphql('GraphQL POST', 'POST'),
    graphql('GraphQL GET', 'GET'),
    ws('/ws upgrade header', 'header'),
    ws('/ws ?access_token=', 'param'),
    wsAuthFrame,
    graphqlWs('GraphQL WS upgrade header', 'header'),
    graphqlWs('GraphQL WS ?access_token=', 'param'),
    graphqlWs('GraphQL WS connection_init', 'init'),
    trpcSse('tRPC SSE header', 'header'),
    trpcSse('tRPC SSE connectionParams', 'params'),
    trpcSse('tRPC SSE ?access_token=', 'query'),
    trpcWs('tRPC WS upgrade header', 'header'),
    trpcWs('tRPC WS ?access_token=', 'query'),
    trpcWs('tRPC WS connectionParams', 'params')
  ]
  return { list, reset }
}

// --- the gateway shared by every table -------------------------------------------------------

interface Gateway { app: FastifyInstance, probes: Probe[], reset: () => Promise<void>, entries: (probe: Probe, auth: Auth, calls?: Call[]) => Promise<Array<[string, Outcome]>> }

let shared: Promise<Gateway> | undefined
/** The one gateway of this file, built on first use and closed when the file's tests end. */
const gatewayOnce = async (): Promise<Gateway> => await (shared ??= gateway(t))

async function gateway (t: Test): Promise<Gateway> {
  // Runs stay queued: the demo Kernel publishes nothing in the background.
  const kernel = await startKernel({ port: 0, runDelayMs: 600_000 })
  t.teardown(() => kernel.close())
  const app = await buildTestApp(t, { BFF_JWT_PUBLIC_KEYS: PUBLIC_KEYS, BFF_JWT_ISSUER: ISSUER, BFF_JWT_AUDIENCE: AUDIENCE }, { kernelUrl: kernel.url })
  t.teardown(async () => { await Promise.all([...sockets].map(shut)) })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { list, reset } = probes(app, (app.server.address() as { port: number }).port)
  return { app, probes: list, reset, entries: async (probe, auth, calls) => await everyEntry(app, probe, auth, calls) }
}

/** One entry point of each face, subscriptions included. */
const CORE = ['REST', 'REST batch', 'tRPC', 'tRPC batch', 'GraphQL POST', '/ws upgrade header', '/ws auth frame', 'GraphQL WS connection_init', 'tRPC SSE header', 'tRPC WS connectionParams']

const QUERY: Call = { op: 'getAgent', type: 'query', input: { id: 'a1' } }
const MUTATION: Call = { op: 'createAgent', type: 'mutation', input: { name: 'made by the security suite' } }

/** Every entry point of a probe for a credential: its calls (query, mutation) and its subscription. */
async function everyEntry (app: FastifyInstance, probe: Probe, auth: Auth, calls: Call[] = [QUERY, MUTATION]): Promise<Array<[string, Outcome]>> {
  const out: Array<[string, Outcome]> = []
  if (probe.needsToken === true && (auth.token === undefined || auth.token === '')) return out
  if (probe.call !== undefined) {
    for (const call of calls) {
      if (probe.queriesOnly === true && call.type !== 'query') continue
      out.push([`${probe.name} ${call.op}`, await probe.call(call, auth)])
    }
  }
  if (probe.subscribe !== undefined) {
    const sub = await probe.subscribe(auth)
    await sub.close()
    // The next probe counts subscriptions on the bus from zero.
    await soon(() => app.events.bus.subscriptions === 0, `${probe.name}: the subscription to leave the bus`)
    out.push([`${probe.name} subscription`, sub.outcome])
  }
  return out
}

function expectRefusal (t: Test, label: string, outcome: Outcome, status: 401 | 403): void {
  const code = status === 401 ? 'UNAUTHENTICATED' : 'FORBIDDEN'
  if (outcome.ok) {
    t.fail(`${label}: passed instead of ${status}`)
    return
  }
  // One assertion per entry point (a thousand of them): the exact status is also "never a 5xx".
  t.match(outcome, { ok: false, status, code }, `${label}: ${status} ${code}`)
}

t.test('tokens: every bad token is a 401 on every face and every carrier; good ones pass', async t => {
  const { app, probes, entries, reset } = await gatewayOnce()
  const none = { alg: 'none', typ: 'JWT' }
  const huge = rs256({}, { pad: 'x'.repeat(9000) })
  // `every`: the issue's own list, through all 19 entry points. The other cases go through one
  // entry point of each face (CORE), which keeps the file's run short on two shared cores.
  const cases: Array<{ name: string, auth: Auth, ok?: true, every?: true }> = [
    { name: 'HS256 from mintToken', auth: bearer(hs256()), ok: true, every: true },
    { name: 'RS256 with its kid', auth: bearer(rs256()), ok: true, every: true },
    { name: 'ES256 with its kid', auth: bearer(jwt({ alg: 'ES256', typ: 'JWT', kid: 'e1' }, claims(), { es: ec.privateKey })), ok: true, every: true },
    { name: 'nbf within the 5 s clock skew', auth: bearer(rs256({}, { nbf: now() + 2 })), ok: true, every: true },
    { name: 'missing', auth: {}, every: true },
    { name: 'empty bearer', auth: { header: 'Bearer ', token: '' } },
    { name: 'another scheme', auth: { header: `Basic ${Buffer.from('u1:pw').toString('base64')}`, headerOnly: true } },
    { name: 'junk', auth: bearer('not-a-token-at-all'), every: true },
    { name: 'two segments', auth: bearer(`${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims())}`), every: true },
    { name: 'four segments', auth: bearer(`${hs256()}.extra`) },
    { name: 'header not JSON', auth: bearer(`${b64('{"alg":')}.${b64(claims())}.sig`) },
    { name: 'huge (9 KB)', auth: bearer(huge.slice(0, -4) + (huge.endsWith('AAAA') ? 'BBBB' : 'AAAA')), every: true },
    { name: 'forged HS256 (another secret)', auth: bearer(jwt({ alg: 'HS256', typ: 'JWT' }, claims(), { hs: 'an-attacker-secret-that-is-long-enough-000' })), every: true },
    { name: 'forged RS256 (another key, known kid)', auth: bearer(jwt({ alg: 'RS256', typ: 'JWT', kid: 'r1' }, claims(), { rs: otherRsa.privateKey })), every: true },
    { name: 'tampered claims (tenant changed after signing)', auth: bearer((() => { const [h, , s] = rs256().split('.'); return `${h}.${b64(claims({ tenant: 'tB' }))}.${s}` })()) },
    { name: 'expired (beyond the skew)', auth: bearer(rs256({}, { exp: now() - 60 })), every: true },
    { name: 'not yet valid (nbf beyond the skew)', auth: bearer(rs256({}, { nbf: now() + 60 })), every: true },
    { name: 'wrong audience', auth: bearer(rs256({}, { aud: 'another-api' })), every: true },
    // Regression: fast-jwt checks iss and aud only when present; configured, they are required.
    { name: 'no audience', auth: bearer(rs256({}, { aud: undefined })) },
    { name: 'no issuer', auth: bearer(rs256({}, { iss: undefined })) },
    { name: 'wrong issuer', auth: bearer(rs256({}, { iss: 'https://evil.example' })), every: true },
    { name: 'alg none, no signature', auth: bearer(jwt(none, claims(), null)), every: true },
    { name: 'alg none with a kid', auth: bearer(jwt({ ...none, kid: 'r1' }, claims(), null)) },
    { name: 'alg "NONE"', auth: bearer(jwt({ alg: 'NONE' }, claims(), null)) },
    { name: 'key confusion: HS256 signed with the RS256 public PEM', auth: bearer(jwt({ alg: 'HS256', typ: 'JWT', kid: 'r1' }, claims(), { hs: pem(rsa.publicKey) })), every: true },
    { name: 'key confusion: HS256 signed with the PEM, no kid', auth: bearer(jwt({ alg: 'HS256', typ: 'JWT' }, claims(), { hs: pem(rsa.publicKey) })) },
    { name: 'RS256 token naming the ES256 kid', auth: bearer(rs256({}, {}, 'e1')) },
    { name: 'unknown kid', auth: bearer(rs256({}, {}, 'retired-2019')), every: true },
    { name: 'RS256 without a kid', auth: bearer(jwt({ alg: 'RS256', typ: 'JWT' }, claims(), { rs: rsa.privateKey })) },
    { name: 'HS512', auth: bearer(jwt({ alg: 'HS512' }, claims(), { hs: SECRET })) },
    { name: 'signed, but no tenant', auth: bearer(rs256({}, { tid: undefined })) },
    { name: 'signed, roles not an array', auth: bearer(rs256({}, { roles: 'system' })) },
    { name: 'signed, unknown zone', auth: bearer(rs256({}, { zone: 'galaxy' })) },
    // Regression: these reached the Kernel client, which failed before sending (a 503 that also
    // counted towards the circuit breaker of every tenant).
    { name: 'signed, tenant with a line break', auth: bearer(rs256({ tenant: 'tA\r\nx-tenant-id: tB' })) },
    { name: 'signed, tenant beyond Latin-1', auth: bearer(rs256({ tenant: '租户' })) },
    { name: 'signed, tenant with surrounding spaces', auth: bearer(rs256({ tenant: ' tA ' })) },
    { name: 'signed, role with a comma', auth: bearer(rs256({ roles: ['viewer,system'] })) }
  ]
  let checked = 0
  for (const c of cases) {
    const applicable = probes.filter(p => (p.carrier === 'header' || c.auth.headerOnly !== true) && (c.every === true || CORE.includes(p.name)))
    // Calls of every face at once; subscriptions one after the other (each counts the bus).
    const calls = await Promise.all(applicable.map(async p => await entries({ ...p, subscribe: undefined }, c.auth)))
    const subscriptions: Array<Array<[string, Outcome]>> = []
    for (const p of applicable) if (p.subscribe !== undefined) subscriptions.push(await entries({ ...p, call: undefined }, c.auth))
    for (const got of [...calls, ...subscriptions]) {
      for (const [label, outcome] of got) {
        checked++
        if (c.ok === true) t.ok(outcome.ok, `${c.name}: ${label} passes` + (outcome.ok ? '' : ` (${JSON.stringify(outcome)})`))
        else {
          expectRefusal(t, `${c.name}: ${label}`, outcome, 401)
          // graphql-ws: a token in connection_init refused closes the connection at once with
          // 4403 (graphql-ws' client retries, asking its connectionParams again); without one,
          // the subscription's error, then the connection closes with 4401.
          if (label.startsWith('GraphQL WS connection_init') && !outcome.ok) {
            const close = c.auth.token === undefined ? 4401 : 4403
            t.equal(outcome.close, close, `${c.name}: ${label} closes with ${close}`)
          }
          if (label.startsWith('tRPC WS') && !outcome.ok && outcome.close !== undefined) t.not(outcome.close, 1011, `${c.name}: ${label} not an internal-error close`)
        }
      }
    }
    await reset()
  }
  t.ok(checked > 800, `${checked} token x entry-point checks`)
  t.equal(app.events.bus.subscriptions, 0, 'every probe subscription was closed')

  // Beyond Node's header limit (16 KB) the HTTP server itself answers 431, never a 5xx; an
  // `auth` frame beyond 16 KB is junk (400).
  const big = rs256({}, { pad: 'x'.repeat(20_000) })
  const { port } = app.server.address() as { port: number }
  const res = await fetch(`http://127.0.0.1:${port}/api/v1/agents/a1`, { headers: { authorization: `Bearer ${big}` } })
  await res.body?.cancel()
  t.equal(res.status, 431, 'a 20 KB header: 431')
  const opened = await open(`ws://127.0.0.1:${port}/ws`, undefined, { authorization: `Bearer ${hs256()}` })
  if (!('socket' in opened)) throw new Error('refused')
  opened.socket.ws.send(JSON.stringify({ id: 'big', auth: big }))
  t.match(await message(opened.socket, m => m.id === 'big', 'big auth answer'), { id: 'big', error: { code: 'VALIDATION_FAILED', status: 400 } })
  await shut(opened.socket.ws)
})

t.test('roles and zones: escalation is a 403 on every face; the allowed caller passes', async t => {
  const { probes, entries, reset } = await gatewayOnce()
  const runAgent: Call = { op: 'runAgent', type: 'mutation', input: { id: 'a1', prompt: 'Summarise the report' } }
  const createAgent: Call = { ...MUTATION }
  const getDocument: Call = { op: 'getDocument', type: 'query', input: { id: 'd1' } }
  const kernelHeaders: Call = { op: 'kernelHeaders', type: 'query', input: {} }
  const cases: Array<{ name: string, who: Who, calls: Call[], subscribe?: true, ok?: true }> = [
    { name: 'the operator runs an agent, reads documents and subscribes', who: { roles: ['viewer', 'operator', 'system'], zone: 'restricted' }, calls: [runAgent, getDocument, kernelHeaders], subscribe: true, ok: true },
    { name: 'a viewer runs an agent (needs operator)', who: { roles: ['viewer'], zone: 'restricted' }, calls: [runAgent] },
    { name: 'a viewer creates an agent (needs editor)', who: { roles: ['viewer'], zone: 'restricted' }, calls: [createAgent] },
    { name: 'no roles at all calls a role-bound op', who: { roles: [], zone: 'restricted' }, calls: [runAgent, getDocument] },
    { name: 'a lookalike role ("Operator", "operator ")', who: { roles: ['Operator', 'operators', 'viewer'], zone: 'restricted' }, calls: [runAgent] },
    { name: 'a public-zone caller reads a restricted document', who: { roles: EVERY_ROLE, zone: 'public' }, calls: [getDocument] },
    { name: 'an internal-zone caller reads a restricted document', who: { roles: EVERY_ROLE, zone: 'internal' }, calls: [getDocument] },
    { name: 'a public-zone system caller reads internal kernel headers', who: { roles: EVERY_ROLE, zone: 'public' }, calls: [kernelHeaders] },
    { name: 'a restricted-zone caller without the system role', who: { roles: ['viewer', 'editor', 'operator'], zone: 'restricted' }, calls: [kernelHeaders] },
    { name: 'a subscriber without the viewer role', who: { roles: ['editor', 'operator', 'system'], zone: 'restricted' }, calls: [], subscribe: true }
  ]
  for (const c of cases) {
    const token = rs256(c.who)
    for (const probe of probes) {
      const only = c.subscribe === true ? probe : { ...probe, subscribe: undefined }
      for (const [label, outcome] of await entries(only, bearer(token), c.calls)) {
        if (c.ok === true) t.ok(outcome.ok, `${c.name}: ${label} passes` + (outcome.ok ? '' : ` (${JSON.stringify(outcome)})`))
        else expectRefusal(t, `${c.name}: ${label}`, outcome, 403)
      }
    }
    await reset()
  }
})

t.test('tenants: the Kernel only ever sees the verified tenant; B\'s data and events never reach A', async t => {
  const { app, probes, reset } = await gatewayOnce()
  const A = { tenant: `iso-A-${randomUUID()}`, user: 'alice', roles: ['viewer', 'system'], zone: 'internal' as Zone }
  const B = { tenant: `iso-B-${randomUUID()}`, user: 'bob', roles: ['viewer', 'editor', 'system'], zone: 'internal' as Zone }
  const spoof = {
    headers: { 'x-tenant-id': B.tenant, 'x-user-id': B.user, 'x-user-roles': 'system,operator,admin', 'x-forwarded-user': B.user },
    params: { 'x-tenant-id': B.tenant, tenant: B.tenant, tid: B.tenant, tenantId: B.tenant, sub: B.user, roles: 'admin' }
  }
  const asA: Auth = { ...bearer(rs256(A)), spoof }
  const kernelHeaders: Call = { op: 'kernelHeaders', type: 'query', input: {} }

  // 1. What the Kernel receives is the token's identity, whatever the client adds.
  for (const probe of probes) {
    if (probe.call === undefined) continue
    // REST's query string is its input: there, parameters of one's own are refused (below).
    const auth = probe.name === 'REST' ? { ...asA, spoof: { headers: spoof.headers, params: {} } } : asA
    const outcome = await probe.call(kernelHeaders, auth)
    if (!outcome.ok) {
      t.fail(`${probe.name}: kernelHeaders refused: ${JSON.stringify(outcome)}`)
      continue
    }
    t.match(outcome.value, { 'x-tenant-id': A.tenant, 'x-user-id': A.user, 'x-user-roles': 'viewer,system' }, `${probe.name}: the Kernel sees tenant A, alice, her roles`)
  }
  // Identity fields in the input itself are not input: refused by the op's schema, on every face.
  for (const probe of probes) {
    if (probe.call === undefined) continue
    for (const input of [{ tenant: B.tenant }, { 'x-tenant-id': B.tenant }, { tid: B.tenant }]) {
      expectRefusalCode(t, `${probe.name}: kernelHeaders with ${Object.keys(input)[0]} in the input`, await probe.call({ ...kernelHeaders, input }, asA), 'VALIDATION_FAILED')
    }
  }

  await reset()

  // 2. An agent of tenant B is not reachable by tenant A, spoofing or not.
  const rest = probes.find(p => p.name === 'REST')!
  const secret = `secret-of-B-${randomUUID()}`
  const created = await rest.call!({ ...MUTATION, input: { name: secret } }, bearer(rs256(B)))
  if (!created.ok) throw new Error('B could not create its agent')
  const id = (created.value as { id: string }).id
  const seenByB = await rest.call!({ ...QUERY, input: { id } }, bearer(rs256(B)))
  t.match(seenByB, { ok: true, value: { id, name: secret } }, 'B reads its own agent')
  for (const probe of probes) {
    if (probe.call === undefined) continue
    const auth = probe.name === 'REST' ? { ...asA, spoof: { headers: spoof.headers, params: {} } } : asA
    const one = await probe.call({ ...QUERY, input: { id } }, auth)
    t.notOk(JSON.stringify(one).includes(secret), `${probe.name}: A's getAgent never returns B's agent`)
    t.match(one, { ok: false, status: 404, code: 'NOT_FOUND' }, `${probe.name}: B's agent does not exist for A`)
    const list = await probe.call({ op: 'listAgents', type: 'query', input: { limit: 100 } }, auth)
    t.ok(list.ok && Array.isArray(list.value) && list.value.length >= 3, `${probe.name}: A lists its own agents`)
    t.notOk(JSON.stringify(list).includes(secret), `${probe.name}: A's list never holds B's agent`)
  }

  await reset()

  // 3. Events: A subscribes on every face (claiming B's tenant wherever a client can add
  // something); B's event reaches B's witness and none of A's subscriptions; A's own does.
  const subscriptions: Array<[string, Subscription]> = []
  for (const probe of probes) {
    if (probe.subscribe === undefined) continue
    const sub = await probe.subscribe(asA)
    t.ok(sub.outcome.ok, `${probe.name}: A subscribes`)
    subscriptions.push([probe.name, sub])
  }
  const witness = await probes.find(p => p.name === '/ws upgrade header')!.subscribe!(bearer(rs256(B)))
  t.ok(witness.outcome.ok, 'B subscribes on /ws')
  const run = (id: string): Record<string, unknown> => ({ id, agentId: 'a1', status: 'running', temperature: 0.7, promptChars: 3, output: null, error: null, createdAt: '2026-01-01T00:00:00.000Z', updatedAt: '2026-01-01T00:00:00.000Z', startedAt: null, finishedAt: null })
  await app.events.publish({ topic: 'runs.updated', tenantId: B.tenant, payload: run('run-of-B') })
  await app.events.publish({ topic: 'runs.updated', tenantId: A.tenant, payload: run('run-of-A') })
  // Delivery is in order per subscriber: once A's own event is in, B's would have come before it.
  await soon(() => witness.events.length === 1 && subscriptions.every(([, s]) => s.events.some(e => e.id === 'run-of-A')), 'every subscriber to get its own tenant\'s event', 10_000)
  t.same(witness.events.map(e => e.id), ['run-of-B'], 'B got its own event only')
  for (const [name, sub] of subscriptions) t.same(sub.events.map(e => e.id), ['run-of-A'], `${name}: A got its own event and never B's`)
  for (const [, sub] of subscriptions) await sub.close()
  await witness.close()
  await reset()
})

function expectRefusalCode (t: Test, label: string, outcome: Outcome, code: string): void {
  if (outcome.ok) {
    t.fail(`${label}: passed`)
    return
  }
  t.ok(outcome.status < 500, `${label}: never a 5xx`)
  t.equal(outcome.code, code, `${label}: ${code}`)
}
