// The SecureProxy: fetches a client's API token from the KeyServer and calls the API with it, never showing it.
// It knows who calls it (the peer certificate's SPIFFE ID), and the policy decides which ClientId and TokenType
// that caller may use (#11 H1).
import type { KeyObject } from "node:crypto";
import { createPublicKey } from "node:crypto";
import { basename, dirname, resolve } from "node:path";
import tls from "node:tls";
import { Authorizer, expectPeer, tlsPeerIdentity, TrustMaterial, UnexpectedPeer } from "../shared/authz/index.ts";
import { exitWithConfigError, parseFlags, parsePort, parsePositive, pkiDir, policyPath, readPkiFile, exitOnSignals, displayPath } from "../shared/platform/config.ts";
import { BadRequest, ConfigError, Forbidden, MeshError, Unavailable } from "../shared/platform/errors.ts";
import { createApp, readJsonFields, requestTrace } from "../shared/platform/http.ts";
import { createLogger, describeError, describeNetworkError as reason, printable, type Logger } from "../shared/ops/log.ts";
import { Metrics } from "../shared/ops/metrics.ts";
import type { Trace } from "../shared/ops/trace.ts";
import { listenWithPeerIdentity, PEER_HEADER } from "../shared/platform/peer-tls.ts";
import { runtime, type IdentityCheck } from "../shared/platform/runtime/index.ts";
import { assertSafeTlsEnvironment, mutualTlsClientOptions, mutualTlsServerOptions, type Identity } from "../shared/platform/tls.ts";
import {
  ON_BEHALF_OF_HEADER, openJoseResponse, openLegacyResponse, prepareJoseRequest, prepareLegacyRequest, proxyResource,
} from "../shared/token-path/token-exchange.ts";

