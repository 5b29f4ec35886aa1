// The sender proof: a compact JWS, signed with the client's certificate key, carrying that certificate in x5c.
// The coordinator terminates TLS, so this is how a server learns, and can check, who sent a message. Who forwarded
// it the server reads from its own TLS connection (shared/platform/runtime/peer.ts): there is no forwarder token to
// capture and replay (issue 18, H1).
import { createHash, createPrivateKey, randomUUID, X509Certificate, type KeyObject } from "node:crypto";
import { decodeProtectedHeader, jwtVerify, SignJWT } from "jose";
import { ProofRejected } from "../platform/errors.ts";
import { identityOf } from "../authz/identity.ts";
import { CLIENT_AUTH_OID, SERVER_AUTH_OID, type Identity } from "../platform/tls.ts";
import { hasExtendedKeyUsage } from "../platform/eku.ts";

export const PROOF_TYPE = "securemesh-proof+jwt";
/** Where a proof travels on requests without a JSON body (reads). */
export const PROOF_HEADER = "x-securemesh-proof";
/** How long a proof lives: long enough for failover retries, short enough to make a stolen proof useless. */
export const PROOF_LIFETIME_S = 60;
/** Clock difference tolerated between hosts; a proof is accepted at most PROOF_LIFETIME_S + this after signing. */
export const CLOCK_SKEW_S = 10;

/** What a proof binds: the request line and a digest of the payload it travels with. */
export interface ProofTarget {
  method: string;
  path: string;
  payload: string;
}

export interface VerifiedProof {
  /** The signer's identity (SPIFFE ID) as its certificate names it. */
  sender: string;
  jti: string;
  expiresAt: number;
}

export function payloadDigest(payload: string): string {
  return createHash("sha256").update(payload).digest("base64url");
}

function algorithmFor(key: KeyObject): "ES256" | "RS256" {
  if (key.asymmetricKeyType === "ec") return "ES256";
  if (key.asymmetricKeyType === "rsa") return "RS256";
  throw new TypeError(`unsupported proof key type ${key.asymmetricKeyType}`);
}

/** Signs proofs for one identity; the key and certificate are parsed once. */
export class ProofSigner {
  readonly #key: KeyObject;
  readonly #x5c: string[];
  readonly #alg: "ES256" | "RS256";
  readonly #id: string;

