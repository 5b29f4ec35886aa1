// Integration tests of the token path on real processes: KeyServer, SecureProxy, marketplace.
import { afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { testPki } from "../shared/testing/pki.ts";
import { runPython } from "../shared/testing/python.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/tls.ts";
import { Cluster } from "./cluster.ts";
import { startTokenStack } from "./token-stack.ts";

setDefaultTimeout(30_000);

let pki: string;
const clusters: Cluster[] = [];
const FREE = { keyserver: 0, secureproxy: 0, marketplace: 0 };

beforeAll(async () => {
  pki = await testPki();
});

afterEach(async () => {
  await Promise.all(clusters.splice(0).map((c) => c.stop()));
});

async function stack(proxyArgs: string[] = []) {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-tokens-test-"));
  const cluster = new Cluster({ logDir: dir, pki, env: { NO_COLOR: "1" } });
  clusters.push(cluster);
  return { cluster, dir, ...(await startTokenStack(cluster, FREE, join(dir, "tokens.db"), proxyArgs)) };
}

const itemUri = (marketplace: string) => `${marketplace.replace("127.0.0.1", "localhost")}/api/item`;

describe("KeyServer", () => {
  test("a Python client (cryptography + requests) speaking the original format gets and decrypts the token", async () => {
    const { keyserver, token } = await stack();
    const out = await runPython(`
import base64, os, secrets, time, requests
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
url, cert, ca = os.environ["URL"], (os.environ["CERT"], os.environ["KEY"]), os.environ["CA"]
public_key = serialization.load_pem_public_key(requests.post(url + "/public_key", cert=cert, verify=ca, timeout=10).json()["public_key"].encode())
session_key = secrets.token_bytes(32)
wrapped = public_key.encrypt(session_key, asym.OAEP(mgf=asym.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
body = {"sessionKey": base64.b64encode(wrapped).decode(), "clientId": "client1", "tokenType": "marketplace",
        "timestamp": int(time.time()), "nonce": secrets.token_urlsafe(18)}
raw = base64.b64decode(requests.post(url + "/", json=body, cert=cert, verify=ca, timeout=10).json()["token"])
decryptor = Cipher(algorithms.AES(session_key), modes.CBC(raw[:16])).decryptor()
unpadder = padding.PKCS7(128).unpadder()
print((unpadder.update(decryptor.update(raw[16:]) + decryptor.finalize()) + unpadder.finalize()).decode())
`, "", { URL: keyserver, CERT: join(pki, "secureproxy_cert.pem"), KEY: join(pki, "secureproxy_key.pem"), CA: join(pki, "ca_cert.pem") });
    expect(out).toBe(token);
  });

  test("a client1 certificate calling the KeyServer directly gets 403", async () => {
    const { keyserver } = await stack();
    const response = await fetch(`${keyserver}/`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}", tls: mutualTlsClientOptions(loadIdentity(pki, "client1")) });
    expect(response.status).toBe(403);
  });

  test("a server certificate (no clientAuth) is dropped at the handshake", async () => {
    const { keyserver } = await stack();
    const attempt = fetch(`${keyserver}/public_key`, { tls: mutualTlsClientOptions(loadIdentity(pki, "marketplace")) });
    await expect(attempt).rejects.toThrow();
  });
});

describe("SecureProxy", () => {
  test.each([["jose"], ["legacy"]])("calls the marketplace with the token (%s wire format)", async (format) => {
    const { requestApi, marketplace } = await stack(["--format", format]);
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: itemUri(marketplace) })).toEqual({
      status: 200, body: { item: { id: 1, name: "Test item", price: 10, currency: "EUR" } },
    });
  });

  test("unknown client 404, off-allowlist 403 with nothing sent; KeyServer down 503; API down 502", async () => {
    const { cluster, requestApi, marketplace, token, dir } = await stack();
    const uri = itemUri(marketplace);
    expect((await requestApi({ ClientId: "nobody", TokenType: "marketplace", ApiUri: uri })).status).toBe(404);
    expect((await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: "https://127.0.0.2:1/x" })).status).toBe(403);
    expect((await requestApi({ ClientId: "client1", TokenType: "other", ApiUri: uri })).status).toBe(403);
    expect(cluster.role("marketplace").lines.filter((l) => l.includes("/api/item"))).toEqual([]);

    await cluster.kill("marketplace");
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri })).toMatchObject({ status: 502, body: { code: "ERR_UPSTREAM" } });
    await cluster.kill("keyserver");
    expect(await requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: uri })).toMatchObject({ status: 503, body: { code: "ERR_UNAVAILABLE" } });

    for (const file of readdirSync(dir).filter((f) => f.endsWith(".log"))) {
      expect(readFileSync(join(dir, file), "utf8")).not.toContain(token);
    }
  });
});
