// FernetKeys, and a long-lived MeshClient following the key file: a promote is taken up within the poll bound with
// no new client; a bad file keeps the keys in force with one error line; $FERNET_KEY says it does not reload.
// (timing-bound: the poll bound is RELOAD_INTERVAL_MS plus a margin for a shared two-core machine.)
import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdtempSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createLogger, type Logger } from "../ops/log.ts";
import { fernetKeyFingerprint } from "../platform/fernet-key-file.ts";
import { loadIdentity, mutualTlsServerOptions } from "../platform/tls.ts";
import { RELOAD_INTERVAL_MS } from "../platform/watch.ts";
import { testPki } from "../testing/pki.ts";
import { waitFor } from "../../harness/fixtures/index.ts";
import { Fernet, generateFernetKey } from "./fernet.ts";
import { FernetKeys } from "./fernet-reload.ts";
import { MeshClient } from "./mesh-client.ts";

const POLL_BOUND_MS = RELOAD_INTERVAL_MS + 2000;

const temporary: string[] = [];
afterAll(() => temporary.forEach((dir) => rmSync(dir, { recursive: true, force: true })));
const cleanups: (() => void)[] = [];
afterEach(() => cleanups.splice(0).forEach((c) => c()));

/** A folder holding only encryption_key.txt (0600), as a host's PKI holds it. */
function keyFolder(text: string): string {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-fernet-reload-"));
  temporary.push(dir);
  putKeyFile(dir, text);
  return dir;
}

function putKeyFile(dir: string, text: string): void {
  writeFileSync(join(dir, "next"), text, { mode: 0o600 });
  chmodSync(join(dir, "next"), 0o600);
  renameSync(join(dir, "next"), join(dir, "encryption_key.txt"));
}

function capturingLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  return { logger: createLogger("test", { format: "text", color: false, write: (l) => lines.push(l) }), lines };
}

/**
 * The clock for "nothing was reloaded": a watcher of a key file of its own, on the same poll interval. Call
 * pollsSinceChange() right after changing the watched file: it replaces the witness's file, waits for its reload,
 * replaces it again and waits for the next. The two reloads are a poll interval apart at least, so a watcher that
 * was running when the call began has polled since, and would have logged a reload by then.
 */
function witnessWatcher(): { pollsSinceChange(): Promise<void> } {
  const dir = keyFolder(`${generateFernetKey()}\n`);
  const { logger, lines } = capturingLogger();
  const keys = FernetKeys.open(dir).watch(logger);
  cleanups.push(() => keys.stop());
  const reloadOnce = (what: string) => {
    const seen = lines.length;
    putKeyFile(dir, `${generateFernetKey()}\n`);
    return waitFor(`the witness watcher's ${what} reload`, () => lines.length > seen, POLL_BOUND_MS);
  };
  return {
    async pollsSinceChange() {
      await reloadOnce("first");
      await reloadOnce("second");
    },
  };
}

