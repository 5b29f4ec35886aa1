// What `bun harness bench` prints and writes: a table with ratios to each case's baseline, and an SVG bar chart.
import type { BenchReport, CaseResult } from "./bench.ts";
import { renderTable } from "./fixtures/index.ts";
import { escapeXml } from "./terminal-svg.ts";

/** The case each case is compared with, and what that baseline is called. */
const BASELINES: Record<string, { id: string; name: string }> = {
  "b-read": { id: "c-read", name: "HAProxy" },
  "c-read": { id: "a-read", name: "direct" },
  "b-write": { id: "c-write", name: "HAProxy" },
  "c-write": { id: "a-write", name: "direct" },
  "d-encrypt": { id: "d-encrypt-python", name: "Python" },
  "d-decrypt": { id: "d-decrypt-python", name: "Python" },
  "e-releases": { id: "e-rsa-bound", name: "RSA bound" },
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
  return `${(result.rate / other.rate).toFixed(2)}x ${baseline.name}`;
}

export function benchTable(report: BenchReport): string[] {
  const header = ["case", "rate", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "vs baseline"];
  const rows = report.results.map((r) => [
    r.label, `${rate(r.rate)} ${r.unit}`, ms(r.latency?.p50), ms(r.latency?.p90), ms(r.latency?.p99), ms(r.latency?.max),
    r.latency ? String(r.errors) : "", versus(r, report.results),
  ]);
  const { machine, versions, options } = report;
  const goals = report.comparisons.map((c) => {
    const value = c.unit === "x" ? `${c.value.toFixed(2)}x` : c.unit === "%" ? `${c.value.toFixed(0)}%` : c.unit === "ms" ? `${c.value >= 0 ? "+" : ""}${c.value.toFixed(2)} ms` : `${c.value} errors`;
    const verdict = c.goal === undefined ? "" : c.met ? `  met (goal ${c.goal})` : `  NOT met (goal ${c.goal})`;
    return `  ${c.label}: ${value} (${c.detail})${verdict}`;
  });
  return [
    `Machine: ${machine.cpus} × ${machine.cpuModel}, ${machine.memoryGiB} GiB, ${machine.platform}; Bun ${versions.bun}, HAProxy ${versions.haproxy}, Python ${versions.python} with cryptography ${versions.cryptography}`,
    `Each case ${options.durationS} s in ${options.rounds} interleaved rounds, ${options.concurrency} concurrent workers, ${rate(options.records)} records at the end`,
    "",
    // Figures right-aligned, the case and its comparison left.
    ...renderTable(header, rows, { border: "plain", align: header.map((_, i) => (i === 0 || i === header.length - 1 ? "left" : "right")) }),
    "",
    "Ratios and goals:",
    ...goals,
  ];
}

interface Bar {
  label: string;
  value: number;
  ours: boolean;
}

function groups(report: BenchReport): { title: string; unit: string; bars: Bar[] }[] {
  const by = (id: string) => report.results.find((r) => r.id === id)?.rate ?? 0;
  return [
    { title: "Cached read, requests/s", unit: "req/s", bars: [
      { label: "direct to one server", value: by("a-read"), ours: false },
      { label: "securemesh coordinator", value: by("b-read"), ours: true },
      { label: "HAProxy", value: by("c-read"), ours: false },
    ] },
    { title: "POST /api/data, requests/s", unit: "req/s", bars: [
      { label: "direct to one server", value: by("a-write"), ours: false },
      { label: "securemesh coordinator", value: by("b-write"), ours: true },
      { label: "HAProxy", value: by("c-write"), ours: false },
    ] },
    { title: "Fernet, 1 KiB, operations/s", unit: "ops/s", bars: [
      { label: "securemesh encrypt", value: by("d-encrypt"), ours: true },
      { label: "Python cryptography encrypt", value: by("d-encrypt-python"), ours: false },
      { label: "securemesh decrypt", value: by("d-decrypt"), ours: true },
      { label: "Python cryptography decrypt", value: by("d-decrypt-python"), ours: false },
    ] },
    { title: "Token releases/s against the RSA-2048 OAEP decrypt bound", unit: "/s", bars: [
      { label: "KeyServer releases", value: by("e-releases"), ours: true },
      { label: "RSA decrypts, one core", value: by("e-rsa-bound"), ours: false },
    ] },
    { title: "get_data() through the coordinator, requests/s", unit: "req/s", bars: [
      { label: "cached", value: by("b-read"), ours: true },
      { label: "uncached", value: by("f-uncached"), ours: false },
    ] },
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
