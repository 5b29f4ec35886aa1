// The sender proof: a compact JWS, signed with the client's certificate key, carrying that certificate in x5c.
// The coordinator terminates TLS, so this is how a server learns, and can check, who sent a message.
// The forwarder assertion is the same kind of JWS from the hop in between: Bun.serve hides the TLS peer's
// certificate (oven-sh/bun#14097), so a server learns which identity forwarded a request from it (#11).
import { createHash, createPrivateKey, randomUUID, X509Certificate, type KeyObject } from "node:crypto";
import { decodeProtectedHeader, jwtVerify, SignJWT } from "jose";
import { ProofRejected } from "../platform/errors.ts";
import { identityOf } from "../authz/identity.ts";
import { CLIENT_AUTH_OID, SERVER_AUTH_OID, type Identity } from "../platform/tls.ts";
import { hasExtendedKeyUsage } from "../platform/eku.ts";

export const PROOF_TYPE = "securemesh-proof+jwt";
export const FORWARDER_TYPE = "securemesh-forwarder+jwt";
/** Where a proof travels on requests without a JSON body (reads), and where the forwarder assertion travels. */
export const PROOF_HEADER = "x-securemesh-proof";
export const FORWARDER_HEADER = "x-securemesh-forwarder";
/** How long a proof lives: long enough for failover retries, short enough to make a stolen proof useless. */
export const PROOF_LIFETIME_S = 60;
/** Clock difference tolerated between hosts; a proof is accepted at most PROOF_LIFETIME_S + this after signing. */
export const CLOCK_SKEW_S = 10;
/**
 * A forwarder assertion is a bearer credential between the coordinator and the servers: short-lived, so one that
 * leaks is of little use for long; re-signed after two thirds of it, so a server never sees an expired one.
 */
export const FORWARDER_LIFETIME_S = 60;

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

/** Signs proofs (and forwarder assertions) for one identity; the key and certificate are parsed once. */
export class ProofSigner {
  readonly #key: KeyObject;
  readonly #x5c: string[];
  readonly #alg: "ES256" | "RS256";
  readonly #id: string;
  #forwarder: { token: string; renewAt: number } | null = null;

  constructor(identity: Identity) {
    this.#key = createPrivateKey(identity.key);
    const cert = new X509Certificate(identity.cert);
    this.#x5c = [cert.raw.toString("base64")];
    this.#alg = algorithmFor(this.#key);
    this.#id = identityOf({ subject: cert.subject, subjectAltName: cert.subjectAltName, clientAuth: hasUsage(cert, CLIENT_AUTH_OID), serverAuth: hasUsage(cert, SERVER_AUTH_OID) });
  }

  sign(target: ProofTarget, now = Date.now() / 1000): Promise<string> {
    return this.#jws({ htm: target.method, htu: target.path, dig: payloadDigest(target.payload) }, PROOF_TYPE, PROOF_LIFETIME_S, Math.floor(now));
  }