describe("FernetKeys", () => {
  const [A, B] = [generateFernetKey(), generateFernetKey()];
  const [fa, fb] = [fernetKeyFingerprint(A), fernetKeyFingerprint(B)];

  test("reload swaps the set and says what changed; a file that cannot be used keeps it, one error line, no key", () => {
    const dir = keyFolder(`${A}\n`);
    const keys = FernetKeys.open(dir);
    const { logger, lines } = capturingLogger();
    const fernet = keys.fernet;
    const underB = new Fernet(B).encrypt("b");

    putKeyFile(dir, `${A}\n${B} # decrypt-only\n`);
    expect(keys.reload(logger)).toBe(true);
    expect(fernet.decryptText(underB)).toBe("b");
    expect(new Fernet(A).decryptText(fernet.encrypt("still A"))).toBe("still A");

    putKeyFile(dir, `${B}\n${A} # decrypt-only\n`);
    keys.reload(logger);
    expect(new Fernet(B).decryptText(fernet.encrypt("now B"))).toBe("now B");

    putKeyFile(dir, `${B.slice(0, 30)}\n`);
    expect(keys.reload(logger)).toBe(false);
    chmodSync(join(dir, "encryption_key.txt"), 0o644);
    expect(keys.reload(logger)).toBe(false);
    putKeyFile(dir, `${B}\n`);
    keys.reload(logger);
    keys.reload(logger);

    expect(lines).toEqual([
      `Fernet keys reloaded: 2 keys, primary ${fa}, decrypt-only ${fb} (added ${fb})`,
      `Fernet keys reloaded: 2 keys, primary ${fb}, decrypt-only ${fa} (primary was ${fa})`,
      `Fernet keys NOT reloaded, the previous ones stay in force (2 keys, primary ${fb}, decrypt-only ${fa}): ${join(dir, "encryption_key.txt")} line 1: not a Fernet key (url-safe base64 of 32 bytes); fix or remove that line`,
      `Fernet keys NOT reloaded, the previous ones stay in force (2 keys, primary ${fb}, decrypt-only ${fa}): ${join(dir, "encryption_key.txt")} is readable by group or others (mode 0644); run chmod 600 ${join(dir, "encryption_key.txt")}`,
      `Fernet keys reloaded: 1 key, primary ${fb} (dropped ${fa})`,
      `Fernet keys reloaded: 1 key, primary ${fb} (unchanged)`,
    ]);
    expect(() => fernet.decrypt(new Fernet(A).encrypt("a"))).toThrow("invalid or expired token");
  });

  test("keepOnDisk: a kept key is written 0600 in a 0700 folder, taken up again by the next process, and removed once released", () => {
    const dir = keyFolder(`${B}\n${A} # decrypt-only, encrypted until 2026-01-01T00:00:00Z\n`);
    const state = join(dir, "state", "fernet-kept");
    const { logger, lines } = capturingLogger();
    const keys = FernetKeys.open(dir)
      .keepOnDisk(state, logger)
      .keepWhileUsed(
        () => 5,
        () => {},
      );
    putKeyFile(dir, `${B}\n`);
    keys.reload(logger);
    const file = join(state, `${fa}.key`);
    expect({ kept: keys.kept, dir: statSync(state).mode & 0o777, file: statSync(file).mode & 0o777 }).toEqual({ kept: [fa], dir: 0o700, file: 0o600 });
    const underA = new Fernet(A).encrypt("stored under A");

    // A restart: the file has B alone, the state folder A, for stored records only.
    const after = FernetKeys.open(dir).keepOnDisk(state, logger);
    expect({ kept: after.kept, records: after.records.decryptText(underA), fingerprints: after.fingerprints }).toEqual({
      kept: [fa],
      records: "stored under A",
      fingerprints: [fb],
    });
    expect(() => after.fernet.decrypt(underA)).toThrow("invalid or expired token");
    expect(lines.at(-1)).toBe(
      `Fernet key ${fa} is not in ${join(dir, "encryption_key.txt")}, but was kept for stored records before this restart (${file}): kept again, for them only (never for a new request), until they are re-encrypted to ${fb}`,
    );

    after.release(fa, logger, "0 records moved off it by this server");
    expect({ kept: after.kept, file: existsSync(file) }).toEqual({ kept: [], file: false });
    // One that group or others can read stops the role, as any key file does.
    putKeyFile(dir, `${A}\n`);
    keys.reload(logger);
    putKeyFile(dir, `${B}\n`);
    keys.reload(logger);
    chmodSync(file, 0o644);
    expect(() => FernetKeys.open(dir).keepOnDisk(state, logger)).toThrow(`${file} is readable by group or others (mode 0644); run chmod 600 ${file}`);
  });

  test("keepWhileUsed: a key leaving the file stays for stored records while they use it, or may; never for requests; released once none do", () => {
    const [C, D] = [generateFernetKey(), generateFernetKey()];
    const [fc, fd] = [fernetKeyFingerprint(C), fernetKeyFingerprint(D)];
    const dir = keyFolder(`${B}\n${A} # decrypt-only, encrypted until 2026-01-01T00:00:00Z\n${C} # decrypt-only\n${D} # decrypt-only\n`);
    const keys = FernetKeys.open(dir);
    const { logger, lines } = capturingLogger();
    // What fernet-rewrap.ts would say: 3 records under A, C not counted yet, none under D.
    const usage = new Map<string, number | null>([
      [fa, 3],
      [fc, null],
      [fd, 0],
    ]);
    let changes = 0;
    keys.keepWhileUsed(
      (key) => usage.get(fernetKeyFingerprint(key)) as number | null,
      () => changes++,
    );
    const storedUnderA = new Fernet(A).encrypt("stored under A");
    expect(keys.rewrappable).toEqual(new Set([fa, fc, fd]));

    putKeyFile(dir, `${B}\n`); // retire A, C and D at once
    expect(keys.reload(logger)).toBe(true);
    expect(keys.kept).toEqual([fa, fc]);
    expect(keys.rewrappable).toEqual(new Set([fa, fc]));
    expect(keys.recordFingerprints).toEqual([fb, fa, fc]);
    expect(keys.fingerprints).toEqual([fb]);
    // Stored records under A still read; a new request under A does not: a retired key opens nothing new.
    expect(keys.records.decryptText(storedUnderA)).toBe("stored under A");
    expect(() => keys.fernet.decrypt(new Fernet(A).encrypt("a new request"))).toThrow("invalid or expired token");
    expect(() => keys.records.decrypt(new Fernet(D).encrypt("under D"))).toThrow("invalid or expired token");
    const path = join(dir, "encryption_key.txt");
    expect(lines).toEqual([
      `Fernet keys reloaded: 1 key, primary ${fb} (dropped ${fd}; kept ${fa} ${fc} for stored records)`,
      `Fernet key ${fa} is no longer in ${path}, but 3 stored records still use it: kept in memory to read them (never for a new request) while they are re-encrypted to ${fb}; it is dropped once none do (/health fernet_rewrap)`,
      `Fernet key ${fc} is no longer in ${path}, but records not counted yet may still use it: kept in memory to read them (never for a new request) while they are re-encrypted to ${fb}; it is dropped once none do (/health fernet_rewrap)`,
    ]);

    // Another reload keeps them, without a second error line.
    lines.length = 0;
    keys.reload(logger);
    expect(lines).toEqual([`Fernet keys reloaded: 1 key, primary ${fb}, kept for stored records ${fa} ${fc} (unchanged)`]);

    // Re-encrypted: released, with one line; records under A no longer read.
    lines.length = 0;
    keys.release(fa, logger, "3 records moved off it by this server");
    expect(keys.kept).toEqual([fc]);
    expect(() => keys.records.decrypt(storedUnderA)).toThrow("invalid or expired token");
    // C put back in the file: the file's again, not kept.
    putKeyFile(dir, `${B}\n${C} # decrypt-only\n`);
    keys.reload(logger);
    expect(keys.kept).toEqual([]);
    expect(lines).toEqual([
      `Fernet key ${fa} dropped: no stored record uses it any more (3 records moved off it by this server); 1 key, primary ${fb}, kept for stored records ${fc}`,
      `Fernet keys reloaded: 2 keys, primary ${fb}, decrypt-only ${fc} (added ${fc} (back in the file))`,
    ]);
    expect(changes).toBe(4);
  });

  test("keepWhileUsed: an added key not yet promoted is not an old key; the primary it replaces is", () => {
    const dir = keyFolder(`${A}\n${B} # decrypt-only, added 2026-01-01T00:00:00Z\n`);
    const keys = FernetKeys.open(dir);
    expect(keys.rewrappable).toEqual(new Set());
    putKeyFile(dir, `${B} # primary, added 2026-01-01T00:00:00Z, promoted 2026-01-01T00:01:00Z\n${A} # decrypt-only, encrypted until 2026-01-01T00:01:00Z\n`);
    keys.reload(capturingLogger().logger);
    expect(keys.rewrappable).toEqual(new Set([fa]));
  });

  test("$FERNET_KEY: loaded, said not to reload, and not watched", () => {
    const dir = keyFolder(`${A}\n`);
    const before = process.env.FERNET_KEY;
    process.env.FERNET_KEY = B;
    try {
      const keys = FernetKeys.open(dir).watch(capturingLogger().logger);
      cleanups.push(() => keys.stop());
      expect(keys.describe()).toBe(`1 key, primary ${fb}, from $FERNET_KEY (does not reload: restart to change keys, or use encryption_key.txt)`);
    } finally {
      if (before === undefined) delete process.env.FERNET_KEY;
      else process.env.FERNET_KEY = before;
    }
  });
});

