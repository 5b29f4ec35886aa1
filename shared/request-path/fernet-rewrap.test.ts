// FernetRewrap on real stores (a sqlite file, the test MariaDB): records under an old key move to the primary with
// their timestamps, two servers on one database share the work by compare-and-set, a key retired while records still
// use it is kept until they are moved, and /health's numbers say where it stands.
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { cleanupAfterEach } from "../testing/cleanups.ts";
import { createDecipheriv, createHmac, randomUUID } from "node:crypto";
import { chmodSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mysql from "mysql2/promise";
import { createLogger, type Logger } from "../ops/log.ts";
import { fernetKeyFingerprint } from "../platform/fernet-key-file.ts";
import { TEST_MYSQL_URL, uniqueTable } from "../testing/mysql.ts";
import { testedDatabases } from "../testing/unit-run.ts";
import { waitFor } from "../../harness/fixtures/index.ts";
import { Fernet, generateFernetKey } from "./fernet.ts";
import { FernetKeys } from "./fernet-reload.ts";
import { FernetRewrap } from "./fernet-rewrap.ts";
import { payloadDigest } from "./proof.ts";
import { openStore, type RecordStore } from "./store.ts";

setDefaultTimeout(60_000);

const temporary: string[] = [];
const mysqlTables: string[] = [];
const cleanups = cleanupAfterEach();
afterAll(async () => {
  temporary.forEach((dir) => rmSync(dir, { recursive: true, force: true }));
  if (mysqlTables.length === 0) return;
  const conn = await mysql.createConnection(TEST_MYSQL_URL);
  for (const t of mysqlTables) await conn.query(`DROP TABLE IF EXISTS ${t}, ${t}_generation, ${t}_used_proofs, ${t}_senders`);
  await conn.end();
});

function putKeyFile(dir: string, text: string): void {
  writeFileSync(join(dir, "next"), text, { mode: 0o600 });
  chmodSync(join(dir, "next"), 0o600);
  renameSync(join(dir, "next"), join(dir, "encryption_key.txt"));
}

function keyFolder(text: string): string {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-fernet-rewrap-"));
  temporary.push(dir);
  putKeyFile(dir, text);
  return dir;
}

function capturingLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  return { logger: createLogger("test", { format: "text", color: false, write: (l) => lines.push(l) }), lines };
}

/** `count` stores of one database (as `count` servers share one), closed after the test. */
async function openServers(kind: "sqlite" | "mysql", count: number): Promise<RecordStore[]> {
  const table = uniqueTable("rewrap");
  const path = join(mkdtempSync(join(tmpdir(), "securemesh-rewrap-db-")), "records.db");
  temporary.push(path.slice(0, path.lastIndexOf("/")));
  if (kind === "mysql") mysqlTables.push(table);
  const stores: RecordStore[] = [];
  for (let i = 0; i < count; i++) stores.push(await (kind === "mysql" ? openStore(TEST_MYSQL_URL, { table }) : openStore(path)));
  cleanups.push(() => Promise.all(stores.map((s) => s.close())));
  return stores;
}

/** Stores `n` records encrypted under `key`, stamped `stamp + i` seconds, as the clients would have sent them. */
async function seed(store: RecordStore, key: string, n: number, stamp: number, label: string): Promise<void> {
  const f = new Fernet(key);
  for (let start = 0; start < n; start += 1000) {
    const batch = Array.from({ length: Math.min(1000, n - start) }, (_, j) => {
      const token = f.encrypt(`${label} ${start + j}`, { now: stamp + start + j });
      return { sender: "client1", token, jti: randomUUID(), digest: payloadDigest(token), server: 0 };
    });
    await store.insertMany(batch);
  }
}

async function allTokens(store: RecordStore): Promise<{ id: number; token: string }[]> {
  const out: { id: number; token: string }[] = [];
  for (let page = await store.tokensAfter(0, 5000); page.length > 0; page = await store.tokensAfter(page.at(-1)!.id, 5000)) out.push(...page);
  return out;
}

/** A token whose MAC checks under `key` but whose one block does not decrypt to valid padding. */
function brokenToken(key: string): string {
  const raw = Buffer.from(key, "base64url");
  const [signing, encryption] = [raw.subarray(0, 16), raw.subarray(16)];
  for (let seed = 0; ; seed++) {
    const body = Buffer.concat([Buffer.from([0x80]), Buffer.alloc(8), Buffer.alloc(16, seed), Buffer.alloc(16, 0xab)]);
    const decipher = createDecipheriv("aes-128-cbc", encryption, body.subarray(9, 25));
    decipher.setAutoPadding(false);
    const last = Buffer.concat([decipher.update(body.subarray(25)), decipher.final()]).at(-1)!;
    if (last >= 1 && last <= 16) continue; // this IV happens to make valid-looking padding: try another
    const token = Buffer.concat([body, createHmac("sha256", signing).update(body).digest()]);
    return token.toString("base64url") + "=".repeat((3 - (token.length % 3)) % 3);
  }
}

