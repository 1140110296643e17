import t from 'tap'
import { join } from 'node:path'
import { readFile } from 'node:fs/promises'
import { codegen } from '../scripts/codegen.js'
import { compileManifest, loadManifestFile, ManifestError, type Manifest } from '../manifest.js'
import { DEMO_MANIFEST } from '../schemas/config.js'
import { OperationNameSchema } from '../schemas/manifest.js'

type Doc = Record<string, unknown>

const output = { type: 'object', properties: { id: { type: 'string' } } }
const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
const query = { type: 'query', rest: 'GET /a', kernel: 'GET /v1/a', output }
const mutation = { type: 'mutation', rest: 'POST /a', kernel: 'POST /v1/a', output }

/** A minimal valid document; `extra` adds or replaces top-level keys. */
function doc (operations: Record<string, unknown> = { a: query }, extra: Doc = {}, kernel: Doc = {}): Doc {
  return { version: 1, kernel: { url: 'http://127.0.0.1:4001', ...kernel }, operations, ...extra }
}

/** The faults of a document that must not compile; [] (a failing `same`) when it compiles. */
function faultsOf (document: unknown, source = 'test.yaml'): string[] {
  try {
    compileManifest(document, source)
  } catch (err) {
    if (err instanceof ManifestError) return [...err.faults]
    throw err
  }
  return []
}

const hasRef = (value: unknown): boolean => JSON.stringify(value).includes('"$ref"')

t.test('the demo manifest loads', async t => {
  const m = await loadManifestFile(DEMO_MANIFEST)
  t.equal(m.source, DEMO_MANIFEST)
  t.same(m.operations.map(o => o.name), [
    'listAgents', 'getAgent', 'createAgent', 'updateAgent', 'deleteAgent', 'runAgent',
    'getRun', 'listRuns', 'searchDocuments', 'getDocument', 'kernelHeaders'
  ])
  t.same(m.operations.map(o => o.index), m.operations.map((_o, i) => i), 'indexes follow the document order')
  for (const op of m.operations) {
    t.notOk(hasRef(op.input), `${op.name}: no $ref left in input`)
    t.notOk(hasRef(op.output), `${op.name}: no $ref left in output`)
    t.equal(op.input.type, 'object', `${op.name}: input is an object schema`)
  }
  t.same(m.kernel, { url: 'http://127.0.0.1:4001', connections: 128, timeoutMs: 5000, retries: 2, circuitBreaker: { threshold: 5, resetTimeoutMs: 30000, rate: null }, maxInFlight: 1024 })

  const getAgent = m.byName.get('getAgent')
  t.ok(getAgent)
  t.same(getAgent?.outputDocument, { $ref: '#/schemas/Agent' }, 'the document form keeps the $ref')
  t.same(getAgent?.output, m.schemas.Agent, 'the resolved form is the named schema')
  t.match(getAgent, { method: 'GET', path: '/agents/:id', pathParams: ['id'], inputInBody: false, kernel: { method: 'GET', path: '/v1/agents/{id}', pathParams: ['id'], sendsBody: false } })
  t.same(getAgent?.cache, { ttlSeconds: 30, swrSeconds: 0, tags: ['agent:{id}'], scope: 'tenant' })

  const listAgents = m.byName.get('listAgents')
  t.equal(listAgents?.output.type, 'array')
  t.same((listAgents?.output.items as Record<string, unknown>), m.schemas.Agent)

  const runAgent = m.byName.get('runAgent')
  t.match(runAgent, { type: 'mutation', method: 'POST', path: '/agents/:id/runs', inputInBody: true, roles: ['operator'], timeoutMs: 10000, cache: null, rateLimit: null })
  t.same(runAgent?.firewall, { fields: ['prompt'], action: 'block' })
  t.same(runAgent?.invalidates, ['runs:{id}'])
  t.equal(runAgent?.kernel.sendsBody, true)

  t.equal(m.byName.get('getDocument')?.zone, 'restricted')
  t.equal(m.byName.get('kernelHeaders')?.zone, 'internal')
  t.equal(m.byName.get('getRun')?.zone, 'public', 'zone defaults to public')
  t.equal(m.byName.get('getRun')?.timeoutMs, 5000, 'timeoutMs defaults to kernel.timeoutMs')
  t.equal(m.byName.get('searchDocuments')?.cache?.swrSeconds, 60)
  t.same(m.byName.get('listAgents')?.roles, [])
  t.equal(m.byName.get('listAgents')?.summary, 'List agents')
  t.equal(m.byName.get('listAgents')?.deprecated, false)

  t.equal(m.events.length, 1)
  t.match(m.events[0], { name: 'runUpdated', topic: 'runs.updated', roles: ['viewer'], zone: 'public' })
  t.same(m.events[0].payload, m.schemas.Run)
  t.same(m.events[0].payloadDocument, { $ref: '#/schemas/Run' })
  t.equal(m.byName.get('nope'), undefined)
})

t.test('kernel settings get their defaults and the URL loses its trailing slash', async t => {
  const m = compileManifest(doc({ a: query }, {}, { url: 'https://kernel.example:8443/' }), 'inline')
  t.same(m.kernel, { url: 'https://kernel.example:8443', connections: 128, timeoutMs: 5000, retries: 2, circuitBreaker: { threshold: 5, resetTimeoutMs: 30000, rate: null }, maxInFlight: 1024 })
  t.equal(m.source, 'inline')
  t.same(m.events, [])
  t.same(m.schemas, {})
  const set = compileManifest(doc({ a: query }, {}, { connections: 8, timeoutMs: 750, retries: 0, circuitBreaker: { threshold: 1, resetTimeoutMs: 10 }, maxInFlight: 3 }))
  t.same(set.kernel, { url: 'http://127.0.0.1:4001', connections: 8, timeoutMs: 750, retries: 0, circuitBreaker: { threshold: 1, resetTimeoutMs: 10, rate: null }, maxInFlight: 3 })
  t.equal(set.source, 'manifest', 'the default source name')
  t.equal(set.operations[0].timeoutMs, 750, 'an operation timeout defaults to kernel.timeoutMs')
})

t.test('defaults are merged into every operation that does not override them', async t => {
  const m = compileManifest(doc({
    plain: query,
    own: { ...query, rest: 'GET /b', roles: ['editor'], zone: 'restricted', rateLimit: { max: 5, windowMs: 1000 }, timeoutMs: 42 }
  }, {
    defaults: { roles: ['viewer'], zone: 'internal', rateLimit: { max: 100, windowMs: 60000 }, timeoutMs: 900 },
    events: { withDefaults: { topic: 't.a', payload: output }, withOwn: { topic: 't.b', payload: output, roles: ['system'], zone: 'restricted', description: 'mine' } }
  }, { timeoutMs: 3000 }))
  t.match(m.byName.get('plain'), { roles: ['viewer'], zone: 'internal', rateLimit: { max: 100, windowMs: 60000 }, timeoutMs: 900 })
  t.match(m.byName.get('own'), { roles: ['editor'], zone: 'restricted', rateLimit: { max: 5, windowMs: 1000 }, timeoutMs: 42 })
  t.same(m.events[0].roles, ['viewer'], 'an event without roles gets the default roles')
  t.equal(m.events[0].description, null)
  t.same(m.events[1].roles, ['system'], 'an event keeps its own roles')
  t.equal(m.events[0].zone, 'internal', 'an event without a zone gets the default zone')
  t.equal(m.events[1].zone, 'restricted', 'an event keeps its own zone')
  t.equal(m.events[1].description, 'mine')

  const bare = compileManifest(doc({ a: query }, { events: { e: { topic: 't', payload: output } } }))
  t.match(bare.operations[0], { roles: [], zone: 'public', rateLimit: null, timeoutMs: 5000, cache: null, firewall: null, invalidates: [], summary: null, description: null, deprecated: false })
  t.same(bare.events[0].roles, [], 'no roles anywhere: any authenticated caller')
  t.equal(bare.events[0].zone, 'public', 'no zone anywhere: public')
  t.same(bare.operations[0].input, { type: 'object', properties: {}, additionalProperties: false }, 'no input: an empty object that takes nothing')
})

