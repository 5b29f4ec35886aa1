// The authorization matrix of `bun harness security` (#11 Part 6): every identity against every action on every
// role, as an attacker holding that identity's certificate and key would try it. The expected outcome of each cell
// is computed from the policy the roles run (decide() in shared/authz/policy.ts) and from the certificate itself
// (our CA? in its validity period? on the CRL? clientAuth?); the observed one from the real answer.
import type { JWK } from "jose";
import { X509Certificate, createPublicKey, type KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseCrl, type RevocationList } from "../shared/authz/crl.ts";
import { identityOf } from "../shared/authz/identity.ts";
import { decide, parsePolicy, type Action, type Policy } from "../shared/authz/policy.ts";
import { loadFernetKeys } from "../shared/platform/config.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { PROOF_HEADER, ProofSigner } from "../shared/request-path/proof.ts";
import { CLIENT_AUTH_OID, type Identity } from "../shared/platform/tls.ts";
import { ON_BEHALF_OF_HEADER, openJoseResponse, prepareEcdhRequest, prepareJoseRequest } from "../shared/token-path/token-exchange.ts";
import { renderTable } from "./fixtures/index.ts";
import { connectionRefusal, type TlsMaterial } from "./hostile.ts";

// ---- What a cell can come to -----------------------------------------------------------------------------------

/**
 * - allow: the role did it (2xx);
 * - deny: 403 ERR_FORBIDDEN naming the identity and the permission it lacks;
 * - unauthenticated: 401, a proof the role does not accept (revoked, expired, another CA, no clientAuth);
 * - refused: the TLS handshake was refused, the connection closed before any answer, or the listener refused the
 *   connection and said why (403 ERR_REVOKED or ERR_CLIENT_CERT: connectionRefusal in hostile.ts);
 * - other: anything else, always unexpected.
 */
export type Outcome = "allow" | "deny" | "unauthenticated" | "refused" | "other";

/** What the certificate itself says, checked here independently of the roles. */
export interface IdentityFacts {
  /** The matrix's name for it: client1, revoked, foreign, … */
  label: string;
  /** The SPIFFE ID the certificate names ("" for none). */
  id: string;
  /** Issued by our CA, within its validity period, not on the CRL, with the clientAuth EKU. */
  trusted: boolean;
  /** Why not, when not trusted. */
  untrusted?: string;
}

/** One decision the request needs on its way, made by some role. `anyOf`: one of these resources is enough. */
export interface Step {
  identity: string;
  action: Action;
  anyOf: string[];
}

/** The identities of the hops in between, as their certificates name them. */
export interface Hops {
  coordinator: string;
  secureproxy: string;
  client1: string;
}

export interface Column {
  key: string;
  role: "coordinator" | "server" | "secureproxy" | "keyserver";
  /** What the row says in the table. */
  label: string;
  /** Whose certificate holds the TLS connection: the identity's own, or client2's with the identity signing only the proof. */
  tls: "self" | "client2";
  /** The decisions along the path, in the order the roles make them. */
  steps(id: string, hops: Hops): Step[];
}

export interface Expected {
  outcome: Outcome;
  /** For a deny: the error text that names the identity and the permission it lacks. */
  denial?: string;
}

const step = (identity: string, action: Action, ...anyOf: string[]): Step => ({ identity, action, anyOf: anyOf.length ? anyOf : [""] });
const VIEW: string[] = ["all", "own"];

/**
 * The matrix's rows. Through the coordinator the coordinator forwards (its `forward`), and the server decides on
 * the proof; directly at a server, the identity holding the TLS connection must have `forward` too. At the
 * SecureProxy, the caller needs proxy.use, the proxy tokens.fetch, and the KeyServer checks proxy.use again for
 * the caller it names. At the KeyServer, the TLS caller needs tokens.fetch and whom it asks for proxy.use.
 */
