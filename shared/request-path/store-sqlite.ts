// RecordStore on node:sqlite in WAL mode: one file shared by every server process on the machine, on Bun or Deno.
import type { DatabaseSync, StatementSync } from "node:sqlite";
import { checkTableName, orUnavailable, unavailable } from "../db/database.ts";
import { execute, immediate, openSqlite, sqliteFailure } from "../db/sqlite.ts";
// What every backend shares (SQL, row mapping, replay rules), as one namespace: each store reads as what it adds.
import * as recordStore from "./record-store.ts";

export class SqliteStore implements recordStore.RecordStore {
  readonly kind = "sqlite" as const;
  readonly #db: DatabaseSync;
  readonly #statements: { [name in Exclude<keyof ReturnType<typeof recordStore.recordSql>, OpenOnly>]: StatementSync };

  private constructor(db: DatabaseSync, table: string) {
    this.#db = db;
    const sql = recordStore.recordSql(table, "sqlite");
    this.#statements = {
      insert: db.prepare(`${sql.insert} RETURNING id`),
      byIdempotencyKey: db.prepare(sql.byIdempotencyKey),
      bumpGeneration: db.prepare(sql.bumpGeneration),
      generation: db.prepare(sql.generation),
      forgetExpiredProofs: db.prepare(sql.forgetExpiredProofs),
      useProof: db.prepare(sql.useProof),
      count: db.prepare(sql.count),
      latest: db.prepare(sql.latest),
      latestOf: db.prepare(sql.latestOf),
      tokensAfter: db.prepare(sql.tokensAfter),
      replaceToken: db.prepare(sql.replaceToken),
      countsBySender: db.prepare(sql.countsBySender),
      countSender: db.prepare(sql.countSender),
      countSenderBy: db.prepare(sql.countSenderBy),
      storeId: db.prepare(sql.storeId),
    };
  }

  static async open(path: string, options: recordStore.StoreOptions = {}): Promise<SqliteStore> {
    const table = checkTableName(options.table ?? "records");
    const db = await openSqlite(path, { what: recordStore.RECORD_STORE, createSchema: (db) => createSchema(db, table) });
    return new SqliteStore(db, table);
  }

  async insert(record: recordStore.NewRecord): Promise<recordStore.InsertResult> {
    const s = this.#statements;
    try {
      const id = immediate(this.#db, () => {
        // A repeat or replay fails on this insert's UNIQUE keys and rolls back, so it is never counted.
        const row = s.insert.get(...recordStore.insertParams(record, Date.now())) as { id: number };
        s.countSender.run(record.sender);
        s.bumpGeneration.run();
        return row.id;
      });
      return { id, server: record.server, repeated: false };
    } catch (error) {
      if (sqliteFailure(error) !== "unique") throw unavailable(recordStore.RECORD_STORE, error);
    }
    const earlier = record.idempotencyKey
      ? await orUnavailable(recordStore.RECORD_STORE, () => s.byIdempotencyKey.get(record.idempotencyKey!) as recordStore.EarlierRecord | undefined)
      : undefined;
    return recordStore.repeatedInsert(record, earlier);
  }

  async insertMany(records: readonly recordStore.NewRecord[]): Promise<void> {
    const s = this.#statements;
    const createdAt = Date.now();
    try {
      immediate(this.#db, () => {
        for (const record of records) s.insert.run(...recordStore.insertParams(record, createdAt));
        for (const [sender, n] of recordStore.sendersIn(records)) s.countSenderBy.run(sender, n);
        s.bumpGeneration.run();
      });
    } catch (error) {
      if (sqliteFailure(error) === "unique") throw recordStore.replayedProof();
      throw unavailable(recordStore.RECORD_STORE, error);
    }
  }

  async generation(): Promise<number> {
    return orUnavailable(recordStore.RECORD_STORE, () => this.#generation());
  }

  async bumpGeneration(proof?: recordStore.ProofUse): Promise<number> {
    const s = this.#statements;
    try {
      return immediate(this.#db, () => {
        if (proof) {
          s.forgetExpiredProofs.run(Math.floor(Date.now() / 1000));
          s.useProof.run(proof.jti, proof.server, proof.expiresAt);
        }
        s.bumpGeneration.run();
        return this.#generation();
      });
    } catch (error) {
      if (sqliteFailure(error) === "unique") throw recordStore.replayedProof();
      throw unavailable(recordStore.RECORD_STORE, error);
    }
  }

  async count(): Promise<number> {
    return orUnavailable(recordStore.RECORD_STORE, () => (this.#statements.count.get() as { n: number }).n);
  }

  async latest(limit: number, sender?: string): Promise<recordStore.StoredRecord[]> {
    const s = this.#statements;
    return orUnavailable(recordStore.RECORD_STORE, () =>
      ((sender === undefined ? s.latest.all(limit) : s.latestOf.all(sender, limit)) as unknown as recordStore.RecordRow[]).map(recordStore.fromRow),
    );
  }

  async tokensAfter(afterId: number, limit: number): Promise<recordStore.StoredToken[]> {
    // A WAL read: it never waits for the write lock.
    return orUnavailable(recordStore.RECORD_STORE, () =>
      (this.#statements.tokensAfter.all(afterId, limit) as unknown as { id: number; token: string }[]).map((r) => ({ id: Number(r.id), token: r.token })),
    );
  }

  async replaceTokens(changes: readonly recordStore.TokenChange[]): Promise<boolean[]> {
    if (changes.length === 0) return [];
    const replace = this.#statements.replaceToken;
    try {
      // One IMMEDIATE transaction a batch: the write lock is held for the batch's updates (a millisecond or two for
      // a few hundred), and each server's changes commit whole.
      return immediate(this.#db, () => changes.map((c) => Number(replace.run(c.next, c.id, c.previous).changes) === 1));
    } catch (error) {
      throw unavailable(recordStore.RECORD_STORE, error);
    }
  }

  async countsBySender(): Promise<Record<string, number>> {
    return orUnavailable(recordStore.RECORD_STORE, () =>
      recordStore.sendersCounted(this.#statements.countsBySender.all() as unknown as { sender: string; n: number }[]),
    );
  }

  async ping(): Promise<void> {
    // A read, never the write lock: a health check must not wait behind another server's commit, which a frozen
    // (SIGSTOPped) server can hold indefinitely.
    await orUnavailable(recordStore.RECORD_STORE, () => this.#generation());
  }

  async storeId(): Promise<string> {
    return orUnavailable(recordStore.RECORD_STORE, () => (this.#statements.storeId.get() as { value: string }).value);
  }

  async close(): Promise<void> {
    this.#db.close();
  }

  #generation(): number {
    return (this.#statements.generation.get() as { value: number }).value;
  }
}

/** Statements used only at open, never prepared per store; and MySQL's multi-row insert, which sqlite runs row by row. */
type OpenOnly = "aggregatesMissing" | "fillAggregates" | "insertRows";

/** Runs inside openSqlite's IMMEDIATE transaction, so no other server inserts while the aggregates are filled. */
function createSchema(db: DatabaseSync, table: string): void {
  execute(
    db,
    `CREATE TABLE IF NOT EXISTS ${table} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    token TEXT NOT NULL,
    jti TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    digest TEXT NOT NULL,
    server INTEGER NOT NULL,
    created_at INTEGER NOT NULL
  )`,
  );
  execute(db, `CREATE TABLE IF NOT EXISTS ${table}_generation (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)`);
  execute(db, `INSERT OR IGNORE INTO ${table}_generation (id, value) VALUES (1, 0)`);
  execute(db, `CREATE INDEX IF NOT EXISTS ${table}_by_sender ON ${table} (sender, id)`);
  execute(
    db,
    `CREATE TABLE IF NOT EXISTS ${table}_used_proofs (jti TEXT NOT NULL, server INTEGER NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (jti, server))`,
  );
  execute(db, `CREATE TABLE IF NOT EXISTS ${table}_senders (sender TEXT PRIMARY KEY, n INTEGER NOT NULL)`);
  execute(db, `CREATE TABLE IF NOT EXISTS ${table}_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)`);
  db.prepare(`INSERT OR IGNORE INTO ${table}_meta (name, value) VALUES ('store_id', ?)`).run(recordStore.newStoreId());
  // A table made before the senders table existed: count its records once, so the first read is right.
  const sql = recordStore.recordSql(table, "sqlite");
  if ((db.prepare(sql.aggregatesMissing).get() as { missing: number }).missing) execute(db, sql.fillAggregates);
}
