// The client side of the request path: Fernet-encrypt, sign a sender proof, send over mutual TLS to a coordinator.
import { randomUUID } from "node:crypto";
import { setTimeout } from "node:timers/promises";
import { MeshError } from "../platform/errors.ts";
import type { DataSnapshot } from "./data-view.ts";
import { Fernet } from "./fernet.ts";
import type { FernetKeys } from "./fernet-reload.ts";
import { describeNetworkError, printable } from "../ops/log.ts";
import { startTrace } from "../ops/trace.ts";
import { PROOF_HEADER, ProofSigner } from "./proof.ts";
import { expectPeer } from "../authz/expect-peer.ts";
import { DEFAULT_MAX_LIMIT_WAIT_MS, HttpsClient, RetryAfterWaits } from "../platform/https-client.ts";
import { mutualTlsClientOptions, type Identity } from "../platform/tls.ts";

/** Whom a client's hop must reach: a coordinator (issue 18: every outbound hop pins an identity). */
export const COORDINATOR_IDENTITY = "spiffe://securemesh/coordinator/*";

export interface MeshClientOptions {
  identity: Identity;
  /**
   * The keys: a fixed set, or keys that follow their file (`FernetKeys.open(pki).watch(logger)`), so a long-lived
   * client takes up a rotation step within a second, as servers do; close() stops following.
   */
  fernet: Fernet | FernetKeys;
  /** Coordinator base URLs, tried in order; the next is used when one cannot be reached. */
  coordinators: readonly string[];
  timeoutMs?: number;
  /** Rounds over all coordinators before giving up. */
  attempts?: number;
  backoffMs?: number;
  /**
   * Whose certificate holds the TLS connection, when not `identity`'s: the coordinator's, to talk to a server
   * directly as a coordinator would (the bench's direct path, tests of one server), with `expect` set to a server.
   */
  tlsIdentity?: Identity;
  /** The identity the other end must present (default any coordinator): checked at every handshake. */
  expect?: string;
  /** Our CA's revocation list: a revoked peer is refused at the handshake and not used again. */
  isRevoked?: (serialHex: string) => boolean;
  /**
   * The most a request waits in all as 429 answers tell it (Retry-After, issue 20) before that 429 is returned; 0
   * returns the first 429 at once.
   */
  maxLimitWaitMs?: number;
}

export interface CachedDataAnswer {
  cached: boolean;
  ageMs: number;
  /** The port the answering server gives in its body: every server host may use the same one. */
  server: number;
  /** The server that answered, as the coordinator names it (host and port: MeshResponse.server), or null when not said. */
  via: string | null;
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
  /**
   * The server that answered, as the coordinator names it (its URL: host and port), or null for the coordinator's own
   * answer: every server host may listen on the same port, so the port in a body cannot say which refused (issue 23).
   */
  server: string | null;
  /** The trace id the request carried (its traceparent): every hop's access line names it. */
  trace: string;
  /** Coordinators tried for this answer: 1 when the first one answered, more after failing over. */
  attempts: number;
}

export class MeshClient {
  readonly name: string;
  readonly #options: Required<Omit<MeshClientOptions, "tlsIdentity" | "isRevoked" | "expect" | "fernet">>;
  /** Each 429 this client waited out, and how long: what a flooding caller's report counts. */
  readonly limited = { count: 0, waitedMs: 0 };
  readonly #fernet: Fernet;
  readonly #keys: FernetKeys | null;
  readonly #signer: ProofSigner;
  readonly #http: HttpsClient;

