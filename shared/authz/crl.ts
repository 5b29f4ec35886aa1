// Reads our CA's certificate revocation list without the TLS stack: Deno's node:tls ignores the `crl` option, and
// sender proofs are verified outside TLS anyway, so we parse the CRL, check its signature, and answer "revoked?".
import { X509Certificate, verify } from "node:crypto";
import { MeshError } from "../platform/errors.ts";
import {
  children,
  contextTag,
  DerError,
  expectTag,
  isTime,
  readBitStringBytes,
  readDer,
  readInteger,
  readIntegerHex,
  readOid,
  readTime,
  sameBytes,
  Tag,
  type Tlv,
} from "./der.ts";

/** A CRL that cannot be trusted or read: malformed, badly signed, not from our CA. The message never quotes it. */
export class CrlInvalid extends MeshError {
  constructor(reason: string, options?: { cause?: unknown }) {
    super("ERR_CRL_INVALID", 500, `invalid CRL: ${reason}`, options);
  }
}

export interface RevocationList {
  /** Serial numbers revoked, as lowercase hex without leading zeros (same form as normalizeSerial). */
  readonly revoked: ReadonlySet<string>;
  readonly thisUpdate: Date;
  readonly nextUpdate: Date | null;
  /** The crlNumber extension: it grows with every CRL the CA signs, so an older CRL put back shows. Null without one. */
  readonly number: bigint | null;
  /** The signed TBSCertList, byte for byte: two CRLs with equal `tbs` say the same thing (their signatures may differ). */
  readonly tbs: Uint8Array;
  /** Accepts any hex form: upper or lower case, leading zeros, colons. */
  isRevoked(serial: string): boolean;
}

/** "00AB:cd" → "abcd", "0" → "0": one spelling per serial, so set lookups match however a tool printed it. */
export function normalizeSerial(hex: string): string {
  const digits = hex.replace(/:/g, "").toLowerCase();
  if (!/^[0-9a-f]+$/.test(digits)) throw new TypeError("serial number is not hexadecimal");
  return digits.replace(/^0+(?=.)/, "");
}

/** Signature algorithms we accept: the OID → the hash for node:crypto's verify and the CA key type it needs. */
const SIGNATURE_ALGORITHMS: ReadonlyMap<string, { hash: string; keyType: "ec" | "rsa" }> = new Map([
  ["1.2.840.10045.4.3.2", { hash: "sha256", keyType: "ec" }], // ecdsa-with-SHA256
  ["1.2.840.10045.4.3.3", { hash: "sha384", keyType: "ec" }],
  ["1.2.840.10045.4.3.4", { hash: "sha512", keyType: "ec" }],
  ["1.2.840.113549.1.1.11", { hash: "sha256", keyType: "rsa" }], // sha256WithRSAEncryption
  ["1.2.840.113549.1.1.12", { hash: "sha384", keyType: "rsa" }],
  ["1.2.840.113549.1.1.13", { hash: "sha512", keyType: "rsa" }],
]);

const PEM_CRL = /-----BEGIN X509 CRL-----([A-Za-z0-9+/=\s]*)-----END X509 CRL-----/;
const PEM_START = new TextEncoder().encode("-----BEGIN");

/**
 * Parses a PEM (or DER) CRL, verifies its signature with the CA certificate (PEM), and checks its issuer is the
 * CA's subject, byte for byte. Throws CrlInvalid on anything wrong, never another error.
 */
export function parseCrl(crl: string | Uint8Array, caPem: string): RevocationList {
  try {
    return readCrl(toDer(crl), readCa(caPem));
  } catch (error) {
    if (error instanceof CrlInvalid) throw error;
    throw new CrlInvalid("not a well-formed CRL", { cause: error }); // DerError, a bad serial: the bytes are wrong
  }
}

