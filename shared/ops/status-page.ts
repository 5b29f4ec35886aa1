// The coordinator's admin listener: a live status page (server-sent events), its JSON, and /metrics.
import { MeshError } from "../platform/errors.ts";
import { createApp, requestUrl } from "../platform/http.ts";
import type { Logger } from "./log.ts";
import type { Metrics } from "./metrics.ts";
import type { RoutingState, UpstreamState } from "../request-path/upstream.ts";
import { EXPIRY_WARNING_MS, expiryWarningMs, SKEW_WARNING_MS } from "../service/host-facts.ts";

/**
 * What the admin listener reads: one process's UpstreamPool (and its request limiter), or a supervisor's merged
 * view of its workers.
 */
export interface PoolView {
  snapshot(): UpstreamState[];
  /** Panic, ejections, the queue and the retry budget; null while a supervisor has heard from no worker. */
  routing(): RoutingState | null;
  /** Callers that met a limit of theirs here (issue 20), from the role's RequestLimiter. */
  limits?(): LimitStatus[];
}

/** One caller's requests in flight here and its requests refused with 429, by which limit (the policy's limits). */
export interface LimitStatus {
  identity: string;
  inFlight: number;
  refused: { inFlight: number; rate: number };
  /** Date.now() of its last refusal, or null. */
  lastRefusedAt: number | null;
}

/**
 * The pool's view of a server, with the cache counters picked out of its last /health answer, and the host it runs
 * on (its URL's host name or address: with each role on its own machine, which machine a row is about, #14).
 */
export type ServerStatus = Omit<UpstreamState, "health"> & {
  host: string;
  cache: { hits: number; misses: number; hitRatio: number } | null;
  facts: ServerFacts | null;
};

/** What a server says of itself on /health (shared/service/host-facts.ts), as the page shows it. */
export interface ServerFacts {
  hostname: string;
  policy: string;
  crl: string;
  certificateExpires: string;
  /** Empty from a server that does not say it (an older version): the warning is then 14 days before the end. */
  certificateIssued: string;
  store: string | null;
}

// The limits are the host check's (shared/service/host-facts.ts): the page warns on what `check` fails on.
export { EXPIRY_WARNING_MS, SKEW_WARNING_MS };

/** "https://[fd00::11]:5001" → "fd00::11"; "https://server1.mesh.test:5001" → "server1.mesh.test". */
function hostOf(url: string): string {
  try {
    return new URL(url).hostname.replace(/^\[|\]$/g, "");
  } catch {
    return "";
  }
}

export interface ClusterStatus {
  /** The coordinator's clock, so the page says "checked 0.4 s ago" without trusting the browser's clock. */
  now: number;
  serversUp: number;
  servers: ServerStatus[];
  /** Mismatches between hosts (policy, CRL, database), clocks apart, certificates about to expire (issue 23). */
  warnings: string[];
  /** Panic, ejections, the queue and the retry budget (issue 20). */
  routing: RoutingState | null;
  /** Callers that met a limit here, most refused first. */
  limited: LimitStatus[];
}

/** How often an open page is sent the state when it changed; well under any health-check interval. */
export const STATUS_PUSH_MS = 250;
/** A comment line this often keeps idle proxies and Bun's idle timeout from closing a quiet stream. */
const KEEPALIVE_MS = 5000;

function cacheOf(health: UpstreamState["health"]): ServerStatus["cache"] {
  const cache = health?.cache as { hits?: unknown; misses?: unknown; hitRatio?: unknown } | undefined;
  if (typeof cache?.hits !== "number" || typeof cache.misses !== "number") return null;
  return { hits: cache.hits, misses: cache.misses, hitRatio: typeof cache.hitRatio === "number" ? cache.hitRatio : 0 };
}

function factsOf(health: UpstreamState["health"]): ServerFacts | null {
  const facts = health?.facts as Record<string, unknown> | undefined;
  const text = (key: string) => (typeof facts?.[key] === "string" ? (facts[key] as string) : "");
  if (!facts || !text("policy")) return null;
  return {
    hostname: text("hostname"),
    policy: text("policy"),
    crl: text("crl"),
    certificateExpires: text("certificateExpires"),
    certificateIssued: text("certificateIssued"),
    store: text("store") || null,
  };
}

