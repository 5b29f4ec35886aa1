// The coordinator's app: /api/* forwarded to the next healthy server through the pool, invalidations and cache
// statistics broadcast to every server, and the pool's view on /health. roles/coordinator.ts runs it.
import { Forbidden, MeshError, ProofRejected } from "../platform/errors.ts";
import type { Authorizer, RequestLimiter } from "../authz/index.ts";
import { createApp, peerIdentity, readBodyLimited, readJsonFields, requestTrace, requestUrl } from "../platform/http.ts";
import type { Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { PROOF_HEADER } from "../request-path/proof.ts";
import type { UpstreamPool } from "../request-path/upstream.ts";

export interface CoordinatorAppDeps {
  pool: UpstreamPool;
  logger: Logger;
  metrics?: Metrics;
  accessLog?: boolean;
  /** Each caller's requests in flight and rate, per its TLS identity and the policy's limits (issue 20). */
  limiter?: RequestLimiter;
  /** Decides admin.drain for an operator's TLS identity; without it the admin routes refuse everyone. */
  authz?: Authorizer;
  /**
   * Whether a drain here drains the coordinator: not in a worker of `--workers N`, whose pool is its own, so a drain
   * would reach one worker of N (the admin routes answer 409 there).
   */
  drainable?: boolean;
}

/** How long POST /admin/drain holds its answer for the server to empty. */
export const ADMIN_DRAIN_WAIT_MS = 30_000;

export function createCoordinatorApp({ pool, logger, metrics = new Metrics(), accessLog = true, limiter, authz, drainable = true }: CoordinatorAppDeps) {
  /** The operator's identity, once the policy allows it admin.drain (audited); else 403. */
  const operator = (request: Request): string => {
    const identity = peerIdentity(request);
    if (!authz) throw new Forbidden(`${identity || "an unidentified caller"} lacks permission admin.drain`);
    authz.require(identity, "admin.drain");
    if (!drainable)
      throw new MeshError("ERR_CONFLICT", 409, "this coordinator runs --workers, each with its own pool: drain a server at a coordinator with --workers 1");
    return identity;
  };
  /** Runs a request's work within its caller's limits: over one, 429 before its body is read or a server asked. */
  const limited = <T>(request: Request, work: () => Promise<T>): Promise<T> => (limiter ? limiter.run(peerIdentity(request), work) : work());
  // /metrics is on the admin listener, next to the status page, as Envoy serves its stats.
  return (
    createApp({ logger, metrics, metricsRoute: false, accessLog })
      .get("/health", ({ set }) => {
        // The pool's view without what is the admin listener's to show: a server's own /health, clock skew and drains.
        const servers = pool.snapshot().map(({ health, clockSkewMs, draining, inFlight, ...shown }) => shown);
        const up = servers.filter((s) => s.up).length;
        // In panic the pool still routes over the servers that answer: the coordinator can serve.
        const routable = servers.filter((s) => s.up || s.reachable).length;
        const { panic } = pool.routing();
        if (routable === 0) set.status = 503;
        return { status: up > 0 ? "ok" : routable > 0 ? "panic" : "no server up", role: "coordinator", serversUp: up, panic, servers };
      })
      // Drain one server (issue 20): out of rotation for new requests, those in flight finish; the answer comes once
      // it is empty, or after ADMIN_DRAIN_WAIT_MS saying how many are still in flight.
      .post("/admin/drain", async ({ request, body }) => {
        const by = operator(request);
        const { server } = readJsonFields(request, body, ["server"]);
        const state = pool.drain(server, by);
        const empty = await pool.drained(state.url, ADMIN_DRAIN_WAIT_MS);
        return { server: state.url, draining: true, empty, inFlight: empty ? 0 : pool.snapshot().find((s) => s.url === state.url)!.inFlight };
      })
      .post("/admin/undrain", ({ request, body }) => {
        const by = operator(request);
        const { server } = readJsonFields(request, body, ["server"]);
        const state = pool.undrain(server, by);
        return { server: state.url, draining: false, up: state.up };
      })
      .post(
        "/api/invalidate_cache",
        ({ request, set }) =>
          limited(request, async () => {
            const body = await readForwardedBody(request);
            // A broadcast costs a request to every server: one that cannot be allowed anywhere (no proof) goes nowhere.
            if (!carriesProof(body)) throw new ProofRejected("sender proof missing");
            // Every configured server, in parallel, up or not: a server marked down may only be slow.
            const headers = { "content-type": request.headers.get("content-type") ?? "application/json" };
            const outcomes = await pool.broadcast("POST", "/api/invalidate_cache", headers, body, requestTrace(request));
            const acknowledged = outcomes.filter((o) => o.ok).map((o) => o.server);
            const failed = outcomes
              .filter((o) => !o.ok)
              .map((o) =>
                o.status === null ? { server: o.server, status: null, error: o.error } : { server: o.server, status: o.status, error: errorText(o.body) },
              );
            for (const f of failed) logger.warn(`Invalidation not acknowledged by ${f.server}: ${f.error}`);
            // Nobody acknowledged: if every server answered (say, 401 for a bad proof), their answer is the answer.
            if (acknowledged.length === 0) set.status = failed.every((f) => f.status !== null) ? failed[0]!.status! : 503;
            return { result: acknowledged.length > 0 ? "ok" : "failed", complete: failed.length === 0, acknowledged, failed };
          }),
        { parse: "none" },
      )
      .get("/api/cache_stats", ({ request, set }) =>
        limited(request, async () => {
          const proof = request.headers.get(PROOF_HEADER);
          if (!proof) throw new ProofRejected("sender proof missing");
          const outcomes = await pool.broadcast("GET", "/api/cache_stats", { [PROOF_HEADER]: proof }, undefined, requestTrace(request));
          // No server answered: if every one refused (401, 403), their answer is the answer, as for invalidation.
          if (!outcomes.some((o) => o.ok)) set.status = outcomes.every((o) => o.status !== null) ? outcomes[0]!.status! : 503;
          return {
            servers: outcomes.map((o) =>
              o.ok
                ? { url: o.server, ...JSON.parse(new TextDecoder().decode(o.body)) }
                : { url: o.server, error: o.status === null ? o.error : `answered ${o.status}` },
            ),
          };
        }),
      )
      .all(
        "/api/*",
        ({ request }) =>
          limited(request, async () => {
            const url = requestUrl(request);
            const body = request.method === "GET" || request.method === "HEAD" ? undefined : await readForwardedBody(request);
            const result = await pool.forward({
              method: request.method,
              path: url.pathname + url.search,
              headers: request.headers,
              body,
              trace: requestTrace(request),
            });
            return new Response(result.body, {
              status: result.status,
              headers: {
                "content-type": result.contentType ?? "application/json",
                "x-securemesh-upstream": result.upstream,
                ...(result.retryAfter === null ? {} : { "retry-after": result.retryAfter }),
              },
            });
          }),
        { parse: "none" },
      )
  );
}

/** The body to forward, counted as it is read: a chunked body cannot slip past the limit (#11 L6). */
function readForwardedBody(request: Request): Promise<Uint8Array> {
  return readBodyLimited(request);
}

/** Whether an invalidation's JSON body holds a proof at all; the servers verify it. */
function carriesProof(body: Uint8Array): boolean {
  try {
    const proof = (JSON.parse(new TextDecoder().decode(body)) as { proof?: unknown } | null)?.proof;
    return typeof proof === "string" && proof.length > 0;
  } catch {
    return false;
  }
}

/** The `error` field of a server's JSON answer, for a report line. */
function errorText(body: Uint8Array): string {
  try {
    return String((JSON.parse(new TextDecoder().decode(body)) as { error?: unknown }).error ?? "no error text");
  } catch {
    return "non-JSON answer";
  }
}
