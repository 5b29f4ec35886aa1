import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { parsePolicy, type Rule } from "../shared/authz/policy.ts";
import { policyPath } from "../shared/platform/config.ts";
import { ANSWER_BOUND_MS } from "../shared/platform/runtime/bun-gate.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { runPkiSh, waitFor, type Cluster, type TokenStack } from "./fixtures/index.ts";
import { POLICY_SCRAPER } from "./authz-matrix.ts";
import { closedWithin, connectTls, dribbleClosedAfter, type Tally, type TlsMaterial } from "./hostile.ts";

/** Marks the forged log lines of the L1 case, so the log scan can tell whether one ever started a line. */
export const FORGED_MARKER = "forged-l1-5c2e";

/** The stated bound of #11 Part 4: a revocation or a policy edit takes effect within this, with no restart. */
export const RELOAD_BOUND_MS = 5000;

export const SPIFFE = (kind: string, name: string) => `spiffe://securemesh/${kind}/${name}`;

/**
 * Identities only the harness uses, issued before the roles start, and what its policy grants them besides
 * roles/policy.json: client-live is revoked while the roles run (M1), client-own may read only its own records
 * (M5), sql-prober may ask for any token so SQL metacharacters reach the token store's query.
 */
export const HARNESS_IDENTITIES: { name: string; allow: string[] }[] = [
  { name: "client-live", allow: ["records.write", "view.read:all"] },
  { name: "client-own", allow: ["records.write", "view.read:own"] },
  { name: "sql-prober", allow: ["proxy.use:*"] },
];

/** Writes a policy as an editor saves it: a new file renamed over the old one. */
export function writePolicy(file: string, rules: readonly Rule[]): void {
  const text = JSON.stringify({ comment: "bun harness security's policy: roles/policy.json plus the harness's own identities", rules }, null, 2);
  parsePolicy(text); // never hand the roles a policy that does not parse
  writeFileSync(`${file}.tmp`, text + "\n");
  renameSync(`${file}.tmp`, file);
}

/**
 * Issues the harness's identities into the roles' PKI (before the roles start) and writes the harness policy:
 * the repository's rules plus HARNESS_IDENTITIES. Returns the rules, for the live edit to restore.
 */
export async function prepareHarnessIdentities(pki: string, policyFile: string): Promise<Rule[]> {
  // One at a time: each updates the CA's index. The policy's scraper has its rule in the repository's policy already.
  for (const name of [...HARNESS_IDENTITIES.map((h) => h.name), POLICY_SCRAPER]) await runPkiSh(pki, "issue", name, "--client");
  const rules = [
    ...parsePolicy(readFileSync(policyPath(), "utf8")).rules,
    ...HARNESS_IDENTITIES.map(({ name, allow }) => ({ identity: SPIFFE("client", name), allow })),
  ];
  writePolicy(policyFile, rules);
  return rules;
}

/**
 * Seeds client2's marketplace token too (token-stack seeds client1's), so proxy.use:client2/marketplace can be
 * allowed. The demo marketplace knows one API token, so client2's is the same one.
 */
export async function seedClient2Token(cluster: Cluster, stack: TokenStack, tokenDb: string): Promise<string> {
  const token = stack.token;
  const seeded = await cluster.run(
    "keyserver-admin-client2",
    "keyserver",
    ["token", "add", "--client", "client2", "--type", "marketplace", "--token", "-", "--data", stack.dataDir, "--db", tokenDb],
    { stdin: token },
  );
  if (seeded.exitCode !== 0) throw new Error(`token add for client2 failed:\n${seeded.lines.join("\n")}`);
  return token;
}

export interface FindingTargets {
  cluster: Cluster;
  coordinator: string;
  /** server 1 and server 2 */
  servers: [string, string];
  /** The coordinator's admin listener, http://127.0.0.1:PORT */
  admin: string;
  stack: TokenStack;
  tokenDb: string;
  policyFile: string;
  /** The harness policy's rules as written at start, restored after the live edit. */
  rules: readonly Rule[];
  hostileCerts: Record<string, TlsMaterial>;
}

