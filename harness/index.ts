// bun harness <scenario>: runs a scenario against real role processes and exits non-zero when it fails.
import { existsSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { REPO_ROOT, pkiDir } from "../shared/config.ts";
import { Cluster, ExpectationFailed } from "./cluster.ts";
import { seedPorts, type Scenario } from "./scenario.ts";
import { cache } from "./scenarios/cache.ts";
import { demo } from "./scenarios/demo.ts";
import { chaos } from "./scenarios/chaos.ts";
import { failover } from "./scenarios/failover.ts";
import { security } from "./scenarios/security.ts";
import { tokens } from "./scenarios/tokens.ts";

const SCENARIOS: Scenario[] = [demo, failover, cache, tokens, security, chaos];

const USAGE = `
Usage: bun harness <scenario> [options]

Scenarios:
${SCENARIOS.map((s) => `  ${s.name.padEnd(10)} ${s.description}`).join("\n")}

Options:
  --base-port N   shift the seed's ports (servers 5001, 5002, coordinator 8000) by N-5000 (default 5000)
  --db URL        record store for the servers and token store for the KeyServer,
                  e.g. mysql://root@127.0.0.1:3306/test (default: fresh sqlite files in the log folder)
  -h, --help      show this help

Logs go to harness/logs/<scenario>/<role>.log.
`;

async function ensurePki(dir: string): Promise<void> {
  if (existsSync(join(dir, "ca_cert.pem"))) return;
  console.log(`harness: no PKI in ${dir}; running pki.sh`);
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh")], { env: { ...process.env, PKI_DIR: dir }, stdout: "ignore", stderr: "inherit" });
  if ((await proc.exited) !== 0) throw new ExpectationFailed("pki.sh failed");
}

async function main(): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({ args: Bun.argv.slice(2), allowPositionals: true, options: { "base-port": { type: "string" }, db: { type: "string" }, help: { type: "boolean", short: "h" } } });
  } catch (error) {
    console.error(`harness: ${(error as Error).message} (see --help)`);
    return 2;
  }
  const { values, positionals } = parsed;
  const scenario = SCENARIOS.find((s) => s.name === positionals[0]);
  if (values.help || !scenario) {
    if (!values.help) console.error(positionals[0] ? `harness: unknown scenario '${positionals[0]}'` : "harness: name a scenario");
    console.log(USAGE.trim());
    return values.help ? 0 : 2;
  }
  const basePort = Number(values["base-port"] ?? 5000);
  if (!Number.isInteger(basePort) || basePort < 1 || basePort + 3000 > 65535) {
    console.error("harness: --base-port must be a whole number from 1 to 62535");
    return 2;
  }

  const logDir = join(REPO_ROOT, "harness", "logs", scenario.name);
  rmSync(logDir, { recursive: true, force: true });
  const pki = scenario.ownPki ? join(logDir, "pki") : pkiDir();
  await ensurePki(pki);
  const db = values.db ?? join(logDir, "records.db");
  const tokenDb = values.db ?? join(logDir, "tokens.db");
  const cluster = new Cluster({ logDir, pki, env: { DATABASE_URL: db, NO_COLOR: "1" } });
  const started = performance.now();
  const summary: string[] = [];

  const interrupt = async () => {
    console.error("\nharness: interrupted; stopping every role");
    await cluster.stop();
    process.exit(130);
  };
  process.once("SIGINT", interrupt);
  process.once("SIGTERM", interrupt);

  console.log(`harness: ${scenario.name} — ${scenario.description}`);
  try {
    await scenario.run({ cluster, ports: seedPorts(basePort), db, tokenDb, summary, step: (m) => console.log(`  • ${m}`) });
  } catch (error) {
    console.error(`\nharness: ${scenario.name} FAILED: ${error instanceof ExpectationFailed ? error.message : (error as Error).stack}`);
    console.error(`logs: ${logDir}`);
    await cluster.stop();
    return 1;
  }
  await cluster.stop();
  console.log("\nSummary:");
  for (const line of summary) console.log(`  ${line}`);
  console.log(`\nharness: ${scenario.name} passed in ${((performance.now() - started) / 1000).toFixed(1)} s; logs in harness/logs/${scenario.name}/`);
  return 0;
}

process.exit(await main());
