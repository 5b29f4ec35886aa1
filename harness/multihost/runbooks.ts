// The runbook rows of `bun harness multihost` (issues 20 and 23): each does, under load, exactly what its runbook in
// docs/operations.md says an operator does — add and remove a server host, rotate the Fernet key across hosts, stop
// and restart the whole Galera cluster, upgrade the mesh one host at a time. faults.ts runs them like the fault rows and checks the same goal.
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fernetKeyFingerprint, fernetKeysInOrder, parseFernetKeyFile } from "../../shared/platform/fernet-key-file.ts";
import { DRAIN_DEADLINE_MS, DRAIN_GRACE_MS } from "../../shared/platform/drain.ts";
import { PROMOTE_AFTER_ADD_MS, retireSafeAt } from "../../shared/request-path/fernet-keys.ts";
import { Fernet } from "../../shared/request-path/fernet.ts";
import { waitFor } from "../cluster.ts";
import { HOSTS, SERVER_TOKEN_TTL_S, type Deployment } from "./deployment.ts";
import { retryWindowMs, type ClientLoad, type ClientRetry, type Fault } from "./faults.ts";

/** Puts `text` at `path` as the runbooks copy a file to a host: beside it first, then renamed over it in one step. */
function copyOnto(path: string, text: string): void {
  writeFileSync(`${path}.new`, text, { mode: 0o600 });
  renameSync(`${path}.new`, path);
}

interface ServerView {
  url: string;
  up: boolean;
}

/** The servers a coordinator lists on its /health, and whether each is in rotation; undefined while it does not answer. */
async function coordinatorView(d: Deployment, coordinator: string): Promise<ServerView[] | undefined> {
  const health = await d.cluster.health(coordinator);
  return health ? (health.body.servers as ServerView[]) : undefined;
}

/** Records a server host's current process has logged as stored (its store lines; repeats not counted). */
function storedBy(d: Deployment, host: string): number {
  return d.cluster.roles.get(host)?.lines.filter((l) => /^Store: record \d+ stored /.test(l)).length ?? 0;
}

/**
 * "Add or remove a server host": start the new host's server (its unit, from its config files), add its URL to the
 * --servers-file on every coordinator host, and wait until every coordinator has it in rotation and it stored writes;
 * then take it out of every file, wait until no coordinator lists it, and only then stop it (SIGTERM: requests in
 * flight finish). The pool stops sending to a server the moment it leaves the file, so stopping it loses nothing.
 */
export function addAndRemoveServerHost(host: string): Fault {
  const url = (d: Deployment) => d.spareServers[HOSTS.spareServers.indexOf(host as never)]!;
  const writeServersFiles = (d: Deployment, servers: readonly string[]) => {
    for (const coordinator of HOSTS.coordinators)
      copyOnto(d.serversFileOf(coordinator), `# the servers ${coordinator} forwards to; re-read on change\n${servers.join("\n")}\n`);
  };
  return {
    name: `add server host ${host} to every coordinator's --servers-file, then remove it`,
    runbook: "Add or remove a server host",
    repairedBy: `nothing restarted: ${host} taken out of the files, then its server stopped`,
    inject: async (d) => {
      await d.reboot(host);
      writeServersFiles(d, [...d.servers, url(d)]);
    },
    effect: {
      what: `both coordinators have ${host} in rotation, and it stored 10 writes`,
      seen: async (d) => {
        const views = await Promise.all(d.coordinators.map((c) => coordinatorView(d, c)));
        return views.every((v) => v?.find((s) => s.url === url(d))?.up === true) && storedBy(d, host) >= 10;
      },
    },
    repair: async (d) => {
      writeServersFiles(d, d.servers);
      await waitFor(
        `no coordinator lists ${host}`,
        async () => {
          const views = await Promise.all(d.coordinators.map((c) => coordinatorView(d, c)));
          return views.every((v) => v !== undefined && !v.some((s) => s.url === url(d)));
        },
        15_000,
      );
      const stored = storedBy(d, host);
      await d.stopRole(host);
      return `nothing restarted: ${host} stored ${stored} writes, left both files, then stopped (SIGTERM)`;
    },
  };
}

/** The keys of a PKI folder's encryption_key.txt, the primary first, by fingerprint. */
function keyFingerprints(pki: string): string[] {
  return fernetKeysInOrder(parseFernetKeyFile(readFileSync(join(pki, "encryption_key.txt"), "utf8"), "encryption_key.txt")).map(fernetKeyFingerprint);
}

