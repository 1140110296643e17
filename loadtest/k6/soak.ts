// k6 soak suite: getAgent over REST, tRPC and GraphQL at 50 requests/s per face for an hour
// (leaks, growing queues and slow drift show up here). The thresholds abort the run at the first
// crossing after 2 minutes: an hour is not worth finishing once it has failed.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token -- --ttl 7200)" loadtest/k6/soak.ts
//
// The stages and thresholds are SOAK in ./common.ts (= soak in loadtest/scenarios.ts); the
// environment variables are listed in ./http-faces.ts.
import type { Options } from 'k6/options'
import { SOAK } from './common.ts'
import { everyFace, suiteOptions } from './http-faces.ts'
export { graphqlGetAgent, restGetAgent, setup, trpcGetAgent } from './http-faces.ts'

export const options: Options = suiteOptions(SOAK)

export default function (): void { everyFace() }
