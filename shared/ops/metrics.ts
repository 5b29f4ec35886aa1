// Prometheus text-format metrics: counters, histograms and gauges read at scrape time, with no client library.

type Labels = Record<string, string>;

/** Seconds; spans a cached read on loopback (sub-millisecond) to a timed-out upstream (seconds). */
export const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export const PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

function formatLabels(labels: Labels, extra?: [string, string]): string {
  const pairs = Object.entries(labels);
  if (extra) pairs.push(extra);
  return pairs.length === 0 ? "" : `{${pairs.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(",")}}`;
}

function formatValue(value: number): string {
  if (value === Infinity) return "+Inf";
  if (value === -Infinity) return "-Inf";
  return Number.isNaN(value) ? "NaN" : String(value);
}

/** Labels in the declared order, so {a,b} and {b,a} are one series. */
function seriesKey(labelNames: readonly string[], labels: Labels): string {
  return labelNames.map((name) => labels[name] ?? "").join("\u0000");
}

interface Family {
  render(): string[];
}

export class Counter<L extends string = never> implements Family {
  readonly #series = new Map<string, { labels: Labels; value: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly labelNames: readonly L[] = [],
  ) {}

  inc(labels: Record<L, string> = {} as Record<L, string>, by = 1): void {
    const key = seriesKey(this.labelNames, labels);
    const series = this.#series.get(key);
    if (series) series.value += by;
    else this.#series.set(key, { labels: { ...labels }, value: by });
  }

  render(): string[] {
    return [...this.#series.values()].map((s) => `${this.name}${formatLabels(s.labels)} ${formatValue(s.value)}`);
  }
}

export class Histogram<L extends string = never> implements Family {
  readonly #series = new Map<string, { labels: Labels; counts: number[]; sum: number; count: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly labelNames: readonly L[] = [],
    readonly buckets: readonly number[] = LATENCY_BUCKETS,
  ) {}

  observe(labels: Record<L, string>, value: number): void {
    const key = seriesKey(this.labelNames, labels);
    let series = this.#series.get(key);
    if (!series) {
      series = { labels: { ...labels }, counts: new Array<number>(this.buckets.length).fill(0), sum: 0, count: 0 };
      this.#series.set(key, series);
    }
    // Counts per bucket here; render() makes them cumulative, as the format wants.
    const index = this.buckets.findIndex((bound) => value <= bound);
    if (index >= 0) series.counts[index]! += 1;
    series.sum += value;
    series.count += 1;
  }

  render(): string[] {
    const lines: string[] = [];
    for (const s of this.#series.values()) {
      let cumulative = 0;
      this.buckets.forEach((bound, i) => {
        cumulative += s.counts[i]!;
        lines.push(`${this.name}_bucket${formatLabels(s.labels, ["le", formatValue(bound)])} ${cumulative}`);
      });
      lines.push(`${this.name}_bucket${formatLabels(s.labels, ["le", "+Inf"])} ${s.count}`);
      lines.push(`${this.name}_sum${formatLabels(s.labels)} ${formatValue(s.sum)}`);
      lines.push(`${this.name}_count${formatLabels(s.labels)} ${s.count}`);
    }
    return lines;
  }
}

/** Values owned elsewhere (a cache's counters, a pool's state), read when scraped rather than copied on change. */
export class Collected implements Family {
  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: "gauge" | "counter",
    readonly read: () => { labels?: Labels; value: number }[],
  ) {}

  render(): string[] {
    return this.read().map((s) => `${this.name}${formatLabels(s.labels ?? {})} ${formatValue(s.value)}`);
  }
}

/** One role's metrics. Every family is registered once, at start, and rendered in registration order. */
export class Metrics {
  readonly #families: { name: string; help: string; type: string; family: Family }[] = [];
  readonly #started = Date.now() / 1000;

  constructor() {
    this.collect("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds.", "gauge", () => [{ value: this.#started }]);
    this.collect("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge", () => [{ value: process.memoryUsage().rss }]);
  }

  /** A second registration of the same name and kind gets the first family: two apps of one role share it. */
  #register<F extends Family>(name: string, help: string, type: string, make: () => F): F {
    if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(name)) throw new TypeError(`bad metric name: ${name}`);
    const existing = this.#families.find((f) => f.name === name);
    if (existing) {
      if (existing.type !== type || !(existing.family instanceof Counter || existing.family instanceof Histogram))
        throw new TypeError(`metric registered twice: ${name}`);
      return existing.family as unknown as F;
    }
    const family = make();
    this.#families.push({ name, help, type, family });
    return family;
  }

  counter<L extends string = never>(name: string, help: string, labelNames: readonly L[] = []): Counter<L> {
    return this.#register(name, help, "counter", () => new Counter(name, help, labelNames));
  }

  histogram<L extends string = never>(name: string, help: string, labelNames: readonly L[] = [], buckets?: readonly number[]): Histogram<L> {
    return this.#register(name, help, "histogram", () => new Histogram(name, help, labelNames, buckets));
  }

  collect(name: string, help: string, type: "gauge" | "counter", read: Collected["read"]): void {
    this.#register(name, help, type, () => new Collected(name, help, type, read));
  }

  /** The exposition text; a family with no samples yet still declares its HELP and TYPE. */
  render(): string {
    const lines: string[] = [];
    for (const { name, help, type, family } of this.#families) {
      lines.push(`# HELP ${name} ${help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")}`, `# TYPE ${name} ${type}`, ...family.render());
    }
    return lines.join("\n") + "\n";
  }

  response(): Response {
    return new Response(this.render(), { headers: { "content-type": PROMETHEUS_CONTENT_TYPE } });
  }
}
