// The client side of the request path: Fernet-encrypt, sign a sender proof, send over mutual TLS to a coordinator.
import { randomUUID } from "node:crypto";
import { setTimeout } from "node:timers/promises";
import { MeshError } from "../platform/errors.ts";
import type { DataSnapshot } from "./data-view.ts";
import type { Fernet } from "./fernet.ts";
import { describeNetworkError, printable } from "../ops/log.ts";
import { startTrace } from "../ops/trace.ts";
import { FORWARDER_HEADER, PROOF_HEADER, ProofSigner } from "./proof.ts";
import { mutualTlsClientOptions, type Identity } from "../platform/tls.ts";
import { runtime } from "../platform/runtime/index.ts";

export interface MeshClientOptions {
  identity: Identity;
  fernet: Fernet;
  /** Coordinator base URLs, tried in order; the next is used when one cannot be reached. */
  coordinators: readonly string[];
  timeoutMs?: number;
  /** Rounds over all coordinators before giving up. */
  attempts?: number;
  backoffMs?: number;
  /**
   * Talk to a server directly, as this forwarding identity would (the bench's direct path, tests of one server):
   * every request carries its forwarder assertion. Needs that identity's key, as a coordinator has.
   */
  forwardedBy?: Identity;
}

export interface CachedDataAnswer {
  cached: boolean;
  ageMs: number;
  server: number;
  generation: number;
  snapshot: DataSnapshot;
}

/**
 * One line on a get_data() view: how many records, and the newest. The text is another client's, so it goes
 * through printable(): it cannot clear this terminal, retitle it or fake a line (#11 L7).
 */
export function describeSnapshot(snapshot: DataSnapshot): string {
  const newest = snapshot.latest[0];
  return `${snapshot.total} record${snapshot.total === 1 ? "" : "s"}${newest ? `, newest #${newest.id} "${printable(newest.text)}" from ${printable(newest.sender)}` : ""}`;
}

export interface MeshResponse<T = Record<string, unknown>> {
  status: number;
  body: T;
  coordinator: string;
  /** The trace id the request carried (its traceparent): every hop's access line names it. */
  trace: string;
  /** Coordinators tried for this answer: 1 when the first one answered, more after failing over. */
  attempts: number;
}

export class MeshClient {
  readonly name: string;
  readonly #options: Required<Omit<MeshClientOptions, "forwardedBy">>;
  readonly #signer: ProofSigner;
  readonly #forwarder: ProofSigner | null;
  readonly #tls: ReturnType<typeof mutualTlsClientOptions>;

  constructor(options: MeshClientOptions) {
    if (options.coordinators.length === 0) throw new TypeError("at least one coordinator URL is needed");
    this.#options = { timeoutMs: 5000, attempts: 3, backoffMs: 200, ...options };
    this.#signer = new ProofSigner(options.identity);
    this.#forwarder = options.forwardedBy ? new ProofSigner(options.forwardedBy) : null;
    this.#tls = mutualTlsClientOptions(options.identity);
    this.name = options.identity.name;
  }

  /** Encrypts `message`, proves who sent it, and posts it; one Idempotency-Key covers every retry. */
  async sendData(message: string): Promise<MeshResponse> {
    const data = this.#options.fernet.encrypt(message);
    const proof = await this.#signer.sign({ method: "POST", path: "/api/data", payload: data });
    return this.request("POST", "/api/data", { data, proof }, { "idempotency-key": randomUUID() });
  }

  /**
   * A proof for a read, in a header (a GET has no body). Servers cache verified proofs, so a client that reuses
   * one for its lifetime costs them one signature check, not one per read.
   */
  async readProof(path: string): Promise<Record<string, string>> {
    return { [PROOF_HEADER]: await this.#signer.sign({ method: "GET", path, payload: "" }) };
  }

  /** Reads get_data() through the coordinator and decrypts it; `refresh` asks the server to skip its cache. */
  async readCachedData(refresh = false): Promise<CachedDataAnswer> {
    const headers = { ...(await this.readProof("/api/get_cached_data")), ...(refresh ? { "cache-control": "no-cache" } : {}) };
    const { status, body } = await this.request<Record<string, unknown>>("GET", "/api/get_cached_data", undefined, headers);
    if (status !== 200 || typeof body.data !== "string") {
      throw new MeshError("ERR_CACHE_READ", status, `cache read failed (${status}): ${String(body.error ?? "no data")}`);
    }
    return {
      cached: body.cached === true,
      ageMs: Number(body.age_ms),
      server: Number(body.server),
      generation: Number(body.generation),
      snapshot: JSON.parse(this.#options.fernet.decryptText(body.data)) as DataSnapshot,
    };
  }

  /** Every server's cache counters, through the coordinator. */
  async cacheStats(): Promise<MeshResponse> {
    return this.request("GET", "/api/cache_stats", undefined, await this.readProof("/api/cache_stats"));
  }

  /** Asks the coordinator to invalidate every server's cache, proving who asks. */
  async invalidateCache(): Promise<MeshResponse> {
    const proof = await this.#signer.sign({ method: "POST", path: "/api/invalidate_cache", payload: "" });
    return this.request("POST", "/api/invalidate_cache", { proof });
  }

  /**
   * Sends one request, failing over between coordinators on connection failures and on 503, with backoff
   * between rounds. Any other answer, success or error, is returned as it is. Each request starts a trace (a W3C
   * traceparent) that every attempt carries, so a retry and a failover show in the logs under the one id.
   */
  async request<T = Record<string, unknown>>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<MeshResponse<T>> {
    const { coordinators, attempts, backoffMs, timeoutMs } = this.#options;
    const forwarded: Record<string, string> = this.#forwarder ? { [FORWARDER_HEADER]: await this.#forwarder.forwarderAssertion() } : {};
    const trace = startTrace();
    let last = "";
    let tried = 0;
    for (let round = 0; round < attempts; round++) {
      if (round > 0) await setTimeout(backoffMs * 2 ** (round - 1));
      for (const coordinator of coordinators) {
        tried += 1;
        try {
          const response = await runtime.fetch(coordinator.replace(/\/+$/, "") + path, {
            method,
            headers: { ...trace.outbound, ...forwarded, ...(body === undefined ? {} : { "content-type": "application/json" }), ...headers },
            body: body === undefined ? undefined : JSON.stringify(body),
            tls: this.#tls,
            signal: AbortSignal.timeout(timeoutMs),
          });
          const parsed = (await response.json().catch(() => ({ error: `non-JSON answer (${response.status})` }))) as T;
          if (response.status === 503) {
            last = `${coordinator} answered 503: ${(parsed as { error?: string }).error ?? ""}`;
            continue;
          }
          return { status: response.status, body: parsed, coordinator, trace: trace.id, attempts: tried };
        } catch (error) {
          last = `${coordinator}: ${describeNetworkError(error)}`;
        }
      }
    }
    throw new MeshError("ERR_UNREACHABLE", 503, `no coordinator could serve the request (${last}; trace=${trace.id})`);
  }
}
