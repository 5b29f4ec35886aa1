// `bun harness multihost` as a function: the deployment, the fault plan (short or full), the table and the goal.
import type { Cluster } from "../cluster.ts";
import { HOSTS, startDeployment } from "./deployment.ts";
import {
  cutServerLink,
  faultTable,
  goalMisses,
  isolateGaleraNode,
  killCoordinatorHost,
  killGaleraNode,
  killKeyServerHost,
  killSecureProxyHost,
  killServerHost,
  rotateMasterKey,
  runFault,
  type Fault,
  type FaultRow,
  type LoadShape,
} from "./faults.ts";
import { cleanupStaleNetworks } from "./netns.ts";
import { addAndRemoveServerHost, restartGaleraCluster, rotateFernetKey, upgradeMeshHostByHost } from "./runbooks.ts";

/**
 * Above the coordinators' upstream timeout (deployment.ts), so a client waits out one server attempt that stalls
 * while Galera evicts a lost node, rather than re-sending to the other coordinator in the middle of it.
 */
const CLIENT_TIMEOUT_MS = 10_000;

export interface MultihostPlan {
  faults: Fault[];
  load: LoadShape;
}

/**
 * One fault and one runbook of each kind (the upgrade on one host of each role), a small load: a few minutes, for `bun test` and CI. The Fernet rotation is
 * split in two rows, its retire last: the minute the runbook waits before it (TTL + clock skew) goes to other rows.
 */
export const SHORT_PLAN: MultihostPlan = {
  faults: [
    rotateFernetKey("add, promote"),
    killServerHost("srv1"),
    cutServerLink("srv2"),
    killCoordinatorHost("coord1"),
    killGaleraNode("db1"),
    isolateGaleraNode("db1"),
    killKeyServerHost("keys1"),
    killSecureProxyHost("proxy1"),
    rotateMasterKey("keys1"),
    addAndRemoveServerHost("srv4"),
    restartGaleraCluster(["db3", "db2", "db1"]),
    upgradeMeshHostByHost({ servers: ["srv2"], coordinators: ["coord2"], keyservers: ["keys2"], secureproxies: ["proxy2"] }),
    rotateFernetKey("retire"),
  ],
  load: { workers: 2, intervalMs: 50, clientTimeoutMs: CLIENT_TIMEOUT_MS, acksBefore: 20, acksDuring: 40, acksAfter: 20 },
};

/** Each kind of fault twice, on different hosts, under more load. */
export const FULL_PLAN: MultihostPlan = {
  faults: [
    killServerHost("srv1"),
    killServerHost("srv3"),
    cutServerLink("srv2"),
    cutServerLink("srv1"),
    killCoordinatorHost("coord1"),
    killCoordinatorHost("coord2"),
    killGaleraNode("db1"),
    killGaleraNode("db3"),
    isolateGaleraNode("db1"),
    isolateGaleraNode("db2"),
    killKeyServerHost("keys1"),
    killKeyServerHost("keys2"),
    killSecureProxyHost("proxy1"),
    killSecureProxyHost("proxy2"),
    rotateMasterKey("keys1"),
    rotateMasterKey("keys2"),
    addAndRemoveServerHost("srv4"),
    rotateFernetKey("all"),
    // Each order bootstraps another node: db1 is the servers' first database node, db3 their last.
    restartGaleraCluster(["db3", "db2", "db1"]),
    restartGaleraCluster(["db1", "db2", "db3"]),
    upgradeMeshHostByHost({ servers: HOSTS.servers, coordinators: HOSTS.coordinators, keyservers: HOSTS.keyservers, secureproxies: HOSTS.secureproxies }),
  ],
  load: { workers: 4, intervalMs: 25, clientTimeoutMs: CLIENT_TIMEOUT_MS, acksBefore: 100, acksDuring: 200, acksAfter: 100 },
};

export interface MultihostResult {
  rows: FaultRow[];
  table: string[];
  /** One line per row that missed the goal; empty when every row met it. */
  misses: string[];
}

/**
 * Builds the deployment on `cluster`, runs every fault of the plan in turn, and removes it all again (also when a
 * step throws). A row that misses the goal does not stop the others: the table shows every row.
 */
export async function runMultihost(cluster: Cluster, plan: MultihostPlan, step: (message: string) => void): Promise<MultihostResult> {
  for (const removed of cleanupStaleNetworks()) step(`removed a stale test network: ${removed}`);
  await using deployment = await startDeployment({ cluster, step });
  step(`every host up: servers ${deployment.servers.join(", ")}; coordinators ${deployment.coordinators.join(", ")}; database ${deployment.databaseUrl}`);
  await deployment.waitInRotation(60_000);
  const rows: FaultRow[] = [];
  const broken: string[] = [];
  for (const [i, fault] of plan.faults.entries()) {
    step(`${i + 1}/${plan.faults.length} ${fault.name}, under load from ${plan.load.workers} writers on each client host`);
    let row: FaultRow;
    const rowStarted = performance.now();
    try {
      row = await runFault(deployment, fault, plan.load, `row${i + 1}`, (m) => step(`    ${m}`));
    } catch (error) {
      // The deployment did not come back (or the fault never took effect): later rows would only measure that.
      broken.push(`${fault.name}: ${(error as Error).message}`);
      step(`    FAILED: ${(error as Error).message}`);
      break;
    }
    rows.push(row);
    const misses = goalMisses(row);
    step(
      `    ${misses.length ? "MISSED" : "ok"}: ${row.sent} sent, ${row.failed} failed, ${row.retried} retried; ${row.acknowledged} acknowledged, ${row.stored} stored; back in rotation ${(row.backInRotationMs / 1000).toFixed(1)} s after the repair; the row took ${((performance.now() - rowStarted) / 1000).toFixed(1)} s${misses.length ? ` — ${misses.join("; ")}` : ""}`,
    );
  }
  const misses = [...rows.flatMap((row) => goalMisses(row).map((m) => `${row.fault}: ${m}`)), ...broken];
  return { rows, table: faultTable(rows), misses };
}
