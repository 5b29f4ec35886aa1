// RecordStore on MySQL/MariaDB, one node or a Galera cluster, with parameterized queries only.
import { checkTableName, orUnavailable, unavailable } from "../db/database.ts";
import { isDuplicateEntry, openMysql, type MysqlDatabase, type MysqlStats, type SqlValue } from "../db/mysql.ts";
// What every backend shares (SQL, row mapping, replay rules), as one namespace: each store reads as what it adds.
import * as recordStore from "./record-store.ts";

export class MysqlStore implements recordStore.RecordStore {
  readonly kind = "mysql" as const;
  readonly #db: MysqlDatabase;
  readonly #sql: ReturnType<typeof recordStore.recordSql> & { byJti: string };

  private constructor(db: MysqlDatabase, table: string) {
    this.#db = db;
    // Only MySQL asks this: sqlite never loses a COMMIT's answer (see #ownCommit).
    this.#sql = { ...recordStore.recordSql(table, "mysql"), byJti: `SELECT id, sender, digest, server FROM ${table} WHERE jti = ?` };
  }

  static async open(url: string, options: recordStore.StoreOptions = {}): Promise<MysqlStore> {
    const table = checkTableName(options.table ?? "records");
    const db = await openMysql(url, {
      what: recordStore.RECORD_STORE,
      connectionLimit: 8,
      schema: schema(table),
      afterSchema: (db) => fillAggregates(db, table),
    });
    return new MysqlStore(db, table);
  }

  /** How often the database made this store retry or fail over (tests, reports). */
  get stats(): Readonly<MysqlStats> {
    return this.#db.stats;
  }

  /** The node this store uses now (host:port). */
  get currentNode(): string {
    return this.#db.currentNode;
  }

