// The upstream pool: round-robin over healthy servers, failover, active health checks with fall/rise counts. It
// reaches the servers through a transport it is given: in a role, an HttpsClient whose every connection has shown a
// server identity at its handshake (shared/platform/https-client.ts), so no request, forward, retry, probe or
// broadcast, is written to anything else; in a test, whatever the test needs.
import { MeshError, Unavailable } from "../platform/errors.ts";
import type { HttpsRequest } from "../platform/https-client.ts";
import type { NetworkErrorCode } from "../platform/runtime/index.ts";
import { describeNetworkError as reason, printable, type Logger } from "../ops/log.ts";
import type { Metrics } from "../ops/metrics.ts";
import { traceOf, type Trace } from "../ops/trace.ts";
import { PROOF_HEADER } from "./proof.ts";

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
}

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
const NEVER_REACHED = new Set<NetworkErrorCode>(["ECONNREFUSED", "ENOTFOUND", "EHOSTUNREACH", "ENETUNREACH", "EPROTO", "ERR_TLS_CERT", "ERR_TLS_HOSTNAME", "ERR_UNEXPECTED_PEER"]);

interface Server extends UpstreamState {
  okStreak: number;
  failStreak: number;
  /** Added to a running pool: in rotation at its first good probe. */
  joining: boolean;
  /** Who waits for a draining server's last forward to end (drained()). */
  emptied: (() => void)[];
}

const normalUrl = (url: string) => url.replace(/\/+$/, "");

/**
 * A server as the pool starts it: at start optimistic until the first probe (a dead server costs one failover, not an
 * outage, and whatever answers there is checked at the handshake like every connection); joining later, out of
 * rotation until a probe has seen it answer.
 */
