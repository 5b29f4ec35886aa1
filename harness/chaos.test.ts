// The key faults of `bun harness chaos`, with smaller loads, on real processes and free ports.
import { lateBound } from "../shared/testing/timing.ts";
import { expect, setDefaultTimeout, test } from "bun:test";
import {
  allServersDown,
  brownOut,
  coordinatorFailover,
  databaseOutage,
  hangUnderLoad,
  impostorUnderLoad,
  killNineUnderLoad,
  membershipUnderLoad,
  noisyNeighbour,
  noisyNeighbourPolicy,
} from "./chaos-checks.ts";
import { percentile, startMesh, startTokenStack, temporaryCluster, type MeshOptions } from "./fixtures/index.ts";
import { scratchDatabase } from "../shared/testing/mysql.ts";
import { TcpRelay } from "../shared/testing/tcp-relay.ts";

setDefaultTimeout(90_000);

/** The chaos mesh: health checks every 300 ms, so a recovered server is back in rotation quickly. */
const chaosMesh = (options: MeshOptions = {}) => startMesh({ ...options, coordinatorArgs: ["--health-interval", "300", ...(options.coordinatorArgs ?? [])] });

test("kill -9 under load: no failed request, no lost or duplicated record", async () => {
  await using mesh = await chaosMesh();
  expect((await killNineUnderLoad(mesh, 2, 100)).failed).toBe(0);
});

test("a hung server: failover within the timeout, one clean rejoin", async () => {
  await using mesh = await chaosMesh({ coordinatorArgs: ["--timeout", "1000"] });
  expect((await hangUnderLoad(mesh, 2, 1000, 3000)).failed).toBe(0);
});

test("every server down: a fast 503, then recovery without restarting the coordinator", async () => {
  await using mesh = await chaosMesh();
  expect((await allServersDown(mesh)).failed).toBe(0);
});

test("two coordinators: clients fail over when one is killed", async () => {
  await using mesh = await chaosMesh();
  const second = await mesh.cluster.startCoordinator(
    "coordinator2",
    0,
    mesh.servers.map((s) => s.url),
  );
  expect((await coordinatorFailover(mesh, second, 2, 60)).failed).toBe(0);
});

test("a database outage: 503 while MariaDB is cut off, then everything works with no restart", async () => {
  await using relay = await TcpRelay.start({ host: "127.0.0.1", port: 3306 });
  const dbUrl = `mysql://root@127.0.0.1:${relay.port}/test`;
  await using mesh = await chaosMesh({ db: dbUrl });
  // The token store in a database of its own, behind the same relay: its keyring is bound to it (issue 23).
  await using tokenDb = await scratchDatabase("securemesh_chaos_tokens");
  const stack = await startTokenStack({ cluster: mesh.cluster, tokenDb: tokenDb.on(`127.0.0.1:${relay.port}`) });
  const row = await databaseOutage(mesh, relay, () => stack.requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: stack.itemUri }));
  expect(row.failed).toBe(0);
});

test("percentile", () => {
  expect([percentile([5, 1, 3, 2, 4], 50), percentile([1, 2, 3, 4, 100], 99), percentile([], 99)]).toEqual([3, 100, 0]);
});

// Issue 18, H1: on Bun, Deno and a mixed mesh.
for (const runtime of ["bun", "deno", "mixed"] as const) {
  test(`an impostor on a killed server's port, under load, on ${runtime}: it receives nothing, acknowledges nothing`, async () => {
    // The mesh's default probe interval (1 s), as in the finding: the window in which only a forward could meet it.
    await using mesh = await startMesh({ runtime });
    const row = await impostorUnderLoad(mesh, 4, 60);
    expect({ failed: row.failed, impostorBytes: row.impostor.bytes }).toEqual({ failed: 0, impostorBytes: 0 });
  });
}

test("issue 23: a server added to the coordinator's --servers-file, then the first removed, under load: nothing lost", async () => {
  await using mesh = await chaosMesh();
  expect((await membershipUnderLoad(mesh.cluster, mesh.db, 4)).failed).toBe(0);
});

// `bun harness chaos` holds client1's p99 to 2× of alone. Here, 3 s per phase beside the rest of the suite on two
// cores, the bound is widened by SECUREMESH_TIMING_SLACK (lateBound): CI once saw 2.01×. Without the limits it was
// 13.9× (docs/harness.md), so the widened bound still fails on the flood.
test("issue 20, the noisy neighbour: client2 floods with 64 workers; client1's 4 see 0 errors and a p99 within 2× of alone (slack)", async () => {
  await using cluster = await temporaryCluster({ label: "noisy" });
  const policy = noisyNeighbourPolicy(cluster.logDir, { noisyInFlight: 1, clientInFlight: 16 });
  await using mesh = await chaosMesh({ cluster, db: `${cluster.logDir}/records.db`, coordinatorArgs: ["--policy", policy] });
  const p99Goal = lateBound(2);
  const row = await noisyNeighbour(mesh, { quiet: 4, noisy: 64, durationMs: 3000, p99Goal });
  console.log(`  ${row.detail}`);
  expect({ failed: row.failed, withinGoal: row.p99FloodedMs <= p99Goal * row.p99AloneMs, limited: row.noisyLimited > 0 }).toEqual({
    failed: 0,
    withinGoal: true,
    limited: true,
  });
});

test("issue 20, brown-out: every server slowed, then failing 10 % of requests, at once: nothing fails, never all out", async () => {
  await using mesh = await chaosMesh();
  const row = await brownOut(mesh, { clients: 2, phaseMs: 1500, delayMs: 100, dropShare: 0.1 });
  console.log(`${row.fault}: ${row.requests} requests, ${row.failed} failed; ${row.detail}`);
  expect(row.failed).toBe(0);
});
