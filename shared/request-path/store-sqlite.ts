// RecordStore on bun:sqlite in WAL mode: one file shared by every server process on the machine.
import { Database, type Statement } from "bun:sqlite";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { IdempotencyConflict, ProofRejected, Unavailable } from "../platform/errors.ts";
import { checkTableName, type InsertResult, type NewRecord, type ProofUse, type RecordStore, type StoreOptions, type StoredRecord } from "./store.ts";

interface Row {
  id: number;
  sender: string;
  token: string;
  server: number;
  created_at: number;
}

export class SqliteStore implements RecordStore {
  readonly kind = "sqlite" as const;
  readonly #db: Database;
  readonly #table: string;
  readonly #insert: Statement;
  readonly #bump: Statement;
  readonly #generation: Statement<{ value: number }>;
  readonly #byKey: Statement<{ id: number; digest: string; server: number }>;
  readonly #insertAndBump: (record: NewRecord) => number;

  private constructor(db: Database, table: string) {
    this.#db = db;
    this.#table = table;
    this.#insert = db.prepare(
      `INSERT INTO ${table} (sender, token, jti, idempotency_key, digest, server, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id`,
    );
    this.#byKey = db.prepare(`SELECT id, digest, server FROM ${table} WHERE idempotency_key = ?`);
    this.#bump = db.prepare(`UPDATE ${table}_generation SET value = value + 1 WHERE id = 1`);
    this.#generation = db.prepare(`SELECT value FROM ${table}_generation WHERE id = 1`);
    const insertAndBump = db.transaction((r: NewRecord) => {
      const row = this.#insert.get(r.sender, r.token, r.jti, r.idempotencyKey ?? null, r.digest, r.server, Date.now()) as { id: number };
      this.#bump.run();
      return row.id;
    });
    // IMMEDIATE takes the write lock up front, so two servers never deadlock upgrading read locks.
    this.#insertAndBump = (r) => insertAndBump.immediate(r);
  }

  static async open(path: string, options: StoreOptions = {}): Promise<SqliteStore> {
    const table = checkTableName(options.table ?? "records");
    if (path !== ":memory:") mkdirSync(dirname(path), { recursive: true });
    // Servers starting together race to create the file; SQLite may answer BUSY at once (without waiting
    // for busy_timeout) to avoid a lock deadlock, so set-up is retried a bounded number of times.
    for (let attempt = 1; ; attempt++) {
      let db: Database | undefined;
      try {
        db = new Database(path, { create: true, strict: true });
        db.exec("PRAGMA busy_timeout = 5000");
        // WAL lets every server read while one writes; FULL sync makes an acknowledged commit survive power loss.
        db.exec("PRAGMA journal_mode = WAL");
        db.exec("PRAGMA synchronous = FULL");
        db.transaction(() => createSchema(db!, table)).immediate();
        return new SqliteStore(db, table);
      } catch (error) {
        db?.close();
        const code = (error as { code?: string }).code ?? "";
        if (!code.startsWith("SQLITE_BUSY") || attempt >= 50) {
          throw new Unavailable(`cannot open sqlite record store at ${path}: ${(error as Error).message}`, { cause: error });
        }
        await Bun.sleep(10 * Math.min(attempt, 10));
      }
    }
  }

  async insert(record: NewRecord): Promise<InsertResult> {
    try {
      return { id: this.#insertAndBump(record), server: record.server, repeated: false };
    } catch (error) {
      if ((error as { code?: string }).code !== "SQLITE_CONSTRAINT_UNIQUE") throw unavailable(error);
      return this.#resolveConflict(record);
    }
  }

  #resolveConflict(record: NewRecord): InsertResult {
    const earlier = record.idempotencyKey ? this.#byKey.get(record.idempotencyKey) : null;
    if (!earlier) throw new ProofRejected("proof already used (replayed jti)");
    if (earlier.digest !== record.digest) throw new IdempotencyConflict();
    return { id: earlier.id, server: earlier.server, repeated: true };
  }

  async generation(): Promise<number> {
    return this.#read(() => this.#generation.get()!.value);
  }

  async bumpGeneration(proof?: ProofUse): Promise<number> {
    const table = this.#table;
    const bump = this.#db.transaction(() => {
      if (proof) {
        this.#db.query(`DELETE FROM ${table}_used_proofs WHERE expires_at < ?`).run(Math.floor(Date.now() / 1000));
        this.#db.query(`INSERT INTO ${table}_used_proofs (jti, server, expires_at) VALUES (?, ?, ?)`).run(proof.jti, proof.server, proof.expiresAt);
      }
      this.#bump.run();
      return this.#generation.get()!.value;
    });
    try {
      return bump.immediate();
    } catch (error) {
      if ((error as { code?: string }).code === "SQLITE_CONSTRAINT_PRIMARYKEY") throw new ProofRejected("proof already used (replayed jti)");
      throw unavailable(error);
    }
  }

  async count(): Promise<number> {
    return this.#read(() => (this.#db.query(`SELECT COUNT(*) AS n FROM ${this.#table}`).get() as { n: number }).n);
  }

  async latest(limit: number, sender?: string): Promise<StoredRecord[]> {
    const columns = `SELECT id, sender, token, server, created_at FROM ${this.#table}`;
    return this.#read(() =>
      (sender === undefined
        ? this.#db.query(`${columns} ORDER BY id DESC LIMIT ?`).all(limit) as Row[]
        : this.#db.query(`${columns} WHERE sender = ? ORDER BY id DESC LIMIT ?`).all(sender, limit) as Row[]).map(fromRow),
    );
  }

  async countsBySender(): Promise<Record<string, number>> {
    return this.#read(() => {
      const rows = this.#db.query(`SELECT sender, COUNT(*) AS n FROM ${this.#table} GROUP BY sender ORDER BY sender`).all() as { sender: string; n: number }[];
      return Object.fromEntries(rows.map((r) => [r.sender, r.n]));
    });
  }

  async ping(): Promise<void> {
    // A read, never the write lock: a health check must not wait behind another server's commit, which a frozen
    // (SIGSTOPped) server can hold indefinitely.
    this.#read(() => this.#generation.get());
  }

  async close(): Promise<void> {
    this.#db.close();
  }

  #read<T>(fn: () => T): T {
    try {
      return fn();
    } catch (error) {
      throw unavailable(error);
    }
  }
}

function createSchema(db: Database, table: string): void {
  db.exec(`CREATE TABLE IF NOT EXISTS ${table} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    token TEXT NOT NULL,
    jti TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    digest TEXT NOT NULL,
    server INTEGER NOT NULL,
    created_at INTEGER NOT NULL
  )`);
  db.exec(`CREATE TABLE IF NOT EXISTS ${table}_generation (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)`);
  db.exec(`INSERT OR IGNORE INTO ${table}_generation (id, value) VALUES (1, 0)`);
  db.exec(`CREATE INDEX IF NOT EXISTS ${table}_by_sender ON ${table} (sender, id)`);
  db.exec(`CREATE TABLE IF NOT EXISTS ${table}_used_proofs (jti TEXT NOT NULL, server INTEGER NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (jti, server))`);
}

function fromRow(row: Row): StoredRecord {
  return { id: row.id, sender: row.sender, token: row.token, server: row.server, createdAt: row.created_at };
}

function unavailable(error: unknown): Unavailable {
  return new Unavailable("record store unavailable", { cause: error });
}
