// One client process of the WebSocket scale run (`npm run bench -- --section ws-scale`). The
// harness starts one or more of them (a process may hold at most `ulimit -n` sockets) and
// drives them step by step over the IPC channel (the client says `ready` once it listens):
//
//   open      open `count` connections in batches, each sends {"id":"s","subscribe":"runUpdated"}
//             and counts as open once {"id":"s","subscribed":"runUpdated"} is back -> opened
//   (events)  every event frame's arrival is stamped with performance.timeOrigin +
//             performance.now() (the clock the harness stamps its POST with) before anything
//             else; once every open connection has one frame of an event -> done
//   collect   -> arrivals: the stamps of one event, one per connection (-1: none arrived)
//   verify    -> verified: per event, how many connections got exactly one frame, none, more
//   close     close every connection, then exit
//
// Events are told apart by the run id in their payload: event k carries the run `<runPrefix>k`.
import { performance } from 'node:perf_hooks'
import { WebSocket, type RawData } from 'ws'

export type ToClient =
  | { type: 'open', url: string, count: number, batch: number, timeoutMs: number, events: number, runPrefix: string, subscribe: string, subscribed: string }
  | { type: 'collect', event: number }
  | { type: 'verify' }
  | { type: 'close' }

export type FromClient =
  | { type: 'ready' }
  | { type: 'progress', opened: number, failed: number }
  | { type: 'opened', opened: number, failed: number, failures: Record<string, number>, ms: number, clock: { wall: number, mono: number } }
  | { type: 'done', event: number, last: number }
  | { type: 'arrivals', event: number, arrivals: number[] }
  | { type: 'verified', events: Array<{ exactlyOne: number, none: number, more: number }>, unexpectedFrames: number, firstUnexpected: string | null, closedEarly: number }
  | { type: 'error', message: string }

const now = (): number => performance.timeOrigin + performance.now()
const send = (message: FromClient): void => { process.send?.(message) }

let sockets: WebSocket[] = []
let arrivals: Float64Array[] = []
let frames: Uint16Array[] = []
let received: number[] = []
let unexpectedFrames = 0
let firstUnexpected: string | null = null
let closedEarly = 0
let closing = false

function note (text: string): void {
  unexpectedFrames++
  firstUnexpected ??= text.slice(0, 300)
}

/** Opens one connection and subscribes; resolves with the socket or why it failed. */
function openOne (msg: Extract<ToClient, { type: 'open' }>): Promise<WebSocket | string> {
  return new Promise((resolve) => {
    const ws = new WebSocket(msg.url, { perMessageDeflate: false })
    let settled = false
    const fail = (reason: string): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      ws.terminate()
      resolve(reason)
    }
    const timer = setTimeout(() => fail('timeout'), msg.timeoutMs)
    ws.once('open', () => { ws.send(msg.subscribe) })
    ws.once('message', (data: RawData) => {
      const text = (data as Buffer).toString('utf8')
      if (text !== msg.subscribed) {
        fail('refused: ' + text.slice(0, 120))
        return
      }
      settled = true
      clearTimeout(timer)
      resolve(ws)
    })
    ws.once('unexpected-response', (_req, res) => fail(`HTTP ${res.statusCode ?? '?'}`))
    ws.on('error', (err: NodeJS.ErrnoException) => fail(err.code ?? err.message))
    ws.once('close', (code) => fail(`closed ${code}`))
  })
}

function listen (ws: WebSocket, index: number, prefix: string): void {
  ws.on('message', (data: RawData) => {
    // The stamp first: what follows is the client's own work, not delivery.
    const at = now()
    const text = (data as Buffer).toString('utf8')
    let event = -1
    try {
      const frame = JSON.parse(text) as { event?: unknown, data?: { id?: unknown } }
      const id = frame.data?.id
      if (frame.event === 'runUpdated' && typeof id === 'string' && id.startsWith(prefix)) event = Number(id.slice(prefix.length))
    } catch {}
    if (!Number.isInteger(event) || event < 0 || event >= arrivals.length) {
      note(text)
      return
    }
    const count = frames[event][index]++
    if (count > 0) return
    arrivals[event][index] = at
    if (++received[event] === sockets.length) send({ type: 'done', event, last: at })
  })
  ws.on('close', () => { if (!closing) closedEarly++ })
}

async function openAll (msg: Extract<ToClient, { type: 'open' }>): Promise<void> {
  const started = now()
  const failures: Record<string, number> = {}
  let failed = 0
  const open: WebSocket[] = []
  for (let done = 0; done < msg.count; done += msg.batch) {
    const size = Math.min(msg.batch, msg.count - done)
    const batch = await Promise.all(Array.from({ length: size }, async () => await openOne(msg)))
    for (const result of batch) {
      if (typeof result === 'string') {
        failed++
        failures[result] = (failures[result] ?? 0) + 1
      } else {
        open.push(result)
      }
    }
    send({ type: 'progress', opened: open.length, failed })
  }
  sockets = open
  arrivals = Array.from({ length: msg.events }, () => new Float64Array(open.length).fill(-1))
  frames = Array.from({ length: msg.events }, () => new Uint16Array(open.length))
  received = new Array<number>(msg.events).fill(0)
  open.forEach((ws, i) => listen(ws, i, msg.runPrefix))
  send({ type: 'opened', opened: open.length, failed, failures, ms: now() - started, clock: { wall: now(), mono: Number(process.hrtime.bigint()) / 1e6 } })
}

async function closeAll (): Promise<void> {
  closing = true
  await Promise.all(sockets.map(async (ws) => await new Promise<void>((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) { resolve(); return }
    const timer = setTimeout(() => { ws.terminate(); resolve() }, 2000)
    ws.once('close', () => { clearTimeout(timer); resolve() })
    ws.close(1000, 'done')
  })))
}

process.on('message', (msg: ToClient) => {
  switch (msg.type) {
    case 'open':
      openAll(msg).catch((err: Error) => send({ type: 'error', message: err.message }))
      break
    case 'collect':
      send({ type: 'arrivals', event: msg.event, arrivals: Array.from(arrivals[msg.event] ?? []) })
      break
    case 'verify':
      send({
        type: 'verified',
        events: frames.map((counts) => {
          let exactlyOne = 0
          let none = 0
          let more = 0
          for (const c of counts) {
            if (c === 1) exactlyOne++
            else if (c === 0) none++
            else more++
          }
          return { exactlyOne, none, more }
        }),
        unexpectedFrames,
        firstUnexpected,
        closedEarly
      })
      break
    case 'close':
      closeAll().then(() => process.exit(0), () => process.exit(1))
      break
  }
})
send({ type: 'ready' })
// The harness gone (IPC closed): nothing left to report to.
process.on('disconnect', () => { if (!closing) process.exit(0) })
