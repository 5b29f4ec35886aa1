// pki.sh as a user runs it: --san for real hosts, its validation, and what it keeps (0600 keys, CA:FALSE, EKU per kind).
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_ROOT } from "../platform/config.ts";
import { extendedKeyUsages } from "../platform/eku.ts";
import { CLIENT_AUTH_OID, SERVER_AUTH_OID } from "../platform/tls.ts";
import { issueIdentity, newPki, runPkiSh, signCrl, testPki } from "./pki.ts";

setDefaultTimeout(60_000);

const certificate = (dir: string, name: string) => new X509Certificate(readFileSync(join(dir, `${name}_cert.pem`)));
const sansOf = (dir: string, name: string) => certificate(dir, name).subjectAltName?.split(", ") ?? [];
const fileMode = (path: string) => statSync(path).mode & 0o777;

/** Runs pki.sh, returning its exit code and stderr rather than throwing. */
async function pkiSh(dir: string, ...args: string[]): Promise<{ code: number; stderr: string }> {
  return pkiShWith({}, dir, ...args);
}

async function pkiShWith(env: Record<string, string>, dir: string, ...args: string[]): Promise<{ code: number; stderr: string }> {
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh"), ...args], { env: { ...process.env, PKI_DIR: dir, ...env }, stdout: "pipe", stderr: "pipe" });
  const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
  return { code, stderr: stderr.trim() };
}

