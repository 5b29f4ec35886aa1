import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { mkdtempSync } from "node:fs";
import tls from "node:tls";
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
import { Metrics } from "../shared/ops/metrics.ts";
import { ON_BEHALF_OF_HEADER, openJoseRequest, RsaKeyPair } from "../shared/token-path/token-exchange.ts";
import { apiTrust, checkApiUri, createProxyApp, parseAllowlist, parseKeyservers, parseProxyConfig, ProxyHops } from "./secureproxy.ts";
import { certificateBundle } from "../shared/token-path/proxy-hops.ts";

const allow = parseAllowlist(["marketplace=localhost:5005,127.0.0.1:5005"]);
const CLIENT1 = "spiffe://securemesh/client/client1";
const CLIENT2 = "spiffe://securemesh/client/client2";
const COORDINATOR = "spiffe://securemesh/coordinator/coordinator";
const ITEM = "https://localhost:5005/api/item";

let pki: string;
let keys: RsaKeyPair;

/** A stand-in KeyServer serving with `name`'s certificate; it records what the proxy sends and answers `answer`. */
function fakeKeyserver(
  name: string,
  answer: () => Response = () => Response.json({ error: "no token for that clientId and tokenType", code: "ERR_NOT_FOUND" }, { status: 404 }),
  own = keys,
) {
  const identity = loadIdentity(pki, name);
  const seen: { method: string; path: string; onBehalfOf: string | null }[] = [];
  const bodies: string[] = [];
  const server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    tls: { cert: identity.cert, key: identity.key, ca: identity.ca, requestCert: true, rejectUnauthorized: true },
    async fetch(request) {
      seen.push({ method: request.method, path: new URL(request.url).pathname, onBehalfOf: request.headers.get(ON_BEHALF_OF_HEADER) });
      if (request.method === "POST") bodies.push(await request.text());
      return new URL(request.url).pathname === "/public_key" ? Response.json({ public_key: own.publicPem }) : answer();
    },
  });
  servers.push(server);
  return { url: `https://127.0.0.1:${server.port}`, seen, bodies };
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

