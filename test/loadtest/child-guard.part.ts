// loadtest/child-guard.mjs, loaded into every process the harness starts: it ends the process
// when the harness is gone (its stdin closes), and only then: not when a worker thread of the
// process (which loads it too, through the inherited --import) finds its own stdin empty.
import t, { type Test } from 'tap'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = fileURLToPath(new URL('../..', import.meta.url))

/** Runs `main` (a module's text) guarded, as the harness runs a target; `files` are written beside it. */
function guarded (t: Test, main: string, files: Record<string, string> = {}): { done: Promise<{ code: number | null, signal: NodeJS.Signals | null, out: string }>, closeStdin: () => void, out: () => string } {
  const dir = mkdtempSync(join(tmpdir(), 'mantle-guard-'))
  t.teardown(() => { rmSync(dir, { recursive: true, force: true }) })
  for (const [name, text] of Object.entries({ ...files, 'main.mjs': main })) writeFileSync(join(dir, name), text)
  const child = spawn(process.execPath, ['--import', 'tsx', '--import', './loadtest/child-guard.mjs', join(dir, 'main.mjs')], { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env, NODE_OPTIONS: '', NODE_V8_COVERAGE: '' } })
  let out = ''
  child.stdout.on('data', (chunk: Buffer) => { out += chunk.toString() })
  const done = once(child, 'exit').then(([code, signal]) => ({ code: code as number | null, signal: signal as NodeJS.Signals | null, out }))
  return { done, closeStdin: () => { child.stdin.end() }, out: () => out }
}

t.test('a worker thread does not end the guarded process; the harness leaving does', async t => {
  // The worker loads the guard too; the process then waits on a timer, stdin still open.
  const kept = guarded(t, `
    import { Worker } from 'node:worker_threads'
    const w = new Worker(new URL('./worker.mjs', import.meta.url))
    await new Promise(resolve => w.once('exit', resolve))
    setTimeout(() => { console.log('alive'); process.exit(0) }, 300)
  `, { 'worker.mjs': 'setTimeout(() => {}, 50)\n' })
  const ended = await kept.done
  t.same(ended, { code: 0, signal: null, out: 'alive\n' })

  const left = guarded(t, 'process.on(\'SIGTERM\', () => { console.log(\'terminated\'); process.exit(0) }); setInterval(() => {}, 1000); console.log(\'ready\')')
  while (!left.out().includes('ready')) await new Promise(resolve => setTimeout(resolve, 20))
  left.closeStdin()
  t.same(await left.done, { code: 0, signal: null, out: 'ready\nterminated\n' }, 'SIGTERM once the harness\'s pipe closes')
})