t.test('the manifest, its operations and their parts are frozen', async t => {
  const m = compileManifest(doc({
    a: { ...query, rest: 'GET /a/:id', kernel: 'GET /v1/a/{id}', input: idInput, roles: ['viewer'], cache: { ttlSeconds: 5, tags: ['a:{id}'] } },
    b: { ...mutation, input: { type: 'object', required: ['p'], properties: { p: { type: 'string' } } }, firewall: { fields: ['p'], action: 'redact' }, invalidates: ['a'] }
  }, { events: { e: { topic: 't', payload: output } } }))
  t.ok(Object.isFrozen(m), 'manifest')
  t.ok(Object.isFrozen(m.kernel), 'kernel settings')
  t.ok(Object.isFrozen(m.kernel.circuitBreaker), 'breaker settings')
  t.ok(Object.isFrozen(m.operations), 'operations list')
  t.ok(Object.isFrozen(m.schemas), 'schemas')
  t.ok(Object.isFrozen(m.events), 'events list')
  t.ok(Object.isFrozen(m.events[0]), 'event')
  t.ok(Object.isFrozen(m.events[0].roles), 'event roles')
  for (const op of m.operations) {
    t.ok(Object.isFrozen(op), `${op.name}`)
    t.ok(Object.isFrozen(op.roles), `${op.name}.roles`)
    t.ok(Object.isFrozen(op.pathParams), `${op.name}.pathParams`)
    t.ok(Object.isFrozen(op.kernel), `${op.name}.kernel`)
    t.ok(Object.isFrozen(op.invalidates), `${op.name}.invalidates`)
  }
  const a = m.byName.get('a') as Manifest['operations'][number]
  t.ok(Object.isFrozen(a.cache), 'cache')
  t.ok(Object.isFrozen(a.cache?.tags), 'cache tags')
  t.ok(Object.isFrozen(m.byName.get('b')?.firewall), 'firewall')
  t.ok(Object.isFrozen(m.byName.get('b')?.firewall?.fields), 'firewall fields')
  t.throws(() => { (a as { name: string }).name = 'changed' }, TypeError)
  t.equal(a.name, 'a')
  t.throws(() => { (m.operations as unknown[]).push(a) }, TypeError)
  t.equal(m.byName.size, 2)
  t.equal(m.byName.get('b'), m.operations[1], 'byName gives the same object as the list')
})

t.test('a rateLimit taken from defaults is frozen like cache and firewall', async t => {
  const m = compileManifest(doc({ a: query, b: { ...query, rest: 'GET /b' } }, { defaults: { rateLimit: { max: 10, windowMs: 1000 } } }))
  t.ok(Object.isFrozen(m.operations[0].rateLimit))
  t.not(m.operations[0].rateLimit, m.operations[1].rateLimit, 'not one shared mutable object')
})

t.test('a JSON manifest file loads', async t => {
  const dir = t.testdir({
    'm.json': JSON.stringify(doc({ getA: { ...query, rest: 'GET /a/:id', kernel: 'GET /v1/a/{id}', input: idInput, output: { $ref: '#/schemas/A' } } }, { schemas: { A: output } })),
    'm.yml': 'version: 1\nkernel: { url: "http://k:1" }\noperations:\n  a: { type: query, rest: GET /a, kernel: GET /v1/a, output: { type: string } }\n'
  })
  const file = join(dir, 'm.json')
  const m = await loadManifestFile(file)
  t.equal(m.source, file)
  t.same(m.byName.get('getA')?.output, output)
  t.same(m.byName.get('getA')?.pathParams, ['id'])
  const yml = await loadManifestFile(join(dir, 'm.yml'))
  t.equal(yml.kernel.url, 'http://k:1')
  t.same(yml.operations[0].output, { type: 'string' })
})

t.test('a manifest file that begins with a byte order mark loads, JSON as YAML, and codegen reads it', async t => {
  // Windows' Notepad writes one: a JSON manifest was refused "Unexpected token '\uFEFF'", the character invisible.
  const dir = t.testdir({
    'm.json': '\uFEFF' + JSON.stringify(doc({ a: query }, { schemas: { A: output } })),
    'm.yaml': '\uFEFFversion: 1\nkernel: { url: "http://k:1" }\noperations:\n  a: { type: query, rest: GET /a, kernel: GET /v1/a, output: { type: string } }\n'
  })
  for (const name of ['m.json', 'm.yaml']) {
    t.same((await loadManifestFile(join(dir, name))).operations.map(o => o.name), ['a'], name)
    const out = await codegen(['--manifest', join(dir, name), '--out', join(dir, `${name}.d.ts`)])
    t.match(await readFile(out, 'utf8'), /export type AppRouter/, `codegen of ${name}`)
  }
})

t.test('file faults: unreadable, invalid YAML, invalid JSON, invalid content', async t => {
  const dir = t.testdir({
    'bad.yaml': 'version: 1\noperations: [1, 2\n',
    'bad.json': '{ "version": 1, ',
    'wrong.json': JSON.stringify({ version: 1, kernel: { url: 'http://k:1' } })
  })
  const missing = join(dir, 'missing.yaml')
  await t.rejects(loadManifestFile(missing), { name: 'ManifestError', faults: [`cannot be read: ENOENT: no such file or directory, open '${missing}'`] })
  await t.rejects(loadManifestFile(dir), { name: 'ManifestError', faults: [/^cannot be read: EISDIR/] }, 'a directory is unreadable too')

  const yaml = join(dir, 'bad.yaml')
  const yamlErr = await loadManifestFile(yaml).then(() => null, (e: unknown) => e as ManifestError)
  t.type(yamlErr, ManifestError)
  t.equal(yamlErr?.faults.length, 1)
  t.match(yamlErr?.faults[0], /^is not valid YAML: \S/)
  t.notMatch(yamlErr?.faults[0], /\n/, 'only the first line of the parser message')
  t.equal(yamlErr?.message, `Invalid manifest ${yaml}:\n  - ${yamlErr?.faults[0]}`)

  const json = join(dir, 'bad.json')
  const jsonErr = await loadManifestFile(json).then(() => null, (e: unknown) => e as ManifestError)
  t.type(jsonErr, ManifestError)
  t.match(jsonErr?.faults, [/^is not valid JSON: \S/])
  t.match(jsonErr?.message, new RegExp(`^Invalid manifest ${json.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:\\n {2}- is not valid JSON`))

  const wrong = join(dir, 'wrong.json')
  await t.rejects(loadManifestFile(wrong), { faults: ['operations: is required'], message: `Invalid manifest ${wrong}:\n  - operations: is required` })
})

t.test('a YAML value JSON has not (.inf, .nan, a YAML 1.1 timestamp or binary) is refused at its place', async t => {
  // A `%YAML 1.1` manifest's `default: 2024-01-01` was a Date: the manifest started, and every
  // call leaving the field out was refused "input.since must be string" (the Date put in its
  // place); `.inf` in an enum made codegen write `Infinity` as a type, which does not compile.
  const head = 'version: 1\nkernel: { url: "http://127.0.0.1:1" }\noperations:\n  a: { type: query, rest: GET /a, kernel: GET /a, '
  const dir = t.testdir({
    'v11.yaml': '%YAML 1.1\n---\n' + head + 'input: { type: object, properties: { since: { type: string, default: !!timestamp 2024-01-01 }, b: { type: string, examples: [!!binary aGVsbG8=] } } }, output: {} }\n',
    'inf.yaml': head + 'input: { type: object, properties: { n: { type: number, enum: [1, .inf], default: .nan } } }, output: { enum: [-.inf, 2] } }\n',
    'ok.yaml': '%YAML 1.1\n---\n' + head + 'input: { type: object, properties: { since: { type: string, default: "2024-01-01" }, flag: { type: boolean, default: yes } } }, output: {} }\n'
  })
  await t.rejects(loadManifestFile(join(dir, 'v11.yaml')), {
    name: 'ManifestError',
    faults: [
      'operations.a.input.properties.since.default: a Date is not a JSON value (a YAML 1.1 timestamp, binary or set: write it as a string or an array)',
      'operations.a.input.properties.b.examples.0: a Buffer is not a JSON value (a YAML 1.1 timestamp, binary or set: write it as a string or an array)'
    ]
  })
  await t.rejects(loadManifestFile(join(dir, 'inf.yaml')), {
    name: 'ManifestError',
    faults: [
      'operations.a.input.properties.n.enum.1: Infinity is not a JSON number (a manifest holds JSON values only)',
      'operations.a.input.properties.n.default: NaN is not a JSON number (a manifest holds JSON values only)',
      'operations.a.output.enum.0: -Infinity is not a JSON number (a manifest holds JSON values only)'
    ]
  })
  const ok = await loadManifestFile(join(dir, 'ok.yaml'))
  t.same(ok.operations[0].input.properties, { since: { type: 'string', default: '2024-01-01' }, flag: { type: 'boolean', default: true } }, 'a quoted date and YAML 1.1 booleans are JSON values')
})

