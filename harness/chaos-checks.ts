// The faults of `bun harness chaos`, shared with harness/chaos.test.ts (which runs smaller loads).
import type { MeshClient } from "../shared/request-path/mesh-client.ts";
import { openStore } from "../shared/request-path/store.ts";
import { expectThat, waitFor, type Cluster } from "./cluster.ts";
import { percentile } from "./load.ts";
import { countRecords } from "./scenario.ts";

export interface LoadResult {
  acks: number[];
  failures: string[];
  /** [start ms since the load began, latency ms] per request */
  samples: [number, number][];
}

export interface FaultRow {
  fault: string;
  requests: number;
  failed: number;
  detail: string;
}

/**
 * Each client sends messages one after another: `perClient` of them, or until `untilMs`. `during(elapsedMs, acks)`
 * is polled between requests so a fault can be injected part-way.
 */
export async function runLoad(clients: MeshClient[], limit: { perClient?: number; untilMs?: number }, during?: (elapsedMs: number, acks: number) => void, kind: "write" | "read" = "write", status?: (text: () => string) => void): Promise<LoadResult> {
  const result: LoadResult = { acks: [], failures: [], samples: [] };
  const started = performance.now();
  await Promise.all(clients.map(async (client, c) => {
    for (let i = 0; ; i++) {
      const elapsed = performance.now() - started;
      if (limit.perClient !== undefined && i >= limit.perClient) break;
      if (limit.untilMs !== undefined && elapsed >= limit.untilMs) break;
      during?.(elapsed, result.acks.length);
      const t0 = performance.now();
      try {
        if (kind === "read") {
          result.acks.push((await client.readCachedData()).generation);
        } else {
          const { status, body } = await client.sendData(`chaos ${c}-${i}`);
          if (status === 200) result.acks.push(body.id as number);
          else result.failures.push(`${status} ${JSON.stringify(body)}`);
        }
      } catch (error) {
        result.failures.push((error as Error).message);
      }
      result.samples.push([t0 - started, performance.now() - t0]);
      status?.(() => `${kind}s: ${result.samples.length} requests, ${result.acks.length} acknowledged, ${result.failures.length} failed`);
    }
  }));
  return result;
}

/** Records in the store equal the acknowledgements: none lost, none stored twice. */
export async function checkRecords(db: string, before: number, acks: number[]): Promise<{ records: number; lost: number; duplicates: number }> {
  const store = await openStore(db);
  try {
    const records = (await store.count()) - before;
    const distinct = new Set(acks).size;
    return { records, lost: Math.max(0, distinct - records), duplicates: (acks.length - distinct) + Math.max(0, records - distinct) };
  } finally {
    await store.close();
  }
}


export interface MeshHandles {
  cluster: Cluster;
  coordinator: string;
  /** Role name and port of each server, so a killed one can be restarted where it was. */
  servers: { name: string; port: number }[];
  db: string;
  client(name: string, coordinators?: string[]): MeshClient;
  /** Running counts while a load runs (a TTY status line in the scenario); built only when drawn. */
  status?(text: () => string): void;
}

function clientsFor(mesh: MeshHandles, count: number, coordinators = [mesh.coordinator]): MeshClient[] {
  return Array.from({ length: count }, (_, i) => mesh.client(i % 2 ? "client2" : "client1", coordinators));
}

/** kill -9 a server while clients send; no request may fail, no record be lost or duplicated. */
export async function killNineUnderLoad(mesh: MeshHandles, clients: number, perClient: number): Promise<FaultRow> {
  const before = await countRecords(mesh.db);
  const victim = mesh.servers[0]!;
  let killed = false;
  const load = await runLoad(clientsFor(mesh, clients), { perClient }, (_, acks) => {
    if (!killed && acks >= (clients * perClient) / 4) {
      killed = true;
      void mesh.cluster.kill(victim.name);
    }
  }, "write", mesh.status);
  expectThat(killed, "the load finished before the kill");
  const { records, lost, duplicates } = await checkRecords(mesh.db, before, load.acks);
  await mesh.cluster.startServer(victim.name, victim.port);
  expectThat(load.failures.length === 0, `${load.failures.length} requests failed, e.g. ${load.failures[0]}`);
  expectThat(lost === 0 && duplicates === 0 && records === load.acks.length, `acknowledged ${load.acks.length}, stored ${records}: ${lost} lost, ${duplicates} duplicated`);
  return { fault: "kill -9 a server under load", requests: load.samples.length, failed: load.failures.length, detail: `${load.acks.length} acknowledged, ${records} stored, 0 lost, 0 duplicated` };
}

