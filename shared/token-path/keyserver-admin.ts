// The KeyServer's token vault as its role and its admin commands open it, the admin commands themselves, and the
// watch that picks up a keyring rewritten by another process. They print what they did, never a token.
import { join } from "node:path";
import { text } from "node:stream/consumers";
import { ConfigError } from "../platform/errors.ts";
import { watchFiles, type Watch } from "../platform/watch.ts";
import { describeDatabaseUrl } from "../db/database.ts";
import { describeError, type Logger } from "../ops/log.ts";
import { MasterKeyring } from "./keyring.ts";
import { openTokenStore, TokenVault } from "./token-store.ts";

/** What the vault and the admin commands need of the KeyServer's configuration. */
export interface VaultConfig {
  command: "serve" | "add" | "list" | "rotate-key";
  db: string;
  dataDir: string;
  client?: string;
  type?: string;
  token?: string;
}

export async function openVault(config: VaultConfig): Promise<TokenVault> {
  const keyring = MasterKeyring.open(join(config.dataDir, "master_keys.json"));
  return new TokenVault(await openTokenStore(config.db), keyring);
}

/** The admin commands: they print what they did, never a token. */
export async function runTokenCommand(config: VaultConfig): Promise<void> {
  const vault = await openVault(config);
  try {
    if (config.command === "add") {
      const token = config.token === "-" ? (await text(process.stdin)).trim() : config.token!;
      if (!token) throw new ConfigError("the token is empty");
      await vault.add(config.client!, config.type!, token);
      console.log(`stored token for client=${config.client} type=${config.type} (sealed under master key v${vault.keyring.currentVersion})`);
    } else if (config.command === "list") {
      const rows = await vault.store.all();
      console.log(`${rows.length} token(s) in ${describeDatabaseUrl(config.db)}; master key versions: ${vault.keyring.versions.join(", ")} (current v${vault.keyring.currentVersion})`);
      for (const r of rows) console.log(`  client=${r.clientId} type=${r.tokenType} key=v${r.keyVersion} updated=${new Date(r.updatedAt).toISOString()}`);
    } else {
      const { version, resealed, retired } = await vault.rotate();
      console.log(`re-sealed ${resealed} token(s) under master key v${version}; retired versions: ${retired.length ? retired.join(", ") : "none"}`);
    }
  } finally {
    await vault.store.close();
  }
}

/**
 * `token rotate-key` runs as another process and rewrites the keyring file; the running KeyServer re-reads it when
 * it changes (#11 M4). A seal that does not open also re-reads it at once (TokenVault.reveal), so no release
 * waits for this poll.
 */
export function watchKeyring(vault: TokenVault, logger: Logger): Watch {
  return watchFiles([vault.keyring.path], () => {
    try {
      vault.keyring.reload();
      logger.info(`master keyring reloaded: versions ${vault.keyring.versions.join(", ")} (current v${vault.keyring.currentVersion})`);
    } catch (error) {
      logger.error(`master keyring NOT reloaded, the keys in memory stay in use: ${describeError(error).replace(/^ERR_CONFIG: /, "")}`);
    }
  });
}