t.test('a JSON manifest that gives a key twice in one object is refused at its place', async t => {
  // JSON.parse keeps the last: the first copy's roles were dropped without a word.
  const dir = t.testdir({
    'op.json': '{ "version": 1, "kernel": { "url": "http://k:1" }, "operations": {\n  "a": { "type": "query", "rest": "GET /a", "kernel": "GET /v1/a", "roles": ["admin"], "output": { "type": "string" } },\n  "a": { "type": "query", "rest": "GET /a", "kernel": "GET /v1/a", "output": { "type": "string" } } } }',
    'nested.json': JSON.stringify({ version: 1, kernel: { url: 'http://k:1' }, operations: { a: { type: 'query', rest: 'GET /a', kernel: 'GET /v1/a', output: { type: 'string', examples: [{ k: 1 }, 'a:b', { 'k\\"': 2 }] } } } }).replace('{"k":1}', '{"k":1, "k" :2}'),
    'key.json': '{ "version": 1, "kernel": { "url": "http://k:1" }, "operations": {\n  "a": { "type": "query", "rest": "GET /a", "kernel": "GET /v1/a", "roles": ["admin"], "roles": [], "output": { "type": "string" } } } }',
    'escapes.json': JSON.stringify({ version: 1, kernel: { url: 'http://k:1' }, operations: { a: { type: 'query', rest: 'GET /a', kernel: 'GET /v1/a', description: 'tab\there, "quoted", \\, \u00e9, \ud83d\ude00 and a slash \\/', output: { type: 'string' } } } }).replace('slash \\\\/', 'slash \\/')
  })
  for (const [name, line] of [['op.json', 3], ['key.json', 2], ['nested.json', 1]] as const) {
    const file = join(dir, name)
    await t.rejects(loadManifestFile(file), { name: 'ManifestError', faults: [new RegExp(`^gives a key twice in one object \\(JSON would keep the last silently\\): Map keys must be unique at line ${line}, column \\d+$`)] }, name)
  }
  const m = await loadManifestFile(join(dir, 'escapes.json'))
  t.match(m.operations[0].description, /^tab\there, "quoted", \\, é, 😀 and a slash \/$/, 'JSON that is not YAML-friendly still loads')
})

t.test('unknown keys are named by their manifest path', async t => {
  t.same(faultsOf({ ...doc(), extra: 1 }), ['extra: unknown key'], 'at the root')
  t.same(faultsOf(doc({ a: query }, {}, { pool: 4 })), ['kernel.pool: unknown key'], 'in kernel')
  t.same(faultsOf(doc({ a: query }, {}, { circuitBreaker: { threshold: 1, resetTimeoutMs: 1, halfOpen: 1 } })), ['kernel.circuitBreaker.halfOpen: unknown key'], 'in kernel.circuitBreaker')
  t.same(faultsOf(doc({ a: query }, { defaults: { cache: {} } })), ['defaults.cache: unknown key'], 'in defaults')
  t.same(faultsOf(doc({ a: { ...query, method: 'GET' } })), ['operations.a.method: unknown key'], 'in an operation')
  t.same(faultsOf(doc({ a: { ...query, cache: { ttlSeconds: 1, ttl: 1 } } })), ['operations.a.cache.ttl: unknown key'], 'in cache')
  t.same(faultsOf(doc({ a: { ...query, rateLimit: { max: 1, windowMs: 1, burst: 2 } } })), ['operations.a.rateLimit.burst: unknown key'], 'in rateLimit')
  t.same(faultsOf(doc({ a: { ...mutation, input: { type: 'object', properties: { p: { type: 'string' } } }, firewall: { fields: ['p'], action: 'block', mode: 'x' } } })), ['operations.a.firewall.mode: unknown key'], 'in firewall')
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: 't', payload: output, channel: 'x' } } })), ['events.e.channel: unknown key'], 'in an event')
})

// README: "one message lists every fault". A misspelt key (rateLimt) beside a missing $ref and a
// path parameter the input lacks was named alone: the others came one start-up later, then a
// duplicate route one more.
t.test('unknown keys are named with the other faults, in one message', async t => {
  const a = { ...query, rest: 'GET /a/:id', kernel: 'GET /v1/a/{id}', input: idInput, rateLimt: { max: 1, windowMs: 1 } }
  const b = { ...query, rest: 'GET /a/:key', kernel: 'GET /v1/a/{key}', input: idInput, output: { $ref: '#/schemas/Missing' } }
  t.same(faultsOf(doc({ a, b }, { extra: 1 })), [
    'extra: unknown key',
    'operations.a.rateLimt: unknown key',
    'operations.b.output.$ref: "#/schemas/Missing" names a schema that is not declared in schemas',
    'operations.b.rest: path parameter :key is not declared in operations.b.input.properties',
    'operations.b.kernel: path parameter {key} is not declared in operations.b.input.properties'
  ])
  // A fault of another kind in the shape still stops there: what follows could not be read.
  t.same(faultsOf(doc({ a: { ...a, zone: 'secret' }, b })), ['operations.a.rateLimt: unknown key', 'operations.a.zone: must be one of the allowed values'])
})

t.test('the document shape: version, required keys, values', async t => {
  t.same(faultsOf({ ...doc(), version: 2 }), ['version: must be 1'])
  const stringVersion = faultsOf({ ...doc(), version: '1' })
  t.ok(stringVersion.includes('version: must be 1'), stringVersion.join('\n'))
  t.ok(stringVersion.every(f => f.startsWith('version: ')), 'every fault is about version')
  t.same(faultsOf({ version: 1, kernel: { url: 'http://k:1' } }), ['operations: is required'])
  t.same(faultsOf({ version: 1, operations: { a: query } }), ['kernel: is required'])
  t.same(faultsOf(doc({})), ['operations: must NOT have fewer than 1 properties'])
  t.same(faultsOf(doc({ a: { type: 'query', rest: 'GET /a', kernel: 'GET /v1/a' } })), ['operations.a.output: is required'])
  t.same(faultsOf(doc({ a: { ...query, zone: 'secret' } })), ['operations.a.zone: must be one of the allowed values'])
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: 't', payload: output, zone: 'secret' } } })), ['events.e.zone: must be one of the allowed values'])
  t.same(faultsOf(doc({ a: { ...query, type: 'command' } })), ['operations.a.type: must be one of the allowed values'])
  t.same(faultsOf(doc({ a: { ...query, rest: 'FETCH /a' } })), ['operations.a.rest: must match pattern "^(GET|POST|PUT|PATCH|DELETE) (/[A-Za-z0-9_.~:-]*)+$"'])
  t.same(faultsOf(doc({ a: { ...query, rest: 'GET /a/:' } })), ['operations.a.rest: a path parameter needs a name'])
  t.same(faultsOf(doc({ a: query }, {}, { url: 'ftp://k' })), ['kernel.url: must match pattern "^https?://[^\\s/?#@]+/?$"'])
  t.same(faultsOf(doc({ a: query }, {}, { url: 'http://k:1?x=1' })), ['kernel.url: must match pattern "^https?://[^\\s/?#@]+/?$"'], 'no query (undici refuses it as an origin)')
  t.same(faultsOf(doc({ a: query }, {}, { url: 'http://svc:s3cr3t@k:1' })), ['kernel.url: must match pattern "^https?://[^\\s/?#@]+/?$"'], 'no credentials (never sent, and shown in /metrics labels)')
  t.same(faultsOf(doc({ a: { ...query, timeoutMs: 0 } })), ['operations.a.timeoutMs: must be >= 1'])
  t.same(faultsOf(null), ['(root): must be object'])
})

t.test('an unknown keyword is named at the path of the schema holding it', async t => {
  // Ajv's message names the keyword only: it was named at the whole input, output or payload.
  const fault = (at: string, keyword: string): string => `${at}: not a valid JSON Schema: strict mode: unknown keyword: "${keyword}"`
  const items = { type: 'object', properties: { maxLenght: { type: 'string' }, tags: { type: 'array', items: { type: 'string', minLenght: 1 } } } }
  t.same(faultsOf(doc({ a: { ...mutation, input: items } })), [fault('operations.a.input.properties.tags.items', 'minLenght')], 'a property so named is a name, not the keyword')
  t.same(faultsOf(doc({ a: { ...query, output: { anyOf: [{ type: 'string' }, { type: 'integer', maximun: 3 }] } } })), [fault('operations.a.output.anyOf.1', 'maximun')])
  t.same(faultsOf(doc({ a: { ...query, output: { type: 'string', default: { tpye: 1 }, tpye: 'x' } } })), [fault('operations.a.output', 'tpye')], 'not inside a default value')
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: 't', payload: { type: 'object', patternProperties: { '^x': { tpye: 'string' } } } } } })), [fault('events.e.payload.patternProperties.^x', 'tpye')])
  t.same(faultsOf(doc({ a: query }, { schemas: { Agent: { type: 'object', properties: { id: { type: 'string', formt: 'uuid' } } } } })), [fault('schemas.Agent.properties.id', 'formt')])
})

