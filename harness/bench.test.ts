// A short bench on real processes: every case runs, nothing fails, and the report, table and chart hold its figures.
import { expect, setDefaultTimeout, test } from "bun:test";
import { join } from "node:path";
import { runPython } from "../shared/testing/python.ts";
import { runBench, type BenchReport } from "./bench.ts";
import { BENCH_GOAL_MISSED, benchExitStatus, benchTable, goalVerdict, renderChart, renderSweepCharts } from "./bench-report.ts";
import { freePort, temporaryCluster } from "./fixtures/index.ts";
import { Progress } from "./progress.ts";

setDefaultTimeout(180_000);

test("bench: every case runs with no errors, and the table, JSON and chart carry the figures", async () => {
  await using cluster = await temporaryCluster({ label: "bench" });
  const dir = cluster.logDir;
  cluster.addEnv({ DATABASE_URL: join(dir, "records.db") });
  const ports = { server1: 0, server2: 0, coordinator: 0, keyserver: 0, secureproxy: 0, marketplace: 0, haproxy: await freePort(), coordinatorAdmin: 0 };
  const lines: string[] = [];
  const progress = new Progress({ stream: { isTTY: false, write: (text: string) => lines.push(text) } });
  const report: BenchReport = await runBench({
    cluster,
    ports,
    db: join(dir, "records.db"),
    tokenDb: join(dir, "tokens.db"),
    progress,
    durationS: 1,
    concurrency: 4,
    storeSizes: [200, 2000],
    storeReads: 20,
    sweepMs: 300,
  });

  const ids = report.results.map((r) => r.id);
  expect(ids).toEqual([
    "a-read",
    "b-read",
    "b-read-nolog",
    "b1-read",
    "b0-read",
    "b0g-read",
    "c-read",
    "c-read-log",
    "h-read-deno",
    "a-write",
    "b-write",
    "b-write-nolog",
    "b1-write",
    "b0-write",
    "b0g-write",
    "c-write",
    "c-write-log",
    "h-write-deno",
    "m-mixed",
    "f-uncached",
    "d-encrypt",
    "d-encrypt-python",
    "d-decrypt",
    "d-decrypt-python",
    "e-releases",
    "e-rsa-bound",
    "e-releases-ecdh",
    "e-ecdh-bound",
    "h-releases-deno",
    "h-rsa-bun",
    "h-rsa-deno",
    "g-failover",
  ]);
  for (const result of report.results) {
    expect({ id: result.id, errors: result.errors, samples: result.errorSamples }).toEqual({ id: result.id, errors: 0, samples: [] });
    expect(result.rate).toBeGreaterThan(0);
    expect(result.count).toBeGreaterThan(0);
    if (result.latency) expect(result.latency.p50).toBeLessThanOrEqual(result.latency.p99);
  }
  expect(report.options.records).toBeGreaterThanOrEqual(1000);
  // The proxies' CPU per request is measured, the mixed case counts its reads' cache hits.
  for (const id of ["b-read", "c-read", "b-write-nolog", "c-write-log", "b0g-read", "b0g-write"])
    expect(report.results.find((r) => r.id === id)?.cpuMsPerRequest).toBeGreaterThan(0);
  const mixed = report.results.find((r) => r.id === "m-mixed")!.mixed!;
  expect(mixed.writes).toBeGreaterThan(0);
  expect(mixed.hitRatio).toBeGreaterThan(0);
  // Every sweep point and store size ran, on both databases; every role's memory was read.
  expect(report.sweeps.concurrency.map((p) => `${p.target}@${p.concurrency}`)).toHaveLength(12);
  expect(report.sweeps.servers.map((p) => `${p.servers} ${p.route}`)).toHaveLength(6);
  expect(report.storeSizes.points.map((p) => `${p.db}@${p.records}`)).toEqual(["sqlite@200", "sqlite@2000", "MariaDB@200", "MariaDB@2000"]);
  expect(report.storeSizes.memory.map((m) => m.db)).toEqual(["sqlite", "MariaDB"]);
  for (const role of ["server", "coordinator", "keyserver", "secureproxy", "marketplace", "client"])
    expect(report.memory.some((m) => m.role === role && m.rssMiB > 5)).toBe(true);
  // An idle role's file-backed share (the runtime's executable) is read, and is a part of its RSS.
  expect(report.memory.filter((m) => m.role !== "client").every((m) => m.fileMiB !== null && m.fileMiB > 1 && m.fileMiB < m.rssMiB)).toBe(true);
  for (const label of [
    "both logging",
    "neither logging",
    "read p50 under 95/5",
    "uncached read p50 at 2,000 / at 200 records, MariaDB",
    "idle RSS, server1 on bun",
  ]) {
    expect(report.comparisons.some((c) => c.label.includes(label))).toBe(true);
  }
  expect(report.versions.haproxy).toMatch(/^\d+\.\d+/);
  expect(report.machine.cpus).toBeGreaterThan(0);
  expect(report.comparisons.find((c) => c.label.startsWith("errors while a server is killed"))?.met).toBe(true);
  // Issue 22's goals are each measured with a verdict; nothing was skipped on a machine with every part.
  for (const label of [
    "CPU per request, cached read: coordinator (1 process, access log) / bare Bun proxy",
    "CPU per request, POST /api/data: coordinator (2 workers, access log) / bare Bun proxy",
    "throughput, POST /api/data, both logging: coordinator (1 process) / HAProxy (2 threads)",
    "p99 at concurrency 64, cached read: coordinator - HAProxy",
    "Deno / Bun throughput, KeyServer token releases",
    "idle RSS, deno-keyserver on deno",
  ])
    expect(report.comparisons.find((c) => c.label === label)?.met).toBeBoolean();
  expect(report.skipped).toEqual([]);
  // The gap to the floor split in two: the TLS gate's relay, and the coordinator's own work above it.
  for (const what of ["cached read", "POST /api/data"]) {
    expect(report.comparisons.find((c) => c.label === `CPU per request, ${what}: bare proxy behind the TLS gate / bare proxy`)?.value).toBeGreaterThan(0);
    expect(
      report.comparisons.find((c) => c.label === `CPU per request, ${what}: coordinator (1 process, access log) / bare proxy behind the TLS gate`)?.value,
    ).toBeGreaterThan(0);
  }
  // Off a TTY, progress is plain lines with no escapes.
  expect(lines.some((l) => l.includes("round 1/1 b-read"))).toBe(true);
  expect(lines.join("")).not.toContain("\x1b");

  const table = benchTable(report).join("\n");
  for (const result of report.results) expect(table).toContain(result.label);
  expect(table).toMatch(/coordinator \/ HAProxy throughput, cached read, both logging: \d+\.\d\dx/);
  expect(table).toContain("Sweep: concurrency");
  expect(table).toMatch(/Deno \/ Bun throughput, coordinator \(1 process\) \+ servers, cached read: \d+\.\d\dx/);
  expect(table).toContain(goalVerdict(report));
  expect(table).not.toContain("Skipped");
  const charts = renderSweepCharts(report);
  expect(Object.keys(charts).sort()).toEqual(["bench-concurrency-p99.svg", "bench-concurrency.svg", "bench-servers.svg", "bench-store-size.svg"]);
  for (const svg of Object.values(charts)) {
    expect(
      await runPython("import sys, xml.etree.ElementTree as E; print(len(E.fromstring(sys.stdin.read()).findall('{http://www.w3.org/2000/svg}path')))", svg),
    ).not.toBe("0");
  }
  const chart = renderChart(report);
  expect(
    await runPython("import sys, xml.etree.ElementTree as E; print(len(E.fromstring(sys.stdin.read()).findall('{http://www.w3.org/2000/svg}rect')))", chart),
  ).not.toBe("0");
  expect(chart).toContain(Math.round(report.results[0]!.rate).toLocaleString("en"));
});

