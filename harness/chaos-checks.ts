// The faults of `bun harness chaos`, shared with harness/chaos.test.ts (which runs smaller loads).
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { policyPath } from "../shared/platform/config.ts";
import type { MeshClient } from "../shared/request-path/mesh-client.ts";
import { IMPOSTOR_ID, startImpostor } from "./hostile.ts";
import { openStore } from "../shared/request-path/store.ts";
import {
  expectThat,
  latenciesStartedBetween,
  percentile,
  renderTable,
  runLoad,
  waitFor,
  waitUntilInRotation,
  type Cluster,
  type LoadOptions,
  type LoadRun,
  type Mesh,
} from "./fixtures/index.ts";
import { countRecords } from "./scenario.ts";
import { TcpRelay } from "../shared/testing/tcp-relay.ts";

export interface FaultRow {
  fault: string;
  requests: number;
  failed: number;
  detail: string;
}

/** A mesh under fault; `progress` shows running counts while a load runs (a TTY status line in the scenario). */
export type ChaosMesh = Mesh & { progress?: LoadOptions["progress"] };

/**
 * `clients` clients (client1 and client2 in turn) each send one request after another, `perClient` of them or for
 * `durationMs`: writes acknowledge the record id, reads the cache generation. `during` can inject a fault part-way.
 */
function loadOn(
  mesh: ChaosMesh,
  clients: MeshClient[],
  kind: "write" | "read",
  limit: { perWorker?: number; durationMs?: number },
  during: LoadOptions["during"],
): Promise<LoadRun> {
  return runLoad({
    concurrency: clients.length,
    ...limit,
    during,
    progress: mesh.progress,
    label: `${kind}s`,
    async request(c, i) {
      const client = clients[c]!;
      if (kind === "read") return (await client.readCachedData()).generation;
      const { status, body } = await client.sendData(`chaos ${c}-${i}`);
      return status === 200 ? (body.id as number) : `${status} ${JSON.stringify(body)}`;
    },
  });
}

/** Records in the store equal the acknowledgements: none lost, none stored twice. */
export async function checkRecords(db: string, before: number, acks: number[]): Promise<{ records: number; lost: number; duplicates: number }> {
  const store = await openStore(db);
  try {
    const records = (await store.count()) - before;
    const distinct = new Set(acks).size;
    return { records, lost: Math.max(0, distinct - records), duplicates: acks.length - distinct + Math.max(0, records - distinct) };
  } finally {
    await store.close();
  }
}

function clientsFor(mesh: Mesh, count: number, coordinators = [mesh.coordinator]): MeshClient[] {
  return Array.from({ length: count }, (_, i) => mesh.client(i % 2 ? "client2" : "client1", coordinators));
}

/** kill -9 a server while clients send; no request may fail, no record be lost or duplicated. */
export async function killNineUnderLoad(mesh: ChaosMesh, clients: number, perClient: number): Promise<FaultRow> {
  const before = await countRecords(mesh.db);
  const victim = mesh.servers[0]!;
  let killed = false;
  const load = await loadOn(mesh, clientsFor(mesh, clients), "write", { perWorker: perClient }, (_, acks) => {
    if (!killed && acks >= (clients * perClient) / 4) {
      killed = true;
      void mesh.cluster.kill(victim.name);
    }
  });
  expectThat(killed, "the load finished before the kill");
  const { records, lost, duplicates } = await checkRecords(mesh.db, before, load.acks);
  await mesh.restartServer(victim);
  expectThat(load.errors === 0, `${load.errors} requests failed, e.g. ${load.errorSamples[0]}`);
  expectThat(
    lost === 0 && duplicates === 0 && records === load.acks.length,
    `acknowledged ${load.acks.length}, stored ${records}: ${lost} lost, ${duplicates} duplicated`,
  );
  return {
    fault: "kill -9 a server under load",
    requests: load.requests,
    failed: load.errors,
    detail: `${load.acks.length} acknowledged, ${records} stored, 0 lost, 0 duplicated`,
  };
}

