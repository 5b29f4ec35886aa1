// The record store's contract, and the SQL and rules both backends (sqlite, MySQL) share.
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
   * The cache generation every server shares: it changes with every new record and every invalidation, so a
   * server that missed an invalidation (hung, partitioned) still sees that its cached view is old.
   */
  generation(): Promise<number>;
  /**
   * Moves the generation on (an explicit invalidation); returns the new value. With `proof`, the invalidation
   * proof is used up in the same transaction: the same proof at the same server again throws ProofRejected.
   */
  bumpGeneration(proof?: ProofUse): Promise<number>;
  count(): Promise<number>;
  /** The newest records, all senders' or only `sender`'s. */
  latest(limit: number, sender?: string): Promise<StoredRecord[]>;
  countsBySender(): Promise<Record<string, number>>;
  /** A cheap round trip, for health checks. Throws Unavailable when the database is not reachable or writable. */
  ping(): Promise<void>;
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

/** The statements both dialects accept as written; each backend adds its schema and its way of running them. */
export function recordSql(table: string) {
  const columns = `SELECT id, sender, token, server, created_at FROM ${table}`;
  return {
    insert: `INSERT INTO ${table} (sender, token, jti, idempotency_key, digest, server, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)`,
    byIdempotencyKey: `SELECT id, digest, server FROM ${table} WHERE idempotency_key = ?`,
    bumpGeneration: `UPDATE ${table}_generation SET value = value + 1 WHERE id = 1`,
    generation: `SELECT value FROM ${table}_generation WHERE id = 1`,
    forgetExpiredProofs: `DELETE FROM ${table}_used_proofs WHERE expires_at < ?`,
    useProof: `INSERT INTO ${table}_used_proofs (jti, server, expires_at) VALUES (?, ?, ?)`,
    count: `SELECT COUNT(*) AS n FROM ${table}`,
    latest: `${columns} ORDER BY id DESC LIMIT ?`,
    latestOf: `${columns} WHERE sender = ? ORDER BY id DESC LIMIT ?`,
    countsBySender: `SELECT sender, COUNT(*) AS n FROM ${table} GROUP BY sender ORDER BY sender`,
  } as const;
}

/** The parameters of `recordSql(table).insert`, in order. */
export function insertParams(record: NewRecord, createdAt: number): (string | number | null)[] {
  return [record.sender, record.token, record.jti, record.idempotencyKey ?? null, record.digest, record.server, createdAt];
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

/** A row of `recordSql(table).latest`. */
export interface RecordRow {
  id: number | string;
  sender: string;
  token: string;
  server: number;
  created_at: number | string;
}

export function fromRow(row: RecordRow): StoredRecord {
  return { id: Number(row.id), sender: row.sender, token: row.token, server: row.server, createdAt: Number(row.created_at) };
}

/** `recordSql(table).countsBySender` rows as an object. */
export function sendersCounted(rows: readonly { sender: string; n: number | string }[]): Record<string, number> {
  return Object.fromEntries(rows.map((r) => [r.sender, Number(r.n)]));
}
