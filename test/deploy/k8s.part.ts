import t from 'tap'
import { readFileSync, readdirSync } from 'node:fs'
import { parse, parseAllDocuments } from 'yaml'
import { loadConfig, productionProblems, ConfigSchema, EXAMPLE_SECRETS } from '../../schemas/config.js'
import { randomBytes } from 'node:crypto'
import { compileManifest, type Manifest } from '../../manifest.js'
import { shutdownGraceMs } from '../../server.js'
import { buildTestApp } from '../helper.js'

// deploy/k8s must stay true to the gateway: probe paths it serves, the port it listens on (and
// the Dockerfile exposes), the manifest path it reads, and an environment it accepts in production.

const root = new URL('../../', import.meta.url)
const read = (path: string): string => readFileSync(new URL(path, root), 'utf8')
type Doc = Record<string, any>

const files = readdirSync(new URL('deploy/k8s/', root)).filter(f => f.endsWith('.yaml'))
const docs: Array<{ file: string, doc: Doc }> = files.flatMap(file => parseAllDocuments(read(`deploy/k8s/${file}`)).map(d => {
  if (d.errors.length > 0) throw new Error(`${file}: ${d.errors.map(e => e.message).join('; ')}`)
  return { file, doc: d.toJS() as Doc }
}))
const ofKind = (kind: string): Doc => {
  const found = docs.filter(d => d.doc.kind === kind)
  if (found.length !== 1) throw new Error(`expected one ${kind}, found ${found.length}`)
  return found[0].doc
}

/** The manifest the Deployment mounts from the ConfigMap, where BFF_MANIFEST points, compiled. */
function configMapManifest (): Manifest {
  const container = ofKind('Deployment').spec.template.spec.containers[0]
  const env = Object.fromEntries((container.env as Array<{ name: string, value: string }>).map(e => [e.name, e.value]))
  const mount = container.volumeMounts.find((m: Doc) => env.BFF_MANIFEST.startsWith(m.mountPath + '/'))
  const text = ofKind('ConfigMap').data[env.BFF_MANIFEST.slice(mount.mountPath.length + 1)]
  return compileManifest(parseAllDocuments(text)[0].toJS(), 'configmap')
}

/** Variables the contract names (CONTRACT §7) that the concerns still to be merged read. */
const CONTRACT_ONLY = new Set(['DATABASE_URL', 'BFF_RATE_LIMIT_STORE', 'BFF_CACHE_STORE', 'BFF_AUDIT_STORE'])

t.test('every YAML parses, and kustomize applies every resource but the example Secret', async t => {
  t.ok(docs.length >= 7)
  const kustomization = ofKind('Kustomization')
  const listed = new Set(kustomization.resources as string[])
  for (const file of files.filter(f => f !== 'kustomization.yaml' && f !== 'secret.example.yaml')) t.ok(listed.has(file), `${file} is in kustomization.yaml`)
  for (const file of listed) t.ok(files.includes(file), `${file} exists`)
  t.notOk(listed.has('secret.example.yaml'), 'secrets do not live in git')
  for (const kind of ['Deployment', 'Service', 'HorizontalPodAutoscaler', 'PodDisruptionBudget', 'ConfigMap', 'Secret']) t.ok(ofKind(kind), kind)
})

