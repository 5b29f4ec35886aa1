// The key faults of `bun harness chaos`, with smaller loads, on real processes and free ports.
import { afterEach, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { testPki } from "../shared/testing/pki.ts";
import { allServersDown, coordinatorFailover, databaseOutage, hangUnderLoad, killNineUnderLoad, type MeshHandles } from "./chaos-checks.ts";
import { percentile } from "./load.ts";
import { Cluster } from "./cluster.ts";
import { TcpRelay } from "./tcp-relay.ts";
import { startTokenStack } from "./token-stack.ts";

setDefaultTimeout(90_000);

let pki: string;
const clusters: Cluster[] = [];

beforeAll(async () => {
  pki = await testPki();
});

afterEach(async () => {
  await Promise.all(clusters.splice(0).map((c) => c.stop()));
});

async function mesh(coordinatorArgs: string[] = [], db?: string): Promise<MeshHandles> {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-chaos-"));
  const store = db ?? join(dir, "records.db");
  const cluster = new Cluster({ logDir: dir, pki, env: { NO_COLOR: "1", DATABASE_URL: store } });
  clusters.push(cluster);
  const urls = await Promise.all([cluster.startServer("server1", 0), cluster.startServer("server2", 0)]);
  const coordinator = await cluster.startCoordinator("coordinator", 0, urls, ["--health-interval", "300", ...coordinatorArgs]);
  return {
    cluster, coordinator, db: store,
    servers: urls.map((u, i) => ({ name: `server${i + 1}`, port: Number(new URL(u).port) })),
    client: (name, coordinators = [coordinator]) => cluster.client(name, coordinators),
  };
}

test("kill -9 under load: no failed request, no lost or duplicated record", async () => {
  expect((await killNineUnderLoad(await mesh(), 2, 100)).failed).toBe(0);
});

test("a hung server: failover within the timeout, one clean rejoin", async () => {
  const row = await hangUnderLoad(await mesh(["--timeout", "1000"]), 2, 1000, 3000);
  expect(row.failed).toBe(0);
});

test("every server down: a fast 503, then recovery without restarting the coordinator", async () => {
  expect((await allServersDown(await mesh())).failed).toBe(0);
});

test("two coordinators: clients fail over when one is killed", async () => {
  const m = await mesh();
  const second = await m.cluster.startCoordinator("coordinator2", 0, m.servers.map((s) => `https://127.0.0.1:${s.port}`));
  expect((await coordinatorFailover(m, second, 2, 60)).failed).toBe(0);
});

test("a database outage: 503 while MariaDB is cut off, then everything works with no restart", async () => {
  await using relay = await TcpRelay.start({ host: "127.0.0.1", port: 3306 });
  const dbUrl = `mysql://root@127.0.0.1:${relay.port}/test`;
  const m = await mesh([], dbUrl);
  const stack = await startTokenStack(m.cluster, { keyserver: 0, secureproxy: 0, marketplace: 0 }, dbUrl);
  const uri = `${stack.marketplace.replace("127.0.0.1", "localhost")}/api/item`;
  const row = await databaseOutage(m, dbUrl, relay, () => stack.requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri }));
  expect(row.failed).toBe(0);
});

test("percentile", () => {
  expect([percentile([5, 1, 3, 2, 4], 50), percentile([1, 2, 3, 4, 100], 99), percentile([], 99)]).toEqual([3, 100, 0]);
});
