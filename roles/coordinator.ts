// The coordinator: terminates clients' mutual TLS and forwards /api/* to healthy servers, failing over between them.
import { availableParallelism } from "node:os";
import { createLogger } from "../shared/ops/log.ts";
import { isIdentityPattern } from "../shared/authz/index.ts";
import { parseFlags, parsePort, parsePositive, pkiDir, policyPath } from "../shared/platform/config.ts";
import { chooseFlag } from "../shared/platform/config-file.ts";
import { ConfigError } from "../shared/platform/errors.ts";
import { workerIndex } from "../shared/platform/worker-group.ts";
import { parseServerUrls, readServersFile } from "../shared/coordinator/membership.ts";
import { coordinatorService, superviseCoordinators, type CoordinatorConfig } from "../shared/coordinator/service.ts";
import { checkRole, readConfig, runRole } from "../shared/service/run-role.ts";

export { createCoordinatorApp } from "../shared/coordinator/app.ts";
export type { CoordinatorConfig };

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
  --servers-file FILE    one server URL per line, re-read when it changes and on SIGHUP: a server added
                         enters rotation at its first good health check, one removed leaves at once
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

export function parseCoordinatorConfig(argv: string[]): CoordinatorConfig {
  const { values, positionals, sources } = parseFlags(
    "coordinator",
    USAGE,
    {
      servers: { type: "string" },
      "servers-file": { type: "string" },
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
    },
    argv,
  );
  const accessLog = values["access-log"] ?? "on";
  if (accessLog !== "on" && accessLog !== "off") throw new ConfigError(`--access-log must be on or off, not '${accessLog}'`);
  const expectServer = values["expect-server"] ?? "spiffe://securemesh/server/*";
  if (!isIdentityPattern(expectServer))
    throw new ConfigError(`--expect-server: '${expectServer}' is not a SPIFFE ID such as spiffe://securemesh/server/* ("*" only as a whole last segment)`);
  // The higher source wins (argv, then --config, then SECUREMESH_*): --servers-file on the command line beats
  // SECUREMESH_SERVERS in the unit's environment file; both from one source is a mistake, said so.
  const serversFlag = chooseFlag("servers", "servers-file", sources);
  const serversFile = serversFlag === "servers-file" ? values["servers-file"]! : undefined;
  const servers = serversFile
    ? readServersFile(serversFile)
    : parseServerUrls(
        ((serversFlag === "servers" ? values.servers : undefined) ?? process.env.SERVERS ?? "https://127.0.0.1:5001,https://127.0.0.1:5002").split(","),
        "--servers",
      );
  return {
    // --port (the workers' own, shared/coordinator/service.ts) or the first argument, when given on the command line,
    // beat SECUREMESH_PORT, which fills both from the --config file or the environment.
    port: parsePort((sources.port === "argv" ? values.port : undefined) ?? positionals[0] ?? values.port ?? process.env.PORT, "PORT", 8000),
    host: values.host ?? "127.0.0.1",
    servers,
    serversFile: serversFile ?? null,
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

if (import.meta.main) {
  // `check`: this host, and every server it forwards to compared with it (policy, CRL, clock).
  if (process.argv[2] === "check")
    await checkRole({ name: "coordinator", parse: parseCoordinatorConfig, check: (c) => ({ peers: c.servers }) }, process.argv.slice(3));
  const config = readConfig("coordinator", parseCoordinatorConfig);
  if (config.workers > 1 && workerIndex() === null) await superviseCoordinators(config, createLogger("coordinator"));
  else await runRole({ name: "coordinator", parse: () => config, start: coordinatorService });
}
