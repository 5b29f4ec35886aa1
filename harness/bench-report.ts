// What `bun harness bench` prints and writes: a table with ratios to each case's baseline, and an SVG bar chart.
import type { BenchReport, CaseResult, Comparison } from "./bench.ts";
import { renderTable } from "./fixtures/index.ts";
import { escapeXml } from "./terminal-svg.ts";
import { renderLineChart } from "./line-chart.ts";

/** The case each case is compared with, and what that baseline is called. */
const BASELINES: Record<string, { id: string; name: string }> = {
  "b-read": { id: "c-read-log", name: "HAProxy logging" },
  "b-read-nolog": { id: "c-read", name: "HAProxy" },
  "b1-read": { id: "b-read", name: "2 workers" },
  "b0-read": { id: "c-read", name: "HAProxy" },
  "b0g-read": { id: "b0-read", name: "bare proxy" },
  "c-read": { id: "a-read", name: "direct" },
  "c-read-log": { id: "a-read", name: "direct" },
  "b-write": { id: "c-write-log", name: "HAProxy logging" },
  "b-write-nolog": { id: "c-write", name: "HAProxy" },
  "b1-write": { id: "b-write", name: "2 workers" },
  "b0-write": { id: "c-write", name: "HAProxy" },
  "b0g-write": { id: "b0-write", name: "bare proxy" },
  "c-write": { id: "a-write", name: "direct" },
  "c-write-log": { id: "a-write", name: "direct" },
  "m-mixed": { id: "b-read", name: "read-only" },
  "d-encrypt": { id: "d-encrypt-python", name: "Python" },
  "d-decrypt": { id: "d-decrypt-python", name: "Python" },
  "e-releases": { id: "e-rsa-bound", name: "RSA bound" },
  "e-releases-ecdh": { id: "e-ecdh-bound", name: "X25519 bound" },
  "f-uncached": { id: "b-read", name: "cached" },
  "g-failover": { id: "b-write", name: "steady" },
};

const rate = (n: number) => Math.round(n).toLocaleString("en");
const ms = (n: number | undefined) => (n === undefined ? "" : n < 10 ? n.toFixed(2) : n.toFixed(1));

function versus(result: CaseResult, results: CaseResult[]): string {
  const baseline = BASELINES[result.id];
  const other = baseline && results.find((r) => r.id === baseline.id);
  if (!baseline || !other) return "";
  if (result.id === "g-failover") return `p99 ${ms(result.latency?.p99)} vs ${ms(other.latency?.p99)} ms ${baseline.name}`;
  if (result.mixed)
    return `read p50 ${ms(result.mixed.reads.p50)} vs ${ms(other.latency?.p50)} ms ${baseline.name}, ${(100 * result.mixed.hitRatio).toFixed(0)}% hits`;
  return `${(result.rate / other.rate).toFixed(2)}x ${baseline.name}`;
}

export function benchTable(report: BenchReport): string[] {
  const header = ["case", "rate", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "CPU µs/req", "vs baseline"];
  const rows = report.results.map((r) => [
    r.label,
    `${rate(r.rate)} ${r.unit}`,
    ms(r.latency?.p50),
    ms(r.latency?.p90),
    ms(r.latency?.p99),
    ms(r.latency?.max),
    r.latency ? String(r.errors) : "",
    r.cpuMsPerRequest === undefined ? "" : (1000 * r.cpuMsPerRequest).toFixed(0),
    versus(r, report.results),
  ]);
  const { machine, versions, options } = report;
  const goals = report.comparisons.map((c) => {
    const value =
      c.unit === "x"
        ? `${c.value.toFixed(2)}x`
        : c.unit === "%"
          ? `${c.value.toFixed(0)}%`
          : c.unit === "ms"
            ? `${c.value >= 0 ? "+" : ""}${c.value.toFixed(2)} ms`
            : c.unit === "MiB"
              ? `${c.value.toFixed(1)} MiB`
              : `${c.value} errors`;
    const verdict = c.goal === undefined ? "" : c.met ? `  met (goal ${c.goal})` : `  NOT met (goal ${c.goal})`;
    return `  ${c.label}: ${value} (${c.detail})${verdict}`;
  });
  return [
    `Machine: ${machine.cpus} × ${machine.cpuModel}, ${machine.memoryGiB} GiB, ${machine.platform}; Bun ${versions.bun}, HAProxy ${versions.haproxy}, Python ${versions.python} with cryptography ${versions.cryptography}`,
    `Each case ${options.durationS} s in ${options.rounds} interleaved rounds, ${options.concurrency} concurrent workers, ${rate(options.records)} records at the end`,
    "",
    // Figures right-aligned, the case and its comparison left.
    ...renderTable(header, rows, { border: "plain", align: header.map((_, i) => (i === 0 || i === header.length - 1 ? "left" : "right")) }),
    ...sweepTables(report),
    "",
    "Ratios and goals:",
    ...goals,
    ...(report.skipped.length > 0 ? ["", "Skipped (every other figure above was measured):"] : []),
    ...report.skipped.map((s) => `  ${s.part}: ${s.reason}; lost ${s.lost}`),
    "",
    goalVerdict(report),
  ];
}

