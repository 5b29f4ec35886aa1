// The multihost deployment's PKI as an operator makes it (issue 23): an identity per server host, a folder per host
// from `./pki.sh bundle`, and one host's certificate revoked by name. No namespaces needed.
import { afterAll, expect, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { TrustMaterial } from "../../shared/authz/trust.ts";
import { newPki, runPkiSh } from "../../shared/testing/pki.ts";
import { parseServerConfig } from "../../roles/server.ts";
import { HOSTS, issueHostPki, writeHostConfig } from "./deployment.ts";

const made: string[] = [];
afterAll(() => made.forEach((dir) => rmSync(dir, { recursive: true, force: true })));

test("each host's folder: the CA, the CRL and its own identity as the role's files; revoking server2 reaches one host", async () => {
  const pki = await newPki("deployment");
  const root = mkdtempSync(join(tmpdir(), "securemesh-deployment-hosts-"));
  made.push(pki, root);
  const serving: string[] = [...HOSTS.servers, ...HOSTS.coordinators, ...HOSTS.keyservers, ...HOSTS.secureproxies, HOSTS.marketplace];
  const addressOf = (host: string) => `10.77.0.${10 + serving.indexOf(host)}`;
  const pkiOf = (host: string) => join(root, host, "pki");
  await issueHostPki(pki, addressOf, pkiOf);

  /** What a host's role loads (TrustMaterial.open checks the key fits and the CRL is the CA's), and what else is there. */
  const hostView = (host: string, file: string) => {
    const trust = TrustMaterial.open(pkiOf(host), file);
    const sans = new X509Certificate(trust.identity.cert).subjectAltName!.split(", ");
    trust.stop();
    return { files: readdirSync(pkiOf(host)).sort(), identity: sans[0], address: sans[1] };
  };
  const folder = (file: string, fernet: boolean) =>
    ["ca_cert.pem", "crl.pem", ...(fernet ? ["encryption_key.txt"] : []), `${file}_cert.pem`, `${file}_key.pem`].sort();
  expect({
    srv1: hostView("srv1", "server"),
    srv2: hostView("srv2", "server"),
    srv3: hostView("srv3", "server"),
    coord1: hostView("coord1", "coordinator"),
    coord2: hostView("coord2", "coordinator"),
    keys1: hostView("keys1", "keyserver"),
    keys2: hostView("keys2", "keyserver"),
    proxy1: hostView("proxy1", "secureproxy"),
    proxy2: hostView("proxy2", "secureproxy"),
    market: hostView("market", "marketplace"),
    cli1: readdirSync(pkiOf("cli1")).sort(),
    cli2: readdirSync(pkiOf("cli2")).sort(),
  }).toEqual({
    srv1: { files: folder("server", true), identity: "URI:spiffe://securemesh/server/server1", address: "IP Address:10.77.0.10" },
    srv2: { files: folder("server", true), identity: "URI:spiffe://securemesh/server/server2", address: "IP Address:10.77.0.11" },
    srv3: { files: folder("server", true), identity: "URI:spiffe://securemesh/server/server3", address: "IP Address:10.77.0.12" },
    coord1: { files: folder("coordinator", false), identity: "URI:spiffe://securemesh/coordinator/coordinator", address: "IP Address:10.77.0.13" },
    coord2: { files: folder("coordinator", false), identity: "URI:spiffe://securemesh/coordinator/coordinator", address: "IP Address:10.77.0.14" },
    keys1: { files: folder("keyserver", false), identity: "URI:spiffe://securemesh/keyserver/keyserver", address: "IP Address:10.77.0.15" },
    keys2: { files: folder("keyserver", false), identity: "URI:spiffe://securemesh/keyserver/keyserver", address: "IP Address:10.77.0.16" },
    proxy1: { files: folder("secureproxy", false), identity: "URI:spiffe://securemesh/secureproxy/secureproxy", address: "IP Address:10.77.0.17" },
    proxy2: { files: folder("secureproxy", false), identity: "URI:spiffe://securemesh/secureproxy/secureproxy", address: "IP Address:10.77.0.18" },
    market: { files: folder("marketplace", false), identity: "URI:spiffe://securemesh/marketplace/marketplace", address: "IP Address:10.77.0.19" },
    cli1: folder("client1", true),
    cli2: folder("client2", true),
  });

  // Before, every server host held "server": `./pki.sh revoke server` revoked only the last one issued.
  await runPkiSh(pki, "revoke", "server2");
  const serial = (host: string) => new X509Certificate(readFileSync(join(pkiOf(host), "server_cert.pem"))).serialNumber;
  const crl = await Bun.$`openssl crl -in ${join(pki, "crl.pem")} -noout -text`.text();
  expect(HOSTS.servers.map((host) => [host, crl.includes(`Serial Number: ${serial(host)}`)])).toEqual([
    ["srv1", false],
    ["srv2", true],
    ["srv3", false],
  ]);
});

test("a host's role starts as its unit does: flags from its EnvironmentFile, the database URL from a 0600 credential, no secret on argv", () => {
  const etc = mkdtempSync(join(tmpdir(), "securemesh-deployment-etc-"));
  made.push(etc);
  const url = "mysql://app:s3cret@10.77.0.2:3306,10.77.0.3:3306/test";
  const config = writeHostConfig(etc, "server", { port: "5001", host: "10.77.0.10", pki: join(etc, "pki"), ttl: "60" }, { "server-db-url": url }, (c) => [
    "--db-file",
    c["server-db-url"]!,
  ]);
  const argv = [...config.args, "--config", config.file];
  const parsed = parseServerConfig(argv);
  const mode = (path: string) => (statSync(path).mode & 0o777).toString(8);
  expect({
    argv,
    parsed: { port: parsed.port, host: parsed.host, pki: parsed.pki, ttl: parsed.ttl, db: parsed.db },
    modes: [mode(config.file), mode(join(etc, "credentials", "server-db-url"))],
    fileHoldsSecret: readFileSync(config.file, "utf8").includes("s3cret"),
  }).toEqual({
    argv: ["--db-file", join(etc, "credentials", "server-db-url"), "--config", join(etc, "securemesh-server.env")],
    parsed: { port: 5001, host: "10.77.0.10", pki: join(etc, "pki"), ttl: 60, db: url },
    modes: ["600", "600"],
    fileHoldsSecret: false,
  });
});
