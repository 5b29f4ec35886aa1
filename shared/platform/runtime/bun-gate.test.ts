// The Bun TLS gate (every mutual-TLS listener on Bun) against real clients with certificates from pki.sh: whom each
// request came from, revocation on every request and route, per-identity caps, and nothing past it without TLS
// (issue 18: H1, L1, L2).
import { beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { cleanupAfterEach } from "../../testing/cleanups.ts";
import { X509Certificate } from "node:crypto";
import net from "node:net";
import tls from "node:tls";
import { tlsPeerIdentity } from "../../authz/expect-peer.ts";
import { createLogger } from "../../ops/log.ts";
import { Metrics } from "../../ops/metrics.ts";
import { revocationPki, testPki } from "../../testing/pki.ts";
import { createApp, listenReloadable, peerOf } from "../http.ts";
import { loadIdentity, mutualTlsServerOptions, type Identity } from "../tls.ts";

setDefaultTimeout(30_000);

let pki: string;
beforeAll(async () => {
  pki = await testPki();
});

const cleanups = cleanupAfterEach();

/** The app every test serves: who called (as the listener bound it), and a large answer on demand. */
function echoApp(lines: string[] = []) {
  return createApp({ logger: createLogger("gate", { format: "text", color: false, write: (l) => lines.push(l) }), metrics: new Metrics() })
    .get("/health", () => ({ status: "ok" }))
    .get("/who", ({ request }) => peerOf(request) ?? null)
    .get("/big", () => "x".repeat(5 * 1024 * 1024))
    .post("/echo", ({ body }) => ({ length: String(body).length }));
}

async function gate(options: { isRevoked?: (serial: string) => boolean; connectionLimit?: (id: string) => number; lines?: string[]; dir?: string } = {}) {
  const listener = await listenReloadable(echoApp(options.lines), {
    port: 0,
    hostname: "127.0.0.1",
    tls: mutualTlsServerOptions(loadIdentity(options.dir ?? pki, "server")),
    identify: tlsPeerIdentity,
    isRevoked: options.isRevoked ?? (() => false),
    connectionLimit: options.connectionLimit,
  });
  cleanups.push(() => listener.stop(true));
  return listener;
}

/** A mutual-TLS socket, open once the handshake is done. */
function connect(port: number, identity: Identity): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: "127.0.0.1", port, cert: identity.cert, key: identity.key, ca: identity.ca, checkServerIdentity: () => undefined }, () =>
      resolve(socket),
    );
    socket.once("error", reject);
    cleanups.push(() => socket.destroy());
  });
}

/** One HTTP/1.1 exchange on an open socket: the status and body of a Content-Length answer. */
function exchange(socket: net.Socket, request: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    let data = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      data = Buffer.concat([data, chunk]);
      const end = data.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = data.subarray(0, end).toString();
      const length = Number(/content-length: *(\d+)/i.exec(head)?.[1] ?? 0);
      if (data.length < end + 4 + length) return;
      socket.off("data", onData);
      socket.off("close", onClose);
      resolve({ status: Number(head.split(" ")[1]), body: data.subarray(end + 4, end + 4 + length).toString() });
    };
    const onClose = () => reject(new Error(`closed before a whole answer: ${JSON.stringify(data.toString().slice(0, 200))}`));
    socket.on("data", onData);
    socket.once("close", onClose);
    socket.write(request);
  });
}

const GET = (path: string) => `GET ${path} HTTP/1.1\r\nHost: localhost\r\n\r\n`;
const closed = (socket: net.Socket) => new Promise<void>((resolve) => (socket.destroyed ? resolve() : socket.once("close", () => resolve())));

/** Whether a handshake with `identity` ends in a usable connection (an answer to /health). */
async function reachable(port: number, identity: Identity): Promise<boolean> {
  try {
    const socket = await connect(port, identity);
    return (await exchange(socket, GET("/health"))).status === 200;
  } catch {
    return false;
  }
}

