// RecordStore on MySQL/MariaDB through a mysql2 pool, with parameterized queries only.
import mysql from "mysql2/promise";
import { IdempotencyConflict, ProofRejected, Unavailable } from "../platform/errors.ts";
import { checkTableName, type InsertResult, type NewRecord, type ProofUse, type RecordStore, type StoreOptions, type StoredRecord } from "./store.ts";

export class MysqlStore implements RecordStore {
  readonly kind = "mysql" as const;
  readonly #pool: mysql.Pool;
  readonly #table: string;

  private constructor(pool: mysql.Pool, table: string) {
    this.#pool = pool;
    this.#table = table;
  }

  static async open(url: string, options: StoreOptions = {}): Promise<MysqlStore> {
    const table = checkTableName(options.table ?? "records");
    const pool = mysql.createPool({ uri: url, connectionLimit: 8, connectTimeout: 2000, enableKeepAlive: true });
    const store = new MysqlStore(pool, table);
    try {
      await pool.query(`CREATE TABLE IF NOT EXISTS ${table} (
        id BIGINT AUTO_INCREMENT PRIMARY KEY,
        sender VARCHAR(128) NOT NULL,
        token MEDIUMTEXT NOT NULL,
        jti VARCHAR(128) NOT NULL UNIQUE,
        idempotency_key VARCHAR(128) NULL UNIQUE,
        digest CHAR(43) NOT NULL,
        server INT NOT NULL,
        created_at BIGINT NOT NULL,
        INDEX ${table}_by_sender (sender, id)
      ) ENGINE=InnoDB`);
      await pool.query(`CREATE TABLE IF NOT EXISTS ${table}_used_proofs (
        jti VARCHAR(128) NOT NULL, server INT NOT NULL, expires_at BIGINT NOT NULL, PRIMARY KEY (jti, server)
      ) ENGINE=InnoDB`);
      await pool.query(`CREATE TABLE IF NOT EXISTS ${table}_generation (id TINYINT PRIMARY KEY, value BIGINT NOT NULL) ENGINE=InnoDB`);
      await pool.query(`INSERT IGNORE INTO ${table}_generation (id, value) VALUES (1, 0)`);
    } catch (error) {
      await pool.end().catch(() => {});
      throw new Unavailable(`cannot open MySQL record store: ${(error as { code?: string }).code ?? (error as Error).message}`, { cause: error });
    }
    return store;
  }

  async insert(record: NewRecord): Promise<InsertResult> {
    let conn: mysql.PoolConnection;
    try {
      conn = await this.#pool.getConnection();
    } catch (error) {
      throw unavailable(error);
    }
    try {
      await conn.beginTransaction();
      const [result] = await conn.execute<mysql.ResultSetHeader>(
        `INSERT INTO ${this.#table} (sender, token, jti, idempotency_key, digest, server, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)`,
        [record.sender, record.token, record.jti, record.idempotencyKey ?? null, record.digest, record.server, Date.now()],
      );
      // The generation row's lock also orders commits, so generations follow commit order, not id order.
      await conn.execute(`UPDATE ${this.#table}_generation SET value = value + 1 WHERE id = 1`);
      await conn.commit();
      return { id: result.insertId, server: record.server, repeated: false };
    } catch (error) {
      await conn.rollback().catch(() => {});
      if ((error as { code?: string }).code !== "ER_DUP_ENTRY") throw unavailable(error);
      return this.#resolveConflict(record);
    } finally {
      conn.release();
    }
  }

  async generation(): Promise<number> {
    const [row] = await this.#rows<{ value: number }>(`SELECT value FROM ${this.#table}_generation WHERE id = 1`);
    return Number(row?.value ?? 0);
  }

  async bumpGeneration(proof?: ProofUse): Promise<number> {
    let conn: mysql.PoolConnection;
    try {
      conn = await this.#pool.getConnection();
    } catch (error) {
      throw unavailable(error);
    }
    try {
      await conn.beginTransaction();
      // The generation row's lock first: concurrent invalidations (and writes) queue on it, so the DELETE's gap
      // locks never interleave with another transaction's INSERT (that was ER_LOCK_DEADLOCK, a 503).
      await conn.execute(`UPDATE ${this.#table}_generation SET value = value + 1 WHERE id = 1`);
      if (proof) {
        await conn.execute(`DELETE FROM ${this.#table}_used_proofs WHERE expires_at < ?`, [Math.floor(Date.now() / 1000)]);
        await conn.execute(`INSERT INTO ${this.#table}_used_proofs (jti, server, expires_at) VALUES (?, ?, ?)`, [proof.jti, proof.server, proof.expiresAt]);
      }
      const [rows] = await conn.execute<mysql.RowDataPacket[]>(`SELECT value FROM ${this.#table}_generation WHERE id = 1`);
      await conn.commit();
      return Number(rows[0]?.value ?? 0);
    } catch (error) {
      await conn.rollback().catch(() => {});
      if ((error as { code?: string }).code === "ER_DUP_ENTRY") throw new ProofRejected("proof already used (replayed jti)");
      throw unavailable(error);
    } finally {
      conn.release();
    }
  }

  async #resolveConflict(record: NewRecord): Promise<InsertResult> {
    const earlier = record.idempotencyKey
      ? (await this.#rows<{ id: number; digest: string; server: number }>(
          `SELECT id, digest, server FROM ${this.#table} WHERE idempotency_key = ?`, [record.idempotencyKey],
        ))[0]
      : undefined;
    if (!earlier) throw new ProofRejected("proof already used (replayed jti)");
    if (earlier.digest !== record.digest) throw new IdempotencyConflict();
    return { id: Number(earlier.id), server: earlier.server, repeated: true };
  }

  async count(): Promise<number> {
    const [row] = await this.#rows<{ n: number }>(`SELECT COUNT(*) AS n FROM ${this.#table}`);
    return Number(row?.n ?? 0);
  }

  async latest(limit: number, sender?: string): Promise<StoredRecord[]> {
    const columns = `SELECT id, sender, token, server, created_at FROM ${this.#table}`;
    const rows = await this.#rows<{ id: number; sender: string; token: string; server: number; created_at: number }>(
      sender === undefined ? `${columns} ORDER BY id DESC LIMIT ?` : `${columns} WHERE sender = ? ORDER BY id DESC LIMIT ?`,
      sender === undefined ? [String(limit)] : [sender, String(limit)],
    );
    return rows.map((r) => ({ id: Number(r.id), sender: r.sender, token: r.token, server: r.server, createdAt: Number(r.created_at) }));
  }

  async countsBySender(): Promise<Record<string, number>> {
    const rows = await this.#rows<{ sender: string; n: number }>(`SELECT sender, COUNT(*) AS n FROM ${this.#table} GROUP BY sender ORDER BY sender`);
    return Object.fromEntries(rows.map((r) => [r.sender, Number(r.n)]));
  }

  async ping(): Promise<void> {
    await this.#rows("SELECT 1");
  }

  async close(): Promise<void> {
    await this.#pool.end();
  }

  async #rows<T>(sql: string, params: (string | number | null)[] = []): Promise<T[]> {
    try {
      const [rows] = await this.#pool.execute(sql, params);
      return rows as T[];
    } catch (error) {
      throw unavailable(error);
    }
  }
}

function unavailable(error: unknown): Unavailable {
  return new Unavailable("record store unavailable", { cause: error });
}
