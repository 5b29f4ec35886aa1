// The hostile cases of `bun harness security`, shared with harness/security.test.ts (which runs fewer attempts):
// hostile TLS and HTTP, crypto and application input, the authorization matrix and one case per finding of #11.
import { X509Certificate } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { loadFernetKeys } from "../shared/platform/config.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { MAX_CONNECTIONS_PER_IDENTITY } from "../shared/platform/runtime/limits.ts";
import { ProofSigner } from "../shared/request-path/proof.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { ON_BEHALF_OF_HEADER, prepareLegacyRequest, RsaKeyPair } from "../shared/token-path/token-exchange.ts";
import { matrixIdentities, runAuthzMatrix, type MatrixResult } from "./authz-matrix.ts";
import { startMesh, startTokenStack, testPki, type Cluster, type TokenStack } from "./fixtures/index.ts";
import {
  prepareHarnessIdentities,
  runConnectionCapCase,
  runSlowFindingCases,
  seedClient2Token,
  type FindingTargets,
  type Json,
  type Measurement,
} from "./findings.ts";
import { runFindingCases } from "./finding-cases.ts";
import { clear4xx, hostileCertificates, rawHttp, slowHeadersClosed, tlsRefused, type Tally, type TlsMaterial } from "./hostile.ts";
import type { Ports } from "./scenario.ts";

export interface SecurityTargets {
  cluster: Cluster;
  otherPki: string;
  server: string;
  coordinator: string;
  stack: TokenStack;
  hostileCerts: Record<string, TlsMaterial>;
}

export interface SecurityOptions {
  tlsAttempts: number;
  httpAttempts: number;
}

/** Logs of roles started to be refused (a coordinator whose "servers" are not servers, …): their 5xx is the point. */
export const REFUSING_ROLES = /^(refuses-|keyserver-quota)/;

/** Marks the plaintext of hostile payloads, so the log scan can tell where it appears. */
export const PLAINTEXT_MARKER = "plaintext-marker-7f3a";

/** What every group of checks works with: the targets, the TLS of the identities that send, and a POST. */
function securityKit(t: SecurityTargets) {
  const pki = t.cluster.pki;
  const client1 = mutualTlsClientOptions(loadIdentity(pki, "client1"));
  const proxyCert = mutualTlsClientOptions(loadIdentity(pki, "secureproxy"));
  // A server serves only connections of an identity allowed to forward (#11 L4): malformed input reaches it over
  // the coordinator's certificate, so it meets the parsing it is meant to test rather than stopping at the 403.
  const coordinatorCert = mutualTlsClientOptions(loadIdentity(pki, "coordinator"));
  const roles: [string, string, TlsMaterial][] = [
    ["server", t.server, client1],
    ["coordinator", t.coordinator, client1],
    ["keyserver", t.stack.keyserver, proxyCert],
    ["secureproxy", t.stack.secureproxy, client1],
  ];
  const post = (url: string, tls: TlsMaterial, body: string | Uint8Array, type = "application/json", headers: Record<string, string> = {}) =>
    fetch(url, { method: "POST", headers: { "content-type": type, ...headers }, body, tls, signal: AbortSignal.timeout(10_000) });
  return { t, pki, client1, proxyCert, coordinatorCert, roles, post };
}

type SecurityKit = ReturnType<typeof securityKit>;

/** TLS: refused at the handshake, every time (oven-sh/bun#27985 once let about 20% through) */
async function checkHostileCertificates({ t, roles }: SecurityKit, tally: Tally, options: SecurityOptions): Promise<void> {
  for (const [role, url, valid] of roles) {
    // The control: were every attempt failing for some other reason, this case would say so.
    await tally.run(role, "TLS control: a valid certificate connects", options.httpAttempts, async () =>
      (await tlsRefused(url, valid)) === null ? "a valid certificate was refused" : null,
    );
    for (const [name, material] of Object.entries(t.hostileCerts)) {
      await tally.run(role, `TLS: ${name}`, options.tlsAttempts, () => tlsRefused(url, material), 4);
    }
  }
}

