// The KeyServer: releases API tokens, sealed at rest, only to SecureProxy callers, through a hybrid exchange.
import { join } from "node:path";
import { exitWithConfigError, parseFlags, parsePort, pkiDir, REPO_ROOT, exitOnSignals } from "../shared/config.ts";
import { ConfigError, Forbidden, MeshError } from "../shared/errors.ts";
import { createApp } from "../shared/http.ts";
import { MasterKeyring } from "../shared/keyring.ts";
import { createLogger, describeError, printable, type Logger } from "../shared/log.ts";
import { Metrics } from "../shared/metrics.ts";
import { listenWithPeerIdentity, PEER_HEADER } from "../shared/peer-tls.ts";
import { NonceMemory } from "../shared/replay.ts";
import { describeStoreUrl } from "../shared/store.ts";
import { assertSafeTlsEnvironment, loadIdentity, mutualTlsServerOptions } from "../shared/tls.ts";
import {
  openJoseRequest, openLegacyRequest, RsaKeyPair, sealJoseResponse, sealLegacyResponse, type TokenRequest,
} from "../shared/token-exchange.ts";
import { openTokenStore, TokenVault } from "../shared/token-store.ts";

const USAGE = `
Usage: bun roles/keyserver.ts [PORT] [options]             serve (default port 5003)
       bun roles/keyserver.ts token add --client ID --type TYPE --token T|-
       bun roles/keyserver.ts token list
       bun roles/keyserver.ts token rotate-key

Releases API tokens over mutual TLS, only to callers whose certificate CN is allowed (default: secureproxy).
Tokens are sealed at rest with AES-256-GCM under a versioned master key kept outside the database.

Options:
  --db URL            token store: mysql://user:pass@host:3306/db, or a sqlite path
                      (default $KEYSERVER_DB, else data/keyserver/tokens.db)
  --data DIR          where the RSA key and master keyring live (default data/keyserver), both mode 0600
  --allow-callers CN  comma-separated certificate CNs allowed to fetch tokens (default secureproxy)
  --host HOST         address to bind (default 127.0.0.1)
  --pki DIR           PKI folder from pki.sh (default $PKI_DIR, else certs/)
  --token T           with 'token add': the token, or - to read it from stdin (keeps it out of ps)
  -h, --help          show this help
`;

export interface KeyserverConfig {
  command: "serve" | "add" | "list" | "rotate-key";
  port: number;
  host: string;
  db: string;
  dataDir: string;
  pki: string;
  allowedCallers: string[];
  client?: string;
  type?: string;
  token?: string;
}

export function parseKeyserverConfig(argv: string[]): KeyserverConfig {
  const { values, positionals } = parseFlags("keyserver", USAGE, {
    db: { type: "string" }, data: { type: "string" }, "allow-callers": { type: "string" }, host: { type: "string" },
    pki: { type: "string" }, client: { type: "string" }, type: { type: "string" }, token: { type: "string" },
  }, argv);
  const dataDir = values.data ?? join(REPO_ROOT, "data", "keyserver");
  let command: KeyserverConfig["command"] = "serve";
  if (positionals[0] === "token") {
    const sub = positionals[1];
    if (sub !== "add" && sub !== "list" && sub !== "rotate-key") throw new ConfigError("token needs add, list or rotate-key (see --help)");
    command = sub;
    if (sub === "add" && !(values.client && values.type && values.token)) throw new ConfigError("token add needs --client, --type and --token");
  }
  return {
    command,
    port: command === "serve" ? parsePort(positionals[0] ?? process.env.PORT, "PORT", 5003) : 0,
    host: values.host ?? "127.0.0.1",
    db: values.db ?? process.env.KEYSERVER_DB ?? join(dataDir, "tokens.db"),
    dataDir,
    pki: pkiDir(values.pki),
    allowedCallers: (values["allow-callers"] ?? "secureproxy").split(",").map((s) => s.trim()).filter(Boolean),
    client: values.client,
    type: values.type,
    token: values.token,
  };
}

export interface KeyserverDeps {
  vault: TokenVault;
  keys: RsaKeyPair;
  nonces: NonceMemory;
  logger: Logger;
  allowedCallers: readonly string[];
  metrics?: Metrics;
}

type Outcome = "released" | "forbidden" | "not_found" | "replay" | "decrypt_error" | "bad_request" | "error";

function outcomeOf(error: unknown): Outcome {
  switch ((error as MeshError).code) {
    case "ERR_FORBIDDEN": return "forbidden";
    case "ERR_DECRYPT": return "decrypt_error";
    case "ERR_REPLAY": return "replay";
    case "ERR_NOT_FOUND": return "not_found";
    case "ERR_BAD_REQUEST": case "ERR_UNSUPPORTED_MEDIA_TYPE": return "bad_request";
    default: return "error";
  }
}