function newServer(url: string, up: boolean): Server {
  return {
    url: normalUrl(url), up, joining: !up, lastCheckedAt: null, latencyMs: null, requests: 0, failures: 0, lastError: null, health: null, clockSkewMs: null,
    draining: false, inFlight: 0, okStreak: 0, failStreak: 0, emptied: [],
  };
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
  /**
   * One round-robin cursor for reads and one for writes: with a single cursor, a client that reads before each write
   * sent every read to one server and every write to the other (the demo's two servers, found re-running it). Two
   * fixed keys, never the caller's path, so callers cannot grow the map.
   */
  readonly #next = new Map<"read" | "write", number>();
  #retries = 0;
  #timer: ReturnType<typeof setTimeout> | null = null;
  #stopped = true;

  constructor(options: UpstreamOptions) {
    if (options.servers.length === 0) throw new TypeError("the pool needs at least one server");
    this.#servers = options.servers.map((url) => newServer(url, true));
    this.#transport = options.transport;
    this.#logger = options.logger;
    this.#timeoutMs = options.timeoutMs ?? 2000;
    this.#health = { ...DEFAULT_HEALTH, ...options.health };
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
    if (added.length > 0 && !this.#stopped) void this.checkAll();
    return { added, removed };
  }

  snapshot(): UpstreamState[] {
    return this.#servers.map(({ okStreak: _ok, failStreak: _fail, joining: _joining, emptied: _emptied, ...state }) => ({ ...state }));
  }

  /** Exposes per-server state and the retry count on a role's /metrics, read at scrape time. */
  exportMetrics(metrics: Metrics): void {
    const perServer = (read: (s: Server) => number) => () => this.#servers.map((s) => ({ labels: { upstream: s.url }, value: read(s) }));
    metrics.collect("securemesh_upstream_up", "1 while the server is in rotation.", "gauge", perServer((s) => (s.up ? 1 : 0)));
    metrics.collect("securemesh_upstream_requests_total", "Requests a server answered.", "counter", perServer((s) => s.requests));
    metrics.collect("securemesh_upstream_failures_total", "Requests and broadcasts to a server that failed (refused, reset, timed out).", "counter", perServer((s) => s.failures));
    metrics.collect("securemesh_upstream_draining", "1 while an operator has the server drained (out of rotation on request).", "gauge", perServer((s) => (s.draining ? 1 : 0)));
    metrics.collect("securemesh_upstream_in_flight", "Forwards to the server not yet answered.", "gauge", perServer((s) => s.inFlight));
    metrics.collect("securemesh_upstream_retries_total", "Requests re-sent to the next server after one failed.", "counter", () => [{ value: this.#retries }]);
    metrics.collect("securemesh_upstream_check_latency_seconds", "Latency of the last health check.", "gauge", () =>
      this.#servers.filter((s) => s.latencyMs !== null).map((s) => ({ labels: { upstream: s.url }, value: s.latencyMs! / 1000 })));
  }

  /** The healthy servers in round-robin order, starting one further each call of the same kind. */
  #rotation(kind: "read" | "write"): Server[] {
    const healthy = this.#servers.filter((s) => s.up && !s.draining);
    if (healthy.length === 0) return [];
    const turn = this.#next.get(kind) ?? 0;
    this.#next.set(kind, turn + 1);
    const start = turn % healthy.length;
    return [...healthy.slice(start), ...healthy.slice(0, start)];
  }

  /**
   * Sends the request to the next healthy server, failing over on refusal, reset or timeout. A request that may
   * have reached a server is re-sent only when it is safe: GET/HEAD, or carrying an Idempotency-Key.
   */
  async forward(request: ForwardRequest): Promise<ForwardResult> {
    const order = this.#rotation(request.method === "GET" || request.method === "HEAD" ? "read" : "write");
    if (order.length === 0) throw new Unavailable("no server is up");
    const replayable = request.method === "GET" || request.method === "HEAD" || request.headers.has("idempotency-key");
    const trace = request.trace ?? traceOf(request.headers);
    const headers: Record<string, string> = { ...trace.outbound };
    for (const name of FORWARDED_HEADERS) {
      const value = request.headers.get(name);
      if (value !== null) headers[name] = value;
    }
    let lastReason = "";
    for (const [attempt, server] of order.entries()) {
      if (attempt > 0) this.#retries += 1;
      server.inFlight += 1;
      try {
        const answer = await this.#send(server.url, request.method, request.path, headers, request.body, replayable);
        server.requests += 1;
        return { status: answer.status, contentType: answer.header("content-type"), body: answer.body, upstream: server.url, retryAfter: answer.header("retry-after") };
      } catch (error) {
        lastReason = reason(error);
        this.#markFailed(server, lastReason, trace);
        if (!replayable && !neverReachedServer(error)) {
          throw new MeshError("ERR_UPSTREAM_UNCERTAIN", 502,
            "the server failed after the request may have reached it; not re-sent without an Idempotency-Key");
        }
      } finally {
        this.#forwardEnded(server);
      }
    }
    throw new Unavailable(`every server failed (last: ${lastReason})`);
  }

  /**
   * Takes `url` out of rotation on an operator's request (the coordinator's admin.drain): no new forward goes to it;
   * forwards in flight finish. Probes go on, so the status page still shows its health. Returns it as it is now.
   */
  drain(url: string, by: string): UpstreamState {
    const server = this.#known(url);
    if (!server.draining) {
      server.draining = true;
      this.#logger.info(`Server ${server.url} draining on request of ${printable(by)}: no new requests; ${server.inFlight} in flight`, { upstream: server.url });
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
    return Promise.all(this.#servers.map(async (server) => {
      try {
        const answer = await this.#send(server.url, method, path, outbound, body, method === "GET");
        return { server: server.url, ok: answer.status < 300, status: answer.status, body: answer.body } as const;
      } catch (error) {
        const why = reason(error);
        this.#markFailed(server, why, trace);
        return { server: server.url, ok: false, status: null, error: why } as const;
      }
    }));
  }

  #send(base: string, method: string, path: string, headers: Record<string, string>, body: Uint8Array | undefined, idempotent: boolean): Promise<UpstreamAnswer> {
    return this.#transport.request(base + path, {
      method, headers, body: body && body.byteLength > 0 ? body : undefined, timeoutMs: this.#timeoutMs, idempotent,
    });
  }

  #markFailed(server: Server, why: string, trace?: Trace): void {
    server.failures += 1;
    server.lastError = why;
    server.okStreak = 0;
    // The request's trace, so a failover can be followed in this log as in the access lines.
    this.#logger.warn(`Server ${server.url} failed: ${why}${trace ? ` ${trace.field}=${trace.id}` : ""}`, { upstream: server.url, ...(trace ? { [trace.field]: trace.id } : {}) });
    // A failed request is proof enough to take the server out now; the probes decide when it comes back.
    if (server.up) {
      server.up = false;
      server.failStreak = this.#health.fall;
    }
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
    try {
      const answer = await this.#transport.request(`${server.url}/health`, { timeoutMs: this.#health.timeoutMs, idempotent: true });
      if (answer.status === 200) {
        server.health = parseJson(answer.body);
        const time = (server.health?.facts as { time?: unknown } | undefined)?.time;
        server.clockSkewMs = typeof time === "number" ? Math.round(time - (sentAt + Date.now()) / 2) : null;
      } else failure = `health check answered ${answer.status}`;
    } catch (error) {
      failure = reason(error);
      // Not a flap: whatever answers there is not a server. Out at once, and back only after `rise` good probes.
      unexpectedPeer = isUnexpectedPeer(error);
      if (unexpectedPeer) server.failStreak = this.#health.fall;
    }
    server.lastCheckedAt = Date.now();
    server.latencyMs = Math.round((performance.now() - started) * 10) / 10;
    if (failure === null) {
      server.failStreak = 0;
      server.okStreak += 1;
      server.lastError = null;
      if (!server.up && (server.joining || server.okStreak >= this.#health.rise)) {
        server.up = true;
        this.#logger.info(server.joining ? `Server ${server.url} is in rotation` : `Server ${server.url} is back in rotation`, { upstream: server.url });
        server.joining = false;
      }
    } else {
      server.okStreak = 0;
      server.failStreak += 1;
      server.lastError = failure;
      if (server.up && (server.failStreak >= this.#health.fall || unexpectedPeer)) {
        server.up = false;
        this.#logger.warn(`Server ${server.url} failed: ${failure} (health check); out of rotation`, { upstream: server.url });
      }
    }
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