/**
 * SIGSTOP a server during load: failover within the timeout, p99 bounded by it, one clean rejoin after SIGCONT.
 * The load is reads: a server frozen in the middle of a sqlite commit holds the shared file's write lock, which
 * stalls every server's writes until it resumes; that is the database's fault model, not the coordinator's.
 */
export async function hangUnderLoad(mesh: ChaosMesh, clients: number, timeoutMs: number, durationMs: number): Promise<FaultRow> {
  const victim = mesh.servers[1]!;
  const role = mesh.cluster.role(victim.name);
  const [stopAt, resumeAt] = [durationMs * 0.2, durationMs * 0.7];
  let phase = 0;
  const load = await loadOn(mesh, clientsFor(mesh, clients), "read", { durationMs }, (elapsed) => {
    if (phase === 0 && elapsed >= stopAt) {
      phase = 1;
      role.signal("SIGSTOP");
    }
    if (phase === 1 && elapsed >= resumeAt) {
      phase = 2;
      role.signal("SIGCONT");
    }
  });
  role.signal("SIGCONT");
  const during = latenciesStartedBetween(load, stopAt, resumeAt);
  const p99 = percentile(during, 99);
  const max = Math.max(0, ...during);
  await waitUntilInRotation(mesh.cluster, mesh.coordinator, victim.url);
  const coordinatorLog = mesh.cluster.role(mesh.coordinatorRole).lines;
  const rejoins = coordinatorLog.filter((l) => l === `Server ${victim.url} is back in rotation`).length;
  expectThat(load.errors === 0, `${load.errors} requests failed during the hang, e.g. ${load.errorSamples[0]}`);
  expectThat(p99 <= timeoutMs + 500, `p99 during the hang was ${p99.toFixed(0)} ms, over the ${timeoutMs} ms timeout`);
  expectThat(max <= 2 * timeoutMs + 500, `the slowest request during the hang took ${max.toFixed(0)} ms`);
  expectThat(
    coordinatorLog.some((l) => l.startsWith(`Server ${victim.url} failed: timeout`)),
    "the coordinator never timed the hung server out",
  );
  expectThat(rejoins === 1, `the server rejoined ${rejoins} times (flapping?)`);
  return {
    fault: "SIGSTOP a server under read load",
    requests: load.requests,
    failed: load.errors,
    detail: `during the hang p99 ${p99.toFixed(0)} ms, max ${max.toFixed(0)} ms (timeout ${timeoutMs} ms); rejoined once after SIGCONT`,
  };
}

/** Every server down: a fast 503; back up: the coordinator recovers without a restart. */
export async function allServersDown(mesh: ChaosMesh): Promise<FaultRow> {
  await Promise.all(mesh.servers.map((s) => mesh.cluster.kill(s.name)));
  const times: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    // Straight to the coordinator: the client's own retries would hide how fast the coordinator answers.
    const response = await mesh.cluster.request(`${mesh.coordinator}/api/data`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    times.push(performance.now() - t0);
    const body = (await response.json()) as { error?: string };
    expectThat(response.status === 503 && typeof body.error === "string", `expected a 503 JSON error with every server down, got ${response.status}`);
  }
  const slowest = Math.max(...times);
  expectThat(slowest < 1000, `the slowest 503 took ${slowest.toFixed(0)} ms`);
  await Promise.all(mesh.servers.map((s) => mesh.restartServer(s)));
  const client = mesh.client("client1");
  await waitFor(
    "the coordinator to serve again",
    async () => (await client.sendData("after every server came back").catch(() => ({ status: 0 }))).status === 200,
    20_000,
  );
  return {
    fault: "every server down",
    requests: times.length,
    failed: 0,
    detail: `503 JSON in at most ${slowest.toFixed(0)} ms; served again after the restart, coordinator not restarted`,
  };
}

/**
 * A database outage (MariaDB behind a relay that is cut; the mesh's servers and the token stack's KeyServer use it):
 * the servers and the KeyServer answer 503, nothing is acknowledged that was not committed, and after the database
 * is back everything works with no role restarted.
 */
