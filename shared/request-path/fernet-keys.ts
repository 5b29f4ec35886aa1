// Rotating the Fernet key in three steps, each safe by itself, and the command pki.sh runs for each:
//
//   bun shared/request-path/fernet-keys.ts add|promote|retire|status|restore FP [--file PATH | --pki DIR] [--ttl S] [--key FP] [--force]
//
// 1. add      a new key goes in decrypt-only: once every host has it, every host can read what it will encrypt.
// 2. promote  the new key becomes the primary (encrypts); the old one stays, decrypt-only, marked with when it
//             stopped encrypting.
// 3. retire   keys that stopped encrypting more than the token TTL plus the clock skew ago are dropped: no token
//             made with them can still be accepted. Never the primary, so never the only key. Each dropped key is
//             first written to the archive beside the key file (fernet-archive/FP.txt, 0600 in a 0700 folder).
//    restore  puts an archived key back in the file, decrypt-only, for stored records that still need it.
//
// Stored records are another matter: each server stores tokens as clients sent them, and from the promote on moves
// the records under old keys to the primary (fernet-rewrap.ts). This command runs on the CA host and cannot see the
// database, so it cannot know whether that is done. A server keeps a retired key, for stored records only, until none
// is under it, in memory and in its --state-dir (a restart takes it up again), and says so (its log, and /health's
// fernet_rewrap). A server that never held the key, or lost its state folder, reads only the file, and reports the
// records under no key it holds (/health fernet_rewrap "unreadable"). Those records are not lost: the key is in the
// archive, and `restore` puts it back, after which the server reads them and moves them to the primary (issue 23: no
// command can lose data).
//
// Each step rewrites the file atomically (a 0600 temporary file renamed over it), so a host polling it reads the
// old file or the new one, never half of one. The format is fernet-key-file.ts's; no output ever holds a key.
import { closeSync, fstatSync, mkdirSync, openSync, readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { displayPath, FERNET_KEY_FILE, parsePositive, pkiDir } from "../platform/config.ts";
import { ConfigError, KeyRotationRefused } from "../platform/errors.ts";
import { fernetKeyFingerprint, formatFernetKeyFile, parseFernetKeyFile, type FernetKeyEntry, type FernetKeyFile } from "../platform/fernet-key-file.ts";
import { openToOthers, readPrivateFile, writePrivateFileAtomically } from "../platform/private-files.ts";
import { RELOAD_INTERVAL_MS } from "../platform/watch.ts";
import { generateFernetKey, MAX_CLOCK_SKEW_S } from "./fernet.ts";

/** The servers' --ttl default: the oldest token they accept, in seconds. */
export const DEFAULT_TOKEN_TTL_S = 300;

/**
 * The least time between add and promote. A host that has the file loads it within RELOAD_INTERVAL_MS; a promote
 * sooner than a few polls after the add, on a file the hosts share, would let one host encrypt with a key another
 * has not loaded yet. Across hosts with their own copies, wait for each one's reload line instead (the runbook).
 */
export const PROMOTE_AFTER_ADD_MS = 5 * RELOAD_INTERVAL_MS;

/** When a key that stopped encrypting at `encryptedUntil` can go: no token made with it is accepted after this. */
export function retireSafeAt(encryptedUntil: Date, ttlSeconds: number): Date {
  return new Date(encryptedUntil.getTime() + (ttlSeconds + MAX_CLOCK_SKEW_S) * 1000);
}

/** A key added and not yet promoted: the one promote takes. */
function isPending(entry: FernetKeyEntry): boolean {
  return entry.role === "decrypt-only" && entry.added !== undefined && entry.encryptedUntil === undefined;
}

function byFingerprint(file: FernetKeyFile, fingerprint: string): FernetKeyEntry {
  const found = [file.primary, ...file.decryptOnly].find((e) => fernetKeyFingerprint(e.key) === fingerprint.toLowerCase());
  if (!found) throw new KeyRotationRefused(`no key with fingerprint ${fingerprint} in the file (see: status)`);
  return found;
}

const fp = (e: FernetKeyEntry) => fernetKeyFingerprint(e.key);
const iso = (d: Date) => d.toISOString().replace(/\.\d+Z$/, "Z");

/**
 * Step 1: `key` (default a new random one) goes in decrypt-only, right after the primary. Refused while another
 * added key waits to be promoted: one rotation at a time.
 */
export function addKey(file: FernetKeyFile, now: Date, key = generateFernetKey()): { file: FernetKeyFile; added: FernetKeyEntry } {
  const waiting = file.decryptOnly.find(isPending);
  if (waiting)
    throw new KeyRotationRefused(
      `key ${fp(waiting)} was added ${iso(waiting.added!)} and is not promoted yet: promote it, or retire --key ${fp(waiting)}, first`,
    );
  const added: FernetKeyEntry = { key, role: "decrypt-only", added: now };
  if ([file.primary, ...file.decryptOnly].some((e) => fp(e) === fp(added))) throw new KeyRotationRefused(`key ${fp(added)} is in the file already`);
  return { file: { primary: file.primary, decryptOnly: [added, ...file.decryptOnly] }, added };
}

/**
 * Step 2: the added key (or the decrypt-only key `fingerprint` names) becomes the primary; the primary before it
 * stays decrypt-only, marked "encrypted until now". Refused sooner than PROMOTE_AFTER_ADD_MS after the add unless
 * `force`.
 */
export function promoteKey(
  file: FernetKeyFile,
  now: Date,
  options: { fingerprint?: string; force?: boolean } = {},
): { file: FernetKeyFile; promoted: FernetKeyEntry; demoted: FernetKeyEntry } {
  const chosen = options.fingerprint ? byFingerprint(file, options.fingerprint) : file.decryptOnly.find(isPending);
  if (!chosen) throw new KeyRotationRefused("no added key to promote: run add first (or name a decrypt-only key with --key)");
  if (chosen === file.primary) throw new KeyRotationRefused(`key ${fp(chosen)} is the primary already`);
  if (chosen.added && !options.force && now.getTime() - chosen.added.getTime() < PROMOTE_AFTER_ADD_MS) {
    throw new KeyRotationRefused(
      `key ${fp(chosen)} was added ${((now.getTime() - chosen.added.getTime()) / 1000).toFixed(1)} s ago: promote it once every host has ` +
        `loaded it (each logs "Fernet keys reloaded: … (added ${fp(chosen)})"), and no sooner than ${PROMOTE_AFTER_ADD_MS / 1000} s after the add`,
    );
  }
  const promoted: FernetKeyEntry = { ...chosen, role: "primary", promoted: now, encryptedUntil: undefined };
  const demoted: FernetKeyEntry = { ...file.primary, role: "decrypt-only", encryptedUntil: now };
  return { file: { primary: promoted, decryptOnly: [demoted, ...file.decryptOnly.filter((e) => e !== chosen)] }, promoted, demoted };
}

export interface RetireResult {
  file: FernetKeyFile;
  retired: FernetKeyEntry[];
  /** Decrypt-only keys kept, and why: "may be in tokens until …", "added, not promoted yet", "no date: name it with --key". */
  kept: { entry: FernetKeyEntry; why: string }[];
}

/**
 * Step 3: drops decrypt-only keys no token can need any more: those that stopped encrypting at least
 * ttl + MAX_CLOCK_SKEW_S ago (retireSafeAt). With `fingerprints`, exactly those keys, each still held to that rule
 * unless `force`; a key with no date (from a hand-made file) goes only when named. The primary is never dropped.
 */
export function retireKeys(file: FernetKeyFile, now: Date, options: { ttlSeconds: number; fingerprints?: readonly string[]; force?: boolean }): RetireResult {
  const named = options.fingerprints?.map((f) => byFingerprint(file, f));
  if (named?.includes(file.primary)) {
    throw new KeyRotationRefused(
      `key ${fp(file.primary)} is the primary: promote another key first (the primary is never retired, so the file always has a key to encrypt with)`,
    );
  }
  const retired: FernetKeyEntry[] = [];
  const kept: RetireResult["kept"] = [];
  for (const entry of file.decryptOnly) {
    const asked = named?.includes(entry) ?? false;
    let why: string | null = null;
    if (entry.restored && !asked) {
      why = `restored ${iso(entry.restored)} for stored records: retire it by name (--key ${fp(entry)}) once every server's /health "fernet_rewrap" shows pending 0 and unreadable 0`;
    } else if (entry.encryptedUntil) {
      const safeAt = retireSafeAt(entry.encryptedUntil, options.ttlSeconds);
      if (safeAt > now && !(asked && options.force)) {
        why = `stopped encrypting ${iso(entry.encryptedUntil)}; a token made with it may be accepted until ${iso(safeAt)} (TTL ${options.ttlSeconds} s + ${MAX_CLOCK_SKEW_S} s clock skew)`;
      }
    } else if (!asked) {
      why = isPending(entry)
        ? "added, not promoted yet"
        : `no record of when it stopped encrypting: retire it by name (--key ${fp(entry)}) once no host has encrypted with it for the TTL`;
    }
    if (named && !asked) why ??= "not named";
    if (why) kept.push({ entry, why });
    else retired.push(entry);
  }
  const refusedNamed = kept.filter((k) => named?.includes(k.entry));
  if (refusedNamed.length > 0) {
    throw new KeyRotationRefused(`${refusedNamed.map((k) => `key ${fp(k.entry)}: ${k.why}`).join("; ")}; retire then, or --force`);
  }
  return { file: { primary: file.primary, decryptOnly: file.decryptOnly.filter((e) => !retired.includes(e)) }, retired, kept };
}

/** Reads a key file for rotation: 0600, parsed (ConfigError naming the line on anything else). */
export function readKeyFile(path: string): FernetKeyFile {
  let text: string;
  try {
    text = readPrivateFile(path);
  } catch (error) {
    if (error instanceof ConfigError) throw error;
    throw new ConfigError(`cannot read ${displayPath(path)}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
  return parseFernetKeyFile(text, displayPath(path));
}

/** Replaces the file at `path` in one step: a new 0600 file beside it, synced, then renamed over it. */
export function writeKeyFile(path: string, file: FernetKeyFile): void {
  writePrivateFileAtomically(path, formatFernetKeyFile(file));
}

/** The archive's folder, beside the key file: on the CA host, never in a bundle (pki.sh bundle copies named files only). */
export const FERNET_ARCHIVE_DIR = "fernet-archive";

/** Where retire archives the keys of the key file at `keyFilePath`. */
export function archiveDirOf(keyFilePath: string): string {
  return join(dirname(keyFilePath), FERNET_ARCHIVE_DIR);
}

/** The archive folder, made 0700 if missing; one that group or others can open is refused (nothing is written). */
function openArchive(dir: string): string {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const fd = openSync(dir, "r");
  try {
    const refusal = openToOthers(dir, fstatSync(fd).mode);
    if (refusal) throw new ConfigError(refusal.replace(/chmod 600/, "chmod 700"));
  } finally {
    closeSync(fd);
  }
  return dir;
}

const archivePath = (dir: string, fingerprint: string) => join(dir, `${fingerprint}.txt`);

/**
 * Writes each key to the archive, one 0600 file per key named by its fingerprint, synced before the caller drops it
 * from the key file: a crash between the two leaves the key in both, never in neither. Returns the files written.
 */
export function archiveKeys(dir: string, entries: readonly FernetKeyEntry[], now: Date, from: string): string[] {
  openArchive(dir);
  return entries.map((entry) => {
    const path = archivePath(dir, fp(entry));
    const dates = [entry.encryptedUntil && `encrypted until ${iso(entry.encryptedUntil)}`, `retired ${iso(now)}`].filter(Boolean).join(", ");
    writePrivateFileAtomically(
      path,
      `# securemesh Fernet key ${fp(entry)}, retired from ${from}. Put it back with: ./pki.sh fernet restore ${fp(entry)}\n` +
        `${entry.key}  # archived, ${dates}\n`,
    );
    return path;
  });
}