t.test('every pattern that is no regular expression is named at its own path', async t => {
  // Ajv stops at the first and says not where: one per start, each named at the whole input.
  const input = {
    type: 'object',
    properties: { phone: { type: 'string', pattern: '^\\+?[0-9\\-]+$' }, code: { type: 'string', pattern: '^[A-Z]{2}\\-\\d+$' }, tags: { type: 'array', items: { type: 'string', pattern: '([a-z]' } } },
    patternProperties: { '^x\\-': { type: 'string' } }
  }
  t.same(faultsOf(doc({ a: { ...mutation, input } })), [
    'operations.a.input.patternProperties: not a valid JSON Schema: Invalid regular expression: /^x\\-/u: Invalid escape',
    'operations.a.input.properties.code.pattern: not a valid JSON Schema: Invalid regular expression: /^[A-Z]{2}\\-\\d+$/u: Invalid escape',
    'operations.a.input.properties.tags.items.pattern: not a valid JSON Schema: Invalid regular expression: /([a-z]/u: Unterminated group'
  ], 'a hyphen escaped in a class is valid, outside one it is not (Ajv compiles with the u flag)')
  t.same(faultsOf(doc({ a: query }, { schemas: { Code: { type: 'string', pattern: '\\p{Foo}' } } })), ['schemas.Code.pattern: not a valid JSON Schema: Invalid regular expression: /\\p{Foo}/u: Invalid property name'])
})

t.test('an event named then, call or apply is refused at its path, as an operation is', async t => {
  // It compiled, and start-up stopped in tRPC's words: "Reserved words used in `router({})` call: then".
  for (const name of ['then', 'call', 'apply']) {
    t.same(faultsOf(doc({ a: query }, { events: { [name]: { topic: 't', payload: output } } })), [`events.${name}: ${name} cannot name a tRPC subscription (tRPC reserves then, call and apply)`])
  }
  t.same(faultsOf(doc({ a: query }, { events: { thenable: { topic: 't', payload: output } } })), [])
})

t.test('a named schema that is no valid JSON Schema is refused once, at its own path, used or not', async t => {
  // It was refused at each operation using it (operations.a.output: ... data/properties/name/type ...), and never when unused.
  const ops = { a: { ...query, output: { $ref: '#/schemas/Agent' } }, b: { ...query, rest: 'GET /b', output: { type: 'array', items: { $ref: '#/schemas/Agents' } } } }
  const agent = { type: 'object', properties: { name: { type: 'strin' } } }
  t.same(faultsOf(doc(ops, { schemas: { Agent: agent, Agents: { $ref: '#/schemas/Agent' } } })), [
    'schemas.Agent: not a valid JSON Schema: schema is invalid: data/properties/name/type must be equal to one of the allowed values, data/properties/name/type must be array, data/properties/name/type must match a schema in anyOf'
  ])
  t.same(faultsOf(doc({ a: query }, { schemas: { Unused: { type: 'object', requird: ['id'] } } })), ['schemas.Unused: not a valid JSON Schema: strict mode: unknown keyword: "requird"'])
  t.same(faultsOf(doc(ops, { schemas: { Agent: agent, Agents: { $ref: '#/schemas/Nope' } } })).length, 2, 'and a missing reference beside it')
  // An $id inside a named schema, used once: compiled at its path and at its use, as before.
  const nested = { type: 'object', properties: { tag: { $id: 'urn:tag', type: 'string' } } }
  t.same(faultsOf(doc({ a: { ...query, output: { $ref: '#/schemas/Tagged' } } }, { schemas: { Tagged: { $id: 'urn:tagged', ...nested } } })), [])
})

t.test('a role no token can carry is refused at its path, in defaults, operations and events', async t => {
  // Identity refuses a token holding such a role, so an operation naming only it was a 403 to every caller.
  const why = 'is a role no token can carry (a role is visible characters, at most 256, without a comma or spaces around it), so no caller would hold it'
  t.same(faultsOf(doc({ a: { ...query, roles: ['viewer, editor'] } })), [`operations.a.roles.0: "viewer, editor" ${why}`])
  t.same(faultsOf(doc({ a: { ...query, roles: ['admin', ' viewer'] } })), [`operations.a.roles.1: " viewer" ${why}`])
  t.same(faultsOf(doc({ a: query }, { defaults: { roles: ['viewer\n'] } })), [`defaults.roles.0: "viewer\\n" ${why}`])
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: 't', payload: output, roles: ['r'.repeat(257)] } } })), [`events.e.roles.0: "${'r'.repeat(257)}" ${why}`])
  t.same(faultsOf(doc({ a: { ...query, roles: ['ops\u200b'] } })).length, 1, 'an invisible character')
  t.same(faultsOf(doc({ a: { ...query, roles: ['team lead', 'r'.repeat(256), 'rôle', 'a:b/c'] } })), [], 'inner spaces, 256 characters, Latin-1 letters and punctuation are roles a token carries')
})

t.test('an event topic longer than POST /internal/events takes is refused at its path', async t => {
  // POST /internal/events refuses a topic over 256 characters (400), so such an event could never
  // be posted: the manifest loaded, and every post of its events was refused.
  const long = 't'.repeat(257)
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: long, payload: output } } })),
    [`events.e.topic: ${JSON.stringify(long)} is longer than 256 characters, more than POST /internal/events takes, so no event of it could be posted`])
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: 't'.repeat(256), payload: output } } })), [], '256 characters are a topic')
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: '\u{1F600}'.repeat(256), payload: output } } })), [], 'counted in characters, as the endpoint counts them')
})

t.test('a kernel.url the Kernel client cannot use is refused at its path, as KERNEL_URL is', async t => {
  // The pattern took them: start-up then stopped with a bare "Invalid URL", or, port 0, every call failed.
  t.same(faultsOf(doc({ a: query }, {}, { url: 'http://k:99999' })), ['kernel.url: the port "99999" is not 1..65535'])
  t.same(faultsOf(doc({ a: query }, {}, { url: 'http://k:0/' })), ['kernel.url: the port "0" is not 1..65535'])
  t.same(faultsOf(doc({ a: query }, {}, { url: 'http://k:abc' })), ['kernel.url: the port "abc" is not 1..65535'])
  t.same(faultsOf(doc({ a: query }, {}, { url: 'http://[::1' })), ['kernel.url: not a valid URL'])
  t.same(faultsOf(doc({ a: query }, {}, { url: 'http://k%zz' })), ['kernel.url: not a valid URL'])
  t.same(faultsOf(doc({ a: query }, {}, { url: 'https://[::1]:65535/' })), [])
})

t.test('numbers the gateway cannot honour are refused at their path', async t => {
  // A window of 1e300 ms was served: 429 with `Retry-After: 2e+297`.
  t.same(faultsOf(doc({ a: { ...query, rateLimit: { max: 1, windowMs: 1e300 } } })), ['operations.a.rateLimit.windowMs: must be <= 86400000'])
  t.same(faultsOf(doc({ a: { ...query, rateLimit: { max: 1e10, windowMs: 1000 } } })), ['operations.a.rateLimit.max: must be <= 1000000000'])
  t.same(faultsOf(doc({ a: { ...query, cache: { ttlSeconds: 86_401 } } })), ['operations.a.cache.ttlSeconds: must be <= 86400'])
  t.same(faultsOf(doc({ a: { ...query, cache: { swrSeconds: 1e9 } } })), ['operations.a.cache.swrSeconds: must be <= 86400'])
  t.same(faultsOf(doc({ a: query }, { defaults: { rateLimit: { max: 1, windowMs: 86_400_001 } } })), ['defaults.rateLimit.windowMs: must be <= 86400000'])
  t.same(faultsOf(doc({ a: query }, {}, { maxInFlight: 2e6, circuitBreaker: { threshold: 2e6, resetTimeoutMs: 1e12 } })).sort(), [
    'kernel.circuitBreaker.resetTimeoutMs: must be <= 86400000',
    'kernel.circuitBreaker.threshold: must be <= 1000000',
    'kernel.maxInFlight: must be <= 1000000'
  ])
  t.same(faultsOf(doc({ a: { ...query, rateLimit: { max: 1_000_000_000, windowMs: 86_400_000 }, cache: { ttlSeconds: 86_400, swrSeconds: 86_400 } } }, {}, { maxInFlight: 1e6, circuitBreaker: { threshold: 1e6, resetTimeoutMs: 86_400_000 } })), [], 'the maxima themselves are allowed')
})

