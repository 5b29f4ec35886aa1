// What a mutual-TLS listener takes from a role's trust material and policy: its certificate and CA, the live
// revocation check (asked at every handshake and on every request), whom a client certificate names, and how many
// connections each identity may hold.
import { mutualTlsServerOptions } from "../platform/tls.ts";
import type { Authorizer } from "./authorizer.ts";
import { tlsPeerIdentity } from "./expect-peer.ts";
import type { TrustMaterial } from "./trust.ts";

/**
 * With `authz`, each identity's connections are capped by the policy's limits (read at every handshake, so an
 * edit applies to the next connection).
 * @example await listenReloadable(app, { port, hostname, ...mutualTlsListening(trust, authz) })
 */
export function mutualTlsListening(trust: TrustMaterial, authz?: Authorizer) {
  return {
    tls: mutualTlsServerOptions(trust.identity),
    isRevoked: (serial: string) => trust.isRevoked(serial),
    identify: tlsPeerIdentity,
    ...(authz ? { connectionLimit: (identity: string) => authz.connectionLimit(identity) } : {}),
  };
}
