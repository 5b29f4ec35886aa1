// Fernet keys that follow their file: a running server or client takes up `fernet-keys.ts add|promote|retire` within
// RELOAD_INTERVAL_MS and on SIGHUP, as certificates and the CRL do (authz/trust.ts). $FERNET_KEY cannot change
// under a running process, so keys from it do not reload: a restart changes them.
import { join } from "node:path";
import type { Logger } from "../ops/log.ts";
import { displayPath, FERNET_KEY_FILE, loadFernetKeys } from "../platform/config.ts";
import { describeFernetKeys, fernetKeyFingerprint } from "../platform/fernet-key-file.ts";
import { watchFiles, type Watch } from "../platform/watch.ts";
import { Fernet } from "./fernet.ts";

/** What changed between two key sets, by fingerprint: "(added 8b7e4410)", "(primary was 3f9a1c2d)", "(unchanged)". */
function describeChange(before: readonly string[], after: readonly string[]): string {
  const [was, now] = [before.map(fernetKeyFingerprint), after.map(fernetKeyFingerprint)];
  const parts = [
    was[0] !== now[0] && `primary was ${was[0]}`,
    now.some((f) => !was.includes(f)) && `added ${now.filter((f) => !was.includes(f)).join(" ")}`,
    was.some((f) => !now.includes(f)) && `dropped ${was.filter((f) => !now.includes(f)).join(" ")}`,
  ].filter(Boolean);
  return `(${parts.length ? parts.join("; ") : "unchanged"})`;
}

/**
 * A role's Fernet keys: `fernet` encrypts and decrypts with the set in force, and watch() swaps the set when the key
 * file changes. A file that cannot be used (missing, open to others, not parsing, nothing to encrypt with) keeps
 * the set in force, with one error line each time; no line ever holds a key, only fingerprints.
 * @example const keys = FernetKeys.open(config.pki).watch(logger); createServerApp({ fernet: keys.fernet, … })
 */
export class FernetKeys {
  readonly fernet: Fernet;
  readonly #pki: string;
  readonly #fromEnv: boolean;
  #keys: string[];
  #watch: Watch | null = null;

  private constructor(pki: string, keys: string[], fromEnv: boolean) {
    this.#pki = pki;
    this.#keys = keys;
    this.#fromEnv = fromEnv;
    this.fernet = new Fernet(keys);
  }

  /** Loads $FERNET_KEY, else the PKI's encryption_key.txt; throws ConfigError (one line naming the file and the fix). */
  static open(pki: string): FernetKeys {
    return new FernetKeys(pki, loadFernetKeys(pki), process.env.FERNET_KEY !== undefined);
  }

  /** "2 keys, primary 3f9a1c2d, decrypt-only 8b7e4410, from certs/encryption_key.txt (reloads on change)" */
  describe(): string {
    const from = this.#fromEnv
      ? "from $FERNET_KEY (does not reload: restart to change keys, or use encryption_key.txt)"
      : `from ${displayPath(this.path)} (reloads on change and on SIGHUP)`;
    return `${describeFernetKeys(this.#keys)}, ${from}`;
  }

  /** The fingerprints in force, the primary first. */
  get fingerprints(): string[] {
    return this.#keys.map(fernetKeyFingerprint);
  }

  get path(): string {
    return join(this.#pki, FERNET_KEY_FILE);
  }

  /** Re-reads the file and puts its keys in force, or keeps the old ones with one error line. Returns which. */
  reload(logger: Logger): boolean {
    let next: string[];
    try {
      next = loadFernetKeys(this.#pki);
    } catch (error) {
      logger.error(`Fernet keys NOT reloaded, the previous ones stay in force (${describeFernetKeys(this.#keys)}): ${(error as Error).message}`);
      return false;
    }
    const change = describeChange(this.#keys, next);
    this.fernet.setKeys(next);
    this.#keys = next;
    logger.info(`Fernet keys reloaded: ${describeFernetKeys(next)} ${change}`);
    return true;
  }

  /** Reloads whenever the key file changes and on SIGHUP; with $FERNET_KEY, does nothing (describe() says so). */
  watch(logger: Logger): this {
    if (!this.#fromEnv) this.#watch ??= watchFiles([this.path], () => this.reload(logger));
    return this;
  }

  stop(): void {
    this.#watch?.stop();
    this.#watch = null;
  }
}
