// The authorization matrix's expectations, computed from roles/policy.json and real certificates, without processes.
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseCrl } from "../shared/authz/crl.ts";
import { parsePolicy } from "../shared/authz/policy.ts";
import { policyPath } from "../shared/platform/config.ts";
import { testPki } from "../shared/testing/pki.ts";
import { COLUMNS, expectCell, identityFacts, matrixSummary, matrixTable, mismatch, type Hops, type IdentityFacts, type MatrixResult } from "./authz-matrix.ts";

const id = (kind: string, name: string) => `spiffe://securemesh/${kind}/${name}`;
const hops: Hops = { coordinator: id("coordinator", "coordinator"), secureproxy: id("secureproxy", "secureproxy"), client1: id("client", "client1") };
const trusted = (label: string, kind: string): IdentityFacts => ({ label, id: id(kind, label), trusted: true });
const IDENTITIES: IdentityFacts[] = [
  trusted("client1", "client"),
  trusted("client2", "client"),
  trusted("coordinator", "coordinator"),
  trusted("secureproxy", "secureproxy"),
  { label: "server", id: id("server", "server"), trusted: false, untrusted: "no clientAuth EKU" },
  { label: "revoked", id: id("client", "revoked-client"), trusted: false, untrusted: "revoked" },
  { label: "expired", id: id("client", "expired-client"), trusted: false, untrusted: "expired" },
  { label: "foreign", id: id("client", "client1"), trusted: false, untrusted: "not issued by our CA" },
];

describe("expected outcomes from the repository's policy", () => {
  const policy = parsePolicy(readFileSync(policyPath(), "utf8"));
  const client2 = IDENTITIES[1]!;
  const grid = () =>
    Object.fromEntries(
      COLUMNS.map((column) => [
        column.key,
        IDENTITIES.map((f) => {
          const e = expectCell(policy, f, column, hops, client2);
          return e.outcome === "unauthenticated" ? "401" : e.outcome;
        }).join(" "),
      ]),
    );

  test("every cell, identities in the order client1 client2 coordinator secureproxy server revoked expired foreign", () => {
    const coordinatorRow = "allow allow deny deny refused refused refused refused";
    const overClient2 = "allow allow deny deny 401 401 401 401";
    expect(grid()).toEqual({
      "coordinator.drain": "deny deny deny deny refused refused refused refused",
      "coordinator.write.self": coordinatorRow,
      "coordinator.read.self": coordinatorRow,
      "coordinator.invalidate.self": coordinatorRow,
      "coordinator.stats.self": coordinatorRow,
      "coordinator.write.client2": overClient2,
      "coordinator.read.client2": overClient2,
      "coordinator.invalidate.client2": overClient2,
      "coordinator.stats.client2": overClient2,
      // Only the coordinator may forward, and it may not write, read, invalidate or read stats itself (#11 L4).
      "server.write": "deny deny deny deny refused refused refused refused",
      "server.read": "deny deny deny deny refused refused refused refused",
      "server.invalidate": "deny deny deny deny refused refused refused refused",
      "server.stats": "deny deny deny deny refused refused refused refused",
      // Each client uses only its own ClientId (#11 H1).
      "secureproxy.client1": "allow deny deny deny refused refused refused refused",
      "secureproxy.client2": "deny allow deny deny refused refused refused refused",
      // Only the proxy fetches tokens, and only on behalf of a caller that may use them.
      "keyserver.self": "deny deny deny deny refused refused refused refused",
      "keyserver.client1": "deny deny deny allow refused refused refused refused",
      "keyserver.client1.ecdh": "deny deny deny allow refused refused refused refused",
      // Any certificate of the CA that is trusted, on every role's /health; never a revoked one (issue 18, L1).
      ...Object.fromEntries(
        ["coordinator.get.health", "server.get.health", "secureproxy.get.health", "keyserver.get.health"].map((key) => [
          key,
          "allow allow allow allow refused refused refused refused",
        ]),
      ),
      // /metrics names callers and their decisions: only the scraper the policy grants metrics.read, none of these.
      ...Object.fromEntries(
        ["server.get.metrics", "secureproxy.get.metrics", "keyserver.get.metrics"].map((key) => [key, "deny deny deny deny refused refused refused refused"]),
      ),
      // A server's /health detail (issue 22 L2): the coordinator alone.
      "server.health.detail": "deny deny allow deny refused refused refused refused",
    });
  });

  test("a deny names the first decision along the path that fails, as the role's 403 says it", () => {
    const [client1, , coordinator, secureproxy] = IDENTITIES as [IdentityFacts, IdentityFacts, IdentityFacts, IdentityFacts];
    const col = (key: string) => COLUMNS.find((c) => c.key === key)!;
    expect(expectCell(policy, client1, col("server.write"), hops, client2).denial).toBe(`${client1.id} lacks permission forward`);
    expect(expectCell(policy, coordinator, col("server.write"), hops, client2).denial).toBe(`${coordinator.id} lacks permission records.write`);
    expect(expectCell(policy, coordinator, col("coordinator.read.self"), hops, client2).denial).toBe(`${coordinator.id} lacks permission view.read:own`);
    expect(expectCell(policy, client2, col("secureproxy.client1"), hops, client2).denial).toBe(`${client2.id} lacks permission proxy.use:client1/marketplace`);
    expect(expectCell(policy, secureproxy, col("keyserver.self"), hops, client2).denial).toBe(
      `${secureproxy.id} lacks permission proxy.use:client1/marketplace`,
    );
    expect(expectCell(policy, client1, col("keyserver.client1"), hops, client2).denial).toBe(`${client1.id} lacks permission tokens.fetch`);
  });

  test("the expectation follows the policy: an edit moves exactly the cells it should", () => {
    const edited = parsePolicy(
      JSON.stringify({
        rules: [...policy.rules.filter((r) => r.identity !== client2.id), { identity: client2.id, allow: ["view.read:own", "proxy.use:client1/marketplace"] }],
      }),
    );
    const col = (key: string) => COLUMNS.find((c) => c.key === key)!;
    expect(expectCell(edited, client2, col("coordinator.write.self"), hops, client2)).toEqual({
      outcome: "deny",
      denial: `${client2.id} lacks permission records.write`,
    });
    expect(expectCell(edited, client2, col("coordinator.read.self"), hops, client2).outcome).toBe("allow"); // own is enough
    expect(expectCell(edited, client2, col("secureproxy.client1"), hops, client2).outcome).toBe("allow");
    const noForward = parsePolicy(JSON.stringify({ rules: policy.rules.filter((r) => r.identity !== hops.coordinator) }));
    expect(expectCell(noForward, IDENTITIES[0]!, col("coordinator.write.self"), hops, client2)).toEqual({
      outcome: "deny",
      denial: `${hops.coordinator} lacks permission forward`,
    });
  });

  test("a mismatch says what was expected and what came; a deny with the wrong text is a mismatch", () => {
    expect(mismatch({ outcome: "allow" }, { outcome: "allow", detail: "200" })).toBeNull();
    expect(mismatch({ outcome: "deny" }, { outcome: "allow", detail: "200 {}" })).toBe("expected deny, got allow: 200 {}");
    expect(
      mismatch({ outcome: "deny", denial: "x lacks permission forward" }, { outcome: "deny", detail: "403", error: "x lacks permission forward" }),
    ).toBeNull();
    expect(
      mismatch({ outcome: "deny", denial: "x lacks permission forward" }, { outcome: "deny", detail: "403", error: "y lacks permission forward" }),
    ).toContain('not "x lacks');
  });
});

