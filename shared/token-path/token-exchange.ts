// The hybrid token exchange between SecureProxy and KeyServer: a fresh session key under the KeyServer's RSA key,
// the token back under that session key. Two wire formats: the original's (RSA-OAEP-SHA256 + AES-256-CBC) and JOSE
// (RSA-OAEP-256 + A256GCM, or, opt-in, ECDH-ES with X25519), every JWE made and opened by jose.
import { createCipheriv, createDecipheriv, createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, type KeyObject } from "node:crypto";
import { existsSync } from "node:fs";
import { dirname } from "node:path";
import { calculateJwkThumbprint, CompactEncrypt, compactDecrypt, exportJWK, type DecryptOptions, type JWK } from "jose";
import { BadRequest, ConfigError, MeshError } from "../platform/errors.ts";
import { createPrivateFile, ensurePrivateDir, readPrivateFile } from "../platform/private-files.ts";

/** Every decryption failure, whatever its cause, is this one error: no padding or format oracle. */
export class DecryptFailed extends MeshError {
  constructor() {
    super("ERR_DECRYPT", 400, "request could not be decrypted");
  }
}

export interface TokenRequest {
  clientId: string;
  tokenType: string;
  sessionKey: Uint8Array;
  timestamp?: number;
  nonce?: string;
}

const OAEP = { name: "RSA-OAEP" } as const;

/**
 * The private key in `path`, made by `generate` and created 0600 (in a 0700 folder) the first time, reused across
 * restarts. One that group or others can read is refused (ConfigError with the chmod), not quietly tightened:
 * it may have been copied already.
 */
function loadOrCreatePrivateKey(path: string, generate: () => KeyObject): KeyObject {
  if (!existsSync(path)) {
    ensurePrivateDir(dirname(path));
    createPrivateFile(path, generate().export({ type: "pkcs8", format: "pem" }) as string); // false: another process made it first
  }
  return createPrivateKey(readPrivateFile(path));
}

/** A public key as the JWKS publishes it: with its thumbprint as kid, for encryption with `alg` only. */
async function publishedJwk(publicKey: KeyObject, alg: string): Promise<JWK> {
  const jwk = await exportJWK(publicKey);
  return { ...jwk, kid: await calculateJwkThumbprint(jwk), use: "enc", alg };
}

/** The KeyServer's RSA-2048 key pair: made once, stored 0600, reused across restarts. */
export class RsaKeyPair {
  private constructor(
    readonly privateKey: KeyObject,
    readonly publicKey: KeyObject,
    /** Imported once, as jose takes it: a KeyObject or JWK would be turned into a CryptoKey again and again. */
    readonly webPrivateKey: CryptoKey,
    readonly jwk: JWK,
  ) {}

  static async loadOrCreate(path: string): Promise<RsaKeyPair> {
    const privateKey = loadOrCreatePrivateKey(path, () => generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey);
    const publicKey = createPublicKey(privateKey);
    // WebCrypto, not node:crypto's privateDecrypt: Bun's node:crypto once ignored the OAEP hash (oven-sh/bun#10247).
    // Bun and Deno run WebCrypto's RSA on their own thread pools, so both cores decrypt (#13).
    const webPrivateKey = await crypto.subtle.importKey(
      "pkcs8",
      privateKey.export({ type: "pkcs8", format: "der" }),
      { name: "RSA-OAEP", hash: "SHA-256" },
      false,
      ["decrypt"],
    );
    return new RsaKeyPair(privateKey, publicKey, webPrivateKey, await publishedJwk(publicKey, "RSA-OAEP-256"));
  }

  get publicPem(): string {
    return this.publicKey.export({ type: "spki", format: "pem" }).toString();
  }
}

/**
 * The KeyServer's X25519 key pair for ECDH-ES requests, the opt-in beside RSA-OAEP-256 (#13): made once, stored
 * 0600, reused across restarts. An agreement costs a small part of an RSA-2048 decryption.
 */
export class EcdhKeyPair {
  private constructor(
    readonly publicKey: KeyObject,
    /** Imported once, as jose takes it (see RsaKeyPair). */
    readonly webPrivateKey: CryptoKey,
    readonly jwk: JWK,
  ) {}

  static async loadOrCreate(path: string): Promise<EcdhKeyPair> {
    const privateKey = loadOrCreatePrivateKey(path, () => generateKeyPairSync("x25519").privateKey);
    if (privateKey.asymmetricKeyType !== "x25519") throw new ConfigError(`${path} does not hold an X25519 private key`);
    const publicKey = createPublicKey(privateKey);
    const webPrivateKey = await crypto.subtle.importKey("pkcs8", privateKey.export({ type: "pkcs8", format: "der" }), { name: "X25519" }, false, [
      "deriveBits",
    ]);
    return new EcdhKeyPair(publicKey, webPrivateKey, await publishedJwk(publicKey, "ECDH-ES"));
  }
}

