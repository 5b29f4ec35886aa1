// The short version of `bun harness multihost` (issue 14 part 7): one Galera cluster, one fault of each kind under
// load, a few minutes; and Ctrl+C on the real command leaves no namespace, process or datadir behind.
import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_ROOT } from "../../shared/platform/config.ts";
import { newPki, temporaryCluster, waitFor } from "../fixtures/index.ts";
import { namespacesUnavailableReason } from "./netns.ts";
import { ip, NAME_PREFIX, STATE_DIR } from "./run-lease.ts";
import { runMultihost, SHORT_PLAN } from "./run.ts";

setDefaultTimeout(8 * 60_000);

/** Namespaces can't be made here: say so in one line and fail, never skip (CI runs as root). */
function requireNamespaces(): void {
  const reason = namespacesUnavailableReason();
  if (reason) throw new Error(`multihost needs network namespaces: ${reason}`);
}

const namespacesOfSlot = (slot: number) =>
  ip(["netns", "list"])
    .split("\n")
    .map((l) => l.split(" ")[0]!)
    .filter((n) => n.startsWith(`${NAME_PREFIX}${slot}-`));

/** Processes whose command line names `dir` (a Galera node's config in it, say). */
function processesUsing(dir: string): number[] {
  return readdirSync("/proc")
    .filter((p) => /^\d+$/.test(p))
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(dir);
      } catch {
        return false;
      }
    })
    .map(Number);
}

describe("multihost", () => {
  test("--short: a fault of each kind under load; 0 failed requests, every acknowledged write stored once, all back in rotation", async () => {
    requireNamespaces();
    await using cluster = await temporaryCluster({ label: "multihost", pki: await newPki("multihost") });
    const started = performance.now();
    const result = await runMultihost(cluster, SHORT_PLAN, (m) => console.log(`  • ${m}`));
    console.log([...result.table, `short multihost run: ${((performance.now() - started) / 1000).toFixed(0)} s`].join("\n"));
    expect(result.misses).toEqual([]);
    expect(result.rows.map((r) => r.fault)).toEqual(SHORT_PLAN.faults.map((f) => f.name));
    for (const row of result.rows) {
      expect({ fault: row.fault, failed: row.failed, lost: row.lost, duplicates: row.duplicates, stored: row.stored }).toEqual({
        fault: row.fault,
        failed: 0,
        lost: 0,
        duplicates: 0,
        stored: row.acknowledged,
      });
      expect(row.acknowledged).toBeGreaterThanOrEqual(SHORT_PLAN.load.acksBefore + SHORT_PLAN.load.acksDuring + SHORT_PLAN.load.acksAfter);
    }
  });

  test("Ctrl+C on `bun harness multihost` mid-run removes its namespaces, Galera nodes and state", async () => {
    requireNamespaces();
    // Its own log folder: a run of `bun harness multihost` at the same time keeps harness/logs/multihost.
    const logs = mkdtempSync(join(tmpdir(), "securemesh-multihost-interrupted-"));
    const proc = Bun.spawn([process.execPath, join(REPO_ROOT, "harness", "index.ts"), "multihost", "--short"], {
      cwd: REPO_ROOT,
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, NO_COLOR: "1", HARNESS_LOGS: logs },
    });
    try {
      await interruptMidRun(proc);
    } finally {
      if (proc.exitCode === null) proc.kill("SIGINT"); // an expectation failed first: stop the run all the same
      await proc.exited;
      rmSync(logs, { recursive: true, force: true });
    }
  });
});

/** Waits until the run has every role up, sends SIGINT, and checks that nothing of it is left. */
async function interruptMidRun(proc: Bun.Subprocess<"ignore", "pipe", "pipe">): Promise<void> {
  let output = "";
  let slot = 0;
  let galeraDir = "";
  const decoder = new TextDecoder();
  // Interrupted once every role runs on its host: the most there is to clean up.
  for await (const chunk of proc.stdout) {
    output += decoder.decode(chunk, { stream: true });
    const up = /every host up: servers https:\/\/10\.213\.(\d+)\./.exec(output);
    if (up) {
      slot = Number(up[1]);
      galeraDir = /datadirs in (\S+)/.exec(output)![1]!;
      break;
    }
  }
  expect(slot).toBeGreaterThan(0);
  expect(processesUsing(galeraDir).length).toBe(3);
  expect(namespacesOfSlot(slot).length).toBe(16); // srv4 too, the spare server host
  proc.kill("SIGINT");
  const code = await proc.exited;
  const stderr = await new Response(proc.stderr).text();
  expect({ code, interrupted: stderr.includes("interrupted") }).toEqual({ code: 130, interrupted: true });
  expect(namespacesOfSlot(slot)).toEqual([]);
  expect(existsSync(join(STATE_DIR, `run-${slot}.json`))).toBe(false);
  expect(existsSync(galeraDir)).toBe(false);
  // SIGKILL is sent at once, but a process takes a moment to go.
  await waitFor(`no process left using ${galeraDir}`, () => processesUsing(galeraDir).length === 0, 5000);
}
