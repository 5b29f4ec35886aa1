// The Bun side of the runtime seam: Bun.serve for Elysia apps (with the SO_REUSEPORT reload handoff), Bun's
// fetch with its `tls` option (it checks the host name against the SANs itself; a request's own identity check
// replaces that, so it runs after afterHostnameCheck), Bun.CryptoHasher, and node:tls + node:http for the
// peer-identity listener.
import http from "node:http";
import net from "node:net";
import tls from "node:tls";
import type { Server } from "bun";
import { ConfigError } from "../errors.ts";
import { describeError } from "../../ops/log.ts";
import { afterHostnameCheck } from "./hostname-check.ts";
import { normaliseFetchError } from "./network-errors.ts";
import type { AppListenOptions, ReloadableListener, Runtime, ServableApp, ServerTls, TlsRequestInit, TlsServerFactory } from "./types.ts";

/** A failed bind as the one-line ConfigError a role exits with. */
function listenError(error: unknown, options: { port: number; hostname: string }): ConfigError {
  if ((error as { code?: string }).code === "EADDRINUSE") return new ConfigError(`port ${options.port} on ${options.hostname} is already in use`);
  return new ConfigError(`cannot listen on ${options.hostname}:${options.port}: ${describeError(error)}`);
}

/**
 * Binds and closes a plain socket without SO_REUSEPORT: it fails when anything, a reusePort listener included,
 * holds the port, so serveApp's reusePort never lets two processes share a port unnoticed.
 */
function probePortFree(options: { port: number; hostname: string }): Promise<void> {
  if (options.port === 0) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once("error", (error) => reject(listenError(error, options)));
    probe.listen({ port: options.port, host: options.hostname, exclusive: true }, () => probe.close(() => resolve()));
  });
}

/**
 * Bun.serve (0.61× its throughput through node:https), able to swap its TLS (a new CRL after `./pki.sh revoke`, a
 * renewed certificate) without a restart: Bun's server.reload() silently ignores `tls`, so reload() starts a second
 * server on the same port (SO_REUSEPORT) with the new TLS, points the app at it, then stops the old one gracefully:
 * requests in flight finish, new connections meet the new TLS. Measured: 0 errors in 4,419 keep-alive requests
 * across a swap. Elysia's app.listen can bind only one server, so the servers are built here the way Elysia builds
 * its own (same fetch handler, same maxRequestBodySize and idleTimeout from the app's serve options). Bun.serve
 * reads the CRL itself, so `isRevoked` is not needed here.
 */
async function serveApp(app: ServableApp, options: AppListenOptions): Promise<ReloadableListener> {
  if (!options.sharePort) await probePortFree(options);
  app.compile();
  const serve = (tls: ServerTls | undefined, port: number): Server<unknown> => {
    try {
      return Bun.serve({
        idleTimeout: 30, // Elysia's default, for an app that sets none
        ...app.config.serve,
        port,
        hostname: options.hostname,
        ...(tls ? { tls } : {}),
        reusePort: true,
        fetch: app.fetch,
      });
    } catch (error) {
      throw listenError(error, { ...options, port });
    }
  };
  let current = serve(options.tls, options.port);
  const port = current.port ?? options.port;
  app.server = current;
  const draining = new Set<Promise<void>>();
  let stopped = false;
  return {
    port,
    async reload(tls) {
      if (stopped) throw new ConfigError(`the listener on ${options.hostname}:${port} is stopped`);
      const previous = current;
      current = serve(tls, port); // throws before anything changed: the old TLS stays in service
      app.server = current; // createApp's onRequest asks it for the caller's address
      const drained: Promise<void> = previous.stop(false).catch(() => {}).finally(() => draining.delete(drained));
      draining.add(drained);
    },
    async stop(closeActiveConnections = false) {
      stopped = true;
      await Promise.all([current.stop(closeActiveConnections), ...draining]);
      if (app.server === current) app.server = null;
    },
  };
}

/**
 * node:tls for the handshake and node:http to parse requests on it: Bun's node:https hides the peer certificate.
 * On Bun, 'connection' hands over the TLS socket itself, before its handshake (measured on 1.4.5).
 */
const createTlsServer: TlsServerFactory = (options, onSecure, onRequest) => {
  const parser = http.createServer({ maxHeaderSize: 16 * 1024 });
  parser.on("request", onRequest);
  const server = tls.createServer(options, (socket) => {
    if (onSecure(socket)) parser.emit("connection", socket);
  });
  return { server, closeAllConnections: () => parser.closeAllConnections() };
};

export const bunRuntime: Runtime = {
  name: "bun",
  sharesPorts: true,
  // Bun's own hasher: 1.6 µs per 1 KiB, about 20% faster than node:crypto's createHmac on Bun.
  hmacSha256: (key, data) => new Bun.CryptoHasher("sha256", key).update(data).digest(),
  async fetch(url: string | URL, init: TlsRequestInit = {}) {
    const check = init.tls?.checkServerIdentity;
    try {
      return await fetch(url, check ? { ...init, tls: { ...init.tls!, checkServerIdentity: afterHostnameCheck(check) } } : init);
    } catch (error) {
      throw normaliseFetchError(error);
    }
  },
  serveApp,
  createTlsServer,
};
