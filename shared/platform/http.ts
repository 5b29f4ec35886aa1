// The Elysia base every role builds on: JSON errors with stable codes, body limits, access log, and a safe listen.
import { Elysia } from "elysia";
import { BadRequest, ConfigError, MeshError, type ErrorCode } from "./errors.ts";
import { describeError, printable, type Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { traceOf, type Trace } from "../ops/trace.ts";
import { runtime, type ReloadableListener, type ServableApp, type ServerTls } from "./runtime/index.ts";
import type { Refusal } from "./runtime/admission.ts";
import type { Drainable } from "./drain.ts";
import { DEFAULT_BODY_LIMIT, IDLE_TIMEOUT_S } from "./runtime/limits.ts";
import { peerOf } from "./runtime/peer.ts";
import type tls from "node:tls";

export { DEFAULT_BODY_LIMIT, IDLE_TIMEOUT_S } from "./runtime/limits.ts";
export { bindPeer, peerIdentity, peerOf, type RequestPeer } from "./runtime/peer.ts";

/**
 * What each app's listener needs from createApp: its body limit (for listeners that read the body before the app
 * does, shared/platform/runtime/node-listener.ts), and its logger and metrics for the refusals it reports.
 */
const appContexts = new WeakMap<object, { bodyLimit: number; logger: Logger; metrics: Metrics }>();

export interface AppOptions {
  logger: Logger;
  bodyLimit?: number;
  /** Where request counts and latencies go; a role passes its own to add families of its own. */
  metrics?: Metrics;
  /**
   * Serve GET /metrics, asking this guard first on every request (it throws a MeshError to refuse: the roles ask the
   * policy for `metrics.read` by the caller's verified identity). Absent or false: no /metrics route. The series name
   * callers and what was decided for them, so on a mutual-TLS listener no certificate reads them unless allowed.
   */
  metricsRoute?: false | ((request: Request) => unknown);
  /**
   * One access line per request (default true). Off, requests are still counted and timed in the metrics: for a
   * benchmark against a proxy that logs nothing, or a role whose access lines go elsewhere.
   */
  accessLog?: boolean;
}

/** What the access log and the latency histogram need from a request's arrival, and its trace. */
const arrivals = new WeakMap<Request, { remote: string; at: number; path: string; trace: Trace }>();

/**
 * The trace of a request to an app made by createApp (read once, at arrival): the id its access line logs, and the
 * headers every call made onward for it must carry (`trace.outbound`).
 * @example await httpsClient.request(url, { method: "GET", headers: { ...requestTrace(request).outbound } })
 */
export function requestTrace(request: Request): Trace {
  return arrivals.get(request)?.trace ?? traceOf(request.headers);
}

function errorBody(status: number, error: string, code: ErrorCode, retryAfterSeconds?: number) {
  return new Response(JSON.stringify({ error, code }), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", ...(retryAfterSeconds === undefined ? {} : { "retry-after": String(retryAfterSeconds) }) },
  });
}

/**
 * Path and query of a request. An HTTP/1.0 request without a Host header (HAProxy's default health check sends one)
 * reaches Bun with a bare "/path" as its URL, which `new URL` alone rejects.
 */
export function requestUrl(request: Request): URL {
  return new URL(request.url, "http://localhost");
}

const requestPath = (request: Request) => requestUrl(request).pathname;

const bodyTooLarge = (limit: number) => new MeshError("ERR_BODY_TOO_LARGE", 413, `request body over the ${limit}-byte limit`);

/**
 * A request's body, read until `limit` bytes and no further: a body sent without Content-Length (chunked) is
 * counted as it arrives (#11 L6). Throws a MeshError 413 ERR_BODY_TOO_LARGE. For routes declared `{ parse: "none" }`,
 * which read the body themselves; every other route's body goes through it already (see createApp).
 */
export async function readBodyLimited(request: Request, limit = DEFAULT_BODY_LIMIT): Promise<Uint8Array> {
  const declared = request.headers.get("content-length");
  if (Number(declared ?? 0) > limit) throw bodyTooLarge(limit);
  if (!request.body) return new Uint8Array(0);
  // A body framed by its Content-Length alone is read whole: the server stops at the declared length, which is
  // within the limit, and one read costs a fraction of a stream's callbacks. A chunked body is counted as it comes.
  if (declared !== null && /^\d+$/.test(declared) && !request.headers.has("transfer-encoding")) {
    const body = new Uint8Array(await request.arrayBuffer());
    if (body.byteLength > limit) throw bodyTooLarge(limit);
    return body;
  }
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      void reader.cancel().catch(() => {}); // the rest is not wanted
      throw bodyTooLarge(limit);
    }
    chunks.push(value);
  }
  const body = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    body.set(chunk, at);
    at += chunk.byteLength;
  }
  return body;
}

