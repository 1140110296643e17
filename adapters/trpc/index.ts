import type { FastifyInstance } from 'fastify'
import type { FaceOptions } from '../face.js'

// Being written (issue 3): the trpc face.
export default async function trpcAdapter (_app: FastifyInstance, _opts: FaceOptions): Promise<void> {}
