// Loaded into every process the harness starts (`--import ./loadtest/child-guard.mjs`). Its stdin
// is a pipe from the harness: when that closes, the harness is gone, even by SIGKILL which
// leaves it no chance to clean up, so the child shuts itself down instead of staying an orphan.
// SIGTERM (not exit) so that the child's own graceful shutdown runs.
// Not in a worker thread, which loads it too (it inherits the process's --import): a worker's
// process.stdin has no unref (the guard threw there, and the thread's uncaught error ended the
// whole gateway at its first large prompt: the AI firewall's scan threads), and it ends at once
// (the guard would have sent the process SIGTERM). Plain JavaScript: see GUARD in harness.ts.
import { isMainThread } from 'node:worker_threads'

if (isMainThread) {
  process.stdin.on('end', () => { process.kill(process.pid, 'SIGTERM') })
  process.stdin.on('error', () => { process.kill(process.pid, 'SIGTERM') })
  process.stdin.resume()
  // The guard must never be what keeps a child alive once its server has closed.
  process.stdin.unref()
}
