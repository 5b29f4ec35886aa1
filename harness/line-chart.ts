// An SVG line chart for the bench's sweeps: how a figure grows with concurrency, store size or server count.
import { escapeXml } from "./terminal-svg.ts";

export interface Series {
  name: string;
  /** securemesh's own lines are drawn solid and blue-ish; baselines dashed. */
  ours: boolean;
  points: { x: number; y: number }[];
}

export interface LineChart {
  title: string;
  subtitle: string;
  xLabel: string;
  yLabel: string;
  /** A log scale for x (store sizes 1k…1M); the ticks are then the points' own x values. */
  xLog?: boolean;
  series: Series[];
}

const PALETTE_OURS = ["#2f6fdf", "#0b8a5f", "#7a3fd1"];
const PALETTE_BASE = ["#6b7280", "#c2410c", "#a16207"];
const WIDTH = 640;
const HEIGHT = 360;
const PLOT = { left: 72, right: 180, top: 56, bottom: 52 };

export function renderLineChart(chart: LineChart): string {
  const points = chart.series.flatMap((s) => s.points);
  const xs = [...new Set(points.map((p) => p.x))].sort((a, b) => a - b);
  const fx = chart.xLog ? Math.log10 : (x: number) => x;
  const [x0, x1] = [fx(xs[0] ?? 0), fx(xs.at(-1) ?? 1)];
  const yMax = niceCeiling(Math.max(...points.map((p) => p.y), 0));
  const plotWidth = WIDTH - PLOT.left - PLOT.right;
  const plotHeight = HEIGHT - PLOT.top - PLOT.bottom;
  const sx = (x: number) => PLOT.left + (x1 === x0 ? plotWidth / 2 : ((fx(x) - x0) / (x1 - x0)) * plotWidth);
  const sy = (y: number) => PLOT.top + plotHeight - (yMax === 0 ? 0 : (y / yMax) * plotHeight);
  const out: string[] = [];
  for (let i = 0; i <= 4; i++) {
    const y = (yMax * i) / 4;
    out.push(`<line x1="${PLOT.left}" x2="${PLOT.left + plotWidth}" y1="${sy(y)}" y2="${sy(y)}" class="grid"/>`);
    out.push(`<text x="${PLOT.left - 6}" y="${sy(y) + 4}" class="tick" text-anchor="end">${escapeXml(formatNumber(y))}</text>`);
  }
  for (const x of xs) out.push(`<text x="${sx(x)}" y="${PLOT.top + plotHeight + 16}" class="tick" text-anchor="middle">${escapeXml(formatNumber(x))}</text>`);
  let ours = 0;
  let base = 0;
  chart.series.forEach((series, i) => {
    const color = series.ours ? PALETTE_OURS[ours++ % PALETTE_OURS.length] : PALETTE_BASE[base++ % PALETTE_BASE.length];
    const sorted = [...series.points].sort((a, b) => a.x - b.x);
    const path = sorted.map((p, j) => `${j === 0 ? "M" : "L"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
    out.push(`<path d="${path}" fill="none" stroke="${color}" stroke-width="2"${series.ours ? "" : ' stroke-dasharray="6 4"'}/>`);
    for (const p of sorted)
      out.push(
        `<circle cx="${sx(p.x).toFixed(1)}" cy="${sy(p.y).toFixed(1)}" r="3" fill="${color}"><title>${escapeXml(`${series.name}: ${formatNumber(p.y)} at ${formatNumber(p.x)}`)}</title></circle>`,
      );
    const legendY = PLOT.top + 8 + i * 20;
    out.push(
      `<line x1="${WIDTH - PLOT.right + 16}" x2="${WIDTH - PLOT.right + 40}" y1="${legendY}" y2="${legendY}" stroke="${color}" stroke-width="2"${series.ours ? "" : ' stroke-dasharray="6 4"'}/>`,
    );
    out.push(`<text x="${WIDTH - PLOT.right + 46}" y="${legendY + 4}" class="legend">${escapeXml(series.name)}</text>`);
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${HEIGHT}" viewBox="0 0 ${WIDTH} ${HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">
<style>
  .head { font-size: 15px; font-weight: 700; fill: #1d1f21; }
  .sub { font-size: 10px; fill: #666; }
  .tick { font-size: 11px; fill: #444; font-variant-numeric: tabular-nums; }
  .axis { font-size: 12px; fill: #333; }
  .legend { font-size: 11px; fill: #333; }
  .grid { stroke: #e5e7eb; stroke-width: 1; }
</style>
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="16" y="22" class="head">${escapeXml(chart.title)}</text>
<text x="16" y="38" class="sub">${escapeXml(chart.subtitle)}</text>
<text x="${PLOT.left + plotWidth / 2}" y="${HEIGHT - 12}" class="axis" text-anchor="middle">${escapeXml(chart.xLabel)}</text>
<text x="16" y="${PLOT.top + plotHeight / 2}" class="axis" text-anchor="middle" transform="rotate(-90 16 ${PLOT.top + plotHeight / 2})">${escapeXml(chart.yLabel)}</text>
${out.join("\n")}
</svg>
`;
}

/** 1, 2 or 5 times a power of ten, at or above `n`: round gridlines. */
function niceCeiling(n: number): number {
  if (n <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(n));
  return [1, 2, 5, 10].map((m) => m * power).find((v) => v >= n)!;
}

function formatNumber(n: number): string {
  if (n >= 1_000_000 && n % 1_000_000 === 0) return `${n / 1_000_000}M`;
  if (n >= 1000 && n % 1000 === 0) return `${n / 1000}k`;
  return n >= 100 || Number.isInteger(n) ? Math.round(n).toLocaleString("en") : n.toFixed(n < 1 ? 2 : 1);
}
