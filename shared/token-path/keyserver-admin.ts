// The KeyServer's admin commands, on the vault as the running KeyServer opens it (vault-binding.ts: the same store and
// keyring, or a refusal naming both), and the refresh that lets a running KeyServer see another host's rotation. Each
// command says which store and keyring it acts on and what it did, never a token or a key.
import { readFileSync } from "node:fs";
import { text } from "node:stream/consumers";
import { ConfigError } from "../platform/errors.ts";
import { displayPath } from "../platform/paths.ts";
import { createPrivateFile, readPrivateFile } from "../platform/private-files.ts";
import { describeError, type Logger } from "../ops/log.ts";
import { BACKUP_KDF, openBackup, sealBackup } from "./keyring-backup.ts";
import { archivePathOf, KeyArchiveFile, readKeyringFile, writeKeyringFile } from "./keyring-file.ts";
import { keyringPathOf, openVault, opensUnder, type OpenedVault } from "./vault-binding.ts";
import { openTokenStore } from "./token-store.ts";

export type TokenCommand = "add" | "list" | "rotate-key" | "restore-key" | "export" | "import";

/** What the vault and the admin commands need of the KeyServer's configuration. */
export interface VaultConfig {
  command: "serve" | TokenCommand;
  db: string;
  /** Where `db` came from ("--db", "SECUREMESH_DB in --config FILE", "the default", …), said by every command. */
  dbSource: string;
  dataDir: string;
  client?: string;
  type?: string;
  token?: string;
  /** restore-key's VERSION. */
  version?: number;
  /** export's and import's FILE. */
  file?: string;
  /** Where export and import read the passphrase, instead of stdin. */
  passphraseFile?: string;
}

const TOKEN_COMMANDS = "token add, list, rotate-key, restore-key VERSION, keyring export FILE or keyring import FILE";

/** The token command a KeyServer's positionals name, or "serve" when they name none; a mistake is one clear line. */
export function parseTokenCommand(positionals: string[]): Pick<VaultConfig, "command" | "version" | "file"> {
  if (positionals[0] !== "token") return { command: "serve" };
  const [, sub, arg, extra] = positionals;
  switch (sub) {
    case "add":
    case "list":
    case "rotate-key":
      if (arg !== undefined) throw new ConfigError(`token ${sub} takes no '${arg}' (see --help)`);
      return { command: sub };
    case "restore-key":
      if (!arg || !/^[1-9]\d{0,8}$/.test(arg) || extra !== undefined)
        throw new ConfigError("token restore-key needs one VERSION, a number such as 1 ('token list' shows the archived ones)");
      return { command: "restore-key", version: Number(arg) };
    case "keyring":
      if ((arg !== "export" && arg !== "import") || !extra || positionals.length > 4)
        throw new ConfigError("token keyring needs export FILE or import FILE (see --help)");
      return { command: arg, file: extra };
    default:
      throw new ConfigError(`token needs ${TOKEN_COMMANDS} (see --help)`);
  }
}

/** Where an admin command reads and writes: stdin and stdout, or a test's. */
export interface CommandIo {
  stdin(): Promise<string>;
  say(line: string): void;
}

const processIo: CommandIo = { stdin: () => text(process.stdin), say: (line) => console.log(line) };

const versionList = (versions: readonly number[]) => (versions.length ? versions.join(", ") : "none");

