// RecordStore on MySQL/MariaDB through a mysql2 pool, with parameterized queries only.
import type mysql from "mysql2/promise";
import { checkTableName, orUnavailable, unavailable } from "../db/database.ts";
import { isDuplicateEntry, openMysql, selectRows, transaction, type SqlValue } from "../db/mysql.ts";
import {
  fromRow, insertParams, RECORD_STORE, recordSql, repeatedInsert, replayedProof, sendersCounted, sendersIn,
  type EarlierRecord, type InsertResult, type NewRecord, type ProofUse, type RecordRow, type RecordStore, type StoreOptions, type StoredRecord,
} from "./record-store.ts";

export class MysqlStore implements RecordStore {
  readonly kind = "mysql" as const;
  readonly #pool: mysql.Pool;
  readonly #sql: ReturnType<typeof recordSql>;

  private constructor(pool: mysql.Pool, table: string) {
    this.#pool = pool;
    this.#sql = recordSql(table, "mysql");
  }

  static async open(url: string, options: StoreOptions = {}): Promise<MysqlStore> {
    const table = checkTableName(options.table ?? "records");
    const pool = await openMysql(url, { what: RECORD_STORE, connectionLimit: 8, schema: schema(table), afterSchema: (pool) => fillAggregates(pool, table) });
    return new MysqlStore(pool, table);
  }

  async insert(record: NewRecord): Promise<InsertResult> {
    const sql = this.#sql;
    try {
      const id = await transaction(this.#pool, async (conn) => {
        // The generation row's lock first, as in bumpGeneration: writers queue on it, so the sender row's upsert (and
        // its gap locks, for a new sender) never interleaves with another writer's; and generations follow commits.
        await conn.execute(sql.bumpGeneration);
        // A repeat or replay fails on this insert's UNIQUE keys and rolls back, so it is never counted.
        const [result] = await conn.execute<mysql.ResultSetHeader>(sql.insert, insertParams(record, Date.now()));
        await conn.execute(sql.countSender, [record.sender]);
        return result.insertId;
      });
      return { id, server: record.server, repeated: false };
    } catch (error) {
      if (!isDuplicateEntry(error)) throw unavailable(RECORD_STORE, error);
    }
    const earlier = record.idempotencyKey ? (await this.#rows<EarlierRecord>(sql.byIdempotencyKey, [record.idempotencyKey]))[0] : undefined;
    return repeatedInsert(record, earlier);
  }