/**
 * SIGSTOP a server during load: failover within the timeout, p99 bounded by it, one clean rejoin after SIGCONT.
 * The load is reads: a server frozen in the middle of a sqlite commit holds the shared file's write lock, which
 * stalls every server's writes until it resumes; that is the database's fault model, not the coordinator's.
 */
export async function hangUnderLoad(mesh: MeshHandles, clients: number, timeoutMs: number, durationMs: number): Promise<FaultRow> {
  const victim = mesh.servers[1]!;
  const role = mesh.cluster.role(victim.name);
  const [stopAt, resumeAt] = [durationMs * 0.2, durationMs * 0.7];
  let phase = 0;
  const load = await runLoad(clientsFor(mesh, clients), { untilMs: durationMs }, (elapsed) => {
    if (phase === 0 && elapsed >= stopAt) { phase = 1; role.signal("SIGSTOP"); }
    if (phase === 1 && elapsed >= resumeAt) { phase = 2; role.signal("SIGCONT"); }
  }, "read", mesh.status);
  role.signal("SIGCONT");
  const during = load.samples.filter(([start]) => start >= stopAt && start < resumeAt).map(([, latency]) => latency);
  const p99 = percentile(during, 99);
  const max = Math.max(0, ...during);
  const url = `https://127.0.0.1:${victim.port}`;
  await waitFor(`${victim.name} back in the coordinator's rotation`, async () =>
    ((await mesh.cluster.health(mesh.coordinator))?.body.servers as { url: string; up: boolean }[] | undefined)?.find((s) => s.url === url)?.up, 20_000);
  const coordinatorLog = mesh.cluster.role("coordinator").lines;
  const rejoins = coordinatorLog.filter((l) => l === `Server ${url} is back in rotation`).length;
  expectThat(load.failures.length === 0, `${load.failures.length} requests failed during the hang, e.g. ${load.failures[0]}`);
  expectThat(p99 <= timeoutMs + 500, `p99 during the hang was ${p99.toFixed(0)} ms, over the ${timeoutMs} ms timeout`);
  expectThat(max <= 2 * timeoutMs + 500, `the slowest request during the hang took ${max.toFixed(0)} ms`);
  expectThat(coordinatorLog.some((l) => l.startsWith(`Server ${url} failed: timeout`)), "the coordinator never timed the hung server out");
  expectThat(rejoins === 1, `the server rejoined ${rejoins} times (flapping?)`);
  return { fault: "SIGSTOP a server under read load", requests: load.samples.length, failed: load.failures.length, detail: `during the hang p99 ${p99.toFixed(0)} ms, max ${max.toFixed(0)} ms (timeout ${timeoutMs} ms); rejoined once after SIGCONT` };
}

/** Every server down: a fast 503; back up: the coordinator recovers without a restart. */
export async function allServersDown(mesh: MeshHandles): Promise<FaultRow> {
  await Promise.all(mesh.servers.map((s) => mesh.cluster.kill(s.name)));
  const times: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    // Straight to the coordinator: the client's own retries would hide how fast the coordinator answers.
    const response = await mesh.cluster.request(`${mesh.coordinator}/api/data`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
    times.push(performance.now() - t0);
    const body = (await response.json()) as { error?: string };
    expectThat(response.status === 503 && typeof body.error === "string", `expected a 503 JSON error with every server down, got ${response.status}`);
  }
  const slowest = Math.max(...times);
  expectThat(slowest < 1000, `the slowest 503 took ${slowest.toFixed(0)} ms`);
  await Promise.all(mesh.servers.map((s) => mesh.cluster.startServer(s.name, s.port)));
  const client = mesh.client("client1");
  await waitFor("the coordinator to serve again", async () =>
    (await client.sendData("after every server came back").catch(() => ({ status: 0 }))).status === 200, 20_000);
  return { fault: "every server down", requests: times.length, failed: 0, detail: `503 JSON in at most ${slowest.toFixed(0)} ms; served again after the restart, coordinator not restarted` };
}

