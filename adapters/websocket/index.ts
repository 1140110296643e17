import type { FastifyInstance } from 'fastify'
import type { FaceOptions } from '../face.js'

// Being written (issue 3): the websocket face.
export default async function websocketAdapter (_app: FastifyInstance, _opts: FaceOptions): Promise<void> {}