export const COLUMNS: Column[] = [
  ...(["self", "client2"] as const).flatMap((tls): Column[] => {
    const over = tls === "client2" ? " (proof over client2's TLS)" : "";
    return [
      {
        key: `coordinator.write.${tls}`,
        role: "coordinator",
        label: `records.write${over}`,
        tls,
        steps: (id, h) => [step(h.coordinator, "forward"), step(id, "records.write")],
      },
      {
        key: `coordinator.read.${tls}`,
        role: "coordinator",
        label: `view.read${over}`,
        tls,
        steps: (id, h) => [step(h.coordinator, "forward"), step(id, "view.read", ...VIEW)],
      },
      {
        key: `coordinator.invalidate.${tls}`,
        role: "coordinator",
        label: `cache.invalidate${over}`,
        tls,
        steps: (id, h) => [step(h.coordinator, "forward"), step(id, "cache.invalidate")],
      },
      {
        key: `coordinator.stats.${tls}`,
        role: "coordinator",
        label: `cache.stats${over}`,
        tls,
        steps: (id, h) => [step(h.coordinator, "forward"), step(id, "cache.stats")],
      },
    ];
  }),
  // An operator's drain (issue 20), asked for a server no pool holds: an identity allowed it gets 404 naming the server,
  // so no cell takes a real server out of the matrix's own rotation.
  { key: "coordinator.drain", role: "coordinator", label: "admin.drain", tls: "self", steps: (id) => [step(id, "admin.drain")] },
  { key: "server.write", role: "server", label: "forward + records.write", tls: "self", steps: (id) => [step(id, "forward"), step(id, "records.write")] },
  { key: "server.read", role: "server", label: "forward + view.read", tls: "self", steps: (id) => [step(id, "forward"), step(id, "view.read", ...VIEW)] },
  {
    key: "server.invalidate",
    role: "server",
    label: "forward + cache.invalidate",
    tls: "self",
    steps: (id) => [step(id, "forward"), step(id, "cache.invalidate")],
  },
  { key: "server.stats", role: "server", label: "forward + cache.stats", tls: "self", steps: (id) => [step(id, "forward"), step(id, "cache.stats")] },
  ...(["client1", "client2"] as const).map(
    (client): Column => ({
      key: `secureproxy.${client}`,
      role: "secureproxy",
      label: `proxy.use:${client}/marketplace`,
      tls: "self",
      steps: (id, h) => [step(id, "proxy.use", `${client}/marketplace`), step(h.secureproxy, "tokens.fetch"), step(id, "proxy.use", `${client}/marketplace`)],
    }),
  ),
  {
    key: "keyserver.self",
    role: "keyserver",
    label: "tokens.fetch client1/marketplace for itself",
    tls: "self",
    steps: (id) => [step(id, "tokens.fetch"), step(id, "proxy.use", "client1/marketplace")],
  },
  {
    key: "keyserver.client1",
    role: "keyserver",
    label: "tokens.fetch client1/marketplace for client1",
    tls: "self",
    steps: (id, h) => [step(id, "tokens.fetch"), step(h.client1, "proxy.use", "client1/marketplace")],
  },
  // The opt-in ECDH-ES exchange (#13) is decided exactly as RSA-OAEP-256: another JWE, the same two decisions.
  {
    key: "keyserver.client1.ecdh",
    role: "keyserver",
    label: "tokens.fetch client1/marketplace for client1, ECDH-ES",
    tls: "self",
    steps: (id, h) => [step(id, "tokens.fetch"), step(h.client1, "proxy.use", "client1/marketplace")],
  },
  // /health answers any certificate of the CA (load balancers, probes), and nothing else: a revoked one was still
  // served on Bun, where the listener could not see it (issue 18, L1). /metrics names callers and their decisions, so
  // it is an action the policy grants (metrics.read), like any other. The coordinator's /metrics is on its loopback
  // admin listener, outside mutual TLS.
  ...(
    [
      ["coordinator", "/health"],
      ["server", "/health"],
      ["server", "/metrics"],
      ["secureproxy", "/health"],
      ["secureproxy", "/metrics"],
      ["keyserver", "/health"],
      ["keyserver", "/metrics"],
    ] as const
  ).map(
    ([role, path]): Column => ({
      key: `${role}.get${path.replace("/", ".")}`,
      role,
      label: `GET ${path}`,
      tls: "self",
      steps: (id) => (path === "/metrics" ? [step(id, "metrics.read")] : []),
    }),
  ),
  // What a server's /health adds to "alive" (cache counters, Fernet keys, host facts): status.read (issue 22 L2).
  // Without it the answer is still 200, only shorter: a deny here is a 200 without the detail.
  { key: "server.health.detail", role: "server", label: "/health detail", tls: "self", steps: (id) => [step(id, "status.read")] },
];

