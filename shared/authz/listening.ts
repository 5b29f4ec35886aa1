// What a mutual-TLS listener takes from a role's trust material: its certificate and CA, the live revocation check
// (asked at every handshake and on every request), and whom a client certificate names.
import { mutualTlsServerOptions } from "../platform/tls.ts";
import { tlsPeerIdentity } from "./expect-peer.ts";
import type { TrustMaterial } from "./trust.ts";

/**
 * @example await listenReloadable(app, { port, hostname, ...mutualTlsListening(trust) })
 */
export function mutualTlsListening(trust: TrustMaterial) {
  return {
    tls: mutualTlsServerOptions(trust.identity),
    isRevoked: (serial: string) => trust.isRevoked(serial),
    identify: tlsPeerIdentity,
  };
}
