// The KeyServer: releases API tokens, sealed at rest, to the callers the policy names, through a hybrid exchange.
import { join } from "node:path";
import { text } from "node:stream/consumers";
import { Authorizer, mutualTlsListening, parseSpiffeId, TrustMaterial } from "../shared/authz/index.ts";
import { exitWithConfigError, parseFlags, parsePort, parsePositive, pkiDir, policyPath, REPO_ROOT, exitOnSignals, displayPath } from "../shared/platform/config.ts";
import { BadRequest, ConfigError, MeshError } from "../shared/platform/errors.ts";
import { createApp, listenReloadable, peerIdentity, readBodyLimited } from "../shared/platform/http.ts";
import { describeDatabaseUrl } from "../shared/db/database.ts";
import { MasterKeyring } from "../shared/token-path/keyring.ts";
import { createLogger, describeError, printable, type Logger } from "../shared/ops/log.ts";
import { Metrics } from "../shared/ops/metrics.ts";
import { NonceMemory, ReplayRejected } from "../shared/token-path/replay.ts";
import { assertSafeTlsEnvironment } from "../shared/platform/tls.ts";
import {
  EcdhKeyPair, ON_BEHALF_OF_HEADER, openJoseRequest, openLegacyRequest, proxyResource, RsaKeyPair, sealJoseResponse, sealLegacyResponse,
  type TokenRequest,
} from "../shared/token-path/token-exchange.ts";
import { openTokenStore, TokenVault } from "../shared/token-path/token-store.ts";
import { watchFiles, type Watch } from "../shared/platform/watch.ts";

const USAGE = `
Usage: roles/keyserver.ts [PORT] [options]             serve (default port 5003)
       roles/keyserver.ts token add --client ID --type TYPE --token T|-
       roles/keyserver.ts token list
       roles/keyserver.ts token rotate-key

Releases API tokens over mutual TLS. The policy decides: the TLS caller needs tokens.fetch (by default only the
SecureProxy), and the identity it asks for (header x-securemesh-on-behalf-of, else the caller itself) needs
proxy.use:CLIENTID/TOKENTYPE. Tokens are sealed at rest with AES-256-GCM under a versioned master key kept outside
the database; the running KeyServer picks up 'token rotate-key', the policy, the CRL and its certificate without
a restart.

Options:
  --db URL              token store: mysql://user:pass@host:3306/db (several hosts, comma-separated,
                        for a Galera cluster), or a sqlite path
                        (default $KEYSERVER_DB, else data/keyserver/tokens.db)
  --data DIR            where the RSA key and master keyring live (default data/keyserver), both mode 0600
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
  --token T             with 'token add': the token, or - to read it from stdin (keeps it out of ps)
  -h, --help            show this help
`;

export type LegacyReplay = "require" | "allow";

export interface KeyserverConfig {
  command: "serve" | "add" | "list" | "rotate-key";
  port: number;
  host: string;
  db: string;
  dataDir: string;
  pki: string;
  /** --no-crl: no revocation at all (#18). */
  noCrl: boolean;
  policy: string;
  legacyReplay: LegacyReplay;
  replayQuota: number;
  /** Take ECDH-ES requests beside RSA-OAEP-256 (#13, opt-in). */
  ecdhEs: boolean;
  client?: string;
  type?: string;
  token?: string;
}

export function parseKeyserverConfig(argv: string[]): KeyserverConfig {
  const { values, positionals } = parseFlags("keyserver", USAGE, {
    db: { type: "string" }, data: { type: "string" }, policy: { type: "string" }, "legacy-replay": { type: "string" },
    "replay-quota": { type: "string" }, "ecdh-es": { type: "boolean" }, host: { type: "string" }, pki: { type: "string" }, "no-crl": { type: "boolean" },
    client: { type: "string" },
    type: { type: "string" }, token: { type: "string" },
  }, argv);
  const dataDir = values.data ?? join(REPO_ROOT, "data", "keyserver");
  let command: KeyserverConfig["command"] = "serve";
  if (positionals[0] === "token") {
    const sub = positionals[1];
    if (sub !== "add" && sub !== "list" && sub !== "rotate-key") throw new ConfigError("token needs add, list or rotate-key (see --help)");
    command = sub;
    if (sub === "add" && !(values.client && values.type && values.token)) throw new ConfigError("token add needs --client, --type and --token");
  }
  const legacyReplay = values["legacy-replay"] ?? "require";
  if (legacyReplay !== "require" && legacyReplay !== "allow") throw new ConfigError("--legacy-replay must be require or allow");
  const replayQuota = parsePositive(values["replay-quota"], "--replay-quota", 10_000);
  if (!Number.isInteger(replayQuota)) throw new ConfigError(`--replay-quota must be a whole number, not '${values["replay-quota"]}'`);
  return {
    command,
    port: command === "serve" ? parsePort(positionals[0] ?? process.env.PORT, "PORT", 5003) : 0,
    host: values.host ?? "127.0.0.1",
    db: values.db ?? process.env.KEYSERVER_DB ?? join(dataDir, "tokens.db"),
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
  };
}

