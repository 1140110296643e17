import t from 'tap'
import { breakdown, formatBreakdown } from '../../loadtest/perf-profile.js'

// `perf script -F ip,sym` output: a sample's frames one a line, leaf first, a blank line after.
const sample = (...frames: string[]): string => frames.map((f, i) => `\t    ${(0x7f00 + i).toString(16)} ${f}`).join('\n') + '\n\n'

t.test('a sample belongs to the kernel in a system call, else to its nearest JavaScript frame', async t => {
  const script = [
    sample('_raw_spin_unlock_irqrestore', 'tcp_sendmsg', 'entry_SYSCALL_64_after_hwframe', '__GI___writev', 'JS:*clearBuffer node:internal/streams/writable:744:21'),
    sample('Builtins_KeyedLoadIC_Megamorphic', 'JS:*processHeader node:_http_outgoing:546:23'),
    sample('JS:*answer file:///repo/.bench-build/plugins/cache/cache.js:1:3093', 'JS:*routeHandler /repo/node_modules/fastify/lib/route.js:465:25'),
    sample('Builtins_StringAdd_CheckNone', 'JS:* file:///repo/app.ts:6:2774', 'JS:*routeHandler /repo/node_modules/fastify/lib/route.js:465:25'),
    sample('JS:*onSend /repo/node_modules/@fastify/compress/index.js:331:19'),
    sample('RegExp:^[\\^_`a-zA-Z\\-0-9!#$%&\'*+.|~]+$', 'JS:*processHeader node:_http_outgoing:546:23'),
    sample('v8::internal::ScavengerCollector::CollectGarbage', 'v8::internal::Heap::Scavenge'),
    sample('JS:*x file:///elsewhere/lib.js:1:1'),
    // The last sample may come without its blank line.
    sample('JS:*answer file:///repo/plugins/cache/cache.ts:1:3093').trimEnd()
  ].join('')
  const b = breakdown(script, ['/repo/.bench-build/', '/repo/'])
  t.equal(b.samples, 9)
  const share = Object.fromEntries(b.parts.map(p => [p.name, Math.round(p.share * 9)]))
  t.same(share, {
    'kernel: system calls': 1,
    'Node (JavaScript)': 1,
    Mantle: 3,
    'package @fastify/compress': 1,
    'regular expressions': 1,
    'V8 and Node native code': 1,
    'other JavaScript': 1
  })
  t.same(b.mantle.map(p => [p.name, Math.round(p.share * 9)]), [['plugins/cache/cache.js', 1], ['app.ts', 1], ['plugins/cache/cache.ts', 1]], 'Mantle by file, from the build or the sources (ties in order met)')
  t.equal(b.parts[0].name, 'Mantle', 'parts largest first')
  const text = formatBreakdown('gateway-cache', b)
  t.match(text, /^perf: gateway-cache, 9 samples/)
  t.match(text, /33\.3% {2}Mantle\n/)
  t.match(text, /11\.1% {2}plugins\/cache\/cache\.js/)
})

t.test('no samples: no parts, no division by zero', async t => {
  t.same(breakdown('', ['/repo/']), { samples: 0, parts: [], mantle: [] })
  t.same(breakdown('\n\n\n', ['/repo/']), { samples: 0, parts: [], mantle: [] })
})
