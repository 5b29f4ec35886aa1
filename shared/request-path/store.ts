// The record store every server shares: one interface, bun:sqlite by default, MySQL when given a mysql:// URL.
import { join, resolve } from "node:path";
import { displayPath, REPO_ROOT } from "../platform/config.ts";

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

export const DEFAULT_SQLITE_PATH = join(REPO_ROOT, "data", "records.db");

/** Table names are interpolated into SQL, so only plain identifiers are accepted. */
export function checkTableName(table: string): string {
  if (!/^[A-Za-z_][A-Za-z0-9_]{0,63}$/.test(table)) throw new TypeError(`invalid table name '${table}'`);
  return table;
}

/**
 * Opens the store that `url` names: `mysql://user:pass@host:port/db`, `sqlite:path`, a plain path, or nothing for
 * the embedded default (data/records.db). The schema is created if missing.
 */
export async function openStore(url: string | undefined, options: StoreOptions = {}): Promise<RecordStore> {
  if (url?.startsWith("mysql://")) {
    const { MysqlStore } = await import("./store-mysql.ts");
    return MysqlStore.open(url, options);
  }
  const { SqliteStore } = await import("./store-sqlite.ts");
  return SqliteStore.open(url ? url.replace(/^sqlite:(\/\/)?/, "") : DEFAULT_SQLITE_PATH, options);
}

/** A safe description of a store URL for logs: never the password, and a repository-relative path. */
export function describeStoreUrl(url: string | undefined): string {
  if (!url) return `sqlite ${displayPath(DEFAULT_SQLITE_PATH)}`;
  if (!url.startsWith("mysql://")) return `sqlite ${displayPath(resolve(url.replace(/^sqlite:(\/\/)?/, "")))}`;
  try {
    const u = new URL(url);
    return `mysql ${u.hostname}:${u.port || 3306}${u.pathname}`;
  } catch {
    return "mysql (unparseable URL)";
  }
}
