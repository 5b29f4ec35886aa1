// An encrypted backup of a KeyServer keyring, safe to keep off the host: the keyring key, its store binding, the
// master key versions and the archived ones, under a key derived from a passphrase (scrypt, N=2^17, r=8, p=1) and
// sealed with AES-256-GCM, the file's header authenticated with it (issue 23). `token keyring export` writes one,
// `token keyring import` on another KeyServer host (or a replacement) reads it.
import { createCipheriv, createDecipheriv, createHmac, randomBytes, scryptSync, timingSafeEqual } from "node:crypto";
import { ConfigError } from "../platform/errors.ts";
import type { WrappedKey } from "./keyring.ts";
import type { StoreBinding } from "./keyring-file.ts";

export interface KeyringBackup {
  keyring: string;
  store: StoreBinding;
  key: Buffer;
  /** The versions the store held at export. */
  versions: WrappedKey[];
  /** The versions the host's archive held at export. */
  archived: WrappedKey[];
}

/** scrypt's cost: 128 MiB and about 0.4 s on Bun per derivation (OWASP's N=2^17, r=8, p=1). */
export const BACKUP_KDF = { N: 2 ** 17, r: 8, p: 1 } as const;
export const MIN_PASSPHRASE = 12;
const CHECK_TEXT = "securemesh keyring backup passphrase check";

interface Header {
  securemesh: "keyring-backup";
  format: 1;
  keyring: string;
  store: string;
  created: string;
  kdf: { name: "scrypt"; N: number; r: number; p: number; salt: string };
  /** HMAC of a fixed text under the second half of the derived key: a wrong passphrase is told from an altered file. */
  check: string;
  cipher: "aes-256-gcm";
  nonce: string;
}

function derive(passphrase: string, kdf: Header["kdf"]): { encryption: Buffer; check: Buffer } {
  const key = scryptSync(passphrase.normalize("NFC"), Buffer.from(kdf.salt, "base64"), 64, {
    N: kdf.N,
    r: kdf.r,
    p: kdf.p,
    maxmem: 128 * kdf.N * kdf.r * kdf.p + 32 * 1024 * 1024,
  });
  return { encryption: key.subarray(0, 32), check: createHmac("sha256", key.subarray(32)).update(CHECK_TEXT).digest() };
}

/** The header's fields in a fixed order: the AAD, so no field of it can be changed unnoticed. */
const aadOf = (h: Header) =>
  JSON.stringify([h.securemesh, h.format, h.keyring, h.store, h.created, h.kdf.name, h.kdf.N, h.kdf.r, h.kdf.p, h.kdf.salt, h.check, h.cipher, h.nonce]);

/** The backup file's text. */
export function sealBackup(backup: KeyringBackup, passphrase: string, kdfCost: { N: number; r: number; p: number } = BACKUP_KDF): string {
  if (passphrase.length < MIN_PASSPHRASE)
    throw new ConfigError(`the passphrase is shorter than ${MIN_PASSPHRASE} characters: a backup that may sit off the host needs a longer one`);
  const kdf = { name: "scrypt" as const, ...kdfCost, salt: randomBytes(16).toString("base64") };
  const { encryption, check } = derive(passphrase, kdf);
  const header: Header = {
    securemesh: "keyring-backup",
    format: 1,
    keyring: backup.keyring,
    store: `${backup.store.at} (store id ${backup.store.id})`,
    created: new Date().toISOString(),
    kdf,
    check: check.toString("base64"),
    cipher: "aes-256-gcm",
    nonce: randomBytes(12).toString("base64"),
  };
  const cipher = createCipheriv("aes-256-gcm", encryption, Buffer.from(header.nonce, "base64"));
  cipher.setAAD(Buffer.from(aadOf(header)));
  const body = JSON.stringify({
    keyring: backup.keyring,
    store: backup.store,
    key: backup.key.toString("base64"),
    versions: backup.versions,
    archived: backup.archived,
  });
  const ciphertext = Buffer.concat([cipher.update(body, "utf8"), cipher.final(), cipher.getAuthTag()]);
  return JSON.stringify({ ...header, ciphertext: ciphertext.toString("base64") }, null, 2) + "\n";
}

/** Refused: the file is not a backup of ours, or says it costs more than a backup of ours ever does. */
const notABackup = (where: string, why: string) => new ConfigError(`${where} is not a securemesh keyring backup (${why})`);

/**
 * Opens a backup: ConfigError, one line, for a file that is not one, a wrong passphrase, or a file altered after
 * export (GCM's tag over the body and the header).
 */
export function openBackup(text: string, passphrase: string, where: string): KeyringBackup {
  let file: Header & { ciphertext: string };
  try {
    file = JSON.parse(text) as typeof file;
  } catch {
    throw notABackup(where, "not JSON");
  }
  if (file?.securemesh !== "keyring-backup" || file.format !== 1 || file.cipher !== "aes-256-gcm" || file.kdf?.name !== "scrypt")
    throw notABackup(where, "unknown format");
  const { N, r, p } = file.kdf;
  // Bounds before any work: an altered header must not make scrypt take gigabytes.
  if (!Number.isInteger(Math.log2(N)) || N < 2 ** 14 || N > 2 ** 20 || r !== 8 || !(p >= 1 && p <= 4) || typeof file.kdf.salt !== "string")
    throw notABackup(where, "key derivation outside the bounds this version writes");
  const { encryption, check } = derive(passphrase, file.kdf);
  const stated = Buffer.from(String(file.check), "base64");
  if (stated.length !== check.length || !timingSafeEqual(stated, check)) throw new ConfigError(`the passphrase does not open ${where} (wrong passphrase)`);
  let body: string;
  try {
    const raw = Buffer.from(file.ciphertext, "base64");
    const decipher = createDecipheriv("aes-256-gcm", encryption, Buffer.from(file.nonce, "base64"));
    decipher.setAAD(Buffer.from(aadOf(file)));
    decipher.setAuthTag(raw.subarray(raw.length - 16));
    body = Buffer.concat([decipher.update(raw.subarray(0, raw.length - 16)), decipher.final()]).toString("utf8");
  } catch {
    throw new ConfigError(`${where} was altered after it was exported: it does not authenticate under its passphrase; use another copy of the backup`);
  }
  const parsed = JSON.parse(body) as Omit<KeyringBackup, "key"> & { key: string };
  return { ...parsed, key: Buffer.from(parsed.key, "base64") };
}
