// The JOSE side of the token exchange, made and opened by jose (#13): what a KeyServer opens, what it refuses, and
// that every refusal is the one DecryptFailed. The KeyServer app around it is tested in roles/keyserver.test.ts.
import { afterAll, describe, expect, test } from "bun:test";
import { createCipheriv, createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CompactEncrypt, compactDecrypt, type CompactJWEHeaderParameters } from "jose";
import {
  type DecryptFailed,
  EcdhKeyPair,
  openJoseRequest,
  openJoseResponse,
  prepareEcdhRequest,
  prepareJoseRequest,
  RsaKeyPair,
  sealJoseResponse,
} from "./token-exchange.ts";

const dir = mkdtempSync(join(tmpdir(), "securemesh-jwe-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const keys = await RsaKeyPair.loadOrCreate(join(dir, "rsa_key.pem"));
const ecdh = await EcdhKeyPair.loadOrCreate(join(dir, "ecdh_key.pem"));
/** A well-formed request payload, as prepareJoseRequest writes it. */
const PAYLOAD = JSON.stringify({
  clientId: "client1",
  tokenType: "marketplace",
  sessionKey: randomBytes(32).toString("base64url"),
  timestamp: Math.floor(Date.now() / 1000),
  nonce: "n1",
});
const REFUSED = { name: "DecryptFailed", code: "ERR_DECRYPT", status: 400, message: "request could not be decrypted" };

/** What came of opening: the client it names, or the error as a plain object (so two refusals compare equal). */
async function outcome(opening: Promise<{ clientId: string } | string>): Promise<string | Record<string, unknown>> {
  try {
    const opened = await opening;
    return typeof opened === "string" ? opened : opened.clientId;
  } catch (error) {
    const { name, code, status, message } = error as DecryptFailed;
    return { name, code, status, message };
  }
}

const request = (jwe: string, withEcdh = false) => outcome(openJoseRequest(keys, jwe, withEcdh ? ecdh : undefined));

/** A JWE jose makes to the KeyServer's RSA key, with `header` and any `crit` extensions it is told to accept. */
function josed(header: CompactJWEHeaderParameters = { alg: "RSA-OAEP-256", enc: "A256GCM" }, crit?: Record<string, boolean>): Promise<string> {
  return new CompactEncrypt(new TextEncoder().encode(PAYLOAD)).setProtectedHeader(header).encrypt(keys.publicKey, crit && { crit });
}

const rsaOaep = (hash: "SHA-1" | "SHA-256", usage: "encrypt" | "decrypt") =>
  usage === "encrypt"
    ? crypto.subtle.importKey("spki", keys.publicKey.export({ type: "spki", format: "der" }), { name: "RSA-OAEP", hash }, false, [usage])
    : crypto.subtle.importKey("pkcs8", keys.privateKey.export({ type: "pkcs8", format: "der" }), { name: "RSA-OAEP", hash }, false, [usage]);

/** The five parts of a compact JWE sealed with AES-256-GCM under `cek` with any protected `header`: what jose will not make. */
function sealedByHand(header: Record<string, unknown>, encryptedKey: Uint8Array, cek: Uint8Array): string {
  const encoded = Buffer.from(JSON.stringify(header)).toString("base64url");
  const iv = randomBytes(12);
  const cipher = createCipheriv("aes-256-gcm", cek, iv).setAAD(Buffer.from(encoded));
  const ciphertext = Buffer.concat([cipher.update(PAYLOAD), cipher.final()]);
  return [encoded, ...[encryptedKey, iv, ciphertext, cipher.getAuthTag()].map((part) => Buffer.from(part).toString("base64url"))].join(".");
}

/** RSA-OAEP-256 and AES-256-GCM, whatever `header` says: it would open but for the header check. */
async function rsaByHand(header: Record<string, unknown>): Promise<string> {
  const cek = randomBytes(32);
  return sealedByHand(header, new Uint8Array(await crypto.subtle.encrypt({ name: "RSA-OAEP" }, await rsaOaep("SHA-256", "encrypt"), cek)), cek);
}

/** `jwe` with one byte of part `index` flipped. */
function flipped(jwe: string, index: number): string {
  const parts = jwe.split(".");
  const bytes = Buffer.from(parts[index]!, "base64url");
  bytes[bytes.length >> 1]! ^= 1;
  parts[index] = bytes.toString("base64url");
  return parts.join(".");
}

const headerOf = (jwe: string) => JSON.parse(Buffer.from(jwe.split(".")[0]!, "base64url").toString()) as Record<string, unknown>;
/** `jwe` with its protected header replaced, the rest as it was. */
const withHeader = (jwe: string, header: unknown) => [Buffer.from(JSON.stringify(header)).toString("base64url"), ...jwe.split(".").slice(1)].join(".");

describe("RSA-OAEP-256 requests", () => {
  test("open as prepareJoseRequest makes them, as jose makes them with a kid, and as sealed by hand", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect(headerOf(prepared.body)).toEqual({ alg: "RSA-OAEP-256", enc: "A256GCM" });
    const opened = await openJoseRequest(keys, prepared.body);
    expect({ ...opened, sessionKey: Buffer.from(opened.sessionKey).equals(Buffer.from(prepared.sessionKey)) }).toEqual({
      clientId: "client1",
      tokenType: "marketplace",
      sessionKey: true,
      timestamp: expect.any(Number),
      nonce: expect.any(String),
    });
    expect(await request(await josed({ alg: "RSA-OAEP-256", enc: "A256GCM", kid: keys.jwk.kid }))).toBe("client1");
    // The control for the refusals below: sealed this way under the right header, it opens.
    expect(await request(await rsaByHand({ alg: "RSA-OAEP-256", enc: "A256GCM" }))).toBe("client1");
  });

  test("another algorithm, a critical extension or compression is refused, though sealed right", async () => {
    const zipped = await josed({ alg: "RSA-OAEP-256", enc: "A256GCM", zip: "DEF" });
    const critical = await josed({ alg: "RSA-OAEP-256", enc: "A256GCM", crit: ["urn:x"], "urn:x": 1 }, { "urn:x": true });
    // jose opens both when let: refused by the KeyServer's options, not for being malformed.
    expect((await compactDecrypt(zipped, keys.webPrivateKey)).plaintext).toEqual(new TextEncoder().encode(PAYLOAD));
    expect((await compactDecrypt(critical, keys.webPrivateKey, { crit: { "urn:x": true } })).plaintext).toEqual(new TextEncoder().encode(PAYLOAD));
    const refused = [
      zipped,
      critical,
      await josed({ alg: "RSA-OAEP", enc: "A256GCM" }), // OAEP with SHA-1
      await josed({ alg: "RSA-OAEP-256", enc: "A128GCM" }),
      await josed({ alg: "RSA-OAEP-256", enc: "A256CBC-HS512" }),
      await rsaByHand({ alg: "RSA-OAEP", enc: "A256GCM" }),
      await rsaByHand({ enc: "A256GCM" }),
    ];
    for (const jwe of refused) expect(await request(jwe, true)).toEqual(REFUSED);
  });

  test("anything altered or malformed is refused, and every refusal is the same DecryptFailed", async () => {
    const jwe = await josed();
    const stranger = await RsaKeyPair.loadOrCreate(join(dir, "stranger_rsa_key.pem"));
    const refused = [
      ...[0, 1, 2, 3, 4].map((part) => flipped(jwe, part)), // header (the AAD), encrypted key, IV, ciphertext, tag
      withHeader(jwe, { enc: "A256GCM", alg: "RSA-OAEP-256" }), // the same header written otherwise: not the AAD sealed
      withHeader(jwe, []),
      jwe.split(".").slice(0, 4).join("."),
      `${jwe}.x`,
      jwe.replace(/\.[^.]+$/, ".a+b/"), // base64, not base64url
      (await prepareJoseRequest(stranger.publicKey, "client1", "marketplace")).body, // to another key
      "not.a.jwe.at.all",
      "",
    ];
    for (const candidate of refused) expect(await request(candidate)).toEqual(REFUSED);
    expect(await request(jwe)).toBe("client1");
  });

  test("the content key is wrapped with SHA-256 OAEP, not SHA-1 (oven-sh/bun#10247), and is fresh every time", async () => {
    const encryptedKey = async () => Buffer.from((await prepareJoseRequest(keys.publicKey, "client1", "marketplace")).body.split(".")[1]!, "base64url");
    const [a, b] = [await encryptedKey(), await encryptedKey()];
    await expect(crypto.subtle.decrypt({ name: "RSA-OAEP" }, await rsaOaep("SHA-1", "decrypt"), a)).rejects.toThrow();
    const [cekA, cekB] = await Promise.all(
      [a, b].map(async (wrapped) => Buffer.from(await crypto.subtle.decrypt({ name: "RSA-OAEP" }, await rsaOaep("SHA-256", "decrypt"), wrapped))),
    );
    expect({ length: cekA!.length, fresh: !cekA!.equals(cekB!) }).toEqual({ length: 32, fresh: true });
  });
});

/** An ECDH-ES JWE from the all-zero X25519 point, sealed under the content key of the all-zero secret it would force. */
function sealedToZeroSecret(): string {
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return b;
  };
  const prefixed = (b: Buffer) => Buffer.concat([u32(b.length), b]);
  const otherInfo = Buffer.concat([prefixed(Buffer.from("A256GCM")), prefixed(Buffer.alloc(0)), prefixed(Buffer.alloc(0)), u32(256)]);
  const cek = createHash("sha256").update(u32(1)).update(Buffer.alloc(32)).update(otherInfo).digest();
  return sealedByHand(
    { alg: "ECDH-ES", enc: "A256GCM", epk: { kty: "OKP", crv: "X25519", x: Buffer.alloc(32).toString("base64url") } },
    new Uint8Array(0),
    cek,
  );
}

