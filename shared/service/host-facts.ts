// What a host says about itself on /health, so a coordinator and the check command can compare hosts (issue 23): its
// machine, its identity, the policy and CRL in force, when its certificate expires, and its clock.
import { X509Certificate } from "node:crypto";
import { hostname } from "node:os";
import { identityOf, type Authorizer, type TrustMaterial } from "../authz/index.ts";
import { formatCrlNumber } from "../authz/crl-file.ts";
import { extendedKeyUsages } from "../platform/eku.ts";
import type { Metrics } from "../ops/metrics.ts";
import { certificateBlocks } from "../platform/pem.ts";
import { certificateName, CLIENT_AUTH_OID, SERVER_AUTH_OID, type Identity } from "../platform/tls.ts";

/** Clocks further apart than this make hosts refuse each other's proofs near their edges (proof CLOCK_SKEW_S = 10 s). */
export const SKEW_WARNING_MS = 5_000;
/** A certificate that expires sooner than this is warned about (by the host check and the status page). */
export const EXPIRY_WARNING_MS = 14 * 86_400_000;

/**
 * How long before its end a certificate is warned about: 14 days, or a sixth of its life when that is shorter, so a
 * 24-hour certificate warns with 4 hours left rather than from the moment it is issued (issue 21).
 */
export function expiryWarningMs(notBefore: number, notAfter: number): number {
  const life = notAfter - notBefore;
  return Number.isFinite(life) && life > 0 ? Math.min(EXPIRY_WARNING_MS, life / 6) : EXPIRY_WARNING_MS;
}

export interface HostFacts {
  hostname: string;
  identity: string;
  /** policyHash of the policy in force. */
  policy: string;
  /** The CRL number in force ("0x1003"), "none" with --no-crl. */
  crl: string;
  certificateExpires: string;
  /** When its certificate became valid (notBefore): with certificateExpires, its life, which sets the warning. */
  certificateIssued: string;
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
      certificateIssued: new Date(x509.validFrom).toISOString(),
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

/** One certificate a role holds (its own, "identity") or trusts (each CA of its bundle, "ca"), and when it expires. */
export interface CertificateExpiry {
  kind: "identity" | "ca";
  /** The subject's CN, as pki.sh names it ("server", "securemesh CA"). */
  name: string;
  /** Upper-case hex, as `openssl x509 -serial` and `./pki.sh list` print it. */
  serial: string;
  /** notAfter, in ms since the epoch. */
  notAfter: number;
}

/** The role's own certificate, then every CA it trusts, each with its notAfter. */
export function certificateExpiries(identity: Identity): CertificateExpiry[] {
  const expiry = (kind: CertificateExpiry["kind"], pem: string): CertificateExpiry => {
    const x509 = new X509Certificate(pem);
    return { kind, name: certificateName(x509), serial: x509.serialNumber.toUpperCase(), notAfter: Date.parse(x509.validTo) };
  };
  return [expiry("identity", identity.cert), ...certificateBlocks(identity.ca).map((pem) => expiry("ca", pem))];
}

/**
 * The gauge an operator alerts on before a certificate runs out (issue 21): securemesh_certificate_expiry_timestamp_seconds,
 * one sample per certificate the role holds or trusts, read from the material in force (so a reload shows at once).
 */
export function exportCertificateExpiry(metrics: Metrics, current: () => Identity): void {
  let cached: { identity: Identity; expiries: CertificateExpiry[] } | undefined;
  metrics.collect(
    "securemesh_certificate_expiry_timestamp_seconds",
    "When a certificate this role holds (kind=identity) or trusts (kind=ca) expires: its notAfter, in seconds since the Unix epoch.",
    "gauge",
    () => {
      const identity = current();
      if (cached?.identity !== identity) cached = { identity, expiries: certificateExpiries(identity) };
      return cached.expiries.map(({ kind, name, serial, notAfter }) => ({ labels: { kind, name, serial }, value: notAfter / 1000 }));
    },
  );
}
