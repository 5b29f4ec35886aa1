// Integration tests of the token path on real processes: KeyServer, SecureProxy, marketplace.
import { beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describeDatabaseUrl } from "../shared/db/database.ts";
import { REPO_ROOT } from "../shared/platform/config.ts";
import { scratchDatabase } from "../shared/testing/mysql.ts";
import { runPython } from "../shared/testing/python.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { ProxyClient } from "../shared/token-path/proxy-client.ts";
import { ON_BEHALF_OF_HEADER } from "../shared/token-path/token-exchange.ts";
import { newPki, runPkiSh, startTokenStack, testPki, waitFor, type TokenStackOptions } from "./fixtures/index.ts";

setDefaultTimeout(30_000);

let pki: string;
const PROXY_ID = "spiffe://securemesh/secureproxy/secureproxy";
const CLIENT1_ID = "spiffe://securemesh/client/client1";
const ITEM = { item: { id: 1, name: "Test item", price: 10, currency: "EUR" } };
/** The bound this project states for a revocation or a policy edit to take effect on running roles. */
const RELOAD_BOUND_MS = 5000;

beforeAll(async () => {
  pki = await testPki();
});

/** A token stack of its own, on the shared test PKI unless told otherwise. */
const stack = (options: TokenStackOptions = {}) => startTokenStack({ pki, ...options });

/** A client of the original format, in Python (cryptography + requests); REPLAY=0 leaves out timestamp and nonce as the oldest clients did. */
const PYTHON_ORIGINAL_FORMAT = `
import base64, json, os, secrets, time, requests
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
url, cert, ca = os.environ["URL"], (os.environ["CERT"], os.environ["KEY"]), os.environ["CA"]
public_key = serialization.load_pem_public_key(requests.post(url + "/public_key", cert=cert, verify=ca, timeout=10).json()["public_key"].encode())
session_key = secrets.token_bytes(32)
wrapped = public_key.encrypt(session_key, asym.OAEP(mgf=asym.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
body = {"sessionKey": base64.b64encode(wrapped).decode(), "clientId": "client1", "tokenType": "marketplace"}
if os.environ["REPLAY"] == "1":
    body.update(timestamp=int(time.time()), nonce=secrets.token_urlsafe(18))
for _ in range(int(os.environ["TIMES"])):
    answer = requests.post(url + "/", json=body, cert=cert, verify=ca, timeout=10, headers={"${ON_BEHALF_OF_HEADER}": os.environ["ON_BEHALF_OF"]})
    if answer.status_code != 200:
        print(answer.status_code, json.dumps(answer.json(), separators=(",", ":")))
        continue
    raw = base64.b64decode(answer.json()["token"])
    decryptor = Cipher(algorithms.AES(session_key), modes.CBC(raw[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    print(200, (unpadder.update(decryptor.update(raw[16:]) + decryptor.finalize()) + unpadder.finalize()).decode())
`;

function originalFormatClient(keyserver: string, options: { replayFields: boolean; times: number }) {
  return runPython(PYTHON_ORIGINAL_FORMAT, "", {
    URL: keyserver,
    CERT: join(pki, "secureproxy_cert.pem"),
    KEY: join(pki, "secureproxy_key.pem"),
    CA: join(pki, "ca_cert.pem"),
    ON_BEHALF_OF: CLIENT1_ID,
    REPLAY: options.replayFields ? "1" : "0",
    TIMES: String(options.times),
  });
}

