// `bun roles/<role>.ts check [the role's own flags]`: what an operator runs on a host before starting a role and
// after every change (issue 23). It reads the same configuration the role would, checks the host's certificate,
// CRL, policy, Fernet keys and database, and compares the host with its peers: their policy, CRL and clocks.
// One line per finding; exit 0 when nothing is wrong, 1 when something is, 2 when the configuration does not parse.
import { createPrivateKey, X509Certificate } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { isIP } from "node:net";
import { join } from "node:path";
import { expectPeer, parsePolicy, parseSpiffeId, policyHash } from "../authz/index.ts";
import { readCrlFile, formatCrlNumber } from "../authz/crl-file.ts";
import { displayPath, loadFernetKeys, readPkiFile } from "../platform/config.ts";
import { extendedKeyUsages } from "../platform/eku.ts";
import { HttpsClient } from "../platform/https-client.ts";
import { openToOthers } from "../platform/private-files.ts";
import { CLIENT_AUTH_OID, mutualTlsClientOptions, SERVER_AUTH_OID, type Identity } from "../platform/tls.ts";
import { certificateIdentity, expiryWarningMs, SKEW_WARNING_MS, type HostFacts } from "./host-facts.ts";

/** The status page's limits, so the check and the page never disagree about a host. */
const CLOCK_SKEW_LIMIT_MS = SKEW_WARNING_MS;

export type CheckStatus = "ok" | "warn" | "FAIL";
export interface CheckLine {
  status: CheckStatus;
  topic: string;
  text: string;
}

export interface HostCheckInput {
  /** The role's name: its certificate's kind in the SPIFFE ID (a server's identity is spiffe://securemesh/server/…). */
  role: string;
  /** The PKI file name of the certificate (`<certificate>_cert.pem`). */
  certificate: string;
  pki: string;
  /** The address the role binds: its certificate must name it (a wildcard address names no one host). */
  host: string;
  policy: string;
  noCrl: boolean;
  /** Servers and clients hold the Fernet keys. */
  fernet?: boolean;
  /** The role's database: reachable, and which store. */
  store?: () => Promise<{ describe: string; id: string }>;
  /** Peers to compare with over mutual TLS (their /health facts): a coordinator's servers, or --peer. */
  peers?: readonly string[];
  now?: () => number;
}

const WILDCARD = new Set(["0.0.0.0", "::", "[::]"]);

export async function checkHost(input: HostCheckInput): Promise<CheckLine[]> {
  const now = input.now ?? Date.now;
  const lines: CheckLine[] = [];
  const say = (status: CheckStatus, topic: string, text: string) => lines.push({ status, topic, text });

  const identity = checkCertificate(input, now(), say);
  const crlNumber = checkCrl(input, now(), say);
  const ownPolicy = checkPolicy(input.policy, say);
  if (input.fernet) {
    try {
      const keys = loadFernetKeys(input.pki);
      say("ok", "fernet", `${keys.length} key(s) in ${displayPath(join(input.pki, "encryption_key.txt"))}`);
    } catch (error) {
      say("FAIL", "fernet", (error as Error).message);
    }
  }
  if (input.store) {
    try {
      const store = await input.store();
      say("ok", "database", `${store.describe}: reachable; store ${store.id}`);
    } catch (error) {
      say("FAIL", "database", (error as Error).message);
    }
  }
  if (input.peers && input.peers.length > 0) {
    if (!identity) say("FAIL", "peers", "not asked: this host's certificate could not be loaded");
    else await comparePeers(input, identity, { policy: ownPolicy, crl: crlNumber }, now, say);
  }
  return lines;
}

