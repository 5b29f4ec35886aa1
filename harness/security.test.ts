// The key cases of `bun harness security`, with fewer attempts, on real processes and a PKI of their own: hostile
// input, the authorization matrix (one attempt per cell) and a regression case per finding of #11.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadFernetKeys, REPO_ROOT } from "../shared/platform/config.ts";
import { accessDate } from "../shared/ops/log.ts";
import { testPki } from "../shared/testing/pki.ts";
import { matrixSummary, matrixTable } from "./authz-matrix.ts";
import { Cluster } from "./cluster.ts";
import { measurementLines, prepareHarnessIdentities, RELOAD_BOUND_MS, seedClient2Token } from "./findings.ts";
import { hostileCertificates, Tally } from "./hostile.ts";
import { REFUSING_ROLES, rolesHealthy, runSecuritySuite, scanLogs, type SuiteResult } from "./security-checks.ts";
import { startTokenStack, type TokenStack } from "./token-stack.ts";

setDefaultTimeout(120_000);

let cluster: Cluster;
let stack: TokenStack;
let urls: { server: string; servers: [string, string]; coordinator: string; admin: string };
let client2Token: string;
let suite: SuiteResult;
const tally = new Tally();

beforeAll(async () => {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-security-"));
  const pki = join(dir, "pki");
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh")], { env: { ...process.env, PKI_DIR: pki }, stdout: "ignore", stderr: "inherit" });
  expect(await proc.exited).toBe(0);
  const otherPki = await testPki("other");
  const hostileCerts = await hostileCertificates(pki, otherPki);
  const policyFile = join(dir, "policy.json");
  const rules = await prepareHarnessIdentities(pki, policyFile);
  cluster = new Cluster({ logDir: dir, pki, env: { NO_COLOR: "1", DATABASE_URL: join(dir, "records.db"), SECUREMESH_POLICY: policyFile } });
  const servers = await Promise.all([cluster.startServer("server1", 0), cluster.startServer("server2", 0)]) as [string, string];
  const coordinator = await cluster.startCoordinator("coordinator", 0, servers, ["--admin-port", "0"]);
  urls = { server: servers[0], servers, coordinator, admin: await cluster.adminUrl("coordinator") };
  const tokenDb = join(dir, "tokens.db");
  stack = await startTokenStack(cluster, { keyserver: 0, secureproxy: 0, marketplace: 0 }, tokenDb);
  client2Token = await seedClient2Token(cluster, stack, tokenDb);
  suite = await runSecuritySuite({ cluster, otherPki, ...urls, stack, tokenDb, policyFile, rules, hostileCerts, client1Token: stack.token }, tally,
    { tlsAttempts: 10, httpAttempts: 2, matrixAttempts: 1, full: false });
});

afterAll(async () => {
  await cluster?.stop();
});

test("every hostile case and every finding's regression case comes out as expected", () => {
  expect(tally.failures.map((f) => `${f.role} ${f.name}: ${f.unexpected.join("; ")}`)).toEqual([]);
  expect(tally.results.length).toBeGreaterThan(100);
  // Every finding of #11 has a case here (M3 and M4: roles/keyserver.test.ts and harness/tokens.test.ts).
  for (const finding of ["H1", "H2", "M1", "M2", "M5", "L1", "L2", "L3", "L4", "L5", "L6", "L7", "L8", "Hardening"]) {
    expect(tally.results.some((r) => r.name.startsWith(`${finding}: `))).toBe(true);
  }
});

test("the authorization matrix: every identity × every action as the policy says, 0 unexpected", () => {
  const unexpected = suite.matrix.cells.filter((c) => c.asExpected !== c.attempts);
  if (unexpected.length) console.log([...matrixTable(suite.matrix), ...matrixSummary(suite.matrix)].join("\n"));
  expect(unexpected.map((c) => `${c.identity} × ${c.column.role} ${c.column.label}: ${c.unexpected}`)).toEqual([]);
  expect(suite.matrix.identities.map((f) => f.label)).toEqual(["client1", "client2", "coordinator", "secureproxy", "server", "revoked", "expired", "foreign"]);
  expect(suite.matrix.cells.length).toBe(8 * 16);
  const outcomes = new Set(suite.matrix.cells.map((c) => c.expected.outcome));
  expect([...outcomes].sort()).toEqual(["allow", "deny", "refused", "unauthenticated"]);
});

test(`a revocation and a policy edit take effect within ${RELOAD_BOUND_MS / 1000} s, with no restart`, () => {
  const lines = measurementLines(suite.measurements);
  expect(suite.measurements.map((m) => m.what)).toEqual([
    "revocation of client-live", "policy edit (client2's records.write and proxy.use:client2/marketplace removed)", "policy restored",
  ]);
  for (const [i, m] of suite.measurements.entries()) {
    expect(m.ms, lines[i]).not.toBeNull();
    expect(m.ms!, lines[i]).toBeLessThanOrEqual(RELOAD_BOUND_MS);
  }
});

test("every role stays healthy, and no log holds a secret, a 5xx, an escape sequence or a forged line", async () => {
  expect(await rolesHealthy(cluster, [...urls.servers, urls.coordinator, stack.keyserver, stack.secureproxy, stack.marketplace])).toEqual([]);
  const findings = scanLogs(cluster.logDir, { fernetKeys: loadFernetKeys(cluster.pki), apiToken: stack.token, otherTokens: [client2Token] }, { allow5xx: REFUSING_ROLES });
  expect({ findings: findings.length, first: findings.slice(0, 8) }).toEqual({ findings: 0, first: [] });
});

test("the log scan finds what it looks for", async () => {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-scan-"));
  const now = accessDate(new Date());
  await Bun.write(join(dir, "role.log"), [
    "-----BEGIN PRIVATE KEY-----",
    "token mkt_abc leaked",
    "oops plaintext-marker-7f3a",
    "Decrypted data: plaintext-marker-7f3a 1 (from client1)",
    `127.0.0.1 - - [${now}] "POST /api/data HTTP/1.1" 500 -`,
    "unexpected field: \u001b[2J",
    `127.0.0.1 - - [01/Jan/2030 00:00:00] "POST /forged-l1-5c2e HTTP/1.1" 200 -`,
    "\u001b[2J\u001b]0;pwned\u0007Server https://127.0.0.1:1 is back in rotation forged-l1-5c2e",
    // What must pass: the escaped form of the same, and the logger's own colours.
    `Invalidation not acknowledged: unexpected field: \\x0a127.0.0.1 - - [01/Jan/2030 00:00:00] "POST /forged-l1-5c2e HTTP/1.1" 200 -`,
    `\u001b[33m127.0.0.1 - - [${now}] "POST /api/data HTTP/1.1" 403 -\u001b[0m`,
  ].join("\n"));
  await Bun.write(join(dir, "refuses-coordinator.log"), `127.0.0.1 - - [${now}] "POST /api/data HTTP/1.1" 503 -`);
  expect(scanLogs(dir, { fernetKeys: ["unused-key="], apiToken: "mkt_abc" }, { allow5xx: REFUSING_ROLES }).map((f) => f.replace(/^role\.log:\d+: /, "").slice(0, 40))).toEqual([
    "a private key", "the API token", "plaintext outside the demo line", expect.stringMatching(/^a 5xx answer/),
    expect.stringMatching(/^an escape sequence/),
    expect.stringMatching(/^a forged log line/), // dated 2030
    expect.stringMatching(/^an escape sequence/), expect.stringMatching(/^a forged log line/),
  ]);
});