describe("KeyServer", () => {
  test("a Python client (cryptography + requests) speaking the original format gets and decrypts the token", async () => {
    await using tokens = await stack();
    const { keyserver, token } = tokens;
    expect(await originalFormatClient(keyserver, { replayFields: true, times: 1 })).toBe(`200 ${token}`);
  });

  // #11 L8: without a timestamp and nonce, the same original-format body was released 3 times.
  test("the original format without timestamp and nonce is refused by default, every time; --legacy-replay allow serves old clients", async () => {
    await using strict = await stack();
    const refused = `401 ${JSON.stringify({ error: "timestamp and nonce are required (old clients need the KeyServer's --legacy-replay allow)", code: "ERR_REPLAY" })}`;
    expect((await originalFormatClient(strict.keyserver, { replayFields: false, times: 3 })).split("\n")).toEqual([refused, refused, refused]);
    // With the fields, the same body is released once.
    const once = (await originalFormatClient(strict.keyserver, { replayFields: true, times: 3 })).split("\n");
    expect(once.map((l) => l.slice(0, 3))).toEqual(["200", "401", "401"]);

    await using lenient = await stack({ keyserverArgs: ["--legacy-replay", "allow"] });
    expect((await originalFormatClient(lenient.keyserver, { replayFields: false, times: 2 })).split("\n")).toEqual([
      `200 ${lenient.token}`,
      `200 ${lenient.token}`,
    ]);
  });

  test("a client1 certificate calling the KeyServer directly gets 403", async () => {
    await using tokens = await stack();
    const { keyserver } = tokens;
    const response = await fetch(`${keyserver}/`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
      tls: mutualTlsClientOptions(loadIdentity(pki, "client1")),
    });
    expect({ status: response.status, body: await response.json() }).toEqual({
      status: 403,
      body: { error: `${CLIENT1_ID} lacks permission tokens.fetch`, code: "ERR_FORBIDDEN" },
    });
  });

  test("a server certificate (no clientAuth) never reaches the app: it is told 403 ERR_CLIENT_CERT (issue 23)", async () => {
    await using tokens = await stack();
    const { keyserver } = tokens;
    const response = await fetch(`${keyserver}/public_key`, { tls: mutualTlsClientOptions(loadIdentity(pki, "marketplace")) });
    expect({ status: response.status, code: ((await response.json()) as { code?: string }).code }).toEqual({ status: 403, code: "ERR_CLIENT_CERT" });
  });

  // #11 M4: after `token rotate-key`, every proxy call got 502 until the KeyServer was restarted.
  test("token rotate-key, twice, while releases run: 0 failed releases, and only the current key version is left", async () => {
    await using tokens = await stack();
    const { cluster, requestApi, itemUri: uri, dataDir, tokenDb } = tokens;
    const failures: string[] = [];
    let released = 0;
    let rotating = true;
    const release = async () => {
      const { status, body } = await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri });
      if (status === 200) released++;
      else failures.push(`${status} ${JSON.stringify(body)}`);
    };
    const loops = [1, 2, 3].map(async () => {
      while (rotating) await release();
    });
    await waitFor("releases to be flowing", () => released >= 3);
    for (const round of [1, 2]) {
      const rotated = await cluster.run(`rotate-${round}`, "keyserver", ["token", "rotate-key", "--data", dataDir, "--db", tokenDb]);
      expect(rotated.exitCode).toBe(0);
      expect(rotated.lines.join("\n")).toContain(`re-sealed 1 token(s) under master key v${round + 1}; retired versions: ${round}`);
      // Releases straight after the rotation, before the KeyServer's keyring watcher has necessarily looked.
      const before = released + failures.length;
      await waitFor(`releases after rotation ${round}`, () => released + failures.length >= before + 3);
    }
    rotating = false;
    await Promise.all(loops);
    expect(failures).toEqual([]);
    expect(released).toBeGreaterThanOrEqual(9);
    const listed = await cluster.run("list", "keyserver", ["token", "list", "--data", dataDir, "--db", tokenDb]);
    expect(listed.lines[1]).toContain("master key versions: 3 (current v3); archived: 1, 2");
    expect(listed.lines.slice(2).map((l) => l.trim())).toEqual([expect.stringMatching(/^client=client1 type=marketplace key=v3 /)]);
    expect(cluster.role("keyserver").lines.filter((l) => / outcome=(?!released)/.test(l))).toEqual([]);
  });
});

