// TrustMaterial's CRL rules (#18 M2) against real PKIs from pki.sh: what a role refuses to start with, what a reload
// keeps in force, --no-crl, and the stale report. Reloads are called directly; the file poll is watch.ts's.
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { copyFileSync, cpSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Logger } from "../ops/log.ts";
import { ConfigError } from "../platform/errors.ts";
import type { Identity } from "../platform/tls.ts";
import { issueIdentity, newPki, runPkiSh, signCrl, testPki } from "../testing/pki.ts";
import { waitFor } from "../../harness/cluster.ts";
import { CLOCK_SKEW_MS, CRL_FIX } from "./crl-file.ts";
import { TrustMaterial, type TrustChange, type TrustOptions } from "./trust.ts";

setDefaultTimeout(60_000); // a few PKIs and a few dozen openssl runs on a shared machine

type Level = "info" | "warn" | "error";

/** A logger that keeps each line with its level. */
function recorder(): { logger: Logger; lines: [Level, string][]; at: (level: Level) => string[] } {
  const lines: [Level, string][] = [];
  const keep = (level: Level) => (message: string) => void lines.push([level, message]);
  const logger: Logger = { role: "t", info: keep("info"), warn: keep("warn"), error: keep("error"), access: () => {} };
  return { logger, lines, at: (level) => lines.filter(([l]) => l === level).map(([, m]) => m) };
}

const DAY = 86_400_000;
const read = (dir: string, file: string) => readFileSync(join(dir, file), "utf8");
const serialOf = (dir: string, name: string) => new X509Certificate(read(dir, `${name}_cert.pem`)).serialNumber;
/** Replaces crl.pem by rename, as pki.sh does. */
const putCrl = (dir: string, pem: string) => {
  writeFileSync(join(dir, "crl.pem.tmp"), pem);
  renameSync(join(dir, "crl.pem.tmp"), join(dir, "crl.pem"));
};

/** Folders this file made, removed when it is done. */
const temporary: string[] = [];
afterAll(() => temporary.forEach((dir) => rmSync(dir, { recursive: true, force: true })));

/** A copy of `source` in a folder of its own, so a test may break its crl.pem without touching another's. */
function copyOf(source: string): string {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-trust-"));
  temporary.push(dir);
  cpSync(source, dir, { recursive: true });
  // ca.cnf names its own folder: the copy's openssl must write the copy's index and crlnumber.
  const config = join(dir, "ca_db", "ca.cnf");
  writeFileSync(config, read(dir, "ca_db/ca.cnf").replaceAll(source, dir));
  return dir;
}

let pki: string; // x revoked: its CRL lists one serial
let other: string; // another CA, the same subject name
let xSerial: string;

beforeAll(async () => {
  pki = await newPki("trust");
  temporary.push(pki);
  await issueIdentity(pki, "x", "client");
  await runPkiSh(pki, "revoke", "x");
  other = await testPki("other");
  xSerial = serialOf(pki, "x");
});