/** The fingerprints in the archive, sorted. */
export function archivedFingerprints(dir: string): string[] {
  try {
    return readdirSync(dir)
      .filter((name) => /^[0-9a-f]{8}\.txt$/.test(name))
      .map((name) => name.slice(0, 8))
      .sort();
  } catch {
    return [];
  }
}

/**
 * Restore: the archived key `fingerprint` goes back in the file decrypt-only, marked restored (retire then takes it
 * only by name), with when it stopped encrypting, so servers read the records under it and move them to the primary.
 */
export function restoreKey(file: FernetKeyFile, dir: string, fingerprint: string, now: Date): { file: FernetKeyFile; restored: FernetKeyEntry } {
  const wanted = fingerprint.toLowerCase();
  if ([file.primary, ...file.decryptOnly].some((e) => fp(e) === wanted)) throw new KeyRotationRefused(`key ${wanted} is in the file already (see: status)`);
  if (!/^[0-9a-f]{8}$/.test(wanted) || !archivedFingerprints(dir).includes(wanted)) {
    const there = archivedFingerprints(dir);
    throw new KeyRotationRefused(`no key ${fingerprint} in the archive ${displayPath(dir)} (${there.length ? `archived: ${there.join(" ")}` : "it is empty"})`);
  }
  const archived = readKeyFile(archivePath(openArchive(dir), wanted)).primary;
  if (fp(archived) !== wanted)
    throw new ConfigError(`${displayPath(archivePath(dir, wanted))} holds key ${fp(archived)}, not ${wanted}: the archive was edited by hand`);
  const restored: FernetKeyEntry = { key: archived.key, role: "decrypt-only", encryptedUntil: archived.encryptedUntil, restored: now };
  return { file: { primary: file.primary, decryptOnly: [...file.decryptOnly, restored] }, restored };
}

