// The role's own log line before its certificate runs out (issue 21), on real pki.sh certificates and real timers.
import { beforeAll, expect, test } from "bun:test";
import { createLogger } from "../ops/log.ts";
import { loadIdentity } from "../platform/tls.ts";
import { runPkiSh, testPki } from "../testing/pki.ts";
import { waitFor } from "../../harness/fixtures/index.ts";
import { ExpiryWatch, expiryMoments } from "./expiry-watch.ts";
import { EXPIRY_WARNING_MS } from "./host-facts.ts";

let pki: string;
beforeAll(async () => {
  pki = await testPki("expiry-watch");
});

/** pki.sh's date form, `seconds` from now. */
const stamp = (seconds: number) =>
  new Date(Math.floor(Date.now() / 1000 + seconds) * 1000)
    .toISOString()
    .replace(/[-:T]/g, "")
    .replace(/\.\d+Z$/, "Z");

async function issue(name: string, fromSeconds: number, toSeconds: number) {
  await runPkiSh(pki, "issue", name, "--server", "--not-before", stamp(fromSeconds), "--not-after", stamp(toSeconds));
  return loadIdentity(pki, name);
}

function watching(identity: ReturnType<typeof loadIdentity>, now?: () => number) {
  const lines: string[] = [];
  // JSON lines, which carry the level: "LEVEL message" here.
  const logger = createLogger("server", {
    format: "json",
    write: (line) => {
      const { level, msg } = JSON.parse(line) as { level: string; msg: string };
      lines.push(`${level.toUpperCase()} ${msg}`);
    },
  });
  return { lines, watch: new ExpiryWatch(logger, now).restart(identity) };
}

test("a demo certificate is warned about 14 days before its end, and says nothing at start", () => {
  const identity = loadIdentity(pki, "server");
  const { warnAt, expiresAt } = expiryMoments(identity);
  expect(expiresAt - warnAt).toBe(EXPIRY_WARNING_MS);
  const { lines, watch } = watching(identity);
  watch.stop();
  expect(lines).toEqual([]);
});

test("one warning when a sixth of the life is left, on its own timer, not before", async () => {
  // Life 63 s, warned with 10.5 s left: 1.5 s from now.
  const identity = await issue("warned-soon", -51, 12);
  const { lines, watch } = watching(identity);
  try {
    expect(lines).toEqual([]);
    const line = await waitFor("the warning line", () => lines.find((l) => l.includes("certificate expires at")), 10_000);
    expect(line).toMatch(/^WARN certificate expires at \d{4}-\d\d-\d\dT[\d:.]+Z, in 1\d? min: renew it/);
    expect(lines.length).toBe(1);
  } finally {
    watch.stop();
  }
});

test("already expired at start (a host that was off): one error line, at once", async () => {
  const identity = await issue("long-gone", -120, -60);
  const { lines, watch } = watching(identity);
  watch.stop();
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^ERROR certificate expired at .*: peers refuse it; renew it/);
});
