// Opens the KeyServer's token vault only where its keyring and its token store belong together (issue 23): the store
// keeps an id in its `_meta` table, the keyring file records it, and every opening (the KeyServer at start, each admin
// command) checks the two against each other. So `token rotate-key` run without the KeyServer's --db is refused,
// naming both, instead of re-sealing a local sqlite file and retiring the key the real store's tokens need; and a
// host without the keyring refuses to start on a store that holds sealed tokens instead of making a keyring that opens
// nothing.
import { existsSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseDatabaseUrl } from "../db/database.ts";
import { ConfigError } from "../platform/errors.ts";
import { displayPath } from "../platform/paths.ts";
import { MasterKeyring, newKey, opensWith, unwrapKey, wrapKey } from "./keyring.ts";
import { archivePathOf, KeyArchiveFile, newId, readKeyringFile, writeKeyringFile, type BoundKeyringFile, type LegacyKeyringFile } from "./keyring-file.ts";
import { openTokenStore, TokenVault, type TokenStore } from "./token-store.ts";

/**
 * Who opens the vault, which decides what it may do on its own:
 * - serve: the KeyServer, started with its configuration: makes the first keyring of an empty store, binds a keyring
 *   file of the old format to its store, and refuses a store whose tokens its keyring cannot open;
 * - add: `token add`: makes the first keyring of an empty store;
 * - use: every other admin command: acts only on a keyring and store already bound together.
 */
export type VaultPurpose = "serve" | "add" | "use";

export interface OpenedVault {
  vault: TokenVault;
  archive: KeyArchiveFile;
  /** What the opening did on its own, one line each: "made keyring … for …", "bound the keyring file of the old format …". */
  notes: string[];
  /** Versions token rows are sealed under that the keyring lacks (refused for serve; said by the admin commands). */
  missing: number[];
}

export const keyringPathOf = (dataDir: string): string => join(dataDir, "master_keys.json");

const plural = (n: number, one: string) => `${n} ${one}${n === 1 ? "" : "s"}`;
const FIX_CONFIG = "give it the KeyServer's own configuration (--config FILE, or the --db or --db-file the KeyServer runs with)";

/** The sqlite file a URL names, when it names one that does not exist: opening it would make an empty store. */
function absentSqlite(url: string): string | undefined {
  const location = parseDatabaseUrl(url);
  return location.kind === "sqlite" && location.path !== ":memory:" && !existsSync(location.path) ? location.path : undefined;
}

/** Where the vault is: the store's URL (or a store opened already: a test's), and the folder of the keyring file. */
export interface VaultLocation {
  db: string;
  dataDir: string;
  table?: string;
  store?: TokenStore;
}

/** Opens keyring and store together, or refuses in one line naming both and what to pass. */
export async function openVault(config: VaultLocation, purpose: VaultPurpose): Promise<OpenedVault> {
  const path = keyringPathOf(config.dataDir);
  const file = readKeyringFile(path);
  const absent = config.store ? undefined : absentSqlite(config.db);
  if (absent && file?.kind === "bound") {
    throw new ConfigError(
      `keyring ${displayPath(path)} belongs to token store ${file.store.at} (store id ${file.store.id}), not to sqlite ${displayPath(absent)} (no such file): ${FIX_CONFIG}`,
    );
  }
  if (absent && !file && purpose === "use") {
    throw new ConfigError(`no keyring at ${displayPath(path)} and no token store at ${displayPath(absent)}: nothing to act on; ${FIX_CONFIG}`);
  }
  const store = config.store ?? (await openTokenStore(config.db, { table: config.table }));
  try {
    return await bind(store, path, file, purpose);
  } catch (error) {
    if (!config.store) await store.close().catch(() => {});
    throw error;
  }
}