/** Where to see what the servers still hold for stored records: this command cannot see the database. */
export function recordsAdvice(primary: string, old: readonly string[]): string {
  return (
    `stored records: from the promote on, each server moves records under ${old.join(" ")} to the primary ${primary} by itself, ` +
    `and keeps a retired key (in memory and in its --state-dir, for stored records only) until none is under it; this host cannot see the database, ` +
    `so look at each server: /health "fernet_rewrap" (pending: records left, kept: retired keys it still holds), ` +
    `and its log ("Fernet re-encryption: moved …", "Fernet key … dropped: no stored record uses it any more")`
  );
}

/**
 * One line per key: fingerprint, role, dates, and for a key that stopped encrypting, when it can be retired; then,
 * with decrypt-only keys, where to see what servers still hold for stored records.
 */
export function describeKeyFile(file: FernetKeyFile, now: Date, ttlSeconds: number): string[] {
  const demoted = file.decryptOnly.filter((e) => !isPending(e)).map(fp);
  return [...describeKeys(file, now, ttlSeconds), ...(demoted.length ? [recordsAdvice(fp(file.primary), demoted)] : [])];
}

function describeKeys(file: FernetKeyFile, now: Date, ttlSeconds: number): string[] {
  return [file.primary, ...file.decryptOnly].map((e) => {
    const notes = [
      e.added && `added ${iso(e.added)}`,
      e.promoted && `promoted ${iso(e.promoted)}`,
      e.encryptedUntil && `encrypted until ${iso(e.encryptedUntil)}`,
      e.restored && `restored ${iso(e.restored)} (retire it by name once no server reports records under it)`,
      e.encryptedUntil &&
        !e.restored &&
        (retireSafeAt(e.encryptedUntil, ttlSeconds) <= now ? "retire: safe now" : `retire: safe from ${iso(retireSafeAt(e.encryptedUntil, ttlSeconds))}`),
      isPending(e) && "promote: once every host has loaded it",
    ].filter(Boolean);
    return notes.length ? `${fp(e)}  ${e.role.padEnd(12)}  ${notes.join(", ")}` : `${fp(e)}  ${e.role}`;
  });
}

