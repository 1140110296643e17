import { connect, type Socket } from 'node:net'

type Teardown = { teardown: (fn: () => unknown) => void }

/**
 * A client that sends GET `path` with `headers` (whole lines, each ending CRLF), reads its
 * answer's status line, then nothing more: what the gateway writes after stays unread.
 */
export async function unreadGet (t: Teardown, port: number, path: string, headers = ''): Promise<{ socket: Socket, status: string }> {
  const socket = connect(port, '127.0.0.1', () => {
    socket.write(`GET ${path} HTTP/1.1\r\nHost: x\r\n${headers}\r\n`)
  })
  t.teardown(() => socket.destroy())
  const status = await new Promise<string>((resolve, reject) => {
    socket.once('error', reject)
    socket.once('data', (chunk: Buffer) => {
      socket.pause()
      resolve(chunk.toString('latin1').split('\r\n')[0])
    })
  })
  return { socket, status }
}