/** The bench's exit status when it ran whole but a goal was missed or a part skipped (1 is a failed run). */
export const BENCH_GOAL_MISSED = 3;

/** Goals that were measured and missed. */
export function missedGoals(report: BenchReport): Comparison[] {
  return report.comparisons.filter((c) => c.goal !== undefined && !c.met);
}

/** 0 when every goal was measured and met; BENCH_GOAL_MISSED when one was missed or a part was skipped. */
export function benchExitStatus(report: BenchReport): number {
  return missedGoals(report).length > 0 || report.skipped.length > 0 ? BENCH_GOAL_MISSED : 0;
}

/** One line: how many goals were met, and whether the run was whole. */
export function goalVerdict(report: BenchReport): string {
  const goals = report.comparisons.filter((c) => c.goal !== undefined).length;
  const missed = missedGoals(report).length;
  const skipped = report.skipped.length ? `; ${report.skipped.length} part(s) skipped, their goals not measured` : "";
  return `Goals: ${goals - missed} of ${goals} met, ${missed} NOT met${skipped}.`;
}

/** The sweeps and the store sizes as small tables of their own. */
function sweepTables(report: BenchReport): string[] {
  const out: string[] = [];
  const right = (n: number): ("left" | "right")[] => Array.from({ length: n }, (_, i) => (i === 0 ? "left" : "right"));
  const { concurrency, servers } = report.sweeps;
  if (concurrency.length > 0) {
    const levels = [...new Set(concurrency.map((p) => p.concurrency))];
    const targets = [...new Set(concurrency.map((p) => p.target))];
    const header = ["cached read", ...levels.map((c) => `c=${c} req/s`), ...levels.map((c) => `c=${c} p99 ms`)];
    const rows = targets.map((t) => {
      const at = (c: number) => concurrency.find((p) => p.target === t && p.concurrency === c)!;
      return [t, ...levels.map((c) => rate(at(c).rate)), ...levels.map((c) => ms(at(c).p99))];
    });
    out.push(
      "",
      "Sweep: concurrency (cached read; the coordinator and HAProxy as they log by default):",
      ...renderTable(header, rows, { border: "plain", align: right(header.length) }),
    );
  }
  if (servers.length > 0) {
    const counts = [...new Set(servers.map((p) => p.servers))];
    const header = ["coordinator", ...counts.map((n) => `${n} server${n > 1 ? "s" : ""} req/s`), ...counts.map((n) => `${n} p99 ms`)];
    const rows = [...new Set(servers.map((p) => p.route))].map((route) => {
      const at = (n: number) => servers.find((p) => p.route === route && p.servers === n)!;
      return [route, ...counts.map((n) => rate(at(n).rate)), ...counts.map((n) => ms(at(n).p99))];
    });
    out.push("", "Sweep: servers behind the coordinator:", ...renderTable(header, rows, { border: "plain", align: right(header.length) }));
  }
  if (report.storeSizes.points.length > 0) {
    const header = ["uncached get_data()", "records", "p50 ms", "p99 ms", "reads", "filled in s"];
    const rows = report.storeSizes.points.map((p) => [p.db, rate(p.records), ms(p.p50), ms(p.p99), String(p.reads), p.fillS.toFixed(1)]);
    out.push(
      "",
      "Sweep: store size (a server reading straight from the store, one request at a time):",
      ...renderTable(header, rows, { border: "plain", align: right(header.length) }),
    );
  }
  if (report.memory.length > 0) {
    const header = ["role", "runtime", "RSS MiB", "file-backed MiB"];
    const rows = [
      ...report.memory.map((m) => [m.name, m.runtime, m.rssMiB.toFixed(1), m.fileMiB === null || m.fileMiB === undefined ? "–" : m.fileMiB.toFixed(1)]),
      ...report.storeSizes.memory.map((m) => [
        `server after ${rate(m.records)} records (${m.db}), idle before`,
        "bun",
        `${m.afterMiB.toFixed(1)} (${m.idleMiB.toFixed(1)})`,
        "–",
      ]),
    ];
    out.push(
      "",
      "Memory (idle, before any load; the client's peak over one message). File-backed pages are mostly the runtime's",
      "executable, one copy shared by all its processes on the host; the rest is the role's own:",
      ...renderTable(header, rows, { border: "plain", align: ["left", "left", "right", "right"] }),
    );
  }
  return out;
}

