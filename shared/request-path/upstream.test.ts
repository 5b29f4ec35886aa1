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
import { UpstreamPool, type UpstreamAnswer, type UpstreamTransport } from "./upstream.ts";
import type { HttpsRequest } from "../platform/https-client.ts";

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

const quiet = () => createLogger("coordinator", { format: "text", color: false, write: () => {} });

describe("health checks", () => {
  test("fall/rise: one bad probe does not take a server out, one good probe does not bring it back", async () => {
    let status = 200;
    const logs: string[] = [];
    const pool = new UpstreamPool({
      servers: [A], transport: new FakeTransport(() => status), health: { fall: 2, rise: 2 },
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

  test("with every server out of rotation, forward answers 503 without trying", async () => {
    const transport = new FakeTransport(() => 503);
    const pool = new UpstreamPool({ servers: [A, B], transport, logger: quiet(), health: { fall: 1 } });
    await pool.checkAll();
    const probes = transport.calls.length;
    await expect(pool.forward({ method: "GET", path: "/x", headers: new Headers() })).rejects.toMatchObject({ status: 503, message: "no server is up" });
    expect(transport.calls.length).toBe(probes);
  });
});

describe("membership changes (issue 23)", () => {
  test("a removed server gets nothing more; an added one waits out of rotation until its first good probe", async () => {
    const C = "https://c.test:5001";
    let cAnswers = 503;
    const transport = new FakeTransport((url) => (url.startsWith(C) ? cAnswers : 200));
    const logs: string[] = [];
    const pool = new UpstreamPool({
      servers: [A, B], transport, health: { fall: 1, rise: 1 },
      logger: createLogger("coordinator", { format: "text", color: false, write: (l) => logs.push(l) }),
    });
    expect(pool.setServers([B, C])).toEqual({ added: [C], removed: [A] });
    expect(pool.snapshot().map((s) => [s.url, s.up])).toEqual([[B, true], [C, false]]);
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
    expect([servedBy("GET"), servedBy("POST")]).toEqual([[A, B, A, B], [A, B, A, B]]);
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
      const pool = new UpstreamPool({ servers: [A, B], transport, logger: quiet() });
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
      servers: [A], logger: quiet(),
      transport: { request: async (_url, init) => (sent.push({ ...(init.headers as Record<string, string>) }), { status: 200, body: new Uint8Array(), header: () => null }) },
    });
    const incoming = new Headers({ traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "content-type": "application/json", "x-securemesh-proof": "p", "idempotency-key": "k", cookie: "c", "x-securemesh-peer": "spiffe://securemesh/coordinator/x", host: "evil" });
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
    const client = new HttpsClient({ tls: { ...mutualTlsClientOptions(loadIdentity(await testPki(), "coordinator")), checkServerIdentity: expectPeer(expected) } });
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
    await traced.forward({ method: "GET", path: "/x", headers: new Headers({ "x-request-id": "req 1\" 200 - forged" }) });
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