export interface KeyserverDeps {
  vault: TokenVault;
  keys: RsaKeyPair;
  /** The X25519 key of the opt-in ECDH-ES requests; without it they do not decrypt. */
  ecdh?: EcdhKeyPair;
  nonces: NonceMemory;
  logger: Logger;
  /** Decides tokens.fetch for the TLS caller and proxy.use for whom it asks. */
  authz: Authorizer;
  /** Whether the original JSON format may come without timestamp and nonce (#11 L8). */
  legacyReplay: LegacyReplay;
  metrics?: Metrics;
}

type Outcome = "released" | "forbidden" | "not_found" | "replay" | "replay_quota" | "decrypt_error" | "bad_request" | "error";

function outcomeOf(error: unknown): Outcome {
  switch ((error as MeshError).code) {
    case "ERR_FORBIDDEN": return "forbidden";
    case "ERR_DECRYPT": return "decrypt_error";
    case "ERR_REPLAY": return "replay";
    case "ERR_REPLAY_QUOTA": return "replay_quota";
    case "ERR_NOT_FOUND": return "not_found";
    case "ERR_BAD_REQUEST": case "ERR_UNSUPPORTED_MEDIA_TYPE": return "bad_request";
    default: return "error";
  }
}

/** Whom the caller asks for: the on-behalf-of header, which must be a SPIFFE ID, or else the caller itself. */
function onBehalfOf(request: Request, caller: string): string {
  const named = request.headers.get(ON_BEHALF_OF_HEADER);
  if (named === null) return caller;
  if (!parseSpiffeId(named)) throw new BadRequest(`${ON_BEHALF_OF_HEADER} must be a SPIFFE ID such as spiffe://securemesh/client/client1`);
  return named;
}

export function createKeyserverApp({ vault, keys, ecdh, nonces, logger, authz, legacyReplay, metrics = new Metrics() }: KeyserverDeps) {
  const releases = metrics.counter("securemesh_token_releases_total", "Token release attempts, by outcome.", ["outcome"]);
  /**
   * One line per release attempt: the TLS caller and whom it asked for (#11 H1), and on an error its code (#11
   * M4: "outcome=error" alone said nothing). Never the token, and only printable caller-supplied text.
   */
  const audit = (who: { caller: string; onBehalfOf: string }, request: Partial<TokenRequest>, outcome: Outcome, error?: unknown) => {
    releases.inc({ outcome });
    const code = outcome === "error" ? String((error as { code?: unknown })?.code ?? (error as Error)?.name ?? "unknown") : undefined;
    const fields = { caller: who.caller || "-", onBehalfOf: who.onBehalfOf || "-", clientId: request.clientId ?? "-", tokenType: request.tokenType ?? "-", outcome, ...(code ? { code } : {}) };
    logger.info(
      `AUDIT ${new Date().toISOString()} caller=${printable(fields.caller)} on_behalf_of=${printable(fields.onBehalfOf)} ` +
        `client=${printable(fields.clientId)} type=${printable(fields.tokenType)} outcome=${outcome}${code ? ` code=${printable(code)}` : ""}`,
      { audit: fields },
    );
  };

  return createApp({ logger, metrics })
    .get("/health", async () => {
      await vault.store.ping();
      return { status: "ok", role: "keyserver", store: vault.store.kind };
    })
    .get("/public_key", () => ({ public_key: keys.publicPem }))
    .post("/public_key", () => ({ public_key: keys.publicPem }), { parse: "none" })
    .get("/.well-known/jwks.json", () => ({ keys: ecdh ? [keys.jwk, ecdh.jwk] : [keys.jwk] }))
    .post("/", async ({ request }) => {
      // The caller's SPIFFE ID, from this connection's verified certificate (bound by the listener).
      const caller = peerIdentity(request);
      // What the audit line names until the header is checked; onBehalfOf() then says whom the request is for.
      const who = { caller, onBehalfOf: request.headers.get(ON_BEHALF_OF_HEADER) ?? caller };
      let parsed: Partial<TokenRequest> = {};
      try {
        authz.require(who.caller, "tokens.fetch");
        who.onBehalfOf = onBehalfOf(request, who.caller);
        const type = (request.headers.get("content-type") ?? "").toLowerCase();
        const jose = type.startsWith("application/jose");
        if (!jose && !type.startsWith("application/json")) throw new MeshError("ERR_UNSUPPORTED_MEDIA_TYPE", 415, "Content-Type must be application/json or application/jose");
        const text = new TextDecoder().decode(await readBodyLimited(request));
        parsed = jose ? await openJoseRequest(keys, text, ecdh) : await openLegacyRequest(keys, parseJson(text));
        // Defence in depth (#11 H1): the proxy checked this too, against the same policy.
        authz.require(who.onBehalfOf, "proxy.use", proxyResource(parsed.clientId!, parsed.tokenType!));
        checkReplay(nonces, parsed, { jose, legacyReplay, caller: who.onBehalfOf });
        const token = await vault.reveal(parsed.clientId!, parsed.tokenType!);
        if (token === undefined) throw new MeshError("ERR_NOT_FOUND", 404, "no token for that clientId and tokenType");
        const answer = jose
          ? new Response(await sealJoseResponse(token, parsed.sessionKey!), { headers: { "content-type": "application/jose" } })
          : Response.json({ token: sealLegacyResponse(token, parsed.sessionKey!) });
        audit(who, parsed, "released");
        return answer;
      } catch (error) {
        audit(who, parsed, outcomeOf(error), error);
        throw error;
      }
    }, { parse: "none" });
}

