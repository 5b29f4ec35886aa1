// The three rotation steps on the key file, and their command: each step safe by itself, refusals that say when it
// will be safe, the file replaced whole and private, and no key in any output.
import { afterAll, describe, expect, test } from "bun:test";
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fernetKeyFingerprint, fernetKeysInOrder, parseFernetKeyFile } from "../platform/fernet-key-file.ts";
import { Fernet, generateFernetKey } from "./fernet.ts";
import { addKey, main, promoteKey, PROMOTE_AFTER_ADD_MS, retireKeys, retireSafeAt } from "./fernet-keys.ts";

const temporary: string[] = [];
afterAll(() => temporary.forEach((dir) => rmSync(dir, { recursive: true, force: true })));

/** A key file as pki.sh writes it (one bare key), 0600, in a folder of its own. */
function keyFile(text = generateFernetKey() + "\n"): string {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-fernet-keys-"));
  temporary.push(dir);
  const path = join(dir, "encryption_key.txt");
  writeFileSync(path, text, { mode: 0o600 });
  return path;
}

const at = (iso: string) => new Date(iso);
const T0 = at("2026-05-01T10:00:00Z");
const later = (seconds: number, from = T0) => new Date(from.getTime() + seconds * 1000);

/** Runs the command as pki.sh would, at `now`: its exit code and what it printed. */
function run(path: string, now: Date, ...args: string[]) {
  const out: string[] = [];
  const err: string[] = [];
  const code = main(
    [...args, "--file", path],
    (l) => out.push(l),
    (l) => err.push(l),
    now,
  );
  return { code, out, err };
}

const keysOf = (path: string) => fernetKeysInOrder(parseFernetKeyFile(readFileSync(path, "utf8"), path));

describe("the three steps", () => {
  const old = generateFernetKey();
  const start = parseFernetKeyFile(old, "f");

  test("add: the new key decrypts everywhere before it encrypts anywhere", () => {
    const { file, added } = addKey(start, T0);
    expect(fernetKeysInOrder(file)).toEqual([old, added.key]);
    // What a host with the new file makes, a host with the old one still reads: the primary did not change.
    expect(new Fernet(old).decryptText(new Fernet(fernetKeysInOrder(file)).encrypt("x"))).toBe("x");
    expect(() => addKey(file, later(60))).toThrow(`key ${fernetKeyFingerprint(added.key)} was added 2026-05-01T10:00:00Z and is not promoted yet`);
  });

  test("promote: the added key encrypts, the old primary stays decrypt-only with when it stopped", () => {
    const {
      file: added,
      added: { key },
    } = addKey(start, T0);
    expect(() => promoteKey(added, later(1))).toThrow("was added 1.0 s ago");
    const { file } = promoteKey(added, later(PROMOTE_AFTER_ADD_MS / 1000));
    expect(fernetKeysInOrder(file)).toEqual([key, old]);
    expect(file.decryptOnly[0]!.encryptedUntil).toEqual(later(PROMOTE_AFTER_ADD_MS / 1000));
    // A host that has the promoted file and one that has only the added one read each other's tokens.
    const [promotedHost, addedHost] = [new Fernet(fernetKeysInOrder(file)), new Fernet(fernetKeysInOrder(added))];
    expect(addedHost.decryptText(promotedHost.encrypt("new"))).toBe("new");
    expect(promotedHost.decryptText(addedHost.encrypt("old"))).toBe("old");
    expect(() => promoteKey(file, later(60))).toThrow("no added key to promote");
  });

  test("retire: only after TTL + 60 s clock skew from the promote; never the primary", () => {
    const promotedAt = later(10);
    const { file } = promoteKey(addKey(start, T0).file, promotedAt);
    expect(retireSafeAt(promotedAt, 300)).toEqual(later(360, promotedAt));
    const early = retireKeys(file, later(359, promotedAt), { ttlSeconds: 300 });
    expect({ retired: early.retired.length, why: early.kept[0]!.why }).toEqual({
      retired: 0,
      why: "stopped encrypting 2026-05-01T10:00:10Z; a token made with it may be accepted until 2026-05-01T10:06:10Z (TTL 300 s + 60 s clock skew)",
    });
    const done = retireKeys(file, later(360, promotedAt), { ttlSeconds: 300 });
    expect({ retired: done.retired.map((e) => e.key), left: fernetKeysInOrder(done.file) }).toEqual({ retired: [old], left: [file.primary.key] });
    expect(() => retireKeys(done.file, later(999), { ttlSeconds: 300, fingerprints: [fernetKeyFingerprint(file.primary.key)] })).toThrow("is the primary");
  });

  test("retire keeps a key waiting to be promoted, and one with no date unless it is named", () => {
    const handMade = parseFernetKeyFile(`${old}\n${generateFernetKey()}\n`, "f"); // newest first, from before
    const withPending = addKey(handMade, T0).file;
    const { retired, kept } = retireKeys(withPending, later(9999), { ttlSeconds: 300 });
    expect({ retired, kept: kept.map((k) => k.why.split(":")[0]) }).toEqual({
      retired: [],
      kept: ["added, not promoted yet", "no record of when it stopped encrypting"],
    });
    const undated = fernetKeyFingerprint(handMade.decryptOnly[0]!.key);
    expect(retireKeys(withPending, later(9999), { ttlSeconds: 300, fingerprints: [undated] }).retired.map((e) => fernetKeyFingerprint(e.key))).toEqual([
      undated,
    ]);
  });
});

