// What a certificate may be used for, read from its DER: its extended key usages, and whether it is a CA. Deno's
// X509Certificate.keyUsage returns the key usage instead, its X509Certificate.ca said false for our CA's own
// certificate, and its peer certificates carry no ext_key_usage, so none of these can be asked on both runtimes.
import type tls from "node:tls";
import { children, contextTag, expectTag, readDer, readOid, Tag } from "../authz/der.ts";

const EXTENDED_KEY_USAGE_OID = "2.5.29.37";
const BASIC_CONSTRAINTS_OID = "2.5.29.19";

/** The value of the extension `oid` of a DER certificate, or null without one. Throws DerError on bad DER. */
function extensionValue(der: Uint8Array, wanted: string): Uint8Array | null {
  const certificate = children(expectTag(readDer(der), Tag.SEQUENCE, "a Certificate"));
  const tbs = children(expectTag(certificate[0], Tag.SEQUENCE, "a TBSCertificate"));
  const extensions = tbs.find((field) => field.tag === contextTag(3));
  if (!extensions) return null;
  for (const extension of children(expectTag(children(extensions)[0], Tag.SEQUENCE, "Extensions"))) {
    const [oid, ...rest] = children(expectTag(extension, Tag.SEQUENCE, "an Extension"));
    if (readOid(oid) === wanted) return expectTag(rest[rest.length - 1], Tag.OCTET_STRING, "an extension value").value;
  }
  return null;
}

/** The EKU OIDs of a DER certificate, [] when it has no extendedKeyUsage extension. Throws DerError on bad DER. */
export function extendedKeyUsages(der: Uint8Array): string[] {
  const value = extensionValue(der, EXTENDED_KEY_USAGE_OID);
  if (!value) return [];
  return children(expectTag(readDer(value), Tag.SEQUENCE, "an ExtKeyUsageSyntax")).map((usage) => readOid(usage));
}

/**
 * Whether a DER certificate's basicConstraints says it is a CA (cA TRUE). A CA certificate is never a client's,
 * though BoringSSL authorizes one as a client's leaf; unreadable DER counts as a CA, so it is refused too.
 */
export function isCertificateAuthority(der: Uint8Array): boolean {
  try {
    const value = extensionValue(der, BASIC_CONSTRAINTS_OID);
    if (!value) return false;
    const [first] = children(expectTag(readDer(value), Tag.SEQUENCE, "BasicConstraints"));
    return first?.tag === Tag.BOOLEAN && first.value.some((byte) => byte !== 0);
  } catch {
    return true;
  }
}

/** Whether a certificate (anything with its DER as `raw`: X509Certificate, a TLS peer certificate) names `oid`. */
export function hasExtendedKeyUsage(cert: { raw: Uint8Array }, oid: string): boolean {
  try {
    return extendedKeyUsages(cert.raw).includes(oid);
  } catch {
    return false; // unreadable: it proves no usage
  }
}

/**
 * A TLS peer certificate with `ext_key_usage` as node:tls gives it: read from its DER where the runtime left it out
 * (Deno), so identity checks written against node's shape (shared/authz/expect-peer.ts) see the same on both.
 */
export function withExtendedKeyUsage<C extends tls.PeerCertificate>(peer: C): C {
  if (peer.ext_key_usage !== undefined || !peer.raw) return peer;
  let usages: string[];
  try {
    usages = extendedKeyUsages(peer.raw);
  } catch {
    usages = [];
  }
  return { ...peer, ext_key_usage: usages };
}