const USAGE = `
Usage: fernet-keys.ts add|promote|retire|status|restore FP [options]

Rotates the Fernet key file in three steps; servers and clients reload it within a second of a change.
  add      a new key, decrypt-only, right after the primary
  promote  the added key (or --key FP) encrypts from now on; the old primary stays decrypt-only
  retire   drops the decrypt-only keys that stopped encrypting at least TTL + ${MAX_CLOCK_SKEW_S} s ago (or --key FP),
           after writing each to the archive: ${FERNET_ARCHIVE_DIR}/FP.txt beside the file (0600, folder 0700)
  restore FP  puts the archived key FP back in the file, decrypt-only, for stored records still under it
  status   lists the keys by fingerprint, and when each step is safe

Between steps, put the file on every host (servers and clients) and wait until each has logged
"Fernet keys reloaded: ...". Keys are never printed, only their fingerprints.

Stored records: from the promote on, servers re-encrypt records under old keys to the primary by
themselves, and a server keeps a retired key (for stored records only, in memory and in its
--state-dir, so across a restart) until none is under it. This command cannot see the database: each server's /health "fernet_rewrap" says how
many records are left (pending) and which retired keys it still keeps (kept). A server started after
the retire reads only the file: /health "fernet_rewrap" unreadable counts the records under no key
it holds; restore their key (the archive keeps every retired one) and they read again, and move.

Options:
  --file PATH   the key file (default: encryption_key.txt in --pki)
  --pki DIR     PKI folder from pki.sh (default $PKI_DIR, else certs/)
  --ttl S       the servers' --ttl: the oldest token they accept (default $FERNET_TTL, else ${DEFAULT_TOKEN_TTL_S})
  --key FP      the key to promote or retire, by fingerprint (repeat for retire)
  --force       promote sooner than ${PROMOTE_AFTER_ADD_MS / 1000} s after add, or retire a named key before it is safe
  -h, --help    show this help
`;