function requireString(body: Record<string, unknown>, field: string, max = 256): string {
  const value = body[field];
  if (typeof value !== "string" || value.length === 0 || value.length > max)
    throw new BadRequest(`field '${field}' must be a non-empty string of at most ${max} characters`);
  return value;
}

function checkFields(body: unknown, allowed: string[]): Record<string, unknown> {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw new BadRequest("request must be a JSON object");
  const extra = Object.keys(body).filter((k) => !allowed.includes(k));
  if (extra.length > 0) throw new BadRequest(`unexpected field: ${JSON.stringify(extra[0]!.slice(0, 64))}`);
  return body as Record<string, unknown>;
}

function optionalReplayFields(body: Record<string, unknown>): Pick<TokenRequest, "timestamp" | "nonce"> {
  return { timestamp: body.timestamp as number | undefined, nonce: body.nonce as string | undefined };
}

// ---- Who is asking, on both sides ----------------------------------------------------------------------------

/**
 * The SecureProxy names, to the KeyServer, the identity it asks for (#11 H1): the KeyServer then checks that this
 * identity may use the token, as well as that the TLS caller may fetch tokens at all.
 */
export const ON_BEHALF_OF_HEADER = "x-securemesh-on-behalf-of";

const TOKEN_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/**
 * The policy resource of `proxy.use` for a token: CLIENTID/TOKENTYPE. Both parts come from a caller and are held to
 * plain names first: a "/" or "*" inside one could otherwise reach another row through a wildcard grant such as
 * `proxy.use:client1/*` (found by attack on #11), and a control character could bend the audit line.
 */
export function proxyResource(clientId: string, tokenType: string): string {
  if (!TOKEN_NAME.test(clientId) || !TOKEN_NAME.test(tokenType)) {
    throw new BadRequest("ClientId and TokenType may hold 1-64 letters, digits, '_', '.' and '-' only");
  }
  return `${clientId}/${tokenType}`;
}

// ---- KeyServer side ------------------------------------------------------------------------------------------

/** Original format: `{sessionKey: base64(RSA-OAEP-SHA256(32 bytes)), clientId, tokenType[, timestamp, nonce]}`. */
export async function openLegacyRequest(keys: RsaKeyPair, body: unknown): Promise<TokenRequest> {
  const fields = checkFields(body, ["sessionKey", "clientId", "tokenType", "timestamp", "nonce"]);
  const clientId = requireString(fields, "clientId", 128);
  const tokenType = requireString(fields, "tokenType", 64);
  const wrapped = requireString(fields, "sessionKey", 1024);
  let sessionKey: Uint8Array;
  try {
    sessionKey = new Uint8Array(await crypto.subtle.decrypt(OAEP, keys.webPrivateKey, Buffer.from(wrapped, "base64")));
  } catch {
    throw new DecryptFailed();
  }
  if (sessionKey.length !== 32) throw new DecryptFailed();
  return { clientId, tokenType, sessionKey, ...optionalReplayFields(fields) };
}

/** Original format's answer: base64(IV16 ‖ AES-256-CBC-PKCS7(token)), with a fresh random IV. */
export function sealLegacyResponse(token: string, sessionKey: Uint8Array): string {
  const iv = randomBytes(16);
  const cipher = createCipheriv("aes-256-cbc", sessionKey, iv);
  return Buffer.concat([iv, cipher.update(token, "utf8"), cipher.final()]).toString("base64");
}

/**
 * What a request may be: RSA-OAEP-256, or ECDH-ES where the KeyServer holds the opt-in key; A256GCM; never compressed
 * (jose would inflate "zip": "DEF" up to 250 kB, where a request is a few hundred bytes).
 */
const REQUEST_RSA: DecryptOptions = { keyManagementAlgorithms: ["RSA-OAEP-256"], contentEncryptionAlgorithms: ["A256GCM"], maxDecompressedLength: 0 };
const REQUEST_RSA_OR_ECDH: DecryptOptions = { ...REQUEST_RSA, keyManagementAlgorithms: ["RSA-OAEP-256", "ECDH-ES"] };

/**
 * JOSE format: a compact JWE (RSA-OAEP-256, A256GCM) of `{clientId, tokenType, sessionKey, timestamp, nonce}`; or,
 * when the KeyServer holds an X25519 key (`ecdh`), the same payload in a JWE with ECDH-ES (the opt-in).
 */