/** One line per thing that differs between the servers, or is about to go wrong on one. */
export function fleetWarnings(servers: readonly ServerStatus[], now: number): string[] {
  const warnings: string[] = [];
  const differing = (label: string, read: (f: ServerFacts) => string | null) => {
    const values = new Map<string, string[]>();
    for (const s of servers) {
      const value = s.facts ? read(s.facts) : null;
      if (value) values.set(value, [...(values.get(value) ?? []), s.url]);
    }
    if (values.size > 1) warnings.push(`${label} differs between servers: ${[...values].map(([v, urls]) => `${v} on ${urls.join(", ")}`).join("; ")}`);
  };
  differing("policy", (f) => f.policy);
  differing("CRL number", (f) => f.crl);
  differing("database (store id)", (f) => f.store);
  for (const s of servers) {
    if (s.clockSkewMs !== null && Math.abs(s.clockSkewMs) > SKEW_WARNING_MS)
      warnings.push(`${s.url}: clock ${(s.clockSkewMs / 1000).toFixed(1)} s off this coordinator's`);
    const expires = s.facts ? Date.parse(s.facts.certificateExpires) : NaN;
    const warnFor = expiryWarningMs(s.facts ? Date.parse(s.facts.certificateIssued) : NaN, expires);
    if (expires - now < warnFor) warnings.push(`${s.url}: certificate ${expires < now ? "expired" : "expires"} ${s.facts!.certificateExpires}`);
  }
  return warnings;
}

export function clusterStatus(pool: PoolView, now = Date.now()): ClusterStatus {
  const servers = pool.snapshot().map(({ health, ...state }) => ({ ...state, host: hostOf(state.url), cache: cacheOf(health), facts: factsOf(health) }));
  const limited = (pool.limits?.() ?? [])
    .filter((l) => l.refused.inFlight + l.refused.rate > 0)
    .sort((a, b) => b.refused.inFlight + b.refused.rate - (a.refused.inFlight + a.refused.rate));
  return { now, serversUp: servers.filter((s) => s.up).length, servers, warnings: fleetWarnings(servers, now), routing: pool.routing(), limited };
}

/** A stream of `data: <status JSON>` events, sent at once and then whenever the status changes. */
function statusEvents(pool: PoolView, signal: AbortSignal): Response {
  const encoder = new TextEncoder();
  let timer: ReturnType<typeof setInterval> | undefined;
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      let last = "";
      let lastSentAt = 0;
      const push = () => {
        const status = clusterStatus(pool);
        const { now: _now, ...state } = status; // the clock alone is no change
        const current = JSON.stringify(state);
        try {
          if (current !== last) {
            controller.enqueue(encoder.encode(`data: ${JSON.stringify(status)}\n\n`));
            last = current;
            lastSentAt = Date.now();
          } else if (Date.now() - lastSentAt > KEEPALIVE_MS) {
            controller.enqueue(encoder.encode(": keep-alive\n\n"));
            lastSentAt = Date.now();
          }
        } catch {
          clearInterval(timer); // the page went away
        }
      };
      push();
      timer = setInterval(push, STATUS_PUSH_MS);
      signal.addEventListener("abort", () => clearInterval(timer));
    },
    cancel() {
      clearInterval(timer);
    },
  });
  return new Response(stream, { headers: { "content-type": "text/event-stream", "cache-control": "no-store" } });
}

/** Names of this machine's loopback: always allowed in the admin listener's Host header, with any port. */
export const LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"] as const;

/** "Example:80" → "example:80", "::1" → "[::1]": one spelling per host to compare. */
function normalHost(host: string): string {
  const lower = host.trim().toLowerCase();
  return lower.includes(":") && !lower.startsWith("[") && lower.indexOf(":") !== lower.lastIndexOf(":") ? `[${lower}]` : lower;
}

/** The host part of a Host header, without its port ("[::1]:9901" → "[::1]"). */
function withoutPort(host: string): string {
  return host.startsWith("[") ? host.slice(0, host.indexOf("]") + 1) : host.replace(/:\d*$/, "");
}

/**
 * A web page can reach a loopback listener through DNS rebinding: its own name, re-resolved to 127.0.0.1, is
 * still what the browser puts in Host. So the admin listener answers only Host names that mean this machine's
 * loopback, or the ones it was configured with (`allowedHosts`, e.g. its --admin-host, with or without a port).
 */
function hostAllowed(host: string, allowedHosts: readonly string[]): boolean {
  const given = normalHost(host);
  const name = withoutPort(given);
  if ((LOOPBACK_HOSTS as readonly string[]).includes(name)) return true;
  return allowedHosts.some((entry) => {
    const allowed = normalHost(entry);
    return allowed === withoutPort(allowed) ? allowed === name : allowed === given;
  });
}

