import { expect, test } from "bun:test";
import { createLogger } from "./log.ts";
import { Metrics } from "./metrics.ts";
import { clusterStatus, createAdminApp } from "./status-page.ts";
import { UpstreamPool } from "../request-path/upstream.ts";

const logger = createLogger("t", { write: () => {}, color: false });
/** The page reads the pool's state only: a transport that is never called. */
const transport = { request: () => Promise.reject(new Error("no network in this test")) };
const pool = new UpstreamPool({ servers: ["https://127.0.0.1:1"], transport, logger });

const get = (app: ReturnType<typeof createAdminApp>, host: string | null, path = "/status") =>
  app.handle(new Request(`http://127.0.0.1:9901${path}`, { headers: host === null ? {} : { host } }));

// (#11) A page on evil.example whose name now resolves to 127.0.0.1 reaches the admin listener
// with its own name in Host; only names that mean this machine's loopback (or the configured host) are answered.
test("the admin listener answers loopback Host names only", async () => {
  const app = createAdminApp({ pool, logger, metrics: new Metrics() });
  for (const host of ["evil.example", "evil.example:9901", "127.0.0.1.evil.example", "localhost.evil.example:9901", "[::2]:9901", "10.0.0.5:9901"]) {
    for (const path of ["/status", "/", "/metrics", "/events", "/nowhere"]) {
      const response = await get(app, host, path);
      expect({ host, path, status: response.status }).toEqual({ host, path, status: 421 });
      expect(await response.json()).toEqual({ error: "Host header not allowed on the admin listener", code: "ERR_HOST_NOT_ALLOWED" });
    }
  }
  for (const host of ["127.0.0.1:9901", "127.0.0.1", "localhost", "LOCALHOST:9901", "[::1]:9901", "[::1]"]) {
    const response = await get(app, host);
    expect({ host, status: response.status }).toEqual({ host, status: 200 });
    expect(((await response.json()) as { servers: unknown[] }).servers).toHaveLength(1);
  }
});

test("the configured admin host is allowed as well, with its port when given", async () => {
  const app = createAdminApp({ pool, logger, metrics: new Metrics(), allowedHosts: ["admin.internal:9901", "10.0.0.5", "::1"] });
  expect((await get(app, "admin.internal:9901")).status).toBe(200);
  expect((await get(app, "admin.internal:80")).status).toBe(421);
  expect((await get(app, "admin.internal")).status).toBe(421);
  expect((await get(app, "10.0.0.5:9901")).status).toBe(200);
  expect((await get(app, "[::1]:9901")).status).toBe(200);
  expect((await get(app, "localhost")).status).toBe(200);
  expect((await get(app, "evil.example")).status).toBe(421);
});

test("each server's row names its host (#14)", async () => {
  const hosts = new UpstreamPool({
    servers: ["https://10.77.0.11:5001", "https://server2.mesh.test:5001", "https://[fd00::13]:5001"],
    transport,
    logger,
  });
  expect(clusterStatus(hosts).servers.map((s) => s.host)).toEqual(["10.77.0.11", "server2.mesh.test", "fd00::13"]);
  const page = await (await get(createAdminApp({ pool: hosts, logger, metrics: new Metrics() }), "localhost", "/")).text();
  expect(page).toContain("<th>Last checked</th><th>Host</th>");
  expect(page).toContain("cell(row, s.host);");
});