/** HTTP: a clear 4xx JSON error for every malformed request */
async function checkMalformedRequests({ t, client1, proxyCert, coordinatorCert, post }: SecurityKit, tally: Tally, options: SecurityOptions): Promise<void> {
  const jsonRoutes: [string, string, TlsMaterial, string, Record<string, string>][] = [
    ["server", `${t.server}/api/data`, coordinatorCert, JSON.stringify({ data: "x", proof: "y", extra: 1 }), {}],
    ["coordinator", `${t.coordinator}/api/data`, client1, JSON.stringify({ data: "x", proof: "y", extra: 1 }), {}],
    ["keyserver", `${t.stack.keyserver}/`, proxyCert, JSON.stringify({ sessionKey: "a", clientId: "b", tokenType: "c", extra: 1 }), {}],
    ["secureproxy", `${t.stack.secureproxy}/request_api`, client1, JSON.stringify({ ClientId: "a", TokenType: "b", ApiUri: "c", extra: 1 }), {}],
  ];
  const big = new Uint8Array(100 * 1024).fill(0x61);
  for (const [role, url, tls, extraFields, headers] of jsonRoutes) {
    const base = url.slice(0, url.indexOf("/", 8));
    const n = options.httpAttempts;
    await tally.run(role, "HTTP: malformed JSON", n, async () => clear4xx(await post(url, tls, "{not json", undefined, headers), 400));
    await tally.run(role, "HTTP: wrong content type", n, async () => clear4xx(await post(url, tls, "hello", "text/plain", headers), 415));
    await tally.run(role, "HTTP: missing fields", n, async () => clear4xx(await post(url, tls, "{}", undefined, headers), 400));
    await tally.run(role, "HTTP: extra field", n, async () => clear4xx(await post(url, tls, extraFields, undefined, headers), 400));
    await tally.run(role, "HTTP: body over the limit", n, async () => clear4xx(await post(url, tls, big, undefined, headers), 413));
    await tally.run(role, "HTTP: huge headers (431)", n, async () => {
      try {
        const response = await fetch(`${base}/health`, { headers: { "x-huge": "h".repeat(64 * 1024) }, tls, signal: AbortSignal.timeout(10_000) });
        // Bun's HTTP parser answers 431 before any handler runs, so this one refusal cannot carry a JSON body.
        return response.status === 431 ? null : await clear4xx(response);
      } catch {
        return null; // the connection was closed on the oversized header: refused
      }
    });
    // HAProxy's default health check is HTTP/1.0 with no Host header: it once crashed the roles (URL "/health").
    await tally.run(role, "HTTP: HTTP/1.0 without Host", n, async () => {
      const answer = await rawHttp(base, tls, "GET /no/such/route HTTP/1.0\r\n\r\n");
      return /^HTTP\/1\.[01] 4\d\d /.test(answer) && /"error":/.test(answer) ? null : `answered: ${answer.slice(0, 80) || "nothing"}`;
    });
    await tally.run(role, "HTTP: unknown route", n, async () => clear4xx(await fetch(`${base}/no/such/route`, { tls }), 404));
    await tally.run(role, "HTTP: wrong method", n, async () => clear4xx(await fetch(`${base}/health`, { method: "DELETE", tls }), 405));
  }
}