test("bench: with HAProxy, Python and MariaDB missing, it says why, skips their cases and measures the rest", async () => {
  await using cluster = await temporaryCluster({ label: "bench-parts" });
  const dir = cluster.logDir;
  cluster.addEnv({ DATABASE_URL: join(dir, "records.db") });
  const ports = { server1: 0, server2: 0, coordinator: 0, keyserver: 0, secureproxy: 0, marketplace: 0, haproxy: await freePort(), coordinatorAdmin: 0 };
  const lines: string[] = [];
  const report = await runBench({
    cluster,
    ports,
    db: join(dir, "records.db"),
    tokenDb: join(dir, "tokens.db"),
    progress: new Progress({ stream: { isTTY: false, write: (text: string) => lines.push(text) } }),
    durationS: 1,
    concurrency: 2,
    only: ["b0-read", "c-read", "d-encrypt", "e-rsa-bound", "s-concurrency", "s-store"],
    storeSizes: [100],
    storeReads: 5,
    sweepMs: 200,
    // Nothing answers on port 1; the password must never reach the report.
    parts: { haproxy: join(dir, "no-haproxy"), python: join(dir, "no-python3"), mysqlUrl: "mysql://root:s3cret@127.0.0.1:1/test" },
  });
  expect(report.skipped.map((s) => s.part)).toEqual(["haproxy", "python", "mariadb"]);
  const reasons = Object.fromEntries(report.skipped.map((s) => [s.part, s.reason]));
  expect(reasons.haproxy).toContain("no-haproxy");
  expect(reasons.python).toContain("no-python3");
  expect(reasons.mariadb).toBe("MariaDB at 127.0.0.1:1 did not answer (ECONNREFUSED)");
  expect(JSON.stringify(report)).not.toContain("s3cret");
  // What needs no missing part still ran, with no errors.
  expect(report.results.map((r) => [r.id, r.errors])).toEqual([
    ["b0-read", 0],
    ["d-encrypt", 0],
  ]);
  expect([...new Set(report.sweeps.concurrency.map((p) => p.target))]).toEqual(["direct", "coordinator"]);
  expect(report.storeSizes.points.map((p) => `${p.db}@${p.records}`)).toEqual(["sqlite@100"]);
  expect(report.versions.haproxy).toBe("not run");
  const table = benchTable(report).join("\n");
  expect(table).toContain("Skipped (every other figure above was measured):");
  expect(table).toContain("  mariadb: MariaDB at 127.0.0.1:1 did not answer (ECONNREFUSED); lost the MariaDB rows");
  expect(table).toMatch(/3 part\(s\) skipped/);
  expect(benchExitStatus(report)).toBe(BENCH_GOAL_MISSED);
  expect(lines.some((l) => l.startsWith("bench: skipping python:"))).toBe(true);
});
