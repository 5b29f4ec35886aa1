// The deployment of `bun harness multihost`: every role on a test host of its own, with a certificate for that
// host's address; Galera on three more; how a host is started, "rebooted" and checked back in rotation.
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { policyPath } from "../../shared/platform/config.ts";
import { flagVariable } from "../../shared/platform/config-file.ts";
import { loadIdentity, mutualTlsClientOptions } from "../../shared/platform/tls.ts";
import { bundleIdentity, issueIdentity, type IdentityKind } from "../../shared/testing/pki.ts";
import { expectThat, roleCommand, waitFor, type Cluster, type RoleProcess } from "../cluster.ts";
import { GALERA_PORT, GaleraCluster, type GaleraNode } from "./galera.ts";
import { createTestNetwork, type TestHost, type TestNetwork } from "./netns.ts";

/** Which host runs what. Host names become namespace and interface names, so they stay short. */
export const HOSTS = {
  galera: ["db1", "db2", "db3"],
  servers: ["srv1", "srv2", "srv3"],
  // Made, given a certificate and configured, but not started nor listed: the "add a server host" row starts it.
  spareServers: ["srv4"],
  coordinators: ["coord1", "coord2"],
  clients: ["cli1", "cli2"],
  // Two of each on the token path, on one Galera store (issue 23: one KeyServer and one proxy were single points).
  keyservers: ["keys1", "keys2"],
  secureproxies: ["proxy1", "proxy2"],
  marketplace: "market",
} as const;

/**
 * Each host has an address of its own, so every role keeps its usual port (nothing else can hold it there), and
 * a rebooted role comes back where the coordinators and the proxy expect it.
 */
export const PORTS = { server: 5001, coordinator: 8000, keyserver: 5003, secureproxy: 5004, marketplace: 5005 } as const;

/**
 * The coordinators' per-attempt upstream timeout. When a Galera node is lost, every commit in the cluster stalls
 * until the others evict it (evs.suspect_timeout, 3 s here, plus about a second): a server is then slow, not dead,
 * and the default 2000 ms would time it out and take every server out of rotation at once.
 */
export const COORDINATOR_TIMEOUT_MS = 6000;

/**
 * The SecureProxy's timeout for the KeyServer, for the same reason: a token read on a database node that is losing
 * quorum waits until that node gives up (about 4.5 s) before the KeyServer reads it elsewhere.
 */
export const PROXY_TIMEOUT_MS = 8000;

/**
 * The applications' timeout per SecureProxy: above a proxy's worst case, one attempt at each of its two KeyServers
 * and the API call, so a slow release is the proxy's to report, not a reason to ask the other proxy.
 */
export const PROXY_CLIENT_TIMEOUT_MS = 2 * PROXY_TIMEOUT_MS + 4000;

/**
 * The servers' --ttl (SECUREMESH_TTL), the oldest Fernet token they accept, in seconds: shorter than the default 300,
 * so that a Fernet rotation's retire is safe TTL + MAX_CLOCK_SKEW_S (60 s) after its promote, 90 s, not six minutes.
 * Not much shorter: a client re-sends a write with the token it made at the start, so the TTL must outlast its whole
 * retry window, the longest being the Galera restart row's 15.75 s of backoff (runbooks.ts). At 5 s, writes re-sent
 * after a server host's link was cut were refused 400 "invalid or expired token".
 */
export const SERVER_TOKEN_TTL_S = 30;

/** The passphrase of the keyring backup taken from the first KeyServer host to the second. */
const KEYRING_BACKUP_PASSPHRASE = "multihost keyring backup passphrase";

/**
 * The operator of the runbooks: a client certificate from the CA host (`./pki.sh issue operator --client`) that the
 * mesh's policy allows admin.drain, as docs/operations.md "Drain one server from a coordinator" says to add.
 */
export const OPERATOR = "operator";
const OPERATOR_RULE = {
  identity: `spiffe://securemesh/client/${OPERATOR}`,
  allow: ["admin.drain"],
  comment: "the runbooks' operator: drains a server at a coordinator",
};

/** The repository's policy with the operator's rule added: every serving host gets the same file, as one mesh should. */
function meshPolicy(): string {
  const policy = JSON.parse(readFileSync(policyPath(), "utf8")) as { rules: unknown[] };
  return `${JSON.stringify({ ...policy, rules: [...policy.rules, OPERATOR_RULE] }, null, 2)}\n`;
}

