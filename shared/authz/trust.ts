// A role's TLS material as one reloadable unit: its own certificate and key, the CA, and the CA's revocation
// list. `./pki.sh revoke` or a renewed certificate takes effect while the role runs (#11).
import { join } from "node:path";
import type { Logger } from "../ops/log.ts";
import { loadIdentity, type Identity } from "../platform/tls.ts";
import { watchFiles, type Watch } from "../platform/watch.ts";
import { parseCrl, type RevocationList } from "./crl.ts";

/** What a reload changed: the role's own certificate, key or CA, and the CA's revocation list. */
export interface TrustChange {
  certificate: boolean;
  revocations: boolean;
}

export class TrustMaterial {
  #identity: Identity;
  #revocations: RevocationList | null;
  readonly #dir: string;
  readonly #listeners: ((identity: Identity, changed: TrustChange) => unknown)[] = [];
  #watch: Watch | null = null;

  private constructor(dir: string, identity: Identity, revocations: RevocationList | null) {
    this.#dir = dir;
    this.#identity = identity;
    this.#revocations = revocations;
  }

  /** Loads `<name>_cert.pem`, its key, the CA and crl.pem; a CRL the CA did not sign stops the role (ConfigError). */
  static open(dir: string, name: string): TrustMaterial {
    const identity = loadIdentity(dir, name);
    return new TrustMaterial(dir, identity, revocationsOf(identity));
  }

  get identity(): Identity {
    return this.#identity;
  }

  /** True when the CA's current CRL lists this serial (hex, any case). */
  isRevoked(serial: string): boolean {
    return this.#revocations?.isRevoked(serial) ?? false;
  }

  /** Called with the new material after every successful reload: listeners swap their TLS contexts. */
  onReload(listener: (identity: Identity, changed: TrustChange) => unknown): this {
    this.#listeners.push(listener);
    return this;
  }

  /** Re-reads everything; anything unreadable or unsigned keeps the material in force, with one clear line. */
  async reload(logger: Logger): Promise<boolean> {
    let identity: Identity;
    let revocations: RevocationList | null;
    try {
      identity = loadIdentity(this.#dir, this.#identity.name);
      revocations = revocationsOf(identity);
    } catch (error) {
      logger.error(`TLS material NOT reloaded, the previous one stays in force: ${(error as Error).message}`);
      return false;
    }
    const before = this.#identity;
    const changed: TrustChange = {
      certificate: identity.cert !== before.cert || identity.key !== before.key || identity.ca !== before.ca,
      revocations: identity.crl !== before.crl,
    };
    this.#identity = identity;
    this.#revocations = revocations;
    for (const listener of this.#listeners) await listener(identity, changed);
    logger.info(`TLS material reloaded: ${revocations?.revoked.size ?? 0} revoked certificate(s) on the CRL`);
    return true;
  }

  /** Reloads on SIGHUP and whenever the certificate, key, CA or CRL file changes. */
  watch(logger: Logger): this {
    const name = this.#identity.name;
    this.#watch ??= watchFiles(
      [`${name}_cert.pem`, `${name}_key.pem`, "ca_cert.pem", "crl.pem"].map((file) => join(this.#dir, file)),
      () => this.reload(logger),
    );
    return this;
  }

  stop(): void {
    this.#watch?.stop();
  }
}

function revocationsOf(identity: Identity): RevocationList | null {
  return identity.crl ? parseCrl(identity.crl, identity.ca) : null;
}