function readCrl(der: Uint8Array, ca: CaCertificate): RevocationList {
  const parts = children(expectTag(readDer(der), Tag.SEQUENCE, "a CertificateList"));
  if (parts.length !== 3) throw new CrlInvalid("CertificateList does not have three fields");
  const tbs = expectTag(parts[0], Tag.SEQUENCE, "a TBSCertList");
  const outerAlgorithm = expectTag(parts[1], Tag.SEQUENCE, "an AlgorithmIdentifier");
  const signature = readBitStringBytes(parts[2]);
  const fields = readTbs(tbs);

  // The signed copy of the algorithm must match the unsigned one, or the unsigned one could be swapped.
  if (!sameBytes(outerAlgorithm.der, fields.algorithm.der)) throw new CrlInvalid("signature algorithm differs from the signed one");
  const algorithm = SIGNATURE_ALGORITHMS.get(readOid(children(fields.algorithm)[0]));
  if (!algorithm) throw new CrlInvalid("unsupported signature algorithm");
  if (ca.cert.publicKey.asymmetricKeyType !== algorithm.keyType) throw new CrlInvalid("signature algorithm does not fit the CA's key");
  if (!sameBytes(fields.issuer.der, ca.subject)) throw new CrlInvalid("issuer is not our CA");
  let valid: boolean;
  try {
    valid = verify(algorithm.hash, tbs.der, ca.cert.publicKey, signature);
  } catch {
    valid = false; // e.g. bytes that are not a DER ECDSA signature
  }
  if (!valid) throw new CrlInvalid("signature does not verify with our CA");

  const revoked: ReadonlySet<string> = fields.revoked;
  return {
    revoked,
    thisUpdate: fields.thisUpdate,
    nextUpdate: fields.nextUpdate,
    number: fields.number,
    tbs: tbs.der,
    isRevoked: (serial) => revoked.has(normalizeSerial(serial)),
  };
}

interface TbsFields {
  algorithm: Tlv;
  issuer: Tlv;
  thisUpdate: Date;
  nextUpdate: Date | null;
  number: bigint | null;
  revoked: Set<string>;
}

/** crlNumber (RFC 5280 5.2.3): a non-negative INTEGER of at most 20 octets, the one CRL extension we process. */
const CRL_NUMBER_OID = "2.5.29.20";
const CRL_NUMBER_LIMIT = 1n << 160n;

/** TBSCertList, field by field; OPTIONAL fields are recognised by their tag. */
function readTbs(tbs: Tlv): TbsFields {
  const fields = children(tbs);
  let i = 0;
  if (fields[i]?.tag === Tag.INTEGER) {
    if (readIntegerHex(fields[i++]!) !== "01") throw new CrlInvalid("version is not v2");
  }
  const algorithm = expectTag(fields[i++], Tag.SEQUENCE, "the signature AlgorithmIdentifier");
  const issuer = expectTag(fields[i++], Tag.SEQUENCE, "the issuer Name");
  const thisUpdate = readTime(fields[i++]);
  const nextUpdate = isTime(fields[i]) ? readTime(fields[i++]) : null;
  const revoked = new Set<string>();
  if (fields[i]?.tag === Tag.SEQUENCE) {
    for (const entry of children(fields[i++]!)) {
      const [serial, date, extensions, ...extra] = children(expectTag(entry, Tag.SEQUENCE, "a revoked certificate entry"));
      if (extra.length > 0) throw new CrlInvalid("revoked certificate entry has extra fields");
      readTime(date);
      if (extensions) readExtensions(extensions, NO_EXTENSIONS);
      revoked.add(normalizeSerial(readIntegerHex(serial)));
    }
  }
  let number: bigint | null = null;
  if (fields[i]?.tag === contextTag(0)) {
    const [extensions, ...extra] = children(fields[i++]!);
    if (!extensions || extra.length > 0) throw new CrlInvalid("crlExtensions is not one Extensions");
    const crlNumber = readExtensions(extensions, CRL_EXTENSIONS).get(CRL_NUMBER_OID);
    if (crlNumber) number = readCrlNumber(crlNumber);
  }
  if (i !== fields.length) throw new CrlInvalid("TBSCertList has unexpected fields");
  return { algorithm, issuer, thisUpdate, nextUpdate, number, revoked };
}

