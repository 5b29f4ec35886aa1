import { expect, test } from "bun:test";
import { accessDate, createLogger } from "./log.ts";

const fixed = () => new Date(2026, 10, 22, 23, 19, 42);

test("text access lines match the seed's Flask format", () => {
  const lines: string[] = [];
  const log = createLogger("server", { format: "text", color: false, write: (l) => lines.push(l), now: fixed });
  log.access("127.0.0.1", "POST", "/api/data", 200);
  log.info("Decrypted data: hi (from client1)");
  expect(lines).toEqual([
    '127.0.0.1 - - [22/Nov/2026 23:19:42] "POST /api/data HTTP/1.1" 200 -',
    "Decrypted data: hi (from client1)",
  ]);
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
