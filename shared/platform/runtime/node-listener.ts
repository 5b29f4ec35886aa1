// A listener on node's http and tls APIs that hands each request to an Elysia app's `handle`, with the guarantees
// securemesh needs kept here rather than left to the runtime: client certificate and clientAuth EKU, revocation on
// every request, deadlines for the handshake, the head and the body, body limits with JSON errors, per-identity and
// per-address connection caps (admission.ts). Every listener on Deno is one (deno.ts). Portable code: how the TLS
// server is made is the runtime's (a TlsServerFactory).
import http from "node:http";
import type net from "node:net";
import type tls from "node:tls";
import { ConfigError, MeshError, type ErrorCode } from "../errors.ts";
import { type Admission, CAP_ANSWER_WITHIN_MS, plainAddress, refusalAnswer, type RefusalAnswer } from "./admission.ts";
import { BODY_DEADLINE_MS, DEFAULT_BODY_LIMIT, HANDSHAKE_DEADLINE_MS, HEADER_DEADLINE_MS, IDLE_TIMEOUT_S } from "./limits.ts";
import { bindPeer, type RequestPeer } from "./peer.ts";
import type { ServerTls, TlsServerFactory } from "./types.ts";

export interface HandlingApp {
  handle(request: Request): Promise<Response>;
}

export interface NodeListenerOptions {
  port: number;
  hostname: string;
  /** Without it, plain HTTP. */
  tls?: ServerTls;
  createTlsServer: TlsServerFactory;
  /** Who may connect (mutual TLS when `admission.mutual`); each request's peer is bound from it. */
  admission: Admission;
  bodyLimit?: number;
  headerDeadlineMs?: number;
  bodyDeadlineMs?: number;
  handshakeDeadlineMs?: number;
}

export interface NodeListener {
  port: number;
  reload(tls: ServerTls): Promise<void>;
  /**
   * Stops accepting; with `closeActive` (the default) closes every connection at once, without it lets open ones
   * go on (a drain: each asked to close by its next answer) and resolves when the last has closed.
   */
  close(closeActive?: boolean): Promise<void>;
}

/** What the listener knows about one open connection. */
interface Connection {
  /** The socket as accepted: destroying it ends the connection on every runtime. */
  socket: net.Socket;
  /** Closes the connection when the TLS handshake and a request head, or the next one, are late. */
  headTimer: ReturnType<typeof setTimeout> | undefined;
  /** Closes it when the handshake alone is late. */
  handshakeTimer: ReturnType<typeof setTimeout> | undefined;
  /** Ends its place among the handshakes of its address (admission.ts). */
  leaveHandshake: () => void;
  requestsInFlight: number;
}

/**
 * One connection's key on every socket that stands for it: Bun hands the TLS socket itself to 'connection', Deno's
 * node:https a plain socket, and the TLS socket over it later (same address and port).
 */
const keyOf = (socket: net.Socket) => `${socket.remoteAddress}|${socket.remotePort}`;

/** Answers with JSON, unless the connection is already gone; `close` ends the connection once it is sent. */
function reply(res: http.ServerResponse, status: number, error: string, code: ErrorCode, close = false, extra: Record<string, string> = {}): void {
  if (res.headersSent || res.destroyed || res.writableEnded) {
    res.destroy();
    return;
  }
  const body = Buffer.from(JSON.stringify({ error, code }));
  res.writeHead(status, {
    ...extra,
    "content-type": "application/json; charset=utf-8",
    "content-length": String(body.length),
    ...(close ? { connection: "close" } : {}),
  });
  res.end(body, () => {
    if (close) res.socket?.end();
  });
}

/**
 * The body, read within the byte limit and the deadline. Rejects with a MeshError (413, 408) the listener answers,
 * or with any other error when the client went away mid-body (#11 H2: that used to be an unhandled rejection).
 */
function readBody(req: http.IncomingMessage, limit: number, deadlineMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const finish = (error: Error | null) => {
      clearTimeout(timer);
      req.off("data", onData).off("end", onEnd).off("error", finish).off("close", onClose);
      if (error) {
        req.pause();
        reject(error);
      } else {
        resolve(Buffer.concat(chunks));
      }
    };
    const timer = setTimeout(() => finish(new MeshError("ERR_TIMEOUT", 408, "request body not received in time")), deadlineMs);
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) finish(new MeshError("ERR_BODY_TOO_LARGE", 413, `request body over the ${limit}-byte limit`));
      else chunks.push(chunk);
    };
    const onEnd = () => finish(null);
    const onClose = () => finish(new Error("the client closed the connection mid-body"));
    req.on("data", onData).on("end", onEnd).on("error", finish).on("close", onClose);
  });
}

/** The host part of the URL the app sees; an IPv6 address needs its brackets. */
const urlHost = (hostname: string) => (hostname.includes(":") ? `[${hostname}]` : hostname);

