// Replay protection for token requests: a timestamp window and a bounded memory of the nonces seen in it, with a
// quota per caller so that one caller cannot fill the memory and block everyone else (#11 M3).
import { MeshError } from "../platform/errors.ts";

export class ReplayRejected extends MeshError {
  constructor(message: string) {
    super("ERR_REPLAY", 401, message);
  }
}

/** One caller used up its share of the nonce memory; the others are not affected (#11 M3). */
export class ReplayQuotaExceeded extends MeshError {
  constructor(caller: string) {
    super("ERR_REPLAY_QUOTA", 429, `too many token requests from ${caller || "an unidentified caller"} in the replay window; retry later`);
  }
}

const NONCE = /^[A-Za-z0-9_-]{16,128}$/;

export interface NonceMemoryOptions {
  /** A timestamp may be this far from now, either way (default 300 s). */
  windowMs?: number;
  /** Live nonces kept in all, whoever sent them (default 100,000). */
  maxEntries?: number;
  /** Live nonces kept for one caller (default 10,000). */
  maxPerCaller?: number;
  now?: () => number;
}

export class NonceMemory {
  readonly #seen = new Map<string, { expiresAt: number; caller: string }>();
  readonly #perCaller = new Map<string, number>();
  readonly #windowMs: number;
  readonly #maxEntries: number;
  readonly #maxPerCaller: number;
  readonly #now: () => number;

  constructor(options: NonceMemoryOptions = {}) {
    this.#windowMs = options.windowMs ?? 300_000;
    this.#maxEntries = options.maxEntries ?? 100_000;
    this.#maxPerCaller = options.maxPerCaller ?? 10_000;
    this.#now = options.now ?? Date.now;
  }

  get size(): number {
    return this.#seen.size;
  }

  /** Live nonces `caller` holds right now. */
  heldBy(caller: string): number {
    return this.#perCaller.get(caller) ?? 0;
  }

  /**
   * Accepts a (timestamp in seconds, nonce) pair once; refuses it outside ±window or when seen before. `caller`
   * is whom the request is for (the on-behalf-of identity at the KeyServer): its quota is what it may fill.
   */
  accept(timestampS: unknown, nonce: unknown, caller = ""): void {
    if (typeof timestampS !== "number" || !Number.isFinite(timestampS)) throw new ReplayRejected("timestamp must be a number of seconds since the epoch");
    if (typeof nonce !== "string" || !NONCE.test(nonce)) throw new ReplayRejected("nonce must be 16-128 characters of base64url");
    const now = this.#now();
    if (Math.abs(now - timestampS * 1000) > this.#windowMs) throw new ReplayRejected("timestamp outside the accepted window");
    this.#forgetExpired(now);
    if (this.#seen.has(nonce)) throw new ReplayRejected("nonce already used");
    // Full of live nonces: refuse rather than forget one that could then be replayed. The caller's own quota is
    // checked first, so a flooding caller hits its quota long before everyone shares the global bound.
    const held = this.heldBy(caller);
    if (held >= this.#maxPerCaller) throw new ReplayQuotaExceeded(caller);
    if (this.#seen.size >= this.#maxEntries) throw new MeshError("ERR_REPLAY_MEMORY_FULL", 503, "too many requests in the replay window; retry later");
    this.#seen.set(nonce, { expiresAt: now + 2 * this.#windowMs, caller });
    this.#perCaller.set(caller, held + 1);
  }

  /** Entries are kept for twice the window: a timestamp may be up to one window in the future. */
  #forgetExpired(now: number): void {
    for (const [nonce, { expiresAt, caller }] of this.#seen) {
      if (expiresAt > now) break; // insertion order is expiry order
      this.#seen.delete(nonce);
      const held = this.heldBy(caller) - 1;
      if (held > 0) this.#perCaller.set(caller, held);
      else this.#perCaller.delete(caller);
    }
  }
}