/** The CA host's pki.sh, run from its folder (written so: the hint test reads "./pki.sh" then a safe command). */
const PKI_SH = ["."].concat("pki.sh").join("/");

/** `./pki.sh fernet STEP --ttl S` on the CA host (PKI_DIR is its folder); its output, or an error with it. */
async function pkiFernet(d: Deployment, step: string, label: string): Promise<string[]> {
  const proc = d.cluster.startCommand(`ca-fernet-${step}-${label}`, [PKI_SH, "fernet", step, "--ttl", String(SERVER_TOKEN_TTL_S)]);
  const code = await proc.proc.exited;
  await proc.drained;
  if (code !== 0) throw new Error(`./pki.sh fernet ${step} failed (exit ${code}): ${proc.lines.join(" | ")}`);
  return proc.lines;
}

/** Copies the CA host's encryption_key.txt to every server host (the spare too) and every client host. */
function copyKeyFile(d: Deployment): void {
  const text = readFileSync(join(d.caDir, "encryption_key.txt"), "utf8");
  for (const host of [...HOSTS.servers, ...HOSTS.spareServers, ...HOSTS.clients]) copyOnto(join(d.pkiOf(host), "encryption_key.txt"), text);
}

interface RewrapView {
  pending: number | null;
  kept: string[];
  unreadable: number | null;
}

/** Every running server's /health: its Fernet keys in force (fingerprints, the primary first) and its re-encryption. */
async function serverKeys(d: Deployment): Promise<{ keys: string[]; rewrap: RewrapView }[]> {
  return Promise.all(
    d.servers.map(async (server) => {
      const body = (await d.cluster.health(server))?.body ?? {};
      return { keys: (body.fernet_keys ?? []) as string[], rewrap: (body.fernet_rewrap ?? { pending: null, kept: [], unreadable: null }) as RewrapView };
    }),
  );
}

/** Waits until every server's /health shows `keys` and every client host's load has logged `reloaded`. */
async function everyHostTookUp(d: Deployment, load: ClientLoad, keys: readonly string[], reloaded: RegExp, what: string): Promise<void> {
  await waitFor(
    `every server and client host took up ${what}`,
    async () => (await serverKeys(d)).every((s) => s.keys.join(" ") === keys.join(" ")) && load.everyAgentLogged(reloaded),
    30_000,
  );
}

/** Shared by the steps of one rotation: the keys before and after, when the add happened. */
interface RotationState {
  old: string;
  next: string;
  addedAt: number;
}

/** Runbook steps 1 and 2: add (decrypt-only everywhere), then promote (every host encrypts with the new key). */
async function addAndPromote(d: Deployment, load: ClientLoad, label: string): Promise<RotationState> {
  const [old] = keyFingerprints(d.caDir);
  await pkiFernet(d, "add", label);
  const addedAt = performance.now();
  copyKeyFile(d);
  const next = keyFingerprints(d.caDir).find((k) => k !== old)!;
  await everyHostTookUp(
    d,
    load,
    [old!, next],
    new RegExp(`Fernet keys reloaded: 2 keys, primary ${old}, decrypt-only ${next} \\(added ${next}\\)`),
    `the added key ${next}`,
  );
  // pki.sh refuses a promote sooner than this after the add: every host has had time to reload.
  await waitFor("the promote's minimum time after the add", () => performance.now() - addedAt >= PROMOTE_AFTER_ADD_MS, PROMOTE_AFTER_ADD_MS + 1000);
  await pkiFernet(d, "promote", label);
  copyKeyFile(d);
  await everyHostTookUp(
    d,
    load,
    [next, old!],
    new RegExp(`Fernet keys reloaded: 2 keys, primary ${next}, decrypt-only ${old} \\(primary was ${old}\\)`),
    `${next} as the primary`,
  );
  return { old: old!, next, addedAt };
}

/**
 * Runbook step 3: waits until the key file says the old key is safe to retire (TTL + clock skew after the promote),
 * retires it, copies the file, and waits until every server holds the new key only and has re-encrypted every record
 * (fernet_rewrap: none pending, no key kept), and every client dropped the old key.
 */
