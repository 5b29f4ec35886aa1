// The KeyServer: releases API tokens, sealed at rest, to the callers the policy names, through a hybrid exchange.
import { join } from "node:path";
import { displayPath, exitWithConfigError, parseFlags, parsePort, parsePositive, pkiDir, policyPath, REPO_ROOT } from "../shared/platform/config.ts";
import { chooseDbUrl } from "../shared/platform/config-file.ts";
import { ConfigError } from "../shared/platform/errors.ts";
import { describeError } from "../shared/ops/log.ts";
import { createKeyserverApp, type LegacyReplay } from "../shared/token-path/keyserver-app.ts";
import { keepKeyringFresh, parseTokenCommand, runTokenCommand, type VaultConfig } from "../shared/token-path/keyserver-admin.ts";
import { openVault } from "../shared/token-path/vault-binding.ts";
import { NonceMemory } from "../shared/token-path/replay.ts";
import { EcdhKeyPair, RsaKeyPair } from "../shared/token-path/token-exchange.ts";
import { readConfig, runRole, type ServingConfig } from "../shared/service/run-role.ts";

export { createKeyserverApp, type KeyserverDeps, type LegacyReplay } from "../shared/token-path/keyserver-app.ts";

const USAGE = `
Usage: roles/keyserver.ts [PORT] [options]             serve (default port 5003)
       roles/keyserver.ts token add --client ID --type TYPE --token -   (the token on stdin)
       roles/keyserver.ts token list
       roles/keyserver.ts token rotate-key
       roles/keyserver.ts token restore-key VERSION          (from master_keys.archive.json)
       roles/keyserver.ts token keyring export FILE          (encrypted backup; the passphrase on stdin)
       roles/keyserver.ts token keyring import FILE          (on another or a new KeyServer host)

Releases API tokens over mutual TLS. The policy decides: the TLS caller needs tokens.fetch (by default only the
SecureProxy), and the identity it asks for (header x-securemesh-on-behalf-of, else the caller itself) needs
proxy.use:CLIENTID/TOKENTYPE. Tokens are sealed at rest with AES-256-GCM under versioned master keys, kept in the
token store wrapped under the keyring key of master_keys.json (in --data, 0600), which is bound to that store: every
KeyServer on the store needs the same keyring ('token keyring export' / 'import'), and a keyring and a store that do
not belong together are refused. Run the token commands with the KeyServer's own configuration (the same config
file, or its --db and --data): they say which store and keyring they act on. The running KeyServer picks up
'token rotate-key', the policy, the CRL and its certificate without a restart.

Options:
  --db URL              token store: mysql://user:pass@host:3306/db (several hosts, comma-separated,
                        for a Galera cluster), or a sqlite path
                        (default $KEYSERVER_DB, else tokens.db in --data); a URL with a password is
                        refused here, where ps shows it: use --db-file or the config file
  --db-file FILE        the --db URL, read from FILE (0600)
  --data DIR            where the RSA key, the keyring file (master_keys.json) and the archive of retired master
                        keys (master_keys.archive.json) live (default data/keyserver), all mode 0600; each
                        KeyServer keeps its own RSA key: never copy rsa_key.pem to another host
  --passphrase-file FILE with 'token keyring export|import': the backup's passphrase (0600), instead of stdin
  --policy FILE         authorization policy (default $SECUREMESH_POLICY, else roles/policy.json)
  --legacy-replay MODE  require (default): the original JSON format must carry timestamp and nonce, like JOSE;
                        allow: accept it without them, for old clients (replayable)
  --replay-quota N      live nonces one identity may hold in the replay window (default 10000)
  --ecdh-es             also take JOSE requests with ECDH-ES (X25519) key agreement, a sixth of RSA's CPU to
                        open; its key (ecdh_key.pem in --data, 0600) is published in /.well-known/jwks.json
  --host HOST           address to bind (default 127.0.0.1)
  --pki DIR             PKI folder from pki.sh (default $PKI_DIR, else certs/)
  --no-crl              run without revocation: crl.pem is not read, no certificate is refused as revoked
                        (a warning at start says so); without it, no valid crl.pem stops the role
  --token -             with 'token add': read the token from stdin (a token on the command line is refused:
                        ps shows it)
  -h, --help            show this help
`;