/** The repository policy's scraper (metrics.read): the security run issues its certificate, so /metrics has a row that may. */
export const POLICY_SCRAPER = "prometheus";

/** The 403 text a role sends for a denied step: the last resource it asked about. */
export function denialText(s: Step): string {
  const resource = s.anyOf[s.anyOf.length - 1]!;
  return `${s.identity || "an unidentified caller"} lacks permission ${s.action}${resource ? `:${resource}` : ""}`;
}

/** The outcome a cell must have: refused at TLS, 401 for the proof, or the first decision along the path that denies. */
export function expectCell(policy: Policy, facts: IdentityFacts, column: Column, hops: Hops, client2: IdentityFacts): Expected {
  const tlsHolder = column.tls === "self" ? facts : client2;
  if (!tlsHolder.trusted) return { outcome: "refused" };
  if (!facts.trusted) return { outcome: "unauthenticated" }; // only reachable with client2's TLS: the proof fails
  for (const s of column.steps(facts.id, hops)) {
    if (!s.anyOf.some((resource) => decide(policy, s.identity, s.action, resource).allow)) return { outcome: "deny", denial: denialText(s) };
  }
  return { outcome: "allow" };
}

/** What a certificate is, read with node:crypto and our CA's CRL, not through any role's code path. */
export function identityFacts(label: string, certPem: string, caPem: string, crl: RevocationList | null, now = new Date()): IdentityFacts {
  const cert = new X509Certificate(certPem);
  const ca = new X509Certificate(caPem);
  const clientAuth = ((cert as X509Certificate & { keyUsage?: string[] }).keyUsage ?? []).includes(CLIENT_AUTH_OID);
  const id = identityOf({ subject: cert.subject, subjectAltName: cert.subjectAltName, clientAuth });
  let untrusted: string | undefined;
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) untrusted = "not issued by our CA";
  else if (now < cert.validFromDate) untrusted = "not yet valid";
  else if (now > cert.validToDate) untrusted = "expired";
  else if (crl?.isRevoked(cert.serialNumber)) untrusted = "revoked";
  else if (!clientAuth) untrusted = "no clientAuth EKU";
  return { label, id, trusted: untrusted === undefined, ...(untrusted ? { untrusted } : {}) };
}

// ---- Running it against real processes ------------------------------------------------------------------------

export interface MatrixIdentity {
  label: string;
  cert: string;
  key: string;
}

export interface MatrixTargets {
  pki: string;
  /** The policy file the roles were started with. */
  policyFile: string;
  coordinator: string;
  /** A server, called directly. */
  server: string;
  secureproxy: string;
  keyserver: string;
  /** The marketplace's item URL, as the proxy's allowlist names it. */
  apiUri: string;
  /** The token seeded for client1, to check an allowed release really is that token. */
  client1Token?: string;
  identities: MatrixIdentity[];
}

export interface CellResult {
  identity: string;
  column: Column;
  expected: Expected;
  attempts: number;
  asExpected: number;
  observed: Outcome[];
  /** What happened in the first attempt that was not as expected. */
  unexpected?: string;
}

export interface MatrixResult {
  identities: IdentityFacts[];
  cells: CellResult[];
  policyFile: string;
}