/** Whether the route a request matched was declared `{ parse: "none" }`, as Elysia records it in its hooks. */
function parsesNothing(routes: readonly { method: string; path: string; hooks?: { parse?: unknown } }[], method: string, path: string | undefined): boolean {
  const route = routes.find((r) => r.path === path && r.method === method) ?? routes.find((r) => r.path === path && r.method === "ALL");
  const parse = route?.hooks?.parse;
  return (Array.isArray(parse) ? parse : [parse]).some((p) => p === "none" || (p as { fn?: unknown } | undefined)?.fn === "none");
}

/**
 * The body, read within the limit, parsed for the types Elysia parses by default (JSON, text, forms, bytes).
 * Other types, or none, leave it undefined, as Elysia does.
 */
async function parseBody(request: Request, contentType: string, limit: number): Promise<unknown> {
  const bytes = await readBodyLimited(request, limit);
  const type = contentType.trim().toLowerCase();
  const text = () => new TextDecoder().decode(bytes);
  if (type.startsWith("text/")) return text();
  switch (type) {
    case "application/json":
      try {
        return JSON.parse(text());
      } catch {
        throw new BadRequest("request body is not valid JSON");
      }
    case "application/x-www-form-urlencoded":
      return Object.fromEntries(new URLSearchParams(text()));
    case "application/octet-stream":
      return bytes.buffer;
    case "multipart/form-data":
      return Object.fromEntries(await new Response(bytes, { headers: { "content-type": request.headers.get("content-type") ?? type } }).formData());
    default:
      return undefined;
  }
}

/**
 * A new Elysia app with securemesh's error mapping and access log. Unknown routes get 404 JSON, known paths with
 * the wrong method 405 JSON, and no error reaches the client as a stack trace. Each request's trace (traceparent or
 * X-Request-Id, shared/ops/trace.ts) is read on arrival, ends its access line, and is at hand as requestTrace().
 */
