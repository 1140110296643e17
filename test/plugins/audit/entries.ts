// Shared by the audit plugin's tests: an entry to write, and the entries a gateway stored once
// its queue has drained.
import { randomUUID } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import type { AuditEntry } from '../../../plugins/audit/entry.js'
import { bearer, drained } from '../../helper.js'

export type Row = Record<string, any>

/** An entry as the gateway builds one for a REST read, with `over` in place. */
export function entry (over: Partial<AuditEntry> = {}): AuditEntry {
  return { id: randomUUID(), requestId: randomUUID(), timestamp: Date.now(), tenantId: 't1', userId: 'u1', method: 'GET', path: '/api/v1/agents/:id', protocol: 'rest', action: 'getAgent', category: 'read', riskLevel: 'none', status: 'ok', statusCode: 200, durationMs: 1.5, metadata: {}, ...over }
}

/** A writer's log that says nothing. */
export const quiet = { warn: () => {}, info: () => {}, error: () => {} }

/** The newest entries (GET /admin/audit, up to 500), `query` appended to its query string. */
export async function entries (app: FastifyInstance, query = ''): Promise<Row[]> {
  await drained(app)
  const res = await app.inject({ method: 'GET', url: '/admin/audit?limit=500' + query, headers: bearer() })
  if (res.statusCode !== 200) throw new Error(res.body)
  return res.json().entries
}
