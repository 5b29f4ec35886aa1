// The SecureProxy's app: an application asks it to call an API with a client's token; the policy must let the
// caller (its TLS certificate) use that ClientId's token type, the API must be on the type's allowlist, and the
// token, fetched from the KeyServer through a fresh hybrid exchange, never leaves this process but in the API call.
// roles/secureproxy.ts runs it.
import type { KeyObject } from "node:crypto";
import { createPublicKey } from "node:crypto";
import { UnexpectedPeer, type Authorizer, type RequestLimiter } from "../authz/index.ts";
import { BadRequest, ConfigError, Forbidden, MeshError, TooManyRequests, Unavailable } from "../platform/errors.ts";
import { createApp, peerIdentity, readJsonFields, requestTrace } from "../platform/http.ts";
import type { HttpsResponse } from "../platform/https-client.ts";
import { describeNetworkError as reason, printable, type Logger } from "../ops/log.ts";
import type { Metrics } from "../ops/metrics.ts";
import type { Trace } from "../ops/trace.ts";
import { FailoverOrder } from "./failover-order.ts";
import type { ProxyHops } from "./proxy-hops.ts";
import { ON_BEHALF_OF_HEADER, openJoseResponse, openLegacyResponse, prepareJoseRequest, prepareLegacyRequest, proxyResource } from "./token-exchange.ts";

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
  /** KeyServer base URLs, tried in this order (failover-order.ts). */
  keyservers: readonly string[];
  allow: Allowlist;
  format: "jose" | "legacy";
  /** The outbound hops; a reload swaps their TLS in place. */
  hops: ProxyHops;
  /** Decides proxy.use:CLIENTID/TOKENTYPE for the caller. */
  authz: Authorizer;
  /** Per attempt at one KeyServer, and for the API call. */
  timeoutMs: number;
  logger: Logger;
  metrics?: Metrics;
  /** Each caller's requests in flight and rate, per its TLS identity and the policy's limits (issue 20). */
  limiter?: RequestLimiter;
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
    case 404:
      return new MeshError("ERR_NOT_FOUND", 404, "no token for that ClientId and TokenType");
    case 503:
      return new Unavailable("KeyServer unavailable (its token store is down)");
    // Both roles read the same policy; the KeyServer may have reloaded an edit a moment before this proxy.
    case 403:
      return new Forbidden(`the KeyServer refused: ${typeof error === "string" ? printable(error.slice(0, 300)) : "forbidden"}`);
    // The client over its limit at the KeyServer too (issue 20): told so, with the KeyServer's Retry-After.
    case 429:
      if (code === "ERR_RATE_LIMITED" || code === "ERR_IN_FLIGHT_LIMIT") {
        return new TooManyRequests(
          code,
          `the KeyServer refused: ${typeof error === "string" ? printable(error.slice(0, 300)) : "over a limit"}`,
          retryAfterOf(response),
        );
      }
      return new MeshError("ERR_REPLAY_QUOTA", 429, typeof error === "string" ? printable(error.slice(0, 300)) : "too many token requests; retry later");
    default:
      return new MeshError("ERR_KEYSERVER", 502, `KeyServer refused the token request (${response.status} ${why})`);
  }
}

/** A Retry-After in whole seconds, from 1 to 60 whatever the KeyServer sent. */
function retryAfterOf(response: HttpsResponse): number {
  const seconds = Number(response.header("retry-after"));
  return Number.isInteger(seconds) ? Math.min(60, Math.max(1, seconds)) : 1;
}

/**
 * Whether another KeyServer is asked after this failure: it released nothing to us. A connection that failed (before
 * or after the request went out), a KeyServer identity refused at the handshake, a 5xx answer, or a 400 (the
 * request did not decrypt: its key changed) all leave the caller without a token; 403, 404 and 429 are the same at
 * every KeyServer (one policy, one store, the caller's own quota) and are the caller's answer.
 */
function failsOver(error: unknown): boolean {
  if (error instanceof KeyServerIdentityRefused || error instanceof Unavailable) return true;
  return error instanceof MeshError && error.code === "ERR_KEYSERVER";
}

/** One KeyServer's public key, fetched once over mutual TLS and kept until a request made with it does not decrypt. */
interface KeyServerState {
  url: string;
  publicKey?: KeyObject;
}

