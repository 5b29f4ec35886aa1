// #18 M2 as real processes, on Bun and on Deno: a KeyServer and a SecureProxy keep refusing a revoked client while
// crl.pem is moved aside and after an older CRL is put back; no usable crl.pem stops a role; --no-crl runs without.
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { roleCommand, temporaryCluster, waitFor, type Cluster } from "../harness/fixtures/index.ts";
import { revocationPki } from "../shared/testing/pki.ts";
import { CRL_FIX } from "../shared/authz/crl-file.ts";
import { testedRuntimes } from "../shared/testing/unit-run.ts";

setDefaultTimeout(120_000); // two roles per runtime; Deno starts slowly on a shared two-core machine

const RUNTIMES = testedRuntimes();

/** PKIs and data folders this file made, removed when it is done (the roles' logs stay, as the harness keeps them). */
const temporary: string[] = [];
afterAll(() => temporary.forEach((dir) => rmSync(dir, { recursive: true, force: true })));
const folder = (label: string) => {
  const dir = mkdtempSync(join(tmpdir(), `securemesh-revocation-${label}-`));
  temporary.push(dir);
  return dir;
};

/** What a caller gets from GET /health: the status, or "refused" when the handshake or the request was refused. */
async function healthAs(url: string, pki: string, name: string): Promise<string> {
  try {
    const response = await fetch(`${url}/health`, {
      tls: mutualTlsClientOptions(loadIdentity(pki, name)),
      keepalive: false,
      signal: AbortSignal.timeout(5000),
    });
    const body = await response.text();
    // The peer-identity listener refuses a revoked certificate per request too (403 ERR_REVOKED).
    return response.status === 403 && body.includes("ERR_REVOKED") ? "refused" : String(response.status);
  } catch (error) {
    return (error as Error).name === "TimeoutError" ? "timeout" : "refused";
  }
}

/** Replaces crl.pem by rename, as pki.sh does, so a role never reads half a file. */
function putCrl(dir: string, pem: string): void {
  writeFileSync(join(dir, "crl.pem.tmp"), pem);
  renameSync(join(dir, "crl.pem.tmp"), join(dir, "crl.pem"));
}

/** The KeyServer (its token store in a folder of its own) and a SecureProxy in front of it, on `cluster`. */
async function startRoles(cluster: Cluster, extra: string[] = []): Promise<Record<"keyserver" | "secureproxy", string>> {
  const data = folder("data");
  const keyserver = await cluster.startRole("keyserver", "keyserver", ["0", "--data", join(data, "keyserver"), "--db", join(data, "tokens.db"), ...extra]);
  const secureproxy = await cluster.startRole("secureproxy", "secureproxy", ["0", "--keyserver", keyserver, ...extra]);
  return { keyserver, secureproxy };
}

/** Waits until every role has logged, since `marks`, a line matching `pattern`: its reload of crl.pem has run. */
async function reloaded(cluster: Cluster, marks: Map<string, number>, pattern: RegExp): Promise<string[]> {
  return Promise.all(
    [...marks].map(([name, mark]) =>
      waitFor(
        `${name} to log ${pattern}`,
        () =>
          cluster
            .role(name)
            .lines.slice(mark)
            .find((line) => pattern.test(line)),
        10_000,
      ),
    ),
  );
}

const mark = (cluster: Cluster) => new Map(["keyserver", "secureproxy"].map((name) => [name, cluster.role(name).lines.length]));

for (const runtime of RUNTIMES) {
  describe(`M2 on ${runtime}`, () => {
    test("a revoked client stays refused while crl.pem is moved aside, and after an older CRL is put back", async () => {
      const { dir, crlBefore, crlAfter } = await revocationPki(`m2-${runtime}`); // x revoked on crlAfter; crlBefore is older
      temporary.push(dir);
      await using cluster = await temporaryCluster({ label: `revocation-${runtime}`, pki: dir, runtime });
      const urls = await startRoles(cluster);
      const seen = async () =>
        Object.fromEntries(
          await Promise.all(
            Object.entries(urls).map(
              async ([name, url]) => [name, { x: await healthAs(url, dir, "x"), client1: await healthAs(url, dir, "client1") }] as const,
            ),
          ),
        );
      const expected = { keyserver: { x: "refused", client1: "200" }, secureproxy: { x: "refused", client1: "200" } };
      expect(await seen()).toEqual(expected);

      // Moved aside: on main, the reload dropped the CRL and x got 200 from both.
      let since = mark(cluster);
      renameSync(join(dir, "crl.pem"), join(dir, "crl.pem.aside"));
      const missing = await reloaded(cluster, since, /^(TLS material reloaded|CRL NOT reloaded)/);
      expect({ phase: "crl.pem moved aside", seen: await seen() }).toEqual({ phase: "crl.pem moved aside", seen: expected });
      for (const line of missing)
        expect(line).toMatch(/^CRL NOT reloaded, the previous one stays in force \(CRL number 0x[0-9A-F]+, 1 revoked, .*\): .*crl\.pem is missing$/);

      // An older CRL, signed by our CA, that does not list x yet.
      since = mark(cluster);
      putCrl(dir, crlBefore);
      const older = await reloaded(cluster, since, /^(TLS material reloaded|CRL NOT reloaded)/);
      expect({ phase: "older CRL put back", seen: await seen() }).toEqual({ phase: "older CRL put back", seen: expected });
      for (const line of older) expect(line).toMatch(/lower than the 0x[0-9A-F]+ in force \(an older CRL put back\?\)$/);

      // The current one back: fine again, and still refused.
      since = mark(cluster);
      putCrl(dir, crlAfter);
      await reloaded(cluster, since, /^TLS material reloaded: 1 revoked/);
      expect({ phase: "current CRL back", seen: await seen() }).toEqual({ phase: "current CRL back", seen: expected });
    });

    test("no crl.pem: the role will not start (one line naming the file and the fix); --no-crl starts it without revocation", async () => {
      const { dir } = await revocationPki(`start-${runtime}`);
      temporary.push(dir);
      rmSync(join(dir, "crl.pem"));
      const data = folder("data");
      const args = ["0", "--data", join(data, "keyserver"), "--db", join(data, "tokens.db")];
      // Bounded: a role that starts after all (as on main) is killed, and the exit code below says so.
      await using refused = Bun.spawn(roleCommand(runtime, "keyserver", args), {
        env: { ...process.env, PKI_DIR: dir, NO_COLOR: "1" },
        stdout: "pipe",
        stderr: "pipe",
        timeout: 20_000,
      });
      const [stdout, stderr, code] = await Promise.all([new Response(refused.stdout).text(), new Response(refused.stderr).text(), refused.exited]);
      expect({ code, stdout, stderr }).toEqual({
        code: 2,
        stdout: "",
        stderr: `keyserver: no usable CRL, so this role will not start: ${join(dir, "crl.pem")} is missing: ${CRL_FIX}\n`,
      });

      await using cluster = await temporaryCluster({ label: `revocation-off-${runtime}`, pki: dir, runtime });
      const url = await cluster.startRole("keyserver", "keyserver", [...args, "--no-crl"]);
      const warnings = cluster.role("keyserver").lines.filter((line) => line.startsWith("revocation is OFF"));
      expect(warnings).toEqual(["revocation is OFF (--no-crl): crl.pem is not read, and no certificate is refused as revoked"]);
      expect(await healthAs(url, dir, "x")).toBe("200"); // x is on the CA's index as revoked, but nothing is read
    });
  });
}
