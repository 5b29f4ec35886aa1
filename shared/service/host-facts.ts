// What a host says about itself on /health, so a coordinator and the check command can compare hosts (issue 23): its
// machine, its identity, the policy and CRL in force, when its certificate expires, and its clock.
import { X509Certificate } from "node:crypto";
import { hostname } from "node:os";
import { identityOf, type Authorizer, type TrustMaterial } from "../authz/index.ts";
import { formatCrlNumber } from "../authz/crl-file.ts";
import { extendedKeyUsages } from "../platform/eku.ts";
import { CLIENT_AUTH_OID, SERVER_AUTH_OID } from "../platform/tls.ts";

/** Clocks further apart than this make hosts refuse each other's proofs near their edges (proof CLOCK_SKEW_S = 10 s). */
export const SKEW_WARNING_MS = 5_000;
/** A certificate that expires sooner than this is warned about (by the host check and the status page). */
export const EXPIRY_WARNING_MS = 14 * 86_400_000;

export interface HostFacts {
  hostname: string;
  identity: string;
  /** policyHash of the policy in force. */
  policy: string;
  /** The CRL number in force ("0x1003"), "none" with --no-crl. */
  crl: string;
  certificateExpires: string;
  /** This host's clock (ms since the epoch) when it answered: a peer compares it with its own. */
  time: number;
  /** A server's record store id (RecordStore.storeId): servers of one mesh share one. */
  store?: string;
}

/** Reads the facts afresh on each call: the policy, the CRL and the certificate reload while the role runs. */
export function hostFacts(trust: TrustMaterial, authz: Authorizer, now: () => number = Date.now): () => HostFacts {
  return () => {
    const x509 = new X509Certificate(trust.identity.cert);
    return {
      hostname: hostname(),
      identity: certificateIdentity(x509),
      policy: authz.hash,
      crl: trust.crlStatus().enabled ? formatCrlNumber(trust.crlStatus().number) : "none",
      certificateExpires: new Date(x509.validTo).toISOString(),
      time: now(),
    };
  };
}

/** The identity a peer would see in this certificate (the same rules as a listener's). */
export function certificateIdentity(x509: X509Certificate): string {
  const usages = extendedKeyUsages(x509.raw);
  return identityOf({
    subject: x509.subject,
    subjectAltName: x509.subjectAltName ?? "",
    clientAuth: usages.includes(CLIENT_AUTH_OID),
    serverAuth: usages.includes(SERVER_AUTH_OID),
  });
}
