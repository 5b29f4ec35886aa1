// Fernet (spec version 0x80) on node:crypto: AES-128-CBC + HMAC-SHA256, with key rotation and an optional TTL.
import { createCipheriv, createDecipheriv, randomBytes, timingSafeEqual } from "node:crypto";
import { InvalidToken } from "../platform/errors.ts";
import { runtime } from "../platform/runtime/index.ts";

const VERSION = 0x80;
const HEADER = 1 + 8 + 16; // version ‖ timestamp ‖ IV
const MAC = 32;
/** The spec's allowance for a token stamped slightly in the future by a skewed clock. */
export const MAX_CLOCK_SKEW_S = 60;
const BASE64URL = /^[A-Za-z0-9_-]*={0,2}$/;

interface KeyPair {
  signing: Buffer;
  encryption: Buffer;
}

function parseKey(key: string): KeyPair {
  const raw = BASE64URL.test(key.trim()) ? Buffer.from(key.trim(), "base64url") : Buffer.alloc(0);
  if (raw.length !== 32) throw new TypeError("a Fernet key must be url-safe base64 of 32 bytes");
  return { signing: raw.subarray(0, 16), encryption: raw.subarray(16) };
}

/** A new random key, as url-safe base64 with padding (the format Python's cryptography uses). */
export function generateFernetKey(): string {
  return randomBytes(32).toString("base64url") + "=";
}

export interface EncryptOptions {
  /** Seconds since the epoch; defaults to now. */
  now?: number;
  /** Only for test vectors: a fixed IV. */
  iv?: Uint8Array;
}

export interface DecryptOptions {
  /** Maximum token age in seconds; without it, age is not checked. */
  ttl?: number;
  /** Seconds since the epoch; defaults to now. */
  now?: number;
}

/** HMAC-SHA256 from the runtime: Bun's own hasher on Bun (about 20% faster than createHmac there), createHmac on Deno. */
const hmac = runtime.hmacSha256;

/** A token's bytes when it has a Fernet token's shape (canonical padded base64url, version, whole blocks), else null. */
function parseToken(token: string): Buffer | null {
  // Canonical padded base64url only, as Python's urlsafe_b64decode requires.
  if (typeof token !== "string" || token.length % 4 !== 0 || !BASE64URL.test(token)) return null;
  const raw = Buffer.from(token, "base64url");
  if (raw.length < HEADER + 16 + MAC || raw[0] !== VERSION) return null;
  return (raw.length - HEADER - MAC) % 16 === 0 ? raw : null;
}

function parseKeys(keys: string | readonly string[]): KeyPair[] {
  const list = typeof keys === "string" ? [keys] : keys;
  if (list.length === 0) throw new TypeError("Fernet needs at least one key");
  return list.map(parseKey);
}

/**
 * Encrypts with the first key (the primary) and decrypts with any. The key set can be swapped while in use
 * (setKeys, as fernet-reload.ts does when the key file changes): one assignment, and every operation is
 * synchronous, so each runs wholly under the old set or wholly under the new one.
 *
 * @example
 * const f = new Fernet([newKey, oldKey]);
 * f.decryptText(f.encrypt("hello")); // "hello"
 */
export class Fernet {
  #keys: KeyPair[];

  constructor(keys: string | readonly string[]) {
    this.#keys = parseKeys(keys);
  }

  /** Puts a new key set in force, the primary first; a key that does not parse throws and leaves the old set. */
  setKeys(keys: string | readonly string[]): void {
    this.#keys = parseKeys(keys);
  }

  encrypt(message: string | Uint8Array, options: EncryptOptions = {}): string {
    const { signing, encryption } = this.#keys[0]!;
    const iv = options.iv ? Buffer.from(options.iv) : randomBytes(16);
    const cipher = createCipheriv("aes-128-cbc", encryption, iv);
    const ciphertext = Buffer.concat([cipher.update(message), cipher.final()]);
    const token = Buffer.allocUnsafe(HEADER + ciphertext.length + MAC);
    token[0] = VERSION;
    token.writeBigUInt64BE(BigInt(Math.floor(options.now ?? Date.now() / 1000)), 1);
    iv.copy(token, 9);
    ciphertext.copy(token, HEADER);
    const body = token.subarray(0, HEADER + ciphertext.length);
    hmac(signing, body).copy(token, body.length);
    return token.toString("base64url") + "=".repeat((3 - (token.length % 3)) % 3);
  }

  decrypt(token: string, options: DecryptOptions = {}): Buffer {
    return this.#open(token, options).plaintext;
  }

  /**
   * MultiFernet's rotate: the token's message under the primary key, with the token's own timestamp, so a TTL check
   * on the result says what it said of the original. Any key in force opens it, and its age is not checked (a record
   * stored a year ago rotates as well as one stored now). Throws InvalidToken when no key in force opens it.
   */
  rotate(token: string): string {
    const { plaintext, timestamp } = this.#open(token, {});
    return this.encrypt(plaintext, { now: timestamp });
  }

  /**
   * Which key in force signed the token, by its place in the set (0: the primary), or -1 when none did or it is not
   * a Fernet token. Checks the MAC only, so it costs one HMAC a key tried and never decrypts.
   */
  keyIndex(token: string): number {
    const raw = parseToken(token);
    if (!raw) return -1;
    const body = raw.subarray(0, raw.length - MAC);
    const mac = raw.subarray(raw.length - MAC);
    return this.#keys.findIndex((key) => timingSafeEqual(hmac(key.signing, body), mac));
  }

  #open(token: string, options: DecryptOptions): { plaintext: Buffer; timestamp: number } {
    const raw = parseToken(token);
    if (!raw) throw new InvalidToken();
    const timestamp = Number(raw.readBigUInt64BE(1));
    if (options.ttl !== undefined) {
      const now = options.now ?? Math.floor(Date.now() / 1000);
      if (timestamp + options.ttl < now || timestamp > now + MAX_CLOCK_SKEW_S) throw new InvalidToken();
    }

    const body = raw.subarray(0, raw.length - MAC);
    const mac = raw.subarray(raw.length - MAC);
    for (const key of this.#keys) {
      const expected = hmac(key.signing, body);
      if (!timingSafeEqual(expected, mac)) continue;
      try {
        const decipher = createDecipheriv("aes-128-cbc", key.encryption, raw.subarray(9, HEADER));
        return { plaintext: Buffer.concat([decipher.update(raw.subarray(HEADER, raw.length - MAC)), decipher.final()]), timestamp };
      } catch {
        throw new InvalidToken();
      }
    }
    throw new InvalidToken();
  }

  /** As decrypt, for text: a plaintext that is not UTF-8 is one more InvalidToken, not a different error. */
  decryptText(token: string, options?: DecryptOptions): string {
    const bytes = this.decrypt(token, options);
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      throw new InvalidToken();
    }
  }
}
