// A MariaDB Galera cluster for tests, from Debian's mariadb-server and galera-4: N nodes, each with its own datadir,
// config and socket, on test hosts (network namespaces) or on loopback addresses; bootstrapped, joined, killed,
// restarted and watched until Synced. Every node answers TCP as root@'%' with no password, database `test`.
import { chownSync, closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mysql from "mysql2/promise";
import { processRef, RunLease } from "./run-lease.ts";

const MARIADBD = "/usr/sbin/mariadbd";
const GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so";
export const GALERA_PORT = 3306;
/** Debian's server user: the rsync SST daemon drops to `nobody` when started as root, and then cannot write the datadir. */
const SERVER_USER = "mysql";

/** Where a node runs: a test host (its address, and argv wrapped to run inside it), or a loopback address. */
export interface GaleraHost {
  name: string;
  address: string;
  exec?: (argv: readonly string[]) => string[];
}

export interface GaleraOptions {
  /** One node per host. Default: `nodes` nodes on loopback, db1… at 127.0.S.11… (S from this run's slot, from 0). */
  hosts?: readonly GaleraHost[];
  /** Loopback mode only; default 3. */
  nodes?: number;
  /** Loopback mode only: the nodes' addresses, instead of the slot's (e.g. to stand beside a cluster made by hand). */
  loopbackAddresses?: readonly string[];
  /** How long one node may take to start and reach Synced; default 90 s (a joiner waits its turn for a donor). */
  syncTimeoutMs?: number;
}

export interface GaleraStatus {
  /** wsrep_cluster_size: members of the component this node is in. */
  clusterSize: number;
  /** wsrep_cluster_status: "Primary" (has quorum), "non-Primary" or "Disconnected". */
  clusterStatus: string;
  /** wsrep_local_state_comment: "Synced", "Donor/Desynced", "Joining", "Initialized", … */
  state: string;
  /** wsrep_ready: the node accepts queries. */
  ready: boolean;
}

export interface GaleraNode {
  name: string;
  address: string;
  /** mysql://root@ADDRESS:3306/test */
  url: string;
  dir: string;
  running: boolean;
}

/** The options that keep a node small and quick to start, and a partition quick to notice. */
function nodeConfig(node: GaleraNode, peers: readonly string[]): string {
  const provider = [
    `gmcast.listen_addr=tcp://${node.address}:4567`,
    `ist.recv_addr=${node.address}:4568`,
    "gcache.size=64M",
    // Seconds, not Galera's default 15 s and more, so the minority notices a partition within a short test.
    "evs.keepalive_period=PT1S",
    "evs.suspect_timeout=PT3S",
    "evs.inactive_timeout=PT6S",
    "evs.install_timeout=PT6S",
  ].join(";");
  return `[mariadbd]
datadir=${node.dir}/data
socket=${node.dir}/mariadbd.sock
pid-file=${node.dir}/mariadbd.pid
# Its own temporary folder: a test run's $TMPDIR is root's (shared/testing/temp-root.ts), and mariadbd runs as mysql.
tmpdir=${node.dir}/tmp
log-error=${node.dir}/error.log
bind-address=${node.address}
port=${GALERA_PORT}
user=${SERVER_USER}
skip-name-resolve
performance_schema=OFF
innodb_buffer_pool_size=32M
innodb_log_file_size=8M
# A killed process loses nothing with 2: the log is in the OS's buffers; only a machine crash would lose a second.
innodb_flush_log_at_trx_commit=2
# A client host that loses its link mid-transaction leaves its connection open with its row locks held (every
# record write locks the one generation row), and the database would wait for its next statement for hours. Our
# transactions are milliseconds long: one idle for a second has lost its client, so it is rolled back (issue 14).
idle_transaction_timeout=1
binlog_format=ROW
default_storage_engine=InnoDB
innodb_autoinc_lock_mode=2
wsrep_on=ON
wsrep_provider=${GALERA_PROVIDER}
wsrep_cluster_name=securemesh
wsrep_cluster_address=gcomm://${peers.join(",")}
wsrep_node_address=${node.address}
wsrep_node_name=${node.name}
wsrep_sst_method=rsync
wsrep_sst_receive_address=${node.address}:4444
wsrep_provider_options="${provider}"
`;
}

/** A node's processes (mariadbd, its SST scripts and rsync) make their temporary files in the node's own folder. */
function nodeEnvironment(node: GaleraNode): Record<string, string | undefined> {
  return { ...process.env, TMPDIR: join(node.dir, "tmp") };
}

function chownTree(path: string, uid: number, gid: number): void {
  chownSync(path, uid, gid);
  for (const entry of readdirSync(path, { withFileTypes: true })) {
    if (entry.isDirectory()) chownTree(join(path, entry.name), uid, gid);
    else chownSync(join(path, entry.name), uid, gid);
  }
}

function serverUser(): { uid: number; gid: number } {
  const line = readFileSync("/etc/passwd", "utf8")
    .split("\n")
    .find((l) => l.startsWith(`${SERVER_USER}:`));
  if (!line) throw new Error(`no '${SERVER_USER}' user: install Debian's mariadb-server (apt-get install mariadb-server galera-4)`);
  const [, , uid, gid] = line.split(":");
  return { uid: Number(uid), gid: Number(gid) };
}

function signalGroup(leader: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-leader, signal);
  } catch {
    // the group is gone already
  }
}