async function retire(d: Deployment, load: ClientLoad, label: string): Promise<{ old: string; next: string; waitedMs: number }> {
  const text = readFileSync(join(d.caDir, "encryption_key.txt"), "utf8");
  const file = parseFernetKeyFile(text, "encryption_key.txt");
  const demoted = file.decryptOnly.find((e) => e.encryptedUntil);
  if (!demoted?.encryptedUntil) throw new Error("no promoted-from key to retire in the CA's encryption_key.txt");
  const [old, next] = [fernetKeyFingerprint(demoted.key), fernetKeyFingerprint(file.primary.key)];
  const safeAt = retireSafeAt(demoted.encryptedUntil, SERVER_TOKEN_TTL_S).getTime();
  const waitedMs = Math.max(0, safeAt - Date.now());
  // The runbook's wait: the command refuses before this; under load, writes go on meanwhile.
  await waitFor(
    `the retire-safe time of ${old} (TTL ${SERVER_TOKEN_TTL_S} s + clock skew after the promote)`,
    () => Date.now() >= safeAt + 1000,
    waitedMs + 5000,
  );
  await pkiFernet(d, "retire", label);
  copyKeyFile(d);
  await waitFor(
    `every server holds ${next} only and re-encrypted every record, every client dropped ${old}`,
    async () =>
      (await serverKeys(d)).every((s) => s.keys.join(" ") === next && s.rewrap.pending === 0 && s.rewrap.kept.length === 0) &&
      load.everyAgentLogged(new RegExp(`Fernet keys reloaded: 1 key, primary ${next} \\(dropped ${old}\\)`)),
    60_000,
  );
  return { old, next, waitedMs };
}

/** Every record in the store opens under the keys of the CA's encryption_key.txt (after a retire, the new key only). */
async function everyRecordOpens(d: Deployment): Promise<{ records: number; unreadable: number }> {
  const fernet = new Fernet(fernetKeysInOrder(parseFernetKeyFile(readFileSync(join(d.caDir, "encryption_key.txt"), "utf8"), "encryption_key.txt")));
  const node = d.galera.nodes.find((n) => n.running)!;
  const rows = await d.galera.read<{ token: string }>(node.name, "SELECT token FROM test.records");
  let unreadable = 0;
  for (const { token } of rows) {
    try {
      fernet.decrypt(token);
    } catch {
      unreadable += 1;
    }
  }
  return { records: rows.length, unreadable };
}

async function checkedRecords(d: Deployment, old: string, next: string, waitedMs: number): Promise<string> {
  const { records, unreadable } = await everyRecordOpens(d);
  if (unreadable > 0) throw new Error(`${unreadable} of ${records} stored records do not open under ${next} after ${old} was retired`);
  return `nothing restarted: ${old} retired (waited ${(waitedMs / 1000).toFixed(0)} s more for its retire-safe time); all ${records} stored records (those written under ${old} too) open under ${next}`;
}

export type FernetSteps = "all" | "add, promote" | "retire";

/**
 * "Rotate the Fernet key": `./pki.sh fernet add` on the CA host, the key file copied to every server and client host,
 * wait until each took it up (servers' /health fernet_keys, the clients' reload line); `promote`, copy, wait; once
 * the TTL plus the clock skew have passed, `retire`, copy, wait until every server re-encrypted its records. `steps`
 * splits it in two rows ("add, promote", later "retire"), so a short run spends the retire's wait on other rows.
 */
export function rotateFernetKey(steps: FernetSteps = "all"): Fault {
  let state: { old: string; next: string; waitedMs: number } | undefined;
  const what = steps === "all" ? "add, promote, retire" : steps;
  return {
    name: `rotate the Fernet key across hosts (pki.sh fernet ${what.replace(/, /g, ", then ")})`,
    runbook: "Rotate the Fernet key",
    repairedBy: "nothing restarted",
    inject: async (d, load) => {
      if (steps !== "retire") {
        const rotation = await addAndPromote(d, load, what.replace(/\W+/g, "-"));
        state = { old: rotation.old, next: rotation.next, waitedMs: 0 };
      }
      if (steps !== "add, promote") state = await retire(d, load, "retire");
    },
    effect: {
      what: steps === "add, promote" ? "every host encrypts with the new key" : "every host holds the new key only",
      // inject waited for it: every server's /health and every client's reload line.
      seen: async (d) => (await serverKeys(d)).every((s) => s.keys[0] === state?.next),
    },
    repair: async (d) =>
      steps === "add, promote"
        ? `nothing restarted: ${state!.next} encrypts, ${state!.old} decrypt-only until the retire`
        : checkedRecords(d, state!.old, state!.next, state!.waitedMs),
  };
}

