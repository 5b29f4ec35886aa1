// An in-memory cache: TTL, an entry bound with LRU eviction, single-flight fills, and counters.

export interface CacheOptions {
  ttlMs: number;
  maxEntries: number;
  /** Milliseconds clock; injectable so tests move time without sleeping. */
  now?: () => number;
}

export interface CacheStats {
  entries: number;
  hits: number;
  misses: number;
  evictions: number;
  invalidations: number;
  /** hits / (hits + misses), 0 before the first lookup. */
  hitRatio: number;
}

export interface Lookup<V> {
  value: V;
  cached: boolean;
  /** How old the value is: 0 for a fresh computation. */
  ageMs: number;
}

interface Entry<V> {
  value: V;
  storedAt: number;
}

/**
 * @example
 * const cache = new Cache<string>({ ttlMs: 30_000, maxEntries: 100 });
 * const { value, cached } = await cache.getOrCompute("view", () => expensive());
 */
export class Cache<V> {
  readonly #entries = new Map<string, Entry<V>>();
  readonly #inflight = new Map<string, Promise<Lookup<V>>>();
  readonly #ttlMs: number;
  readonly #maxEntries: number;
  readonly #now: () => number;
  /** Bumped by every invalidation, so a fill that began before it is not stored after it. */
  #epoch = 0;
  #hits = 0;
  #misses = 0;
  #evictions = 0;
  #invalidations = 0;

  constructor(options: CacheOptions) {
    if (!(options.ttlMs > 0) || !(options.maxEntries >= 1)) throw new TypeError("cache needs ttlMs > 0 and maxEntries >= 1");
    this.#ttlMs = options.ttlMs;
    this.#maxEntries = Math.floor(options.maxEntries);
    this.#now = options.now ?? Date.now;
  }

  /** The live entry for `key`, refreshed as most recently used; expired entries are dropped. */
  peek(key: string): Lookup<V> | undefined {
    const entry = this.#entries.get(key);
    if (!entry) return undefined;
    const ageMs = this.#now() - entry.storedAt;
    if (ageMs >= this.#ttlMs) {
      this.#entries.delete(key);
      return undefined;
    }
    this.#entries.delete(key);
    this.#entries.set(key, entry);
    return { value: entry.value, cached: true, ageMs };
  }

  set(key: string, value: V): void {
    this.#entries.delete(key);
    this.#entries.set(key, { value, storedAt: this.#now() });
    while (this.#entries.size > this.#maxEntries) {
      this.#entries.delete(this.#entries.keys().next().value!);
      this.#evictions += 1;
    }
  }

  /**
   * Returns the cached value, or computes it once however many callers miss at the same time.
   * `isFresh` lets the caller reject a live entry (for example one from an older store generation).
   */
  async getOrCompute(key: string, compute: () => Promise<V>, isFresh: (value: V) => boolean = () => true): Promise<Lookup<V>> {
    const hit = this.peek(key);
    if (hit && isFresh(hit.value)) {
      this.#hits += 1;
      return hit;
    }
    if (hit) this.#entries.delete(key);
    this.#misses += 1;
    const pending = this.#inflight.get(key);
    if (pending) return pending;
    const epoch = this.#epoch;
    const fill: Promise<Lookup<V>> = Promise.resolve()
      .then(compute)
      .then((value) => {
        if (epoch === this.#epoch) this.set(key, value);
        return { value, cached: false, ageMs: 0 };
      })
      .finally(() => {
        // After a clear(), a newer fill may own the slot; only remove our own.
        if (this.#inflight.get(key) === fill) this.#inflight.delete(key);
      });
    this.#inflight.set(key, fill);
    return fill;
  }

  /** Drops every entry, and any fill already under way from being stored. */
  clear(): void {
    this.#entries.clear();
    this.#inflight.clear();
    this.#epoch += 1;
    this.#invalidations += 1;
  }

  stats(): CacheStats {
    const lookups = this.#hits + this.#misses;
    return {
      entries: this.#entries.size,
      hits: this.#hits,
      misses: this.#misses,
      evictions: this.#evictions,
      invalidations: this.#invalidations,
      hitRatio: lookups === 0 ? 0 : this.#hits / lookups,
    };
  }
}
