// The application side of the token path: POST /request_api to a SecureProxy over mutual TLS, pinned to a SecureProxy
// identity at every handshake, failing over between several proxies (issue 23: one SecureProxy was a single point of
// failure) as shared/request-path/mesh-client.ts fails over between coordinators.
import { setTimeout } from "node:timers/promises";
import { expectPeer } from "../authz/expect-peer.ts";
import { MeshError } from "../platform/errors.ts";
import { DEFAULT_MAX_LIMIT_WAIT_MS, HttpsClient, RetryAfterWaits } from "../platform/https-client.ts";
import { mutualTlsClientOptions, type Identity } from "../platform/tls.ts";
import { describeNetworkError } from "../ops/log.ts";
import { startTrace } from "../ops/trace.ts";
import { FailoverOrder } from "./failover-order.ts";

/** Whom an application's hop to the token path must reach. */
export const SECUREPROXY_IDENTITY = "spiffe://securemesh/secureproxy/*";

export interface ProxyClientOptions {
  identity: Identity;
  /** SecureProxy base URLs, tried in this order; one that failed is tried last for a few seconds. */
  proxies: readonly string[];
  /** Per attempt at one proxy: above the proxy's own budget for its KeyServers and the API. */
  timeoutMs?: number;
  /** Rounds over all proxies before giving up. */
  attempts?: number;
  backoffMs?: number;
  /** Our CA's revocation list: a revoked proxy is refused at the handshake. */
  isRevoked?: (serialHex: string) => boolean;
  /** The most a call waits in all as 429 answers tell it (Retry-After, issue 20) before that 429 is returned. */
  maxLimitWaitMs?: number;
}

export interface ApiCall {
  ClientId: string;
  TokenType: string;
  ApiUri: string;
}

export interface ProxyAnswer {
  status: number;
  body: Record<string, unknown>;
  /** The proxy that answered. */
  proxy: string;
  /** Proxies tried for this answer: 1 when the first answered. */
  attempts: number;
  trace: string;
}

/**
 * @example
 * const proxies = new ProxyClient({ identity: loadIdentity(pki, "client1"), proxies: ["https://10.0.0.8:5004", "https://10.0.0.9:5004"] });
 * const { status, body } = await proxies.requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: "https://10.0.0.6:5005/api/item" });
 */
export class ProxyClient {
  readonly #http: HttpsClient;
  readonly #order: FailoverOrder;
  readonly #timeoutMs: number;
  readonly #attempts: number;
  readonly #backoffMs: number;
  readonly #maxLimitWaitMs: number;

  constructor(options: ProxyClientOptions) {
    const isRevoked = options.isRevoked ?? (() => false);
    this.#http = new HttpsClient({
      tls: { ...mutualTlsClientOptions(options.identity), rejectUnauthorized: true, checkServerIdentity: expectPeer(SECUREPROXY_IDENTITY, { isRevoked }) },
      isRevoked,
    });
    this.#order = new FailoverOrder(options.proxies);
    this.#timeoutMs = options.timeoutMs ?? 20_000;
    this.#attempts = options.attempts ?? 2;
    this.#backoffMs = options.backoffMs ?? 200;
    this.#maxLimitWaitMs = options.maxLimitWaitMs ?? DEFAULT_MAX_LIMIT_WAIT_MS;
  }

  close(): void {
    this.#http.close();
  }

  /**
   * Asks a proxy to call ApiUri with ClientId's token, failing over to the next proxy on a connection that fails
   * (before or after the request went out) and on a 503; any other answer is returned as it is. The proxy's call to
   * the API is a GET, as safe to repeat as any GET, and each proxy makes its own token request: re-sending to the
   * next proxy replays nothing. Throws ERR_UNREACHABLE when no proxy answered.
   */
  async requestApi(call: ApiCall): Promise<ProxyAnswer> {
    const trace = startTrace();
    const body = JSON.stringify(call);
    const waits = new RetryAfterWaits(this.#maxLimitWaitMs);
    let last = "";
    let tried = 0;
    for (let round = 0; round < this.#attempts; round++) {
      if (round > 0) await setTimeout(this.#backoffMs * 2 ** (round - 1));
      for (const proxy of this.#order.order()) {
        tried += 1;
        try {
          let answer = await this.#send(proxy, body, trace.outbound);
          // Over its limit, the caller waits as told and asks the same proxy again (issue 20).
          for (let wait = waits.next(answer.status, answer.retryAfter); wait !== null; wait = waits.next(answer.status, answer.retryAfter)) {
            await setTimeout(wait);
            answer = await this.#send(proxy, body, trace.outbound);
          }
          if (answer.status === 503) {
            this.#order.failed(proxy);
            last = `${proxy} answered 503: ${String(answer.body.error ?? "")}`;
            continue;
          }
          this.#order.succeeded(proxy);
          return { status: answer.status, body: answer.body, proxy, attempts: tried, trace: trace.id };
        } catch (error) {
          this.#order.failed(proxy);
          last = `${proxy}: ${describeNetworkError(error)}`;
        }
      }
    }
    throw new MeshError("ERR_UNREACHABLE", 503, `no SecureProxy could serve the request (${last}; trace=${trace.id})`);
  }

  /** One attempt at one proxy: its status, its JSON (or a note that it sent none), and its Retry-After. */
  async #send(
    proxy: string,
    body: string,
    traceHeaders: Readonly<Record<string, string>>,
  ): Promise<{ status: number; body: Record<string, unknown>; retryAfter: string | null }> {
    const response = await this.#http.request(`${proxy}/request_api`, {
      method: "POST",
      headers: { ...traceHeaders, "content-type": "application/json" },
      body,
      timeoutMs: this.#timeoutMs,
      idempotent: true,
    });
    let parsed: Record<string, unknown>;
    try {
      parsed = response.json() as Record<string, unknown>;
    } catch {
      parsed = { error: `non-JSON answer (${response.status})` };
    }
    return { status: response.status, body: parsed, retryAfter: response.header("retry-after") };
  }
}