/** The admin commands: they print what they did, never a token or a key. */
export async function runTokenCommand(config: VaultConfig, io: CommandIo = processIo): Promise<void> {
  if (config.command === "import") return importKeyring(config, io);
  const opened = await openVault(config, config.command === "add" ? "add" : "use");
  const { vault, archive } = opened;
  try {
    io.say(
      `token store ${vault.store.description} (store id ${vault.keyring.storeId}, from ${config.dbSource}); keyring ${displayPath(vault.keyring.path)} ` +
        `(keyring ${vault.keyring.id}, master key versions ${versionList(vault.keyring.versions)}, current v${vault.keyring.currentVersion})`,
    );
    for (const note of opened.notes) io.say(note);
    if (opened.missing.length)
      io.say(
        `WARNING: tokens in this store are sealed under master key version(s) ${opened.missing.join(", ")}, which the keyring lacks: 'token restore-key VERSION' brings one back from ${displayPath(archive.path)}`,
      );
    switch (config.command) {
      case "add": {
        const token = config.token === "-" ? firstLine(await io.stdin()) : config.token!;
        if (!token) throw new ConfigError("the token is empty");
        await vault.add(config.client!, config.type!, token);
        io.say(
          `stored token for client=${config.client} type=${config.type} in ${vault.store.description} (sealed under master key v${vault.keyring.currentVersion})`,
        );
        return;
      }
      case "list": {
        const rows = await vault.store.all();
        io.say(
          `${rows.length} token(s) in ${vault.store.description}; master key versions: ${versionList(vault.keyring.versions)} (current v${vault.keyring.currentVersion}); archived: ${versionList(archive.versions)}`,
        );
        for (const r of rows) io.say(`  client=${r.clientId} type=${r.tokenType} key=v${r.keyVersion} updated=${new Date(r.updatedAt).toISOString()}`);
        return;
      }
      case "rotate-key": {
        const { version, resealed, retired, unopened } = await vault.rotate(archive);
        const where = retired.length ? ` (archived in ${displayPath(archive.path)}; 'token restore-key VERSION' brings one back)` : "";
        io.say(`re-sealed ${resealed} token(s) under master key v${version}; retired versions: ${versionList(retired)}${where}`);
        if (unopened.length)
          io.say(`WARNING: ${unopened.length} token(s) did not open and keep their version, which stays in the keyring: ${unopened.join(", ")}`);
        return;
      }
      case "restore-key":
        return await restoreKey(opened, config.version!, io);
      case "export":
        return await exportKeyring(opened, config, io);
    }
  } finally {
    await vault.store.close();
  }
}

function firstLine(input: string): string {
  return (input.split(/\r?\n/)[0] ?? "").trim();
}

async function restoreKey({ vault, archive }: OpenedVault, version: number, io: CommandIo): Promise<void> {
  if (vault.keyring.versions.includes(version)) {
    io.say(`master key v${version} is in the keyring already: nothing to restore`);
    return;
  }
  const archived = archive.get(version);
  if (!archived)
    throw new ConfigError(
      `master key v${version} is not in the archive ${displayPath(archive.path)} (archived versions: ${versionList(archive.versions)}); a keyring backup that holds it can be imported on a host without this keyring`,
    );
  const file = readKeyringFile(vault.keyring.path);
  if (file?.kind !== "bound" || !opensUnder(file.key, vault.keyring.storeId, archived))
    throw new ConfigError(`master key v${version} in ${displayPath(archive.path)} does not open under keyring ${vault.keyring.id}: the archive was altered`);
  await vault.store.addKeyVersion(archived);
  await vault.keyring.refresh();
  io.say(
    `restored master key v${version} from ${displayPath(archive.path)} into ${vault.store.description}; master key versions: ${versionList(vault.keyring.versions)} (current v${vault.keyring.currentVersion}); running KeyServers pick it up within seconds`,
  );
}

/** The passphrase: the first line of --passphrase-file (0600) or of stdin. */
async function passphrase(config: VaultConfig, io: CommandIo): Promise<string> {
  const from = config.passphraseFile ? readPrivateFile(config.passphraseFile) : await io.stdin();
  const phrase = firstLine(from);
  if (!phrase)
    throw new ConfigError(
      `no passphrase ${config.passphraseFile ? `in ${displayPath(config.passphraseFile)}` : "on stdin"} (give it on stdin, or --passphrase-file FILE)`,
    );
  return phrase;
}

async function exportKeyring({ vault, archive }: OpenedVault, config: VaultConfig, io: CommandIo): Promise<void> {
  const file = readKeyringFile(vault.keyring.path);
  if (file?.kind !== "bound") throw new ConfigError(`${displayPath(vault.keyring.path)} changed while exporting`);
  const versions = await vault.store.keyVersions();
  const archived = archive.versions.map((v) => archive.get(v)!);
  const sealed = sealBackup({ keyring: file.id, store: file.store, key: file.key, versions, archived }, await passphrase(config, io));
  if (!createPrivateFile(config.file!, sealed))
    throw new ConfigError(`${displayPath(config.file!)} exists: export to a new file (a backup is never overwritten)`);
  io.say(
    `wrote an encrypted backup of keyring ${file.id} (token store ${file.store.at}, store id ${file.store.id}; master key versions ${versionList(versions.map((k) => k.version))}; ` +
      `archived: ${versionList(archive.versions)}) to ${displayPath(config.file!)} (0600; scrypt N=2^${Math.log2(BACKUP_KDF.N)} r=${BACKUP_KDF.r} p=${BACKUP_KDF.p}, AES-256-GCM): ` +
      "keep it and its passphrase apart, and off this host",
  );
}

/**
 * Installs a keyring from a backup on this host, for the store this host's configuration names, which must be the
 * store the keyring is bound to. A keyring file already here is never overwritten, unless it is the same keyring.
 */
