// A mutual-TLS listener whose handlers know who called: Bun.serve hides the client certificate (oven-sh/bun#14097),
// but node:tls exposes it, and node:http can parse requests on that TLS socket. Requests go on to an Elysia app.
import http from "node:http";
import type net from "node:net";
import tls from "node:tls";
import { ConfigError, MeshError } from "./errors.ts";
import { CLIENT_AUTH_OID } from "./tls.ts";
import { DEFAULT_BODY_LIMIT, IDLE_TIMEOUT_S, PEER_ADDRESS_HEADER, type ServerTls } from "./http.ts";
import { describeError } from "../ops/log.ts";

/** Set by the listener from the verified certificate, after any client-sent copy is dropped. */
export const PEER_HEADER = "x-securemesh-peer";

/**
 * Time from accept for the TLS handshake and the whole request head together, as HAProxy's `timeout http-request`:
 * the socket's idle timeout restarts with every byte, so one header byte every few seconds held a connection
 * open forever (#11 M2). The same budget applies between requests on a keep-alive connection.
 */
export const HEADER_DEADLINE_MS = 10_000;
/** Time for a request body once its head is in: a body dribbled byte by byte is cut off with a 408. */
export const BODY_DEADLINE_MS = 30_000;
/** Time from accept for the TLS handshake alone: a socket that never starts one holds its place only this long. */
export const HANDSHAKE_DEADLINE_MS = 3_000;
/**
 * Connections from one address still in their TLS handshake, before anyone is known. When a new one comes, the
 * oldest of them is closed, not the newcomer: a flood of bare TCP connections from the proxy's own address held
 * every place and shut the proxy out, with no certificate at all (found by attack on #11). A real handshake takes
 * milliseconds, so it is done long before 32 newer connections push it out.
 */
export const MAX_HANDSHAKES_PER_ADDRESS = 32;
/**
 * Open connections one verified identity may hold; more are closed once the handshake says who they are (#11 M2).
 * Sized for the SecureProxy, the KeyServer's one legitimate caller: it checks the KeyServer's identity on every
 * call, so Bun's fetch opens a connection per call, and 60 concurrent releases lost 29 of them under a cap of 32.
 */
export const MAX_CONNECTIONS_PER_IDENTITY = 128;

export interface PeerAwareApp {
  handle(request: Request): Promise<Response>;
}

export interface PeerListenerOptions {
  port: number;
  hostname: string;
  tls: ServerTls;
  bodyLimit?: number;
  /** See HEADER_DEADLINE_MS; tests shorten it. */
  headerDeadlineMs?: number;
  /** See BODY_DEADLINE_MS. */
  bodyDeadlineMs?: number;
  /** See HANDSHAKE_DEADLINE_MS. */
  handshakeDeadlineMs?: number;
  /** See MAX_HANDSHAKES_PER_ADDRESS. */
  maxHandshakesPerAddress?: number;
  /** See MAX_CONNECTIONS_PER_IDENTITY. */
  maxConnectionsPerIdentity?: number;
  /**
   * Asked on every request with the peer certificate's serial number (hex, as node:tls gives it): a revoked peer's
   * open keep-alive connection is refused too, not only its next handshake (#11).
   */
  isRevoked?: (serialHex: string) => boolean;
  /** The caller's identity for PEER_HEADER; by default the certificate's CN. */
  identify?: (peer: tls.PeerCertificate) => string;
}

export interface PeerListener {
  port: number;
  /** New certificate, key, CA or CRL for handshakes from now on; open connections keep theirs (see isRevoked). */
  reload(tls: ServerTls): Promise<void>;
  close(): Promise<void>;
}

/** The CN, or no identity at all when the certificate has several CNs (node:tls gives an array then). */
export function commonName(peer: tls.PeerCertificate): string {
  const cn = peer.subject?.CN as unknown;
  return typeof cn === "string" ? cn : "";
}

/** What the listener knows about one open connection. */
interface Connection {
  /** Closes the connection when the TLS handshake and a request head, or the next one, are late. */
  headTimer: ReturnType<typeof setTimeout> | undefined;
  /** Closes it when the handshake alone is late. */
  handshakeTimer: ReturnType<typeof setTimeout> | undefined;
  requestsInFlight: number;
}