function proxy(keyserver: string | string[] = "https://127.0.0.1:1", lines: string[] = [], isRevoked?: (serialHex: string) => boolean, metrics?: Metrics) {
  const logger = createLogger("secureproxy", { format: "text", color: false, write: (l) => lines.push(l) });
  return createProxyApp({
    keyservers: typeof keyserver === "string" ? [keyserver] : keyserver,
    allow,
    metrics,
    format: "jose",
    timeoutMs: 5000,
    logger,
    hops: proxyHops(isRevoked),
    authz: new Authorizer(policyPath(), logger),
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
  expect(await answerOf(response)).toEqual({
    status: 403,
    body: { error: "ApiUri host evil.example:443 is not allowed for token type 'marketplace'", code: "ERR_FORBIDDEN" },
  });
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
    expect(lines.filter((l) => l.startsWith("AUTHZ "))).toEqual([
      expect.stringMatching(/^AUTHZ deny identity=\S+ action=proxy\.use resource=client1\/marketplace /),
    ]);
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
    const response = await requestApi(proxy(undefined, lines), {
      ClientId: "client1\nAUTHZ allow identity=x\u001b[2J",
      TokenType: "marketplace",
      ApiUri: ITEM,
    });
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
  const answer = await answerOf(
    await requestApi(
      proxy(revoked.url, [], (s) => s.toUpperCase() === serial.toUpperCase()),
      { ClientId: "client1", TokenType: "marketplace", ApiUri: ITEM },
    ),
  );
  expect(answer).toMatchObject({ status: 502, body: { code: "ERR_KEYSERVER_IDENTITY", error: expect.stringContaining("whose certificate is revoked") } });
  expect(revoked.seen).toEqual([]);
});

test("the KeyServer's answers mean the same at the proxy: 429 quota, 403, and 502 naming the code", async () => {
  const cases: [() => Response, number, Record<string, string>][] = [
    [
      () => Response.json({ error: `too many token requests from ${CLIENT1} in the replay window; retry later`, code: "ERR_REPLAY_QUOTA" }, { status: 429 }),
      429,
      { error: `too many token requests from ${CLIENT1} in the replay window; retry later`, code: "ERR_REPLAY_QUOTA" },
    ],
    [
      () => Response.json({ error: `${CLIENT1} lacks permission proxy.use:client1/marketplace`, code: "ERR_FORBIDDEN" }, { status: 403 }),
      403,
      { error: `the KeyServer refused: ${CLIENT1} lacks permission proxy.use:client1/marketplace`, code: "ERR_FORBIDDEN" },
    ],
    [
      () => Response.json({ error: "stored secret cannot be opened", code: "ERR_SEAL" }, { status: 500 }),
      502,
      { error: "KeyServer refused the token request (500 ERR_SEAL)", code: "ERR_KEYSERVER" },
    ],
  ];
  for (const [answer, status, body] of cases) {
    const keyserver = fakeKeyserver("keyserver", answer);
    expect(await answerOf(await requestApi(proxy(keyserver.url), { ClientId: "client1", TokenType: "marketplace", ApiUri: ITEM }))).toEqual({ status, body });
  }
});

test("M1: an API under the mesh's CA is pinned to one identity per token type, by default too; a foreign CA is not", () => {
  const ca = loadIdentity(pki, "secureproxy").ca;
  const foreign = loadIdentity(pki, "client1").cert; // any PEM certificate that is not the mesh's CA
  const pins = {
    apiIdentities: new Map([["weather", "spiffe://securemesh/marketplace/wx"]]),
    apiCas: new Map([
      ["external", foreign],
      ["mixed", `${foreign}\n${ca}`],
    ]),
  };
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
  expect(() => certificateBundle(relabelled, "--api-ca ca.pem")).toThrow(
    "--api-ca ca.pem: a PEM block labelled 'X509 CERTIFICATE': only CERTIFICATE blocks are accepted",
  );
  expect(() => certificateBundle(ca.replaceAll("CERTIFICATE", "TRUSTED CERTIFICATE"), "--api-ca x")).toThrow("only CERTIFICATE blocks");
  expect(() => certificateBundle("", "--api-ca x")).toThrow("no CERTIFICATE block");
});

/**
 * A KeyServer that reads a token request to its end and then drops the connection without answering: the request
 * may have been acted on, and the proxy cannot know (a host that dies mid-request).
 */
function droppingKeyserver(own: RsaKeyPair) {
  const identity = loadIdentity(pki, "keyserver");
  const bodies: string[] = [];
  const server = tls.createServer({ cert: identity.cert, key: identity.key, ca: identity.ca, requestCert: true, rejectUnauthorized: true }, (socket) => {
    let buffer = Buffer.alloc(0);
    socket.on("data", (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      const end = buffer.indexOf("\r\n\r\n");
      if (end === -1) return;
      const head = buffer.subarray(0, end).toString("latin1");
      const length = Number(/content-length: (\d+)/i.exec(head)?.[1] ?? 0);
      if (buffer.length < end + 4 + length) return;
      const body = buffer.subarray(end + 4, end + 4 + length).toString("utf8");
      buffer = buffer.subarray(end + 4 + length);
      if (head.startsWith("GET /public_key ")) {
        const json = JSON.stringify({ public_key: own.publicPem });
        socket.write(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(json)}\r\n\r\n${json}`);
      } else {
        bodies.push(body);
        socket.destroy();
      }
    });
    socket.on("error", () => {});
  });
  tlsServers.push(server);
  return new Promise<{ url: string; bodies: string[] }>((resolve) =>
    server.listen(0, "127.0.0.1", () => resolve({ url: `https://127.0.0.1:${(server.address() as { port: number }).port}`, bodies })),
  );
}
const tlsServers: tls.Server[] = [];
afterAll(() => {
  for (const server of tlsServers) server.close();
});

const NOT_FOUND = { status: 404, body: { error: "no token for that ClientId and TokenType", code: "ERR_NOT_FOUND" } };
const CALL = { ClientId: "client1", TokenType: "marketplace", ApiUri: ITEM };

// Issue 23: one KeyServer was a single point of failure of the token path.
describe("several KeyServers", () => {
  test("one that cannot be reached costs one attempt: the next is asked, and the dead one is tried last for a while", async () => {
    const second = fakeKeyserver("keyserver");
    const metrics = new Metrics();
    const lines: string[] = [];
    const app = proxy(["https://127.0.0.1:1", second.url], lines, undefined, metrics);
    expect(await answerOf(await requestApi(app, CALL))).toEqual(NOT_FOUND);
    expect(await answerOf(await requestApi(app, CALL))).toEqual(NOT_FOUND);
    expect(second.seen.filter((s) => s.method === "POST")).toHaveLength(2);
    expect((await scrape(app)).value("securemesh_keyserver_failovers_total", { reason: "unavailable" })).toBe(1);
    expect(lines.filter((l) => l.includes("a new request goes to the next"))).toEqual([
      expect.stringMatching(/^KeyServer 127\.0\.0\.1:1 failed \(KeyServer 127\.0\.0\.1:1 unavailable \(/),
    ]);
    const health = (await (await app.handle(new Request("http://localhost/health"))).json()) as { keyservers: unknown };
    expect(health.keyservers).toEqual([
      { url: "https://127.0.0.1:1", failedRecently: true },
      { url: second.url, failedRecently: false },
    ]);
  });

  test("one that may have received the request is never sent that body again: the next gets a new request, sealed to its own key", async () => {
    const keysB = await RsaKeyPair.loadOrCreate(join(mkdtempSync(join(tmpdir(), "securemesh-proxy-")), "rsa_key.pem"));
    const dropping = await droppingKeyserver(keys);
    const second = fakeKeyserver("keyserver", undefined, keysB);
    expect(await answerOf(await requestApi(proxy([dropping.url, second.url]), CALL))).toEqual(NOT_FOUND);
    expect([dropping.bodies.length, second.bodies.length]).toEqual([1, 1]);
    // The body the first may have acted on opens only with the first's key; the second's has a nonce of its own.
    const [atFirst, atSecond] = [await openJoseRequest(keys, dropping.bodies[0]!), await openJoseRequest(keysB, second.bodies[0]!)];
    await expect(openJoseRequest(keysB, dropping.bodies[0]!)).rejects.toThrow("request could not be decrypted");
    expect(atFirst.nonce).not.toBe(atSecond.nonce);
    expect([atFirst.clientId, atSecond.clientId]).toEqual(["client1", "client1"]);
  });

  test("a 5xx is failed over; 403, 404 and 429 are the caller's answer at every KeyServer, and the next is not asked", async () => {
    const unavailable = fakeKeyserver("keyserver", () => Response.json({ error: "token store unavailable", code: "ERR_UNAVAILABLE" }, { status: 503 }));
    const sealBroken = fakeKeyserver("keyserver", () => Response.json({ error: "stored secret cannot be opened", code: "ERR_SEAL" }, { status: 500 }));
    const last = fakeKeyserver("keyserver");
    expect(await answerOf(await requestApi(proxy([unavailable.url, sealBroken.url, last.url]), CALL))).toEqual(NOT_FOUND);
    expect([unavailable.bodies.length, sealBroken.bodies.length, last.bodies.length]).toEqual([1, 1, 1]);

    for (const [status, code] of [
      [404, "ERR_NOT_FOUND"],
      [403, "ERR_FORBIDDEN"],
      [429, "ERR_REPLAY_QUOTA"],
    ] as const) {
      const first = fakeKeyserver("keyserver", () => Response.json({ error: "no", code }, { status }));
      const next = fakeKeyserver("keyserver");
      expect((await requestApi(proxy([first.url, next.url]), CALL)).status).toBe(status);
      expect(next.seen).toEqual([]);
    }
  });

  test("every KeyServer failing is a 503 naming the last failure", async () => {
    const answer = await answerOf(await requestApi(proxy(["https://127.0.0.1:1", "https://127.0.0.1:2"]), CALL));
    expect(answer).toMatchObject({
      status: 503,
      body: { code: "ERR_UNAVAILABLE", error: expect.stringMatching(/^no KeyServer could release the token \(last: KeyServer 127\.0\.0\.1:2 unavailable \(/) },
    });
  });

  test("--keyserver takes a comma-separated list of https://HOST:PORT", () => {
    expect(parseKeyservers("https://10.0.0.7:5003, https://10.0.0.8:5003/")).toEqual(["https://10.0.0.7:5003", "https://10.0.0.8:5003"]);
    expect(parseProxyConfig(["--keyserver", "https://a.example:5003,https://b.example:5003"]).keyservers).toEqual([
      "https://a.example:5003",
      "https://b.example:5003",
    ]);
    expect(() => parseKeyservers("http://10.0.0.7:5003")).toThrow(
      "--keyserver 'http://10.0.0.7:5003' must be https://HOST:PORT, without a path, query or credentials",
    );
    expect(() => parseKeyservers("https://10.0.0.7:5003/keys")).toThrow("without a path");
    expect(() => parseKeyservers(" , ")).toThrow("--keyserver needs at least one URL");
  });
});