interface Bar {
  label: string;
  value: number;
  ours: boolean;
}

function groups(report: BenchReport): { title: string; unit: string; bars: Bar[] }[] {
  const by = (id: string) => report.results.find((r) => r.id === id)?.rate ?? 0;
  return [
    {
      title: "Cached read, requests/s",
      unit: "req/s",
      bars: [
        { label: "direct to one server", value: by("a-read"), ours: false },
        { label: "coordinator, access log", value: by("b-read"), ours: true },
        { label: "HAProxy, access log", value: by("c-read-log"), ours: false },
        { label: "coordinator, no log", value: by("b-read-nolog"), ours: true },
        { label: "HAProxy, no log", value: by("c-read"), ours: false },
      ],
    },
    {
      title: "POST /api/data, requests/s",
      unit: "req/s",
      bars: [
        { label: "direct to one server", value: by("a-write"), ours: false },
        { label: "coordinator, access log", value: by("b-write"), ours: true },
        { label: "HAProxy, access log", value: by("c-write-log"), ours: false },
        { label: "coordinator, no log", value: by("b-write-nolog"), ours: true },
        { label: "HAProxy, no log", value: by("c-write"), ours: false },
      ],
    },
    {
      title: "Fernet, 1 KiB, operations/s",
      unit: "ops/s",
      bars: [
        { label: "securemesh encrypt", value: by("d-encrypt"), ours: true },
        { label: "Python cryptography encrypt", value: by("d-encrypt-python"), ours: false },
        { label: "securemesh decrypt", value: by("d-decrypt"), ours: true },
        { label: "Python cryptography decrypt", value: by("d-decrypt-python"), ours: false },
      ],
    },
    {
      title: "Token releases/s against the RSA-2048 OAEP decrypt bound",
      unit: "/s",
      bars: [
        { label: "KeyServer releases", value: by("e-releases"), ours: true },
        { label: "RSA decrypts, one core", value: by("e-rsa-bound"), ours: false },
      ],
    },
    {
      title: "get_data() through the coordinator, requests/s",
      unit: "req/s",
      bars: [
        { label: "cached", value: by("b-read"), ours: true },
        { label: "uncached", value: by("f-uncached"), ours: false },
      ],
    },
  ];
}

