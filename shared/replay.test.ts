import { expect, test } from "bun:test";
import { MeshError } from "./errors.ts";
import { NonceMemory, ReplayRejected } from "./replay.ts";

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
