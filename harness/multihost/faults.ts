// The faults of `bun harness multihost`, each run under load from both client hosts and reported as one table row:
// requests sent, failed and retried; acknowledged writes against records stored; duplicates; time back in rotation.
import { join } from "node:path";
import { REPO_ROOT } from "../../shared/platform/config.ts";
import { renderTable } from "../fixtures/table.ts";
import { roleCommand, waitFor, type RoleProcess } from "../cluster.ts";
import { HOSTS, PROXY_CLIENT_TIMEOUT_MS, type Deployment } from "./deployment.ts";

const LOAD_AGENT = join(REPO_ROOT, "harness", "multihost", "load-agent.ts");

export interface LoadShape {
  /** Writers per client host, each one request after another. */
  workers: number;
  /** The clients' timeout per coordinator attempt (ms). */
  clientTimeoutMs: number;
  /** Each writer starts a request at most this often (ms). */
  intervalMs: number;
  /** Acknowledged writes to see before the fault, while it holds, and after everything is back. */
  acksBefore: number;
  acksDuring: number;
  acksAfter: number;
}

export interface Fault {
  /** What the row says, e.g. "kill every process on server host srv1". */
  name: string;
  /** Who brings it back: "harness reboots srv1 (starts its server)", or "nothing restarted: link healed". */
  repairedBy: string;
  inject(d: Deployment, load: ClientLoad): Promise<void>;
  /** The fault has taken effect (a coordinator saw the server go, Galera shrank); a description of what is awaited. */
  effect: { what: string; seen(d: Deployment, load: ClientLoad): Promise<boolean> };
  /** Undoes the fault; may return what it did, for the row (how a restarted node caught up, say). */
  // biome-ignore lint/suspicious/noConfusingVoidType: a repair that has nothing to report returns nothing
  repair(d: Deployment, load: ClientLoad): Promise<string | void>;
  /**
   * The clients' retry window for this row, when not the libraries' defaults (MeshClient 3 rounds, ProxyClient 2,
   * both from 200 ms): a row with an outage no server can hide (the whole database down) says how long clients and
   * applications keep trying.
   */
  clientRetry?: ClientRetry;
  /** The runbook in docs/operations.md this row follows (its heading), which must name the row (harness/docs.test.ts). */
  runbook?: string;
}

/** MeshClient's and ProxyClient's `attempts` (rounds over every coordinator or proxy) and `backoffMs` (before round 2, doubled each round). */
export interface ClientRetry {
  attempts: number;
  backoffMs: number;
}

/** How long a client waits between its rounds in all, the retry window beyond its attempts' own time. */
export function retryWindowMs(retry: ClientRetry): number {
  return retry.backoffMs * (2 ** (retry.attempts - 1) - 1);
}

export interface FaultRow {
  fault: string;
  repairedBy: string;
  sent: number;
  failed: number;
  /** Requests that needed another attempt: clients failing over to the other coordinator, coordinators re-sending to another server. */
  retried: number;
  acknowledged: number;
  /** The slowest acknowledged write, as its client saw it: a fault's cost to those it did not fail. */
  slowestMs: number;
  stored: number;
  /** Acknowledged writes not in the database. */
  lost: number;
  /** Records beyond the acknowledged ones, and ids acknowledged twice. */
  duplicates: number;
  tokenCalls: number;
  tokenFailed: number;
  /** Token calls that needed another attempt: an application failing over to the other SecureProxy, a proxy to the other KeyServer. */
  tokenRetried: number;
  /** From the start of the repair (reboot, heal, restart) until every host is back in rotation. */
  backInRotationMs: number;
  /** The first few failures, for the report. */
  errors: string[];
}

/** The load of one row: a load agent on each client host, sending through both coordinators and both proxies (in opposite orders). */
export class ClientLoad {
  readonly #agents: RoleProcess[];

  private constructor(agents: RoleProcess[]) {
    this.#agents = agents;
  }

