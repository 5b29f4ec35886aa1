// The record store's contract, and the SQL and rules both backends (sqlite, MySQL) share.
import { randomUUID } from "node:crypto";
import { IdempotencyConflict, ProofRejected } from "../platform/errors.ts";

export interface NewRecord {
  sender: string;
  /** The Fernet token as received: records stay encrypted at rest. */
  token: string;
  /** The sender proof's jti; unique across all servers, so a replayed proof is refused everywhere. */
  jti: string;
  idempotencyKey?: string;
  /** sha256 of the token, to tell a retry from a different request under the same Idempotency-Key. */
  digest: string;
  server: number;
}

export interface StoredRecord {
  id: number;
  sender: string;
  token: string;
  server: number;
  createdAt: number;
}

/** A record's token, for re-encryption. */
export interface StoredToken {
  id: number;
  token: string;
}

/** One compare-and-set of replaceTokens: record `id`'s token from `previous` to `next`. */
export interface TokenChange {
  id: number;
  previous: string;
  next: string;
}

/** What an insert did: a new record, or the one an earlier request with the same Idempotency-Key made. */
export interface InsertResult {
  id: number;
  server: number;
  repeated: boolean;
}

export interface RecordStore {
  readonly kind: "sqlite" | "mysql";
  /**
   * Commits the record, and bumps the cache generation in the same transaction, before it resolves.
   * Throws ProofRejected on a reused jti, IdempotencyConflict, or Unavailable.
   */
  insert(record: NewRecord): Promise<InsertResult>;
  /**
   * Commits `records` in one transaction, counted, with one generation bump: for filling a store (the bench's
   * million-record stores), not for requests. A reused jti or Idempotency-Key fails the whole batch.
   */
  insertMany(records: readonly NewRecord[]): Promise<void>;
  /**
   * The cache generation every server shares: it changes with every new record and every invalidation, so a
   * server that missed an invalidation (hung, partitioned) still sees that its cached view is old. On Galera the
   * read is causal (it sees every node's commits); `causal: false` reads this node's copy without waiting, for
   * health checks only: a causal read waits behind the commit stall of a lost node, and so would every probe (#14).
   */
  generation(options?: { causal?: boolean }): Promise<number>;
  /**
   * Moves the generation on (an explicit invalidation); returns the new value. With `proof`, the invalidation
   * proof is used up in the same transaction: the same proof at the same server again throws ProofRejected.
   */
  bumpGeneration(proof?: ProofUse): Promise<number>;
  count(): Promise<number>;
  /** The newest records, all senders' or only `sender`'s. */
  latest(limit: number, sender?: string): Promise<StoredRecord[]>;
  /**
   * Up to `limit` records' ids and tokens with ids above `afterId`, in id order: a page of the walk fernet-rewrap.ts
   * makes over the store. A plain read (on Galera not causal: the walk is background work, and never waits out a
   * stalled cluster; a row it misses now it finds on a later walk).
   */
  tokensAfter(afterId: number, limit: number): Promise<StoredToken[]>;
  /**
   * Re-encryption's write: each record's token becomes `next` only if it still is `previous` (compare-and-set:
   * UPDATE … SET token = next WHERE id = ? AND token = previous), all in one transaction; says which took. Several
   * servers may re-encrypt the same record at once: the first to commit wins, the others' updates match no row,
   * and no server ever overwrites a token it did not read. Throws Unavailable.
   *
   * Only the token changes. The digest column keeps the sha256 of the token the client sent, on purpose: it is
   * what a retry of that request is compared with (repeatedInsert, and MySQL's #ownCommit after a lost COMMIT), and
   * a retry carries the client's token, not the re-encrypted one. Nothing compares a stored token with its digest,
   * so a re-encrypted record's digest no longer being its token's is expected. Nor is the cache generation moved:
   * the message is the same, so every view computed from the record is too.
   */
  replaceTokens(changes: readonly TokenChange[]): Promise<boolean[]>;
  countsBySender(): Promise<Record<string, number>>;
  /** A cheap round trip, for health checks. Throws Unavailable when the database is not reachable or writable. */
  ping(): Promise<void>;
  /**
   * The store's own id, made once when its schema is first created and shared by every server that opens the same
   * database: servers behind one coordinator that report different ids write to different databases (issue 23).
   */
  storeId(): Promise<string>;
  close(): Promise<void>;
}

/**
 * One server's use of an invalidation proof. The coordinator sends the same proof to every server, so a proof is
 * used up once per server: a replay is refused by every server it reached (#11 L3).
 */
export interface ProofUse {
  jti: string;
  server: number;
  /** When the proof expires (seconds); the row can be forgotten after that, as the proof is refused anyway. */
  expiresAt: number;
}

export interface StoreOptions {
  /** Table name, so tests can share one database without meeting each other. */
  table?: string;
}

/** What the stores call themselves in Unavailable errors. */
export const RECORD_STORE = "record store";

/**
 * The statements, in the backend's dialect where they differ; each backend adds its schema and its way of running
 * them.
 *
 * Reads never scan the records: the counts live in `${table}_senders` (one row per sender, kept current in each
 * insert's transaction), and the total is summed from it. A sum over a handful of sender rows costs no more than
 * `countsBySender`, which reads them all anyway; and one source of truth means the total and the per-sender counts
 * cannot disagree, nor does the generation table need a new column on existing databases.
 */
