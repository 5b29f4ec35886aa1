// Every hop checks the host it called against the SANs of the certificate it met (#14), on real processes with
// real certificates: each serving identity is issued for 127.0.0.2 only (`./pki.sh issue NAME --san
// IP:127.0.0.2`). The roles listen on 127.0.0.2 and must be reached; the same certificates served on 127.0.0.3
// must be refused by every caller, before anything is sent. Each hop runs on Bun and on Deno.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Cluster, temporaryCluster, waitFor } from "../harness/fixtures/index.ts";
import { tlsPeerIdentity } from "../shared/authz/expect-peer.ts";
import { createLogger } from "../shared/ops/log.ts";
import { createApp, listenReloadable, type ReloadableListener } from "../shared/platform/http.ts";
import { loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions } from "../shared/platform/tls.ts";
import { OTHER_HOST, outcomeOf, SAN_HOST } from "../shared/testing/host-checks.ts";
import { issueIdentity, newPki, type IdentityKind } from "../shared/testing/pki.ts";
import { testedRuntimes } from "../shared/testing/unit-run.ts";

setDefaultTimeout(120_000);

const SERVING: [string, IdentityKind][] = [
  ["server", "server"],
  ["coordinator", "coordinator"],
  ["keyserver", "keyserver"],
  ["secureproxy", "secureproxy"],
  ["marketplace", "marketplace"],
];
const url = (host: string, port: number) => `https://${host}:${port}`;

let pki: string;
/** Each serving identity's certificate on OTHER_HOST, counting the requests that reach it: there must be none. */
const impostors = new Map<string, { port: number; listener: ReloadableListener; requests: number }>();

beforeAll(async () => {
  pki = await newPki("hostnames");
  for (const [name, kind] of SERVING) await issueIdentity(pki, name, kind, { sans: [`IP:${SAN_HOST}`], force: true });
  for (const [name] of SERVING) {
    const identity = loadIdentity(pki, name);
    const impostor = { port: 0, listener: undefined as unknown as ReloadableListener, requests: 0 };
    const app = createApp({ logger: createLogger(name, { write: () => {} }) }).all("/*", () => {
      impostor.requests += 1;
      return { status: "ok" };
    });
    // The marketplace serves without asking for a client certificate, like the role.
    const tls = name === "marketplace" ? { cert: identity.cert, key: identity.key } : mutualTlsServerOptions(identity);
    impostor.listener = await listenReloadable(app, { port: 0, hostname: OTHER_HOST, tls, identify: tlsPeerIdentity, isRevoked: () => false });
    impostor.port = impostor.listener.port;
    impostors.set(name, impostor);
  }
});

afterAll(async () => {
  await Promise.all([...impostors.values()].map((i) => i.listener.stop(true)));
});

const impostorUrl = (name: string) => url(OTHER_HOST, impostors.get(name)!.port);

/** POST /request_api on a SecureProxy as client1, the way the harness's token stack calls it. */
async function requestApi(proxy: string, apiUri: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const response = await fetch(`${proxy}/request_api`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ ClientId: "client1", TokenType: "marketplace", ApiUri: apiUri }),
    tls: mutualTlsClientOptions(loadIdentity(pki, "client1")),
    signal: AbortSignal.timeout(15_000),
  });
  return { status: response.status, body: (await response.json()) as Record<string, unknown> };
}

