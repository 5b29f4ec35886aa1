import { expect, test } from "bun:test";
import { Progress } from "./progress.ts";

function capture(isTTY: boolean) {
  let out = "";
  let clock = 0;
  const progress = new Progress({ stream: { isTTY, write: (text: string) => (out += text) }, now: () => clock, redrawMs: 100 });
  return { progress, out: () => out, advance: (ms: number) => (clock += ms) };
}

test("on a TTY: a status line rewritten in place with counts and elapsed time, throttled, cleared by a lasting line", () => {
  const { progress, out, advance } = capture(true);
  progress.status("load: 10 requests");
  progress.status("load: 11 requests"); // within redrawMs: skipped
  advance(1500);
  progress.status(() => "load: 900 requests");
  progress.line("done");
  expect(out()).toBe("\r\x1b[2Kload: 10 requests · 0.0 s\r\x1b[2Kload: 900 requests · 1.5 s\r\x1b[2Kdone\n");
});

test("off a TTY: only plain lines, no escapes and no status (a status function is not even called)", () => {
  const { progress, out, advance } = capture(false);
  progress.status("load: 10 requests");
  progress.status(() => {
    throw new Error("built off a TTY");
  });
  advance(2000);
  progress.line(`round 1/5 done (${progress.elapsed()})`);
  expect(out()).toBe("round 1/5 done (2.0 s)\n");
});
