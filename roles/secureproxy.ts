// The SecureProxy: fetches a client's API token from the KeyServer and calls the API with it, never showing it.
// It knows who calls it (the peer certificate's SPIFFE ID), and the policy decides which ClientId and TokenType
// that caller may use (#11 H1).
import type { KeyObject } from "node:crypto";
import { createPublicKey, X509Certificate } from "node:crypto";
import { basename, dirname, resolve } from "node:path";
import { Authorizer, expectPeer, mutualTlsListening, parseSpiffeId, TrustMaterial, UnexpectedPeer } from "../shared/authz/index.ts";
import { exitWithConfigError, parseFlags, parsePort, parsePositive, pkiDir, policyPath, readPkiFile, exitOnSignals, displayPath } from "../shared/platform/config.ts";
import { BadRequest, ConfigError, Forbidden, MeshError, Unavailable } from "../shared/platform/errors.ts";
import { createApp, listenReloadable, peerIdentity, readJsonFields, requestTrace } from "../shared/platform/http.ts";
import { HttpsClient, type HttpsResponse } from "../shared/platform/https-client.ts";
import { hostnameRefusal } from "../shared/platform/runtime/hostname-check.ts";
import { createLogger, describeError, describeNetworkError as reason, printable, type Logger } from "../shared/ops/log.ts";
import { Metrics } from "../shared/ops/metrics.ts";
import type { Trace } from "../shared/ops/trace.ts";
import { assertSafeTlsEnvironment, mutualTlsClientOptions, type Identity } from "../shared/platform/tls.ts";
import {
  ON_BEHALF_OF_HEADER, openJoseResponse, openLegacyResponse, prepareJoseRequest, prepareLegacyRequest, proxyResource,
} from "../shared/token-path/token-exchange.ts";

const USAGE = `
Usage: roles/secureproxy.ts [PORT] [options]

POST /request_api {"ClientId", "TokenType", "ApiUri"}: gets that client's token from the KeyServer (a fresh
session key per request), calls ApiUri with "Authorization: Bearer <token>", and returns the API's answer.
Callers authenticate with mutual TLS, and the policy must grant the caller proxy.use:CLIENTID/TOKENTYPE. ApiUri
must be https and on the allowlist for its token type. Every outbound hop pins whom it may reach, checked at each
handshake: the KeyServer a KeyServer identity (spiffe://securemesh/keyserver/*); each token type's API, under the
mesh's CA, one identity (--api-identity), or, under a CA that is not the mesh's (--api-ca), that CA and the host.

Options:
  --keyserver URL        KeyServer (default https://127.0.0.1:5003)
  --allow TYPE=HOSTS     allowed host:port list per token type, repeatable
                         (default marketplace=localhost:5005,127.0.0.1:5005)
  --api-identity TYPE=ID the identity the API of TYPE must present when its CA is the mesh's, repeatable
                         (default spiffe://securemesh/marketplace/TYPE: no other mesh certificate is an API)
  --api-ca [TYPE=]FILE   a CA bundle that is not the mesh's for the API of TYPE (without TYPE=, of every type);
                         its calls then check that CA and the host name, as a web client does
  --format jose|legacy   wire format to the KeyServer (default jose)
  --timeout MS           KeyServer and API timeout (default 5000)
  --policy FILE          authorization policy (default $SECUREMESH_POLICY, else roles/policy.json)
  --host HOST            address to bind (default 127.0.0.1)
  --pki DIR              PKI folder from pki.sh (default $PKI_DIR, else certs/)
  --no-crl               run without revocation: crl.pem is not read, no certificate is refused as revoked
                         (a warning at start says so); without it, no valid crl.pem stops the role
  -h, --help             show this help
`;

export type Allowlist = ReadonlyMap<string, ReadonlySet<string>>;

export interface ProxyConfig {
  port: number;
  host: string;
  keyserver: string;
  allow: Allowlist;
  format: "jose" | "legacy";
  /** Per token type: the identity its API must present under the mesh's CA. */
  apiIdentities: ReadonlyMap<string, string>;
  /** Per token type ("*": every type without its own), a CA bundle of its API's own. */
  apiCas: ReadonlyMap<string, string>;
  timeoutMs: number;
  pki: string;
  /** --no-crl: no revocation at all (#18). */
  noCrl: boolean;
  policy: string;
}

