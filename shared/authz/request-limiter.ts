// Per-identity request limits, enforced where the identity is known (issue 20): requests in flight at once and a
// request rate (a token bucket), both read from the live policy on every request, so an edit applies at once.
// A request over a limit is refused before any work is done: 429, a JSON error and Retry-After.
import { TooManyRequests } from "../platform/errors.ts";
import { printable, type Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import type { Limits } from "./limits.ts";

/** How often one identity's refusals of one kind are written as an audit line; the rest are counted in it. */
export const LIMIT_LOG_INTERVAL_MS = 10_000;
/** Identities remembered before idle ones are forgotten: a flood of names cannot grow the map without bound. */
const MAX_TRACKED = 10_000;

interface IdentityState {
  inFlight: number;
  refused: { inFlight: number; rate: number };
  lastRefusedAt: number | null;
  /** Tokens in the bucket as of `refilledAt` (ms), or Infinity while the identity has no rate limit. */
  tokens: number;
  refilledAt: number;
}

export interface RequestLimiterOptions {
  /** The identity's limits under the policy in force (Authorizer.limits): read on every request. */
  limits: (identity: string) => Limits;
  logger: Logger;
  metrics?: Metrics;
  /** Milliseconds, for the token bucket; tests pass their own clock. */
  now?: () => number;
}

export class RequestLimiter {
  readonly #limits: (identity: string) => Limits;
  readonly #logger: Logger;
  readonly #now: () => number;
  readonly #state = new Map<string, IdentityState>();
  readonly #lastLogged = new Map<string, { at: number; suppressed: number }>();
  readonly #refusals;

  constructor({ limits, logger, metrics = new Metrics(), now = () => performance.now() }: RequestLimiterOptions) {
    this.#limits = limits;
    this.#logger = logger;
    this.#now = now;
    this.#refusals = metrics.counter(
      "securemesh_limit_refusals_total",
      "Requests refused with 429 because their identity was over a policy limit, by identity and limit.",
      ["identity", "limit"],
    );
  }

  /**
   * Takes a place for one request of `identity`, or throws TooManyRequests. The returned function gives the place
   * back; calling it more than once gives it back once.
   */
  admit(identity: string): () => void {
    const limits = this.#limits(identity);
    const now = this.#now();
    const state = this.#stateOf(identity, now);
    if (state.inFlight >= limits.inFlight) {
      state.refused.inFlight += 1;
      state.lastRefusedAt = Date.now();
      this.#refuse(identity, "in_flight", `${limits.inFlight} requests in flight`);
      throw new TooManyRequests("ERR_IN_FLIGHT_LIMIT", `${identity} already has ${limits.inFlight} requests in flight, its limit`, 1);
    }
    if (limits.rate) {
      const { perSecond, burst } = limits.rate;
      // A bucket made before the rate was set (or under another rate) starts full under the new one.
      state.tokens = Math.min(burst, (Number.isFinite(state.tokens) ? state.tokens : burst) + ((now - state.refilledAt) / 1000) * perSecond);
      state.refilledAt = now;
      if (state.tokens < 1) {
        const retryAfter = Math.max(1, Math.ceil((1 - state.tokens) / perSecond));
        state.refused.rate += 1;
        state.lastRefusedAt = Date.now();
        this.#refuse(identity, "rate", `${perSecond} requests a second, burst ${burst}`);
        throw new TooManyRequests("ERR_RATE_LIMITED", `${identity} is over its rate of ${perSecond} requests a second`, retryAfter);
      }
      state.tokens -= 1;
    } else {
      state.tokens = Infinity;
      state.refilledAt = now;
    }
    state.inFlight += 1;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      state.inFlight -= 1;
    };
  }

  /**
   * Runs `work` in a place of `identity`'s, given back however `work` ends; a refusal is a rejected promise. Not an
   * async function, for the CPU an extra promise layer costs on every request (see Traffic in platform/http.ts).
   */
  run<T>(identity: string, work: () => Promise<T> | T): Promise<T> {
    let release: () => void;
    let pending: Promise<T> | T;
    try {
      release = this.admit(identity);
    } catch (error) {
      return Promise.reject(error);
    }
    try {
      pending = work();
    } catch (error) {
      release();
      return Promise.reject(error);
    }
    return Promise.resolve(pending).then(
      (value) => {
        release();
        return value;
      },
      (error: unknown) => {
        release();
        throw error;
      },
    );
  }

  /** Every identity seen lately: its requests in flight and its refusals, for the status page. */
  snapshot(): { identity: string; inFlight: number; refused: { inFlight: number; rate: number }; lastRefusedAt: number | null }[] {
    return [...this.#state].map(([identity, s]) => ({ identity, inFlight: s.inFlight, refused: { ...s.refused }, lastRefusedAt: s.lastRefusedAt }));
  }

  /** Requests in flight now, by identity (those with any). */
  inFlight(): Record<string, number> {
    return Object.fromEntries([...this.#state].filter(([, s]) => s.inFlight > 0).map(([id, s]) => [id, s.inFlight]));
  }

  #stateOf(identity: string, now: number): IdentityState {
    let state = this.#state.get(identity);
    if (!state) {
      if (this.#state.size >= MAX_TRACKED) this.#forgetIdle();
      state = { inFlight: 0, tokens: Infinity, refilledAt: now, refused: { inFlight: 0, rate: 0 }, lastRefusedAt: null };
      this.#state.set(identity, state);
    }
    return state;
  }

  /**
   * Forgets identities with nothing in flight, those never refused first: their buckets refill to full by the time
   * they come back, or nearly, and the status page keeps who was limited.
   */
  #forgetIdle(): void {
    for (const [identity, state] of this.#state) if (state.inFlight === 0 && state.lastRefusedAt === null) this.#state.delete(identity);
    if (this.#state.size < MAX_TRACKED) return;
    for (const [identity, state] of this.#state) if (state.inFlight === 0) this.#state.delete(identity);
  }

  /** One audit line per identity and kind every LIMIT_LOG_INTERVAL_MS, naming how many more; every refusal counted. */
  #refuse(identity: string, limit: "in_flight" | "rate", what: string): void {
    this.#refusals.inc({ identity: identity || "-", limit });
    const key = `${limit} ${identity}`;
    const now = performance.now();
    const seen = this.#lastLogged.get(key);
    if (seen && now - seen.at < LIMIT_LOG_INTERVAL_MS) {
      seen.suppressed += 1;
      return;
    }
    if (this.#lastLogged.size >= MAX_TRACKED) this.#lastLogged.clear();
    const more = seen && seen.suppressed > 0 ? ` (and ${seen.suppressed} more in the last ${Math.round((now - seen.at) / 1000)} s)` : "";
    this.#lastLogged.set(key, { at: now, suppressed: 0 });
    const fields = { identity: printable(identity || "-"), limit, decision: "limited" };
    this.#logger.warn(`AUTHZ limited identity=${fields.identity} limit=${limit} (${what}): answered 429${more}`, { authz: fields });
  }
}