  static async start(d: Deployment, label: string, shape: LoadShape, retry?: ClientRetry): Promise<ClientLoad> {
    const agents = HOSTS.clients.map((host, i) => {
      const coordinators = i % 2 === 0 ? d.coordinators : [...d.coordinators].reverse();
      const proxies = [...d.secureproxies.slice(i % d.secureproxies.length), ...d.secureproxies.slice(0, i % d.secureproxies.length)];
      const argv = [
        process.execPath,
        LOAD_AGENT,
        "--name",
        d.clientOf(host),
        "--pki",
        d.pkiOf(host),
        "--workers",
        String(shape.workers),
        "--interval",
        String(shape.intervalMs),
        "--timeout",
        String(shape.clientTimeoutMs),
        ...coordinators.flatMap((c) => ["--coordinator", c]),
        ...proxies.flatMap((p) => ["--proxy", p]),
        "--proxy-timeout",
        String(PROXY_CLIENT_TIMEOUT_MS),
        "--api-uri",
        d.itemUri,
        ...(retry ? ["--attempts", String(retry.attempts), "--backoff", String(retry.backoffMs)] : []),
      ];
      return d.cluster.startCommand(`${host}-${label}`, d.host(host).exec(argv));
    });
    await Promise.all(agents.map((a) => a.waitForLine(/^ready /, 30_000)));
    return new ClientLoad(agents);
  }

  /** Every agent has logged a line matching `pattern` (a Fernet key reload, say). */
  everyAgentLogged(pattern: RegExp): boolean {
    return this.#agents.every((a) => a.lines.some((l) => pattern.test(l)));
  }

  /** Ids of the writes acknowledged so far. */
  ackedIds(): number[] {
    return this.#agents.flatMap((a) => a.lines.filter((l) => l.startsWith("ack ")).map((l) => Number(l.split(" ")[1])));
  }

  /** Acknowledged writes so far; with `failover`, only those a client had to fail over for. */
  acks(options: { failover?: boolean } = {}): number {
    return this.#agents.reduce((n, a) => n + a.lines.filter((l) => l.startsWith("ack ") && (!options.failover || l.endsWith(" failover"))).length, 0);
  }

  /** Token calls that went through so far; with `proxy`, only those through it; with `failover`, only those that needed another proxy. */
  tokenOks(options: { proxy?: string; failover?: boolean } = {}): number {
    return this.#agents.reduce(
      (n, a) =>
        n +
        a.lines.filter((l) => {
          const [kind, outcome, proxy, failover] = l.split(" ");
          return kind === "token" && outcome === "ok" && (!options.proxy || proxy === options.proxy) && (!options.failover || failover === "failover");
        }).length,
      0,
    );
  }

  /** Waits until `count` more writes than `from` were acknowledged. */
  async waitForAcks(from: number, count: number, what: string, timeoutMs = 60_000): Promise<void> {
    await waitFor(`${count} acknowledged writes ${what}`, () => this.acks() - from >= count || undefined, timeoutMs);
  }

  /** SIGTERM: every agent finishes the requests in flight, prints its totals and exits. */
  async stop(): Promise<{
    acks: number[];
    slowestMs: number;
    failures: string[];
    failedOver: number;
    tokenCalls: number;
    tokenFailed: number;
    tokenFailedOver: number;
    tokenFailures: string[];
    sent: number;
  }> {
    for (const agent of this.#agents) agent.signal("SIGTERM");
    await Promise.all(
      this.#agents.map(async (agent) => {
        const timer = setTimeout(() => agent.signal("SIGKILL"), 60_000);
        await agent.proc.exited;
        clearTimeout(timer);
        await agent.drained;
      }),
    );
    const lines = this.#agents.flatMap((a) => a.lines);
    const done = this.#agents.map((a) => a.lines.find((l) => l.startsWith("done ")));
    if (done.some((l) => !l)) throw new Error(`a load agent ended without its totals:\n${this.#agents.map((a) => a.tail()).join("\n")}`);
    const totals = done.map((l) => JSON.parse(l!.slice(5)) as { sent: number; tokenCalls: number; tokenFailed: number; tokenFailedOver: number });
    return {
      acks: lines.filter((l) => l.startsWith("ack ")).map((l) => Number(l.split(" ")[1])),
      slowestMs: Math.max(0, ...lines.filter((l) => l.startsWith("ack ")).map((l) => Number(l.split(" ")[2]))),
      failures: lines.filter((l) => l.startsWith("fail ")).map((l) => l.slice(5)),
      failedOver: lines.filter((l) => l.startsWith("ack ") && l.endsWith(" failover")).length,
      sent: totals.reduce((n, t) => n + t.sent, 0),
      tokenCalls: totals.reduce((n, t) => n + t.tokenCalls, 0),
      tokenFailed: totals.reduce((n, t) => n + t.tokenFailed, 0),
      tokenFailedOver: totals.reduce((n, t) => n + t.tokenFailedOver, 0),
      tokenFailures: lines.filter((l) => l.startsWith("token fail ")).map((l) => `token call: ${l.slice(11)}`),
    };
  }
}

