// The Elysia base every role builds on: JSON errors with stable codes, body limits, access log, and a safe listen.
import { Elysia } from "elysia";
import { BadRequest, ConfigError, MeshError } from "./errors.ts";
import { exitWithConfigError } from "./config.ts";
import { describeError, type Logger } from "./log.ts";
import { Metrics } from "./metrics.ts";

/** Bodies above this get a 413 before any handler runs. */
export const DEFAULT_BODY_LIMIT = 64 * 1024;
/** Seconds a connection may sit idle, or dribble its headers (slowloris), before it is closed. */
export const IDLE_TIMEOUT_S = 10;

/** Set by the peer-identity listener (shared/peer-tls.ts), where Bun's requestIP is not available. */
export const PEER_ADDRESS_HEADER = "x-securemesh-peer-address";

export interface AppOptions {
  logger: Logger;
  bodyLimit?: number;
  /** Where request counts and latencies go; a role passes its own to add families of its own. */
  metrics?: Metrics;
  /** Serve GET /metrics on this app (the coordinator serves it on its admin listener instead). */
  metricsRoute?: boolean;
}

/** What the access log and the latency histogram need from a request's arrival. */
const arrivals = new WeakMap<Request, { remote: string; at: number }>();

function errorBody(status: number, error: string, code: string) {
  return new Response(JSON.stringify({ error, code }), {
    status,
    headers: { "content-type": "application/json; charset=utf-8" },
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

/**
 * A new Elysia app with securemesh's error mapping and access log. Unknown routes get 404 JSON, known paths with
 * the wrong method 405 JSON, and no error reaches the client as a stack trace.
 */
export function createApp({ logger, bodyLimit = DEFAULT_BODY_LIMIT, metrics = new Metrics(), metricsRoute = true }: AppOptions) {
  // Labelled by route pattern, not path, so a scan of random paths cannot grow the series without bound.
  const requests = metrics.counter("securemesh_http_requests_total", "HTTP requests answered, by route, method and status.", ["route", "method", "status"]);
  const latency = metrics.histogram("securemesh_http_request_duration_seconds", "Time from request to response, by route.", ["route"]);
  // Bun's own limit answers a bare 413 before any handler runs, so it sits above ours as a backstop for bodies
  // sent without Content-Length; ours, checked first, answers with JSON.
  const app = new Elysia({ serve: { maxRequestBodySize: bodyLimit * 4, idleTimeout: IDLE_TIMEOUT_S } })
    .onRequest(({ request, server, set }) => {
      // Without a Bun server the request came through the peer-identity listener, which sets this header itself.
      const remote = server ? server.requestIP(request)?.address ?? "-" : request.headers.get(PEER_ADDRESS_HEADER) ?? "-";
      arrivals.set(request, { remote, at: performance.now() });
      const length = Number(request.headers.get("content-length") ?? 0);
      if (length <= bodyLimit) return undefined;
      set.status = 413;
      return errorBody(413, `request body over the ${bodyLimit}-byte limit`, "ERR_BODY_TOO_LARGE");
    })
    .onError(({ code, error, request, set }) => {
      const answer = errorAnswer(code, error, request);
      set.status = answer.status; // for the access log and metrics, which read the status from here
      return answer;
    })
    .onAfterResponse((context) => {
      const { request, set } = context;
      const status = typeof set.status === "number" ? set.status : 200;
      const arrival = arrivals.get(request);
      logger.access(arrival?.remote ?? "-", request.method, requestPath(request), status);
      const route = "route" in context && context.route ? context.route : "unmatched";
      requests.inc({ route, method: request.method, status: String(status) });
      if (arrival) latency.observe({ route }, (performance.now() - arrival.at) / 1000);
    });
  if (metricsRoute) app.get("/metrics", () => metrics.response());

  function errorAnswer(code: string | number, error: unknown, request: Request): Response {
    if (error instanceof MeshError) return errorBody(error.status, error.message, error.code);
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

/** Bun.serve's TLS options, as Elysia's listen takes them. */
export interface ServerTls {
  cert: string;
  key: string;
  ca?: string;
  crl?: string;
  requestCert?: boolean;
  rejectUnauthorized?: boolean;
}

/**
 * Listens with reusePort off (Elysia defaults it on, so two servers could silently share a port) and turns
 * a port in use into a one-line ConfigError. Returns the bound port, which matters when asked for port 0.
 */
export function listen(app: { listen: (options: object) => unknown; server: { port?: number } | null }, options: { port: number; hostname: string; tls?: ServerTls }): number {
  try {
    app.listen({ port: options.port, hostname: options.hostname, reusePort: false, tls: options.tls });
  } catch (error) {
    if ((error as { code?: string }).code === "EADDRINUSE") throw new ConfigError(`port ${options.port} on ${options.hostname} is already in use`);
    throw new ConfigError(`cannot listen on ${options.hostname}:${options.port}: ${describeError(error)}`);
  }
  return app.server?.port ?? options.port;
}

/** listen(), or the role exits with the one-line reason (a port in use, say). */
export function listenOrExit(role: string, app: Parameters<typeof listen>[0], options: Parameters<typeof listen>[1]): number {
  try {
    return listen(app, options);
  } catch (error) {
    return exitWithConfigError(role, error);
  }
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
  if (extra.length > 0) throw new BadRequest(`unexpected field: ${extra[0]}`);
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
