// bun harness <scenario>|bench|screenshots: runs real role processes and exits non-zero when something fails.
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { parseArgs } from "node:util";
import { REPO_ROOT, displayPath, pkiDir } from "../shared/platform/config.ts";
import { runBench } from "./bench.ts";
import { benchExitStatus, benchTable, goalVerdict, renderChart, renderSweepCharts } from "./bench-report.ts";
import { Cluster, ExpectationFailed, ROLE_RUNTIMES, type RoleRuntime } from "./cluster.ts";
import { Progress } from "./progress.ts";
import { runPkiSh } from "./fixtures/index.ts";
import { seedPorts, startScenarioMesh, type Ports, type Scenario } from "./scenario.ts";
import { recordScenario, SCREENSHOT_DIR, statusPageScreenshot } from "./screenshots.ts";
import { cache } from "./scenarios/cache.ts";
import { chaos } from "./scenarios/chaos.ts";
import { demo } from "./scenarios/demo.ts";
import { failover } from "./scenarios/failover.ts";
import { multihost } from "./scenarios/multihost.ts";
import { security } from "./scenarios/security.ts";
import { tokens } from "./scenarios/tokens.ts";

const SCENARIOS: Scenario[] = [demo, failover, cache, tokens, security, chaos, multihost];
/** The scenarios whose pictures the README shows. */
const DOCUMENTED = [demo, failover, cache, tokens, security];

const USAGE = `
Usage: bun harness <scenario> [--record] [options]
       bun harness bench [--duration S] [--concurrency C] [--json] [--out DIR] [--only IDS]
       bun harness screenshots

Scenarios:
${SCENARIOS.map((s) => `  ${s.name.padEnd(12)} ${s.description}`).join("\n")}
  bench        coordinator vs HAProxy vs direct, Fernet vs Python, KeyServer vs its RSA bound, cache, failover
  screenshots  runs ${DOCUMENTED.map((s) => s.name).join(", ")} with --record, and shoots the status page

Options:
  --base-port N      shift the seed's ports (servers 5001, 5002, coordinator 8000) by N-5000 (default 5000)
  --db URL           record store for the servers and token store for the KeyServer,
                     e.g. mysql://root@127.0.0.1:3306/test (default: fresh sqlite files in the log folder)
  --runtime R        bun, deno or mixed: what runs the roles (mixed alternates, Deno first); the harness
                     itself runs on Bun (default bun)
  --record           draw the scenario's logs as docs/screenshots/<scenario>.svg
  --short            multihost: one fault of each kind under a small load (a few minutes), as bun test runs it
  --duration S       bench: seconds per case, split into interleaved rounds (default 10)
  --concurrency C    bench: concurrent workers (default 16)
  --json             bench: print the results JSON instead of the table
  --out DIR          bench: write DIR/bench/results.json and DIR/docs/bench.svg (default: the repository)
  --only IDS         bench: run only the cases whose id starts with one of these (comma-separated, e.g. e- for the
                     KeyServer cases); the results then go to bench/partial.json and no chart is drawn
  -h, --help         show this help

Exit status: 0 when the run passed (bench: and every goal was measured and met), 1 when it failed, 2 on bad
arguments, and for the bench 3 when it ran but a goal was NOT met or a part (HAProxy, Python, Deno, MariaDB) was
skipped; the table says which.

Logs go to harness/logs/<scenario>/<role>.log ($HARNESS_LOGS replaces harness/logs, so a test's run leaves yours alone).
`;

interface RunOptions {
  basePort: number;
  db?: string;
  record: boolean;
  short?: boolean;
  runtime: RoleRuntime;
}

async function ensurePki(dir: string): Promise<void> {
  if (existsSync(join(dir, "ca_cert.pem"))) return;
  console.log(`harness: no PKI in ${displayPath(dir)}; running pki.sh`);
  await runPkiSh(dir);
}

