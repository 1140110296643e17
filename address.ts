// Addresses as proxies write them in X-Forwarded-For: some balancers add the client's port
// (Azure's Application Gateway writes `IP:port`, `[IPv6]:port`).
import { isIP } from 'node:net'
import proxyAddr from '@fastify/proxy-addr'
import { normalizeIP } from '@fastify/rate-limit'
import type { FastifyRequest } from 'fastify'

/** An address with a port (`203.0.113.7:5123`, `[2001:db8::1]:5123`), or an IPv6 one in brackets. */
const WITH_PORT = /^(?:(\d{1,3}(?:\.\d{1,3}){3}):\d+|\[([0-9A-Fa-f:.]+)\](?::\d+)?)$/

/** `text` as a bare IP address (its port dropped), or null when it is no address. */
export function bareAddress (text: string): string | null {
  if (isIP(text) !== 0) return text
  const m = WITH_PORT.exec(text)
  const bare = m === null ? null : (m[1] ?? m[2])
  return bare !== null && bare !== undefined && isIP(bare) !== 0 ? bare : null
}

/**
 * The client of `request` as the gateway counts it per address (the rate-limit guard's key, the
 * upgrades still unidentified): its address (X-Forwarded-For's through BFF_TRUST_PROXY) without
 * a port, an IPv6 one by its /64 (one host may hold a whole prefix). A client that reset its
 * connection before its request's hooks ran has none (request.ip is undefined then): `unknown`.
 * A trusted proxy's X-Forwarded-For entry with a port (Azure's Application Gateway writes
 * `IP:port`) made a key per client connection; an entry that is still no address is keyed as
 * the proxy that sent it.
 */
export function clientAddress (request: FastifyRequest): string {
  const ip = request.ip as string | undefined
  if (ip === undefined) return 'unknown'
  return normalizeIP(bareAddress(ip) ?? request.socket?.remoteAddress ?? 'unknown')
}

/**
 * Fastify's trustProxy for BFF_TRUST_PROXY's entries (addresses and ranges), reading an
 * X-Forwarded-For hop with a port by its address: proxy-addr trusts none with a port, so a
 * trusted proxy behind the balancer that wrote one was taken for the client, and every client
 * behind it shared its rate-limit key.
 */
export function trustedProxies (list: readonly string[]): (address: string, hop: number) => boolean {
  const trusted = proxyAddr.compile([...list])
  return (address, hop) => {
    const bare = bareAddress(address)
    return bare !== null && trusted(bare, hop)
  }
}
