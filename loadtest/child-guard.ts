// Loaded into every process the harness starts (`--import ./loadtest/child-guard.ts`). Its stdin
// is a pipe from the harness: when that closes, the harness is gone, even by SIGKILL which
// leaves it no chance to clean up, so the child shuts itself down instead of staying an orphan.
// SIGTERM (not exit) so that the child's own graceful shutdown runs.
process.stdin.on('end', () => { process.kill(process.pid, 'SIGTERM') })
process.stdin.on('error', () => { process.kill(process.pid, 'SIGTERM') })
process.stdin.resume()
// The guard must never be what keeps a child alive once its server has closed.
process.stdin.unref()
