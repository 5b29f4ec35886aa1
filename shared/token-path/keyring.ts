// Master keys for secrets at rest: AES-256-GCM, versioned for rotation, kept in a 0600 file outside the database.
import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import { chmodSync, existsSync, renameSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { ConfigError, MeshError } from "../platform/errors.ts";
import { ensurePrivateDir, readPrivateFile } from "../platform/private-files.ts";

export interface Sealed {
  /** base64 of ciphertext ‖ 16-byte GCM tag */
  ciphertext: string;
  /** base64 of the 12-byte nonce, random per record */
  nonce: string;
  keyVersion: number;
}

interface KeyringFile {
  current: number;
  keys: Record<string, string>;
}

/** A sealed value that does not open: wrong key, tampered, or moved to another row. */
export class SealBroken extends MeshError {
  constructor() {
    super("ERR_SEAL", 500, "stored secret cannot be opened");
  }
}

export class MasterKeyring {
  readonly #path: string;
  #file: KeyringFile;

  private constructor(path: string, file: KeyringFile) {
    this.#path = path;
    this.#file = file;
  }

  /** Loads the keyring, creating version 1 (0600, in a 0700 folder) on first use; refuses a file others can read. */
  static open(path: string): MasterKeyring {
    if (!existsSync(path)) {
      ensurePrivateDir(dirname(path));
      const keyring = new MasterKeyring(path, { current: 1, keys: { "1": randomBytes(32).toString("base64") } });
      keyring.#save();
      return keyring;
    }
    return new MasterKeyring(path, MasterKeyring.#read(path));
  }

  static #read(path: string): KeyringFile {
    let text: string;
    try {
      text = readPrivateFile(path); // a ConfigError with the chmod when group or others can read it
    } catch (error) {
      if (error instanceof ConfigError) throw error;
      throw new ConfigError(`cannot read ${path}: ${(error as NodeJS.ErrnoException).code ?? "unreadable"}`);
    }
    let file: KeyringFile;
    try {
      file = JSON.parse(text) as KeyringFile;
    } catch {
      throw new ConfigError(`${path} is not a securemesh master keyring`);
    }
    if (!file.keys?.[String(file.current)]) throw new ConfigError(`${path} has no key for its current version ${file.current}`);
    return file;
  }

  get path(): string {
    return this.#path;
  }

  /**
   * Re-reads the file another process (`token rotate-key`) may have changed, so a running KeyServer learns new
   * versions and forgets retired ones without a restart (#11 M4). A file that does not read keeps the keys in
   * memory and throws ConfigError.
   */
  reload(): void {
    this.#file = MasterKeyring.#read(this.#path);
  }

  get currentVersion(): number {
    return this.#file.current;
  }

  get versions(): number[] {
    return Object.keys(this.#file.keys).map(Number).sort((a, b) => a - b);
  }

  /** `context` (e.g. the row's client and type) is authenticated, so a sealed value cannot be moved to another row. */
  seal(plaintext: string, context: string): Sealed {
    const nonce = randomBytes(12);
    const cipher = createCipheriv("aes-256-gcm", this.#key(this.currentVersion), nonce);
    cipher.setAAD(Buffer.from(context));
    const ciphertext = Buffer.concat([cipher.update(plaintext, "utf8"), cipher.final(), cipher.getAuthTag()]);
    return { ciphertext: ciphertext.toString("base64"), nonce: nonce.toString("base64"), keyVersion: this.currentVersion };
  }

  open(sealed: Sealed, context: string): string {
    try {
      const raw = Buffer.from(sealed.ciphertext, "base64");
      const decipher = createDecipheriv("aes-256-gcm", this.#key(sealed.keyVersion), Buffer.from(sealed.nonce, "base64"));
      decipher.setAAD(Buffer.from(context));
      decipher.setAuthTag(raw.subarray(raw.length - 16));
      return Buffer.concat([decipher.update(raw.subarray(0, raw.length - 16)), decipher.final()]).toString("utf8");
    } catch {
      throw new SealBroken();
    }
  }

  /** Adds a new current version; older versions stay so rows not yet re-sealed still open. */
  addVersion(): number {
    const next = Math.max(...this.versions) + 1;
    this.#file = { current: next, keys: { ...this.#file.keys, [String(next)]: randomBytes(32).toString("base64") } };
    this.#save();
    return next;
  }

  /** Drops versions no row uses any more. */
  retire(versionsInUse: Set<number>): number[] {
    const retired = this.versions.filter((v) => v !== this.currentVersion && !versionsInUse.has(v));
    const keys = { ...this.#file.keys };
    for (const v of retired) delete keys[String(v)];
    this.#file = { ...this.#file, keys };
    this.#save();
    return retired;
  }

  #key(version: number): Buffer {
    const key = this.#file.keys[String(version)];
    if (!key) throw new SealBroken();
    return Buffer.from(key, "base64");
  }

  /** Atomic replace: a crash mid-write never leaves a half keyring. */
  #save(): void {
    const tmp = `${this.#path}.tmp`;
    writeFileSync(tmp, JSON.stringify(this.#file, null, 2) + "\n", { mode: 0o600 });
    chmodSync(tmp, 0o600);
    renameSync(tmp, this.#path);
  }
}