  /** The current forwarder assertion, re-signed when a third of its life is left: no signature per request. */
  async forwarderAssertion(now = Date.now() / 1000): Promise<string> {
    if (this.#forwarder && now < this.#forwarder.renewAt) return this.#forwarder.token;
    const iat = Math.floor(now);
    const token = await this.#jws({}, FORWARDER_TYPE, FORWARDER_LIFETIME_S, iat);
    this.#forwarder = { token, renewAt: iat + (FORWARDER_LIFETIME_S * 2) / 3 };
    return token;
  }

  /** Both kinds of token: this identity's certificate in x5c, its ID as `sub`, a fresh jti, and a bounded life. */
  #jws(claims: Record<string, string>, typ: string, lifetimeS: number, iat: number): Promise<string> {
    return new SignJWT(claims)
      .setProtectedHeader({ alg: this.#alg, typ, x5c: this.#x5c })
      .setSubject(this.#id)
      .setJti(randomUUID())
      .setIssuedAt(iat)
      .setExpirationTime(iat + lifetimeS)
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
 * Verifies proofs and forwarder assertions against our CA. A certificate's chain, CA:FALSE and clientAuth checks
 * are cached by its DER, and a verified token by its text (a read proof or a forwarder assertion is sent again
 * and again), so a busy caller costs one signature check per new token. Validity, revocation and the request
 * binding are checked every time. Replay of a write (a reused jti) is refused by the record store.
 */
export class ProofVerifier {
  readonly #ca: X509Certificate;
  readonly #trusted = new Map<string, TrustedCertificate>();
  readonly #verified = new Map<string, VerifiedToken>();
  readonly #cacheLimit: number;
  readonly #isRevoked: (serial: string) => boolean;

  constructor(caPem: string, options: ProofVerifierOptions = {}) {
    this.#ca = new X509Certificate(caPem);
    this.#cacheLimit = options.cacheLimit ?? 4096;
    this.#isRevoked = options.isRevoked ?? (() => false);
  }

  async verify(proof: string, target: ProofTarget, now = Date.now() / 1000): Promise<VerifiedProof> {
    const { cert, payload } = await this.#verifyToken(proof, PROOF_TYPE, PROOF_LIFETIME_S, now);
    const { jti, exp, htm, htu, dig } = payload;
    if (typeof jti !== "string" || jti.length > 128) throw new ProofRejected("proof jti is invalid");
    if (htm !== target.method || htu !== target.path) throw new ProofRejected("proof was made for another request");
    if (dig !== payloadDigest(target.payload)) throw new ProofRejected("proof does not match the payload");
    return { sender: cert.identity, jti, expiresAt: Number(exp) };
  }

  /** The identity that forwarded a request, from its forwarder assertion. */
  async verifyForwarder(assertion: string, now = Date.now() / 1000): Promise<string> {
    return (await this.#verifyToken(assertion, FORWARDER_TYPE, FORWARDER_LIFETIME_S, now)).cert.identity;
  }

  async #verifyToken(token: string, typ: string, lifetimeS: number, now: number): Promise<VerifiedToken> {
    const what = typ === PROOF_TYPE ? "proof" : "forwarder assertion";
    // Keyed by type too: a proof verified once must not pass later as a forwarder assertion, or the reverse.
    const cacheKey = `${typ}\u0000${token}`;
    let verified = this.#verified.get(cacheKey);
    if (!verified) {
      const cert = this.#trust(token, what);
      let payload: Record<string, unknown>;
      try {
        ({ payload } = await jwtVerify(token, cert.publicKey, {
          algorithms: ["ES256", "RS256"],
          typ,
          currentDate: new Date(now * 1000),
          clockTolerance: CLOCK_SKEW_S,
          requiredClaims: ["jti", "iat", "exp", "sub"],
          subject: cert.identity,
        }));
      } catch (error) {
        const code = (error as { code?: string }).code;
        throw new ProofRejected(code === "ERR_JWT_EXPIRED" ? `${what} expired` : `${what} signature or claims are invalid`);
      }
      // A signer choosing its own exp cannot stretch the lifetime (#11 L3).
      if (Number(payload.exp) - Number(payload.iat) > lifetimeS) throw new ProofRejected(`${what} lives longer than ${lifetimeS} s`);
      verified = { cert, payload };
      this.#remember(this.#verified, cacheKey, verified);
    }
    const { cert, payload } = verified;
    if (now < cert.notBefore || now > cert.notAfter) throw new ProofRejected(`${what} certificate is expired or not yet valid`);
    if (now > Number(payload.exp) + CLOCK_SKEW_S) throw new ProofRejected(`${what} expired`);
    if (Number(payload.iat) > now + CLOCK_SKEW_S) throw new ProofRejected(`${what} signature or claims are invalid`);
    if (this.#isRevoked(cert.serial)) throw new ProofRejected(`${what} certificate is revoked`);
    return verified;
  }

  #trust(token: string, what: string): TrustedCertificate {
    let x5c: unknown;
    try {
      x5c = decodeProtectedHeader(token).x5c;
    } catch {
      throw new ProofRejected(`${what} is not a compact JWS`);
    }
    if (!Array.isArray(x5c) || typeof x5c[0] !== "string") throw new ProofRejected(`${what} carries no x5c certificate`);
    const der = x5c[0];
    const cached = this.#trusted.get(der);
    if (cached) return cached;

    let cert: X509Certificate;
    try {
      cert = new X509Certificate(Buffer.from(der, "base64"));
    } catch {
      throw new ProofRejected(`${what} certificate cannot be parsed`);
    }
    if (!cert.checkIssued(this.#ca) || !cert.verify(this.#ca.publicKey)) throw new ProofRejected(`${what} certificate is not issued by our CA`);
    if (cert.ca) throw new ProofRejected(`${what} certificate is a CA certificate`);
    if (!hasUsage(cert, CLIENT_AUTH_OID)) throw new ProofRejected(`${what} certificate is not for client authentication`);
    const identity = identityOf({ subject: cert.subject, subjectAltName: cert.subjectAltName, clientAuth: true, serverAuth: hasUsage(cert, SERVER_AUTH_OID) });
    if (!identity) throw new ProofRejected(`${what} certificate names no identity`);

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
