import t from 'tap'
import { join } from 'node:path'
import { compileManifest, loadManifestFile, ManifestError } from '../manifest.js'
import { backtrackingFaults, PATTERN_STEPS } from '../manifest-patterns.js'
import checkPattern, { opened } from '../manifest-patterns-worker.mjs'
import { keptByText } from '../compiled.js'

// A manifest whose patterns backtrack is refused when it is read: one client's request could hold
// the gateway's event loop for minutes (manifest-patterns.ts).

const EMAIL = '^([a-zA-Z0-9_.-])+@(([a-zA-Z0-9-])+\\.)+([a-zA-Z0-9]{2,4})+$'
const TRAILING = '\\s*#?\\s*$'

function manifest (input: Record<string, unknown>, more: Record<string, unknown> = {}): string {
  return JSON.stringify({
    version: 1,
    kernel: { url: 'http://127.0.0.1:1' },
    operations: {
      signup: { type: 'mutation', rest: 'POST /signup', kernel: 'POST /v1/signup', input: { type: 'object', ...input }, output: { type: 'object' } },
      ...more
    }
  })
}

async function faultsOf (t: { testdir: (fixture: Record<string, string>) => string }, text: string): Promise<string[]> {
  const dir = t.testdir({ 'm.json': text })
  try {
    await loadManifestFile(join(dir, 'm.json'))
  } catch (err) {
    if (err instanceof ManifestError) return [...err.faults]
    throw err
  }
  return []
}