export function createApp({ logger, bodyLimit = DEFAULT_BODY_LIMIT, metrics = new Metrics(), metricsRoute = false, accessLog = true }: AppOptions) {
  // Labelled by route pattern, not path, so a scan of random paths cannot grow the series without bound.
  const requests = metrics.counter("securemesh_http_requests_total", "HTTP requests answered, by route, method and status.", ["route", "method", "status"]);
  const latency = metrics.histogram("securemesh_http_request_duration_seconds", "Time from request to response, by route.", ["route"]);
  // Bun's own limit answers a bare 413 before any handler runs; it sits above ours only as a backstop. Ours answers
  // with JSON: on Content-Length at once, else by counting the bytes read (#11 L6: a 201,387-byte chunked body got
  // past the Content-Length check alone).
  const app = new Elysia({ serve: { maxRequestBodySize: bodyLimit * 4, idleTimeout: IDLE_TIMEOUT_S } })
    .onRequest((context) => {
      const { request, server, set } = context;
      // Elysia sets the routed path on the context before this hook runs; its types leave it out here.
      const { path } = context as unknown as { path: string };
      // Every listener binds the caller's address (and, under mutual TLS, its identity) to the request; a request
      // handed to app.handle in a test has none. Only the access line uses it.
      const remote = !accessLog ? "-" : (peerOf(request)?.address ?? (server ? server.requestIP(request)?.address : undefined) ?? "-");
      // The path is parsed once here and kept for the access log: one URL parse per request, not two.
      const actual = requestPath(request);
      arrivals.set(request, { remote, at: performance.now(), path: actual, trace: traceOf(request.headers) });
      // Elysia's fetch finds the path at a fixed offset into the URL, so an https request with a 1-2 character Host
      // was routed to another handler than its path names (found by attack on #11). Only a path routed as written
      // is served.
      if (path !== actual) {
        set.status = 400;
        return errorBody(400, "request path cannot be routed as written", "ERR_BAD_REQUEST");
      }
      const length = Number(request.headers.get("content-length") ?? 0);
      if (length <= bodyLimit) return undefined;
      set.status = 413;
      return errorBody(413, `request body over the ${bodyLimit}-byte limit`, "ERR_BODY_TOO_LARGE");
    })
    // Every body Elysia would parse is read here instead, through the counting reader. Routes declared
    // `{ parse: "none" }` read their own (readBodyLimited); for them this hook returns null, which tells Elysia the
    // body is dealt with: undefined would send it on to a parser named "none" that does not exist.
    .onParse(async ({ request, route }, contentType) => {
      if (parsesNothing(app.routes, request.method, route)) return null;
      return parseBody(request, contentType, bodyLimit);
    })
    .onError(({ code, error, request, set }) => {
      const answer = errorAnswer(code, error, request);
      set.status = answer.status; // for the access log and metrics, which read the status from here
      return answer;
    })
    .onAfterResponse((context) => {
      const { request, set } = context;
      // A handler that returns a Response (the coordinator passes an upstream's answer on) leaves set.status at 200
      // (#11 L2); the Response's own status is the one sent.
      const response = (context as { response?: unknown }).response;
      const status = response instanceof Response ? response.status : typeof set.status === "number" ? set.status : 200;
      const arrival = arrivals.get(request);
      if (accessLog)
        logger.access(arrival?.remote ?? "-", request.method, arrival?.path ?? requestPath(request), status, arrival?.trace ?? requestTrace(request));
      const route = "route" in context && context.route ? context.route : "unmatched";
      requests.inc({ route, method: request.method, status: String(status) });
      if (arrival) latency.observe({ route }, (performance.now() - arrival.at) / 1000);
    });
  if (metricsRoute) {
    const guard = metricsRoute;
    app.get("/metrics", ({ request }) => {
      guard(request);
      return metrics.response();
    });
  }
  appContexts.set(app, { bodyLimit, logger, metrics });

  function errorAnswer(code: string | number, error: unknown, request: Request): Response {
    if (error instanceof MeshError) return errorBody(error.status, error.message, error.code, error.retryAfterSeconds);
    // Elysia wraps whatever a parser throws in its ParseError: the 413 and the 400 from parseBody are inside.
    const cause = (error as { cause?: unknown } | null)?.cause;
    if (code === "PARSE" && cause instanceof MeshError) return errorBody(cause.status, cause.message, cause.code);
    // The client went away mid-request (a body cut short, or stalled until the idle timeout): no one gets this
    // answer, and it is no server fault to log as an internal error. nginx's 499 says so in the access log.
    if (request.signal.aborted) return errorBody(499, "the connection closed before the request was read", "ERR_CLIENT_CLOSED");
    switch (code) {
      case "NOT_FOUND": {
        const path = requestPath(request);
        if (app.routes.some((route) => route.path === path)) {
          return errorBody(405, `method ${request.method} not allowed on ${path}`, "ERR_METHOD_NOT_ALLOWED");
        }
        return errorBody(404, `no route for ${request.method} ${path}`, "ERR_NOT_FOUND");
      }
      case "PARSE":
        return errorBody(400, "request body is not valid JSON", "ERR_BAD_REQUEST");
      case "VALIDATION":
        return errorBody(400, "request body has the wrong shape", "ERR_BAD_REQUEST");
      default:
        logger.error(`internal error on ${request.method} ${requestPath(request)}: ${describeError(error)}`);
        return errorBody(500, "internal error", "ERR_INTERNAL");
    }
  }
  return app;
}

export type { ReloadableListener, ServableApp, ServerTls } from "./runtime/index.ts";
export type { Drainable } from "./drain.ts";

/**
 * Elysia's own listen, with reusePort off (Elysia defaults it on, so two servers could silently share a port), a
 * port in use as a one-line ConfigError, and the bound port returned. Elysia's listen is Bun.serve, so this is for
 * Bun-only code (tests); the roles use listenReloadable, which runs on both runtimes.
 */
export function listen(
  app: { listen: (options: object) => unknown; server: { port?: number } | null },
  options: { port: number; hostname: string; tls?: ServerTls },
): number {
  try {
    app.listen({ port: options.port, hostname: options.hostname, reusePort: false, tls: options.tls });
  } catch (error) {
    if ((error as { code?: string }).code === "EADDRINUSE") throw new ConfigError(`port ${options.port} on ${options.hostname} is already in use`);
    throw new ConfigError(`cannot listen on ${options.hostname}:${options.port}: ${describeError(error)}`);
  }
  return app.server?.port ?? options.port;
}