describe("the app learns who called from the connection", () => {
  test("each request carries the verified SPIFFE ID, serial and address; no header can claim another", async () => {
    const listener = await gate();
    const client1 = loadIdentity(pki, "client1");
    const socket = await connect(listener.port, client1);
    const answer = await exchange(socket, "GET /who HTTP/1.1\r\nHost: localhost\r\nx-securemesh-peer: spiffe://securemesh/coordinator/coordinator\r\n\r\n");
    expect(JSON.parse(answer.body)).toEqual({
      address: "127.0.0.1",
      identity: "spiffe://securemesh/client/client1",
      serial: new X509Certificate(client1.cert).serialNumber,
    });
  });

  test("no certificate, another CA's, or one not for client authentication never reaches the app", async () => {
    const lines: string[] = [];
    const listener = await gate({ lines });
    const other = loadIdentity(await testPki("other"), "client1");
    expect(await reachable(listener.port, { ...other, ca: loadIdentity(pki, "client1").ca })).toBe(false);
    expect(await reachable(listener.port, loadIdentity(pki, "server"))).toBe(false);
    const bare = await new Promise<string>((resolve) => {
      const socket = tls.connect({ host: "127.0.0.1", port: listener.port, ca: loadIdentity(pki, "client1").ca, checkServerIdentity: () => undefined });
      socket.on("error", (error) => resolve(error.message));
      socket.on("secureConnect", () => socket.write(GET("/health")));
      socket.on("data", (d) => resolve(`answered: ${d}`));
      socket.on("close", () => resolve("closed"));
    });
    expect(bare).not.toStartWith("answered");
    expect(lines.filter((l) => l.includes('"GET'))).toEqual([]);
  });

  test("a process on this host that connects to the loopback HTTP port directly is refused (421)", async () => {
    const listener = await gate();
    const inner = listener.loopbackPort;
    expect(typeof inner).toBe("number");
    const answer = await fetch(`http://127.0.0.1:${inner}/who`);
    expect([answer.status, await answer.json()]).toEqual([421, { error: "connect through the TLS port", code: "ERR_FORBIDDEN" }]);
  });

  test("a process that borrows a live relay's source port from another loopback address gets 421, not that peer (issue 18, F1)", async () => {
    const listener = await gate();
    const inner = listener.loopbackPort!;
    const kept = await connect(listener.port, loadIdentity(pki, "client1"));
    cleanups.push(() => kept.destroy());
    expect((await exchange(kept, GET("/who"))).status).toBe(200);
    // The relay's source port, as any local user reads it from /proc/net/tcp (world-readable).
    const hex = (n: number) => n.toString(16).toUpperCase().padStart(4, "0");
    const relayPorts = (await Bun.file("/proc/net/tcp").text())
      .split("\n")
      .map((line) => /^\s*\d+: 0100007F:([0-9A-F]{4}) 0100007F:([0-9A-F]{4}) 01 /.exec(line))
      .filter((m) => m !== null && m[2] === hex(inner))
      .map((m) => parseInt(m![1]!, 16));
    expect(relayPorts.length).toBeGreaterThan(0);
    const borrowed = net.connect({ host: "127.0.0.1", port: inner, localAddress: "127.0.0.2", localPort: relayPorts[0]! });
    cleanups.push(() => borrowed.destroy());
    await new Promise<void>((resolve, reject) => borrowed.once("connect", resolve).once("error", reject));
    const answer = await exchange(borrowed, GET("/who"));
    expect([answer.status, JSON.parse(answer.body).code]).toEqual([421, "ERR_FORBIDDEN"]);
  });
});

describe("revocation on every request and every route (issue 18, L1)", () => {
  test("a certificate revoked while its keep-alive connection is open gets 403 on /health and is closed; new handshakes are refused", async () => {
    const { dir } = await revocationPki("gate-revoked");
    const x = loadIdentity(dir, "x"); // revoked by revocationPki; this listener learns it only below
    const serial = new X509Certificate(x.cert).serialNumber;
    let revoked = false;
    const listener = await gate({ dir, isRevoked: (s) => revoked && s.toUpperCase() === serial.toUpperCase() });
    const kept = await connect(listener.port, x);
    expect((await exchange(kept, GET("/health"))).status).toBe(200);
    revoked = true;
    const refused = await exchange(kept, GET("/health"));
    expect([refused.status, JSON.parse(refused.body)]).toEqual([403, { error: "certificate revoked", code: "ERR_REVOKED" }]);
    await closed(kept);
    expect(await reachable(listener.port, x)).toBe(false);
    expect(await reachable(listener.port, loadIdentity(dir, "client1"))).toBe(true);
  });
});