describe("fernet-keys.ts, the command", () => {
  test("add, promote, retire on a file pki.sh made: what each prints, and the file after each", () => {
    const path = keyFile();
    const [old] = keysOf(path);
    const f = (key: string) => fernetKeyFingerprint(key);

    const add = run(path, T0, "add");
    const [, added] = keysOf(path);
    expect(add).toEqual({
      code: 0,
      err: [],
      out: [
        `added key ${f(added!)} to ${path}, decrypt-only; the primary is still ${f(old!)}`,
        `next: put ${path} on every host; once each has logged "Fernet keys reloaded: … (added ${f(added!)})", run promote`,
      ],
    });

    const promote = run(path, later(30), "promote");
    expect(keysOf(path)).toEqual([added!, old!]);
    expect(promote).toEqual({
      code: 0,
      err: [],
      out: [
        `promoted key ${f(added!)} to primary in ${path}; ${f(old!)} is decrypt-only from 2026-05-01T10:00:30Z`,
        `next: put ${path} on every host; retire ${f(old!)} once every host has logged "Fernet keys reloaded: … (primary was ${f(old!)})" and 360 s more have passed (TTL 300 s + 60 s clock skew): not before 2026-05-01T10:06:30Z`,
        `meanwhile each server re-encrypts its stored records under ${f(old!)} to ${f(added!)}: /health "fernet_rewrap" pending says how many are left`,
      ],
    });

    const early = run(path, later(60), "retire");
    expect({ code: early.code, err: early.err }).toEqual({
      code: 1,
      err: [
        `fernet-keys: nothing retired yet: ${f(old!)} stopped encrypting 2026-05-01T10:00:30Z; a token made with it may be accepted until 2026-05-01T10:06:30Z (TTL 300 s + 60 s clock skew)`,
      ],
    });
    expect(keysOf(path)).toEqual([added!, old!]);

    expect(run(path, later(390), "retire")).toEqual({
      code: 0,
      err: [],
      out: [
        `retired key ${f(old!)} from ${path}; 1 key(s) left, primary ${f(added!)}`,
        `archived to ${join(path, "..", "fernet-archive")}/ (0600 files, on this host only): ./pki.sh fernet restore FP puts a key back`,
        // The CA host cannot see the database: it says what the servers do with records still under the key, and where to look.
        `next: put ${path} on every host. A server whose stored records are still under ${f(old!)} keeps that key in memory and in its --state-dir, for those records only ` +
          `(never for a new request), until it has re-encrypted them to ${f(added!)}; this host cannot see the database, so watch each server: ` +
          `/health "fernet_rewrap" shows kept ["${f(old!)}"] and pending N until done, then kept [] and pending 0; its log says ` +
          `"Fernet key … dropped: no stored record uses it any more" then, or "Fernet keys reloaded: … (dropped …)" at once when no record used it`,
        `a server that never held it, or lost its --state-dir, reads only the file: its /health "fernet_rewrap" shows unreadable N, records under a key it does not hold; ` +
          `they are not lost: ./pki.sh fernet restore ${f(old!)} puts the key back, decrypt-only, and the server reads them and moves them to ${f(added!)}`,
      ],
    });
    expect(keysOf(path)).toEqual([added!]);
    expect(run(path, later(400), "retire").code).toBe(0); // nothing left to retire: done, not refused

    // Private and whole: 0600, no temporary file left beside it, and no key in anything printed; the retired key in
    // the archive beside it, 0600 in a 0700 folder.
    const archive = join(path, "..", "fernet-archive");
    expect({ mode: statSync(path).mode & 0o777, files: readdirSync(join(path, "..")).sort() }).toEqual({
      mode: 0o600,
      files: ["encryption_key.txt", "fernet-archive"],
    });
    expect({ dir: statSync(archive).mode & 0o777, files: readdirSync(archive), mode: statSync(join(archive, `${f(old!)}.txt`)).mode & 0o777 }).toEqual({
      dir: 0o700,
      files: [`${f(old!)}.txt`],
      mode: 0o600,
    });
    const printed = [add, promote, early].flatMap((r) => [...r.out, ...r.err]).join("\n");
    for (const key of [old!, added!]) expect(printed).not.toContain(key.slice(0, 20));
  });

  test("restore: a retired key comes back from the archive, decrypt-only, and goes again only by name", () => {
    const path = keyFile();
    const [old] = keysOf(path);
    const f = (key: string) => fernetKeyFingerprint(key);
    run(path, T0, "add");
    run(path, later(30), "promote");
    const [primary] = keysOf(path);
    expect(run(path, later(390), "retire").code).toBe(0);
    expect(keysOf(path)).toEqual([primary!]);

    const restore = run(path, later(400), "restore", f(old!));
    expect(restore).toEqual({
      code: 0,
      err: [],
      out: [
        `restored key ${f(old!)} from ${join(path, "..", "fernet-archive")}/ to ${path}, decrypt-only, for stored records; the primary is still ${f(primary!)}`,
        `next: put ${path} on every server; each reads the records under ${f(old!)} again and moves them to ${f(primary!)} (/health "fernet_rewrap" unreadable 0, pending 0 when done); then retire it by name: retire --key ${f(old!)}`,
      ],
    });
    // Back as it was, decrypt-only with when it stopped encrypting: the same key opens what it made.
    const file = parseFernetKeyFile(readFileSync(path, "utf8"), path);
    expect(file.decryptOnly).toEqual([
      { key: old!, role: "decrypt-only", encryptedUntil: later(30), restored: later(400), added: undefined, promoted: undefined },
    ]);
    expect(new Fernet(keysOf(path)).decryptText(new Fernet(old!).encrypt("made under the old key"))).toBe("made under the old key");
    // A plain retire leaves it (servers may still be moving records off it); by name it goes, to the archive again.
    expect(run(path, later(500), "retire")).toMatchObject({
      code: 0,
      out: [
        expect.stringContaining(`kept key ${f(old!)}: restored 2026-05-01T10:06:40Z for stored records: retire it by name (--key ${f(old!)})`),
        expect.stringContaining("nothing to retire"),
      ],
    });
    expect(keysOf(path)).toEqual([primary!, old!]);
    expect(run(path, later(510), "retire", "--key", f(old!)).code).toBe(0);
    expect(keysOf(path)).toEqual([primary!]);
    expect(run(path, later(520), "restore", f(old!)).code).toBe(0);

    // Refusals: a key in the file, a key never archived; the file untouched.
    const before = readFileSync(path, "utf8");
    expect(run(path, later(530), "restore", f(old!))).toEqual({ code: 1, out: [], err: [`fernet-keys: key ${f(old!)} is in the file already (see: status)`] });
    expect(run(path, later(530), "restore", "0badc0de")).toEqual({
      code: 1,
      out: [],
      err: [`fernet-keys: no key 0badc0de in the archive ${join(path, "..", "fernet-archive")} (archived: ${f(old!)})`],
    });
    expect(run(path, later(530), "restore").code).toBe(2);
    expect(readFileSync(path, "utf8")).toBe(before);
  });

  test("retire refuses an archive folder others can open, before it drops anything", () => {
    const path = keyFile();
    run(path, T0, "add");
    run(path, later(30), "promote");
    const archive = join(path, "..", "fernet-archive");
    mkdirSync(archive, { mode: 0o755 });
    chmodSync(archive, 0o755);
    const before = readFileSync(path, "utf8");
    expect(run(path, later(390), "retire")).toMatchObject({
      code: 2,
      err: [`fernet-keys: ${archive} is readable by group or others (mode 0755); run chmod 700 ${archive}`],
    });
    expect(readFileSync(path, "utf8")).toBe(before);
  });

  test("status lists fingerprints, roles and when each step is safe; with an old key, where servers show their stored records' state", () => {
    const path = keyFile();
    run(path, T0, "add");
    const [first, added] = keysOf(path).map(fernetKeyFingerprint);
    // An added key is no old key: no records move to or from it yet, so nothing to watch.
    expect(run(path, later(5), "status", "--ttl", "60").out).toEqual([
      `${first}  primary`,
      `${added}  decrypt-only  added 2026-05-01T10:00:00Z, promote: once every host has loaded it`,
    ]);
    run(path, later(10), "promote");
    const [primary, old] = keysOf(path).map(fernetKeyFingerprint);
    expect(run(path, later(20), "status", "--ttl", "60").out).toEqual([
      `${primary}  primary       added 2026-05-01T10:00:00Z, promoted 2026-05-01T10:00:10Z`,
      `${old}  decrypt-only  encrypted until 2026-05-01T10:00:10Z, retire: safe from 2026-05-01T10:02:10Z`,
      `stored records: from the promote on, each server moves records under ${old} to the primary ${primary} by itself, and keeps a retired key ` +
        `(in memory and in its --state-dir, for stored records only) until none is under it; this host cannot see the database, so look at each server: ` +
        `/health "fernet_rewrap" (pending: records left, kept: retired keys it still holds), and its log ("Fernet re-encryption: moved …", ` +
        `"Fernet key … dropped: no stored record uses it any more")`,
    ]);
  });

  test("refusals: exit 1 and the file untouched; bad usage or a loose file: exit 2", () => {
    const path = keyFile();
    const before = readFileSync(path, "utf8");
    expect(run(path, T0, "promote")).toEqual({
      code: 1,
      out: [],
      err: ["fernet-keys: no added key to promote: run add first (or name a decrypt-only key with --key)"],
    });
    expect(run(path, T0, "retire", "--key", fernetKeyFingerprint(keysOf(path)[0]!)).code).toBe(1);
    expect(readFileSync(path, "utf8")).toBe(before);
    expect(run(path, T0, "rotate").code).toBe(2);
    const loose = keyFile();
    writeFileSync(loose, generateFernetKey(), { mode: 0o644 });
    chmodSync(loose, 0o644);
    expect(run(loose, T0, "add")).toMatchObject({ code: 2, err: [expect.stringContaining("is readable by group or others (mode 0644); run chmod 600")] });
  });
});
