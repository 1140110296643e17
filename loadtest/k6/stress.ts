// k6 stress suite: the arrival rate of getAgent over REST, tRPC and GraphQL climbs in 60 s steps
// (300, 1,000, 2,000, 3,000 requests/s per face) to find the breaking point. The thresholds
// abort the run at the first crossing (after 10 s): the level reached then is the breaking point.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" loadtest/k6/stress.ts
//
// The stages and thresholds are STRESS in ./common.ts (= stress in loadtest/scenarios.ts); the
// environment variables are listed in ./http-faces.ts.
import type { Options } from 'k6/options'
import { STRESS } from './common.ts'
import { everyFace, suiteOptions } from './http-faces.ts'
export { graphqlGetAgent, restGetAgent, setup, trpcGetAgent } from './http-faces.ts'

export const options: Options = suiteOptions(STRESS)

export default function (): void { everyFace() }
