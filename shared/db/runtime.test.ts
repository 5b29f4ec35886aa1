import { expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { denoBinary } from "../../harness/cluster.ts";
import { testedRuntimes } from "../testing/unit-run.ts";

// The sqlite stores use node:sqlite so that one driver serves both runtimes; this runs them on each for real.
const script = join(import.meta.dir, "runtime-check.ts");
const runtimes: Record<"bun" | "deno", () => string[]> = {
  bun: () => [process.execPath, script],
  deno: () => [denoBinary(), "run", "-A", script],
};

test.each(testedRuntimes())("the sqlite record and token stores work on %s", (runtime) => {
  const [command, ...args] = runtimes[runtime]!();
  const run = spawnSync(command!, args, { encoding: "utf8", timeout: 30_000 });
  if (run.error) throw new Error(`cannot run ${runtime}: ${run.error.message}`);
  expect({ status: run.status, stderr: run.stderr.trim() }).toEqual({ status: 0, stderr: "" });
  expect(run.stdout.trim()).toStartWith(`OK ${runtime === "bun" ? "Bun" : "Deno"}/`);
});
