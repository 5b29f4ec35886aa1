// Per-identity request limits (issue 20): in flight and rate, each from the live policy, refused with 429 and
// Retry-After, one audit line per identity and kind in a window, every refusal counted.
import { describe, expect, test } from "bun:test";
import { TooManyRequests } from "../platform/errors.ts";
import { createLogger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { DEFAULT_CONNECTIONS, DEFAULT_IN_FLIGHT, type Limits } from "./limits.ts";
import { RequestLimiter } from "./request-limiter.ts";

const CLIENT1 = "spiffe://securemesh/client/client1";
const CLIENT2 = "spiffe://securemesh/client/client2";

function setup(limitsOf: (identity: string) => Partial<Limits>) {
  const logs: string[] = [];
  const metrics = new Metrics();
  let clock = 0;
  const limiter = new RequestLimiter({
    limits: (identity) => ({ connections: DEFAULT_CONNECTIONS, inFlight: DEFAULT_IN_FLIGHT, rate: null, ...limitsOf(identity) }),
    logger: createLogger("server", { format: "text", color: false, write: (l) => logs.push(l) }),
    metrics,
    now: () => clock,
  });
  return { limiter, logs, metrics, advance: (ms: number) => (clock += ms) };
}

/** What admit() did: "ok", or the refusal's code and Retry-After. */
function tryAdmit(limiter: RequestLimiter, identity: string): string {
  try {
    limiter.admit(identity);
    return "ok";
  } catch (error) {
    if (!(error instanceof TooManyRequests)) throw error;
    return `${error.status} ${error.code} retry-after=${error.retryAfterSeconds}`;
  }
}

describe("in flight", () => {
  test("an identity gets its in-flight limit, the next is refused; a finished request frees its place; others are untouched", async () => {
    const { limiter } = setup((id) => (id === CLIENT2 ? { inFlight: 2 } : {}));
    const releases = [limiter.admit(CLIENT2), limiter.admit(CLIENT2)];
    expect(tryAdmit(limiter, CLIENT2)).toBe("429 ERR_IN_FLIGHT_LIMIT retry-after=1");
    expect(tryAdmit(limiter, CLIENT1)).toBe("ok");
    releases[0]!();
    releases[0]!(); // a second release gives nothing back twice
    expect(limiter.inFlight()[CLIENT2]).toBe(1);
    expect(tryAdmit(limiter, CLIENT2)).toBe("ok");
    expect(tryAdmit(limiter, CLIENT2)).toBe("429 ERR_IN_FLIGHT_LIMIT retry-after=1");
  });

  test("run() gives the place back when the work throws", async () => {
    const { limiter } = setup(() => ({ inFlight: 1 }));
    await expect(limiter.run(CLIENT1, () => Promise.reject(new Error("store down")))).rejects.toThrow("store down");
    expect(await limiter.run(CLIENT1, () => "done")).toBe("done");
    expect(limiter.inFlight()).toEqual({});
  });
});

describe("rate (a token bucket)", () => {
  test("a burst passes, the next waits for a token; Retry-After says how long; the bucket refills at the rate", () => {
    const { limiter, advance } = setup(() => ({ rate: { perSecond: 2, burst: 3 } }));
    const admitted = () => {
      try {
        limiter.admit(CLIENT1)();
        return true;
      } catch {
        return false;
      }
    };
    expect([admitted(), admitted(), admitted()]).toEqual([true, true, true]);
    expect(tryAdmit(limiter, CLIENT1)).toBe("429 ERR_RATE_LIMITED retry-after=1");
    advance(499);
    expect(admitted()).toBe(false);
    advance(1);
    expect(admitted()).toBe(true);
    advance(60_000); // a quiet minute refills to the burst, not beyond
    expect(Array.from({ length: 5 }, admitted)).toEqual([true, true, true, false, false]);
  });

  test("Retry-After rounds up to whole seconds at a slow rate", () => {
    const { limiter } = setup(() => ({ rate: { perSecond: 1, burst: 1 } }));
    limiter.admit(CLIENT1)();
    expect(tryAdmit(limiter, CLIENT1)).toBe("429 ERR_RATE_LIMITED retry-after=1");
    const slow = setup(() => ({ rate: { perSecond: 1, burst: 1 } }));
    slow.limiter.admit(CLIENT1)();
    slow.advance(100);
    expect(tryAdmit(slow.limiter, CLIENT1)).toBe("429 ERR_RATE_LIMITED retry-after=1");
  });

  test("limits are read on every request: a policy edit applies to the next one", () => {
    let rate: Limits["rate"] = null;
    const { limiter } = setup(() => ({ rate }));
    for (let i = 0; i < 50; i++) limiter.admit(CLIENT1)();
    rate = { perSecond: 1, burst: 2 };
    expect([tryAdmit(limiter, CLIENT1), tryAdmit(limiter, CLIENT1), tryAdmit(limiter, CLIENT1)]).toEqual(["ok", "ok", "429 ERR_RATE_LIMITED retry-after=1"]);
    rate = null;
    expect(tryAdmit(limiter, CLIENT1)).toBe("ok");
  });
});

describe("every refusal is counted; the audit line is written once per identity and kind in a window", () => {
  test("a flood of refusals writes one line naming the identity and the limit, and counts each", () => {
    const { limiter, logs, metrics } = setup((id) => (id === CLIENT2 ? { inFlight: 1, rate: { perSecond: 1, burst: 1 } } : {}));
    limiter.admit(CLIENT2);
    for (let i = 0; i < 100; i++) tryAdmit(limiter, CLIENT2);
    const lines = logs.filter((l) => l.includes("AUTHZ limited"));
    expect(lines).toEqual([`AUTHZ limited identity=${CLIENT2} limit=in_flight (1 requests in flight): answered 429`]);
    expect(metrics.render()).toContain(`securemesh_limit_refusals_total{identity="${CLIENT2}",limit="in_flight"} 100`);
  });

  test("an identity with control characters is escaped in the line", () => {
    const { limiter, logs } = setup(() => ({ inFlight: 1 }));
    limiter.admit("spiffe://securemesh/client/x\n\x1b[2J");
    tryAdmit(limiter, "spiffe://securemesh/client/x\n\x1b[2J");
    expect(logs.join("")).not.toMatch(/[\n\x1b]/);
  });
});
