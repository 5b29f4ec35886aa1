// The upstream pool: its rules in process, with a transport of the test's own (as Caddy's retries_test.go), and its
// identity checks against a real TLS server through the HttpsClient the coordinator uses.
import { afterAll, describe, expect, test } from "bun:test";
import { expectPeer } from "../authz/expect-peer.ts";
import { HttpsClient } from "../platform/https-client.ts";
import { NetworkError, type NetworkErrorCode } from "../platform/runtime/types.ts";
import { createLogger } from "../ops/log.ts";
import { traceOf } from "../ops/trace.ts";
import { testPki } from "../testing/pki.ts";
import { loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions } from "../platform/tls.ts";
import { ejectionMs, maxEjected, UpstreamPool, type UpstreamAnswer, type UpstreamTransport } from "./upstream.ts";
import { RetryBudget } from "./retry-budget.ts";
import { Metrics } from "../ops/metrics.ts";
import { parsePrometheus } from "../testing/prometheus.ts";
import type { HttpsRequest } from "../platform/https-client.ts";
import type { MeshError } from "../platform/errors.ts";
import type { PoolClock } from "./pool-clock.ts";

const A = "https://a.test:5001";
const B = "https://b.test:5001";

/** A transport whose servers answer as the test says: a status, or a network failure by code. */
class FakeTransport implements UpstreamTransport {
  readonly calls: { url: string; method: string; idempotent: boolean }[] = [];
  constructor(readonly behaviour: (url: string) => number | NetworkErrorCode | "timeout") {}
  async request(url: string, init: HttpsRequest): Promise<UpstreamAnswer> {
    this.calls.push({ url, method: init.method ?? "GET", idempotent: init.idempotent === true });
    const outcome = this.behaviour(url);
    if (outcome === "timeout") throw Object.assign(new Error("no answer"), { name: "TimeoutError" });
    if (typeof outcome === "string") throw new NetworkError(outcome, `failed: ${outcome}`);
    const body = new TextEncoder().encode(JSON.stringify({ status: outcome === 200 ? "ok" : "degraded", from: url }));
    return { status: outcome, body, header: (name) => (name === "content-type" ? "application/json" : null) };
  }
}

