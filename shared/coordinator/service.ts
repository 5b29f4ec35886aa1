// One coordinator (alone, or one of a supervisor's workers): its upstream pool over checked connections, its app, its
// admin listener. And the supervisor of --workers N, which runs N of them on one port and merges their views.
import { expectPeer } from "../authz/index.ts";
import { ConfigError } from "../platform/errors.ts";
import { exitOnSignals, exitWithConfigError } from "../platform/config.ts";
import { HttpsClient } from "../platform/https-client.ts";
import { listenReloadable, type ReloadableListener } from "../platform/http.ts";
import { runtime } from "../platform/runtime/index.ts";
import { mutualTlsClientOptions, type Identity } from "../platform/tls.ts";
import { reportWorkerReady, WorkerGroup, workerIndex, workerSharesPort } from "../platform/worker-group.ts";
import type { Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { createAdminApp } from "../ops/status-page.ts";
import { WorkerPoolView } from "../ops/worker-view.ts";
import { UpstreamPool, type HealthCheckOptions } from "../request-path/upstream.ts";
import type { RoleContext, RoleService, ServingConfig } from "../service/run-role.ts";
import { createCoordinatorApp } from "./app.ts";
import { watchMembership } from "./membership.ts";

export interface CoordinatorConfig extends ServingConfig {
  servers: string[];
  /** The servers' list, re-read on change (membership.ts); null with --servers. */
  serversFile: string | null;
  expectServer: string;
  timeoutMs: number;
  health: HealthCheckOptions;
  admin: { port: number; host: string } | null;
  workers: number;
  accessLog: boolean;
}

/**
 * The coordinator's own part, for runRole. Only a server identity, unrevoked, may hold a connection to the servers'
 * URLs: every connection is checked at its handshake, and nothing is written to one that failed (issue 18, H1).
 */
export function coordinatorService({ config, logger, metrics, trust, authz, limiter }: RoleContext<CoordinatorConfig>): RoleService {
  const worker = workerIndex();
  const serverTls = (identity: Identity) => ({
    ...mutualTlsClientOptions(identity),
    checkServerIdentity: expectPeer(config.expectServer, { isRevoked: (serial) => trust.isRevoked(serial) }),
  });
  const servers = new HttpsClient({ tls: serverTls(trust.identity), isRevoked: (serial) => trust.isRevoked(serial) });
  const pool = new UpstreamPool({ servers: config.servers, transport: servers, logger, timeoutMs: config.timeoutMs, health: config.health });
  pool.exportMetrics(metrics);
  let admin: ReloadableListener | null = null;
  const membership = config.serversFile ? watchMembership(config.serversFile, pool, logger) : null;
  return {
    app: createCoordinatorApp({ pool, logger, metrics, accessLog: config.accessLog, limiter, authz, drainable: worker === null }),
    sharePort: worker !== null && workerSharesPort(),
    ...(worker === null ? {} : { label: `coordinator worker ${worker} (pid ${process.pid})` }),
    describe: `servers: ${config.servers.join(", ")}${config.serversFile ? ` (from ${config.serversFile})` : ""}`,
    onCertificate: (identity) => servers.setTls(serverTls(identity)),
    async listening(port, { shutdown }) {
      // A worker's admin listener is for its supervisor only: loopback, a port of the kernel's choosing, and only
      // when the supervisor serves an admin page of its own (the operator asked for one).
      const adminAt = worker === null || !config.admin ? config.admin : { port: 0, host: "127.0.0.1" };
      if (adminAt) {
        // A non-loopback --admin-host is the one other Host the admin page answers to (DNS rebinding, #11).
        const view = { snapshot: () => pool.snapshot(), routing: () => pool.routing(), limits: () => limiter.snapshot() };
        const adminApp = createAdminApp({ pool: view, logger, metrics, allowedHosts: [adminAt.host], accessLog: worker === null });
        admin = await listenReloadable(adminApp, { port: adminAt.port, hostname: adminAt.host });
        if (worker === null) logger.info(`coordinator admin (status page, /metrics) on http://${adminAt.host}:${admin.port}/`);
      }
      pool.start();
      if (worker !== null) reportWorkerReady({ port, adminUrl: admin ? `http://127.0.0.1:${admin.port}/` : null }, shutdown);
    },
    async close() {
      membership?.stop();
      pool.stop();
      servers.close();
      await admin?.stop();
    },
  };
}

/**
 * --workers N: N coordinators on one port, this process their supervisor. The kernel spreads connections over
 * them (SO_REUSEPORT); each has its own upstream pool and probes, so a server's state can differ between workers
 * for up to a probe interval. The status page and /metrics here merge the workers' own.
 */
export async function superviseCoordinators(config: CoordinatorConfig, logger: Logger): Promise<void> {
  if (!runtime.sharesPorts)
    exitWithConfigError("coordinator", new ConfigError("--workers above 1 needs Bun: Deno's node:https listener cannot share a port (SO_REUSEPORT)"));
  const group = await WorkerGroup.start({
    count: config.workers,
    port: config.port,
    // The last --port wins over a positional port and an earlier --port: every worker gets the port bound first.
    args: (port) => [...process.argv.slice(2), "--port", String(port)],
    onEvent: (message) => logger.warn(`coordinator: ${message}`),
  }).catch((error) => exitWithConfigError("coordinator", error));
  const view = new WorkerPoolView(() => group.states());
  let admin: ReloadableListener | null = null;
  if (config.admin) {
    view.start(); // read the workers only for a page that shows them
    const adminApp = createAdminApp({
      pool: view,
      logger,
      metrics: new Metrics(),
      allowedHosts: [config.admin.host],
      metricsResponse: () => view.metricsResponse(),
    });
    admin = await listenReloadable(adminApp, { port: config.admin.port, hostname: config.admin.host }).catch(async (error) => {
      await group.stop();
      return exitWithConfigError("coordinator", error);
    });
    logger.info(`coordinator admin (status page, /metrics) on http://${config.admin.host}:${admin.port}/`);
  }
  logger.info(
    `coordinator listening on https://${config.host}:${group.port} with ${config.workers} workers (pids ${group
      .states()
      .map((w) => w.pid)
      .join(", ")}), servers: ${config.servers.join(", ")}`,
  );
  // Certificates, the CRL and the policy reload in each worker; SIGHUP asks them all at once.
  process.on("SIGHUP", () => group.signal("SIGHUP"));
  exitOnSignals(async () => {
    view.stop();
    await Promise.all([group.stop(), admin?.stop()]);
  });
}
