// The supervisor's view of its workers (shared/platform/worker-group.ts): one status page and one /metrics for
// the whole role. Each worker keeps its own upstream pool; this reads their admin listeners on loopback and merges.
import type { WorkerState } from "../platform/worker-group.ts";
import type { RoutingState, UpstreamState } from "../request-path/upstream.ts";
import { PROMETHEUS_CONTENT_TYPE } from "./metrics.ts";
import type { ClusterStatus, LimitStatus, PoolView } from "./status-page.ts";

/** How often the workers' state is read: the status page's own push interval. */
const POLL_MS = 250;

export class WorkerPoolView implements PoolView {
  readonly #workers: () => (WorkerState & { index: number })[];
  #latest = new Map<number, ClusterStatus>();
  #timer: ReturnType<typeof setInterval> | undefined;

  constructor(workers: () => (WorkerState & { index: number })[]) {
    this.#workers = workers;
  }

  start(): void {
    const poll = async () => {
      const states = this.#workers();
      const seen = await Promise.all(states.map(async (w) => [w.pid, await readJson<ClusterStatus>(w, "status")] as const));
      // A worker that did not answer (dying, restarting) drops out of the view until it does.
      this.#latest = new Map(seen.filter((entry): entry is readonly [number, ClusterStatus] => entry[1] !== null));
    };
    void poll();
    this.#timer = setInterval(() => void poll(), POLL_MS);
  }

