// The sender proof: a compact JWS, signed with the client's certificate key, carrying that certificate in x5c.
// The coordinator terminates TLS, so this is how a server learns, and can check, who sent a message.
import { createHash, createPrivateKey, randomUUID, X509Certificate, type KeyObject } from "node:crypto";
import { decodeProtectedHeader, jwtVerify, SignJWT } from "jose";
import { ProofRejected } from "./errors.ts";
import { certificateName, CLIENT_AUTH_OID, type Identity } from "./tls.ts";

export const PROOF_TYPE = "securemesh-proof+jwt";
/** How long a proof lives: long enough for failover retries, short enough to make a stolen proof useless. */
export const PROOF_LIFETIME_S = 60;
const CLOCK_SKEW_S = 30;

/** What a proof binds: the request line and a digest of the payload it travels with. */
export interface ProofTarget {
  method: string;
  path: string;
  payload: string;
}

export interface VerifiedProof {
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

/** Signs proofs for one client identity; the key and certificate are parsed once. */
export class ProofSigner {
  readonly #key: KeyObject;
  readonly #x5c: string[];
  readonly #alg: "ES256" | "RS256";
  readonly #name: string;

  constructor(identity: Identity) {
    this.#key = createPrivateKey(identity.key);
    const cert = new X509Certificate(identity.cert);
    this.#x5c = [cert.raw.toString("base64")];
    this.#alg = algorithmFor(this.#key);
    this.#name = certificateName(cert);
  }

  sign(target: ProofTarget, now = Date.now() / 1000): Promise<string> {
    const iat = Math.floor(now);
    return new SignJWT({ htm: target.method, htu: target.path, dig: payloadDigest(target.payload) })
      .setProtectedHeader({ alg: this.#alg, typ: PROOF_TYPE, x5c: this.#x5c })
      .setSubject(this.#name)
      .setJti(randomUUID())
      .setIssuedAt(iat)
      .setExpirationTime(iat + PROOF_LIFETIME_S)
      .sign(this.#key);
  }
}

interface TrustedCertificate {
  publicKey: KeyObject;
  name: string;
  notBefore: number;
  notAfter: number;
}

/**
 * Verifies proofs against our CA. A certificate's chain, CA:FALSE and clientAuth checks are cached by its DER,
 * so a busy client costs one signature check per request; the validity window is checked every time.
 * Replay (a reused jti) is refused by the record store, which every server shares.
 */
export class ProofVerifier {
  readonly #ca: X509Certificate;
  readonly #trusted = new Map<string, TrustedCertificate>();
  readonly #cacheLimit: number;

  constructor(caPem: string, options: { cacheLimit?: number } = {}) {
    this.#ca = new X509Certificate(caPem);
    this.#cacheLimit = options.cacheLimit ?? 1024;
  }

  async verify(proof: string, target: ProofTarget, now = Date.now() / 1000): Promise<VerifiedProof> {
    const cert = this.#trust(proof);
    if (now < cert.notBefore || now > cert.notAfter) throw new ProofRejected("proof certificate is expired or not yet valid");
    let payload: Record<string, unknown>;
    try {
      ({ payload } = await jwtVerify(proof, cert.publicKey, {
        algorithms: ["ES256", "RS256"],
        typ: PROOF_TYPE,
        currentDate: new Date(now * 1000),
        clockTolerance: CLOCK_SKEW_S,
        maxTokenAge: PROOF_LIFETIME_S + CLOCK_SKEW_S,
        requiredClaims: ["jti", "iat", "exp", "sub"],
        subject: cert.name,
      }));
    } catch (error) {
      const code = (error as { code?: string }).code;
      throw new ProofRejected(code === "ERR_JWT_EXPIRED" ? "proof expired" : "proof signature or claims are invalid");
    }
    const { jti, exp, htm, htu, dig } = payload;
    if (typeof jti !== "string" || jti.length > 128) throw new ProofRejected("proof jti is invalid");
    if (htm !== target.method || htu !== target.path) throw new ProofRejected("proof was made for another request");
    if (dig !== payloadDigest(target.payload)) throw new ProofRejected("proof does not match the payload");
    return { sender: cert.name, jti, expiresAt: Number(exp) };
  }

  #trust(proof: string): TrustedCertificate {
    let x5c: unknown;
    try {
      x5c = decodeProtectedHeader(proof).x5c;
    } catch {
      throw new ProofRejected("proof is not a compact JWS");
    }
    if (!Array.isArray(x5c) || typeof x5c[0] !== "string") throw new ProofRejected("proof carries no x5c certificate");
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
    const usages = (cert as X509Certificate & { keyUsage?: string[] }).keyUsage ?? [];
    if (!usages.includes(CLIENT_AUTH_OID)) throw new ProofRejected("proof certificate is not for client authentication");

    const trusted: TrustedCertificate = {
      publicKey: cert.publicKey,
      name: certificateName(cert),
      notBefore: cert.validFromDate.getTime() / 1000,
      notAfter: cert.validToDate.getTime() / 1000,
    };
    if (this.#trusted.size >= this.#cacheLimit) this.#trusted.delete(this.#trusted.keys().next().value!);
    this.#trusted.set(der, trusted);
    return trusted;
  }
}