export interface ListenOptions {
  port: number;
  hostname: string;
  /** Mutual TLS with `requestCert`, server-only TLS without, plain HTTP when absent (an admin page on loopback). */
  tls?: ServerTls;
  /**
   * The role's live revocation check (TrustMaterial.isRevoked), asked at every handshake and on every request.
   * Without it, `tls.crl` is used as of the last reload.
   */
  isRevoked?: (serialHex: string) => boolean;
  /** Whom a verified client certificate names (shared/authz tlsPeerIdentity): mutual TLS needs it. */
  identify?: (peer: tls.PeerCertificate) => string;
  /** Connections one identity may hold at once (the policy's limits; default MAX_CONNECTIONS_PER_IDENTITY). */
  connectionLimit?: (identity: string) => number;
  /** One of several workers on one port (shared/platform/worker-group.ts): Bun only. */
  sharePort?: boolean;
}

/** How often one kind of refusal from one identity or address is logged; the rest are counted. */
const REFUSAL_LOG_INTERVAL_MS = 10_000;

/**
 * Logs connections refused before any request (a connection cap, a revoked or untrusted certificate, a handshake
 * flood): one warning per identity or address and reason every 10 s, saying how many more there were, and a count
 * of each reason in `securemesh_connections_refused_total`.
 */
function refusalReporter(logger: Logger, metrics: Metrics): (refusal: Refusal) => void {
  const refused = metrics.counter("securemesh_connections_refused_total", "Connections closed before any request, by reason.", ["reason"]);
  const lastLogged = new Map<string, { at: number; suppressed: number }>();
  return (refusal) => {
    refused.inc({ reason: refusal.reason });
    const who = refusal.identity ?? refusal.address;
    const key = `${refusal.reason} ${who}`;
    const now = performance.now();
    const seen = lastLogged.get(key);
    if (seen && now - seen.at < REFUSAL_LOG_INTERVAL_MS) {
      seen.suppressed += 1;
      return;
    }
    if (lastLogged.size > 1000) lastLogged.clear(); // a flood of distinct addresses cannot grow this without bound
    const more = seen && seen.suppressed > 0 ? ` (and ${seen.suppressed} more like it in the last ${Math.round((now - seen.at) / 1000)} s)` : "";
    lastLogged.set(key, { at: now, suppressed: 0 });
    logger.warn(`connection from ${printable(refusal.address)} refused: ${refusalText(refusal)}${more}`, { reason: refusal.reason, peer: who });
  };
}

function refusalText(refusal: Refusal): string {
  switch (refusal.reason) {
    case "identity-cap":
      return `${refusal.identity} already holds ${refusal.limit} connections, its limit`;
    case "revoked":
      return `${refusal.identity || "a client"}'s certificate is revoked (serial ${refusal.serial}); told so`;
    case "untrusted":
      return "no client certificate our CA issued";
    case "no-client-auth":
      return `${refusal.identity || "its"} certificate is not for client authentication; told so`;
    case "handshake-flood":
      return "too many connections from this address still in their TLS handshake (the oldest closed)";
    case "handshake-timeout":
      return "no TLS handshake in time";
  }
}

/**
 * Serves an app made by createApp on this runtime (shared/platform/runtime): Bun.serve on Bun, node:https on
 * Deno, with the same guarantees on both: mutual TLS with the clientAuth EKU, revocation, body limits, header
 * deadline and idle timeout, JSON errors, the caller's address in the access log. reload() swaps the TLS (a new
 * CRL after `./pki.sh revoke`, a renewed certificate) without a restart; requests in flight finish. A port in use
 * is a one-line ConfigError. Returns the bound port, which matters when asked for port 0.
 */
export async function listenReloadable(app: ServableApp, options: ListenOptions): Promise<ServingListener> {
  const context = appContexts.get(app);
  const traffic = new Traffic(app);
  const listener = await runtime.serveApp(traffic.app, {
    ...options,
    bodyLimit: context?.bodyLimit ?? DEFAULT_BODY_LIMIT,
    ...(context ? { onRefused: refusalReporter(context.logger, context.metrics) } : {}),
  });
  return Object.assign(listener, {
    startDraining: () => traffic.startDraining(),
    inFlight: () => traffic.inFlight,
    lastRequestAt: () => traffic.lastRequestAt,
  });
}