describe("identityFacts reads the certificate itself", () => {
  test("a client is trusted; a server certificate lacks clientAuth; another CA's client is not ours; a revoked one is revoked", async () => {
    const [pki, other] = await Promise.all([testPki(), testPki("other")]);
    const read = (dir: string, file: string) => readFileSync(join(dir, file), "utf8");
    const ca = read(pki, "ca_cert.pem");
    const crl = parseCrl(read(pki, "crl.pem"), ca);
    expect(identityFacts("client1", read(pki, "client1_cert.pem"), ca, crl)).toEqual({ label: "client1", id: id("client", "client1"), trusted: true });
    expect(identityFacts("server", read(pki, "server_cert.pem"), ca, crl)).toMatchObject({
      id: id("server", "server"),
      trusted: false,
      untrusted: "no clientAuth EKU",
    });
    expect(identityFacts("foreign", read(other, "client1_cert.pem"), ca, crl)).toMatchObject({ trusted: false, untrusted: "not issued by our CA" });
    const serial = new (await import("node:crypto")).X509Certificate(read(pki, "client2_cert.pem")).serialNumber;
    const revokedClient2 = { isRevoked: (s: string) => s.toUpperCase() === serial.toUpperCase() } as Parameters<typeof identityFacts>[3];
    expect(identityFacts("client2", read(pki, "client2_cert.pem"), ca, revokedClient2)).toMatchObject({ trusted: false, untrusted: "revoked" });
    const later = new Date(Date.now() + 50 * 365 * 86_400_000);
    expect(identityFacts("client1", read(pki, "client1_cert.pem"), ca, crl, later)).toMatchObject({ trusted: false, untrusted: "expired" });
  });
});

describe("the table", () => {
  test("marks an unexpected cell and counts it in the summary", () => {
    const [c1, c2] = IDENTITIES as [IdentityFacts, IdentityFacts];
    const column = COLUMNS[0]!;
    const result: MatrixResult = {
      identities: [c1, c2],
      policyFile: "/x/policy.json",
      cells: [
        { identity: "client1", column, expected: { outcome: "allow" }, attempts: 1, asExpected: 1, observed: ["allow"] },
        {
          identity: "client2",
          column,
          expected: { outcome: "allow" },
          attempts: 1,
          asExpected: 0,
          observed: ["deny"],
          unexpected: "expected allow, got deny: 403",
        },
      ],
    };
    const table = matrixTable(result);
    expect(table[0]).toMatch(/^\| role +\| action +\| client1 +\| client2 +\|$/);
    expect(table[2]).toContain("| allow ");
    expect(table[2]).toContain("!deny (want allow)");
    const summary = matrixSummary(result);
    expect(summary[0]).toStartWith(
      "authorization matrix: 2 cells (2 identities × 26 actions, 2 attempts), 1 as expected, 1 unexpected; expected from policy.json: 2 allow, 0 deny, 0 401, 0 refused",
    );
    expect(summary).toContain("UNEXPECTED client2 × coordinator records.write: expected allow, got deny: 403");
  });
});
