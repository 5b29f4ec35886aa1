// A role's TLS material as one reloadable unit: its own certificate and key, the CA, and the CA's revocation
// list. `./pki.sh revoke` or a renewed certificate takes effect while the role runs (#11); a CRL that is missing,
// older, expired or not our CA's never turns revocation off (#18 M2): the last good one stays in force.
import { join } from "node:path";
import type { Logger } from "../ops/log.ts";
import { loadKeyMaterial, type Identity } from "../platform/tls.ts";
import { RELOAD_INTERVAL_MS, watchFiles, type Watch } from "../platform/watch.ts";
import { CRL_FILE, CRL_FIX, formatCrlNumber, readNextCrl, requireCrlFile, type CrlInForce } from "./crl-file.ts";

/** What a reload changed: the role's own certificate, key or CA, and the CA's revocation list. */
export interface TrustChange {
  certificate: boolean;
  revocations: boolean;
}

export interface TrustOptions {
  /** --no-crl: crl.pem is never read and nothing is revoked; watch() logs a warning that says so. */
  noCrl?: boolean;
  /** The clock (ms since the epoch) that CRL dates are checked against; tests move it. */
  now?: () => number;
}

/** The CRL in force, read-only, for metrics and status pages. */
export interface CrlStatus {
  /** False with --no-crl: no CRL is read, nothing is revoked, and every other field is empty. */
  readonly enabled: boolean;
  readonly number: bigint | null;
  readonly thisUpdate: Date | null;
  readonly nextUpdate: Date | null;
  /** How many serials it lists. */
  readonly revoked: number;
  /** Past its nextUpdate: its serials are still refused, but a certificate revoked since is not known. */
  readonly stale: boolean;
  /** Why the last reload did not put crl.pem in force; null once one did (or it was the one in force, back). */
  readonly lastError: string | null;
}

export class TrustMaterial {
  #identity: Identity;
  #crl: CrlInForce | null;
  #lastError: string | null = null;
  /** Whether the stale CRL in force has been reported (once, until a fresh one comes). */
  #staleReported = false;
  readonly #dir: string;
  readonly #noCrl: boolean;
  readonly #now: () => number;
  readonly #listeners: ((identity: Identity, changed: TrustChange) => unknown)[] = [];
  #watch: Watch | null = null;
  #freshness: ReturnType<typeof setInterval> | null = null;

  private constructor(dir: string, identity: Identity, crl: CrlInForce | null, options: TrustOptions) {
    this.#dir = dir;
    this.#crl = crl;
    this.#identity = { ...identity, crl: crl?.pem };
    this.#noCrl = options.noCrl ?? false;
    this.#now = options.now ?? Date.now;
  }

  /**
   * Loads `<name>_cert.pem`, its key, the CA and crl.pem. A CRL that is missing, not signed by the CA, without a
   * number or nextUpdate, expired, or not yet valid stops the role (ConfigError naming the file and the fix);
   * with `noCrl`, crl.pem is not read at all.
   * @example const trust = TrustMaterial.open(config.pki, "keyserver", { noCrl: config.noCrl });
   */
  static open(dir: string, name: string, options: TrustOptions = {}): TrustMaterial {
    const keys = loadKeyMaterial(dir, name);
    const crl = options.noCrl ? null : requireCrlFile(dir, keys.ca, (options.now ?? Date.now)());
    return new TrustMaterial(dir, keys, crl, options);
  }

  get identity(): Identity {
    return this.#identity;
  }

  /** True when the CRL in force lists this serial (hex, any case). Asked on every request: a set lookup. */
  isRevoked(serial: string): boolean {
    return this.#crl?.list.isRevoked(serial) ?? false;
  }

  crlStatus(): CrlStatus {
    const list = this.#crl?.list;
    return {
      enabled: !this.#noCrl,
      number: list?.number ?? null,
      thisUpdate: list?.thisUpdate ?? null,
      nextUpdate: list?.nextUpdate ?? null,
      revoked: list?.revoked.size ?? 0,
      stale: this.#isStale(),
      lastError: this.#lastError,
    };
  }

  /** Called with the new material after every successful reload: listeners swap their TLS contexts. */
  onReload(listener: (identity: Identity, changed: TrustChange) => unknown): this {
    this.#listeners.push(listener);
    return this;
  }