/** The identities of #11 Part 6, from the roles' PKI, hostileCertificates() and another pki.sh PKI. */
export function matrixIdentities(pki: string, hostile: Record<string, TlsMaterial>): MatrixIdentity[] {
  const own = (name: string): MatrixIdentity => ({
    label: name,
    cert: readFileSync(join(pki, `${name}_cert.pem`), "utf8"),
    key: readFileSync(join(pki, `${name}_key.pem`), "utf8"),
  });
  const hostileOne = (label: string, name: string): MatrixIdentity => {
    const m = hostile[name];
    if (!m?.cert || !m.key) throw new Error(`no hostile certificate named '${name}'`);
    return { label, cert: m.cert, key: m.key };
  };
  return [
    own("client1"),
    own("client2"),
    own("coordinator"),
    own("secureproxy"),
    own("server"),
    own(POLICY_SCRAPER),
    hostileOne("revoked", "revoked"),
    hostileOne("expired", "expired"),
    hostileOne("foreign", "another CA"),
  ];
}

interface Observation {
  outcome: Outcome;
  detail: string;
  /** The error text of a 403, to compare with the expected denial. */
  error?: string;
}

type Json = Record<string, unknown>;

/** Classifies an answer: 2xx allow, 403 ERR_FORBIDDEN deny, 401 unauthenticated, the rest other. */
async function classify(response: Response, check?: (body: Json) => string | null): Promise<Observation> {
  const text = await response.text();
  let body: Json = {};
  try {
    body = JSON.parse(text) as Json;
  } catch {
    return { outcome: "other", detail: `${response.status} without JSON: ${text.slice(0, 80)}` };
  }
  const detail = `${response.status} ${text.slice(0, 160)}`;
  // The listener's own refusal of the connection, told to the client (issue 23): refused, as at the handshake.
  if (connectionRefusal(response.status, text)) return { outcome: "refused", detail };
  if (response.status >= 200 && response.status < 300) {
    const problem = check?.(body) ?? null;
    return problem ? { outcome: "other", detail: `${detail} (${problem})` } : { outcome: "allow", detail };
  }
  if (response.status === 403 && body.code === "ERR_FORBIDDEN") return { outcome: "deny", detail, error: String(body.error) };
  if (response.status === 401) return { outcome: "unauthenticated", detail };
  return { outcome: "other", detail };
}

/** The coordinator's broadcast answers (invalidate): every server's verdict is in `failed` or `acknowledged`. */
async function classifyBroadcast(response: Response): Promise<Observation> {
  const text = await response.text();
  if (connectionRefusal(response.status, text)) return { outcome: "refused", detail: `${response.status} ${text.slice(0, 120)}` };
  let body: { acknowledged?: unknown[]; failed?: { status: number | null; error?: string }[] };
  try {
    body = JSON.parse(text);
  } catch {
    return { outcome: "other", detail: `${response.status} without JSON: ${text.slice(0, 80)}` };
  }
  const detail = `${response.status} ${text.slice(0, 200)}`;
  const failed = body.failed ?? [];
  if (response.status === 200 && failed.length === 0 && (body.acknowledged ?? []).length > 0) return { outcome: "allow", detail };
  if (failed.length > 0 && (body.acknowledged ?? []).length === 0) {
    if (response.status === 403 && failed.every((f) => f.status === 403)) return { outcome: "deny", detail, error: failed[0]!.error };
    if (response.status === 401 && failed.every((f) => f.status === 401)) return { outcome: "unauthenticated", detail };
  }
  return { outcome: "other", detail };
}

