// The runtime seam on both runtimes. On Bun, in this process; on Deno, in a Deno process started from here
// (runtime.deno-check.ts), attacked from this one with real certificates made by pki.sh.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { createHmac } from "node:crypto";
import tls from "node:tls";
import { join } from "node:path";
import { tlsPeerIdentity } from "../../authz/index.ts";
import { REPO_ROOT } from "../config.ts";
import { hasExtendedKeyUsage, extendedKeyUsages } from "../eku.ts";
import { loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions, CLIENT_AUTH_OID, SERVER_AUTH_OID, type Identity } from "../tls.ts";
import { issueIdentity, newPki, revocationPki, testPki } from "../../testing/pki.ts";
import { expectedHostChecks, OTHER_HOST, outboundHostChecks, SAN_HOST } from "../../testing/host-checks.ts";
import { listenReloadable, createApp } from "../http.ts";
import { createLogger } from "../../ops/log.ts";
import { runtime } from "./index.ts";
import { codeFromRuntimeCode, codeFromText } from "./network-errors.ts";
import { X509Certificate } from "node:crypto";
import { testedRuntimes } from "../../testing/unit-run.ts";

setDefaultTimeout(60_000);

describe("on Bun", () => {
  test("index.ts picks the Bun adapter, and its HMAC is HMAC-SHA256", () => {
    expect(runtime.name).toBe("bun");
    expect(runtime.hmacSha256(Buffer.from("k"), Buffer.from("data")).equals(createHmac("sha256", "k").update("data").digest())).toBe(true);
  });
});

test("the roles' outbound client checks the host against the certificate's SANs, whatever identity check a hop brings (#14)", async () => {
  const pki = await newPki("bun-hosts");
  await issueIdentity(pki, "elsewhere", "server", { sans: [`IP:${SAN_HOST}`] });
  const tls = mutualTlsServerOptions(loadIdentity(pki, "elsewhere"));
  const app = () => createApp({ logger: createLogger("t", { write: () => {} }) }).get("/who", () => "ok");
  const [sanHost, otherHost] = await Promise.all(
    [SAN_HOST, OTHER_HOST].map((hostname) => listenReloadable(app(), { port: 0, hostname, tls, identify: tlsPeerIdentity, isRevoked: () => false })),
  );
  try {
    const client = mutualTlsClientOptions(loadIdentity(pki, "coordinator"));
    expect(await outboundHostChecks(client, { sanHost: sanHost!.port, otherHost: otherHost!.port })).toEqual(expectedHostChecks);
  } finally {
    await Promise.all([sanHost!.stop(true), otherHost!.stop(true)]);
  }
});