export async function databaseOutage(mesh: Mesh, relay: { cut(): void; restore(): void }, requestApi: () => Promise<{ status: number }>): Promise<FaultRow> {
  const client = mesh.client("client1");
  const before = await countRecords(mesh.db);
  const acks: number[] = [];
  const send = async () => {
    const answer = await client
      .sendData("during the database drill")
      .catch((error: Error) => ({ status: 503, body: { error: error.message } as Record<string, unknown> }));
    if (answer.status === 200) acks.push(answer.body.id as number);
    return answer.status;
  };
  expectThat((await send()) === 200, "a write before the outage failed");
  expectThat((await requestApi()).status === 200, "a token call before the outage failed");

  relay.cut();
  const outage = [await send(), await send(), await send()];
  const tokenDuring = (await requestApi()).status;
  expectThat(
    outage.every((s) => s === 503),
    `writes during the outage answered ${outage.join(", ")}, expected 503`,
  );
  expectThat(tokenDuring === 503, `a token call during the outage answered ${tokenDuring}, expected 503`);

  relay.restore();
  await waitFor("writes to work again", async () => (await send()) === 200, 30_000);
  await waitFor("token calls to work again", async () => (await requestApi()).status === 200, 30_000);
  const { records, lost, duplicates } = await checkRecords(mesh.db, before, acks);
  expectThat(lost === 0 && duplicates === 0 && records === acks.length, `acknowledged ${acks.length}, stored ${records}`);
  return {
    fault: "database outage (MariaDB cut)",
    requests: outage.length + 1,
    failed: 0,
    detail: `writes and token calls got 503 during it; ${acks.length} acknowledged = ${records} stored; no role restarted`,
  };
}

/** Two coordinators: kill -9 one under load; the clients fail over to the other with no failed request. */
export async function coordinatorFailover(mesh: ChaosMesh, second: string, clients: number, perClient: number): Promise<FaultRow> {
  const before = await countRecords(mesh.db);
  let killed = false;
  const load = await loadOn(mesh, clientsFor(mesh, clients, [mesh.coordinator, second]), "write", { perWorker: perClient }, (_, acks) => {
    if (!killed && acks >= (clients * perClient) / 4) {
      killed = true;
      void mesh.cluster.kill(mesh.coordinatorRole);
    }
  });
  const { records, lost, duplicates } = await checkRecords(mesh.db, before, load.acks);
  expectThat(killed, "the load finished before the coordinator was killed");
  expectThat(load.errors === 0, `${load.errors} requests failed, e.g. ${load.errorSamples[0]}`);
  expectThat(lost === 0 && duplicates === 0, `${lost} lost, ${duplicates} duplicated`);
  return {
    fault: "kill -9 one of two coordinators",
    requests: load.requests,
    failed: load.errors,
    detail: `clients failed over; ${records} stored, 0 lost, 0 duplicated`,
  };
}

export function faultTable(rows: FaultRow[]): string[] {
  return renderTable(
    ["fault", "requests", "failed", "detail"],
    rows.map((r) => [r.fault, String(r.requests), String(r.failed), r.detail]),
  );
}

/**
 * Issue 18, H1: a server is killed with SIGKILL under write load, and at once a process holding another valid
 * certificate of our CA (the KeyServer's, which names the same host) binds its port. The swap happens between two
 * bursts of writes, so no forward fails in between and the coordinator still has the server in rotation: exactly
 * when, before, the next forward opened a connection to the impostor, which received the request and acknowledged
 * it. It must receive nothing, no client may get an acknowledgement it gave, and every acknowledged record must be
 * in the store once.
 */