/** The store, and how many times anything has read its tokens (tokensAfter) through it. */
function countingReads(store: RecordStore): { store: RecordStore; reads: () => number } {
  let reads = 0;
  const counting = new Proxy(store, {
    get: (target, name) => {
      if (name === "tokensAfter") return (...args: [number, number]) => (reads++, target.tokensAfter(...args));
      const value = Reflect.get(target, name);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  return { store: counting, reads: () => reads };
}

const stampOf = (token: string) => Number(Buffer.from(token, "base64url").readBigUInt64BE(1));
const opens = (key: string, token: string) => new Fernet(key).keyIndex(token) === 0;

function startRewrap(
  store: RecordStore,
  keys: FernetKeys,
  logger: Logger,
  pace: { batch: number; intervalMs: number } = { batch: 100, intervalMs: 1 },
): FernetRewrap {
  const rewrap = new FernetRewrap({ store, keys, logger, ...pace, restMs: 50 }).start();
  cleanups.push(() => rewrap.stop());
  return rewrap;
}

describe.each(testedDatabases(["sqlite", "mysql"] as const))("FernetRewrap on %s", (kind) => {
  const [OLD, NEW] = [generateFernetKey(), generateFernetKey()];
  const [fpOld, fpNew] = [fernetKeyFingerprint(OLD), fernetKeyFingerprint(NEW)];
  const promoted = `${NEW}  # primary, promoted 2026-01-01T00:01:00Z\n${OLD}  # decrypt-only, encrypted until 2026-01-01T00:01:00Z\n`;

  test("moves every record under the old key to the primary with its own timestamp; leaves the primary's alone; pending N → 0", async () => {
    const [store] = await openServers(kind, 1);
    await seed(store!, OLD, 1200, 1_700_000_000, "old");
    await seed(store!, NEW, 300, 1_800_000_000, "new");
    const before = await allTokens(store!);
    const keys = FernetKeys.open(keyFolder(promoted));
    const { logger, lines } = capturingLogger();
    const rewrap = startRewrap(store!, keys, logger);
    const started = performance.now();
    await waitFor("every record to be moved", () => rewrap.status().state === "watching" && rewrap.status().pending === 0);
    const tookMs = performance.now() - started;

    const after = await allTokens(store!);
    expect(after.length).toBe(1500);
    expect(after.every((r) => opens(NEW, r.token))).toBe(true);
    // The timestamps are the originals: a TTL means on a moved record what it meant on the stored one.
    expect(after.map((r) => stampOf(r.token))).toEqual(before.map((r) => stampOf(r.token)));
    expect(after.map((r) => new Fernet(NEW).decryptText(r.token))).toEqual(before.map((r) => new Fernet([NEW, OLD]).decryptText(r.token)));
    // Records already under the primary are not rewritten.
    expect(after.slice(1200).map((r) => r.token)).toEqual(before.slice(1200).map((r) => r.token));
    expect(rewrap.status()).toEqual({ state: "watching", pending: 0, by_key: { [fpOld]: 0 }, rewrapped: 1200, unreadable: 0, kept: [] });
    expect(lines).toContain(`Fernet re-encryption: 1200 records under ${fpOld}; moving them to the primary ${fpNew} (100 a page, every 1 ms)`);
    expect(lines.some((l) => l.startsWith(`Fernet re-encryption: moved 1200 records to the primary ${fpNew} in `))).toBe(true);
    console.log(`${kind}: 1200 records re-encrypted in ${Math.round(tookMs)} ms (pages of 100)`);

    // A record written later under the old key (a client slow to reload) is found and moved by the next walk.
    await seed(store!, OLD, 1, 1_900_000_000, "late");
    await waitFor("the late record to be moved", () => rewrap.status().rewrapped === 1201);
    expect((await allTokens(store!)).every((r) => opens(NEW, r.token))).toBe(true);
  });

  test("three servers on one database at once: every record moved exactly once between them, none overwritten", async () => {
    const stores = await openServers(kind, 3);
    await seed(stores[0]!, OLD, 3000, 1_700_000_000, "old");
    const before = await allTokens(stores[0]!);
    const dir = keyFolder(promoted);
    const servers = stores.map((store) => ({ ...capturingLogger(), keys: FernetKeys.open(dir), store }));
    const rewraps = servers.map((s) => startRewrap(s.store, s.keys, s.logger, { batch: 50, intervalMs: 1 }));
    await waitFor("every server to see nothing left", () => rewraps.every((r) => r.status().state === "watching" && r.status().pending === 0), 60_000);

    const after = await allTokens(stores[0]!);
    expect(after.every((r) => opens(NEW, r.token))).toBe(true);
    expect(after.map((r) => stampOf(r.token))).toEqual(before.map((r) => stampOf(r.token)));
    const moved = rewraps.map((r) => r.status().rewrapped);
    expect(moved.reduce((a, b) => a + b, 0)).toBe(3000);
    expect(servers.flatMap((s) => s.lines.filter((l) => /paused|unreadable|under no Fernet key/.test(l)))).toEqual([]);
    console.log(`${kind}: 3000 records moved by three servers at once: ${moved.join(" + ")}`);
  });

  test("a key retired while records still use it is kept for them, never for requests, and dropped once they are moved", async () => {
    const [store] = await openServers(kind, 1);
    await seed(store!, OLD, 2000, 1_700_000_000, "old");
    const dir = keyFolder(promoted);
    const keys = FernetKeys.open(dir);
    const { logger, lines } = capturingLogger();
    // Slow enough that the retire lands mid-walk: 40 pages of 50, each 20 ms apart at least.
    const rewrap = startRewrap(store!, keys, logger, { batch: 50, intervalMs: 20 });
    await waitFor("the walk to be moving records", () => rewrap.status().state === "re-encrypting" && rewrap.status().rewrapped > 0);
    // A client slow to take up the promote writes under OLD after the count: this walk does not cover it, the next must.
    await seed(store!, OLD, 1, 1_900_000_000, "late");

    putKeyFile(dir, `${NEW}  # primary\n`);
    keys.reload(logger);
    const usedBy = /Fernet key \S+ is no longer in .*, but (\d+) stored records still use it/.exec(lines.find((l) => l.includes("is no longer in")) ?? "");
    expect(usedBy).not.toBeNull();
    expect(Number(usedBy![1])).toBeGreaterThan(0);
    expect(keys.kept).toEqual([fpOld]);
    expect(rewrap.status()).toMatchObject({ kept: [fpOld], pending: expect.any(Number) });
    expect(rewrap.status().pending!).toBeGreaterThan(0);
    // Meanwhile a record still under OLD reads (the view), and a request under OLD is refused.
    const stillOld = (await allTokens(store!)).findLast((r) => opens(OLD, r.token));
    expect(keys.records.decryptText(stillOld!.token)).toMatch(/^(old|late) \d+$/);
    expect(() => keys.fernet.decrypt(new Fernet(OLD).encrypt("new request"))).toThrow("invalid or expired token");

    const dropped = await waitFor("OLD to be dropped", () => lines.find((l) => l.startsWith(`Fernet key ${fpOld} dropped`)), 30_000);
    // Dropped only once no record uses it: the store holds none under OLD, and every one reads under NEW alone.
    const after = await allTokens(store!);
    expect({ underOld: after.filter((r) => opens(OLD, r.token)).length, underNew: after.filter((r) => opens(NEW, r.token)).length }).toEqual({
      underOld: 0,
      underNew: 2001,
    });
    expect(dropped).toBe(
      `Fernet key ${fpOld} dropped: no stored record uses it any more (2001 records moved off it by this server, to ${fpNew}); 1 key, primary ${fpNew}`,
    );
    expect(lines.indexOf(dropped)).toBeGreaterThan(lines.findIndex((l) => l.startsWith("Fernet re-encryption: moved")));
    expect(keys.kept).toEqual([]);
    await waitFor("the server to go idle: no old key left", () => rewrap.status().state === "idle");
    expect(rewrap.status()).toMatchObject({ pending: 0, kept: [], rewrapped: 2001 });
  });

  test("a record under a key no server holds is counted unreadable with one error line; the added key waiting for promote is left alone", async () => {
    const [store] = await openServers(kind, 1);
    const [foreign, added] = [generateFernetKey(), generateFernetKey()];
    await seed(store!, OLD, 10, 1_700_000_000, "old");
    await seed(store!, foreign, 2, 1_700_000_000, "foreign");
    await seed(store!, added, 3, 1_700_000_000, "added early");
    // A broken token: its MAC checks under OLD, its message does not decrypt (bad padding). Counted unreadable, and
    // tried once: it does not keep the walks going.
    const broken = brokenToken(OLD);
    expect({ signedByOld: new Fernet(OLD).keyIndex(broken) }).toEqual({ signedByOld: 0 });
    expect(() => new Fernet(OLD).rotate(broken)).toThrow("invalid or expired token");
    await store!.insert({ sender: "client1", token: broken, jti: randomUUID(), digest: payloadDigest(broken), server: 0 });
    const before = await allTokens(store!);
    const keys = FernetKeys.open(
      keyFolder(`${NEW}  # primary\n${added}  # decrypt-only, added 2026-01-02T00:00:00Z\n${OLD}  # decrypt-only, encrypted until 2026-01-01T00:01:00Z\n`),
    );
    const { logger, lines } = capturingLogger();
    const rewrap = startRewrap(store!, keys, logger);
    // The count is reported on the walk after the one that found the broken token: wait for its line too.
    await waitFor(
      "the walk to finish and report the 3 records it cannot read",
      () => rewrap.status().state === "watching" && rewrap.status().pending === 0 && lines.some((l) => l.startsWith("3 stored records")),
    );
    expect(rewrap.status()).toEqual({ state: "watching", pending: 0, by_key: { [fpOld]: 0 }, rewrapped: 10, unreadable: 3, kept: [] });
    expect(lines.filter((l) => l.includes("under no Fernet key"))).toEqual([
      `2 stored records are under no Fernet key this server holds: they read as unreadable until their key is back in ${keys.path} (as a decrypt-only line), when they are re-encrypted; a retired key is in the CA host's archive: ./pki.sh fernet restore FP`,
      `3 stored records are under no Fernet key this server holds: they read as unreadable until their key is back in ${keys.path} (as a decrypt-only line), when they are re-encrypted; a retired key is in the CA host's archive: ./pki.sh fernet restore FP`,
    ]);
    // Walks go on watching the newer records, and never try the broken one again.
    const walked = lines.filter((l) => l.startsWith("Fernet re-encryption: moved")).length;
    await seed(store!, OLD, 1, 1_900_000_000, "late");
    await waitFor("the late record to be moved", () => rewrap.status().rewrapped === 11);
    expect({ moves: lines.filter((l) => l.startsWith("Fernet re-encryption: moved")).length - walked, unreadable: rewrap.status().unreadable }).toEqual({
      moves: 1,
      unreadable: 3,
    });
    const after = await allTokens(store!);
    expect(after.slice(10, before.length).map((r) => r.token)).toEqual(before.slice(10).map((r) => r.token));
  });

  test("with only a primary (or an added key besides): one count at start, for records under no key held; then nothing is read", async () => {
    const [store] = await openServers(kind, 1);
    await seed(store!, generateFernetKey(), 3, 1_700_000_000, "under a key lost in a restart");
    const counting = countingReads(store!);
    const keys = FernetKeys.open(keyFolder(`${OLD}\n${NEW}  # decrypt-only, added 2026-01-02T00:00:00Z\n`));
    const { logger, lines } = capturingLogger();
    const rewrap = startRewrap(counting.store, keys, logger);
    // The clock for "nothing is read": a rewrap on the same timing that holds an old key reads the store once a rest
    // period (it watches for newer records). Three of its reads span two rest periods at least, in which this one
    // would have read the store had it been going to.
    const witness = countingReads(store!);
    startRewrap(
      witness.store,
      FernetKeys.open(keyFolder(`${NEW}  # primary\n${OLD}  # decrypt-only, encrypted until 2026-01-01T00:01:00Z\n`)),
      capturingLogger().logger,
    );
    await waitFor("the count at start", () => rewrap.status().unreadable !== null);
    expect(lines.filter((l) => l.includes("under no Fernet key"))).toEqual([
      expect.stringContaining("3 stored records are under no Fernet key this server holds"),
    ]);
    const [counted, witnessed] = [counting.reads(), witness.reads()];
    await waitFor("three reads by the witness: two rest periods", () => witness.reads() - witnessed >= 3);
    expect({ status: rewrap.status(), reads: counting.reads() - counted }).toEqual({
      status: { state: "idle", pending: 0, by_key: {}, rewrapped: 0, unreadable: 3, kept: [] },
      reads: 0,
    });
    // The promote makes the old primary an old key: now it walks.
    putKeyFile(keys.path.slice(0, keys.path.lastIndexOf("/")), `${NEW}  # primary\n${OLD}  # decrypt-only, encrypted until 2026-01-01T00:01:00Z\n`);
    keys.reload(capturingLogger().logger);
    await waitFor("a walk after the promote", () => counting.reads() > counted && rewrap.status().state === "watching");
  });
});