test("error classification: Bun's codes and Deno's messages map to the same codes", () => {
  expect(
    ["ConnectionRefused", "ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "UNABLE_TO_VERIFY_LEAF_SIGNATURE", "ERR_TLS_CERT_ALTNAME_INVALID", "CERT_HAS_EXPIRED"].map(
      codeFromRuntimeCode,
    ),
  ).toEqual(["ECONNREFUSED", "ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "ERR_TLS_CERT", "ERR_TLS_HOSTNAME", "ERR_TLS_CERT"]);
  const deno = (reason: string) => codeFromText(`error sending request for url (https://127.0.0.1:5001/): client error (Connect): ${reason}`);
  expect([
    deno("tcp connect error: Connection refused (os error 111)"),
    deno("Connection reset by peer (os error 104)"),
    deno("dns error: failed to lookup address information: Name or service not known"),
    deno("invalid peer certificate: UnknownIssuer"),
    deno('invalid peer certificate: certificate not valid for name "127.0.0.3"; certificate is only valid for IpAddress(127.0.0.2)'),
    deno("received fatal alert: CertificateRequired"),
  ]).toEqual(["ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "ERR_TLS_CERT", "ERR_TLS_HOSTNAME", "EPROTO"]);
});

test("the EKU is read from the certificate's DER", async () => {
  const pki = await testPki();
  const der = (name: string) => new Uint8Array(new X509Certificate(loadIdentity(pki, name).cert).raw);
  expect(extendedKeyUsages(der("client1"))).toEqual([CLIENT_AUTH_OID]);
  expect(extendedKeyUsages(der("server"))).toEqual([SERVER_AUTH_OID]);
  expect(extendedKeyUsages(der("coordinator")).sort()).toEqual([CLIENT_AUTH_OID, SERVER_AUTH_OID].sort());
  expect(hasExtendedKeyUsage({ raw: der("server") }, CLIENT_AUTH_OID)).toBe(false);
  expect(hasExtendedKeyUsage({ raw: new Uint8Array([0x30, 0x01]) }, CLIENT_AUTH_OID)).toBe(false); // bad DER proves nothing
});

describe.skipIf(!testedRuntimes().includes("deno"))("on Deno (a real Deno process, real certificates)", () => {
  let dir: string;
  let deno: ReturnType<typeof Bun.spawn<"pipe", "pipe", "pipe">>;
  let ports: { live: number };
  let outbound: Record<string, Record<string, unknown> | boolean | string>;
  let ids: Record<"client1" | "x" | "server", Identity>;

  beforeAll(async () => {
    ({ dir } = await revocationPki("deno-runtime")); // client x is revoked
    await issueIdentity(dir, "elsewhere", "server", { sans: [`IP:${SAN_HOST}`] });
    const other = await testPki("other");
    ids = { client1: loadIdentity(dir, "client1"), x: loadIdentity(dir, "x"), server: loadIdentity(dir, "server") };
    deno = Bun.spawn([join(REPO_ROOT, "node_modules", ".bin", "deno"), "run", "-A", join(import.meta.dir, "runtime.deno-check.ts")], {
      env: { ...process.env, PKI_DIR: dir, OTHER_PKI_DIR: other, NO_COLOR: "1" },
      stdin: "pipe",
      stdout: "pipe",
      stderr: "pipe",
    });
    const reader = deno.stdout.getReader();
    let line = "";
    while (!line.includes("\n")) {
      const { done, value } = await reader.read();
      if (done) throw new Error(`the Deno check exited: ${await new Response(deno.stderr).text()}`);
      line += new TextDecoder().decode(value);
    }
    const started = JSON.parse(line) as { live: number; outbound: typeof outbound };
    ports = started;
    outbound = started.outbound;
  });

  afterAll(async () => {
    deno?.stdin.end();
    await deno?.exited;
  });

  const as = (identity: Identity | null) => ({ ca: ids.client1.ca, rejectUnauthorized: true, ...(identity ? { cert: identity.cert, key: identity.key } : {}) });
  const get = (port: number, identity: Identity | null, init: RequestInit = {}) =>
    fetch(`https://127.0.0.1:${port}/who`, { ...init, tls: as(identity), keepalive: false });
  const listeners = () => [["a role's listener", ports.live]] as const;

  test("index.ts picks the Deno adapter there, and its HMAC is HMAC-SHA256", () => {
    expect(outbound.runtime).toBe("deno");
    expect(outbound.hmacMatches).toBe(true);
  });

  test("a client certificate is accepted", async () => {
    for (const [, port] of listeners()) expect((await get(port, ids.client1)).status).toBe(200);
    // The SPIFFE ID, from the verified certificate, bound to the request by the listener.
    expect(await (await get(ports.live, ids.client1)).json()).toEqual({ peer: "spiffe://securemesh/client/client1" });
  });

  test("connections are kept alive: 500 requests in a row, none failed (node:tls + node:http on Deno lost 31%)", async () => {
    for (const [name, port] of listeners()) {
      let failed = 0;
      for (let i = 0; i < 250; i++)
        await get(port, ids.client1, { keepalive: true }).then(
          (r) => r.arrayBuffer(),
          () => failed++,
        );
      expect({ name, failed }).toEqual({ name, failed: 0 });
    }
  });

  test("no certificate is refused", async () => {
    for (const [name, port] of listeners())
      expect({
        name,
        outcome: await get(port, null).then(
          (r) => r.status,
          () => "refused",
        ),
      }).toEqual({ name, outcome: "refused" });
  });

  test("a revoked certificate is refused and told so (Deno's TLS ignores the CRL: checked at the handshake and per request)", async () => {
    for (const [name, port] of listeners()) {
      const outcome = await get(port, ids.x).then(
        async (r) => [r.status, ((await r.json()) as { code: string }).code],
        () => "refused",
      );
      expect({ name, outcome }).toEqual({ name, outcome: [403, "ERR_REVOKED"] });
    }
  });

  test("a certificate of ours without the clientAuth EKU is refused and told so (rustls alone ended the handshake)", async () => {
    for (const [name, port] of listeners()) {
      const outcome = await get(port, ids.server).then(
        async (r) => [r.status, ((await r.json()) as { code: string }).code],
        () => "refused",
      );
      expect({ name, outcome }).toEqual({ name, outcome: [403, "ERR_CLIENT_CERT"] });
    }
  });

  test("a body over 64 KiB gets 413 JSON, chunked or not", async () => {
    for (const [name, port] of listeners()) {
      for (const body of [new Uint8Array(70 * 1024), new Blob([new Uint8Array(300 * 1024)]).stream()]) {
        const response = await fetch(`https://127.0.0.1:${port}/echo`, { method: "POST", body, tls: as(ids.client1) } as RequestInit);
        expect({ name, status: response.status, body: await response.json() }).toMatchObject({ name, status: 413, body: { code: "ERR_BODY_TOO_LARGE" } });
      }
      const small = await fetch(`https://127.0.0.1:${port}/echo`, { method: "POST", body: new Uint8Array(1000), tls: as(ids.client1) });
      expect(await small.json()).toEqual({ bytes: 1000 });
    }
  });

  test("a slow header dribble is cut off at the header deadline (10 s)", async () => {
    for (const [name, port, deadline] of [["live", ports.live, 10_000]] as const) {
      const socket = tls.connect({ port, host: "127.0.0.1", ...as(ids.client1), checkServerIdentity: () => undefined });
      socket.on("error", () => {});
      await new Promise((resolve) => socket.once("secureConnect", resolve));
      const started = performance.now();
      const head = "GET /who HTTP/1.1\r\nHost: x\r\nX-Slow: " + "a".repeat(200);
      let i = 0;
      const dribble = setInterval(() => socket.writable && socket.write(head[i++ % head.length]!), 300);
      await new Promise((resolve) => socket.once("close", resolve));
      clearInterval(dribble);
      const elapsed = performance.now() - started;
      expect({ name, cutOff: elapsed < deadline + 2000 && elapsed > deadline / 2 }).toEqual({ name, cutOff: true });
    }
  });

  test("outbound: the HttpsClient refuses a wrong server identity before anything is sent, and keeps one checked connection alive", () => {
    expect(outbound.rightIdentity).toEqual({ status: 200, body: { peer: "spiffe://securemesh/coordinator/coordinator" } });
    expect(outbound.postWithIdentity).toEqual({ status: 200, body: { bytes: 5 } });
    expect(outbound.wrongIdentity).toMatchObject({
      code: "ERR_UNEXPECTED_PEER",
      message: "reached spiffe://securemesh/server/server, expected spiffe://securemesh/keyserver/*",
    });
    expect(outbound.keptAlive).toEqual({ open: 1, idle: 1 });
  });

  test("outbound: the host is checked against the certificate's SANs, whatever identity check a hop brings (#14)", () => {
    expect(outbound.hostChecks).toEqual(expectedHostChecks);
  });

  test("outbound: the client certificate and CA are honoured, and errors get the same codes as Bun's", () => {
    expect(outbound.refused).toMatchObject({ error: "NetworkError", code: "ECONNREFUSED" });
    expect(outbound.untrusted).toMatchObject({ error: "NetworkError", code: "ERR_TLS_CERT" });
  });
});
