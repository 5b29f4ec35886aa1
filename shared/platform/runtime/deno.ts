// The Deno side of the runtime seam. Each gap it closes was measured on Deno 2.9.6 (issue 12):
// - Elysia's listen is Bun.serve, and Deno.serve ignores client-certificate options (denoland/deno#26825): every
//   listener is node:https (which enforces requestCert, keeps connections alive and shows the client's
//   certificate) handing requests to app.handle.
// - node:https ignores the `crl` option: revocation is checked at every handshake and on every request, with the
//   role's live CRL (isRevoked), as on Bun.
// - Peer certificates carry no ext_key_usage: the EKU is read from the DER (shared/platform/eku.ts).
// Outbound hops are the portable HttpsClient's (node:tls, which Deno implements with the peer certificate).
import { createHmac } from "node:crypto";
import https from "node:https";
import { ConfigError } from "../errors.ts";
import { connectNodeTls } from "./node-connect.ts";
import { Admission } from "./admission.ts";
import { listenNode } from "./node-listener.ts";
import type { AppListenOptions, ReloadableListener, Runtime, ServableApp, TlsServerFactory } from "./types.ts";

/**
 * Every Elysia app listens through node:https (mutual TLS when asked), or node:http without TLS. Revocation is
 * checked at every handshake and on every request, with the role's live CRL (`isRevoked`).
 */
async function serveApp(app: ServableApp, options: AppListenOptions): Promise<ReloadableListener> {
  // A backstop: roles ask runtime.sharesPorts first.
  if (options.sharePort) throw new ConfigError("sharing a port with other workers needs Bun");
  const mutual = options.tls?.requestCert === true;
  if (mutual && (!options.identify || !options.isRevoked))
    throw new TypeError("mutual TLS needs identify and isRevoked: whom a certificate names, and the live CRL");
  const listener = await listenNode(app, {
    port: options.port,
    hostname: options.hostname,
    tls: options.tls,
    createTlsServer,
    admission: new Admission({
      mutual,
      ca: options.tls?.ca,
      identify: options.identify ?? (() => ""),
      isRevoked: options.isRevoked,
      connectionLimit: options.connectionLimit,
      onRefused: options.onRefused,
    }),
    // The app answers 413 itself (JSON, in the access log); this is the backstop, as Bun.serve's maxRequestBodySize.
    bodyLimit: options.bodyLimit * 4,
  });
  return {
    port: listener.port,
    reload: (tls) => listener.reload(tls),
    // Only an explicit false drains: a stop that names nothing closes every connection, as it always has here.
    stop: (closeActiveConnections) => listener.close(closeActiveConnections !== false),
  };
}

/** node:https: it enforces requestCert, exposes the peer certificate, and keeps connections alive on Deno. */
const createTlsServer: TlsServerFactory = (options, onSecure, onRequest) => {
  const server = https.createServer({ ...options, maxHeaderSize: 16 * 1024 }, onRequest);
  server.on("secureConnection", (socket) => void onSecure(socket));
  return { server, closeAllConnections: () => server.closeAllConnections?.() };
};

export const denoRuntime: Runtime = {
  name: "deno",
  sharesPorts: false,
  // createHmac: 18–24 µs per 1 KiB on Deno; there is nothing faster there.
  hmacSha256: (key, data) => createHmac("sha256", key).update(data).digest(),
  serveApp,
  connectTls: connectNodeTls,
};