export async function impostorUnderLoad(
  mesh: ChaosMesh,
  clients: number,
  perClient: number,
): Promise<FaultRow & { impostor: { handshakes: number; bytes: number } }> {
  const before = await countRecords(mesh.db);
  const victim = mesh.servers[1]!;
  const writers = clientsFor(mesh, clients);
  const first = await loadOn(mesh, writers, "write", { perWorker: Math.ceil(perClient / 4) }, undefined);
  await mesh.cluster.kill(victim.name);
  await using impostor = await startImpostor(mesh.cluster.pki, "keyserver", victim.port);
  const second = await loadOn(mesh, writers, "write", { perWorker: perClient - Math.ceil(perClient / 4) }, undefined);
  // The coordinator's probes meet the impostor too, and refuse it for its identity.
  await waitFor(
    "the coordinator to refuse the impostor's identity",
    async () => {
      const servers = (await mesh.cluster.health(mesh.coordinator))?.body.servers as { url: string; lastError: string | null }[] | undefined;
      return servers?.find((s) => s.url === victim.url)?.lastError?.includes("ERR_UNEXPECTED_PEER") === true;
    },
    10_000,
  );
  const acks = [...first.acks, ...second.acks];
  const [requests, errors] = [first.requests + second.requests, first.errors + second.errors];
  const { records, lost, duplicates } = await checkRecords(mesh.db, before, acks);
  const falseAcks = acks.filter((id) => id === IMPOSTOR_ID).length;
  expectThat(
    impostor.bytes === 0,
    `the impostor received ${impostor.bytes} bytes past ${impostor.handshakes} handshakes (${falseAcks} writes acknowledged by it)`,
  );
  expectThat(falseAcks === 0, `${falseAcks} acknowledgements came from the impostor`);
  expectThat(errors === 0, `${errors} requests failed, e.g. ${[...first.errorSamples, ...second.errorSamples][0]}`);
  expectThat(
    lost === 0 && duplicates === 0 && records === acks.length,
    `acknowledged ${acks.length}, stored ${records}: ${lost} lost, ${duplicates} duplicated`,
  );
  return {
    fault: "kill -9 a server, another CA identity binds its port, under load",
    requests,
    failed: errors,
    detail: `impostor: ${impostor.handshakes} handshakes, ${impostor.bytes} bytes received; ${falseAcks} false acknowledgements; ${acks.length} acknowledged, ${records} stored, 0 lost, 0 duplicated`,
    impostor: { handshakes: impostor.handshakes, bytes: impostor.bytes },
  };
}

/**
 * Issue 23, finding 8: adding a server host meant restarting every coordinator. Under write load, a coordinator
 * reading --servers-file gets a second server added to the file, then the first removed: no request fails, the new
 * one serves, and every acknowledged record is stored once.
 */
export async function membershipUnderLoad(cluster: Cluster, db: string, clients: number, progress?: LoadOptions["progress"]): Promise<FaultRow> {
  const file = join(cluster.logDir, "servers.txt");
  const [first, second] = await Promise.all([cluster.startServer("member1", 0, ["--db", db]), cluster.startServer("member2", 0, ["--db", db])]);
  writeFileSync(file, `# the coordinator re-reads this file when it changes\n${first}\n`);
  const coordinator = await cluster.startCoordinator("member-coordinator", 0, { file }, ["--health-interval", "300"]);
  const before = await countRecords(db);
  const writers = Array.from({ length: clients }, (_, i) => cluster.client(i % 2 ? "client2" : "client1", [coordinator]));
  const servedBy = new Set<string>();
  let done = false;
  let acked = 0;
  const loading = runLoad({
    concurrency: clients,
    until: () => done,
    progress,
    label: "writes",
    async request(c, i) {
      const { status, body, server } = await writers[c]!.sendData(`membership ${c}-${i}`);
      if (server) servedBy.add(server);
      if (status === 200) acked += 1;
      return status === 200 ? (body.id as number) : `${status} ${JSON.stringify(body)}`;
    },
  });
  // The steps wait on what the load shows, so every change happens while writes are flowing.
  const log = cluster.role("member-coordinator");
  const afterMore = (n: number) => {
    const target = acked + n;
    return () => acked >= target;
  };
  try {
    await waitFor("the first writes", afterMore(50), 30_000);
    writeFileSync(file, `${first}\n${second}\n`);
    await log.waitForLine(new RegExp(`Server ${second.replace(/\./g, "\\.")} is in rotation`), 15_000);
    await waitFor("a write served by the added server", () => servedBy.has(second), 15_000);
    writeFileSync(file, `${second}\n`);
    await log.waitForLine(new RegExp(`Server ${first.replace(/\./g, "\\.")} left the pool`), 15_000);
    await waitFor("writes after the first server left", afterMore(50), 30_000);
  } finally {
    done = true;
  }
  const load = await loading;
  const { records, lost, duplicates } = await checkRecords(db, before, load.acks);
  expectThat(load.errors === 0, `${load.errors} requests failed, e.g. ${load.errorSamples[0]}`);
  expectThat(
    lost === 0 && duplicates === 0 && records === load.acks.length,
    `acknowledged ${load.acks.length}, stored ${records}: ${lost} lost, ${duplicates} duplicated`,
  );
  return {
    fault: "add a server to --servers-file, then remove the first, under load",
    requests: load.requests,
    failed: load.errors,
    detail: `${load.acks.length} acknowledged, ${records} stored, 0 lost, 0 duplicated; served by ${servedBy.size} servers`,
  };
}

