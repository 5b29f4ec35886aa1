// mysql2 plumbing for both stores: one node or a Galera cluster from a URL, the schema on open, failover between the
// nodes, and transactions that roll back and run again when Galera refuses them (#14).
import type mysql from "mysql2/promise";
import { setTimeout as sleep } from "node:timers/promises";
import { describeDatabaseUrl, mysqlNodeUrls, unavailable } from "./database.ts";
import { CausalReadFailed, classifyMysqlError, LOCK_WAIT_TIMEOUT, StatementTimeout } from "./mysql-failures.ts";

export { isDuplicateEntry } from "./mysql-failures.ts";

/** A value a parameterized query may bind. */
export type SqlValue = string | number | null;

/** One connection, inside a transaction: every statement is parameterized. */
export interface SqlSession {
  rows<T>(sql: string, params?: SqlValue[]): Promise<T[]>;
  run(sql: string, params?: SqlValue[]): Promise<mysql.ResultSetHeader>;
  /** `run` in the text protocol: for statements with thousands of parameters (multi-row inserts), not worth preparing. */
  runText(sql: string, params?: SqlValue[]): Promise<mysql.ResultSetHeader>;
}

/** What a transaction's function is told about the attempt it runs in. */
export interface TransactionAttempt {
  /**
   * An earlier attempt sent COMMIT and lost its node before the answer: that commit may have landed (#14). A unique
   * key clash in this attempt may then be the earlier attempt's own row, and the caller must check before refusing.
   */
  afterUncertainCommit: boolean;
}

export interface ReadOptions {
  /**
   * A causal read (Galera's wsrep_sync_wait): it waits until this node has applied every transaction the cluster
   * committed before it began, so it sees other nodes' commits. Costs a group round trip; a no-op off Galera.
   */
  causal?: boolean;
}

/** Counters for tests and reports: how often the cluster made a store work for its answer. */
export interface MysqlStats {
  /** Transactions run again after a deadlock or a certification failure (1213). */
  conflictRetries: number;
  /** Attempts moved to another node because theirs failed (unreachable, timed out, non-Primary). */
  failovers: number;
  /** Attempts whose COMMIT was sent and whose node failed before answering. */
  uncertainCommits: number;
}

export interface OpenMysqlOptions {
  /** What the database holds, for the error message: "record store", "token store". */
  what: string;
  /** CREATE … IF NOT EXISTS statements (and idempotent seed rows), run in order. */
  schema: readonly string[];
  /** Runs after the schema, before the database is handed out (a one-off fill of new tables, say); a failure fails the open. */
  afterSchema?: (db: MysqlDatabase) => Promise<void>;
  /** Connections per node. */
  connectionLimit: number;
  /**
   * How long one attempt (a statement, or a whole transaction with its COMMIT) may take on a node before the node
   * counts as failed and the attempt moves on. Above Galera's stall while it evicts a dead member (evs.suspect_timeout
   * plus a second: 4.1-4.6 s measured with the multihost cluster's PT3S), so a stall is waited out rather than
   * mistaken for a dead node. Default 6000.
   */
  attemptTimeoutMs?: number;
  /** A failed node is probed again after this long and used again once it answers Synced. Default 1000. */
  restoreAfterMs?: number;
}

/**
 * Deadlocks and certification failures a transaction is run again for before its error is returned. Two nodes
 * writing the generation row flat out (8 writers, galera.test.ts) made one transaction lose up to 18 times in a
 * row; through one node (ORDER), conflicts come only in the second or so servers take to agree on a node again.
 */
const MAX_CONFLICT_RETRIES = 20;
const CONNECT_TIMEOUT_MS = 2000;

interface MysqlNode {
  hostPort: string;
  pool: mysql.Pool;
  /** Out of the preferred order since a failure; probed again from `retryAt`. */
  failed: boolean;
  retryAt: number;
  probing: boolean;
}

/**
 * The nodes of one MySQL URL, used in ORDER: every attempt goes to the first node that is up, so all servers write
 * through one Galera node while it is healthy and do not refuse each other at certification on the hot generation
 * row. A node that fails (refused, reset, timed out, non-Primary) is left for the next one at once, and used again
 * once a probe finds it Synced. A single-host URL is a cluster of one and behaves as a plain pool.
 *
 * @example
 * const db = await openMysql("mysql://root@10.1.0.11,10.1.0.12,10.1.0.13/test", { what: "record store", schema, connectionLimit: 8 });
 * const id = await db.transaction(async (sql) => (await sql.run("INSERT …", [a, b])).insertId);
 */
/**
 * mysql2 itself, loaded by the first openMysql: importing it costs a process 13 MiB of RSS, which a role on the
 * sqlite default (most of them) should not pay (#13: idle RSS ≤ 60 MiB).
 */
let driver: typeof mysql | undefined;