/** The coordinator's cache_stats: one entry per server, each the server's counters or "answered <status>". */
async function classifyStats(response: Response): Promise<Observation> {
  const text = await response.text();
  if (connectionRefusal(response.status, text)) return { outcome: "refused", detail: `${response.status} ${text.slice(0, 120)}` };
  let body: { servers?: { error?: string; hits?: unknown }[] };
  try {
    body = JSON.parse(text);
  } catch {
    return { outcome: "other", detail: `${response.status} without JSON: ${text.slice(0, 80)}` };
  }
  const detail = `${response.status} ${text.slice(0, 200)}`;
  const servers = body.servers ?? [];
  if (servers.length === 0)
    return response.status === 403
      ? { outcome: "deny", detail }
      : response.status === 401
        ? { outcome: "unauthenticated", detail }
        : { outcome: "other", detail };
  if (response.status === 200 && servers.every((s) => s.error === undefined)) return { outcome: "allow", detail };
  // The coordinator passes each server's verdict on per server; a denial is every server's 403.
  if (servers.every((s) => typeof s.error === "string" && /\b403\b|lacks permission/.test(s.error))) return { outcome: "deny", detail };
  if (servers.every((s) => typeof s.error === "string" && /\b401\b/.test(s.error))) return { outcome: "unauthenticated", detail };
  return { outcome: "other", detail };
}

/** A fetch whose failure before any answer counts as refused (a timeout does not: that is something else). */
async function attempt(run: () => Promise<Observation>): Promise<Observation> {
  try {
    return await run();
  } catch (error) {
    if ((error as { name?: string }).name === "TimeoutError") return { outcome: "other", detail: "timeout instead of an answer or a refusal" };
    return { outcome: "refused", detail: `refused: ${(error as Error).message.slice(0, 80)}` };
  }
}

interface Actor {
  facts: IdentityFacts;
  tls: TlsMaterial & { rejectUnauthorized: true };
  signer: ProofSigner;
}

