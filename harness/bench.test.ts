// A short bench on real processes: every case runs, nothing fails, and the report, table and chart hold its figures.
import { expect, setDefaultTimeout, test } from "bun:test";
import { createServer } from "node:net";
import { join } from "node:path";
import { runPython } from "../shared/testing/python.ts";
import { runBench, type BenchReport } from "./bench.ts";
import { benchTable, renderChart } from "./bench-report.ts";
import { temporaryCluster } from "./fixtures/index.ts";
import { Progress } from "./progress.ts";

setDefaultTimeout(180_000);

/** HAProxy cannot be given port 0, so it gets one the kernel just handed out. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

test("bench: every case runs with no errors, and the table, JSON and chart carry the figures", async () => {
  await using cluster = await temporaryCluster({ label: "bench" });
  const dir = cluster.logDir;
  cluster.addEnv({ DATABASE_URL: join(dir, "records.db") });
  const ports = { server1: 0, server2: 0, coordinator: 0, keyserver: 0, secureproxy: 0, marketplace: 0, haproxy: await freePort(), coordinatorAdmin: 0 };
  const lines: string[] = [];
  const progress = new Progress({ stream: { isTTY: false, write: (text: string) => lines.push(text) } });
  const report: BenchReport = await runBench({ cluster, ports, db: join(dir, "records.db"), tokenDb: join(dir, "tokens.db"), progress, durationS: 1, concurrency: 4 });

  const ids = report.results.map((r) => r.id);
  expect(ids).toEqual(["a-read", "b-read", "c-read", "h-read-deno", "a-write", "b-write", "c-write", "h-write-deno", "f-uncached", "d-encrypt", "d-encrypt-python", "d-decrypt", "d-decrypt-python", "e-releases", "e-rsa-bound", "h-releases-deno", "g-failover"]);
  for (const result of report.results) {
    expect({ id: result.id, errors: result.errors, samples: result.errorSamples }).toEqual({ id: result.id, errors: 0, samples: [] });
    expect(result.rate).toBeGreaterThan(0);
    expect(result.count).toBeGreaterThan(0);
    if (result.latency) expect(result.latency.p50).toBeLessThanOrEqual(result.latency.p99);
  }
  expect(report.options.records).toBeGreaterThanOrEqual(1000);
  expect(report.versions.haproxy).toMatch(/^\d+\.\d+/);
  expect(report.machine.cpus).toBeGreaterThan(0);
  expect(report.comparisons.find((c) => c.label.startsWith("errors while a server is killed"))?.met).toBe(true);
  // Off a TTY, progress is plain lines with no escapes.
  expect(lines.some((l) => l.includes("round 1/1 b-read"))).toBe(true);
  expect(lines.join("")).not.toContain("\x1b");

  const table = benchTable(report).join("\n");
  for (const result of report.results) expect(table).toContain(result.label);
  expect(table).toMatch(/coordinator \/ HAProxy throughput, cached read: \d+\.\d\dx/);
  expect(table).toMatch(/Deno \/ Bun throughput, coordinator \+ servers, cached read: \d+\.\d\dx/);
  const chart = renderChart(report);
  expect(await runPython("import sys, xml.etree.ElementTree as E; print(len(E.fromstring(sys.stdin.read()).findall('{http://www.w3.org/2000/svg}rect')))", chart)).not.toBe("0");
  expect(chart).toContain(Math.round(report.results[0]!.rate).toLocaleString("en"));
});
