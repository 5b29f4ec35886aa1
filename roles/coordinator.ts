// The coordinator: terminates clients' mutual TLS and forwards /api/* to healthy servers, failing over between them.
import { Authorizer, expectPeer, isIdentityPattern, mutualTlsListening, TrustMaterial } from "../shared/authz/index.ts";
import { ConfigError, ProofRejected } from "../shared/platform/errors.ts";
import { HttpsClient } from "../shared/platform/https-client.ts";
import { exitWithConfigError, parseFlags, parsePort, parsePositive, pkiDir, policyPath, exitOnSignals } from "../shared/platform/config.ts";
import { createApp, listenReloadable, readBodyLimited, requestTrace, requestUrl } from "../shared/platform/http.ts";
import { createLogger, type Logger } from "../shared/ops/log.ts";
import { Metrics } from "../shared/ops/metrics.ts";
import { PROOF_HEADER } from "../shared/request-path/proof.ts";
import { createAdminApp } from "../shared/ops/status-page.ts";
import { assertSafeTlsEnvironment, mutualTlsClientOptions, type Identity } from "../shared/platform/tls.ts";
import { UpstreamPool } from "../shared/request-path/upstream.ts";
import { WorkerGroup, reportWorkerReady, workerIndex, workerSharesPort } from "../shared/platform/worker-group.ts";
import { WorkerPoolView } from "../shared/ops/worker-view.ts";
import { availableParallelism } from "node:os";
import { runtime } from "../shared/platform/runtime/index.ts";

const USAGE = `
Usage: roles/coordinator.ts [PORT] [options]

Accepts clients over mutual TLS on PORT (default 8000) and forwards /api/* over mutual TLS to the servers,
round-robin over the healthy ones, failing over when one fails. It holds no Fernet key. Every connection to a
server is used only once its handshake showed a server identity; the servers decide every request by the
policy, on the coordinator's own certificate and the caller's proof. Certificates and the CRL reload on change
and on SIGHUP.

Options:
  --servers URLS         comma-separated server URLs (default $SERVERS, else
                         https://127.0.0.1:5001,https://127.0.0.1:5002)
  --host HOST            address to bind (default 127.0.0.1)
  --timeout MS           per-attempt upstream timeout (default 2000)
  --health-interval MS   active health-check interval (default 1000)
  --health-timeout MS    health-check timeout (default 1000)
  --fall N               failed checks before a server leaves rotation (default 2)
  --rise N               good checks before it returns (default 2)
  --admin-port PORT      serve the live status page (/), /status, /events and /metrics over plain HTTP
                         on this port (off unless given; 0 picks a free port)
  --admin-host HOST      address for the admin listener (default 127.0.0.1: keep it off the network)
  --expect-server ID     identity the servers must present (default spiffe://securemesh/server/*)
  --access-log on|off    one access line per request (default on); off, requests are still counted in
                         /metrics
  --workers N|auto       N processes serve the port together (SO_REUSEPORT), each with its own upstream pool
                         and health checks; this process supervises them, restarts one that dies, and serves
                         the status page and /metrics for all (default 1; auto: one per core). Bun only
  --pki DIR              PKI folder from pki.sh (default $PKI_DIR, else certs/)
  --policy FILE          the policy whose limits it applies to its callers' connections
                         (default $SECUREMESH_POLICY, else roles/policy.json); reloads on change
  --no-crl               run without revocation: crl.pem is not read, no certificate is refused as revoked
                         (a warning at start says so); without it, no valid crl.pem stops the role
  -h, --help             show this help
`;

export interface CoordinatorConfig {
  port: number;
  host: string;
  servers: string[];
  expectServer: string;
  pki: string;
  policy: string;
  /** --no-crl: no revocation at all (#18). */
  noCrl: boolean;
  timeoutMs: number;
  health: { intervalMs: number; timeoutMs: number; fall: number; rise: number };
  admin: { port: number; host: string } | null;
  workers: number;
  accessLog: boolean;
}

