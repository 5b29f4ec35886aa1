// Who a certificate names: its SPIFFE ID (a URI SAN from pki.sh), or, for a certificate without one, an ID
// derived from its CN — the one documented fallback, so certificates issued before #11 keep working.

export const TRUST_DOMAIN = "securemesh";

/** The kinds pki.sh issues; a kind is the first path segment of a SPIFFE ID. */
export const IDENTITY_KINDS = ["client", "server", "coordinator", "keyserver", "secureproxy", "marketplace", "service"] as const;

const SPIFFE_ID = new RegExp(`^spiffe://${TRUST_DOMAIN}/([a-z]+)/([A-Za-z0-9_-]{1,64})$`);

/** spiffe://securemesh/client/client1 → { kind: "client", name: "client1" }; anything else → null. */
export function parseSpiffeId(id: string): { kind: string; name: string } | null {
  const match = SPIFFE_ID.exec(id);
  return match ? { kind: match[1]!, name: match[2]! } : null;
}

/**
 * Whether `pattern` names whom a hop may reach: one SPIFFE ID, or every identity of a kind
 * (spiffe://securemesh/server/*). A "*" anywhere else would match without a boundary, so it is refused.
 */
export function isIdentityPattern(pattern: string): boolean {
  return parseSpiffeId(pattern.endsWith("/*") ? `${pattern.slice(0, -2)}/x` : pattern) !== null;
}

export function spiffeId(kind: string, name: string): string {
  return `spiffe://${TRUST_DOMAIN}/${kind}/${name}`;
}

/** The subject CN out of a node/Bun subject, as a string ("O=securemesh\nCN=client1") or an object ({ CN }). */
function commonName(subject: string | Record<string, unknown> | undefined): string {
  if (typeof subject === "string") return /(?:^|\n)CN=([^\n]+)/.exec(subject)?.[1] ?? "";
  const cn = subject?.CN;
  return typeof cn === "string" ? cn : ""; // several CNs (an array): no identity at all
}

/**
 * The identity a certificate proves. Takes what both X509Certificate (subject, subjectAltName) and a TLS peer
 * certificate (subject, subjectaltname) carry. More than one securemesh URI SAN is ambiguous: no identity.
 * The CN is the fallback only for a certificate with no URI SAN at all (one naming another trust domain is not
 * ours to reinterpret). Then a role's own name is that role only on a certificate that serves (serverAuth, as
 * pki.sh issues every role's): a client certificate named "coordinator" stays a client. Any other name with the
 * clientAuth EKU is a client, the rest a server.
 */
export function identityOf(cert: {
  subject?: string | Record<string, unknown>;
  subjectAltName?: string;
  subjectaltname?: string;
  clientAuth: boolean;
  serverAuth?: boolean;
}): string {
  const sans = (cert.subjectAltName ?? cert.subjectaltname ?? "").split(/,\s*/);
  const uris = sans.filter((s) => s.startsWith("URI:")).map((s) => s.slice(4));
  const ours = uris.filter((uri) => uri.startsWith(`spiffe://${TRUST_DOMAIN}/`));
  if (ours.length > 1) return "";
  if (ours.length === 1) return parseSpiffeId(ours[0]!) ? ours[0]! : "";
  if (uris.length > 0) return "";
  const cn = commonName(cert.subject);
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(cn)) return "";
  if (cert.serverAuth && (IDENTITY_KINDS as readonly string[]).includes(cn) && cn !== "client" && cn !== "service") return spiffeId(cn, cn);
  return spiffeId(cert.clientAuth ? "client" : "server", cn);
}

/** The short name: client1 from spiffe://securemesh/client/client1. */
export function shortName(id: string): string {
  return parseSpiffeId(id)?.name ?? id;
}

/**
 * How a record names its sender: a client by its short name (the records and views from before #11 say
 * "client1"), any other kind by its whole ID, so a client and a server of the same name never share records.
 */
export function senderName(id: string): string {
  const parsed = parseSpiffeId(id);
  return parsed?.kind === "client" ? parsed.name : id;
}