t.test('probes, ports and the manifest path match the gateway', async t => {
  const deployment = ofKind('Deployment')
  const pod = deployment.spec.template.spec
  t.equal(pod.containers.length, 1)
  const container = pod.containers[0]
  const env = Object.fromEntries((container.env as Array<{ name: string, value: string }>).map(e => [e.name, e.value]))
  const http = container.ports.find((p: Doc) => p.name === 'http')
  // The port: what the Deployment tells the gateway, what the container declares, what the image exposes.
  t.equal(String(http.containerPort), env.PORT)
  t.match(read('Dockerfile'), new RegExp(`^EXPOSE ${http.containerPort as number}$`, 'm'))
  t.equal(env.HOST, '0.0.0.0')
  // With the Secret's credentials (envFrom), the configuration is one production accepts.
  const secret = ownValues((parse(read('deploy/k8s/secret.example.yaml')) as { stringData: Record<string, string> }).stringData)
  const config = loadConfig({ ...secret, ...env })
  t.equal(config.PORT, http.containerPort)
  t.same(productionProblems(config), [], 'production accepts it')
  for (const probe of ['livenessProbe', 'startupProbe']) t.same(container[probe].httpGet, { path: '/healthz', port: 'http' }, probe)
  // Readiness is the instance's own: a Redis, PostgreSQL or Kernel outage is every replica's.
  t.same(container.readinessProbe.httpGet, { path: '/readyz?scope=instance', port: 'http' })
  // The gateway serves both (and /healthz asks nothing of the Kernel).
  const app = await buildTestApp(t)
  t.equal((await app.inject({ method: 'GET', url: '/healthz' })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: container.readinessProbe.httpGet.path })).statusCode, 200)
  // The Service sends traffic to the named port, to the pods of the Deployment.
  const service = ofKind('Service')
  t.equal(service.spec.ports[0].targetPort, 'http')
  t.same(service.spec.selector, deployment.spec.selector.matchLabels)
  t.match(deployment.spec.template.metadata.labels, deployment.spec.selector.matchLabels)
  t.equal(deployment.spec.template.metadata.annotations['prometheus.io/port'], env.PORT)
  t.equal(deployment.spec.template.metadata.annotations['prometheus.io/path'], '/metrics')

  // The manifest: a ConfigMap key, mounted read-only where BFF_MANIFEST points, and valid.
  const configMap = ofKind('ConfigMap')
  const mount = container.volumeMounts.find((m: Doc) => env.BFF_MANIFEST.startsWith(m.mountPath + '/'))
  t.ok(mount?.readOnly, 'the manifest is mounted read-only')
  const volume = pod.volumes.find((v: Doc) => v.name === mount.name)
  t.equal(volume.configMap.name, configMap.metadata.name)
  const key = env.BFF_MANIFEST.slice(mount.mountPath.length + 1)
  const text = configMap.data[key]
  t.type(text, 'string', `the ConfigMap has the key ${key}`)
  t.ok(configMapManifest().operations.length > 0, 'the ConfigMap manifest compiles')
})

/**
 * The Secret as one creates it from the example: its placeholder credentials, published in the
 * repository and refused by production (test/security/production.part.ts), replaced with values
 * of one's own, as the example's openssl commands make them.
 */
function ownValues (stringData: Record<string, string>): Record<string, string> {
  const own = { ...stringData }
  for (const [name, placeholders] of Object.entries(EXAMPLE_SECRETS)) {
    if (own[name] !== undefined && placeholders.includes(own[name])) own[name] = randomBytes(48).toString('base64')
  }
  return own
}

t.test('the environment, with the Secret, is one the gateway accepts in production', async t => {
  const container = ofKind('Deployment').spec.template.spec.containers[0]
  const secret = ofKind('Secret')
  t.same(container.envFrom, [{ secretRef: { name: secret.metadata.name } }])
  const env: Record<string, string> = { ...Object.fromEntries((container.env as Array<{ name: string, value: string }>).map(e => [e.name, e.value])), ...ownValues(secret.stringData) }
  for (const key of ['BFF_JWT_SECRET', 'DATABASE_URL', 'REDIS_URL']) t.ok(key in secret.stringData, `the Secret holds ${key}`)
  const known = new Set(Object.keys(ConfigSchema.properties))
  t.same(Object.keys(env).filter(k => !known.has(k) && !CONTRACT_ONLY.has(k) && k !== 'NODE_OPTIONS'), [], 'every variable is one the gateway reads')
  const config = loadConfig(env)
  t.equal(config.NODE_ENV, 'production')
  t.same(productionProblems(config), [])
  // The RSS bound sits under the container's memory limit, the heap's under V8's (NODE_OPTIONS).
  t.equal(container.resources.limits.memory, '512Mi')
  t.ok(config.BFF_MAX_RSS_BYTES > 0 && config.BFF_MAX_RSS_BYTES < 512 * 1024 * 1024)
  t.match(env.NODE_OPTIONS, /--max-old-space-size=(\d+)/)
  t.ok(Number(/--max-old-space-size=(\d+)/.exec(env.NODE_OPTIONS)![1]) * 1024 * 1024 < config.BFF_MAX_RSS_BYTES)
})

t.test('the pod runs as the image user, read-only, with nothing extra', async t => {
  const pod = ofKind('Deployment').spec.template.spec
  const container = pod.containers[0]
  t.equal(pod.securityContext.runAsNonRoot, true)
  t.equal(pod.securityContext.runAsUser, 1000, 'uid of the node user of the official node images')
  t.match(read('Dockerfile'), /^USER node$/m)
  t.match(read('Dockerfile'), /^CMD \["node", "dist\/server.js"\]$/m)
  t.same(container.securityContext, { allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ['ALL'] } })
  t.ok(pod.volumes.some((v: Doc) => v.name === 'tmp' && v.emptyDir !== undefined), 'a writable /tmp')
  t.ok(container.resources.requests.cpu !== undefined && container.resources.limits.memory !== undefined)
  t.equal(pod.automountServiceAccountToken, false)
})

