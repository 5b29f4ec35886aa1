// The key cases of `bun harness security`, with fewer attempts, on real processes and a PKI of their own: hostile
// input, the authorization matrix (one attempt per cell) and a regression case per finding of #11, with the roles on
// Bun; then, with the roles on Deno, the hostile TLS, HTTP and application cases and the matrix again, which is where
// a runtime's listener could let through what Bun's refuses (a missing or revoked client certificate, say).
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadFernetKeys } from "../shared/platform/config.ts";
import { accessDate } from "../shared/ops/log.ts";
import { matrixSummary, matrixTable, type MatrixResult } from "./authz-matrix.ts";
import { newPki, temporaryCluster, type Cluster, type RoleRuntime } from "./fixtures/index.ts";
import { measurementLines, RELOAD_BOUND_MS } from "./findings.ts";
import { Tally } from "./hostile.ts";
import {
  REFUSING_ROLES,
  rolesHealthy,
  runSecuritySuite,
  scanLogs,
  startSecurityTargets,
  type SuiteOptions,
  type SuiteResult,
  type SuiteTargets,
} from "./security-checks.ts";

setDefaultTimeout(120_000);

/**
 * Starts the security targets with the roles on `runtime`, in a PKI of its own, runs the suite with `options` in
 * beforeAll and stops every role in afterAll. The getters are for the tests, which run after beforeAll.
 */
function securityRun(runtime: RoleRuntime, options: SuiteOptions) {
  let cluster: Cluster | undefined;
  let targets: SuiteTargets & { client2Token: string };
  let suite: SuiteResult;
  const tally = new Tally();
  beforeAll(async () => {
    cluster = await temporaryCluster({ label: `security-${runtime}`, runtime, pki: await newPki(`security-${runtime}`) });
    targets = await startSecurityTargets(cluster, { db: join(cluster.logDir, "records.db"), tokenDb: join(cluster.logDir, "tokens.db") });
    suite = await runSecuritySuite(targets, tally, options);
  });
  afterAll(() => cluster?.stop());
  return {
    tally,
    get targets() {
      return targets;
    },
    get suite() {
      return suite;
    },
  };
}

function expectNoUnexpectedCells(matrix: MatrixResult): void {
  const unexpected = matrix.cells.filter((c) => c.asExpected !== c.attempts);
  if (unexpected.length) console.log([...matrixTable(matrix), ...matrixSummary(matrix)].join("\n"));
  expect(unexpected.map((c) => `${c.identity} × ${c.column.role} ${c.column.label}: ${c.unexpected}`)).toEqual([]);
  expect(matrix.identities.map((f) => f.label)).toEqual([
    "client1",
    "client2",
    "coordinator",
    "secureproxy",
    "server",
    "prometheus",
    "revoked",
    "expired",
    "foreign",
  ]);
  expect(matrix.cells.length).toBe(9 * 26);
}

async function expectHealthyAndCleanLogs({ cluster, servers, coordinator, stack, client2Token }: SuiteTargets & { client2Token: string }): Promise<void> {
  expect(await rolesHealthy(cluster, [...servers, coordinator, stack.keyserver, stack.secureproxy, stack.marketplace])).toEqual([]);
  const findings = scanLogs(
    cluster.logDir,
    { fernetKeys: loadFernetKeys(cluster.pki), apiToken: stack.token, otherTokens: [client2Token] },
    { allow5xx: REFUSING_ROLES },
  );
  expect({ findings: findings.length, first: findings.slice(0, 8) }).toEqual({ findings: 0, first: [] });
}

const failures = (tally: Tally) => tally.failures.map((f) => `${f.role} ${f.name}: ${f.unexpected.join("; ")}`);

