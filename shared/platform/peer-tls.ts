// A mutual-TLS listener whose handlers know who called: Bun.serve hides the client certificate (oven-sh/bun#14097),
// so the KeyServer and the SecureProxy listen through node's TLS APIs instead, on both runtimes. Requests go on
// to an Elysia app with the caller's verified identity in PEER_HEADER. The listener itself is portable
// (runtime/node-listener.ts); which node TLS server exposes the peer and keeps connections alive is the
// runtime's: node:tls + node:http on Bun (its node:https hides the peer), node:https on Deno (its node:tls +
// node:http closes the connection after every response).
import { runtime } from "./runtime/index.ts";
import { commonName, listenNode, type HandlingApp, type NodeListener, type NodeListenerOptions } from "./runtime/node-listener.ts";
import type { ServerTls } from "./runtime/types.ts";

export {
  BODY_DEADLINE_MS, HANDSHAKE_DEADLINE_MS, HEADER_DEADLINE_MS, MAX_CONNECTIONS_PER_IDENTITY, MAX_HANDSHAKES_PER_ADDRESS, PEER_HEADER,
} from "./runtime/limits.ts";
export { commonName };

export type PeerAwareApp = HandlingApp;

/**
 * The listener's options (runtime/node-listener.ts documents each), less what this listener fixes: mutual TLS with
 * the caller's identity in PEER_HEADER. On Deno, whose node:tls ignores the `crl` option, `isRevoked` is the only
 * revocation check: always pass it.
 */
export type PeerListenerOptions = Omit<NodeListenerOptions, "createTlsServer" | "requireClientCertificate" | "peerHeader" | "tls"> & { tls: ServerTls };

/** New certificate, key, CA or CRL for handshakes from now on; open connections keep theirs (see isRevoked). */
export type PeerListener = NodeListener;

/**
 * Serves `app` over mutual TLS; each request carries the caller's identity (by default the certificate CN) in
 * PEER_HEADER. A certificate without the clientAuth EKU is dropped at the handshake. No client can stop the
 * listener: every error of a request or its connection ends that request or connection only (#11 H2).
 */
export function listenWithPeerIdentity(app: PeerAwareApp, options: PeerListenerOptions): Promise<PeerListener> {
  return listenNode(app, { ...options, createTlsServer: runtime.createTlsServer, requireClientCertificate: true, peerHeader: true });
}
