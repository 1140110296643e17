import t from 'tap'
import { execFile } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import ts from 'typescript'
import { ESLint } from 'eslint'
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml'
import { codegen, generateRouterTypes, toType, typeNames } from '../../scripts/codegen.js'
import { demoManifest, fixture, testManifest } from '../helper.js'

const root = fileURLToPath(new URL('../..', import.meta.url))

/** A scratch folder that resolves packages from the repository's node_modules. */
function scratch (t: { teardown: (fn: () => unknown) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'mantle-codegen-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'), 'dir')
  writeFileSync(join(dir, 'package.json'), '{"type":"module"}')
  return dir
}

/** Type-checks files as a client project would (strict, NodeNext): diagnostics as `file:line message`. */
function typecheck (dir: string, files: string[]): string[] {
  const program = ts.createProgram(files.map(f => join(dir, f)), {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    lib: ['lib.es2023.d.ts'],
    types: ['node']
  })
  return ts.getPreEmitDiagnostics(program).map(d => {
    const where = d.file === undefined || d.start === undefined ? '' : `${d.file.fileName.split('/').pop() ?? ''}:${d.file.getLineAndCharacterOfPosition(d.start).line + 1} `
    return where + ts.flattenDiagnosticMessageText(d.messageText, ' ')
  })
}

t.test('JSON Schema to TypeScript', async t => {
  t.equal(toType({ type: 'string' }), 'string')
  t.equal(toType({ type: 'integer' }), 'number')
  t.equal(toType({ type: ['string', 'null'] }), 'string | null', 'nullable through a type array')
  t.equal(toType({ enum: ['a', 1, true, null] }), "'a' | 1 | true | null")
  t.equal(toType({ enum: ["it's", 'a"b', 'c\\d'] }), "'it\\'s' | 'a\"b' | 'c\\\\d'", 'string literals are escaped')
  t.equal(toType({ enum: [{ a: 1 }] }), 'unknown')
  t.equal(toType({ const: 'x' }), "'x'")
  t.equal(toType({ anyOf: [{ type: 'string' }, { type: 'number' }] }), 'string | number')
  t.equal(toType({ oneOf: [{ type: 'string' }, {}] }), 'unknown', 'a union with unknown is unknown')
  t.equal(toType({ allOf: [{ $ref: '#/schemas/A' }, { $ref: '#/schemas/B' }] }), '(A) & (B)')
  t.equal(toType({ $ref: '#/definitions/X' }), 'unknown', 'only #/schemas refs name a type')
  t.equal(toType({ type: 'array', items: { $ref: '#/schemas/Agent' } }), 'Array<Agent>')
  t.equal(toType({ type: 'array' }), 'unknown[]')
  t.equal(toType({ type: 'array', items: [{ type: 'string' }] }), 'unknown[]', 'tuples are not modelled')
  t.equal(toType({ type: 'object' }), 'Record<string, unknown>')
  t.equal(toType({ type: 'object', additionalProperties: false }), 'Record<string, never>')
  t.equal(toType({ type: 'object', additionalProperties: { type: 'integer' } }), 'Record<string, number>')
  t.equal(toType({ type: 'object', required: ['a'], properties: { a: { type: 'string' }, 'b-c': { type: 'boolean', description: 'has */ inside\nand lines' } } }),
    '{\n  a: string\n  /** has *\\/ inside and lines */\n  \'b-c\'?: boolean\n}')
  t.equal(toType({ properties: { a: {} }, additionalProperties: true }), '{\n  a?: unknown\n  [key: string]: unknown\n}', 'properties imply an object')
  // A required key `properties` does not declare is required all the same, typed as the
  // additionalProperties (or a patternProperties whose pattern it matches) say; before, it was
  // left out of the type, and a call without it type-checked.
  t.equal(toType({ type: 'object', required: ['a', 'b'], properties: { a: { type: 'string' } }, additionalProperties: { type: 'integer' } }),
    '{\n  a: string\n  b: number\n  [key: string]: unknown\n}', 'an undeclared required key: the additionalProperties\' type')
  t.equal(toType({ type: 'object', required: ['b'], properties: { a: {} } }), '{\n  a?: unknown\n  b: unknown\n}', 'unknown without additionalProperties')
  t.equal(toType({ type: 'object', required: ['n'], additionalProperties: { type: 'integer' } }), '{\n  n: number\n  [key: string]: number\n}', 'no property declared')
  t.equal(toType({ type: 'object', required: ['n'] }), '{\n  n: unknown\n  [key: string]: unknown\n}')
  t.equal(toType({ type: 'object', required: ['n'], additionalProperties: false }), '{\n  n: never\n  [key: string]: never\n}', 'no value has it, nor lacks it')
  t.equal(toType({ type: 'object', required: ['x-id', 'y'], patternProperties: { '^x-': { type: 'string' }, id$: { type: 'string', minLength: 1 } }, additionalProperties: { type: 'boolean' } }),
    "{\n  'x-id': (string) & (string)\n  y: boolean\n  [key: string]: unknown\n}", 'the patternProperties a key matches, all of them')
  t.equal(toType({ type: 'thing' }), 'unknown')
  t.equal(toType({}), 'unknown')
  t.equal(toType(true), 'unknown')
  t.equal(toType(false), 'never')
  t.equal(toType({ enum: [] }), 'never')
  // Ajv's nullable (the gateway answers null there); before, `string` alone.
  t.equal(toType({ type: 'string', nullable: true }), 'string | null', 'nullable: true')
  t.equal(toType({ type: ['string', 'null'], nullable: true }), 'string | null')
  t.equal(toType({ type: 'string', nullable: false }), 'string')
  // A named schema the file could not declare as is gets the first free number.
  const names = typeNames(['Record', 'Record2', 'Root', 'Agent', 'string', 'class', 'as', 'keyof', 'readonly', 'unique', 'infer', 'intrinsic', 'type'])
  t.same([...names], [['Record', 'Record3'], ['Record2', 'Record2'], ['Root', 'Root2'], ['Agent', 'Agent'], ['string', 'string2'], ['class', 'class2'],
    ['as', 'as2'], ['keyof', 'keyof2'], ['readonly', 'readonly2'], ['unique', 'unique2'], ['infer', 'infer2'], ['intrinsic', 'intrinsic2'], ['type', 'type']])
  t.equal(toType({ type: 'array', items: { $ref: '#/schemas/Record' } }, '', names), 'Array<Record3>', 'a reference takes the new name')
})

