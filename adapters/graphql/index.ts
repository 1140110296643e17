import type { FastifyInstance } from 'fastify'
import type { FaceOptions } from '../face.js'

// Being written (issue 3): the graphql face.
export default async function graphqlAdapter (_app: FastifyInstance, _opts: FaceOptions): Promise<void> {}
