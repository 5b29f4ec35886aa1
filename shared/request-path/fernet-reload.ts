// Fernet keys that follow their file: a running server or client takes up `fernet-keys.ts add|promote|retire` within
// RELOAD_INTERVAL_MS and on SIGHUP, as certificates and the CRL do (authz/trust.ts). $FERNET_KEY cannot change
// under a running process, so keys from it do not reload: a restart changes them.
//
// A server's stored records hold tokens as the clients sent them, so a key that leaves the file may still be the only
// one that opens some of them. A server keeps such a key (keepWhileUsed, with fernet-rewrap.ts counting the records):
// for reading stored records only, never for a new request, until its records are re-encrypted. It keeps it on disk
// too (keepOnDisk: a 0600 file in its state folder), so a restart before that reads them all the same (issue 23: no
// command can lose data); the file goes when the key does.
import { readdirSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "../ops/log.ts";
import { displayPath, FERNET_KEY_FILE, loadFernetKeyFile } from "../platform/config.ts";
import { ConfigError } from "../platform/errors.ts";
import { describeFernetKeys, fernetKeyFingerprint, fernetKeysInOrder, parseFernetKeyFile, type FernetKeyFile } from "../platform/fernet-key-file.ts";
import { ensurePrivateDir, readPrivateFile, writePrivateFileAtomically } from "../platform/private-files.ts";
import { watchFiles, type Watch } from "../platform/watch.ts";
import { Fernet } from "./fernet.ts";

/**
 * What changed between two key sets, by fingerprint: "(added 8b7e4410)", "(primary was 3f9a1c2d)", "(unchanged)";
 * a key that left the file is "dropped", or "kept" when it stays for stored records (`kept`: newly kept ones).
 * `keptBefore`: keys kept already, which neither count as dropped nor as added back when the file lists them again.
 */
function describeChange(before: readonly string[], after: readonly string[], kept: readonly string[] = [], keptBefore: readonly string[] = []): string {
  const [was, now] = [before.map(fernetKeyFingerprint), after.map(fernetKeyFingerprint)];
  const left = was.filter((f) => !now.includes(f));
  const dropped = left.filter((f) => !kept.includes(f));
  const parts = [
    was[0] !== now[0] && `primary was ${was[0]}`,
    now.some((f) => !was.includes(f)) &&
      `added ${now.filter((f) => !was.includes(f)).join(" ")}${now.some((f) => keptBefore.includes(f)) ? " (back in the file)" : ""}`,
    dropped.length > 0 && `dropped ${dropped.join(" ")}`,
    kept.length > 0 && `kept ${kept.join(" ")} for stored records`,
  ].filter(Boolean);
  return `(${parts.length ? parts.join("; ") : "unchanged"})`;
}

/**
 * How many stored records a key opens, as far as is known: a count, or null when the records have not been counted
 * since the keys last changed (so the key may be in use). fernet-rewrap.ts answers it for a server.
 */
export type KeyUsage = (key: string) => number | null;

/** A key that left the file and is kept for the stored records it still opens. */
interface KeptKey {
  key: string;
  fingerprint: string;
  /** The records that used it when it was kept, or null when not counted yet. */
  usedBy: number | null;
}

/**
 * A role's Fernet keys: `fernet` encrypts and decrypts with the set in force, and watch() swaps the set when the key
 * file changes. A file that cannot be used (missing, open to others, not parsing, nothing to encrypt with) keeps
 * the set in force, with one error line each time; no line ever holds a key, only fingerprints.
 *
 * A server also reads stored records with `records`: the file's keys, then any kept after leaving the file because
 * records still use them (keepWhileUsed). `fernet` never holds a kept key, so a retired key opens no new request,
 * even one retired early (retire --force, a key thought exposed); it only reads what was stored under it.
 * @example const keys = FernetKeys.open(config.pki).watch(logger); createServerApp({ fernet: keys.fernet, … })
 */
export class FernetKeys {
  /** The file's keys: a request's token, and everything this process encrypts. */
  readonly fernet: Fernet;
  /** The file's keys, then the kept ones: stored records (the server's view, and re-encryption). */
  readonly records: Fernet;
  readonly #pki: string;
  readonly #fromEnv: boolean;
  #file: FernetKeyFile;
  #keys: string[];
  #kept: KeptKey[] = [];
  /** `records`' keys by fingerprint, in its order: recordFingerprints[records.keyIndex(token)]. */
  #recordFingerprints: string[] = [];
  #usage: KeyUsage | null = null;
  /** Where kept keys are kept across a restart (keepOnDisk), or null. */
  #keptDir: string | null = null;
  readonly #listeners: (() => void)[] = [];
  #watch: Watch | null = null;

  private constructor(pki: string, file: FernetKeyFile, fromEnv: boolean) {
    this.#pki = pki;
    this.#file = file;
    this.#keys = fernetKeysInOrder(file);
    this.#fromEnv = fromEnv;
    this.fernet = new Fernet(this.#keys);
    this.records = new Fernet(this.#keys);
    this.#recordFingerprints = this.#keys.map(fernetKeyFingerprint);
  }

  /** Loads $FERNET_KEY, else the PKI's encryption_key.txt; throws ConfigError (one line naming the file and the fix). */
  static open(pki: string): FernetKeys {
    return new FernetKeys(pki, loadFernetKeyFile(pki), process.env.FERNET_KEY !== undefined);
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

  /** The keys `records` holds by fingerprint, in its order (the file's, then the kept ones): index with records.keyIndex(). */
  get recordFingerprints(): readonly string[] {
    return this.#recordFingerprints;
  }

  /** Fingerprints of the keys kept for stored records after leaving the file. */
  get kept(): string[] {
    return this.#kept.map((k) => k.fingerprint);
  }

  /**
   * Fingerprints of the keys whose records re-encryption moves to the primary: the kept keys, and the file's
   * decrypt-only keys but one added and not yet promoted. That one is the next primary, not an old key: a host that
   * has not loaded the promote yet must not move records back to its own primary while the others move them on.
   */
  get rewrappable(): Set<string> {
    const added = (e: FernetKeyFile["decryptOnly"][number]) => e.added !== undefined && e.encryptedUntil === undefined;
    return new Set([...this.#file.decryptOnly.filter((e) => !added(e)).map((e) => fernetKeyFingerprint(e.key)), ...this.kept]);
  }

  get path(): string {
    return join(this.#pki, FERNET_KEY_FILE);
  }

  /**
   * From now on a key that leaves the file while `usage` says stored records use it (or cannot say) is kept, for
   * `records` only, with one error line; release() drops it once none do. `changed` hears of every change to the keys
   * in force (a reload, a release). For a server; clients keep no records.
   */
  keepWhileUsed(usage: KeyUsage, changed: () => void): this {
    this.#usage = usage;
    this.#listeners.push(changed);
    return this;
  }

  /**
   * Keeps kept keys in `dir` too (made 0700), one 0600 file each, so that a restart before their records are moved
   * still reads them; takes up the ones a run before this left there, as kept. A file there that group or others can
   * read stops the role (ConfigError), as any key file does. For a server, before keepWhileUsed's user starts.
   */
  keepOnDisk(dir: string, logger: Logger): this {
    this.#keptDir = dir;
    let names: string[];
    try {
      names = readdirSync(dir).filter((name) => /^[0-9a-f]{8}\.key$/.test(name));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return this;
      throw new ConfigError(
        `cannot read ${displayPath(dir)}, where Fernet keys kept for stored records are: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`,
      );
    }
    const inFile = new Set(this.fingerprints);
    for (const name of names) {
      const path = join(dir, name);
      const key = parseFernetKeyFile(readPrivateFile(path), displayPath(path)).primary.key;
      const fingerprint = fernetKeyFingerprint(key);
      if (inFile.has(fingerprint)) {
        this.#forget(fingerprint, logger); // back in the file (restored): the file's copy is the one in force
        continue;
      }
      this.#kept.push({ key, fingerprint, usedBy: null });
      logger.warn(
        `Fernet key ${fingerprint} is not in ${displayPath(this.path)}, but was kept for stored records before this restart (${displayPath(path)}): ` +
          `kept again, for them only (never for a new request), until they are re-encrypted to ${this.fingerprints[0]}`,
      );
    }
    this.#setRecordKeys();
    return this;
  }

  /** Re-reads the file and puts its keys in force, or keeps the old ones with one error line. Returns which. */
  reload(logger: Logger): boolean {
    let file: FernetKeyFile;
    try {
      file = loadFernetKeyFile(this.#pki);
    } catch (error) {
      logger.error(`Fernet keys NOT reloaded, the previous ones stay in force (${describeFernetKeys(this.#keys)}): ${(error as Error).message}`);
      return false;
    }
    const next = fernetKeysInOrder(file);
    const inFile = new Set(next.map(fernetKeyFingerprint));
    // A key leaving the file stays, for stored records, unless they are counted and none uses it. One kept already
    // stays until release() (its records re-encrypted), or goes back to being the file's when the file lists it again.
    const stillKept = this.#kept.filter((k) => !inFile.has(k.fingerprint));
    const backInFile = this.#kept.filter((k) => inFile.has(k.fingerprint));
    const newlyKept: KeptKey[] = [];
    for (const key of this.#keys) {
      const fingerprint = fernetKeyFingerprint(key);
      if (inFile.has(fingerprint)) continue;
      const usedBy = this.#usage ? this.#usage(key) : 0;
      if (usedBy !== 0) newlyKept.push({ key, fingerprint, usedBy });
    }
    const change = describeChange(
      this.#keys,
      next,
      newlyKept.map((k) => k.fingerprint),
      this.kept,
    );
    this.fernet.setKeys(next);
    this.#file = file;
    this.#keys = next;
    this.#kept = [...stillKept, ...newlyKept];
    this.#setRecordKeys();
    const keptNote = stillKept.length ? `, kept for stored records ${stillKept.map((k) => k.fingerprint).join(" ")}` : "";
    logger.info(`Fernet keys reloaded: ${describeFernetKeys(next)}${keptNote} ${change}`);
    for (const k of backInFile) this.#forget(k.fingerprint, logger);
    for (const k of newlyKept) {
      this.#remember(k, logger);
      const count = k.usedBy === null ? "records not counted yet may still use it" : `${k.usedBy} stored record${k.usedBy === 1 ? "" : "s"} still use it`;
      logger.error(
        `Fernet key ${k.fingerprint} is no longer in ${displayPath(this.path)}, but ${count}: kept${this.#keptDir ? " (in memory and in its state folder)" : " in memory"} to read them (never for a new request) ` +
          `while they are re-encrypted to ${fernetKeyFingerprint(next[0]!)}; it is dropped once none do (/health fernet_rewrap)`,
      );
    }
    this.#changed();
    return true;
  }

  /** Drops a kept key (its records are re-encrypted), with one line saying so. */
  release(fingerprint: string, logger: Logger, note: string): void {
    const k = this.#kept.find((k) => k.fingerprint === fingerprint);
    if (!k) return;
    this.#kept = this.#kept.filter((other) => other !== k);
    this.#setRecordKeys();
    this.#forget(fingerprint, logger);
    logger.info(
      `Fernet key ${fingerprint} dropped: no stored record uses it any more (${note}); ${describeFernetKeys(this.#keys)}${this.#kept.length ? `, kept for stored records ${this.kept.join(" ")}` : ""}`,
    );
    this.#changed();
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

  /** Writes a newly kept key to the state folder; a failure is one error line (the key is still kept in memory). */
  #remember(k: KeptKey, logger: Logger): void {
    if (!this.#keptDir) return;
    const path = join(this.#keptDir, `${k.fingerprint}.key`);
    try {
      ensurePrivateDir(this.#keptDir);
      writePrivateFileAtomically(
        path,
        `# Fernet key ${k.fingerprint}, retired from ${displayPath(this.path)} while stored records still used it; ` +
          `kept for them until they are re-encrypted, then removed by the server\n${k.key}\n`,
      );
    } catch (error) {
      logger.error(
        `Fernet key ${k.fingerprint} NOT kept on disk (${displayPath(path)}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}): ` +
          `a restart before its records are re-encrypted would not read them until it is restored (./pki.sh fernet restore ${k.fingerprint} on the CA host)`,
      );
    }
  }

  /** Removes a key's file from the state folder, if there is one. */
  #forget(fingerprint: string, logger: Logger): void {
    if (!this.#keptDir) return;
    const path = join(this.#keptDir, `${fingerprint}.key`);
    try {
      unlinkSync(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT")
        logger.warn(`could not remove ${displayPath(path)}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
    }
  }

  #setRecordKeys(): void {
    const keys = [...this.#keys, ...this.#kept.map((k) => k.key)];
    this.records.setKeys(keys);
    this.#recordFingerprints = keys.map(fernetKeyFingerprint);
  }

  #changed(): void {
    for (const listener of this.#listeners) listener();
  }
}