/** Crypto and application, through the coordinator */
async function checkCryptoAndApplication({ t, pki, client1, post }: SecurityKit, tally: Tally, options: SecurityOptions): Promise<void> {
  const fernet = new Fernet(loadFernetKeys(pki));
  const signer = new ProofSigner(loadIdentity(pki, "client1"));
  const forger = new ProofSigner(loadIdentity(t.otherPki, "client1"));
  const coordinatorData = `${t.coordinator}/api/data`;
  const send = async (data: string, proof?: string, headers: Record<string, string> = {}) =>
    post(coordinatorData, client1, JSON.stringify(proof === undefined ? { data } : { data, proof }), "application/json", headers);
  const proofFor = (data: string, now?: number) => signer.sign({ method: "POST", path: "/api/data", payload: data }, now);
  const n = options.httpAttempts;
  const secret = (i: number) => `${PLAINTEXT_MARKER} ${i}`;

  await tally.run("server", "crypto: tampered Fernet token", n, async (i) => {
    const token = fernet.encrypt(secret(i));
    const tampered = token.slice(0, 40) + (token[40] === "A" ? "B" : "A") + token.slice(41);
    return clear4xx(await send(tampered, await proofFor(tampered)), 400);
  });
  await tally.run("server", "crypto: wrong Fernet key", n, async (i) => {
    const token = new Fernet("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=").encrypt(secret(i));
    return clear4xx(await send(token, await proofFor(token)), 400);
  });
  await tally.run("server", "crypto: expired Fernet TTL", n, async (i) => {
    const token = fernet.encrypt(secret(i), { now: Date.now() / 1000 - 3600 });
    return clear4xx(await send(token, await proofFor(token)), 400);
  });
  await tally.run("server", "proof: forged (another CA)", n, async (i) => {
    const token = fernet.encrypt(secret(i));
    return clear4xx(await send(token, await forger.sign({ method: "POST", path: "/api/data", payload: token })), 401);
  });
  await tally.run("server", "proof: expired", n, async (i) => {
    const token = fernet.encrypt(secret(i));
    return clear4xx(await send(token, await proofFor(token, Date.now() / 1000 - 3600)), 401);
  });
  await tally.run("server", "proof: replayed jti", n, async (i) => {
    const token = fernet.encrypt(`replay ${i}`);
    const proof = await proofFor(token);
    const first = await send(token, proof);
    if (first.status !== 200) return `first use answered ${first.status}`;
    return clear4xx(await send(token, proof), 401);
  });
  await tally.run("server", "SQL metacharacters (stored verbatim)", n, async (i) => {
    const token = fernet.encrypt(`'; DROP TABLE records; -- ${i} " \\ %`);
    const response = await send(token, await proofFor(token));
    return response.status === 200 ? null : `status ${response.status}`;
  });
  await tally.run("server", "SQL metacharacters in Idempotency-Key", n, async (i) => {
    const token = fernet.encrypt(`idem ${i}`);
    return clear4xx(await send(token, await proofFor(token), { "idempotency-key": `x' OR '1'='1` }), 400);
  });
  await tally.run("server", "oversized token", n, async () => {
    const token = "gAAAAA" + "A".repeat(80 * 1024);
    return clear4xx(await send(token, "y"), 413);
  });
}

/** The token path: what only the KeyServer and the SecureProxy read (names, session keys, an ApiUri). */
async function checkTokenPath({ t, client1, proxyCert, post }: SecurityKit, tally: Tally, options: SecurityOptions): Promise<void> {
  const n = options.httpAttempts;
  const keys = await RsaKeyPair.loadOrCreate(join(t.stack.dataDir, "rsa_key.pem"));
  const keyserverPost = (body: string, headers: Record<string, string> = {}) => post(`${t.stack.keyserver}/`, proxyCert, body, "application/json", headers);
  // sql-prober (harness policy: proxy.use:*) may ask for any token, so only the name check stands between the
  // metacharacters and the query: they are refused as names before any query (the store itself is parameterized
  // and tested with them in shared/token-store.test.ts).
  const prober = { [ON_BEHALF_OF_HEADER]: "spiffe://securemesh/client/sql-prober" };
  await tally.run("keyserver", "SQL metacharacters in clientId/tokenType: refused as names (400)", n, async () => {
    const prepared = await prepareLegacyRequest(keys.publicKey, "' OR '1'='1", "x'; DROP TABLE storage; --");
    return clear4xx(await keyserverPost(prepared.body, prober), 400);
  });
  await tally.run("keyserver", "a '/' inside ClientId cannot reach another row through a wildcard grant (400)", n, async () => {
    const prepared = await prepareLegacyRequest(keys.publicKey, "client1/marketplace", "x");
    return clear4xx(await keyserverPost(prepared.body, prober), 400);
  });
  await tally.run("keyserver", "oversized clientId", n, async () => {
    const prepared = JSON.parse((await prepareLegacyRequest(keys.publicKey, "client1", "marketplace")).body) as Json;
    return clear4xx(await keyserverPost(JSON.stringify({ ...prepared, clientId: "c".repeat(5000) })), 400);
  });
  await tally.run("keyserver", "tampered session key", n, async () => {
    const prepared = JSON.parse((await prepareLegacyRequest(keys.publicKey, "client1", "marketplace")).body) as Json;
    const wrapped = Buffer.from(String(prepared.sessionKey), "base64");
    wrapped[7]! ^= 0x55;
    return clear4xx(await keyserverPost(JSON.stringify({ ...prepared, sessionKey: wrapped.toString("base64") })), 400);
  });
  await tally.run("keyserver", "client certificate (not the proxy): the policy's 403", n, async () => {
    const response = await post(`${t.stack.keyserver}/`, client1, "{}");
    const text = await response.clone().text();
    return (
      (await clear4xx(response, 403)) ??
      (text.includes("spiffe://securemesh/client/client1 lacks permission tokens.fetch") ? null : `403 without the policy's reason: ${text.slice(0, 100)}`)
    );
  });
  const marketPort = new URL(t.stack.marketplace).port;
  const badUris = [
    "https://attacker.example/collect",
    `https://169.254.169.254/latest/meta-data/`,
    `${t.stack.keyserver}/`,
    `https://[::1]:${marketPort}/api/item`,
    `http://localhost:${marketPort}/api/item`,
    `https://user:pw@localhost:${marketPort}/api/item`,
    `https://localhost:22/`,
    "file:///etc/passwd",
  ];
  await tally.run("secureproxy", "ApiUri off the allowlist or internal", badUris.length * n, async (i) => {
    const { status, body } = await t.stack.requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: badUris[i % badUris.length]! });
    return status === 403 && typeof body.error === "string" ? null : `${badUris[i % badUris.length]}: ${status} ${JSON.stringify(body)}`;
  });
  await tally.run("secureproxy", "SQL metacharacters in ClientId/TokenType: refused as names (400)", n, async () => {
    const { status } = await t.stack.requestApi(
      { ClientId: "x' OR 1=1 --", TokenType: "marketplace", ApiUri: `https://localhost:${marketPort}/api/item` },
      "sql-prober",
    );
    return status === 400 ? null : `status ${status}`;
  });
}