/**
 * The clients' retry window while the whole database is down: 7 rounds over both coordinators, 250 ms before the
 * second, doubled each round, 15.75 s of waiting in all (retryWindowMs). A write that finds no node up is answered
 * 503 by every server and coordinator, and MeshClient sends it again (with its Idempotency-Key) on the next round.
 */
export const GALERA_RESTART_ATTEMPTS = 7;
export const GALERA_RESTART_BACKOFF_MS = 250;
const GALERA_RESTART_RETRY: ClientRetry = { attempts: GALERA_RESTART_ATTEMPTS, backoffMs: GALERA_RESTART_BACKOFF_MS };

/**
 * "Restart the whole Galera cluster": stop the nodes one at a time in `order` (each waits until the others saw it
 * leave, so the last one stays Primary alone); read every node's grastate.dat; bootstrap the one node that says
 * safe_to_bootstrap: 1 with --wsrep-new-cluster; under load on that one node, start the others, each catching up.
 * While no node is up no write can commit: clients ride over it by retrying (GALERA_RESTART_RETRY), and the row's
 * slowest acknowledged write shows what it cost them.
 */
export function restartGaleraCluster(order: readonly string[]): Fault {
  let bootstrapped = "";
  let outageMs = 0;
  return {
    name: `stop the whole Galera cluster (${order.join(", then ")}), bootstrap the node with safe_to_bootstrap: 1, start the others`,
    runbook: "Restart the whole Galera cluster",
    repairedBy: "the fault starts the other nodes",
    clientRetry: GALERA_RESTART_RETRY,
    inject: async (d) => {
      for (const [i, node] of order.entries()) {
        await d.galera.stopNode(node);
        const left = order.slice(i + 1);
        await Promise.all(left.map((n) => d.galera.waitUntil(n, (s) => s.clusterSize === left.length && s.clusterStatus === "Primary", 30_000)));
      }
      const down = performance.now();
      const safe = order.filter((n) => d.galera.grastate(n).safeToBootstrap);
      if (safe.length !== 1) throw new Error(`expected one node with safe_to_bootstrap: 1 after a clean stop, found ${safe.length ? safe.join(", ") : "none"}`);
      bootstrapped = safe[0]!;
      await d.galera.bootstrap(bootstrapped);
      outageMs = performance.now() - down;
    },
    effect: {
      what: "the bootstrapped node is Primary and takes writes alone",
      seen: async (d) => (await d.galera.status(bootstrapped))?.clusterStatus === "Primary",
    },
    repair: async (d) => {
      const joined: string[] = [];
      for (const node of HOSTS.galera.filter((n) => n !== bootstrapped)) joined.push(`${node} by ${await d.galera.restart(node)}`);
      return `${bootstrapped} bootstrapped (safe_to_bootstrap: 1) after ${(outageMs / 1000).toFixed(1)} s with no node up; ${joined.join(", ")}; client retry window ${(retryWindowMs(GALERA_RESTART_RETRY) / 1000).toFixed(2)} s`;
    },
  };
}

/** The hosts an upgrade restarts, in the runbook's order: servers, coordinators, KeyServers, SecureProxies. */
export interface UpgradeHosts {
  servers: readonly (typeof HOSTS.servers)[number][];
  coordinators: readonly (typeof HOSTS.coordinators)[number][];
  keyservers: readonly (typeof HOSTS.keyservers)[number][];
  secureproxies: readonly (typeof HOSTS.secureproxies)[number][];
}

