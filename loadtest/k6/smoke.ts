// k6 smoke suite: a trickle (2 requests/s per face for 30 s) of getAgent over REST, tRPC and
// GraphQL. Proves the gateway answers correctly and fast before heavier suites are worth running.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" loadtest/k6/smoke.ts
//
// The stages and thresholds are SMOKE in ./common.ts (= smoke in loadtest/scenarios.ts); the
// environment variables are listed in ./http-faces.ts.
import type { Options } from 'k6/options'
import { SMOKE } from './common.ts'
import { everyFace, suiteOptions } from './http-faces.ts'
export { graphqlGetAgent, restGetAgent, setup, trpcGetAgent } from './http-faces.ts'

export const options: Options = suiteOptions(SMOKE)

export default function (): void { everyFace() }
