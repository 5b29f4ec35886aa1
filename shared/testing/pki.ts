// Real PKIs for tests and the harness, made by pki.sh (the same script a user runs) in temporary folders.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_ROOT } from "../platform/config.ts";

/** Runs `./pki.sh ARGS` against the PKI in `dir`, failing with its stderr. */
export async function runPkiSh(dir: string, ...args: string[]): Promise<void> {
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh"), ...args], { env: { ...process.env, PKI_DIR: dir }, stdout: "pipe", stderr: "pipe" });
  const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0) throw new Error(`pki.sh ${args.join(" ")} failed (${code}): ${stderr.trim()}`);
}

/** A PKI of its own in a new temporary folder, for a caller that will issue or revoke certificates in it. */
export async function newPki(label = "main", extraArgs: string[] = []): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), `securemesh-pki-${label}-`));
  await runPkiSh(dir, ...extraArgs);
  return dir;
}

/** What `./pki.sh issue NAME --KIND` issues (`both`: a service that serves and calls onward). */
export type IdentityKind = "client" | "server" | "coordinator" | "keyserver" | "secureproxy" | "marketplace" | "both";

/**
 * Issues (or, with `force`, reissues) `name` in the PKI at `dir` through `./pki.sh issue`, with `sans` as its host
 * names and addresses instead of the loopback defaults.
 * @example await issueIdentity(dir, "server", "server", { sans: ["IP:10.77.0.11", "DNS:server1.mesh.test"], force: true })
 */
export async function issueIdentity(dir: string, name: string, kind: IdentityKind, options: { sans?: readonly string[]; force?: boolean } = {}): Promise<void> {
  const sans = (options.sans ?? []).flatMap((san) => ["--san", san]);
  await runPkiSh(dir, "issue", name, `--${kind}`, ...sans, ...(options.force ? ["--force"] : []));
}

/**
 * Packs what `name`'s host needs into `out` through `./pki.sh bundle`: the CA certificate, the CRL, the identity's
 * pair (as `<as>_cert.pem`/`<as>_key.pem` when given, the files a role loads) and, with `fernet`, the Fernet key.
 * The CA key never goes. `out` must be new, empty, or hold only an earlier bundle of the same files.
 * @example await bundleIdentity(dir, "server1", "/hosts/srv1/pki", { as: "server", fernet: true })
 */
export async function bundleIdentity(dir: string, name: string, out: string, options: { fernet?: boolean; as?: string } = {}): Promise<void> {
  await runPkiSh(dir, "bundle", name, out, ...(options.fernet ? ["--fernet"] : []), ...(options.as ? ["--as", options.as] : []));
}

const built = new Map<string, Promise<string>>();

/**
 * A PKI shared by every caller in this process that asks for the same `label` (and arguments): making one costs
 * a few hundred ms of key generation. `label` separates independent CAs ("main", "other"). Do not change it.
 */
export function testPki(label = "main", extraArgs: string[] = []): Promise<string> {
  return sharedPki(`${label} ${extraArgs.join(" ")}`, () => newPki(label, extraArgs));
}

/**
 * An RSA-2048 CA with only client1 and client2, shared like testPki: what the RSA cases use. A demo PKI with --rsa
 * makes nineteen RSA keys, 3.4 s of CPU on the 2-core machine; this makes three.
 */
export function rsaTestPki(): Promise<string> {
  return sharedPki("rsa", async () => {
    const dir = await newPki("rsa", ["init", "--rsa"]);
    for (const name of ["client1", "client2"]) await runPkiSh(dir, "issue", name, "--client", "--rsa");
    return dir;
  });
}

function sharedPki(key: string, make: () => Promise<string>): Promise<string> {
  let dir = built.get(key);
  if (!dir) {
    dir = make();
    built.set(key, dir);
  }
  return dir;
}

/** A PKI of its own with an extra client `x`: the CRL from before `x` was revoked, and the one after. */
export async function revocationPki(label: string): Promise<{ dir: string; crlBefore: string; crlAfter: string }> {
  const dir = await newPki(label);
  await runPkiSh(dir, "issue", "x", "--client");
  const crlBefore = readFileSync(join(dir, "crl.pem"), "utf8");
  await runPkiSh(dir, "revoke", "x");
  return { dir, crlBefore, crlAfter: readFileSync(join(dir, "crl.pem"), "utf8") };
}