/**
 * A database outage (MariaDB behind a relay that is cut): the servers and the KeyServer answer 503, nothing is
 * acknowledged that was not committed, and after the database is back everything works with no role restarted.
 */
export async function databaseOutage(mesh: MeshHandles, dbUrl: string, relay: { cut(): void; restore(): void }, requestApi: () => Promise<{ status: number }>): Promise<FaultRow> {
  const client = mesh.client("client1");
  const before = await countRecords(dbUrl);
  const acks: number[] = [];
  const send = async () => {
    const answer = await client.sendData("during the database drill").catch((error: Error) => ({ status: 503, body: { error: error.message } as Record<string, unknown> }));
    if (answer.status === 200) acks.push(answer.body.id as number);
    return answer.status;
  };
  expectThat((await send()) === 200, "a write before the outage failed");
  expectThat((await requestApi()).status === 200, "a token call before the outage failed");

  relay.cut();
  const outage = [await send(), await send(), await send()];
  const tokenDuring = (await requestApi()).status;
  expectThat(outage.every((s) => s === 503), `writes during the outage answered ${outage.join(", ")}, expected 503`);
  expectThat(tokenDuring === 503, `a token call during the outage answered ${tokenDuring}, expected 503`);

  relay.restore();
  await waitFor("writes to work again", async () => (await send()) === 200, 30_000);
  await waitFor("token calls to work again", async () => (await requestApi()).status === 200, 30_000);
  const { records, lost, duplicates } = await checkRecords(dbUrl, before, acks);
  expectThat(lost === 0 && duplicates === 0 && records === acks.length, `acknowledged ${acks.length}, stored ${records}`);
  return { fault: "database outage (MariaDB cut)", requests: outage.length + 1, failed: 0, detail: `writes and token calls got 503 during it; ${acks.length} acknowledged = ${records} stored; no role restarted` };
}

/** Two coordinators: kill -9 one under load; the clients fail over to the other with no failed request. */
export async function coordinatorFailover(mesh: MeshHandles, second: string, clients: number, perClient: number): Promise<FaultRow> {
  const before = await countRecords(mesh.db);
  let killed = false;
  const load = await runLoad(clientsFor(mesh, clients, [mesh.coordinator, second]), { perClient }, (_, acks) => {
    if (!killed && acks >= (clients * perClient) / 4) {
      killed = true;
      void mesh.cluster.kill("coordinator");
    }
  }, "write", mesh.status);
  const { records, lost, duplicates } = await checkRecords(mesh.db, before, load.acks);
  expectThat(killed, "the load finished before the coordinator was killed");
  expectThat(load.failures.length === 0, `${load.failures.length} requests failed, e.g. ${load.failures[0]}`);
  expectThat(lost === 0 && duplicates === 0, `${lost} lost, ${duplicates} duplicated`);
  return { fault: "kill -9 one of two coordinators", requests: load.samples.length, failed: load.failures.length, detail: `clients failed over; ${records} stored, 0 lost, 0 duplicated` };
}

export function faultTable(rows: FaultRow[]): string[] {
  const header = ["fault", "requests", "failed", "detail"];
  const cells = rows.map((r) => [r.fault, String(r.requests), String(r.failed), r.detail]);
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: string[]) => `| ${c.map((x, i) => x.padEnd(widths[i]!)).join(" | ")} |`;
  return [line(header), line(widths.map((w) => "-".repeat(w))), ...cells.map(line)];
}
