// The profile summary on a real profile from Bun's --cpu-prof: a busy function comes out on top, by its name and file.
import { expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type CpuProfile, profileReport, summarizeProfile } from "./cpu-profile.ts";

test("a function that spins has most of the samples of its own, and its caller has them under it", async () => {
  const dir = mkdtempSync(join(tmpdir(), "cpu-profile-"));
  const script = join(dir, "busy.ts");
  writeFileSync(
    script,
    `function spinHere(ms: number) { const end = performance.now() + ms; let x = 0; while (performance.now() < end) x += Math.sqrt(x + 1); return x; }
function callsSpin() { const spun = spinHere(400); return spun + 1; }
callsSpin();
`,
  );
  await using proc = Bun.spawn([process.execPath, "--cpu-prof", `--cpu-prof-dir=${dir}`, script], { stdout: "pipe", stderr: "pipe" });
  expect(await proc.exited).toBe(0);
  const file = readdirSync(dir).find((name) => name.endsWith(".cpuprofile"))!;
  const summary = summarizeProfile(JSON.parse(readFileSync(join(dir, file), "utf8")) as CpuProfile, 5);
  expect(summary.samples).toBeGreaterThan(50);
  expect(summary.self[0]!.name).toStartWith("spinHere ");
  expect(summary.self[0]!.name).toEndWith("busy.ts:1");
  expect(summary.self[0]!.share).toBeGreaterThan(0.5);
  const caller = summary.total.find((line) => line.name.startsWith("callsSpin "));
  expect(caller!.share).toBeGreaterThanOrEqual(summary.self[0]!.share);
  const report = profileReport(summary);
  expect(report[0]).toBe(`${summary.samples} samples`);
  expect(report[2]).toMatch(/^ +\d+\.\d% {2}spinHere /);
});