export function parseCoordinatorConfig(argv: string[]): CoordinatorConfig {
  const { values, positionals } = parseFlags("coordinator", USAGE, {
    servers: { type: "string" },
    host: { type: "string" },
    timeout: { type: "string" },
    "health-interval": { type: "string" },
    "health-timeout": { type: "string" },
    fall: { type: "string" },
    rise: { type: "string" },
    "admin-port": { type: "string" },
    "admin-host": { type: "string" },
    pki: { type: "string" },
    policy: { type: "string" },
    "no-crl": { type: "boolean" },
    port: { type: "string" },
    "expect-server": { type: "string" },
    workers: { type: "string" },
    "access-log": { type: "string" },
  }, argv);
  const accessLog = values["access-log"] ?? "on";
  if (accessLog !== "on" && accessLog !== "off") throw new ConfigError(`--access-log must be on or off, not '${accessLog}'`);
  const expectServer = values["expect-server"] ?? "spiffe://securemesh/server/*";
  if (!isIdentityPattern(expectServer)) throw new ConfigError(`--expect-server: '${expectServer}' is not a SPIFFE ID such as spiffe://securemesh/server/* ("*" only as a whole last segment)`);
  const servers = (values.servers ?? process.env.SERVERS ?? "https://127.0.0.1:5001,https://127.0.0.1:5002")
    .split(",").map((s) => s.trim()).filter(Boolean);
  for (const server of servers) {
    let url: URL;
    try {
      url = new URL(server);
    } catch {
      throw new ConfigError(`--servers: '${server}' is not a URL (expected https://host:port)`);
    }
    if (url.protocol !== "https:") throw new ConfigError(`--servers: '${server}' must use https://`);
  }
  if (servers.length === 0) throw new ConfigError("--servers: at least one server URL is needed");
  return {
    port: parsePort(values.port ?? positionals[0] ?? process.env.PORT, "PORT", 8000),
    host: values.host ?? "127.0.0.1",
    servers,
    expectServer,
    pki: pkiDir(values.pki),
    policy: policyPath(values.policy),
    noCrl: values["no-crl"] ?? false,
    timeoutMs: parsePositive(values.timeout, "--timeout", 2000),
    health: {
      intervalMs: parsePositive(values["health-interval"], "--health-interval", 1000),
      timeoutMs: parsePositive(values["health-timeout"], "--health-timeout", 1000),
      fall: parsePositive(values.fall, "--fall", 2),
      rise: parsePositive(values.rise, "--rise", 2),
    },
    admin: values["admin-port"] === undefined ? null : { port: parsePort(values["admin-port"], "--admin-port"), host: values["admin-host"] ?? "127.0.0.1" },
    workers: parseWorkers(values.workers),
    accessLog: accessLog === "on",
  };
}

function parseWorkers(value: string | undefined): number {
  if (value === "auto") return availableParallelism();
  const n = parsePositive(value, "--workers", 1);
  if (!Number.isInteger(n) || n > 64) throw new ConfigError(`--workers must be a whole number from 1 to 64, or auto, not '${value}'`);
  return n;
}