  stop(): void {
    clearInterval(this.#timer);
  }

  /** Every server as the workers see it: in rotation only when every worker has it in rotation, counts summed. */
  snapshot(): UpstreamState[] {
    return mergeServerViews([...this.#latest.values()]);
  }

  /** The workers' routing as one: in panic while any worker is, counts added up. */
  routing(): RoutingState | null {
    return mergeRouting([...this.#latest.values()].flatMap((v) => (v.routing ? [v.routing] : [])));
  }

  /** Every caller limited at any worker: in flight and refusals summed over the workers, the latest refusal kept. */
  limits(): LimitStatus[] {
    const merged = new Map<string, LimitStatus>();
    for (const view of this.#latest.values()) {
      for (const l of view.limited ?? []) {
        const seen = merged.get(l.identity);
        if (!seen) {
          merged.set(l.identity, { ...l, refused: { ...l.refused } });
          continue;
        }
        seen.inFlight += l.inFlight;
        seen.refused.inFlight += l.refused.inFlight;
        seen.refused.rate += l.refused.rate;
        seen.lastRefusedAt = Math.max(seen.lastRefusedAt ?? 0, l.lastRefusedAt ?? 0) || null;
      }
    }
    return [...merged.values()];
  }

  /** Every worker's /metrics, each series labelled with its worker number (sum them with `sum without (worker)`). */
  async metricsResponse(): Promise<Response> {
    // Labelled by the worker's own number, not its place in the list: a series keeps its label while another
    // worker restarts (found by attack on #14).
    const texts = await Promise.all(this.#workers().map(async (w) => ({ worker: w.index, text: await readText(w, "metrics") })));
    return new Response(mergeMetrics(texts.flatMap((t) => (t.text === null ? [] : [{ worker: t.worker, text: t.text }]))), {
      headers: { "content-type": PROMETHEUS_CONTENT_TYPE },
    });
  }
}

export function mergeServerViews(views: ClusterStatus[]): UpstreamState[] {
  const merged = new Map<string, UpstreamState>();
  for (const view of views) {
    for (const server of view.servers) {
      const health =
        server.cache || server.facts ? { ...(server.cache ? { cache: server.cache } : {}), ...(server.facts ? { facts: server.facts } : {}) } : null;
      const seen = merged.get(server.url);
      if (!seen) {
        merged.set(server.url, {
          url: server.url,
          up: server.up,
          lastCheckedAt: server.lastCheckedAt,
          latencyMs: server.latencyMs,
          requests: server.requests,
          failures: server.failures,
          lastError: server.lastError,
          health,
          clockSkewMs: server.clockSkewMs,
          draining: server.draining,
          inFlight: server.inFlight,
          reachable: server.reachable,
          storeStatus: server.storeStatus,
          ejection: server.ejection,
        });
        continue;
      }
      const newer = (server.lastCheckedAt ?? 0) > (seen.lastCheckedAt ?? 0);
      seen.up &&= server.up;
      seen.draining ||= server.draining;
      seen.inFlight += server.inFlight;
      seen.reachable ||= server.reachable;
      // Any worker's ejection shows: the server is out of that worker's rotation.
      seen.ejection ??= server.ejection;
      seen.requests += server.requests;
      seen.failures += server.failures;
      if (newer)
        Object.assign(seen, {
          lastCheckedAt: server.lastCheckedAt,
          latencyMs: server.latencyMs,
          lastError: server.lastError ?? seen.lastError,
          health: health ?? seen.health,
          clockSkewMs: server.clockSkewMs ?? seen.clockSkewMs,
          storeStatus: server.storeStatus ?? seen.storeStatus,
        });
      // A worker that has the server out of rotation says why, whichever probed last.
      if (!server.up && server.lastError) seen.lastError = server.lastError;
    }
  }
  return [...merged.values()];
}

export function mergeRouting(views: RoutingState[]): RoutingState | null {
  const [first, ...rest] = views;
  if (!first) return null;
  const merged: RoutingState = { ...first, queue: { ...first.queue }, retryBudget: { ...first.retryBudget } };
  for (const v of rest) {
    merged.panic ||= v.panic;
    merged.panicSince = [merged.panicSince, v.panicSince].filter((t): t is number => t !== null).sort((a, b) => a - b)[0] ?? null;
    merged.panicEntries += v.panicEntries;
    merged.inRotation = Math.min(merged.inRotation, v.inRotation);
    merged.ejections += v.ejections;
    merged.ejectionsRefused += v.ejectionsRefused;
    for (const key of ["waiting", "queued", "timedOut", "full"] as const) merged.queue[key] += v.queue[key];
    for (const key of ["requests", "retries", "exhausted"] as const) merged.retryBudget[key] += v.retryBudget[key];
  }
  return merged;
}

/** Prometheus text from several processes as one exposition: HELP and TYPE once, a `worker` label on each sample. */
export function mergeMetrics(parts: { worker: number; text: string }[]): string {
  const meta = new Map<string, string[]>();
  const samples = new Map<string, string[]>();
  for (const { worker, text } of parts) {
    for (const line of text.split("\n")) {
      if (line === "") continue;
      const comment = /^# (HELP|TYPE) (\S+)/.exec(line);
      if (comment) {
        const name = comment[2]!;
        const lines = meta.get(name) ?? [];
        if (!lines.includes(line)) lines.push(line);
        meta.set(name, lines);
        continue;
      }
      const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (.*)$/.exec(line);
      if (!sample) continue;
      const [, name, labels, value] = sample;
      const labelled = labels ? `{worker="${worker}",${labels.slice(1)}` : `{worker="${worker}"}`;
      const family = familyOf(name!, meta);
      samples.set(family, [...(samples.get(family) ?? []), `${name}${labelled} ${value}`]);
    }
  }
  const out: string[] = [];
  for (const [family, lines] of samples) out.push(...(meta.get(family) ?? []), ...lines);
  return out.join("\n") + "\n";
}

/** A histogram's _bucket, _sum and _count samples belong to the family its HELP and TYPE name. */
function familyOf(name: string, meta: Map<string, string[]>): string {
  if (meta.has(name)) return name;
  const base = name.replace(/_(bucket|sum|count)$/, "");
  return meta.has(base) ? base : name;
}

async function readText(worker: WorkerState, path: string): Promise<string | null> {
  if (!worker.adminUrl) return null;
  try {
    const response = await fetch(new URL(path, worker.adminUrl), { signal: AbortSignal.timeout(1000) });
    return response.ok ? await response.text() : null;
  } catch {
    return null;
  }
}

async function readJson<T>(worker: WorkerState, path: string): Promise<T | null> {
  const text = await readText(worker, path);
  if (text === null) return null;
  try {
    return JSON.parse(text) as T;
  } catch {
    return null;
  }
}