/** The client identity each client host holds (the policy knows client1 and client2). */
const CLIENT_OF: Record<string, string> = { cli1: "client1", cli2: "client2" };

/**
 * The servers' and the KeyServer's database: every Galera node in one URL, tried in this order, with failover.
 * This is the form shared/db reads (issue 14 part 3).
 */
export function galeraUrl(nodes: readonly GaleraNode[]): string {
  return `mysql://root@${nodes.map((n) => `${n.address}:${GALERA_PORT}`).join(",")}/test`;
}

type RoleScript = "server" | "coordinator" | "keyserver" | "secureproxy" | "marketplace";

interface RoleSpec {
  host: string;
  script: RoleScript;
  port: number;
  config: HostConfig;
}

/**
 * A role's configuration on its host, as its unit in roles/systemd/ reads it: the EnvironmentFile
 * (/etc/securemesh/securemesh-ROLE.env: SECUREMESH_<FLAG>=value lines, 0600), which the role reads with --config;
 * the secrets as credential files (0600); and the flags the unit's ExecStart gives, which only name those files.
 */
export interface HostConfig {
  file: string;
  /** The unit's ExecStart flags (--db-file CREDENTIAL, …): never a secret itself, since `ps` shows argv. */
  args: string[];
}

/**
 * Writes `role`'s configuration under `etc` (the host's /etc/securemesh): `flags` as SECUREMESH_<FLAG> lines, each
 * of `credentials` (name → secret) as its own 0600 file in credentials/; `execStart` gets the credentials' paths and
 * returns the unit's ExecStart flags.
 * @example writeHostConfig(etc, "server", { port: "5001", ttl: "5" }, { "server-db-url": url }, (c) => ["--db-file", c["server-db-url"]!])
 */
export function writeHostConfig(
  etc: string,
  role: RoleScript,
  flags: Record<string, string>,
  credentials: Record<string, string> = {},
  execStart: (paths: Record<string, string>) => string[] = () => [],
): HostConfig {
  mkdirSync(join(etc, "credentials"), { recursive: true, mode: 0o700 });
  const paths: Record<string, string> = {};
  for (const [name, secret] of Object.entries(credentials)) {
    paths[name] = join(etc, "credentials", name);
    writeFileSync(paths[name], `${secret}\n`, { mode: 0o600 });
  }
  const file = join(etc, `securemesh-${role}.env`);
  const lines = Object.entries(flags).map(([flag, value]) => `${flagVariable(flag)}=${value}`);
  writeFileSync(file, `# securemesh ${role}: read by its unit (EnvironmentFile) and by --config\n${lines.join("\n")}\n`, { mode: 0o600 });
  return { file, args: execStart(paths) };
}

export interface Deployment extends AsyncDisposable {
  network: TestNetwork;
  galera: GaleraCluster;
  cluster: Cluster;
  databaseUrl: string;
  servers: string[];
  coordinators: string[];
  /** The spare server hosts' URLs (HOSTS.spareServers): configured, in no coordinator's list until a row adds them. */
  spareServers: string[];
  keyservers: string[];
  secureproxies: string[];
  marketplace: string;
  /** The marketplace item API as callers name it in ApiUri. */
  itemUri: string;
  host(name: string): TestHost;
  /** The PKI folder a host holds: the CA, its own certificate for its address, the Fernet key where it needs one. */
  pkiOf(host: string): string;
  /** The client identity a client host holds. */
  clientOf(host: string): string;
  /**
   * A KeyServer host's configuration file (SECUREMESH_DB, SECUREMESH_DATA), which its KeyServer and its token commands
   * read with --config, as a systemd unit's EnvironmentFile would be; and its --data folder.
   */
  keyserverConfig(host: string): { file: string; dataDir: string };
  /** The role's configuration on `host`, as its unit reads it. */
  configOf(host: string): HostConfig;
  /** A coordinator host's --servers-file (SECUREMESH_SERVERS_FILE): one server URL per line, re-read on change. */
  serversFileOf(host: string): string;
  /** The CA host's folder, where `./pki.sh fernet …` runs (PKI_DIR). */
  caDir: string;
  /** Stops the role on `host` as its unit's stop does (SIGTERM: requests in flight finish), and waits until it exits. */
  stopRole(host: string): Promise<void>;
  /**
   * `POST /admin/ACTION {"server": server}` at `coordinator` over mutual TLS as the operator (admin.drain): "drain"
   * answers once the server is empty, "undrain" puts it back. The answer's JSON, or an error with its status.
   */
  operatorDrain(coordinator: string, action: "drain" | "undrain", server: string): Promise<Record<string, unknown>>;
  /** Starts the role that lives on `host` again (after its processes were killed: a reboot), and waits until it is healthy. */
  reboot(host: string): Promise<void>;
  /** What is not yet back: a coordinator not answering or missing a server, a role not healthy, a Galera node not Synced. */
  rotationGaps(): Promise<string[]>;
  /** Waits until rotationGaps() is empty; returns how long that took. */
  waitInRotation(timeoutMs?: number): Promise<number>;
}