export interface FindingOptions {
  /** The harness's fuller run: more attempts, and the cases that start processes of their own (M3, M4). */
  full: boolean;
}

export interface Measurement {
  what: string;
  /** ms from the change until every check held, or null when they did not within the timeout */
  ms: number | null;
  each: Record<string, number | null>;
}

export type Json = Record<string, unknown>;

/**
 * Starts the clock, applies `change`, and polls every check until all hold in one round: returns the time until
 * each first held, and until all did. `timeoutMs` after the change it gives up.
 */
export async function measureUntil(
  what: string,
  change: () => Promise<unknown> | unknown,
  checks: Record<string, () => Promise<boolean>>,
  timeoutMs = 3 * RELOAD_BOUND_MS,
): Promise<Measurement> {
  const started = performance.now();
  await change();
  const each: Record<string, number | null> = Object.fromEntries(Object.keys(checks).map((k) => [k, null]));
  for (;;) {
    const results = await Promise.all(
      Object.entries(checks).map(async ([name, check]) => {
        const held = await check().catch(() => false);
        if (held && each[name] === null) each[name] = Math.round(performance.now() - started);
        return held;
      }),
    );
    const elapsed = performance.now() - started;
    if (results.every(Boolean)) return { what, ms: Math.round(elapsed), each };
    if (elapsed > timeoutMs) return { what, ms: null, each };
    await Bun.sleep(100); // a poll interval between rounds of checks, not a wait for time to pass
  }
}

/**
 * A POST promising 1000 bytes of body, with 5 of them sent once the role is reading the body: its "100 Continue"
 * (both node:http and Bun.serve send one for Expect: 100-continue) says it got that far.
 */
export async function startBody(url: string, material: TlsMaterial, path: string) {
  const socket = await connectTls(url, material);
  socket.on("error", () => {});
  const reading = new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 5000);
    socket.once("data", (chunk: Buffer) => {
      clearTimeout(timer);
      resolve(chunk.toString("latin1").startsWith("HTTP/1.1 100"));
    });
  });
  socket.write(`POST ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n`);
  if (!(await reading)) throw new Error(`no 100 Continue from ${url}${path}: the role did not start reading the body`);
  socket.write('{"a":');
  return socket;
}

/**
 * The cases that wait for a deadline, run side by side: headers dribbled one byte a second (M2, ~10 s), and a body
 * stalled after 5 of 1000 bytes (H2: the idle timeout, at most the 30 s body deadline). Afterwards every role answers.
 */
export async function runSlowFindingCases(t: Pick<FindingTargets, "cluster" | "coordinator" | "servers" | "stack">, tally: Tally): Promise<void> {
  const client1 = mutualTlsClientOptions(loadIdentity(t.cluster.pki, "client1"));
  const all: [string, string][] = [
    ["server1", t.servers[0]],
    ["coordinator", t.coordinator],
    ["keyserver", t.stack.keyserver],
    ["secureproxy", t.stack.secureproxy],
  ];
  await Promise.all([
    // Old: the KeyServer kept such a connection for more than 100 s; its idle timer restarted with every byte.
    // On Bun, the Bun.serve behind every role's TLS gate closes it at its idle timeout (~12 s); the node listener
    // (every role on Deno) at its 10 s header deadline.
    ...all.map(([role, url]) =>
      tally.run(role, "M2: headers dribbled one byte a second → closed within 14 s", 1, async () => {
        const after = await dribbleClosedAfter(url, client1, 1000, 20_000);
        tally.notes.push(
          `M2: ${role} closed a connection dribbling one header byte a second after ${after === null ? "more than 20 s" : `${(after / 1000).toFixed(1)} s`}`,
        );
        return after !== null && after <= 14_000 ? null : after === null ? "still open after 20 s" : `closed after ${(after / 1000).toFixed(1)} s`;
      }),
    ),
    // Old: a stalled body on the KeyServer ended in an unhandled rejection when the idle timer fired.
    ...all.map(([role, url]) =>
      tally.run(role, "H2: a body stalled after 5 of 1000 bytes → closed, role still up", 1, async () => {
        const path = role === "secureproxy" ? "/request_api" : role === "keyserver" ? "/" : "/api/data";
        const socket = await startBody(url, client1, path);
        const closed = await closedWithin(socket, 40_000); // the node listener's body deadline is 30 s
        socket.destroy();
        if (closed === null) return "still open after 40 s";
        const health = await t.cluster.health(url);
        return health?.status === 200 && t.cluster.role(role).running ? null : `${role} /health afterwards: ${health?.status ?? "no answer"}`;
      }),
    ),
  ]);
}