/** "::ffff:10.0.0.1" and "10.0.0.1" are one client. */
const addressOf = (socket: net.Socket) => socket.remoteAddress?.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/, "");

/** Answers with JSON, unless the connection is already gone; `close` ends the connection once it is sent. */
function reply(res: http.ServerResponse, status: number, error: string, code: string, close = false): void {
  if (res.headersSent || res.destroyed || res.writableEnded) {
    res.destroy();
    return;
  }
  const body = Buffer.from(JSON.stringify({ error, code }));
  res.writeHead(status, {
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

/**
 * Serves `app` over mutual TLS; each request carries the caller's identity (by default the certificate CN) in
 * PEER_HEADER. A certificate without the clientAuth EKU is dropped at the handshake. No client can stop the
 * listener: every error of a request or its connection ends that request or connection only (#11 H2).
 */
export function listenWithPeerIdentity(app: PeerAwareApp, options: PeerListenerOptions): Promise<PeerListener> {
  const bodyLimit = options.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const headerDeadlineMs = options.headerDeadlineMs ?? HEADER_DEADLINE_MS;
  const keepAliveDeadlineMs = Math.min(headerDeadlineMs, IDLE_TIMEOUT_S * 1000);
  const bodyDeadlineMs = options.bodyDeadlineMs ?? BODY_DEADLINE_MS;
  const handshakeDeadlineMs = options.handshakeDeadlineMs ?? HANDSHAKE_DEADLINE_MS;
  const maxHandshakesPerAddress = options.maxHandshakesPerAddress ?? MAX_HANDSHAKES_PER_ADDRESS;
  const maxPerIdentity = options.maxConnectionsPerIdentity ?? MAX_CONNECTIONS_PER_IDENTITY;
  const identify = options.identify ?? commonName;

  const connections = new Map<net.Socket, Connection>();
  /** Sockets still in their handshake, per address, oldest first (a Set keeps insertion order). */
  const handshaking = new Map<string, Set<net.Socket>>();
  const perIdentity = new Map<string, number>();

  const expectHeadWithin = (socket: net.Socket, connection: Connection, ms: number) => {
    clearTimeout(connection.headTimer);
    connection.headTimer = setTimeout(() => socket.destroy(), ms);
  };

  async function serve(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    try {
      const socket = req.socket as tls.TLSSocket;
      const peer = socket.getPeerCertificate();
      if (options.isRevoked?.(peer.serialNumber ?? "")) return reply(res, 403, "certificate revoked", "ERR_REVOKED", true);
      const method = req.method ?? "GET";
      const body = method === "GET" || method === "HEAD" ? undefined : await readBody(req, bodyLimit, bodyDeadlineMs);
      const headers = new Headers();
      for (const [name, value] of Object.entries(req.headers)) {
        if (value !== undefined) headers.set(name, Array.isArray(value) ? value.join(", ") : value);
      }
      headers.set(PEER_HEADER, identify(peer));
      headers.set(PEER_ADDRESS_HEADER, socket.remoteAddress ?? "-");
      const response = await app.handle(new Request(`https://${options.hostname}${req.url ?? "/"}`, { method, headers, body }));
      const payload = Buffer.from(await response.arrayBuffer());
      if (res.destroyed || res.writableEnded) return undefined;
      response.headers.forEach((value, name) => {
        if (name !== "content-length" && name !== "transfer-encoding" && name !== "connection") res.setHeader(name, value);
      });
      res.setHeader("content-length", String(payload.length));
      res.writeHead(response.status);
      res.end(method === "HEAD" ? undefined : payload);
    } catch (error) {
      if (error instanceof MeshError) return reply(res, error.status, error.message, error.code, true);
      if (res.destroyed || req.socket.destroyed) return undefined; // the client went away: nobody to answer
      reply(res, 500, "internal error", "ERR_INTERNAL", true); // the app logs its own failures; this is the last resort
    }
    return undefined;
  }

  // node:http's headersTimeout and requestTimeout do not fire on Bun's node:http (a header byte every 5 s kept a
  // connection for over 100 s), so the deadlines above are kept here, per connection.
  const parser = http.createServer({ maxHeaderSize: 16 * 1024 });
  parser.on("request", (req: http.IncomingMessage, res: http.ServerResponse) => {
    const connection = connections.get(req.socket);
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
      if (connection.requestsInFlight === 0 && !req.socket.destroyed) expectHeadWithin(req.socket, connection, keepAliveDeadlineMs);
    };
    res.once("finish", finished).once("close", finished).on("error", () => {});
    req.on("error", () => {});
    void serve(req, res);
  });

  const server = tls.createServer({ ...options.tls, requestCert: true, rejectUnauthorized: true }, (socket) => {
    leaveHandshake(socket);
    const peer = socket.getPeerCertificate();
    const usages = (peer as { ext_key_usage?: string[] }).ext_key_usage ?? [];
    if (!socket.authorized || !usages.includes(CLIENT_AUTH_OID)) {
      socket.destroy();
      return;
    }
    // Counted by who it is, now that it is known: one identity's connections never take another's places.
    const identity = identify(peer);
    const open = perIdentity.get(identity) ?? 0;
    if (open >= maxPerIdentity) {
      socket.destroy();
      return;
    }
    perIdentity.set(identity, open + 1);
    socket.once("close", () => {
      const left = (perIdentity.get(identity) ?? 1) - 1;
      if (left > 0) perIdentity.set(identity, left);
      else perIdentity.delete(identity);
    });
    // Inactivity while a request is read or answered; the deadlines bound the head and the body.
    socket.setTimeout(IDLE_TIMEOUT_S * 1000, () => socket.destroy());
    parser.emit("connection", socket);
  });

  const leaveHandshake = (socket: net.Socket) => {
    const connection = connections.get(socket);
    if (connection) clearTimeout(connection.handshakeTimer);
    const address = addressOf(socket);
    const pending = address === undefined ? undefined : handshaking.get(address);
    if (!pending?.delete(socket) || pending.size > 0) return;
    handshaking.delete(address!);
  };

  // On Bun, 'connection' hands over the TLSSocket itself, before its handshake (measured on 1.4.5): the deadlines
  // start at the TCP accept, so a stalled handshake is cut off too.
  server.on("connection", (socket: net.Socket) => {
    socket.on("error", () => {}); // a reset or a bad record ends this connection, never the listener
    const connection: Connection = { headTimer: undefined, handshakeTimer: undefined, requestsInFlight: 0 };
    connections.set(socket, connection);
    const address = addressOf(socket);
    if (address !== undefined) {
      const pending = handshaking.get(address) ?? new Set<net.Socket>();
      handshaking.set(address, pending);
      if (pending.size >= maxHandshakesPerAddress) pending.values().next().value!.destroy(); // the oldest goes
      pending.add(socket);
    }
    connection.handshakeTimer = setTimeout(() => socket.destroy(), handshakeDeadlineMs);
    expectHeadWithin(socket, connection, headerDeadlineMs);
    socket.once("close", () => {
      clearTimeout(connection.headTimer);
      leaveHandshake(socket);
      connections.delete(socket);
    });
  });
  server.on("tlsClientError", () => {}); // a refused handshake is the point, not an error to crash on

  return new Promise((resolve, reject) => {
    server.once("error", (error: NodeJS.ErrnoException) => {
      reject(error.code === "EADDRINUSE"
        ? new ConfigError(`port ${options.port} on ${options.hostname} is already in use`)
        : new ConfigError(`cannot listen on ${options.hostname}:${options.port}: ${error.message}`));
    });
    server.listen(options.port, options.hostname, () => {
      resolve({
        port: (server.address() as { port: number }).port,
        async reload(next: ServerTls) {
          try {
            server.setSecureContext({ ...next });
          } catch (error) {
            throw new ConfigError(`cannot load the new TLS material: ${describeError(error)}`);
          }
        },
        close: () => new Promise<void>((done) => {
          server.close(() => done());
          parser.closeAllConnections();
          for (const socket of connections.keys()) socket.destroy();
        }),
      });
    });
  });
}
