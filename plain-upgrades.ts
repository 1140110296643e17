import type { IncomingMessage, Server } from 'node:http'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import { Server as TlsServer } from 'node:tls'

/** An Upgrade header that offers WebSocket (among other protocols, perhaps). */
export const WEBSOCKET_UPGRADE = /(?:^|,)\s*websocket\s*(?:,|$)/i

/** The fields of an upgrade offer, and their Connection tokens, dropped from a request served as plain HTTP. */
const OFFER_TOKEN = /^(?:upgrade|http2-settings)$/i

/** The clientError code of an offer whose head Node did not hand on whole (too many fields): app.ts answers it 431. */
export const FIELDS_OVERFLOW = 'MANTLE_HEADER_FIELDS_OVERFLOW'

/** The refusal's detail, wherever a head with more fields than Node hands on is refused (431). */
export const FIELDS_OVERFLOW_DETAIL = 'The request has more header fields than are served (at most 999)'

/** The clientError code of an offer whose body, read by Node (26 and later), is over the body limit: app.ts answers it 413. */
export const OFFER_BODY_OVERFLOW = 'MANTLE_OFFER_BODY_OVERFLOW'

/**
 * Whether Node reads an offer's body itself (Node 26; not 24.22): there an offer whose body was
 * empty and came with its head (`Transfer-Encoding: chunked` then `0`) looks as one on Node 20
 * to 24 does, its body still on the socket (the request complete, nothing buffered), and its
 * head written again still said chunked: the new parser read what followed as the body.
 */
const NODE_READS_OFFER_BODY = Number(process.versions.node.split('.')[0]) >= 26

/** An Expect that asks to be invited to send the body (RFC 9110 §10.1.1). */
const CONTINUE = /^\s*100-continue\s*$/i

/** rawHeaders' length beyond which Node drops a head's fields (its parser's default maxHeaderPairs, `MAX_HEADER_PAIRS` in _http_common.js). */
const NODE_HEADER_ENTRIES = 2000

const ignore = (): void => {}

/**
 * Serves a request that offers an upgrade other than WebSocket (`Upgrade: h2c`, which Java's
 * HttpClient sends on every http:// request, curl --http2 too, a POST with its body) as the plain
 * HTTP/1.1 request it also is, on every route, as RFC 9110 §7.8 lets a server ignore an Upgrade.
 *
 * Once a server has an 'upgrade' listener (@fastify/websocket's), Node 20 hands it every request
 * with `Connection: upgrade` and its socket, unparsed past the head: a body was never read (a
 * POST was refused 400, "the Content-Length header does not match the body"), a GET on a route
 * that also serves WebSocket (/trpc/*, /graphql) went to ws, which answered a bare 400 "Invalid
 * Upgrade header", and a connection served so was closed after its answer. Neither Node 20 nor
 * @fastify/websocket has an option for it, and the `shouldUpgradeCallback` of later Nodes (22.21,
 * 24, 26) is no way out: a request it declines is served, but Node's parser stops at its end, and
 * the requests pipelined behind it in the same read were never answered (Node 24.22, 26.12). Such
 * an offer is taken from the 'upgrade' event here, and its head written again without the offer
 * (Upgrade, HTTP2-Settings and their Connection tokens) ahead of what the socket still holds, for
 * the server's parser to read as a new connection: body, keep-alive and pipelining as for any
 * request. Node 26 reads the offer's body itself: it is written again after the head.
 */
export function servePlainUpgrades (server: Server, maxBodyBytes: number): void {
  // Typed loosely: the server's emit is overloaded by event.
  const emit = server.emit as (this: Server, event: string | symbol, ...args: unknown[]) => boolean
  // Where the HTTP parser takes a socket: a TLS server's HTTP listens for its sockets once secure.
  const accepted = server instanceof TlsServer ? 'secureConnection' : 'connection'
  // Node's own listener (connectionListener, _http_server.js), which takes a socket on for a new
  // parser: the socket is handed to it alone. Emitted, the event ran every listener again as for
  // a new connection (the app's tracking and /diagz's count, each adding 'close' listeners).
  const parse = server.listeners(accepted).find(fn => fn.name === 'connectionListener') as ((this: Server, socket: Duplex) => void) | undefined
  if (parse === undefined) throw new Error(`expected Node's HTTP '${accepted}' listener`)
  server.emit = function (this: Server, event: string | symbol, ...args: unknown[]): boolean {
    if (event === 'upgrade') {
      const [req, socket, head] = args as [IncomingMessage, Duplex, Buffer]
      if (!WEBSOCKET_UPGRADE.test(req.headers.upgrade ?? '')) {
        // Node took its own listeners off the socket, 'error' too: one that errors until the parser
        // takes it on (a client that resets it while an answer before the offer is written) threw
        // an uncaught exception.
        socket.on('error', ignore)
        if (!wholeHead(server, req)) {
          // Node frames the body by every field of the head, but hands on its first ones only: a
          // head written again from those lost, say, its Content-Length, and its body was read as
          // the next request. Refused as Node refuses a head it cannot take (clientError), and
          // what the client still sends is read and dropped.
          socket.resume()
          if (!emit.call(this, 'clientError', Object.assign(new Error('The request has more header fields than are served'), { code: FIELDS_OVERFLOW }), socket)) socket.destroy()
          return true
        }
        const offer: Offer = { server: this, emit, parse, req, socket }
        if (NODE_READS_OFFER_BODY) serveReadBody(offer, head, maxBodyBytes)
        // Node 20 to 24: the body is still the socket's, after the head.
        else takeOn(offer, socket, Buffer.concat([plainHead(req), head]))
        return true
      }
    }
    return emit.call(this, event, ...args)
  } as Server['emit']
}