export function createProxyApp(deps: ProxyDeps) {
  const { timeoutMs, logger } = deps;
  const order = new FailoverOrder(deps.keyservers);
  const states = new Map<string, KeyServerState>(order.urls.map((url) => [url, { url }]));
  const failovers = deps.metrics?.counter(
    "securemesh_keyserver_failovers_total",
    "Token requests made again at the next KeyServer after one failed, by reason.",
    ["reason"],
  );

  /** A call to one KeyServer for the request `trace` belongs to, which it carries on (#14). */
  const keyserverFetch = async (
    keyserver: string,
    path: string,
    trace: Trace,
    init: { method?: string; headers?: Record<string, string>; body?: string } = {},
  ) => {
    try {
      // Each token request is a fresh nonce and session key, sealed to this KeyServer's own key: never sent again.
      return await deps.hops.keyserver.request(keyserver + path, {
        ...init,
        headers: { ...init.headers, ...trace.outbound },
        timeoutMs,
        idempotent: (init.method ?? "GET") === "GET",
      });
    } catch (error) {
      if (error instanceof UnexpectedPeer) {
        const refused = new KeyServerIdentityRefused(`refused the KeyServer at ${new URL(keyserver).host}: ${error.message}`);
        logger.error(refused.message);
        throw refused;
      }
      throw new Unavailable(`KeyServer ${new URL(keyserver).host} unavailable (${reason(error)})`);
    }
  };

  const keyserverPublicKey = async (state: KeyServerState, trace: Trace): Promise<KeyObject> => {
    if (state.publicKey) return state.publicKey;
    const response = await keyserverFetch(state.url, "/public_key", trace);
    if (response.status !== 200) throw new Unavailable(`KeyServer ${new URL(state.url).host} public key unavailable (${response.status})`);
    state.publicKey = createPublicKey((response.json() as { public_key: string }).public_key);
    return state.publicKey;
  };

  /** Asks one KeyServer on behalf of `caller`, so it checks that identity too and audits it (#11 H1). */
  const fetchFrom = async (state: KeyServerState, clientId: string, tokenType: string, caller: string, trace: Trace): Promise<string> => {
    const key = await keyserverPublicKey(state, trace);
    const prepared = deps.format === "jose" ? await prepareJoseRequest(key, clientId, tokenType) : await prepareLegacyRequest(key, clientId, tokenType);
    const response = await keyserverFetch(state.url, "/", trace, {
      method: "POST",
      headers: { "content-type": prepared.contentType, [ON_BEHALF_OF_HEADER]: caller },
      body: prepared.body,
    });
    if (response.status !== 200) {
      if (response.status === 400) state.publicKey = undefined; // perhaps the KeyServer's key changed
      throw keyServerRefusal(response);
    }
    return deps.format === "jose"
      ? openJoseResponse(response.text(), prepared.sessionKey)
      : openLegacyResponse((response.json() as { token: string }).token, prepared.sessionKey);
  };

  /**
   * The token from the first KeyServer that releases it (issue 23: no single KeyServer). After a failure the next one
   * gets a new request, never the same body: each request is sealed to one KeyServer's own RSA key with a fresh nonce
   * and session key, so a body that may have reached a KeyServer opens nowhere else, and at that KeyServer its nonce
   * is in the replay window's memory. A release whose answer was lost gave the token to no one (it was under our
   * session key), so asking the next KeyServer releases it once more, audited there.
   */
  const fetchToken = async (clientId: string, tokenType: string, caller: string, trace: Trace): Promise<string> => {
    let last: unknown;
    for (const url of order.order()) {
      try {
        const token = await fetchFrom(states.get(url)!, clientId, tokenType, caller, trace);
        order.succeeded(url);
        return token;
      } catch (error) {
        if (!failsOver(error)) throw error;
        order.failed(url);
        last = error;
        const why =
          (error as MeshError).code === "ERR_KEYSERVER_IDENTITY" ? "identity" : (error as MeshError).code === "ERR_KEYSERVER" ? "answer" : "unavailable";
        if (order.urls.length > 1) {
          failovers?.inc({ reason: why });
          logger.warn(`KeyServer ${new URL(url).host} failed (${(error as Error).message}) ${trace.field}=${trace.id}; a new request goes to the next`);
        }
      }
    }
    if (order.urls.length > 1 && last instanceof Unavailable) throw new Unavailable(`no KeyServer could release the token (last: ${last.message})`);
    throw last;
  };

  return createApp({ logger, metrics: deps.metrics, metricsRoute: deps.authz.requirePeer("metrics.read") })
    .get("/health", () => ({
      status: "ok",
      role: "secureproxy",
      tokenTypes: [...deps.allow.keys()],
      keyservers: order.urls.map((url) => ({ url, failedRecently: order.isHeld(url) })),
    }))
    .post("/request_api", async ({ request, body }) => {
      // The verified certificate of this connection, bound by the listener; ClientId in the body is only a claim.
      const caller = peerIdentity(request);
      const { ClientId, TokenType, ApiUri } = readJsonFields(request, body, ["ClientId", "TokenType", "ApiUri"]);
      deps.authz.require(caller, "proxy.use", proxyResource(ClientId, TokenType));
      const url = checkApiUri(ApiUri, TokenType, deps.allow);
      const release = deps.limiter?.admit(caller);
      try {
        return await callApi(caller, ClientId, TokenType, url, requestTrace(request));
      } finally {
        release?.();
      }
    });

  /** Fetches the token and calls the API with it: the work a caller's limits count (issue 20). */
  async function callApi(caller: string, ClientId: string, TokenType: string, url: URL, trace: Trace): Promise<Response> {
    const token = await fetchToken(ClientId, TokenType, caller, trace);
    let api: HttpsResponse;
    try {
      // The client follows no redirect, so none can carry the token to another host; it is sent only over a
      // connection whose handshake showed the API's pinned identity (or its own CA and host name).
      api = await deps.hops.api(TokenType).request(url, {
        headers: { ...trace.outbound, authorization: `Bearer ${token}`, accept: "application/json" },
        timeoutMs,
        idempotent: true,
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
    logger.info(
      `API call by ${printable(caller)} for client=${printable(ClientId)} type=${printable(TokenType)} to ${url.host} answered ${api.status} ${trace.field}=${trace.id}`,
    );
    return new Response(JSON.stringify(json), { status: api.status, headers: { "content-type": "application/json" } });
  }
}