  /**
   * Re-reads everything. Certificate, key or CA that cannot be used keep all the material in force; a CRL that
   * cannot (missing, unreadable, unsigned, malformed, older, number-less, expired) keeps the CRL in force, one
   * error line each time. Returns whether anything was put in force.
   */
  async reload(logger: Logger): Promise<boolean> {
    let keys: Identity;
    try {
      keys = loadKeyMaterial(this.#dir, this.#identity.name);
    } catch (error) {
      logger.error(`TLS material NOT reloaded, the previous one stays in force: ${(error as Error).message}`);
      return false;
    }
    const before = this.#identity;
    const certificate = keys.cert !== before.cert || keys.key !== before.key || keys.ca !== before.ca;
    let crl = this.#crl;
    if (!this.#noCrl) {
      // A new CA numbers its CRLs afresh, and the CRL in force was not signed by it: only its own will do.
      const caChanged = keys.ca !== before.ca;
      const next = readNextCrl(this.#dir, keys.ca, caChanged ? null : this.#crl, this.#now());
      if ("refused" in next) {
        this.#lastError = next.refused;
        if (caChanged) {
          logger.error(`TLS material NOT reloaded, the previous one stays in force: the new CA needs a valid CRL of its own: ${next.refused}`);
          return false;
        }
        logger.error(`CRL NOT reloaded, the previous one stays in force (${this.#describeCrl()}): ${next.refused}`);
        if (!certificate) return false;
      } else {
        this.#lastError = null;
        crl = next.crl;
      }
    }
    const changed: TrustChange = { certificate, revocations: crl !== this.#crl };
    const identity: Identity = { ...keys, crl: crl?.pem };
    const wasStale = this.#staleReported;
    this.#identity = identity;
    this.#crl = crl;
    if (changed.revocations) this.#staleReported = false;
    for (const listener of this.#listeners) await listener(identity, changed);
    logger.info(`TLS material reloaded: ${crl?.list.revoked.size ?? 0} revoked certificate(s) on the CRL${crl ? ` (${this.#describeCrl()})` : ""}`);
    if (wasStale && changed.revocations) logger.info(`CRL fresh again: ${this.#describeCrl()}`);
    return true;
  }

  /**
   * Starts the running life: logs the revocation state once (a warning with --no-crl), then reloads on SIGHUP and
   * whenever the certificate, key, CA or CRL file changes, and reports once when the CRL in force goes stale.
   */
  watch(logger: Logger): this {
    if (this.#watch) return this;
    const name = this.#identity.name;
    const files = [`${name}_cert.pem`, `${name}_key.pem`, "ca_cert.pem"];
    if (this.#noCrl) {
      logger.warn(`revocation is OFF (--no-crl): ${CRL_FILE} is not read, and no certificate is refused as revoked`);
    } else {
      files.push(CRL_FILE);
      logger.info(`CRL in force: ${this.#describeCrl()}`);
      // A second's poll of one date: a timer for nextUpdate would need re-arming past setTimeout's 24.8-day limit.
      this.#freshness = setInterval(() => this.#reportIfStale(logger), RELOAD_INTERVAL_MS);
      this.#freshness.unref?.();
    }
    this.#watch = watchFiles(
      files.map((file) => join(this.#dir, file)),
      () => this.reload(logger),
    );
    return this;
  }

  stop(): void {
    this.#watch?.stop();
    if (this.#freshness) clearInterval(this.#freshness);
  }

  #isStale(): boolean {
    const next = this.#crl?.list.nextUpdate;
    return next != null && this.#now() > next.getTime();
  }

  #reportIfStale(logger: Logger): void {
    if (this.#staleReported || !this.#isStale()) return;
    this.#staleReported = true;
    // BoringSSL (Bun's TLS) checks the CRL's dates itself, and refuses every client certificate from now on.
    logger.error(
      `CRL in force is stale (${this.#describeCrl()}): its revoked serials stay refused, but a certificate revoked since is not known, ` +
        `and TLS stacks that check CRL dates (Bun's) refuse every client certificate until a fresh CRL is loaded: ${CRL_FIX}`,
    );
  }

  /** "CRL number 0x1001, 1 revoked, next update 2027-01-03T15:26:27.000Z" */
  #describeCrl(): string {
    const list = this.#crl?.list;
    if (!list) return "no CRL";
    return `CRL number ${formatCrlNumber(list.number)}, ${list.revoked.size} revoked, next update ${list.nextUpdate?.toISOString() ?? "none"}`;
  }
}
