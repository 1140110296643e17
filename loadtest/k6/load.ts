// k6 load suite: a sustained arrival rate of getAgent over REST, tRPC and GraphQL (a 30 s ramp
// to 100 requests/s per face, held for 4.5 min), an open model per face.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" -e RATE_SCALE=2 loadtest/k6/load.ts
//
// The stages and thresholds are LOAD in ./common.ts (= load in loadtest/scenarios.ts); the
// environment variables are listed in ./http-faces.ts.
import type { Options } from 'k6/options'
import { LOAD } from './common.ts'
import { everyFace, suiteOptions } from './http-faces.ts'
export { graphqlGetAgent, restGetAgent, setup, trpcGetAgent } from './http-faces.ts'

export const options: Options = suiteOptions(LOAD)

export default function (): void { everyFace() }