t.test('the breaker\'s failure-rate rule: opt-in, its defaults, its bounds', async t => {
  const breaker = (cb: Record<string, unknown>): unknown => compileManifest(doc({ a: query }, {}, { circuitBreaker: { threshold: 5, resetTimeoutMs: 1000, ...cb } })).kernel.circuitBreaker
  t.same(breaker({ failureRate: 0.5 }), { threshold: 5, resetTimeoutMs: 1000, rate: { failureRate: 0.5, minimumCalls: 20, windowMs: 10_000 } }, 'minimumCalls 20 and windowMs 10 s by default')
  t.same(breaker({ failureRate: 1, minimumCalls: 3, windowMs: 100 }), { threshold: 5, resetTimeoutMs: 1000, rate: { failureRate: 1, minimumCalls: 3, windowMs: 100 } })
  t.ok(Object.isFrozen((breaker({ failureRate: 0.5 }) as { rate: object }).rate), 'frozen')
  t.same(faultsOf(doc({ a: query }, {}, { circuitBreaker: { threshold: 5, resetTimeoutMs: 1000, minimumCalls: 10, windowMs: 5000 } })), [
    'kernel.circuitBreaker.minimumCalls: needs failureRate (it belongs to the failure-rate rule)',
    'kernel.circuitBreaker.windowMs: needs failureRate (it belongs to the failure-rate rule)'
  ], 'its settings without the rate are named, not ignored')
  t.same(faultsOf(doc({ a: query }, {}, { circuitBreaker: { threshold: 5, resetTimeoutMs: 1000, failureRate: 0 } })), ['kernel.circuitBreaker.failureRate: must be > 0'])
  t.same(faultsOf(doc({ a: query }, {}, { circuitBreaker: { threshold: 5, resetTimeoutMs: 1000, failureRate: 1.5 } })), ['kernel.circuitBreaker.failureRate: must be <= 1'])
  t.same(faultsOf(doc({ a: query }, {}, { circuitBreaker: { threshold: 5, resetTimeoutMs: 1000, failureRate: 0.5, minimumCalls: 0, windowMs: 99 } })).sort(), [
    'kernel.circuitBreaker.minimumCalls: must be >= 1',
    'kernel.circuitBreaker.windowMs: must be >= 100'
  ])
})

t.test('$ref faults name the place of the $ref', async t => {
  t.same(faultsOf(doc({ a: { ...query, output: { $ref: '#/schemas/Nope' } } })),
    ['operations.a.output.$ref: "#/schemas/Nope" names a schema that is not declared in schemas'])
  t.same(faultsOf(doc({ a: { ...query, output: { anyOf: [{ type: 'null' }, { $ref: '#/schemas/Nope' }] } } })),
    ['operations.a.output.anyOf.1.$ref: "#/schemas/Nope" names a schema that is not declared in schemas'], 'inside an array')
  t.same(faultsOf(doc({ a: { ...query, output: { $ref: '#/definitions/A' } } }, { schemas: { A: output } })),
    ['operations.a.output.$ref: "#/definitions/A" must have the form #/schemas/Name'])
  t.same(faultsOf(doc({ a: { ...query, output: { $ref: 'A' } } }, { schemas: { A: output } })),
    ['operations.a.output.$ref: "A" must have the form #/schemas/Name'])
  t.same(faultsOf(doc({ a: { ...mutation, input: { type: 'object', properties: { x: { $ref: '#/schemas/Nope' } } } } })),
    ['operations.a.input.properties.x.$ref: "#/schemas/Nope" names a schema that is not declared in schemas'], 'in input')
})

t.test('a __proto__ key in a schema is refused at its path, not misread', async t => {
  // Copied by assignment, it set the copy's prototype: a property named so made the input's
  // `properties` read as that property's schema, refused as "data/properties/type must be object,boolean".
  const why = '__proto__ cannot be a key in a schema (it is an object\'s prototype wherever the gateway copies the schema)'
  const input = JSON.parse('{"type":"object","properties":{"__proto__":{"type":"string"},"a":{"type":"string"}}}')
  t.same(faultsOf(doc({ a: { ...mutation, input } })), [`operations.a.input.properties.__proto__: ${why}`])
  t.same(faultsOf(doc({ a: { ...query, output: JSON.parse('{"type":"object","default":{"__proto__":1}}') } })), [`operations.a.output.default.__proto__: ${why}`])
  t.same(faultsOf(doc({ a: { ...query, output: { $ref: '#/schemas/A' } }, b: { ...query, rest: 'GET /b', output: { $ref: '#/schemas/A' } } }, { schemas: { A: input } })),
    [`schemas.A.properties.__proto__: ${why}`], 'once, in a named schema')
})

t.test('a $ref to a name Object.prototype holds is a missing schema, and __proto__ names no schema', async t => {
  // `#/schemas/toString` found Object.prototype's member: the manifest started, its output `{}`,
  // the whole Kernel answer passed on every face.
  for (const name of ['toString', 'constructor', 'hasOwnProperty', '__proto__']) {
    t.same(faultsOf(doc({ a: { ...query, output: { $ref: `#/schemas/${name}` } } })),
      [`operations.a.output.$ref: "#/schemas/${name}" names a schema that is not declared in schemas`], name)
    t.same(faultsOf(doc({ a: { ...query, output: { $ref: `#/schemas/${name}` } } }, { schemas: { A: output } })),
      [`operations.a.output.$ref: "#/schemas/${name}" names a schema that is not declared in schemas`], `${name}, beside a declared schema`)
  }
  // JSON.parse (and YAML) keep `__proto__` as an own key; stored by name, it was the prototype of
  // the named schemas, whose members (`type`, `properties`) a $ref then found.
  const proto = JSON.parse(JSON.stringify(doc({ a: { ...query, output: { $ref: '#/schemas/type' } } })).replace('"operations":', `"schemas":{"__proto__":${JSON.stringify(output)}},"operations":`))
  t.same(faultsOf(proto), ['schemas.__proto__: __proto__ cannot name a schema', 'operations.a.output.$ref: "#/schemas/type" names a schema that is not declared in schemas'])
  const constructor = compileManifest(doc({ a: { ...query, output: { $ref: '#/schemas/constructor' } } }, { schemas: { constructor: output } }))
  t.same(constructor.operations[0].output, output, 'a schema declared as constructor is that schema')
  t.equal(compileManifest(doc({ a: query }, { events: { toString: { topic: 't', payload: output } } })).events[0].name, 'toString', 'an event toString is no operation of the same name')
})

t.test('a cyclic $ref is refused', async t => {
  t.same(faultsOf(doc({ a: query }, { schemas: { Node: { type: 'object', properties: { next: { $ref: '#/schemas/Node' } } } } })),
    ['schemas.Node.properties.next.$ref: "#/schemas/Node" is cyclic (Node -> Node), which the faces cannot express'], 'direct')
  const two = faultsOf(doc({ a: query }, { schemas: { A: { type: 'object', properties: { b: { $ref: '#/schemas/B' } } }, B: { type: 'object', properties: { a: { $ref: '#/schemas/A' } } } } }))
  t.ok(two.includes('schemas.A.properties.b.properties.a.$ref: "#/schemas/A" is cyclic (A -> B -> A), which the faces cannot express'), 'through two schemas')
  t.ok(two.every(f => f.includes('is cyclic')), two.join('\n'))
})

t.test('a $ref used twice without a cycle is fine', async t => {
  const m = compileManifest(doc({ a: { ...query, output: { type: 'object', properties: { x: { $ref: '#/schemas/A' }, y: { $ref: '#/schemas/A' } } } } }, { schemas: { A: output } }))
  t.same(m.operations[0].output, { type: 'object', properties: { x: output, y: output } })
})

t.test('a missing $ref inside a named schema is reported once, at its place in schemas', async t => {
  t.same(faultsOf(doc({ a: { ...query, output: { $ref: '#/schemas/A' } } }, { schemas: { A: { type: 'object', properties: { x: { $ref: '#/schemas/Nope' } } } } })),
    ['schemas.A.properties.x.$ref: "#/schemas/Nope" names a schema that is not declared in schemas'])
})