/** A coordinator's log lines of failed attempts at a server (not its health checks): each sent the request on or failed it. */
function coordinatorRetries(lines: readonly string[]): number {
  return lines.filter((l) => /Server \S+ failed: /.test(l) && !l.includes("(health check)")).length;
}

/** Every coordinator process's log, from where each stood at `marks` (a coordinator rebooted mid-row has a new process). */
function coordinatorLogSince(d: Deployment, marks: Map<string, { role: RoleProcess; at: number }>): string[] {
  return HOSTS.coordinators.flatMap((host) => {
    const mark = marks.get(host)!;
    const now = d.cluster.roles.get(host);
    const before = mark.role.lines.slice(mark.at);
    return now && now !== mark.role ? [...before, ...now.lines] : before;
  });
}

/** Rows stored now, by a causal read on a node that is Synced. */
async function countRecords(d: Deployment, ids?: readonly number[]): Promise<number> {
  const node = d.galera.nodes.find((n) => n.running)!;
  if (ids && ids.length === 0) return 0;
  const [row] = ids
    ? await d.galera.read<{ n: number }>(node.name, "SELECT COUNT(*) AS n FROM test.records WHERE id IN (?)", [ids])
    : await d.galera.read<{ n: number }>(node.name, "SELECT COUNT(*) AS n FROM test.records");
  return Number(row?.n ?? 0);
}

/**
 * One row: load from both client hosts; the fault once some writes were acknowledged; held until it has taken
 * effect and more writes were acknowledged through it; repaired; timed until every host is back in rotation;
 * load on until more writes went through; then the acknowledgements are checked against the database.
 */
