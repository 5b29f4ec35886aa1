// HAProxy set up as the coordinator is: mutual TLS in front, mutual TLS to the servers, round-robin with health checks.
import { execFileSync } from "node:child_process";
import { chmodSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect } from "node:net";
import { FORWARDER_HEADER, FORWARDER_LIFETIME_S } from "../shared/request-path/proof.ts";
import type { Cluster } from "./cluster.ts";

export const HAPROXY = process.env.HAPROXY_PATH ?? "haproxy";

/** "2.6.12-1+deb12u4", or null when HAProxy is not installed. */
export function haproxyVersion(): string | null {
  try {
    return /version (\S+)/.exec(execFileSync(HAPROXY, ["-v"], { encoding: "utf8" }))?.[1] ?? null;
  } catch {
    return null;
  }
}

/** Installs Debian's haproxy when it is missing, as the bench promises; returns its version. */
export function ensureHaproxy(log: (line: string) => void): string {
  const found = haproxyVersion();
  if (found) return found;
  log("bench: haproxy not found; installing Debian's haproxy with apt-get");
  execFileSync("bash", ["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null"], { stdio: "inherit" });
  const installed = haproxyVersion();
  if (!installed) throw new Error("haproxy is still missing after apt-get install haproxy");
  return installed;
}

export interface HaproxyOptions {
  pki: string;
  /** Where the config and the cert+key bundle (0600) are written. */
  dir: string;
  port: number;
  servers: string[];
  health: { intervalMs: number; fall: number; rise: number; timeoutMs: number };
  /**
   * The coordinator's current forwarder assertion, set on every request HAProxy forwards (replacing any a client
   * sent): servers serve only requests forwarded by an identity the policy lets forward (#11), and HAProxy cannot
   * sign. HAProxy reads it from a map that is updated through its runtime API, as the assertion is re-signed.
   */
  forwarderAssertion: () => Promise<string>;
  /** The instance's name in the cluster and its files' prefix (default "haproxy"): two can run side by side. */
  name?: string;
  /** One access line per request (`option httplog`, to stdout), as the coordinator writes by default. */
  accessLog?: boolean;
}

export interface Haproxy {
  url: string;
  /** Stops updating the forwarder assertion; the process itself stops with the cluster. */
  close(): void;
}

const FORWARDER_KEY = "forwarder";

export function haproxyConfig({ pki, dir, port, servers, health, name = "haproxy", accessLog = false }: Omit<HaproxyOptions, "forwarderAssertion">): string {
  // HAProxy wants certificate and key in one file; it gets the coordinator's identity, as the coordinator has.
  const bundle = join(dir, `${name}_coordinator_bundle.pem`);
  writeFileSync(bundle, readFileSync(join(pki, "coordinator_cert.pem"), "utf8") + readFileSync(join(pki, "coordinator_key.pem"), "utf8"), { mode: 0o600 });
  chmodSync(bundle, 0o600);
  const ca = join(pki, "ca_cert.pem");
  const backends = servers.map((url, i) => {
    const { hostname, port: serverPort } = new URL(url);
    return `  server s${i + 1} ${hostname}:${serverPort} ssl crt ${bundle} ca-file ${ca} verify required check inter ${health.intervalMs} fall ${health.fall} rise ${health.rise}`;
  });
  return [
    "global",
    "  maxconn 4096",
    `  stats socket ${join(dir, `${name}.sock`)} mode 600 level admin`,
    "  ssl-server-verify required",
    ...(accessLog ? ["  log stdout format raw local0 info"] : []),
    "defaults",
    "  mode http",
    ...(accessLog ? ["  log global", "  option httplog"] : []),
    "  timeout connect 2s",
    "  timeout client 10s",
    "  timeout server 2s",
    `  timeout check ${health.timeoutMs}ms`,
    "  retries 2",
    "  option redispatch",
    "frontend mesh",
    `  bind 127.0.0.1:${port} ssl crt ${bundle} ca-file ${ca} verify required`,
    `  http-request set-header ${FORWARDER_HEADER} %[str(${FORWARDER_KEY}),map(${join(dir, `${name}_forwarder.map`)})]`,
    "  default_backend servers",
    "backend servers",
    "  balance roundrobin",
    "  option httpchk GET /health",
    ...backends,
    "",
  ].join("\n");
}

/** Sends one command to HAProxy's runtime API and resolves with its answer. */
function runtimeCommand(socketPath: string, command: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let answer = "";
    const socket = connect(socketPath, () => socket.end(`${command}\n`));
    socket.on("data", (chunk) => (answer += chunk));
    socket.on("error", reject);
    socket.on("close", () => resolve(answer.trim()));
  });
}

/**
 * Starts HAProxy in the foreground under the cluster, and waits until its front answers /health over mutual TLS.
 * Its forwarder assertion is replaced at a third of the assertion's lifetime, before a server could refuse it.
 */
export async function startHaproxy(cluster: Cluster, options: HaproxyOptions): Promise<Haproxy> {
  const name = options.name ?? "haproxy";
  const configFile = join(options.dir, `${name}.cfg`);
  const mapFile = join(options.dir, `${name}_forwarder.map`);
  writeFileSync(mapFile, `${FORWARDER_KEY} ${await options.forwarderAssertion()}\n`, { mode: 0o600 });
  writeFileSync(configFile, haproxyConfig(options));
  cluster.startCommand(name, [HAPROXY, "-db", "-f", configFile]);
  const url = `https://127.0.0.1:${options.port}`;
  await cluster.waitHealthy(url);
  const refresh = setInterval(async () => {
    const answer = await runtimeCommand(join(options.dir, `${name}.sock`), `set map ${mapFile} ${FORWARDER_KEY} ${await options.forwarderAssertion()}`).catch((error: Error) => error.message);
    if (answer !== "") console.error(`haproxy: the forwarder assertion was not updated: ${answer}`);
  }, (FORWARDER_LIFETIME_S * 1000) / 3);
  return { url, close: () => clearInterval(refresh) };
}