t.test('a $ref with sibling keys is merged, the siblings winning', async t => {
  const m = compileManifest(doc({ a: { ...query, output: { $ref: '#/schemas/A', description: 'the A', required: ['id'] } } }, {
    schemas: { A: { type: 'object', description: 'an A', properties: { id: { type: 'string' }, b: { $ref: '#/schemas/B' } } }, B: { type: 'integer' } }
  }))
  t.same(m.operations[0].output, { type: 'object', description: 'the A', required: ['id'], properties: { id: { type: 'string' }, b: { type: 'integer' } } })
  t.same(m.schemas.A, { type: 'object', description: 'an A', properties: { id: { type: 'string' }, b: { type: 'integer' } } }, 'the named schema is resolved and unchanged')
  t.same(m.operations[0].outputDocument, { $ref: '#/schemas/A', description: 'the A', required: ['id'] })
})

t.test('a named schema with an $id serves several operations, and twice in one', async t => {
  // Its $id was copied wherever it was inlined, and Ajv refused the second use.
  const m = compileManifest(doc({
    a: { ...query, output: { $ref: '#/schemas/Thing' } },
    b: { ...query, rest: 'GET /b', output: { type: 'object', properties: { one: { $ref: '#/schemas/Thing' }, two: { $ref: '#/schemas/Thing' } } } }
  }, { schemas: { Thing: { $id: 'Thing', type: 'object', properties: { id: { type: 'string' } } } } }))
  t.same(m.operations[0].output, { type: 'object', properties: { id: { type: 'string' } } })
  t.same(m.operations[1].output, { type: 'object', properties: { one: { type: 'object', properties: { id: { type: 'string' } } }, two: { type: 'object', properties: { id: { type: 'string' } } } } })
})

t.test('a Kernel path with a . or .. segment is refused: the Kernel would resolve it to another route', async t => {
  for (const kernel of ['GET /v1/./a', 'GET /v1/../a', 'GET /v1/a/..', 'GET /v1/{id}/../a']) {
    t.same(faultsOf(doc({ a: { ...query, rest: 'GET /a/:id', kernel, input: idInput } })), ['operations.a.kernel: a \'.\' or \'..\' segment, which the Kernel or a proxy before it resolves to another path'], kernel)
  }
  for (const kernel of ['GET /v1/.a', 'GET /v1/a.../b', 'GET /v1/{id}.json']) t.equal(compileManifest(doc({ a: { ...query, rest: 'GET /a/:id', kernel, input: idInput } })).operations[0].kernel.path, kernel.slice(4), `${kernel} is fine`)
})

t.test('a REST route with a . or .. segment is refused: clients resolve it before sending', async t => {
  // It compiled, and GET /api/v1/a/./b answered 404 to every client: fetch and curl ask /api/v1/a/b.
  for (const rest of ['GET /a/./b', 'GET /a/../b', 'GET /a/b/.', 'GET /a/:id/..']) {
    t.same(faultsOf(doc({ a: { ...query, rest, input: idInput, kernel: 'GET /v1/a' } })).filter(f => !f.includes('path parameter')), ['operations.a.rest: a \'.\' or \'..\' segment, which clients resolve before sending (the route could not be reached)'], rest)
  }
  for (const rest of ['GET /a/.b', 'GET /a/b...', 'GET /a/:id.json']) t.equal(compileManifest(doc({ a: { ...query, rest, kernel: 'GET /v1/a/{id}', input: idInput } })).operations[0].path, rest.slice(4), `${rest} is fine`)
})

t.test('a duplicate REST route is refused, whatever the param names', async t => {
  t.same(faultsOf(doc({
    a: { ...query, rest: 'GET /a/:id', kernel: 'GET /v1/a/{id}', input: idInput },
    b: { ...query, rest: 'GET /a/:key', kernel: 'GET /v1/b/{key}', input: { type: 'object', required: ['key'], properties: { key: { type: 'string' } } } }
  })), ['operations.b.rest: duplicate REST route GET /a/:key (also operations.a.rest)'])
  t.same(faultsOf(doc({ a: query, b: { ...query, kernel: 'GET /v1/b' } })), ['operations.b.rest: duplicate REST route GET /a (also operations.a.rest)'])
  const ok = compileManifest(doc({ a: query, b: { ...mutation, rest: 'POST /a' }, c: { ...query, rest: 'GET /a/b' } }))
  t.equal(ok.operations.length, 3, 'another method or another path is another route')
  // The text beside a parameter in its segment is part of the route, as Fastify reads it: these
  // were refused as duplicates of `/a/:`.
  const two = (x: string, y: string): Record<string, unknown> => ({ type: 'object', required: [x, y], properties: { [x]: { type: 'string' }, [y]: { type: 'string' } } })
  const apart = compileManifest(doc({
    a: { ...query, rest: 'GET /a/:id', kernel: 'GET /v1/a/{id}', input: idInput },
    b: { ...query, rest: 'GET /a/:id.json', kernel: 'GET /v1/b/{id}', input: idInput },
    c: { ...query, rest: 'GET /a/:x-:y', kernel: 'GET /v1/c', input: two('x', 'y') },
    d: { ...query, rest: 'GET /a/:x.:y', kernel: 'GET /v1/d', input: two('x', 'y') },
    e: { ...query, rest: 'GET /a/:id-b', kernel: 'GET /v1/e', input: idInput }
  }))
  t.same(apart.operations.map(o => o.path), ['/a/:id', '/a/:id.json', '/a/:x-:y', '/a/:x.:y', '/a/:id-b'])
  t.same(faultsOf(doc({
    a: { ...query, rest: 'GET /a/:x-:y', kernel: 'GET /v1/c', input: two('x', 'y') },
    b: { ...query, rest: 'GET /a/:p-:q', kernel: 'GET /v1/c', input: two('p', 'q') }
  })), ['operations.b.rest: duplicate REST route GET /a/:p-:q (also operations.a.rest)'], 'the same text beside other names is the same route')
})

t.test('path params must be declared in input and required', async t => {
  t.same(faultsOf(doc({ a: { ...query, rest: 'GET /a/:x' } })), ['operations.a.rest: path parameter :x is not declared in operations.a.input.properties'])
  t.same(faultsOf(doc({ a: { ...query, kernel: 'GET /v1/a/{x}' } })), ['operations.a.kernel: path parameter {x} is not declared in operations.a.input.properties'])
  t.same(faultsOf(doc({ a: { ...query, rest: 'GET /a/:id', input: { type: 'object', properties: { id: { type: 'string' } } } } })),
    ['operations.a.input.required: path parameter id must be required'])
  t.same(faultsOf(doc({ a: { ...query, kernel: 'GET /v1/a/{id}', input: { type: 'object', properties: { id: { type: 'string' } } } } })),
    ['operations.a.input.required: path parameter id must be required'], 'a Kernel-only path param too')
  const m = compileManifest(doc({ a: { ...query, rest: 'GET /a/:id/b/:n', kernel: 'GET /v1/{n}/{id}', input: { type: 'object', required: ['id', 'n'], properties: { id: { type: 'string' }, n: { type: 'integer' } } } } }))
  t.same(m.operations[0].pathParams, ['id', 'n'])
  t.same(m.operations[0].kernel.pathParams, ['n', 'id'])
})

t.test('input and output must be valid JSON Schemas, input an object', async t => {
  t.same(faultsOf(doc({ a: { ...query, output: { type: 'nope' } } })),
    ['operations.a.output: not a valid JSON Schema: schema is invalid: data/type must be equal to one of the allowed values, data/type must be array, data/type must match a schema in anyOf'])
  const bad = faultsOf(doc({ a: { ...mutation, input: { type: 'object', properties: { x: { type: 'string', minLength: 'a' } } } } }))
  t.same(bad, ['operations.a.input: not a valid JSON Schema: schema is invalid: data/properties/x/minLength must be integer'])
  const unknownKeyword = faultsOf(doc({ a: { ...mutation, input: { type: 'object', properties: { x: { type: 'string', maxLenght: 3 } } } } }))
  t.same(unknownKeyword, ['operations.a.input.properties.x: not a valid JSON Schema: strict mode: unknown keyword: "maxLenght"'], 'strict about keywords, named where the keyword is')
  t.same(faultsOf(doc({ a: { ...query, input: { type: 'string' } } })),
    ['operations.a.input: must be a schema of type object (its properties are the call\'s arguments)'])
  t.same(faultsOf(doc({ a: { ...query, input: { type: 'array', items: { type: 'string' } } } })),
    ['operations.a.input: must be a schema of type object (its properties are the call\'s arguments)'])
  const annotated = compileManifest(doc({ a: { ...query, output: { ...output, example: { id: 'x' } } } }))
  t.equal(annotated.operations.length, 1, 'annotation keywords such as example are allowed')
})

