import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import mysql from "mysql2/promise";
import { IdempotencyConflict, ProofRejected } from "../platform/errors.ts";
import { recordSql } from "./record-store.ts";
import { describeStoreUrl, openStore, type NewRecord, type RecordStore } from "./store.ts";
import { hostPortOf, LostCommitRelay, multiHostUrl, TEST_MYSQL_URL, uniqueTable } from "../testing/mysql.ts";
import { testedDatabases, UNIT_RUN } from "../testing/unit-run.ts";
import type { MysqlStore } from "./store-mysql.ts";
import { lateBound } from "../testing/timing.ts";

const mysqlTables: string[] = [];
const stores: RecordStore[] = [];
const rawToClose: { close(): Promise<void> }[] = [];

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
  await Promise.all(rawToClose.map((raw) => raw.close()));
  if (mysqlTables.length === 0) return;
  const conn = await mysql.createConnection(TEST_MYSQL_URL);
  for (const table of mysqlTables)
    await conn.query(`DROP TABLE IF EXISTS ${table}, ${table}_generation, ${table}_used_proofs, ${table}_senders, ${table}_meta`);
  await conn.end();
});

let n = 0;
function record(overrides: Partial<NewRecord> = {}): NewRecord {
  n += 1;
  return { sender: "client1", token: `token-${n}`, jti: `jti-${n}-${Math.random()}`, digest: `digest-${n}`, server: 5001, ...overrides };
}

