import { describe, expect, test } from "bun:test";
import { runPython } from "../shared/testing/python.ts";
import { cropLines, parseAnsi, renderTerminals, visibleText } from "./terminal-svg.ts";

const SERVER_LOG = [
  "server listening on https://127.0.0.1:5001 (store: sqlite data/records.db)",
  '127.0.0.1 - - [22/Nov/2026 10:00:00] "GET /health HTTP/1.1" 200 -',
  'Decrypted data: Hello <world> & "friends" (from client1)',
  "\x1b[33mServer https://127.0.0.1:5002 failed: connection refused (ECONNREFUSED)\x1b[0m",
  '\x1b[31m127.0.0.1 - - [22/Nov/2026 10:00:01] "POST /api/data HTTP/1.1" 500 -\x1b[0m',
];

describe("parseAnsi", () => {
  test("keeps colours and bold, resets on 0, drops other escapes", () => {
    expect(parseAnsi("a\x1b[33mb\x1b[0mc")).toEqual([
      { text: "a", color: null, bold: false },
      { text: "b", color: "#e5c07b", bold: false },
      { text: "c", color: null, bold: false },
    ]);
    expect(parseAnsi("\x1b[1;31mX\x1b[2Ky")).toEqual([
      { text: "X", color: "#f14c4c", bold: true },
      { text: "y", color: "#f14c4c", bold: true },
    ]);
    expect(visibleText("\x1b[33mwarn\x1b[0m")).toBe("warn");
  });
});

describe("cropLines", () => {
  test("short logs are left whole", () => {
    expect(cropLines(SERVER_LOG, 10)).toEqual(SERVER_LOG);
  });

  test("long logs keep the start, the end and the lines that matter, with a marker for each cut", () => {
    const access = (i: number) => `127.0.0.1 - - [22/Nov/2026 10:00:00] "GET /health HTTP/1.1" 200 - #${i}`;
    const lines = [
      "server listening on https://127.0.0.1:5001",
      ...Array.from({ length: 50 }, (_, i) => access(i)),
      "\x1b[33mServer failed: timeout\x1b[0m",
      ...Array.from({ length: 50 }, (_, i) => access(50 + i)),
      "last line",
    ];
    const out = cropLines(lines, 12);
    expect(out.length).toBeLessThanOrEqual(12);
    expect(out[0]).toBe(lines[0]);
    expect(out.at(-1)).toBe("last line");
    expect(out).toContain("\x1b[33mServer failed: timeout\x1b[0m");
    const cut = out.filter((l) => l.startsWith("\u0000cut:")).reduce((n, l) => n + Number(l.slice(5)), 0);
    expect(cut + out.filter((l) => !l.startsWith("\u0000cut:")).length).toBe(lines.length);
  });
});

describe("renderTerminals", () => {
  const svg = renderTerminals(
    [
      { title: "server1 :5001", lines: SERVER_LOG },
      { title: "coordinator :8000", lines: Array.from({ length: 40 }, (_, i) => `line ${i}`) },
    ],
    { maxLines: 10, maxColumns: 60 },
  );

  test("draws one titled pane per role, side by side", () => {
    expect(svg).toStartWith("<svg ");
    expect(svg).toContain(">server1 :5001</text>");
    expect(svg).toContain(">coordinator :8000</text>");
    expect(svg.match(/class="pane"/g)?.length).toBe(2);
    const paneX = [...svg.matchAll(/<rect x="(\d+)" y="\d+" width="\d+" height="\d+" rx="6" class="pane"\/>/g)].map((m) => Number(m[1]));
    expect(paneX[1]).toBeGreaterThan(paneX[0]!);
  });

  test("keeps ANSI colours as fills and escapes XML", () => {
    expect(svg).toContain('<tspan fill="#e5c07b">Server https://127.0.0.1:5002 failed');
    expect(svg).toContain('<tspan fill="#f14c4c">');
    expect(svg).toContain("Hello &lt;world&gt; &amp; &quot;friends&quot;");
    expect(svg).not.toContain("\x1b");
  });

  test("cuts long logs with a marker and long lines with an ellipsis", () => {
    expect(svg).toMatch(/··· \d+ lines cut ···/);
    expect(svg).toContain("…</");
  });

  test("is well-formed XML to a parser nobody here wrote", async () => {
    expect(await runPython("import sys, xml.etree.ElementTree as E; print(E.fromstring(sys.stdin.read()).tag)", svg)).toBe("{http://www.w3.org/2000/svg}svg");
  });
});
