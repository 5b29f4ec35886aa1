// The coordinator's admin listener on real processes: /metrics on every role, and the live status page in Chromium.
import { lateBound } from "../shared/testing/timing.ts";
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { policyPath } from "../shared/platform/config.ts";
import { chromium, type Browser, type Locator } from "playwright-core";
import { createAdminApp, STATUS_PUSH_MS } from "../shared/ops/status-page.ts";
import { createLogger } from "../shared/ops/log.ts";
import { Metrics } from "../shared/ops/metrics.ts";
import { listenReloadable } from "../shared/platform/http.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { NetworkError } from "../shared/platform/runtime/types.ts";
import { UpstreamPool } from "../shared/request-path/upstream.ts";
import { parsePrometheus } from "../shared/testing/prometheus.ts";
import { CHROMIUM, launchChromium } from "./browser.ts";
import { startMesh, temporaryCluster, type Cluster, type Mesh } from "./fixtures/index.ts";

setDefaultTimeout(60_000);

const HEALTH_INTERVAL_MS = 1000;
let mesh: Mesh;
let cluster: Cluster;
let servers: string[];
let coordinator: string;
let admin: string;

beforeAll(async () => {
  // Every role runs this policy: client2 may start one request a second, so the page has a caller over its limit to
  // show (issue 20), and client1 may read the servers' /metrics (metrics.read), as a scraper would.
  const policyFile = join(mkdtempSync(join(tmpdir(), "securemesh-status-policy-")), "policy.json");
  const policy = JSON.parse(readFileSync(policyPath(), "utf8")) as { rules: unknown[]; limits: unknown[] };
  policy.limits.unshift({ identity: "spiffe://securemesh/client/client2", rate: { perSecond: 1, burst: 1 } });
  policy.rules.push({ identity: "spiffe://securemesh/client/client1", allow: ["metrics.read"] });
  writeFileSync(policyFile, JSON.stringify(policy));
  cluster = await temporaryCluster({ label: "status-page", env: { SECUREMESH_POLICY: policyFile } });
  // fall 1: one failed probe takes a server out, so the page must show it within one interval.
  mesh = await startMesh({
    cluster,
    db: join(cluster.logDir, "records.db"),
    coordinatorArgs: ["--admin-port", "0", "--health-interval", String(HEALTH_INTERVAL_MS), "--fall", "1", "--policy", policyFile],
  });
  ({ cluster, coordinator } = mesh);
  servers = mesh.servers.map((s) => s.url);
  admin = await cluster.adminUrl("coordinator");
});

afterAll(async () => {
  await mesh?.[Symbol.asyncDispose]();
  await cluster?.[Symbol.asyncDispose]();
});

describe("/metrics", () => {
  test("every role's /metrics parses as Prometheus text; the coordinator's is on its admin listener", async () => {
    const client = cluster.client("client1", [coordinator]);
    await client.sendData("metrics test");
    for (let i = 0; i < 4; i++) await client.readCachedData(); // round-robin: two reads per server, a miss then a hit

    const coordinatorMetrics = parsePrometheus(await (await fetch(`${admin}/metrics`)).text());
    for (const server of servers) expect(coordinatorMetrics.value("securemesh_upstream_up", { upstream: server })).toBe(1);
    expect(coordinatorMetrics.value("securemesh_upstream_retries_total")).toBe(0);
    expect(coordinatorMetrics.value("securemesh_http_requests_total", { route: "/api/*", method: "POST", status: "200" })).toBe(1);
    // Not on the mutual-TLS listener: operators scrape the loopback admin port.
    expect((await cluster.request(`${coordinator}/metrics`)).status).toBe(404);

    let hits = 0;
    for (const server of servers) {
      const response = await cluster.request(`${server}/metrics`);
      expect(response.headers.get("content-type")).toStartWith("text/plain; version=0.0.4");
      const metrics = parsePrometheus(await response.text());
      hits += metrics.value("securemesh_cache_hits_total")!;
      expect(metrics.value("securemesh_http_request_duration_seconds", { route: "/health" })).toBeGreaterThan(0);
    }
    expect(hits).toBeGreaterThanOrEqual(1);
    // The series name callers and their decisions: a certificate the policy does not grant metrics.read gets a 403.
    const asClient2 = await fetch(`${servers[0]}/metrics`, { tls: mutualTlsClientOptions(loadIdentity(cluster.pki, "client2")) });
    expect([asClient2.status, await asClient2.json()]).toEqual([
      403,
      { error: "spiffe://securemesh/client/client2 lacks permission metrics.read", code: "ERR_FORBIDDEN" },
    ]);
  });

  test("the admin listener binds to loopback only", () => {
    expect(new URL(admin).hostname).toBe("127.0.0.1");
  });
});