describe("SecureProxy", () => {
  test.each([["jose"], ["legacy"]])("calls the marketplace with the token (%s wire format)", async (format) => {
    await using tokens = await stack({ proxyArgs: ["--format", format] });
    expect(await tokens.requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: tokens.itemUri })).toEqual({ status: 200, body: ITEM });
  });

  // #11 H1: with client2's certificate, or the coordinator's, {"ClientId":"client1"} got client1's item with 200.
  test("only the identity the policy allows uses a ClientId: client1 200, client2 and the coordinator 403; the KeyServer audits both hops", async () => {
    await using tokens = await stack();
    const { cluster, requestApi } = tokens;
    const body = { ClientId: "client1", TokenType: "marketplace", ApiUri: tokens.itemUri };
    expect(await requestApi(body, "client1")).toEqual({ status: 200, body: ITEM });
    for (const [caller, id] of [
      ["client2", "spiffe://securemesh/client/client2"],
      ["coordinator", "spiffe://securemesh/coordinator/coordinator"],
    ]) {
      expect(await requestApi(body, caller)).toEqual({
        status: 403,
        body: { error: `${id} lacks permission proxy.use:client1/marketplace`, code: "ERR_FORBIDDEN" },
      });
    }
    expect(cluster.role("marketplace").lines.filter((l) => l.includes("/api/item"))).toHaveLength(1);
    const audit = cluster.role("keyserver").lines.filter((l) => l.startsWith("AUDIT "));
    expect(audit).toEqual([
      expect.stringMatching(new RegExp(`caller=${PROXY_ID} on_behalf_of=${CLIENT1_ID} client=client1 type=marketplace outcome=released$`)),
    ]);
  });

  test("unknown client 404, off-allowlist 403 with nothing sent; KeyServer down 503; API down 502", async () => {
    // client1 may use any ClientId here, so an unknown one reaches the KeyServer and gets its 404.
    const policy = join(mkdtempSync(join(tmpdir(), "securemesh-policy-")), "policy.json");
    writeFileSync(
      policy,
      JSON.stringify({
        rules: [
          { identity: CLIENT1_ID, allow: ["proxy.use:*"] },
          { identity: PROXY_ID, allow: ["tokens.fetch"] },
        ],
      }),
    );
    await using tokens = await stack({ env: { SECUREMESH_POLICY: policy } });
    const { cluster, requestApi, itemUri: uri, token } = tokens;
    expect((await requestApi({ ClientId: "nobody", TokenType: "marketplace", ApiUri: uri })).status).toBe(404);
    expect((await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: "https://127.0.0.2:1/x" })).status).toBe(403);
    expect((await requestApi({ ClientId: "client1", TokenType: "other", ApiUri: uri })).status).toBe(403);
    expect(cluster.role("marketplace").lines.filter((l) => l.includes("/api/item"))).toEqual([]);

    await cluster.kill("marketplace");
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri })).toMatchObject({ status: 502, body: { code: "ERR_UPSTREAM" } });
    await cluster.kill("keyserver");
    // The proxy's 503, which the application's ProxyClient takes to every proxy it knows before it gives up.
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri })).toMatchObject({
      status: 503,
      body: { code: "ERR_UNREACHABLE", error: expect.stringContaining("answered 503: KeyServer 127.0.0.1:") },
    });

    for (const file of readdirSync(cluster.logDir).filter((f) => f.endsWith(".log"))) {
      expect(readFileSync(join(cluster.logDir, file), "utf8")).not.toContain(token);
    }
  });
});

