import { afterAll, describe, expect, test } from "bun:test";
import { Unavailable } from "../platform/errors.ts";
import { TEST_MYSQL_URL, uniqueTable } from "../testing/mysql.ts";
import { isDuplicateEntry, openMysql, selectRows, transaction } from "./mysql.ts";

const table = uniqueTable("db_helpers");
const pool = await openMysql(TEST_MYSQL_URL, {
  what: "test store",
  connectionLimit: 2,
  schema: [`CREATE TABLE IF NOT EXISTS ${table} (id INT PRIMARY KEY, u VARCHAR(16) UNIQUE) ENGINE=InnoDB`],
});

afterAll(async () => {
  await pool.query(`DROP TABLE IF EXISTS ${table}`);
  await pool.end();
});

/** What `promise` rejected with. */
const rejection = (promise: Promise<unknown>) => promise.then(() => { throw new Error("expected a rejection"); }, (error: unknown) => error);

describe("mysql helpers", () => {
  test("a transaction commits what fn did and returns its result", async () => {
    expect(await transaction(pool, async (conn) => {
      await conn.execute(`INSERT INTO ${table} (id, u) VALUES (1, 'a')`);
      return "done";
    })).toBe("done");
    expect(await selectRows(pool, `SELECT id, u FROM ${table} WHERE id = ?`, [1])).toEqual([{ id: 1, u: "a" }]);
  });

  test("a transaction rolls back on a throw and rethrows the original error", async () => {
    const boom = new Error("boom");
    expect(await rejection(transaction(pool, async (conn) => {
      await conn.execute(`INSERT INTO ${table} (id, u) VALUES (2, 'b')`);
      throw boom;
    }))).toBe(boom);
    expect(await selectRows(pool, `SELECT id FROM ${table} WHERE id = 2`)).toEqual([]);
  });

  test("UNIQUE and PRIMARY KEY clashes are duplicate entries; other failures are not", async () => {
    const unique = await rejection(selectRows(pool, `INSERT INTO ${table} (id, u) VALUES (3, 'a')`));
    const primary = await rejection(selectRows(pool, `INSERT INTO ${table} (id, u) VALUES (1, 'z')`));
    const syntax = await rejection(selectRows(pool, "SELEC 1"));
    expect([isDuplicateEntry(unique), isDuplicateEntry(primary), isDuplicateEntry(syntax), isDuplicateEntry(undefined)]).toEqual([true, true, false, false]);
  });

  test("an unreachable server is Unavailable at open, naming the server but not the password", async () => {
    const opening = openMysql("mysql://root:hunter2@127.0.0.1:1/test", { what: "test store", connectionLimit: 1, schema: ["SELECT 1"] });
    const error = await rejection(opening);
    expect(error).toBeInstanceOf(Unavailable);
    expect((error as Error).message).toStartWith("cannot open test store at mysql 127.0.0.1:1/test: ");
    expect((error as Error).message).not.toContain("hunter2");
  });
});