describe("status page in Chromium", () => {
  let browser: Browser;
  beforeAll(async () => {
    if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install chromium (.ci/run does)`);
    browser = await launchChromium(chromium);
  });
  afterAll(() => browser?.close());

  test("shows a caller refused over its rate limit: whose, which limit, how often (issue 20)", async () => {
    const page = await browser.newPage();
    await page.goto(admin);
    expect(await page.locator("#limits").isHidden()).toBe(true);
    const client2 = mesh.client("client2");
    const answers = await Promise.all(Array.from({ length: 3 }, (_, i) => client2.sendData(`over the rate ${i}`)));
    expect(answers.map((a) => a.status)).toEqual([200, 200, 200]); // each 429 waited out as told
    expect(client2.limited.count).toBeGreaterThanOrEqual(2);
    const row = page.locator('#limits tr[data-identity="spiffe://securemesh/client/client2"]');
    // The page may have drawn the row between two refusals: wait for the count the client saw.
    await row
      .locator("td")
      .nth(3)
      .filter({ hasText: new RegExp(`^${client2.limited.count}$`) })
      .waitFor({ timeout: 5000 });
    const cells = await row.locator("td").allTextContents();
    expect({ identity: cells[0], refusedInFlight: cells[2], refusedRate: Number(cells[3]), last: cells[4] }).toEqual({
      identity: "spiffe://securemesh/client/client2",
      refusedInFlight: "0",
      refusedRate: client2.limited.count,
      last: expect.stringMatching(/s ago$/),
    });
    expect(await page.locator("#limits-title").isVisible()).toBe(true);
  });

  test("shows every server up, then a killed server down within the health-check interval, without a reload", async () => {
    const page = await browser.newPage();
    await page.goto(admin);
    const row = (server: string) => page.locator(`tr[data-server="${server}"]`);
    const shows = (selector: Locator, text: string, timeout = 10_000) => selector.filter({ hasText: text }).waitFor({ timeout });
    for (const server of servers) await shows(row(server).locator(".state"), "up");
    await shows(page.locator("#summary"), "2 of 2 servers up");
    expect(await row(servers[0]!).locator("td").nth(2).textContent()).toMatch(/s ago$/);
    // Each server's own facts (issue 23): its policy hash, CRL number, certificate expiry and clock; they agree, so
    // no warning shows.
    const cells = await row(servers[0]!).locator("td").allTextContents();
    expect(cells.slice(9, 13)).toEqual([
      expect.stringMatching(/^sha256:[0-9a-f]{16}$/),
      expect.stringMatching(/^0x[0-9A-F]+$/),
      expect.stringMatching(/^\d{4}-\d{2}-\d{2}$/),
      expect.stringMatching(/^[+-]\d+ ms$/),
    ]);
    expect(await page.locator("#warnings li").count()).toBe(0);

    const navigations: string[] = [];
    page.on("framenavigated", (frame) => navigations.push(frame.url()));
    const killedAt = performance.now();
    await cluster.kill("server2");
    await shows(row(servers[1]!).locator(".state"), "down", HEALTH_INTERVAL_MS + STATUS_PUSH_MS + 1000);
    const shownAfterMs = performance.now() - killedAt;
    console.log(`status page showed server 2 down ${shownAfterMs.toFixed(0)} ms after kill -9 (interval ${HEALTH_INTERVAL_MS} ms)`);
    expect(shownAfterMs).toBeLessThanOrEqual(HEALTH_INTERVAL_MS + STATUS_PUSH_MS + 1000);
    await shows(page.locator("#summary"), "1 of 2 servers up");
    expect(await row(servers[0]!).locator(".state").textContent()).toBe("up");
    // The first failure may be a reset of a connection kill -9 cut (ECONNRESET); the next probe meets the closed
    // port, and the page must come to show that refusal live, without a reload.
    await shows(row(servers[1]!).locator(".error"), "connection refused");
    expect(navigations).toEqual([]);
  });

  test("issue 20: every server killed: the page shows panic, and a request's wait in the queue and its 503", async () => {
    const page = await browser.newPage();
    await page.goto(admin);
    await cluster.kill("server1");
    await page
      .locator("#panic")
      .filter({ hasText: "Panic routing since" })
      .waitFor({ timeout: HEALTH_INTERVAL_MS + STATUS_PUSH_MS + 2000 });
    expect(await page.locator("#panic").textContent()).toMatch(/: 0 of 2 servers in rotation, under 50 %; requests go to every server that answers$/);
    const answer = await cluster.request(`${coordinator}/api/get_cached_data`);
    expect({ status: answer.status, retryAfter: answer.headers.get("retry-after"), body: await answer.json() }).toEqual({
      status: 503,
      retryAfter: "1",
      body: { error: "no server is up (waited 500 ms in the queue)", code: "ERR_UNAVAILABLE" },
    });
    await page.locator("#routing").filter({ hasText: "1 queued, 1 timed out" }).waitFor({ timeout: 5000 });
    expect(await page.locator("#routing").textContent()).toContain("Queue: 0 waiting (max 64, timeout 500 ms)");
    const metrics = parsePrometheus(await (await fetch(`${admin}/metrics`)).text());
    expect([metrics.value("securemesh_upstream_panic"), metrics.value("securemesh_upstream_queue_rejected_total", { reason: "timeout" })]).toEqual([1, 1]);
  });

  test("issue 20: an ejection with its reason and length, a stalled store, the cap and a spent retry budget, as the page shows them", async () => {
    // A pool of the test's own behind a real admin listener: these states on demand, without waiting for real faults.
    const [A, B, C] = ["https://a.test:5001", "https://b.test:5001", "https://c.test:5001"];
    const transport = {
      async request(url: string) {
        if (url.startsWith(A) && !url.endsWith("/health")) throw new NetworkError("ECONNRESET", "reset");
        const body = url.endsWith("/health") ? { status: "ok", store_status: url.startsWith(B) ? "stalled" : "ok" } : {};
        return { status: 200, body: new TextEncoder().encode(JSON.stringify(body)), header: () => null };
      },
    };
    const logger = createLogger("coordinator", { format: "text", color: false, write: () => {} });
    const pool = new UpstreamPool({ servers: [A, B, C], transport, logger, retryBudget: { ratio: 0, minPerSecond: 0.2 }, outlier: { baseEjectionMs: 60_000 } });
    await pool.checkAll();
    for (let i = 0; i < 9; i++) await pool.forward({ method: "GET", path: "/x", headers: new Headers() }).catch(() => {});
    const listener = await listenReloadable(createAdminApp({ pool, logger, metrics: new Metrics() }), { port: 0, hostname: "127.0.0.1" });
    const page = await browser.newPage();
    try {
      await page.goto(`http://127.0.0.1:${listener.port}/`);
      const row = (server: string) => page.locator(`tr[data-server="${server}"]`);
      await row(A).locator(".state").filter({ hasText: "ejected" }).waitFor({ timeout: 5000 });
      const ejection = (await row(A).locator(".ejection").textContent()) ?? "";
      expect(ejection).toMatch(/^for \d+\.\d s \(#1\): 3 consecutive gateway failures \(last: .+\)$/);
      // The time left of the 60 s ejection: counted down from when it began, a few seconds ago on a loaded machine.
      const left = Number(/^for (\d+\.\d) s/.exec(ejection)![1]);
      expect(left).toBeLessThanOrEqual(60);
      expect(left).toBeGreaterThan(60 - lateBound(2.5));
      expect(await row(B).locator("td").nth(14).textContent()).toBe("stalled");
      expect(await row(C).locator(".state").textContent()).toBe("up");
      await page.locator("#summary").filter({ hasText: "2 of 3 servers up" }).waitFor({ timeout: 5000 });
      expect(await page.locator("#panic").textContent()).toBe("");
      const routing = await page.locator("#routing").textContent();
      expect(routing).toContain("Ejections: 1 (at most 1 of 3 servers out; 0 refused at the cap)");
      expect(routing).toMatch(/Retry budget: 2 retries for 9 requests in 10 s \(0 % \+ 0\.2\/s\), exhausted 1 times$/);
    } finally {
      await page.close();
      await listener.stop();
    }
  });
});
