// Internal hops check whom they reached, not only that the CA signed it: any certificate of our CA with the
// right address would otherwise pass as a server or the KeyServer (#11, hardening).
import tls from "node:tls";
import { CLIENT_AUTH_OID, SERVER_AUTH_OID } from "../platform/tls.ts";
import { identityOf } from "./identity.ts";
import { hostnameRefusal } from "../platform/runtime/hostname-check.ts";


/** Why a hop refused the identity it reached; the pool treats it like a failed handshake (never reached). */
export class UnexpectedPeer extends Error {
  readonly code = "ERR_UNEXPECTED_PEER";
}

/** The SPIFFE ID a TLS peer's verified certificate names (node:tls's and Bun's peer certificate objects). */
export function tlsPeerIdentity(peer: tls.PeerCertificate): string {
  const usages = peer.ext_key_usage ?? [];
  return identityOf({
    subject: peer.subject as unknown as Record<string, unknown> | undefined, subjectaltname: peer.subjectaltname,
    clientAuth: usages.includes(CLIENT_AUTH_OID), serverAuth: usages.includes(SERVER_AUTH_OID),
  });
}

/**
 * A checkServerIdentity for fetch/tls options: the usual hostname check, then the peer's SPIFFE ID must match
 * `expected` (exact, or a prefix ending in "*").
 * @example fetch(url, { tls: { ...mutualTlsClientOptions(id), checkServerIdentity: expectPeer("spiffe://securemesh/server/*") } })
 */
export function expectPeer(expected: string) {
  return (hostname: string, cert: tls.PeerCertificate): Error | undefined => {
    const hostError = hostnameRefusal(hostname, cert);
    if (hostError) return hostError;
    const id = tlsPeerIdentity(cert);
    const ok = expected.endsWith("*") ? id.startsWith(expected.slice(0, -1)) : id === expected;
    return ok ? undefined : new UnexpectedPeer(`reached ${id || "a certificate without an identity"}, expected ${expected}`);
  };
}
