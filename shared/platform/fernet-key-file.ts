// The Fernet key file's format (encryption_key.txt, and $FERNET_KEY): which key encrypts and which only decrypt.
//
//   # securemesh Fernet keys. The primary key encrypts; every key decrypts. ...
//   cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=   # primary, promoted 2026-05-01T10:05:00Z
//   Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg=   # decrypt-only, encrypted until 2026-05-01T10:05:00Z
//
// - `#` starts a comment to the end of the line; blank lines are skipped.
// - A line holds one key (url-safe base64 of 32 bytes), or several separated by commas or spaces ($FERNET_KEY="k1,k2").
// - A key whose comment begins with `decrypt-only` only decrypts. The primary is the first key not so marked.
// - Every other word of a comment is for people, except the dates rotation writes (`added`, `promoted`,
//   `encrypted until`, `restored`), which `fernet-keys.ts retire` reads to tell when dropping a key is safe.
//
// A file from before (one key per line, newest first, no comments) reads as it always did: the first key encrypts,
// every key decrypts. No error message quotes a key: each names the line.
import { createHash } from "node:crypto";
import { ConfigError } from "./errors.ts";

const BASE64URL = /^[A-Za-z0-9_-]*={0,2}$/;
const DECRYPT_ONLY = /^decrypt-only\b/i;
const ISO = "\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}:\\d{2}(?:\\.\\d+)?Z";

export type FernetKeyRole = "primary" | "decrypt-only";

export interface FernetKeyEntry {
  key: string;
  role: FernetKeyRole;
  /** When rotation added it (fernet-keys.ts add), if the file says. */
  added?: Date;
  /** When it became the primary (promote), if the file says. */
  promoted?: Date;
  /** When it stopped encrypting (promote of another key), if the file says: retire counts from here. */
  encryptedUntil?: Date;
  /** When `fernet-keys.ts restore` put it back from the archive, for stored records: retire takes it only by name. */
  restored?: Date;
}

/** The keys, the primary first, then every decrypt-only key in the file's order. */
export interface FernetKeyFile {
  primary: FernetKeyEntry;
  decryptOnly: FernetKeyEntry[];
}

/** True for url-safe base64 (padded or not) of exactly 32 bytes. */
export function isFernetKey(word: string): boolean {
  return BASE64URL.test(word) && Buffer.from(word, "base64url").length === 32 && word.replace(/=+$/, "").length === 43;
}

/**
 * A short name for a key that gives nothing of it away: 8 hex digits of a SHA-256 over the key's 32 bytes under
 * a label of its own. The same key padded or not has the same fingerprint. For logs, /health and the key file's CLI.
 * @example fernetKeyFingerprint(key) // "3f9a1c2d"
 */
export function fernetKeyFingerprint(key: string): string {
  return createHash("sha256").update("securemesh fernet key fingerprint\0").update(Buffer.from(key, "base64url")).digest("hex").slice(0, 8);
}

function dateAfter(comment: string, label: string): Date | undefined {
  const match = new RegExp(`\\b${label}\\s+(${ISO})`, "i").exec(comment);
  return match ? new Date(match[1]!) : undefined;
}

/**
 * Parses a key file's text; `where` names it in errors ("certs/encryption_key.txt", "$FERNET_KEY"). Throws a
 * ConfigError naming the line, never its text: a file with no key, a word that is not a key, or every key marked
 * decrypt-only (nothing would encrypt). A key listed twice counts once, where it first appears.
 */
export function parseFernetKeyFile(text: string, where: string): FernetKeyFile {
  const entries: FernetKeyEntry[] = [];
  const seen = new Set<string>();
  text.split(/\r?\n/).forEach((line, i) => {
    const hash = line.indexOf("#");
    const body = hash === -1 ? line : line.slice(0, hash);
    const comment = hash === -1 ? "" : line.slice(hash + 1).trim();
    const words = body.split(/[\s,]+/).filter(Boolean);
    for (const word of words) {
      if (!isFernetKey(word)) throw new ConfigError(`${where} line ${i + 1}: not a Fernet key (url-safe base64 of 32 bytes); fix or remove that line`);
      const canonical = word.replace(/=+$/, "") + "=";
      if (seen.has(canonical)) continue;
      seen.add(canonical);
      entries.push({
        key: word,
        role: DECRYPT_ONLY.test(comment) ? "decrypt-only" : "primary",
        added: dateAfter(comment, "added"),
        promoted: dateAfter(comment, "promoted"),
        encryptedUntil: dateAfter(comment, "encrypted until"),
        restored: dateAfter(comment, "restored"),
      });
    }
  });
  if (entries.length === 0) throw new ConfigError(`no Fernet key in ${where}: copy the key file from the CA host (docs/pki.md)`);
  const primary = entries.find((e) => e.role === "primary");
  if (!primary) throw new ConfigError(`${where}: every key is marked decrypt-only, so none would encrypt; promote one (fernet-keys.ts promote)`);
  // A key after the primary without a marker (a file from before: newest first) only decrypts, as it always did.
  return { primary, decryptOnly: entries.filter((e) => e !== primary).map((e) => ({ ...e, role: "decrypt-only" as const })) };
}

/** The keys in the order Fernet takes them: the primary (encrypts) first, then the keys that only decrypt. */
export function fernetKeysInOrder(file: FernetKeyFile): string[] {
  return [file.primary.key, ...file.decryptOnly.map((e) => e.key)];
}

/** One line on a key set, with fingerprints only: "2 keys, primary 3f9a1c2d, decrypt-only 8b7e4410". */
export function describeFernetKeys(keys: readonly string[]): string {
  const [primary, ...rest] = keys.map(fernetKeyFingerprint);
  return `${keys.length} key${keys.length === 1 ? "" : "s"}, primary ${primary}${rest.length ? `, decrypt-only ${rest.join(" ")}` : ""}`;
}

const HEADER = `# securemesh Fernet keys, one per line. The primary key encrypts; every key decrypts.
# A key marked "decrypt-only" never encrypts; the primary is the first key not so marked.
# Rotate with: fernet-keys.ts add, then promote, then retire (see docs/operations.md, "rotate the Fernet key").
`;

/** The file's text for these keys: the header, the primary, then each decrypt-only key, each with its dates. */
export function formatFernetKeyFile(file: FernetKeyFile): string {
  const iso = (d: Date) => d.toISOString().replace(/\.\d+Z$/, "Z");
  const line = (e: FernetKeyEntry) => {
    const notes = [
      e.role,
      e.added && `added ${iso(e.added)}`,
      e.promoted && `promoted ${iso(e.promoted)}`,
      e.encryptedUntil && `encrypted until ${iso(e.encryptedUntil)}`,
      e.restored && `restored ${iso(e.restored)}`,
    ].filter(Boolean);
    return `${e.key}  # ${notes.join(", ")}`;
  };
  return HEADER + [file.primary, ...file.decryptOnly].map(line).join("\n") + "\n";
}
