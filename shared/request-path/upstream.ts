// The upstream pool: round-robin over healthy servers, failover, active health checks with fall/rise counts, passive
// outlier ejection capped at a share of the pool, panic routing, a bounded wait queue and a retry budget (issue 20:
// never eject everything; docs/failover.md). It reaches the servers through a transport it is given: in a role, an HttpsClient whose every connection has shown a
// server identity at its handshake (shared/platform/https-client.ts), so no request, forward, retry, probe or
// broadcast, is written to anything else; in a test, whatever the test needs.
import { MeshError, Unavailable } from "../platform/errors.ts";
import { UnsendableRequest, type HttpsRequest } from "../platform/https-client.ts";
import type { NetworkErrorCode } from "../platform/runtime/index.ts";
import { describeNetworkError as reason, printable, type Logger } from "../ops/log.ts";
import type { Metrics } from "../ops/metrics.ts";
import { traceOf, type Trace } from "../ops/trace.ts";
import { systemClock, type PoolClock } from "./pool-clock.ts";
import { PROOF_HEADER } from "./proof.ts";
import { DEFAULT_RETRY_BUDGET, RetryBudget, type RetryBudgetOptions } from "./retry-budget.ts";

/** An answer as the pool reads it (HttpsResponse is one). */
export interface UpstreamAnswer {
  status: number;
  body: Uint8Array;
  header(name: string): string | null;
}

/** How the pool reaches a server: HttpsClient in the roles. Rejects with the runtime's NetworkError codes. */
export interface UpstreamTransport {
  request(url: string, init: HttpsRequest): Promise<UpstreamAnswer>;
}

export interface HealthCheckOptions {
  intervalMs: number;
  timeoutMs: number;
  /** Consecutive failed probes before an up server is taken out of rotation. */
  fall: number;
  /** Consecutive good probes before a down server is put back. */
  rise: number;
}

export interface UpstreamOptions {
  servers: readonly string[];
  transport: UpstreamTransport;
  logger: Logger;
  /** Per-attempt timeout, covering connect, request and response body. */
  timeoutMs?: number;
  health?: Partial<HealthCheckOptions>;
  outlier?: Partial<OutlierOptions>;
  /** Below this share of servers in rotation, route over every server believed reachable (Envoy's panic threshold). */
  panicThreshold?: number;
  queue?: Partial<QueueOptions>;
  retryBudget?: Partial<RetryBudgetOptions>;
  /** The wall clock unless a test moves its own. */
  clock?: PoolClock;
}

/** Passive outlier detection on real forwards (Envoy's consecutive_gateway_failure, base/max_ejection_time). */
export interface OutlierOptions {
  /** Consecutive gateway failures (refused, reset, timed out, 502, 504) that eject a server. */
  consecutiveGatewayFailures: number;
  /** The first ejection's length; each further one is this times the ejection count, up to maxEjectionMs. */
  baseEjectionMs: number;
  maxEjectionMs: number;
  /** Healthy time after which the ejection count steps back by one. */
  decayMs: number;
  /** Servers out of rotation (ejected or failed by probes) beyond which no further one is ejected; never all. */
  maxEjectedShare: number;
}

/** When no server can take a request, it waits here (HAProxy's queue and `timeout queue`). */
export interface QueueOptions {
  maxWaiting: number;
  timeoutMs: number;
}

/** How a server's store fares, from its /health: a server whose database stalls is alive and may still serve reads. */
export type StoreStatus = "ok" | "stalled";

export interface UpstreamState {
  url: string;
  up: boolean;
  lastCheckedAt: number | null;
  latencyMs: number | null;
  requests: number;
  failures: number;
  lastError: string | null;
  /** The server's own /health body from the last good probe. */
  health: Record<string, unknown> | null;
  /**
   * How far the server's clock is from this one (ms, + ahead), from the `facts.time` its /health reports against the
   * middle of the probe's round trip (issue 23); null until a probe brings one.
   */
  clockSkewMs: number | null;
  /** Taken out of rotation by an operator (drain()): no new request goes to it until undrain(). */
  draining: boolean;
  /** Forwards to it not yet answered. */
  inFlight: number;
  /** The last probe met a server that answered (any status), or none has run yet: panic routing may use it. */
  reachable: boolean;
  /** Its /health's `store_status`; null until a probe brings one. */
  storeStatus: StoreStatus | null;
  /** A passive ejection in force, with why, until when, and how many so far (the count grows the next one). */
  ejection: { reason: string; until: number; count: number } | null;
}