describe("./pki.sh issue NAME --san", () => {
  test("the certificate names its SPIFFE ID and exactly the given hosts; key 0600, CA:FALSE, EKU by kind", async () => {
    const dir = await newPki("san");
    await issueIdentity(dir, "server1", "server", { sans: ["DNS:Server1.Mesh.Test,IP:10.77.0.11", "IP:fd00::11"] });
    await issueIdentity(dir, "coord1", "coordinator", { sans: ["IP:10.77.0.21"] });
    expect(sansOf(dir, "server1")).toEqual(["URI:spiffe://securemesh/server/server1", "DNS:server1.mesh.test", "IP Address:10.77.0.11", "IP Address:FD00:0:0:0:0:0:0:11"]);
    // Addresses alone get one name no host can have, so no client matches a host name against the CN (coord1).
    expect(sansOf(dir, "coord1")).toEqual(["URI:spiffe://securemesh/coordinator/coord1", "IP Address:10.77.0.21", "DNS:coord1.invalid"]);
    const server1 = certificate(dir, "server1");
    expect(server1.ca).toBe(false);
    expect(server1.checkHost("server1.mesh.test")).toBe("server1.mesh.test");
    expect(server1.checkIP("10.77.0.11")).toBe("10.77.0.11");
    expect(server1.checkHost("localhost")).toBeUndefined();
    expect(server1.checkIP("127.0.0.1")).toBeUndefined();
    expect(extendedKeyUsages(new Uint8Array(server1.raw))).toEqual([SERVER_AUTH_OID]);
    expect(extendedKeyUsages(new Uint8Array(certificate(dir, "coord1").raw)).sort()).toEqual([CLIENT_AUTH_OID, SERVER_AUTH_OID].sort());
    expect(server1.verify(certificate(dir, "ca").publicKey)).toBe(true);
    expect([fileMode(join(dir, "server1_key.pem")), fileMode(join(dir, "coord1_key.pem"))]).toEqual([0o600, 0o600]);
  });

  test("without --san the defaults stay: loopback for what serves, DNS:NAME for a client", async () => {
    const dir = await testPki();
    expect(sansOf(dir, "server")).toEqual(["URI:spiffe://securemesh/server/server", "DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1"]);
    expect(sansOf(dir, "client1")).toEqual(["URI:spiffe://securemesh/client/client1", "DNS:client1"]);
  });

  test("anything but DNS:name or IP:address is refused with a one-line error, and nothing is issued", async () => {
    const dir = await newPki("san-bad");
    const refusals: [string, string][] = [
      ["", "--san needs a value"],
      ["DNS:", "is not a DNS name"],
      ["dns:host", "each entry is DNS:name or IP:address"],
      ["URI:spiffe://securemesh/server/x", "each entry is DNS:name or IP:address"],
      ["email:a@b.test", "each entry is DNS:name or IP:address"],
      ["DNS:a,,IP:10.0.0.1", "has an empty entry"],
      ["DNS:a,", "has an empty entry"],
      ["DNS:*.mesh.test", "wildcard names are not issued"],
      ["DNS:-a.test", "is not a DNS name"],
      ["DNS:a_b.test", "is not a DNS name"],
      ["DNS:a b", "is not a DNS name"],
      ["DNS:a,critical", "each entry is DNS:name or IP:address"],
      ["DNS:a\nIP:10.0.0.1", "must be one line"],
      [`DNS:${"a".repeat(64)}.test`, "is not a DNS name"],
      ["DNS:10.0.0.1", "is an address; write IP:10.0.0.1"],
      ["IP:256.0.0.1", "is not an IPv4 or IPv6 address"],
      ["IP:010.0.0.1", "is not an IPv4 or IPv6 address"],
      ["IP:10.0.0", "is not an IPv4 or IPv6 address"],
      ["IP:1::2::3", "is not an IPv4 or IPv6 address"],
      ["IP:1:2:3:4:5:6:7:8:9", "is not an IPv4 or IPv6 address"],
      ["IP:host.test", "is not an IPv4 or IPv6 address"],
    ];
    for (const [san, why] of refusals) {
      const { code, stderr } = await pkiSh(dir, "issue", "bad", "--server", "--san", san);
      expect({ san, code, oneLine: !stderr.includes("\n"), says: stderr.includes(why) }).toEqual({ san, code: 2, oneLine: true, says: true });
    }
    expect(() => statSync(join(dir, "bad_cert.pem"))).toThrow();
    expect(await pkiSh(dir, "--san", "IP:10.0.0.1")).toEqual({ code: 2, stderr: "pki.sh: --san goes with 'issue NAME' (see ./pki.sh --help)" });
  });

  test("a re-run with the same hosts keeps the certificate; other hosts need --force, which reissues only that leaf", async () => {
    const dir = await newPki("san-reissue");
    const ca = readFileSync(join(dir, "ca_cert.pem"), "utf8");
    await issueIdentity(dir, "server1", "server", { sans: ["IP:10.77.0.11,IP:::1"] });
    const first = readFileSync(join(dir, "server1_cert.pem"), "utf8");
    await issueIdentity(dir, "server1", "server", { sans: ["IP:0:0::1", "IP:10.77.0.11"] }); // the same addresses, spelt otherwise
    expect(readFileSync(join(dir, "server1_cert.pem"), "utf8")).toBe(first);
    const moved = await pkiSh(dir, "issue", "server1", "--server", "--san", "IP:10.77.0.12");
    expect(moved).toEqual({ code: 2, stderr: "pki.sh: server1 exists with other host names or addresses; add --force to reissue it for IP:10.77.0.12" });
    await issueIdentity(dir, "server1", "server", { sans: ["IP:10.77.0.12"], force: true });
    expect(sansOf(dir, "server1")).toEqual(["URI:spiffe://securemesh/server/server1", "IP Address:10.77.0.12", "DNS:server1.invalid"]);
    // The CA and every other certificate are untouched: before, `issue --force` made a new CA.
    expect(readFileSync(join(dir, "ca_cert.pem"), "utf8")).toBe(ca);
    expect(certificate(dir, "coordinator").verify(certificate(dir, "ca").publicKey)).toBe(true);
  });
});

