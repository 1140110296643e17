// k6 spike suite: getAgent over REST, tRPC and GraphQL at 50 requests/s per face, a jump to
// 1,000 in 5 s held for 30 s, then back to 50 for a minute: the gateway may shed part of the
// spike (503 OVERLOADED, within the 1 % error budget) and must recover.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" loadtest/k6/spike.ts
//
// The stages and thresholds are SPIKE in ./common.ts (= spike in loadtest/scenarios.ts); the
// environment variables are listed in ./http-faces.ts.
import type { Options } from 'k6/options'
import { SPIKE } from './common.ts'
import { everyFace, suiteOptions } from './http-faces.ts'
export { graphqlGetAgent, restGetAgent, setup, trpcGetAgent } from './http-faces.ts'

export const options: Options = suiteOptions(SPIKE)

export default function (): void { everyFace() }
