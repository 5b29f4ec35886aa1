// Internal hops check whom they reached, not only that the CA signed it: any certificate of our CA with the
// right address would otherwise pass as a server or the KeyServer (#11, hardening; issue 18 H1).
import type tls from "node:tls";
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
    subject: peer.subject as unknown as Record<string, unknown> | undefined,
    subjectaltname: peer.subjectaltname,
    clientAuth: usages.includes(CLIENT_AUTH_OID),
    serverAuth: usages.includes(SERVER_AUTH_OID),
  });
}

/**
 * Whether `id` is `expected`, or, for a pattern ending in a whole "/*" segment, has more after that prefix. A "*"
 * inside a name has no boundary (`server/s*` would take `server/s-impostor`), so such a pattern matches nothing.
 */
export function identityMatches(expected: string, id: string): boolean {
  if (!expected.endsWith("/*")) return !expected.includes("*") && id === expected;
  const prefix = expected.slice(0, -1);
  return id.startsWith(prefix) && id.length > prefix.length;
}

export interface ExpectPeerOptions {
  /** Our CA's revocation list, asked with the peer's serial: a revoked serving certificate is refused too. */
  isRevoked?: (serialHex: string) => boolean;
}

/**
 * A checkServerIdentity for the hops that serve us: the host name against the certificate's SANs (never its CN),
 * the serverAuth EKU, the SPIFFE ID it names against `expected` (exact, or a prefix ending in "*"), and revocation.
 * The peer certificate must carry `ext_key_usage` (shared/platform/eku.ts fills it in on Deno).
 * @example new HttpsClient({ tls: { ...mutualTlsClientOptions(id), checkServerIdentity: expectPeer("spiffe://securemesh/server/*") } })
 */
export function expectPeer(expected: string, options: ExpectPeerOptions = {}) {
  return (hostname: string, cert: tls.PeerCertificate): Error | undefined => {
    const hostError = hostnameRefusal(hostname, cert);
    if (hostError) return hostError;
    const id = tlsPeerIdentity(cert);
    if (!identityMatches(expected, id)) return new UnexpectedPeer(`reached ${id || "a certificate without an identity"}, expected ${expected}`);
    if (!(cert.ext_key_usage ?? []).includes(SERVER_AUTH_OID)) return new UnexpectedPeer(`reached ${id}, whose certificate is not for serving (no serverAuth)`);
    if (options.isRevoked?.(cert.serialNumber ?? "")) return new UnexpectedPeer(`reached ${id}, whose certificate is revoked (serial ${cert.serialNumber})`);
    return undefined;
  };
}