describe("MeshClient follows the key file", () => {
  test("a promote reaches a client made before it within the poll bound, and close() stops following (timing-bound)", async () => {
    const pki = await testPki("main");
    const [old, next] = [generateFernetKey(), generateFernetKey()];
    const dir = keyFolder(`${old}\n`);
    // A stand-in coordinator that can read only the new key: it stores what the client encrypted under it.
    const onlyNext = new Fernet(next);
    const server = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      tls: mutualTlsServerOptions(loadIdentity(pki, "coordinator")),
      fetch: async (request) => {
        try {
          onlyNext.decrypt(((await request.json()) as { data: string }).data);
          return Response.json({ result: "ok", id: 1 });
        } catch {
          return Response.json({ error: "invalid or expired token", code: "ERR_INVALID_TOKEN" }, { status: 400 });
        }
      },
    });
    cleanups.push(() => server.stop(true));
    const { logger, lines } = capturingLogger();
    const keys = FernetKeys.open(dir).watch(logger);
    const client = new MeshClient({ identity: loadIdentity(pki, "client1"), fernet: keys, coordinators: [`https://127.0.0.1:${server.port}`] });
    cleanups.push(() => client.close());

    expect((await client.sendData("before")).status).toBe(400);
    putKeyFile(dir, `${next}  # primary\n${old}  # decrypt-only\n`);
    const changed = performance.now();
    await waitFor("the client to encrypt under the promoted key", async () => (await client.sendData("after")).status === 200, 10_000);
    expect({ withinPollBound: performance.now() - changed <= POLL_BOUND_MS }).toEqual({ withinPollBound: true });
    expect(lines).toEqual([
      `Fernet keys reloaded: 2 keys, primary ${fernetKeyFingerprint(next)}, decrypt-only ${fernetKeyFingerprint(old)} (primary was ${fernetKeyFingerprint(old)}; added ${fernetKeyFingerprint(next)})`,
    ]);

    client.close();
    const witness = witnessWatcher();
    putKeyFile(dir, `${old}\n`);
    await witness.pollsSinceChange();
    expect(lines.length).toBe(1);
  });
});
