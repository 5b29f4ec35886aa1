// node:sqlite plumbing for both runtimes: open a shared file safely, IMMEDIATE transactions, and what an error means.
import { closeSync, openSync } from "node:fs";
import { dirname } from "node:path";
import { DatabaseSync, type StatementSync } from "node:sqlite";
import { setTimeout as sleep } from "node:timers/promises";
import { ensurePrivateDir } from "../platform/private-files.ts";
import { describeDatabaseUrl, unavailable } from "./database.ts";

/** What a failed statement means to a store: a UNIQUE or PRIMARY KEY clash, a lock held too long, or anything else. */
export type SqliteFailure = "unique" | "busy" | "other";

// SQLite result codes, as node:sqlite reports them in `errcode`: extended codes keep the primary one in the low byte.
const SQLITE_BUSY = 5;
const SQLITE_CONSTRAINT_PRIMARYKEY = 1555;
const SQLITE_CONSTRAINT_UNIQUE = 2067;

/**
 * Classifies a node:sqlite error by its SQLite result code. Deno 2.9 leaves `errcode` off errors thrown by
 * `DatabaseSync.exec`, so a statement whose failure matters must run as a prepared statement (see `execute`).
 */
export function sqliteFailure(error: unknown): SqliteFailure {
  const { code, errcode } = (error ?? {}) as { code?: unknown; errcode?: unknown };
  if (code !== "ERR_SQLITE_ERROR" || typeof errcode !== "number") return "other";
  if (errcode === SQLITE_CONSTRAINT_UNIQUE || errcode === SQLITE_CONSTRAINT_PRIMARYKEY) return "unique";
  return (errcode & 0xff) === SQLITE_BUSY ? "busy" : "other";
}

/** Runs one statement through `prepare`, so its error carries `errcode` on Deno too (unlike `exec`). */
export function execute(db: DatabaseSync, sql: string): void {
  db.prepare(sql).run();
}

/** Per connection, the three statements of a transaction, prepared once. */
const transactionStatements = new WeakMap<DatabaseSync, { begin: StatementSync; commit: StatementSync; rollback: StatementSync }>();

/**
 * Runs `fn` in a `BEGIN IMMEDIATE` transaction and commits; rolls back and rethrows the original error if `fn` or
 * the commit throws. IMMEDIATE takes the write lock up front: servers share one file, and two DEFERRED
 * transactions that both read then write deadlock upgrading their read locks (one gets BUSY at once, whatever
 * busy_timeout says). `fn` must be synchronous: node:sqlite has one connection per DatabaseSync, so an await
 * inside would let other work run in the middle of the transaction.
 */
export function immediate<T>(db: DatabaseSync, fn: () => T): T {
  let statements = transactionStatements.get(db);
  if (!statements) {
    statements = { begin: db.prepare("BEGIN IMMEDIATE"), commit: db.prepare("COMMIT"), rollback: db.prepare("ROLLBACK") };
    transactionStatements.set(db, statements);
  }
  statements.begin.run();
  try {
    const result = fn();
    statements.commit.run();
    return result;
  } catch (error) {
    // SQLite may already have rolled back (after some I/O errors, or a failed COMMIT it ended); that is not the story.
    if (db.isTransaction) statements.rollback.run();
    throw error;
  }
}

export interface OpenSqliteOptions {
  /** What the file holds, for the error message: "record store", "token store". */
  what: string;
  /** Creates the schema if missing; runs inside an IMMEDIATE transaction, so servers starting together agree. */
  createSchema: (db: DatabaseSync) => void;
}

/** How long a statement waits for another process's write lock before it fails as busy. */
const BUSY_TIMEOUT_MS = 5000;
/** Bounded retries while servers race to create the same file. */
const OPEN_ATTEMPTS = 50;

/**
 * Opens (creating if needed) a sqlite file several processes share, in WAL mode with FULL sync, and creates the
 * schema. Throws Unavailable, naming the file, if that fails. A file it creates is 0600, in folders it creates
 * 0700; a file that exists keeps its mode.
 */
export async function openSqlite(path: string, { what, createSchema }: OpenSqliteOptions): Promise<DatabaseSync> {
  try {
    if (path !== ":memory:") {
      ensurePrivateDir(dirname(path));
      // Created 0600 before SQLite opens it: SQLite would make it 0644 (umask 022), and it gives the -wal and
      // -shm files the database file's mode (measured on Bun and Deno). O_CREAT without O_EXCL: servers starting
      // together may all do this, and none truncates what another wrote.
      closeSync(openSync(path, "a", 0o600));
    }
  } catch (error) {
    throw unavailable(what, error, describeDatabaseUrl(path));
  }
  // Servers starting together race to create the file; SQLite may answer BUSY at once (without waiting for
  // busy_timeout) to avoid a lock deadlock, so set-up is retried a bounded number of times.
  for (let attempt = 1; ; attempt++) {
    let db: DatabaseSync | undefined;
    try {
      db = new DatabaseSync(path);
      execute(db, `PRAGMA busy_timeout = ${BUSY_TIMEOUT_MS}`);
      // WAL lets every server read while one writes; FULL sync makes an acknowledged commit survive power loss.
      execute(db, "PRAGMA journal_mode = WAL");
      execute(db, "PRAGMA synchronous = FULL");
      const opened = db;
      immediate(opened, () => createSchema(opened));
      return opened;
    } catch (error) {
      db?.close();
      if (sqliteFailure(error) !== "busy" || attempt >= OPEN_ATTEMPTS) throw unavailable(what, error, describeDatabaseUrl(path));
      await sleep(10 * Math.min(attempt, 10));
    }
  }
}