/** `TYPE=VALUE` entries of a repeatable flag; `bare` names the key of an entry without `TYPE=` (or refuses it). */
function typedEntries(flag: string, entries: readonly string[], bare?: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const entry of entries) {
    const match = /^([A-Za-z0-9_.-]+)=(.+)$/.exec(entry);
    if (!match && bare === undefined) throw new ConfigError(`${flag} '${entry}': expected TYPE=VALUE`);
    out.set(match ? match[1]! : bare!, match ? match[2]! : entry);
  }
  return out;
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
    "api-ca": { type: "string", multiple: true }, "api-identity": { type: "string", multiple: true }, timeout: { type: "string" },
    host: { type: "string" }, pki: { type: "string" }, policy: { type: "string" }, "no-crl": { type: "boolean" },
  }, argv);
  const format = values.format ?? "jose";
  if (format !== "jose" && format !== "legacy") throw new ConfigError("--format must be jose or legacy");
  const apiIdentities = typedEntries("--api-identity", values["api-identity"] ?? []);
  for (const [type, id] of apiIdentities) {
    if (!parseSpiffeId(id)) throw new ConfigError(`--api-identity ${type}=${id}: not a SPIFFE ID such as spiffe://securemesh/marketplace/${type}`);
  }
  const apiCas = new Map([...typedEntries("--api-ca", values["api-ca"] ?? [], "*")].map(([type, file]) =>
    [type, readPkiFile(dirname(resolve(file)), basename(file))] as const));
  return {
    port: parsePort(positionals[0] ?? process.env.PORT, "PORT", 5004),
    host: values.host ?? "127.0.0.1",
    keyserver: (values.keyserver ?? "https://127.0.0.1:5003").replace(/\/+$/, ""),
    allow: parseAllowlist(values.allow?.length ? values.allow : ["marketplace=localhost:5005,127.0.0.1:5005"]),
    format,
    apiIdentities,
    apiCas,
    timeoutMs: parsePositive(values.timeout, "--timeout", 5000),
    pki: pkiDir(values.pki),
    noCrl: values["no-crl"] ?? false,
    policy: policyPath(values.policy),
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

/** The KeyServer presented a certificate that is not a KeyServer's (#11 Hardening: every hop checks whom it reached). */
export class KeyServerIdentityRefused extends MeshError {
  constructor(message: string) {
    super("ERR_KEYSERVER_IDENTITY", 502, message);
  }
}

/** Whom the KeyServer hop must reach. */
export const KEYSERVER_IDENTITY = "spiffe://securemesh/keyserver/*";

/** The identity the API of `tokenType` must present under the mesh's CA, unless --api-identity names another. */
export const defaultApiIdentity = (tokenType: string) => `spiffe://securemesh/marketplace/${tokenType}`;

/** Whether a PEM bundle holds the mesh's CA certificate: then it is the mesh's trust, and an identity is pinned. */
function holdsCa(bundle: string, caPem: string): boolean {
  const ca = new X509Certificate(caPem).raw;
  return (bundle.match(/-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g) ?? []).some((pem) => {
    try {
      return new X509Certificate(pem).raw.equals(ca);
    } catch {
      return false;
    }
  });
}

/** How the API of one token type is trusted: its CA bundle and, under the mesh's CA, the one identity it must show. */
export interface ApiTrust {
  ca: string;
  /** null: a CA that is not the mesh's, checked as the web does (chain and host name). */
  identity: string | null;
}

/**
 * The default is safe: with nothing set, an API is trusted under the mesh's CA only as the one identity of its token
 * type (spiffe://securemesh/marketplace/TYPE), so no server, coordinator or KeyServer certificate that names the
 * API's host is handed a client's token (issue 18, M1: a server certificate on :5005 received it).
 */
export function apiTrust(tokenType: string, meshCa: string, config: Pick<ProxyConfig, "apiIdentities" | "apiCas">): ApiTrust {
  const bundle = config.apiCas.get(tokenType) ?? config.apiCas.get("*");
  if (bundle !== undefined && !holdsCa(bundle, meshCa)) return { ca: bundle, identity: null };
  return { ca: bundle ?? meshCa, identity: config.apiIdentities.get(tokenType) ?? defaultApiIdentity(tokenType) };
}

/**
 * The outbound hops, each an HttpsClient that checks whom every connection reached at its handshake and sets
 * `rejectUnauthorized: true` explicitly (#11 Hardening). The KeyServer is a mesh peer, pinned by identity and
 * checked against our CRL; each API by its token type's trust (apiTrust). Kept-alive connections serve later calls.
 */
export class ProxyHops {
  readonly keyserver: HttpsClient;
  readonly #apis = new Map<string, HttpsClient>();
  readonly #trust: (tokenType: string) => ApiTrust;
  readonly #isRevoked: (serialHex: string) => boolean;

  constructor(identity: Identity, trust: (tokenType: string) => ApiTrust, isRevoked: (serialHex: string) => boolean = () => false) {
    this.#trust = trust;
    this.#isRevoked = isRevoked;
    this.keyserver = new HttpsClient({ tls: this.#keyserverTls(identity), isRevoked });
  }

  #keyserverTls(identity: Identity) {
    return { ...mutualTlsClientOptions(identity), rejectUnauthorized: true, checkServerIdentity: expectPeer(KEYSERVER_IDENTITY, { isRevoked: this.#isRevoked }) } as const;
  }

  /** The client for `tokenType`'s API, made at its first call. */
  api(tokenType: string): HttpsClient {
    let client = this.#apis.get(tokenType);
    if (!client) {
      const { ca, identity } = this.#trust(tokenType);
      const check = identity === null ? hostnameRefusal : expectPeer(identity, { isRevoked: this.#isRevoked });
      client = new HttpsClient({ tls: { ca, rejectUnauthorized: true, checkServerIdentity: check }, ...(identity === null ? {} : { isRevoked: this.#isRevoked }) });
      this.#apis.set(tokenType, client);
    }
    return client;
  }

  /** A renewed certificate or CA: new connections use it; the API clients are made again at their next call. */
  reload(identity: Identity): void {
    this.keyserver.setTls(this.#keyserverTls(identity));
    for (const client of this.#apis.values()) client.close();
    this.#apis.clear();
  }

  close(): void {
    this.keyserver.close();
    for (const client of this.#apis.values()) client.close();
  }
}

export interface ProxyDeps {
  keyserver: string;
  allow: Allowlist;
  format: "jose" | "legacy";
  /** The outbound hops; a reload swaps their TLS in place. */
  hops: ProxyHops;
  /** Decides proxy.use:CLIENTID/TOKENTYPE for the caller. */
  authz: Authorizer;
  timeoutMs: number;
  logger: Logger;
  metrics?: Metrics;
}

/** A KeyServer answer passed on as what it means for the caller; anything unexpected is a 502 naming its code. */
function keyServerRefusal(response: HttpsResponse): MeshError {
  let answer: { error?: unknown; code?: unknown } = {};
  try {
    answer = response.json() as typeof answer;
  } catch {
    // no JSON: no code to pass on
  }
  const { error, code } = answer;
  const why = typeof code === "string" ? printable(code.slice(0, 64)) : "no code";
  switch (response.status) {
    case 404: return new MeshError("ERR_NOT_FOUND", 404, "no token for that ClientId and TokenType");
    case 503: return new Unavailable("KeyServer unavailable (its token store is down)");
    // Both roles read the same policy; the KeyServer may have reloaded an edit a moment before this proxy.
    case 403: return new Forbidden(`the KeyServer refused: ${typeof error === "string" ? printable(error.slice(0, 300)) : "forbidden"}`);
    case 429: return new MeshError("ERR_REPLAY_QUOTA", 429, typeof error === "string" ? printable(error.slice(0, 300)) : "too many token requests; retry later");
    default: return new MeshError("ERR_KEYSERVER", 502, `KeyServer refused the token request (${response.status} ${why})`);
  }
}

export function createProxyApp(deps: ProxyDeps) {
  const { keyserver, timeoutMs, logger } = deps;
  let publicKey: KeyObject | undefined;

  /** A call to the KeyServer for the request `trace` belongs to, which it carries on (#14). */
  const keyserverFetch = async (path: string, trace: Trace, init: { method?: string; headers?: Record<string, string>; body?: string } = {}) => {
    try {
      // Each request is a fresh nonce and session key: a request that may have reached the KeyServer is not re-sent.
      return await deps.hops.keyserver.request(keyserver + path, {
        ...init, headers: { ...init.headers, ...trace.outbound }, timeoutMs, idempotent: (init.method ?? "GET") === "GET",
      });
    } catch (error) {
      if (error instanceof UnexpectedPeer) {
        const refused = new KeyServerIdentityRefused(`refused the KeyServer at ${new URL(keyserver).host}: ${error.message}`);
        logger.error(refused.message);
        throw refused;
      }
      throw new Unavailable(`KeyServer unavailable (${reason(error)})`);
    }
  };

  /** Fetched once over mutual TLS and kept; dropped when the KeyServer cannot open a request made with it. */
  const keyserverPublicKey = async (trace: Trace): Promise<KeyObject> => {
    if (publicKey) return publicKey;
    const response = await keyserverFetch("/public_key", trace);
    if (response.status !== 200) throw new Unavailable(`KeyServer public key unavailable (${response.status})`);
    publicKey = createPublicKey((response.json() as { public_key: string }).public_key);
    return publicKey;
  };

  /** Asks on behalf of `caller`, so the KeyServer checks that identity too and audits it (#11 H1). */
  const fetchToken = async (clientId: string, tokenType: string, caller: string, trace: Trace): Promise<string> => {
    const key = await keyserverPublicKey(trace);
    const prepared = deps.format === "jose" ? await prepareJoseRequest(key, clientId, tokenType) : await prepareLegacyRequest(key, clientId, tokenType);
    const response = await keyserverFetch("/", trace, {
      method: "POST", headers: { "content-type": prepared.contentType, [ON_BEHALF_OF_HEADER]: caller }, body: prepared.body,
    });
    if (response.status !== 200) {
      if (response.status === 400) publicKey = undefined; // perhaps the KeyServer's key changed
      throw keyServerRefusal(response);
    }
    return deps.format === "jose"
      ? openJoseResponse(response.text(), prepared.sessionKey)
      : openLegacyResponse((response.json() as { token: string }).token, prepared.sessionKey);
  };

  return createApp({ logger, metrics: deps.metrics })
    .get("/health", () => ({ status: "ok", role: "secureproxy", keyserver, tokenTypes: [...deps.allow.keys()] }))
    .post("/request_api", async ({ request, body }) => {
      // The verified certificate of this connection, bound by the listener; ClientId in the body is only a claim.
      const caller = peerIdentity(request);
      const { ClientId, TokenType, ApiUri } = readJsonFields(request, body, ["ClientId", "TokenType", "ApiUri"]);
      deps.authz.require(caller, "proxy.use", proxyResource(ClientId, TokenType));
      const url = checkApiUri(ApiUri, TokenType, deps.allow);
      const trace = requestTrace(request);
      const token = await fetchToken(ClientId, TokenType, caller, trace);
      let api: HttpsResponse;
      try {
        // The client follows no redirect, so none can carry the token to another host; it is sent only over a
        // connection whose handshake showed the API's pinned identity (or its own CA and host name).
        api = await deps.hops.api(TokenType).request(url, {
          headers: { ...trace.outbound, authorization: `Bearer ${token}`, accept: "application/json" }, timeoutMs, idempotent: true,
        });
      } catch (error) {
        throw new MeshError("ERR_UPSTREAM", 502, `the API at ${url.host} failed (${reason(error)})`);
      }
      const text = api.text();
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        throw new MeshError("ERR_UPSTREAM", 502, `the API at ${url.host} answered ${api.status} without JSON`);
      }
      logger.info(`API call by ${printable(caller)} for client=${printable(ClientId)} type=${printable(TokenType)} to ${url.host} answered ${api.status} ${trace.field}=${trace.id}`);
      return new Response(JSON.stringify(json), { status: api.status, headers: { "content-type": "application/json" } });
    });
}

async function main(): Promise<void> {
  const logger = createLogger("secureproxy");
  const metrics = new Metrics();
  let config: ProxyConfig;
  let deps: ProxyDeps;
  let trust: TrustMaterial;
  const isRevoked = (serial: string) => trust.isRevoked(serial);
  try {
    assertSafeTlsEnvironment();
    config = parseProxyConfig(process.argv.slice(2));
    trust = TrustMaterial.open(config.pki, "secureproxy", { noCrl: config.noCrl });
    deps = {
      keyserver: config.keyserver, allow: config.allow, format: config.format, timeoutMs: config.timeoutMs, logger, metrics,
      hops: new ProxyHops(trust.identity, (type) => apiTrust(type, trust.identity.ca, config), isRevoked),
      authz: new Authorizer(config.policy, logger, metrics),
    };
  } catch (error) {
    exitWithConfigError("secureproxy", error);
  }
  const app = createProxyApp(deps);
  // Every listener binds the caller's verified identity to each request (#11 H1 needs it).
  const listener = await listenReloadable(app, { port: config.port, hostname: config.host, ...mutualTlsListening(trust, deps.authz) })
    .catch((error) => exitWithConfigError("secureproxy", error));
  // Revocation, a renewed certificate or CA, and policy edits take effect without a restart (#11).
  trust.onReload((identity, changed) => {
    if (!changed.certificate) return undefined; // revocation is asked per connection and per request
    deps.hops.reload(identity);
    return listener.reload(mutualTlsListening(trust).tls).catch((error: unknown) => logger.error(`TLS listener kept its old material: ${describeError(error)}`));
  }).watch(logger);
  deps.authz.watch();
  logger.info(`secureproxy listening on https://${config.host}:${listener.port} (keyserver ${config.keyserver}, format ${config.format}, policy ${displayPath(config.policy)})`);
  exitOnSignals(async () => {
    deps.authz.stop();
    trust.stop();
    deps.hops.close();
    await listener.stop();
  });
}

if (import.meta.main) await main();
