import { expect, test } from "bun:test";
import { MeshError } from "../platform/errors.ts";
import { NonceMemory, ReplayQuotaExceeded, ReplayRejected } from "./replay.ts";

const nonce = (caller: string, i: number) => `nonce-${caller}-${String(i).padStart(12, "0")}`;

test("each nonce once; old nonces are forgotten after the window; memory is bounded", () => {
  let now = 1_000_000_000;
  const memory = new NonceMemory({ windowMs: 300_000, maxEntries: 3, now: () => now });
  const ts = () => now / 1000;
  memory.accept(ts(), "nonce-aaaaaaaaaaaaaaaa");
  expect(() => memory.accept(ts(), "nonce-aaaaaaaaaaaaaaaa")).toThrow(ReplayRejected);
  memory.accept(ts(), "nonce-bbbbbbbbbbbbbbbb");
  memory.accept(ts(), "nonce-cccccccccccccccc");
  // Full of live nonces: refuse rather than forget one that could then be replayed.
  expect(() => memory.accept(ts(), "nonce-dddddddddddddddd")).toThrow(MeshError);
  now += 600_001;
  memory.accept(ts(), "nonce-dddddddddddddddd");
  expect(memory.size).toBe(1);
  expect(() => memory.accept(ts() - 301, "nonce-eeeeeeeeeeeeeeee")).toThrow("timestamp outside the accepted window");
  expect(() => memory.accept(ts(), "short")).toThrow("nonce must be 16-128 characters of base64url");
});

// #11 M3: one global memory let client2's flood (447 requests/s) block client1's genuine request with a 503.
test("a caller that fills its quota gets 429; another caller is still accepted", () => {
  let now = 1_000_000_000;
  const memory = new NonceMemory({ maxPerCaller: 5, maxEntries: 100, now: () => now });
  const ts = () => now / 1000;
  const flooder = "spiffe://securemesh/client/client2";
  const victim = "spiffe://securemesh/client/client1";
  for (let i = 0; i < 5; i++) memory.accept(ts(), nonce("c2", i), flooder);
  let refused: unknown;
  try {
    memory.accept(ts(), nonce("c2", 5), flooder);
  } catch (error) {
    refused = error;
  }
  expect(refused).toBeInstanceOf(ReplayQuotaExceeded);
  expect((refused as MeshError).toJSON()).toEqual({
    error: `too many token requests from ${flooder} in the replay window; retry later`,
    code: "ERR_REPLAY_QUOTA",
  });
  expect((refused as MeshError).status).toBe(429);
  memory.accept(ts(), nonce("c1", 0), victim);
  expect([memory.heldBy(flooder), memory.heldBy(victim)]).toEqual([5, 1]);
  // The quota frees up as the flooder's nonces expire.
  now += 600_001;
  memory.accept(ts(), nonce("c2", 6), flooder);
  expect([memory.heldBy(flooder), memory.heldBy(victim), memory.size]).toEqual([1, 0, 1]);
});

test("the default quota is 10,000 per caller, within the global bound of 100,000", () => {
  const memory = new NonceMemory();
  const ts = Date.now() / 1000;
  for (let i = 0; i < 10_000; i++) memory.accept(ts, nonce("a", i), "A");
  expect(() => memory.accept(ts, nonce("a", 10_000), "A")).toThrow(ReplayQuotaExceeded);
  memory.accept(ts, nonce("b", 0), "B");
  expect(memory.size).toBe(10_001);
});