export interface DeploymentOptions {
  cluster: Cluster;
  /** Told each step, for the scenario's progress lines. */
  step?: (message: string) => void;
  /** Coordinator health-check interval; short, so a host back from a fault rejoins within a second or two. */
  healthIntervalMs?: number;
}

/**
 * Builds the test hosts, the Galera cluster, a certificate per host, and starts every role on its host. Disposing
 * stops the roles, the Galera nodes and removes the hosts, also when start-up fails half-way.
 */
export async function startDeployment(options: DeploymentOptions): Promise<Deployment> {
  const { cluster } = options;
  const step = options.step ?? (() => {});
  const allHosts = [
    ...HOSTS.galera,
    ...HOSTS.servers,
    ...HOSTS.spareServers,
    ...HOSTS.coordinators,
    ...HOSTS.clients,
    ...HOSTS.keyservers,
    ...HOSTS.secureproxies,
    HOSTS.marketplace,
  ];
  step(`making ${allHosts.length} test hosts (network namespaces on one bridge)`);
  const network = await createTestNetwork({ hosts: allHosts });
  const started: string[] = [];
  let galera: GaleraCluster | undefined;
  const dispose = async () => {
    await cluster.stop(started);
    await galera?.[Symbol.asyncDispose]();
    network.dispose();
  };
  try {
    step(`starting Galera on ${HOSTS.galera.join(", ")} (bootstrap, then state transfer to the others)`);
    galera = await GaleraCluster.start({ hosts: HOSTS.galera.map((name) => network.host(name)) });
    step(`Galera Synced: ${galera.nodes.length} nodes, datadirs in ${galera.baseDir}`);
    const databaseUrl = galeraUrl(galera.nodes);
    const addressOf = (host: string) => network.host(host).address;
    const url = (host: string, port: number) => `https://${addressOf(host)}:${port}`;

    step("issuing a certificate per host, for its address (pki.sh issue NAME --san IP:…), and bundling each host's PKI folder (pki.sh bundle)");
    const pkiRoot = join(cluster.logDir, "hosts");
    const pkiOf = (host: string) => join(pkiRoot, host, "pki");
    await issueHostPki(cluster.pki, addressOf, pkiOf);
    step(`issuing the operator's certificate on the CA host (pki.sh issue ${OPERATOR} --client), allowed admin.drain by every host's policy`);
    await issueIdentity(cluster.pki, OPERATOR, "client", { force: true });
    const operatorTls = mutualTlsClientOptions(loadIdentity(cluster.pki, OPERATOR));

    const servers = HOSTS.servers.map((h) => url(h, PORTS.server));
    const spareServers = HOSTS.spareServers.map((h) => url(h, PORTS.server));
    const coordinators = HOSTS.coordinators.map((h) => url(h, PORTS.coordinator));
    const keyservers = HOSTS.keyservers.map((h) => url(h, PORTS.keyserver));
    const secureproxies = HOSTS.secureproxies.map((h) => url(h, PORTS.secureproxy));
    const marketplace = url(HOSTS.marketplace, PORTS.marketplace);

    // Each KeyServer host's one configuration file, read by its KeyServer and by every token command run there.
    // Every host's configuration, as its unit reads it (roles/systemd/): etcOf(host) stands for its /etc/securemesh,
    // stateOf(host) for its /var/lib/securemesh. The roles start from these files and nothing else.
    const etcOf = (host: string) => join(pkiRoot, host, "etc");
    const stateOf = (host: string) => join(pkiRoot, host, "state");
    const healthInterval = String(options.healthIntervalMs ?? 500);
    const policy = meshPolicy();
    const policyOf = (host: string) => {
      mkdirSync(etcOf(host), { recursive: true, mode: 0o700 });
      writeFileSync(join(etcOf(host), "policy.json"), policy);
      return join(etcOf(host), "policy.json");
    };
    const common = (host: string, port: number) => ({ port: String(port), host: addressOf(host), pki: pkiOf(host), policy: policyOf(host) });
    const serversFileOf = (host: string) => join(etcOf(host), "servers");
    for (const host of HOSTS.coordinators) {
      mkdirSync(etcOf(host), { recursive: true, mode: 0o700 });
      writeFileSync(serversFileOf(host), `# the servers ${host} forwards to; re-read on change\n${servers.join("\n")}\n`);
    }
    const token = `mkt_${randomBytes(18).toString("base64url")}`;
    const configs = new Map<string, HostConfig>([
      ...[...HOSTS.servers, ...HOSTS.spareServers].map(
        (host) =>
          [
            host,
            writeHostConfig(
              etcOf(host),
              "server",
              // Its own /var/lib/securemesh (the unit's $STATE_DIRECTORY): Fernet keys kept for stored records are per host.
              { ...common(host, PORTS.server), ttl: String(SERVER_TOKEN_TTL_S), "state-dir": stateOf(host) },
              { "server-db-url": databaseUrl },
              (c) => ["--db-file", c["server-db-url"]!],
            ),
          ] as const,
      ),
      ...HOSTS.coordinators.map(
        (host) =>
          [
            host,
            writeHostConfig(etcOf(host), "coordinator", {
              ...common(host, PORTS.coordinator),
              "servers-file": serversFileOf(host),
              "health-interval": healthInterval,
              timeout: String(COORDINATOR_TIMEOUT_MS),
            }),
          ] as const,
      ),
      // The token commands run with the same file (--config), so it names the store too: the credential's path.
      ...HOSTS.keyservers.map(
        (host) =>
          [
            host,
            writeHostConfig(
              etcOf(host),
              "keyserver",
              { ...common(host, PORTS.keyserver), data: join(stateOf(host), "keyserver"), "db-file": join(etcOf(host), "credentials", "keyserver-db-url") },
              { "keyserver-db-url": databaseUrl },
              (c) => ["--data", join(stateOf(host), "keyserver"), "--db-file", c["keyserver-db-url"]!],
            ),
          ] as const,
      ),
      // The n-th proxy starts from the n-th KeyServer: the load is spread, and each order is exercised.
      ...HOSTS.secureproxies.map(
        (host, i) =>
          [
            host,
            writeHostConfig(etcOf(host), "secureproxy", {
              ...common(host, PORTS.secureproxy),
              keyserver: [...keyservers.slice(i), ...keyservers.slice(0, i)].join(","),
              allow: `marketplace=${addressOf(HOSTS.marketplace)}:${PORTS.marketplace}`,
              timeout: String(PROXY_TIMEOUT_MS),
            }),
          ] as const,
      ),
      [
        HOSTS.marketplace,
        writeHostConfig(
          etcOf(HOSTS.marketplace),
          "marketplace",
          { port: String(PORTS.marketplace), host: addressOf(HOSTS.marketplace), pki: pkiOf(HOSTS.marketplace) },
          { "marketplace-token": token },
          (c) => ["--token-file", c["marketplace-token"]!],
        ),
      ],
    ]);
    const configOf = (host: string) => {
      const config = configs.get(host);
      if (!config) throw new Error(`no role lives on ${host}`);
      return config;
    };
    const keyserverConfig = (host: string) => ({ file: configOf(host).file, dataDir: join(stateOf(host), "keyserver") });
    for (const host of [...HOSTS.keyservers, ...HOSTS.servers, ...HOSTS.spareServers]) mkdirSync(stateOf(host), { recursive: true, mode: 0o700 });
    const [first, ...others] = HOSTS.keyservers;
    step(`seeding the marketplace token for client1 and client2 in the token store on Galera (token add --config on ${first})`);
    for (const client of Object.values(CLIENT_OF)) {
      const seeded = await cluster.run(
        `keyserver-admin-${client}`,
        "keyserver",
        ["token", "add", "--client", client, "--type", "marketplace", "--token", "-", "--config", keyserverConfig(first).file],
        { stdin: token },
      );
      expectThat(seeded.exitCode === 0, `token add for ${client} failed:\n${seeded.lines.join("\n")}`);
    }
    step(`taking the keyring to ${others.join(", ")}: token keyring export on ${first}, import on each`);
    const backup = join(pkiRoot, "keyring.backup");
    const exported = await cluster.run("keyserver-export", "keyserver", ["token", "keyring", "export", backup, "--config", keyserverConfig(first).file], {
      stdin: KEYRING_BACKUP_PASSPHRASE,
    });
    expectThat(exported.exitCode === 0, `token keyring export failed:\n${exported.lines.join("\n")}`);
    for (const host of others) {
      const imported = await cluster.run(
        `keyserver-import-${host}`,
        "keyserver",
        ["token", "keyring", "import", backup, "--config", keyserverConfig(host).file],
        { stdin: KEYRING_BACKUP_PASSPHRASE },
      );
      expectThat(imported.exitCode === 0, `token keyring import on ${host} failed:\n${imported.lines.join("\n")}`);
    }

    const roleOf = (host: string): [RoleScript, number] =>
      (HOSTS.servers as readonly string[]).includes(host) || (HOSTS.spareServers as readonly string[]).includes(host)
        ? ["server", PORTS.server]
        : (HOSTS.coordinators as readonly string[]).includes(host)
          ? ["coordinator", PORTS.coordinator]
          : (HOSTS.keyservers as readonly string[]).includes(host)
            ? ["keyserver", PORTS.keyserver]
            : (HOSTS.secureproxies as readonly string[]).includes(host)
              ? ["secureproxy", PORTS.secureproxy]
              : ["marketplace", PORTS.marketplace];
    const specs = new Map<string, RoleSpec>(
      [...configs.keys()].map((host) => {
        const [script, port] = roleOf(host);
        return [host, { host, script, port, config: configOf(host) }];
      }),
    );

    const start = async (host: string): Promise<void> => {
      const spec = specs.get(host);
      if (!spec) throw new Error(`no role lives on ${host}`);
      // As the unit starts it: the ExecStart flags (credential paths), every other flag from its EnvironmentFile.
      const argv = roleCommand(cluster.runtimeOf(host), spec.script, [...spec.config.args, "--config", spec.config.file]);
      if (!started.includes(host)) started.push(host);
      const role: RoleProcess = cluster.startCommand(host, network.host(host).exec(argv));
      await role.waitForLine(/listening on https:\/\//, 30_000);
      await cluster.waitHealthy(url(host, spec.port), 30_000);
    };

    step(
      `starting ${HOSTS.servers.length} servers, ${HOSTS.keyservers.length} KeyServers and the marketplace, then ${HOSTS.coordinators.length} coordinators and ${HOSTS.secureproxies.length} SecureProxies, each on its host`,
    );
    await Promise.all([...HOSTS.servers, ...HOSTS.keyservers, HOSTS.marketplace].map(start));
    await Promise.all([...HOSTS.coordinators, ...HOSTS.secureproxies].map(start));

    const rotationGaps = async (): Promise<string[]> => {
      const gaps: string[] = [];
      await Promise.all([
        ...coordinators.map(async (coordinator, i) => {
          const health = await cluster.health(coordinator);
          const listed = (health?.body.servers ?? []) as { url: string; up: boolean }[];
          if (!health) gaps.push(`${HOSTS.coordinators[i]} does not answer`);
          else for (const server of servers) if (!listed.find((s) => s.url === server)?.up) gaps.push(`${HOSTS.coordinators[i]} has ${server} out of rotation`);
        }),
        ...[
          ...HOSTS.keyservers.map((h, i) => [h, keyservers[i]]),
          ...HOSTS.secureproxies.map((h, i) => [h, secureproxies[i]]),
          [HOSTS.marketplace, marketplace],
        ].map(async ([host, base]) => {
          if ((await cluster.health(base!))?.status !== 200) gaps.push(`${host} not healthy`);
        }),
        ...galera!.nodes.map(async (node) => {
          const status = await galera!.status(node.name);
          if (!(status?.state === "Synced" && status.clusterStatus === "Primary" && status.clusterSize === galera!.nodes.length)) {
            gaps.push(`${node.name} ${status ? `${status.state}, ${status.clusterStatus}, size ${status.clusterSize}` : "not answering"}`);
          }
        }),
      ]);
      return gaps;
    };

    const deployment: Deployment = {
      network,
      galera,
      cluster,
      databaseUrl,
      servers,
      spareServers,
      coordinators,
      keyservers,
      secureproxies,
      marketplace,
      itemUri: `${marketplace}/api/item`,
      host: (name) => network.host(name),
      pkiOf,
      clientOf: (host) => CLIENT_OF[host]!,
      keyserverConfig,
      configOf,
      serversFileOf,
      caDir: cluster.pki,
      async operatorDrain(coordinator, action, server) {
        const response = await fetch(`${coordinator}/admin/${action}`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ server }),
          tls: operatorTls,
          signal: AbortSignal.timeout(60_000),
        });
        const body = (await response.json()) as Record<string, unknown>;
        if (response.status !== 200) throw new Error(`POST ${coordinator}/admin/${action} ${server} answered ${response.status}: ${JSON.stringify(body)}`);
        return body;
      },
      reboot: start,
      stopRole: (host) => cluster.stop([host]),
      rotationGaps,
      async waitInRotation(timeoutMs = 120_000) {
        const t0 = performance.now();
        let last: string[] = [];
        await waitFor(
          "every host back in rotation",
          async () => {
            last = await rotationGaps();
            return last.length === 0;
          },
          timeoutMs,
        ).catch((error: Error) => {
          throw new Error(`${error.message}; not back: ${last.join("; ")}`);
        });
        return performance.now() - t0;
      },
      [Symbol.asyncDispose]: dispose,
    };
    return deployment;
  } catch (error) {
    await dispose();
    throw error;
  }
}