export interface KeyserverConfig extends ServingConfig, VaultConfig {
  legacyReplay: LegacyReplay;
  replayQuota: number;
  /** Take ECDH-ES requests beside RSA-OAEP-256 (#13, opt-in). */
  ecdhEs: boolean;
}

export function parseKeyserverConfig(argv: string[]): KeyserverConfig {
  const { values, positionals, sources } = parseFlags(
    "keyserver",
    USAGE,
    {
      db: { type: "string" },
      "db-file": { type: "string" },
      data: { type: "string" },
      policy: { type: "string" },
      "legacy-replay": { type: "string" },
      "replay-quota": { type: "string" },
      "ecdh-es": { type: "boolean" },
      host: { type: "string" },
      pki: { type: "string" },
      "no-crl": { type: "boolean" },
      client: { type: "string" },
      type: { type: "string" },
      token: { type: "string" },
      "passphrase-file": { type: "string" },
    },
    argv,
  );
  if (values.token !== undefined && values.token !== "-" && sources.token === "argv") {
    throw new ConfigError("--token on the command line shows in ps: give --token - and the token on stdin");
  }
  const dataDir = values.data ?? join(REPO_ROOT, "data", "keyserver");
  const { command, version, file } = parseTokenCommand(positionals);
  if (command === "add" && !(values.client && values.type && values.token)) throw new ConfigError("token add needs --client, --type and --token");
  const legacyReplay = values["legacy-replay"] ?? "require";
  if (legacyReplay !== "require" && legacyReplay !== "allow") throw new ConfigError("--legacy-replay must be require or allow");
  const replayQuota = parsePositive(values["replay-quota"], "--replay-quota", 10_000);
  if (!Number.isInteger(replayQuota)) throw new ConfigError(`--replay-quota must be a whole number, not '${values["replay-quota"]}'`);
  const { url: db, source: dbSource } = chooseDbUrl(values, sources, "KEYSERVER_DB") ?? {
    url: join(dataDir, "tokens.db"),
    source: "the default: no --db, --db-file, --config or $SECUREMESH_DB",
  };
  return {
    command,
    port: command === "serve" ? parsePort(positionals[0] ?? process.env.PORT, "PORT", 5003) : 0,
    host: values.host ?? "127.0.0.1",
    db,
    dbSource,
    dataDir,
    pki: pkiDir(values.pki),
    noCrl: values["no-crl"] ?? false,
    policy: policyPath(values.policy),
    legacyReplay,
    replayQuota,
    ecdhEs: values["ecdh-es"] ?? false,
    client: values.client,
    type: values.type,
    token: values.token,
    version,
    file,
    passphraseFile: values["passphrase-file"],
  };
}

if (import.meta.main) {
  const config = readConfig("keyserver", parseKeyserverConfig);
  // The admin commands read the master keys too: after the same guard, they act and exit.
  if (config.command !== "serve") await runTokenCommand(config).catch((error) => exitWithConfigError("keyserver", error));
  else
    await runRole({
      name: "keyserver",
      parse: () => config,
      async start({ logger, metrics, authz, limiter }) {
        // The keyring and the store first: a pair that does not belong together stops the role before it makes a file.
        const { vault, notes } = await openVault(config, "serve");
        for (const note of notes) logger.info(note);
        const keys = await RsaKeyPair.loadOrCreate(join(config.dataDir, "rsa_key.pem"));
        const ecdh = config.ecdhEs ? await EcdhKeyPair.loadOrCreate(join(config.dataDir, "ecdh_key.pem")) : undefined;
        const nonces = new NonceMemory({ maxPerCaller: config.replayQuota });
        const keyring = keepKeyringFresh(vault, logger);
        return {
          app: createKeyserverApp({ vault, keys, ecdh, nonces, logger, authz, legacyReplay: config.legacyReplay, metrics, limiter }),
          describe: `tokens: ${vault.store.description} (store id ${vault.keyring.storeId}), keyring ${vault.keyring.id} v${vault.keyring.currentVersion}; policy: ${displayPath(config.policy)}; legacy replay: ${config.legacyReplay}${ecdh ? "; ECDH-ES (X25519) too" : ""}`,
          async close() {
            keyring.stop();
            await vault.store.close().catch((error) => logger.warn(`closing the token store: ${describeError(error)}`));
          },
        };
      },
    });
}
