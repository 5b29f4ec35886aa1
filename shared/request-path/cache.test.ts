import { describe, expect, test } from "bun:test";
import { Cache } from "./cache.ts";

function clock(start = 1_000_000) {
  let t = start;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

describe("Cache", () => {
  test("single-flight: 100 concurrent misses compute once", async () => {
    const cache = new Cache<number>({ ttlMs: 1000, maxEntries: 10 });
    let computations = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const lookups = Array.from({ length: 100 }, () =>
      cache.getOrCompute("view", async () => {
        computations += 1;
        await gate;
        return 42;
      }),
    );
    release();
    const results = await Promise.all(lookups);
    expect(computations).toBe(1);
    expect(new Set(results.map((r) => r.value))).toEqual(new Set([42]));
    expect(cache.stats()).toMatchObject({ misses: 100, hits: 0, entries: 1 });
    expect((await cache.getOrCompute("view", async () => 0)).cached).toBe(true);
  });

  test("TTL: a hit reports its age, and the entry expires at the TTL", async () => {
    const c = clock();
    const cache = new Cache<string>({ ttlMs: 5000, maxEntries: 10, now: c.now });
    expect(await cache.getOrCompute("k", async () => "v1")).toEqual({ value: "v1", cached: false, ageMs: 0 });
    c.advance(4999);
    expect(await cache.getOrCompute("k", async () => "v2")).toEqual({ value: "v1", cached: true, ageMs: 4999 });
    c.advance(1);
    expect(await cache.getOrCompute("k", async () => "v2")).toEqual({ value: "v2", cached: false, ageMs: 0 });
  });

  test("LRU: the least recently used entry is evicted at the bound", () => {
    const cache = new Cache<number>({ ttlMs: 1000, maxEntries: 3 });
    cache.set("a", 1);
    cache.set("b", 2);
    cache.set("c", 3);
    cache.peek("a"); // a is now the most recently used
    cache.set("d", 4);
    expect(["a", "b", "c", "d"].map((k) => cache.peek(k)?.value)).toEqual([1, undefined, 3, 4]);
    expect(cache.stats()).toMatchObject({ entries: 3, evictions: 1 });
  });

  test("a stale entry (isFresh false) is recomputed", async () => {
    const cache = new Cache<{ generation: number }>({ ttlMs: 60_000, maxEntries: 1 });
    await cache.getOrCompute("k", async () => ({ generation: 1 }));
    const lookup = await cache.getOrCompute(
      "k",
      async () => ({ generation: 2 }),
      (v) => v.generation === 2,
    );
    expect(lookup).toEqual({ value: { generation: 2 }, cached: false, ageMs: 0 });
  });

  test("clear() counts an invalidation and keeps a fill begun before it out of the cache", async () => {
    const cache = new Cache<string>({ ttlMs: 60_000, maxEntries: 10 });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const slow = cache.getOrCompute("k", async () => {
      await gate;
      return "computed before the invalidation";
    });
    cache.clear();
    release();
    expect((await slow).value).toBe("computed before the invalidation");
    expect(cache.peek("k")).toBeUndefined();
    expect(cache.stats()).toEqual({ entries: 0, hits: 0, misses: 1, evictions: 0, invalidations: 1, hitRatio: 0 });
  });

  test("a fill begun before clear() does not remove the fill begun after it", async () => {
    const cache = new Cache<string>({ ttlMs: 60_000, maxEntries: 10 });
    let releaseOld!: () => void;
    const old = cache.getOrCompute("k", () => new Promise<string>((r) => (releaseOld = () => r("old"))));
    cache.clear();
    let computations = 0;
    let releaseNew!: () => void;
    const compute = () =>
      new Promise<string>((r) => {
        computations += 1;
        releaseNew = () => r("new");
      });
    const first = cache.getOrCompute("k", compute);
    await Promise.resolve(); // let the first fill start before the old one finishes
    releaseOld();
    await old;
    const second = cache.getOrCompute("k", compute);
    releaseNew();
    expect([(await first).value, (await second).value, computations]).toEqual(["new", "new", 1]);
  });

  test("a failed computation is not cached and the next caller retries", async () => {
    const cache = new Cache<string>({ ttlMs: 60_000, maxEntries: 10 });
    await expect(
      cache.getOrCompute("k", async () => {
        throw new Error("db down");
      }),
    ).rejects.toThrow("db down");
    expect((await cache.getOrCompute("k", async () => "ok")).value).toBe("ok");
  });

  test("hit ratio", async () => {
    const cache = new Cache<number>({ ttlMs: 60_000, maxEntries: 10 });
    for (let i = 0; i < 4; i++) await cache.getOrCompute("k", async () => 1);
    expect(cache.stats().hitRatio).toBe(0.75);
  });
});
