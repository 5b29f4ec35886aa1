// The SecureProxy: fetches a client's API token from the KeyServer and calls the API with it, never showing it.
import type { KeyObject } from "node:crypto";
import { createPublicKey } from "node:crypto";
import { basename, dirname, resolve } from "node:path";
import { exitWithConfigError, parseFlags, parsePort, parsePositive, pkiDir, readPkiFile, exitOnSignals } from "../shared/config.ts";
import { BadRequest, ConfigError, Forbidden, MeshError, Unavailable } from "../shared/errors.ts";
import { createApp, listenOrExit, readJsonFields } from "../shared/http.ts";
import { createLogger, describeNetworkError as reason, printable, type Logger } from "../shared/log.ts";
import { assertSafeTlsEnvironment, loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions } from "../shared/tls.ts";
import { openJoseResponse, openLegacyResponse, prepareJoseRequest, prepareLegacyRequest } from "../shared/token-exchange.ts";

const USAGE = `
Usage: bun roles/secureproxy.ts [PORT] [options]

POST /request_api {"ClientId", "TokenType", "ApiUri"}: gets that client's token from the KeyServer (a fresh
session key per request), calls ApiUri with "Authorization: Bearer <token>", and returns the API's answer.
Callers authenticate with mutual TLS. ApiUri must be https and on the allowlist for its token type.

Options:
  --keyserver URL        KeyServer (default https://127.0.0.1:5003)
  --allow TYPE=HOSTS     allowed host:port list per token type, repeatable
                         (default marketplace=localhost:5005,127.0.0.1:5005)
  --format jose|legacy   wire format to the KeyServer (default jose)
  --api-ca FILE          CA bundle to trust for API calls (default the PKI's CA)
  --timeout MS           KeyServer and API timeout (default 5000)
  --host HOST            address to bind (default 127.0.0.1)
  --pki DIR              PKI folder from pki.sh (default $PKI_DIR, else certs/)
  -h, --help             show this help
`;

export type Allowlist = ReadonlyMap<string, ReadonlySet<string>>;

export interface ProxyConfig {
  port: number;
  host: string;
  keyserver: string;
  allow: Allowlist;
  format: "jose" | "legacy";
  apiCa: string | undefined;
  timeoutMs: number;
  pki: string;
}

export function parseAllowlist(entries: readonly string[]): Allowlist {
  const allow = new Map<string, Set<string>>();
  for (const entry of entries) {
    const match = /^([A-Za-z0-9_.-]+)=(.+)$/.exec(entry);
    if (!match) throw new ConfigError(`--allow '${entry}': expected TYPE=host:port[,host:port]`);
    const hosts = allow.get(match[1]!) ?? new Set<string>();
    for (const host of match[2]!.split(",")) hosts.add(host.trim().toLowerCase());
    allow.set(match[1]!, hosts);
  }
  return allow;
}

export function parseProxyConfig(argv: string[]): ProxyConfig {
  const { values, positionals } = parseFlags("secureproxy", USAGE, {
    keyserver: { type: "string" }, allow: { type: "string", multiple: true }, format: { type: "string" },
    "api-ca": { type: "string" }, timeout: { type: "string" }, host: { type: "string" }, pki: { type: "string" },
  }, argv);
  const format = values.format ?? "jose";
  if (format !== "jose" && format !== "legacy") throw new ConfigError("--format must be jose or legacy");
  return {
    port: parsePort(positionals[0] ?? process.env.PORT, "PORT", 5004),
    host: values.host ?? "127.0.0.1",
    keyserver: (values.keyserver ?? "https://127.0.0.1:5003").replace(/\/+$/, ""),
    allow: parseAllowlist(values.allow?.length ? values.allow : ["marketplace=localhost:5005,127.0.0.1:5005"]),
    format,
    apiCa: values["api-ca"] ? readPkiFile(dirname(resolve(values["api-ca"])), basename(values["api-ca"])) : undefined,
    timeoutMs: parsePositive(values.timeout, "--timeout", 5000),
    pki: pkiDir(values.pki),
  };
}

/**
 * Checks ApiUri before any token is fetched: https only, no credentials in the URL, and host:port on the token
 * type's allowlist (compare superfly/tokenizer's allowed_hosts). Anything else is a 403 and nothing is sent.
 */
export function checkApiUri(apiUri: string, tokenType: string, allow: Allowlist): URL {
  let url: URL;
  try {
    url = new URL(apiUri);
  } catch {
    throw new BadRequest("ApiUri is not a URL");
  }
  if (url.protocol !== "https:") throw new Forbidden("ApiUri must use https");
  if (url.username || url.password) throw new Forbidden("ApiUri must not carry credentials");
  const hostPort = `${url.hostname.toLowerCase()}:${url.port || "443"}`;
  if (!allow.get(tokenType)?.has(hostPort)) throw new Forbidden(`ApiUri host ${hostPort} is not allowed for token type '${tokenType}'`);
  return url;
}