export function createCoordinatorApp({ pool, logger, metrics = new Metrics(), accessLog = true }: { pool: UpstreamPool; logger: Logger; metrics?: Metrics; accessLog?: boolean }) {
  // /metrics is on the admin listener, next to the status page, as Envoy serves its stats.
  return createApp({ logger, metrics, metricsRoute: false, accessLog })
    .get("/health", ({ set }) => {
      const servers = pool.snapshot().map(({ url, up, lastCheckedAt, latencyMs, requests, failures, lastError }) =>
        ({ url, up, lastCheckedAt, latencyMs, requests, failures, lastError }));
      const up = servers.filter((s) => s.up).length;
      if (up === 0) set.status = 503;
      return { status: up > 0 ? "ok" : "no server up", role: "coordinator", serversUp: up, servers };
    })
    .post("/api/invalidate_cache", async ({ request, set }) => {
      const body = await readForwardedBody(request);
      // A broadcast costs a request to every server: one that cannot be allowed anywhere (no proof) goes nowhere.
      if (!carriesProof(body)) throw new ProofRejected("sender proof missing");
      // Every configured server, in parallel, up or not: a server marked down may only be slow.
      const headers = { "content-type": request.headers.get("content-type") ?? "application/json" };
      const outcomes = await pool.broadcast("POST", "/api/invalidate_cache", headers, body, requestTrace(request));
      const acknowledged = outcomes.filter((o) => o.ok).map((o) => o.server);
      const failed = outcomes.filter((o) => !o.ok).map((o) =>
        o.status === null ? { server: o.server, status: null, error: o.error } : { server: o.server, status: o.status, error: errorText(o.body) });
      for (const f of failed) logger.warn(`Invalidation not acknowledged by ${f.server}: ${f.error}`);
      // Nobody acknowledged: if every server answered (say, 401 for a bad proof), their answer is the answer.
      if (acknowledged.length === 0) set.status = failed.every((f) => f.status !== null) ? failed[0]!.status! : 503;
      return { result: acknowledged.length > 0 ? "ok" : "failed", complete: failed.length === 0, acknowledged, failed };
    }, { parse: "none" })
    .get("/api/cache_stats", async ({ request, set }) => {
      const proof = request.headers.get(PROOF_HEADER);
      if (!proof) throw new ProofRejected("sender proof missing");
      const outcomes = await pool.broadcast("GET", "/api/cache_stats", { [PROOF_HEADER]: proof }, undefined, requestTrace(request));
      // No server answered: if every one refused (401, 403), their answer is the answer, as for invalidation.
      if (!outcomes.some((o) => o.ok)) set.status = outcomes.every((o) => o.status !== null) ? outcomes[0]!.status! : 503;
      return {
        servers: outcomes.map((o) => (o.ok ? { url: o.server, ...JSON.parse(new TextDecoder().decode(o.body)) } : { url: o.server, error: o.status === null ? o.error : `answered ${o.status}` })),
      };
    })
    .all("/api/*", async ({ request }) => {
      const url = requestUrl(request);
      const body = request.method === "GET" || request.method === "HEAD" ? undefined : await readForwardedBody(request);
      const result = await pool.forward({ method: request.method, path: url.pathname + url.search, headers: request.headers, body, trace: requestTrace(request) });
      return new Response(result.body, {
        status: result.status,
        headers: { "content-type": result.contentType ?? "application/json", "x-securemesh-upstream": result.upstream },
      });
    }, { parse: "none" });
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

async function main(): Promise<void> {
  const logger = createLogger("coordinator");
  let config: CoordinatorConfig;
  try {
    assertSafeTlsEnvironment();
    config = parseCoordinatorConfig(process.argv.slice(2));
  } catch (error) {
    exitWithConfigError("coordinator", error);
  }
  if (config.workers > 1 && workerIndex() === null) await supervise(config, logger);
  else await serve(config, logger);
}

/** One coordinator: its listener, its upstream pool and health checks; one of a supervisor's workers, or alone. */
async function serve(config: CoordinatorConfig, logger: Logger): Promise<void> {
  const worker = workerIndex();
  let pool: UpstreamPool;
  let trust: TrustMaterial;
  let servers: HttpsClient;
  let authz: Authorizer;
  // Only a server identity, unrevoked, may hold a connection to the servers' URLs: every connection is checked at
  // its handshake, and nothing is written to one that failed (issue 18, H1).
  const serverTls = (identity: Identity) => ({
    ...mutualTlsClientOptions(identity), checkServerIdentity: expectPeer(config.expectServer, { isRevoked: (serial) => trust.isRevoked(serial) }),
  });
  try {
    trust = TrustMaterial.open(config.pki, "coordinator", { noCrl: config.noCrl });
    servers = new HttpsClient({ tls: serverTls(trust.identity), isRevoked: (serial) => trust.isRevoked(serial) });
    pool = new UpstreamPool({ servers: config.servers, transport: servers, logger, timeoutMs: config.timeoutMs, health: config.health });
    authz = new Authorizer(config.policy, logger);
  } catch (error) {
    exitWithConfigError("coordinator", error);
  }
  const metrics = new Metrics();
  pool.exportMetrics(metrics);
  const app = createCoordinatorApp({ pool, logger, metrics, accessLog: config.accessLog });
  const listener = await listenReloadable(app, {
    port: config.port, hostname: config.host, ...mutualTlsListening(trust, authz), sharePort: worker !== null && workerSharesPort(),
  }).catch((error) => exitWithConfigError("coordinator", error));
  const port = listener.port;
  trust.onReload(async (identity, changed) => {
    if (!changed.certificate) return; // revocation is asked per connection and per request
    servers.setTls(serverTls(identity));
    await listener.reload(mutualTlsListening(trust).tls);
  }).watch(logger);
  authz.watch();
  // A worker's admin listener is for its supervisor only: loopback, a port of the kernel's choosing, and only when
  // the supervisor serves an admin page of its own (the operator asked for one).
  const adminAt = worker === null || !config.admin ? config.admin : { port: 0, host: "127.0.0.1" };
  let admin: Awaited<ReturnType<typeof listenReloadable>> | null = null;
  if (adminAt) {
    // A non-loopback --admin-host is the one other Host the admin page answers to (DNS rebinding, #11).
    const adminApp = createAdminApp({ pool, logger, metrics, allowedHosts: [adminAt.host], accessLog: worker === null });
    admin = await listenReloadable(adminApp, { port: adminAt.port, hostname: adminAt.host })
      .catch((error) => exitWithConfigError("coordinator", error));
    if (worker === null) logger.info(`coordinator admin (status page, /metrics) on http://${adminAt.host}:${admin.port}/`);
  }
  pool.start();
  const stop = async () => {
    pool.stop();
    servers.close();
    trust.stop();
    authz.stop();
    await Promise.all([listener.stop(), admin?.stop()]);
  };
  if (worker !== null) {
    logger.info(`coordinator worker ${worker} (pid ${process.pid}) listening on https://${config.host}:${port}`);
    reportWorkerReady({ port, adminUrl: admin ? `http://127.0.0.1:${admin.port}/` : null }, () => void stop().finally(() => process.exit(0)));
  } else {
    logger.info(`coordinator listening on https://${config.host}:${port}, servers: ${config.servers.join(", ")}`);
  }
  exitOnSignals(stop);
}

/**
 * --workers N: N coordinators on one port, this process their supervisor. The kernel spreads connections over
 * them (SO_REUSEPORT); each has its own upstream pool and probes, so a server's state can differ between workers
 * for up to a probe interval. The status page and /metrics here merge the workers' own.
 */
async function supervise(config: CoordinatorConfig, logger: Logger): Promise<void> {
  if (!runtime.sharesPorts) exitWithConfigError("coordinator", new ConfigError("--workers above 1 needs Bun: Deno's node:https listener cannot share a port (SO_REUSEPORT)"));
  const group = await WorkerGroup.start({
    count: config.workers,
    port: config.port,
    // The last --port wins over a positional port and an earlier --port: every worker gets the port bound first.
    args: (port) => [...process.argv.slice(2), "--port", String(port)],
    onEvent: (message) => logger.warn(`coordinator: ${message}`),
  }).catch((error) => exitWithConfigError("coordinator", error));
  const view = new WorkerPoolView(() => group.states());
  let admin: Awaited<ReturnType<typeof listenReloadable>> | null = null;
  if (config.admin) {
    view.start(); // read the workers only for a page that shows them
    const adminApp = createAdminApp({ pool: view, logger, metrics: new Metrics(), allowedHosts: [config.admin.host], metricsResponse: () => view.metricsResponse() });
    admin = await listenReloadable(adminApp, { port: config.admin.port, hostname: config.admin.host })
      .catch(async (error) => {
        await group.stop();
        return exitWithConfigError("coordinator", error);
      });
    logger.info(`coordinator admin (status page, /metrics) on http://${config.admin.host}:${admin.port}/`);
  }
  logger.info(`coordinator listening on https://${config.host}:${group.port} with ${config.workers} workers (pids ${group.states().map((w) => w.pid).join(", ")}), servers: ${config.servers.join(", ")}`);
  // Certificates, the CRL and the policy reload in each worker; SIGHUP asks them all at once.
  process.on("SIGHUP", () => group.signal("SIGHUP"));
  exitOnSignals(async () => {
    view.stop();
    await Promise.all([group.stop(), admin?.stop()]);
  });
}

if (import.meta.main) await main();
