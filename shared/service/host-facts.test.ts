// The certificate expiry a role exports (issue 21, "expiry in sight"), checked against what openssl reads in the
// same files: its own certificate and every CA of its bundle, and a renewed certificate as soon as it is in force.
import { beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { Metrics } from "../ops/metrics.ts";
import { loadIdentity, type Identity } from "../platform/tls.ts";
import { runPkiSh, testPki } from "../testing/pki.ts";
import { parsePrometheus } from "../testing/prometheus.ts";
import { certificateExpiries, EXPIRY_WARNING_MS, expiryWarningMs, exportCertificateExpiry } from "./host-facts.ts";

const GAUGE = "securemesh_certificate_expiry_timestamp_seconds";

/** notAfter (ms) and serial of a certificate file, as openssl prints them. */
function openssl(file: string): { notAfter: number; serial: string } {
  const run = Bun.spawnSync(["openssl", "x509", "-in", file, "-noout", "-enddate", "-serial"]);
  const out = run.stdout.toString();
  if (run.exitCode !== 0) throw new Error(`openssl x509 ${file}: ${run.stderr.toString()}`);
  return { notAfter: Date.parse(/notAfter=(.+)/.exec(out)![1]!), serial: /serial=(\S+)/.exec(out)![1]! };
}

let main: string;
let other: string;
beforeAll(async () => {
  [main, other] = await Promise.all([testPki("main"), testPki("other")]);
});

describe("certificateExpiries", () => {
  test("the role's own certificate and its CA, with the notAfter and serial openssl reads", () => {
    const [own, ca, ...rest] = certificateExpiries(loadIdentity(main, "server"));
    expect(rest).toEqual([]);
    expect(own).toEqual({ kind: "identity", name: "server", ...openssl(join(main, "server_cert.pem")) });
    expect(ca).toMatchObject({ kind: "ca", ...openssl(join(main, "ca_cert.pem")) });
  });

  test("a bundle of two roots, as while one is rotated out: one sample per root", () => {
    const identity = loadIdentity(main, "server");
    const bundle = { ...identity, ca: `${identity.ca}\n${loadIdentity(other, "server").ca}` };
    const cas = certificateExpiries(bundle).filter((e) => e.kind === "ca");
    expect(cas.map((e) => e.serial)).toEqual([openssl(join(main, "ca_cert.pem")).serial, openssl(join(other, "ca_cert.pem")).serial]);
  });
});

describe("the gauge on /metrics", () => {
  test("reads the material in force: a renewed certificate shows at the next scrape", async () => {
    const dir = await testPki("expiry-gauge");
    let current: Identity = loadIdentity(dir, "server");
    const metrics = new Metrics();
    exportCertificateExpiry(metrics, () => current);
    const before = parsePrometheus(metrics.render());
    const first = openssl(join(dir, "server_cert.pem"));
    expect(before.value(GAUGE, { kind: "identity", name: "server", serial: first.serial })).toBe(first.notAfter / 1000);
    const ca = openssl(join(dir, "ca_cert.pem"));
    expect(before.value(GAUGE, { kind: "ca", serial: ca.serial })).toBe(ca.notAfter / 1000);

    await runPkiSh(dir, "issue", "server", "--server", "--force", "--not-after", "20300101000000Z");
    current = loadIdentity(dir, "server");
    const renewed = openssl(join(dir, "server_cert.pem"));
    expect(renewed.notAfter).toBe(Date.parse("2030-01-01T00:00:00Z"));
    const after = parsePrometheus(metrics.render());
    expect(after.value(GAUGE, { kind: "identity", serial: renewed.serial })).toBe(renewed.notAfter / 1000);
    expect(after.value(GAUGE, { kind: "identity", serial: first.serial })).toBeUndefined();
  });
});

test("the expiry warning: 14 days before the end, or a sixth of the life when that is shorter", () => {
  const hour = 3_600_000;
  expect(expiryWarningMs(0, 397 * 24 * hour)).toBe(EXPIRY_WARNING_MS);
  expect(expiryWarningMs(0, 24 * hour)).toBe(4 * hour);
  expect(expiryWarningMs(0, 60_000)).toBe(10_000);
  expect(expiryWarningMs(Number.NaN, 24 * hour)).toBe(EXPIRY_WARNING_MS);
  expect(expiryWarningMs(24 * hour, 0)).toBe(EXPIRY_WARNING_MS);
});