/** A clock the test moves: timers fire when advance() passes them. */
class FakeClock implements PoolClock {
  #now = 1_000_000;
  #timers: { at: number; fn: () => void }[] = [];
  now = () => this.#now;
  after(ms: number, fn: () => void) {
    const timer = { at: this.#now + ms, fn };
    this.#timers.push(timer);
    return () => {
      this.#timers = this.#timers.filter((t) => t !== timer);
    };
  }
  advance(ms: number): void {
    this.#now += ms;
    const due = this.#timers.filter((t) => t.at <= this.#now);
    this.#timers = this.#timers.filter((t) => t.at > this.#now);
    for (const t of due) t.fn();
  }
}

/** Lets pending promise callbacks run (no time passes). */
const tick = () => new Promise<void>((resolve) => setImmediate(resolve));

const quiet = () => createLogger("coordinator", { format: "text", color: false, write: () => {} });

describe("health checks", () => {
  test("fall/rise: one bad probe does not take a server out, one good probe does not bring it back", async () => {
    let status = 200;
    const logs: string[] = [];
    const pool = new UpstreamPool({
      servers: [A],
      transport: new FakeTransport(() => status),
      health: { fall: 2, rise: 2 },
      logger: createLogger("coordinator", { format: "text", color: false, write: (l) => logs.push(l) }),
    });
    const up = () => pool.snapshot()[0]!.up;
    const seen: boolean[] = [];
    for (const next of [200, 503, 503, 200, 200]) {
      status = next;
      await pool.checkAll();
      seen.push(up());
    }
    expect(seen).toEqual([true, true, false, false, true]);
    expect(logs.filter((l) => l.startsWith("Server "))).toEqual([
      `Server ${A} failed: health check answered 503 (health check); out of rotation`,
      `Server ${A} is back in rotation`,
    ]);
  });

  test("with every server refusing its probes, forward waits in the queue, then answers 503 without trying", async () => {
    const clock = new FakeClock();
    const transport = new FakeTransport(() => "ECONNREFUSED");
    const pool = new UpstreamPool({ servers: [A, B], transport, logger: quiet(), health: { fall: 1 }, clock, queue: { timeoutMs: 500 } });
    await pool.checkAll();
    const probes = transport.calls.length;
    const answer = pool.forward({ method: "GET", path: "/x", headers: new Headers() }).catch((e: MeshError) => e);
    await tick();
    expect(pool.routing().queue.waiting).toBe(1);
    clock.advance(500);
    expect(await answer).toMatchObject({ status: 503, code: "ERR_UNAVAILABLE", message: "no server is up (waited 500 ms in the queue)", retryAfterSeconds: 1 });
    expect(transport.calls.length).toBe(probes);
    expect(pool.routing().queue).toMatchObject({ waiting: 0, queued: 1, timedOut: 1 });
  });
});

describe("membership changes (issue 23)", () => {
  test("a removed server gets nothing more; an added one waits out of rotation until its first good probe", async () => {
    const C = "https://c.test:5001";
    let cAnswers = 503;
    const transport = new FakeTransport((url) => (url.startsWith(C) ? cAnswers : 200));
    const logs: string[] = [];
    const pool = new UpstreamPool({
      servers: [A, B],
      transport,
      health: { fall: 1, rise: 1 },
      logger: createLogger("coordinator", { format: "text", color: false, write: (l) => logs.push(l) }),
    });
    expect(pool.setServers([B, C])).toEqual({ added: [C], removed: [A] });
    expect(pool.snapshot().map((s) => [s.url, s.up])).toEqual([
      [B, true],
      [C, false],
    ]);
    await pool.checkAll();
    expect(pool.snapshot().map((s) => s.up)).toEqual([true, false]);
    for (let i = 0; i < 4; i++) await pool.forward({ method: "GET", path: "/x", headers: new Headers() });
    const forwarded = () => transport.calls.filter((c) => !c.url.endsWith("/health")).map((c) => new URL(c.url).origin);
    expect(new Set(forwarded())).toEqual(new Set([B]));
    cAnswers = 200;
    await pool.checkAll();
    transport.calls.length = 0;
    for (let i = 0; i < 4; i++) await pool.forward({ method: "GET", path: "/x", headers: new Headers() });
    expect(new Set(forwarded())).toEqual(new Set([B, C]));
    expect(logs.some((l) => l.includes(`Server ${A} left the pool`))).toBe(true);
    expect(logs.some((l) => l.includes(`Server ${C} joined the pool`))).toBe(true);
    expect(() => pool.setServers([])).toThrow(TypeError);
  });
});

describe("round robin", () => {
  test("a client that reads before each write still spreads its writes over every server", async () => {
    const transport = new FakeTransport(() => 200);
    const pool = new UpstreamPool({ servers: [A, B], transport, logger: quiet() });
    for (let i = 0; i < 4; i++) {
      await pool.forward({ method: "GET", path: "/api/get_cached_data", headers: new Headers() });
      await pool.forward({ method: "POST", path: "/api/data", headers: new Headers({ "idempotency-key": `k${i}` }) });
    }
    const servedBy = (method: string) => transport.calls.filter((c) => c.method === method).map((c) => new URL(c.url).origin);
    expect([servedBy("GET"), servedBy("POST")]).toEqual([
      [A, B, A, B],
      [A, B, A, B],
    ]);
  });
});

describe("retry rules", () => {
  // What happens when the first server fails and the second would answer 200: which failures may be re-sent.
  const cases: { method: string; key: boolean; failure: NetworkErrorCode | "timeout"; retried: boolean }[] = [
    { method: "POST", key: false, failure: "ECONNREFUSED", retried: true },
    { method: "POST", key: false, failure: "ERR_UNEXPECTED_PEER", retried: true },
    { method: "POST", key: false, failure: "ERR_TLS_HOSTNAME", retried: true },
    { method: "POST", key: false, failure: "ERR_TLS_CERT", retried: true },
    { method: "POST", key: false, failure: "ECONNRESET", retried: false },
    { method: "POST", key: false, failure: "timeout", retried: false },
    { method: "POST", key: true, failure: "ECONNRESET", retried: true },
    { method: "POST", key: true, failure: "timeout", retried: true },
    { method: "GET", key: false, failure: "ECONNRESET", retried: true },
    { method: "GET", key: false, failure: "timeout", retried: true },
  ];
  for (const c of cases) {
    test(`${c.method}${c.key ? " with an Idempotency-Key" : ""}, first server ${c.failure}: ${c.retried ? "sent to the next" : "502, not re-sent"}`, async () => {
      const transport = new FakeTransport((url) => (url.startsWith(A) ? c.failure : 200));
      // One failure ejects here, so the failed server is seen out of rotation at once.
      const pool = new UpstreamPool({ servers: [A, B], transport, logger: quiet(), outlier: { consecutiveGatewayFailures: 1 } });
      const headers = new Headers(c.key ? { "idempotency-key": "k1" } : {});
      const outcome = await pool.forward({ method: c.method, path: "/api/data", headers, body: new Uint8Array([1]) }).then(
        (result) => ({ status: result.status, upstream: result.upstream }),
        (error: { status: number; code: string }) => ({ status: error.status, code: error.code }),
      );
      expect(outcome).toEqual(c.retried ? { status: 200, upstream: B } : { status: 502, code: "ERR_UPSTREAM_UNCERTAIN" });
      expect(transport.calls.map((call) => call.url)).toEqual(c.retried ? [`${A}/api/data`, `${B}/api/data`] : [`${A}/api/data`]);
      // The transport is told when a request is safe to send again on a new connection.
      expect(transport.calls[0]!.idempotent).toBe(c.method === "GET" || c.key);
      expect(pool.snapshot().find((s) => s.url === A)!.up).toBe(false);
    });
  }

  test("only the allowlisted headers reach a server, and the checked trace", async () => {
    const sent: Record<string, string>[] = [];
    const pool = new UpstreamPool({
      servers: [A],
      logger: quiet(),
      transport: {
        request: async (_url, init) => (
          sent.push({ ...(init.headers as Record<string, string>) }), { status: 200, body: new Uint8Array(), header: () => null }
        ),
      },
    });
    const incoming = new Headers({
      traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "content-type": "application/json",
      "x-securemesh-proof": "p",
      "idempotency-key": "k",
      cookie: "c",
      "x-securemesh-peer": "spiffe://securemesh/coordinator/x",
      host: "evil",
    });
    await pool.forward({ method: "POST", path: "/api/data", headers: incoming });
    expect(Object.keys(sent[0]!).sort()).toEqual(["content-type", "idempotency-key", "traceparent", "x-securemesh-proof"]);
  });
});

describe("through the HttpsClient, against a real server (issue 18, H1)", () => {
  const servers: ReturnType<typeof Bun.serve>[] = [];
  const clients: HttpsClient[] = [];
  afterAll(() => {
    for (const s of servers) s.stop(true);
    for (const c of clients) c.close();
  });
  const serve = async (fetch: (request: Request) => Response) => {
    const server = Bun.serve({ port: 0, hostname: "127.0.0.1", tls: mutualTlsServerOptions(loadIdentity(await testPki(), "server")), fetch });
    servers.push(server);
    return `https://127.0.0.1:${server.port}`;
  };
  const transport = async (expected: string) => {
    const client = new HttpsClient({
      tls: { ...mutualTlsClientOptions(loadIdentity(await testPki(), "coordinator")), checkServerIdentity: expectPeer(expected) },
    });
    clients.push(client);
    return client;
  };

  test("a server showing another identity is out at once, and neither forwards nor broadcasts reach it", async () => {
    let requests = 0;
    const url = await serve(() => (requests++, Response.json({ status: "ok" })));
    const wrong = new UpstreamPool({ servers: [url], transport: await transport("spiffe://securemesh/keyserver/*"), logger: quiet() });
    await wrong.checkAll();
    const refusal = "ERR_UNEXPECTED_PEER: reached spiffe://securemesh/server/server, expected spiffe://securemesh/keyserver/*";
    expect(wrong.snapshot()[0]).toMatchObject({ up: false, lastError: refusal });
    await expect(wrong.forward({ method: "GET", path: "/x", headers: new Headers() })).rejects.toMatchObject({ status: 503 });
    // A broadcast goes to every server, up or not; one presenting another identity is refused at the handshake.
    expect(await wrong.broadcast("GET", "/x")).toEqual([{ server: url, ok: false, status: null, error: refusal }]);
    expect(requests).toBe(0);
    const right = new UpstreamPool({ servers: [url], transport: await transport("spiffe://securemesh/server/*"), logger: quiet() });
    await right.checkAll();
    expect(right.snapshot()[0]!.up).toBe(true);
    expect((await right.forward({ method: "GET", path: "/x", headers: new Headers() })).status).toBe(200);
  });

  test("a method the client cannot send (M-SEARCH) is the caller's 405, never a failure of the servers", async () => {
    // Found by attack: three `M-SEARCH /api/data` from one client ejected a healthy server (the transport's "bad
    // method" counted as a gateway failure); with an Idempotency-Key each one failed over and counted on every server.
    let requests = 0;
    const answer = (request: Request) => (new URL(request.url).pathname === "/health" || requests++, Response.json({ status: "ok" }));
    const pool = new UpstreamPool({
      servers: [await serve(answer), await serve(answer)],
      transport: await transport("spiffe://securemesh/server/*"),
      logger: quiet(),
    });
    await pool.checkAll();
    const outcomes = [];
    for (let i = 0; i < 4; i++) {
      for (const headers of [new Headers(), new Headers({ "idempotency-key": `k${i}` })]) {
        const request = { method: "M-SEARCH", path: "/api/data", headers, body: new Uint8Array(1) };
        outcomes.push(
          await pool.forward(request).then(
            (r) => r.status,
            (error: MeshError) => `${error.status} ${error.code}`,
          ),
        );
      }
    }
    expect(new Set(outcomes)).toEqual(new Set(["405 ERR_METHOD_NOT_ALLOWED"]));
    expect(pool.snapshot().map(({ up, failures, ejection }) => ({ up, failures, ejection }))).toEqual([
      { up: true, failures: 0, ejection: null },
      { up: true, failures: 0, ejection: null },
    ]);
    expect(requests).toBe(0);
  });

  test("#14: forwards and broadcasts carry the request's trace as checked, never a caller's malformed one", async () => {
    const seen: Record<string, string | null>[] = [];
    const url = await serve((request) => {
      seen.push({ traceparent: request.headers.get("traceparent"), requestId: request.headers.get("x-request-id") });
      return Response.json({});
    });
    const traced = new UpstreamPool({ servers: [url], transport: await transport("spiffe://securemesh/server/*"), logger: quiet() });
    const incoming = new Headers({ traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "x-request-id": "req-1" });
    const trace = traceOf(incoming);
    await traced.forward({ method: "GET", path: "/x", headers: incoming, trace });
    await traced.broadcast("GET", "/x", {}, undefined, trace);
    await traced.forward({ method: "GET", path: "/x", headers: new Headers({ "x-request-id": 'req 1" 200 - forged' }) });
    await traced.forward({ method: "GET", path: "/x", headers: new Headers({ traceparent: "00-not-a-trace", "x-request-id": "req-2" }) });
    expect(seen.slice(0, 2)).toEqual([
      { traceparent: trace.outbound.traceparent!, requestId: null },
      { traceparent: trace.outbound.traceparent!, requestId: null },
    ]);
    expect(trace.outbound.traceparent).toMatch(/^00-4bf92f3577b34da6a3ce929d0e0e4736-(?!00f067aa0ba902b7)[0-9a-f]{16}-01$/);
    expect(seen[2]).toEqual({ traceparent: null, requestId: expect.stringMatching(/^[0-9a-f-]{36}$/) });
    expect(seen[3]).toEqual({ traceparent: expect.stringMatching(/^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/), requestId: null });
  });
});

describe("issue 20: never eject everything", () => {
  const get = (pool: UpstreamPool) => pool.forward({ method: "GET", path: "/api/get_cached_data", headers: new Headers() });
  const post = (pool: UpstreamPool, key = crypto.randomUUID()) =>
    pool.forward({ method: "POST", path: "/api/data", headers: new Headers({ "idempotency-key": key }) });
  const logged = () => {
    const lines: string[] = [];
    return { lines, logger: createLogger("coordinator", { format: "text", color: false, write: (l) => lines.push(l) }) };
  };
  const state = (pool: UpstreamPool, url: string) => pool.snapshot().find((s) => s.url === url)!;

  test("consecutive gateway failures eject a server for base × count, capped, stepping back after healthy time", async () => {
    const clock = new FakeClock();
    let aFails = true;
    const { lines, logger } = logged();
    const C = "https://c.test:5001";
    const pool = new UpstreamPool({
      servers: [A, B, C],
      logger,
      clock,
      transport: new FakeTransport((url) => (url.startsWith(A) && aFails ? "timeout" : 200)),
      outlier: { consecutiveGatewayFailures: 3, baseEjectionMs: 1000, maxEjectionMs: 2500, decayMs: 10_000 },
    });
    const ejectA = async () => {
      // Round-robin: every third read starts at A, times out there, and is answered by the next server.
      for (let i = 0; i < 9 && state(pool, A).ejection === null; i++) expect((await get(pool)).status).toBe(200);
      return state(pool, A).ejection;
    };
    const lengths: number[] = [];
    for (let round = 0; round < 4; round++) {
      const ejection = await ejectA();
      expect(ejection).toMatchObject({ reason: "3 consecutive gateway failures (last: timeout)", count: round + 1 });
      expect(state(pool, A).up).toBe(false);
      lengths.push(ejection!.until - clock.now());
      clock.advance(ejection!.until - clock.now());
      expect(state(pool, A).up).toBe(true);
    }
    expect(lengths).toEqual([1000, 2000, 2500, 2500]);
    expect(lines.filter((l) => l.includes("ejected for"))[0]).toBe(
      `Server ${A} ejected for 1.0 s (ejection 1): 3 consecutive gateway failures (last: timeout)`,
    );
    expect(lines.filter((l) => l === `Server ${A} is back in rotation`)).toHaveLength(4);
    const metrics = new Metrics();
    pool.exportMetrics(metrics);
    expect(parsePrometheus(metrics.render()).value("securemesh_upstream_ejections_total", { upstream: A, reason: "consecutive_gateway_failures" })).toBe(4);
    // 35 s healthy after the last ejection ended: three steps back (4 → 1), so the next is the second length again.
    clock.advance(35_000);
    expect((await ejectA())!.until - clock.now()).toBe(2000);
    expect(pool.routing()).toMatchObject({ ejections: 5, panic: false });
    aFails = false;
  });

  test("an ejected server whose probes failed and then passed `rise` times is back before its time; one whose probes pass stays out", async () => {
    const clock = new FakeClock();
    let down: string[] = [];
    const transport = new FakeTransport((url) => (down.includes(new URL(url).origin) ? "ECONNREFUSED" : url.endsWith("/health") ? 200 : "ECONNRESET"));
    const C = "https://c.test:5001";
    const pool = new UpstreamPool({
      servers: [A, B, C],
      transport,
      logger: quiet(),
      clock,
      health: { fall: 1, rise: 2 },
      outlier: { consecutiveGatewayFailures: 1 },
    });
    await pool.forward({ method: "GET", path: "/x", headers: new Headers() }).catch(() => {});
    expect(pool.snapshot().map((s) => s.ejection !== null)).toEqual([true, false, false]);
    await pool.checkAll(); // its probes pass: still ejected
    expect(state(pool, A).ejection).not.toBeNull();
    down = [A];
    await pool.checkAll(); // killed
    down = [];
    await pool.checkAll();
    expect(state(pool, A).up).toBe(false);
    await pool.checkAll(); // restarted: rise 2
    expect(state(pool, A)).toMatchObject({ up: true, ejection: null });
  });

  test("ejections stop at the cap: of two servers failing alike, one stays in rotation", async () => {
    const clock = new FakeClock();
    const { lines, logger } = logged();
    const pool = new UpstreamPool({
      servers: [A, B],
      logger,
      clock,
      transport: new FakeTransport(() => "ECONNRESET"),
      outlier: { consecutiveGatewayFailures: 2 },
    });
    for (let i = 0; i < 6; i++) await get(pool).catch(() => {});
    expect(
      pool
        .snapshot()
        .map((s) => s.ejection !== null)
        .sort(),
    ).toEqual([false, true]);
    const metrics = new Metrics();
    pool.exportMetrics(metrics);
    const ejected = pool.snapshot().find((s) => s.ejection)!.url;
    expect(parsePrometheus(metrics.render()).value("securemesh_upstream_ejected", { upstream: ejected, reason: "consecutive_gateway_failures" })).toBe(1);
    expect(pool.routing()).toMatchObject({ maxEjected: 1, ejections: 1, ejectionsRefused: expect.any(Number), inRotation: 1, panic: false });
    expect(pool.routing().ejectionsRefused).toBeGreaterThan(0);
    expect(lines.filter((l) => l.includes("not ejected")).length).toBe(1);
    expect(lines.find((l) => l.includes("not ejected"))).toMatch(/not ejected after \d+ consecutive failures: 1 of 2 servers already out, the most allowed$/);
  });

  test("the cap holds for the probes: a server that answers stays in while another is ejected; one that refuses goes out", async () => {
    const clock = new FakeClock();
    let bHealth: number | "ECONNREFUSED" = 200;
    const transport = new FakeTransport((url) =>
      url.startsWith(B) ? (url.endsWith("/health") ? bHealth : 200) : url.endsWith("/health") ? 200 : "ECONNRESET",
    );
    const { lines, logger } = logged();
    const pool = new UpstreamPool({ servers: [A, B], transport, logger, clock, health: { fall: 1 }, outlier: { consecutiveGatewayFailures: 1 } });
    await get(pool);
    expect(pool.snapshot().map((s) => [s.up, s.ejection !== null])).toEqual([
      [false, true],
      [true, false],
    ]);
    bHealth = 503;
    await pool.checkAll();
    await pool.checkAll();
    expect(pool.snapshot().map((s) => s.up)).toEqual([false, true]);
    expect(lines.filter((l) => l.includes("(health check)"))).toEqual([
      `Server ${B} failed: health check answered 503 (health check); kept in rotation: 1 of 2 servers already out, the most allowed`,
    ]);
    expect(pool.routing().ejectionsRefused).toBe(2);
    bHealth = "ECONNREFUSED";
    await pool.checkAll();
    expect(pool.snapshot().map((s) => s.up)).toEqual([false, false]);
  });

  test("the cap as a share: at least one, never all", () => {
    expect([1, 2, 3, 4, 10].map((n) => maxEjected(n, 0.5))).toEqual([1, 1, 1, 2, 5]);
    expect(maxEjected(10, 1)).toBe(9);
    expect([1, 2, 5, 60].map((count) => ejectionMs(count, { baseEjectionMs: 5000, maxEjectionMs: 60_000 }))).toEqual([5000, 10_000, 25_000, 60_000]);
  });

  test("panic: one server ejected, the other gone: the ejected one still takes requests; one line in and out", async () => {
    const clock = new FakeClock();
    let aFails = true;
    let bGone = false;
    const transport = new FakeTransport((url) =>
      url.startsWith(B) ? (bGone ? "ECONNREFUSED" : 200) : url.endsWith("/health") || !aFails ? 200 : "ECONNRESET",
    );
    const { lines, logger } = logged();
    const pool = new UpstreamPool({ servers: [A, B], transport, logger, clock, health: { fall: 1, rise: 1 }, outlier: { consecutiveGatewayFailures: 1 } });
    const metrics = new Metrics();
    pool.exportMetrics(metrics);
    expect((await get(pool)).upstream).toBe(B);
    expect(state(pool, A).ejection).not.toBeNull();
    bGone = true;
    await pool.checkAll();
    expect(pool.snapshot().map((s) => [s.up, s.reachable])).toEqual([
      [false, true],
      [false, false],
    ]);
    expect(pool.routing()).toMatchObject({ panic: true, panicEntries: 1, inRotation: 0 });
    aFails = false;
    transport.calls.length = 0;
    const served = [(await get(pool)).upstream, (await post(pool)).upstream, (await get(pool)).upstream];
    expect(served).toEqual([A, A, A]);
    expect(transport.calls.every((c) => c.url.startsWith(A))).toBe(true);
    const scraped = parsePrometheus(metrics.render());
    expect([scraped.value("securemesh_upstream_panic"), scraped.value("securemesh_upstream_panic_total")]).toEqual([1, 1]);
    await pool.checkAll(); // still in panic: no second line
    bGone = false;
    await pool.checkAll();
    expect(pool.routing()).toMatchObject({ panic: false, panicSince: null, panicEntries: 1 });
    expect(lines.filter((l) => l.includes("Panic routing"))).toEqual([
      "Panic routing: 0 of 2 servers in rotation, under 50 %; routing over every server believed reachable (1)",
      "Panic routing over: 1 of 2 servers in rotation",
    ]);
    expect(parsePrometheus(metrics.render()).value("securemesh_upstream_panic")).toBe(0);
  });

  test("panic routes only over servers believed reachable: those refusing their probes get nothing", async () => {
    const C = "https://c.test:5001";
    const transport = new FakeTransport((url) => (url.startsWith(C) ? (url.endsWith("/health") ? 503 : 200) : "ECONNREFUSED"));
    const pool = new UpstreamPool({ servers: [A, B, C], transport, logger: quiet(), health: { fall: 1 } });
    await pool.checkAll();
    // A and B are gone; C answers its probes 503 but is kept in by the cap (1 of 3 may be out).
    expect(pool.snapshot().map((s) => [s.up, s.reachable])).toEqual([
      [false, false],
      [false, false],
      [true, true],
    ]);
    expect(pool.routing().panic).toBe(true);
    transport.calls.length = 0;
    for (let i = 0; i < 6; i++) await get(pool);
    expect(new Set(transport.calls.map((c) => new URL(c.url).origin))).toEqual(new Set([C]));
  });

  test("believed reachable: a server that answers or times out is; one that refuses or shows another identity is not", async () => {
    const [C, D] = ["https://c.test:5001", "https://d.test:5001"];
    const outcome: Record<string, number | NetworkErrorCode | "timeout"> = { [A]: "ECONNREFUSED", [B]: 503, [C]: "timeout", [D]: "ERR_UNEXPECTED_PEER" };
    const pool = new UpstreamPool({
      servers: [A, B, C, D],
      transport: new FakeTransport((url) => outcome[new URL(url).origin]!),
      logger: quiet(),
      health: { fall: 1 },
    });
    await pool.checkAll();
    // A and D are not there; B goes out (2 of 4 may); C, timing out, is kept in by the cap.
    expect(pool.snapshot().map((s) => [s.up, s.reachable])).toEqual([
      [false, false],
      [false, true],
      [true, true],
      [false, false],
    ]);
  });

  test("a stalled store: the server stays in rotation, writes go first to servers whose store is ok, reads anywhere", async () => {
    let stalled = [A];
    const transport: UpstreamTransport & { calls: { url: string; method: string }[] } = {
      calls: [],
      async request(url, init) {
        this.calls.push({ url, method: init.method ?? "GET" });
        const origin = new URL(url).origin;
        const body = url.endsWith("/health")
          ? { status: stalled.includes(origin) ? "degraded" : "ok", store_status: stalled.includes(origin) ? "stalled" : "ok" }
          : {};
        return { status: 200, body: new TextEncoder().encode(JSON.stringify(body)), header: () => null };
      },
    };
    const pool = new UpstreamPool({ servers: [A, B], transport, logger: quiet() });
    const metrics = new Metrics();
    pool.exportMetrics(metrics);
    await pool.checkAll();
    expect(pool.snapshot().map((s) => [s.up, s.storeStatus])).toEqual([
      [true, "stalled"],
      [true, "ok"],
    ]);
    expect(parsePrometheus(metrics.render()).value("securemesh_upstream_store_stalled", { upstream: A })).toBe(1);
    const writes = [],
      reads = [];
    for (let i = 0; i < 4; i++) writes.push((await post(pool)).upstream);
    for (let i = 0; i < 4; i++) reads.push((await get(pool)).upstream);
    expect(writes).toEqual([B, B, B, B]);
    expect(reads.sort()).toEqual([A, A, B, B]);
    // Every store stalled (the Galera eviction): nothing is held out, writes go round as before; the servers answer.
    stalled = [A, B];
    await pool.checkAll();
    expect(pool.routing()).toMatchObject({ inRotation: 2, panic: false });
    const during = [];
    for (let i = 0; i < 4; i++) during.push((await post(pool)).upstream);
    expect(during.sort()).toEqual([A, A, B, B]);
  });

  test("queue: a waiting request is served as soon as a probe brings a server back; past maxWaiting, 503 at once", async () => {
    const clock = new FakeClock();
    let refusing = true;
    const transport = new FakeTransport(() => (refusing ? "ECONNREFUSED" : 200));
    const pool = new UpstreamPool({ servers: [A], transport, logger: quiet(), clock, health: { fall: 1, rise: 1 }, queue: { maxWaiting: 2, timeoutMs: 1000 } });
    await pool.checkAll();
    const waiting = [get(pool), get(pool)];
    await tick();
    const full = await get(pool).catch((e: MeshError) => e);
    expect(full).toMatchObject({ status: 503, message: "no server is up (queue full: 2 waiting)", retryAfterSeconds: 1 });
    expect(pool.routing().queue).toMatchObject({ waiting: 2, queued: 2, full: 1 });
    clock.advance(400);
    refusing = false;
    await pool.checkAll();
    expect((await Promise.all(waiting)).map((r) => r.status)).toEqual([200, 200]);
    expect(pool.routing().queue).toMatchObject({ waiting: 0, timedOut: 0 });
  });
});

describe("issue 20: the retry budget", () => {
  test("retries stop at ratio × requests + the floor over the window; past it a failed attempt is answered 503; the window moves on", async () => {
    const clock = new FakeClock();
    const transport = new FakeTransport((url) => (url.startsWith(A) ? "ECONNRESET" : 200));
    const { lines, logger } = (() => {
      const l: string[] = [];
      return { lines: l, logger: createLogger("coordinator", { format: "text", color: false, write: (x) => l.push(x) }) };
    })();
    // Never ejected here, so every other read meets A's failure and wants a retry.
    const pool = new UpstreamPool({
      servers: [A, B],
      transport,
      logger,
      clock,
      outlier: { consecutiveGatewayFailures: 1000 },
      retryBudget: { ratio: 0.2, minPerSecond: 0.1, windowMs: 10_000 },
    });
    const metrics = new Metrics();
    pool.exportMetrics(metrics);
    const outcomes: (number | string)[] = [];
    for (let i = 0; i < 20; i++) {
      outcomes.push(
        await pool.forward({ method: "GET", path: "/x", headers: new Headers() }).then(
          (r) => r.status,
          (e: MeshError) => e.code,
        ),
      );
    }
    // 20 requests, the even ones starting at A: a retry is allowed while retries ≤ 0.2 × requests so far + 1 (the
    // floor, 0.1/s over 10 s): at requests 1, 5, 11 and 15, refused at 3, 7, 9, 13, 17 and 19.
    expect(outcomes.map((o) => (o === 200 ? "ok" : o))).toEqual(
      Array.from({ length: 20 }, (_, i) => ([2, 6, 8, 12, 16, 18].includes(i) ? "ERR_RETRY_BUDGET" : "ok")),
    );
    expect(pool.routing().retryBudget).toMatchObject({ requests: 20, retries: 4, exhausted: 6 });
    expect(parsePrometheus(metrics.render()).value("securemesh_upstream_retry_budget_exhausted_total")).toBe(6);
    expect(lines.filter((l) => l.startsWith("Retry budget spent: not re-sending after "))).toHaveLength(6);
    // The window has passed: the floor allows a retry again.
    clock.advance(11_000);
    expect(pool.routing().retryBudget).toMatchObject({ requests: 0, retries: 0 });
    expect((await pool.forward({ method: "GET", path: "/x", headers: new Headers() })).upstream).toBe(B);
  });

  test("RetryBudget: the floor alone, then the ratio; old slices leave the window", () => {
    const clock = new FakeClock();
    const budget = new RetryBudget({ ratio: 0.5, minPerSecond: 0.2, windowMs: 10_000 }, clock);
    expect([budget.tryRetry(), budget.tryRetry(), budget.tryRetry()]).toEqual([true, true, false]);
    for (let i = 0; i < 4; i++) budget.request();
    expect([budget.tryRetry(), budget.tryRetry(), budget.tryRetry()]).toEqual([true, true, false]);
    expect(budget.usage()).toEqual({ requests: 4, retries: 4 });
    clock.advance(11_000);
    expect(budget.usage()).toEqual({ requests: 0, retries: 0 });
    expect(budget.exhausted).toBe(2);
  });
});
