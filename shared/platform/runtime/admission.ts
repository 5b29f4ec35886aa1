// Who may hold a connection to a listener, decided the same way by every listener on both runtimes (the Bun TLS
// gate, the node:https listener): handshakes per address before anyone is known, then, at the handshake, a client
// certificate of our CA with the clientAuth EKU, not revoked, and one more connection than its identity already
// holds only while that stays under its cap (issue 18, L2).
import { X509Certificate } from "node:crypto";
import type tls from "node:tls";
import { hasExtendedKeyUsage, isCertificateAuthority, withExtendedKeyUsage } from "../eku.ts";
import { certificateBlocks } from "../pem.ts";
import { MAX_CONNECTIONS_PER_IDENTITY, MAX_HANDSHAKES_PER_ADDRESS } from "./limits.ts";
import type { RequestPeer } from "./peer.ts";

/** The extendedKeyUsage a certificate needs to act as a client (as shared/platform/tls.ts). */
const CLIENT_AUTH_OID = "1.3.6.1.5.5.7.3.2";

/** Why a connection was closed before any request. */
export type RefusalReason = "untrusted" | "revoked" | "no-client-auth" | "identity-cap" | "handshake-flood" | "handshake-timeout";

export interface Refusal {
  reason: RefusalReason;
  address: string;
  /** The identity, once the certificate named one. */
  identity?: string;
  /** The certificate's serial, for a revoked one. */
  serial?: string;
  /** For identity-cap: the cap that bit. */
  limit?: number;
}

export interface AdmissionOptions {
  /** Mutual TLS: a client certificate is required and checked. */
  mutual: boolean;
  /**
   * Our CA certificate(s), PEM, as the listener's TLS has them (trust() follows a reload): a certificate the TLS stack
   * refused is checked against them, to tell one of ours that is not for client authentication (answered 403) from
   * one of no CA of ours (closed).
   */
  ca?: string;
  /** Asked at the handshake and again on every request with the client certificate's serial (hex). */
  isRevoked?: (serialHex: string) => boolean;
  /** The identity a verified certificate names (default: shared/authz's SPIFFE ID reader, given by the caller). */
  identify: (peer: tls.PeerCertificate) => string;
  /** Open connections an identity may hold (the policy's `limits`, else MAX_CONNECTIONS_PER_IDENTITY). */
  connectionLimit?: (identity: string) => number;
  maxHandshakesPerAddress?: number;
  /** Every refusal, for the role's log line and counter. */
  onRefused?: (refusal: Refusal) => void;
}

/** How long a refused connection is kept for its first request, to answer it with why (refusalAnswer). */
export const CAP_ANSWER_WITHIN_MS = 2_000;

/** The one answer of a refused connection the client can act on: its status, headers and JSON body; then a close. */
export interface RefusalAnswer {
  status: 403 | 429;
  code: "ERR_CONNECTION_LIMIT" | "ERR_REVOKED" | "ERR_CLIENT_CERT";
  error: string;
  headers: Record<string, string>;
  body: string;
}

/** What a refused connection is told, or null for a refusal that is closed without a word (untrusted, a flood). */
export function refusalAnswer(refusal: Refusal): RefusalAnswer | null {
  const answer = (status: 403 | 429, code: RefusalAnswer["code"], error: string, headers: Record<string, string> = {}): RefusalAnswer => ({
    status,
    code,
    error,
    headers: { ...headers, connection: "close" },
    body: JSON.stringify({ error, code }),
  });
  switch (refusal.reason) {
    case "identity-cap":
      return answer(
        429,
        "ERR_CONNECTION_LIMIT",
        `${refusal.identity} already holds ${refusal.limit} connections, its limit: reuse one of them, or retry later`,
        { "retry-after": "1" },
      );
    case "revoked":
      return answer(
        403,
        "ERR_REVOKED",
        `this client's certificate is revoked (${refusal.identity || "no identity"}, serial ${refusal.serial}): it needs a new one`,
      );
    case "no-client-auth":
      return answer(
        403,
        "ERR_CLIENT_CERT",
        `this certificate is not for client authentication (${refusal.identity || "no identity"}): use a client certificate`,
      );
    default:
      return null;
  }
}

/** "::ffff:10.0.0.1" and "10.0.0.1" are one client. */
export const plainAddress = (address: string | undefined) => address?.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/, "") ?? "-";

export class Admission {
  readonly mutual: boolean;
  readonly #options: AdmissionOptions;
  /** Connections still in their handshake, per address, oldest first, each with what closes it. */
  readonly #handshaking = new Map<string, Map<object, () => void>>();
  readonly #perIdentity = new Map<string, number>();
  #cas: X509Certificate[] = [];

  constructor(options: AdmissionOptions) {
    this.mutual = options.mutual;
    this.#options = options;
    this.trust(options.ca);
  }

  /** The CA certificates (PEM) of the listener's TLS, from now on: at start and at every reload. */
  trust(caPem: string | undefined): void {
    this.#cas = certificateBlocks(caPem).map((pem) => new X509Certificate(pem));
  }