async function importKeyring(config: VaultConfig, io: CommandIo): Promise<void> {
  const where = displayPath(config.file!);
  let backupText: string;
  try {
    backupText = readFileSync(config.file!, "utf8");
  } catch (error) {
    throw new ConfigError(`cannot read ${where}: ${(error as NodeJS.ErrnoException).code ?? "unreadable"}`);
  }
  const backup = openBackup(backupText, await passphrase(config, io), where);
  const path = keyringPathOf(config.dataDir);
  const here = readKeyringFile(path);
  if (here && !(here.kind === "bound" && here.id === backup.keyring)) {
    const which = here.kind === "bound" ? `keyring ${here.id}, bound to ${here.store.at}` : "a keyring file of the old format";
    throw new ConfigError(
      `${displayPath(path)} holds another keyring (${which}): move it aside first if nothing needs it (an import never overwrites a keyring)`,
    );
  }
  const store = await openTokenStore(config.db);
  try {
    const storeId = await store.storeId();
    if (storeId !== backup.store.id) {
      throw new ConfigError(
        `${where} is the keyring of token store ${backup.store.at} (store id ${backup.store.id}), but this configuration's token store is ${store.description} ` +
          `(${storeId ? `store id ${storeId}` : "bound to no keyring"}): give it the KeyServer's own configuration (--config FILE, or the --db or --db-file the KeyServer runs with)`,
      );
    }
    const versions = await store.keyVersions();
    const foreign = versions.filter((k) => !opensUnder(backup.key, storeId, k)).map((k) => k.version);
    if (foreign.length)
      throw new ConfigError(
        `master key version(s) ${foreign.join(", ")} in ${store.description} do not open under the keyring in ${where}: it is not this store's keyring`,
      );
    // The archive first: one of another keyring left here refuses the import before anything is written.
    const archive = KeyArchiveFile.open(archivePathOf(path), backup.keyring, storeId);
    if (!here) writeKeyringFile(path, { id: backup.keyring, store: backup.store, key: backup.key });
    const inStore = new Set(versions.map((k) => k.version));
    // Versions the store no longer holds go to the archive, where 'token restore-key' finds them.
    archive.put([...backup.archived, ...backup.versions].filter((k) => !inStore.has(k.version)));
    const inUse = await store.versionsInUse();
    const missing = [...inUse.keys()].filter((v) => !inStore.has(v));
    io.say(
      `${here ? "keyring already here: kept" : "imported"} keyring ${backup.keyring} from ${where} ${here ? "in" : "into"} ${displayPath(path)} (0600), bound to ${store.description} (store id ${storeId}); ` +
        `it opens master key versions ${versionList([...inStore].sort((a, b) => a - b))} of that store; archived versions in ${displayPath(archive.path)}: ${versionList(archive.versions)}`,
    );
    if (missing.length)
      io.say(
        `WARNING: tokens in this store are sealed under master key version(s) ${missing.join(", ")}, which the store's keyring lacks: 'token restore-key VERSION' brings one back`,
      );
  } finally {
    await store.close();
  }
}

/** How often a running KeyServer re-reads the master key versions, so it forgets retired ones without a restart. */
export const KEYRING_REFRESH_MS = 5000;

/**
 * `token rotate-key` runs as another process, maybe on another host, and changes the versions in the store; the
 * running KeyServer re-reads them every few seconds (#11 M4), and at once when a seal does not open with the keys in
 * memory (TokenVault.reveal), so no release waits for this timer.
 */
export function keepKeyringFresh(vault: OpenedVault["vault"], logger: Logger, intervalMs = KEYRING_REFRESH_MS): { stop(): void } {
  let seen = vault.keyring.versions.join(",");
  let failing = "";
  let busy = false;
  const timer = setInterval(() => {
    // A read stalled on a Galera node that is losing quorum may outlast the interval: one at a time.
    if (busy) return;
    busy = true;
    vault.keyring
      .refresh()
      .finally(() => {
        busy = false;
      })
      .then(
        () => {
          failing = "";
          const now = vault.keyring.versions.join(",");
          if (now === seen) return;
          seen = now;
          logger.info(`master keyring reloaded: versions ${versionList(vault.keyring.versions)} (current v${vault.keyring.currentVersion})`);
        },
        (error: unknown) => {
          const why = describeError(error);
          if (why !== failing) logger.error(`master keyring NOT reloaded, the keys in memory stay in use: ${why}`);
          failing = why;
        },
      );
  }, intervalMs);
  timer.unref?.();
  return { stop: () => clearInterval(timer) };
}