/** An offer taken from the 'upgrade' event: its server, Node's own emit and 'connection' listener, the request and what Node handed on with it. */
interface Offer {
  server: Server
  emit: (this: Server, event: string | symbol, ...args: unknown[]) => boolean
  parse: (this: Server, socket: Duplex) => void
  req: IncomingMessage
  /** The socket, or on Node 26 and later, while the body still arrives, Node's stream over it. */
  socket: Duplex
}

/** Hands `connection`, `bytes` put back in front of what it holds, to a new parser once the answers before the offer are written. */
function takeOn (offer: Offer, connection: Duplex, bytes: Buffer): void {
  connection.unshift(bytes)
  whenAnswered(connection as Answering, () => {
    connection.removeListener('error', ignore)
    // Node arms the keep-alive timeout once the last answer before the offer is written, and
    // disarms it when the next request comes, which the new parser knows nothing of: it cut
    // the offer's request (a slow upload, a slow answer) once it ran out.
    ;(connection as Socket).setTimeout(0)
    offer.parse.call(offer.server, connection)
    // Paused by serveReadBody while no parser read it: a 'data' listener does not resume a paused stream.
    if (connection.isPaused()) connection.resume()
  })
}

/**
 * Node 26 and later read the body of an offer into the request, and hand on, while it is still
 * arriving, a stream over the socket that yields what follows it: the body is read whole (to the
 * body limit), then written again after the head, framed as the head frames it, ahead of what
 * followed, on the connection's own socket.
 */
function serveReadBody (offer: Offer, head: Buffer, maxBodyBytes: number): void {
  const { req, socket } = offer
  const connection = req.socket
  // A body still arriving: Node's stream (`socket`) has just put its listeners on the
  // connection's socket, the last ones of each event there. They are taken off with it below:
  // left, each such offer piled up three more on a keep-alive connection.
  const streamListeners = socket === connection ? [] : ['error', 'close', 'end'].map(event => ({ event, fn: connection.listeners(event).at(-1) as (...args: unknown[]) => void }))
  // Once only: takeOn takes one off (a second, on the socket `socket` already is, stayed for good).
  if (connection !== socket) connection.on('error', ignore)
  // Node's parser reads the body on, its timeout listener still on the socket: the keep-alive
  // timeout an answer before the offer arms (takeOn's comment) would cut a body still arriving.
  let invited = false
  whenAnswered(connection as Answering, () => {
    connection.setTimeout(0)
    // Node invites no offer's body (its parser does so for a request, not an upgrade): a
    // client that waits for the 100 waited until a timeout cut it. Its head is written
    // again without the Expect then, or the new parser invited the body a second time.
    if (!req.complete && req.httpVersion === '1.1' && CONTINUE.test(req.headers.expect ?? '')) {
      connection.write('HTTP/1.1 100 Continue\r\n\r\n')
      invited = true
    }
  })
  readBody(req, maxBodyBytes).then(body => {
    if (body === null) {
      req.resume()
      // Once the answers before it are written: written at once, it went in front of them
      // (or, behind one still under way, the connection closed after it, the 413 unsent).
      whenAnswered(connection as Answering, () => {
        if (!offer.emit.call(offer.server, 'clientError', Object.assign(new Error('The request body is larger than the limit'), { code: OFFER_BODY_OVERFLOW }), connection)) connection.destroy()
      })
      return
    }
    // What followed the body: the stream's (the socket's bytes once the body ended), else `head`.
    let after = head
    if (socket !== connection) {
      const rest: Buffer[] = []
      for (let chunk = socket.read() as Buffer | null; chunk !== null; chunk = socket.read() as Buffer | null) rest.push(chunk)
      after = Buffer.concat(rest)
      // The stream's own reading of the socket ends here (what it read is in `after`); the
      // new parser reads it from now on.
      connection.removeAllListeners('data')
      connection.pause()
      for (const { event, fn } of streamListeners) connection.off(event, fn)
      // Node marks the socket with its stream (a symbol of its own) and, while it is marked,
      // hands the next offer's request, once read, to that stream and emits no 'upgrade':
      // the next offer on the connection was never answered. Unmarked, as one whose offer came whole.
      const marked = connection as unknown as Record<symbol, unknown>
      for (const mark of Object.getOwnPropertySymbols(marked)) if (marked[mark] === socket) Reflect.deleteProperty(marked, mark)
    }
    takeOn(offer, connection, Buffer.concat([plainHead(req, invited), framed(req, body), after]))
  }, () => { connection.destroy() })
}