  /**
   * Whether a certificate the TLS stack refused is one our CA issued for serving only: signed by our CA, in its
   * validity period, not a CA, without the clientAuth EKU. BoringSSL (Bun) and rustls (Deno) refuse such a client
   * certificate for its purpose alone, where the client deserves to be told (ERR_CLIENT_CERT) rather than cut off.
   * It only ever refuses: a connection is admitted on the TLS stack's own verdict, never on this.
   */
  #ourServingCertificate(raw: Uint8Array): boolean {
    if (this.#cas.length === 0 || hasExtendedKeyUsage({ raw }, CLIENT_AUTH_OID)) return false;
    try {
      const cert = new X509Certificate(raw);
      const now = Date.now();
      if (isCertificateAuthority(raw) || now < Date.parse(cert.validFrom) || now > Date.parse(cert.validTo)) return false;
      return this.#cas.some((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey));
    } catch {
      return false;
    }
  }

  /**
   * A connection from `address` started its handshake. Over the per-address bound the OLDEST one is closed, not
   * the newcomer: a flood of bare TCP connections from the proxy's own address held every place and shut the proxy
   * out, with no certificate at all (found by attack on #11). Returns what ends this connection's place in line.
   */
  handshakeStarted(address: string, close: () => void): () => void {
    const key = {};
    const pending = this.#handshaking.get(address) ?? new Map<object, () => void>();
    this.#handshaking.set(address, pending);
    if (pending.size >= (this.#options.maxHandshakesPerAddress ?? MAX_HANDSHAKES_PER_ADDRESS)) {
      const [oldest, closeOldest] = pending.entries().next().value!;
      pending.delete(oldest);
      this.#options.onRefused?.({ reason: "handshake-flood", address });
      closeOldest();
    }
    pending.set(key, close);
    return () => {
      if (pending.delete(key) && pending.size === 0 && this.#handshaking.get(address) === pending) this.#handshaking.delete(address);
    };
  }

  /** A handshake that did not finish in time. */
  handshakeTimedOut(address: string): void {
    this.#options.onRefused?.({ reason: "handshake-timeout", address });
  }

  /**
   * Decides a completed handshake: the verified caller, or, after `onRefused`, the refusal. A refusal the client can
   * act on (a connection over its identity's cap, a revoked certificate, one not for client authentication) is
   * answered on the connection's first request (refusalAnswer: a 429 or a 403 saying why) and then closed, where a
   * bare close after the handshake looked like a network fault to the client, and said nothing (issue 23); any other
   * refusal is closed at once. Every admitted peer must be `released` when its connection closes.
   */
  admit(address: string, authorized: boolean, certificate: tls.PeerCertificate | null | undefined): { peer: RequestPeer } | { refusal: Refusal } {
    if (!this.mutual) return { peer: { address, identity: "", serial: "" } };
    const refuse = (reason: RefusalReason, identity?: string, limit?: number) => {
      const refusal: Refusal = { reason, address, ...(identity ? { identity } : {}), ...(limit !== undefined ? { limit } : {}) };
      this.#options.onRefused?.(refusal);
      return { refusal };
    };
    // Explicitly, whatever the TLS stack was told: NODE_TLS_REJECT_UNAUTHORIZED=0 has switched Bun's own check off.
    // A CA certificate is never a client's: BoringSSL (Bun) authorizes one of our CA's as a leaf, rustls does not.
    if (!authorized || !certificate?.raw || isCertificateAuthority(certificate.raw)) {
      // One of our server certificates used as a client: refused as the stack did, but told why (issue 23).
      if (certificate?.raw && this.#ourServingCertificate(certificate.raw)) {
        const identity = this.#options.identify(withExtendedKeyUsage(certificate));
        const serial = certificate.serialNumber ?? "";
        if (this.isRevoked(serial)) return { refusal: this.#revoked(address, identity, serial) };
        return refuse("no-client-auth", identity);
      }
      return refuse("untrusted");
    }
    // The EKU from the certificate's DER: Deno's peer certificates do not list it.
    const identity = this.#options.identify(withExtendedKeyUsage(certificate));
    if (!hasExtendedKeyUsage(certificate, CLIENT_AUTH_OID)) return refuse("no-client-auth", identity);
    const serial = certificate.serialNumber ?? "";
    if (this.isRevoked(serial)) return { refusal: this.#revoked(address, identity, serial) };
    // Counted by who it is, now that it is known: one identity's connections never take another's places.
    const limit = this.#options.connectionLimit?.(identity) ?? MAX_CONNECTIONS_PER_IDENTITY;
    const open = this.#perIdentity.get(identity) ?? 0;
    if (open >= limit) return refuse("identity-cap", identity, limit);
    this.#perIdentity.set(identity, open + 1);
    return { peer: { address, identity, serial } };
  }

  #revoked(address: string, identity: string, serial: string): Refusal {
    const refusal: Refusal = { reason: "revoked", address, ...(identity ? { identity } : {}), serial };
    this.#options.onRefused?.(refusal);
    return refusal;
  }

  /** An admitted connection closed: its identity's place is free again. */
  released(peer: RequestPeer): void {
    if (!this.mutual) return;
    const left = (this.#perIdentity.get(peer.identity) ?? 1) - 1;
    if (left > 0) this.#perIdentity.set(peer.identity, left);
    else this.#perIdentity.delete(peer.identity);
  }

  isRevoked(serial: string): boolean {
    return this.#options.isRevoked?.(serial) ?? false;
  }

  /** Open connections per identity, for a status page. */
  connectionsByIdentity(): ReadonlyMap<string, number> {
    return this.#perIdentity;
  }
}