export async function openJoseRequest(keys: RsaKeyPair, jwe: string, ecdh?: EcdhKeyPair): Promise<TokenRequest> {
  let plaintext: Uint8Array;
  try {
    // jose holds "alg" to the list before it asks for the key: ECDH-ES reaches here only with the opt-in. Whatever
    // does not open, an ECDH-ES request to a KeyServer without the key too, is the one DecryptFailed.
    ({ plaintext } = ecdh
      ? await compactDecrypt(jwe.trim(), (header) => (header.alg === "ECDH-ES" ? ecdh.webPrivateKey : keys.webPrivateKey), REQUEST_RSA_OR_ECDH)
      : await compactDecrypt(jwe.trim(), keys.webPrivateKey, REQUEST_RSA));
  } catch {
    throw new DecryptFailed();
  }
  let body: unknown;
  try {
    body = JSON.parse(new TextDecoder().decode(plaintext));
  } catch {
    throw new BadRequest("JWE payload is not JSON");
  }
  const fields = checkFields(body, ["sessionKey", "clientId", "tokenType", "timestamp", "nonce"]);
  const sessionKey = Buffer.from(requireString(fields, "sessionKey", 64), "base64url");
  if (sessionKey.length !== 32) throw new DecryptFailed();
  return { clientId: requireString(fields, "clientId", 128), tokenType: requireString(fields, "tokenType", 64), sessionKey, ...optionalReplayFields(fields) };
}

/** JOSE answer: a compact JWE (`dir`, A256GCM) of the token under the session key. */
export function sealJoseResponse(token: string, sessionKey: Uint8Array): Promise<string> {
  return new CompactEncrypt(new TextEncoder().encode(token)).setProtectedHeader({ alg: "dir", enc: "A256GCM" }).encrypt(sessionKey);
}

// ---- SecureProxy side ----------------------------------------------------------------------------------------

export interface PreparedRequest {
  /** What to POST to the KeyServer, and with which content type. */
  body: string;
  contentType: "application/json" | "application/jose";
  sessionKey: Uint8Array;
}

function replayFields(): { timestamp: number; nonce: string } {
  return { timestamp: Math.floor(Date.now() / 1000), nonce: randomBytes(18).toString("base64url") };
}

/**
 * A JOSE request, `{clientId, tokenType, sessionKey, timestamp, nonce}` with a fresh session key, in a JWE with `alg`
 * to `publicKey`. jose turns a KeyObject into a CryptoKey once and keeps it, so a key held across requests (the
 * SecureProxy keeps it) is imported once.
 */
async function joseRequest(alg: "RSA-OAEP-256" | "ECDH-ES", publicKey: KeyObject, clientId: string, tokenType: string): Promise<PreparedRequest> {
  const sessionKey = new Uint8Array(randomBytes(32));
  const payload = JSON.stringify({ clientId, tokenType, sessionKey: Buffer.from(sessionKey).toString("base64url"), ...replayFields() });
  const body = await new CompactEncrypt(new TextEncoder().encode(payload)).setProtectedHeader({ alg, enc: "A256GCM" }).encrypt(publicKey);
  return { body, contentType: "application/jose", sessionKey };
}

export function prepareJoseRequest(publicKey: KeyObject, clientId: string, tokenType: string): Promise<PreparedRequest> {
  return joseRequest("RSA-OAEP-256", publicKey, clientId, tokenType);
}

/** The opt-in JOSE request: the same payload in a JWE with ECDH-ES to the KeyServer's X25519 `publicKey` (its JWKS). */
export function prepareEcdhRequest(publicKey: KeyObject, clientId: string, tokenType: string): Promise<PreparedRequest> {
  return joseRequest("ECDH-ES", publicKey, clientId, tokenType);
}

export async function prepareLegacyRequest(publicKey: KeyObject, clientId: string, tokenType: string): Promise<PreparedRequest> {
  const sessionKey = new Uint8Array(randomBytes(32));
  const webKey = await crypto.subtle.importKey("spki", publicKey.export({ type: "spki", format: "der" }), { name: "RSA-OAEP", hash: "SHA-256" }, false, [
    "encrypt",
  ]);
  const wrapped = Buffer.from(await crypto.subtle.encrypt(OAEP, webKey, sessionKey)).toString("base64");
  return { body: JSON.stringify({ sessionKey: wrapped, clientId, tokenType, ...replayFields() }), contentType: "application/json", sessionKey };
}

export async function openJoseResponse(jwe: string, sessionKey: Uint8Array): Promise<string> {
  try {
    const { plaintext } = await compactDecrypt(jwe, sessionKey, {
      keyManagementAlgorithms: ["dir"],
      contentEncryptionAlgorithms: ["A256GCM"],
      maxDecompressedLength: 0,
    });
    return new TextDecoder().decode(plaintext);
  } catch {
    throw new DecryptFailed();
  }
}

export function openLegacyResponse(token: string, sessionKey: Uint8Array): string {
  try {
    const raw = Buffer.from(token, "base64");
    const decipher = createDecipheriv("aes-256-cbc", sessionKey, raw.subarray(0, 16));
    return Buffer.concat([decipher.update(raw.subarray(16)), decipher.final()]).toString("utf8");
  } catch {
    throw new DecryptFailed();
  }
}