/** Runs one command; returns its exit code: 0 done, 1 refused (the file is left as it was), 2 bad usage or file. */
export function main(argv: string[], out: (line: string) => void = console.log, err: (line: string) => void = console.error, now = new Date()): number {
  let command: string | undefined;
  let path: string;
  let ttlSeconds: number;
  let values: { key?: string[]; force?: boolean };
  try {
    const parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        file: { type: "string" },
        pki: { type: "string" },
        ttl: { type: "string" },
        key: { type: "string", multiple: true },
        force: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    });
    if (parsed.values.help) {
      out(USAGE.trim());
      return 0;
    }
    [command] = parsed.positionals;
    if (command === "restore") {
      const named = [...parsed.positionals.slice(1), ...(parsed.values.key ?? [])];
      if (named.length !== 1) throw new ConfigError("restore takes one key's fingerprint: restore FP (see status, or the archive's file names)");
      parsed.values.key = named;
    } else if (!["add", "promote", "retire", "status"].includes(command ?? "") || parsed.positionals.length !== 1) {
      throw new ConfigError("say one of add, promote, retire, status, restore FP (see --help)");
    }
    path = resolve(parsed.values.file ?? join(pkiDir(parsed.values.pki), FERNET_KEY_FILE));
    ttlSeconds = parsePositive(parsed.values.ttl ?? process.env.FERNET_TTL, "--ttl", DEFAULT_TOKEN_TTL_S);
    values = parsed.values;
  } catch (error) {
    err(`fernet-keys: ${(error as Error).message}`);
    return 2;
  }
  const shown = displayPath(path);
  try {
    const file = readKeyFile(path);
    switch (command) {
      case "add": {
        const { file: next, added } = addKey(file, now);
        writeKeyFile(path, next);
        out(`added key ${fp(added)} to ${shown}, decrypt-only; the primary is still ${fp(next.primary)}`);
        out(`next: put ${shown} on every host; once each has logged "Fernet keys reloaded: … (added ${fp(added)})", run promote`);
        return 0;
      }
      case "promote": {
        const { file: next, promoted, demoted } = promoteKey(file, now, { fingerprint: values.key?.[0], force: values.force });
        writeKeyFile(path, next);
        out(`promoted key ${fp(promoted)} to primary in ${shown}; ${fp(demoted)} is decrypt-only from ${iso(now)}`);
        out(
          `next: put ${shown} on every host; retire ${fp(demoted)} once every host has logged "Fernet keys reloaded: … (primary was ${fp(demoted)})" ` +
            `and ${ttlSeconds + MAX_CLOCK_SKEW_S} s more have passed (TTL ${ttlSeconds} s + ${MAX_CLOCK_SKEW_S} s clock skew): not before ${iso(retireSafeAt(now, ttlSeconds))}`,
        );
        out(
          `meanwhile each server re-encrypts its stored records under ${fp(demoted)} to ${fp(promoted)}: /health "fernet_rewrap" pending says how many are left`,
        );
        return 0;
      }
      case "retire": {
        const { file: next, retired, kept } = retireKeys(file, now, { ttlSeconds, fingerprints: values.key, force: values.force });
        for (const { entry, why } of kept) out(`kept key ${fp(entry)}: ${why}`);
        if (retired.length === 0) {
          const waiting = (k: RetireResult["kept"][number]) => k.entry.encryptedUntil && !k.entry.restored;
          if (kept.some(waiting)) {
            err(
              `fernet-keys: nothing retired yet: ${kept
                .filter(waiting)
                .map((k) => `${fp(k.entry)} ${k.why}`)
                .join("; ")}`,
            );
            return 1;
          }
          out(
            `nothing to retire in ${shown}: the primary ${fp(file.primary)}${file.decryptOnly.length ? ` and ${file.decryptOnly.length} decrypt-only key(s) still needed` : " is the only key"}`,
          );
          return 0;
        }
        // The archive first: a crash before the key file is rewritten leaves the key in both, never in neither.
        const archive = archiveDirOf(path);
        archiveKeys(archive, retired, now, shown);
        writeKeyFile(path, next);
        out(
          `retired key${retired.length === 1 ? "" : "s"} ${retired.map(fp).join(" ")} from ${shown}; ${1 + next.decryptOnly.length} key(s) left, primary ${fp(next.primary)}`,
        );
        const gone = retired.map(fp).join(" ");
        out(`archived to ${displayPath(archive)}/ (0600 files, on this host only): ./pki.sh fernet restore FP puts a key back`);
        out(
          `next: put ${shown} on every host. A server whose stored records are still under ${gone} keeps ${retired.length === 1 ? "that key" : "those keys"} ` +
            `in memory and in its --state-dir, for those records only (never for a new request), until it has re-encrypted them to ${fp(next.primary)}; this host cannot see the database, ` +
            `so watch each server: /health "fernet_rewrap" shows kept [${retired.map((e) => `"${fp(e)}"`).join(", ")}] and pending N until done, then kept [] and pending 0; ` +
            `its log says "Fernet key … dropped: no stored record uses it any more" then, or "Fernet keys reloaded: … (dropped …)" at once when no record used it`,
        );
        out(
          `a server that never held ${retired.length === 1 ? "it" : "them"}, or lost its --state-dir, reads only the file: its /health "fernet_rewrap" shows unreadable N, records under a key it does not hold; ` +
            `they are not lost: ./pki.sh fernet restore ${retired.length === 1 ? gone : "FP"} puts the key back, decrypt-only, and the server reads them and moves them to ${fp(next.primary)}`,
        );
        return 0;
      }
      case "restore": {
        const archive = archiveDirOf(path);
        const { file: next, restored } = restoreKey(file, archive, values.key![0]!, now);
        writeKeyFile(path, next);
        out(
          `restored key ${fp(restored)} from ${displayPath(archive)}/ to ${shown}, decrypt-only, for stored records; the primary is still ${fp(next.primary)}`,
        );
        out(
          `next: put ${shown} on every server; each reads the records under ${fp(restored)} again and moves them to ${fp(next.primary)} ` +
            `(/health "fernet_rewrap" unreadable 0, pending 0 when done); then retire it by name: retire --key ${fp(restored)}`,
        );
        return 0;
      }
      default:
        for (const line of describeKeyFile(file, now, ttlSeconds)) out(line);
        return 0;
    }
  } catch (error) {
    err(`fernet-keys: ${(error as Error).message}`);
    return error instanceof KeyRotationRefused ? 1 : 2;
  }
}

if (import.meta.main) process.exit(main(process.argv.slice(2)));