export function recordSql(table: string, dialect: RecordStore["kind"]) {
  const columns = `SELECT id, sender, token, server, created_at FROM ${table}`;
  // Named, not left to the optimizer: on a small or skewed table MySQL walks the primary key backwards instead,
  // which reads every record when the sender has few.
  const bySenderIndex = dialect === "mysql" ? `FORCE INDEX (${table}_by_sender)` : `INDEXED BY ${table}_by_sender`;
  const upsert = dialect === "mysql" ? "ON DUPLICATE KEY UPDATE n = n + 1" : "ON CONFLICT (sender) DO UPDATE SET n = n + 1";
  const upsertMany = dialect === "mysql" ? "ON DUPLICATE KEY UPDATE n = n + VALUES(n)" : "ON CONFLICT (sender) DO UPDATE SET n = n + excluded.n";
  const insertColumns = `INSERT INTO ${table} (sender, token, jti, idempotency_key, digest, server, created_at) VALUES`;
  return {
    insert: `${insertColumns} (?, ?, ?, ?, ?, ?, ?)`,
    /** `rows` records in one statement (insertMany, on MySQL: one round trip per batch). */
    insertRows: (rows: number) => `${insertColumns} ${Array.from({ length: rows }, () => "(?, ?, ?, ?, ?, ?, ?)").join(", ")}`,
    byIdempotencyKey: `SELECT id, digest, server FROM ${table} WHERE idempotency_key = ?`,
    bumpGeneration: `UPDATE ${table}_generation SET value = value + 1 WHERE id = 1`,
    generation: `SELECT value FROM ${table}_generation WHERE id = 1`,
    forgetExpiredProofs: `DELETE FROM ${table}_used_proofs WHERE expires_at < ?`,
    useProof: `INSERT INTO ${table}_used_proofs (jti, server, expires_at) VALUES (?, ?, ?)`,
    count: `SELECT COALESCE(SUM(n), 0) AS n FROM ${table}_senders`,
    // Bounding id by MAX(id) (one primary-key seek) walks the same few rows as a bare ORDER BY id DESC LIMIT, but
    // lets sqlite's EXPLAIN QUERY PLAN show it as a primary-key SEARCH rather than a SCAN that happens to stop early.
    latest: `${columns} WHERE id <= (SELECT MAX(id) FROM ${table}) ORDER BY id DESC LIMIT ?`,
    latestOf: `${columns} ${bySenderIndex} WHERE sender = ? ORDER BY id DESC LIMIT ?`,
    tokensAfter: `SELECT id, token FROM ${table} WHERE id > ? ORDER BY id LIMIT ?`,
    // By primary key, so it locks (MySQL) that one row and no gap: an insert never waits on it. The token compares
    // byte for byte, whatever the column's collation: MySQL's default ones ignore case, and base64 does not.
    replaceToken: `UPDATE ${table} SET token = ? WHERE id = ? AND token = ${dialect === "mysql" ? "CAST(? AS BINARY)" : "?"}`,
    /** In each insert's transaction: the new record's sender counted once more. */
    countSender: `INSERT INTO ${table}_senders (sender, n) VALUES (?, 1) ${upsert}`,
    /** In insertMany's transaction: a sender counted `n` times more. */
    countSenderBy: `INSERT INTO ${table}_senders (sender, n) VALUES (?, ?) ${upsertMany}`,
    countsBySender: `SELECT sender, n FROM ${table}_senders ORDER BY sender`,
    storeId: `SELECT value FROM ${table}_meta WHERE name = 'store_id'`,
    // For a store whose records predate the senders table: run once, under the write lock, at open.
    aggregatesMissing: `SELECT (EXISTS (SELECT 1 FROM ${table}) AND NOT EXISTS (SELECT 1 FROM ${table}_senders)) AS missing`,
    fillAggregates: `INSERT INTO ${table}_senders (sender, n) SELECT sender, COUNT(*) FROM ${table} GROUP BY sender`,
  } as const;
}

/** The parameters of `recordSql(…).insert`, in order. */
export function insertParams(record: NewRecord, createdAt: number): (string | number | null)[] {
  return [record.sender, record.token, record.jti, record.idempotencyKey ?? null, record.digest, record.server, createdAt];
}

/** How many records of each sender a batch holds, for `countSenderBy`. */
export function sendersIn(records: readonly NewRecord[]): Map<string, number> {
  const counts = new Map<string, number>();
  for (const r of records) counts.set(r.sender, (counts.get(r.sender) ?? 0) + 1);
  return counts;
}

/** An earlier record found by Idempotency-Key; ids are read with Number(), as mysql2 may hand BIGINTs back as strings. */
export interface EarlierRecord {
  id: number | string;
  digest: string;
  server: number;
}

/**
 * The answer to an insert that hit a UNIQUE key: the earlier result if it was a retry of the same request (same
 * Idempotency-Key, same data), else a replayed jti or a key reused for other data.
 */
export function repeatedInsert(record: NewRecord, earlier: EarlierRecord | undefined): InsertResult {
  if (!earlier) throw replayedProof();
  if (earlier.digest !== record.digest) throw new IdempotencyConflict();
  return { id: Number(earlier.id), server: earlier.server, repeated: true };
}

/** A proof's jti already used: for a record, anywhere; for an invalidation, at this server. */
export function replayedProof(): ProofRejected {
  return new ProofRejected("proof already used (replayed jti)");
}

/** A row of `recordSql(…).latest`. */
export interface RecordRow {
  id: number | string;
  sender: string;
  token: string;
  server: number;
  created_at: number | string;
}

/** A new store's id: a random UUID, so two databases never share one by chance. */
export function newStoreId(): string {
  return randomUUID();
}

export function fromRow(row: RecordRow): StoredRecord {
  return { id: Number(row.id), sender: row.sender, token: row.token, server: row.server, createdAt: Number(row.created_at) };
}

/** `recordSql(…).countsBySender` rows as an object. */
export function sendersCounted(rows: readonly { sender: string; n: number | string }[]): Record<string, number> {
  return Object.fromEntries(rows.map((r) => [r.sender, Number(r.n)]));
}