/**
 * A health check's URL, with or without scheme and host: a string test, with no URL parsed per request. It takes
 * what the router serves as /health: with a trailing slash too (a check on /health/ answered 200 through a drain).
 */
const HEALTH_PATH = /^(?:[a-z]+:\/\/[^/]*)?\/health\/?(?:\?|$)/;

/** A serving listener that can be drained (shared/platform/drain.ts). */
export type ServingListener = ReloadableListener & Drainable;

/**
 * What passes through a listener: requests in flight and when the last came, for a drain; and, once draining, the
 * 503 on /health that takes this process out of its callers' rotation, and `connection: close` on every answer, so
 * kept-alive connections end one by one instead of being cut.
 */
class Traffic {
  inFlight = 0;
  lastRequestAt = 0;
  #draining = false;
  readonly app: ServableApp;

  constructor(inner: ServableApp) {
    const pass = (request: Request, handle: (request: Request) => Response | Promise<Response>) => this.#pass(request, handle);
    const counted = (request: Request) => pass(request, inner.fetch);
    // The runtime asks for fetch once it has compiled the app, and sets `server` on it: both reach the real app.
    this.app = {
      get fetch() {
        return counted;
      },
      handle: async (request) => pass(request, (r) => inner.handle(r)),
      get config() {
        return inner.config;
      },
      get server() {
        return inner.server;
      },
      set server(server: unknown) {
        inner.server = server;
      },
      compile: () => inner.compile(),
    };
  }

  startDraining(): void {
    this.#draining = true;
  }

  /**
   * Counts the request in and out. Not an async function: the bench measured the extra promise layer of one (with
   * the request limiter's) at 5-10 % of the coordinator's CPU per request (issue 20), so a handler's own promise is
   * followed instead, and /health is matched by a pattern only when the URL names it at all.
   */
  #pass(request: Request, handle: (request: Request) => Response | Promise<Response>): Response | Promise<Response> {
    const health = request.url.includes("/health") && HEALTH_PATH.test(request.url);
    if (!health) this.lastRequestAt = performance.now();
    if (this.#draining && health) {
      return new Response(JSON.stringify({ status: "draining" }), {
        status: 503,
        headers: { "content-type": "application/json; charset=utf-8", connection: "close" },
      });
    }
    this.inFlight += 1;
    let answer: Response | Promise<Response>;
    try {
      answer = handle(request);
    } catch (error) {
      this.inFlight -= 1;
      throw error;
    }
    return answer instanceof Promise ? answer.then(this.#answered, this.#failed) : this.#answered(answer);
  }

  readonly #answered = (response: Response): Response => {
    this.inFlight -= 1;
    if (this.#draining) {
      try {
        response.headers.set("connection", "close");
      } catch {
        // an immutable Response (passed on as it came): its connection ends at the stop instead
      }
    }
    return response;
  };

  readonly #failed = (error: unknown): never => {
    this.inFlight -= 1;
    throw error;
  };
}

/**
 * Checks that a request carries a JSON object with exactly the given string fields (optional ones end in "?").
 * @example const { data, proof } = readJsonFields(request, body, ["data", "proof"]);
 */
export function readJsonFields<F extends string>(
  request: Request,
  body: unknown,
  fields: readonly F[],
): { [K in F as K extends `${infer N}?` ? N : K]: K extends `${string}?` ? string | undefined : string } {
  const type = request.headers.get("content-type") ?? "";
  if (!type.toLowerCase().startsWith("application/json")) {
    throw new MeshError("ERR_UNSUPPORTED_MEDIA_TYPE", 415, "Content-Type must be application/json");
  }
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw new BadRequest("request body must be a JSON object");
  const allowed = new Set(fields.map((f) => f.replace(/\?$/, "")));
  const extra = Object.keys(body).filter((k) => !allowed.has(k));
  // The name is the client's: quoted, and cut short, so the error (and a log line quoting it) stays readable (#11 L1).
  if (extra.length > 0) throw new BadRequest(`unexpected field: ${JSON.stringify(extra[0]!.slice(0, 64))}`);
  const out: Record<string, string | undefined> = {};
  for (const field of fields) {
    const name = field.replace(/\?$/, "");
    const value = (body as Record<string, unknown>)[name];
    if (value === undefined && field.endsWith("?")) continue;
    if (typeof value !== "string" || value.length === 0) throw new BadRequest(`field '${name}' must be a non-empty string`);
    out[name] = value;
  }
  return out as never;
}
