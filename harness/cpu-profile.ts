// Where a role's CPU went: the functions with the most samples of their own, and with the most under them, from the
// Chrome-format profile Bun's --cpu-prof writes (HARNESS_CPU_PROFILE=<role name> makes the harness write one).
// Samples are counted, not weighted by their time deltas: Bun samples only while the thread runs, so a delta also
// holds the idle wait before the sample, and weighting by it once gave a 1 ms write the idle second before it.
// Usage: bun harness/cpu-profile.ts FILE.cpuprofile [N]
import { readFileSync } from "node:fs";
import { REPO_ROOT } from "../shared/platform/config.ts";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

export interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
}

export interface ProfileLine {
  /** e.g. "forward shared/request-path/upstream.ts:495"; native functions have no file. */
  name: string;
  /** Share of every sample, 0 to 1. */
  share: number;
}

export interface ProfileSummary {
  samples: number;
  self: ProfileLine[];
  total: ProfileLine[];
}

/** A function as one line: its name and where it is, repo-relative. */
function frameName({ functionName, url, lineNumber }: ProfileNode["callFrame"]): string {
  const where = url.replace(/^file:\/\//, "").replace(`${REPO_ROOT}/`, "");
  return where ? `${functionName || "(anonymous)"} ${where}:${lineNumber + 1}` : functionName || "(anonymous)";
}

export function summarizeProfile(profile: CpuProfile, top = 20): ProfileSummary {
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const parentOf = new Map<number, number>();
  for (const node of profile.nodes) for (const child of node.children ?? []) parentOf.set(child, node.id);
  const selfById = new Map<number, number>();
  for (const id of profile.samples) selfById.set(id, (selfById.get(id) ?? 0) + 1);
  const self = new Map<string, number>();
  const total = new Map<string, number>();
  for (const [id, time] of selfById) {
    const name = frameName(byId.get(id)!.callFrame);
    self.set(name, (self.get(name) ?? 0) + time);
    // A recursive function counts once per sample in the time under it.
    const counted = new Set<string>();
    for (let at: number | undefined = id; at !== undefined; at = parentOf.get(at)) {
      const outer = frameName(byId.get(at)!.callFrame);
      if (counted.has(outer)) continue;
      counted.add(outer);
      total.set(outer, (total.get(outer) ?? 0) + time);
    }
  }
  const ranked = (times: Map<string, number>) =>
    [...times]
      .filter(([name]) => name !== "(root)")
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([name, count]) => ({ name, share: count / Math.max(1, profile.samples.length) }));
  return { samples: profile.samples.length, self: ranked(self), total: ranked(total) };
}

export function profileReport(summary: ProfileSummary): string[] {
  const line = ({ name, share }: ProfileLine) => `  ${(100 * share).toFixed(1).padStart(5)}%  ${name}`;
  return [
    `${summary.samples} samples`,
    "self (samples in the function itself):",
    ...summary.self.map(line),
    "total (samples in it and what it called):",
    ...summary.total.map(line),
  ];
}

if (import.meta.main) {
  const [file, count] = [Bun.argv[2], Number(Bun.argv[3] ?? 20)];
  if (!file || !(count > 0)) {
    console.error("usage: bun harness/cpu-profile.ts FILE.cpuprofile [N]");
    process.exit(2);
  }
  for (const line of profileReport(summarizeProfile(JSON.parse(readFileSync(file, "utf8")) as CpuProfile, count))) console.log(line);
}