/** Every hostile case against every role, one group at a time. */
export async function runSecurityChecks(t: SecurityTargets, tally: Tally, options: SecurityOptions): Promise<void> {
  const kit = securityKit(t);
  for (const group of [checkHostileCertificates, checkMalformedRequests, checkCryptoAndApplication, checkTokenPath]) await group(kit, tally, options);
}

export interface SuiteTargets extends SecurityTargets, Omit<FindingTargets, "cluster" | "stack" | "hostileCerts" | "coordinator"> {
  /** client1's seeded token, to check a release in the matrix is really that token. */
  client1Token: string;
}

export interface SuiteOptions extends SecurityOptions {
  /** Attempts per matrix cell. */
  matrixAttempts: number;
  /** The harness's full run: more attempts per finding, and M3/M4 with processes of their own. */
  full: boolean;
  /**
   * false: only the hostile TLS, HTTP, crypto and application cases and the matrix, which is what a second runtime
   * must repeat; the findings of #11 (with their waits for deadlines and reloads) run once, on Bun. Default true.
   */
  findings?: boolean;
  onMatrixCell?: () => void;
}

/**
 * Everything the suite runs against, on `cluster` (whose PKI must be its own: certificates are issued and revoked in
 * it). Hostile certificates and the harness's identities are issued before any role starts, so the roles load the
 * CRL that revokes one; then the mesh (with its admin listener) and the token stack, client2's token seeded too.
 */