describe("ECDH-ES requests, the opt-in", () => {
  test("open with the KeyServer's X25519 key: as prepareEcdhRequest makes them, and as jose makes them with apu/apv", async () => {
    const prepared = await prepareEcdhRequest(ecdh.publicKey, "client1", "marketplace");
    expect(headerOf(prepared.body)).toEqual({ alg: "ECDH-ES", enc: "A256GCM", epk: { kty: "OKP", crv: "X25519", x: expect.any(String) } });
    expect(await request(prepared.body, true)).toBe("client1");
    const parties = await new CompactEncrypt(new TextEncoder().encode(PAYLOAD))
      .setProtectedHeader({ alg: "ECDH-ES", enc: "A256GCM" })
      .setKeyManagementParameters({ apu: new TextEncoder().encode("proxy"), apv: new TextEncoder().encode("keyserver") })
      .encrypt(ecdh.publicKey);
    expect(await request(parties, true)).toBe("client1");
  });

  test("without the opt-in, to another key, altered, or from a bad or low-order ephemeral key: the same DecryptFailed", async () => {
    const jwe = (await prepareEcdhRequest(ecdh.publicKey, "client1", "marketplace")).body;
    const header = headerOf(jwe);
    const epk = header.epk as Record<string, string>;
    const stranger = await EcdhKeyPair.loadOrCreate(join(dir, "stranger_ecdh_key.pem"));
    const refused = [
      ...[0, 2, 3, 4].map((part) => flipped(jwe, part)),
      withHeader(jwe, { ...header, epk: { ...epk, d: epk.x } }), // an ephemeral key with its private part
      withHeader(jwe, { ...header, epk: { ...epk, crv: "X448" } }),
      withHeader(jwe, { ...header, epk: { kty: "EC", crv: "P-256", x: epk.x, y: epk.x } }),
      withHeader(jwe, { ...header, epk: undefined }),
      withHeader(jwe, { ...header, apu: "not base64url!" }),
      jwe.replace("..", ".AAAA."), // direct agreement carries no encrypted key
      (await prepareEcdhRequest(stranger.publicKey, "client1", "marketplace")).body,
      // A low-order point sealed right: a sender that knows the all-zero secret its point forces (RFC 7748 6.1).
      sealedToZeroSecret(),
    ];
    for (const candidate of refused) expect(await request(candidate, true)).toEqual(REFUSED);
    expect(await request(jwe)).toEqual(REFUSED); // a KeyServer without --ecdh-es
    expect(await request(jwe, true)).toBe("client1");
  });
});

