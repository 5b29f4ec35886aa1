import { afterAll, beforeAll, expect, test } from "bun:test";
import { expectPeer } from "../authz/expect-peer.ts";
import { createLogger } from "../ops/log.ts";
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
