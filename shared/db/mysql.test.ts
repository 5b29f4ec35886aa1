// The mysql2 layer on the local MariaDB: transactions, failover between the nodes of a multi-host URL, bounded
// attempts, deadlock retries and a COMMIT whose answer is lost. (Galera itself: galera.test.ts.)
import { afterAll, describe, expect, test } from "bun:test";
import { Unavailable } from "../platform/errors.ts";
import { hostPortOf, LostCommitRelay, multiHostUrl, SilentNode, TEST_MYSQL_URL, uniqueTable } from "../testing/mysql.ts";
import { classifyMysqlError } from "./mysql-failures.ts";
import { isDuplicateEntry, openMysql, type MysqlDatabase } from "./mysql.ts";

const table = uniqueTable("db_helpers");
const schema = [`CREATE TABLE IF NOT EXISTS ${table} (id INT PRIMARY KEY, u VARCHAR(16) UNIQUE) ENGINE=InnoDB`];
const real = hostPortOf(TEST_MYSQL_URL);
const realHostPort = `${real.host}:${real.port}`;
const toClose: (MysqlDatabase | AsyncDisposable)[] = [];

async function open(url: string, options: { attemptTimeoutMs?: number; restoreAfterMs?: number } = {}): Promise<MysqlDatabase> {
  const db = await openMysql(url, { what: "test store", connectionLimit: 2, schema, ...options });
  toClose.push(db);
  return db;
}
const db = await open(TEST_MYSQL_URL);

afterAll(async () => {
  await db.exec(`DROP TABLE IF EXISTS ${table}`);
  for (const item of toClose.reverse()) await ("end" in item ? item.end() : item[Symbol.asyncDispose]());
});

/** What `promise` rejected with. */
const rejection = (promise: Promise<unknown>) =>
  promise.then(
    () => {
      throw new Error("expected a rejection");
    },
    (error: unknown) => error,
  );
const count = async (where: string) => Number((await db.rows<{ n: number }>(`SELECT COUNT(*) AS n FROM ${table} WHERE ${where}`))[0]!.n);

describe("mysql helpers", () => {
  test("a transaction commits what fn did and returns its result", async () => {
    expect(
      await db.transaction(async (sql) => {
        await sql.run(`INSERT INTO ${table} (id, u) VALUES (1, 'a')`);
        return "done";
      }),
    ).toBe("done");
    expect(await db.rows(`SELECT id, u FROM ${table} WHERE id = ?`, [1])).toEqual([{ id: 1, u: "a" }]);
  });

  test("a transaction rolls back on a throw and rethrows the original error", async () => {
    const boom = new Error("boom");
    expect(
      await rejection(
        db.transaction(async (sql) => {
          await sql.run(`INSERT INTO ${table} (id, u) VALUES (2, 'b')`);
          throw boom;
        }),
      ),
    ).toBe(boom);
    expect(await db.rows(`SELECT id FROM ${table} WHERE id = 2`)).toEqual([]);
  });

  test("UNIQUE and PRIMARY KEY clashes are duplicate entries; other failures are not", async () => {
    const unique = await rejection(db.rows(`INSERT INTO ${table} (id, u) VALUES (3, 'a')`));
    const primary = await rejection(db.rows(`INSERT INTO ${table} (id, u) VALUES (1, 'z')`));
    const syntax = await rejection(db.rows("SELEC 1"));
    expect([isDuplicateEntry(unique), isDuplicateEntry(primary), isDuplicateEntry(syntax), isDuplicateEntry(undefined)]).toEqual([true, true, false, false]);
    expect(classifyMysqlError(syntax)).toBe("other");
  });

  test("an unreachable server is Unavailable at open, naming the server but not the password", async () => {
    const opening = openMysql("mysql://root:hunter2@127.0.0.1:1/test", { what: "test store", connectionLimit: 1, schema: ["SELECT 1"] });
    const error = await rejection(opening);
    expect(error).toBeInstanceOf(Unavailable);
    expect((error as Error).message).toStartWith("cannot open test store at mysql 127.0.0.1:1/test: ");
    expect((error as Error).message).not.toContain("hunter2");
    expect(classifyMysqlError((error as Error).cause)).toBe("node");
  });

  test("a cluster none of whose nodes answers is Unavailable at open, naming every node", async () => {
    const error = await rejection(
      openMysql("mysql://root:hunter2@127.0.0.1:1,127.0.0.1:2/test", { what: "test store", connectionLimit: 1, schema: ["SELECT 1"] }),
    );
    expect((error as Error).message).toStartWith("cannot open test store at mysql 127.0.0.1:1,127.0.0.1:2/test: ");
    expect((error as Error).message).not.toContain("hunter2");
  });
});

