// An outbound TLS connection on Bun's own sockets (Bun.connect), as TlsConnection: no node:stream layer between the
// HTTP client and BoringSSL. The caller decides on the peer after the handshake, before any write.
import type { Socket } from "bun";
import type tls from "node:tls";
import type { TlsConnection, TlsConnectOptions } from "./types.ts";

interface State {
  connection: TlsConnection | null;
  /** What the socket could not take yet, written on drain. */
  queue: Uint8Array[];
  resolve(connection: TlsConnection): void;
  reject(error: unknown): void;
  settled: boolean;
}

export function connectBunTls(options: TlsConnectOptions): { connected: Promise<TlsConnection>; abort(): void } {
  let socket: Socket<State> | null = null;
  let aborted = false;
  const connected = new Promise<TlsConnection>((resolve, reject) => {
    const state: State = { connection: null, queue: [], resolve, reject, settled: false };
    const settle = (error: unknown) => {
      if (state.settled) return;
      state.settled = true;
      reject(error);
    };
    Bun.connect<State>({
      hostname: options.host,
      port: options.port,
      data: state,
      tls: {
        ...(options.ca ? { ca: options.ca } : {}),
        ...(options.cert && options.key ? { cert: options.cert, key: options.key } : {}),
        ...(options.servername ? { serverName: options.servername } : {}),
        rejectUnauthorized: true,
      },
      socket: {
        handshake(s, success, authorizationError) {
          if (state.settled) return void s.end();
          state.settled = true;
          if (!success) {
            s.terminate();
            return reject(
              Object.assign(authorizationError ?? new Error("TLS handshake failed"), {
                code: (authorizationError as { code?: string } | null)?.code ?? "EPROTO",
              }),
            );
          }
          const connection: TlsConnection = {
            authorized: s.authorized,
            authorizationError: s.authorized ? null : String(s.getAuthorizationError() ?? "not authorized"),
            peerCertificate: () => (s.getPeerCertificate() as tls.PeerCertificate | undefined) ?? null,
            write(data) {
              if (state.queue.length > 0) return void state.queue.push(Uint8Array.from(data));
              const written = s.write(data);
              if (written < data.byteLength) state.queue.push(Uint8Array.from(data.subarray(Math.max(written, 0))));
            },
            destroy: () => s.terminate(),
            onData: () => {},
            onClose: () => {},
          };
          state.connection = connection;
          s.setNoDelay(true);
          resolve(connection);
        },
        data(s, chunk) {
          s.data.connection?.onData(chunk);
        },
        drain(s) {
          const { queue } = s.data;
          while (queue.length > 0) {
            const next = queue[0]!;
            const written = s.write(next);
            if (written >= next.byteLength) queue.shift();
            else {
              if (written > 0) queue[0] = next.subarray(written);
              return;
            }
          }
        },
        close(s, error) {
          settle(
            Object.assign(error ?? new Error("the connection closed during the TLS handshake"), {
              code: (error as { code?: string } | undefined)?.code ?? "ECONNRESET",
            }),
          );
          s.data.connection?.onClose();
        },
        connectError(_s, error) {
          settle(error);
        },
        error() {},
      },
    }).then((s) => {
      socket = s;
      if (aborted) s.terminate();
    }, settle);
  });
  return {
    connected,
    abort() {
      aborted = true;
      socket?.terminate();
    },
  };
}