/**
 * JOSE requests always carry the replay fields. The original format had them optional, so the same body could be
 * released again and again (#11 L8); now they are required there too, unless the KeyServer runs with
 * `--legacy-replay allow` for old clients. The nonce counts against the quota of whom the token is for (#11 M3).
 */
function checkReplay(nonces: NonceMemory, request: Partial<TokenRequest>, options: { jose: boolean; legacyReplay: LegacyReplay; caller: string }): void {
  const carriesFields = request.timestamp !== undefined || request.nonce !== undefined;
  if (!options.jose && !carriesFields) {
    if (options.legacyReplay === "allow") return;
    throw new ReplayRejected("timestamp and nonce are required (old clients need the KeyServer's --legacy-replay allow)");
  }
  nonces.accept(request.timestamp, request.nonce, options.caller);
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new MeshError("ERR_BAD_REQUEST", 400, "request body is not valid JSON");
  }
}

async function openVault(config: KeyserverConfig): Promise<TokenVault> {
  const keyring = MasterKeyring.open(join(config.dataDir, "master_keys.json"));
  return new TokenVault(await openTokenStore(config.db), keyring);
}

/** The admin commands: they print what they did, never a token. */
async function admin(config: KeyserverConfig): Promise<void> {
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

async function main(): Promise<void> {
  const logger = createLogger("keyserver");
  let config: KeyserverConfig;
  try {
    assertSafeTlsEnvironment(); // the token commands read the master keys too
    config = parseKeyserverConfig(process.argv.slice(2));
    if (config.command !== "serve") return await admin(config);
  } catch (error) {
    exitWithConfigError("keyserver", error);
  }
  const metrics = new Metrics();
  let deps: KeyserverDeps;
  let trust: TrustMaterial;
  try {
    trust = TrustMaterial.open(config.pki, "keyserver", { noCrl: config.noCrl });
    const authz = new Authorizer(config.policy, logger, metrics);
    const keys = await RsaKeyPair.loadOrCreate(join(config.dataDir, "rsa_key.pem"));
    const ecdh = config.ecdhEs ? await EcdhKeyPair.loadOrCreate(join(config.dataDir, "ecdh_key.pem")) : undefined;
    const nonces = new NonceMemory({ maxPerCaller: config.replayQuota });
    deps = { vault: await openVault(config), keys, ecdh, nonces, logger, authz, legacyReplay: config.legacyReplay, metrics };
  } catch (error) {
    exitWithConfigError("keyserver", error);
  }
  const app = createKeyserverApp(deps);
  const listener = await listenReloadable(app, { port: config.port, hostname: config.host, ...mutualTlsListening(trust, deps.authz) })
    .catch((error) => exitWithConfigError("keyserver", error));
  // Revocation (asked per connection and per request), a renewed certificate and policy edits take effect without a
  // restart (#11).
  trust.onReload((_identity, changed) => (changed.certificate
    ? listener.reload(mutualTlsListening(trust).tls).catch((error: unknown) => logger.error(`TLS listener kept its old material: ${describeError(error)}`))
    : undefined)).watch(logger);
  deps.authz.watch();
  const keyring = watchKeyring(deps.vault, logger);
  logger.info(`keyserver listening on https://${config.host}:${listener.port} (tokens: ${describeDatabaseUrl(config.db)}; policy: ${displayPath(config.policy)}; legacy replay: ${config.legacyReplay}${deps.ecdh ? "; ECDH-ES (X25519) too" : ""})`);

  exitOnSignals(async () => {
    keyring.stop();
    deps.authz.stop();
    trust.stop();
    await listener.stop();
    await deps.vault.store.close().catch((error) => logger.warn(`closing the token store: ${describeError(error)}`));
  });
}

/**
 * `token rotate-key` runs as another process and rewrites the keyring file; the running KeyServer re-reads it when
 * it changes (#11 M4). A seal that does not open also re-reads it at once (TokenVault.reveal), so no release
 * waits for this poll.
 */
function watchKeyring(vault: TokenVault, logger: Logger): Watch {
  return watchFiles([vault.keyring.path], () => {
    try {
      vault.keyring.reload();
      logger.info(`master keyring reloaded: versions ${vault.keyring.versions.join(", ")} (current v${vault.keyring.currentVersion})`);
    } catch (error) {
      logger.error(`master keyring NOT reloaded, the keys in memory stay in use: ${describeError(error).replace(/^ERR_CONFIG: /, "")}`);
    }
  });
}

if (import.meta.main) await main();
