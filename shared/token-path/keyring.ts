// Master keys for secrets at rest: AES-256-GCM, versioned for rotation. The versions live in the token store itself,
// each wrapped under the keyring key, which is the one secret kept outside the database (keyring-file.ts): so every
// KeyServer on the same store sees a rotation at once, and a keyring opens only the store it is bound to (issue 23).
import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import { ConfigError, MeshError } from "../platform/errors.ts";

export interface Sealed {
  /** base64 of ciphertext ‖ 16-byte GCM tag */
  ciphertext: string;
  /** base64 of the 12-byte nonce, random per record */
  nonce: string;
  keyVersion: number;
}

/** One master key version as the token store keeps it: wrapped under the keyring key, bound to its store and number. */
export interface WrappedKey {
  version: number;
  /** base64 of the wrapped 32-byte key ‖ 16-byte GCM tag */
  wrapped: string;
  /** base64 of the 12-byte nonce */
  nonce: string;
  createdAt: number;
}

/** What the keyring needs of the token store: its key versions, and a removal that never takes one a row uses. */
export interface KeyVersionStore {
  /** Every version, by a causal read (on Galera, one another node wrote a moment ago too). */
  keyVersions(): Promise<WrappedKey[]>;
  /** Adds a version unless that number is there already; true when added. */
  addKeyVersion(key: WrappedKey): Promise<boolean>;
  /** Removes a version only while no token row is sealed under it; true when removed. */
  removeKeyVersion(version: number): Promise<boolean>;
}

/** A sealed value that does not open: wrong key, tampered, or moved to another row. */
export class SealBroken extends MeshError {
  constructor() {
    super("ERR_SEAL", 500, "stored secret cannot be opened");
  }
}

function aesGcmSeal(key: Buffer, plaintext: Buffer, aad: string): { sealed: string; nonce: string } {
  const nonce = randomBytes(12);
  const cipher = createCipheriv("aes-256-gcm", key, nonce);
  cipher.setAAD(Buffer.from(aad));
  const sealed = Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
  return { sealed: sealed.toString("base64"), nonce: nonce.toString("base64") };
}

/** The plaintext, or undefined when it does not open (any cause: no oracle). */
function aesGcmOpen(key: Buffer, sealed: string, nonce: string, aad: string): Buffer | undefined {
  try {
    const raw = Buffer.from(sealed, "base64");
    const decipher = createDecipheriv("aes-256-gcm", key, Buffer.from(nonce, "base64"));
    decipher.setAAD(Buffer.from(aad));
    decipher.setAuthTag(raw.subarray(raw.length - 16));
    return Buffer.concat([decipher.update(raw.subarray(0, raw.length - 16)), decipher.final()]);
  } catch {
    return undefined;
  }
}

/** A wrapped key names its store and number: copied into another store, or renumbered, it does not open. */
const wrapContext = (storeId: string, version: number) => `securemesh master key\u0000${storeId}\u0000${version}`;

export function wrapKey(keyringKey: Buffer, storeId: string, version: number, key: Buffer, createdAt = Date.now()): WrappedKey {
  const { sealed, nonce } = aesGcmSeal(keyringKey, key, wrapContext(storeId, version));
  return { version, wrapped: sealed, nonce, createdAt };
}

/** The master key, or ConfigError when the keyring key does not open it: another keyring's, or altered. */
export function unwrapKey(keyringKey: Buffer, storeId: string, key: WrappedKey): Buffer {
  const opened = aesGcmOpen(keyringKey, key.wrapped, key.nonce, wrapContext(storeId, key.version));
  if (opened?.length !== 32) throw new ConfigError(`master key v${key.version} in the store does not open under this keyring key`);
  return opened;
}

/** Whether `sealed` opens under one raw master key: to check a keyring file of the old format against a store. */
export function opensWith(key: Buffer, sealed: Sealed, context: string): boolean {
  return aesGcmOpen(key, sealed.ciphertext, sealed.nonce, context) !== undefined;
}

