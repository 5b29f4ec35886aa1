// The bench's load generator: C workers sending back to back for a fixed time, with a latency histogram.
import type { Progress } from "./progress.ts";

/** The nearest-rank percentile of values sorted ascending; 0 for none. */
function rank(sorted: ArrayLike<number>, p: number): number {
  return sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

export function percentile(values: readonly number[], p: number): number {
  return rank(Float64Array.from(values).sort(), p);
}

export interface LatencySummary {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

/** Every latency in ms; runs of a few hundred thousand requests fit, and percentiles are then exact. */
export class Latencies {
  readonly values: number[] = [];

  add(ms: number): void {
    this.values.push(ms);
  }

  merge(other: Latencies): void {
    for (const v of other.values) this.values.push(v);
  }

  summary(): LatencySummary {
    const sorted = Float64Array.from(this.values).sort();
    const at = (p: number) => rank(sorted, p);
    const sum = this.values.reduce((a, b) => a + b, 0);
    return { count: sorted.length, p50: at(50), p90: at(90), p99: at(99), max: at(100), mean: sorted.length ? sum / sorted.length : 0 };
  }
}

export interface LoadRun {
  requests: number;
  errors: number;
  /** The first few error texts, for the report. */
  errorSamples: string[];
  latencies: Latencies;
  elapsedMs: number;
}

export interface LoadOptions {
  concurrency: number;
  durationMs: number;
  /** One request by worker `worker`; resolves true when it succeeded. A throw or false counts as an error. */
  request(worker: number): Promise<boolean | string>;
  progress?: Progress;
  label?: string;
  /** Called between requests with the time since the run began, so a fault can be injected part-way. */
  during?(elapsedMs: number): void;
}

export async function runLoad(options: LoadOptions): Promise<LoadRun> {
  const run: LoadRun = { requests: 0, errors: 0, errorSamples: [], latencies: new Latencies(), elapsedMs: 0 };
  const started = performance.now();
  const fail = (why: string) => {
    run.errors += 1;
    if (run.errorSamples.length < 5) run.errorSamples.push(why);
  };
  await Promise.all(Array.from({ length: options.concurrency }, async (_, worker) => {
    for (;;) {
      const elapsed = performance.now() - started;
      if (elapsed >= options.durationMs) return;
      options.during?.(elapsed);
      const t0 = performance.now();
      try {
        const outcome = await options.request(worker);
        if (outcome !== true) fail(outcome === false ? "failed" : outcome);
      } catch (error) {
        fail((error as Error).message);
      }
      run.latencies.add(performance.now() - t0);
      run.requests += 1;
      options.progress?.status(() => `${options.label ?? "load"}: ${run.requests.toLocaleString("en")} requests, ${run.errors} errors`);
    }
  }));
  run.elapsedMs = performance.now() - started;
  return run;
}
