// Debian's nginx as a plain reverse proxy to the Kernel: the yardstick SREs know. It serves
// /api/v1/... by forwarding to the Kernel's /v1/... over a keep-alive upstream, nothing else.
// Run by the harness as a target process (it writes a config, runs nginx in the foreground and
// stops it on SIGTERM); the harness includes it only when nginx is installed.
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export const NGINX_BINARY = '/usr/sbin/nginx'
export const nginxPresent = (): boolean => existsSync(NGINX_BINARY)

/** The nginx configuration of the yardstick: one worker (the gateway is one process too). */
export function nginxConfig (dir: string, host: string, port: number, kernel: URL): string {
  return `worker_processes 1;
error_log ${dir}/error.log warn;
pid ${dir}/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  upstream kernel { server ${kernel.hostname}:${kernel.port}; keepalive 128; }
  server {
    listen ${host}:${port};
    location /api/ {
      proxy_pass http://kernel/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
`
}

if (process.argv[1]?.endsWith('nginx-proxy.ts') === true) {
  const kernelUrl = process.env.KERNEL_URL
  if (kernelUrl === undefined || !nginxPresent()) {
    console.error('nginx-proxy: needs KERNEL_URL and ' + NGINX_BINARY)
    process.exit(1)
  }
  const dir = mkdtempSync(join(tmpdir(), 'mantle-nginx-'))
  const conf = join(dir, 'nginx.conf')
  writeFileSync(conf, nginxConfig(dir, process.env.HOST ?? '127.0.0.1', Number(process.env.PORT ?? 8080), new URL(kernelUrl)))
  const child = spawn(NGINX_BINARY, ['-p', dir, '-c', conf, '-g', 'daemon off;'], { stdio: 'inherit' })
  const stop = (): void => { child.kill('SIGTERM') }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
  child.on('exit', code => {
    rmSync(dir, { recursive: true, force: true })
    process.exit(code ?? 0)
  })
}
