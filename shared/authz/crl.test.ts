// CRL reading against real PKIs from pki.sh, with openssl and Python's cryptography as independent oracles.
import { beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { copyFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { REPO_ROOT } from "../platform/config.ts";
import { rsaTestPki, testPki } from "../testing/pki.ts";
import { runPython } from "../testing/python.ts";
import { CrlInvalid, normalizeSerial, parseCrl } from "./crl.ts";
import { contextTag, DerError, readDer, readTime, Tag } from "./der.ts";

setDefaultTimeout(30_000); // building three PKIs (one RSA) takes a few seconds on a busy machine

/** Runs a command, failing the test with its stderr unless it exits 0; returns stdout. */
async function run(cmd: string[], env: Record<string, string> = {}): Promise<Buffer> {
  await using proc = Bun.spawn(cmd, { env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).arrayBuffer(), new Response(proc.stderr).text(), proc.exited]);
  if (exitCode !== 0) throw new Error(`${cmd.join(" ")} exited ${exitCode}: ${stderr.trim()}`);
  return Buffer.from(stdout);
}

const revoke = (dir: string, name: string) => run(["bash", join(REPO_ROOT, "pki.sh"), "revoke", name], { PKI_DIR: dir });
const read = (dir: string, file: string) => readFileSync(join(dir, file), "utf8");
const crlOf = (dir: string, file = "crl.pem") => parseCrl(read(dir, file), read(dir, "ca_cert.pem"));
const crlDer = (dir: string) => run(["openssl", "crl", "-in", join(dir, "crl.pem"), "-outform", "DER"]);

/** Every certificate's serial as `openssl x509 -serial` prints it (upper-case hex), by name; one spawn per PKI. */
async function opensslSerials(dir: string): Promise<Record<string, string>> {
  const script = `for f in "$1"/*_cert.pem; do printf '%s ' "$(basename "$f" _cert.pem)"; openssl x509 -in "$f" -noout -serial; done`;
  const lines = (await run(["bash", "-c", script, "serials", dir])).toString().trim().split("\n");
  return Object.fromEntries(lines.map((line) => line.split(" serial=") as [string, string]));
}

interface PythonView {
  revoked: string[];
  thisUpdate: number;
  nextUpdate: number | null;
  signed: boolean;
}

/**
 * One Python run (its start-up is the slow part): how cryptography reads each CRL file (lowercase hex serials, dates
 * in ms, whether the CA signed it), and CRLs it signs with our CA keys — serials 0x80 and 0xff00 (DER adds a leading
 * zero), thisUpdate 2049 (UTCTime), nextUpdate 2051 (GeneralizedTime), a reason code on each entry.
 */
const PYTHON_ORACLE = `
import datetime, json, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
utc = datetime.timezone.utc

def utc_ms(when):
  # cryptography 42+ gives aware datetimes (*_utc); older ones, such as Debian 12's 38, naive ones in UTC
  return None if when is None else when.replace(tzinfo=utc).timestamp() * 1000

def view(d, name):
  crl = x509.load_pem_x509_crl(open(d + "/" + name, "rb").read())
  ca = x509.load_pem_x509_certificate(open(d + "/ca_cert.pem", "rb").read())
  return {
    "revoked": sorted(format(entry.serial_number, "x") for entry in crl),
    "thisUpdate": utc_ms(crl.last_update_utc if hasattr(crl, "last_update_utc") else crl.last_update),
    "nextUpdate": utc_ms(crl.next_update_utc if hasattr(crl, "next_update_utc") else crl.next_update),
    "signed": crl.is_signature_valid(ca.public_key()),
  }

def make(d, hash, critical_delta=False, issuer=None):
  ca = x509.load_pem_x509_certificate(open(d + "/ca_cert.pem", "rb").read())
  key = serialization.load_pem_private_key(open(d + "/ca_key.pem", "rb").read(), None)
  builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer or ca.subject)
    .last_update(datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=utc))
    .next_update(datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=utc)))
  for serial in (0x80, 0xff00):
    builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
      .revocation_date(datetime.datetime(2049, 1, 1, tzinfo=utc))
      .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False).build())
  if critical_delta:
    builder = builder.add_extension(x509.DeltaCRLIndicator(1), critical=True)
  return builder.sign(key, hash()).public_bytes(serialization.Encoding.PEM).decode()

ec, rsa = sys.argv[1], sys.argv[2]
print(json.dumps({
  "empty": view(ec, "crl-empty.pem"),
  "revoked": view(ec, "crl.pem"),
  "rsa": view(rsa, "crl.pem"),
  "ecdsaSha384": make(ec, hashes.SHA384),
  "rsaSha512": make(rsa, hashes.SHA512),
  "delta": make(ec, hashes.SHA256, critical_delta=True),
  "otherIssuer": make(ec, hashes.SHA256, issuer=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not our CA")])),
  "ecdsaSha224": make(ec, hashes.SHA224),
}))
`;

let python: {
  empty: PythonView;
  revoked: PythonView;
  rsa: PythonView;
  ecdsaSha384: string;
  rsaSha512: string;
  delta: string;
  otherIssuer: string;
  ecdsaSha224: string;
};

/** Expects `parse` to throw CrlInvalid (and nothing else); returns its message. */
function rejection(parse: () => unknown): string {
  try {
    parse();
  } catch (error) {
    expect(error).toBeInstanceOf(CrlInvalid);
    return (error as CrlInvalid).message;
  }
  throw new Error("the CRL was accepted");
}

let pki: string; // EC; crl-empty.pem is its CRL when fresh, crl.pem lists client1 and client2
let rsa: string; // --rsa, nothing revoked (shared with other tests: read only)
let other: string; // a second, unrelated CA with the same subject name (shared: read only)
let serials: Record<string, string>;
let rsaSerials: Record<string, string>;

beforeAll(async () => {
  [pki, rsa, other] = await Promise.all([
    testPki("crl-revocation").then(async (dir) => {
      copyFileSync(join(dir, "crl.pem"), join(dir, "crl-empty.pem"));
      await revoke(dir, "client1"); // one at a time: each rewrites the CA's index and crl.pem
      await revoke(dir, "client2");
      return dir;
    }),
    rsaTestPki(),
    testPki("other"),
  ]);
  let out: string;
  [out, serials, rsaSerials] = await Promise.all([runPython(PYTHON_ORACLE, "", {}, [pki, rsa]), opensslSerials(pki), opensslSerials(rsa)]);
  python = JSON.parse(out);
});

describe("parseCrl on pki.sh's CRLs", () => {
  test("a fresh PKI's CRL is valid, lists nothing, and has the dates Python reads", () => {
    const list = crlOf(pki, "crl-empty.pem");
    expect(python.empty.signed).toBe(true);
    expect(python.empty.revoked).toEqual([]);
    expect(list.revoked.size).toBe(0);
    expect(list.isRevoked(serials.client1!)).toBe(false);
    expect(list.thisUpdate.getTime()).toBe(python.empty.thisUpdate);
    expect(list.nextUpdate?.getTime()).toBe(python.empty.nextUpdate!);
  });

  test("after revoking two certificates, exactly their serials are revoked, in every spelling", () => {
    const list = crlOf(pki);
    const revoked = [serials.client1!, serials.client2!];
    expect(python.revoked.signed).toBe(true);
    expect([...list.revoked].sort()).toEqual(python.revoked.revoked);
    expect([...list.revoked].sort()).toEqual(revoked.map(normalizeSerial).sort());
    for (const serial of revoked) {
      expect(list.isRevoked(serial)).toBe(true); // openssl's upper case
      expect(list.isRevoked(`00${serial.toLowerCase()}`)).toBe(true);
      expect(list.isRevoked(serial.match(/../g)!.join(":"))).toBe(true);
    }
    expect(list.isRevoked(new X509Certificate(read(pki, "client1_cert.pem")).serialNumber)).toBe(true);
    const others = Object.entries(serials).filter(([name]) => name !== "client1" && name !== "client2");
    expect(others.length).toBeGreaterThanOrEqual(5);
    for (const [, serial] of others) expect(list.isRevoked(serial)).toBe(false);
    expect(list.thisUpdate.getTime()).toBe(python.revoked.thisUpdate);
    expect(list.nextUpdate?.getTime()).toBe(python.revoked.nextUpdate!);
  });

  test("an RSA PKI's CRL verifies too", () => {
    const list = crlOf(rsa);
    expect(python.rsa.signed).toBe(true);
    expect([...list.revoked]).toEqual(python.rsa.revoked);
    expect(list.isRevoked(rsaSerials.client1!)).toBe(false);
    expect(list.thisUpdate.getTime()).toBe(python.rsa.thisUpdate);
  });

  test("DER bytes and PEM bytes read the same as PEM text", async () => {
    const ca = read(pki, "ca_cert.pem");
    const fromDer = parseCrl(await crlDer(pki), ca);
    const fromPemBytes = parseCrl(readFileSync(join(pki, "crl.pem")), ca);
    expect([...fromDer.revoked]).toEqual([...crlOf(pki).revoked]);
    expect([...fromPemBytes.revoked]).toEqual([...crlOf(pki).revoked]);
  });
});

describe("CRLs signed by Python's cryptography", () => {
  test("ECDSA-SHA384 and RSA-SHA512 signatures, GeneralizedTime, serials with a leading zero, entry extensions", () => {
    for (const [dir, pem] of [
      [pki, python.ecdsaSha384],
      [rsa, python.rsaSha512],
    ] as const) {
      const list = parseCrl(pem, read(dir, "ca_cert.pem"));
      expect([...list.revoked].sort()).toEqual(["80", "ff00"]);
      expect(list.thisUpdate.toISOString()).toBe("2049-12-31T23:59:59.000Z");
      expect(list.nextUpdate?.toISOString()).toBe("2051-01-02T03:04:05.000Z");
    }
  });

  test("a critical extension we do not process (a delta CRL) is refused", () => {
    expect(rejection(() => parseCrl(python.delta, read(pki, "ca_cert.pem")))).toBe("invalid CRL: CRL has a critical extension we do not process");
  });

  test("a CRL our CA key signed for another issuer name, or with an algorithm we do not accept, is refused", () => {
    const ca = read(pki, "ca_cert.pem");
    expect(rejection(() => parseCrl(python.otherIssuer, ca))).toBe("invalid CRL: issuer is not our CA");
    expect(rejection(() => parseCrl(python.ecdsaSha224, ca))).toBe("invalid CRL: unsupported signature algorithm");
  });
});

describe("parseCrl refuses what it cannot trust", () => {
  test("a CRL signed by another CA (with the very same subject name)", () => {
    expect(rejection(() => parseCrl(read(other, "crl.pem"), read(pki, "ca_cert.pem")))).toBe("invalid CRL: signature does not verify with our CA");
  });

  test("an EC-signed CRL checked against an RSA CA", () => {
    expect(rejection(() => parseCrl(read(pki, "crl.pem"), read(rsa, "ca_cert.pem")))).toBe("invalid CRL: signature algorithm does not fit the CA's key");
  });

  test("one flipped byte in the signature, or in a revoked serial", async () => {
    const der = await crlDer(pki);
    const ca = read(pki, "ca_cert.pem");
    const badSignature = Buffer.from(der);
    badSignature[badSignature.length - 1]! ^= 0x01;
    expect(rejection(() => parseCrl(badSignature, ca))).toBe("invalid CRL: signature does not verify with our CA");

    const serial = Buffer.from(serials.client1!, "hex");
    const at = der.indexOf(serial);
    expect(at).toBeGreaterThan(0);
    const badSerial = Buffer.from(der);
    badSerial[at + 5]! ^= 0x01;
    expect(rejection(() => parseCrl(badSerial, ca))).toBe("invalid CRL: signature does not verify with our CA");
  });

  test("an outer signature algorithm that differs from the signed one", async () => {
    const der = await crlDer(pki);
    const ecdsaWithSha256 = Buffer.from("06082a8648ce3d040302", "hex");
    const outer = der.lastIndexOf(ecdsaWithSha256);
    expect(outer).toBeGreaterThan(der.indexOf(ecdsaWithSha256)); // the tbs copy comes first
    const swapped = Buffer.from(der);
    swapped[outer + ecdsaWithSha256.length - 1] = 0x03; // ecdsa-with-SHA384
    expect(rejection(() => parseCrl(swapped, read(pki, "ca_cert.pem")))).toBe("invalid CRL: signature algorithm differs from the signed one");
  });

  test("every single flipped byte and every truncation throws CrlInvalid, never another error", async () => {
    const der = await crlDer(pki);
    const ca = read(pki, "ca_cert.pem");
    for (let i = 0; i < der.length; i++) {
      for (const mask of [0x01, 0x80, 0xff]) {
        const bad = Buffer.from(der);
        bad[i]! ^= mask;
        rejection(() => parseCrl(bad, ca));
      }
      rejection(() => parseCrl(der.subarray(0, i), ca));
    }
    rejection(() => parseCrl(Buffer.concat([der, Buffer.from([0])]), ca)); // a trailing byte
  });

  test("empty input, garbage PEM, noise bytes and a bad CA certificate", () => {
    const ca = read(pki, "ca_cert.pem");
    const crl = read(pki, "crl.pem");
    expect(rejection(() => parseCrl("", ca))).toBe("invalid CRL: not a PEM X509 CRL");
    expect(rejection(() => parseCrl(new Uint8Array(), ca))).toBe("invalid CRL: not a well-formed CRL");
    expect(rejection(() => parseCrl("-----BEGIN X509 CRL-----\n-----END X509 CRL-----\n", ca))).toBe("invalid CRL: PEM holds no data");
    expect(rejection(() => parseCrl("-----BEGIN X509 CRL-----\nnot base64 at all!\n-----END X509 CRL-----\n", ca))).toBe("invalid CRL: not a PEM X509 CRL");
    expect(rejection(() => parseCrl("-----BEGIN X509 CRL-----\nAAAAAAAA\n-----END X509 CRL-----\n", ca))).toBe("invalid CRL: not a well-formed CRL");
    expect(rejection(() => parseCrl(ca, ca))).toBe("invalid CRL: not a PEM X509 CRL"); // a certificate, not a CRL
    expect(
      rejection(() =>
        parseCrl(
          Uint8Array.from({ length: 512 }, (_, i) => (i * 151 + 7) & 0xff),
          ca,
        ),
      ),
    ).toBe("invalid CRL: not a well-formed CRL");
    expect(rejection(() => parseCrl(crl, "not a certificate"))).toBe("invalid CRL: the CA certificate cannot be read");
  });

  test("CrlInvalid carries its code and status, and its message never quotes the input", () => {
    const base64 = read(pki, "crl.pem").split("\n")[1]!;
    const error = new CrlInvalid("x");
    expect(error.code).toBe("ERR_CRL_INVALID");
    expect(error.status).toBe(500);
    const message = rejection(() => parseCrl(`-----BEGIN X509 CRL-----\n${base64}\n-----END X509 CRL-----\n`, read(pki, "ca_cert.pem")));
    expect(message).not.toContain(base64.slice(0, 16));
  });
});

/**
 * A second Python run, for CRL numbers: how cryptography reads the numbers of pki.sh's CRLs, and CRLs it signs with
 * our EC CA key carrying a crlNumber: each value in NUMBERS, one marked critical, and raw extension values that are
 * not a number we accept. Numbers travel as decimal strings (JSON has no bigint).
 */
const NUMBER_ORACLE = `
import datetime, json, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID
utc = datetime.timezone.utc
d = sys.argv[1]
ca = x509.load_pem_x509_certificate(open(d + "/ca_cert.pem", "rb").read())
key = serialization.load_pem_private_key(open(d + "/ca_key.pem", "rb").read(), None)

def number_of(name):
  crl = x509.load_pem_x509_crl(open(d + "/" + name, "rb").read())
  return str(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

def make(extension, critical=False):
  builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
    .last_update(datetime.datetime(2049, 1, 1, tzinfo=utc)).next_update(datetime.datetime(2049, 2, 1, tzinfo=utc))
    .add_extension(extension, critical=critical))
  return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

raw = lambda hex: make(x509.UnrecognizedExtension(ExtensionOID.CRL_NUMBER, bytes.fromhex(hex)))
print(json.dumps({
  "pkiSh": {"crl-empty.pem": number_of("crl-empty.pem"), "crl.pem": number_of("crl.pem")},
  "numbered": {n: make(x509.CRLNumber(int(n))) for n in sys.argv[2:]},
  "critical": make(x509.CRLNumber(4242), critical=True),
  "negative": raw("0201ff"),
  "notMinimal": raw("02020005"),
  "notAnInteger": raw("040105"),
  "trailingByte": raw("02010500"),
}))
`;

/** Numbers a CRL may carry, at the edges of DER's encoding: a leading zero octet from 128, the 20-octet maximum. */
const NUMBERS = ["0", "127", "128", "4096", String((1n << 159n) - 1n), String((1n << 160n) - 1n)];

/** A DER element from its tag and contents, for CRLs no tool would sign. */
const tlv = (tag: number, ...parts: Uint8Array[]): Buffer => {
  const body = Buffer.concat(parts);
  if (body.length >= 0x80) throw new Error("test DER is kept short");
  return Buffer.concat([Buffer.from([tag, body.length]), body]);
};

describe("CRL numbers", () => {
  let oracle: {
    pkiSh: Record<string, string>;
    numbered: Record<string, string>;
    critical: string;
    negative: string;
    notMinimal: string;
    notAnInteger: string;
    trailingByte: string;
  };
  beforeAll(async () => {
    oracle = JSON.parse(await runPython(NUMBER_ORACLE, "", {}, [pki, ...NUMBERS]));
  });

  test("pki.sh's CRLs carry the number openssl and Python read, one higher per revocation", async () => {
    const openssl = async (file: string) =>
      BigInt(
        (await run(["openssl", "crl", "-in", join(pki, file), "-noout", "-crlnumber"]))
          .toString()
          .trim()
          .replace(/^crlNumber=/, ""),
      );
    for (const file of ["crl-empty.pem", "crl.pem"]) {
      const number = crlOf(pki, file).number;
      expect({ file, number }).toEqual({ file, number: BigInt(oracle.pkiSh[file]!) });
      expect({ file, number }).toEqual({ file, number: await openssl(file) });
    }
    expect(crlOf(pki).number! - crlOf(pki, "crl-empty.pem").number!).toBe(2n); // two revocations, two CRLs
  });

  test("numbers at the edges of DER's encoding read as Python signed them; a critical crlNumber is processed, so accepted", () => {
    const ca = read(pki, "ca_cert.pem");
    for (const n of NUMBERS) expect({ n, number: parseCrl(oracle.numbered[n]!, ca).number }).toEqual({ n, number: BigInt(n) });
    expect(parseCrl(oracle.critical, ca).number).toBe(4242n);
  });

  test("a CRL without a crlNumber reads as number null", () => {
    expect(parseCrl(python.ecdsaSha384, read(pki, "ca_cert.pem")).number).toBeNull();
  });

  test("a negative, non-minimal, non-INTEGER or padded CRL number is refused, though the CA signed it", () => {
    const ca = read(pki, "ca_cert.pem");
    expect(rejection(() => parseCrl(oracle.negative, ca))).toBe("invalid CRL: CRL number is negative");
    expect(rejection(() => parseCrl(oracle.notMinimal, ca))).toBe("invalid CRL: CRL number is not a DER INTEGER");
    expect(rejection(() => parseCrl(oracle.notAnInteger, ca))).toBe("invalid CRL: CRL number is not a DER INTEGER");
    expect(rejection(() => parseCrl(oracle.trailingByte, ca))).toBe("invalid CRL: CRL number is not a DER INTEGER");
  });

  test("a number above 20 octets, or two crlNumber extensions, is refused (DER built here: no tool signs these)", () => {
    const ca = read(pki, "ca_cert.pem");
    const oid = Buffer.from("0603551d14", "hex"); // 2.5.29.20
    const crlNumber = (integer: Buffer) => tlv(Tag.SEQUENCE, oid, tlv(Tag.OCTET_STRING, tlv(Tag.INTEGER, integer)));
    const crlWith = (...extensions: Buffer[]) => {
      const algorithm = tlv(Tag.SEQUENCE, Buffer.from("06082a8648ce3d040302", "hex"));
      const time = tlv(Tag.UTC_TIME, Buffer.from("490101000000Z"));
      const tbs = tlv(
        Tag.SEQUENCE,
        tlv(Tag.INTEGER, Buffer.from([1])),
        algorithm,
        tlv(Tag.SEQUENCE),
        time,
        time,
        tlv(contextTag(0), tlv(Tag.SEQUENCE, ...extensions)),
      );
      return tlv(Tag.SEQUENCE, tbs, algorithm, tlv(Tag.BIT_STRING, Buffer.from([0, 1, 2])));
    };
    expect(rejection(() => parseCrl(crlWith(crlNumber(Buffer.from([0x01, ...Buffer.alloc(20)]))), ca))).toBe(
      "invalid CRL: CRL number is longer than 20 octets",
    );
    expect(rejection(() => parseCrl(crlWith(crlNumber(Buffer.from([5])), crlNumber(Buffer.from([6]))), ca))).toBe(
      "invalid CRL: CRL has the same extension twice",
    );
    // The same CRL with one number gets past the extensions, to the checks after them.
    expect(rejection(() => parseCrl(crlWith(crlNumber(Buffer.from([5]))), ca))).toBe("invalid CRL: issuer is not our CA");
  });
});

describe("serials and DER", () => {
  test("normalizeSerial gives one spelling per serial", () => {
    expect(normalizeSerial("00AB:cd")).toBe("abcd");
    expect(normalizeSerial("0")).toBe("0");
    expect(normalizeSerial("0000")).toBe("0");
    expect(() => normalizeSerial("")).toThrow(TypeError);
    expect(() => normalizeSerial("12g4")).toThrow(TypeError);
  });

  test("UTCTime years below 50 are 20xx, from 50 19xx; impossible dates are refused", () => {
    const utc = (text: string) => readTime(readDer(Buffer.concat([Buffer.from([0x17, text.length]), Buffer.from(text)])));
    expect(utc("491231235959Z").toISOString()).toBe("2049-12-31T23:59:59.000Z");
    expect(utc("500101000000Z").toISOString()).toBe("1950-01-01T00:00:00.000Z");
    expect(() => utc("260231000000Z")).toThrow(DerError);
    expect(() => utc("2602010000Z")).toThrow(DerError);
  });

  test("long-form lengths are read; indefinite, oversized and non-minimal ones are refused", () => {
    const long = Buffer.concat([Buffer.from([0x04, 0x81, 0x80]), Buffer.alloc(0x80)]);
    expect(readDer(long).value.length).toBe(0x80);
    expect(() => readDer(Buffer.from([0x30, 0x80, 0x00, 0x00]))).toThrow(DerError);
    expect(() => readDer(Buffer.from([0x04, 0x85, 1, 0, 0, 0, 0]))).toThrow(DerError);
    expect(() => readDer(Buffer.from([0x04, 0x81, 0x01, 0x00]))).toThrow(DerError);
    expect(() => readDer(Buffer.from([0x04, 0x84, 0x7f, 0xff, 0xff, 0xff]))).toThrow(DerError);
  });
});