async function bind(store: TokenStore, path: string, file: ReturnType<typeof readKeyringFile>, purpose: VaultPurpose): Promise<OpenedVault> {
  const notes: string[] = [];
  const storeId = await store.storeId();
  const inUse = await store.versionsInUse();
  const sealed = [...inUse.values()].reduce((a, b) => a + b, 0);
  const pending = `${path}.new`;
  // A keyring made or converted by an opening that stopped between the store and the file: finish it.
  if (storeId && file?.kind !== "bound" && existsSync(pending)) {
    const half = readKeyringFile(pending);
    if (half?.kind === "bound" && half.store.id === storeId) {
      if (file?.kind === "legacy") await addLegacyVersions(store, half, file);
      renameSync(pending, path);
      notes.push(`finished binding keyring ${half.id} to ${store.description} (store id ${storeId})`);
      return open(store, path, half, purpose, notes, inUse);
    }
  }
  if (!file) {
    if (storeId || sealed > 0) {
      const bound = storeId ? ` and is bound to a keyring (store id ${storeId})` : ", sealed before keyrings were bound to stores";
      const fix = storeId
        ? "restore that keyring with 'token keyring import BACKUP'"
        : "put back the master_keys.json they were sealed with and start the KeyServer (it binds the two)";
      throw new ConfigError(
        `no keyring at ${displayPath(path)}, but token store ${store.description} holds ${plural(sealed, "sealed token")}${bound}: ${fix} (a new keyring would open none of them)`,
      );
    }
    if (purpose === "use")
      throw new ConfigError(
        `no keyring at ${displayPath(path)}, and token store ${store.description} holds no token: nothing to act on ('token add' makes the keyring)`,
      );
    const made = await claim(store, path, { id: newId(), store: { id: newId(), at: store.description }, key: newKey() });
    notes.push(
      `made keyring ${made.id} in ${displayPath(path)}, bound to ${store.description} (store id ${made.store.id}); back it up: 'token keyring export BACKUP'`,
    );
    return open(store, path, made, purpose, notes, inUse);
  }
  if (file.kind === "legacy") {
    if (storeId) {
      throw new ConfigError(
        `${displayPath(path)} is a keyring file of the old format, but token store ${store.description} is bound to a keyring already (store id ${storeId}): ` +
          "import that keyring's backup ('token keyring import BACKUP')",
      );
    }
    if (purpose !== "serve") {
      throw new ConfigError(
        `${displayPath(path)} is a keyring file of the old format, bound to no token store yet: start the KeyServer once with its own configuration (it binds its keyring to its store), then run this again`,
      );
    }
    const opened = legacyOpens(file, await store.all());
    if (opened.failed > 0) {
      throw new ConfigError(
        `${displayPath(path)} (old format) opens ${opened.ok} of the ${sealed} tokens in ${store.description}: it is not this store's keyring; ` +
          "start the KeyServer on the store it belongs to, or restore this store's keyring",
      );
    }
    const bound = await claim(store, path, { id: newId(), store: { id: newId(), at: store.description }, key: newKey() }, file);
    notes.push(
      `bound the keyring file of the old format to ${store.description} (store id ${bound.store.id}): its ${plural(file.keys.size, "master key")} now live in the store, wrapped under keyring ${bound.id}; back it up: 'token keyring export BACKUP'`,
    );
    return open(store, path, bound, purpose, notes, inUse);
  }
  if (storeId !== file.store.id) {
    const what = storeId ? `store id ${storeId}, bound to another keyring` : "bound to no keyring";
    const fix = purpose === "serve" ? "start the KeyServer with the store its keyring belongs to (--db), or import this store's keyring" : FIX_CONFIG;
    throw new ConfigError(
      `keyring ${displayPath(path)} belongs to token store ${file.store.at} (store id ${file.store.id}), not to ${store.description} (${what}): ${fix}`,
    );
  }
  return open(store, path, file, purpose, notes, inUse);
}

/** Binds a new keyring to the store: the file first under .new, then the store's id, then the file in place. */
async function claim(store: TokenStore, path: string, made: Omit<BoundKeyringFile, "kind">, legacy?: LegacyKeyringFile): Promise<BoundKeyringFile> {
  const pending = `${path}.new`;
  writeKeyringFile(pending, made);
  const claimed = await store.claimStoreId(made.store.id);
  if (claimed !== made.store.id) {
    rmSync(pending, { force: true });
    throw new ConfigError(
      `token store ${store.description} was bound to another keyring a moment ago (store id ${claimed}): import that keyring ('token keyring import BACKUP')`,
    );
  }
  const bound: BoundKeyringFile = { kind: "bound", ...made };
  if (legacy) await addLegacyVersions(store, bound, legacy);
  renameSync(pending, path);
  return bound;
}

async function addLegacyVersions(store: TokenStore, bound: BoundKeyringFile, legacy: LegacyKeyringFile): Promise<void> {
  for (const [version, key] of legacy.keys) await store.addKeyVersion(wrapKey(bound.key, bound.store.id, version, key));
}

function legacyOpens(file: LegacyKeyringFile, rows: Awaited<ReturnType<TokenStore["all"]>>): { ok: number; failed: number } {
  const ok = rows.filter((row) => {
    const key = file.keys.get(row.keyVersion);
    return key !== undefined && opensWith(key, row, TokenVault.context(row.clientId, row.tokenType));
  }).length;
  return { ok, failed: rows.length - ok };
}

async function open(
  store: TokenStore,
  path: string,
  file: BoundKeyringFile,
  purpose: VaultPurpose,
  notes: string[],
  inUse: Map<number, number>,
): Promise<OpenedVault> {
  const keyring = new MasterKeyring({ id: file.id, storeId: file.store.id, path, keyringKey: file.key, store });
  const archive = KeyArchiveFile.open(archivePathOf(path), file.id, file.store.id);
  try {
    await keyring.refresh();
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    throw new ConfigError(
      `the master keys in ${store.description} do not open under keyring ${displayPath(path)} (keyring ${file.id}): the keyring file was replaced or altered; restore it from its backup ('token keyring import BACKUP')`,
    );
  }
  // A store bound a moment ago, or by an opening that stopped before its first version: its first master key.
  if (keyring.versions.length === 0 && inUse.size === 0) {
    await store.addKeyVersion(wrapKey(file.key, file.store.id, 1, newKey()));
    await keyring.refresh();
  }
  const missing = [...inUse.keys()].filter((v) => !keyring.versions.includes(v)).sort((a, b) => a - b);
  if (missing.length > 0 && purpose === "serve") {
    const rows = missing.reduce((n, v) => n + inUse.get(v)!, 0);
    throw new ConfigError(
      `token store ${store.description} holds ${plural(rows, "token")} sealed under master key version(s) ${missing.join(", ")} that its keyring lacks: ` +
        `bring them back with 'token restore-key VERSION' (from ${displayPath(archive.path)}) or 'token keyring import BACKUP'`,
    );
  }
  return { vault: new TokenVault(store, keyring), archive, notes, missing };
}

/** Checks a wrapped key opens under a keyring key: for import, before a keyring file is written. */
export function opensUnder(key: Buffer, storeId: string, wrapped: Parameters<typeof unwrapKey>[2]): boolean {
  try {
    unwrapKey(key, storeId, wrapped);
    return true;
  } catch {
    return false;
  }
}
