// The SecureProxy's app: an application asks it to call an API with a client's token; the policy must let the
// caller (its TLS certificate) use that ClientId's token type, the API must be on the type's allowlist, and the
// token, fetched from the KeyServer through a fresh hybrid exchange, never leaves this process but in the API call.
// roles/secureproxy.ts runs it.
import type { KeyObject } from "node:crypto";
import { createPublicKey } from "node:crypto";
import { UnexpectedPeer, type Authorizer } from "../authz/index.ts";
import { BadRequest, ConfigError, Forbidden, MeshError, Unavailable } from "../platform/errors.ts";
import { createApp, peerIdentity, readJsonFields, requestTrace } from "../platform/http.ts";
import type { HttpsResponse } from "../platform/https-client.ts";
import { describeNetworkError as reason, printable, type Logger } from "../ops/log.ts";
import type { Metrics } from "../ops/metrics.ts";
import type { Trace } from "../ops/trace.ts";
import type { ProxyHops } from "./proxy-hops.ts";
import {
  ON_BEHALF_OF_HEADER, openJoseResponse, openLegacyResponse, prepareJoseRequest, prepareLegacyRequest, proxyResource,
} from "./token-exchange.ts";

export type Allowlist = ReadonlyMap<string, ReadonlySet<string>>;

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