export async function startSecurityTargets(
  cluster: Cluster,
  options: { db: string; tokenDb: string; ports?: Ports; step?: (message: string) => void },
): Promise<SuiteTargets & { client2Token: string }> {
  const step = options.step ?? (() => {});
  step("issuing hostile certificates (expired, not yet valid, revoked, …) and the harness's identities before the roles start");
  const otherPki = await testPki("other");
  const hostileCerts = await hostileCertificates(cluster.pki, otherPki);
  const policyFile = join(cluster.logDir, "policy.json");
  const rules = await prepareHarnessIdentities(cluster.pki, policyFile);
  cluster.addEnv({ SECUREMESH_POLICY: policyFile });

  step("starting server 1, server 2 and the coordinator");
  const mesh = await startMesh({ cluster, ports: options.ports, db: options.db, coordinatorArgs: ["--admin-port", "0"] });
  const admin = await cluster.adminUrl(mesh.coordinatorRole);
  step("starting KeyServer, marketplace and SecureProxy; seeding a token for client2 too");
  // With the opt-in ECDH-ES exchange on, so the matrix decides it too.
  const stack = await startTokenStack({ cluster, ports: options.ports, tokenDb: options.tokenDb, keyserverArgs: ["--ecdh-es"] });
  const client2Token = await seedClient2Token(cluster, stack, options.tokenDb);
  const servers: [string, string] = [mesh.servers[0]!.url, mesh.servers[1]!.url];
  return {
    cluster,
    otherPki,
    server: servers[0],
    servers,
    coordinator: mesh.coordinator,
    admin,
    stack,
    tokenDb: options.tokenDb,
    policyFile,
    rules,
    hostileCerts,
    client1Token: stack.token,
    client2Token,
  };
}

export interface SuiteResult {
  matrix: MatrixResult;
  measurements: Measurement[];
}

/**
 * Everything `bun harness security` and harness/security.test.ts run, in an order that keeps it short and sound:
 * the cases that wait for a deadline run beside the rest; the matrix runs while the policy file is as written;
 * the per-address connection cap runs last and alone, since every connection from 127.0.0.1 counts against it.
 */
export async function runSecuritySuite(t: SuiteTargets, tally: Tally, options: SuiteOptions): Promise<SuiteResult> {
  const roles: [string, string][] = [
    ["server", t.server],
    ["coordinator", t.coordinator],
    ["keyserver", t.stack.keyserver],
    ["secureproxy", t.stack.secureproxy],
  ];
  const client1 = mutualTlsClientOptions(loadIdentity(t.cluster.pki, "client1"));
  const findings = options.findings ?? true;
  const slow = !findings
    ? Promise.resolve()
    : Promise.all([
        ...roles.map(([role, url]) => tally.run(role, "HTTP: slow headers (slowloris)", 3, () => slowHeadersClosed(url, client1, 15_000), 3)),
        runSlowFindingCases(t, tally),
      ]);
  try {
    await runSecurityChecks(t, tally, options);
    const matrix = await runAuthzMatrix(
      {
        pki: t.cluster.pki,
        policyFile: t.policyFile,
        coordinator: t.coordinator,
        server: t.server,
        secureproxy: t.stack.secureproxy,
        keyserver: t.stack.keyserver,
        apiUri: t.stack.itemUri,
        client1Token: t.client1Token,
        identities: matrixIdentities(t.cluster.pki, t.hostileCerts),
      },
      { attempts: options.matrixAttempts, onCell: options.onMatrixCell },
    );
    if (!findings) return { matrix, measurements: [] };
    const measurements = await runFindingCases(t, tally, { full: options.full });
    await slow;
    await runConnectionCapCase(t, tally, MAX_CONNECTIONS_PER_IDENTITY);
    return { matrix, measurements };
  } finally {
    await slow.catch(() => {});
  }
}

/** Every role still answers /health with 200. */
export async function rolesHealthy(cluster: Cluster, urls: string[]): Promise<string[]> {
  const sick: string[] = [];
  for (const url of urls) if ((await cluster.health(url))?.status !== 200) sick.push(url);
  return sick;
}

// An access line ends with its request's trace (#14): `… 200 - trace=<id>` or `… 200 - request_id=<id>`.
const ACCESS_LINE = /^\S+ - - \[(\d\d)\/(\w{3})\/(\d{4}) (\d\d):(\d\d):(\d\d)\] "[A-Z]+ \S+ HTTP\/1\.1" \d{3} -(?: (?:trace|request_id)=\S+)?$/;
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/**
 * A line that is not one log entry of its own: one that starts with the L1 case's forged text (once escape
 * sequences are taken off; findings.ts's FORGED_MARKER names it, but a role may cut the echo short before the marker), or any
 * access line dated more than a day away from now (a real one is written as it happens).
 */