/**
 * The noisy neighbour's policy: the repository's, with client2, a batch tenant, held to `noisyInFlight` requests at
 * once, and every other client to `clientInFlight`, however many workers each runs.
 */
export function noisyNeighbourPolicy(dir: string, { noisyInFlight, clientInFlight }: { noisyInFlight: number; clientInFlight: number }): string {
  const policy = JSON.parse(readFileSync(policyPath(), "utf8")) as { limits?: unknown[] };
  policy.limits = [
    { identity: "spiffe://securemesh/client/client2", inFlight: noisyInFlight, comment: "a batch tenant: its share, however many workers it runs" },
    { identity: "spiffe://securemesh/client/*", inFlight: clientInFlight },
    ...(policy.limits ?? []),
  ];
  const path = join(dir, "policy-noisy-neighbour.json");
  writeFileSync(path, JSON.stringify(policy, null, 2));
  return path;
}

/** What one client's load came to, by answer: acknowledged writes, 429s (over its limit), and anything else. */
interface ClientTally {
  run: LoadRun;
  limited: number;
  serverErrors: number;
}

/** `workers` workers of one client writing back to back until `until()` (or for `durationMs`). */
async function writesOf(
  client: MeshClient,
  workers: number,
  limit: { durationMs?: number; until?: () => boolean },
  progress?: LoadOptions["progress"],
): Promise<ClientTally> {
  const tally = { limited: 0, serverErrors: 0 };
  const run = await runLoad({
    concurrency: workers,
    ...limit,
    progress,
    label: `${client.name} writes`,
    async request(w, i) {
      const { status, body } = await client.sendData(`neighbour ${w}-${i}`);
      if (status === 200) return body.id as number;
      if (status === 429) tally.limited += 1;
      if (status >= 500) tally.serverErrors += 1;
      return `${status} ${JSON.stringify(body)}`;
    },
  });
  return { run, ...tally };
}

/**
 * Issue 20, the noisy neighbour: client1 writes with `quiet` workers, alone and then while client2 floods with
 * `noisy`, under a policy that holds every client to a few requests in flight (the coordinator must run with
 * noisyNeighbourPolicy's file). client1 must see 0 errors and a p99 within 2× of its p99 alone; client2 gets 429s
 * (its library waits them out as told, then gives up) and no 5xx; every acknowledged write is stored once.
 */
