// Reads /metrics output with a parser nobody here wrote, plus the format rules it does not check.
import parsePrometheusTextFormat, { type MetricFamily } from "parse-prometheus-text-format";
import { handledAs } from "./peers.ts";

const SAMPLE_LINE = /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\["\\n])*",?)*\})? (-?[0-9.e+-]+|[+-]Inf|NaN)$/;

export interface Exposition {
  families: Map<string, MetricFamily>;
  text: string;
  /** One sample's value, found by a subset of its labels; a histogram's _count. Undefined when absent. */
  value(name: string, labels?: Record<string, string>): number | undefined;
}

/** Parses Prometheus text, failing on any line outside the grammar and on histograms that do not add up. */
export function parsePrometheus(text: string): Exposition {
  if (!text.endsWith("\n")) throw new Error("exposition must end with a newline");
  for (const line of text.split("\n").slice(0, -1)) {
    if (line.startsWith("# HELP ") || line.startsWith("# TYPE ")) continue;
    if (!SAMPLE_LINE.test(line)) throw new Error(`not a Prometheus sample line: ${line}`);
  }
  const families = new Map(parsePrometheusTextFormat(text).map((f) => [f.name, f]));
  for (const family of families.values()) {
    if (family.type === "HISTOGRAM") checkHistogram(family.name, text);
  }
  return { families, text, value: (name, labels = {}) => sampleValue(families, text, name, labels) };
}

/** The identity roles/policy.json lets read /metrics (metrics.read): what an operator's scraper holds. */
export const SCRAPER_IDENTITY = "spiffe://securemesh/client/prometheus";

/**
 * GET /metrics through app.handle as SCRAPER_IDENTITY, once the requests before it are counted (Elysia counts after
 * responding). Give it the app itself, not one wrapped by handledAs, which would bind its own caller instead.
 */
export async function scrape(app: { handle(request: Request): Promise<Response> }): Promise<Exposition> {
  await new Promise((resolve) => setImmediate(resolve));
  const response = await handledAs(app, SCRAPER_IDENTITY).handle(new Request("http://localhost/metrics"));
  if (response.status !== 200 || !response.headers.get("content-type")?.startsWith("text/plain; version=0.0.4")) {
    throw new Error(`/metrics answered ${response.status} ${response.headers.get("content-type")}`);
  }
  return parsePrometheus(await response.text());
}

/** The npm parser drops a histogram's labels, so histograms are read from the text itself. */
function sampleValue(families: Map<string, MetricFamily>, text: string, name: string, labels: Record<string, string>): number | undefined {
  const family = families.get(name);
  if (family?.type === "HISTOGRAM") {
    const wanted = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
    const line = text.split("\n").find((l) => l.startsWith(`${name}_count`) && wanted.every((pair) => l.includes(pair)));
    return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  const sample = family?.metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v));
  return sample === undefined ? undefined : Number(sample.value);
}

/** Per series: buckets never fall as `le` grows, and the +Inf bucket equals _count. */
function checkHistogram(name: string, text: string): void {
  const series = new Map<string, { le: number; n: number }[]>();
  const counts = new Map<string, number>();
  for (const line of text.split("\n")) {
    const bucket = line.match(new RegExp(`^${name}_bucket\\{(.*?),?le="([^"]+)"\\} (\\S+)$`));
    if (bucket) {
      const list = series.get(bucket[1]!) ?? [];
      list.push({ le: bucket[2] === "+Inf" ? Infinity : Number(bucket[2]), n: Number(bucket[3]) });
      series.set(bucket[1]!, list);
    }
    const count = line.match(new RegExp(`^${name}_count(?:\\{(.*)\\})? (\\S+)$`));
    if (count) counts.set(count[1] ?? "", Number(count[2]));
  }
  for (const [labels, buckets] of series) {
    buckets.sort((a, b) => a.le - b.le);
    buckets.forEach((b, i) => {
      if (i > 0 && b.n < buckets[i - 1]!.n) throw new Error(`${name}{${labels}}: buckets are not cumulative`);
    });
    if (buckets.at(-1)?.le !== Infinity || buckets.at(-1)!.n !== counts.get(labels)) throw new Error(`${name}{${labels}}: +Inf bucket differs from _count`);
  }
}