/** A fresh log folder, PKI and cluster for one run; `body` runs against it, and every process is stopped after. */
async function withCluster(
  name: string,
  options: RunOptions & { ownPki?: boolean },
  body: (ctx: { cluster: Cluster; ports: Ports; db: string; tokenDb: string }) => Promise<void>,
): Promise<{ ok: boolean; cluster: Cluster }> {
  const logDir = join(process.env.HARNESS_LOGS ?? join(REPO_ROOT, "harness", "logs"), name);
  rmSync(logDir, { recursive: true, force: true });
  const pki = options.ownPki ? join(logDir, "pki") : pkiDir();
  await ensurePki(pki);
  const db = options.db ?? join(logDir, "records.db");
  const tokenDb = options.db ?? join(logDir, "tokens.db");
  // Recorded runs keep their colours for the pictures; other runs write plain logs.
  const colour: Record<string, string> = options.record ? { FORCE_COLOR: "1" } : { NO_COLOR: "1" };
  const cluster = new Cluster({ logDir, pki, runtime: options.runtime, env: { DATABASE_URL: db, ...colour } });
  if (options.runtime !== "bun") console.log(`harness: roles run on ${options.runtime === "mixed" ? "Deno and Bun, alternating" : "Deno"}`);
  const interrupt = async () => {
    console.error("\nharness: interrupted; stopping every role");
    await cluster.stop();
    process.exit(130);
  };
  process.once("SIGINT", interrupt);
  process.once("SIGTERM", interrupt);
  try {
    await body({ cluster, ports: seedPorts(options.basePort), db, tokenDb });
    return { ok: true, cluster };
  } catch (error) {
    console.error(`\nharness: ${name} FAILED: ${error instanceof ExpectationFailed ? error.message : (error as Error).stack}`);
    console.error(`logs: ${logDir}`);
    return { ok: false, cluster };
  } finally {
    await cluster.stop();
    process.off("SIGINT", interrupt);
    process.off("SIGTERM", interrupt);
  }
}

async function runScenario(scenario: Scenario, options: RunOptions): Promise<boolean> {
  const started = performance.now();
  const summary: string[] = [];
  console.log(`harness: ${scenario.name} — ${scenario.description}`);
  const { ok, cluster } = await withCluster(scenario.name, { ...options, ownPki: scenario.ownPki }, ({ cluster, ports, db, tokenDb }) =>
    scenario.run({ cluster, ports, db, tokenDb, summary, short: options.short, step: (m) => console.log(`  • ${m}`) }),
  );
  if (!ok) return false;
  console.log("\nSummary:");
  for (const line of summary) console.log(`  ${line}`);
  if (options.record) console.log(`\nharness: drew ${relative(REPO_ROOT, recordScenario(cluster, scenario.name))}`);
  console.log(`\nharness: ${scenario.name} passed in ${((performance.now() - started) / 1000).toFixed(1)} s; logs in harness/logs/${scenario.name}/`);
  return true;
}

async function bench(options: RunOptions & { durationS: number; concurrency: number; json: boolean; out: string; only: string[] }): Promise<number> {
  const progress = new Progress({ stream: options.json ? process.stderr : process.stdout });
  let report: Awaited<ReturnType<typeof runBench>> | undefined;
  const { ok } = await withCluster("bench", options, async ({ cluster, ports, db, tokenDb }) => {
    report = await runBench({ cluster, ports, db, tokenDb, progress, durationS: options.durationS, concurrency: options.concurrency, only: options.only });
  });
  progress.clear();
  if (!ok || !report) return 1;
  // A partial run (--only) must not overwrite the full run's results and chart that the README quotes.
  const partial = options.only.length > 0;
  const resultsFile = join(options.out, "bench", partial ? "partial.json" : "results.json");
  mkdirSync(join(options.out, "bench"), { recursive: true });
  writeFileSync(resultsFile, JSON.stringify(report, null, 2) + "\n");
  const written = [relative(REPO_ROOT, resultsFile)];
  if (!partial) {
    mkdirSync(join(options.out, "docs"), { recursive: true });
    const charts: Record<string, string> = { "bench.svg": renderChart(report), ...renderSweepCharts(report) };
    for (const [name, svg] of Object.entries(charts)) {
      writeFileSync(join(options.out, "docs", name), svg);
      written.push(relative(REPO_ROOT, join(options.out, "docs", name)));
    }
  }
  if (options.json) {
    console.log(JSON.stringify(report, null, 2));
  } else {
    console.log("");
    for (const line of benchTable(report)) console.log(line);
    console.log(`\nharness: wrote ${written.join(" and ")} in ${progress.elapsed()}`);
  }
  if (options.json) console.error(goalVerdict(report));
  return benchExitStatus(report);
}

