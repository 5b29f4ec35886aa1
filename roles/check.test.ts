// `roles/<role>.ts check` (issue 23): passes on a correct host, and finds each problem seeded one at a time, on real
// processes: a SAN that does not name the host, a stale CRL, a 0644 key, a policy that differs between hosts, a
// server on another database, a clock 2 minutes off.
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { chmodSync, cpSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import https from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { newPki, signCrl } from "../shared/testing/pki.ts";
import { loadIdentity, mutualTlsServerOptions } from "../shared/platform/tls.ts";
import { temporaryCluster, type Cluster } from "../harness/fixtures/index.ts";
import { REPO_ROOT } from "../shared/platform/config.ts";

setDefaultTimeout(60_000);

let cluster: Cluster;
let pki: string;
const work = mkdtempSync(join(tmpdir(), "securemesh-check-"));
const cleanups: (() => unknown)[] = [];

afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await cluster?.stop();
});

async function check(label: string, script: string, args: string[]): Promise<{ exitCode: number; text: string }> {
  const run = await cluster.run(`check-${label}`, script, ["check", ...args]);
  return { exitCode: run.exitCode, text: run.lines.join("\n") };
}

/** A copy of the PKI as a host would hold it, to spoil one file in. */
function hostCopy(name: string): string {
  const dir = join(work, name);
  cpSync(pki, dir, { recursive: true });
  return dir;
}

describe("the check command", () => {
  let servers: string[];
  test("passes on a correct server host and on a coordinator whose servers agree", async () => {
    pki = await newPki("check");
    cluster = await temporaryCluster({ label: "check", pki });
    const db = join(work, "records.db");
    servers = [await cluster.startServer("s1", 0, ["--db", db]), await cluster.startServer("s2", 0, ["--db", db])];
    const server = await check("server-ok", "server", ["5001", "--db", db]);
    expect(server.text).toContain("no problems");
    expect(server.exitCode).toBe(0);
    const coordinator = await check("coordinator-ok", "coordinator", ["0", "--servers", servers.join(",")]);
    expect(coordinator.text).toContain("no problems");
    expect(coordinator.text.match(/ ok {4}peer /g)?.length).toBe(2);
    expect(coordinator.exitCode).toBe(0);
  });

  test("a certificate whose SANs do not name the host", async () => {
    const result = await check("san", "server", ["5001", "--host", "10.9.9.9", "--db", join(work, "records.db")]);
    expect([result.exitCode, /FAIL {2}certificate .*SANs do not name --host 10\.9\.9\.9/.test(result.text)]).toEqual([1, true]);
  });

  test("a key readable by group and others (0644)", async () => {
    const dir = hostCopy("open-key");
    chmodSync(join(dir, "server_key.pem"), 0o644);
    const result = await check("key-mode", "server", ["5001", "--pki", dir, "--db", join(work, "records.db")]);
    expect([result.exitCode, /FAIL {2}certificate .*server_key\.pem is readable by group or others \(mode 0644\)/.test(result.text)]).toEqual([1, true]);
  });

  test("a stale CRL (past its nextUpdate)", async () => {
    const dir = hostCopy("stale-crl");
    const before = readFileSync(join(pki, "crl.pem"), "utf8");
    await signCrl(pki, { thisUpdate: new Date(Date.now() - 2 * 86_400_000), nextUpdate: new Date(Date.now() - 86_400_000), file: "stale-crl.pem" });
    cpSync(join(pki, "stale-crl.pem"), join(dir, "crl.pem"));
    expect(readFileSync(join(pki, "crl.pem"), "utf8")).toBe(before); // the CA's own crl.pem untouched
    const result = await check("stale-crl", "server", ["5001", "--pki", dir, "--db", join(work, "records.db")]);
    expect([result.exitCode, /FAIL {2}crl .*expired at/.test(result.text)]).toEqual([1, true]);
  });

  test("a policy that differs between hosts", async () => {
    const policy = join(work, "policy-edited.json");
    const edited = JSON.parse(readFileSync(join(REPO_ROOT, "roles", "policy.json"), "utf8"));
    edited.rules.push({ identity: "spiffe://securemesh/client/client3", allow: ["records.write"] });
    writeFileSync(policy, JSON.stringify(edited));
    const other = await cluster.startServer("s3", 0, ["--db", join(work, "records.db"), "--policy", policy]);
    const result = await check("policy", "coordinator", ["0", "--servers", [servers[0], other].join(",")]);
    expect(result.exitCode).toBe(1);
    expect(result.text).toMatch(
      new RegExp(`FAIL {2}peer .*${other.replaceAll(".", "\\.")} .*policy sha256:[0-9a-f]{16} differs from this host's sha256:[0-9a-f]{16}`),
    );
  });

  test("a server on the database of another cluster", async () => {
    const other = await cluster.startServer("s4", 0, ["--db", join(work, "another-cluster.db")]);
    const result = await check("database", "coordinator", ["0", "--servers", [servers[0], other].join(",")]);
    expect([result.exitCode, /FAIL {2}peers .*write to different databases/.test(result.text)]).toEqual([1, true]);
  });

  test("a peer whose clock is 2 minutes off", async () => {
    // A host with a real server certificate whose clock runs 2 minutes fast: its /health says so, as a server's does.
    const identity = loadIdentity(pki, "server");
    const ahead = https.createServer(mutualTlsServerOptions(identity), (_request, response) => {
      const facts = JSON.parse(JSON.stringify(lastFacts));
      facts.time = Date.now() + 120_000;
      response.setHeader("content-type", "application/json");
      response.end(JSON.stringify({ status: "ok", role: "server", facts }));
    });
    const lastFacts = ((await cluster.health(servers[0]!))!.body as { facts: object }).facts;
    await new Promise<void>((resolve) => ahead.listen(0, "127.0.0.1", resolve));
    cleanups.push(() => ahead.close());
    const url = `https://127.0.0.1:${(ahead.address() as { port: number }).port}`;
    const result = await check("clock", "coordinator", ["0", "--servers", [servers[0], url].join(",")]);
    expect(result.exitCode).toBe(1);
    expect(result.text).toMatch(/FAIL {2}peer .*its clock is 1[12]\d\.\d s off this host's \(limit 5 s\)/);
  });
});
