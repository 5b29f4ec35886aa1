// The extended key usages a certificate names, read from its DER: Deno's X509Certificate.keyUsage returns the key
// usage instead, and Deno's peer certificates carry no ext_key_usage, so neither can be asked on both runtimes.
import type tls from "node:tls";
import { children, contextTag, expectTag, readDer, readOid, Tag } from "../authz/der.ts";

const EXTENDED_KEY_USAGE_OID = "2.5.29.37";

/** The EKU OIDs of a DER certificate, [] when it has no extendedKeyUsage extension. Throws DerError on bad DER. */
export function extendedKeyUsages(der: Uint8Array): string[] {
  const certificate = children(expectTag(readDer(der), Tag.SEQUENCE, "a Certificate"));
  const tbs = children(expectTag(certificate[0], Tag.SEQUENCE, "a TBSCertificate"));
  const extensions = tbs.find((field) => field.tag === contextTag(3));
  if (!extensions) return [];
  for (const extension of children(expectTag(children(extensions)[0], Tag.SEQUENCE, "Extensions"))) {
    const [oid, ...rest] = children(expectTag(extension, Tag.SEQUENCE, "an Extension"));
    if (readOid(oid) !== EXTENDED_KEY_USAGE_OID) continue;
    const value = expectTag(rest[rest.length - 1], Tag.OCTET_STRING, "an extension value").value;
    return children(expectTag(readDer(value), Tag.SEQUENCE, "an ExtKeyUsageSyntax")).map((usage) => readOid(usage));
  }
  return [];
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
