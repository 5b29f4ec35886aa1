import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Authorizer } from "../shared/authz/authorizer.ts";
import { policyPath } from "../shared/platform/config.ts";
import { Forbidden } from "../shared/platform/errors.ts";
import { createLogger } from "../shared/ops/log.ts";
import { bindPeer } from "../shared/platform/runtime/peer.ts";
import { testPki } from "../shared/testing/pki.ts";
import { scrape } from "../shared/testing/prometheus.ts";
import { loadIdentity } from "../shared/platform/tls.ts";
import { ON_BEHALF_OF_HEADER, RsaKeyPair } from "../shared/token-path/token-exchange.ts";
import { apiTrust, checkApiUri, createProxyApp, parseAllowlist, ProxyHops } from "./secureproxy.ts";
import { certificateBundle } from "../shared/token-path/proxy-hops.ts";

const allow = parseAllowlist(["marketplace=localhost:5005,127.0.0.1:5005"]);
const CLIENT1 = "spiffe://securemesh/client/client1";
const CLIENT2 = "spiffe://securemesh/client/client2";
const COORDINATOR = "spiffe://securemesh/coordinator/coordinator";
const ITEM = "https://localhost:5005/api/item";

let pki: string;
let keys: RsaKeyPair;

/** A stand-in KeyServer serving with `name`'s certificate; it records what the proxy sends and answers `answer`. */
function fakeKeyserver(name: string, answer: () => Response = () => Response.json({ error: "no token for that clientId and tokenType", code: "ERR_NOT_FOUND" }, { status: 404 })) {
  const identity = loadIdentity(pki, name);
  const seen: { method: string; path: string; onBehalfOf: string | null }[] = [];
  const server = Bun.serve({
    port: 0, hostname: "127.0.0.1",
    tls: { cert: identity.cert, key: identity.key, ca: identity.ca, requestCert: true, rejectUnauthorized: true },
    fetch(request) {
      seen.push({ method: request.method, path: new URL(request.url).pathname, onBehalfOf: request.headers.get(ON_BEHALF_OF_HEADER) });
      return new URL(request.url).pathname === "/public_key" ? Response.json({ public_key: keys.publicPem }) : answer();
    },
  });
  servers.push(server);
  return { url: `https://127.0.0.1:${server.port}`, seen };
}
const servers: ReturnType<typeof Bun.serve>[] = [];

const NO_API_CA = { apiIdentities: new Map<string, string>(), apiCas: new Map<string, string>() };

function proxyHops(isRevoked?: (serialHex: string) => boolean) {
  const identity = loadIdentity(pki, "secureproxy");
  const hops = new ProxyHops(identity, (type) => apiTrust(type, identity.ca, NO_API_CA), isRevoked);
  hopsMade.push(hops);
  return hops;
}
const hopsMade: ProxyHops[] = [];

function proxy(keyserver = "https://127.0.0.1:1", lines: string[] = [], isRevoked?: (serialHex: string) => boolean) {
  const logger = createLogger("secureproxy", { format: "text", color: false, write: (l) => lines.push(l) });
  return createProxyApp({
    keyserver, allow, format: "jose", timeoutMs: 5000, logger,
    hops: proxyHops(isRevoked), authz: new Authorizer(policyPath(), logger),
  });
}

