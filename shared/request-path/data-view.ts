// get_data(), the servers' view of the stored records, and the cache in front of it.
import { Cache, type CacheStats } from "./cache.ts";
import type { Fernet } from "./fernet.ts";
import type { Logger } from "../ops/log.ts";
import type { Metrics } from "../ops/metrics.ts";
import type { ProofUse, RecordStore } from "./store.ts";

export interface RecordView {
  id: number;
  sender: string;
  server: number;
  createdAt: number;
  text: string;
}

export interface DataSnapshot {
  total: number;
  bySender: Record<string, number>;
  latest: RecordView[];
  /** The store generation read before the view was computed: the view is at least this new. */
  generation: number;
}

export const LATEST_RECORDS = 20;

/**
 * The uncached path: the counts (kept by the store as records are inserted, so no scan) plus the latest records,
 * decrypted; its cost does not grow with the store. Every server reads the same store.
 * With `sender`, only that sender's records: the view of a caller allowed to read its own records only (#11).
 */
export async function getData(store: RecordStore, fernet: Fernet, generation: number, sender?: string): Promise<DataSnapshot> {
  const [total, bySender, latest] = await Promise.all([store.count(), store.countsBySender(), store.latest(LATEST_RECORDS, sender)]);
  const own = sender === undefined ? null : (bySender[sender] ?? 0);
  return {
    total: own ?? total,
    bySender: own === null ? bySender : { [sender!]: own },
    latest: latest.map((r) => ({ id: r.id, sender: r.sender, server: r.server, createdAt: r.createdAt, text: readable(fernet, r.token) })),
    generation,
  };
}

function readable(fernet: Fernet, token: string): string {
  try {
    return fernet.decryptText(token);
  } catch {
    return "(unreadable: encrypted under a retired key)";
  }
}

export interface CachedRead {
  snapshot: DataSnapshot;
  cached: boolean;
  ageMs: number;
}

export interface ViewStats extends CacheStats {
  generation: number;
}

/**
 * get_data() behind a cache. Before a hit is served, the store's generation is read (one indexed row), and
 * entries are keyed by it: a write or invalidation this server never heard of still makes its copy a miss.
 * Keying by generation also keeps single-flight honest: a reader never joins a fill begun at an older one.
 */
export class CachedDataView {
  readonly #store: RecordStore;
  readonly #fernet: Fernet;
  readonly #cache: Cache<DataSnapshot>;
  readonly #logger: Logger;

  constructor(options: { store: RecordStore; fernet: Fernet; logger: Logger; ttlMs: number; maxEntries?: number; now?: () => number }) {
    this.#store = options.store;
    this.#fernet = options.fernet;
    this.#logger = options.logger;
    this.#cache = new Cache({ ttlMs: options.ttlMs, maxEntries: options.maxEntries ?? 16, now: options.now });
  }

  /**
   * `refresh` recomputes and refills even when a fresh entry exists (Cache-Control: no-cache); `sender` narrows
   * the view to that sender's own records, cached apart from the full view.
   */
  async read(refresh = false, sender?: string): Promise<CachedRead> {
    const generation = await this.#store.generation();
    const started = performance.now();
    const lookup = await this.#cache.getOrCompute(
      sender === undefined ? `get_data@${generation}` : `get_data@${generation}@${sender}`,
      () => getData(this.#store, this.#fernet, generation, sender),
      () => !refresh,
    );
    if (lookup.cached) {
      this.#logger.info(`Cache hit (age ${(lookup.ageMs / 1000).toFixed(1)} s, generation ${generation})`);
    } else {
      this.#logger.info(
        `Cache miss: get_data() read ${lookup.value.total} records in ${(performance.now() - started).toFixed(1)} ms (generation ${lookup.value.generation})`,
      );
    }
    return { snapshot: lookup.value, cached: lookup.cached, ageMs: lookup.ageMs };
  }

  /**
   * Clears this server's cache and moves the shared generation on, so every other server's copy is old too.
   * `proof` is used up in the same transaction, so the same invalidation proof cannot be replayed here.
   */
  async invalidate(proof?: ProofUse): Promise<number> {
    const generation = await this.#store.bumpGeneration(proof);
    this.#cache.clear();
    return generation;
  }

  /** Exposes the cache's counters on a role's /metrics. */
  exportMetrics(metrics: Metrics): void {
    metrics.collect("securemesh_cache_hits_total", "get_data() reads served from the cache.", "counter", () => [{ value: this.#cache.stats().hits }]);
    metrics.collect("securemesh_cache_misses_total", "get_data() reads computed from the store.", "counter", () => [{ value: this.#cache.stats().misses }]);
    metrics.collect("securemesh_cache_entries", "Entries held in the cache.", "gauge", () => [{ value: this.#cache.stats().entries }]);
  }

  /** `causal: false` for a health check, which must not wait behind a stalled database cluster (see RecordStore.generation). */
  async stats(options: { causal?: boolean } = {}): Promise<ViewStats> {
    return { ...this.#cache.stats(), generation: await this.#store.generation(options) };
  }
}