export class MysqlDatabase {
  readonly description: string;
  readonly stats: MysqlStats = { conflictRetries: 0, failovers: 0, uncertainCommits: 0 };
  readonly #nodes: MysqlNode[];
  readonly #attemptTimeoutMs: number;
  readonly #restoreAfterMs: number;
  /** MariaDB with wsrep on: causal reads are worth their cost. Found at open. */
  #galera = false;
  #closed = false;

  /** Made by openMysql, which loads the driver first. */
  constructor(url: string, options: { connectionLimit: number; attemptTimeoutMs?: number; restoreAfterMs?: number }) {
    if (!driver) throw new Error("MysqlDatabase is made by openMysql");
    const { createPool } = driver;
    this.description = describeDatabaseUrl(url);
    this.#attemptTimeoutMs = options.attemptTimeoutMs ?? 6000;
    this.#restoreAfterMs = options.restoreAfterMs ?? 1000;
    this.#nodes = mysqlNodeUrls(url).map(({ url: uri, hostPort }) => ({
      hostPort,
      failed: false,
      retryAt: 0,
      probing: false,
      pool: createPool({ uri, connectionLimit: options.connectionLimit, connectTimeout: CONNECT_TIMEOUT_MS, enableKeepAlive: true }),
    }));
  }

  /** Whether the nodes are Galera nodes (wsrep on). */
  get galera(): boolean {
    return this.#galera;
  }

  /** The node attempts go to now: the first one up, in the URL's order. */
  get currentNode(): string {
    return this.#order(new Set())[0]!.hostPort;
  }

  /** The rows of one parameterized statement, on the first node that answers. */
  async rows<T>(sql: string, params: SqlValue[] = [], options: ReadOptions = {}): Promise<T[]> {
    const causal = options.causal === true && this.#galera;
    const statement = causal ? `SET STATEMENT wsrep_sync_wait = 1 FOR ${sql}` : sql;
    return this.#withFailover(
      async (conn) => {
        try {
          return (await conn.execute(statement, params))[0] as T[];
        } catch (error) {
          // A plain read takes no locks, so a lock wait timeout here can only be the causal wait failing: the node's fault.
          if (causal && (error as { errno?: unknown }).errno === LOCK_WAIT_TIMEOUT) throw new CausalReadFailed(error);
          throw error;
        }
      },
      () => {},
    );
  }

  /** One statement in the text protocol (DDL), on the first node that answers; for idempotent statements only. */
  async exec(sql: string): Promise<void> {
    await this.#withFailover(
      (conn) => conn.query(sql),
      () => {},
    );
  }

  /**
   * Runs `fn` in a transaction on one connection and commits. A deadlock or Galera certification failure rolls back
   * and runs `fn` again (bounded); a failed node moves the attempt to the next node. So `fn` may run more than once
   * and must only touch the database through `sql`. Any other error rolls back and is rethrown as is, so callers
   * classify errors in one place.
   */
  async transaction<T>(fn: (sql: SqlSession, attempt: TransactionAttempt) => Promise<T>): Promise<T> {
    const attempt: TransactionAttempt = { afterUncertainCommit: false };
    let committing = false;
    return this.#withFailover(
      async (conn) => {
        committing = false;
        await conn.beginTransaction();
        try {
          const result = await fn(session(conn), { ...attempt });
          committing = true;
          await conn.commit();
          return result;
        } catch (error) {
          // A dead connection cannot roll back, and the server discards its uncommitted work anyway.
          if (!committing && classifyMysqlError(error) !== "node") await conn.rollback().catch(() => {});
          throw error;
        }
      },
      (failure) => {
        if (failure === "node" && committing) {
          attempt.afterUncertainCommit = true;
          this.stats.uncertainCommits += 1;
        }
        committing = false; // the next attempt may fail before it reaches its own COMMIT
      },
    );
  }

  async end(): Promise<void> {
    this.#closed = true;
    await Promise.all(this.#nodes.map((node) => node.pool.end().catch(() => {})));
  }

  /** At open, on the first node that answers: whether it is a Galera node, whose causal reads are worth their cost. */
  async detectGalera(): Promise<void> {
    const rows = await this.rows<{ Value: string }>("SHOW VARIABLES LIKE 'wsrep_on'");
    this.#galera = rows[0]?.Value === "ON";
  }

  /**
   * Runs `work` on the first node that is up, each node at most once; a conflict runs it again on the same node, a
   * failed node moves it to the next. `onFailure` hears every classified failure before the retry decision.
   */
  async #withFailover<T>(work: (conn: mysql.PoolConnection) => Promise<T>, onFailure: (failure: "conflict" | "node") => void): Promise<T> {
    const tried = new Set<MysqlNode>();
    let conflicts = 0;
    for (;;) {
      const node = this.#order(tried)[0];
      if (!node) throw new Error("no MySQL node left to try"); // unreachable: the loop rethrows the last node's error
      try {
        return await this.#attempt(node, work);
      } catch (error) {
        const failure = classifyMysqlError(error);
        if (failure === "conflict") {
          onFailure(failure);
          if (conflicts >= MAX_CONFLICT_RETRIES) throw error;
          conflicts += 1;
          this.stats.conflictRetries += 1;
          // Jittered backoff: two servers that refused each other should not collide again in lockstep.
          await sleep(Math.random() * 5 * 2 ** Math.min(conflicts, 5));
          continue;
        }
        if (failure !== "node") throw error;
        onFailure(failure);
        this.#markFailed(node);
        tried.add(node);
        if (tried.size === this.#nodes.length) throw error;
        this.stats.failovers += 1;
      }
    }
  }

  /**
   * One attempt on one node, bounded in time: a node that stops answering (a cut link, a frozen process) has its
   * connection destroyed, so the server rolls the work back, and the attempt fails with StatementTimeout.
   */
  async #attempt<T>(node: MysqlNode, work: (conn: mysql.PoolConnection) => Promise<T>): Promise<T> {
    let conn: mysql.PoolConnection | undefined;
    let timedOut = false;
    let discarded = false;
    // Never hand a connection in an unknown state back to the pool.
    const discard = () => {
      discarded = true;
      conn?.destroy();
    };
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        timedOut = true;
        discard();
        reject(new StatementTimeout(node.hostPort, this.#attemptTimeoutMs));
      }, this.#attemptTimeoutMs);
    });
    const run = (async () => {
      conn = await node.pool.getConnection();
      if (timedOut) {
        discard();
        throw new StatementTimeout(node.hostPort, this.#attemptTimeoutMs);
      }
      try {
        return await work(conn);
      } catch (error) {
        if (classifyMysqlError(error) === "node") discard();
        throw error;
      }
    })();
    run.catch(() => {}); // after a timeout nobody awaits it
    try {
      return await Promise.race([run, expired]);
    } finally {
      clearTimeout(timer);
      if (conn && !discarded) conn.release();
    }
  }

  /** The nodes not yet tried: those up in the URL's order, then the failed ones as a last resort. */
  #order(tried: ReadonlySet<MysqlNode>): MysqlNode[] {
    const now = Date.now();
    for (const node of this.#nodes) if (node.failed && !node.probing && now >= node.retryAt) void this.#probe(node);
    const left = this.#nodes.filter((node) => !tried.has(node));
    return [...left.filter((node) => !node.failed), ...left.filter((node) => node.failed)];
  }

  #markFailed(node: MysqlNode): void {
    if (this.#nodes.length === 1) return; // nowhere else to go: a lone node is always the first choice
    node.failed = true;
    node.retryAt = Date.now() + this.#restoreAfterMs;
  }

  /** Back in the order once it answers and, on Galera, is Synced in a Primary component (ready). */
  async #probe(node: MysqlNode): Promise<void> {
    node.probing = true;
    try {
      const rows = await this.#attempt(
        node,
        async (conn) =>
          (await conn.query("SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_local_state_comment')"))[0] as {
            Variable_name: string;
            Value: string;
          }[],
      );
      const status = Object.fromEntries(rows.map((r) => [r.Variable_name.toLowerCase(), r.Value]));
      // MariaDB without Galera reports wsrep_ready OFF: only a Galera node's status says anything.
      const ready = !this.#galera || (status.wsrep_ready === "ON" && status.wsrep_local_state_comment === "Synced");
      if (ready && !this.#closed) node.failed = false;
    } catch {
      // still failed
    } finally {
      node.probing = false;
      node.retryAt = Date.now() + this.#restoreAfterMs;
    }
  }
}

function session(conn: mysql.PoolConnection): SqlSession {
  return {
    rows: async <T>(sql: string, params: SqlValue[] = []) => (await conn.execute(sql, params))[0] as T[],
    run: async (sql: string, params: SqlValue[] = []) => (await conn.execute<mysql.ResultSetHeader>(sql, params))[0],
    runText: async (sql: string, params: SqlValue[] = []) => (await conn.query<mysql.ResultSetHeader>(sql, params))[0],
  };
}

/**
 * The database `url` names (one node, or several: see mysqlNodeUrls) with the schema created. Throws Unavailable,
 * naming every node but never the password, if no node can create the schema.
 */
export async function openMysql(url: string, { what, schema, afterSchema, ...options }: OpenMysqlOptions): Promise<MysqlDatabase> {
  let db: MysqlDatabase;
  driver ??= (await import("mysql2/promise")).default;
  try {
    db = new MysqlDatabase(url, options);
  } catch (error) {
    throw unavailable(what, error, describeDatabaseUrl(url));
  }
  try {
    for (const statement of schema) await db.exec(statement);
    await db.detectGalera();
    await afterSchema?.(db);
  } catch (error) {
    await db.end();
    throw unavailable(what, error, db.description);
  }
  return db;
}
