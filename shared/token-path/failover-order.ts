// The order in which a token-path client tries its peers (the SecureProxy its KeyServers, an application its
// SecureProxies): the configured order, with a peer that failed in the last few seconds moved to the end, so a dead
// host costs one failed attempt, not one per request, and a restarted one is back in use within `holdMs`.

/** How long a failed peer is tried last. */
export const FAILOVER_HOLD_MS = 5000;

export class FailoverOrder {
  readonly urls: readonly string[];
  readonly #failedAt = new Map<string, number>();
  readonly #holdMs: number;
  readonly #now: () => number;

  constructor(urls: readonly string[], options: { holdMs?: number; now?: () => number } = {}) {
    if (urls.length === 0) throw new TypeError("at least one URL is needed");
    this.urls = urls.map((url) => url.replace(/\/+$/, ""));
    this.#holdMs = options.holdMs ?? FAILOVER_HOLD_MS;
    this.#now = options.now ?? Date.now;
  }

  /** Every URL, each once: the ones not held back in configured order, then the held ones, longest held first. */
  order(): string[] {
    const now = this.#now();
    const held = (url: string) => now - (this.#failedAt.get(url) ?? -Infinity) < this.#holdMs;
    const fresh = this.urls.filter((url) => !held(url));
    const late = this.urls.filter(held).sort((a, b) => this.#failedAt.get(a)! - this.#failedAt.get(b)!);
    return [...fresh, ...late];
  }

  failed(url: string): void {
    this.#failedAt.set(url, this.#now());
  }

  succeeded(url: string): void {
    this.#failedAt.delete(url);
  }

  /** Whether `url` failed within the hold: for a health view. */
  isHeld(url: string): boolean {
    return this.#now() - (this.#failedAt.get(url) ?? -Infinity) < this.#holdMs;
  }
}