/**
 * M2's and L2's per-identity cap: `cap + extra` idle TLS connections of client1; the role closes the extra ones and
 * keeps the rest, and serves again once they are gone. Run it alone: every connection of client1 counts.
 */
export async function runConnectionCapCase(
  t: Pick<FindingTargets, "cluster" | "stack" | "coordinator" | "servers">,
  tally: Tally,
  cap: number,
  extra = 5,
): Promise<void> {
  const client1 = mutualTlsClientOptions(loadIdentity(t.cluster.pki, "client1"));
  // Issue 18, L2: client2 held 300 connections open on the coordinator and on each server (Bun.serve could not tell
  // who held them); every role now caps each identity, on both runtimes.
  const roles = [
    ["keyserver", t.stack.keyserver],
    ["secureproxy", t.stack.secureproxy],
    ["coordinator", t.coordinator],
    ["server1", t.servers[0]],
  ] as const;
  /** Opens cap + extra connections of client1's at once; how many the role kept open once the ones over the cap went. */
  const probe = async (url: string): Promise<number> => {
    const sockets = (await Promise.all(Array.from({ length: cap + extra }, () => connectTls(url, client1).catch(() => null)))).filter((s) => s !== null);
    try {
      for (const s of sockets) s.on("error", () => {});
      const closedCount = () => cap + extra - sockets.length + sockets.filter((s) => s.destroyed || s.closed).length;
      await waitFor(`${extra} of ${url}'s connections to be closed`, () => closedCount() >= extra, 5000).catch(() => {});
      return cap + extra - closedCount();
    } finally {
      for (const s of sockets) s.destroy();
    }
  };
  for (const [role, url] of roles) {
    await tally.run(role, `M2: ${cap + extra} idle connections of one identity → those over the cap of ${cap} closed`, 1, async () => {
      // This process holds a few keep-alive connections of its own from the same address (fetch's pool), so slightly
      // more than `extra` may go; but no more than the cap stay, and not far fewer. A connection whose client left in
      // the middle of a request keeps its place until the app answers it (bun-gate.ts, ANSWER_BOUND_MS): the slow
      // cases just before leave some, so the probe is repeated until those are answered, within that bound.
      const enough = cap - 8;
      let open = await probe(url);
      const deadline = performance.now() + ANSWER_BOUND_MS;
      while (open < enough && performance.now() < deadline) open = await probe(url);
      tally.notes.push(
        `M2: ${role} kept ${open} of ${cap + extra} idle connections of client1 (cap ${cap} per identity; this process held a few more of its own)`,
      );
      if (open > cap || open < enough) return `${open} of ${cap + extra} stayed open, wanted at most ${cap} and at least ${enough}`;
      // Once they are gone, the address is served again.
      await waitFor(`${role} to serve 127.0.0.1 again`, async () => (await t.cluster.health(url))?.status === 200, 5000).catch(() => {});
      return (await t.cluster.health(url))?.status === 200 ? null : `${role} does not serve again after the connections closed`;
    });
  }
}

/** One line for a measured reload: how long, against the bound, and when each check first held. */
export const describeMeasurement = (m: Measurement) =>
  `${m.what}: ${m.ms === null ? "NOT within the timeout" : `${m.ms} ms`} (bound ${RELOAD_BOUND_MS} ms; ${Object.entries(m.each)
    .map(([k, v]) => `${k} ${v === null ? "never" : `${v} ms`}`)
    .join(", ")})`;

export function measurementLines(measurements: Measurement[]): string[] {
  return measurements.map(describeMeasurement);
}
