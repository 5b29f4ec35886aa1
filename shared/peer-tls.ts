// A mutual-TLS listener whose handlers know who called: Bun.serve hides the client certificate (oven-sh/bun#14097),
// but node:tls exposes it, and node:http can parse requests on that TLS socket. Requests go on to an Elysia app.
import http from "node:http";
import tls from "node:tls";
import { ConfigError } from "./errors.ts";
import { CLIENT_AUTH_OID } from "./tls.ts";
import { DEFAULT_BODY_LIMIT, IDLE_TIMEOUT_S, PEER_ADDRESS_HEADER, type ServerTls } from "./http.ts";

/** Set by the listener from the verified certificate, after any client-sent copy is dropped. */
export const PEER_HEADER = "x-securemesh-peer";


export interface PeerAwareApp {
  handle(request: Request): Promise<Response>;
}

export interface PeerListener {
  port: number;
  close(): Promise<void>;
}

function jsonError(res: http.ServerResponse, status: number, error: string, code: string): void {
  res.writeHead(status, { "content-type": "application/json; charset=utf-8" });
  res.end(JSON.stringify({ error, code }));
}

/**
 * Serves `app` over mutual TLS; each request carries the caller's certificate CN in PEER_HEADER. A certificate
 * without the clientAuth EKU is dropped at the handshake.
 */
export function listenWithPeerIdentity(app: PeerAwareApp, options: { port: number; hostname: string; tls: ServerTls; bodyLimit?: number }): Promise<PeerListener> {
  const bodyLimit = options.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const parser = http.createServer({ maxHeaderSize: 16 * 1024 }, async (req, res) => {
    const peer = (req.socket as tls.TLSSocket).getPeerCertificate();
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of req) {
      size += (chunk as Buffer).length;
      if (size > bodyLimit) return jsonError(res, 413, `request body over the ${bodyLimit}-byte limit`, "ERR_BODY_TOO_LARGE");
      chunks.push(chunk as Buffer);
    }
    const headers = new Headers();
    for (const [name, value] of Object.entries(req.headers)) {
      if (value !== undefined) headers.set(name, Array.isArray(value) ? value.join(", ") : value);
    }
    const cn = peer.subject?.CN;
    headers.set(PEER_HEADER, typeof cn === "string" ? cn : ""); // several CNs: no identity at all
    headers.set(PEER_ADDRESS_HEADER, req.socket.remoteAddress ?? "-");
    const method = req.method ?? "GET";
    const request = new Request(`https://${options.hostname}${req.url ?? "/"}`, {
      method,
      headers,
      body: method === "GET" || method === "HEAD" ? undefined : Buffer.concat(chunks),
    });
    const response = await app.handle(request);
    response.headers.forEach((value, name) => res.setHeader(name, value));
    res.writeHead(response.status);
    res.end(Buffer.from(await response.arrayBuffer()));
    return undefined;
  });
  parser.headersTimeout = 10_000;
  parser.requestTimeout = 30_000;

  const server = tls.createServer({ ...options.tls, requestCert: true, rejectUnauthorized: true }, (socket) => {
    const usages = (socket.getPeerCertificate() as { ext_key_usage?: string[] }).ext_key_usage ?? [];
    if (!socket.authorized || !usages.includes(CLIENT_AUTH_OID)) {
      socket.destroy();
      return;
    }
    // The same idle limit as Bun.serve's: a caller dribbling its headers (slowloris) is cut off.
    socket.setTimeout(IDLE_TIMEOUT_S * 1000, () => socket.destroy());
    parser.emit("connection", socket);
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
        close: () => new Promise<void>((done) => {
          server.close(() => done());
          parser.closeAllConnections();
        }),
      });
    });
  });
}
