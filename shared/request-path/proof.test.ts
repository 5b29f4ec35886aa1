import { beforeAll, describe, expect, test } from "bun:test";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { SignJWT } from "jose";
import { join } from "node:path";
import { ProofRejected } from "../platform/errors.ts";
import { parseCrl } from "../authz/crl.ts";
import { CLOCK_SKEW_S, payloadDigest, PROOF_LIFETIME_S, ProofSigner, ProofVerifier } from "./proof.ts";
import { rsaTestPki, runPkiSh, testPki } from "../testing/pki.ts";
import { loadIdentity } from "../platform/tls.ts";

let main: string;
let other: string;
const target = { method: "POST", path: "/api/data", payload: "gAAAA-token" };

beforeAll(async () => {
  [main, other] = await Promise.all([testPki("main"), testPki("other")]);
});

const verifier = () => new ProofVerifier(readFileSync(join(main, "ca_cert.pem"), "utf8"));

async function rejection(promise: Promise<unknown>): Promise<string> {
  try {
    await promise;
    return "accepted";
  } catch (error) {
    expect(error).toBeInstanceOf(ProofRejected);
    return (error as Error).message;
  }
}

describe("sender proof", () => {
  test("a client's proof verifies and names the client", async () => {
    const proof = await new ProofSigner(loadIdentity(main, "client1")).sign(target);
    const verified = await verifier().verify(proof, target);
    expect(verified.sender).toBe("spiffe://securemesh/client/client1");
    expect(verified.jti).toMatch(/^[0-9a-f-]{36}$/);
  });

  test("RSA client keys work too", async () => {
    const rsa = await rsaTestPki();
    const proof = await new ProofSigner(loadIdentity(rsa, "client2")).sign(target);
    const v = new ProofVerifier(readFileSync(join(rsa, "ca_cert.pem"), "utf8"));
    expect((await v.verify(proof, target)).sender).toBe("spiffe://securemesh/client/client2");
  });

  test("a proof signed by a client of another CA is forged", async () => {
    const forged = await new ProofSigner(loadIdentity(other, "client1")).sign(target);
    expect(await rejection(verifier().verify(forged, target))).toBe("proof certificate is not issued by our CA");
  });

  test("copying a real certificate into x5c does not help without its key", async () => {
    const real = loadIdentity(main, "client1");
    const impostor = { ...real, key: loadIdentity(other, "client1").key };
    // ProofSigner checks nothing, like an attacker; the signature then fails against the real certificate.
    const proof = await new ProofSigner({ ...impostor, cert: real.cert }).sign(target);
    expect(await rejection(verifier().verify(proof, target))).toBe("proof signature or claims are invalid");
  });

  test("expired, future and mismatched proofs are refused", async () => {
    const signer = new ProofSigner(loadIdentity(main, "client1"));
    const now = Date.now() / 1000;
    const v = verifier();
    expect(await rejection(v.verify(await signer.sign(target, now - 600), target, now))).toBe("proof expired");
    expect(await rejection(v.verify(await signer.sign(target, now + 600), target, now))).toBe("proof signature or claims are invalid");
    const proof = await signer.sign(target);
    expect(await rejection(v.verify(proof, { ...target, payload: "other" }))).toBe("proof does not match the payload");
    expect(await rejection(v.verify(proof, { ...target, path: "/api/other" }))).toBe("proof was made for another request");
  });

  test("a server certificate (no clientAuth) cannot sign proofs", async () => {
    const proof = await new ProofSigner(loadIdentity(main, "server")).sign(target);
    expect(await rejection(verifier().verify(proof, target))).toBe("proof certificate is not for client authentication");
  });

  test("garbage and a proof without x5c are refused", async () => {
    expect(await rejection(verifier().verify("not.a.jws", target))).toBe("proof is not a compact JWS");
    const header = Buffer.from(JSON.stringify({ alg: "ES256" })).toString("base64url");
    expect(await rejection(verifier().verify(`${header}.e30.sig`, target))).toBe("proof carries no x5c certificate");
  });
});