describe("per-identity connection caps (issue 18, L2)", () => {
  test("an identity gets at most its limit; the one over it is closed and reported; others are untouched", async () => {
    const lines: string[] = [];
    const listener = await gate({ lines, connectionLimit: (id) => (id.endsWith("/client2") ? 3 : 100) });
    const client2 = loadIdentity(pki, "client2");
    const open = await Promise.all([connect(listener.port, client2), connect(listener.port, client2), connect(listener.port, client2)]);
    for (const socket of open) expect((await exchange(socket, GET("/health"))).status).toBe(200);
    // One too many: a 429 the client can read and wait on, then a close; the app never sees it.
    const extra = await connect(listener.port, client2);
    const answer = await exchange(extra, GET("/health"));
    expect([answer.status, JSON.parse(answer.body)]).toEqual([
      429,
      {
        error: "spiffe://securemesh/client/client2 already holds 3 connections, its limit: reuse one of them, or retry later",
        code: "ERR_CONNECTION_LIMIT",
      },
    ]);
    await closed(extra);
    expect(await reachable(listener.port, loadIdentity(pki, "client1"))).toBe(true);
    for (const socket of open) expect((await exchange(socket, GET("/health"))).status).toBe(200);
    expect(lines.filter((l) => l.includes("refused"))).toEqual([
      "connection from 127.0.0.1 refused: spiffe://securemesh/client/client2 already holds 3 connections, its limit",
    ]);
    // client2's 3 connections twice each, and client1's one: the refused connection's request never reached the app.
    expect(lines.filter((l) => l.includes('"GET /health'))).toHaveLength(7);
    open[0]!.destroy();
    // The gate sees the close a moment after the client does: the place comes free within a few attempts.
    let admitted = false;
    for (let attempt = 0; attempt < 50 && !admitted; attempt++) admitted = await reachable(listener.port, client2);
    expect(admitted).toBe(true);
  });

  test("a request left in the app's hands keeps its place under the cap after the client closes (issue 18, F3)", async () => {
    const listener = await gate({ connectionLimit: (id) => (id.endsWith("/client2") ? 2 : 100) });
    const client2 = loadIdentity(pki, "client2");
    // Half a POST body, then gone: the app still waits for the rest, so the request is not over.
    for (let i = 0; i < 2; i++) {
      const socket = await connect(listener.port, client2);
      socket.write("POST /echo HTTP/1.1\r\nHost: localhost\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\nonly ten b");
      socket.end(); // a FIN after the bytes: they reach the gate first
    }
    // Before, each close gave the place back at once and a third (and a sixtieth) request was taken on.
    const third = await connect(listener.port, client2);
    expect((await exchange(third, GET("/health"))).status).toBe(429);
    expect(await reachable(listener.port, loadIdentity(pki, "client1"))).toBe(true);
  });

  test("bare TCP connections flooding from one address push out each other, not a client that completes its handshake", async () => {
    const listener = await gate();
    const flood: net.Socket[] = [];
    for (let i = 0; i < 40; i++) {
      await new Promise<void>((resolve) => {
        const socket = net.connect(listener.port, "127.0.0.1", () => resolve());
        socket.on("error", () => {});
        flood.push(socket);
        cleanups.push(() => socket.destroy());
      });
    }
    expect(await reachable(listener.port, loadIdentity(pki, "client1"))).toBe(true);
    await Promise.all(flood.slice(0, 8).map(closed)); // the oldest were closed to make room
  });
});

describe("the relay", () => {
  test("bodies pass whole both ways, over keep-alive, a 5 MiB answer included", async () => {
    const listener = await gate();
    const socket = await connect(listener.port, loadIdentity(pki, "client1"));
    const body = JSON.stringify("y".repeat(60_000));
    const echoed = await exchange(
      socket,
      `POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    );
    expect(JSON.parse(echoed.body)).toEqual({ length: 60_000 });
    const big = await exchange(socket, GET("/big"));
    expect(big.body.length).toBe(5 * 1024 * 1024);
    expect((await exchange(socket, GET("/health"))).status).toBe(200);
  });

  test("reload swaps the certificate for new connections; an open one goes on", async () => {
    const listener = await gate();
    const client1 = loadIdentity(pki, "client1");
    const kept = await connect(listener.port, client1);
    await listener.reload(mutualTlsServerOptions(loadIdentity(pki, "keyserver")));
    const fresh = await connect(listener.port, client1);
    expect(tlsPeerIdentity(fresh.getPeerCertificate())).toBe("spiffe://securemesh/keyserver/keyserver");
    expect((await exchange(kept, GET("/health"))).status).toBe(200);
    expect((await exchange(fresh, GET("/health"))).status).toBe(200);
  });

  test("clients that reset mid-request do not stop the listener", async () => {
    const listener = await gate();
    for (let i = 0; i < 20; i++) {
      const socket = await connect(listener.port, loadIdentity(pki, "client1"));
      socket.write("POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\nabc");
      socket.resetAndDestroy();
    }
    expect(await reachable(listener.port, loadIdentity(pki, "client1"))).toBe(true);
  });
});
