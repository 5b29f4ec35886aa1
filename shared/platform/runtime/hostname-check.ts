// Every outbound TLS hop checks the peer's host name or address against its certificate's SANs (#14).
import { isIP } from "node:net";
import tls from "node:tls";
import type { IdentityCheck } from "./types.ts";

/**
 * `check` after node's hostname check. A request's own checkServerIdentity replaces the runtime's hostname check
 * (Bun's fetch and node:https call only the one they are given: measured, a check returning undefined let a
 * certificate for 127.0.0.2 through on 127.0.0.3), so the adapters wrap every one in this: no identity check can
 * forget the host, and none can match the peer by its SPIFFE ID alone.
 */
export function afterHostnameCheck(check: IdentityCheck): IdentityCheck {
  return (hostname, cert) => hostnameRefusal(hostname, cert) ?? check(hostname, cert);
}

/**
 * node's check, minus its fallback to the common name: a certificate with no DNS SAN names no host, whatever its CN
 * (RFC 6125 6.4.4). pki.sh's leaves carry CN=NAME, so `issue localhost --server --san IP:10.9.9.9` was accepted at
 * https://localhost (found by attack on #14). An address is matched against the IP SANs only, as node does.
 */
export function hostnameRefusal(hostname: string, cert: tls.PeerCertificate): Error | undefined {
  const bare = hostname.replace(/^\[|\]$/g, "");
  const hasDnsSan = /(^|, )DNS:/.test(cert.subjectaltname ?? "");
  if (!isIP(bare) && !hasDnsSan) {
    return Object.assign(
      new Error(`Hostname/IP does not match certificate's altnames: Host: ${hostname}. is not in the cert's altnames: ${cert.subjectaltname ?? "none"}`),
      { code: "ERR_TLS_CERT_ALTNAME_INVALID", reason: "no DNS name in the certificate", host: hostname, cert },
    );
  }
  return tls.checkServerIdentity(hostname, cert);
}