  async insert(record: recordStore.NewRecord): Promise<recordStore.InsertResult> {
    const sql = this.#sql;
    let resumed = false;
    try {
      const id = await this.#db.transaction(async (s, attempt) => {
        resumed = attempt.afterUncertainCommit;
        // The generation row's lock first, as in bumpGeneration: writers queue on it, so the sender row's upsert (and
        // its gap locks, for a new sender) never interleaves with another writer's; and generations follow commits.
        await s.run(sql.bumpGeneration);
        // A repeat or replay fails on this insert's UNIQUE keys and rolls back, so it is never counted.
        const result = await s.run(sql.insert, recordStore.insertParams(record, Date.now()));
        await s.run(sql.countSender, [record.sender]);
        return result.insertId;
      });
      return { id, server: record.server, repeated: false };
    } catch (error) {
      if (!isDuplicateEntry(error)) throw unavailable(recordStore.RECORD_STORE, error);
    }
    const own = resumed ? await this.#ownCommit(record) : undefined;
    if (own) return own;
    const earlier = record.idempotencyKey ? (await this.#rows<recordStore.EarlierRecord>(sql.byIdempotencyKey, [record.idempotencyKey]))[0] : undefined;
    return recordStore.repeatedInsert(record, earlier);
  }

  async insertMany(records: readonly recordStore.NewRecord[]): Promise<void> {
    const sql = this.#sql;
    const createdAt = Date.now();
    let resumed = false;
    try {
      await this.#db.transaction(async (s, attempt) => {
        resumed = attempt.afterUncertainCommit;
        await s.run(sql.bumpGeneration); // the lock order of insert()
        // 500 rows (3,500 parameters) a statement: one round trip each, far below max_allowed_packet.
        for (let start = 0; start < records.length; start += 500) {
          const batch = records.slice(start, start + 500);
          await s.runText(
            sql.insertRows(batch.length),
            batch.flatMap((record) => recordStore.insertParams(record, createdAt)),
          );
        }
        for (const [sender, n] of recordStore.sendersIn(records)) await s.run(sql.countSenderBy, [sender, n]);
      });
    } catch (error) {
      if (!isDuplicateEntry(error)) throw unavailable(recordStore.RECORD_STORE, error);
      if (!(resumed && records[0] && (await this.#ownCommit(records[0])))) throw recordStore.replayedProof();
    }
  }

  async generation(options: { causal?: boolean } = {}): Promise<number> {
    const [row] = await this.#rows<{ value: number | string }>(this.#sql.generation, [], options.causal ?? true);
    return Number(row?.value ?? 0);
  }

  async bumpGeneration(proof?: recordStore.ProofUse): Promise<number> {
    const sql = this.#sql;
    let resumed = false;
    try {
      return await this.#db.transaction(async (s, attempt) => {
        resumed = attempt.afterUncertainCommit;
        // The generation row's lock first: concurrent invalidations (and writes) queue on it, so the DELETE's gap
        // locks never interleave with another transaction's INSERT (that was ER_LOCK_DEADLOCK, a 503).
        await s.run(sql.bumpGeneration);
        if (proof) {
          await s.run(sql.forgetExpiredProofs, [Math.floor(Date.now() / 1000)]);
          await s.run(sql.useProof, [proof.jti, proof.server, proof.expiresAt]);
        }
        const [row] = await s.rows<{ value: number | string }>(sql.generation);
        return Number(row?.value ?? 0);
      });
    } catch (error) {
      if (!isDuplicateEntry(error)) throw unavailable(recordStore.RECORD_STORE, error);
    }
    // The proof's row is the earlier attempt's, whose COMMIT landed although its answer was lost: the invalidation
    // happened once, and is acknowledged now.
    if (resumed) return this.generation();
    throw recordStore.replayedProof();
  }

  async count(): Promise<number> {
    const [row] = await this.#rows<{ n: number | string }>(this.#sql.count);
    return Number(row?.n ?? 0);
  }

  async latest(limit: number, sender?: string): Promise<recordStore.StoredRecord[]> {
    // LIMIT is bound as a string: MySQL 8.0.22+ refuses a number bound to LIMIT in a prepared statement (MariaDB takes both).
    const rows =
      sender === undefined
        ? await this.#rows<recordStore.RecordRow>(this.#sql.latest, [String(limit)])
        : await this.#rows<recordStore.RecordRow>(this.#sql.latestOf, [sender, String(limit)]);
    return rows.map(recordStore.fromRow);
  }

  async tokensAfter(afterId: number, limit: number): Promise<recordStore.StoredToken[]> {
    const rows = await this.#rows<{ id: number | string; token: string }>(this.#sql.tokensAfter, [afterId, String(limit)], false);
    return rows.map((r) => ({ id: Number(r.id), token: r.token }));
  }

  async replaceTokens(changes: readonly recordStore.TokenChange[]): Promise<boolean[]> {
    if (changes.length === 0) return [];
    const sql = this.#sql;
    // Updates in id order, as every server walks the records: two servers on one batch queue on its first row
    // instead of deadlocking. A conflict (deadlock, Galera certification) runs the whole batch again, and each
    // compare-and-set is decided again then. After a COMMIT whose answer was lost, the retry finds its own tokens
    // in place, reports those rows as not taken, and the caller reads them again: nothing is written twice.
    const ordered = [...changes].sort((a, b) => a.id - b.id);
    try {
      const taken = await this.#db.transaction(async (s) => {
        const done = new Set<number>();
        for (const c of ordered) if ((await s.run(sql.replaceToken, [c.next, c.id, c.previous])).affectedRows === 1) done.add(c.id);
        return done;
      });
      return changes.map((c) => taken.has(c.id));
    } catch (error) {
      throw unavailable(recordStore.RECORD_STORE, error);
    }
  }

  async countsBySender(): Promise<Record<string, number>> {
    return recordStore.sendersCounted(await this.#rows<{ sender: string; n: number | string }>(this.#sql.countsBySender));
  }

  async ping(): Promise<void> {
    // A table, not SELECT 1: a Galera node without quorum still answers SELECT 1, but refuses tables (1047), and
    // then this fails over like any read.
    await orUnavailable(recordStore.RECORD_STORE, () => this.#db.rows(this.#sql.generation));
  }

  async storeId(): Promise<string> {
    const [row] = await this.#rows<{ value: string }>(this.#sql.storeId, [], false);
    if (!row) throw unavailable(recordStore.RECORD_STORE, new Error("the store has no id row"));
    return row.value;
  }

  async close(): Promise<void> {
    await this.#db.end();
  }

  /**
   * After an attempt whose COMMIT was sent and whose node died before answering, a retry that clashes on the jti
   * finds either that attempt's own row (same sender and payload: acknowledged now, once) or a real replay.
   */
  async #ownCommit(record: recordStore.NewRecord): Promise<recordStore.InsertResult | undefined> {
    const [row] = await this.#rows<{ id: number | string; sender: string; digest: string; server: number }>(this.#sql.byJti, [record.jti]);
    if (!row || row.sender !== record.sender || row.digest !== record.digest) return undefined;
    return { id: Number(row.id), server: row.server, repeated: false };
  }

  /**
   * Every read is causal on Galera: the generation must show a write committed through another node (else a cache
   * keyed by it serves a view without that write), and the view behind it must be at least that new. Measured on
   * a loopback cluster: about 0.2 ms more a read while another node writes, nothing when idle. Only a health
   * check's generation read passes `causal` false.
   */
  #rows<T>(sql: string, params: SqlValue[] = [], causal = true): Promise<T[]> {
    return orUnavailable(recordStore.RECORD_STORE, () => this.#db.rows<T>(sql, params, { causal }));
  }
}

/**
 * Counts the records of a table made before the senders table existed, once, so the first read is right. The
 * generation row's lock keeps every writer out meanwhile (they take it first), and makes the check-then-fill safe
 * when servers start together; a later open finds the senders rows and scans nothing.
 */
async function fillAggregates(db: MysqlDatabase, table: string): Promise<void> {
  const sql = recordStore.recordSql(table, "mysql");
  await db.transaction(async (s) => {
    await s.rows(`${sql.generation} FOR UPDATE`);
    const [row] = await s.rows<{ missing: number | string }>(sql.aggregatesMissing);
    if (Number(row?.missing)) await s.run(sql.fillAggregates);
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
    `CREATE TABLE IF NOT EXISTS ${table}_meta (name VARCHAR(64) NOT NULL PRIMARY KEY, value VARCHAR(255) NOT NULL) ENGINE=InnoDB`,
    // The first server to create the schema names the store; the others' INSERT IGNORE keeps that name.
    `INSERT IGNORE INTO ${table}_meta (name, value) VALUES ('store_id', '${recordStore.newStoreId()}')`,
    // A table from before #11 was made without this index, and own-records reads name it (FORCE INDEX). MariaDB's
    // IF NOT EXISTS makes this a no-op on newer tables.
    `CREATE INDEX IF NOT EXISTS ${table}_by_sender ON ${table} (sender, id)`,
  ];
}