function requestApi(app: ReturnType<typeof proxy>, body: Record<string, string>, caller: string | null = CLIENT1) {
  const request = new Request("http://localhost/request_api", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  // What the listener does: the caller is the connection's verified certificate, never a header.
  return app.handle(caller === null ? request : bindPeer(request, { address: "127.0.0.1", identity: caller, serial: "01" }));
}

async function answerOf(response: Response) {
  return { status: response.status, body: await response.json() };
}

beforeAll(async () => {
  pki = await testPki();
  keys = await RsaKeyPair.loadOrCreate(join(mkdtempSync(join(tmpdir(), "securemesh-proxy-")), "rsa_key.pem"));
});

afterAll(() => {
  for (const server of servers) server.stop(true);
  for (const hops of hopsMade) hops.close();
});

test("ApiUri must be https, without credentials, on the token type's allowlist", () => {
  expect(checkApiUri("https://localhost:5005/api/item", "marketplace", allow).href).toBe("https://localhost:5005/api/item");
  const refused = [
    ["http://localhost:5005/api/item", "marketplace"],
    ["https://user:pw@localhost:5005/api/item", "marketplace"],
    ["https://localhost:5006/api/item", "marketplace"],
    ["https://LOCALHOST.:5005/api/item", "marketplace"],
    ["https://169.254.169.254/latest/meta-data/", "marketplace"],
    ["https://[::1]:5005/", "marketplace"],
    ["https://localhost:5005/api/item", "other"],
  ] as const;
  for (const [uri, type] of refused) expect(() => checkApiUri(uri, type, allow)).toThrow(Forbidden);
  expect(() => checkApiUri("not a url", "marketplace", allow)).toThrow("ApiUri is not a URL");
});

test("a disallowed ApiUri is refused before the KeyServer is asked", async () => {
  const keyserver = fakeKeyserver("keyserver");
  const app = proxy(keyserver.url);
  const response = await requestApi(app, { ClientId: "client1", TokenType: "marketplace", ApiUri: "https://evil.example/" });
  expect(await answerOf(response)).toEqual({ status: 403, body: { error: "ApiUri host evil.example:443 is not allowed for token type 'marketplace'", code: "ERR_FORBIDDEN" } });
  expect(keyserver.seen).toEqual([]);
  const metrics = await scrape(app);
  expect(metrics.value("securemesh_http_requests_total", { route: "/request_api", method: "POST", status: "403" })).toBe(1);
});

// #11 H1: with client2's certificate, or the coordinator's, {"ClientId":"client1"} got client1's marketplace item.
describe("the caller's identity decides which token it may use", () => {
  test.each([
    ["client2, asking for client1's token", CLIENT2, `${CLIENT2} lacks permission proxy.use:client1/marketplace`],
    ["the coordinator", COORDINATOR, `${COORDINATOR} lacks permission proxy.use:client1/marketplace`],
    ["a caller without an identity", "", "an unidentified caller lacks permission proxy.use:client1/marketplace"],
  ])("%s: 403 naming identity and permission, and the KeyServer is never asked", async (_label, caller, error) => {
    const keyserver = fakeKeyserver("keyserver");
    const lines: string[] = [];
    const response = await requestApi(proxy(keyserver.url, lines), { ClientId: "client1", TokenType: "marketplace", ApiUri: ITEM }, caller);
    expect(await answerOf(response)).toEqual({ status: 403, body: { error, code: "ERR_FORBIDDEN" } });
    expect(keyserver.seen).toEqual([]);
    expect(lines.filter((l) => l.startsWith("AUTHZ "))).toEqual([expect.stringMatching(/^AUTHZ deny identity=\S+ action=proxy\.use resource=client1\/marketplace /)]);
  });

  test("a client with the permission gets through, and the KeyServer is told on whose behalf", async () => {
    const keyserver = fakeKeyserver("keyserver");
    const response = await requestApi(proxy(keyserver.url), { ClientId: "client1", TokenType: "marketplace", ApiUri: ITEM });
    // The stand-in KeyServer has no token: its 404 comes back as the proxy's.
    expect(await answerOf(response)).toEqual({ status: 404, body: { error: "no token for that ClientId and TokenType", code: "ERR_NOT_FOUND" } });
    expect(keyserver.seen).toEqual([
      { method: "GET", path: "/public_key", onBehalfOf: null },
      { method: "POST", path: "/", onBehalfOf: CLIENT1 },
    ]);
  });

  test("a ClientId holding control characters is refused and logged escaped", async () => {
    const lines: string[] = [];
    const response = await requestApi(proxy(undefined, lines), { ClientId: "client1\nAUTHZ allow identity=x\u001b[2J", TokenType: "marketplace", ApiUri: ITEM });
    expect(response.status).toBe(400); // not a plain name: refused before the policy is even asked
    for (const line of lines) expect(line).not.toMatch(/[\n\u001b]/);
  });
});

// #11 Hardening: any certificate from the CA with the right address passed as the KeyServer.
test("a KeyServer address answered by another identity is refused before anything is sent", async () => {
  const impostor = fakeKeyserver("marketplace");
  const lines: string[] = [];
  const response = await requestApi(proxy(impostor.url, lines), { ClientId: "client1", TokenType: "marketplace", ApiUri: ITEM });
  const refusal = `refused the KeyServer at ${new URL(impostor.url).host}: reached spiffe://securemesh/marketplace/marketplace, expected spiffe://securemesh/keyserver/*`;
  expect(await answerOf(response)).toEqual({ status: 502, body: { error: refusal, code: "ERR_KEYSERVER_IDENTITY" } });
  expect(impostor.seen).toEqual([]);
  expect(lines).toContain(refusal);

  // The right identity, but its certificate is on the CRL, which the TLS stack itself does not read.
  const revoked = fakeKeyserver("keyserver");
  const serial = new X509Certificate(loadIdentity(pki, "keyserver").cert).serialNumber;
  const answer = await answerOf(await requestApi(proxy(revoked.url, [], (s) => s.toUpperCase() === serial.toUpperCase()), { ClientId: "client1", TokenType: "marketplace", ApiUri: ITEM }));
  expect(answer).toMatchObject({ status: 502, body: { code: "ERR_KEYSERVER_IDENTITY", error: expect.stringContaining("whose certificate is revoked") } });
  expect(revoked.seen).toEqual([]);
});

test("the KeyServer's answers mean the same at the proxy: 429 quota, 403, and 502 naming the code", async () => {
  const cases: [() => Response, number, Record<string, string>][] = [
    [() => Response.json({ error: `too many token requests from ${CLIENT1} in the replay window; retry later`, code: "ERR_REPLAY_QUOTA" }, { status: 429 }), 429,
      { error: `too many token requests from ${CLIENT1} in the replay window; retry later`, code: "ERR_REPLAY_QUOTA" }],
    [() => Response.json({ error: `${CLIENT1} lacks permission proxy.use:client1/marketplace`, code: "ERR_FORBIDDEN" }, { status: 403 }), 403,
      { error: `the KeyServer refused: ${CLIENT1} lacks permission proxy.use:client1/marketplace`, code: "ERR_FORBIDDEN" }],
    [() => Response.json({ error: "stored secret cannot be opened", code: "ERR_SEAL" }, { status: 500 }), 502,
      { error: "KeyServer refused the token request (500 ERR_SEAL)", code: "ERR_KEYSERVER" }],
  ];
  for (const [answer, status, body] of cases) {
    const keyserver = fakeKeyserver("keyserver", answer);
    expect(await answerOf(await requestApi(proxy(keyserver.url), { ClientId: "client1", TokenType: "marketplace", ApiUri: ITEM }))).toEqual({ status, body });
  }
});

test("M1: an API under the mesh's CA is pinned to one identity per token type, by default too; a foreign CA is not", () => {
  const ca = loadIdentity(pki, "secureproxy").ca;
  const foreign = loadIdentity(pki, "client1").cert; // any PEM certificate that is not the mesh's CA
  const pins = { apiIdentities: new Map([["weather", "spiffe://securemesh/marketplace/wx"]]), apiCas: new Map([["external", foreign], ["mixed", `${foreign}\n${ca}`]]) };
  expect(["marketplace", "weather", "external", "mixed"].map((type) => apiTrust(type, ca, pins))).toEqual([
    { ca, identity: "spiffe://securemesh/marketplace/marketplace" },
    { ca, identity: "spiffe://securemesh/marketplace/wx" },
    { ca: foreign, identity: null },
    // A bundle holding the mesh's CA is the mesh's trust: an identity is still pinned.
    { ca: `${foreign}\n${ca}`, identity: "spiffe://securemesh/marketplace/mixed" },
  ]);
});

test("F4: an --api-ca bundle with any block but CERTIFICATE is refused, so the mesh's CA cannot hide from the pin", () => {
  const ca = loadIdentity(pki, "secureproxy").ca;
  expect(certificateBundle(ca, "--api-ca ca.pem")).toBe(ca);
  const relabelled = ca.replace(/BEGIN CERTIFICATE/, "BEGIN X509 CERTIFICATE").replace(/END CERTIFICATE/, "END X509 CERTIFICATE");
  expect(() => certificateBundle(relabelled, "--api-ca ca.pem")).toThrow("--api-ca ca.pem: a PEM block labelled 'X509 CERTIFICATE': only CERTIFICATE blocks are accepted");
  expect(() => certificateBundle(ca.replaceAll("CERTIFICATE", "TRUSTED CERTIFICATE"), "--api-ca x")).toThrow("only CERTIFICATE blocks");
  expect(() => certificateBundle("", "--api-ca x")).toThrow("no CERTIFICATE block");
});