  constructor(options: MeshClientOptions) {
    if (options.coordinators.length === 0) throw new TypeError("at least one coordinator URL is needed");
    this.#options = { timeoutMs: 5000, attempts: 3, backoffMs: 200, maxLimitWaitMs: DEFAULT_MAX_LIMIT_WAIT_MS, ...options };
    this.#fernet = options.fernet instanceof Fernet ? options.fernet : options.fernet.fernet;
    this.#keys = options.fernet instanceof Fernet ? null : options.fernet;
    this.#signer = new ProofSigner(options.identity);
    const isRevoked = options.isRevoked ?? (() => false);
    // Kept-alive connections, each used only once its handshake showed the expected identity: an impostor on a
    // coordinator's port receives nothing, and so can acknowledge nothing (issue 18).
    this.#http = new HttpsClient({
      tls: {
        ...mutualTlsClientOptions(options.tlsIdentity ?? options.identity),
        checkServerIdentity: expectPeer(options.expect ?? COORDINATOR_IDENTITY, { isRevoked }),
      },
      isRevoked,
    });
    this.name = options.identity.name;
  }

  /** Closes the kept-alive connections, and stops following the key file. */
  close(): void {
    this.#keys?.stop();
    this.#http.close();
  }

  /** Encrypts `message`, proves who sent it, and posts it; one Idempotency-Key covers every retry. */
  async sendData(message: string): Promise<MeshResponse> {
    const data = this.#fernet.encrypt(message);
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
    const { status, body, server } = await this.request<Record<string, unknown>>("GET", "/api/get_cached_data", undefined, headers);
    if (status !== 200 || typeof body.data !== "string") {
      throw new MeshError(
        "ERR_CACHE_READ",
        status,
        `cache read failed (${status}${server ? ` from server ${printable(server)}` : ""}): ${printable(String(body.error ?? "no data"))}`,
      );
    }
    return {
      cached: body.cached === true,
      ageMs: Number(body.age_ms),
      server: Number(body.server),
      via: server,
      generation: Number(body.generation),
      snapshot: JSON.parse(this.#fernet.decryptText(body.data)) as DataSnapshot,
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
   * between rounds. A 429 with Retry-After is waited out and sent again, to the same coordinator, while the waits
   * stay within maxLimitWaitMs; nothing of a refused request was done, so its proof is still unused. Any other
   * answer, success or error, is returned as it is. Each request starts a trace (a W3C traceparent) that every
   * attempt carries, so a retry and a failover show in the logs under the one id.
   */
  async request<T = Record<string, unknown>>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<MeshResponse<T>> {
    const { coordinators, attempts, backoffMs } = this.#options;
    const trace = startTrace();
    let last = "";
    let tried = 0;
    const waits = new RetryAfterWaits(this.#options.maxLimitWaitMs);
    for (let round = 0; round < attempts; round++) {
      if (round > 0) await setTimeout(backoffMs * 2 ** (round - 1));
      for (const coordinator of coordinators) {
        tried += 1;
        try {
          let answer = await this.#send<T>(coordinator, method, path, body, headers, trace.outbound);
          for (let wait = waits.next(answer.status, answer.retryAfter); wait !== null; wait = waits.next(answer.status, answer.retryAfter)) {
            this.limited.count += 1;
            this.limited.waitedMs += wait;
            await setTimeout(wait);
            answer = await this.#send<T>(coordinator, method, path, body, headers, trace.outbound);
          }
          if (answer.status === 503) {
            last = `${coordinator} answered 503: ${(answer.body as { error?: string }).error ?? ""}`;
            continue;
          }
          return { status: answer.status, body: answer.body, coordinator, server: answer.server, trace: trace.id, attempts: tried };
        } catch (error) {
          last = `${coordinator}: ${describeNetworkError(error)}`;
        }
      }
    }
    throw new MeshError("ERR_UNREACHABLE", 503, `no coordinator could serve the request (${last}; trace=${trace.id})`);
  }

  /** One attempt at one coordinator: its status, its JSON (or a note that it sent none), and the server named. */
  async #send<T>(
    coordinator: string,
    method: string,
    path: string,
    body: unknown,
    headers: Record<string, string>,
    traceHeaders: Record<string, string>,
  ): Promise<Attempt<T>> {
    const response = await this.#http.request(coordinator.replace(/\/+$/, "") + path, {
      method,
      headers: { ...traceHeaders, ...(body === undefined ? {} : { "content-type": "application/json" }), ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
      timeoutMs: this.#options.timeoutMs,
      // Every write carries an Idempotency-Key, and reads change nothing: safe to send again on a new connection.
      idempotent: method === "GET" || "idempotency-key" in headers,
    });
    let parsed: T;
    try {
      parsed = response.json() as T;
    } catch {
      parsed = { error: `non-JSON answer (${response.status})` } as T;
    }
    return { status: response.status, body: parsed, server: response.header("x-securemesh-upstream"), retryAfter: response.header("retry-after") };
  }
}

interface Attempt<T> {
  status: number;
  body: T;
  server: string | null;
  retryAfter: string | null;
}