t.test('GET and DELETE input must fit in the query string', async t => {
  t.same(faultsOf(doc({ a: { ...query, input: { type: 'object', properties: { filter: { type: 'object' } } } } })),
    ['operations.a.input.properties.filter: GET takes its input from the query string, which carries only scalars and arrays of scalars'])
  t.same(faultsOf(doc({ a: { ...query, input: { type: 'object', properties: { m: { type: 'array', items: { type: 'array' } } } } } })),
    ['operations.a.input.properties.m: GET takes its input from the query string, which carries only scalars and arrays of scalars'], 'an array of arrays')
  t.same(faultsOf(doc({ a: { ...mutation, rest: 'DELETE /a', kernel: 'DELETE /v1/a', input: { type: 'object', properties: { any: {} } } } })),
    ['operations.a.input.properties.any: DELETE takes its input from the query string, which carries only scalars and arrays of scalars'], 'an untyped property')
  // The Kernel side too: a POST route served by a Kernel GET sent an object as "[object Object]".
  t.same(faultsOf(doc({ a: { ...query, rest: 'POST /a/search', kernel: 'GET /v1/a', input: { type: 'object', properties: { filter: { type: 'object' } } } } })),
    ['operations.a.input.properties.filter: the Kernel call (GET) takes its input from the query string, which carries only scalars and arrays of scalars'])
  t.same(faultsOf(doc({ a: { ...mutation, rest: 'POST /a/:k', kernel: 'POST /v1/a/{k}', input: { type: 'object', required: ['k'], properties: { k: { type: 'object' } } } } })),
    ['operations.a.input.properties.k: a path parameter is a scalar (string, number, integer or boolean)'])
  t.equal(compileManifest(doc({ a: { ...query, rest: 'POST /a/search', kernel: 'POST /v1/a', input: { type: 'object', properties: { filter: { type: 'object' } } } } })).operations.length, 1, 'a body on both sides carries anything')
  const m = compileManifest(doc({
    a: {
      ...query,
      input: {
        type: 'object',
        properties: {
          s: { type: 'string' },
          n: { type: ['integer', 'null'] },
          b: { type: 'boolean' },
          e: { enum: ['x', 'y'] },
          c: { const: 1 },
          list: { type: 'array', items: { type: 'number' } }
        }
      }
    },
    b: { ...mutation, rest: 'POST /b', input: { type: 'object', properties: { nested: { type: 'object' } } } }
  }))
  t.equal(m.operations.length, 2, 'scalars, enums, consts and arrays of scalars are queryable; a body takes anything')
  t.equal(m.byName.get('b')?.inputInBody, true)
})

t.test('the method must fit the operation type', async t => {
  t.same(faultsOf(doc({ a: { ...query, rest: 'DELETE /a' } })), ['operations.a.rest: a query is served by GET, or by POST when its input needs a body'])
  t.same(faultsOf(doc({ a: { ...query, rest: 'PUT /a' } })), ['operations.a.rest: a query is served by GET, or by POST when its input needs a body'])
  t.same(faultsOf(doc({ a: { ...query, rest: 'POST /a/search' } })), [], 'a query may take a body by POST')
  t.same(faultsOf(doc({ a: { ...mutation, rest: 'GET /a' } })), ['operations.a.rest: a mutation cannot be served by GET'])
  const m = compileManifest(doc({ a: { ...mutation, rest: 'DELETE /a' }, b: { ...mutation, rest: 'PUT /a' }, c: { ...mutation, rest: 'PATCH /a' } }))
  t.same(m.operations.map(o => [o.method, o.inputInBody]), [['DELETE', false], ['PUT', true], ['PATCH', true]])
})

t.test('cache, tags and firewall are checked against the input', async t => {
  t.same(faultsOf(doc({ a: { ...mutation, cache: { ttlSeconds: 5 } } })), ['operations.a.cache: only queries are cached'])
  t.same(compileManifest(doc({ a: { ...query, cache: { ttlSeconds: 5 } } })).operations[0].cache, { ttlSeconds: 5, swrSeconds: 0, tags: [], scope: 'tenant' }, 'a cache without tags, shared by the tenant')
  t.equal(compileManifest(doc({ a: { ...query, cache: { scope: 'user' } } })).operations[0].cache?.scope, 'user', 'or the asking user\'s alone')
  t.same(faultsOf(doc({ a: { ...query, cache: { scope: 'everyone' } } })), ['operations.a.cache.scope: must be one of the allowed values'], 'no other scope')
  t.same(faultsOf(doc({ a: { ...query, cache: { ttlSeconds: 5, tags: ['a:{id}'] } } })),
    ['operations.a: tag "a:{id}" uses {id}, which is not declared in operations.a.input.properties'])
  t.same(faultsOf(doc({ a: { ...mutation, invalidates: ['all', 'a:{id}'] } })),
    ['operations.a: tag "a:{id}" uses {id}, which is not declared in operations.a.input.properties'], 'in invalidates')
  t.same(faultsOf(doc({ a: { ...mutation, firewall: { fields: ['prompt'], action: 'monitor' } } })),
    ['operations.a.firewall.fields: prompt is not declared in operations.a.input.properties'])
  t.same(faultsOf(doc({ a: { ...mutation, input: { type: 'object', properties: { p: { type: 'string' } } }, firewall: { fields: ['p'], action: 'shout' } } })),
    ['operations.a.firewall.action: must be one of the allowed values'])
})

t.test('names: operations, events and schemas', async t => {
  t.same(faultsOf(doc({ 'get-a': query })),
    ['operations.get-a: the operation name must match ^[A-Za-z_][A-Za-z0-9_]*$ (it is a tRPC procedure and a GraphQL field)'])
  t.same(faultsOf(doc({ a: query }, { events: { 'run-updated': { topic: 't', payload: output } } })),
    ['events.run-updated: the event name must match ^[A-Za-z_][A-Za-z0-9_]*$'])
  t.same(faultsOf(doc({ a: query }, { events: { a: { topic: 't', payload: output } } })), ['events.a: an operation has the same name'])
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: 't', payload: { $ref: '#/schemas/Nope' } } } })),
    ['events.e.payload.$ref: "#/schemas/Nope" names a schema that is not declared in schemas'])
  t.same(faultsOf(doc({ a: query }, { events: { e: { topic: 't', payload: { type: 'nope' } } } })),
    ['events.e.payload: not a valid JSON Schema: schema is invalid: data/type must be equal to one of the allowed values, data/type must be array, data/type must match a schema in anyOf'])
  t.same(faultsOf(doc({ a: query }, { schemas: { 'my-schema': output } })), ['schemas.my-schema: the name must match ^[A-Za-z_][A-Za-z0-9_]*$'])
  // `__x` matched the pattern and was served on REST and tRPC, while GraphQL, whose prefix it
  // is, left it out: `{ __x }` was "Cannot query field". `__proto__` too (JSON.parse keeps it
  // as an own key).
  t.same(faultsOf(doc({ a: query, __x: { ...query, rest: 'GET /x' } })),
    ['operations.__x: an operation name may not begin with __ (GraphQL reserves it for introspection, and the operation is a GraphQL field)'])
  t.same(faultsOf(JSON.parse(JSON.stringify(doc({ a: query })).replace('"operations":{', '"operations":{"__proto__":' + JSON.stringify({ ...query, rest: 'GET /p' }) + ','))),
    ['operations.__proto__: an operation name may not begin with __ (GraphQL reserves it for introspection, and the operation is a GraphQL field)'])
  t.same(faultsOf(doc({ a: query }, { events: { __e: { topic: 't', payload: output } } })),
    ['events.__e: an event name may not begin with __ (GraphQL reserves it for introspection, and the event is a GraphQL subscription field)'])
  t.equal(compileManifest(doc({ _a: query }, { events: { _e: { topic: 't', payload: output } } })).events[0].name, '_e', 'one underscore is fine')
  const named = new RegExp((OperationNameSchema as { pattern?: string }).pattern ?? '')
  t.same(['a', '_a', '__x', '__proto__', 'get-a'].map(n => named.test(n)), [true, true, false, false, false], 'the manifest schema\'s name pattern agrees')
})