export async function noisyNeighbour(
  mesh: ChaosMesh,
  options: { quiet: number; noisy: number; durationMs: number; p99Goal?: number },
): Promise<FaultRow & { p99AloneMs: number; p99FloodedMs: number; noisyLimited: number }> {
  const before = await countRecords(mesh.db);
  const quiet = mesh.client("client1");
  const noisy = mesh.client("client2");
  const warm = await writesOf(quiet, options.quiet, { durationMs: 500 }); // connections open and code warm, as in a long run
  const alone = await writesOf(quiet, options.quiet, { durationMs: options.durationMs }, mesh.progress);
  let quietDone = false;
  const [flooded, flood] = await Promise.all([
    writesOf(quiet, options.quiet, { durationMs: options.durationMs }, mesh.progress).finally(() => (quietDone = true)),
    writesOf(noisy, options.noisy, { until: () => quietDone }),
  ]);
  const acks = [...warm.run.acks, ...alone.run.acks, ...flooded.run.acks, ...flood.run.acks];
  const { records, lost, duplicates } = await checkRecords(mesh.db, before, acks);
  const p99AloneMs = alone.run.latencies.summary().p99;
  const p99FloodedMs = flooded.run.latencies.summary().p99;
  const ratio = p99FloodedMs / p99AloneMs;
  const goal = options.p99Goal ?? 2;
  const quietErrors = alone.run.errors + flooded.run.errors;
  expectThat(
    ratio <= goal,
    `client1's p99 was ${p99FloodedMs.toFixed(1)} ms beside the flood, ${ratio.toFixed(2)}× its ${p99AloneMs.toFixed(1)} ms alone (goal: ${goal}×)`,
  );
  expectThat(quietErrors === 0, `client1 saw ${quietErrors} errors, e.g. ${[...alone.run.errorSamples, ...flooded.run.errorSamples][0]}`);
  expectThat(flood.serverErrors === 0, `client2 got ${flood.serverErrors} 5xx answers, e.g. ${flood.run.errorSamples[0]}`);
  // A 429 the library waited out is counted by it; one it gave up on reached the load as an answer.
  const noisyLimited = noisy.limited.count + flood.limited;
  expectThat(noisyLimited > 0, "client2 was never limited: the flood did not reach its limit");
  expectThat(lost === 0 && duplicates === 0, `acknowledged ${acks.length}, stored ${records}: ${lost} lost, ${duplicates} duplicated`);
  return {
    fault: `noisy neighbour: client2 floods with ${options.noisy} workers beside client1's ${options.quiet}`,
    requests: alone.run.requests + flooded.run.requests + flood.run.requests,
    failed: quietErrors,
    detail: `client1 p99 ${p99AloneMs.toFixed(1)} ms alone, ${p99FloodedMs.toFixed(1)} ms flooded (${ratio.toFixed(2)}×); client2 ${flood.run.acks.length} stored, ${noisy.limited.count} 429s waited out, ${flood.limited} given up on, 0 5xx`,
    p99AloneMs,
    p99FloodedMs,
    noisyLimited,
  };
}

export interface BrownOutOptions {
  /** Clients sending at once: even ones write, odd ones read. */
  clients: number;
  /** How long each phase lasts: every server slowed, then every server failing a share of requests. */
  phaseMs: number;
  /** How long each chunk sent to a server waits in the slow phase. */
  delayMs: number;
  /** The share of requests cut after they reached the server in the failing phase. */
  dropShare: number;
  progress?: LoadOptions["progress"];
}

/**
 * Issue 20, brown-out: a TCP relay in front of every server (the harness's, no hook in the servers) slows each of
 * them at once, then makes each fail a share of what it is sent, cutting the connection after the request went on,
 * so a write may be committed and its answer lost. A coordinator of its own reaches the servers only through the
 * relays. No client request may fail, every acknowledged write is stored once, and at no moment are all servers out
 * of the coordinator's rotation (its /health is read every 100 ms throughout).
 */