describe("at start", () => {
  test("a valid CRL is in force: its serials are revoked, crlStatus shows it, the TLS stack gets the same PEM", async () => {
    const dir = copyOf(pki);
    const pem = read(dir, "crl.pem");
    const trust = TrustMaterial.open(dir, "keyserver");
    expect([trust.isRevoked(xSerial), trust.isRevoked(serialOf(dir, "client1")), trust.identity.crl === pem]).toEqual([true, false, true]);
    const status = trust.crlStatus();
    expect(status).toEqual({
      enabled: true,
      number: status.number,
      thisUpdate: status.thisUpdate,
      nextUpdate: status.nextUpdate,
      revoked: 1,
      stale: false,
      lastError: null,
    });
    // The number and dates as openssl reads them.
    const openssl = Bun.spawnSync(["openssl", "crl", "-in", join(dir, "crl.pem"), "-noout", "-crlnumber", "-lastupdate", "-nextupdate"]).stdout.toString();
    expect(`crlNumber=0x${status.number!.toString(16).toUpperCase()}`).toBe(/^crlNumber=.*$/m.exec(openssl)![0]);
    expect(status.nextUpdate!.getTime()).toBe(Date.parse(/^nextUpdate=(.*)$/m.exec(openssl)![1]!));
    expect(status.thisUpdate!.getTime()).toBe(Date.parse(/^lastUpdate=(.*)$/m.exec(openssl)![1]!));
  });

  test("no usable crl.pem: the role refuses to start with one line naming the file, what is wrong, and the fix", async () => {
    const dir = copyOf(pki);
    const now = Date.now();
    // biome-ignore lint/suspicious/noConfusingVoidType: a case is a check that throws or rejects, sync or async
    const cases: [string, () => Promise<unknown> | void, RegExp][] = [
      ["missing", () => rmSync(join(dir, "crl.pem")), /crl\.pem is missing/],
      ["another CA's", () => copyFileSync(join(other, "crl.pem"), join(dir, "crl.pem")), /crl\.pem: invalid CRL: signature does not verify with our CA/],
      ["not a CRL", () => writeFileSync(join(dir, "crl.pem"), "not a CRL\n"), /crl\.pem: invalid CRL: not a PEM X509 CRL/],
      ["unreadable", () => (rmSync(join(dir, "crl.pem")), mkdirSync(join(dir, "crl.pem"))), /cannot read .*crl\.pem: EISDIR/],
      ["number-less", () => signCrl(dir, { number: null }), /crl\.pem has no CRL number/],
      [
        "expired",
        () => signCrl(dir, { thisUpdate: new Date(now - 31 * DAY), nextUpdate: new Date(now - 60_000) }),
        /crl\.pem \(CRL number 0x[0-9A-F]+\) expired at .* \(its nextUpdate\)/,
      ],
      [
        "not yet valid",
        () => signCrl(dir, { thisUpdate: new Date(now + 2 * CLOCK_SKEW_MS) }),
        /crl\.pem is not valid until .* \(its thisUpdate; is this host's clock behind\?\)/,
      ],
    ];
    for (const [what, breakIt, reason] of cases) {
      rmSync(join(dir, "crl.pem"), { recursive: true, force: true });
      await signCrl(dir);
      await breakIt();
      let error: unknown;
      try {
        TrustMaterial.open(dir, "keyserver");
      } catch (caught) {
        error = caught;
      }
      const message = (error as Error | undefined)?.message ?? "it started";
      expect({
        what,
        configError: error instanceof ConfigError,
        oneLine: !message.includes("\n"),
        reason: reason.test(message),
        names: message.includes(join(dir, "crl.pem")),
        fix: message.endsWith(`: ${CRL_FIX}`),
      }).toEqual({ what, configError: true, oneLine: true, reason: true, names: true, fix: true });
      expect(message).toStartWith("no usable CRL, so this role will not start: ");
    }
    // A thisUpdate a little ahead of this clock (the CA host's runs fast) is fine.
    rmSync(join(dir, "crl.pem"), { recursive: true, force: true });
    await signCrl(dir, { thisUpdate: new Date(now + CLOCK_SKEW_MS / 5) });
    expect(TrustMaterial.open(dir, "keyserver").isRevoked(xSerial)).toBe(true);
  });

  test("--no-crl: crl.pem is never read, nothing is revoked, and one warning at start says revocation is off", async () => {
    const dir = copyOf(pki);
    const withFile = TrustMaterial.open(dir, "keyserver", { noCrl: true }); // a crl.pem that lists x is there, unread
    rmSync(join(dir, "crl.pem"));
    const trust = TrustMaterial.open(dir, "keyserver", { noCrl: true });
    expect([withFile.isRevoked(xSerial), trust.isRevoked(xSerial), trust.identity.crl]).toEqual([false, false, undefined]);
    expect(trust.crlStatus()).toEqual({ enabled: false, number: null, thisUpdate: null, nextUpdate: null, revoked: 0, stale: false, lastError: null });
    const { logger, lines } = recorder();
    trust.watch(logger);
    trust.stop();
    expect(lines).toEqual([["warn", "revocation is OFF (--no-crl): crl.pem is not read, and no certificate is refused as revoked"]]);
    // A reload does not read it either: the file may be anything.
    writeFileSync(join(dir, "crl.pem"), "not a CRL\n");
    const reload = recorder();
    expect(await trust.reload(reload.logger)).toBe(true);
    expect([trust.isRevoked(xSerial), reload.at("error"), reload.at("info")]).toEqual([
      false,
      [],
      ["TLS material reloaded: 0 revoked certificate(s) on the CRL"],
    ]);
  });
});

describe("reload", () => {
  let dir: string;
  let trust: TrustMaterial;
  let inForce: string; // the CRL at start: lists x
  let changes: TrustChange[];
  let log: ReturnType<typeof recorder>;

  beforeEach(async () => {
    dir = copyOf(pki);
    inForce = await signCrl(dir);
    changes = [];
    trust = TrustMaterial.open(dir, "keyserver").onReload((_identity: Identity, changed) => void changes.push(changed));
    log = recorder();
  });

  /** After a refused reload: x still revoked, the TLS stack still has the CRL in force, one error line and no other. */
  async function expectKept(reason: RegExp): Promise<void> {
    const before = trust.crlStatus();
    expect(await trust.reload(log.logger)).toBe(false);
    expect({ revoked: trust.isRevoked(xSerial), pem: trust.identity.crl === inForce, changes, lines: log.lines.length }).toEqual({
      revoked: true,
      pem: true,
      changes: [],
      lines: 1,
    });
    const [line] = log.at("error");
    expect(line).toMatch(/^CRL NOT reloaded, the previous one stays in force \(CRL number 0x[0-9A-F]+, 1 revoked, next update \S+Z\): /);
    expect(line).toMatch(reason);
    expect(trust.crlStatus()).toEqual({ ...before, lastError: line!.replace(/^.*?\): /, "") });
  }

  test("missing (moved aside, M2): the CRL in force stays, one error line", async () => {
    renameSync(join(dir, "crl.pem"), join(dir, "crl.pem.aside"));
    await expectKept(/crl\.pem is missing$/);
  });

  test("unreadable or not a CRL: kept", async () => {
    rmSync(join(dir, "crl.pem"));
    mkdirSync(join(dir, "crl.pem"));
    await expectKept(/cannot read .*crl\.pem: EISDIR$/);
    rmSync(join(dir, "crl.pem"), { recursive: true });
    log = recorder();
    writeFileSync(join(dir, "crl.pem"), inForce.replace(/^(-----BEGIN X509 CRL-----\n.{10})./m, "$1!"));
    await expectKept(/crl\.pem: invalid CRL: /);
  });

  test("signed by another CA (with the same subject name): kept", async () => {
    putCrl(dir, read(other, "crl.pem"));
    await expectKept(/crl\.pem: invalid CRL: signature does not verify with our CA$/);
  });

  test("an older CRL put back (a lower number, signed by our CA): kept", async () => {
    await runPkiSh(dir, "crl");
    expect(await trust.reload(log.logger)).toBe(true); // the newer one is in force now
    inForce = read(dir, "crl.pem");
    log = recorder();
    changes.length = 0;
    await signCrl(dir, { number: trust.crlStatus().number! - 1n });
    await expectKept(/crl\.pem has CRL number 0x[0-9A-F]+, lower than the 0x[0-9A-F]+ in force \(an older CRL put back\?\)$/);
  });

  test("no CRL number: kept", async () => {
    await signCrl(dir, { number: null });
    await expectKept(/crl\.pem has no CRL number, so an older CRL could not be told from a newer one$/);
  });

  test("expired (past nextUpdate): kept", async () => {
    await signCrl(dir, { thisUpdate: new Date(Date.now() - 2 * DAY), nextUpdate: new Date(Date.now() - DAY) });
    await expectKept(/crl\.pem \(CRL number 0x[0-9A-F]+\) expired at \S+ \(its nextUpdate\)$/);
  });

  test("the same number with other content (y revoked since): kept, y not revoked", async () => {
    const number = trust.crlStatus().number!;
    await issueIdentity(dir, "y", "client");
    await runPkiSh(dir, "revoke", "y");
    await signCrl(dir, { number });
    await expectKept(/crl\.pem has CRL number 0x[0-9A-F]+, the one in force, but other content$/);
    expect(trust.isRevoked(serialOf(dir, "y"))).toBe(false);
  });

  test("the same file put back: fine again, the error cleared", async () => {
    renameSync(join(dir, "crl.pem"), join(dir, "crl.pem.aside"));
    await expectKept(/is missing$/);
    renameSync(join(dir, "crl.pem.aside"), join(dir, "crl.pem"));
    log = recorder();
    expect(await trust.reload(log.logger)).toBe(true);
    expect({ revoked: trust.isRevoked(xSerial), error: trust.crlStatus().lastError, errors: log.at("error"), changes }).toEqual({
      revoked: true,
      error: null,
      errors: [],
      changes: [{ certificate: false, revocations: false }],
    });
  });

  test("a newer CRL is applied: its new serial is revoked, listeners hear of it", async () => {
    const before = trust.crlStatus().number!;
    await issueIdentity(dir, "y", "client");
    await runPkiSh(dir, "revoke", "y");
    expect(await trust.reload(log.logger)).toBe(true);
    expect({
      y: trust.isRevoked(serialOf(dir, "y")),
      x: trust.isRevoked(xSerial),
      number: trust.crlStatus().number,
      pem: trust.identity.crl,
      changes,
      errors: log.at("error"),
    }).toEqual({ y: true, x: true, number: before + 1n, pem: read(dir, "crl.pem"), changes: [{ certificate: false, revocations: true }], errors: [] });
    expect(log.at("info")).toEqual([
      `TLS material reloaded: 2 revoked certificate(s) on the CRL (CRL number 0x${(before + 1n).toString(16).toUpperCase()}, 2 revoked, next update ${trust.crlStatus().nextUpdate!.toISOString()})`,
    ]);
  });

  test("a renewed certificate with a refused CRL: the certificate is applied, the CRL in force kept", async () => {
    await issueIdentity(dir, "keyserver", "keyserver", { force: true });
    rmSync(join(dir, "crl.pem"));
    expect(await trust.reload(log.logger)).toBe(true);
    expect({
      cert: trust.identity.cert === read(dir, "keyserver_cert.pem"),
      pem: trust.identity.crl === inForce,
      revoked: trust.isRevoked(xSerial),
      changes,
      errors: log.at("error").length,
    }).toEqual({ cert: true, pem: true, revoked: true, changes: [{ certificate: true, revocations: false }], errors: 1 });
  });

  test("a new CA needs a CRL of its own: without one nothing is reloaded; with one, its own numbering counts", async () => {
    for (const file of ["ca_cert.pem", "keyserver_cert.pem", "keyserver_key.pem"]) copyFileSync(join(other, file), join(dir, file));
    rmSync(join(dir, "crl.pem"));
    expect(await trust.reload(log.logger)).toBe(false);
    expect(log.at("error")).toEqual([
      expect.stringMatching(/^TLS material NOT reloaded, the previous one stays in force: the new CA needs a valid CRL of its own: .*crl\.pem is missing$/),
    ]);
    expect(trust.identity.ca).not.toBe(read(other, "ca_cert.pem"));
    copyFileSync(join(other, "crl.pem"), join(dir, "crl.pem"));
    expect(await trust.reload(log.logger)).toBe(true);
    expect([trust.identity.ca === read(other, "ca_cert.pem"), trust.isRevoked(xSerial), changes]).toEqual([
      true,
      false,
      [{ certificate: true, revocations: true }],
    ]);
  });
});