t.test('POST /batch is reserved by the gateway', async t => {
  t.same(faultsOf(doc({ a: { ...mutation, rest: 'POST /batch' } })), ['operations.a.rest: POST /batch is reserved by the gateway'])
  t.equal(compileManifest(doc({ a: { ...query, rest: 'GET /batch' } })).operations[0].path, '/batch', 'GET /batch is free')
})

t.test('manifests that compiled and then stopped the start are refused at their place', async t => {
  // Each passed the compiler, then Fastify, tRPC or GraphQL refused it at start-up, in their
  // own words, naming no place in the manifest.
  t.same(faultsOf(doc({ a: query, b: { ...query, rest: 'GET /a/', kernel: 'GET /v1/b' } })), ['operations.b.rest: duplicate REST route GET /a/ (also operations.a.rest)'], 'a trailing slash is the same route')
  t.same(faultsOf(doc({ a: { ...mutation, rest: 'POST /batch/' } })), ['operations.a.rest: POST /batch/ is reserved by the gateway'])
  t.same(faultsOf(doc({ then: query, call: { ...query, rest: 'GET /c' }, apply: { ...query, rest: 'GET /d' } })), ['then', 'call', 'apply'].map(n => `operations.${n}: ${n} cannot name a tRPC procedure (tRPC reserves then, call and apply)`))
  t.same(faultsOf(doc({ a: { ...query, output: { $id: 'Problem', type: 'object' } } })), ['operations.a.output.$id: "Problem" is the id of a schema of the gateway\'s own'])
  t.same(faultsOf(doc({ a: { ...query, input: { type: 'object', properties: { p: { $id: 'Problem', type: 'string' } } } } })), ['operations.a.input.properties.p.$id: "Problem" is the id of a schema of the gateway\'s own'], 'nested too')
  // A named schema's own $id is dropped where it is inlined, and data is no schema: both fine.
  const fine = compileManifest(doc({ a: { ...query, output: { $ref: '#/schemas/P' } }, b: { ...query, rest: 'GET /b', output: { type: 'object', examples: [{ $id: 'Problem' }], default: { $id: 'Problem' } } } }, { schemas: { P: { $id: 'Problem', type: 'object' } } }))
  t.same(fine.operations[0].output, { type: 'object' })
  t.same(faultsOf(doc({ a: { ...query, rest: 'GET /a/:id/:id', kernel: 'GET /v1/a/{id}', input: idInput } })), ['operations.a.rest: path parameter :id appears twice'], 'the first value was dropped')
  // Fastify's router ends a parameter's name only at '/', '-', '.' or the end: `/:a:b` was one
  // parameter "a:b" to it, the gateway started, and every call was refused "input.a is required".
  const ab = { type: 'object', required: ['a', 'b'], properties: { a: { type: 'string' }, b: { type: 'string' } } }
  t.same(faultsOf(doc({ a: { ...query, rest: 'GET /ok/:a:b', input: ab } })), ["operations.a.rest: path parameter :a in /ok/:a:b is followed by ':': a parameter ends at '/', '-', '.' or the end of the path"], 'a colon after a parameter')
  t.same(faultsOf(doc({ a: { ...query, rest: 'GET /ok/:a~:b', input: ab } })), ["operations.a.rest: path parameter :a in /ok/:a~:b is followed by '~': a parameter ends at '/', '-', '.' or the end of the path"], 'a tilde after a parameter')
  t.same(faultsOf(doc({ a: { ...query, rest: 'GET /ok/:id~x', input: idInput } })), ["operations.a.rest: path parameter :id in /ok/:id~x is followed by '~': a parameter ends at '/', '-', '.' or the end of the path"], 'read as one parameter "id~x" by the router')
  // What the router reads as the manifest does: parameters parted by '-' or '.', a static suffix.
  for (const rest of ['GET /ok/:a-:b', 'GET /ok/:a.:b', 'GET /ok/:a-b~:b', 'GET /ok/:a/:b']) {
    t.same(compileManifest(doc({ a: { ...query, rest, input: ab } })).operations[0].pathParams, ['a', 'b'], rest)
  }
  t.same(compileManifest(doc({ a: { ...query, rest: 'GET /ok/:id.json', input: idInput } })).operations[0].pathParams, ['id'], 'a static suffix')
  for (const kernel of ['GET /v1/a/{id', 'GET /v1/a/id}', 'GET /v1/{a{id}}']) {
    t.match(faultsOf(doc({ a: { ...query, rest: 'GET /a/:id', kernel, input: idInput } })), ['operations.a.kernel: a { or } outside a {name}'], kernel)
  }
  t.equal(compileManifest(doc({ a: { ...query, rest: 'GET /', kernel: 'GET /v1/{id}/x', input: idInput } })).operations[0].path, '/', 'the root and a {name} stay fine')
  // Accepted, and then never applied: a firewall field that is never a string, a query's invalidates.
  const numbered = { type: 'object', properties: { n: { type: 'integer' }, b: { type: ['boolean', 'null'] }, s: { type: ['string', 'null'] }, any: {}, list: { type: 'array' }, map: { type: ['object', 'number'] } } }
  t.same(faultsOf(doc({ a: { ...mutation, input: numbered, firewall: { fields: ['n', 'b', 's', 'any', 'list', 'map'], action: 'block' } } })), [
    'operations.a.firewall.fields: n never holds a string (nor an array or object, whose strings would be scanned), and the firewall scans strings only',
    'operations.a.firewall.fields: b never holds a string (nor an array or object, whose strings would be scanned), and the firewall scans strings only'
  ])
  t.same(faultsOf(doc({ a: { ...query, invalidates: ['x'] } })), ['operations.a.invalidates: only a mutation invalidates'])
  t.match(faultsOf(doc({ a: { ...mutation, input: { type: 'object', properties: { p: null } }, firewall: { fields: ['p'], action: 'block' } } })), [/^operations\.a\.input: not a valid JSON Schema/], 'a property with no schema (YAML `p:` with nothing after it): its place, not a TypeError')
})

t.test('every fault is reported in one error', async t => {
  let caught: unknown
  try {
    compileManifest(doc({
      'bad-name': query,
      b: { ...mutation, rest: 'GET /b' },
      c: { ...query, rest: 'GET /c/:x' },
      d: { ...query, rest: 'GET /d', output: { $ref: '#/schemas/Nope' } }
    }, { events: { c: { topic: 't', payload: output } } }), 'many.yaml')
  } catch (err) {
    caught = err
  }
  t.type(caught, ManifestError)
  const err = caught as ManifestError
  t.equal(err.name, 'ManifestError')
  t.same(err.faults, [
    'operations.bad-name: the operation name must match ^[A-Za-z_][A-Za-z0-9_]*$ (it is a tRPC procedure and a GraphQL field)',
    'operations.b.rest: a mutation cannot be served by GET',
    'operations.c.rest: path parameter :x is not declared in operations.c.input.properties',
    'operations.d.output.$ref: "#/schemas/Nope" names a schema that is not declared in schemas',
    'events.c: an operation has the same name'
  ])
  t.equal(err.faults.length, 5)
  t.equal(err.message, 'Invalid manifest many.yaml:\n  - ' + err.faults.join('\n  - '))

  const shape = faultsOf({ version: 3, kernel: { url: 'http://k:1', x: 1 }, operations: { a: { ...query, y: 1 } }, z: 1 })
  t.equal(shape.length, 4, shape.join('\n'))
  t.same([...shape].sort(), ['kernel.x: unknown key', 'operations.a.y: unknown key', 'version: must be 1', 'z: unknown key'])
})

t.test('an input property that is no schema (YAML `limit:` with nothing after it) is a fault of the manifest, not a TypeError', async t => {
  // Before, the route checks read its type and start-up stopped with "Cannot read properties of null".
  for (const [what, op] of [
    ['a GET query', { ...query, input: { type: 'object', properties: { limit: null } } }],
    ['a path parameter', { ...query, rest: 'GET /a/:id', kernel: 'GET /v1/a/{id}', input: { type: 'object', required: ['id'], properties: { id: null } } }],
    ['a POST served by a Kernel GET', { ...query, rest: 'POST /a', input: { type: 'object', properties: { limit: null } } }]
  ] as const) {
    const faults = faultsOf(doc({ a: op }))
    t.ok(faults.length > 0, `${what}: refused`)
    t.ok(faults.some(f => /properties[./]/.test(f) && /limit|id/.test(f)), `${what}: the fault names the property (${faults.join('; ')})`)
  }
})