/** The extnValue of a crlNumber extension → the number. */
function readCrlNumber(value: Tlv): bigint {
  let number: bigint;
  try {
    number = readInteger(readDer(value.value));
  } catch (error) {
    if (error instanceof DerError) throw new CrlInvalid("CRL number is not a DER INTEGER", { cause: error });
    throw error;
  }
  if (number < 0n) throw new CrlInvalid("CRL number is negative");
  if (number >= CRL_NUMBER_LIMIT) throw new CrlInvalid("CRL number is longer than 20 octets");
  return number;
}

const CRL_EXTENSIONS: ReadonlySet<string> = new Set([CRL_NUMBER_OID]);
const NO_EXTENSIONS: ReadonlySet<string> = new Set();

/**
 * The values of the extensions we process (`processed`, by OID), each at most once (RFC 5280 4.2). RFC 5280: a
 * CRL with a critical extension we cannot process must not be used. The critical ones in practice
 * (deltaCRLIndicator, issuingDistributionPoint, certificateIssuer) change what the list means, so ignoring them
 * could hide a revocation; non-critical ones we do not process are skipped.
 */
function readExtensions(extensions: Tlv, processed: ReadonlySet<string>): Map<string, Tlv> {
  const values = new Map<string, Tlv>();
  for (const extension of children(expectTag(extensions, Tag.SEQUENCE, "Extensions"))) {
    // Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
    const parts = children(expectTag(extension, Tag.SEQUENCE, "an Extension"));
    if (parts.length !== 2 && parts.length !== 3) throw new CrlInvalid("an Extension has the wrong number of fields");
    const oid = readOid(parts[0]);
    const value = expectTag(parts[parts.length - 1], Tag.OCTET_STRING, "an extension value");
    const critical = parts.length === 3 && expectTag(parts[1], Tag.BOOLEAN, "the critical flag").value[0] !== 0;
    if (processed.has(oid)) {
      if (values.has(oid)) throw new CrlInvalid("CRL has the same extension twice");
      values.set(oid, value);
    } else if (critical) {
      throw new CrlInvalid("CRL has a critical extension we do not process");
    }
  }
  return values;
}

/** The CA certificate and the DER of its subject Name, which a CRL's issuer must equal. */
interface CaCertificate {
  cert: X509Certificate;
  subject: Uint8Array;
}

function readCa(caPem: string): CaCertificate {
  try {
    const cert = new X509Certificate(caPem);
    const [tbsCertificate] = children(expectTag(readDer(cert.raw), Tag.SEQUENCE, "a Certificate"));
    const fields = children(expectTag(tbsCertificate, Tag.SEQUENCE, "a TBSCertificate"));
    // [0] version, serialNumber, signature, issuer, validity, subject; the version is absent in v1 certificates.
    const subjectIndex = fields[0]?.tag === contextTag(0) ? 5 : 4;
    return { cert, subject: expectTag(fields[subjectIndex], Tag.SEQUENCE, "the subject Name").der };
  } catch (error) {
    throw new CrlInvalid("the CA certificate cannot be read", { cause: error });
  }
}

/** PEM text (string or bytes) → DER; bytes that do not start like PEM are taken as DER already. */
function toDer(crl: string | Uint8Array): Uint8Array {
  if (typeof crl !== "string" && !sameBytes(crl.subarray(0, PEM_START.length), PEM_START)) return crl;
  const text = typeof crl === "string" ? crl : new TextDecoder().decode(crl);
  const body = PEM_CRL.exec(text)?.[1];
  if (body === undefined) throw new CrlInvalid("not a PEM X509 CRL");
  const der = Buffer.from(body.replace(/\s+/g, ""), "base64");
  if (der.length === 0) throw new CrlInvalid("PEM holds no data");
  return der;
}