  constructor(identity: Identity) {
    this.#key = createPrivateKey(identity.key);
    const cert = new X509Certificate(identity.cert);
    this.#x5c = [cert.raw.toString("base64")];
    this.#alg = algorithmFor(this.#key);
    this.#id = identityOf({
      subject: cert.subject,
      subjectAltName: cert.subjectAltName,
      clientAuth: hasUsage(cert, CLIENT_AUTH_OID),
      serverAuth: hasUsage(cert, SERVER_AUTH_OID),
    });
  }

  /** A proof: this identity's certificate in x5c, its ID as `sub`, a fresh jti, a bounded life, and the request. */
  sign(target: ProofTarget, now = Date.now() / 1000): Promise<string> {
    const iat = Math.floor(now);
    return new SignJWT({ htm: target.method, htu: target.path, dig: payloadDigest(target.payload) })
      .setProtectedHeader({ alg: this.#alg, typ: PROOF_TYPE, x5c: this.#x5c })
      .setSubject(this.#id)
      .setJti(randomUUID())
      .setIssuedAt(iat)
      .setExpirationTime(iat + PROOF_LIFETIME_S)
      .sign(this.#key);
  }
}

function hasUsage(cert: X509Certificate, oid: string): boolean {
  // From the DER: Bun's X509Certificate.keyUsage lists the EKU OIDs, but Deno's lists the key usage instead.
  return hasExtendedKeyUsage(cert, oid);
}

interface TrustedCertificate {
  publicKey: KeyObject;
  identity: string;
  serial: string;
  notBefore: number;
  notAfter: number;
}

interface VerifiedToken {
  cert: TrustedCertificate;
  payload: Record<string, unknown>;
}

export interface ProofVerifierOptions {
  /** The CA's current revocation list, asked on every verification (it reloads while the role runs). */
  isRevoked?: (serial: string) => boolean;
  cacheLimit?: number;
}

/**
 * Verifies proofs against our CA. A certificate's chain, CA:FALSE and clientAuth checks are cached by its DER, and a
 * verified proof by its text (a read proof is sent again and again while it lives), so a busy caller costs one
 * signature check per new proof. Validity, revocation and the request binding are checked every time. Replay of a
 * write (a reused jti) is refused by the record store.
 */
export class ProofVerifier {
  #ca: X509Certificate;
  readonly #trusted = new Map<string, TrustedCertificate>();
  readonly #verified = new Map<string, VerifiedToken>();
  readonly #cacheLimit: number;
  readonly #isRevoked: (serial: string) => boolean;

  constructor(caPem: string, options: ProofVerifierOptions = {}) {
    this.#ca = new X509Certificate(caPem);
    this.#cacheLimit = options.cacheLimit ?? 4096;
    this.#isRevoked = options.isRevoked ?? (() => false);
  }

  /**
   * A new CA (a reload after a CA rotation): proofs by certificates of the old one stop passing at once, and nothing
   * verified under it is remembered (before, a verifier built at start kept the old CA until a restart).
   */
  setCa(caPem: string): void {
    const next = new X509Certificate(caPem);
    if (next.raw.equals(this.#ca.raw)) return;
    this.#ca = next;
    this.#trusted.clear();
    this.#verified.clear();
  }

  async verify(proof: string, target: ProofTarget, now = Date.now() / 1000): Promise<VerifiedProof> {
    const { cert, payload } = await this.#verifyToken(proof, now);
    const { jti, exp, htm, htu, dig } = payload;
    if (typeof jti !== "string" || jti.length > 128) throw new ProofRejected("proof jti is invalid");
    if (htm !== target.method || htu !== target.path) throw new ProofRejected("proof was made for another request");
    if (dig !== payloadDigest(target.payload)) throw new ProofRejected("proof does not match the payload");
    return { sender: cert.identity, jti, expiresAt: Number(exp) };
  }

  /** The proof's signature and claims (cached by its text), then its certificate's validity and revocation, now. */
  async #verifyToken(token: string, now: number): Promise<VerifiedToken> {
    let verified = this.#verified.get(token);
    if (!verified) {
      const cert = this.#trust(token);
      let payload: Record<string, unknown>;
      try {
        ({ payload } = await jwtVerify(token, cert.publicKey, {
          algorithms: ["ES256", "RS256"],
          typ: PROOF_TYPE,
          currentDate: new Date(now * 1000),
          clockTolerance: CLOCK_SKEW_S,
          requiredClaims: ["jti", "iat", "exp", "sub"],
          subject: cert.identity,
        }));
      } catch (error) {
        const code = (error as { code?: string }).code;
        throw new ProofRejected(code === "ERR_JWT_EXPIRED" ? "proof expired" : "proof signature or claims are invalid");
      }
      // A signer choosing its own exp cannot stretch the lifetime (#11 L3).
      if (Number(payload.exp) - Number(payload.iat) > PROOF_LIFETIME_S) throw new ProofRejected(`proof lives longer than ${PROOF_LIFETIME_S} s`);
      verified = { cert, payload };
      this.#remember(this.#verified, token, verified);
    }
    const { cert, payload } = verified;
    if (now < cert.notBefore || now > cert.notAfter) throw new ProofRejected("proof certificate is expired or not yet valid");
    if (now > Number(payload.exp) + CLOCK_SKEW_S) throw new ProofRejected("proof expired");
    if (Number(payload.iat) > now + CLOCK_SKEW_S) throw new ProofRejected("proof signature or claims are invalid");
    if (this.#isRevoked(cert.serial)) throw new ProofRejected("proof certificate is revoked");
    return verified;
  }

  #trust(token: string): TrustedCertificate {
    let header: ReturnType<typeof decodeProtectedHeader>;
    try {
      header = decodeProtectedHeader(token);
    } catch {
      throw new ProofRejected("proof is not a compact JWS");
    }
    const { x5c } = header;
    if (!Array.isArray(x5c) || typeof x5c[0] !== "string") throw new ProofRejected("proof carries no x5c certificate");
    // One certificate, ours: a chain would be ignored past its first entry, so none is accepted (issue 18).
    if (x5c.length !== 1) throw new ProofRejected("proof must carry exactly one x5c certificate");
    // Exactly: jose's own typ check also takes "application/securemesh-proof+jwt" (found by attack on issue 18).
    if (header.typ !== PROOF_TYPE) throw new ProofRejected("proof signature or claims are invalid");
    const der = x5c[0];
    const cached = this.#trusted.get(der);
    if (cached) return cached;

    let cert: X509Certificate;
    try {
      cert = new X509Certificate(Buffer.from(der, "base64"));
    } catch {
      throw new ProofRejected("proof certificate cannot be parsed");
    }
    if (!cert.checkIssued(this.#ca) || !cert.verify(this.#ca.publicKey)) throw new ProofRejected("proof certificate is not issued by our CA");
    if (cert.ca) throw new ProofRejected("proof certificate is a CA certificate");
    if (!hasUsage(cert, CLIENT_AUTH_OID)) throw new ProofRejected("proof certificate is not for client authentication");
    const identity = identityOf({ subject: cert.subject, subjectAltName: cert.subjectAltName, clientAuth: true, serverAuth: hasUsage(cert, SERVER_AUTH_OID) });
    if (!identity) throw new ProofRejected("proof certificate names no identity");

    const trusted: TrustedCertificate = {
      publicKey: cert.publicKey,
      identity,
      serial: cert.serialNumber,
      notBefore: cert.validFromDate.getTime() / 1000,
      notAfter: cert.validToDate.getTime() / 1000,
    };
    this.#remember(this.#trusted, der, trusted);
    return trusted;
  }

  /** Bounded: the oldest entry goes first, so a flood of distinct tokens cannot grow memory. */
  #remember<V>(map: Map<string, V>, key: string, value: V): void {
    if (map.size >= this.#cacheLimit) map.delete(map.keys().next().value!);
    map.set(key, value);
  }
}