/** The role kinds a host of the deployment serves as; each is also the name of the files its role loads. */
type HostKind = Extract<IdentityKind, "server" | "coordinator" | "keyserver" | "secureproxy" | "marketplace">;

/**
 * Which identity each serving host holds: its own name where nothing asks for one (server1…server3, as
 * `./pki.sh revoke server2` then revokes one host), the role's own where the policy names it (coordinator,
 * secureproxy) or one host holds it (keyserver, marketplace). A host's folder is `./pki.sh bundle IDENTITY DIR
 * --as KIND`: the CA and CRL, that pair as the role's files (key 0600), and the Fernet key only where data is
 * encrypted or read (servers, clients); never the CA key.
 */
function hostIdentities(): [host: string, identity: string, kind: HostKind][] {
  return [
    ...[...HOSTS.servers, ...HOSTS.spareServers].map((host, i) => [host, `server${i + 1}`, "server"] as [string, string, HostKind]),
    ...HOSTS.coordinators.map((host) => [host, "coordinator", "coordinator"] as [string, string, HostKind]),
    ...HOSTS.keyservers.map((host) => [host, "keyserver", "keyserver"] as [string, string, HostKind]),
    ...HOSTS.secureproxies.map((host) => [host, "secureproxy", "secureproxy"] as [string, string, HostKind]),
    [HOSTS.marketplace, "marketplace", "marketplace"],
  ];
}

/**
 * Issues each serving host's identity in the CA folder `pki` for that host's address, and bundles every host's
 * PKI folder (`pkiOf(host)`, its --pki) as an operator would copy it: see hostIdentities.
 * @example await issueHostPki(cluster.pki, (host) => network.host(host).address, (host) => join(root, host, "pki"))
 */
export async function issueHostPki(pki: string, addressOf: (host: string) => string, pkiOf: (host: string) => string): Promise<void> {
  for (const [host, identity, kind] of hostIdentities()) {
    // --force: the coordinator's name is reissued for each coordinator host; the others replace the demo's
    // localhost identity of that name the harness PKI starts with.
    await issueIdentity(pki, identity, kind, { sans: [`IP:${addressOf(host)}`, `DNS:${host}.securemesh.test`], force: true });
    await bundleIdentity(pki, identity, pkiOf(host), { as: kind, fernet: kind === "server" });
  }
  for (const host of HOSTS.clients) await bundleIdentity(pki, CLIENT_OF[host]!, pkiOf(host), { fernet: true });
}