function checkCertificate(input: HostCheckInput, now: number, say: (s: CheckStatus, t: string, x: string) => void): Identity | null {
  const certPath = join(input.pki, `${input.certificate}_cert.pem`);
  const keyPath = join(input.pki, `${input.certificate}_key.pem`);
  let cert: X509Certificate;
  let ca: X509Certificate;
  let pems: { cert: string; ca: string };
  try {
    pems = { cert: readPkiFile(input.pki, `${input.certificate}_cert.pem`), ca: readPkiFile(input.pki, "ca_cert.pem") };
    cert = new X509Certificate(pems.cert);
    ca = new X509Certificate(pems.ca);
  } catch (error) {
    say("FAIL", "certificate", (error as Error).message);
    return null;
  }
  const problems: string[] = [];
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey))
    problems.push(`${displayPath(certPath)} is not signed by ${displayPath(join(input.pki, "ca_cert.pem"))}`);
  if (cert.ca) problems.push("it is a CA certificate (CA:TRUE): a leaf must say CA:FALSE");
  const id = certificateIdentity(cert);
  const kind = parseSpiffeId(id)?.kind;
  if (kind !== input.role) problems.push(`its identity ${id || "(none)"} is not of kind ${input.role}`);
  const usages = extendedKeyUsages(cert.raw);
  if (!usages.includes(SERVER_AUTH_OID)) problems.push("its EKU lacks serverAuth, so it cannot serve");
  const expires = new Date(cert.validTo).getTime();
  const days = (expires - now) / 86_400_000;
  const renewSoon = expires - now < expiryWarningMs(new Date(cert.validFrom).getTime(), expires);
  if (days <= 0) problems.push(`it expired at ${new Date(expires).toISOString()}`);
  if (new Date(cert.validFrom).getTime() > now) problems.push(`it is not valid until ${new Date(cert.validFrom).toISOString()} (is this host's clock behind?)`);
  const sanProblem = sanMismatch(cert, input.host);
  if (sanProblem) problems.push(sanProblem);
  let key: string | null = null;
  try {
    const mode = statSync(keyPath).mode & 0o777;
    const open = openToOthers(keyPath, mode);
    if (open) problems.push(open);
    key = readFileSync(keyPath, "utf8");
    if (!cert.checkPrivateKey(createPrivateKey(key))) problems.push(`${displayPath(keyPath)} does not match the certificate`);
  } catch (error) {
    problems.push(`${displayPath(keyPath)}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
  const summary = `${id}, EKU ${usages.includes(CLIENT_AUTH_OID) ? "serverAuth+clientAuth" : "serverAuth"}, SANs ${cert.subjectAltName ?? "none"}; expires ${new Date(expires).toISOString()} (${Math.floor(days)} days)`;
  if (problems.length > 0) say("FAIL", "certificate", `${summary}: ${problems.join("; ")}`);
  else say(renewSoon ? "warn" : "ok", "certificate", `${summary}${renewSoon ? ": renew it soon" : ""}; chain to the CA ok; key ${displayPath(keyPath)} 0600`);
  return problems.length === 0 && key ? { name: input.certificate, cert: pems.cert, key, ca: pems.ca } : null;
}

/** Why the certificate does not name `host`, or null: an IP needs an IP SAN, a name a DNS SAN. */
export function sanMismatch(cert: X509Certificate, host: string): string | null {
  if (WILDCARD.has(host)) return null; // binds every address; which one callers use is theirs to name
  const bare = host.replace(/^\[|\]$/g, "");
  if (isIP(bare) ? cert.checkIP(bare) !== undefined : cert.checkHost(bare) !== undefined) return null;
  return `its SANs do not name --host ${host}, so callers that check the host name refuse it`;
}

function checkCrl(input: HostCheckInput, now: number, say: (s: CheckStatus, t: string, x: string) => void): string {
  if (input.noCrl) {
    say("warn", "crl", "--no-crl: nothing is revoked on this host");
    return "none";
  }
  let ca: string;
  try {
    ca = readPkiFile(input.pki, "ca_cert.pem");
  } catch (error) {
    say("FAIL", "crl", (error as Error).message);
    return "unknown";
  }
  const reading = readCrlFile(input.pki, ca, now);
  if ("refused" in reading) {
    say("FAIL", "crl", `${reading.refused}; run ./pki.sh crl on the CA host and copy crl.pem here`);
    return "unknown";
  }
  const { list } = reading.crl;
  const number = formatCrlNumber(list.number);
  const left = ((list.nextUpdate?.getTime() ?? now) - now) / 86_400_000;
  say(
    left < 7 ? "warn" : "ok",
    "crl",
    `signed by the CA, number ${number}, ${list.revoked.size} revoked, fresh until ${list.nextUpdate?.toISOString()}${left < 7 ? ": refresh it soon (./pki.sh crl)" : ""}`,
  );
  return number;
}

function checkPolicy(path: string, say: (s: CheckStatus, t: string, x: string) => void): string {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    say("FAIL", "policy", `cannot read ${displayPath(path)}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
    return "unknown";
  }
  const hash = policyHash(text);
  try {
    parsePolicy(text); // the role's own parser: what passes here, the role loads

    say("ok", "policy", `${displayPath(path)} parses; ${hash}`);
  } catch (error) {
    say("FAIL", "policy", `${displayPath(path)}: ${(error as Error).message}`);
  }
  return hash;
}

