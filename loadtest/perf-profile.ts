// `npm run bench -- --perf <target>`: where the named target's CPU goes during its first
// measured round, sampled by Linux `perf` and attributed to the nearest JavaScript frame of
// each sample (the target runs with --perf-basic-prof, so perf can name V8's compiled code).
// V8's own profiler (--cpu-prof) is not used for this: it charges the time a thread waits in
// epoll to the last native call, and so showed `writev` at 42% of a cache hit where perf counts
// 22% in the kernel's whole network path.
import { spawn, spawnSync } from 'node:child_process'
import { rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/** The Node flags a profiled target runs with: a map of its compiled code's names for perf. */
export const PERF_NODE_FLAGS = ['--perf-basic-prof', '--interpreted-frames-native-stack'] as const

export interface PerfShare { name: string, share: number }

export interface PerfBreakdown {
  samples: number
  /** Parts of the process's CPU time: the kernel's system calls, Node, packages, Mantle. */
  parts: PerfShare[]
  /** Mantle's part, by source file. */
  mantle: PerfShare[]
}

/** Whether `perf` is installed and may sample a process of this user. */
export function perfAvailable (): boolean {
  const probe = spawnSync('perf', ['--version'], { encoding: 'utf8' })
  return probe.status === 0
}

/** Samples `pid` for `seconds` and reads its samples back (`perf script`). */
export async function recordPerf (pid: number, seconds: number): Promise<string> {
  const out = join(tmpdir(), `mantle-perf-${pid}-${Date.now()}.data`)
  try {
    await run('perf', ['record', '-F', '999', '-g', '-p', String(pid), '-o', out, '--', 'sleep', String(seconds)])
    return await run('perf', ['script', '-i', out, '-F', 'ip,sym'])
  } finally {
    await rm(out, { force: true })
  }
}

/** Removes the map of compiled code a profiled process left in the temporary directory. */
export async function removePerfMap (pid: number): Promise<void> {
  await rm(join('/tmp', `perf-${pid}.map`), { force: true })
}

async function run (cmd: string, args: string[]): Promise<string> {
  return await new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    const chunks: Buffer[] = []
    let err = ''
    child.stdout.on('data', (c: Buffer) => chunks.push(c))
    child.stderr.on('data', (c: Buffer) => { err = (err + c.toString()).slice(-2000) })
    child.once('error', reject)
    child.once('close', (code) => {
      if (code === 0) resolve(Buffer.concat(chunks).toString('utf8'))
      else reject(new Error(`${cmd} ${args[0]} exited ${code}: ${err.trim()}`))
    })
  })
}

const PACKAGE = /node_modules\/((?:@[^/]+\/)?[^/]+)\//
const SOURCE = /(?:file:\/\/)?(\/[^:\s]+\.(?:ts|js|mjs)):\d+/

/**
 * Splits `perf script -F ip,sym` output (one frame a line, leaf first, a blank line between
 * samples) into parts: a sample in a system call is the kernel's; else it belongs to the first
 * JavaScript frame above it (Node's own, a package's, or Mantle's by file under the first of
 * `roots` that holds it: the compiled build, then the sources), or, with none, to V8 and Node's
 * native code.
 */
export function breakdown (script: string, roots: readonly string[]): PerfBreakdown {
  const parts = new Map<string, number>()
  const mantle = new Map<string, number>()
  const add = (m: Map<string, number>, k: string): void => { m.set(k, (m.get(k) ?? 0) + 1) }
  let samples = 0
  const settle = (frames: string[]): void => {
    if (frames.length === 0) return
    samples++
    if (frames.some(f => f.includes('entry_SYSCALL'))) return add(parts, 'kernel: system calls')
    const js = frames.find(f => f.startsWith('JS:') || f.startsWith('RegExp:'))
    if (js === undefined) return add(parts, 'V8 and Node native code')
    if (js.startsWith('RegExp:')) return add(parts, 'regular expressions')
    const pkg = PACKAGE.exec(js)
    if (pkg !== null) return add(parts, `package ${pkg[1]}`)
    if (js.includes(' node:')) return add(parts, 'Node (JavaScript)')
    const source = SOURCE.exec(js)
    const root = source === null ? undefined : roots.find(r => source[1].startsWith(r))
    if (source !== null && root !== undefined) {
      add(parts, 'Mantle')
      return add(mantle, source[1].slice(root.length).replace(/^\//, ''))
    }
    add(parts, 'other JavaScript')
  }
  let frames: string[] = []
  for (const line of script.split('\n')) {
    const text = line.trim()
    if (text === '') {
      settle(frames)
      frames = []
      continue
    }
    // "<ip> <symbol>": the symbol is what follows the address.
    const space = text.indexOf(' ')
    frames.push(space === -1 ? '' : text.slice(space + 1))
  }
  settle(frames)
  const shares = (m: Map<string, number>): PerfShare[] => [...m].map(([name, n]) => ({ name, share: samples === 0 ? 0 : n / samples })).sort((a, b) => b.share - a.share)
  return { samples, parts: shares(parts), mantle: shares(mantle) }
}

/** The breakdown as text: parts over 0.5%, then Mantle's files. */
export function formatBreakdown (target: string, b: PerfBreakdown): string {
  const pct = (s: number): string => (100 * s).toFixed(1).padStart(5) + '%'
  const lines = [`perf: ${target}, ${b.samples} samples, by the nearest JavaScript frame`]
  for (const p of b.parts) if (p.share >= 0.005) lines.push(`  ${pct(p.share)}  ${p.name}`)
  if (b.mantle.length > 0) lines.push('  Mantle by file:')
  for (const p of b.mantle) if (p.share >= 0.002) lines.push(`    ${pct(p.share)}  ${p.name}`)
  return lines.join('\n') + '\n'
}