/** A horizontal bar chart, one group per comparison, each bar scaled to the largest in its group. */
export function renderChart(report: BenchReport): string {
  const width = 760;
  const labelWidth = 210;
  const barMax = width - labelWidth - 110;
  const barHeight = 18;
  const out: string[] = [];
  let y = 56;
  for (const group of groups(report)) {
    out.push(`<text x="16" y="${y}" class="title">${escapeXml(group.title)}</text>`);
    y += 10;
    const max = Math.max(...group.bars.map((b) => b.value), 1);
    for (const bar of group.bars) {
      const length = Math.max(1, Math.round((bar.value / max) * barMax));
      out.push(
        `<text x="${labelWidth}" y="${y + 13}" class="label" text-anchor="end">${escapeXml(bar.label)}</text>`,
        `<rect x="${labelWidth + 8}" y="${y}" width="${length}" height="${barHeight}" rx="2" class="${bar.ours ? "ours" : "base"}"/>`,
        `<text x="${labelWidth + 14 + length}" y="${y + 13}" class="value">${rate(bar.value)}</text>`,
      );
      y += barHeight + 6;
    }
    y += 22;
  }
  const { machine, versions, date, options } = report;
  const subtitle = `${date.slice(0, 10)} · ${machine.cpus} × ${machine.cpuModel} · Bun ${versions.bun} · HAProxy ${versions.haproxy} · Python cryptography ${versions.cryptography} · ${options.concurrency} workers, ${options.durationS} s per case`;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y}" viewBox="0 0 ${width} ${y}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">
<style>
  .title { font-size: 14px; font-weight: 600; fill: #1d1f21; }
  .label { font-size: 12px; fill: #333; }
  .value { font-size: 12px; fill: #333; font-variant-numeric: tabular-nums; }
  .ours { fill: #2f6fdf; }
  .base { fill: #a0a7b4; }
  .head { font-size: 16px; font-weight: 700; fill: #1d1f21; }
  .sub { font-size: 11px; fill: #666; }
</style>
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="16" y="22" class="head">securemesh bench: one run, every case side by side (blue: securemesh)</text>
<text x="16" y="38" class="sub">${escapeXml(subtitle)}</text>
${out.join("\n")}
</svg>
`;
}

/** The sweeps as line charts (#13 Part 5), by file name under docs/. */
export function renderSweepCharts(report: BenchReport): Record<string, string> {
  const { machine, date, options } = report;
  const subtitle = `${date.slice(0, 10)} · ${machine.cpus} × ${machine.cpuModel} · load generator, proxies and servers share these cores`;
  const charts: Record<string, string> = {};
  const { concurrency, servers } = report.sweeps;
  const byTarget = (pick: (p: BenchReport["sweeps"]["concurrency"][number]) => number) =>
    [...new Set(concurrency.map((p) => p.target))].map((target) => ({
      name: target,
      ours: target === "coordinator",
      points: concurrency.filter((p) => p.target === target).map((p) => ({ x: p.concurrency, y: pick(p) })),
    }));
  if (concurrency.length > 0) {
    charts["bench-concurrency.svg"] = renderLineChart({
      title: "Cached read throughput against concurrency",
      subtitle,
      xLabel: "concurrent clients",
      yLabel: "requests/s",
      xLog: true,
      series: byTarget((p) => p.rate),
    });
    charts["bench-concurrency-p99.svg"] = renderLineChart({
      title: "Cached read p99 latency against concurrency",
      subtitle,
      xLabel: "concurrent clients",
      yLabel: "p99 ms",
      xLog: true,
      series: byTarget((p) => p.p99),
    });
  }
  if (servers.length > 0) {
    charts["bench-servers.svg"] = renderLineChart({
      title: `Coordinator throughput against servers behind it (${options.coordinatorWorkers} workers)`,
      subtitle,
      xLabel: "servers",
      yLabel: "requests/s",
      series: [...new Set(servers.map((p) => p.route))].map((route) => ({
        name: route,
        ours: true,
        points: servers.filter((p) => p.route === route).map((p) => ({ x: p.servers, y: p.rate })),
      })),
    });
  }
  const points = report.storeSizes.points;
  if (points.length > 0) {
    charts["bench-store-size.svg"] = renderLineChart({
      title: "Uncached get_data() read against store size",
      subtitle,
      xLabel: "records in the store (log scale)",
      yLabel: "ms",
      xLog: true,
      series: (["sqlite", "MariaDB"] as const).flatMap((db) =>
        (["p50", "p99"] as const).map((q) => ({
          name: `${db} ${q}`,
          ours: q === "p50",
          points: points.filter((p) => p.db === db).map((p) => ({ x: p.records, y: p[q] })),
        })),
      ),
    });
  }
  return charts;
}
