// The upstream pool's sense of time: the wall clock in a role, a clock the test moves in unit tests, so ejection
// times, queue deadlines and the retry budget's window are tested without waiting.

export interface PoolClock {
  now(): number;
  /** Calls `fn` after `ms`; the returned function cancels it. */
  after(ms: number, fn: () => void): () => void;
}

export const systemClock: PoolClock = {
  now: () => Date.now(),
  after(ms, fn) {
    const timer = setTimeout(fn, ms);
    // An ejection's end or a queue deadline is no reason to keep a process alive.
    (timer as { unref?: () => void }).unref?.();
    return () => clearTimeout(timer);
  },
};
