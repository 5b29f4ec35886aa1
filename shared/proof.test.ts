import { beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ProofRejected } from "./errors.ts";
import { ProofSigner, ProofVerifier } from "./proof.ts";
import { testPki } from "./testing/pki.ts";
import { loadIdentity } from "./tls.ts";

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
    expect(verified.sender).toBe("client1");
    expect(verified.jti).toMatch(/^[0-9a-f-]{36}$/);
  });

  test("RSA client keys work too", async () => {
    const rsa = await testPki("rsa", ["--rsa"]);
    const proof = await new ProofSigner(loadIdentity(rsa, "client2")).sign(target);
    const v = new ProofVerifier(readFileSync(join(rsa, "ca_cert.pem"), "utf8"));
    expect((await v.verify(proof, target)).sender).toBe("client2");
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