/** Runs every cell `attempts` times (a fresh proof and a fresh TLS connection each time); returns every cell. */
export async function runAuthzMatrix(
  t: MatrixTargets,
  options: { attempts: number; concurrency?: number; onCell?: (cell: CellResult) => void },
): Promise<MatrixResult> {
  const caPem = readFileSync(join(t.pki, "ca_cert.pem"), "utf8");
  const crlPem = readFileSync(join(t.pki, "crl.pem"), "utf8");
  const crl = parseCrl(crlPem, caPem);
  const policy = parsePolicy(readFileSync(t.policyFile, "utf8"));
  const idOf = (name: string) => identityFacts(name, readFileSync(join(t.pki, `${name}_cert.pem`), "utf8"), caPem, crl).id;
  const hops: Hops = { coordinator: idOf("coordinator"), secureproxy: idOf("secureproxy"), client1: idOf("client1") };
  const fernet = new Fernet(loadFernetKeys(t.pki));

  const actors = new Map<string, Actor>();
  for (const m of t.identities) {
    const identity: Identity = { name: m.label, cert: m.cert, key: m.key, ca: caPem };
    actors.set(m.label, {
      facts: identityFacts(m.label, m.cert, caPem, crl),
      tls: { cert: m.cert, key: m.key, ca: caPem, rejectUnauthorized: true },
      signer: new ProofSigner(identity),
    });
  }
  const client2 = actors.get("client2");
  if (!client2) throw new Error("the matrix needs client2 (its TLS carries the other identities' proofs)");

  // The KeyServer's public key, fetched as the proxy does (any trusted certificate may read it).
  const proxyTls = {
    cert: readFileSync(join(t.pki, "secureproxy_cert.pem"), "utf8"),
    key: readFileSync(join(t.pki, "secureproxy_key.pem"), "utf8"),
    ca: caPem,
    rejectUnauthorized: true,
  } as const;
  const keyResponse = await fetch(`${t.keyserver}/public_key`, { tls: proxyTls, signal: AbortSignal.timeout(10_000) });
  const keyserverKey: KeyObject = createPublicKey(((await keyResponse.json()) as { public_key: string }).public_key);
  // Its X25519 key for the opt-in ECDH-ES requests, from its JWKS (the KeyServer runs with --ecdh-es here).
  const jwks = (await (await fetch(`${t.keyserver}/.well-known/jwks.json`, { tls: proxyTls, signal: AbortSignal.timeout(10_000) })).json()) as { keys: JWK[] };
  const x25519 = jwks.keys.find((k) => k.crv === "X25519");
  if (!x25519) throw new Error("the matrix needs the KeyServer's ECDH-ES key: start it with --ecdh-es");
  const keyserverEcdhKey: KeyObject = createPublicKey({ key: x25519, format: "jwk" });

  // keepalive off: every attempt is a new handshake, so no connection opened under one certificate serves another.
  const call = (url: string, tls: Actor["tls"], init: RequestInit) =>
    fetch(url, { ...init, tls, keepalive: false, signal: AbortSignal.timeout(10_000) } as RequestInit);
  const json = { "content-type": "application/json" };

  const base: Record<Column["role"], string> = { coordinator: t.coordinator, server: t.server, secureproxy: t.secureproxy, keyserver: t.keyserver };
  const run = async (actor: Actor, column: Column): Promise<Observation> => {
    const tls = column.tls === "self" ? actor.tls : client2.tls;
    const { signer } = actor;
    if (column.label.startsWith("GET /")) {
      const response = await call(`${base[column.role]}${column.label.slice(4)}`, tls, {});
      const text = await response.text();
      if (connectionRefusal(response.status, text)) return { outcome: "refused", detail: `${response.status} ${text.slice(0, 120)}` };
      return response.status === 200
        ? { outcome: "allow", detail: `200 ${text.slice(0, 60)}` }
        : classify(new Response(text, { status: response.status, headers: response.headers }));
    }
    if (column.key === "server.health.detail") {
      const response = await call(`${t.server}/health`, tls, {});
      const text = await response.text();
      if (connectionRefusal(response.status, text)) return { outcome: "refused", detail: `${response.status} ${text.slice(0, 120)}` };
      if (response.status !== 200) return { outcome: "other", detail: `${response.status} ${text.slice(0, 120)}` };
      return text.includes('"cache"')
        ? { outcome: "allow", detail: "200 with its cache and facts" }
        : { outcome: "deny", detail: `200 alive only: ${text.slice(0, 80)}` };
    }
    switch (column.key.split(".").slice(0, 2).join(".")) {
      case "coordinator.write": {
        const data = fernet.encrypt(`matrix write by ${actor.facts.label}`);
        const proof = await signer.sign({ method: "POST", path: "/api/data", payload: data });
        return classify(await call(`${t.coordinator}/api/data`, tls, { method: "POST", headers: json, body: JSON.stringify({ data, proof }) }), (b) =>
          b.result === "ok" ? null : "no result ok",
        );
      }
      case "coordinator.read": {
        const proof = await signer.sign({ method: "GET", path: "/api/get_cached_data", payload: "" });
        return classify(await call(`${t.coordinator}/api/get_cached_data`, tls, { headers: { [PROOF_HEADER]: proof } }), (b) => readableView(fernet, b));
      }
      case "coordinator.invalidate": {
        const proof = await signer.sign({ method: "POST", path: "/api/invalidate_cache", payload: "" });
        return classifyBroadcast(await call(`${t.coordinator}/api/invalidate_cache`, tls, { method: "POST", headers: json, body: JSON.stringify({ proof }) }));
      }
      case "coordinator.stats": {
        const proof = await signer.sign({ method: "GET", path: "/api/cache_stats", payload: "" });
        return classifyStats(await call(`${t.coordinator}/api/cache_stats`, tls, { headers: { [PROOF_HEADER]: proof } }));
      }
      case "coordinator.drain": {
        const response = await call(`${t.coordinator}/admin/drain`, tls, {
          method: "POST",
          headers: json,
          body: JSON.stringify({ server: "https://not-in-the-pool.invalid:1" }),
        });
        if (response.status !== 404) return classify(response);
        const body = (await response.json()) as Json;
        return String(body.error).startsWith("no server")
          ? { outcome: "allow", detail: "404, the server is not in the pool (the decision allowed it)" }
          : { outcome: "other", detail: `404 ${JSON.stringify(body)}` };
      }
      case "server.write": {
        const data = fernet.encrypt(`matrix direct write by ${actor.facts.label}`);
        const proof = await signer.sign({ method: "POST", path: "/api/data", payload: data });
        return classify(await call(`${t.server}/api/data`, tls, { method: "POST", headers: { ...json }, body: JSON.stringify({ data, proof }) }), (b) =>
          b.result === "ok" ? null : "no result ok",
        );
      }
      case "server.read": {
        const proof = await signer.sign({ method: "GET", path: "/api/get_cached_data", payload: "" });
        return classify(await call(`${t.server}/api/get_cached_data`, tls, { headers: { [PROOF_HEADER]: proof } }), (b) => readableView(fernet, b));
      }
      case "server.invalidate": {
        const proof = await signer.sign({ method: "POST", path: "/api/invalidate_cache", payload: "" });
        return classify(await call(`${t.server}/api/invalidate_cache`, tls, { method: "POST", headers: { ...json }, body: JSON.stringify({ proof }) }));
      }
      case "server.stats": {
        const proof = await signer.sign({ method: "GET", path: "/api/cache_stats", payload: "" });
        return classify(await call(`${t.server}/api/cache_stats`, tls, { headers: { [PROOF_HEADER]: proof } }));
      }
      case "secureproxy.client1":
      case "secureproxy.client2": {
        const client = column.key.split(".")[1]!;
        return classify(
          await call(`${t.secureproxy}/request_api`, tls, {
            method: "POST",
            headers: json,
            body: JSON.stringify({ ClientId: client, TokenType: "marketplace", ApiUri: t.apiUri }),
          }),
          (b) => ((b.item as { id?: unknown } | undefined)?.id === 1 ? null : "not the marketplace item"),
        );
      }
      case "keyserver.self":
      case "keyserver.client1":
      case "keyserver.client1.ecdh": {
        const prepared =
          column.key === "keyserver.client1.ecdh"
            ? await prepareEcdhRequest(keyserverEcdhKey, "client1", "marketplace")
            : await prepareJoseRequest(keyserverKey, "client1", "marketplace");
        const headers: Record<string, string> = { "content-type": prepared.contentType };
        if (column.key !== "keyserver.self") headers[ON_BEHALF_OF_HEADER] = hops.client1;
        const response = await call(`${t.keyserver}/`, tls, { method: "POST", headers, body: prepared.body });
        if (response.status !== 200) return classify(response);
        const released = await openJoseResponse(await response.text(), prepared.sessionKey).catch(() => "");
        if (!released || (t.client1Token !== undefined && released !== t.client1Token)) return { outcome: "other", detail: "200 without client1's token" };
        return { outcome: "allow", detail: "200, client1's token" };
      }
      default:
        throw new Error(`no request for column ${column.key}`);
    }
  };

  const jobs: { actor: Actor; column: Column; expected: Expected }[] = [];
  for (const column of COLUMNS) {
    for (const actor of actors.values()) jobs.push({ actor, column, expected: expectCell(policy, actor.facts, column, hops, client2.facts) });
  }
  const cells: CellResult[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: options.concurrency ?? 4 }, async () => {
      while (next < jobs.length) {
        const { actor, column, expected } = jobs[next++]!;
        const cell: CellResult = { identity: actor.facts.label, column, expected, attempts: options.attempts, asExpected: 0, observed: [] };
        for (let i = 0; i < options.attempts; i++) {
          const seen = await attempt(() => run(actor, column));
          cell.observed.push(seen.outcome);
          const problem = mismatch(expected, seen);
          if (problem === null) cell.asExpected += 1;
          else cell.unexpected ??= problem;
        }
        cells.push(cell);
        options.onCell?.(cell);
      }
    }),
  );
  const order = (c: CellResult) => COLUMNS.indexOf(c.column) * 100 + t.identities.findIndex((m) => m.label === c.identity);
  cells.sort((a, b) => order(a) - order(b));
  return { identities: [...actors.values()].map((a) => a.facts), cells, policyFile: t.policyFile };
}

