import t from 'tap'
import { nginxConfig } from '../../loadtest/nginx-proxy.js'
import { REST_TARGETS } from '../../loadtest/harness.js'
import { existsSync } from 'node:fs'

t.test('the nginx yardstick forwards /api/ to the Kernel root over a keep-alive upstream', async t => {
  const conf = nginxConfig('/tmp/x', '127.0.0.1', 8081, new URL('http://127.0.0.1:4001'))
  t.match(conf, 'listen 127.0.0.1:8081;')
  t.match(conf, 'upstream kernel { server 127.0.0.1:4001; keepalive 128; }')
  t.match(conf, /location \/api\/ \{\s+proxy_pass http:\/\/kernel\/;/)
  t.match(conf, 'proxy_set_header Connection "";')
  t.match(conf, 'access_log off;')
  t.equal(REST_TARGETS.some(d => d.name === 'nginx'), existsSync('/usr/sbin/nginx'), 'a target only when nginx is installed')
})