/** What signCrl makes: its dates (default: now, and 30 days on), and its number (the CA's next, a given one, or none). */
export interface CrlOptions {
  thisUpdate?: Date;
  nextUpdate?: Date;
  /** A given number, e.g. one lower than the CRL in force; null: no crlNumber at all; default the CA's next. */
  number?: bigint | null;
  /** Where to write it, inside `dir`; default crl.pem. */
  file?: string;
}

/**
 * Signs a CRL of the CA's current revocations with openssl directly (through pki.sh's own ca.cnf), for CRLs
 * `./pki.sh` would not write: aged, expired or not yet valid, with a chosen number, or with none. Returns the PEM.
 * @example await signCrl(dir, { nextUpdate: new Date(Date.now() - 1000) }) // an expired crl.pem
 */
export async function signCrl(dir: string, options: CrlOptions = {}): Promise<string> {
  const config = join(dir, "ca_db", "ca.cnf");
  const now = new Date();
  const at = (date: Date) =>
    date
      .toISOString()
      .replace(/[-:T]/g, "")
      .replace(/\.\d+Z$/, "Z"); // YYYYMMDDHHMMSSZ
  const thisUpdate = options.thisUpdate ?? now;
  const nextUpdate = options.nextUpdate ?? new Date(thisUpdate.getTime() + 30 * 86_400_000);
  let useConfig = config;
  if (options.number === null) {
    useConfig = join(dir, "ca_db", "ca-no-number.cnf"); // without `crlnumber`, openssl writes no crlNumber
    writeFileSync(useConfig, readFileSync(config, "utf8").replace(/^crlnumber = .*$/m, ""));
  } else if (options.number !== undefined) {
    writeFileSync(join(dir, "ca_db", "crlnumber"), `${options.number.toString(16).toUpperCase().padStart(2, "0")}\n`);
  }
  const out = join(dir, options.file ?? "crl.pem");
  try {
    await using proc = Bun.spawn(
      ["openssl", "ca", "-batch", "-config", useConfig, "-gencrl", "-crl_lastupdate", at(thisUpdate), "-crl_nextupdate", at(nextUpdate), "-out", out],
      { stdout: "pipe", stderr: "pipe" },
    );
    const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
    if (code !== 0) throw new Error(`openssl ca -gencrl failed (${code}): ${stderr.trim()}`);
  } finally {
    if (useConfig !== config) rmSync(useConfig, { force: true });
  }
  return readFileSync(out, "utf8");
}

/**
 * Has the CA at `dir` sign a certificate pki.sh never issues: basicConstraints CA:TRUE, yet with the clientAuth EKU
 * and a client SPIFFE ID, as NAME_cert.pem and NAME_key.pem there (an attacker's "CA certificate used as a leaf").
 */
export async function issueCaCertificateAsClient(dir: string, name: string): Promise<void> {
  const extensions = join(dir, `${name}.ext`);
  writeFileSync(
    extensions,
    [
      "basicConstraints=critical,CA:TRUE",
      "keyUsage=critical,digitalSignature,keyCertSign",
      "extendedKeyUsage=clientAuth",
      `subjectAltName=URI:spiffe://securemesh/client/${name}`,
    ].join("\n"),
  );
  const run = async (...args: string[]) => {
    await using proc = Bun.spawn(["openssl", ...args], { stdout: "pipe", stderr: "pipe" });
    const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
    if (code !== 0) throw new Error(`openssl ${args[0]} failed (${code}): ${stderr.trim()}`);
  };
  const key = join(dir, `${name}_key.pem`);
  const csr = join(dir, `${name}.csr`);
  await run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key);
  await run("req", "-new", "-key", key, "-subj", `/CN=${name}`, "-out", csr);
  await run(
    "x509",
    "-req",
    "-in",
    csr,
    "-CA",
    join(dir, "ca_cert.pem"),
    "-CAkey",
    join(dir, "ca_key.pem"),
    "-days",
    "2",
    "-extfile",
    extensions,
    "-out",
    join(dir, `${name}_cert.pem`),
  );
  rmSync(csr, { force: true });
  rmSync(extensions, { force: true });
}