describe("without a restart", () => {
  test(`a policy edit takes effect at the proxy and the KeyServer within ${RELOAD_BOUND_MS / 1000} s`, async () => {
    const policy = join(mkdtempSync(join(tmpdir(), "securemesh-policy-")), "policy.json");
    copyFileSync(join(REPO_ROOT, "roles", "policy.json"), policy);
    await using tokens = await stack({ env: { SECUREMESH_POLICY: policy } });
    const { requestApi } = tokens;
    const body = { ClientId: "client1", TokenType: "marketplace", ApiUri: tokens.itemUri };
    expect((await requestApi(body)).status).toBe(200);

    const shipped = JSON.parse(readFileSync(policy, "utf8")) as { rules: { identity: string; allow: string[] }[] };
    const withdrawn = shipped.rules.map((r) => ({ ...r, allow: r.allow.filter((p) => p !== "proxy.use:client1/marketplace") }));
    writeFileSync(policy, JSON.stringify({ rules: withdrawn }));
    const started = Date.now();
    await waitFor("client1's permission to be withdrawn", async () => (await requestApi(body)).status === 403, RELOAD_BOUND_MS);
    expect(Date.now() - started).toBeLessThan(RELOAD_BOUND_MS);

    writeFileSync(policy, JSON.stringify(shipped));
    await waitFor("client1's permission to be back", async () => (await requestApi(body)).status === 200, RELOAD_BOUND_MS);
  });

  test(`./pki.sh revoke client2 shuts client2 out of the proxy within ${RELOAD_BOUND_MS / 1000} s; client1 carries on`, async () => {
    const own = await newPki("revocation"); // its own: this test revokes client2 in it
    await using tokens = await stack({ pki: own });
    const { requestApi, itemUri: uri } = tokens;
    // client2 may use its own ClientId; there is no token for it, so the KeyServer's 404 shows it got through.
    // Once revoked, the gate answers 403 ERR_REVOKED before it closes (issue 23: refusals say why).
    const asClient2 = () =>
      requestApi({ ClientId: "client2", TokenType: "marketplace", ApiUri: uri }, "client2").then(
        (a) => (a.status === 403 && a.body.code === "ERR_REVOKED" ? "revoked" : a.status),
        () => "connection failed",
      );
    expect(await asClient2()).toBe(404);

    await runPkiSh(own, "revoke", "client2");
    const started = Date.now();
    await waitFor("client2 to be refused as revoked", async () => (await asClient2()) === "revoked", RELOAD_BOUND_MS);
    expect(Date.now() - started).toBeLessThan(RELOAD_BOUND_MS);
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri })).toEqual({ status: 200, body: ITEM });
  });
});

/**
 * Calls through the stack's proxies from `loops` concurrent applications until stopped, the n-th trying the proxies
 * from the n-th (as applications on different hosts would); counts releases, by proxy, and failures.
 */
function keepCalling(tokens: Awaited<ReturnType<typeof stack>>, loops = 4) {
  const call = { ClientId: "client1", TokenType: "marketplace", ApiUri: tokens.itemUri };
  const state = { released: 0, failures: [] as string[], byProxy: new Map<string, number>(), running: true };
  const proxies = [...tokens.secureproxies.values()];
  const done = Promise.all(
    Array.from({ length: loops }, async (_, i) => {
      const order = [...proxies.slice(i % proxies.length), ...proxies.slice(0, i % proxies.length)];
      const client = new ProxyClient({ identity: loadIdentity(pki, "client1"), proxies: order, timeoutMs: 10_000, backoffMs: 50 });
      while (state.running) {
        try {
          const { status, body, proxy } = await client.requestApi(call);
          if (status === 200) {
            state.released++;
            state.byProxy.set(proxy, (state.byProxy.get(proxy) ?? 0) + 1);
          } else state.failures.push(`${status} ${JSON.stringify(body)}`);
        } catch (error) {
          state.failures.push((error as Error).message);
        }
      }
      client.close();
    }),
  );
  return Object.assign(state, {
    /** Waits until `n` more calls were released than when it was asked. */
    async more(n: number, what: string) {
      const from = state.released;
      await waitFor(`${n} releases ${what}`, () => state.released - from >= n, 20_000);
    },
    async stop() {
      state.running = false;
      await done;
    },
  });
}

