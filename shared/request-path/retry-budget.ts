// A retry budget (as Linkerd's and Envoy's): re-sends are at most a share of the requests of a recent window, plus a
// small floor per second, so when every server is failing a little, retries cannot multiply the load on them.
import type { PoolClock } from "./pool-clock.ts";

export interface RetryBudgetOptions {
  /** Retries allowed as a share of the requests started in the window. */
  ratio: number;
  /** Retries allowed per second of the window whatever the traffic, so a quiet coordinator can still fail over. */
  minPerSecond: number;
  windowMs: number;
}

export const RETRY_BUDGET_PERCENT = 20;
export const RETRY_BUDGET_MIN_PER_SECOND = 3;
export const RETRY_BUDGET_WINDOW_MS = 10_000;
export const DEFAULT_RETRY_BUDGET: RetryBudgetOptions = {
  ratio: RETRY_BUDGET_PERCENT / 100,
  minPerSecond: RETRY_BUDGET_MIN_PER_SECOND,
  windowMs: RETRY_BUDGET_WINDOW_MS,
};

/** Counts kept per slice of the window, so old requests drop out of it slice by slice. */
const SLICES = 10;

export class RetryBudget {
  readonly #options: RetryBudgetOptions;
  readonly #clock: PoolClock;
  readonly #slices: { start: number; requests: number; retries: number }[] = [];
  #exhausted = 0;

  constructor(options: RetryBudgetOptions, clock: PoolClock) {
    if (!(options.ratio >= 0) || !(options.minPerSecond >= 0) || !(options.windowMs > 0))
      throw new TypeError("retry budget: ratio and minPerSecond must be >= 0, windowMs > 0");
    this.#options = options;
    this.#clock = clock;
  }

  /** Times a retry was refused because the budget was spent. */
  get exhausted(): number {
    return this.#exhausted;
  }

  /** A request started (its first attempt). */
  request(): void {
    this.#current().requests += 1;
  }

  /** Asks to re-send a failed attempt: true (and counted) while the budget allows it. */
  tryRetry(): boolean {
    const slice = this.#current();
    const { requests, retries } = this.usage();
    const { ratio, minPerSecond, windowMs } = this.#options;
    if (retries + 1 > ratio * requests + minPerSecond * (windowMs / 1000)) {
      this.#exhausted += 1;
      return false;
    }
    slice.retries += 1;
    return true;
  }

  /** Requests and retries within the window now. */
  usage(): { requests: number; retries: number } {
    this.#expire();
    return this.#slices.reduce((sum, s) => ({ requests: sum.requests + s.requests, retries: sum.retries + s.retries }), { requests: 0, retries: 0 });
  }

  #current() {
    this.#expire();
    const sliceMs = this.#options.windowMs / SLICES;
    const start = Math.floor(this.#clock.now() / sliceMs) * sliceMs;
    let last = this.#slices.at(-1);
    if (!last || last.start !== start) {
      last = { start, requests: 0, retries: 0 };
      this.#slices.push(last);
    }
    return last;
  }

  #expire(): void {
    const oldest = this.#clock.now() - this.#options.windowMs;
    while (this.#slices.length > 0 && this.#slices[0]!.start + this.#options.windowMs / SLICES <= oldest) this.#slices.shift();
  }
}
