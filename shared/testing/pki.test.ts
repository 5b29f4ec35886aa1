// pki.sh as a user runs it: --san for real hosts, its validation, and what it keeps (0600 keys, CA:FALSE, EKU per kind).
import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { REPO_ROOT } from "../platform/config.ts";
import { extendedKeyUsages } from "../platform/eku.ts";
import { CLIENT_AUTH_OID, SERVER_AUTH_OID } from "../platform/tls.ts";
import { issueIdentity, newPki, testPki } from "./pki.ts";

setDefaultTimeout(60_000);

const certificate = (dir: string, name: string) => new X509Certificate(readFileSync(join(dir, `${name}_cert.pem`)));
const sansOf = (dir: string, name: string) => certificate(dir, name).subjectAltName?.split(", ") ?? [];
const fileMode = (path: string) => statSync(path).mode & 0o777;

/** Runs pki.sh, returning its exit code and stderr rather than throwing. */
async function pkiSh(dir: string, ...args: string[]): Promise<{ code: number; stderr: string }> {
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh"), ...args], { env: { ...process.env, PKI_DIR: dir }, stdout: "pipe", stderr: "pipe" });
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
