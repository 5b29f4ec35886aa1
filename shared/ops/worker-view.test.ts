import { describe, expect, test } from "bun:test";
import { parsePrometheus } from "../testing/prometheus.ts";
import { mergeMetrics, mergeRouting, mergeServerViews, WorkerPoolView } from "./worker-view.ts";
import type { RoutingState } from "../request-path/upstream.ts";
import { fleetWarnings, type ClusterStatus, type ServerFacts } from "./status-page.ts";

const server = (url: string, fields: Partial<ClusterStatus["servers"][number]> = {}): ClusterStatus["servers"][number] => ({
  url,
  host: new URL(url).hostname,
  up: true,
  lastCheckedAt: 1000,
  latencyMs: 1,
  requests: 0,
  failures: 0,
  lastError: null,
  cache: null,
  facts: null,
  clockSkewMs: null,
  draining: false,
  inFlight: 0,
  reachable: true,
  storeStatus: null,
  ejection: null,
  ...fields,
});

describe("mergeServerViews", () => {
  test("a server is up only when every worker has it up; counts add up; the newest probe's details win", () => {
    const merged = mergeServerViews([
      {
        now: 0,
        serversUp: 2,
        warnings: [],
        routing: null,
        limited: [],
        servers: [server("https://a", { requests: 5, failures: 1, lastCheckedAt: 1000, latencyMs: 3 }), server("https://b", { requests: 2 })],
      },
      {
        now: 0,
        serversUp: 1,
        warnings: [],
        routing: null,
        limited: [],
        servers: [
          server("https://a", { requests: 7, lastCheckedAt: 2000, latencyMs: 9, cache: { hits: 4, misses: 1, hitRatio: 0.8 } }),
          server("https://b", { up: false, lastError: "timeout", requests: 1 }),
        ],
      },
    ]);
    expect(merged.map((s) => [s.url, s.up, s.requests, s.failures])).toEqual([
      ["https://a", true, 12, 1],
      ["https://b", false, 3, 0],
    ]);
    expect(merged[0]!.latencyMs).toBe(9);
    expect(merged[0]!.health).toEqual({ cache: { hits: 4, misses: 1, hitRatio: 0.8 } });
    // The worker that took it out of rotation says why, whichever probed last.
    expect(merged[1]!.lastError).toBe("timeout");
  });
});

describe("mergeRouting (issue 20)", () => {
  test("in panic while any worker is, since the earliest; the fewest in rotation; counts added up", () => {
    const routing = (over: Partial<RoutingState>, queue: Partial<RoutingState["queue"]> = {}, exhausted = 0): RoutingState => ({
      panic: false,
      panicSince: null,
      panicEntries: 0,
      inRotation: 2,
      total: 2,
      panicThreshold: 0.5,
      maxEjected: 1,
      ejections: 0,
      ejectionsRefused: 0,
      queue: { waiting: 0, maxWaiting: 64, timeoutMs: 500, queued: 0, timedOut: 0, full: 0, ...queue },
      retryBudget: { ratio: 0.2, minPerSecond: 3, windowMs: 10_000, requests: 10, retries: 1, exhausted },
      ...over,
    });
    expect(mergeRouting([])).toBeNull();
    expect(
      mergeRouting([
        routing({ ejections: 1 }, { queued: 2, timedOut: 1 }, 1),
        routing({ panic: true, panicSince: 500, panicEntries: 1, inRotation: 0 }, { waiting: 3 }),
        routing({ panic: true, panicSince: 200, panicEntries: 2, inRotation: 1, ejectionsRefused: 4 }),
      ]),
    ).toMatchObject({
      panic: true,
      panicSince: 200,
      panicEntries: 3,
      inRotation: 0,
      ejections: 1,
      ejectionsRefused: 4,
      queue: { waiting: 3, queued: 2, timedOut: 1 },
      retryBudget: { requests: 30, retries: 3, exhausted: 1 },
    });
  });
});

