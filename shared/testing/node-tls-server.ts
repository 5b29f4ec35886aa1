// node:tls for the handshake and node:http to parse requests on it, as a TlsServerFactory: what the node listener
// (shared/platform/runtime/node-listener.ts, every listener on Deno) runs on when its tests run here on Bun. On Bun,
// 'connection' hands over the TLS socket itself, before its handshake (measured on 1.4.5).
import http from "node:http";
import tls from "node:tls";
import type { TlsServerFactory } from "../platform/runtime/types.ts";

export const nodeTlsServer: TlsServerFactory = (options, onSecure, onRequest) => {
  const parser = http.createServer({ maxHeaderSize: 16 * 1024 });
  parser.on("request", onRequest);
  const server = tls.createServer(options, (socket) => {
    if (onSecure(socket)) parser.emit("connection", socket);
  });
  return { server, closeAllConnections: () => parser.closeAllConnections() };
};