export function createKeyserverApp({ vault, keys, nonces, logger, allowedCallers, metrics = new Metrics() }: KeyserverDeps) {
  const releases = metrics.counter("securemesh_token_releases_total", "Token release attempts, by outcome.", ["outcome"]);
  /** One line per release attempt; never the token, and only printable caller-supplied text. */
  const audit = (caller: string, request: Partial<TokenRequest>, outcome: Outcome) => {
    releases.inc({ outcome });
    const fields = { caller, clientId: request.clientId ?? "-", tokenType: request.tokenType ?? "-", outcome };
    logger.info(`AUDIT ${new Date().toISOString()} caller=${printable(fields.caller || "-")} client=${printable(fields.clientId)} type=${printable(fields.tokenType)} outcome=${outcome}`, { audit: fields });
  };

  return createApp({ logger, metrics })
    .get("/health", async () => {
      await vault.store.ping();
      return { status: "ok", role: "keyserver", store: vault.store.kind };
    })
    .get("/public_key", () => ({ public_key: keys.publicPem }))
    .post("/public_key", () => ({ public_key: keys.publicPem }), { parse: "none" })
    .get("/.well-known/jwks.json", () => ({ keys: [keys.jwk] }))
    .post("/", async ({ request }) => {
      const caller = request.headers.get(PEER_HEADER) ?? "";
      let parsed: Partial<TokenRequest> = {};
      try {
        if (!allowedCallers.includes(caller)) throw new Forbidden(`caller '${caller || "unknown"}' may not request tokens`);
        const type = (request.headers.get("content-type") ?? "").toLowerCase();
        const jose = type.startsWith("application/jose");
        if (!jose && !type.startsWith("application/json")) throw new MeshError("ERR_UNSUPPORTED_MEDIA_TYPE", 415, "Content-Type must be application/json or application/jose");
        const text = await request.text();
        parsed = jose ? await openJoseRequest(keys, text) : await openLegacyRequest(keys, parseJson(text));
        // JOSE requests always carry the replay fields; the original format has them optional, for old clients.
        if (jose || parsed.timestamp !== undefined || parsed.nonce !== undefined) nonces.accept(parsed.timestamp, parsed.nonce);
        const token = await vault.reveal(parsed.clientId!, parsed.tokenType!);
        if (token === undefined) throw new MeshError("ERR_NOT_FOUND", 404, "no token for that clientId and tokenType");
        const answer = jose
          ? new Response(await sealJoseResponse(token, parsed.sessionKey!), { headers: { "content-type": "application/jose" } })
          : Response.json({ token: sealLegacyResponse(token, parsed.sessionKey!) });
        audit(caller, parsed, "released");
        return answer;
      } catch (error) {
        audit(caller, parsed, outcomeOf(error));
        throw error;
      }
    }, { parse: "none" });
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
      const token = config.token === "-" ? (await Bun.stdin.text()).trim() : config.token!;
      if (!token) throw new ConfigError("the token is empty");
      await vault.add(config.client!, config.type!, token);
      console.log(`stored token for client=${config.client} type=${config.type} (sealed under master key v${vault.keyring.currentVersion})`);
    } else if (config.command === "list") {
      const rows = await vault.store.all();
      console.log(`${rows.length} token(s) in ${describeStoreUrl(config.db)}; master key versions: ${vault.keyring.versions.join(", ")} (current v${vault.keyring.currentVersion})`);
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
    config = parseKeyserverConfig(Bun.argv.slice(2));
    if (config.command !== "serve") return await admin(config);
    assertSafeTlsEnvironment();
  } catch (error) {
    exitWithConfigError("keyserver", error);
  }
  let deps: KeyserverDeps;
  let tls;
  try {
    tls = mutualTlsServerOptions(loadIdentity(config.pki, "keyserver"));
    const keys = await RsaKeyPair.loadOrCreate(join(config.dataDir, "rsa_key.pem"));
    deps = { vault: await openVault(config), keys, nonces: new NonceMemory(), logger, allowedCallers: config.allowedCallers };
  } catch (error) {
    exitWithConfigError("keyserver", error);
  }
  const app = createKeyserverApp(deps);
  const listener = await listenWithPeerIdentity(app, { port: config.port, hostname: config.host, tls }).catch((error) => exitWithConfigError("keyserver", error));
  logger.info(`keyserver listening on https://${config.host}:${listener.port} (tokens: ${describeStoreUrl(config.db)}; callers: ${config.allowedCallers.join(", ")})`);

  exitOnSignals(async () => {
    await listener.close();
    await deps.vault.store.close().catch((error) => logger.warn(`closing the token store: ${describeError(error)}`));
  });
}

if (import.meta.main) await main();
