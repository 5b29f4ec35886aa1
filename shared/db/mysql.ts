// mysql2 plumbing for both stores: a pool from a URL, the schema on open, transactions that roll back, duplicate keys.
import mysql from "mysql2/promise";
import { describeDatabaseUrl, unavailable } from "./database.ts";

/** A value a parameterized query may bind. */
export type SqlValue = string | number | null;

export interface OpenMysqlOptions {
  /** What the database holds, for the error message: "record store", "token store". */
  what: string;
  /** CREATE … IF NOT EXISTS statements (and idempotent seed rows), run in order. */
  schema: readonly string[];
  /** Runs after the schema, before the pool is handed out (a one-off fill of new tables, say); a failure fails the open. */
  afterSchema?: (pool: mysql.Pool) => Promise<void>;
  connectionLimit: number;
}

/**
 * A pool for `url` (mysql://user:pass@host:port/db) with the schema created. A short connect timeout lets a
 * request fail over instead of hanging on an unreachable database; keep-alive spots a half-open connection.
 * Throws Unavailable, naming the server but never the password, if the schema cannot be created.
 */
export async function openMysql(url: string, { what, schema, afterSchema, connectionLimit }: OpenMysqlOptions): Promise<mysql.Pool> {
  const pool = mysql.createPool({ uri: url, connectionLimit, connectTimeout: 2000, enableKeepAlive: true });
  try {
    for (const statement of schema) await pool.query(statement);
    await afterSchema?.(pool);
  } catch (error) {
    await pool.end().catch(() => {});
    throw unavailable(what, error, describeDatabaseUrl(url));
  }
  return pool;
}

/**
 * Runs `fn` on one connection in a transaction and commits; rolls back and rethrows the original error if `fn` or
 * the commit throws. A failure to get a connection is rethrown as is, so callers classify every error in one place.
 */
export async function transaction<T>(pool: mysql.Pool, fn: (conn: mysql.PoolConnection) => Promise<T>): Promise<T> {
  const conn = await pool.getConnection();
  try {
    await conn.beginTransaction();
    const result = await fn(conn);
    await conn.commit();
    return result;
  } catch (error) {
    await conn.rollback().catch(() => {}); // a dead connection cannot roll back, and the server discards its work anyway
    throw error;
  } finally {
    conn.release();
  }
}

/** The rows of one parameterized query. */
export async function selectRows<T>(pool: mysql.Pool | mysql.PoolConnection, sql: string, params: SqlValue[] = []): Promise<T[]> {
  const [rows] = await pool.execute(sql, params);
  return rows as T[];
}

/** A UNIQUE or PRIMARY KEY clash. */
export function isDuplicateEntry(error: unknown): boolean {
  return (error as { code?: unknown } | null)?.code === "ER_DUP_ENTRY";
}
