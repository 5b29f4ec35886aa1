// HAProxy set up as the coordinator is: mutual TLS in front, mutual TLS to the servers, round-robin with health checks.
import { execFileSync } from "node:child_process";
import { chmodSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Cluster } from "./cluster.ts";

export const HAPROXY = process.env.HAPROXY_PATH ?? "haproxy";

/** "2.6.12-1+deb12u4", or null when HAProxy is not installed. */
export function haproxyVersion(binary = HAPROXY): string | null {
  try {
    return /version (\S+)/.exec(execFileSync(binary, ["-v"], { encoding: "utf8" }))?.[1] ?? null;
  } catch {
    return null;
  }
}

/**
 * HAProxy's version; when it is missing and `install` is set, installs Debian's haproxy first, as the bench promises.
 * Where neither works, why: the bench then runs without its HAProxy cases.
 */
export function ensureHaproxy(log: (line: string) => void, binary = HAPROXY, install = true): string | { missing: string } {
  const found = haproxyVersion(binary);
  if (found) return found;
  if (!install) return { missing: `${binary} -v did not run` };
  log("bench: haproxy not found; installing Debian's haproxy with apt-get");
  try {
    execFileSync("bash", ["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null"], { stdio: "inherit" });
  } catch {
    return { missing: "haproxy is not installed, and apt-get install haproxy failed" };
  }
  return haproxyVersion(binary) ?? { missing: "haproxy is still missing after apt-get install haproxy" };
}

export interface HaproxyOptions {
  pki: string;
  /** Where the config and the cert+key bundle (0600) are written. */
  dir: string;
  port: number;
  servers: string[];
  health: { intervalMs: number; fall: number; rise: number; timeoutMs: number };
  /** The instance's name in the cluster and its files' prefix (default "haproxy"): two can run side by side. */
  name?: string;
  /** One access line per request (`option httplog`, to stdout), as the coordinator writes by default. */
  accessLog?: boolean;
  /** The haproxy to run (default HAPROXY_PATH or haproxy on the PATH). */
  binary?: string;
}

export interface Haproxy {
  url: string;
}

export function haproxyConfig({ pki, dir, port, servers, health, name = "haproxy", accessLog = false }: HaproxyOptions): string {
  // HAProxy wants certificate and key in one file; it gets the coordinator's identity, as the coordinator has: the
  // servers decide `forward` on the certificate of the connection that reaches them.
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
    "  default_backend servers",
    "backend servers",
    "  balance roundrobin",
    "  option httpchk GET /health",
    ...backends,
    "",
  ].join("\n");
}

/** Starts HAProxy in the foreground under the cluster, and waits until its front answers /health over mutual TLS. */
export async function startHaproxy(cluster: Cluster, options: HaproxyOptions): Promise<Haproxy> {
  const name = options.name ?? "haproxy";
  const configFile = join(options.dir, `${name}.cfg`);
  writeFileSync(configFile, haproxyConfig(options));
  cluster.startCommand(name, [options.binary ?? HAPROXY, "-db", "-f", configFile]);
  const url = `https://127.0.0.1:${options.port}`;
  await cluster.waitHealthy(url);
  return { url };
}