export function createAdminApp({
  pool,
  logger,
  metrics,
  allowedHosts = [],
  metricsResponse,
  accessLog = true,
}: {
  pool: PoolView;
  logger: Logger;
  metrics: Metrics;
  /** /metrics from elsewhere: a supervisor serves its workers' merged (shared/ops/worker-view.ts). */
  metricsResponse?: () => Promise<Response>;
  /** Host names (host or host:port) answered besides LOOPBACK_HOSTS: the admin listener's own, when not loopback. */
  allowedHosts?: readonly string[];
  /** Off for a worker's own admin listener, which its supervisor reads four times a second. */
  accessLog?: boolean;
}) {
  const app = createApp({
    logger,
    metrics,
    // The admin listener is loopback-only and outside mutual TLS: whoever reaches it may scrape it.
    metricsRoute: metricsResponse ? false : () => {},
    accessLog,
  })
    .onRequest(({ request }) => {
      // An HTTP/1.0 request without Host (a health checker) cannot come from a browser, so it gets through.
      const host = request.headers.get("host") ?? requestUrl(request).host;
      if (!hostAllowed(host, allowedHosts)) throw new MeshError("ERR_HOST_NOT_ALLOWED", 421, "Host header not allowed on the admin listener");
    })
    .get("/", () => new Response(STATUS_PAGE, { headers: { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" } }))
    .get("/status", () => clusterStatus(pool))
    .get("/events", ({ request }) => statusEvents(pool, request.signal));
  return metricsResponse ? app.get("/metrics", () => metricsResponse()) : app;
}

// A static page: no framework, no build step, nothing fetched from elsewhere.
const STATUS_PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>securemesh coordinator</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d1f21; background: #fafafa; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  h2 { font-size: 15px; margin: 20px 0 8px; }
  #summary { color: #555; margin-bottom: 16px; }
  table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 3px #0002; }
  th, td { padding: 8px 14px; text-align: left; border-bottom: 1px solid #eee; white-space: nowrap; }
  th { font-weight: 600; color: #555; background: #f3f3f3; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .state { font-weight: 700; text-transform: uppercase; }
  tr.up .state { color: #1a7f37; }
  tr.down .state { color: #cf222e; }
  tr.down { background: #fff5f5; }
  tr.draining .state { color: #9a6700; }
  .error { color: #cf222e; font-size: 12px; }
  #connection { font-size: 12px; color: #888; margin-top: 12px; }
  #warnings { color: #9a6700; background: #fff8c5; margin: 0 0 16px; padding: 8px 8px 8px 28px; }
  #warnings:empty { display: none; }
  tr.ejected { background: #fff8c5; }
  tr.ejected .state { color: #9a6700; }
  .stalled { color: #9a6700; font-weight: 600; }
  #panic { color: #fff; background: #cf222e; padding: 8px 12px; margin: 0 0 12px; font-weight: 600; }
  #panic:empty { display: none; }
  #routing { color: #555; font-size: 12px; margin: 0 0 12px; }
</style>
</head>
<body>
<h1>securemesh coordinator</h1>
<div id="summary">connecting…</div>
<div id="panic"></div>
<div id="routing"></div>
<ul id="warnings"></ul>
<table>
  <thead><tr><th>Server</th><th>State</th><th>Last checked</th><th>Host</th><th>Latency</th><th>Requests</th><th>Failures</th><th>Cache hit ratio</th><th>Machine</th><th>Policy</th><th>CRL</th><th>Certificate expires</th><th>Clock</th><th>Last error</th><th>Store</th><th>Ejection</th></tr></thead>
  <tbody id="servers"></tbody>
</table>
<h2 id="limits-title" hidden>Callers over their limits</h2>
<table id="limits" hidden>
  <thead><tr><th>Identity</th><th>In flight</th><th>Refused: in flight</th><th>Refused: rate</th><th>Last refused</th></tr></thead>
  <tbody></tbody>
</table>
<div id="connection"></div>
<script>
  const rows = document.getElementById("servers");
  const summary = document.getElementById("summary");
  const warnings = document.getElementById("warnings");
  const connection = document.getElementById("connection");
  const panic = document.getElementById("panic");
  const routing = document.getElementById("routing");
  const limits = document.getElementById("limits");
  const limitsTitle = document.getElementById("limits-title");
  let status = null, skew = 0;

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }
  function ago(at) {
    if (at === null) return "not yet";
    const s = Math.max(0, (Date.now() + skew - at) / 1000);
    return s < 60 ? s.toFixed(1) + " s ago" : Math.round(s / 60) + " min ago";
  }
  function until(at) {
    return "for " + Math.max(0, (at - Date.now() - skew) / 1000).toFixed(1) + " s";
  }
  function renderRouting(r) {
    if (!r) { panic.textContent = ""; routing.textContent = ""; return; }
    panic.textContent = r.panic ? "Panic routing since " + ago(r.panicSince) + ": " + r.inRotation + " of " + r.total + " servers in rotation, under " +
      Math.round(r.panicThreshold * 100) + " %; requests go to every server that answers" : "";
    const b = r.retryBudget, q = r.queue;
    routing.textContent = "Ejections: " + r.ejections + " (at most " + r.maxEjected + " of " + r.total + " servers out; " + r.ejectionsRefused + " refused at the cap) · " +
      "Panic entered " + r.panicEntries + " times · " +
      "Queue: " + q.waiting + " waiting (max " + q.maxWaiting + ", timeout " + q.timeoutMs + " ms), " + q.queued + " queued, " + q.timedOut + " timed out, " + q.full + " turned away full · " +
      "Retry budget: " + b.retries + " retries for " + b.requests + " requests in " + b.windowMs / 1000 + " s (" + Math.round(b.ratio * 100) + " % + " + b.minPerSecond + "/s), exhausted " + b.exhausted + " times";
  }
  function render() {
    if (!status) return;
    summary.textContent = status.serversUp + " of " + status.servers.length + " servers up";
    renderRouting(status.routing);
    warnings.replaceChildren(...status.warnings.map((w) => { const li = document.createElement("li"); li.textContent = w; return li; }));
    rows.replaceChildren(...status.servers.map((s) => {
      const row = document.createElement("tr");
      // Drained by an operator (admin.drain): no new requests; what is still in flight shows it emptying.
      const state = s.draining ? "drained, " + s.inFlight + " in flight" : s.up ? "up" : s.ejection ? "ejected" : "down";
      row.className = s.draining ? "draining" : s.up ? "up" : s.ejection ? "ejected" : "down";
      row.dataset.server = s.url;
      cell(row, s.url);
      cell(row, state, "state");
      cell(row, ago(s.lastCheckedAt));
      cell(row, s.host);
      cell(row, s.latencyMs === null ? "–" : s.latencyMs.toFixed(1) + " ms", "num");
      cell(row, String(s.requests), "num");
      cell(row, String(s.failures), "num");
      cell(row, s.cache ? (s.cache.hitRatio * 100).toFixed(1) + " % (" + s.cache.hits + "/" + (s.cache.hits + s.cache.misses) + ")" : "–", "num");
      cell(row, s.facts ? s.facts.hostname : "–");
      cell(row, s.facts ? s.facts.policy : "–");
      cell(row, s.facts ? s.facts.crl : "–");
      cell(row, s.facts ? s.facts.certificateExpires.slice(0, 10) : "–");
      cell(row, s.clockSkewMs === null ? "–" : (s.clockSkewMs >= 0 ? "+" : "") + s.clockSkewMs + " ms", "num");
      cell(row, s.lastError || "", "error");
      cell(row, s.storeStatus || "–", s.storeStatus === "stalled" ? "stalled" : "");
      cell(row, s.ejection ? until(s.ejection.until) + " (#" + s.ejection.count + "): " + s.ejection.reason : "", "ejection");
      return row;
    }));
    // Callers the policy's limits refused with 429 (issue 20): whose, which limit, how often.
    limits.hidden = limitsTitle.hidden = status.limited.length === 0;
    limits.tBodies[0].replaceChildren(...status.limited.map((l) => {
      const row = document.createElement("tr");
      row.dataset.identity = l.identity;
      cell(row, l.identity);
      cell(row, String(l.inFlight), "num");
      cell(row, String(l.refused.inFlight), "num");
      cell(row, String(l.refused.rate), "num");
      cell(row, ago(l.lastRefusedAt));
      return row;
    }));
  }
  const events = new EventSource("events");
  events.onmessage = (e) => { status = JSON.parse(e.data); skew = status.now - Date.now(); render(); connection.textContent = "live"; };
  events.onerror = () => { connection.textContent = "connection to the coordinator lost; retrying…"; };
  setInterval(render, 500); // keeps "last checked" ticking between events
</script>
</body>
</html>
`;