describe("a CRL in force that goes stale", () => {
  let trust: TrustMaterial | undefined;
  afterEach(() => trust?.stop());

  test("one error line when it passes nextUpdate (its serials still refused), one info line when a fresh one comes", async () => {
    const dir = copyOf(pki);
    const start = Date.now();
    await signCrl(dir, { thisUpdate: new Date(start - 3_600_000), nextUpdate: new Date(start + 3_600_000) });
    let clock = start;
    const options: TrustOptions = { now: () => clock };
    trust = TrustMaterial.open(dir, "keyserver", options);
    const { logger, lines, at } = recorder();
    trust.watch(logger);
    expect(lines).toEqual([["info", expect.stringMatching(/^CRL in force: CRL number 0x[0-9A-F]+, 1 revoked, next update /)]]);
    expect(trust.crlStatus().stale).toBe(false);

    clock = start + 2 * 3_600_000; // past nextUpdate: the once-a-second check reports it
    const stale = await waitFor("the stale CRL's error line", () => at("error").find((l) => l.startsWith("CRL in force is stale")), 5000);
    expect(stale).toEndWith(`: ${CRL_FIX}`);
    expect([trust.crlStatus().stale, trust.isRevoked(xSerial)]).toEqual([true, true]);
    // Reloads meanwhile (the same, stale file: refused as expired) do not report it again.
    await trust.reload(logger);
    await trust.reload(logger);
    expect(at("error").filter((l) => l.startsWith("CRL in force is stale"))).toHaveLength(1);

    await signCrl(dir, { thisUpdate: new Date(start), nextUpdate: new Date(start + 3 * 3_600_000) });
    expect(await trust.reload(logger)).toBe(true);
    expect(at("info").filter((l) => l.startsWith("CRL fresh again: CRL number 0x"))).toHaveLength(1);
    expect([trust.crlStatus().stale, trust.crlStatus().lastError, trust.isRevoked(xSerial)]).toEqual([false, null, true]);
  });
});