t.test('a pattern that backtracks is refused at its place, with an input that shows it and what would bound it', async t => {
  const faults = await faultsOf(t, manifest({
    properties: {
      email: { type: 'string', pattern: EMAIL },
      tag: { type: 'string', maxLength: 1000, pattern: TRAILING }
    },
    patternProperties: { '^(a+)+$': { type: 'string' } }
  }))
  t.equal(faults.length, 3, faults.join('\n'))
  // By place: a schema's patternProperties are met with the schema, before its properties' own.
  faults.sort()
  t.match(faults[2], /^operations\.signup\.input\.properties\.tag\.pattern: the pattern ".*" backtracks in n\^3 steps: an input like .* maxLength 464 or less \(it has 1000\)$/)
  t.match(faults[1], /^operations\.signup\.input\.properties\.email\.pattern: the pattern "\^\(\[a-zA-Z0-9_\.-\]\)\+@.*" backtracks exponentially: an input like '\.@0\.0000' \+ '0000000000'\.repeat\(\d+\) \+ '\\x00' holds the gateway's event loop for seconds or more; rewrite it, or bound the string with maxLength 26 or less \(it has none\)$/)
  t.match(faults[0], /^operations\.signup\.input\.patternProperties: the pattern "\^\(a\+\)\+\$" backtracks exponentially: .*; rewrite it \(a property name has no maxLength to bound it\)$/)
  t.equal(464 ** 3 <= PATTERN_STEPS && 465 ** 3 > PATTERN_STEPS, true, 'the bound named is the longest within PATTERN_STEPS')
})

t.test('a pattern that backtracks within a maxLength that keeps it under PATTERN_STEPS is taken', async t => {
  t.same(await faultsOf(t, manifest({
    properties: {
      tag: { type: 'string', maxLength: 464, pattern: TRAILING },
      code: { type: 'string', maxLength: 26, pattern: '^(a+)+$' }
    }
  })), [])
  const over = await faultsOf(t, manifest({ properties: { code: { type: 'string', maxLength: 27, pattern: '^(a+)+$' } } }))
  t.match(over, [/code\.pattern: .* maxLength 26 or less \(it has 27\)$/])
})

t.test('patterns are found wherever a schema may hold one, in inputs, outputs and events, and not in data', async t => {
  const bad = { type: 'string', pattern: '^(a|a)*$' }
  const text = JSON.stringify({
    version: 1,
    kernel: { url: 'http://127.0.0.1:1' },
    schemas: { Named: { type: 'object', properties: { inNamed: bad } } },
    operations: {
      signup: {
        type: 'mutation',
        rest: 'POST /signup',
        kernel: 'POST /v1/signup',
        input: {
          type: 'object',
          properties: {
            list: { type: 'array', items: bad },
            either: { anyOf: [{ type: 'number' }, bad] },
            named: { $ref: '#/schemas/Named' },
            keys: { type: 'object', propertyNames: { pattern: '^(b|b)*$' } },
            // Data, not schemas: never matched against anything.
            fixed: { type: 'string', enum: ['^(c+)+$'], default: '^(c+)+$', examples: [{ pattern: '^(c+)+$' }] },
            // A property named `pattern` is a name, its value a schema.
            pattern: { type: 'string' }
          }
        },
        output: { type: 'object', properties: { out: bad } }
      }
    },
    events: { changed: { topic: 'changed', payload: { type: 'object', properties: { ev: bad } } } }
  })
  const faults = await faultsOf(t, text)
  t.same(faults.map(f => f.slice(0, f.indexOf(':'))), [
    'operations.signup.input.properties.list.items.pattern',
    'operations.signup.input.properties.either.anyOf.1.pattern',
    'operations.signup.input.properties.named.properties.inNamed.pattern',
    'operations.signup.input.properties.keys.propertyNames.pattern',
    'operations.signup.output.properties.out.pattern',
    'events.changed.payload.properties.ev.pattern'
  ])
})

t.test('counted repetitions: safe as written is taken at once, one that backtracks within its count is refused', async t => {
  t.same(await faultsOf(t, manifest({
    properties: {
      id: { type: 'string', pattern: '^[A-Za-z0-9_-]{1,64}$' },
      isbn: { type: 'string', pattern: '^[0-9]{13}$' },
      dotted: { type: 'string', pattern: '^(\\w{1,64}\\.)*\\w{1,64}$' },
      few: { type: 'string', pattern: '^(a|aa){1,8}$' }
    }
  })), [])
  t.match(await faultsOf(t, manifest({ properties: { many: { type: 'string', pattern: '^(a|aa){1,300}$' } } })), [/many\.pattern: .* backtracks exponentially/])
})

t.test('a pattern the check cannot decide is taken, and the check does not end the process', async t => {
  // recheck's analysis of this one overflows its stack: unknown.
  t.same(await faultsOf(t, manifest({ properties: { back: { type: 'string', pattern: '(a|b|\\1)+x' } } })), [])
  t.equal(keptByText('pattern verdict', '(a|b|\\1)+x'), undefined, 'an unknown verdict is not kept: the next read asks again')
  t.match(keptByText('pattern verdict', EMAIL), { status: 'vulnerable', degree: null }, 'a verdict is kept for the next read')
})

t.test('a check that cannot run is a fault, not every pattern taken; one past its time takes its pattern', async t => {
  // A pattern no other test checks: no verdict is kept for it yet.
  const m = compileManifest(JSON.parse(manifest({ properties: { a: { type: 'string', pattern: '^(x+)+$' } } })))
  const missing = await backtrackingFaults(m, { worker: new URL('./fixtures/no-such-worker.mjs', import.meta.url).href })
  t.match(missing, [/^the patterns could not be checked: Cannot find module .*no-such-worker\.mjs/])
  // The check cut at 1 s: no verdict, so the pattern is taken (and asked again later).
  t.same(await backtrackingFaults(m, { worker: new URL('./fixtures/pattern-worker-hangs.mjs', import.meta.url).href, checkMs: 10, cutMs: 1000 }), [])
  t.equal(keptByText('pattern verdict', '^(x+)+$'), undefined)
  t.match(await backtrackingFaults(m), [/a\.pattern: .* backtracks exponentially/], 'the check as built finds it')
})

t.test('the demo manifest\'s patterns pass', async t => {
  const m = await loadManifestFile(new URL('../kernel/manifest.yaml', import.meta.url).pathname)
  t.ok(m.operations.length > 0)
})

t.test('opened: each counted repetition left open above, nothing else of the pattern changed', async t => {
  t.equal(opened('^[a-z]{1,64}$'), '^[a-z]{1,}$')
  t.equal(opened('^\\d{13}(x{2,3}?|y{0,9})+$'), '^\\d{13,}(x{2,}?|y{0,})+$')
  t.equal(opened('^(a{1,4}b{2}){3,5}$'), '^(a{1,}b{2,}){3,}$', 'inner and outer counts both')
  t.equal(opened('^\\{1,2\\}[{1,2}]a?b*c+d{0,1}$'), null, 'escaped braces, braces in a class, and ?, *, +, {0,1} are not counts to open')
  t.equal(opened('(?<n>\\p{L}{2,3})\\k<n>'), '(?<n>\\p{L}{2,})\\k<n>')
  t.equal(opened('('), null, 'a pattern that does not parse')
})

t.test('checkPattern: safe, vulnerable with its degree and attack, unknown', async t => {
  process.env.RECHECK_SYNC_BACKEND = 'pure'
  t.teardown(() => { delete process.env.RECHECK_SYNC_BACKEND })
  t.same(checkPattern({ source: '^[a-z]{1,64}$', timeoutMs: 2000 }), { source: '^[a-z]{1,64}$', status: 'safe', degree: null, attack: null })
  t.match(checkPattern({ source: TRAILING, timeoutMs: 2000 }), { status: 'vulnerable', degree: 3, attack: /repeat/ })
  t.same(checkPattern({ source: '(a|b|\\1)+x', timeoutMs: 2000 }), { source: '(a|b|\\1)+x', status: 'unknown', degree: null, attack: null })
  // The fuzzer given no time (1 ms): what backtracks with its counts open is taken to backtrack.
  t.match(checkPattern({ source: '^(a|aa){1,300}$', timeoutMs: 1 }), { status: 'vulnerable', degree: null, attack: /repeat/ })
})