/** A 200 read must hold a view this client can decrypt. */
function readableView(fernet: Fernet, body: Json): string | null {
  if (typeof body.data !== "string") return "no data";
  try {
    JSON.parse(fernet.decryptText(body.data));
    return null;
  } catch {
    return "the view does not decrypt";
  }
}

/** null when the observation is the expected one (a deny must also name the identity and the missing permission). */
export function mismatch(expected: Expected, seen: { outcome: Outcome; detail: string; error?: string }): string | null {
  if (seen.outcome !== expected.outcome) return `expected ${expected.outcome}, got ${seen.outcome}: ${seen.detail}`;
  if (expected.outcome === "deny" && expected.denial && seen.error !== undefined && !seen.error.includes(expected.denial)) {
    return `denied, but the error says "${seen.error}", not "${expected.denial}"`;
  }
  return null;
}

// ---- Reporting ---------------------------------------------------------------------------------------------------

const SHORT: Record<Outcome, string> = { allow: "allow", deny: "deny", unauthenticated: "401", refused: "refused", other: "OTHER" };

/** One row per role and action, one column per identity; a cell shows the observed outcome, "!" marks unexpected. */
export function matrixTable(result: MatrixResult): string[] {
  const labels = result.identities.map((f) => f.label);
  const header = ["role", "action", ...labels];
  const rows = COLUMNS.map((column) => [
    column.role,
    column.label,
    ...labels.map((label) => {
      const cell = result.cells.find((c) => c.column === column && c.identity === label);
      if (!cell) return "·";
      const seen = cell.observed.find((o) => o !== cell.expected.outcome) ?? cell.expected.outcome;
      const ok = cell.asExpected === cell.attempts;
      const count = cell.attempts > 1 ? ` ${cell.asExpected}/${cell.attempts}` : "";
      return ok ? `${SHORT[seen]}${count}` : `!${SHORT[seen]} (want ${SHORT[cell.expected.outcome]})${count}`;
    }),
  ]);
  return renderTable(header, rows);
}

