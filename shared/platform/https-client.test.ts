// The verified HTTPS client against real TLS servers with certificates from pki.sh: whom each connection reached is
// checked once, at its handshake, and a peer that fails the check receives nothing (issue 18, H1).
import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { cleanupAfterEach } from "../testing/cleanups.ts";
import net from "node:net";
import tls from "node:tls";
import { expectPeer } from "../authz/expect-peer.ts";
import { issueIdentity, newPki, testPki } from "../testing/pki.ts";
import { HttpsClient, parseAnswer } from "./https-client.ts";
import { loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions } from "./tls.ts";

setDefaultTimeout(30_000);

const cleanups = cleanupAfterEach();

/** A Bun.serve server with mutual TLS that answers with the client's source port, so connections can be counted. */
function portEcho(pki: string, name = "server"): string {
  const server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    tls: mutualTlsServerOptions(loadIdentity(pki, name)),
    fetch: (request, srv) => new Response(String(srv.requestIP(request)?.port)),
  });
  cleanups.push(() => server.stop(true));
  return `https://127.0.0.1:${server.port}`;
}

/** A raw TLS server under `name`'s certificate, recording every byte it receives after its handshakes. */
async function recorder(pki: string, name: string, answer?: (socket: tls.TLSSocket, data: Buffer, count: number) => void) {
  const seen = { handshakes: 0, bytes: 0 };
  const server = tls.createServer({ ...mutualTlsServerOptions(loadIdentity(pki, name)) }, (socket) => {
    seen.handshakes += 1;
    let count = 0;
    socket.on("data", (data: Buffer) => {
      seen.bytes += data.length;
      answer?.(socket, data, ++count);
    });
    socket.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  cleanups.push(() => new Promise((resolve) => server.close(resolve)));
  return { url: `https://127.0.0.1:${(server.address() as net.AddressInfo).port}`, seen };
}

const OK = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

async function client(
  pki: string,
  expected = "spiffe://securemesh/server/*",
  extra: { isRevoked?: (s: string) => boolean; maxConnectionsPerOrigin?: number } = {},
) {
  let checks = 0;
  const check = expectPeer(expected, { isRevoked: extra.isRevoked });
  const c = new HttpsClient({
    tls: { ...mutualTlsClientOptions(loadIdentity(pki, "coordinator")), checkServerIdentity: (host, cert) => (checks++, check(host, cert)) },
    ...extra,
  });
  cleanups.push(() => c.close());
  return { client: c, checks: () => checks };
}

describe("HttpsClient", () => {
  test("keeps one verified connection alive: the identity check runs once, not per request", async () => {
    const pki = await testPki();
    const url = portEcho(pki);
    const { client: c, checks } = await client(pki);
    const ports = new Set<string>();
    for (let i = 0; i < 20; i++) {
      const answer = await c.request(`${url}/`, { timeoutMs: 5000 });
      expect(answer.status).toBe(200);
      ports.add(answer.text());
    }
    expect({ connections: ports.size, checks: checks() }).toEqual({ connections: 1, checks: 1 });
  });

  test("an impostor holding another valid certificate of the CA gets a handshake and not one byte of the request", async () => {
    const pki = await testPki();
    const impostor = await recorder(pki, "keyserver", (socket) => socket.write(OK));
    const { client: c } = await client(pki);
    for (let i = 0; i < 3; i++) {
      await expect(c.request(`${impostor.url}/api/data`, { method: "POST", body: "secret", timeoutMs: 5000 })).rejects.toMatchObject({
        code: "ERR_UNEXPECTED_PEER",
      });
    }
    // A raw TLS server reading the connection: the handshake completed, and nothing came after it.
    expect(impostor.seen).toEqual({ handshakes: impostor.seen.handshakes, bytes: 0 });
  });

  test("a certificate for another host is refused before anything is sent, with the hostname code", async () => {
    const pki = await newPki("https-client-hosts");
    await issueIdentity(pki, "elsewhere", "server", { sans: ["IP:127.0.0.9"] });
    const impostor = await recorder(pki, "elsewhere", (socket) => socket.write(OK));
    const { client: c } = await client(pki);
    await expect(c.request(`${impostor.url}/`, { timeoutMs: 5000 })).rejects.toMatchObject({ code: "ERR_TLS_HOSTNAME" });
    expect(impostor.seen.bytes).toBe(0);
  });

  test("a peer revoked after its handshake is not used again, and a new handshake refuses it", async () => {
    const pki = await testPki();
    const url = portEcho(pki);
    let revoked = false;
    const { client: c } = await client(pki, "spiffe://securemesh/server/*", { isRevoked: () => revoked });
    expect((await c.request(`${url}/`, { timeoutMs: 5000 })).status).toBe(200);
    revoked = true;
    await expect(c.request(`${url}/`, { timeoutMs: 5000 })).rejects.toMatchObject({ code: "ERR_UNEXPECTED_PEER" });
    expect(c.connections()[new URL(url).host]).toEqual({ open: 0, idle: 0 });
  });

  test("nothing listening is never reached (ECONNREFUSED); silence is a TimeoutError", async () => {
    const pki = await testPki();
    const { client: c } = await client(pki);
    const closed = net.createServer();
    await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", resolve));
    const port = (closed.address() as net.AddressInfo).port;
    await new Promise((resolve) => closed.close(resolve));
    await expect(c.request(`https://127.0.0.1:${port}/`, { timeoutMs: 5000 })).rejects.toMatchObject({ name: "NetworkError", code: "ECONNREFUSED" });
    const silent = await recorder(pki, "server");
    const started = performance.now();
    await expect(c.request(`${silent.url}/`, { timeoutMs: 300 })).rejects.toMatchObject({ name: "TimeoutError" });
    expect(performance.now() - started).toBeGreaterThanOrEqual(290);
  });

  test("a kept-alive connection the peer closed without answering: retried once when idempotent, ECONNRESET otherwise", async () => {
    const pki = await testPki();
    // Answers the first request on each connection and closes at the second, as a server at its idle timeout would.
    const flaky = await recorder(pki, "server", (socket, _data, count) => (count === 1 ? socket.write(OK) : socket.destroy()));
    const { client: c } = await client(pki);
    expect((await c.request(`${flaky.url}/`, { timeoutMs: 5000 })).text()).toBe("ok");
    expect((await c.request(`${flaky.url}/`, { timeoutMs: 5000, idempotent: true })).text()).toBe("ok");
    await expect(c.request(`${flaky.url}/`, { method: "POST", body: "x", timeoutMs: 5000 })).rejects.toMatchObject({ code: "ECONNRESET" });
  });

  test("at its cap an origin's requests wait for a connection to come free", async () => {
    const pki = await testPki();
    const url = portEcho(pki);
    const { client: c } = await client(pki, "spiffe://securemesh/server/*", { maxConnectionsPerOrigin: 1 });
    const answers = await Promise.all(Array.from({ length: 8 }, () => c.request(`${url}/`, { timeoutMs: 5000 })));
    expect(new Set(answers.map((a) => a.text())).size).toBe(1);
  });

  test("a header that would split the request is refused before anything is sent", async () => {
    const pki = await testPki();
    const impostor = await recorder(pki, "server", (socket) => socket.write(OK));
    const { client: c } = await client(pki);
    await expect(c.request(`${impostor.url}/`, { headers: { "x-a": "1\r\nx-b: 2" }, timeoutMs: 5000 })).rejects.toThrow(/cannot be sent/);
    expect(impostor.seen.bytes).toBe(0);
  });
});

describe("parseAnswer", () => {
  const parse = (text: string, headOnly = false) => parseAnswer(Buffer.from(text, "latin1"), headOnly);
  const body = (answer: ReturnType<typeof parse>) => (answer && typeof answer !== "string" ? Buffer.from(answer.body).toString() : answer);

  test("frames by Content-Length and by chunks, skips 1xx, and knows bodiless answers", () => {
    expect(body(parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"))).toBe("hello");
    expect(parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel")).toBeNull();
    expect(body(parse("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\ntrailer: t\r\n\r\n"))).toBe("hello");
    expect(parse("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n")).toBeNull();
    expect(body(parse("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"))).toBe("ok");
    expect(body(parse("HTTP/1.1 204 No Content\r\n\r\n"))).toBe("");
    expect(body(parse("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true))).toBe("");
  });

  test("keeps a connection only when HTTP/1.1 says nothing against it, and counts bytes left over", () => {
    const closing = parse("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    const extra = parse("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200");
    const old = parse("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
    expect([closing, extra, old].map((a) => (a && typeof a !== "string" ? [a.keepAlive, a.rest] : a))).toEqual([
      [false, 0],
      [true, 12],
      [false, 0],
    ]);
  });

  test("refuses framing that could smuggle or hang", () => {
    expect(parse("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n")).toBe("both Content-Length and Transfer-Encoding");
    expect(parse("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")).toBe("a bad Content-Length");
    expect(parse("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n")).toBe("a Transfer-Encoding other than chunked");
    expect(parse("HTTP/1.1 200 OK\r\n\r\nuntil close")).toBe("an answer without Content-Length or chunked framing");
    expect(parse("HTTP/1.1 200 OK\r\nbad header\r\ncontent-length: 0\r\n\r\n")).toBe("a header line without a name");
    expect(parse("SSH-2.0-OpenSSH\r\n\r\n")).toBe("not an HTTP/1.x status line");
    expect(parse("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")).toBe("a bad chunk size");
  });

  test("a hostile peer cannot make every read re-parse its answer: interim answers are capped, chunks are read once (issue 18, F2)", () => {
    const interim = "HTTP/1.1 100 Continue\r\n\r\n";
    expect(body(parse(`${interim.repeat(8)}HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok`))).toBe("ok");
    expect(parse(`${interim.repeat(9)}HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok`)).toBe("too many interim (1xx) answers");
    // Fed as it arrives, one byte more each read, with one cursor: the body is whole, and each chunk was taken once.
    const text = `HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n${Array.from({ length: 50 }, (_, i) => `2\r\n${String(i).padStart(2, "0")}\r\n`).join("")}0\r\n\r\n`;
    const whole = Buffer.from(text, "latin1");
    const cursor = { bodyStart: -1, pos: 0, parts: [] as Uint8Array[] };
    let answer: ReturnType<typeof parseAnswer> = null;
    let partsSeen = 0;
    for (let n = 1; n <= whole.length && answer === null; n++) {
      answer = parseAnswer(whole.subarray(0, n), false, cursor);
      expect(cursor.parts.length).toBeGreaterThanOrEqual(partsSeen); // never starts over
      partsSeen = cursor.parts.length;
    }
    expect(body(answer)).toBe(Array.from({ length: 50 }, (_, i) => String(i).padStart(2, "0")).join(""));
    expect(partsSeen).toBe(50);
  });
});