describe("the answer (dir, A256GCM)", () => {
  const sessionKey = new Uint8Array(randomBytes(32));

  test("jose and openJoseResponse open it under the session key; no two seals of one token are alike", async () => {
    const sealed = await sealJoseResponse("mkt-token", sessionKey);
    const { plaintext, protectedHeader } = await compactDecrypt(sealed, sessionKey);
    expect({ token: new TextDecoder().decode(plaintext), protectedHeader }).toEqual({ token: "mkt-token", protectedHeader: { alg: "dir", enc: "A256GCM" } });
    expect(await openJoseResponse(sealed, sessionKey)).toBe("mkt-token");
    expect(await sealJoseResponse("mkt-token", sessionKey)).not.toBe(sealed);
  });

  test("under another key, altered, compressed or another algorithm: the same DecryptFailed", async () => {
    const sealed = await sealJoseResponse("mkt-token", sessionKey);
    const answer = (jwe: string, key = sessionKey) => outcome(openJoseResponse(jwe, key));
    const zipped = await new CompactEncrypt(new TextEncoder().encode("mkt-token"))
      .setProtectedHeader({ alg: "dir", enc: "A256GCM", zip: "DEF" })
      .encrypt(sessionKey);
    expect(new TextDecoder().decode((await compactDecrypt(zipped, sessionKey)).plaintext)).toBe("mkt-token");
    const refused = [
      ...[0, 2, 3, 4].map((part) => flipped(sealed, part)),
      withHeader(sealed, { enc: "A256GCM", alg: "dir" }),
      zipped,
      sealed.replace("..", ".AAAA."), // dir carries no encrypted key
      (await prepareJoseRequest(keys.publicKey, "client1", "marketplace")).body,
    ];
    for (const jwe of refused) expect(await answer(jwe)).toEqual(REFUSED);
    expect(await answer(sealed, new Uint8Array(randomBytes(32)))).toEqual(REFUSED);
    expect(await answer(sealed)).toBe("mkt-token");
  });
});
