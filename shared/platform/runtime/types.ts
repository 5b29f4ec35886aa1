// The runtime seam: what securemesh needs from Bun or Deno, as one interface with one implementation per runtime
// (bun.ts, deno.ts), chosen once in index.ts. Everything else in roles/ and shared/ is portable code on top of it.
import type http from "node:http";
import type net from "node:net";
import type tls from "node:tls";
import type { Refusal } from "./admission.ts";

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

/** Client-side TLS for an outbound hop: our certificate (mutual TLS), the CA we trust, and the hop's identity check. */
export interface ClientTls {
  cert?: string;
  key?: string;
  ca?: string;
  rejectUnauthorized: boolean;
  /** Checked at every handshake, after the CA chain and the host name (shared/platform/https-client.ts). */
  checkServerIdentity?: IdentityCheck;
}

/**
 * One set of codes for an outbound request that failed, whatever the runtime said (shared/platform/https-client.ts).
 * Failover depends on them: the NEVER_REACHED ones say the request cannot have reached the application
 * (shared/request-path/upstream.ts).
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
   * Asked at every handshake and on every request with the client certificate's serial number (hex): the
   * listeners refuse a revoked client themselves, on every route, on both runtimes. Mutual TLS needs it.
   */
  isRevoked?: (serialHex: string) => boolean;
  /** The identity a verified client certificate names (shared/authz tlsPeerIdentity); mutual TLS needs it. */
  identify?: (peer: tls.PeerCertificate) => string;
  /** Connections one identity may hold at once (default MAX_CONNECTIONS_PER_IDENTITY). */
  connectionLimit?: (identity: string) => number;
  /** Each connection closed before any request (a cap, a revoked or untrusted certificate), for a log line. */
  onRefused?: (refusal: Refusal) => void;
}

export interface ReloadableListener {
  port: number;
  /** Bun's TLS gate only: the loopback port of the HTTP server behind it, which serves relayed connections only. */
  loopbackPort?: number;
  /** Serves new connections with `tls` from now on; requests in flight on the old TLS finish first. */
  reload(tls: ServerTls): Promise<void>;
  stop(closeActiveConnections?: boolean): Promise<void>;
}

/** Where an outbound TLS connection goes, and with what: our certificate (mutual TLS) and the CA we trust. */
export interface TlsConnectOptions {
  host: string;
  port: number;
  /** SNI; left out for an address. */
  servername?: string;
  ca?: string;
  cert?: string;
  key?: string;
}

/**
 * An outbound TLS connection whose handshake is done. Nothing has been written to it, and nothing about the peer has
 * been decided beyond the runtime's own chain check (`authorized`): the caller checks the peer's certificate before
 * its first write (shared/platform/https-client.ts).
 */
export interface TlsConnection {
  readonly authorized: boolean;
  readonly authorizationError: string | null;
  peerCertificate(): tls.PeerCertificate | null;
  /** Queued as needed: the runtime's own backpressure is handled inside. */
  write(data: Uint8Array): void;
  destroy(): void;
  /** Set by the caller: each chunk received, then one call when the connection is gone. */
  onData: (chunk: Buffer) => void;
  onClose: () => void;
}

export interface Runtime {
  readonly name: "bun" | "deno";
  /** Whether serveApp can share a port with sibling processes (AppListenOptions.sharePort): Bun.serve can. */
  readonly sharesPorts: boolean;
  /** HMAC-SHA256 of `data` under `key` (Fernet's MAC). */
  hmacSha256(key: Uint8Array, data: Uint8Array): Buffer;
  /** Serves an Elysia app: mutual TLS when `tls.requestCert`, plain TLS without it, plain HTTP without `tls`. */
  serveApp(app: ServableApp, options: AppListenOptions): Promise<ReloadableListener>;
  /**
   * Opens an outbound TLS connection: resolved once the handshake is done, rejected with the runtime's error when
   * it fails; `abort` ends an attempt still in progress.
   */
  connectTls(options: TlsConnectOptions): { connected: Promise<TlsConnection>; abort(): void };
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
