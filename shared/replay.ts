// Replay protection for token requests: a timestamp window and a bounded memory of the nonces seen in it.
import { MeshError } from "./errors.ts";

export class ReplayRejected extends MeshError {
  constructor(message: string) {
    super("ERR_REPLAY", 401, message);
  }
}

const NONCE = /^[A-Za-z0-9_-]{16,128}$/;

export class NonceMemory {
  readonly #seen = new Map<string, number>();
  readonly #windowMs: number;
  readonly #maxEntries: number;
  readonly #now: () => number;

  constructor(options: { windowMs?: number; maxEntries?: number; now?: () => number } = {}) {
    this.#windowMs = options.windowMs ?? 300_000;
    this.#maxEntries = options.maxEntries ?? 100_000;
    this.#now = options.now ?? Date.now;
  }

  get size(): number {
    return this.#seen.size;
  }

  /** Accepts a (timestamp in seconds, nonce) pair once; refuses it outside ±window or when seen before. */
  accept(timestampS: unknown, nonce: unknown): void {
    if (typeof timestampS !== "number" || !Number.isFinite(timestampS)) throw new ReplayRejected("timestamp must be a number of seconds since the epoch");
    if (typeof nonce !== "string" || !NONCE.test(nonce)) throw new ReplayRejected("nonce must be 16-128 characters of base64url");
    const now = this.#now();
    if (Math.abs(now - timestampS * 1000) > this.#windowMs) throw new ReplayRejected("timestamp outside the accepted window");
    this.#forgetExpired(now);
    if (this.#seen.has(nonce)) throw new ReplayRejected("nonce already used");
    // Full of live nonces: refuse rather than forget one that could then be replayed.
    if (this.#seen.size >= this.#maxEntries) throw new MeshError("ERR_REPLAY_MEMORY_FULL", 503, "too many requests in the replay window; retry later");
    this.#seen.set(nonce, now + 2 * this.#windowMs);
  }

  /** Entries are kept for twice the window: a timestamp may be up to one window in the future. */
  #forgetExpired(now: number): void {
    for (const [nonce, expiresAt] of this.#seen) {
      if (expiresAt > now) break; // insertion order is expiry order
      this.#seen.delete(nonce);
    }
  }
}