/** The pool as a whole, for /metrics, the status page and the coordinator's /health. */
export interface RoutingState {
  panic: boolean;
  /** Since when (ms) the pool is in panic, or null. */
  panicSince: number | null;
  panicEntries: number;
  inRotation: number;
  total: number;
  panicThreshold: number;
  maxEjected: number;
  ejections: number;
  ejectionsRefused: number;
  queue: { waiting: number; maxWaiting: number; timeoutMs: number; queued: number; timedOut: number; full: number };
  retryBudget: RetryBudgetOptions & { requests: number; retries: number; exhausted: number };
}

export interface ForwardRequest {
  method: string;
  /** Path and query, e.g. /api/data */
  path: string;
  headers: Headers;
  body?: Uint8Array;
  /** The incoming request's trace (createApp's requestTrace), sent on; read from `headers` when not given. */
  trace?: Trace;
}

export interface ForwardResult {
  status: number;
  contentType: string | null;
  body: Uint8Array;
  upstream: string;
  /** The server's Retry-After, passed on with its 429 (a sender over its limit there, issue 20). */
  retryAfter: string | null;
}

export const DEFAULT_HEALTH: HealthCheckOptions = { intervalMs: 1000, timeoutMs: 1000, fall: 2, rise: 2 };
/** The defaults of issue 20, quoted in docs/overload.md. Envoy ejects after 5 and for 30 s; a mesh of two servers wants less. */
export const CONSECUTIVE_GATEWAY_FAILURES = 3;
export const BASE_EJECTION_MS = 5_000;
export const MAX_EJECTION_MS = 60_000;
export const EJECTION_DECAY_MS = 30_000;
export const MAX_EJECTED_PERCENT = 50;
export const PANIC_THRESHOLD_PERCENT = 50;
export const QUEUE_MAX_WAITING = 64;
export const QUEUE_TIMEOUT_MS = 500;
export const DEFAULT_OUTLIER: OutlierOptions = {
  consecutiveGatewayFailures: CONSECUTIVE_GATEWAY_FAILURES,
  baseEjectionMs: BASE_EJECTION_MS,
  maxEjectionMs: MAX_EJECTION_MS,
  decayMs: EJECTION_DECAY_MS,
  maxEjectedShare: MAX_EJECTED_PERCENT / 100,
};
export const DEFAULT_PANIC_THRESHOLD = PANIC_THRESHOLD_PERCENT / 100;
export const DEFAULT_QUEUE: QueueOptions = { maxWaiting: QUEUE_MAX_WAITING, timeoutMs: QUEUE_TIMEOUT_MS };
/** Seconds a 503 from the pool asks the caller to wait (Retry-After). */
export const POOL_RETRY_AFTER_S = 1;
/** Answers that count as a gateway failure, as Envoy's: the server is there but something in front of it is not. */
const GATEWAY_STATUSES = new Set([502, 504]);
/**
 * An allowlist: nothing else a caller sends reaches a server. The trace (traceparent or X-Request-Id) goes as
 * checked by shared/ops/trace.ts, never as the caller sent it.
 */
const FORWARDED_HEADERS = ["content-type", "accept", "cache-control", "idempotency-key", PROOF_HEADER];
/**
 * Failures where the request provably never reached the server's application, so any method may be re-sent: the
 * transport's codes, the same on Bun and Deno. A server presenting a certificate or identity we refuse was refused
 * at the handshake: nothing was sent to it. ECONNRESET may have reached it.
 */
const NEVER_REACHED = new Set<NetworkErrorCode>([
  "ECONNREFUSED",
  "ENOTFOUND",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EPROTO",
  "ERR_TLS_CERT",
  "ERR_TLS_HOSTNAME",
  "ERR_UNEXPECTED_PEER",
]);

interface Server extends UpstreamState {
  okStreak: number;
  failStreak: number;
  /** Added to a running pool: in rotation at its first good probe. */
  joining: boolean;
  /** Who waits for a draining server's last forward to end (drained()). */
  emptied: (() => void)[];
  /** The probes' verdict (fall/rise); `up` is this and no ejection. */
  probeUp: boolean;
  /** Consecutive gateway failures of real requests. */
  gatewayStreak: number;
  /** Ejections so far, stepping back one per decayMs of healthy time since the last one ended. */
  ejections: number;
  lastEjectionEnd: number;
  /** An ejection or a probe's take-out refused by the cap is logged once per streak. */
  refusalLogged: boolean;
}

const normalUrl = (url: string) => url.replace(/\/+$/, "");

/**
 * A server as the pool starts it: at start optimistic until the first probe (a dead server costs one failover, not an
 * outage, and whatever answers there is checked at the handshake like every connection); joining later, out of
 * rotation until a probe has seen it answer.
 */
