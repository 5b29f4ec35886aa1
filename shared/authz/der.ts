// A minimal DER reader for the few X.509 structures we must read ourselves: CRLs (Deno's node:tls ignores the
// `crl` option, and sender proofs are verified outside TLS) and, later, certificate extensions such as
// extendedKeyUsage. Every read is bounds-checked, so hostile input throws DerError instead of reading past the end.

/** Input that is not the DER we expect. The message names the problem, never the bytes. */
export class DerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DerError";
  }
}

/** Universal tags (single identifier octet) used in X.509. */
export const Tag = {
  BOOLEAN: 0x01,
  INTEGER: 0x02,
  BIT_STRING: 0x03,
  OCTET_STRING: 0x04,
  NULL: 0x05,
  OID: 0x06,
  UTC_TIME: 0x17,
  GENERALIZED_TIME: 0x18,
  SEQUENCE: 0x30,
  SET: 0x31,
} as const;

/** Context-specific constructed tag [n], as in `[0] EXPLICIT`. */
export const contextTag = (n: number): number => 0xa0 | n;

/** One tag-length-value element. `der` is the whole encoding (what a signature covers), `value` its contents. */
export interface Tlv {
  readonly tag: number;
  readonly der: Uint8Array;
  readonly value: Uint8Array;
}

const CONSTRUCTED = 0x20;
const MAX_LENGTH_OCTETS = 4; // nothing we read comes near 4 GiB

/** Reads the element starting at `offset`; returns it and the offset just past it. */
export function readTlv(buf: Uint8Array, offset = 0): { tlv: Tlv; next: number } {
  if (offset >= buf.length) throw new DerError("DER ends before an element");
  const tag = buf[offset]!;
  if ((tag & 0x1f) === 0x1f) throw new DerError("DER high-tag-number form is not used in X.509");
  let pos = offset + 1;
  if (pos >= buf.length) throw new DerError("DER ends inside a length");
  const first = buf[pos++]!;
  let length = first;
  if (first & 0x80) {
    const count = first & 0x7f;
    if (count === 0) throw new DerError("DER forbids indefinite lengths");
    if (count > MAX_LENGTH_OCTETS) throw new DerError("DER length is too large");
    if (pos + count > buf.length) throw new DerError("DER ends inside a length");
    length = 0;
    for (let i = 0; i < count; i++) length = length * 256 + buf[pos++]!;
    // DER's lengths are minimal: long form only from 128, and without leading zero octets.
    if (length < 0x80 || buf[pos - count] === 0) throw new DerError("DER length is not minimally encoded");
  }
  const end = pos + length;
  if (end > buf.length) throw new DerError("DER element runs past the end of its input");
  return { tlv: { tag, der: buf.subarray(offset, end), value: buf.subarray(pos, end) }, next: end };
}

/** Parses `buf` as exactly one element: trailing bytes are an error. */
export function readDer(buf: Uint8Array): Tlv {
  const { tlv, next } = readTlv(buf, 0);
  if (next !== buf.length) throw new DerError("DER has trailing bytes after its element");
  return tlv;
}

/** The elements inside a constructed element (SEQUENCE, SET, [n]), which must fill it exactly. */
export function children(tlv: Tlv): Tlv[] {
  if (!(tlv.tag & CONSTRUCTED)) throw new DerError("DER element is not constructed");
  const out: Tlv[] = [];
  for (let offset = 0; offset < tlv.value.length; ) {
    const { tlv: child, next } = readTlv(tlv.value, offset);
    out.push(child);
    offset = next;
  }
  return out;
}

/** Throws unless `tlv` exists and has `tag`; `what` names the field in the message. */
export function expectTag(tlv: Tlv | undefined, tag: number, what: string): Tlv {
  if (!tlv || tlv.tag !== tag) throw new DerError(`expected ${what}`);
  return tlv;
}

