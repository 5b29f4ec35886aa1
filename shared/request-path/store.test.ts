import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import mysql from "mysql2/promise";
import { IdempotencyConflict, ProofRejected } from "../platform/errors.ts";
import { describeStoreUrl, openStore, type NewRecord, type RecordStore } from "./store.ts";
import { TEST_MYSQL_URL, uniqueTable } from "../testing/mysql.ts";

const mysqlTables: string[] = [];
const stores: RecordStore[] = [];

const backends: Record<string, () => Promise<RecordStore>> = {
  sqlite: async () => openStore(join(mkdtempSync(join(tmpdir(), "securemesh-store-")), "records.db")),
  mysql: async () => {
    const table = uniqueTable("records");
    mysqlTables.push(table);
    return openStore(TEST_MYSQL_URL, { table });
  },
};

afterAll(async () => {
  await Promise.all(stores.map((s) => s.close()));
  if (mysqlTables.length === 0) return;
  const conn = await mysql.createConnection(TEST_MYSQL_URL);
  for (const table of mysqlTables) await conn.query(`DROP TABLE IF EXISTS ${table}, ${table}_generation, ${table}_used_proofs`);
  await conn.end();
});

let n = 0;
function record(overrides: Partial<NewRecord> = {}): NewRecord {
  n += 1;
  return { sender: "client1", token: `token-${n}`, jti: `jti-${n}-${Math.random()}`, digest: `digest-${n}`, server: 5001, ...overrides };
}

describe.each(Object.keys(backends))("%s record store", (kind) => {
  const open = async () => {
    const store = await backends[kind]!();
    stores.push(store);
    return store;
  };

  test("inserts, counts and lists the latest first", async () => {
    const store = await open();
    expect(store.kind).toBe(kind as "sqlite" | "mysql");
    const a = await store.insert(record({ sender: "client1" }));
    const b = await store.insert(record({ sender: "client2", server: 5002 }));
    expect(b.id).toBeGreaterThan(a.id);
    expect(await store.count()).toBe(2);
    const latest = await store.latest(10);
    expect(latest.map((r) => [r.id, r.sender, r.server])).toEqual([[b.id, "client2", 5002], [a.id, "client1", 5001]]);
    expect(await store.countsBySender()).toEqual({ client1: 1, client2: 1 });
    await store.ping();
  });

  test("the same Idempotency-Key returns the first result and stores once", async () => {
    const store = await open();
    const first = record({ idempotencyKey: "key-1", server: 5001 });
    const created = await store.insert(first);
    // A failover retry: same proof (jti), same key, another server.
    const retried = await store.insert({ ...first, server: 5002 });
    expect(retried).toEqual({ id: created.id, server: 5001, repeated: true });
    expect(await store.count()).toBe(1);
  });

  test("an Idempotency-Key reused for other data is a conflict", async () => {
    const store = await open();
    await store.insert(record({ idempotencyKey: "key-2" }));
    await expect(store.insert(record({ idempotencyKey: "key-2" }))).rejects.toBeInstanceOf(IdempotencyConflict);
  });

  test("a replayed jti is refused, with or without a new Idempotency-Key", async () => {
    const store = await open();
    const first = record();
    await store.insert(first);
    await expect(store.insert({ ...first, token: "other" })).rejects.toBeInstanceOf(ProofRejected);
    await expect(store.insert({ ...first, idempotencyKey: "fresh" })).rejects.toBeInstanceOf(ProofRejected);
    expect(await store.count()).toBe(1);
  });

  test("the generation moves with every new record and every invalidation, not with repeats", async () => {
    const store = await open();
    const g0 = await store.generation();
    const first = record({ idempotencyKey: "gen-key" });
    await store.insert(first);
    expect(await store.generation()).toBe(g0 + 1);
    await store.insert({ ...first, server: 5002 });
    expect(await store.generation()).toBe(g0 + 1);
    expect(await store.bumpGeneration()).toBe(g0 + 2);
    await expect(store.insert({ ...record(), jti: first.jti })).rejects.toBeInstanceOf(ProofRejected);
    expect(await store.generation()).toBe(g0 + 2);
  });

  test("an invalidation proof is used once per server: again at the same server is refused and bumps nothing", async () => {
    const store = await open();
    const g0 = await store.generation();
    const proof = { jti: `inv-${Math.random()}`, server: 5001, expiresAt: Math.floor(Date.now() / 1000) + 60 };
    expect(await store.bumpGeneration(proof)).toBe(g0 + 1);
    await expect(store.bumpGeneration(proof)).rejects.toBeInstanceOf(ProofRejected);
    expect(await store.generation()).toBe(g0 + 1);
    expect(await store.bumpGeneration({ ...proof, server: 5002 })).toBe(g0 + 2);
  });

  test("used invalidation proofs are forgotten once expired, so the table does not grow (an expired proof is refused before the store)", async () => {
    const store = await open();
    const expired = { jti: `old-${Math.random()}`, server: 5001, expiresAt: Math.floor(Date.now() / 1000) - 1 };
    await store.bumpGeneration(expired);
    await store.bumpGeneration(expired);
  });

  test("latest lists one sender's records when asked, newest first, up to the limit", async () => {
    const store = await open();
    const ids: number[] = [];
    for (const sender of ["client1", "client2", "client1", "client1"]) ids.push((await store.insert(record({ sender }))).id);
    const [, second, third, fourth] = ids as [number, number, number, number];
    expect((await store.latest(2, "client1")).map((r) => r.id)).toEqual([fourth, third]);
    expect((await store.latest(10, "client2")).map((r) => r.id)).toEqual([second]);
    expect(await store.latest(10, "nobody")).toEqual([]);
    const [newest] = await store.latest(1);
    expect(newest).toMatchObject({ id: fourth, sender: "client1", server: 5001 });
    expect(Math.abs(newest!.createdAt - Date.now())).toBeLessThan(60_000);
  });

  test("SQL metacharacters are stored verbatim", async () => {
    const store = await open();
    const nasty = `client'; DROP TABLE records; -- "\\`;
    await store.insert(record({ sender: nasty, token: "' OR '1'='1", idempotencyKey: "k'\"`;" }));
    const [row] = await store.latest(1);
    expect([row!.sender, row!.token]).toEqual([nasty, "' OR '1'='1"]);
  });
});

test("a sqlite ping is a read: it answers while another process holds the write lock", async () => {
  const path = join(mkdtempSync(join(tmpdir(), "securemesh-store-")), "records.db");
  const store = await openStore(path);
  stores.push(store);
  const frozen = new DatabaseSync(path); // a SIGSTOPped server in the middle of a commit
  frozen.prepare("BEGIN IMMEDIATE").run();
  const started = performance.now();
  await store.ping();
  expect(performance.now() - started).toBeLessThan(1000); // busy_timeout is 5 s
  frozen.prepare("ROLLBACK").run();
  frozen.close();
});

test("store URLs are described without passwords", () => {
  expect(describeStoreUrl("mysql://root:hunter2@db.example:3307/prod")).toBe("mysql db.example:3307/prod");
  expect(describeStoreUrl("sqlite:/tmp/x.db")).toBe("sqlite /tmp/x.db");
});