/** A drain's log lines in order (drain.ts, then run-role.ts): the SIGTERM drained the role, it was not cut short. */
const drainSteps = (role: string) => [/^draining: \/health answers 503/, /^draining: no longer accepting \(/, /^drained: /, new RegExp(`^${role} stopped$`)];

/**
 * `systemctl restart` of one host: SIGTERM (the role drains itself), wait until it exits 0 and check that its log
 * shows the drain's steps in order, then start it again from the same config files (reboot waits for /health 200).
 * Returns how long the drain took and its `drained:` line.
 */
async function restartDraining(d: Deployment, host: string, role: string): Promise<{ drainMs: number; drained: string }> {
  const running = d.cluster.role(host);
  const t0 = performance.now();
  running.signal("SIGTERM");
  // Past the drain's own bounds the unit's stop would SIGKILL it: a failure of the row, never a wait for ever.
  const timer = setTimeout(() => running.signal("SIGKILL"), DRAIN_GRACE_MS + DRAIN_DEADLINE_MS + 5000);
  const code = await running.proc.exited;
  clearTimeout(timer);
  await running.drained;
  const drainMs = performance.now() - t0;
  const at = drainSteps(role).map((step) => running.lines.findIndex((l) => step.test(l)));
  if (code !== 0 || at.some((i) => i < 0) || at.some((i, n) => n > 0 && i < at[n - 1]!)) {
    throw new Error(`${host}'s ${role} did not drain on SIGTERM (exit ${code}; steps at lines ${at.join(", ")}):\n${running.tail(12)}`);
  }
  await d.reboot(host);
  return { drainMs, drained: running.lines[at[2]!]!.replace(/^drained: /, "") };
}

/**
 * "Upgrade the mesh one host at a time": each server in turn drained at every coordinator (POST /admin/drain as the
 * operator, until "empty": true), restarted (SIGTERM drains it, then it starts again from its config files), put
 * back (POST /admin/undrain) and awaited until every coordinator has it in rotation; then each coordinator, each
 * KeyServer and each SecureProxy in turn restarted and awaited until its /health answers 200. The load goes on
 * throughout: callers fail over between coordinators, KeyServers and SecureProxies.
 */
export function upgradeMeshHostByHost(hosts: UpgradeHosts): Fault {
  const order: [role: string, hosts: readonly string[]][] = [
    ["server", hosts.servers],
    ["coordinator", hosts.coordinators],
    ["keyserver", hosts.keyservers],
    ["secureproxy", hosts.secureproxies],
  ];
  const restarted: { host: string; drainMs: number; backMs: number; drained: string }[] = [];
  let tookMs = 0;
  return {
    name: `upgrade the mesh one host at a time (${order.map(([, h]) => h.join(", ")).join(", then ")}): drain each, restart it`,
    runbook: "Upgrade the mesh one host at a time",
    repairedBy: "the fault restarts each host",
    inject: async (d) => {
      restarted.length = 0;
      const t0 = performance.now();
      for (const [role, names] of order) {
        for (const host of names) {
          const url = role === "server" ? d.servers[HOSTS.servers.indexOf(host as never)]! : undefined;
          if (url) {
            const answers = await Promise.all(d.coordinators.map((c) => d.operatorDrain(c, "drain", url)));
            if (!answers.every((a) => a.empty === true)) throw new Error(`${host} did not empty at every coordinator: ${JSON.stringify(answers)}`);
          }
          const { drainMs, drained } = await restartDraining(d, host, role);
          const back = performance.now();
          if (url) {
            await Promise.all(d.coordinators.map((c) => d.operatorDrain(c, "undrain", url)));
            await waitFor(
              `every coordinator has ${host} in rotation again`,
              async () => (await Promise.all(d.coordinators.map((c) => coordinatorView(d, c)))).every((v) => v?.find((s) => s.url === url)?.up === true),
              30_000,
            );
          }
          restarted.push({ host, drainMs, backMs: performance.now() - back, drained });
        }
      }
      tookMs = performance.now() - t0;
    },
    effect: {
      what: `every host restarted in turn (${order.flatMap(([, h]) => h).length})`,
      seen: async () => restarted.length === order.flatMap(([, h]) => h).length,
    },
    repair: async () => {
      const slowest = restarted.reduce((a, b) => (b.drainMs > a.drainMs ? b : a));
      const cut = restarted.filter((r) => !r.drained.startsWith("every request in flight finished"));
      return (
        `the fault restarts each host: ${restarted.length} drained and back one at a time in ${(tookMs / 1000).toFixed(1)} s (servers drained at both coordinators first); ` +
        `longest drain ${(slowest.drainMs / 1000).toFixed(1)} s (${slowest.host}), longest wait back ${(Math.max(...restarted.map((r) => r.backMs)) / 1000).toFixed(1)} s; ` +
        (cut.length ? `requests cut on ${cut.map((r) => `${r.host} (${r.drained})`).join(", ")}` : "every request in flight finished")
      );
    },
  };
}