// Issue 23, found by an operator on a 3-node Galera deployment: `token rotate-key` as the docs printed it (no --db) on
// the KeyServer host re-sealed the local sqlite store, retired master key v1 because no sqlite row used it, and took it
// from the keyring the running KeyServer shares. Measured on the code before this change, on this MariaDB: it printed
// "re-sealed 0 token(s) under master key v2; retired versions: 1", and every release after it was 502 at the proxy
// (the KeyServer's 500 ERR_SEAL); `token add` and `token list` without --db printed "stored token …" and "1 token(s) in
// sqlite …" while the running KeyServer knew nothing of it.
describe("issue 23: the token commands act only on the KeyServer's own store", () => {
  test("the operator's sequence on MariaDB: every command without --db is refused naming both, 0 tokens lost; with the KeyServer's --config it rotates under load", async () => {
    await using db = await scratchDatabase();
    await using tokens = await stack({ tokenDb: db.url });
    const { cluster, dataDir } = tokens;
    const item = { ClientId: "client1", TokenType: "marketplace", ApiUri: tokens.itemUri };
    expect(await tokens.requestApi(item)).toEqual({ status: 200, body: ITEM });

    const keyringPath = join(dataDir, "master_keys.json");
    const { keyring: keyringId, store } = JSON.parse(readFileSync(keyringPath, "utf8")) as { keyring: string; store: { id: string; at: string } };
    const where = describeDatabaseUrl(db.url);
    expect(store.at).toBe(where);
    const refusal =
      `keyserver: keyring ${keyringPath} belongs to token store ${where} (store id ${store.id}), not to sqlite ${join(dataDir, "tokens.db")} (no such file): ` +
      "give it the KeyServer's own configuration (--config FILE, or the --db or --db-file the KeyServer runs with)";
    const asPrinted: [string, string[], string?][] = [
      ["rotate-key", ["token", "rotate-key"]],
      ["add", ["token", "add", "--client", "client2", "--type", "marketplace", "--token", "-"], "another-token"],
      ["list", ["token", "list"]],
    ];
    for (const [name, args, stdin] of asPrinted) {
      const run = await cluster.run(`no-db-${name}`, "keyserver", [...args, "--data", dataDir], { stdin });
      expect({ name, exitCode: run.exitCode, lines: run.lines }).toEqual({ name, exitCode: 2, lines: [refusal] });
    }
    expect(existsSync(join(dataDir, "tokens.db"))).toBe(false);
    expect(await tokens.requestApi(item)).toEqual({ status: 200, body: ITEM });

    // The operator with the KeyServer's own configuration file, while releases run.
    const config = join(dataDir, "..", "keyserver.env");
    writeFileSync(config, `SECUREMESH_DB=${db.url}\nSECUREMESH_DATA=${dataDir}\n`, { mode: 0o600 });
    const load = keepCalling(tokens);
    await load.more(3, "before the rotation");
    const rotated = await cluster.run("rotate-with-config", "keyserver", ["token", "rotate-key", "--config", config]);
    await load.more(3, "after the rotation");
    await load.stop();
    expect({ exitCode: rotated.exitCode, lines: rotated.lines }).toEqual({
      exitCode: 0,
      lines: [
        `token store ${where} (store id ${store.id}, from SECUREMESH_DB in the --config file); keyring ${keyringPath} (keyring ${keyringId}, master key versions 1, current v1)`,
        `re-sealed 1 token(s) under master key v2; retired versions: 1 (archived in ${join(dataDir, "master_keys.archive.json")}; 'token restore-key VERSION' brings one back)`,
      ],
    });
    expect(load.failures).toEqual([]);
    expect(cluster.role("keyserver").lines.filter((l) => / outcome=(?!released)/.test(l))).toEqual([]);
  });

  test("a replacement KeyServer host without the keyring refuses to start on the store, saying to restore the keyring", async () => {
    await using db = await scratchDatabase();
    await using tokens = await stack({ tokenDb: db.url });
    const fresh = join(mkdtempSync(join(tmpdir(), "securemesh-replacement-")), "keyserver");
    const run = await tokens.cluster.run("replacement", "keyserver", ["0", "--data", fresh, "--db", db.url]);
    expect({ exitCode: run.exitCode, lines: run.lines }).toEqual({
      exitCode: 2,
      lines: [
        expect.stringMatching(
          new RegExp(
            `^keyserver: no keyring at ${fresh}/master_keys\\.json, but token store ${describeDatabaseUrl(db.url).replace(/[.]/g, "\\.")} holds 1 sealed token ` +
              "and is bound to a keyring \\(store id [0-9a-f]{16}\\): restore that keyring with 'token keyring import BACKUP' \\(a new keyring would open none of them\\)$",
          ),
        ),
      ],
    });
    // Refused before it made anything: no keyring, and no RSA key either.
    expect(existsSync(fresh)).toBe(false);
  });
});

