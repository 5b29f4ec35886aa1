import { expect, test } from "bun:test";
import { accessDate, createLogger } from "./log.ts";

const fixed = () => new Date(2026, 10, 22, 23, 19, 42);

test("text access lines match the seed's Flask format", () => {
  const lines: string[] = [];
  const log = createLogger("server", { format: "text", color: false, write: (l) => lines.push(l), now: fixed });
  log.access("127.0.0.1", "POST", "/api/data", 200);
  log.info("Decrypted data: hi (from client1)");
  expect(lines).toEqual(['127.0.0.1 - - [22/Nov/2026 23:19:42] "POST /api/data HTTP/1.1" 200 -', "Decrypted data: hi (from client1)"]);
});

test("LOG_FORMAT=json gives one JSON object per line", () => {
  const lines: string[] = [];
  const log = createLogger("coordinator", { format: "json", write: (l) => lines.push(l), now: fixed });
  log.warn("Server https://127.0.0.1:5001 failed: ECONNREFUSED", { upstream: "https://127.0.0.1:5001" });
  log.access("127.0.0.1", "GET", "/health", 200);
  const [warn, access] = lines.map((l) => JSON.parse(l));
  expect(warn).toEqual({
    time: fixed().toISOString(),
    level: "warn",
    role: "coordinator",
    msg: "Server https://127.0.0.1:5001 failed: ECONNREFUSED",
    upstream: "https://127.0.0.1:5001",
  });
  expect(access).toMatchObject({ level: "info", msg: "access", method: "GET", path: "/health", status: 200 });
});

test("colour only when asked, and never in JSON", () => {
  const lines: string[] = [];
  createLogger("x", { format: "text", color: true, write: (l) => lines.push(l) }).error("boom");
  createLogger("x", { format: "text", color: false, write: (l) => lines.push(l) }).error("boom");
  expect(lines).toEqual(["\x1b[31mboom\x1b[0m", "boom"]);
  expect(accessDate(new Date(2026, 0, 5, 1, 2, 3))).toBe("05/Jan/2026 01:02:03");
});

// (#11 L1) Caller-supplied text reaches log lines (a server's error text, a JSON field name, a request path): no
// message may start a second line or carry a terminal escape.
const FORGED = 'bad\n127.0.0.1 - - [22/Nov/2026 23:19:42] "GET /x HTTP/1.1" 200 -\r\x1b[2J';

test("a text line stays one line without escape bytes, whatever the message holds", () => {
  for (const color of [false, true]) {
    const lines: string[] = [];
    const log = createLogger("x", { format: "text", color, write: (l) => lines.push(l) });
    log.info(FORGED);
    log.warn(FORGED);
    log.error(FORGED);
    expect(lines).toHaveLength(3);
    for (const line of lines) {
      expect(line.split(/[\n\r\u2028\u2029]/)).toHaveLength(1);
      // The colour codes the logger adds stay real; nothing of the message reaches the terminal as an escape.
      const inner = color ? line.replace(/^\x1b\[3[13]m/, "").replace(/\x1b\[0m$/, "") : line;
      expect(inner).not.toContain("\x1b");
      expect(inner).toContain('bad\\x0a127.0.0.1 - - [22/Nov/2026 23:19:42] "GET /x HTTP/1.1" 200 -\\x0d\\x1b[2J');
    }
  }
  const colored: string[] = [];
  createLogger("x", { format: "text", color: true, write: (l) => colored.push(l) }).error("a\x1bb");
  expect(colored).toEqual(["\x1b[31ma\\x1bb\x1b[0m"]);
});

test("the access line's method, path and remote are escaped too", () => {
  const lines: string[] = [];
  const log = createLogger("x", { format: "text", color: false, write: (l) => lines.push(l), now: fixed });
  log.access("127.0.0.1\n", "GET\x1b[2J", '/x HTTP/1.1" 200 -\n127.0.0.1 - - [x] "GET /admin\u2028', 404);
  expect(lines).toEqual(['127.0.0.1\\x0a - - [22/Nov/2026 23:19:42] "GET\\x1b[2J /x HTTP/1.1" 200 -\\x0a127.0.0.1 - - [x] "GET /admin\\u2028 HTTP/1.1" 404 -']);
});

test("JSON lines escape messages and field values, and fields cannot overwrite the logger's own keys", () => {
  const lines: string[] = [];
  const log = createLogger("json", { format: "json", write: (l) => lines.push(l), now: fixed });
  log.warn(FORGED, { upstream: FORGED, level: "info", msg: "forged", count: 10n });
  log.access("127.0.0.1", "GET", "/\u2028x", 200);
  expect(lines).toHaveLength(2);
  for (const line of lines) {
    expect(line).not.toMatch(/[\n\r\x1b\u2028\u2029]/);
  }
  const warn = JSON.parse(lines[0]!);
  expect(warn).toMatchObject({ level: "warn", role: "json", msg: FORGED, upstream: FORGED, count: "10" });
  expect(JSON.parse(lines[1]!).path).toBe("/\u2028x");
});

test("an access line ends with the request's trace, in text and in JSON", () => {
  const lines: string[] = [];
  const text = createLogger("server", { format: "text", color: false, write: (l) => lines.push(l), now: fixed });
  text.access("127.0.0.1", "POST", "/api/data", 200, { field: "trace", id: "4bf92f3577b34da6a3ce929d0e0e4736" });
  text.access("127.0.0.1", "GET", "/health", 200, { field: "request_id", id: "req-1" });
  createLogger("server", { format: "json", write: (l) => lines.push(l), now: fixed }).access("127.0.0.1", "GET", "/health", 200, {
    field: "request_id",
    id: "req-1",
  });
  expect(lines.slice(0, 2)).toEqual([
    '127.0.0.1 - - [22/Nov/2026 23:19:42] "POST /api/data HTTP/1.1" 200 - trace=4bf92f3577b34da6a3ce929d0e0e4736',
    '127.0.0.1 - - [22/Nov/2026 23:19:42] "GET /health HTTP/1.1" 200 - request_id=req-1',
  ]);
  expect(JSON.parse(lines[2]!)).toMatchObject({ msg: "access", path: "/health", status: 200, request_id: "req-1" });
});
