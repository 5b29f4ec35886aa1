import { afterAll, beforeAll, expect, test } from "bun:test";
import { expectPeer } from "../authz/expect-peer.ts";
import { createLogger } from "../ops/log.ts";
import { traceOf } from "../ops/trace.ts";
import { testPki } from "../testing/pki.ts";
import { loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions } from "../platform/tls.ts";
import { UpstreamPool } from "./upstream.ts";

let healthStatus = 200;
let server: ReturnType<typeof Bun.serve>;
let pool: UpstreamPool;
const logs: string[] = [];

beforeAll(async () => {
  const pki = await testPki();
  server = Bun.serve({
    port: 0, hostname: "127.0.0.1", tls: mutualTlsServerOptions(loadIdentity(pki, "server")),
    fetch: () => Response.json({ status: healthStatus === 200 ? "ok" : "degraded" }, { status: healthStatus }),
  });
  pool = new UpstreamPool({
    servers: [`https://127.0.0.1:${server.port}`], tls: mutualTlsClientOptions(loadIdentity(pki, "coordinator")),
    logger: createLogger("coordinator", { format: "text", color: false, write: (l) => logs.push(l) }),
    health: { fall: 2, rise: 2, timeoutMs: 1000 },
  });
});

afterAll(() => server.stop(true));

const up = () => pool.snapshot()[0]!.up;

test("fall/rise: one bad probe does not take a server out, one good probe does not bring it back", async () => {
  await pool.checkAll();
  expect(up()).toBe(true);
  healthStatus = 503;
  await pool.checkAll();
  expect(up()).toBe(true); // one slow or failed probe: no flap
  await pool.checkAll();
  expect(up()).toBe(false);
  healthStatus = 200;
  await pool.checkAll();
  expect(up()).toBe(false);
  await pool.checkAll();
  expect(up()).toBe(true);
  expect(logs.filter((l) => l.startsWith("Server "))).toEqual([
    `Server https://127.0.0.1:${server.port} failed: health check answered 503 (health check); out of rotation`,
    `Server https://127.0.0.1:${server.port} is back in rotation`,
  ]);
});

test("with every server out of rotation, forward answers 503 without trying", async () => {
  healthStatus = 503;
  await pool.checkAll();
  await pool.checkAll();
  await expect(pool.forward({ method: "GET", path: "/x", headers: new Headers() })).rejects.toMatchObject({ status: 503, message: "no server is up" });
  healthStatus = 200;
});

test("#11: a server enters rotation only once a probe has seen the expected identity, and leaves at once on another", async () => {
  const pki = await testPki();
  const expecting = (expected: string) => new UpstreamPool({
    servers: [`https://127.0.0.1:${server.port}`], tls: mutualTlsClientOptions(loadIdentity(pki, "coordinator")),
    logger: createLogger("coordinator", { format: "text", color: false, write: () => {} }),
    health: { fall: 2, rise: 2, timeoutMs: 1000 }, expectIdentity: expectPeer(expected),
  });
  const right = expecting("spiffe://securemesh/server/*");
  expect(right.snapshot()[0]!.up).toBe(false); // not before its identity is seen
  await right.checkAll();
  expect(right.snapshot()[0]!.up).toBe(true); // the first good probe is enough at start
  const wrong = expecting("spiffe://securemesh/keyserver/*");
  await wrong.checkAll();
  expect(wrong.snapshot()[0]).toMatchObject({ up: false, lastError: "ERR_UNEXPECTED_PEER: reached spiffe://securemesh/server/server, expected spiffe://securemesh/keyserver/*" });
  await expect(wrong.forward({ method: "GET", path: "/x", headers: new Headers() })).rejects.toMatchObject({ status: 503 });
  // A broadcast goes to every server, up or not; one presenting another identity is refused at the handshake.
  expect(await wrong.broadcast("GET", "/x")).toEqual([{
    server: `https://127.0.0.1:${server.port}`, ok: false, status: null,
    error: "ERR_UNEXPECTED_PEER: reached spiffe://securemesh/server/server, expected spiffe://securemesh/keyserver/*",
  }]);
});

test("#14: forwards and broadcasts carry the request's trace as checked, never a caller's malformed one", async () => {
  const pki = await testPki();
  const seen: Record<string, string | null>[] = [];
  const echo = Bun.serve({
    port: 0, hostname: "127.0.0.1", tls: mutualTlsServerOptions(loadIdentity(pki, "server")),
    fetch: (request) => {
      seen.push({ traceparent: request.headers.get("traceparent"), requestId: request.headers.get("x-request-id") });
      return Response.json({});
    },
  });
  try {
    const traced = new UpstreamPool({ servers: [`https://127.0.0.1:${echo.port}`], tls: mutualTlsClientOptions(loadIdentity(pki, "coordinator")), logger: createLogger("c", { write: () => {} }) });
    const incoming = new Headers({ traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "x-request-id": "req-1" });
    const trace = traceOf(incoming);
    await traced.forward({ method: "GET", path: "/x", headers: incoming, trace });
    await traced.broadcast("GET", "/x", new Headers(), undefined, trace);
    await traced.forward({ method: "GET", path: "/x", headers: new Headers({ "x-request-id": "req 1\" 200 - forged" }) });
    await traced.forward({ method: "GET", path: "/x", headers: new Headers({ traceparent: "00-not-a-trace", "x-request-id": "req-2" }) });
    expect(seen.slice(0, 2)).toEqual([
      { traceparent: trace.outbound.traceparent!, requestId: null },
      { traceparent: trace.outbound.traceparent!, requestId: null },
    ]);
    expect(trace.outbound.traceparent).toMatch(/^00-4bf92f3577b34da6a3ce929d0e0e4736-(?!00f067aa0ba902b7)[0-9a-f]{16}-01$/);
    expect(seen[2]).toEqual({ traceparent: null, requestId: expect.stringMatching(/^[0-9a-f-]{36}$/) });
    expect(seen[3]).toEqual({ traceparent: expect.stringMatching(/^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/), requestId: null });
  } finally {
    echo.stop(true);
  }
});