describe("fleetWarnings (issue 23)", () => {
  const facts = (over: Partial<ServerFacts> = {}): ServerFacts => ({
    hostname: "h",
    policy: "sha256:aaaa",
    crl: "0x1001",
    certificateExpires: "2030-01-01T00:00:00.000Z",
    certificateIssued: "2029-01-01T00:00:00.000Z",
    store: "s1",
    ...over,
  });
  test("quiet when the servers agree; one line for each mismatch, clock apart or certificate about to expire", () => {
    const now = Date.parse("2029-12-25T00:00:00.000Z");
    expect(
      fleetWarnings(
        [server("https://a", { facts: facts(), clockSkewMs: 3 }), server("https://b", { facts: facts(), clockSkewMs: -4000 })],
        Date.parse("2029-01-01T00:00:00Z"),
      ),
    ).toEqual([]);
    expect(
      fleetWarnings(
        [
          server("https://a", { facts: facts() }),
          server("https://b", { facts: facts({ policy: "sha256:bbbb", crl: "0x1000", store: "s2" }), clockSkewMs: 120_000 }),
        ],
        now,
      ),
    ).toEqual([
      "policy differs between servers: sha256:aaaa on https://a; sha256:bbbb on https://b",
      "CRL number differs between servers: 0x1001 on https://a; 0x1000 on https://b",
      "database (store id) differs between servers: s1 on https://a; s2 on https://b",
      "https://a: certificate expires 2030-01-01T00:00:00.000Z",
      "https://b: clock 120.0 s off this coordinator's",
      "https://b: certificate expires 2030-01-01T00:00:00.000Z",
    ]);
  });

  test("a 24-hour certificate warns with a sixth of its life left (4 h), not from its start (issue 21)", () => {
    const day = facts({ certificateIssued: "2030-01-01T00:00:00.000Z", certificateExpires: "2030-01-02T00:00:00.000Z" });
    const at = (iso: string) => fleetWarnings([server("https://a", { facts: day })], Date.parse(iso));
    expect(at("2030-01-01T00:00:01Z")).toEqual([]);
    expect(at("2030-01-01T19:59:59Z")).toEqual([]);
    expect(at("2030-01-01T20:00:01Z")).toEqual(["https://a: certificate expires 2030-01-02T00:00:00.000Z"]);
    expect(at("2030-01-02T00:00:01Z")).toEqual(["https://a: certificate expired 2030-01-02T00:00:00.000Z"]);
    // A server that does not say when its certificate began (an older version): 14 days, as before.
    const unknown = facts({ certificateIssued: "", certificateExpires: "2030-01-15T00:00:00.000Z" });
    expect(fleetWarnings([server("https://a", { facts: unknown })], Date.parse("2030-01-01T00:00:01Z"))).toEqual([
      "https://a: certificate expires 2030-01-15T00:00:00.000Z",
    ]);
  });
});

describe("mergeMetrics", () => {
  test("one valid exposition: each family's HELP and TYPE once, every sample labelled with its worker", () => {
    const worker = (n: number) =>
      [
        "# HELP securemesh_http_requests_total HTTP requests answered.",
        "# TYPE securemesh_http_requests_total counter",
        `securemesh_http_requests_total{route="/health",method="GET",status="200"} ${n}`,
        "# HELP securemesh_http_request_duration_seconds Time.",
        "# TYPE securemesh_http_request_duration_seconds histogram",
        `securemesh_http_request_duration_seconds_bucket{route="/health",le="+Inf"} ${n}`,
        `securemesh_http_request_duration_seconds_sum{route="/health"} 0.5`,
        `securemesh_http_request_duration_seconds_count{route="/health"} ${n}`,
        "# TYPE up gauge",
        "up 1",
      ].join("\n");
    const text = mergeMetrics([
      { worker: 1, text: worker(3) },
      { worker: 2, text: worker(4) },
    ]);
    expect(text.match(/^# TYPE securemesh_http_requests_total /gm)).toHaveLength(1);
    // Read back by the tests' parser (an independent one, plus the grammar and histogram checks it lacks).
    const exposition = parsePrometheus(text);
    expect([1, 2].map((w) => exposition.value("securemesh_http_requests_total", { worker: String(w), route: "/health" }))).toEqual([3, 4]);
    expect([1, 2].map((w) => exposition.value("securemesh_http_request_duration_seconds", { worker: String(w) }))).toEqual([3, 4]);
    expect(text).toContain('up{worker="1"} 1\nup{worker="2"} 1\n');
  });
});

describe("WorkerPoolView", () => {
  test("labels each worker's series with its own number, so one restarting does not relabel the other's", async () => {
    // Worker 1 is restarting (not listed); worker 2 answers on its loopback admin listener.
    const admin = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response("# TYPE up gauge\nup 1\n") });
    try {
      const view = new WorkerPoolView(() => [{ index: 2, pid: 1, port: 0, adminUrl: `http://127.0.0.1:${admin.port}/` }]);
      expect(await (await view.metricsResponse()).text()).toBe('# TYPE up gauge\nup{worker="2"} 1\n');
    } finally {
      admin.stop(true);
    }
  });
});
