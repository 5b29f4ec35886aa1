// Draws role logs as terminal panes side by side in one SVG: monospace, ANSI colours kept, long logs cropped.

export interface Pane {
  /** e.g. "server1 :5001" */
  title: string;
  lines: string[];
}

export interface RenderOptions {
  /** Most lines shown per pane; the rest are cut, around the lines that matter. */
  maxLines?: number;
  /** Longest line shown, in characters; longer ones end in an ellipsis. */
  maxColumns?: number;
  /** Panes per row. */
  columns?: number;
}

export function escapeXml(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

const ANSI_COLORS: Record<number, string> = {
  30: "#3b3b3b",
  31: "#f14c4c",
  32: "#23d18b",
  33: "#e5c07b",
  34: "#3b8eea",
  35: "#d670d6",
  36: "#29b8db",
  37: "#e5e5e5",
  90: "#767676",
  91: "#f14c4c",
  92: "#23d18b",
  93: "#f5f543",
  94: "#3b8eea",
  95: "#d670d6",
  96: "#29b8db",
  97: "#ffffff",
};
const DEFAULT_FG = "#d4d4d4";

export interface Span {
  text: string;
  color: string | null;
  bold: boolean;
}

/** Splits a line at SGR escapes (colour, bold, reset) into styled spans; other escapes are dropped. */
export function parseAnsi(line: string): Span[] {
  const spans: Span[] = [];
  let color: string | null = null;
  let bold = false;
  let last = 0;
  const push = (text: string) => {
    if (text) spans.push({ text, color, bold });
  };
  for (const match of line.matchAll(/\x1b\[([0-9;]*)([A-Za-z])/g)) {
    push(line.slice(last, match.index));
    last = match.index! + match[0].length;
    if (match[2] !== "m") continue;
    for (const code of (match[1] || "0").split(";").map(Number)) {
      if (code === 0) [color, bold] = [null, false];
      else if (code === 1) bold = true;
      else if (code === 22) bold = false;
      else if (code === 39) color = null;
      else if (ANSI_COLORS[code]) color = ANSI_COLORS[code]!;
    }
  }
  push(line.slice(last));
  return spans;
}

export const visibleText = (line: string) => line.replace(/\x1b\[[0-9;]*[A-Za-z]/g, "");

/** Lines that tell the story: colour (warnings, errors), failover, data, results. Access lines are the filler. */
const MATTERS = /\x1b\[3|fail|down|back in rotation|refus|listening|Decrypted|Success|Cache|invalidat|AUDIT|error|denied|revoked|token|released/i;

/**
 * At most `max` lines: the first and last two, then the lines that matter, evenly spread if there are too many;
 * each run of cut lines becomes one marker line.
 */
export function cropLines(lines: string[], max: number): string[] {
  if (lines.length <= max) return lines;
  const budget = Math.max(max - 4, 1);
  const keep = new Set<number>([0, 1, lines.length - 2, lines.length - 1]);
  const important = lines.map((line, i) => (MATTERS.test(line) ? i : -1)).filter((i) => i > 1 && i < lines.length - 2);
  // Markers take room too; leave about a third of the budget for them.
  const slots = Math.max(1, Math.floor(budget * 0.7));
  const step = important.length / slots;
  for (let k = 0; k < Math.min(slots, important.length); k++) keep.add(important[Math.floor(k * Math.max(step, 1))]!);
  const out: string[] = [];
  let cut = 0;
  lines.forEach((line, i) => {
    if (keep.has(i)) {
      if (cut > 0) out.push(cutMarker(cut));
      cut = 0;
      out.push(line);
    } else {
      cut += 1;
    }
  });
  if (cut > 0) out.push(cutMarker(cut));
  return out;
}

const MARKER_PREFIX = "\u0000cut:";
const cutMarker = (n: number) => `${MARKER_PREFIX}${n}`;

const CHAR_WIDTH = 7.22; // DejaVu Sans Mono at 12px
const LINE_HEIGHT = 16;
const TITLE_HEIGHT = 28;
const PAD = 10;
const GAP = 14;

function truncate(spans: Span[], max: number): Span[] {
  const out: Span[] = [];
  let used = 0;
  for (const span of spans) {
    if (used + span.text.length <= max) {
      out.push(span);
      used += span.text.length;
      continue;
    }
    out.push({ ...span, text: `${span.text.slice(0, Math.max(0, max - used - 1))}…` });
    break;
  }
  return out;
}

function renderLine(line: string, x: number, y: number, maxColumns: number): string {
  if (line.startsWith(MARKER_PREFIX)) {
    const n = Number(line.slice(MARKER_PREFIX.length));
    return `<text x="${x}" y="${y}" class="cut">··· ${n} line${n === 1 ? "" : "s"} cut ···</text>`;
  }
  const spans = truncate(parseAnsi(line), maxColumns).map((s) => {
    const attrs = [s.color ? `fill="${s.color}"` : "", s.bold ? `font-weight="bold"` : ""].filter(Boolean).join(" ");
    return attrs ? `<tspan ${attrs}>${escapeXml(s.text)}</tspan>` : escapeXml(s.text);
  });
  return `<text x="${x}" y="${y}" xml:space="preserve">${spans.join("")}</text>`;
}

/** The panes laid out in a grid, each a dark terminal window with its title. */
export function renderTerminals(panes: Pane[], options: RenderOptions = {}): string {
  const maxLines = options.maxLines ?? 24;
  const maxColumns = options.maxColumns ?? 88;
  const columns = Math.max(1, Math.min(options.columns ?? 3, panes.length));
  const cropped = panes.map((p) => ({ title: p.title, lines: cropLines(p.lines, maxLines) }));
  const widestLine = Math.max(40, ...cropped.flatMap((p) => p.lines.map((l) => Math.min(visibleText(l).length, maxColumns))));
  const paneWidth = Math.ceil(widestLine * CHAR_WIDTH + 2 * PAD);
  const rows: (typeof cropped)[] = [];
  for (let i = 0; i < cropped.length; i += columns) rows.push(cropped.slice(i, i + columns));

  const parts: string[] = [];
  let y = GAP;
  for (const row of rows) {
    const rowHeight = TITLE_HEIGHT + PAD + Math.max(1, ...row.map((p) => p.lines.length)) * LINE_HEIGHT + PAD;
    row.forEach((pane, c) => {
      const x = GAP + c * (paneWidth + GAP);
      parts.push(
        `<g>`,
        `<rect x="${x}" y="${y}" width="${paneWidth}" height="${rowHeight}" rx="6" class="pane"/>`,
        `<rect x="${x}" y="${y}" width="${paneWidth}" height="${TITLE_HEIGHT}" rx="6" class="bar"/>`,
        `<rect x="${x}" y="${y + TITLE_HEIGHT - 6}" width="${paneWidth}" height="6" class="bar"/>`,
        ...["#ff5f56", "#ffbd2e", "#27c93f"].map((fill, d) => `<circle cx="${x + 14 + d * 16}" cy="${y + TITLE_HEIGHT / 2}" r="5" fill="${fill}"/>`),
        `<text x="${x + paneWidth / 2}" y="${y + 18}" class="title" text-anchor="middle">${escapeXml(pane.title)}</text>`,
        ...pane.lines.map((line, i) => renderLine(line, x + PAD, y + TITLE_HEIGHT + PAD + (i + 1) * LINE_HEIGHT - 4, maxColumns)),
        `</g>`,
      );
    });
    y += rowHeight + GAP;
  }
  const width = GAP + columns * (paneWidth + GAP);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y}" viewBox="0 0 ${width} ${y}">
<style>
  text { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; fill: ${DEFAULT_FG}; }
  .pane { fill: #1e1e1e; }
  .bar { fill: #3a3a3a; }
  .title { fill: #cccccc; font-weight: bold; }
  .cut { fill: #808080; font-style: italic; }
</style>
<rect width="100%" height="100%" fill="#f6f8fa"/>
${parts.join("\n")}
</svg>
`;
}