  async insertMany(records: readonly NewRecord[]): Promise<void> {
    const sql = this.#sql;
    const createdAt = Date.now();
    try {
      await transaction(this.#pool, async (conn) => {
        await conn.execute(sql.bumpGeneration); // the lock order of insert()
        // 500 rows (3,500 parameters) a statement: one round trip each, far below max_allowed_packet.
        for (let start = 0; start < records.length; start += 500) {
          const batch = records.slice(start, start + 500);
          await conn.query(sql.insertRows(batch.length), batch.flatMap((record) => insertParams(record, createdAt)));
        }
        for (const [sender, n] of sendersIn(records)) await conn.execute(sql.countSenderBy, [sender, n]);
      });
    } catch (error) {
      if (isDuplicateEntry(error)) throw replayedProof();
      throw unavailable(RECORD_STORE, error);
    }
  }

  async generation(): Promise<number> {
    const [row] = await this.#rows<{ value: number | string }>(this.#sql.generation);
    return Number(row?.value ?? 0);
  }

  async bumpGeneration(proof?: ProofUse): Promise<number> {
    const sql = this.#sql;
    try {
      return await transaction(this.#pool, async (conn) => {
        // The generation row's lock first: concurrent invalidations (and writes) queue on it, so the DELETE's gap
        // locks never interleave with another transaction's INSERT (that was ER_LOCK_DEADLOCK, a 503).
        await conn.execute(sql.bumpGeneration);
        if (proof) {
          await conn.execute(sql.forgetExpiredProofs, [Math.floor(Date.now() / 1000)]);
          await conn.execute(sql.useProof, [proof.jti, proof.server, proof.expiresAt]);
        }
        const [row] = await selectRows<{ value: number | string }>(conn, sql.generation);
        return Number(row?.value ?? 0);
      });
    } catch (error) {
      if (isDuplicateEntry(error)) throw replayedProof();
      throw unavailable(RECORD_STORE, error);
    }
  }

  async count(): Promise<number> {
    const [row] = await this.#rows<{ n: number | string }>(this.#sql.count);
    return Number(row?.n ?? 0);
  }

  async latest(limit: number, sender?: string): Promise<StoredRecord[]> {
    // LIMIT is bound as a string: MySQL 8.0.22+ refuses a number bound to LIMIT in a prepared statement (MariaDB takes both).
    const rows = sender === undefined
      ? await this.#rows<RecordRow>(this.#sql.latest, [String(limit)])
      : await this.#rows<RecordRow>(this.#sql.latestOf, [sender, String(limit)]);
    return rows.map(fromRow);
  }

  async countsBySender(): Promise<Record<string, number>> {
    return sendersCounted(await this.#rows<{ sender: string; n: number | string }>(this.#sql.countsBySender));
  }

  async ping(): Promise<void> {
    await this.#rows("SELECT 1");
  }

  async close(): Promise<void> {
    await this.#pool.end();
  }

  #rows<T>(sql: string, params: SqlValue[] = []): Promise<T[]> {
    return orUnavailable(RECORD_STORE, () => selectRows<T>(this.#pool, sql, params));
  }
}

/**
 * Counts the records of a table made before the senders table existed, once, so the first read is right. The
 * generation row's lock keeps every writer out meanwhile (they take it first), and makes the check-then-fill safe
 * when servers start together; a later open finds the senders rows and scans nothing.
 */
async function fillAggregates(pool: mysql.Pool, table: string): Promise<void> {
  const sql = recordSql(table, "mysql");
  await transaction(pool, async (conn) => {
    await conn.execute(`${sql.generation} FOR UPDATE`);
    const [row] = await selectRows<{ missing: number | string }>(conn, sql.aggregatesMissing);
    if (Number(row?.missing)) await conn.execute(sql.fillAggregates);
  });
}

function schema(table: string): string[] {
  return [
    `CREATE TABLE IF NOT EXISTS ${table} (
      id BIGINT AUTO_INCREMENT PRIMARY KEY,
      sender VARCHAR(128) NOT NULL,
      token MEDIUMTEXT NOT NULL,
      jti VARCHAR(128) NOT NULL UNIQUE,
      idempotency_key VARCHAR(128) NULL UNIQUE,
      digest CHAR(43) NOT NULL,
      server INT NOT NULL,
      created_at BIGINT NOT NULL,
      INDEX ${table}_by_sender (sender, id)
    ) ENGINE=InnoDB`,
    `CREATE TABLE IF NOT EXISTS ${table}_used_proofs (
      jti VARCHAR(128) NOT NULL, server INT NOT NULL, expires_at BIGINT NOT NULL, PRIMARY KEY (jti, server)
    ) ENGINE=InnoDB`,
    `CREATE TABLE IF NOT EXISTS ${table}_generation (id TINYINT PRIMARY KEY, value BIGINT NOT NULL) ENGINE=InnoDB`,
    `INSERT IGNORE INTO ${table}_generation (id, value) VALUES (1, 0)`,
    `CREATE TABLE IF NOT EXISTS ${table}_senders (sender VARCHAR(128) NOT NULL PRIMARY KEY, n BIGINT NOT NULL) ENGINE=InnoDB`,
    // A table from before #11 was made without this index, and own-records reads name it (FORCE INDEX). MariaDB's
    // IF NOT EXISTS makes this a no-op on newer tables.
    `CREATE INDEX IF NOT EXISTS ${table}_by_sender ON ${table} (sender, id)`,
  ];
}