/** Sends the app's answer; a stream (server-sent events) is passed on as it comes, anything else with its length. */
async function send(res: http.ServerResponse, response: Response, method: string): Promise<void> {
  if (res.destroyed || res.writableEnded) return;
  response.headers.forEach((value, name) => {
    if (name !== "content-length" && name !== "transfer-encoding" && name !== "connection") res.setHeader(name, value);
  });
  const streaming = (response.headers.get("content-type") ?? "").startsWith("text/event-stream");
  if (!streaming || !response.body) {
    const payload = Buffer.from(await response.arrayBuffer());
    if (res.destroyed || res.writableEnded) return;
    res.setHeader("content-length", String(payload.length));
    res.writeHead(response.status);
    // Head and body leave in one write: Bun's node:http writes them apart, two TLS records and two syscalls (#13).
    const socket = res.socket;
    socket?.cork();
    res.end(method === "HEAD" ? undefined : payload);
    socket?.uncork();
    return;
  }
  res.writeHead(response.status);
  const reader = response.body.getReader();
  res.once("close", () => void reader.cancel().catch(() => {}));
  for (;;) {
    const { done, value } = await reader.read();
    if (done || res.destroyed) break;
    res.write(value);
  }
  res.end();
}

/**
 * Serves `app` with node's http/tls APIs. No client can stop the listener: every error of a request or its
 * connection ends that request or connection only (#11 H2).
 */