t.test('the generated AppRouter types a real @trpc/client; a wrong input is a compile error', async t => {
  const dir = scratch(t)
  const out = await codegen(['--out', join(dir, 'trpc-router.d.ts')], { BFF_MANIFEST: fileURLToPath(new URL('../../kernel/manifest.yaml', import.meta.url)) })
  t.equal(out, join(dir, 'trpc-router.d.ts'))
  const text = readFileSync(out, 'utf8')
  t.match(text, /export interface Agent \{/)
  t.match(text, /export type AppRouter = TRPCBuiltRouter</)
  t.match(text, /runUpdated: TRPCSubscriptionProcedure<\{\n {4}input: void\n {4}output: AsyncIterable<Run, void, any>/)
  t.notMatch(text, /from '\.\.\//, 'nothing of the gateway\'s source is imported')
  const [lint] = await new ESLint({ cwd: root }).lintText(text, { filePath: join(root, 'generated', 'trpc-router.d.ts') })
  t.same(lint.messages.map(m => `${m.line}: ${m.message}`), [], 'the generated file follows the house style')

  writeFileSync(join(dir, 'good.ts'), `
import { createTRPCClient, httpBatchLink, httpSubscriptionLink, splitLink, TRPCClientError } from '@trpc/client'
import type { AppRouter, Agent, Run, MantleErrorCode } from './trpc-router.js'
const client = createTRPCClient<AppRouter>({
  links: [splitLink({ condition: op => op.type === 'subscription', true: httpSubscriptionLink({ url: 'http://h/trpc' }), false: httpBatchLink({ url: 'http://h/trpc' }) })]
})
export async function use (): Promise<void> {
  const agent: Agent = await client.getAgent.query({ id: 'a1' })
  const all: Agent[] = await client.listAgents.query()
  const some: Agent[] = await client.listAgents.query({ limit: 5, model: 'm' })
  const run: Run = await client.runAgent.mutate({ id: 'a1', prompt: 'p', temperature: 1 })
  const status: 'queued' | 'running' | 'succeeded' | 'failed' = run.status
  const description: string | null = agent.description
  const headers = await client.kernelHeaders.query()
  const rid: string | null = headers['x-request-id']
  client.runUpdated.subscribe(undefined, { onData: (r) => { const id: string = r.id; console.log(id) } })
  try { await client.deleteAgent.mutate({ id: 'a1' }) } catch (err) {
    if (err instanceof TRPCClientError) {
      const code: MantleErrorCode | undefined = (err as TRPCClientError<AppRouter>).data?.code
      console.log(code)
    }
  }
  console.log(all, some, status, description, rid)
}
`)

  writeFileSync(join(dir, 'bad.ts'), `
import { createTRPCClient, httpBatchLink } from '@trpc/client'
import type { AppRouter } from './trpc-router.js'
const client = createTRPCClient<AppRouter>({ links: [httpBatchLink({ url: 'http://h/trpc' })] })
export async function misuse (): Promise<void> {
  await client.getAgent.query({ id: 42 })
  await client.runAgent.mutate({ id: 'a1' })
  await client.listAgents.query({ limit: 'ten' })
  await client.createAgent.mutate({ name: 'x', admin: true })
  await client.getAgent.query()
  await client.noSuchOp.query()
  await client.getAgent.mutate({ id: 'a1' })
  const n: number = (await client.getAgent.query({ id: 'a' })).name
  const s: 'done' = (await client.getRun.query({ id: 'r' })).status
  console.log(n, s)
}
`)
  // One program for both files: the router's and @trpc/client's types are checked once (each
  // program cost about 4 s of CPU under coverage). A diagnostic of good.ts, or of no file, fails.
  const diagnostics = typecheck(dir, ['good.ts', 'bad.ts'])
  t.same(diagnostics.filter(e => !e.startsWith('bad.ts:')), [], 'correct calls type-check')
  const errors = diagnostics.filter(e => e.startsWith('bad.ts:'))
  const lines = errors.map(e => Number(/^bad\.ts:(\d+) /.exec(e)?.[1]))
  t.same([...new Set(lines)].sort((a, b) => a - b), [6, 7, 8, 9, 10, 11, 12, 13, 14], 'every misuse is a compile error')
  t.match(errors.find(e => e.startsWith('bad.ts:6 ')), /number.*not assignable to.*string/)
  t.match(errors.find(e => e.startsWith('bad.ts:7 ')), /prompt/)
})

// README's tRPC example, as written, in a client project that is an ES module (NodeNext): its
// `./generated/trpc-router` import, without the extension, failed with TS2834 there.
t.test('README\'s tRPC client example type-checks against the generated file', async t => {
  const dir = scratch(t)
  await codegen(['--out', join(dir, 'generated', 'trpc-router.d.ts')], { BFF_MANIFEST: fileURLToPath(new URL('../../kernel/manifest.yaml', import.meta.url)) })
  const readme = readFileSync(join(root, 'README.md'), 'utf8')
  const example = [...readme.matchAll(/```ts\n([\s\S]*?)```/g)].map(m => m[1]).find(code => code.includes('createTRPCClient<AppRouter>'))
  t.ok(example, 'README has the example')
  writeFileSync(join(dir, 'client.ts'), 'declare const TOKEN: string\n' + (example ?? '') + 'export { agent }\n')
  t.same(typecheck(dir, ['client.ts']), [])
})

t.test('another domain generates and type-checks too', async t => {
  const dir = scratch(t)
  // The library's manifest, with schemas named as the file's own names and TypeScript's
  // (`Record`, `Root`, `string`), and a nullable field. Before, `export interface Record` made
  // `Type 'Record' is not generic` and `note` was `note?: string` though the gateway answers null.
  const manifest = parseYaml(readFileSync(fixture('library-manifest.yaml'), 'utf8')) as { schemas: Record<string, unknown>, operations: Record<string, unknown> }
  manifest.schemas.Record = { type: 'object', required: ['id'], properties: { id: { type: 'string' }, note: { type: 'string', nullable: true }, root: { $ref: '#/schemas/Root' } } }
  manifest.schemas.Root = { type: 'object', properties: { kind: { $ref: '#/schemas/string' } } }
  manifest.schemas.string = { type: 'string', enum: ['a', 'b'] }
  manifest.operations.getRecord = { type: 'query', rest: 'GET /records/:id', kernel: 'GET /records/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { $ref: '#/schemas/Record' } }
  // Required keys `properties` does not declare: `tag` the additionalProperties' string, `n` an
  // object's only key. Before, both were left out of the input's type (a call without them
  // type-checked), and `tag: 5` type-checked too.
  manifest.operations.tagBook = { type: 'mutation', rest: 'POST /tags', kernel: 'POST /tags', input: { type: 'object', required: ['isbn', 'tag'], properties: { isbn: { type: 'string' } }, additionalProperties: { type: 'string' } }, output: { type: 'object' } }
  manifest.operations.count = { type: 'query', rest: 'GET /count', kernel: 'GET /count', input: { type: 'object', required: ['n'], additionalProperties: { type: 'integer' } }, output: { type: 'object' } }
  writeFileSync(join(dir, 'library.yaml'), stringifyYaml(manifest))
  await codegen(['--manifest', join(dir, 'library.yaml'), '--out', join(dir, 'library.d.ts')], {})
  const text = readFileSync(join(dir, 'library.d.ts'), 'utf8')
  t.match(text, /export interface Book \{/)
  t.match(text, /format\?: 'hardcover' \| 'paperback' \| 'ebook'/)
  t.match(text, /export interface Record2 \{\n {2}id: string\n {2}note\?: string \| null\n {2}root\?: Root2\n\}/)
  t.match(text, /export type string2 = 'a' \| 'b'/)
  // The same text as a source file: a declaration file's own errors are skipped (skipLibCheck).
  writeFileSync(join(dir, 'library-source.ts'), text)
  writeFileSync(join(dir, 'use.ts'), `
import { createTRPCClient, httpLink } from '@trpc/client'
import type { AppRouter, Book, Record2 } from './library.js'
const client = createTRPCClient<AppRouter>({ links: [httpLink({ url: 'http://h/trpc' })] })
export const books: Promise<Book[]> = client.findBooks.query({ format: ['ebook'], page: 2 })
export const wrong = client.findBooks.query({ format: ['vinyl'] })
export async function read (): Promise<Record<string, string | null | undefined>> {
  const r: Record2 = await client.getRecord.query({ id: 'r' })
  return { note: r.note, kind: r.root?.kind }
}
export const tagged = client.tagBook.mutate({ isbn: 'i', tag: 't', more: 'm' })
export const counted = client.count.query({ n: 1 })
export const untagged = client.tagBook.mutate({ isbn: 'i' })
export const badTag = client.tagBook.mutate({ isbn: 'i', tag: 5 })
export const uncounted = client.count.query({})
`)
  const errors = typecheck(dir, ['use.ts', 'library-source.ts'])
  t.same(errors.map(e => /^use\.ts:(\d+) /.exec(e)?.[1]), ['6', '13', '14', '15'], errors.join('\n'))
  t.match(errors[0], /^use\.ts:6 .*vinyl/)
  t.match(errors[1], /^use\.ts:13 .*Property 'tag' is missing/)
  t.match(errors[2], /^use\.ts:14 .*'number' is not assignable to type 'string'/)
  t.match(errors[3], /^use\.ts:15 .*Property 'n' is missing/)
})

t.test('named schemas keep their names when they refer to each other', async t => {
  const manifest = await demoManifest()
  const text = generateRouterTypes(manifest, { Pair: { type: 'object', required: ['left'], properties: { left: { $ref: '#/schemas/Agent' } } }, Id: { type: 'string' } })
  t.match(text, /export interface Pair \{\n {2}left: Agent\n\}/)
  t.match(text, /export type Id = string/)
  t.match(generateRouterTypes(manifest), /export interface Run \{/, 'the compiled schemas by default')
})

t.test('npm run codegen: the CLI writes the file, and a bad manifest fails with its message', async t => {
  const dir = scratch(t)
  const run = promisify(execFile)
  // Not followed by tap's coverage: a file run by tsx does not merge with the in-process one.
  const env = { ...process.env, _TAPJS_PROCESSINFO_COVERAGE_: '0' }
  const { stdout } = await run(process.execPath, ['--import', 'tsx', 'scripts/codegen.ts', '--out', join(dir, 'out.d.ts')], { cwd: root, env: { ...env, BFF_MANIFEST: '' } })
  t.match(stdout, /mantle: wrote .*out\.d\.ts/)
  t.match(readFileSync(join(dir, 'out.d.ts'), 'utf8'), /getAgent: TRPCQueryProcedure/)
  writeFileSync(join(dir, 'bad.yaml'), 'version: 2\n')
  const failed = await run(process.execPath, ['--import', 'tsx', 'scripts/codegen.ts', '--manifest', join(dir, 'bad.yaml'), '--out', join(dir, 'x.d.ts')], { cwd: root, env }).catch((err: { code: number, stderr: string }) => err)
  t.equal((failed as { code: number }).code, 1)
  t.match((failed as { stderr: string }).stderr, /mantle: Invalid manifest .*bad\.yaml/)
  await t.rejects(codegen(['--bogus'], {}), /Unknown option/)
})

t.test('an input is `| void` exactly when the gateway takes none: its schema, references resolved, admits {}', async t => {
  // The gateway takes no input (or null) as {}, which the op's input schema then validates.
  // Before, only `required` of the schema as written (or of the one schema it named) was read:
  // an input naming a schema that names another, or with minProperties, was typed `| void`, and
  // `client.op.query()` type-checked, to be refused VALIDATION_FAILED.
  const schemas = {
    Ids: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } },
    IdsAlias: { $ref: '#/schemas/Ids' },
    Paging: { type: 'object', properties: { limit: { type: 'integer' } } }
  }
  const op = (path: string, input: unknown): Record<string, unknown> => ({ type: 'query', rest: `GET /${path}`, kernel: `GET /v1/${path}`, input, output: { type: 'object' } })
  const manifest = testManifest({
    viaAlias: op('a', { $ref: '#/schemas/IdsAlias' }),
    someField: op('b', { type: 'object', minProperties: 1, properties: { a: { type: 'string' }, b: { type: 'string' } } }),
    paging: op('c', { $ref: '#/schemas/Paging' }),
    defaulted: op('d', { type: 'object', required: ['limit'], properties: { limit: { type: 'integer', default: 10 } } }),
    none: op('e', undefined)
  }, {}, { schemas })
  const text = generateRouterTypes(manifest, schemas)
  const inputOf = (name: string): string | undefined => new RegExp(`  ${name}: TRPCQueryProcedure<\\{\\n {4}input: ([^\\n]*)`).exec(text)?.[1]
  t.equal(inputOf('viaAlias'), 'IdsAlias', 'a required field, through two references')
  t.equal(inputOf('someField'), '{', 'minProperties: 1')
  t.notMatch(text, /someField: TRPCQueryProcedure<\{\n {4}input: \{[^}]*\} \| void/)
  t.equal(inputOf('paging'), 'Paging | void', 'nothing required')
  t.equal(inputOf('none'), 'Record<string, never> | void', 'no input declared')
  // A required field with a default is filled in (the pipeline's useDefaults): no input is taken.
  t.match(text, /defaulted: TRPCQueryProcedure<\{\n {4}input: \{\n {6}limit: number\n {4}\} \| void\n/)
})
