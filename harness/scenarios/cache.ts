// Caching of get_data(): miss, hit, write, invalidation, and no stale read from a server hung through it all.
import type { MeshClient } from "../../shared/request-path/mesh-client.ts";
import { expectThat, waitUntilInRotation, type Cluster } from "../fixtures/index.ts";
import { seedRecords, startScenarioMesh, successBodies, url, type Scenario } from "../scenario.ts";

const SEEDED_RECORDS = 1000;
const TIMED_READS = 200;

/** Reads through the coordinator until each server has answered once; round-robin makes that two reads. */
async function readBoth(client: MeshClient, expected: "hit" | "miss", summary: string[]) {
  const answers = [await client.readCachedData(), await client.readCachedData()];
  for (const a of answers) {
    summary.push(
      `read via coordinator: server ${a.server} ${a.cached ? `hit (age ${(a.ageMs / 1000).toFixed(1)} s)` : "miss"}, ${a.snapshot.total} records, generation ${a.generation}`,
    );
  }
  expectThat(new Set(answers.map((a) => a.server)).size === 2, `expected both servers to answer, got ${answers.map((a) => a.server)}`);
  expectThat(
    answers.every((a) => a.cached === (expected === "hit")),
    `expected two ${expected}es, got ${answers.map((a) => (a.cached ? "hit" : "miss"))}`,
  );
  return answers;
}

async function clientSends(cluster: Cluster, coordinator: string, message: string, summary: string[]) {
  const run = await cluster.runClient("client1", ["--message", message, "--coordinator", coordinator]);
  expectThat(run.exitCode === 0, `client1 failed:\n${run.lines.join("\n")}`);
  summary.push(...run.lines);
  return successBodies(run.lines)[0]!;
}

/** Median milliseconds of `count` sequential reads. */
async function timeReads(client: MeshClient, refresh: boolean, count: number): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < count; i++) {
    const started = performance.now();
    const answer = await client.readCachedData(refresh);
    times.push(performance.now() - started);
    expectThat(answer.cached === !refresh, `expected ${refresh ? "uncached" : "cached"} reads`);
  }
  return times.sort((a, b) => a - b)[Math.floor(times.length / 2)]!;
}

export const cache: Scenario = {
  name: "cache",
  description: "get_data() caching: miss, hit, write, invalidation, and a server hung through a write",
  async run(ctx) {
    const { cluster, ports, step, summary, db } = ctx;
    const { coordinator } = await startScenarioMesh(ctx, ["--timeout", "1000", "--health-interval", "500"]);
    const client = cluster.client("client1", [coordinator]);

    step("first reads miss on each server, the next ones hit");
    await readBoth(client, "miss", summary);
    await readBoth(client, "hit", summary);

    step("client1 checks the cache, then writes");
    const written = await clientSends(cluster, coordinator, "written after a cached read", summary);

    step("the coordinator invalidates both servers");
    const report = await client.invalidateCache();
    summary.push(`invalidate: ${JSON.stringify(report.body)}`);
    expectThat(report.status === 200 && report.body.complete === true, `invalidation incomplete: ${JSON.stringify(report.body)}`);

    step("reads miss again, see the write, then hit");
    const fresh = await readBoth(client, "miss", summary);
    expectThat(
      fresh.every((a) => a.snapshot.latest.some((r) => r.id === written.id)),
      "a read after the write did not include it",
    );
    await readBoth(client, "hit", summary);

    step(`partition: server 2 is stopped (SIGSTOP), client1 writes and invalidates, server 2 resumes`);
    cluster.role("server2").signal("SIGSTOP");
    const hidden = await clientSends(cluster, coordinator, "written while server 2 was hung", summary);
    const partial = await client.invalidateCache();
    summary.push(`invalidate during the partition: ${JSON.stringify(partial.body)}`);
    const failedServers = (partial.body.failed as { server: string }[]).map((f) => f.server);
    expectThat(failedServers.includes(url(ports.server2)), `the report should name server 2 as failed: ${JSON.stringify(partial.body)}`);
    cluster.role("server2").signal("SIGCONT");
    await waitUntilInRotation(cluster, coordinator, url(ports.server2));

    const direct = cluster.client("client1", [url(ports.server2)], { direct: true });
    const afterPartition = await direct.readCachedData();
    summary.push(`read from server 2 after SIGCONT: ${afterPartition.cached ? "hit" : "miss"}, newest #${afterPartition.snapshot.latest[0]?.id}`);
    expectThat(
      afterPartition.snapshot.latest.some((r) => r.id === hidden.id),
      `server 2 served a view without record ${hidden.id}: stale read after partition`,
    );
    await cluster.role("server2").waitForLine(/Cache miss/);

    step(`seeding ${SEEDED_RECORDS} records, then timing ${TIMED_READS} uncached and ${TIMED_READS} cached reads, interleaved`);
    await seedRecords(db, cluster.pki, SEEDED_RECORDS);
    await client.readCachedData(true);
    let uncached = 0;
    let cached = 0;
    const rounds = 10;
    for (let r = 0; r < rounds; r++) {
      uncached += await timeReads(client, true, TIMED_READS / rounds);
      await client.readCachedData(); // one fill for the cached block
      cached += await timeReads(client, false, TIMED_READS / rounds);
    }
    const ratio = uncached / cached;
    summary.push(
      `median read through the coordinator over ${SEEDED_RECORDS}+ records: uncached ${(uncached / rounds).toFixed(2)} ms, cached ${(cached / rounds).toFixed(2)} ms (${ratio.toFixed(2)}x)`,
    );
    expectThat(ratio > 1, `a cached read should be cheaper than an uncached one (ratio ${ratio.toFixed(2)})`);
  },
};
