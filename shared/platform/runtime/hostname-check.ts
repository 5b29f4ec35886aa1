// Every outbound TLS hop checks the peer's host name or address against its certificate's SANs (#14).
import tls from "node:tls";
import type { IdentityCheck } from "./types.ts";

/**
 * `check` after node's hostname check. A request's own checkServerIdentity replaces the runtime's hostname check
 * (Bun's fetch and node:https call only the one they are given: measured, a check returning undefined let a
 * certificate for 127.0.0.2 through on 127.0.0.3), so the adapters wrap every one in this: no identity check can
 * forget the host, and none can match the peer by its SPIFFE ID alone.
 */
export function afterHostnameCheck(check: IdentityCheck): IdentityCheck {
  return (hostname, cert) => tls.checkServerIdentity(hostname, cert) ?? check(hostname, cert);
}