describe("roles on bun: hostile input, the matrix and every finding of #11", () => {
  const run = securityRun("bun", { tlsAttempts: 10, httpAttempts: 2, matrixAttempts: 1, full: false });

  test("every hostile case and every finding's regression case comes out as expected", () => {
    expect(failures(run.tally)).toEqual([]);
    expect(run.tally.results.length).toBeGreaterThan(100);
    // Every finding of #11 has a case here (M3 and M4: roles/keyserver.test.ts and harness/tokens.test.ts).
    for (const finding of ["H1", "H2", "M1", "M2", "M5", "L1", "L2", "L3", "L4", "L5", "L6", "L7", "L8", "Hardening"]) {
      expect(run.tally.results.some((r) => r.name.startsWith(`${finding}: `))).toBe(true);
    }
  });

  test("the authorization matrix: every identity × every action as the policy says, 0 unexpected", () => {
    expectNoUnexpectedCells(run.suite.matrix);
    const outcomes = new Set(run.suite.matrix.cells.map((c) => c.expected.outcome));
    expect([...outcomes].sort()).toEqual(["allow", "deny", "refused", "unauthenticated"]);
  });

  test(`a revocation and a policy edit take effect within ${RELOAD_BOUND_MS / 1000} s, with no restart`, () => {
    const lines = measurementLines(run.suite.measurements);
    expect(run.suite.measurements.map((m) => m.what)).toEqual([
      "revocation of client-live",
      "policy edit (client2's records.write and proxy.use:client2/marketplace removed)",
      "policy restored",
    ]);
    for (const [i, m] of run.suite.measurements.entries()) {
      expect(m.ms, lines[i]).not.toBeNull();
      expect(m.ms!, lines[i]).toBeLessThanOrEqual(RELOAD_BOUND_MS);
    }
  });

  test("every role stays healthy, and no log holds a secret, a 5xx, an escape sequence or a forged line", () => expectHealthyAndCleanLogs(run.targets));
});

describe("roles on deno: hostile TLS, HTTP and application input, and the matrix", () => {
  // Fewer TLS attempts than on Bun: the refusals are the same code path each time; the matrix once per cell.
  const run = securityRun("deno", { tlsAttempts: 4, httpAttempts: 1, matrixAttempts: 1, full: false, findings: false });

  test("every client certificate no role may accept is refused at the handshake (no certificate, another CA, expired, revoked, …), and every malformed request gets a clear 4xx", () => {
    expect(failures(run.tally)).toEqual([]);
    const names = new Set(run.tally.results.map((r) => r.name));
    for (const name of ["TLS: no certificate", "TLS: revoked", "TLS: server cert as client (EKU)", "HTTP: malformed JSON", "HTTP: body over the limit"])
      expect(names).toContain(name);
  });

  test("the authorization matrix: every identity × every action as the policy says, 0 unexpected", () => expectNoUnexpectedCells(run.suite.matrix));

  test("every role stays healthy, and no log holds a secret, a 5xx, an escape sequence or a forged line", () => expectHealthyAndCleanLogs(run.targets));
});

test("the log scan finds what it looks for", async () => {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-scan-"));
  const now = accessDate(new Date());
  await Bun.write(
    join(dir, "role.log"),
    [
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
    ].join("\n"),
  );
  await Bun.write(join(dir, "refuses-coordinator.log"), `127.0.0.1 - - [${now}] "POST /api/data HTTP/1.1" 503 -`);
  expect(
    scanLogs(dir, { fernetKeys: ["unused-key="], apiToken: "mkt_abc" }, { allow5xx: REFUSING_ROLES }).map((f) =>
      f.replace(/^role\.log:\d+: /, "").slice(0, 40),
    ),
  ).toEqual([
    "a private key",
    "the API token",
    "plaintext outside the demo line",
    expect.stringMatching(/^a 5xx answer/),
    expect.stringMatching(/^an escape sequence/),
    expect.stringMatching(/^a forged log line/), // dated 2030
    expect.stringMatching(/^an escape sequence/),
    expect.stringMatching(/^a forged log line/),
  ]);
});