describe("revocation and lifetime (#11)", () => {
  test("M1: a proof signed by a revoked certificate is refused, and the CRL is asked on every verification", async () => {
    const pki = await testPki("revocation");
    await runPkiSh(pki, "issue", "client3", "--client");
    const ca = readFileSync(join(pki, "ca_cert.pem"), "utf8");
    let crl = parseCrl(readFileSync(join(pki, "crl.pem"), "utf8"), ca);
    const v = new ProofVerifier(ca, { isRevoked: (serial) => crl.isRevoked(serial) });
    const signer = new ProofSigner(loadIdentity(pki, "client3"));
    expect((await v.verify(await signer.sign(target), target)).sender).toBe("spiffe://securemesh/client/client3");
    const proof = await signer.sign(target);
    await runPkiSh(pki, "revoke", "client3");
    crl = parseCrl(readFileSync(join(pki, "crl.pem"), "utf8"), ca); // what a reload does
    expect(await rejection(v.verify(proof, target))).toBe("proof certificate is revoked");
    expect(await rejection(v.verify(await signer.sign(target), target))).toBe("proof certificate is revoked");
  });

  test("L3: a proof is accepted at most its 60 s lifetime plus the clock skew after signing, and cannot choose a longer one", async () => {
    const signer = new ProofSigner(loadIdentity(main, "client1"));
    const signedAt = Date.now() / 1000;
    const proof = await signer.sign(target, signedAt);
    expect((await verifier().verify(proof, target, signedAt + PROOF_LIFETIME_S + CLOCK_SKEW_S - 1)).sender).toContain("client1");
    expect(await rejection(verifier().verify(proof, target, signedAt + PROOF_LIFETIME_S + CLOCK_SKEW_S + 1))).toBe("proof expired");
    // Before #11 a proof was accepted 120 s after signing; 75 s was seen working in an attack.
    expect(await rejection(verifier().verify(proof, target, signedAt + 75))).toBe("proof expired");
    // A cached, verified proof expires all the same.
    const v = verifier();
    await v.verify(proof, target, signedAt + 1);
    expect(await rejection(v.verify(proof, target, signedAt + 75))).toBe("proof expired");
  });

  test("issue 18: the typ must be exactly ours, x5c exactly one certificate, and a new CA drops the old one's proofs", async () => {
    const client1 = loadIdentity(main, "client1");
    const key = createPrivateKey(client1.key);
    const x5c = [new X509Certificate(client1.cert).raw.toString("base64")];
    const craft = (typ: string, chain: string[]) =>
      new SignJWT({ htm: target.method, htu: target.path, dig: payloadDigest(target.payload) })
        .setProtectedHeader({ alg: "ES256", typ, x5c: chain })
        .setSubject("spiffe://securemesh/client/client1")
        .setJti(crypto.randomUUID())
        .setIssuedAt()
        .setExpirationTime("60s")
        .sign(key);
    expect((await verifier().verify(await craft("securemesh-proof+jwt", x5c), target)).sender).toBe("spiffe://securemesh/client/client1");
    // jose alone accepts the "application/" form of a typ as the same type.
    expect(await rejection(verifier().verify(await craft("application/securemesh-proof+jwt", x5c), target))).toBe("proof signature or claims are invalid");
    expect(await rejection(verifier().verify(await craft("securemesh-proof+jwt", [...x5c, x5c[0]!]), target))).toBe(
      "proof must carry exactly one x5c certificate",
    );
    const v = verifier();
    const proof = await new ProofSigner(client1).sign(target);
    await v.verify(proof, target);
    v.setCa(loadIdentity(await testPki("other"), "client1").ca);
    expect(await rejection(v.verify(proof, target))).toBe("proof certificate is not issued by our CA");
  });
});