const USAGE = `
Usage: roles/secureproxy.ts [PORT] [options]

POST /request_api {"ClientId", "TokenType", "ApiUri"}: gets that client's token from the KeyServer (a fresh
session key per request), calls ApiUri with "Authorization: Bearer <token>", and returns the API's answer.
Callers authenticate with mutual TLS, and the policy must grant the caller proxy.use:CLIENTID/TOKENTYPE. ApiUri
must be https and on the allowlist for its token type. The KeyServer must present a KeyServer identity
(spiffe://securemesh/keyserver/*); the API is checked like any web server (CA and hostname).

Options:
  --keyserver URL        KeyServer (default https://127.0.0.1:5003)
  --allow TYPE=HOSTS     allowed host:port list per token type, repeatable
                         (default marketplace=localhost:5005,127.0.0.1:5005)
  --format jose|legacy   wire format to the KeyServer (default jose)
  --api-ca FILE          CA bundle to trust for API calls (default the PKI's CA)
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
  apiCa: string | undefined;
  timeoutMs: number;
  pki: string;
  /** --no-crl: no revocation at all (#18). */
  noCrl: boolean;
  policy: string;
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
    policy: { type: "string" }, "no-crl": { type: "boolean" },
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

/** node's checkServerIdentity, which the runtime's fetch honours on both runtimes: an Error refuses the connection. */
type CheckServerIdentity = IdentityCheck;

/** Whom the KeyServer hop must reach. */
export const KEYSERVER_IDENTITY = "spiffe://securemesh/keyserver/*";

/**
 * The KeyServer hop's certificate check, after the CA chain: the usual hostname check and the identity it names
 * (expectPeer), then its serial must not be on our CRL, which fetch does not read.
 */
export function keyServerIdentityCheck(isRevoked: (serialHex: string) => boolean = () => false): CheckServerIdentity {
  const expectKeyServer = expectPeer(KEYSERVER_IDENTITY);
  return (hostname, cert) =>
    expectKeyServer(hostname, cert) ?? (isRevoked(cert.serialNumber) ? new UnexpectedPeer(`reached a revoked certificate (serial ${cert.serialNumber})`) : undefined);
}

/**
 * Outbound TLS for both hops, with `rejectUnauthorized: true` spelled out rather than left to Bun's default (#11
 * Hardening). The KeyServer is a mesh peer, checked by identity; the API stands in for an external one, so it
 * gets the web's check only: its CA (--api-ca) and its hostname.
 */
export function outboundTls(identity: Identity, apiCa: string | undefined, isRevoked?: (serialHex: string) => boolean) {
  return {
    keyserver: { ...mutualTlsClientOptions(identity), rejectUnauthorized: true, checkServerIdentity: keyServerIdentityCheck(isRevoked) },
    api: { ca: apiCa ?? identity.ca, rejectUnauthorized: true, checkServerIdentity: tls.checkServerIdentity as CheckServerIdentity },
  } as const;
}

export type OutboundTls = ReturnType<typeof outboundTls>;

export interface ProxyDeps {
  keyserver: string;
  allow: Allowlist;
  format: "jose" | "legacy";
  /** Read on every call, so a reloaded certificate or CA is used from the next request on. */
  tls: OutboundTls;
  /** Decides proxy.use:CLIENTID/TOKENTYPE for the caller. */
  authz: Authorizer;
  timeoutMs: number;
  logger: Logger;
  metrics?: Metrics;
}

/** A KeyServer answer passed on as what it means for the caller; anything unexpected is a 502 naming its code. */
async function keyServerRefusal(response: Response): Promise<MeshError> {
  const { error, code } = (await response.json().catch(() => ({}))) as { error?: unknown; code?: unknown };
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
      return await runtime.fetch(keyserver + path, {
        ...init, headers: { ...init.headers, ...trace.outbound }, tls: deps.tls.keyserver, signal: AbortSignal.timeout(timeoutMs),
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
    publicKey = createPublicKey(((await response.json()) as { public_key: string }).public_key);
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
      throw await keyServerRefusal(response);
    }
    return deps.format === "jose"
      ? openJoseResponse(await response.text(), prepared.sessionKey)
      : openLegacyResponse(((await response.json()) as { token: string }).token, prepared.sessionKey);
  };

  return createApp({ logger, metrics: deps.metrics })
    .get("/health", () => ({ status: "ok", role: "secureproxy", keyserver, tokenTypes: [...deps.allow.keys()] }))
    .post("/request_api", async ({ request, body }) => {
      // Set by the peer-identity listener from the verified certificate; ClientId in the body is only a claim.
      const caller = request.headers.get(PEER_HEADER) ?? "";
      const { ClientId, TokenType, ApiUri } = readJsonFields(request, body, ["ClientId", "TokenType", "ApiUri"]);
      deps.authz.require(caller, "proxy.use", proxyResource(ClientId, TokenType));
      const url = checkApiUri(ApiUri, TokenType, deps.allow);
      const trace = requestTrace(request);
      const token = await fetchToken(ClientId, TokenType, caller, trace);
      let api: Response;
      try {
        // redirect: manual, so a redirect can never carry the token to another host.
        api = await runtime.fetch(url, {
          headers: { ...trace.outbound, authorization: `Bearer ${token}`, accept: "application/json" }, redirect: "manual", tls: deps.tls.api, signal: AbortSignal.timeout(timeoutMs),
        });
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
      tls: outboundTls(trust.identity, config.apiCa, isRevoked), authz: new Authorizer(config.policy, logger, metrics),
    };
  } catch (error) {
    exitWithConfigError("secureproxy", error);
  }
  const app = createProxyApp(deps);
  // node's TLS, not Bun.serve: Bun.serve hides the caller's certificate (oven-sh/bun#14097), and #11 H1 needs it.
  const listener = await listenWithPeerIdentity(app, {
    port: config.port, hostname: config.host, tls: mutualTlsServerOptions(trust.identity),
    identify: tlsPeerIdentity,
    isRevoked,
  }).catch((error) => exitWithConfigError("secureproxy", error));
  // Revocation, a renewed certificate or CA, and policy edits take effect without a restart (#11).
  trust.onReload((identity) => {
    deps.tls = outboundTls(identity, config.apiCa, isRevoked);
    return listener.reload(mutualTlsServerOptions(identity)).catch((error) => logger.error(`TLS listener kept its old material: ${describeError(error)}`));
  }).watch(logger);
  deps.authz.watch();
  logger.info(`secureproxy listening on https://${config.host}:${listener.port} (keyserver ${config.keyserver}, format ${config.format}, policy ${displayPath(config.policy)})`);
  exitOnSignals(async () => {
    deps.authz.stop();
    trust.stop();
    await listener.close();
  });
}

if (import.meta.main) await main();