describe("failover between the nodes of a multi-host URL", () => {
  test("a refusing first node is left for the next at once; every statement is answered", async () => {
    const cluster = await open(multiHostUrl(TEST_MYSQL_URL, ["127.0.0.1:1", realHostPort]));
    expect(cluster.description).toBe(`mysql 127.0.0.1:1,${realHostPort}/test`);
    expect(cluster.currentNode).toBe(realHostPort); // the schema's failure at open already moved it on
    expect(await cluster.rows(`SELECT COUNT(*) AS n FROM ${table} WHERE id = 1`)).toEqual([{ n: 1 }]);
    expect(cluster.stats.failovers).toBe(1);
  });

  test("a node that accepts but never answers costs one bounded attempt, then the next node answers", async () => {
    await using silent = await SilentNode.start();
    const started = performance.now();
    const cluster = await open(multiHostUrl(TEST_MYSQL_URL, [silent.hostPort, realHostPort]), { attemptTimeoutMs: 500 });
    expect(performance.now() - started).toBeLessThan(2000);
    expect(cluster.currentNode).toBe(realHostPort);
    await cluster.transaction((sql) => sql.run(`INSERT INTO ${table} (id, u) VALUES (10, 'silent')`));
    expect(await count("id = 10")).toBe(1);
  });

  test("when every node fails, a read fails after one attempt on each, at once: no endless retry", async () => {
    await using a = await LostCommitRelay.start(real);
    await using b = await LostCommitRelay.start(real);
    const cluster = await open(multiHostUrl(TEST_MYSQL_URL, [a.hostPort, b.hostPort]));
    a.cut();
    b.cut();
    const started = performance.now();
    const error = await rejection(cluster.rows("SELECT 1"));
    expect({ failure: classifyMysqlError(error), failovers: cluster.stats.failovers }).toEqual({ failure: "node", failovers: 1 });
    expect(performance.now() - started).toBeLessThan(1000);
  });

  test("a bad statement is not a node failure: it is not tried on another node", async () => {
    const cluster = await open(multiHostUrl(TEST_MYSQL_URL, [realHostPort, realHostPort]));
    expect(classifyMysqlError(await rejection(cluster.rows("SELEC 1")))).toBe("other");
    expect(cluster.stats.failovers).toBe(0);
  });

  test("a failed node is probed and used again once it answers", async () => {
    await using relay = await LostCommitRelay.start(real);
    const cluster = await open(multiHostUrl(TEST_MYSQL_URL, [relay.hostPort, realHostPort]), { restoreAfterMs: 100 });
    expect(cluster.currentNode).toBe(relay.hostPort);
    relay.cut();
    expect(await cluster.rows("SELECT 7 AS n")).toEqual([{ n: 7 }]); // answered by the second node
    expect(cluster.currentNode).toBe(realHostPort);
    relay.restore();
    const deadline = Date.now() + 5000;
    while (cluster.currentNode !== relay.hostPort && Date.now() < deadline) await cluster.rows("SELECT 1"); // each call may start a probe
    expect(cluster.currentNode).toBe(relay.hostPort);
  });
});

describe("transactions run again", () => {
  test("a deadlock (1213) rolls back and runs the transaction again; both writers commit", async () => {
    await db.exec(`INSERT INTO ${table} (id, u) VALUES (20, 'x'), (21, 'y')`);
    const before = db.stats.conflictRetries;
    // Two transactions lock the same two rows in opposite orders; InnoDB refuses one of them with 1213.
    let bothHoldOne!: () => void;
    const held = new Promise<void>((resolve) => {
      let n = 0;
      bothHoldOne = () => {
        if (++n === 2) resolve();
      };
    });
    const runs: number[] = [];
    const writer = (first: number, second: number) =>
      db.transaction(async (sql, attempt) => {
        runs.push(first);
        await sql.run(`UPDATE ${table} SET u = CONCAT(u, '+') WHERE id = ?`, [first]);
        if (runs.length <= 2) {
          bothHoldOne();
          await held;
        }
        await sql.run(`UPDATE ${table} SET u = CONCAT(u, '+') WHERE id = ?`, [second]);
        return attempt.afterUncertainCommit;
      });
    expect(await Promise.all([writer(20, 21), writer(21, 20)])).toEqual([false, false]);
    expect(db.stats.conflictRetries - before).toBe(1);
    expect(runs).toHaveLength(3);
    expect(await db.rows(`SELECT u FROM ${table} WHERE id IN (20, 21) ORDER BY id`)).toEqual([{ u: "x++" }, { u: "y++" }]);
  });

  test("a COMMIT whose answer is lost moves to the next node, and the next attempt knows it may have landed", async () => {
    await using relay = await LostCommitRelay.start(real);
    const cluster = await open(multiHostUrl(TEST_MYSQL_URL, [relay.hostPort, realHostPort]));
    relay.armed = 1;
    const attempts: boolean[] = [];
    const outcome = await cluster.transaction(async (sql, attempt) => {
      attempts.push(attempt.afterUncertainCommit);
      try {
        await sql.run(`INSERT INTO ${table} (id, u) VALUES (30, 'once')`);
        return "inserted";
      } catch (error) {
        if (isDuplicateEntry(error) && attempt.afterUncertainCommit) return "found the first attempt's row";
        throw error;
      }
    });
    expect({ lost: relay.lost, attempts, outcome, stats: cluster.stats }).toEqual({
      lost: 1,
      attempts: [false, true],
      outcome: "found the first attempt's row",
      stats: { conflictRetries: 0, failovers: 1, uncertainCommits: 1 },
    });
    expect(await count("id = 30")).toBe(1);
  });
});