/** crl.pem as openssl reads it (an oracle independent of shared/authz/crl.ts): number, dates, whether our CA signed it. */
async function opensslCrl(dir: string, file = "crl.pem"): Promise<{ number: bigint | null; thisUpdate: number; nextUpdate: number; signed: boolean; entries: number }> {
  const path = join(dir, file);
  const text = async (args: string[]) => {
    await using proc = Bun.spawn(["openssl", "crl", "-in", path, "-noout", ...args], { stdout: "pipe", stderr: "pipe" });
    const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    return { out: out + err, code };
  };
  const fields = (await text(["-crlnumber", "-lastupdate", "-nextupdate"])).out;
  const field = (name: string) => new RegExp(`^${name}=(.*)$`, "m").exec(fields)?.[1] ?? "";
  const number = field("crlNumber");
  return {
    number: /^0x[0-9A-Fa-f]+$/.test(number) ? BigInt(number) : null,
    thisUpdate: Date.parse(field("lastUpdate")),
    nextUpdate: Date.parse(field("nextUpdate")),
    signed: /^verify OK$/m.test((await text(["-CAfile", join(dir, "ca_cert.pem")])).out), // it exits 0 after "verify failure" too
    entries: ((await text(["-text"])).out.match(/Serial Number:/g) ?? []).length,
  };
}

const DAY = 86_400_000;
/** How far a date openssl wrote may be from the one expected: it writes whole seconds, and the run takes some. */
const SLACK = 5 * 60_000;
const near = (actual: number, expected: number) => Math.abs(actual - expected) < SLACK;