/** A new random master key or keyring key. */
export const newKey = (): Buffer => randomBytes(32);

/** Where retired versions go and come back from (keyring-file.ts's archive); the keyring only hands them over. */
export interface KeyArchive {
  /** Highest version ever archived, so a new version never reuses a number. */
  highestVersion(): number;
  put(keys: readonly WrappedKey[]): void;
}

/**
 * The master key versions of one token store, unwrapped in memory: seals under the current (highest) version, opens
 * under any version the store still holds. `refresh()` re-reads them, so a running KeyServer learns of a rotation
 * done by another process or host, and forgets a retired version.
 */
export class MasterKeyring {
  readonly id: string;
  readonly storeId: string;
  /** The keyring file this keyring key came from, for messages. */
  readonly path: string;
  readonly #keyringKey: Buffer;
  readonly #store: KeyVersionStore;
  #keys = new Map<number, Buffer>();

  constructor(options: { id: string; storeId: string; path: string; keyringKey: Buffer; store: KeyVersionStore }) {
    this.id = options.id;
    this.storeId = options.storeId;
    this.path = options.path;
    this.#keyringKey = options.keyringKey;
    this.#store = options.store;
  }

  /** Re-reads every version from the store; throws ConfigError (and keeps the keys it had) if one does not open. */
  async refresh(): Promise<void> {
    const rows = await this.#store.keyVersions();
    const keys = new Map<number, Buffer>();
    for (const row of rows) keys.set(row.version, unwrapKey(this.#keyringKey, this.storeId, row));
    this.#keys = keys;
  }

  get currentVersion(): number {
    return Math.max(0, ...this.#keys.keys());
  }

  get versions(): number[] {
    return [...this.#keys.keys()].sort((a, b) => a - b);
  }

  /** `context` (e.g. the row's client and type) is authenticated, so a sealed value cannot be moved to another row. */
  seal(plaintext: string, context: string): Sealed {
    const version = this.currentVersion;
    const { sealed, nonce } = aesGcmSeal(this.#key(version), Buffer.from(plaintext, "utf8"), context);
    return { ciphertext: sealed, nonce, keyVersion: version };
  }

  open(sealed: Sealed, context: string): string {
    const opened = aesGcmOpen(this.#key(sealed.keyVersion), sealed.ciphertext, sealed.nonce, context);
    if (!opened) throw new SealBroken();
    return opened.toString("utf8");
  }

  /** Adds a new current version to the store, numbered above every version the store or the archive ever held. */
  async addVersion(archive: KeyArchive): Promise<number> {
    await this.refresh();
    let version = Math.max(this.currentVersion, archive.highestVersion()) + 1;
    // Another host may add the same number at the same moment: the loser takes the next.
    while (!(await this.#store.addKeyVersion(wrapKey(this.#keyringKey, this.storeId, version, newKey())))) version += 1;
    await this.refresh();
    return version;
  }

  /**
   * Archives, then removes from the store, every version but the current one that no row uses. The store removes a
   * version only while no row is sealed under it, so a row sealed under it meanwhile keeps it. Returns those removed.
   */
  async retire(versionsInUse: ReadonlySet<number>, archive: KeyArchive): Promise<number[]> {
    const rows = await this.#store.keyVersions();
    const current = Math.max(0, ...rows.map((r) => r.version));
    const candidates = rows.filter((r) => r.version !== current && !versionsInUse.has(r.version));
    // In the archive first: a version is never gone from both places.
    archive.put(candidates);
    const removed: number[] = [];
    for (const key of candidates) if (await this.#store.removeKeyVersion(key.version)) removed.push(key.version);
    await this.refresh();
    return removed;
  }

  #key(version: number): Buffer {
    const key = this.#keys.get(version);
    if (!key) throw new SealBroken();
    return key;
  }
}
