// Integration tests of the token path on real processes: KeyServer, SecureProxy, marketplace.
import { beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_ROOT } from "../shared/platform/config.ts";
import { runPython } from "../shared/testing/python.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
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
    URL: keyserver, CERT: join(pki, "secureproxy_cert.pem"), KEY: join(pki, "secureproxy_key.pem"), CA: join(pki, "ca_cert.pem"),
    ON_BEHALF_OF: CLIENT1_ID, REPLAY: options.replayFields ? "1" : "0", TIMES: String(options.times),
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
    expect((await originalFormatClient(lenient.keyserver, { replayFields: false, times: 2 })).split("\n")).toEqual([`200 ${lenient.token}`, `200 ${lenient.token}`]);
  });

  test("a client1 certificate calling the KeyServer directly gets 403", async () => {
    await using tokens = await stack();
    const { keyserver } = tokens;
    const response = await fetch(`${keyserver}/`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}", tls: mutualTlsClientOptions(loadIdentity(pki, "client1")) });
    expect({ status: response.status, body: await response.json() }).toEqual({
      status: 403, body: { error: `${CLIENT1_ID} lacks permission tokens.fetch`, code: "ERR_FORBIDDEN" },
    });
  });

  test("a server certificate (no clientAuth) is dropped at the handshake", async () => {
    await using tokens = await stack();
    const { keyserver } = tokens;
    const attempt = fetch(`${keyserver}/public_key`, { tls: mutualTlsClientOptions(loadIdentity(pki, "marketplace")) });
    await expect(attempt).rejects.toThrow();
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
    for (const [caller, id] of [["client2", "spiffe://securemesh/client/client2"], ["coordinator", "spiffe://securemesh/coordinator/coordinator"]]) {
      expect(await requestApi(body, caller)).toEqual({
        status: 403, body: { error: `${id} lacks permission proxy.use:client1/marketplace`, code: "ERR_FORBIDDEN" },
      });
    }
    expect(cluster.role("marketplace").lines.filter((l) => l.includes("/api/item"))).toHaveLength(1);
    const audit = cluster.role("keyserver").lines.filter((l) => l.startsWith("AUDIT "));
    expect(audit).toEqual([expect.stringMatching(new RegExp(`caller=${PROXY_ID} on_behalf_of=${CLIENT1_ID} client=client1 type=marketplace outcome=released$`))]);
  });

  test("unknown client 404, off-allowlist 403 with nothing sent; KeyServer down 503; API down 502", async () => {
    // client1 may use any ClientId here, so an unknown one reaches the KeyServer and gets its 404.
    const policy = join(mkdtempSync(join(tmpdir(), "securemesh-policy-")), "policy.json");
    writeFileSync(policy, JSON.stringify({ rules: [
      { identity: CLIENT1_ID, allow: ["proxy.use:*"] }, { identity: PROXY_ID, allow: ["tokens.fetch"] },
    ] }));
    await using tokens = await stack({ env: { SECUREMESH_POLICY: policy } });
    const { cluster, requestApi, itemUri: uri, token } = tokens;
    expect((await requestApi({ ClientId: "nobody", TokenType: "marketplace", ApiUri: uri })).status).toBe(404);
    expect((await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: "https://127.0.0.2:1/x" })).status).toBe(403);
    expect((await requestApi({ ClientId: "client1", TokenType: "other", ApiUri: uri })).status).toBe(403);
    expect(cluster.role("marketplace").lines.filter((l) => l.includes("/api/item"))).toEqual([]);

    await cluster.kill("marketplace");
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri })).toMatchObject({ status: 502, body: { code: "ERR_UPSTREAM" } });
    await cluster.kill("keyserver");
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri })).toMatchObject({ status: 503, body: { code: "ERR_UNAVAILABLE" } });

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
    const asClient2 = () => requestApi({ ClientId: "client2", TokenType: "marketplace", ApiUri: uri }, "client2").then((a) => a.status, () => "refused");
    expect(await asClient2()).toBe(404);

    await runPkiSh(own, "revoke", "client2");
    const started = Date.now();
    await waitFor("client2 to be refused", async () => (await asClient2()) === "refused", RELOAD_BOUND_MS);
    expect(Date.now() - started).toBeLessThan(RELOAD_BOUND_MS);
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri })).toEqual({ status: 200, body: ITEM });
  });
});