t.test('the autoscaler and the disruption budget act on the Deployment', async t => {
  const deployment = ofKind('Deployment')
  const hpa = ofKind('HorizontalPodAutoscaler')
  t.same(hpa.spec.scaleTargetRef, { apiVersion: 'apps/v1', kind: 'Deployment', name: deployment.metadata.name })
  t.ok(hpa.spec.minReplicas >= 2 && hpa.spec.maxReplicas > hpa.spec.minReplicas)
  // The autoscaler owns the replica count: a Deployment that sets one has every `kubectl apply -k`
  // (a manifest change, README) scale it back there, 20 pods under load cut to 3 at once.
  t.equal(deployment.spec.replicas, undefined, 'no spec.replicas: the HPA sets it')
  const pdb = ofKind('PodDisruptionBudget')
  t.same(pdb.spec.selector.matchLabels, deployment.spec.selector.matchLabels)
  t.ok(pdb.spec.maxUnavailable === 1 || pdb.spec.minAvailable < hpa.spec.minReplicas)
  t.equal(deployment.spec.strategy.rollingUpdate.maxUnavailable, 0, 'a new pod is ready before an old one goes')
  // Shutdown: the preStop pause and the gateway's own drain (server.ts) fit in the grace period.
  const preStop = deployment.spec.template.spec.containers[0].lifecycle.preStop.exec.command as string[]
  const drainMs = shutdownGraceMs(configMapManifest())
  t.ok(drainMs >= 10_000)
  t.ok(Number(preStop[1]) + drainMs / 1000 < deployment.spec.template.spec.terminationGracePeriodSeconds, `${String(preStop[1])} s + ${drainMs} ms`)
})

t.test('migrations run before the gateway, from the image; the audit spool and the namespace are the manifests\' own', async t => {
  const pod = ofKind('Deployment').spec.template.spec
  const container = pod.containers[0]
  // The initContainer runs the compiled migration script (the image holds dist/, not scripts/*.ts).
  const migrate = (pod.initContainers as Doc[]).find(c => c.name === 'migrate')!
  t.equal(migrate.image, container.image, 'the gateway\'s image')
  t.same(migrate.command, ['node', 'dist/scripts/migrate.js', 'up'])
  t.same(migrate.envFrom, container.envFrom, 'DATABASE_URL from the same Secret')
  t.match(read('tsconfig.build.json'), /"scripts\/\*\*\/\*\.ts"/, 'the build compiles scripts/ into dist/scripts/')
  t.match(read('scripts/copy-assets.mjs'), /cp\(new URL\('migrations\/', root\), new URL\('migrations\/', out\)/, 'the build copies migrations/ into dist/')
  t.match(read('Dockerfile'), /^COPY --from=build \/app\/dist \.\/dist$/m)
  t.same(migrate.securityContext, container.securityContext)
  // The spool: BFF_AUDIT_SPOOL_DIR is a volume of its own, not /tmp.
  const env = Object.fromEntries((container.env as Array<{ name: string, value: string }>).map(e => [e.name, e.value]))
  const mount = (container.volumeMounts as Doc[]).find(m => m.mountPath === env.BFF_AUDIT_SPOOL_DIR)
  t.ok(mount !== undefined && mount.readOnly !== true, 'the spool directory is a writable mount')
  t.not(mount!.mountPath, '/tmp')
  t.ok((pod.volumes as Doc[]).find(v => v.name === mount!.name)?.emptyDir !== undefined, 'an emptyDir (README: not kept across pod replacement)')
  // The namespace the kustomization puts everything in is one it creates.
  t.equal(ofKind('Namespace').metadata.name, ofKind('Kustomization').namespace)
})

t.test('the image builds and runs on one Node release, a supported one, and the README names it', async t => {
  const dockerfile = read('Dockerfile')
  const bases = [...dockerfile.matchAll(/^FROM (\S+) AS (\w+)$/gm)].map(m => m[1])
  t.same(bases.length, 2, 'a build stage and a runtime stage')
  t.equal(new Set(bases).size, 1, 'both stages on the same base: the build and its dependencies made for the Node that runs them')
  const major = Number(/^node:(\d+)-/.exec(bases[0])?.[1])
  // Node 20 reached its end of life on 2026-04-30 (no security fixes after it): the image may not run it.
  t.ok(major >= 22 && major % 2 === 0, `an LTS line after Node 20: ${bases[0]}`)
  t.match(read('README.md'), `\`${bases[0]}\``, 'the README names the base image')
})