export interface ProxyDeps {
  keyserver: string;
  allow: Allowlist;
  format: "jose" | "legacy";
  keyserverTls: ReturnType<typeof mutualTlsClientOptions>;
  apiTls: { ca: string };
  timeoutMs: number;
  logger: Logger;
}

export function createProxyApp(deps: ProxyDeps) {
  const { keyserver, keyserverTls, timeoutMs, logger } = deps;
  let publicKey: KeyObject | undefined;

  const keyserverFetch = async (path: string, init: RequestInit = {}) => {
    try {
      return await fetch(keyserver + path, { ...init, tls: keyserverTls, signal: AbortSignal.timeout(timeoutMs) });
    } catch (error) {
      throw new Unavailable(`KeyServer unavailable (${reason(error)})`);
    }
  };

  /** Fetched once over mutual TLS and kept; dropped when the KeyServer cannot open a request made with it. */
  const keyserverPublicKey = async (): Promise<KeyObject> => {
    if (publicKey) return publicKey;
    const response = await keyserverFetch("/public_key");
    if (response.status !== 200) throw new Unavailable(`KeyServer public key unavailable (${response.status})`);
    publicKey = createPublicKey(((await response.json()) as { public_key: string }).public_key);
    return publicKey;
  };

  const fetchToken = async (clientId: string, tokenType: string): Promise<string> => {
    const key = await keyserverPublicKey();
    const prepared = deps.format === "jose" ? await prepareJoseRequest(key, clientId, tokenType) : await prepareLegacyRequest(key, clientId, tokenType);
    const response = await keyserverFetch("/", { method: "POST", headers: { "content-type": prepared.contentType }, body: prepared.body });
    if (response.status === 404) throw new MeshError("ERR_NOT_FOUND", 404, "no token for that ClientId and TokenType");
    if (response.status === 503) throw new Unavailable("KeyServer unavailable (its token store is down)");
    if (response.status !== 200) {
      if (response.status === 400) publicKey = undefined; // perhaps the KeyServer's key changed
      throw new MeshError("ERR_KEYSERVER", 502, `KeyServer refused the token request (${response.status})`);
    }
    return deps.format === "jose"
      ? openJoseResponse(await response.text(), prepared.sessionKey)
      : openLegacyResponse(((await response.json()) as { token: string }).token, prepared.sessionKey);
  };

  return createApp({ logger })
    .get("/health", () => ({ status: "ok", role: "secureproxy", keyserver, tokenTypes: [...deps.allow.keys()] }))
    .post("/request_api", async ({ request, body }) => {
      const { ClientId, TokenType, ApiUri } = readJsonFields(request, body, ["ClientId", "TokenType", "ApiUri"]);
      const url = checkApiUri(ApiUri, TokenType, deps.allow);
      const token = await fetchToken(ClientId, TokenType);
      let api: Response;
      try {
        // redirect: manual, so a redirect can never carry the token to another host.
        api = await fetch(url, { headers: { authorization: `Bearer ${token}`, accept: "application/json" }, redirect: "manual", tls: deps.apiTls, signal: AbortSignal.timeout(timeoutMs) });
      } catch (error) {
        throw new MeshError("ERR_UPSTREAM", 502, `the API at ${url.host} failed (${reason(error)})`);
      }
      const text = await api.text();
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        throw new MeshError("ERR_UPSTREAM", 502, `the API at ${url.host} answered ${api.status} without JSON`);
      }
      logger.info(`API call for client=${printable(ClientId)} type=${printable(TokenType)} to ${url.host} answered ${api.status}`);
      return new Response(JSON.stringify(json), { status: api.status, headers: { "content-type": "application/json" } });
    });
}

async function main(): Promise<void> {
  const logger = createLogger("secureproxy");
  let config: ProxyConfig;
  let deps: ProxyDeps;
  let tls;
  try {
    assertSafeTlsEnvironment();
    config = parseProxyConfig(Bun.argv.slice(2));
    const identity = loadIdentity(config.pki, "secureproxy");
    tls = mutualTlsServerOptions(identity);
    deps = {
      keyserver: config.keyserver, allow: config.allow, format: config.format, timeoutMs: config.timeoutMs, logger,
      keyserverTls: mutualTlsClientOptions(identity), apiTls: { ca: config.apiCa ?? identity.ca },
    };
  } catch (error) {
    exitWithConfigError("secureproxy", error);
  }
  const app = createProxyApp(deps);
  const port = listenOrExit("secureproxy", app, { port: config.port, hostname: config.host, tls });
  logger.info(`secureproxy listening on https://${config.host}:${port} (keyserver ${config.keyserver}, format ${config.format})`);
  exitOnSignals(() => app.stop());
}

if (import.meta.main) await main();