/**
 * Whether Node handed on every field of the request's head (it drops those beyond its
 * maxHeadersCount from rawHeaders, and frames the body by them all). A head of exactly that many
 * fields cannot be told from a longer one: it is taken as not whole.
 */
export function wholeHead (server: Server, req: IncomingMessage): boolean {
  const limit = typeof server.maxHeadersCount === 'number' ? server.maxHeadersCount * 2 : NODE_HEADER_ENTRIES
  return limit <= 0 || req.rawHeaders.length < limit
}

/** A connection's socket as Node's HTTP server keeps it: the answer it is writing (the first of those queued), if any. */
type Answering = Duplex & { _httpMessage?: { once: (event: 'finish', fn: () => void) => unknown } | null }

/**
 * Runs `fn` once the socket has written the answers to the requests before the offer (a client
 * that pipelines sends them ahead of it): a new parser taken on at once answered the offer, and
 * the requests after it, over an answer still being written. Node hands the next queued answer
 * the socket as each one finishes; none is left once it holds none. A socket that closes first
 * runs nothing.
 */
function whenAnswered (socket: Answering, fn: () => void): void {
  if (socket.destroyed) return
  const answer = socket._httpMessage
  if (answer === null || answer === undefined) {
    fn()
    return
  }
  answer.once('finish', () => setImmediate(() => whenAnswered(socket, fn)))
}

/**
 * The body Node read into `req`, whole, or null past `max` bytes (Node 26 and later read an
 * offer's body into the request). By hand: node:stream/consumers' buffer() reads a stream
 * whole with no bound, and the offer never reaches Fastify's body parsing, which has one.
 */
async function readBody (req: IncomingMessage, max: number): Promise<Buffer | null> {
  return await new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let size = 0
    const onData = (chunk: Buffer): void => {
      size += chunk.length
      if (size <= max) {
        chunks.push(chunk)
        return
      }
      req.off('data', onData)
      chunks.length = 0
      resolve(null)
    }
    req.on('data', onData)
    req.once('end', () => { resolve(size > max ? null : Buffer.concat(chunks)) })
    req.once('error', reject)
  })
}

/**
 * The body Node read, framed again as the head frames it: as it came (Content-Length, or none
 * for no body), or chunked, one chunk and the trailers. The head is written again with its own
 * framing: one whose Transfer-Encoding and Content-Length were replaced by the body's length
 * lost `gzip, chunked`, and a body app.ts refuses for its coding was served.
 */
function framed (req: IncomingMessage, body: Buffer): Buffer {
  if (req.headers['transfer-encoding'] === undefined) return body
  let trailers = ''
  for (let i = 0; i < req.rawTrailers.length; i += 2) trailers += `${req.rawTrailers[i]}: ${req.rawTrailers[i + 1]}\r\n`
  if (body.length === 0) return Buffer.from(`0\r\n${trailers}\r\n`, 'latin1')
  return Buffer.concat([Buffer.from(`${body.length.toString(16)}\r\n`, 'latin1'), body, Buffer.from(`\r\n0\r\n${trailers}\r\n`, 'latin1')])
}

/**
 * The request's head as it came (names, values and order: Node reads both as latin1), less its
 * offer, and less its Expect if its body was `invited` already (a 100 written for it).
 */
function plainHead (req: IncomingMessage, invited = false): Buffer {
  let text = `${req.method ?? 'GET'} ${req.url ?? '/'} HTTP/${req.httpVersion}\r\n`
  const raw = req.rawHeaders
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]
    let value = raw[i + 1]
    if (OFFER_TOKEN.test(name) || (invited && name.toLowerCase() === 'expect')) continue
    if (name.toLowerCase() === 'connection') {
      value = value.split(',').map(token => token.trim()).filter(token => token !== '' && !OFFER_TOKEN.test(token)).join(', ')
      if (value === '') continue
    }
    text += `${name}: ${value}\r\n`
  }
  return Buffer.from(text + '\r\n', 'latin1')
}
