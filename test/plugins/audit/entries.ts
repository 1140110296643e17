// Shared by the audit plugin's tests: the entries a gateway stored, once its queue has drained.
import type { FastifyInstance } from 'fastify'
import { bearer, until } from '../../helper.js'

export type Row = Record<string, any>

/** The newest entries (GET /admin/audit, up to 500), `query` appended to its query string. */
export async function entries (app: FastifyInstance, query = ''): Promise<Row[]> {
  await until(() => app.audit.health().queueDepth === 0, 'the audit queue to drain')
  // A batch taken off the queue is being written: give it a moment to land.
  await new Promise(resolve => setTimeout(resolve, 50))
  const res = await app.inject({ method: 'GET', url: '/admin/audit?limit=500' + query, headers: bearer() })
  if (res.statusCode !== 200) throw new Error(res.body)
  return res.json().entries
}