for (const runtime of testedRuntimes()) {
  describe(`on ${runtime}`, () => {
    let cluster: Cluster;
    const at: Record<string, string> = {};

    /** Starts a role listening on SAN_HOST and waits until the harness's client reaches it there. */
    const start = async (name: string, script: string, args: string[]) => {
      const { port } = await cluster.spawn(name, script, ["0", "--host", SAN_HOST, ...args]);
      at[name] = url(SAN_HOST, port);
      await cluster.waitHealthy(at[name]!, 30_000);
      return at[name]!;
    };

    beforeAll(async () => {
      cluster = await temporaryCluster({ label: `hostnames-${runtime}`, pki, runtime });
      const secrets = mkdtempSync(join(tmpdir(), "securemesh-hostnames-"));
      const tokenFile = join(secrets, "marketplace_token");
      writeFileSync(tokenFile, "mkt_hostnames_token", { mode: 0o600 });
      const tokenDb = join(cluster.logDir, "tokens.db");
      const seeded = await cluster.run(
        "keyserver-admin",
        "keyserver",
        ["token", "add", "--client", "client1", "--type", "marketplace", "--token", "-", "--data", secrets, "--db", tokenDb],
        { stdin: "mkt_hostnames_token" },
      );
      expect(seeded.exitCode).toBe(0);
      const [server, keyserver, marketplace] = await Promise.all([
        start("server", "server", ["--db", join(cluster.logDir, "records.db")]),
        start("keyserver", "keyserver", ["--data", secrets, "--db", tokenDb]),
        start("marketplace", "marketplace", ["--token-file", tokenFile]),
      ]);
      const allow = `marketplace=${new URL(marketplace).host},${new URL(impostorUrl("marketplace")).host}`;
      await Promise.all([
        start("coordinator", "coordinator", ["--servers", `${server},${impostorUrl("server")}`, "--health-interval", "250", "--admin-port", "0"]),
        start("secureproxy", "secureproxy", ["--keyserver", keyserver, "--allow", allow]),
        start("secureproxy-to-impostor", "secureproxy", ["--keyserver", impostorUrl("keyserver"), "--allow", allow]),
      ]);
    });

    afterAll(async () => {
      await cluster?.stop();
    });

    test("client → coordinator: the client role reaches the coordinator on its SAN, and refuses its certificate anywhere else", async () => {
      const right = await cluster.runClient("client-right", ["--coordinator", at.coordinator!, "--no-cache-check"]);
      expect({ exitCode: right.exitCode, success: right.lines.some((l) => l.startsWith("[client1] Success: ")) }).toEqual({ exitCode: 0, success: true });
      const wrong = await cluster.runClient("client-wrong", ["--coordinator", impostorUrl("coordinator"), "--no-cache-check", "--timeout", "3000"]);
      expect(wrong.exitCode).toBe(1);
      expect(wrong.lines.find((l) => l.startsWith("[client1] Error"))).toContain(
        `${impostorUrl("coordinator")}: TLS certificate does not name this host (ERR_TLS_HOSTNAME)`,
      );
    });

    test("coordinator → servers: health probes keep the server on the wrong host out; the status page names each host", async () => {
      const servers = await waitFor("the coordinator to refuse the server on the wrong host", async () => {
        const seen = (await cluster.health(at.coordinator!))?.body.servers as { url: string; up: boolean; lastError: string | null }[] | undefined;
        return seen?.find((s) => s.url === impostorUrl("server"))?.lastError ? seen : undefined;
      });
      expect(servers.map(({ url, up, lastError }) => ({ url, up, lastError }))).toEqual([
        { url: at.server!, up: true, lastError: null },
        { url: impostorUrl("server"), up: false, lastError: "TLS certificate does not name this host (ERR_TLS_HOSTNAME)" },
      ]);
      const status = (await (await fetch(`${await cluster.adminUrl("coordinator")}/status`)).json()) as { servers: { host: string }[] };
      expect(status.servers.map((s) => s.host)).toEqual([SAN_HOST, OTHER_HOST]);
    });

    test("coordinator → servers: a broadcast reaches the server on its SAN and refuses the one on the wrong host", async () => {
      const report = await cluster.client("client1", [at.coordinator!]).invalidateCache();
      expect(report.body).toMatchObject({
        acknowledged: [at.server],
        failed: [{ server: impostorUrl("server"), status: null, error: "TLS certificate does not name this host (ERR_TLS_HOSTNAME)" }],
      });
    });

    test("SecureProxy → KeyServer: a KeyServer certificate on the wrong host is refused; on its SAN the token is released", async () => {
      const item = `${at.marketplace}/api/item`;
      expect(await requestApi(at.secureproxy!, item)).toMatchObject({ status: 200, body: { item: { id: 1 } } });
      expect(await requestApi(at["secureproxy-to-impostor"]!, item)).toEqual({
        status: 503,
        body: {
          error: expect.stringMatching(/^KeyServer \S+ unavailable \(TLS certificate does not name this host \(ERR_TLS_HOSTNAME\)\)$/),
          code: "ERR_UNAVAILABLE",
        },
      });
    });

    test("SecureProxy → API: the marketplace's certificate on the wrong host is refused, so the token is never sent", async () => {
      const answer = await requestApi(at.secureproxy!, `${impostorUrl("marketplace")}/api/item`);
      expect(answer).toEqual({
        status: 502,
        body: {
          error: `the API at ${new URL(impostorUrl("marketplace")).host} failed (TLS certificate does not name this host (ERR_TLS_HOSTNAME))`,
          code: "ERR_UPSTREAM",
        },
      });
    });
  });
}

test("client → SecureProxy and the harness's own clients (Bun's fetch): refused on the wrong host, before anything is sent", async () => {
  const client1 = mutualTlsClientOptions(loadIdentity(pki, "client1"));
  for (const [name] of SERVING) {
    const outcome = await outcomeOf(fetch(`${impostorUrl(name)}/health`, { tls: client1, signal: AbortSignal.timeout(10_000) }));
    expect({ name, outcome }).toEqual({ name, outcome: "ERR_TLS_CERT_ALTNAME_INVALID" });
  }
  const cluster = await temporaryCluster({ label: "hostnames-harness", pki });
  expect(await cluster.health(impostorUrl("secureproxy"))).toBeUndefined();
  // Nothing any hop above sent got through to a certificate on the wrong host.
  expect(Object.fromEntries([...impostors].map(([name, i]) => [name, i.requests]))).toEqual({
    server: 0,
    coordinator: 0,
    keyserver: 0,
    secureproxy: 0,
    marketplace: 0,
  });
});