function newServer(url: string, up: boolean): Server {
  return {
    url: normalUrl(url),
    up,
    joining: !up,
    lastCheckedAt: null,
    latencyMs: null,
    requests: 0,
    failures: 0,
    lastError: null,
    health: null,
    clockSkewMs: null,
    draining: false,
    inFlight: 0,
    emptied: [],
    reachable: true,
    storeStatus: null,
    ejection: null,
    okStreak: 0,
    failStreak: 0,
    probeUp: up,
    gatewayStreak: 0,
    ejections: 0,
    lastEjectionEnd: 0,
    refusalLogged: false,
  };
}

/**
 * How many servers may be out of rotation at once before no more is ejected: a share, at least one, never all. A lone
 * server may go out: panic routing still sends to it while it answers.
 */
export function maxEjected(total: number, share: number): number {
  return total === 1 ? 1 : Math.min(total - 1, Math.max(1, Math.floor(total * share)));
}

/** The next ejection's length: base × count (Envoy's), capped. */
export function ejectionMs(count: number, outlier: Pick<OutlierOptions, "baseEjectionMs" | "maxEjectionMs">): number {
  return Math.min(outlier.baseEjectionMs * count, outlier.maxEjectionMs);
}

export function neverReachedServer(error: unknown): boolean {
  return NEVER_REACHED.has((error as { code?: string }).code as NetworkErrorCode);
}

export class UpstreamPool {
  #servers: Server[];
  readonly #transport: UpstreamTransport;
  readonly #logger: Logger;
  readonly #timeoutMs: number;
  readonly #health: HealthCheckOptions;
  readonly #outlier: OutlierOptions;
  readonly #panicThreshold: number;
  readonly #queue: QueueOptions;
  readonly #budget: RetryBudget;
  readonly #budgetOptions: RetryBudgetOptions;
  readonly #clock: PoolClock;
  /**
   * One round-robin cursor for reads and one for writes: with a single cursor, a client that reads before each write
   * sent every read to one server and every write to the other (the demo's two servers, found re-running it). Two
   * fixed keys, never the caller's path, so callers cannot grow the map.
   */
  readonly #next = new Map<"read" | "write", number>();
  #retries = 0;
  #panicSince: number | null = null;
  #panicEntries = 0;
  #ejectionsRefused = 0;
  readonly #ejectionCounts = new Map<string, number>();
  /** Requests waiting for a server, woken at every change of the rotation. */
  readonly #waiting = new Set<() => void>();
  #queued = 0;
  #queueTimedOut = 0;
  #queueFull = 0;
  #timer: ReturnType<typeof setTimeout> | null = null;
  #stopped = true;

  constructor(options: UpstreamOptions) {
    if (options.servers.length === 0) throw new TypeError("the pool needs at least one server");
    this.#servers = options.servers.map((url) => newServer(url, true));
    this.#transport = options.transport;
    this.#logger = options.logger;
    this.#timeoutMs = options.timeoutMs ?? 2000;
    this.#health = { ...DEFAULT_HEALTH, ...options.health };
    this.#outlier = { ...DEFAULT_OUTLIER, ...options.outlier };
    this.#panicThreshold = options.panicThreshold ?? DEFAULT_PANIC_THRESHOLD;
    this.#queue = { ...DEFAULT_QUEUE, ...options.queue };
    this.#clock = options.clock ?? systemClock;
    this.#budgetOptions = { ...DEFAULT_RETRY_BUDGET, ...options.retryBudget };
    this.#budget = new RetryBudget(this.#budgetOptions, this.#clock);
  }

  get servers(): readonly string[] {
    return this.#servers.map((s) => s.url);
  }