export async function brownOut(mesh: ChaosMesh, options: BrownOutOptions): Promise<FaultRow> {
  const { cluster, db } = mesh;
  const relays = await Promise.all(mesh.servers.map((s) => TcpRelay.start({ host: "127.0.0.1", port: s.port })));
  try {
    // The mesh's servers, reached only through the relays by a coordinator of this check's own.
    const coordinator = await cluster.startCoordinator(
      "brownout-coordinator",
      0,
      relays.map((r) => `https://127.0.0.1:${r.port}`),
      ["--health-interval", "300"],
    );
    const clients = Array.from({ length: options.clients }, (_, i) => cluster.client(i % 2 ? "client2" : "client1", [coordinator]));
    const before = await countRecords(db);
    let watching = true;
    const seen = { samples: 0, allOut: 0, minUp: Infinity, panic: 0 };
    const watch = (async () => {
      while (watching) {
        const body = (await cluster.health(coordinator))?.body;
        if (body) {
          const up = body.serversUp as number;
          seen.samples += 1;
          seen.minUp = Math.min(seen.minUp, up);
          if (up === 0) seen.allOut += 1;
          if (body.panic === true) seen.panic += 1;
        }
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    })();
    let phase = 0;
    const load = await runLoad({
      concurrency: options.clients,
      durationMs: 2 * options.phaseMs,
      progress: options.progress ?? mesh.progress,
      label: "brown-out",
      during(elapsed) {
        const next = elapsed < options.phaseMs ? 1 : 2;
        if (next === phase) return;
        phase = next;
        for (const relay of relays) relay.setFaults(phase === 1 ? { delayMs: options.delayMs, dropShare: 0 } : { delayMs: 0, dropShare: options.dropShare });
      },
      async request(c, i) {
        const client = clients[c]!;
        if (c % 2 === 1) return (await client.readCachedData()).generation >= 0;
        const { status, body } = await client.sendData(`brown-out ${c}-${i}`);
        return status === 200 ? (body.id as number) : `${status} ${JSON.stringify(body)}`;
      },
    });
    for (const relay of relays) relay.setFaults({ delayMs: 0, dropShare: 0 });
    watching = false;
    await watch;
    const slow = latenciesStartedBetween(load, 0, options.phaseMs);
    const failing = latenciesStartedBetween(load, options.phaseMs, 2 * options.phaseMs);
    const log = cluster.role("brownout-coordinator").lines;
    const count = (pattern: RegExp) => log.filter((l) => pattern.test(l)).length;
    const [ejections, refusedAtCap, panics, budgetSpent, failedAttempts, answered503] = [
      / ejected for /,
      / not ejected after |; kept in rotation: /,
      /^Panic routing: /,
      /^Retry budget spent/,
      /^Server \S+ failed: /,
      /" 503 - /,
    ].map(count);
    const cut = relays.reduce((sum, r) => sum + r.dropped, 0);
    const { records, lost, duplicates } = await checkRecords(db, before, load.acks);
    expectThat(load.errors === 0, `${load.errors} of ${load.requests} requests failed, e.g. ${load.errorSamples[0]}`);
    expectThat(seen.samples > 0 && seen.allOut === 0, `every server was out of rotation in ${seen.allOut} of ${seen.samples} samples`);
    expectThat(
      lost === 0 && duplicates === 0 && records === load.acks.length,
      `acknowledged ${load.acks.length}, stored ${records}: ${lost} lost, ${duplicates} duplicated`,
    );
    return {
      fault: `brown-out: every server slowed ${options.delayMs} ms, then failing ${Math.round(options.dropShare * 100)} % of requests`,
      requests: load.requests,
      failed: load.errors,
      detail:
        `p99 ${percentile(slow, 99).toFixed(0)} ms slowed, ${percentile(failing, 99).toFixed(0)} ms failing; ${cut} cut by the relays, ${failedAttempts} failed attempts seen, ` +
        `${answered503} coordinator 503s (clients retried), ` +
        `${ejections} ejections (${refusedAtCap} refused at the cap), panic ${panics}×, retry budget spent ${budgetSpent}×; ` +
        `in rotation never below ${seen.minUp} of ${relays.length} (${seen.samples} samples); ${load.acks.length} acknowledged = ${records} stored`,
    };
  } finally {
    await cluster.kill("brownout-coordinator").catch(() => {});
    await Promise.all(relays.map((r) => r.close()));
  }
}
