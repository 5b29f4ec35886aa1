// The key cases of `bun harness security`, with fewer attempts, on real processes and a PKI of their own.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadFernetKeys, REPO_ROOT } from "../shared/config.ts";
import { testPki } from "../shared/testing/pki.ts";
import { Cluster } from "./cluster.ts";
import { hostileCertificates, Tally } from "./hostile.ts";
import { rolesHealthy, runSecurityChecks, scanLogs } from "./security-checks.ts";
import { startTokenStack, type TokenStack } from "./token-stack.ts";

setDefaultTimeout(120_000);

let cluster: Cluster;
let stack: TokenStack;
let urls: { server: string; coordinator: string };
let otherPki: string;
let hostileCerts: Awaited<ReturnType<typeof hostileCertificates>>;

beforeAll(async () => {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-security-"));
  const pki = join(dir, "pki");
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh")], { env: { ...process.env, PKI_DIR: pki }, stdout: "ignore", stderr: "inherit" });
  expect(await proc.exited).toBe(0);
  otherPki = await testPki("other");
  hostileCerts = await hostileCertificates(pki, otherPki);
  cluster = new Cluster({ logDir: dir, pki, env: { NO_COLOR: "1", DATABASE_URL: join(dir, "records.db") } });
  const servers = await Promise.all([cluster.startServer("server1", 0), cluster.startServer("server2", 0)]);
  urls = { server: servers[0]!, coordinator: await cluster.startCoordinator("coordinator", 0, servers) };
  stack = await startTokenStack(cluster, { keyserver: 0, secureproxy: 0, marketplace: 0 }, join(dir, "tokens.db"));
});

afterAll(async () => {
  await cluster?.stop();
});

test("every hostile case is refused, every role stays healthy, and no log holds a secret", async () => {
  const tally = new Tally();
  await runSecurityChecks({ cluster, otherPki, ...urls, stack, hostileCerts }, tally, { tlsAttempts: 10, httpAttempts: 2, slowloris: true });
  expect(tally.failures.map((f) => `${f.role} ${f.name}: ${f.unexpected.join("; ")}`)).toEqual([]);
  expect(tally.results.length).toBeGreaterThan(60);
  expect(await rolesHealthy(cluster, [urls.server, urls.coordinator, stack.keyserver, stack.secureproxy, stack.marketplace])).toEqual([]);
  expect(scanLogs(cluster.logDir, { fernetKeys: loadFernetKeys(cluster.pki), apiToken: stack.token })).toEqual([]);
});

test("the log scan finds what it looks for", async () => {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-scan-"));
  await Bun.write(join(dir, "role.log"), [
    "-----BEGIN PRIVATE KEY-----",
    "token mkt_abc leaked",
    "oops plaintext-marker-7f3a",
    "Decrypted data: plaintext-marker-7f3a 1 (from client1)",
    '127.0.0.1 - - [22/Nov/2026 23:19:42] "POST /api/data HTTP/1.1" 500 -',
  ].join("\n"));
  expect(scanLogs(dir, { fernetKeys: ["unused-key="], apiToken: "mkt_abc" }).map((f) => f.replace(/^role\.log:\d+: /, ""))).toEqual([
    "a private key", "the API token", "plaintext outside the demo line", expect.stringMatching(/^a 5xx answer/),
  ]);
});