export function matrixTotals(result: MatrixResult): {
  cells: number;
  attempts: number;
  asExpected: number;
  unexpected: CellResult[];
  byOutcome: Record<Outcome, number>;
} {
  const unexpected = result.cells.filter((c) => c.asExpected !== c.attempts);
  const byOutcome: Record<Outcome, number> = { allow: 0, deny: 0, unauthenticated: 0, refused: 0, other: 0 };
  for (const c of result.cells) byOutcome[c.expected.outcome] += 1;
  return {
    cells: result.cells.length,
    attempts: result.cells.reduce((n, c) => n + c.attempts, 0),
    asExpected: result.cells.length - unexpected.length,
    unexpected,
    byOutcome,
  };
}

/** The summary line under the table, and one line per identity that is not trusted (why its cells are refused). */
export function matrixSummary(result: MatrixResult): string[] {
  const t = matrixTotals(result);
  const lines = [
    `authorization matrix: ${t.cells} cells (${result.identities.length} identities × ${COLUMNS.length} actions, ${t.attempts} attempts), ` +
      `${t.asExpected} as expected, ${t.unexpected.length} unexpected; expected from ${result.policyFile.split("/").pop()}: ` +
      `${t.byOutcome.allow} allow, ${t.byOutcome.deny} deny, ${t.byOutcome.unauthenticated} 401, ${t.byOutcome.refused} refused`,
  ];
  const untrusted = result.identities.filter((f) => !f.trusted).map((f) => `${f.label} (${f.untrusted})`);
  if (untrusted.length) lines.push(`refused at TLS, and 401 for their proofs over client2's TLS: ${untrusted.join(", ")}`);
  for (const c of t.unexpected) lines.push(`UNEXPECTED ${c.identity} × ${c.column.role} ${c.column.label}: ${c.unexpected}`);
  return lines;
}
