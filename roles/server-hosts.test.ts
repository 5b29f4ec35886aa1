// Issue 23, "errors that say what happened": replies name the server's host, not only its port. Every server host of
// a deployment listens on the same port (5001), so a body's `"server":5001` cannot say which host answered: with a
// policy updated on one host and not the other, an operator saw 200 and 403 alternate and could not tell which host
// refused. Here two server "hosts" (two loopback addresses) listen on one port, behind one coordinator, one of them
// with a policy that refuses client1's writes; every line the client role prints about a reply names the host.
import { afterAll, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { freePort, newPki, temporaryCluster, waitUntilInRotation } from "../harness/fixtures/index.ts";
import { REPO_ROOT } from "../shared/platform/config.ts";
import { OTHER_HOST, SAN_HOST } from "../shared/testing/host-checks.ts";
import { issueIdentity } from "../shared/testing/pki.ts";

setDefaultTimeout(120_000);

const temporary: string[] = [];
afterAll(() => temporary.forEach((dir) => rmSync(dir, { recursive: true, force: true })));

test("two server hosts on one port: the client's cache lines, successes and errors each name the host that answered", async () => {
  const pki = await newPki("server-hosts");
  temporary.push(pki);
  await issueIdentity(pki, "server", "server", { sans: [`IP:${SAN_HOST}`, `IP:${OTHER_HOST}`], force: true });
  // The second host's policy is behind: client1 may not write there.
  const stale = JSON.parse(readFileSync(join(REPO_ROOT, "roles", "policy.json"), "utf8"));
  for (const rule of stale.rules) if (rule.identity.endsWith("/client1")) rule.allow = rule.allow.filter((a: string) => a !== "records.write");
  writeFileSync(join(pki, "stale-policy.json"), JSON.stringify(stale));

  await using cluster = await temporaryCluster({ label: "server-hosts", pki });
  const port = await freePort();
  const [fresh, behind] = [SAN_HOST, OTHER_HOST].map((host) => `https://${host}:${port}`) as [string, string];
  const db = join(cluster.logDir, "records.db");
  await cluster.spawn("server-a", "server", [String(port), "--host", SAN_HOST, "--db", db]);
  await cluster.spawn("server-b", "server", [String(port), "--host", OTHER_HOST, "--db", db, "--policy", join(pki, "stale-policy.json")]);
  const coordinator = await cluster.startCoordinator("coordinator", 0, [fresh, behind]);
  for (const server of [fresh, behind]) await waitUntilInRotation(cluster, coordinator, server);

  const run = await cluster.runClient("client", ["--coordinator", coordinator, "--count", "6", "--message", "which host?"]);
  const lines = run.lines.filter((l) => l.startsWith("[client1] "));
  const named = (pattern: RegExp) =>
    lines.filter((l) => pattern.test(l)).map((l) => (l.includes(fresh) ? fresh : l.includes(behind) ? behind : `no host in: ${l}`));
  const cacheLines = named(/^\[client1\] Cache (hit|miss) \(server /);
  const successes = named(/^\[client1\] Success: /);
  const refusals = named(/^\[client1\] Error 403: /);
  expect({ exitCode: run.exitCode, cacheLines: cacheLines.length, hostsInCacheLines: [...new Set(cacheLines)].sort() }).toEqual({
    exitCode: 1,
    cacheLines: 6,
    hostsInCacheLines: [fresh, behind].sort(),
  });
  // Round-robin over the two: the fresh host wrote, the one behind refused, and each line says which.
  expect({ successes: [...new Set(successes)], refusals: [...new Set(refusals)], total: successes.length + refusals.length }).toEqual({
    successes: [fresh],
    refusals: [behind],
    total: 6,
  });
});
