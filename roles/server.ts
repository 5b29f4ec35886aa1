// A securemesh server: receives Fernet payloads with a sender proof over mutual TLS and commits them to the store.
import { join, resolve } from "node:path";
import { parseFlags, parsePort, parsePositive, pkiDir, policyPath, displayPath, REPO_ROOT } from "../shared/platform/config.ts";
import { chooseDbUrl } from "../shared/platform/config-file.ts";
import { FernetKeys } from "../shared/request-path/fernet-reload.ts";
import { CachedDataView } from "../shared/request-path/data-view.ts";
import { FernetRewrap } from "../shared/request-path/fernet-rewrap.ts";
import { ProofVerifier } from "../shared/request-path/proof.ts";
import { createServerApp } from "../shared/request-path/server-app.ts";
import { describeStoreUrl, openStore, storeFacts } from "../shared/request-path/store.ts";
import { runRole, type ServingConfig } from "../shared/service/run-role.ts";

export { createServerApp, senderIdempotencyKey, type ServerDeps } from "../shared/request-path/server-app.ts";

const USAGE = `
Usage: roles/server.ts PORT [options]

Receives Fernet-encrypted data over mutual TLS, checks the sender proof, and stores each record.
Every request must come through an identity the policy lets forward (the coordinator), and every
action is decided against the sender proof's identity by the policy.

Options:
  --host HOST        address to bind (default 127.0.0.1)
  --db URL           record store: mysql://user:pass@host:3306/db, several nodes of a Galera cluster as
                     mysql://user:pass@host1:3306,host2:3306,host3:3306/db, or a sqlite path
                     (default $DATABASE_URL, else data/records.db); a URL with a password is refused
                     here, where ps shows it: use --db-file or the config file
  --db-file FILE     the --db URL, read from FILE (0600)
  --pki DIR          PKI folder from pki.sh (default $PKI_DIR, else certs/)
  --no-crl           run without revocation: crl.pem is not read, no certificate is refused as revoked
                     (a warning at start says so); without it, no valid crl.pem stops the role
  --policy FILE      authorization policy (default $SECUREMESH_POLICY, else roles/policy.json);
                     it, the certificates and the CRL reload on change and on SIGHUP
  --ttl SECONDS      oldest Fernet token accepted (default $FERNET_TTL, else 300)
  --cache-ttl MS     how long get_data() stays cached (default 30000)
  --cache-entries N  cache bound, least recently used evicted first (default 16)
  --state-dir DIR    where a Fernet key retired from the file is kept while stored records still need it,
                     so a restart reads them too (default $STATE_DIRECTORY, as systemd sets it, else
                     data/server)
  -h, --help         show this help

The Fernet keys come from encryption_key.txt in --pki and reload within a second of a change and on SIGHUP
(rotate them with ./pki.sh fernet add, promote, retire); from $FERNET_KEY they do not reload. While it holds
old keys, the server re-encrypts stored records under them to the primary in the background, and keeps a key
retired from the file until no record uses it (/health: fernet_rewrap), in memory and in --state-dir.

Environment: LOG_FORMAT=json for JSON log lines, NO_COLOR to turn colours off.
`;

export interface ServerConfig extends ServingConfig {
  db: string | undefined;
  ttl: number;
  cacheTtlMs: number;
  cacheEntries: number;
  /** Kept Fernet keys live in its fernet-kept/ (FernetKeys.keepOnDisk). */
  stateDir: string;
}

export function parseServerConfig(argv: string[]): ServerConfig {
  const { values, positionals, sources } = parseFlags(
    "server",
    USAGE,
    {
      host: { type: "string" },
      db: { type: "string" },
      "db-file": { type: "string" },
      pki: { type: "string" },
      policy: { type: "string" },
      ttl: { type: "string" },
      "cache-ttl": { type: "string" },
      "cache-entries": { type: "string" },
      "no-crl": { type: "boolean" },
      "state-dir": { type: "string" },
    },
    argv,
  );
  return {
    port: parsePort(positionals[0] ?? process.env.PORT, "PORT (first argument)"),
    host: values.host ?? "127.0.0.1",
    db: chooseDbUrl(values, sources, "DATABASE_URL")?.url,
    pki: pkiDir(values.pki),
    policy: policyPath(values.policy),
    noCrl: values["no-crl"] ?? false,
    ttl: parsePositive(values.ttl ?? process.env.FERNET_TTL, "--ttl", 300),
    cacheTtlMs: parsePositive(values["cache-ttl"], "--cache-ttl", 30_000),
    cacheEntries: parsePositive(values["cache-entries"], "--cache-entries", 16),
    stateDir: resolve(values["state-dir"] ?? process.env.STATE_DIRECTORY ?? join(REPO_ROOT, "data", "server")),
  };
}

if (import.meta.main) {
  await runRole({
    name: "server",
    parse: parseServerConfig,
    // `check`: the Fernet keys and the database besides what every role checks (shared/service/host-check.ts).
    check: (config) => ({ fernet: true, store: () => storeFacts(config.db) }),
    async start({ config, logger, metrics, trust, authz, facts, limiter }) {
      // The keys follow encryption_key.txt (fernet-keys.ts add|promote|retire) as the certificates follow theirs.
      // A key retired while records still use it is kept on disk too, so a restart mid re-encryption loses none.
      const keys = FernetKeys.open(config.pki).keepOnDisk(join(config.stateDir, "fernet-kept"), logger).watch(logger);
      logger.info(`Fernet keys: ${keys.describe()}`);
      const fernet = keys.fernet;
      const verifier = new ProofVerifier(trust.identity.ca, { isRevoked: (serial) => trust.isRevoked(serial) });
      const store = await openStore(config.db);
      // Stored records are read with keys.records: the file's keys and any kept for records still under them, while
      // re-encryption moves those records to the primary (fernet-rewrap.ts). Requests only ever see the file's.
      const rewrap = new FernetRewrap({ store, keys, logger }).start();
      const view = new CachedDataView({ store, fernet: keys.records, logger, ttlMs: config.cacheTtlMs, maxEntries: config.cacheEntries });
      let port = config.port;
      const app = createServerApp({
        port: () => port,
        store,
        view,
        fernet,
        verifier,
        authz,
        logger,
        ttl: config.ttl,
        metrics,
        fernetKeys: () => keys.fingerprints,
        fernetRewrap: () => rewrap.status(),
        facts,
        limiter,
      });
      return {
        app,
        describe: `store: ${describeStoreUrl(config.db)}; policy: ${displayPath(config.policy)}`,
        // With port 0 the bound port is only known once listening; records name the real one.
        listening: (bound) => {
          port = bound;
        },
        // Proofs follow a new CA at once (before, a verifier built at start kept the old CA until a restart).
        onCertificate: (identity) => verifier.setCa(identity.ca),
        close: async () => {
          keys.stop();
          await rewrap.stop();
          return store.close();
        },
      };
    },
  });
}
