// The lifetime check `bun harness security` runs before and after its cases (issue 21), on real pki.sh certificates.
import { expect, test } from "bun:test";
import { certificatesExpiringBefore, pkiCertificateFiles, SECURITY_RUN_BOUND_MS } from "./security-checks.ts";
import { runPkiSh, testPki } from "./fixtures/index.ts";

test("a certificate that would run out during a security run is named, with its date; the demo's are not", async () => {
  const pki = await testPki("lifetimes");
  const deadline = Date.now() + SECURITY_RUN_BOUND_MS;
  expect(pkiCertificateFiles(pki)).toContain("ca_cert.pem");
  expect(certificatesExpiringBefore(pki, deadline)).toEqual([]);

  // Ten minutes from now: inside the run's bound, so the run refuses to start on it.
  const notAfter = new Date(Math.floor(Date.now() / 1000) * 1000 + 10 * 60_000);
  const stamp = notAfter
    .toISOString()
    .replace(/[-:T]/g, "")
    .replace(/\.\d+Z$/, "Z");
  await runPkiSh(pki, "issue", "short-lived", "--client", "--not-after", stamp);
  expect(certificatesExpiringBefore(pki, deadline)).toEqual([
    `short-lived_cert.pem expires ${notAfter.toISOString()}, before ${new Date(deadline).toISOString()}`,
  ]);
  // After the run, measured against its end: still valid then, so not named.
  expect(certificatesExpiringBefore(pki, Date.now(), ["short-lived_cert.pem"])).toEqual([]);
});
