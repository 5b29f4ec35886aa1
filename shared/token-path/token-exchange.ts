// The hybrid token exchange between SecureProxy and KeyServer: a fresh session key under the KeyServer's RSA key,
// the token back under that session key. Two wire formats: the original's (RSA-OAEP-SHA256 + AES-256-CBC) and JOSE.
import { createCipheriv, createDecipheriv, createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, type KeyObject } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { calculateJwkThumbprint, CompactEncrypt, compactDecrypt, exportJWK, type JWK } from "jose";
import { BadRequest, MeshError } from "../platform/errors.ts";

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
const JOSE_ALGS = { keyManagementAlgorithms: ["RSA-OAEP-256"], contentEncryptionAlgorithms: ["A256GCM"] };

/** The KeyServer's RSA-2048 key pair: made once, stored 0600, reused across restarts. */
export class RsaKeyPair {
  private constructor(
    readonly privateKey: KeyObject,
    readonly publicKey: KeyObject,
    readonly webPrivateKey: CryptoKey,
    readonly jwk: JWK,
  ) {}

  static async loadOrCreate(path: string): Promise<RsaKeyPair> {
    if (!existsSync(path)) {
      mkdirSync(dirname(path), { recursive: true });
      const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
      writeFileSync(path, privateKey.export({ type: "pkcs8", format: "pem" }), { mode: 0o600 });
    }
    chmodSync(path, 0o600);
    const privateKey = createPrivateKey(readFileSync(path, "utf8"));
    const publicKey = createPublicKey(privateKey);
    // WebCrypto, not node:crypto's privateDecrypt: Bun's node:crypto once ignored the OAEP hash (oven-sh/bun#10247).
    const webPrivateKey = await crypto.subtle.importKey("pkcs8", privateKey.export({ type: "pkcs8", format: "der" }), { name: "RSA-OAEP", hash: "SHA-256" }, false, ["decrypt"]);
    const jwk = await exportJWK(publicKey);
    const kid = await calculateJwkThumbprint(jwk);
    return new RsaKeyPair(privateKey, publicKey, webPrivateKey, { ...jwk, kid, use: "enc", alg: "RSA-OAEP-256" });
  }

  get publicPem(): string {
    return this.publicKey.export({ type: "spki", format: "pem" }).toString();
  }
}

function requireString(body: Record<string, unknown>, field: string, max = 256): string {
  const value = body[field];
  if (typeof value !== "string" || value.length === 0 || value.length > max) throw new BadRequest(`field '${field}' must be a non-empty string of at most ${max} characters`);
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

/** JOSE format: a compact JWE (RSA-OAEP-256, A256GCM) of `{clientId, tokenType, sessionKey, timestamp, nonce}`. */
export async function openJoseRequest(keys: RsaKeyPair, jwe: string): Promise<TokenRequest> {
  let plaintext: Uint8Array;
  try {
    ({ plaintext } = await compactDecrypt(jwe.trim(), keys.privateKey, JOSE_ALGS));
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

export async function prepareJoseRequest(publicKey: KeyObject, clientId: string, tokenType: string): Promise<PreparedRequest> {
  const sessionKey = new Uint8Array(randomBytes(32));
  const payload = JSON.stringify({ clientId, tokenType, sessionKey: Buffer.from(sessionKey).toString("base64url"), ...replayFields() });
  const body = await new CompactEncrypt(new TextEncoder().encode(payload)).setProtectedHeader({ alg: "RSA-OAEP-256", enc: "A256GCM" }).encrypt(publicKey);
  return { body, contentType: "application/jose", sessionKey };
}

export async function prepareLegacyRequest(publicKey: KeyObject, clientId: string, tokenType: string): Promise<PreparedRequest> {
  const sessionKey = new Uint8Array(randomBytes(32));
  const webKey = await crypto.subtle.importKey("spki", publicKey.export({ type: "spki", format: "der" }), { name: "RSA-OAEP", hash: "SHA-256" }, false, ["encrypt"]);
  const wrapped = Buffer.from(await crypto.subtle.encrypt(OAEP, webKey, sessionKey)).toString("base64");
  return { body: JSON.stringify({ sessionKey: wrapped, clientId, tokenType, ...replayFields() }), contentType: "application/json", sessionKey };
}

export async function openJoseResponse(jwe: string, sessionKey: Uint8Array): Promise<string> {
  try {
    const { plaintext } = await compactDecrypt(jwe, sessionKey, { keyManagementAlgorithms: ["dir"], contentEncryptionAlgorithms: ["A256GCM"] });
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
