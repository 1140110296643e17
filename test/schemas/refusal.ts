// Shared by the configuration tests.
import { loadConfig, ConfigError } from '../../schemas/config.js'

/** The message of the ConfigError a bad environment throws, or null when it loads. */
export function refusal (env: Record<string, string | number>): string | null {
  try {
    loadConfig(env)
  } catch (err) {
    if (err instanceof ConfigError) return err.message
    throw err
  }
  return null
}