export function forgedLine(line: string, now = Date.now()): boolean {
  const bare = line.replace(/\u001b\[[0-9;?]*[A-Za-z]|\u001b\][^\u0007]*\u0007/g, "");
  if (/^127\.0\.0\.1 - - \[01\/Jan\/2030 00:00:00\]/.test(bare) || /^Server https:\/\/127\.0\.0\.1:1 is back/.test(bare)) return true;
  const access = ACCESS_LINE.exec(bare);
  if (!access) return false;
  const [, day, month, year, hour, minute, second] = access;
  const at = new Date(Number(year), MONTHS.indexOf(month!), Number(day), Number(hour), Number(minute), Number(second)).getTime();
  return !(Math.abs(at - now) < 86_400_000);
}

/** The colours the logger itself writes (FORCE_COLOR, for the recorded pictures): yellow, red, reset. */
const LOGGER_COLOURS = /\u001b\[(?:0|31|33)m/g;

/**
 * Scans every log for what must never be there: private keys, the Fernet key, the API tokens, hostile
 * plaintext outside the server's intended "Decrypted data:" line, any 5xx answer (except /health's 503 while not
 * ready, and in `allow5xx` logs, of roles that are meant to fail), any escape sequence or control byte the logger
 * did not write itself, and a forged line (#11 L1: one log line is one log entry; see forgedLine).
 */
export function scanLogs(
  logDir: string,
  secrets: { fernetKeys: string[]; apiToken: string; otherTokens?: string[] },
  options: { allow5xx?: RegExp } = {},
): string[] {
  const findings: string[] = [];
  const tokens = [secrets.apiToken, ...(secrets.otherTokens ?? [])];
  for (const file of readdirSync(logDir).filter((f) => f.endsWith(".log"))) {
    const lines = readFileSync(join(logDir, file), "utf8").split("\n");
    for (const [i, coloured] of lines.entries()) {
      const where = `${file}:${i + 1}`;
      const line = coloured.replace(LOGGER_COLOURS, ""); // a recorded run (FORCE_COLOR) wraps lines in colours
      if (line.includes("PRIVATE KEY")) findings.push(`${where}: a private key`);
      if (secrets.fernetKeys.some((k) => line.includes(k.replace(/=+$/, "")))) findings.push(`${where}: the Fernet key`);
      if (tokens.some((token) => line.includes(token))) findings.push(`${where}: the API token`);
      if (line.includes(PLAINTEXT_MARKER) && !line.startsWith("Decrypted data: ")) findings.push(`${where}: plaintext outside the demo line`);
      // /health's 503 is its answer while not ready (a coordinator before its first round of checks), not a failure.
      if (/" 5\d\d -( |$)/.test(line) && !/"GET \/health HTTP\/1\.1" 503 -( |$)/.test(line) && !options.allow5xx?.test(file))
        findings.push(`${where}: a 5xx answer: ${line}`);
      if (/[\u0000-\u0008\u000b-\u001f\u007f\u009b]/.test(line))
        findings.push(`${where}: an escape sequence or control byte: ${JSON.stringify(line.slice(0, 120))}`);
      if (forgedLine(line)) findings.push(`${where}: a forged log line: ${JSON.stringify(line.slice(0, 120))}`);
    }
  }
  return findings;
}

/** How long `bun harness security` may take: the certificates it runs on must outlive this (issue 21). */
export const SECURITY_RUN_BOUND_MS = 15 * 60_000;

/**
 * The certificates of a PKI folder that run out before `deadline` (ms since the epoch), one line each: a run on
 * them would fail half-way for a reason that is not the case under test. `files` limits it to those files
 * (default: ca_cert.pem and every NAME_cert.pem in the folder).
 */
export function certificatesExpiringBefore(pki: string, deadline: number, files = pkiCertificateFiles(pki)): string[] {
  return files.flatMap((file) => {
    const notAfter = Date.parse(new X509Certificate(readFileSync(join(pki, file))).validTo);
    return notAfter <= deadline ? [`${file} expires ${new Date(notAfter).toISOString()}, before ${new Date(deadline).toISOString()}`] : [];
  });
}

/** ca_cert.pem and every NAME_cert.pem of a PKI folder, sorted. */
export function pkiCertificateFiles(pki: string): string[] {
  return readdirSync(pki)
    .filter((f) => f.endsWith("_cert.pem"))
    .sort();
}
