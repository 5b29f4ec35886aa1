// Test hosts on one machine: Linux network namespaces joined by a bridge, each with its own address, and the
// faults a real network has: a link cut, a host partitioned from others, every process on a host killed.
import { cleanupStaleRuns, ip, namespacePids, NAME_PREFIX, RunLease } from "./run-lease.ts";

/** Thrown when this machine cannot make namespaces; the message is one line saying why. */
export class NamespacesUnavailable extends Error {}

export interface TestHost {
  name: string;
  /** The network namespace, e.g. smesh3-db1. */
  ns: string;
  /** The host's address on the bridge, e.g. 10.213.3.11. */
  address: string;
  /** `argv` as run inside this host: `ip netns exec NS …argv`. */
  exec(argv: readonly string[]): string[];
}

export interface TestNetwork extends AsyncDisposable {
  hosts: Map<string, TestHost>;
  /** The root namespace's address on the bridge: the harness reaches every host from it. */
  gateway: string;
  /** This run's slot: its subnet is 10.213.SLOT.0/24. */
  slot: number;
  host(name: string): TestHost;
  /** Takes the host's link to the bridge down: its packets are dropped, as when a cable is pulled. */
  cutLink(name: string): void;
  healLink(name: string): void;
  /** Partitions `name` from `from` both ways with blackhole routes; other hosts still reach it. */
  isolate(name: string, from: readonly string[]): void;
  /** Removes every partition route involving `name`. */
  heal(name: string): void;
  /** The PIDs of every process running on the host. */
  pids(name: string): number[];
  /** SIGKILLs every process on the host and waits until none is left: the host lost its power. */
  killAll(name: string): Promise<number>;
  /** Removes every namespace and link (and kills what runs in them); also done on exit and on Ctrl+C. */
  dispose(): void;
}

export interface TestNetworkOptions {
  /** Host names: a letter, then up to 9 letters or digits ("db1", "srv2", "cli1"). */
  hosts: readonly string[];
}

/** The addresses a run's hosts get: 10.213.SLOT.0/24, the bridge at .1, hosts from .11 in the order given. */
const SUBNET_PREFIX = "10.213";
const FIRST_HOST = 11;

/** Why namespaces cannot be made here, in one line, or undefined when they can. */
export function namespacesUnavailableReason(): string | undefined {
  if (process.platform !== "linux") return `network namespaces need Linux (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return `network namespaces need root (running as uid ${process.getuid?.()}); run as root, as CI does`;
  if (!Bun.which("ip")) return "network namespaces need iproute2's `ip` command, which is not on PATH (apt-get install iproute2)";
  return undefined;
}

/** Removes namespaces, links, processes and folders left by runs that were killed; returns what it removed. */
export function cleanupStaleNetworks(): string[] {
  return namespacesUnavailableReason() ? [] : cleanupStaleRuns();
}

/**
 * Makes the hosts and returns the network; dispose of it (`await using`) to remove them, which also happens on
 * exit, Ctrl+C, SIGTERM, and at the next start after a SIGKILL.
 *
 * @example
 * await using net = await createTestNetwork({ hosts: ["db1", "srv1"] });
 * Bun.spawn(net.host("srv1").exec(["bun", "roles/server.ts", "5001", "--host", net.host("srv1").address]));
 */
export async function createTestNetwork(options: TestNetworkOptions): Promise<TestNetwork> {
  const reason = namespacesUnavailableReason();
  if (reason) throw new NamespacesUnavailable(reason);
  for (const name of options.hosts) {
    // Interface names are at most 15 characters: "smv" + slot (3) + "-" + name (10) fits.
    if (!/^[a-z][a-z0-9]{0,9}$/.test(name)) throw new Error(`test host name '${name}': a letter, then up to 9 letters or digits`);
  }
  if (new Set(options.hosts).size !== options.hosts.length) throw new Error("test host names must differ");
  if (options.hosts.length > 200) throw new Error("at most 200 test hosts");

  const lease = RunLease.acquire();
  const subnet = `${SUBNET_PREFIX}.${lease.slot}`;
  const bridge = `smb${lease.slot}`;
  const hosts = new Map<string, TestHost>();
  const vethOf = (name: string) => `smv${lease.slot}-${name}`;
  try {
    lease.record("links", bridge);
    ip(["link", "add", bridge, "type", "bridge"]);
    ip(["addr", "add", `${subnet}.1/24`, "dev", bridge]);
    ip(["link", "set", bridge, "up"]);
    options.hosts.forEach((name, i) => {
      const ns = `${NAME_PREFIX}${lease.slot}-${name}`;
      const veth = vethOf(name);
      const address = `${subnet}.${FIRST_HOST + i}`;
      lease.record("namespaces", ns);
      ip(["netns", "add", ns]);
      lease.record("links", veth);
      ip(["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns]);
      ip(["link", "set", veth, "master", bridge, "up"]);
      ip(["-n", ns, "link", "set", "lo", "up"]);
      ip(["-n", ns, "addr", "add", `${address}/24`, "dev", "eth0"]);
      ip(["-n", ns, "link", "set", "eth0", "up"]);
      hosts.set(name, { name, ns, address, exec: (argv) => ["ip", "netns", "exec", ns, ...argv] });
    });
  } catch (error) {
    lease.release();
    const message = (error as Error).message.split("\n")[0];
    throw new NamespacesUnavailable(`cannot make test hosts: ${message}`);
  }

  const host = (name: string): TestHost => {
    const found = hosts.get(name);
    if (!found) throw new Error(`no test host named ${name}`);
    return found;
  };
  /** Blackhole routes added, per namespace, so heal() removes exactly those. */
  const partitions: { ns: string; address: string; about: string }[] = [];
  const pids = (name: string) => namespacePids(host(name).ns);

  const network: TestNetwork = {
    hosts,
    gateway: `${subnet}.1`,
    slot: lease.slot,
    host,
    cutLink: (name) => void ip(["link", "set", vethOf(host(name).name), "down"]),
    healLink: (name) => void ip(["link", "set", vethOf(host(name).name), "up"]),
    isolate(name, from) {
      const isolated = host(name);
      for (const other of from.map(host)) {
        for (const [a, b] of [
          [isolated, other],
          [other, isolated],
        ] as const) {
          ip(["-n", a.ns, "route", "add", "blackhole", `${b.address}/32`]);
          partitions.push({ ns: a.ns, address: b.address, about: isolated.name });
        }
      }
    },
    heal(name) {
      for (const p of partitions.filter((p) => p.about === name)) {
        ip(["-n", p.ns, "route", "del", "blackhole", `${p.address}/32`]);
        partitions.splice(partitions.indexOf(p), 1);
      }
    },
    pids,
    async killAll(name) {
      const victims = pids(name);
      for (const pid of victims) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // exited meanwhile
        }
      }
      // SIGKILL is not instant: wait until the kernel has reaped them (a poll of the condition, not a fixed wait).
      for (let delay = 5; pids(name).length > 0; delay = Math.min(delay * 2, 100)) await Bun.sleep(delay);
      return victims.length;
    },
    dispose: () => lease.release(),
    [Symbol.asyncDispose]: async () => lease.release(),
  };
  return network;
}
