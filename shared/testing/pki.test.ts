// pki.sh as a user runs it: --san for real hosts, its validation, and what it keeps (0600 keys, CA:FALSE, EKU per kind).
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { copyFileSync, cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { TrustMaterial } from "../authz/trust.ts";
import { loadFernetKeys, readPkiFile, readPrivatePkiFile, REPO_ROOT } from "../platform/config.ts";
import { extendedKeyUsages } from "../platform/eku.ts";
import { CLIENT_AUTH_OID, SERVER_AUTH_OID } from "../platform/tls.ts";
import { bundleIdentity, issueIdentity, newPki, runPkiSh, signCrl, testPki } from "./pki.ts";

setDefaultTimeout(60_000);

const certificate = (dir: string, name: string) => new X509Certificate(readFileSync(join(dir, `${name}_cert.pem`)));
const sansOf = (dir: string, name: string) => certificate(dir, name).subjectAltName?.split(", ") ?? [];
const fileMode = (path: string) => statSync(path).mode & 0o777;

/** Runs pki.sh, returning its exit code and stderr rather than throwing. */
async function pkiSh(dir: string, ...args: string[]): Promise<{ code: number; stderr: string }> {
  return pkiShWith({}, dir, ...args);
}

async function pkiShWith(env: Record<string, string>, dir: string, ...args: string[]): Promise<{ code: number; stderr: string }> {
  const { code, stderr } = await pkiShOut(dir, args, env);
  return { code, stderr };
}

/** Runs pki.sh, returning its exit code, stdout and stderr (each trimmed). */
async function pkiShOut(dir: string, args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh"), ...args], { env: { ...process.env, PKI_DIR: dir, ...env }, stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { code, stdout: stdout.trim(), stderr: stderr.trim() };
}

describe("./pki.sh issue NAME --san", () => {
  test("the certificate names its SPIFFE ID and exactly the given hosts; key 0600, CA:FALSE, EKU by kind", async () => {
    const dir = await newPki("san");
    await issueIdentity(dir, "server1", "server", { sans: ["DNS:Server1.Mesh.Test,IP:10.77.0.11", "IP:fd00::11"] });
    await issueIdentity(dir, "coord1", "coordinator", { sans: ["IP:10.77.0.21"] });
    expect(sansOf(dir, "server1")).toEqual([
      "URI:spiffe://securemesh/server/server1",
      "DNS:server1.mesh.test",
      "IP Address:10.77.0.11",
      "IP Address:FD00:0:0:0:0:0:0:11",
    ]);
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
async function opensslCrl(
  dir: string,
  file = "crl.pem",
): Promise<{ number: bigint | null; thisUpdate: number; nextUpdate: number; signed: boolean; entries: number }> {
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

/** Folders the tests made, removed once the file is done. */
const made: string[] = [];
afterAll(() => made.forEach((dir) => rmSync(dir, { recursive: true, force: true })));
const emptyDir = (label: string) => {
  const dir = mkdtempSync(join(tmpdir(), `securemesh-pki-${label}-`));
  made.push(dir);
  return dir;
};

describe("crl.pem: numbered, short-lived, refreshed", () => {
  /** A PKI of its own (by pki.sh), removed after these tests. */
  const pki = async (label: string) => {
    const dir = await newPki(label);
    made.push(dir);
    return dir;
  };

  test("a new CA gets a signed, empty, numbered CRL at once, that lives 30 days (CRL_DAYS)", async () => {
    const dir = await pki("crl-new");
    const crl = await opensslCrl(dir);
    expect({
      ...crl,
      number: crl.number !== null,
      fresh: near(crl.thisUpdate, Date.now()),
      lives: near(crl.nextUpdate - crl.thisUpdate, 30 * DAY),
    }).toMatchObject({ number: true, signed: true, entries: 0, fresh: true, lives: true });
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
    expect({ ...fresh, nextUpdate: near(fresh.nextUpdate, Date.now() + 30 * DAY) }).toEqual({
      number: aged.number! + 1n,
      thisUpdate: fresh.thisUpdate,
      nextUpdate: true,
      signed: true,
      entries: 1,
    });
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
      expect(await pkiShWith({ CRL_DAYS: days }, host, "crl")).toEqual({
        code: 2,
        stderr: `pki.sh: CRL_DAYS must be a whole number of days from 1 to 99999, not '${days}'`,
      });
    }
  });
});

/** Every file under `dir` with its mode and contents, so a refusal can be shown to have touched nothing. */
function snapshot(dir: string): Record<string, string> {
  const files = readdirSync(dir, { recursive: true, encoding: "utf8" }).sort();
  return Object.fromEntries(
    files.map((file) => {
      const path = join(dir, file);
      return [file, statSync(path).isDirectory() ? "folder" : `${fileMode(path).toString(8)} ${readFileSync(path, "base64")}`];
    }),
  );
}

/** The serials crl.pem lists, as openssl prints them (upper-case hex), sorted. */
async function crlSerials(dir: string): Promise<string[]> {
  await using proc = Bun.spawn(["openssl", "crl", "-in", join(dir, "crl.pem"), "-noout", "-text"], { stdout: "pipe", stderr: "pipe" });
  const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  expect(code).toBe(0);
  return [...out.matchAll(/Serial Number: ([0-9A-F]+)/g)].map((m) => m[1]!).sort();
}

const serialOf = (dir: string, name: string) => certificate(dir, name).serialNumber;
const read = (dir: string, file: string) => readFileSync(join(dir, file), "utf8");
/** What pki.sh prints after writing a CRL: ", CRL number 0x1001, next update Jan  3 15:22:27 2027 GMT". */
const CRL_WRITTEN = /CRL number 0x[0-9A-F]+, next update [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4} GMT/.source;
const ISO_SECOND = /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/.source;
const exactly = (pattern: string) => new RegExp(`^${pattern}$`);
/** A pki.sh run that succeeded, printing nothing on stderr and exactly one line matching `pattern` on stdout. */
const printedExactly = (pattern: string) => ({ code: 0, stderr: "", stdout: expect.stringMatching(exactly(pattern)) });
const escaped = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

describe("a CA is made only where none is expected (issue 23)", () => {
  /** A role host's PKI folder: what the deployment copied there, no CA key. */
  const roleHost = async (label: string) => {
    const source = await testPki();
    const host = emptyDir(label);
    for (const file of ["ca_cert.pem", "crl.pem", "server_cert.pem", "server_key.pem", "encryption_key.txt"])
      copyFileSync(join(source, file), join(host, file));
    return host;
  };
  const refusal = (dir: string, found: string, missing: "ca_key.pem" | "ca_cert.pem" | "both") =>
    `pki.sh: no CA here: ${dir} holds ${found} but no ${missing === "both" ? "ca_cert.pem or ca_key.pem" : missing}; on a role host copy its files from the CA host (./pki.sh bundle NAME DIR there), ` +
    `on the CA host restore ${missing === "both" ? "ca_cert.pem and ca_key.pem" : missing} from a backup, or add --new-ca to make a new CA that no existing host trusts`;

  test("on a role host every command that could make a CA refuses in one line, and nothing changes", async () => {
    const host = await roleHost("role-host");
    const before = snapshot(host);
    const line = refusal(host, "ca_cert.pem, crl.pem, server_cert.pem and 2 more", "ca_key.pem");
    // The hint a role printed before this issue (`run ./pki.sh`), the deployment's first command, and --force.
    for (const args of [
      [],
      ["init"],
      ["--rsa"],
      ["--force"],
      ["issue", "server", "--server", "--force"],
      ["issue", "server9", "--server", "--san", "IP:10.77.0.19"],
    ]) {
      expect({ args, ...(await pkiSh(host, ...args)) }).toEqual({ args, code: 2, stderr: line });
    }
    for (const args of [["crl"], ["list"], ["revoke", "server"], ["revoke", "--serial", "0A"], ["bundle", "server", join(host, "out")]]) {
      const needs = `pki.sh: ${args[0]} needs the CA's certificate and key (${host}/ca_cert.pem, ca_key.pem): run it on the CA host`;
      expect({ args, ...(await pkiSh(host, ...args)) }).toEqual({ args, code: 2, stderr: needs });
    }
    expect(snapshot(host)).toEqual(before);
  });

  test("a CA host that lost its certificate, or a folder with only ca_db/ or the Fernet key, is refused too", async () => {
    const source = await testPki();
    const lostCert = emptyDir("lost-cert");
    for (const file of ["ca_key.pem", "crl.pem"]) copyFileSync(join(source, file), join(lostCert, file));
    expect(await pkiSh(lostCert)).toEqual({ code: 2, stderr: refusal(lostCert, "ca_key.pem, crl.pem", "ca_cert.pem") });
    const database = emptyDir("db-only");
    cpSync(join(source, "ca_db"), join(database, "ca_db"), { recursive: true });
    expect(await pkiSh(database, "init")).toEqual({ code: 2, stderr: refusal(database, "ca_db", "both") });
    const fernet = emptyDir("fernet-only");
    copyFileSync(join(source, "encryption_key.txt"), join(fernet, "encryption_key.txt"));
    expect(await pkiSh(fernet, "issue", "x", "--client")).toEqual({ code: 2, stderr: refusal(fernet, "encryption_key.txt", "both") });
    expect([readdirSync(lostCert).sort(), readdirSync(database), readdirSync(fernet)]).toEqual([["ca_key.pem", "crl.pem"], ["ca_db"], ["encryption_key.txt"]]);
  });

  test("an empty or missing folder still gets a CA with no flag: the demo's first run", async () => {
    const missing = join(emptyDir("first-run"), "certs");
    expect((await pkiSh(missing)).code).toBe(0);
    expect(
      readdirSync(missing)
        .filter((f) => f.endsWith("_cert.pem"))
        .sort(),
    ).toEqual(["ca", "client1", "client2", "coordinator", "keyserver", "marketplace", "secureproxy", "server"].map((n) => `${n}_cert.pem`));
    expect(certificate(missing, "server").verify(certificate(missing, "ca").publicKey)).toBe(true);
  });

  test("--new-ca makes one there anyway: init keeps encryption_key.txt; a plain run reissues the demo's identities", async () => {
    const host = await roleHost("new-ca-init");
    const [oldCa, fernet] = [read(host, "ca_cert.pem"), read(host, "encryption_key.txt")];
    const init = await pkiShOut(host, ["init", "--new-ca"]);
    expect({ ...init, stdout: init.stdout.split("\n") }).toEqual({
      code: 0,
      stderr: "",
      stdout: [
        expect.stringMatching(
          exactly(
            `pki\\.sh: created a new CA in ${escaped(host)} \\(--new-ca\\), with an empty crl\\.pem \\(${CRL_WRITTEN}\\); certificates issued before are not this CA's: issue again what a host needs`,
          ),
        ),
        "pki.sh: no identities issued: ./pki.sh issue NAME --KIND --san … adds one, ./pki.sh bundle NAME DIR packs what its host needs",
      ],
    });
    const ca = certificate(host, "ca");
    expect({
      newCa: read(host, "ca_cert.pem") !== oldCa,
      fernetKept: read(host, "encryption_key.txt") === fernet,
      keyMode: fileMode(join(host, "ca_key.pem")),
      oldLeafUntrusted: !certificate(host, "server").verify(ca.publicKey),
    }).toEqual({ newCa: true, fernetKept: true, keyMode: 0o600, oldLeafUntrusted: true });
    expect(await opensslCrl(host)).toMatchObject({ signed: true, entries: 0 });

    const plain = await roleHost("new-ca-plain");
    expect((await pkiSh(plain, "--new-ca")).code).toBe(0);
    expect([certificate(plain, "server").verify(certificate(plain, "ca").publicKey), read(plain, "encryption_key.txt") === fernet]).toEqual([true, true]);
  });

  test("--force never replaces a CA on its own; --force --new-ca regenerates everything", async () => {
    const dir = emptyDir("force");
    await runPkiSh(dir);
    const before = snapshot(dir);
    const line = `pki.sh: --force would replace the CA in ${dir}, every certificate it issued and encryption_key.txt; add --new-ca to do that, or reissue one identity with ./pki.sh issue NAME --KIND --force`;
    expect(await pkiSh(dir, "--force")).toEqual({ code: 2, stderr: line });
    expect(await pkiSh(dir, "init", "--force")).toEqual({ code: 2, stderr: line });
    expect(snapshot(dir)).toEqual(before);
    const [ca, server, fernet] = [read(dir, "ca_cert.pem"), read(dir, "server_cert.pem"), read(dir, "encryption_key.txt")];
    const replaced = await pkiShOut(dir, ["--force", "--new-ca"]);
    expect(replaced.stdout.split("\n")[0]).toMatch(
      exactly(
        `pki\\.sh: replaced the CA in ${escaped(dir)} \\(--force --new-ca\\), with an empty crl\\.pem \\(${CRL_WRITTEN}\\); no host trusts it until it gets the new ca_cert\\.pem`,
      ),
    );
    expect({
      code: replaced.code,
      ca: read(dir, "ca_cert.pem") !== ca,
      server: read(dir, "server_cert.pem") !== server,
      fernet: read(dir, "encryption_key.txt") !== fernet,
      trusted: certificate(dir, "server").verify(certificate(dir, "ca").publicKey),
    }).toEqual({ code: 0, ca: true, server: true, fernet: true, trusted: true });
  });

  test("no NAME can overwrite the CA's own files", async () => {
    const dir = emptyDir("name-ca");
    await runPkiSh(dir); // before, `issue ca --server --force` wrote a new ca_key.pem over the CA's: every later issue failed
    const before = snapshot(dir);
    const line = "pki.sh: NAME 'ca' is the CA's own (ca_cert.pem, ca_key.pem); choose another name";
    expect(await pkiSh(dir, "issue", "ca", "--client")).toEqual({ code: 2, stderr: line });
    expect(await pkiSh(dir, "issue", "ca", "--server", "--force")).toEqual({ code: 2, stderr: line });
    expect(snapshot(dir)).toEqual(before);
  });
});

describe("each identity issued, listed and revoked on its own: by name, by serial, --all", () => {
  test("three server hosts under names of their own: revoking server2 revokes its certificate alone", async () => {
    const dir = await newPki("per-host");
    for (const i of [1, 2, 3]) await issueIdentity(dir, `server${i}`, "server", { sans: [`IP:10.77.0.1${i}`, `DNS:server${i}.mesh.test`] });
    expect(sansOf(dir, "server2")).toEqual(["URI:spiffe://securemesh/server/server2", "IP Address:10.77.0.12", "DNS:server2.mesh.test"]);
    const revoked = await pkiShOut(dir, ["revoke", "server2"]);
    expect(revoked).toEqual(
      printedExactly(
        `pki\\.sh: revoked server2 \\(serial ${serialOf(dir, "server2")}, its current certificate server2_cert\\.pem\\); wrote crl\\.pem, ${CRL_WRITTEN} \\(running roles reload it within seconds\\)`,
      ),
    );
    expect(await crlSerials(dir)).toEqual([serialOf(dir, "server2")]);
  });

  test("a name issued three times: revoke NAME takes the current one and says what is left; --all the rest", async () => {
    const dir = await newPki("reissued");
    const serials: string[] = [];
    for (const ip of ["10.77.0.11", "10.77.0.12", "10.77.0.13"]) {
      await issueIdentity(dir, "server1", "server", { sans: [`IP:${ip}`], force: true });
      serials.push(serialOf(dir, "server1"));
    }
    const current = await pkiShOut(dir, ["revoke", "server1"]);
    expect(current).toEqual(
      printedExactly(
        `pki\\.sh: revoked server1 \\(serial ${serials[2]}, its current certificate server1_cert\\.pem\\); wrote crl\\.pem, ${CRL_WRITTEN} \\(running roles reload it within seconds\\); ` +
          "2 earlier certificate\\(s\\) named server1 are still valid: \\./pki\\.sh revoke server1 --all revokes them too",
      ),
    );
    expect(await crlSerials(dir)).toEqual([serials[2]!]);
    const all = await pkiShOut(dir, ["revoke", "server1", "--all"]);
    expect(all).toEqual(
      printedExactly(
        `pki\\.sh: revoked the 2 certificate\\(s\\) named server1 that were still valid \\(serials ${serials[0]}, ${serials[1]}\\); wrote crl\\.pem, ${CRL_WRITTEN} \\(running roles reload it within seconds\\)`,
      ),
    );
    expect(await crlSerials(dir)).toEqual([...serials].sort());
    expect(await pkiSh(dir, "revoke", "server1", "--all")).toEqual({
      code: 2,
      stderr: "pki.sh: no certificate named server1 is still valid (./pki.sh list shows them all)",
    });
    // Revoking the current one again stays a success, as before (scripts that revoke twice keep working), and says so.
    const again = await pkiShOut(dir, ["revoke", "server1"]);
    expect(again).toEqual(
      printedExactly(
        `pki\\.sh: server1's current certificate \\(serial ${serials[2]}\\) was already revoked, since ${ISO_SECOND}; wrote crl\\.pem, ${CRL_WRITTEN}`,
      ),
    );
    expect(await pkiSh(dir, "revoke", "nobody")).toEqual({ code: 2, stderr: `pki.sh: no certificate ${dir}/nobody_cert.pem to revoke` });
  });

  test("revoke --serial: upper or lower case, with or without colons; an unknown or revoked serial is one line, exit 2", async () => {
    const dir = await newPki("by-serial");
    for (const name of ["a", "b", "c", "d"]) await issueIdentity(dir, name, "client");
    const earlier = serialOf(dir, "d");
    await issueIdentity(dir, "d", "client", { force: true });
    const colons = (hex: string) => hex.match(/../g)!.join(":");
    const forms: [string, string, string][] = [
      ["a", serialOf(dir, "a").toLowerCase(), "its current certificate, a_cert.pem"],
      ["b", colons(serialOf(dir, "b")), "its current certificate, b_cert.pem"],
      ["c", colons(serialOf(dir, "c").toLowerCase()), "its current certificate, c_cert.pem"],
      ["d", earlier, "an earlier certificate of that name"],
    ];
    let number = (await opensslCrl(dir)).number!;
    for (const [name, form, which] of forms) {
      const serial = form.replaceAll(":", "").toUpperCase();
      const out = await pkiShOut(dir, ["revoke", "--serial", form]);
      expect(out).toEqual(
        printedExactly(
          `pki\\.sh: revoked serial ${serial} \\(${name}, ${which}\\); wrote crl\\.pem, ${CRL_WRITTEN} \\(running roles reload it within seconds\\)`,
        ),
      );
      const crl = await opensslCrl(dir);
      expect(crl.number).toBe(number + 1n);
      number = crl.number!;
    }
    expect(await crlSerials(dir)).toEqual([serialOf(dir, "a"), serialOf(dir, "b"), serialOf(dir, "c"), earlier].sort());
    const crlBefore = read(dir, "crl.pem");
    expect(await pkiSh(dir, "revoke", "--serial", forms[0]![1])).toEqual({
      code: 2,
      stderr: expect.stringMatching(exactly(`pki\\.sh: serial ${serialOf(dir, "a")} \\(a\\) is already revoked, since ${ISO_SECOND}; nothing to do`)),
    });
    expect(await pkiSh(dir, "revoke", "--serial", "ab:cd")).toEqual({
      code: 2,
      stderr: `pki.sh: no certificate with serial ABCD in ${dir}/ca_db/index.txt (./pki.sh list shows every serial)`,
    });
    expect(await pkiSh(dir, "revoke", "--serial", "xyz")).toEqual({
      code: 2,
      stderr: "pki.sh: --serial 'xyz' is not a hex serial such as 4A:1B:… or 4a1b… (./pki.sh list shows each one)",
    });
    expect(await pkiSh(dir, "revoke", "d", "--serial", earlier)).toEqual({ code: 2, stderr: "pki.sh: revoke takes a NAME or --serial HEX, not both" });
    expect(read(dir, "crl.pem")).toBe(crlBefore);
    expect(await crlSerials(dir)).not.toContain(serialOf(dir, "d")); // d's current certificate stays valid
  });

  test("list: every certificate the CA issued, with name, serial, not-after, status, SPIFFE ID and SANs", async () => {
    const dir = await newPki("list");
    await issueIdentity(dir, "server1", "server", { sans: ["IP:10.77.0.11", "DNS:server1.mesh.test"] });
    const replaced = certificate(dir, "server1");
    await issueIdentity(dir, "server1", "server", { sans: ["IP:10.77.0.12"], force: true });
    await issueIdentity(dir, "gone", "client");
    await runPkiSh(dir, "revoke", "gone");
    await runPkiSh(dir, "issue", "old", "--client", "--not-before", "20200101000000Z", "--not-after", "20200201000000Z");
    await runPkiSh(dir, "issue", "later", "--client", "--not-before", "20400101000000Z", "--not-after", "20410101000000Z");
    const { code, stdout, stderr } = await pkiShOut(dir, ["list"]);
    const row = (name: string, cert: X509Certificate, status: unknown) => {
      const [uri, ...sans] = cert.subjectAltName!.split(", ");
      return [
        name,
        cert.serialNumber,
        new Date(cert.validTo).toISOString().replace(".000Z", "Z"),
        status,
        uri!.replace(/^URI:/, ""),
        sans.map((s) => s.replace("IP Address:", "IP:")).join(","),
      ];
    };
    const demo = ["server", "coordinator", "client1", "client2", "keyserver", "secureproxy", "marketplace"];
    expect({ code, stderr, rows: stdout.split("\n").map((line): unknown[] => line.split(/ {2,}/)) }).toEqual({
      code: 0,
      stderr: "",
      rows: [
        ["NAME", "SERIAL", "NOT AFTER", "STATUS", "SPIFFE ID", "SANS"],
        ...demo.map((name) => row(name, certificate(dir, name), "valid, current")),
        row("server1", replaced, "valid"),
        row("server1", certificate(dir, "server1"), "valid, current"),
        row("gone", certificate(dir, "gone"), expect.stringMatching(exactly(`revoked ${ISO_SECOND}, current`))),
        row("old", certificate(dir, "old"), "expired, current"),
        row("later", certificate(dir, "later"), "not yet valid, current"),
      ],
    });
    expect(stdout.split("\n")[8]!.split(/ {2,}/).slice(4)).toEqual(["spiffe://securemesh/server/server1", "IP:10.77.0.11,DNS:server1.mesh.test"]);
    const fresh = mkdtempSync(join(tmpdir(), "securemesh-pki-list-empty-"));
    await runPkiSh(fresh, "init");
    expect(await pkiShOut(fresh, ["list"])).toEqual({ code: 0, stderr: "", stdout: `pki.sh: the CA in ${fresh} has issued no certificates yet` });
    rmSync(fresh, { recursive: true, force: true });
  });
});

describe("a deployment's CA host: init, issue, bundle", () => {
  test("init makes the CA, a signed numbered CRL and encryption_key.txt, no identities; a later plain run adds none", async () => {
    const dir = join(emptyDir("init"), "pki");
    const init = await pkiShOut(dir, ["init"]);
    expect({ ...init, stdout: init.stdout.split("\n") }).toEqual({
      code: 0,
      stderr: "",
      stdout: [
        expect.stringMatching(exactly(`pki\\.sh: created CA in ${escaped(dir)}, with an empty crl\\.pem \\(${CRL_WRITTEN}\\)`)),
        "pki.sh: wrote encryption_key.txt",
        "pki.sh: no identities issued: ./pki.sh issue NAME --KIND --san … adds one, ./pki.sh bundle NAME DIR packs what its host needs",
      ],
    });
    expect(readdirSync(dir).sort()).toEqual(["ca_cert.pem", "ca_db", "ca_key.pem", "crl.pem", "encryption_key.txt"]);
    const crl = await opensslCrl(dir);
    expect({ signed: crl.signed, entries: crl.entries, numbered: crl.number !== null }).toEqual({ signed: true, entries: 0, numbered: true });
    expect({ fernet: read(dir, "encryption_key.txt"), modes: [fileMode(join(dir, "ca_key.pem")), fileMode(join(dir, "encryption_key.txt"))] }).toEqual({
      fernet: expect.stringMatching(/^[A-Za-z0-9_-]{43}=\n$/),
      modes: [0o600, 0o600],
    });
    expect(loadFernetKeys(dir)).toHaveLength(1);
    const before = snapshot(dir);
    expect(await pkiShOut(dir, [])).toEqual({
      code: 0,
      stderr: "",
      stdout: `pki.sh: the CA in ${dir} was made for a deployment (by pki.sh init): no demo identities issued; ./pki.sh issue NAME --KIND --san … adds one`,
    });
    expect(await pkiShOut(dir, ["init"])).toEqual({ code: 0, stderr: "", stdout: `pki.sh: kept the CA in ${dir}` });
    expect(snapshot(dir)).toEqual(before);
  });

  test("fernet add|promote|retire|status runs fernet-keys.ts on the PKI's encryption_key.txt: 0600 after each step, no CA made or needed", async () => {
    const dir = join(emptyDir("fernet"), "pki");
    await pkiShOut(dir, ["init"]);
    const [first] = loadFernetKeys(dir);
    const add = await pkiShOut(dir, ["fernet", "add"]);
    expect({ code: add.code, stderr: add.stderr, stdout: add.stdout }).toMatchObject({
      code: 0,
      stderr: "",
      stdout: expect.stringContaining(`to ${join(dir, "encryption_key.txt")}, decrypt-only`),
    });
    expect({ keys: loadFernetKeys(dir).length, mode: fileMode(join(dir, "encryption_key.txt")) }).toEqual({ keys: 2, mode: 0o600 });
    // Its own refusals and exit codes come through: promote so soon after the add needs --force.
    expect((await pkiShOut(dir, ["fernet", "promote"])).code).toBe(1);
    expect((await pkiShOut(dir, ["fernet", "promote", "--force"])).code).toBe(0);
    expect(loadFernetKeys(dir)[1]).toBe(first!);
    const status = await pkiShOut(dir, ["fernet", "status", "--ttl", "1"]);
    expect(status.stdout.split("\n")).toEqual([
      expect.stringMatching(/^[0-9a-f]{8} {2}primary {7}added /),
      expect.stringMatching(/^[0-9a-f]{8} {2}decrypt-only {2}encrypted until /),
      expect.stringMatching(/^stored records: .*\/health "fernet_rewrap"/),
    ]);
    expect((await pkiShOut(dir, ["fernet", "--help"])).stdout).toStartWith("Usage: fernet-keys.ts add|promote|retire|status");
    expect((await pkiShOut(dir, ["fernet"])).code).toBe(2);
    // On a role host (the key file alone) it needs no CA, and makes none.
    const host = emptyDir("fernet-host");
    cpSync(join(dir, "encryption_key.txt"), join(host, "encryption_key.txt"));
    expect((await pkiShOut(host, ["fernet", "status"])).code).toBe(0);
    expect(readdirSync(host)).toEqual(["encryption_key.txt"]);
  });

  test("the first issue on a fresh CA host writes crl.pem and encryption_key.txt too; later issues never replace them", async () => {
    const dir = emptyDir("first-issue");
    await issueIdentity(dir, "server1", "server", { sans: ["IP:10.77.0.11"] });
    expect(readdirSync(dir).sort()).toEqual(["ca_cert.pem", "ca_db", "ca_key.pem", "crl.pem", "encryption_key.txt", "server1_cert.pem", "server1_key.pem"]);
    const [crl, fernet] = [read(dir, "crl.pem"), read(dir, "encryption_key.txt")];
    await issueIdentity(dir, "server2", "server", { sans: ["IP:10.77.0.12"] });
    await issueIdentity(dir, "server1", "server", { sans: ["IP:10.77.0.21"], force: true });
    expect([read(dir, "crl.pem") === crl, read(dir, "encryption_key.txt") === fernet]).toEqual([true, true]);
    rmSync(join(dir, "crl.pem"));
    rmSync(join(dir, "encryption_key.txt"));
    await issueIdentity(dir, "server3", "server", { sans: ["IP:10.77.0.13"] });
    expect({ crl: (await opensslCrl(dir)).signed, fernetMode: fileMode(join(dir, "encryption_key.txt")) }).toEqual({ crl: true, fernetMode: 0o600 });
    expect((await pkiShOut(dir, [])).stdout).toStartWith(`pki.sh: the CA in ${dir} was made for a deployment (by pki.sh issue)`);
  });

  test("bundle copies exactly what one host needs, with its modes, never the CA key; a role loads it as it is", async () => {
    const dir = await newPki("bundle");
    await issueIdentity(dir, "server1", "server", { sans: ["IP:10.77.0.11"] });
    const out = join(emptyDir("bundle-out"), "srv1");
    const bundled = await pkiShOut(dir, ["bundle", "server1", out, "--fernet", "--as", "server"]);
    expect(bundled).toEqual({
      code: 0,
      stderr: "",
      stdout: `pki.sh: bundled server1 into ${out}: ca_cert.pem crl.pem server_cert.pem server_key.pem encryption_key.txt (no CA key); copy that folder to server1's host as its PKI folder (--pki or PKI_DIR)`,
    });
    const modes = (folder: string) =>
      Object.fromEntries(
        readdirSync(folder)
          .sort()
          .map((file) => [file, fileMode(join(folder, file))]),
      );
    expect({ folder: fileMode(out), files: modes(out) }).toEqual({
      folder: 0o700,
      files: { "ca_cert.pem": 0o644, "crl.pem": 0o644, "encryption_key.txt": 0o600, "server_cert.pem": 0o644, "server_key.pem": 0o600 },
    });
    const same = [
      ["ca_cert.pem", "ca_cert.pem"],
      ["crl.pem", "crl.pem"],
      ["server1_cert.pem", "server_cert.pem"],
      ["server1_key.pem", "server_key.pem"],
      ["encryption_key.txt", "encryption_key.txt"],
    ];
    expect(same.every(([from, to]) => read(dir, from!) === read(out, to!))).toBe(true);
    const trust = TrustMaterial.open(out, "server"); // what the server role does at start: the key fits, the CRL is this CA's
    expect(new X509Certificate(trust.identity.cert).subjectAltName).toBe("URI:spiffe://securemesh/server/server1, IP Address:10.77.0.11, DNS:server1.invalid");
    trust.stop();
    // Again into the same folder: refreshed. Without --fernet, no Fernet key; without --as, the identity's own names.
    expect((await pkiShOut(dir, ["bundle", "server1", out, "--fernet", "--as", "server"])).code).toBe(0);
    const client = join(emptyDir("bundle-client"), "cli1");
    await bundleIdentity(dir, "client1", client);
    expect(modes(client)).toEqual({ "ca_cert.pem": 0o644, "client1_cert.pem": 0o644, "client1_key.pem": 0o600, "crl.pem": 0o644 });
  });

  test("bundle refuses a revoked or missing identity, a folder holding other files, and the CA's own folder", async () => {
    const dir = await newPki("bundle-refusals");
    const out = emptyDir("bundle-refused");
    await issueIdentity(dir, "x", "client");
    await runPkiSh(dir, "revoke", "x");
    expect(await pkiSh(dir, "bundle", "x", out)).toEqual({
      code: 2,
      stderr: `pki.sh: x's current certificate (serial ${serialOf(dir, "x")}) is revoked; issue it again (./pki.sh issue x --KIND --san … --force)`,
    });
    expect(await pkiSh(dir, "bundle", "nobody", out)).toEqual({
      code: 2,
      stderr: `pki.sh: no identity nobody in ${dir} (nobody_cert.pem, nobody_key.pem) to bundle: issue it first (./pki.sh issue nobody --KIND --san …)`,
    });
    expect(await pkiSh(dir, "bundle", "client1", dir)).toEqual({ code: 2, stderr: `pki.sh: bundle into a folder of its own, not the CA's (${dir})` });
    writeFileSync(join(out, "ca_key.pem"), "left over");
    expect(await pkiSh(dir, "bundle", "client1", out)).toEqual({
      code: 2,
      stderr: `pki.sh: ${out} already holds ca_key.pem, which a bundle of client1 does not: give an empty or new folder`,
    });
    mkdirSync(join(out, "sub"));
    expect(readdirSync(out).sort()).toEqual(["ca_key.pem", "sub"]);
    expect(await pkiSh(dir, "bundle", "client1")).toEqual({
      code: 2,
      stderr: "pki.sh: bundle needs a NAME and a folder: ./pki.sh bundle NAME DIR [--fernet] [--as ROLE]",
    });
  });
});

describe("hints never suggest a command that could make or replace a CA (issue 23)", () => {
  test("each missing-file hint a role prints names the file, where it comes from, and only safe commands", () => {
    const dir = mkdtempSync(join(tmpdir(), "securemesh-pki-hints-"));
    const message = (read: () => unknown) => {
      try {
        read();
        return "read";
      } catch (error) {
        return (error as Error).message;
      }
    };
    const elsewhere = "or point --pki or PKI_DIR at the folder that holds";
    const saved = process.env.FERNET_KEY;
    delete process.env.FERNET_KEY;
    try {
      expect({
        server: message(() => readPkiFile(dir, "server_cert.pem")),
        coordinatorKey: message(() => readPrivatePkiFile(dir, "coordinator_key.pem")),
        client: message(() => readPkiFile(dir, "client1_cert.pem")),
        ca: message(() => readPkiFile(dir, "ca_cert.pem")),
        crl: message(() => readPkiFile(dir, "crl.pem")),
        fernet: message(() => loadFernetKeys(dir)),
        emptyFernet: message(() => (writeFileSync(join(dir, "encryption_key.txt"), "\n", { mode: 0o600 }), loadFernetKeys(dir))),
        emptyEnv: message(() => {
          process.env.FERNET_KEY = "";
          return loadFernetKeys(dir);
        }),
      }).toEqual({
        server: `missing ${dir}/server_cert.pem: copy this host's files from the CA host, where ./pki.sh bundle NAME DIR --as server packs this host's identity NAME (./pki.sh issue NAME --server --san … issues it), ${elsewhere} them`,
        coordinatorKey: `missing ${dir}/coordinator_key.pem: copy this host's files from the CA host, where ./pki.sh bundle NAME DIR --as coordinator packs this host's identity NAME (./pki.sh issue NAME --coordinator --san … issues it), ${elsewhere} them`,
        client: `missing ${dir}/client1_cert.pem: copy this host's files from the CA host, where ./pki.sh bundle client1 DIR packs them (./pki.sh issue client1 --KIND --san … issues it), ${elsewhere} them`,
        ca: `missing ${dir}/ca_cert.pem: copy ca_cert.pem from the CA host (./pki.sh bundle NAME DIR there packs it with this host's identity), ${elsewhere} it`,
        crl: `missing ${dir}/crl.pem: copy crl.pem from the CA host (./pki.sh bundle NAME DIR there packs it with this host's identity), ${elsewhere} it`,
        fernet: `missing ${dir}/encryption_key.txt: copy encryption_key.txt from the CA host (./pki.sh bundle NAME DIR --fernet there packs it), ${elsewhere} it`,
        emptyFernet: `no Fernet key in ${dir}/encryption_key.txt: copy encryption_key.txt from the CA host (./pki.sh bundle NAME DIR --fernet there packs it), ${elsewhere} it`,
        emptyEnv: `FERNET_KEY is set but holds no Fernet key: give the key, or unset it to read ${dir}/encryption_key.txt`,
      });
    } finally {
      if (saved === undefined) delete process.env.FERNET_KEY;
      else process.env.FERNET_KEY = saved;
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("no text in the code or in pki.sh's messages names ./pki.sh without a command that never makes a CA", async () => {
    // crl, revoke, list and bundle need the CA that is there; issue makes one only in an empty folder; --help and
    // fernet (the key file's rotation, before any CA is looked at) nothing.
    const safe = /^ (crl|issue|bundle|list|revoke|fernet|--help)\b/;
    const offenders: string[] = [];
    let hints = 0;
    const check = (file: string, line: string, number: number) => {
      for (const match of line.matchAll(/\.\/pki\.sh/g)) {
        hints++;
        if (!safe.test(line.slice(match.index + match[0].length))) offenders.push(`${file}:${number}: ${line.trim()}`);
      }
    };
    for (const dir of ["shared", "roles", "harness"]) {
      for await (const file of new Bun.Glob("**/*.ts").scan(join(REPO_ROOT, dir))) {
        const path = join(REPO_ROOT, dir, file);
        // Tests and test support name commands in titles and steps, not in hints a user reads.
        if (file.endsWith(".test.ts") || relative(REPO_ROOT, path).startsWith("shared/testing/")) continue;
        read(join(REPO_ROOT, dir), file)
          .split("\n")
          .forEach((line, i) => {
            if (!/^\s*(\/\/|\*|\/\*)/.test(line)) check(relative(REPO_ROOT, path), line, i + 1);
          });
      }
    }
    read(REPO_ROOT, "pki.sh")
      .split("\n")
      .forEach((line, i) => {
        if (/\becho\b/.test(line)) check("pki.sh", line, i + 1);
      });
    expect({ offenders, seen: hints > 10 }).toEqual({ offenders: [], seen: true });
  });
});
