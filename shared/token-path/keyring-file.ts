// The files a KeyServer host keeps beside its token store: the keyring file (the keyring key and the store it is bound
// to, 0600) and the archive of retired master key versions (0600, wrapped under the same key). Both are replaced
// atomically, so a crash never leaves half a file.
import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, renameSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { ConfigError } from "../platform/errors.ts";
import { displayPath } from "../platform/paths.ts";
import { ensurePrivateDir, readPrivateFile } from "../platform/private-files.ts";
import type { KeyArchive, WrappedKey } from "./keyring.ts";

/** Which store a keyring belongs to: its id (kept in the store too) and, for messages, where it was. */
export interface StoreBinding {
  id: string;
  /** describeDatabaseUrl() of the store when it was bound: never a password. */
  at: string;
}

/** A keyring file of this version: its key, and the store it opens. */
export interface BoundKeyringFile {
  kind: "bound";
  /** The keyring's id, which its backups and archive name. */
  id: string;
  store: StoreBinding;
  key: Buffer;
}

/** A keyring file written before issue 23: the master keys themselves, bound to no store. */
export interface LegacyKeyringFile {
  kind: "legacy";
  current: number;
  keys: Map<number, Buffer>;
}

export type KeyringFile = BoundKeyringFile | LegacyKeyringFile;

/** A short random id for a store or a keyring: 64 bits, as hex. */
export const newId = (): string => randomBytes(8).toString("hex");

/** The archive beside a keyring file: master_keys.json → master_keys.archive.json. */
export const archivePathOf = (keyringPath: string): string => keyringPath.replace(/(\.json)?$/, ".archive.json");

function readJson(path: string, what: string): Record<string, unknown> {
  let text: string;
  try {
    text = readPrivateFile(path); // a ConfigError with the chmod when group or others can read it
  } catch (error) {
    if (error instanceof ConfigError) throw error;
    throw new ConfigError(`cannot read ${displayPath(path)}: ${(error as NodeJS.ErrnoException).code ?? "unreadable"}`);
  }
  try {
    const parsed = JSON.parse(text) as unknown;
    if (parsed && typeof parsed === "object") return parsed as Record<string, unknown>;
  } catch {
    // reported below
  }
  throw new ConfigError(`${displayPath(path)} is not a securemesh ${what}`);
}

const base64Key = (value: unknown): Buffer | undefined => {
  if (typeof value !== "string") return undefined;
  const key = Buffer.from(value, "base64");
  return key.length === 32 ? key : undefined;
};

/** The keyring file at `path`, or undefined when there is none; ConfigError when it is loose, unreadable or not one. */
export function readKeyringFile(path: string): KeyringFile | undefined {
  if (!existsSync(path)) return undefined;
  const file = readJson(path, "master keyring");
  const shown = displayPath(path);
  if (file.format === 2) {
    const store = file.store as Partial<StoreBinding> | undefined;
    const key = base64Key(file.key);
    if (typeof file.keyring !== "string" || typeof store?.id !== "string" || typeof store.at !== "string" || !key) {
      throw new ConfigError(`${shown} is not a complete securemesh master keyring (keyring, store and key are needed)`);
    }
    return { kind: "bound", id: file.keyring, store: { id: store.id, at: store.at }, key };
  }
  const keys = new Map<number, Buffer>();
  for (const [version, value] of Object.entries((file.keys ?? {}) as Record<string, unknown>)) {
    const key = base64Key(value);
    if (!/^\d+$/.test(version) || !key) throw new ConfigError(`${shown} is not a securemesh master keyring (bad key v${version})`);
    keys.set(Number(version), key);
  }
  const current = Number(file.current);
  if (!keys.has(current)) throw new ConfigError(`${shown} has no key for its current version ${String(file.current)}`);
  return { kind: "legacy", current, keys };
}

/** Writes `text` to `path` 0600 by rename, in a 0700 folder made if missing. */
export function writePrivateAtomically(path: string, text: string): void {
  ensurePrivateDir(dirname(path));
  const tmp = `${path}.tmp`;
  writeFileSync(tmp, text, { mode: 0o600 });
  chmodSync(tmp, 0o600);
  renameSync(tmp, path);
}

export function keyringFileText(file: Omit<BoundKeyringFile, "kind">): string {
  return JSON.stringify({ format: 2, keyring: file.id, store: file.store, key: file.key.toString("base64") }, null, 2) + "\n";
}

export function writeKeyringFile(path: string, file: Omit<BoundKeyringFile, "kind">): void {
  writePrivateAtomically(path, keyringFileText(file));
}

interface ArchivedKey extends WrappedKey {
  archivedAt: number;
}

/**
 * The retired master key versions of one keyring, still wrapped under its key (so the file alone opens nothing),
 * from which `token restore-key VERSION` brings one back. Never shrinks: a version archived twice is kept once.
 */
export class KeyArchiveFile implements KeyArchive {
  readonly path: string;
  readonly #keyringId: string;
  readonly #storeId: string;
  readonly #keys: Map<number, ArchivedKey>;

  private constructor(path: string, keyringId: string, storeId: string, keys: Map<number, ArchivedKey>) {
    this.path = path;
    this.#keyringId = keyringId;
    this.#storeId = storeId;
    this.#keys = keys;
  }

  /** The archive of keyring `keyringId` at `path` (empty when there is none); refuses another keyring's. */
  static open(path: string, keyringId: string, storeId: string): KeyArchiveFile {
    const keys = new Map<number, ArchivedKey>();
    if (existsSync(path)) {
      const file = readJson(path, "master key archive");
      if (file.keyring !== keyringId) {
        throw new ConfigError(`${displayPath(path)} is the archive of keyring ${String(file.keyring)}, not of keyring ${keyringId}: move it aside`);
      }
      for (const [version, entry] of Object.entries((file.keys ?? {}) as Record<string, ArchivedKey>))
        keys.set(Number(version), { ...entry, version: Number(version) });
    }
    return new KeyArchiveFile(path, keyringId, storeId, keys);
  }

  get versions(): number[] {
    return [...this.#keys.keys()].sort((a, b) => a - b);
  }

  get(version: number): WrappedKey | undefined {
    const entry = this.#keys.get(version);
    return entry && { version: entry.version, wrapped: entry.wrapped, nonce: entry.nonce, createdAt: entry.createdAt };
  }

  highestVersion(): number {
    return Math.max(0, ...this.#keys.keys());
  }

  /** Adds versions (a version already archived keeps its entry) and writes the file before returning. */
  put(keys: readonly WrappedKey[]): void {
    let added = false;
    for (const key of keys) {
      if (this.#keys.has(key.version)) continue;
      this.#keys.set(key.version, { ...key, archivedAt: Date.now() });
      added = true;
    }
    if (!added) return;
    const entries = Object.fromEntries(
      this.versions.map((v) => {
        const { version: _v, ...entry } = this.#keys.get(v)!;
        return [String(v), entry];
      }),
    );
    writePrivateAtomically(this.path, JSON.stringify({ format: 2, keyring: this.#keyringId, store: this.#storeId, keys: entries }, null, 2) + "\n");
  }
}