export function listenNode(app: HandlingApp, options: NodeListenerOptions): Promise<NodeListener> {
  const bodyLimit = options.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const headerDeadlineMs = options.headerDeadlineMs ?? HEADER_DEADLINE_MS;
  const keepAliveDeadlineMs = Math.min(headerDeadlineMs, IDLE_TIMEOUT_S * 1000);
  const bodyDeadlineMs = options.bodyDeadlineMs ?? BODY_DEADLINE_MS;
  const handshakeDeadlineMs = options.handshakeDeadlineMs ?? HANDSHAKE_DEADLINE_MS;
  const { admission } = options;
  const mutual = options.tls !== undefined && admission.mutual;

  const connections = new Map<string, Connection>();
  /**
   * Each socket's peer, decided once at its handshake (admission.ts): getPeerCertificate() cost a KeyServer an
   * eighth of its main thread when called per request (#13). A connection's certificate cannot change after the
   * handshake: neither BoringSSL (Bun) nor rustls (Deno) renegotiates as a server.
   */
  const admitted = new WeakMap<net.Socket, RequestPeer>();
  /** Connections over their identity's cap, kept only to answer their first request with a 429. */
  const refused = new WeakMap<net.Socket, RefusalAnswer>();

  const expectHeadWithin = (connection: Connection, ms: number) => {
    clearTimeout(connection.headTimer);
    connection.headTimer = setTimeout(() => connection.socket.destroy(), ms);
  };

  async function serve(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    try {
      const socket = req.socket as tls.TLSSocket;
      const method = req.method ?? "GET";
      const headers = new Headers();
      for (const [name, value] of Object.entries(req.headers)) {
        if (value !== undefined) headers.set(name, Array.isArray(value) ? value.join(", ") : value);
      }
      const peer = admitted.get(socket);
      const refusal = refused.get(socket);
      if (refusal) return reply(res, refusal.status, refusal.error, refusal.code, true, refusal.headers);
      if (mutual) {
        if (!peer) return reply(res, 403, "no verified client certificate", "ERR_FORBIDDEN", true);
        // Per request, not per handshake: a revoked peer's open keep-alive connection is refused too (#11), and
        // where the TLS stack ignores the `crl` option (Deno), this is the only revocation check.
        if (admission.isRevoked(peer.serial)) return reply(res, 403, "certificate revoked", "ERR_REVOKED", true);
      }
      const body = method === "GET" || method === "HEAD" ? undefined : await readBody(req, bodyLimit, bodyDeadlineMs);
      const scheme = options.tls ? "https" : "http";
      const request = new Request(`${scheme}://${urlHost(options.hostname)}${req.url ?? "/"}`, { method, headers, body });
      bindPeer(request, peer ?? { address: plainAddress(socket.remoteAddress), identity: "", serial: "" });
      const response = await app.handle(request);
      await send(res, response, method);
    } catch (error) {
      if (error instanceof MeshError) return reply(res, error.status, error.message, error.code, true);
      if (res.destroyed || req.socket.destroyed) return undefined; // the client went away: nobody to answer
      reply(res, 500, "internal error", "ERR_INTERNAL", true); // the app logs its own failures; this is the last resort
    }
    return undefined;
  }

  // node:http's headersTimeout and requestTimeout do not fire on Bun's node:http (a header byte every 5 s kept a
  // connection for over 100 s), so the deadlines are kept here, per connection, on every runtime.
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse) => {
    const connection = connections.get(keyOf(req.socket));
    if (connection) {
      clearTimeout(connection.headTimer);
      connection.requestsInFlight++;
    }
    let done = false;
    const finished = () => {
      if (done) return;
      done = true;
      if (!connection) return;
      connection.requestsInFlight--;
      if (connection.requestsInFlight === 0 && !req.socket.destroyed) expectHeadWithin(connection, keepAliveDeadlineMs);
    };
    res
      .once("finish", finished)
      .once("close", finished)
      .on("error", () => {});
    req.on("error", () => {});
    void serve(req, res);
  };

  /** Decides a completed handshake: true lets its requests through, false has destroyed it. */
  const onSecure = (socket: tls.TLSSocket): boolean => {
    const connection = connections.get(keyOf(socket));
    if (connection) {
      clearTimeout(connection.handshakeTimer);
      connection.leaveHandshake();
    }
    const refuse = () => {
      socket.destroy();
      connection?.socket.destroy();
      return false;
    };
    // Inactivity while a request is read or answered; the deadlines bound the head and the body.
    socket.setTimeout(IDLE_TIMEOUT_S * 1000, () => refuse());
    socket.on("error", () => {});
    if (!mutual) return true;
    const decision = admission.admit(plainAddress(socket.remoteAddress), socket.authorized, socket.getPeerCertificate());
    if ("refusal" in decision) {
      const answer = refusalAnswer(decision.refusal);
      if (!answer) return refuse();
      // A refusal the client can act on: its first request gets the reason (a 429, a 403), then a close.
      refused.set(socket, answer);
      setTimeout(() => refuse(), CAP_ANSWER_WITHIN_MS).unref?.();
      return true;
    }
    const { peer } = decision;
    admitted.set(socket, peer);
    (connection?.socket ?? socket).once("close", () => admission.released(peer));
    return true;
  };

  let tlsServer: ReturnType<TlsServerFactory> | null = null;
  let server: net.Server;
  let closeAllConnections: () => void;
  if (options.tls) {
    // rejectUnauthorized off: rustls (Deno) would end a handshake whose certificate is ours but not for client
    // authentication with an alert, before the client could be told why (issue 23). Nothing is admitted on that:
    // admission.admit() refuses every connection the stack did not authorize, as it does on every runtime.
    const tlsOptions = { ...options.tls, requestCert: mutual, rejectUnauthorized: false };
    tlsServer = options.createTlsServer(tlsOptions, onSecure, onRequest);
    server = tlsServer.server;
    closeAllConnections = () => tlsServer!.closeAllConnections();
    server.on("tlsClientError", () => {}); // a refused handshake is the point, not an error to crash on
  } else {
    const plain = http.createServer({ maxHeaderSize: 16 * 1024 }, onRequest);
    server = plain;
    closeAllConnections = () => plain.closeAllConnections();
  }

  // The deadlines start at the TCP accept, so a stalled handshake is cut off too.
  server.on("connection", (socket: net.Socket) => {
    socket.on("error", () => {}); // a reset or a bad record ends this connection, never the listener
    const connection: Connection = { socket, headTimer: undefined, handshakeTimer: undefined, leaveHandshake: () => {}, requestsInFlight: 0 };
    const key = keyOf(socket);
    connections.set(key, connection);
    if (options.tls) {
      const address = plainAddress(socket.remoteAddress);
      // Over the per-address bound of handshakes, the oldest of them is closed (admission.ts).
      connection.leaveHandshake = admission.handshakeStarted(address, () => socket.destroy());
      connection.handshakeTimer = setTimeout(() => {
        admission.handshakeTimedOut(address);
        socket.destroy();
      }, handshakeDeadlineMs);
    } else {
      socket.setTimeout(IDLE_TIMEOUT_S * 1000, () => socket.destroy());
    }
    expectHeadWithin(connection, headerDeadlineMs);
    socket.once("close", () => {
      clearTimeout(connection.headTimer);
      clearTimeout(connection.handshakeTimer);
      connection.leaveHandshake();
      if (connections.get(key) === connection) connections.delete(key);
    });
  });

  return new Promise((resolve, reject) => {
    server.once("error", (error: NodeJS.ErrnoException) => {
      reject(
        error.code === "EADDRINUSE"
          ? new ConfigError(`port ${options.port} on ${options.hostname} is already in use`)
          : new ConfigError(`cannot listen on ${options.hostname}:${options.port}: ${error.message}`),
      );
    });
    server.listen(options.port, options.hostname, () => {
      server.on("error", () => {}); // after the bind, nothing a client does is the listener's error
      resolve({
        port: (server.address() as { port: number }).port,
        async reload(next: ServerTls) {
          if (!tlsServer) return;
          try {
            tlsServer.server.setSecureContext({ ...next });
            admission.trust(next.ca);
          } catch (error) {
            throw new ConfigError(`cannot load the new TLS material: ${error instanceof Error ? error.message : String(error)}`);
          }
        },
        close: (closeActive = true) =>
          new Promise<void>((done) => {
            server.close(() => done());
            if (!closeActive) return;
            closeAllConnections();
            for (const connection of connections.values()) connection.socket.destroy();
          }),
      });
    });
  });
}
