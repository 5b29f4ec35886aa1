// What a MySQL/MariaDB error means to a store: its own business, a transaction to run again, or a node to leave (#14).

/**
 * - `duplicate`: a UNIQUE or PRIMARY KEY clash, which the store answers (a repeat, a replay).
 * - `conflict`: a deadlock, or Galera refusing the transaction at certification (both 1213). Nothing was committed
 *   anywhere, so the whole transaction may run again.
 * - `node`: this node cannot serve now: unreachable, connection lost, timed out, shutting down, read-only, or a
 *   Galera node without quorum (non-Primary). Another node may.
 * - `other`: anything else (bad SQL, a bug): not retried.
 */
export type MysqlFailure = "duplicate" | "conflict" | "node" | "other";

const DUPLICATE = new Set([1062]); // ER_DUP_ENTRY
const CONFLICT = new Set([1213]); // ER_LOCK_DEADLOCK, also Galera's certification failure and brute-force abort
const NODE = new Set([
  1040, // ER_CON_COUNT_ERROR: too many connections
  1047, // ER_UNKNOWN_COM_ERROR: "WSREP has not yet prepared node for application use" (non-Primary, not synced)
  1053, // ER_SERVER_SHUTDOWN
  1180, // ER_ERROR_DURING_COMMIT: Galera lost the Primary Component while committing
  1290, // ER_OPTION_PREVENTS_STATEMENT: read-only
  1927, // ER_CONNECTION_KILLED
  2006,
  2013, // CR_SERVER_GONE_ERROR, CR_SERVER_LOST
]);
/** Driver and socket codes that mean the connection, not the statement, failed. */
const NODE_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
  "PROTOCOL_CONNECTION_LOST",
  "PROTOCOL_SEQUENCE_TIMEOUT",
  "ERR_STATEMENT_TIMEOUT",
  "ERR_CAUSAL_READ_FAILED",
]);

/** ER_LOCK_WAIT_TIMEOUT: what Galera answers a causal read (wsrep_sync_wait) that cannot catch up with the cluster. */
export const LOCK_WAIT_TIMEOUT = 1205;

export function classifyMysqlError(error: unknown): MysqlFailure {
  const { errno, code, fatal } = (error ?? {}) as { errno?: unknown; code?: unknown; fatal?: unknown };
  if (typeof errno === "number" && DUPLICATE.has(errno)) return "duplicate";
  if (typeof errno === "number" && CONFLICT.has(errno)) return "conflict";
  if (typeof errno === "number" && NODE.has(errno)) return "node";
  if (typeof code === "string" && NODE_CODES.has(code)) return "node";
  // mysql2 marks errors after which the connection is unusable; an AggregateError (IPv4 and IPv6 refused) has a code.
  if (fatal === true) return "node";
  return "other";
}

/** A UNIQUE or PRIMARY KEY clash. */
export function isDuplicateEntry(error: unknown): boolean {
  return classifyMysqlError(error) === "duplicate";
}

/**
 * A causal read the node could not serve: Galera ends it with 1205 when the node cannot catch up with the
 * cluster, as when it is losing quorum (a KeyServer's token read got that as a 503, #14). Another node can.
 */
export class CausalReadFailed extends Error {
  readonly code = "ERR_CAUSAL_READ_FAILED";
  constructor(cause: unknown) {
    super("a causal read could not catch up with the cluster on this node (1205): it is losing or has lost quorum", { cause });
  }
}

/** A statement (or a connection attempt) that took longer than the node may take: the node counts as failed. */
export class StatementTimeout extends Error {
  readonly code = "ERR_STATEMENT_TIMEOUT";
  constructor(node: string, ms: number) {
    super(`no answer from ${node} within ${ms} ms`);
  }
}