// Issue 23: one KeyServer and one SecureProxy were single points of failure of the token path.
describe("two KeyServers and two SecureProxies on one MariaDB store", () => {
  test("a KeyServer killed and restarted, a SecureProxy killed and restarted, and a rotation on the second KeyServer's host, under load: 0 failed token calls", async () => {
    await using db = await scratchDatabase();
    await using tokens = await stack({ tokenDb: db.url, keyservers: 2, proxies: 2 });
    const { cluster } = tokens;
    const released = (role: string) => cluster.role(role).lines.filter((l) => l.endsWith(" outcome=released")).length;
    const load = keepCalling(tokens);
    await load.more(6, "before any fault");
    expect([released("keyserver") > 0, released("keyserver2") > 0]).toEqual([true, true]);

    await cluster.kill("keyserver");
    const onSecond = released("keyserver2");
    await load.more(10, "with the first KeyServer dead");
    // The audit line comes through the role's log pipe, a moment after the answer the load counted.
    await waitFor("the second KeyServer's audit lines for those 10 releases", () => released("keyserver2") - onSecond >= 10, 5000).catch(() => {});
    expect(released("keyserver2") - onSecond).toBeGreaterThanOrEqual(10);
    await tokens.restart("keyserver");
    await load.more(6, "after the KeyServer restarted");

    await cluster.kill("secureproxy");
    const second = tokens.secureproxies.get("secureproxy2")!;
    const viaSecond = load.byProxy.get(second) ?? 0;
    await load.more(10, "with the first SecureProxy dead");
    expect((load.byProxy.get(second) ?? 0) - viaSecond).toBeGreaterThanOrEqual(10);
    await tokens.restart("secureproxy");

    const rotated = await cluster.run("rotate-on-keyserver2", "keyserver", [
      "token",
      "rotate-key",
      "--data",
      tokens.dataDirs.get("keyserver2")!,
      "--db",
      db.url,
    ]);
    expect(rotated.lines.at(-1)).toMatch(/^re-sealed 1 token\(s\) under master key v2; retired versions: 1 /);
    const [first, beforeRotation] = [released("keyserver"), released("keyserver2")];
    // Both KeyServers release after the rotation (the first once the restarted proxy is back in the applications'
    // order): each learned of v2 from the store, without an import.
    await waitFor("both KeyServers to release after the rotation", () => released("keyserver") > first && released("keyserver2") > beforeRotation, 20_000);
    await load.more(10, "after the rotation");
    await load.stop();
    expect(load.failures).toEqual([]);
    for (const role of ["keyserver", "keyserver2"]) expect(cluster.role(role).lines.filter((l) => / outcome=(?!released)/.test(l))).toEqual([]);
  });
});