/** OBJECT IDENTIFIER → dotted form, e.g. "1.2.840.10045.4.3.2". */
export function readOid(tlv: Tlv | undefined): string {
  const bytes = expectTag(tlv, Tag.OID, "an OBJECT IDENTIFIER").value;
  if (bytes.length === 0 || bytes[bytes.length - 1]! & 0x80) throw new DerError("OBJECT IDENTIFIER is truncated");
  const arcs: number[] = [];
  let arc = 0;
  for (let i = 0; i < bytes.length; i++) {
    const byte = bytes[i]!;
    if (arc === 0 && byte === 0x80) throw new DerError("OBJECT IDENTIFIER arc is not minimally encoded");
    arc = arc * 128 + (byte & 0x7f);
    if (arc > Number.MAX_SAFE_INTEGER / 128) throw new DerError("OBJECT IDENTIFIER arc is too large");
    if (!(byte & 0x80)) {
      arcs.push(arc);
      arc = 0;
    }
  }
  const first = arcs.shift()!;
  const top = first < 40 ? 0 : first < 80 ? 1 : 2;
  return [top, first - top * 40, ...arcs].join(".");
}

/** INTEGER → its content octets as lowercase hex (two's complement, as encoded). */
export function readIntegerHex(tlv: Tlv | undefined): string {
  const bytes = expectTag(tlv, Tag.INTEGER, "an INTEGER").value;
  if (bytes.length === 0) throw new DerError("INTEGER is empty");
  return Buffer.from(bytes).toString("hex");
}

/**
 * INTEGER → bigint (two's complement, as DER encodes it), for numbers that may not fit a double, such as a CRL
 * number (up to 20 octets, RFC 5280 5.2.3). DER's encoding is minimal: no redundant leading 0x00 or 0xff octet.
 */
export function readInteger(tlv: Tlv | undefined): bigint {
  const bytes = expectTag(tlv, Tag.INTEGER, "an INTEGER").value;
  if (bytes.length === 0) throw new DerError("INTEGER is empty");
  if (bytes.length > 1 && ((bytes[0] === 0x00 && !(bytes[1]! & 0x80)) || (bytes[0] === 0xff && bytes[1]! & 0x80))) {
    throw new DerError("INTEGER is not minimally encoded");
  }
  const unsigned = BigInt(`0x${Buffer.from(bytes).toString("hex")}`);
  return bytes[0]! & 0x80 ? unsigned - (1n << BigInt(bytes.length * 8)) : unsigned;
}

/** BIT STRING → its bytes; X.509 signatures and keys are whole octets, so unused bits must be 0. */
export function readBitStringBytes(tlv: Tlv | undefined): Uint8Array {
  const value = expectTag(tlv, Tag.BIT_STRING, "a BIT STRING").value;
  if (value.length === 0 || value[0] !== 0) throw new DerError("BIT STRING does not hold whole octets");
  return value.subarray(1);
}

/** Returns true when `tlv` is a Time (UTCTime or GeneralizedTime). */
export function isTime(tlv: Tlv | undefined): tlv is Tlv {
  return tlv?.tag === Tag.UTC_TIME || tlv?.tag === Tag.GENERALIZED_TIME;
}

/** UTCTime (YYMMDDHHMMSSZ; YY < 50 is 20YY, per RFC 5280) or GeneralizedTime (YYYYMMDDHHMMSSZ) → Date. */
export function readTime(tlv: Tlv | undefined): Date {
  if (!isTime(tlv)) throw new DerError("expected a UTCTime or GeneralizedTime");
  const text = new TextDecoder().decode(tlv.value);
  const match = tlv.tag === Tag.UTC_TIME ? /^(\d{2})(\d{10})Z$/.exec(text) : /^(\d{4})(\d{10})Z$/.exec(text);
  if (!match) throw new DerError("time is not in DER form (…SSZ)");
  let year = Number(match[1]);
  if (tlv.tag === Tag.UTC_TIME) year += year < 50 ? 2000 : 1900;
  const [month, day, hour, minute, second] = (match[2]!.match(/\d\d/g) ?? []).map(Number) as [number, number, number, number, number];
  const date = new Date(Date.UTC(year, month - 1, day, hour, minute, second));
  // Date.UTC rolls 31 February over into March; a round trip catches every out-of-range field.
  if (
    date.getUTCFullYear() !== year ||
    date.getUTCMonth() !== month - 1 ||
    date.getUTCDate() !== day ||
    date.getUTCHours() !== hour ||
    date.getUTCMinutes() !== minute ||
    date.getUTCSeconds() !== second
  ) {
    throw new DerError("time has an out-of-range field");
  }
  return date;
}

/** Byte-for-byte equality, e.g. of two Names' DER. */
export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}
