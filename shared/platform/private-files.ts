// Secret files (private keys, the Fernet key, the KeyServer's keys) and the files roles create: a secret that
// group or others can read is refused, as OpenSSH refuses one, and whatever a role creates is 0600 in 0700 folders
// (finding L4).
import { randomBytes } from "node:crypto";
import { closeSync, fstatSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, unlinkSync, writeFileSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { ConfigError } from "./errors.ts";
import { displayPath } from "./paths.ts";

/** Why a secret file with this mode is refused, or undefined when only its owner can use it. */
export function openToOthers(path: string, mode: number): string | undefined {
  const bits = mode & 0o777;
  if ((bits & 0o077) === 0) return undefined;
  const what = bits & 0o044 ? "readable" : bits & 0o022 ? "writable" : "executable";
  const shown = displayPath(path);
  return `${shown} is ${what} by group or others (mode ${bits.toString(8).padStart(4, "0")}); run chmod 600 ${shown}`;
}

/**
 * Reads a secret file, refusing it (ConfigError, one line with the fix) when group or others can read it. The
 * mode is read from the open file, so it is the one that was read. Errors opening it are the caller's to word:
 * they are thrown as they come (ENOENT, EACCES).
 * @example const pem = readPrivateFile("certs/server_key.pem");
 */
export function readPrivateFile(path: string): string {
  const fd = openSync(path, "r");
  try {
    const refusal = openToOthers(path, fstatSync(fd).mode);
    if (refusal) throw new ConfigError(refusal);
    return readFileSync(fd, "utf8");
  } finally {
    closeSync(fd);
  }
}

/** Creates `dir` and any missing parents 0700; a folder that exists is left as it is. */
export function ensurePrivateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
}

/**
 * Creates `path` 0600 with `data`, in one step (never 0644 first, then chmod); false when it exists already,
 * e.g. made by another process a moment before, and is left as it is.
 */
export function createPrivateFile(path: string, data: string | Uint8Array = ""): boolean {
  try {
    writeFileSync(path, data, { mode: 0o600, flag: "wx" });
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "EEXIST") return false;
    throw error;
  }
}

/**
 * Replaces the file at `path` in one step: a new 0600 file beside it, synced, then renamed over it, so a reader sees
 * the old file or the new one, never half of one, and a crash leaves one of the two.
 */
export function writePrivateFileAtomically(path: string, text: string): void {
  const temporary = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`);
  const fd = openSync(temporary, "wx", 0o600);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } catch (error) {
    closeSync(fd);
    unlinkSync(temporary);
    throw error;
  }
  closeSync(fd);
  renameSync(temporary, path);
  // The rename itself is durable once the folder is synced; a folder cannot be opened for sync everywhere (Deno on some systems).
  try {
    const dir = openSync(dirname(path), "r");
    fsyncSync(dir);
    closeSync(dir);
  } catch {
    // best effort
  }
}