describe.each(testedDatabases(Object.keys(backends)))("%s record store", (kind) => {
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
    expect(latest.map((r) => [r.id, r.sender, r.server])).toEqual([
      [b.id, "client2", 5002],
      [a.id, "client1", 5001],
    ]);
    expect(await store.countsBySender()).toEqual({ client1: 1, client2: 1 });
    await store.ping();
  });

  test("insertMany commits a batch at once: counted per sender, one generation step, latest first; a replayed jti fails all of it", async () => {
    const store = await open();
    await store.insert(record({ sender: "client1" }));
    const before = await store.generation();
    const batch = Array.from({ length: 1203 }, (_, i) => record({ sender: i % 3 === 0 ? "client2" : "client1", token: `batch-${i}` }));
    await store.insertMany(batch);
    expect(await store.count()).toBe(1204);
    expect(await store.countsBySender()).toEqual({ client1: 803, client2: 401 });
    expect(await store.generation()).toBe(before + 1);
    expect((await store.latest(2)).map((r) => r.token)).toEqual(["batch-1202", "batch-1201"]);
    expect((await store.latest(1, "client2")).map((r) => r.token)).toEqual(["batch-1200"]);
    // One jti already stored: nothing of the batch is, and nothing is counted.
    await expect(store.insertMany([record(), record({ jti: batch[5]!.jti })])).rejects.toBeInstanceOf(ProofRejected);
    expect(await store.count()).toBe(1204);
    expect(await store.countsBySender()).toEqual({ client1: 803, client2: 401 });
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
    const g0 = await store.generation();
    const expired = { jti: `old-${Math.random()}`, server: 5001, expiresAt: Math.floor(Date.now() / 1000) - 1 };
    expect(await store.bumpGeneration(expired)).toBe(g0 + 1);
    // Kept, the first use would make this a repeat (ProofRejected): the bump forgot it first, as it was expired.
    expect(await store.bumpGeneration(expired)).toBe(g0 + 2);
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

describe.each(testedDatabases(Object.keys(backends)))("%s record store: re-encryption's compare-and-set (fernet-rewrap.ts)", (kind) => {
  /** Two stores on one database, as two servers have. */
  const twoServers = async (): Promise<[RecordStore, RecordStore]> => {
    const table = uniqueTable("records");
    const path = join(mkdtempSync(join(tmpdir(), "securemesh-store-")), "records.db");
    if (kind === "mysql") mysqlTables.push(table);
    const openOne = () => (kind === "mysql" ? openStore(TEST_MYSQL_URL, { table }) : openStore(path));
    const pair: [RecordStore, RecordStore] = [await openOne(), await openOne()];
    stores.push(...pair);
    return pair;
  };

  test("tokensAfter pages the records in id order; replaceTokens replaces a token only where it is still the one read", async () => {
    const [store] = await twoServers();
    const inserted = [];
    for (let i = 0; i < 7; i++) inserted.push((await store.insert(record({ token: `old-${i}` }))).id);
    const firstPage = await store.tokensAfter(0, 4);
    expect(firstPage).toEqual(inserted.slice(0, 4).map((id, i) => ({ id, token: `old-${i}` })));
    expect((await store.tokensAfter(firstPage.at(-1)!.id, 4)).map((r) => r.token)).toEqual(["old-4", "old-5", "old-6"]);
    expect(await store.tokensAfter(inserted.at(-1)!, 4)).toEqual([]);

    const generation = await store.generation();
    const [a, b, c] = inserted as [number, number, number];
    const taken = await store.replaceTokens([
      { id: a, previous: "old-0", next: "new-0" },
      { id: b, previous: "not what it holds", next: "new-1" },
      // Differs from what it holds in letter case only: base64 is case-sensitive, MySQL's default collations are not.
      { id: c, previous: "OLD-2", next: "new-2" },
    ]);
    expect(taken).toEqual([true, false, false]);
    expect((await store.tokensAfter(0, 3)).map((r) => r.token)).toEqual(["new-0", "old-1", "old-2"]);
    // The same change again: the token is no longer `previous`, so nothing happens.
    expect(await store.replaceTokens([{ id: a, previous: "old-0", next: "newer-0" }])).toEqual([false]);
    expect((await store.tokensAfter(0, 1))[0]!.token).toBe("new-0");
    // The message is the same, so no view computed from the record changes: the generation stays.
    expect(await store.generation()).toBe(generation);
    expect(await store.count()).toBe(7);
    expect(await store.replaceTokens([])).toEqual([]);
  });

  test("a retry of the original request after its token was re-encrypted is still a repeat: the digest keeps what the client sent", async () => {
    const [store] = await twoServers();
    const original = record({ token: "as-the-client-sent-it", digest: "digest-of-the-client-token", idempotencyKey: "retry-after-rotation" });
    const first = await store.insert(original);
    expect(await store.replaceTokens([{ id: first.id, previous: original.token, next: "re-encrypted" }])).toEqual([true]);
    // The client retries the very request (same token, same digest): answered as the repeat it is, not a conflict.
    expect(await store.insert({ ...original, jti: `${original.jti}-retry` })).toEqual({ id: first.id, server: first.server, repeated: true });
    // Other data under that key is still a conflict.
    await expect(store.insert(record({ idempotencyKey: "retry-after-rotation", digest: "other" }))).rejects.toBeInstanceOf(IdempotencyConflict);
    expect((await store.tokensAfter(0, 5)).map((r) => r.token)).toEqual(["re-encrypted"]);
  });

  test("two servers re-encrypting the same records at once: each record is replaced once, by one of them, never overwritten", async () => {
    const [one, two] = await twoServers();
    await one.insertMany(Array.from({ length: 600 }, (_, i) => record({ token: `old-${i}` })));
    const rows = await one.tokensAfter(0, 1000);
    expect(rows.length).toBe(600);
    // Each server walks every record in pages of 50, as fernet-rewrap.ts does, each with tokens of its own.
    const walk = async (store: RecordStore, name: string) => {
      const taken = new Map<number, string>();
      for (let start = 0; start < rows.length; start += 50) {
        const page = rows.slice(start, start + 50).map((r) => ({ id: r.id, previous: r.token, next: `${name}-${r.id}` }));
        const results = await store.replaceTokens(page);
        page.forEach((change, i) => results[i] && taken.set(change.id, change.next));
      }
      return taken;
    };
    const [byOne, byTwo] = await Promise.all([walk(one, "one"), walk(two, "two")]);
    const both = [...byOne.keys()].filter((id) => byTwo.has(id));
    expect({ takenOnce: byOne.size + byTwo.size, byBoth: both.length }).toEqual({ takenOnce: 600, byBoth: 0 });
    // What each record holds is the winner's token: no write landed over another's.
    const final = new Map((await two.tokensAfter(0, 1000)).map((r) => [r.id, r.token]));
    expect(rows.every((r) => final.get(r.id) === (byOne.get(r.id) ?? byTwo.get(r.id)))).toBe(true);
  });
});

/** The database under a store, reached directly: to build an old schema by hand and to check the store's numbers. */
interface RawDatabase {
  url: string;
  table: string;
  /** The records table as it was before the senders aggregates, with the rows given (sender, jti) and nothing else. */
  createOldTable(rows: [sender: string, jti: string][]): Promise<void>;
  rows<T>(sql: string, params?: (string | number)[]): Promise<T[]>;
  close(): Promise<void>;
}

const rawDatabases: Record<string, () => Promise<RawDatabase>> = {
  sqlite: async () => {
    const url = join(mkdtempSync(join(tmpdir(), "securemesh-store-")), "records.db");
    const db = new DatabaseSync(url);
    const table = "records";
    return {
      url,
      table,
      createOldTable: async (rows) => {
        db.exec(`CREATE TABLE ${table} (
          id INTEGER PRIMARY KEY AUTOINCREMENT, sender TEXT NOT NULL, token TEXT NOT NULL, jti TEXT NOT NULL UNIQUE,
          idempotency_key TEXT UNIQUE, digest TEXT NOT NULL, server INTEGER NOT NULL, created_at INTEGER NOT NULL)`);
        db.exec(`CREATE INDEX ${table}_by_sender ON ${table} (sender, id)`);
        const insert = db.prepare(`INSERT INTO ${table} (sender, token, jti, digest, server, created_at) VALUES (?, 't', ?, 'd', 5001, 0)`);
        for (const [sender, jti] of rows) insert.run(sender, jti);
      },
      rows: async <T>(sql: string, params: (string | number)[] = []) => db.prepare(sql).all(...params) as T[],
      close: async () => db.close(),
    };
  },
  mysql: async () => {
    const table = uniqueTable("records");
    mysqlTables.push(table);
    const conn = await mysql.createConnection(TEST_MYSQL_URL);
    return {
      url: TEST_MYSQL_URL,
      table,
      createOldTable: async (rows) => {
        await conn.query(`CREATE TABLE ${table} (
          id BIGINT AUTO_INCREMENT PRIMARY KEY, sender VARCHAR(128) NOT NULL, token MEDIUMTEXT NOT NULL,
          jti VARCHAR(128) NOT NULL UNIQUE, idempotency_key VARCHAR(128) NULL UNIQUE, digest CHAR(43) NOT NULL,
          server INT NOT NULL, created_at BIGINT NOT NULL, INDEX ${table}_by_sender (sender, id)) ENGINE=InnoDB`);
        for (const [sender, jti] of rows) {
          await conn.query(`INSERT INTO ${table} (sender, token, jti, digest, server, created_at) VALUES (?, 't', ?, 'd', 5001, 0)`, [sender, jti]);
        }
      },
      rows: async <T>(sql: string, params: (string | number)[] = []) => (await conn.query(sql, params))[0] as T[],
      close: () => conn.end(),
    };
  },
};

/** What COUNT(*) and GROUP BY over every record say: what the aggregates must match. */
async function countedByScan(raw: RawDatabase): Promise<{ total: number; bySender: Record<string, number> }> {
  const [total] = await raw.rows<{ n: number | string }>(`SELECT COUNT(*) AS n FROM ${raw.table}`);
  const groups = await raw.rows<{ sender: string; n: number | string }>(`SELECT sender, COUNT(*) AS n FROM ${raw.table} GROUP BY sender`);
  return { total: Number(total!.n), bySender: Object.fromEntries(groups.map((g) => [g.sender, Number(g.n)])) };
}

async function expectAggregatesExact(store: RecordStore, raw: RawDatabase): Promise<void> {
  expect({ total: await store.count(), bySender: await store.countsBySender() }).toEqual(await countedByScan(raw));
}

describe.each(testedDatabases(Object.keys(rawDatabases)))("%s record store aggregates", (kind) => {
  const openRaw = async () => {
    const raw = await rawDatabases[kind]!();
    rawToClose.push(raw);
    return raw;
  };
  const openOn = async (raw: RawDatabase) => {
    const store = await openStore(raw.url, { table: raw.table });
    stores.push(store);
    return store;
  };

  test("the total and the counts per sender match a real COUNT(*)/GROUP BY through repeats, replays and conflicts", async () => {
    const raw = await openRaw();
    const store = await openOn(raw);
    expect({ total: await store.count(), bySender: await store.countsBySender() }).toEqual({ total: 0, bySender: {} });
    const keyed = record({ sender: "client1", idempotencyKey: `agg-key-${Math.random()}` });
    await store.insert(keyed);
    await store.insert(record({ sender: "client2" }));
    await store.insert(record({ sender: "client1" }));
    await expectAggregatesExact(store, raw);
    expect(await store.countsBySender()).toEqual({ client1: 2, client2: 1 });

    expect((await store.insert({ ...keyed, server: 5002 })).repeated).toBe(true); // idempotent repeat: no new row
    await expect(store.insert({ ...keyed, token: "other", digest: "other" })).rejects.toBeInstanceOf(IdempotencyConflict);
    await expect(store.insert({ ...record({ sender: "client3" }), jti: keyed.jti })).rejects.toBeInstanceOf(ProofRejected);
    await expectAggregatesExact(store, raw);
    expect(await store.count()).toBe(3);
    expect(await store.countsBySender()).toEqual({ client1: 2, client2: 1 }); // the refused client3 was never counted
  });

  test("concurrent inserts from new and known senders are all counted, without deadlocks", async () => {
    const raw = await openRaw();
    const store = await openOn(raw);
    await Promise.all(Array.from({ length: 40 }, (_, i) => store.insert(record({ sender: `sender-${i % 7}` }))));
    await expectAggregatesExact(store, raw);
    expect(await store.count()).toBe(40);
  });

  test("a store opened on a table made before the aggregates counts its records once, at open", async () => {
    const raw = await openRaw();
    await raw.createOldTable([
      ["client1", "old-1"],
      ["client2", "old-2"],
      ["client1", "old-3"],
      ["client1", "old-4"],
    ]);
    const store = await openOn(raw);
    expect({ total: await store.count(), bySender: await store.countsBySender() }).toEqual({ total: 4, bySender: { client1: 3, client2: 1 } });
    await store.insert(record({ sender: "client2" }));
    await expectAggregatesExact(store, raw);
    // A second open (another server, a restart) finds the aggregates filled and does not count again.
    const again = await openOn(raw);
    expect({ total: await again.count(), bySender: await again.countsBySender() }).toEqual({ total: 5, bySender: { client1: 3, client2: 2 } });
  });

  // The old COUNT(*) and GROUP BY fail this: on sqlite `SCAN records`, on MySQL a full walk of an index (type index).
  test("count, countsBySender and latest read no more than the aggregates and an index: no scan of the records", async () => {
    const raw = await openRaw();
    const store = await openOn(raw);
    // Enough rows that MySQL's optimizer would prefer a full scan if the statements allowed one.
    for (let i = 0; i < 60; i++) await store.insert(record({ sender: `client${i % 3}` }));
    const sql = recordSql(raw.table, store.kind);
    const statements: [string, (string | number)[]][] = [
      [sql.count, []],
      [sql.countsBySender, []],
      [sql.latest, [20]],
      [sql.latestOf, ["client1", 20]],
    ];
    for (const [statement, params] of statements) {
      if (kind === "sqlite") {
        const plan = (await raw.rows<{ detail: string }>(`EXPLAIN QUERY PLAN ${statement}`, params)).map((step) => step.detail);
        expect({ statement, scans: plan.filter((detail) => detail === `SCAN ${raw.table}` || detail.startsWith(`SCAN ${raw.table} `)) }).toEqual({
          statement,
          scans: [],
        });
      } else {
        // ALL scans the table, and index walks a whole index; const, ref and range look rows up by key.
        const plan = await raw.rows<{ table: string | null; type: string | null }>(`EXPLAIN ${statement}`, params);
        const fullScans = plan.filter((step) => step.table === raw.table && (step.type === "ALL" || step.type === "index"));
        expect({ statement, fullScans }).toEqual({ statement, fullScans: [] });
      }
    }
    if (kind === "sqlite") {
      const plan = await raw.rows<{ detail: string }>(`EXPLAIN QUERY PLAN ${sql.latest}`, [20]);
      expect(plan.map((step) => step.detail)).toContain(`SEARCH ${raw.table} USING INTEGER PRIMARY KEY (rowid<?)`);
    }
  });
});

describe("store id (issue 23: a database of another cluster is told apart)", () => {
  test.each(testedDatabases(["sqlite", "mysql"]))("%s: every opening of one database reports its id; another database has another", async (kind) => {
    const dir = mkdtempSync(join(tmpdir(), "securemesh-store-id-"));
    const table = uniqueTable("records");
    if (kind === "mysql") mysqlTables.push(table);
    const location = (name: string) =>
      kind === "sqlite" ? ([join(dir, `${name}.db`), {}] as const) : ([TEST_MYSQL_URL, { table: `${table}${name}` }] as const);
    if (kind === "mysql") mysqlTables.push(`${table}a`, `${table}b`);
    const open = async (name: string) => {
      const [url, options] = location(name);
      const store = await openStore(url, options);
      stores.push(store);
      return store;
    };
    const [first, again, other] = [await open("a"), await open("a"), await open("b")];
    const id = await first.storeId();
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
    expect(await again.storeId()).toBe(id);
    expect(await other.storeId()).not.toBe(id);
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
  expect(performance.now() - started).toBeLessThan(lateBound(1000)); // busy_timeout is 5 s
  frozen.prepare("ROLLBACK").run();
  frozen.close();
});

describe.skipIf(UNIT_RUN)("mysql record store when a node dies under a COMMIT (#14)", () => {
  /** A store on [a relay that loses COMMITs, the real server]: the second node of a multi-host URL sees the first's rows. */
  const openBehindRelay = async () => {
    const relay = await LostCommitRelay.start(hostPortOf(TEST_MYSQL_URL));
    const { host, port } = hostPortOf(TEST_MYSQL_URL);
    const table = uniqueTable("records");
    mysqlTables.push(table);
    const store = (await openStore(multiHostUrl(TEST_MYSQL_URL, [relay.hostPort, `${host}:${port}`]), { table })) as MysqlStore;
    stores.push(store);
    rawToClose.push({ close: () => relay[Symbol.asyncDispose]() });
    return { relay, store };
  };

  test("the retry finds the lost COMMIT's own row by its jti: acknowledged once, stored once, not refused", async () => {
    const { relay, store } = await openBehindRelay();
    const first = record();
    relay.armed = 1;
    const stored = await store.insert(first);
    expect({ lost: relay.lost, repeated: stored.repeated, server: stored.server, stats: store.stats }).toEqual({
      lost: 1,
      repeated: false,
      server: 5001,
      stats: { conflictRetries: 0, failovers: 1, uncertainCommits: 1 },
    });
    expect(await store.count()).toBe(1);
    expect((await store.latest(1))[0]?.id).toBe(stored.id);
    // The same request once more is a replay as ever: only a retry after a lost COMMIT is matched to its row.
    await expect(store.insert(first)).rejects.toBeInstanceOf(ProofRejected);
  });

  test("an invalidation whose COMMIT was lost is acknowledged, not refused as a replayed proof, and bumps once", async () => {
    const { relay, store } = await openBehindRelay();
    const g0 = await store.generation();
    const proof = { jti: `inv-${Math.random()}`, server: 5001, expiresAt: Math.floor(Date.now() / 1000) + 60 };
    relay.armed = 1;
    expect(await store.bumpGeneration(proof)).toBe(g0 + 1);
    expect(relay.lost).toBe(1);
    await expect(store.bumpGeneration(proof)).rejects.toBeInstanceOf(ProofRejected);
  });

  test("an Idempotency-Key retry after a lost COMMIT answers with the first id", async () => {
    const { relay, store } = await openBehindRelay();
    const first = record({ idempotencyKey: `lost-${Math.random()}` });
    relay.armed = 1;
    const stored = await store.insert(first);
    expect(stored.repeated).toBe(false);
    expect(await store.insert({ ...first, server: 5002 })).toEqual({ id: stored.id, server: 5001, repeated: true });
    expect(await store.count()).toBe(1);
  });
});

test("store URLs are described without passwords", () => {
  expect(describeStoreUrl("mysql://root:hunter2@db.example:3307/prod")).toBe("mysql db.example:3307/prod");
  expect(describeStoreUrl("mysql://root:hunter2@10.1.0.11,10.1.0.12:3307/prod")).toBe("mysql 10.1.0.11:3306,10.1.0.12:3307/prod");
  expect(describeStoreUrl("sqlite:/tmp/x.db")).toBe("sqlite /tmp/x.db");
});