async function screenshots(options: RunOptions): Promise<boolean> {
  for (const scenario of DOCUMENTED) {
    if (!(await runScenario(scenario, { ...options, record: true }))) return false;
  }
  console.log("harness: the status page in Chromium, with server 2 killed");
  const file = join(SCREENSHOT_DIR, "status-page.png");
  const { ok } = await withCluster("status-page", options, async ({ cluster, ports, db, tokenDb }) => {
    const ctx = { cluster, ports, db, tokenDb, summary: [], step: (m: string) => console.log(`  • ${m}`) };
    const { coordinator } = await startScenarioMesh(ctx, ["--admin-port", "0", "--health-interval", "1000"]);
    const client = cluster.client("client1", [coordinator]);
    for (let i = 0; i < 6; i++) await client.sendData(`status page message ${i}`);
    for (let i = 0; i < 6; i++) await client.readCachedData();
    const shownAfterMs = await statusPageScreenshot(
      cluster,
      await cluster.adminUrl("coordinator"),
      { role: "server2", url: `https://127.0.0.1:${ports.server2}` },
      file,
    );
    console.log(`  • the page showed server 2 down ${shownAfterMs.toFixed(0)} ms after kill -9; saved ${relative(REPO_ROOT, file)}`);
  });
  return ok;
}

function positiveNumber(value: string | undefined, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new ExpectationFailed(`${name} must be a positive number`);
  return n;
}

/** The harness's command line, or the error parseArgs gave for it. */
function parseHarnessArgs(args: string[]) {
  try {
    return parseArgs({
      args,
      allowPositionals: true,
      options: {
        "base-port": { type: "string" },
        db: { type: "string" },
        record: { type: "boolean" },
        short: { type: "boolean" },
        help: { type: "boolean", short: "h" },
        runtime: { type: "string" },
        duration: { type: "string" },
        concurrency: { type: "string" },
        json: { type: "boolean" },
        out: { type: "string" },
        only: { type: "string" },
      },
    });
  } catch (error) {
    return error as Error;
  }
}

async function main(): Promise<number> {
  const parsed = parseHarnessArgs(Bun.argv.slice(2));
  if (parsed instanceof Error) {
    console.error(`harness: ${parsed.message} (see --help)`);
    return 2;
  }
  const { values, positionals } = parsed;
  const command = positionals[0];
  const scenario = SCENARIOS.find((s) => s.name === command);
  if (values.help || !(scenario || command === "bench" || command === "screenshots")) {
    if (!values.help) console.error(command ? `harness: unknown scenario '${command}'` : "harness: name a scenario");
    console.log(USAGE.trim());
    return values.help ? 0 : 2;
  }
  const basePort = Number(values["base-port"] ?? 5000);
  if (!Number.isInteger(basePort) || basePort < 1 || basePort + 4901 > 65535) {
    console.error("harness: --base-port must be a whole number from 1 to 60634");
    return 2;
  }
  const runtime = (values.runtime ?? "bun") as RoleRuntime;
  if (!ROLE_RUNTIMES.includes(runtime)) {
    console.error(`harness: --runtime must be ${ROLE_RUNTIMES.join(", ")}, not '${values.runtime}'`);
    return 2;
  }
  const options: RunOptions = { basePort, db: values.db, record: Boolean(values.record), short: Boolean(values.short), runtime };
  if (scenario) return (await runScenario(scenario, options)) ? 0 : 1;
  if (command === "screenshots") return (await screenshots(options)) ? 0 : 1;
  let durationS: number;
  let concurrency: number;
  try {
    durationS = positiveNumber(values.duration, "--duration", 10);
    concurrency = Math.round(positiveNumber(values.concurrency, "--concurrency", 16));
  } catch (error) {
    console.error(`harness: ${(error as Error).message}`);
    return 2;
  }
  return await bench({
    ...options,
    durationS,
    concurrency,
    json: Boolean(values.json),
    out: values.out ?? REPO_ROOT,
    only: (values.only ?? "")
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean),
  });
}

process.exit(await main());
