// An outbound TLS connection on node:tls, as TlsConnection: Deno's (which implements node:tls with the peer
// certificate) and the portable fallback. The caller decides on the peer after the handshake, before any write.
import tls from "node:tls";
import type { TlsConnection, TlsConnectOptions } from "./types.ts";

export function connectNodeTls(options: TlsConnectOptions): { connected: Promise<TlsConnection>; abort(): void } {
  const socket = tls.connect({
    host: options.host,
    port: options.port,
    ...(options.servername ? { servername: options.servername } : {}),
    ...(options.ca ? { ca: options.ca } : {}),
    ...(options.cert && options.key ? { cert: options.cert, key: options.key } : {}),
    rejectUnauthorized: true,
    // The host, identity and revocation checks are the caller's, on the certificate, before it writes a byte.
    checkServerIdentity: () => undefined,
  });
  const connected = new Promise<TlsConnection>((resolve, reject) => {
    const fail = (error: unknown) => {
      socket.destroy();
      reject(error);
    };
    socket.once("error", fail);
    socket.once("close", () => fail(Object.assign(new Error("the connection closed during the TLS handshake"), { code: "ECONNRESET" })));
    socket.once("secureConnect", () => {
      socket.off("error", fail);
      socket.removeAllListeners("close");
      socket.setNoDelay(true);
      const connection: TlsConnection = {
        authorized: socket.authorized,
        authorizationError: socket.authorizationError ? String(socket.authorizationError) : null,
        peerCertificate: () => socket.getPeerCertificate() ?? null,
        write: (data) => void socket.write(data),
        destroy: () => void socket.destroy(),
        onData: () => {},
        onClose: () => {},
      };
      socket.on("data", (chunk: Buffer) => connection.onData(chunk));
      socket.on("error", () => {}); // 'close' follows
      socket.on("close", () => connection.onClose());
      resolve(connection);
    });
  });
  return { connected, abort: () => socket.destroy() };
}