export async function runFault(d: Deployment, fault: Fault, shape: LoadShape, label: string, note: (m: string) => void): Promise<FaultRow> {
  const before = await countRecords(d);
  const keyserverFailoversBefore = keyserverFailovers(d);
  const marks = new Map(
    HOSTS.coordinators.map((host) => {
      const role = d.cluster.role(host);
      return [host, { role, at: role.lines.length }] as const;
    }),
  );
  const load = await ClientLoad.start(d, label, shape, fault.clientRetry);
  let result: Awaited<ReturnType<ClientLoad["stop"]>> | undefined;
  let backInRotationMs = 0;
  let repairedBy = fault.repairedBy;
  try {
    await load.waitForAcks(0, shape.acksBefore, "before the fault");
    const injectedAt = load.acks();
    await fault.inject(d, load);
    const t0 = performance.now();
    await waitFor(fault.effect.what, () => fault.effect.seen(d, load), 60_000);
    note(`${fault.effect.what} after ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    await load.waitForAcks(injectedAt, shape.acksDuring, "while the fault holds");
    // Timed from the start of the repair: a reboot's start-up and a node's state transfer are part of coming back.
    const repairStarted = performance.now();
    repairedBy = (await fault.repair(d, load)) || fault.repairedBy;
    await d.waitInRotation();
    backInRotationMs = performance.now() - repairStarted;
    await load.waitForAcks(load.acks(), shape.acksAfter, "after every host is back");
  } finally {
    result = await load.stop();
  }
  const distinct = [...new Set(result.acks)];
  const stored = (await countRecords(d)) - before;
  const found = await countRecords(d, distinct);
  const retried = result.failedOver + coordinatorRetries(coordinatorLogSince(d, marks));
  return {
    fault: fault.name,
    repairedBy,
    sent: result.sent,
    failed: result.failures.length,
    retried,
    acknowledged: result.acks.length,
    slowestMs: result.slowestMs,
    stored,
    lost: distinct.length - found,
    duplicates: result.acks.length - distinct.length + Math.max(0, stored - distinct.length),
    // A proxy rebooted mid-row starts a new log: its count before the fault is then not subtracted from it.
    tokenCalls: result.tokenCalls,
    tokenFailed: result.tokenFailed,
    tokenRetried: result.tokenFailedOver + Math.max(0, keyserverFailovers(d) - keyserverFailoversBefore),
    backInRotationMs,
    errors: [...result.failures, ...result.tokenFailures].slice(0, 3),
  };
}

/** Every coordinator has `server` out of rotation. */
async function everyCoordinatorDropped(d: Deployment, server: string): Promise<boolean> {
  const views = await Promise.all(d.coordinators.map((c) => d.cluster.health(c)));
  return views.every((h) => (h?.body.servers as { url: string; up: boolean }[] | undefined)?.find((s) => s.url === server)?.up === false);
}

export function killServerHost(host: string): Fault {
  return {
    name: `kill every process on server host ${host}`,
    repairedBy: `harness reboots ${host} (starts its server)`,
    inject: async (d) => void (await d.network.killAll(host)),
    effect: { what: `both coordinators took ${host} out of rotation`, seen: (d) => everyCoordinatorDropped(d, serverUrl(d, host)) },
    repair: (d) => d.reboot(host),
  };
}

export function cutServerLink(host: string): Fault {
  return {
    name: `cut server host ${host}'s link, then heal it`,
    repairedBy: "nothing restarted: link healed",
    inject: async (d) => d.network.cutLink(host),
    effect: { what: `both coordinators took ${host} out of rotation`, seen: (d) => everyCoordinatorDropped(d, serverUrl(d, host)) },
    repair: async (d) => d.network.healLink(host),
  };
}

export function killCoordinatorHost(host: string): Fault {
  return {
    name: `kill every process on coordinator host ${host}`,
    repairedBy: `harness reboots ${host} (starts its coordinator)`,
    inject: async (d) => void (await d.network.killAll(host)),
    effect: { what: `clients failed over to the other coordinator`, seen: async (_, load) => load.acks({ failover: true }) >= 5 },
    repair: (d) => d.reboot(host),
  };
}

export function killGaleraNode(node: string): Fault {
  return {
    name: `kill Galera node ${node}, restart it, let it rejoin`,
    repairedBy: `the fault restarts ${node}'s mariadbd`,
    inject: async (d) => void (await d.network.killAll(node)),
    effect: {
      what: `the other Galera nodes formed a cluster of ${HOSTS.galera.length - 1}`,
      seen: async (d) =>
        (await Promise.all(HOSTS.galera.filter((n) => n !== node).map((n) => d.galera.status(n)))).every((s) => s?.clusterSize === HOSTS.galera.length - 1),
    },
    repair: async (d) => `the fault restarts ${node}'s mariadbd; it rejoined by ${await d.galera.restart(node)}`,
  };
}

export function isolateGaleraNode(node: string): Fault {
  const others = HOSTS.galera.filter((n) => n !== node);
  return {
    name: `cut Galera node ${node} off from ${others.join(" and ")} (minority), then heal`,
    repairedBy: "nothing restarted: partition healed",
    inject: async (d) => d.network.isolate(node, others),
    effect: { what: `${node} lost quorum (non-Primary)`, seen: async (d) => (await d.galera.status(node))?.clusterStatus === "non-Primary" },
    repair: async (d) => d.network.heal(node),
  };
}

/** Token releases a KeyServer host's current process has logged. */
function releasesOn(d: Deployment, host: string): number {
  return d.cluster.roles.get(host)?.lines.filter((l) => l.endsWith(" outcome=released")).length ?? 0;
}

const otherOf = (hosts: readonly string[], host: string) => hosts.find((h) => h !== host)!;

/** The SecureProxies' log lines of a token request made again at the next KeyServer (secureproxy-app.ts). */
function keyserverFailovers(d: Deployment, keyserver?: string): number {
  const host = keyserver && new URL(keyserver).host;
  return HOSTS.secureproxies.reduce(
    (n, proxy) =>
      n +
      (d.cluster.roles.get(proxy)?.lines.filter((l) => l.includes("; a new request goes to the next") && (!host || l.startsWith(`KeyServer ${host} failed`)))
        .length ?? 0),
    0,
  );
}

export function killKeyServerHost(host: string): Fault {
  const other = otherOf(HOSTS.keyservers, host);
  let from = 0;
  return {
    name: `kill every process on KeyServer host ${host}`,
    runbook: "Fail over the token path",
    repairedBy: `harness reboots ${host} (starts its KeyServer)`,
    inject: async (d) => {
      from = releasesOn(d, other);
      await d.network.killAll(host);
    },
    effect: {
      what: `a SecureProxy failed over from ${host} to ${other}, which released 5 more`,
      seen: async (d) => keyserverFailovers(d, d.keyservers[HOSTS.keyservers.indexOf(host as never)]) >= 1 && releasesOn(d, other) - from >= 5,
    },
    repair: (d) => d.reboot(host),
  };
}

export function killSecureProxyHost(host: string): Fault {
  const other = otherOf(HOSTS.secureproxies, host);
  let from = -1;
  return {
    name: `kill every process on SecureProxy host ${host}`,
    runbook: "Fail over the token path",
    repairedBy: `harness reboots ${host} (starts its SecureProxy)`,
    inject: async (d) => {
      from = -1;
      await d.network.killAll(host);
    },
    effect: {
      what: `applications failed over to ${other}`,
      seen: async (d, load) => {
        const url = d.secureproxies[HOSTS.secureproxies.indexOf(other as never)]!;
        if (from < 0) from = load.tokenOks({ proxy: url }); // the first look after the kill
        return load.tokenOks({ proxy: url, failover: true }) >= 1 && load.tokenOks({ proxy: url }) - from >= 5;
      },
    },
    repair: (d) => d.reboot(host),
  };
}

/** A token command on a KeyServer host, inside its namespace, as an operator there runs it; its exit code and lines. */
async function tokenCommandOn(d: Deployment, host: string, label: string, args: string[]): Promise<{ exitCode: number; lines: string[] }> {
  const role = d.cluster.startCommand(`${host}-${label}`, d.host(host).exec(roleCommand(d.cluster.runtimeOf(host), "keyserver", args)));
  const exitCode = await role.proc.exited;
  await role.drained;
  return { exitCode, lines: role.lines };
}

/**
 * Issue 23's sequence, then a proper rotation, while releases run through both proxies and both KeyServers: on `host`,
 * `token rotate-key` with the KeyServer's --data but not its store (as the old docs printed it, the store left to its
 * default) must be refused naming both; with the host's --config it re-seals every token, and both KeyServers go on
 * releasing under the new version (the other learns of it from the store).
 */
export function rotateMasterKey(host: string): Fault {
  let after = { [HOSTS.keyservers[0]]: 0, [HOSTS.keyservers[1]]: 0 } as Record<string, number>;
  let done = "";
  return {
    name: `rotate the master key on ${host}: first without --db (as the old docs printed it), then with --config`,
    runbook: "Rotate the master key, back up and restore the keyring",
    repairedBy: "nothing restarted",
    inject: async (d) => {
      const { file, dataDir } = d.keyserverConfig(host);
      const wrong = await tokenCommandOn(d, host, "rotate-no-db", ["token", "rotate-key", "--data", dataDir]);
      if (
        wrong.exitCode !== 2 ||
        !/^keyserver: keyring \S+ belongs to token store mysql \S+ \(store id [0-9a-f]+\), not to sqlite \S+ \(no such file\): /.test(wrong.lines[0] ?? "")
      ) {
        throw new Error(`token rotate-key without --db was not refused naming both stores: exit ${wrong.exitCode}: ${wrong.lines.join(" | ")}`);
      }
      const proper = await tokenCommandOn(d, host, "rotate-config", ["token", "rotate-key", "--config", file]);
      const resealed = /^re-sealed (\d+) token\(s\) under master key v(\d+); retired versions: (\S+)/.exec(proper.lines.at(-1) ?? "");
      if (proper.exitCode !== 0 || !resealed) throw new Error(`token rotate-key --config failed: exit ${proper.exitCode}: ${proper.lines.join(" | ")}`);
      after = Object.fromEntries(HOSTS.keyservers.map((h) => [h, releasesOn(d, h)]));
      done = `nothing restarted: rotate-key without --db refused (exit 2, naming both stores); --config re-sealed ${resealed[1]} token(s) under v${resealed[2]}, archived v${resealed[3]}`;
    },
    effect: { what: "both KeyServers released under the new master key", seen: async (d) => HOSTS.keyservers.every((h) => releasesOn(d, h) - after[h]! >= 3) },
    repair: async () => done,
  };
}

function serverUrl(d: Deployment, host: string): string {
  return d.servers[HOSTS.servers.indexOf(host as (typeof HOSTS.servers)[number])]!;
}

const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/** The fault table, in the repository's one table builder. */
export function faultTable(rows: readonly FaultRow[]): string[] {
  return renderTable(
    [
      "fault",
      "sent",
      "failed",
      "retried",
      "slowest",
      "acknowledged",
      "stored",
      "lost",
      "duplicates",
      "token calls (failed, retried)",
      "back in rotation",
      "restarted",
    ],
    rows.map((r) => [
      r.fault,
      String(r.sent),
      String(r.failed),
      String(r.retried),
      seconds(r.slowestMs),
      String(r.acknowledged),
      String(r.stored),
      String(r.lost),
      String(r.duplicates),
      `${r.tokenCalls} (${r.tokenFailed}, ${r.tokenRetried})`,
      seconds(r.backInRotationMs),
      r.repairedBy,
    ]),
  );
}

/** What a row missed of the goal: 0 failed requests, every acknowledged write stored once. */
export function goalMisses(row: FaultRow): string[] {
  const misses: string[] = [];
  if (row.failed > 0) misses.push(`${row.failed} client requests failed, e.g. ${row.errors[0]}`);
  if (row.tokenFailed > 0) misses.push(`${row.tokenFailed} token calls failed, e.g. ${row.errors.find((e) => e.startsWith("token call: ")) ?? "?"}`);
  if (row.lost > 0) misses.push(`${row.lost} acknowledged writes are not stored`);
  if (row.duplicates > 0) misses.push(`${row.duplicates} duplicates`);
  if (row.stored !== row.acknowledged) misses.push(`${row.acknowledged} acknowledged but ${row.stored} stored`);
  return misses;
}
