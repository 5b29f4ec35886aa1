// The runtime seam: what securemesh needs from Bun or Deno, as one interface with one implementation per runtime
// (bun.ts, deno.ts), chosen once in index.ts. Everything else in roles/ and shared/ is portable code on top of it.
import type http from "node:http";
import type net from "node:net";
import type tls from "node:tls";

/** Server-side TLS options, as Bun.serve and node:tls take them. */
export interface ServerTls {
  cert: string;
  key: string;
  ca?: string;
  crl?: string;
  requestCert?: boolean;
  rejectUnauthorized?: boolean;
}

/** node's checkServerIdentity: an Error refuses the connection before anything is sent. */
export type IdentityCheck = (hostname: string, cert: tls.PeerCertificate) => Error | undefined;

/** Client-side TLS for an outbound fetch: our certificate (mutual TLS), the CA we trust, and an optional identity check. */
export interface ClientTls {
  cert?: string;
  key?: string;
  ca?: string;
  rejectUnauthorized: boolean;
  /** Checked on the handshake, after the CA chain; given, the request uses a connection of its own. */
  checkServerIdentity?: IdentityCheck;
}

/** fetch's init, plus the TLS to use (Bun's `tls` option; on Deno the adapter maps it). */
export interface TlsRequestInit extends RequestInit {
  tls?: ClientTls;
}

/**
 * One set of codes for an outbound request that failed, whatever the runtime said. Failover depends on them:
 * the NEVER_REACHED ones say the request cannot have reached the application (shared/request-path/upstream.ts).
 */
export type NetworkErrorCode =
  | "ECONNREFUSED" // nothing listens there
  | "ENOTFOUND" // no such host
  | "EHOSTUNREACH"
  | "ENETUNREACH"
  | "EPROTO" // the TLS handshake failed (an alert, a protocol error)
  | "ERR_TLS_CERT" // the peer's certificate was refused (unknown CA, expired, revoked)
  | "ERR_TLS_HOSTNAME" // the peer's certificate does not name the host or address called (its SANs, #14)
  | "ERR_UNEXPECTED_PEER" // the peer's identity was refused (shared/authz/expect-peer.ts)
  | "ECONNRESET"; // the connection broke: the request may have reached the application

/** An outbound request that failed on the network, with its NetworkErrorCode; the runtime's own error is its cause. */
export class NetworkError extends Error {
  readonly code: NetworkErrorCode;
  constructor(code: NetworkErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "NetworkError";
    this.code = code;
  }
}

/** An Elysia app as the listeners need it: its fetch handler, its serve options, its server slot. */
export interface ServableApp {
  fetch: (request: Request) => Response | Promise<Response>;
  handle(request: Request): Promise<Response>;
  config: { serve?: object };
  server: unknown;
  compile(): unknown;
}

export interface AppListenOptions {
  port: number;
  hostname: string;
  /** Without TLS the listener is plain HTTP (the coordinator's admin page, on loopback). */
  tls?: ServerTls;
  /** Bodies above this get a 413 JSON before the app runs (the app's own limit answers first when lower). */
  bodyLimit: number;
  /**
   * Share the port with the role's other workers (shared/platform/worker-group.ts) instead of refusing a port that
   * is held: the supervisor has checked it is free. Bun only; Deno's node:https listener cannot share a port.
   */
  sharePort?: boolean;
  /**
   * Asked on every request with the client certificate's serial number (hex). Where the TLS stack ignores the
   * `crl` option (Deno's node:tls), this is what refuses a revoked client; without it, `tls.crl` is parsed.
   */
  isRevoked?: (serialHex: string) => boolean;
}

export interface ReloadableListener {
  port: number;
  /** Serves new connections with `tls` from now on; requests in flight on the old TLS finish first. */
  reload(tls: ServerTls): Promise<void>;
  stop(closeActiveConnections?: boolean): Promise<void>;
}

export interface Runtime {
  readonly name: "bun" | "deno";
  /** Whether serveApp can share a port with sibling processes (AppListenOptions.sharePort): Bun.serve can. */
  readonly sharesPorts: boolean;
  /** HMAC-SHA256 of `data` under `key` (Fernet's MAC). */
  hmacSha256(key: Uint8Array, data: Uint8Array): Buffer;
  /**
   * fetch with `tls` honoured, `checkServerIdentity` included. A network failure rejects with a NetworkError (or
   * the identity check's own Error, or the signal's TimeoutError/AbortError), never a runtime-specific shape.
   */
  fetch(url: string | URL, init?: TlsRequestInit): Promise<Response>;
  /** Serves an Elysia app: mutual TLS when `tls.requestCert`, plain TLS without it, plain HTTP without `tls`. */
  serveApp(app: ServableApp, options: AppListenOptions): Promise<ReloadableListener>;
  /**
   * The TLS server behind the node-based listeners (the peer-identity listener, and every listener on Deno): one
   * that exposes the client certificate and keeps connections alive on this runtime.
   */
  createTlsServer: TlsServerFactory;
}

/** A TLS server that parses HTTP: 'connection' hands over each socket before its handshake. */
export interface NodeTlsServer {
  server: net.Server & { setSecureContext(options: tls.SecureContextOptions): void };
  /** Closes every connection the HTTP parser holds. */
  closeAllConnections(): void;
}

/**
 * `onSecure` runs once a handshake completes, with the TLS socket; it returns false after destroying a connection
 * it refuses. `onRequest` then receives that connection's requests, with `req.socket` the same TLS socket.
 */
export type TlsServerFactory = (
  options: tls.TlsOptions,
  onSecure: (socket: tls.TLSSocket) => boolean,
  onRequest: (req: http.IncomingMessage, res: http.ServerResponse) => void,
) => NodeTlsServer;