/** A node's last error-log lines, for a failure message. */
function tail(file: string, lines = 6): string {
  try {
    return readFileSync(file, "utf8")
      .trimEnd()
      .split("\n")
      .slice(-lines)
      .map((l) => `    ${l}`)
      .join("\n");
  } catch {
    return "    (no log)";
  }
}

export class GaleraCluster implements AsyncDisposable {
  readonly nodes: GaleraNode[];
  /** The folder holding every node's datadir, config, socket and logs; removed on dispose. */
  readonly baseDir: string;
  readonly #hosts: Map<string, GaleraHost>;
  readonly #lease: RunLease;
  readonly #procs = new Map<string, Bun.Subprocess>();
  readonly #syncTimeoutMs: number;

  private constructor(baseDir: string, nodes: GaleraNode[], hosts: readonly GaleraHost[], lease: RunLease, syncTimeoutMs: number) {
    this.baseDir = baseDir;
    this.nodes = nodes;
    this.#hosts = new Map(hosts.map((h) => [h.name, h]));
    this.#lease = lease;
    this.#syncTimeoutMs = syncTimeoutMs;
  }

  /**
   * Bootstraps the first node (--wsrep-new-cluster), creates database `test` and root@'%' (no password), joins the
   * others by state transfer, and returns once every node is Synced in a cluster of all of them.
   *
   * @example
   * await using galera = await GaleraCluster.start();          // 3 nodes on loopback
   * const urls = galera.nodes.map((n) => n.url);               // mysql://root@127.0.0.11:3306/test, …
   */
  static async start(options: GaleraOptions = {}): Promise<GaleraCluster> {
    for (const path of [MARIADBD, GALERA_PROVIDER]) {
      if (!existsSync(path)) throw new Error(`${path} is missing: apt-get install mariadb-server galera-4 rsync`);
    }
    if (!Bun.which("rsync")) throw new Error("rsync is missing (Galera's state transfer uses it): apt-get install rsync");
    const { uid, gid } = serverUser();
    const lease = RunLease.acquire();
    const count = options.hosts?.length ?? options.nodes ?? 3;
    const hosts =
      options.hosts ??
      Array.from({ length: count }, (_, i) => ({
        name: `db${i + 1}`,
        address: options.loopbackAddresses?.[i] ?? `127.0.${lease.slot - 1}.${11 + i}`,
      }));
    const base = mkdtempSync(join(tmpdir(), "securemesh-galera-"));
    lease.record("dirs", base);
    const nodes: GaleraNode[] = hosts.map((h) => ({
      name: h.name,
      address: h.address,
      url: `mysql://root@${h.address}:${GALERA_PORT}/test`,
      dir: join(base, h.name),
      running: false,
    }));
    const cluster = new GaleraCluster(base, nodes, hosts, lease, options.syncTimeoutMs ?? 90_000);
    try {
      for (const node of nodes) {
        mkdirSync(join(node.dir, "data"), { recursive: true });
        mkdirSync(join(node.dir, "tmp"));
        writeFileSync(
          join(node.dir, "my.cnf"),
          nodeConfig(
            node,
            nodes.map((n) => n.address),
          ),
        );
      }
      await cluster.#installFirst(nodes[0]!);
      chownTree(base, uid, gid);
      await cluster.#launch(nodes[0]!, ["--wsrep-new-cluster"]);
      await cluster.waitUntil(nodes[0]!.name, (s) => s.state === "Synced" && s.clusterStatus === "Primary");
      await cluster.#admin(nodes[0]!.name, async (conn) => {
        await conn.query("CREATE DATABASE IF NOT EXISTS test");
        // Test hosts reach the nodes from their own addresses; a test cluster has nothing worth a password.
        await conn.query("CREATE USER IF NOT EXISTS 'root'@'%'");
        await conn.query("GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION");
      });
      // One joiner at a time: a second joiner only waits for a donor while the first takes its state transfer.
      for (const node of nodes.slice(1)) {
        await cluster.#launch(node);
        await cluster.waitUntil(node.name, (s) => s.state === "Synced");
      }
      await cluster.waitSynced();
      return cluster;
    } catch (error) {
      await cluster.stop();
      cluster.#lease.release();
      throw error;
    }
  }

  async #installFirst(node: GaleraNode): Promise<void> {
    const log = openSync(join(node.dir, "install.log"), "a");
    const proc = Bun.spawn(
      [
        "mariadb-install-db",
        "--no-defaults",
        `--datadir=${node.dir}/data`,
        "--user=root",
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
        "--innodb-log-file-size=8M",
        "--innodb-buffer-pool-size=32M",
      ],
      { stdio: ["ignore", log, log] },
    );
    const code = await proc.exited;
    closeSync(log);
    if (code !== 0) throw new Error(`mariadb-install-db failed for ${node.name}:\n${tail(join(node.dir, "install.log"))}`);
  }

  async #launch(node: GaleraNode, extra: string[] = []): Promise<void> {
    const host = this.#hosts.get(node.name)!;
    const argv = [MARIADBD, `--defaults-file=${node.dir}/my.cnf`, ...extra];
    const output = openSync(join(node.dir, "stderr.log"), "a");
    // Its own process group: the SST's rsync daemon and scripts go with it when a run is cleaned up.
    const proc = Bun.spawn(host.exec ? host.exec(argv) : argv, { detached: true, stdio: ["ignore", output, output], env: nodeEnvironment(node) });
    closeSync(output);
    this.#lease.record("groups", processRef(proc.pid));
    this.#procs.set(node.name, proc);
    node.running = true;
    void proc.exited.then(() => {
      if (this.#procs.get(node.name) !== proc) return;
      node.running = false;
      this.#lease.forget("groups", (g) => g.pid === proc.pid);
    });
  }

  node(name: string): GaleraNode {
    const node = this.nodes.find((n) => n.name === name);
    if (!node) throw new Error(`no Galera node named ${name}`);
    return node;
  }

  /**
   * Runs `fn` on a connection over the node's Unix socket as root: it works whatever the network does. `causal`
   * makes reads wait until the node has applied everything the cluster committed before them (wsrep_sync_wait).
   */
  async #admin<T>(name: string, fn: (conn: mysql.Connection) => Promise<T>, causal = false): Promise<T> {
    const conn = await mysql.createConnection({ socketPath: join(this.node(name).dir, "mariadbd.sock"), user: "root", connectTimeout: 2000 });
    try {
      if (causal) await conn.query("SET SESSION wsrep_sync_wait = 1");
      return await fn(conn);
    } finally {
      await conn.end().catch(() => conn.destroy());
    }
  }

  /** One SQL statement on a node over its socket, with no default database (a status check, a provider option). */
  query<T = unknown>(name: string, sql: string, params: unknown[] = []): Promise<T[]> {
    return this.#admin(name, async (conn) => (await conn.query(sql, params))[0] as T[]);
  }

  /** A causal read: sees every transaction the cluster committed before it, whichever node committed it. */
  read<T = unknown>(name: string, sql: string, params: unknown[] = []): Promise<T[]> {
    return this.#admin(name, async (conn) => (await conn.query(sql, params))[0] as T[], true);
  }

  /** The node's wsrep status, or undefined while it does not answer (starting, killed). */
  async status(name: string): Promise<GaleraStatus | undefined> {
    try {
      const rows = await this.query<{ Variable_name: string; Value: string }>(
        name,
        "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_cluster_size', 'wsrep_cluster_status', 'wsrep_local_state_comment', 'wsrep_ready')",
      );
      const value = (key: string) => rows.find((r) => r.Variable_name.toLowerCase() === key)?.Value ?? "";
      return {
        clusterSize: Number(value("wsrep_cluster_size")),
        clusterStatus: value("wsrep_cluster_status"),
        state: value("wsrep_local_state_comment"),
        ready: value("wsrep_ready") === "ON",
      };
    } catch {
      return undefined;
    }
  }

  /** Polls the node's status until `condition` holds; fails naming what it last saw, or at once if the node exits. */
  async waitUntil(name: string, condition: (status: GaleraStatus) => boolean, timeoutMs = this.#syncTimeoutMs): Promise<GaleraStatus> {
    const node = this.node(name);
    const deadline = Date.now() + timeoutMs;
    let last: GaleraStatus | undefined;
    for (let delay = 50; ; delay = Math.min(delay * 2, 250)) {
      if (!node.running) throw new Error(`Galera node ${name} exited; its log ends:\n${tail(join(node.dir, "error.log"))}`);
      last = await this.status(name);
      if (last && condition(last)) return last;
      if (Date.now() > deadline)
        throw new Error(
          `Galera node ${name} did not get there within ${timeoutMs} ms; last status ${JSON.stringify(last)}; its log ends:\n${tail(join(node.dir, "error.log"))}`,
        );
      await Bun.sleep(delay); // the interval between polls of a condition
    }
  }

  /** Waits until every running node (or those named) is Synced, Primary and sees all of them. */
  async waitSynced(names: readonly string[] = this.nodes.map((n) => n.name), timeoutMs = this.#syncTimeoutMs): Promise<void> {
    await Promise.all(
      names.map((name) => this.waitUntil(name, (s) => s.state === "Synced" && s.clusterStatus === "Primary" && s.clusterSize === names.length, timeoutMs)),
    );
  }

  /** SIGKILLs a node (and its process group) and waits until it is gone. */
  async kill(name: string): Promise<void> {
    const proc = this.#procs.get(name);
    if (!proc || !this.node(name).running) return;
    signalGroup(proc.pid, "SIGKILL");
    await proc.exited;
  }

  /**
   * Starts a stopped or killed node again and returns once it is Synced, with how it caught up: "IST" (only the
   * writes it missed, from a donor's cache) or "SST" (a full copy). As Debian's service does (galera_recovery), it
   * first recovers the node's last committed position from InnoDB: a killed node's grastate.dat says -1, and
   * without that position it could only ask for a full copy.
   */
  async restart(name: string): Promise<"IST" | "SST"> {
    const node = this.node(name);
    if (node.running) throw new Error(`Galera node ${name} is still running`);
    const position = await this.#recoverPosition(node);
    const log = join(node.dir, "error.log");
    const seen = existsSync(log) ? readFileSync(log, "utf8").length : 0;
    await this.#launch(node, position ? [`--wsrep-start-position=${position}`] : []);
    await this.waitUntil(name, (s) => s.state === "Synced" && s.clusterStatus === "Primary");
    return /rsync SST completed on joiner/.test(readFileSync(log, "utf8").slice(seen)) ? "SST" : "IST";
  }

  /** `mariadbd --wsrep-recover`: replays InnoDB's log and prints the last committed UUID:seqno; undefined if none. */
  async #recoverPosition(node: GaleraNode): Promise<string | undefined> {
    const host = this.#hosts.get(node.name)!;
    const log = join(node.dir, "recover.log");
    rmSync(log, { force: true });
    const argv = [MARIADBD, `--defaults-file=${node.dir}/my.cnf`, "--wsrep-recover", `--log-error=${log}`];
    const proc = Bun.spawn(host.exec ? host.exec(argv) : argv, { detached: true, stdio: ["ignore", "ignore", "ignore"], env: nodeEnvironment(node) });
    this.#lease.record("groups", processRef(proc.pid));
    await proc.exited;
    this.#lease.forget("groups", (g) => g.pid === proc.pid);
    const recovered = /WSREP: Recovered position: (\S+:\d+)/.exec(existsSync(log) ? readFileSync(log, "utf8") : "");
    return recovered?.[1];
  }

  /**
   * Galera's own partition switch (gmcast.isolate): the node drops its links to every peer, as a node cut off
   * from the others would. For loopback clusters, which have no network of their own to cut.
   */
  async setIsolated(name: string, isolated: boolean): Promise<void> {
    await this.query(name, `SET GLOBAL wsrep_provider_options = 'gmcast.isolate=${isolated ? 1 : 0}'`);
  }

  /**
   * Stops one node as its service would (SIGTERM: a clean shutdown, leaving the cluster in order), and waits until it
   * is gone. The last node of a cluster to stop this way writes `safe_to_bootstrap: 1` to its grastate.dat.
   */
  async stopNode(name: string): Promise<void> {
    const proc = this.#procs.get(name);
    if (!proc || !this.node(name).running) return;
    signalGroup(proc.pid, "SIGTERM");
    await proc.exited;
  }

  /** The node's grastate.dat as Galera left it: its cluster's uuid, last seqno, and whether it may bootstrap. */
  grastate(name: string): { uuid: string; seqno: number; safeToBootstrap: boolean } {
    const text = readFileSync(join(this.node(name).dir, "data", "grastate.dat"), "utf8");
    const field = (key: string) => new RegExp(`^${key}:\\s*(\\S+)`, "m").exec(text)?.[1] ?? "";
    return { uuid: field("uuid"), seqno: Number(field("seqno")), safeToBootstrap: field("safe_to_bootstrap") === "1" };
  }

  /**
   * Starts a stopped node as a new cluster (`--wsrep-new-cluster`), as the first node of a whole-cluster restart, and
   * returns once it is Primary. Galera itself refuses (and the node exits) unless its grastate.dat says
   * safe_to_bootstrap: 1, which only the last node to leave the old cluster has.
   */
  async bootstrap(name: string): Promise<void> {
    const node = this.node(name);
    if (node.running) throw new Error(`Galera node ${name} is still running`);
    await this.#launch(node, ["--wsrep-new-cluster"]);
    await this.waitUntil(name, (s) => s.state === "Synced" && s.clusterStatus === "Primary");
  }

  /** Stops every node (SIGTERM, then SIGKILL after 10 s) and waits until all are gone. */
  async stop(): Promise<void> {
    await Promise.all(
      this.nodes.map(async (node) => {
        const proc = this.#procs.get(node.name);
        if (!proc || !node.running) return;
        signalGroup(proc.pid, "SIGTERM");
        const timer = setTimeout(() => signalGroup(proc.pid, "SIGKILL"), 10_000);
        await proc.exited;
        clearTimeout(timer);
      }),
    );
  }

  /** Stops every node and removes the datadirs. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
    this.#lease.release();
  }
}

export const startGalera = (options?: GaleraOptions) => GaleraCluster.start(options);