describe("crl.pem: numbered, short-lived, refreshed", () => {
  const made: string[] = [];
  afterAll(() => made.forEach((dir) => rmSync(dir, { recursive: true, force: true })));
  /** A PKI of its own (by pki.sh), or an empty folder, removed after these tests. */
  const keep = (dir: string) => (made.push(dir), dir);
  const pki = async (label: string) => keep(await newPki(label));
  const emptyDir = (label: string) => keep(mkdtempSync(join(tmpdir(), `securemesh-pki-${label}-`)));

  test("a new CA gets a signed, empty, numbered CRL at once, that lives 30 days (CRL_DAYS)", async () => {
    const dir = await pki("crl-new");
    const crl = await opensslCrl(dir);
    expect({ ...crl, number: crl.number !== null, fresh: near(crl.thisUpdate, Date.now()), lives: near(crl.nextUpdate - crl.thisUpdate, 30 * DAY) })
      .toMatchObject({ number: true, signed: true, entries: 0, fresh: true, lives: true });
    // A CA made by `issue` in an empty folder has one too: roles refuse to start without it.
    const issued = emptyDir("crl-issue");
    await issueIdentity(issued, "x", "client");
    expect(await opensslCrl(issued)).toMatchObject({ signed: true, entries: 0 });
    expect((await opensslCrl(issued)).number).not.toBeNull();
    // CRL_DAYS sets the lifetime.
    const week = emptyDir("crl-week");
    expect((await pkiShWith({ CRL_DAYS: "7" }, week)).code).toBe(0);
    const weekly = await opensslCrl(week);
    expect(near(weekly.nextUpdate - weekly.thisUpdate, 7 * DAY)).toBe(true);
  });

  test("./pki.sh crl re-signs crl.pem with the next number and a fresh nextUpdate; revoke still bumps it too", async () => {
    const dir = await pki("crl-refresh");
    await issueIdentity(dir, "x", "client");
    await runPkiSh(dir, "revoke", "x");
    const revoked = await opensslCrl(dir);
    await signCrl(dir, { thisUpdate: new Date(Date.now() - 29 * DAY), nextUpdate: new Date(Date.now() + DAY) }); // an aged CRL
    const aged = await opensslCrl(dir);
    expect(aged.number).toBe(revoked.number! + 1n);
    await runPkiSh(dir, "crl");
    const fresh = await opensslCrl(dir);
    expect({ ...fresh, nextUpdate: near(fresh.nextUpdate, Date.now() + 30 * DAY) })
      .toEqual({ number: aged.number! + 1n, thisUpdate: fresh.thisUpdate, nextUpdate: true, signed: true, entries: 1 });
    expect((await pkiShWith({ CRL_DAYS: "2" }, dir, "crl")).code).toBe(0);
    const short = await opensslCrl(dir);
    expect({ number: short.number, lives: near(short.nextUpdate, Date.now() + 2 * DAY) }).toEqual({ number: fresh.number! + 1n, lives: true });
    await issueIdentity(dir, "y", "client");
    await runPkiSh(dir, "revoke", "y");
    expect(await opensslCrl(dir)).toMatchObject({ number: short.number! + 1n, entries: 2, signed: true });
  });

  test("an ensure run keeps a fresh CRL and re-signs one past half its life, expired, number-less, missing or another CA's", async () => {
    const dir = await pki("crl-ensure");
    const kept = readFileSync(join(dir, "crl.pem"), "utf8");
    await runPkiSh(dir);
    expect(readFileSync(join(dir, "crl.pem"), "utf8")).toBe(kept);
    const other = await testPki("other");
    const cases: [string, () => Promise<unknown>][] = [
      ["past half its life", () => signCrl(dir, { thisUpdate: new Date(Date.now() - 16 * DAY), nextUpdate: new Date(Date.now() + 14 * DAY) })],
      ["expired", () => signCrl(dir, { thisUpdate: new Date(Date.now() - 31 * DAY), nextUpdate: new Date(Date.now() - DAY) })],
      ["no number", () => signCrl(dir, { number: null })],
      ["outliving CRL_DAYS (the old 3650 days)", () => signCrl(dir, { nextUpdate: new Date(Date.now() + 3650 * DAY) })],
      ["missing", async () => Bun.file(join(dir, "crl.pem")).delete()],
      ["another CA's", async () => copyFileSync(join(other, "crl.pem"), join(dir, "crl.pem"))],
    ];
    let last = (await opensslCrl(dir)).number!;
    for (const [what, age] of cases) {
      await age();
      await runPkiSh(dir);
      const crl = await opensslCrl(dir);
      const seen = { what, signed: crl.signed, higher: crl.number !== null && crl.number > last, lives: near(crl.nextUpdate, Date.now() + 30 * DAY) };
      expect(seen).toEqual({ what, signed: true, higher: true, lives: true });
      last = crl.number!;
    }
  });

  test("a lost or restored ca_db/crlnumber never takes the number back below the CRL out there", async () => {
    const dir = await pki("crl-counter");
    await runPkiSh(dir, "crl");
    await runPkiSh(dir, "crl");
    const before = (await opensslCrl(dir)).number!;
    writeFileSync(join(dir, "ca_db", "crlnumber"), "1000\n"); // as a backup from the CA's first day would have it
    await runPkiSh(dir, "crl");
    expect((await opensslCrl(dir)).number).toBe(before + 1n);
  });

  test("crl on a host without the CA key refuses in one line and touches nothing; a bad CRL_DAYS is refused", async () => {
    const source = await testPki();
    const host = emptyDir("crl-host");
    for (const file of ["ca_cert.pem", "crl.pem"]) copyFileSync(join(source, file), join(host, file));
    const refused = await pkiSh(host, "crl");
    expect(refused).toEqual({ code: 2, stderr: `pki.sh: crl needs the CA's certificate and key (${host}/ca_cert.pem, ca_key.pem): run it on the CA host` });
    expect(readdirSync(host).sort()).toEqual(["ca_cert.pem", "crl.pem"]);
    expect(readFileSync(join(host, "ca_cert.pem"), "utf8")).toBe(readFileSync(join(source, "ca_cert.pem"), "utf8"));
    for (const days of ["0", "x", "1.5", "-3"]) {
      expect(await pkiShWith({ CRL_DAYS: days }, host, "crl")).toEqual({ code: 2, stderr: `pki.sh: CRL_DAYS must be a whole number of days from 1 to 99999, not '${days}'` });
    }
  });
});