/** Each peer's /health facts against ours: the same policy and CRL, and a clock within CLOCK_SKEW_LIMIT_MS. */
async function comparePeers(
  input: HostCheckInput,
  identity: Identity,
  own: { policy: string; crl: string },
  now: () => number,
  say: (s: CheckStatus, t: string, x: string) => void,
): Promise<void> {
  const client = new HttpsClient({ tls: { ...mutualTlsClientOptions(identity), checkServerIdentity: expectPeer("spiffe://securemesh/*") } });
  const stores = new Map<string, string>();
  try {
    await Promise.all(
      input.peers!.map(async (peer) => {
        const sent = now();
        let facts: HostFacts | undefined;
        try {
          const answer = await client.request(`${peer.replace(/\/+$/, "")}/health`, { timeoutMs: 5000, idempotent: true });
          facts = (JSON.parse(new TextDecoder().decode(answer.body)) as { facts?: HostFacts }).facts;
        } catch (error) {
          say("FAIL", "peer", `${peer}: not reached: ${(error as Error).message}`);
          return;
        }
        const received = now();
        if (!facts || typeof facts.time !== "number") {
          // A server shows its facts only to an identity its policy grants status.read (issue 22 L2).
          say("warn", "peer", `${peer}: shows this host no facts (an older version, or its policy grants ${identity.name} no status.read)`);
          return;
        }
        if (facts.store) stores.set(peer, facts.store);
        const skew = facts.time - (sent + received) / 2;
        const problems: string[] = [];
        if (facts.policy !== own.policy) problems.push(`policy ${facts.policy} differs from this host's ${own.policy}`);
        if (facts.crl !== own.crl && own.crl !== "none" && facts.crl !== "none") problems.push(`CRL ${facts.crl} differs from this host's ${own.crl}`);
        if (Math.abs(skew) > CLOCK_SKEW_LIMIT_MS)
          problems.push(`its clock is ${(skew / 1000).toFixed(1)} s off this host's (limit ${CLOCK_SKEW_LIMIT_MS / 1000} s)`);
        const summary = `${peer} (${facts.identity} on ${facts.hostname}): policy ${facts.policy}, CRL ${facts.crl}, clock ${skew >= 0 ? "+" : ""}${Math.round(skew)} ms`;
        say(problems.length ? "FAIL" : "ok", "peer", problems.length ? `${summary}: ${problems.join("; ")}` : summary);
      }),
    );
    if (new Set(stores.values()).size > 1) {
      say(
        "FAIL",
        "peers",
        `they write to different databases: ${[...stores].map(([peer, id]) => `${peer} store ${id}`).join(", ")}; a server of another cluster's database?`,
      );
    }
  } finally {
    client.close();
  }
}

/** The report: one aligned line per finding, then the verdict. */
export function formatCheck(role: string, lines: readonly CheckLine[]): string {
  const failed = lines.filter((l) => l.status === "FAIL").length;
  const body = lines.map((l) => `  ${l.status.padEnd(4)}  ${l.topic.padEnd(11)}  ${l.text}`);
  return [`securemesh check: ${role}`, ...body, failed ? `${failed} problem(s): fix them before starting ${role}` : `no problems`].join("\n");
}