  /**
   * A new membership (issue 23: adding a server host restarted every coordinator): servers no longer listed leave
   * at once (requests in flight to them finish), new ones join out of rotation and enter at their first good probe,
   * which is started now. The others keep their state.
   */
  setServers(urls: readonly string[]): { added: string[]; removed: string[] } {
    if (urls.length === 0) throw new TypeError("the pool needs at least one server");
    const wanted = [...new Set(urls.map(normalUrl))];
    const known = new Map(this.#servers.map((s) => [s.url, s]));
    const added = wanted.filter((url) => !known.has(url));
    const removed = this.#servers.filter((s) => !wanted.includes(s.url)).map((s) => s.url);
    this.#servers = wanted.map((url) => known.get(url) ?? newServer(url, false));
    for (const url of removed) this.#logger.info(`Server ${url} left the pool (membership changed)`, { upstream: url });
    for (const url of added) this.#logger.info(`Server ${url} joined the pool; in rotation after its first good health check`, { upstream: url });
    this.#changed();
    if (added.length > 0 && !this.#stopped) void this.checkAll();
    return { added, removed };
  }

  snapshot(): UpstreamState[] {
    this.#expireEjections();
    return this.#servers.map(
      ({ url, up, lastCheckedAt, latencyMs, requests, failures, lastError, health, clockSkewMs, draining, inFlight, reachable, storeStatus, ejection }) => ({
        url,
        up,
        lastCheckedAt,
        latencyMs,
        requests,
        failures,
        lastError,
        health,
        clockSkewMs,
        draining,
        inFlight,
        reachable,
        storeStatus,
        ejection: ejection && { ...ejection },
      }),
    );
  }

  /** Panic, the cap, the queue and the retry budget, with the settings they work to. */
  routing(): RoutingState {
    this.#expireEjections();
    const usage = this.#budget.usage();
    return {
      panic: this.#panicSince !== null,
      panicSince: this.#panicSince,
      panicEntries: this.#panicEntries,
      inRotation: this.#servers.filter((s) => s.up).length,
      total: this.#servers.length,
      panicThreshold: this.#panicThreshold,
      maxEjected: maxEjected(this.#servers.length, this.#outlier.maxEjectedShare),
      ejections: [...this.#ejectionCounts.values()].reduce((a, b) => a + b, 0),
      ejectionsRefused: this.#ejectionsRefused,
      queue: {
        waiting: this.#waiting.size,
        maxWaiting: this.#queue.maxWaiting,
        timeoutMs: this.#queue.timeoutMs,
        queued: this.#queued,
        timedOut: this.#queueTimedOut,
        full: this.#queueFull,
      },
      retryBudget: { ...this.#budgetOptions, ...usage, exhausted: this.#budget.exhausted },
    };
  }

  /** Exposes per-server state, ejections, panic, the queue and the retry budget on a role's /metrics, read at scrape time. */
  exportMetrics(metrics: Metrics): void {
    const perServer = (read: (s: Server) => number) => () => this.#servers.map((s) => ({ labels: { upstream: s.url }, value: read(s) }));
    const pool = (read: (r: RoutingState) => number) => () => [{ value: read(this.routing()) }];
    metrics.collect(
      "securemesh_upstream_up",
      "1 while the server is in rotation (probes pass and no ejection is in force).",
      "gauge",
      perServer((s) => (this.#expireEjections(), s.up ? 1 : 0)),
    );
    metrics.collect(
      "securemesh_upstream_requests_total",
      "Requests a server answered.",
      "counter",
      perServer((s) => s.requests),
    );
    metrics.collect(
      "securemesh_upstream_failures_total",
      "Requests and broadcasts to a server that failed (refused, reset, timed out).",
      "counter",
      perServer((s) => s.failures),
    );
    metrics.collect(
      "securemesh_upstream_draining",
      "1 while an operator has the server drained (out of rotation on request).",
      "gauge",
      perServer((s) => (s.draining ? 1 : 0)),
    );
    metrics.collect(
      "securemesh_upstream_in_flight",
      "Forwards to the server not yet answered.",
      "gauge",
      perServer((s) => s.inFlight),
    );
    metrics.collect("securemesh_upstream_retries_total", "Requests re-sent to the next server after one failed.", "counter", () => [{ value: this.#retries }]);
    metrics.collect("securemesh_upstream_check_latency_seconds", "Latency of the last health check.", "gauge", () =>
      this.#servers.filter((s) => s.latencyMs !== null).map((s) => ({ labels: { upstream: s.url }, value: s.latencyMs! / 1000 })),
    );
    // A fixed reason label (the only kind of ejection there is), never the error text: the series stay few and stable.
    metrics.collect(
      "securemesh_upstream_ejected",
      "1 while a passive ejection holds the server out, labelled with why.",
      "gauge",
      () => (
        this.#expireEjections(),
        this.#servers.filter((s) => s.ejection).map((s) => ({ labels: { upstream: s.url, reason: "consecutive_gateway_failures" }, value: 1 }))
      ),
    );
    metrics.collect("securemesh_upstream_ejections_total", "Passive ejections after consecutive gateway failures.", "counter", () =>
      [...this.#ejectionCounts].map(([url, value]) => ({ labels: { upstream: url, reason: "consecutive_gateway_failures" }, value })),
    );
    metrics.collect(
      "securemesh_upstream_ejections_refused_total",
      "Ejections not made because the share of servers out was at its cap.",
      "counter",
      pool((r) => r.ejectionsRefused),
    );
    metrics.collect(
      "securemesh_upstream_store_stalled",
      "1 while the server's /health says its record store stalls (alive, writes go elsewhere first).",
      "gauge",
      perServer((s) => (s.storeStatus === "stalled" ? 1 : 0)),
    );
    metrics.collect(
      "securemesh_upstream_panic",
      "1 while too few servers are in rotation and the pool routes over every reachable one.",
      "gauge",
      pool((r) => (r.panic ? 1 : 0)),
    );
    metrics.collect(
      "securemesh_upstream_panic_total",
      "Times the pool entered panic routing.",
      "counter",
      pool((r) => r.panicEntries),
    );
    metrics.collect(
      "securemesh_upstream_queue_depth",
      "Requests waiting for a server to take them.",
      "gauge",
      pool((r) => r.queue.waiting),
    );
    metrics.collect(
      "securemesh_upstream_queued_total",
      "Requests that had to wait for a server.",
      "counter",
      pool((r) => r.queue.queued),
    );
    metrics.collect(
      "securemesh_upstream_queue_rejected_total",
      "Requests answered 503 from the queue, by why: it was full, or they waited out its timeout.",
      "counter",
      () => [
        { labels: { reason: "full" }, value: this.#queueFull },
        { labels: { reason: "timeout" }, value: this.#queueTimedOut },
      ],
    );
    metrics.collect(
      "securemesh_upstream_retry_budget_exhausted_total",
      "Failed attempts answered rather than retried because the retry budget was spent.",
      "counter",
      pool((r) => r.retryBudget.exhausted),
    );
  }

  /**
   * The servers to try, in round-robin order, starting one further each call of the same kind: those in rotation, or
   * in panic every one believed reachable. Writes go first to servers whose store is ok; a stalled one stays as a last
   * resort (its own store may recover first), reads go anywhere (the server's cache may answer).
   */
  #rotation(kind: "read" | "write"): Server[] {
    this.#expireEjections();
    // A server an operator drained gets nothing new, panic or not.
    const open = this.#servers.filter((s) => !s.draining);
    const candidates = this.#panicSince === null ? open.filter((s) => s.up) : open.filter((s) => s.up || s.reachable);
    if (candidates.length === 0) return [];
    const turn = this.#next.get(kind) ?? 0;
    this.#next.set(kind, turn + 1);
    const start = turn % candidates.length;
    const order = [...candidates.slice(start), ...candidates.slice(0, start)];
    return kind === "read" ? order : [...order.filter((s) => s.storeStatus !== "stalled"), ...order.filter((s) => s.storeStatus === "stalled")];
  }

  /**
   * Sends the request to the next healthy server, failing over on refusal, reset or timeout. A request that may
   * have reached a server is re-sent only when it is safe: GET/HEAD, or carrying an Idempotency-Key; and only while
   * the retry budget lasts. With no server to take it, it waits in the bounded queue.
   */
  async forward(request: ForwardRequest): Promise<ForwardResult> {
    const kind = request.method === "GET" || request.method === "HEAD" ? "read" : "write";
    const order = await this.#serversFor(kind);
    this.#budget.request();
    const replayable = kind === "read" || request.headers.has("idempotency-key");
    const trace = request.trace ?? traceOf(request.headers);
    const headers: Record<string, string> = { ...trace.outbound };
    for (const name of FORWARDED_HEADERS) {
      const value = request.headers.get(name);
      if (value !== null) headers[name] = value;
    }
    let lastReason = "";
    for (const [attempt, server] of order.entries()) {
      if (attempt > 0) {
        if (!this.#budget.tryRetry()) {
          this.#logger.warn(`Retry budget spent: not re-sending after ${lastReason} ${trace.field}=${trace.id}`, { [trace.field]: trace.id });
          throw new MeshError("ERR_RETRY_BUDGET", 503, `the server failed and the retry budget is spent (last: ${lastReason})`, {
            retryAfterSeconds: POOL_RETRY_AFTER_S,
          });
        }
        this.#retries += 1;
      }
      server.inFlight += 1;
      try {
        const answer = await this.#send(server.url, request.method, request.path, headers, request.body, replayable);
        server.requests += 1;
        if (GATEWAY_STATUSES.has(answer.status)) this.#gatewayFailure(server, `answered ${answer.status}`);
        else server.gatewayStreak = 0;
        return {
          status: answer.status,
          contentType: answer.header("content-type"),
          body: answer.body,
          upstream: server.url,
          retryAfter: answer.header("retry-after"),
        };
      } catch (error) {
        // The caller's request, not the server: answered 4xx, counted against no server, tried on no other.
        if (error instanceof UnsendableRequest) throw error;
        lastReason = reason(error);
        this.#markFailed(server, error, trace);
        if (!replayable && !neverReachedServer(error)) {
          throw new MeshError("ERR_UPSTREAM_UNCERTAIN", 502, "the server failed after the request may have reached it; not re-sent without an Idempotency-Key");
        }
      } finally {
        this.#forwardEnded(server);
      }
    }
    throw new Unavailable(`every server failed (last: ${lastReason})`, { retryAfterSeconds: POOL_RETRY_AFTER_S });
  }

  /** The rotation now, or after waiting in the queue for a server to come back: bounded in count and time. */
  async #serversFor(kind: "read" | "write"): Promise<Server[]> {
    let order = this.#rotation(kind);
    if (order.length > 0) return order;
    if (this.#waiting.size >= this.#queue.maxWaiting || this.#queue.timeoutMs <= 0) {
      this.#queueFull += 1;
      throw new Unavailable(`no server is up (queue full: ${this.#waiting.size} waiting)`, { retryAfterSeconds: POOL_RETRY_AFTER_S });
    }
    this.#queued += 1;
    const deadline = this.#clock.now() + this.#queue.timeoutMs;
    while (order.length === 0) {
      const left = deadline - this.#clock.now();
      if (left <= 0) {
        this.#queueTimedOut += 1;
        throw new Unavailable(`no server is up (waited ${this.#queue.timeoutMs} ms in the queue)`, { retryAfterSeconds: POOL_RETRY_AFTER_S });
      }
      await new Promise<void>((resolve) => {
        const wake = () => {
          cancel();
          this.#waiting.delete(wake);
          resolve();
        };
        const cancel = this.#clock.after(left, wake);
        this.#waiting.add(wake);
      });
      order = this.#rotation(kind);
    }
    return order;
  }

  /**
   * Takes `url` out of rotation on an operator's request (the coordinator's admin.drain): no new forward goes to it;
   * forwards in flight finish. Probes go on, so the status page still shows its health. Returns it as it is now.
   */
  drain(url: string, by: string): UpstreamState {
    const server = this.#known(url);
    if (!server.draining) {
      server.draining = true;
      this.#logger.info(`Server ${server.url} draining on request of ${printable(by)}: no new requests; ${server.inFlight} in flight`, {
        upstream: server.url,
      });
      if (server.inFlight === 0) this.#emptied(server);
    }
    return this.snapshot().find((s) => s.url === server.url)!;
  }

  /** Puts a drained server back: in rotation again while its probes pass. */
  undrain(url: string, by: string): UpstreamState {
    const server = this.#known(url);
    if (server.draining) {
      server.draining = false;
      this.#logger.info(`Server ${server.url} back in rotation on request of ${printable(by)}`, { upstream: server.url });
    }
    return this.snapshot().find((s) => s.url === server.url)!;
  }

  /** Resolves true once a draining server has no forward in flight, or false after `timeoutMs`. */
  drained(url: string, timeoutMs: number): Promise<boolean> {
    const server = this.#known(url);
    if (server.inFlight === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      server.emptied.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  #known(url: string): Server {
    const server = this.#servers.find((s) => s.url === normalUrl(url));
    if (!server) throw new MeshError("ERR_NOT_FOUND", 404, `no server ${JSON.stringify(url.slice(0, 200))} in the pool`);
    return server;
  }

  #forwardEnded(server: Server): void {
    server.inFlight -= 1;
    if (server.inFlight === 0 && server.draining) this.#emptied(server);
  }

  #emptied(server: Server): void {
    this.#logger.info(`Server ${server.url} drained: no request in flight`, { upstream: server.url });
    for (const done of server.emptied.splice(0)) done();
  }

  /**
   * Sends the same request to every configured server in parallel, up or not; reports each outcome. A server out
   * of rotation may be anything by now: like every request, each goes only over a connection whose handshake showed
   * a server identity (an impostor on a dead server's port received the caller's proof before, found by attack on
   * #11). `trace` is the incoming request's, sent on with it.
   */
  async broadcast(method: string, path: string, headers: Record<string, string> = {}, body?: Uint8Array, trace?: Trace) {
    const outbound = { ...headers, ...trace?.outbound };
    return Promise.all(
      this.#servers.map(async (server) => {
        try {
          const answer = await this.#send(server.url, method, path, outbound, body, method === "GET");
          return { server: server.url, ok: answer.status < 300, status: answer.status, body: answer.body } as const;
        } catch (error) {
          if (error instanceof UnsendableRequest) throw error;
          this.#markFailed(server, error, trace);
          return { server: server.url, ok: false, status: null, error: reason(error) } as const;
        }
      }),
    );
  }

  #send(
    base: string,
    method: string,
    path: string,
    headers: Record<string, string>,
    body: Uint8Array | undefined,
    idempotent: boolean,
  ): Promise<UpstreamAnswer> {
    return this.#transport.request(base + path, {
      method,
      headers,
      body: body && body.byteLength > 0 ? body : undefined,
      timeoutMs: this.#timeoutMs,
      idempotent,
    });
  }

  #markFailed(server: Server, error: unknown, trace?: Trace): void {
    const why = reason(error);
    server.failures += 1;
    server.lastError = why;
    server.okStreak = 0;
    // The request's trace, so a failover can be followed in this log as in the access lines.
    this.#logger.warn(`Server ${server.url} failed: ${why}${trace ? ` ${trace.field}=${trace.id}` : ""}`, {
      upstream: server.url,
      ...(trace ? { [trace.field]: trace.id } : {}),
    });
    if (isUnexpectedPeer(error)) {
      // Not a server at all: out at once, as a probe that meets it, and not "reachable" for panic routing either.
      server.reachable = false;
      server.failStreak = this.#health.fall;
      server.probeUp = false;
      this.#changed();
      return;
    }
    if (neverReachedServer(error)) server.reachable = false;
    this.#gatewayFailure(server, why);
  }

  /** One more consecutive gateway failure: at the threshold, an ejection, unless the cap on servers out is reached. */
  #gatewayFailure(server: Server, why: string): void {
    server.gatewayStreak += 1;
    if (server.ejection || server.gatewayStreak < this.#outlier.consecutiveGatewayFailures) return this.#changed();
    const out = this.#servers.filter((s) => !s.up).length;
    const cap = maxEjected(this.#servers.length, this.#outlier.maxEjectedShare);
    if (server.up && out >= cap) {
      this.#ejectionsRefused += 1;
      if (!server.refusalLogged) {
        server.refusalLogged = true;
        this.#logger.warn(
          `Server ${server.url} not ejected after ${server.gatewayStreak} consecutive failures: ${out} of ${this.#servers.length} servers already out, the most allowed`,
          { upstream: server.url },
        );
      }
      return this.#changed();
    }
    const now = this.#clock.now();
    const decayed = Math.max(0, server.ejections - Math.floor((now - server.lastEjectionEnd) / this.#outlier.decayMs));
    const count = decayed + 1;
    const length = ejectionMs(count, this.#outlier);
    server.ejections = count;
    server.ejection = { reason: `${server.gatewayStreak} consecutive gateway failures (last: ${why})`, until: now + length, count };
    server.gatewayStreak = 0;
    server.refusalLogged = false;
    this.#ejectionCounts.set(server.url, (this.#ejectionCounts.get(server.url) ?? 0) + 1);
    this.#logger.warn(`Server ${server.url} ejected for ${(length / 1000).toFixed(1)} s (ejection ${count}): ${server.ejection.reason}`, {
      upstream: server.url,
    });
    this.#clock.after(length, () => this.#changed());
    this.#changed();
  }

  /** Ejections whose time is up end; the server is back if its probes pass. */
  #expireEjections(): void {
    const now = this.#clock.now();
    let ended = false;
    for (const server of this.#servers) {
      if (server.ejection && server.ejection.until <= now) {
        server.lastEjectionEnd = server.ejection.until;
        server.ejection = null;
        ended = true;
      }
    }
    if (ended) this.#changed();
  }

  /**
   * After anything that may change the rotation: each server's `up` from its probes and ejection (logging when it
   * comes back), panic entered or left (one line each), and waiting requests woken to look again.
   */
  #changed(): void {
    for (const server of this.#servers) {
      const up = server.probeUp && server.ejection === null;
      if (up && !server.up) {
        this.#logger.info(server.joining ? `Server ${server.url} is in rotation` : `Server ${server.url} is back in rotation`, { upstream: server.url });
        server.joining = false;
      }
      server.up = up;
    }
    const inRotation = this.#servers.filter((s) => s.up).length;
    const total = this.#servers.length;
    const panic = inRotation / total < this.#panicThreshold;
    if (panic && this.#panicSince === null) {
      this.#panicSince = this.#clock.now();
      this.#panicEntries += 1;
      const reachable = this.#servers.filter((s) => s.up || s.reachable).length;
      this.#logger.warn(
        `Panic routing: ${inRotation} of ${total} servers in rotation, under ${Math.round(this.#panicThreshold * 100)} %; routing over every server believed reachable (${reachable})`,
      );
    } else if (!panic && this.#panicSince !== null) {
      this.#panicSince = null;
      this.#logger.info(`Panic routing over: ${inRotation} of ${total} servers in rotation`);
    }
    for (const wake of [...this.#waiting]) wake();
  }

  /** Starts the active health checks; the first round runs at once. */
  start(): void {
    if (!this.#stopped) return;
    this.#stopped = false;
    const loop = async () => {
      await this.checkAll();
      if (!this.#stopped) this.#timer = setTimeout(loop, this.#health.intervalMs);
    };
    void loop();
  }

  stop(): void {
    this.#stopped = true;
    if (this.#timer) clearTimeout(this.#timer);
  }

  /** One round of probes to every server, in parallel. */
  async checkAll(): Promise<void> {
    await Promise.all(this.#servers.map((server) => this.#probe(server)));
  }

  async #probe(server: Server): Promise<void> {
    const started = performance.now();
    const sentAt = Date.now();
    let failure: string | null = null;
    let unexpectedPeer = false;
    let answered = false;
    let caught: unknown = null;
    try {
      const answer = await this.#transport.request(`${server.url}/health`, { timeoutMs: this.#health.timeoutMs, idempotent: true });
      answered = true;
      if (answer.status === 200) {
        server.health = parseJson(answer.body);
        const time = (server.health?.facts as { time?: unknown } | undefined)?.time;
        server.clockSkewMs = typeof time === "number" ? Math.round(time - (sentAt + Date.now()) / 2) : null;
        server.storeStatus = server.health?.store_status === "stalled" ? "stalled" : "ok";
      } else failure = `health check answered ${answer.status}`;
    } catch (error) {
      caught = error;
      failure = reason(error);
      // Not a flap: whatever answers there is not a server. Out at once, and back only after `rise` good probes.
      unexpectedPeer = isUnexpectedPeer(error);
      if (unexpectedPeer) server.failStreak = this.#health.fall;
    }
    // Believed reachable unless shown otherwise: a server that answers, even 503, is there, and one that timed out or
    // reset may be only slow; in panic either may still take requests. One that refuses, cannot be reached or shows
    // another identity is not there (Envoy's panic routes to every host; it does not check identities).
    server.reachable = answered || !neverReachedServer(caught);
    server.lastCheckedAt = Date.now();
    server.latencyMs = Math.round((performance.now() - started) * 10) / 10;
    if (failure === null) {
      server.failStreak = 0;
      server.refusalLogged = false;
      server.okStreak += 1;
      server.lastError = null;
      if (!server.probeUp && (server.joining || server.okStreak >= this.#health.rise)) {
        server.probeUp = true;
        // The probes saw it fail and come back (a restart, a hang resumed): the ejection has done its work. As Envoy's
        // successful_active_health_check_uneject_host, but only after a probe failure, so that a server failing
        // some requests while its probes pass stays out for its time. A chaos run found why: a server restarted
        // after kill -9 stayed ejected, the cap then kept the other, hung one in, and reads waited on it.
        if (server.ejection) {
          server.lastEjectionEnd = this.#clock.now();
          server.ejection = null;
        }
      }
    } else {
      server.okStreak = 0;
      server.failStreak += 1;
      server.lastError = failure;
      if (server.probeUp && (server.failStreak >= this.#health.fall || unexpectedPeer)) {
        // The cap holds for the probes too: a server that still answers (503, reset, timeout) stays in while as many
        // servers as allowed are out already. One that is not there at all (refused, unreachable, another identity)
        // goes out whatever the count: sending to it could never help.
        const out = this.#servers.filter((s) => !s.up).length;
        const cap = maxEjected(this.#servers.length, this.#outlier.maxEjectedShare);
        if (server.reachable && server.up && out >= cap) {
          this.#ejectionsRefused += 1;
          if (!server.refusalLogged) {
            server.refusalLogged = true;
            this.#logger.warn(
              `Server ${server.url} failed: ${failure} (health check); kept in rotation: ${out} of ${this.#servers.length} servers already out, the most allowed`,
              { upstream: server.url },
            );
          }
        } else {
          server.probeUp = false;
          this.#logger.warn(`Server ${server.url} failed: ${failure} (health check); out of rotation`, { upstream: server.url });
        }
      }
    }
    this.#changed();
  }
}

const isUnexpectedPeer = (error: unknown) => (error as { code?: string } | null)?.code === "ERR_UNEXPECTED_PEER";

function parseJson(body: Uint8Array): Record<string, unknown> | null {
  try {
    const value: unknown = JSON.parse(new TextDecoder().decode(body));
    return typeof value === "object" && value !== null ? (value as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}
