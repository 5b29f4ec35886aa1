import { describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { mkdtempSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { Unavailable } from "../platform/errors.ts";
import { execute, immediate, openSqlite, sqliteFailure } from "./sqlite.ts";

const freshPath = () => join(mkdtempSync(join(tmpdir(), "securemesh-db-")), "test.db");

const createTable = (db: DatabaseSync) =>
  execute(db, "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY AUTOINCREMENT, u TEXT UNIQUE, a TEXT, b INTEGER, UNIQUE (a, b))");

/** What `fn` threw, classified. */
function failureOf(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    return sqliteFailure(error);
  }
  throw new Error("expected a failure");
}

describe("sqliteFailure", () => {
  const db = new DatabaseSync(":memory:");
  createTable(db);
  execute(db, "CREATE TABLE used (jti TEXT, server INTEGER, PRIMARY KEY (jti, server))");
  db.prepare("INSERT INTO t (u, a, b) VALUES ('x', 'a', 1)").run();
  db.prepare("INSERT INTO used VALUES ('j', 1)").run();

  test("a UNIQUE clash (2067) and a PRIMARY KEY clash (1555) are both unique", () => {
    expect(failureOf(() => db.prepare("INSERT INTO t (u) VALUES (?)").run("x"))).toBe("unique");
    expect(failureOf(() => db.prepare("INSERT INTO t (a, b) VALUES (?, ?)").run("a", 1))).toBe("unique");
    expect(failureOf(() => db.prepare("INSERT INTO used VALUES (?, ?)").run("j", 1))).toBe("unique");
  });

  test("a write lock another connection holds is busy", () => {
    const path = freshPath();
    const holder = new DatabaseSync(path);
    execute(holder, "PRAGMA journal_mode = WAL");
    const waiter = new DatabaseSync(path);
    execute(waiter, "PRAGMA busy_timeout = 0");
    execute(holder, "BEGIN IMMEDIATE");
    expect(failureOf(() => execute(waiter, "BEGIN IMMEDIATE"))).toBe("busy");
    execute(holder, "ROLLBACK");
    holder.close();
    waiter.close();
  });

  test("anything else is other", () => {
    expect(failureOf(() => db.prepare("SELEC 1"))).toBe("other");
    expect(failureOf(() => db.prepare("INSERT INTO t (b) VALUES (?)").run(undefined as never))).toBe("other");
    expect(sqliteFailure(new Error("database is locked"))).toBe("other");
    expect(sqliteFailure(undefined)).toBe("other");
  });
});

describe("immediate", () => {
  test("commits what fn did and returns its result", () => {
    const db = new DatabaseSync(":memory:");
    createTable(db);
    expect(immediate(db, () => db.prepare("INSERT INTO t (u) VALUES ('a') RETURNING id").get())).toEqual({ id: 1 });
    expect(db.isTransaction).toBe(false);
    expect(db.prepare("SELECT COUNT(*) AS n FROM t").get()).toEqual({ n: 1 });
  });

  test("rolls back on a throw and rethrows the original error", () => {
    const db = new DatabaseSync(":memory:");
    createTable(db);
    const boom = new Error("boom");
    expect(() =>
      immediate(db, () => {
        db.prepare("INSERT INTO t (u) VALUES ('a')").run();
        throw boom;
      }),
    ).toThrow(boom);
    expect(db.isTransaction).toBe(false);
    expect(db.prepare("SELECT COUNT(*) AS n FROM t").get()).toEqual({ n: 0 });
    // A statement's own failure rolls back the earlier statements too.
    db.prepare("INSERT INTO t (u) VALUES ('b')").run();
    expect(
      failureOf(() =>
        immediate(db, () => {
          db.prepare("INSERT INTO t (u) VALUES ('c')").run();
          db.prepare("INSERT INTO t (u) VALUES ('b')").run();
        }),
      ),
    ).toBe("unique");
    expect(db.prepare("SELECT u FROM t").all()).toEqual([{ u: "b" }]);
  });

  test("holds the write lock from the start, so another connection's write is busy at once", () => {
    const path = freshPath();
    const db = new DatabaseSync(path);
    execute(db, "PRAGMA journal_mode = WAL");
    createTable(db);
    const other = new DatabaseSync(path);
    execute(other, "PRAGMA busy_timeout = 0");
    immediate(db, () => {
      // Nothing written yet: a DEFERRED transaction would hold no lock here.
      expect(failureOf(() => execute(other, "BEGIN IMMEDIATE"))).toBe("busy");
    });
    execute(other, "BEGIN IMMEDIATE");
    execute(other, "COMMIT");
    db.close();
    other.close();
  });
});

describe("openSqlite", () => {
  test("creates the folder and the file, in WAL mode with FULL sync and a busy timeout, with the schema", async () => {
    const path = join(mkdtempSync(join(tmpdir(), "securemesh-db-")), "nested", "test.db");
    const db = await openSqlite(path, { what: "test store", createSchema: createTable });
    expect(db.prepare("PRAGMA journal_mode").get()).toEqual({ journal_mode: "wal" });
    expect(db.prepare("PRAGMA synchronous").get()).toEqual({ synchronous: 2 });
    expect(db.prepare("PRAGMA busy_timeout").get()).toEqual({ timeout: 5000 });
    expect(db.prepare("SELECT COUNT(*) AS n FROM t").get()).toEqual({ n: 0 });
    db.close();
  });

  test("a file it creates is 0600 and so are its -wal and -shm, in a new folder 0700, even under umask 000", async () => {
    const path = join(mkdtempSync(join(tmpdir(), "securemesh-db-")), "new", "records.db");
    const before = process.umask(0o000);
    let db: DatabaseSync;
    try {
      db = await openSqlite(path, { what: "test store", createSchema: createTable });
    } finally {
      process.umask(before);
    }
    db.prepare("INSERT INTO t (u) VALUES ('x')").run();
    // SQLite gives the journal files the database file's mode (measured on Bun and Deno), so creating that 0600 is enough.
    const modes = Object.fromEntries(
      ["new", "new/records.db", "new/records.db-wal", "new/records.db-shm"].map((p) => [p, statSync(join(path, "..", "..", p)).mode & 0o777]),
    );
    db.close();
    expect(modes).toEqual({ "new": 0o700, "new/records.db": 0o600, "new/records.db-wal": 0o600, "new/records.db-shm": 0o600 });
  });

  test("processes racing to create one file all open it", async () => {
    const path = freshPath();
    const opener = `
      import { openSqlite, execute } from ${JSON.stringify(join(import.meta.dir, "sqlite.ts"))};
      const db = await openSqlite(${JSON.stringify(path)}, { what: "test store", createSchema: (db) => execute(db, "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY)") });
      db.prepare("INSERT INTO t DEFAULT VALUES").run();
      db.close();`;
    const openers = Array.from({ length: 6 }, () => spawn(process.execPath, ["-e", opener], { stdio: ["ignore", "ignore", "pipe"] }));
    const exits = await Promise.all(
      openers.map(
        (child) =>
          new Promise<string>((done) => {
            let stderr = "";
            child.stderr!.on("data", (chunk) => (stderr += chunk));
            child.on("close", (code) => done(`${code} ${stderr.trim()}`.trim()));
          }),
      ),
    );
    expect(exits).toEqual(Array(6).fill("0"));
    const db = new DatabaseSync(path);
    expect(db.prepare("SELECT COUNT(*) AS n FROM t").get()).toEqual({ n: 6 });
    db.close();
  });

  test("a file that cannot be opened is Unavailable, naming what and where", async () => {
    const dir = mkdtempSync(join(tmpdir(), "securemesh-db-"));
    const opening = openSqlite(dir, { what: "test store", createSchema: createTable }); // a directory, not a file
    await expect(opening).rejects.toBeInstanceOf(Unavailable);
    await expect(opening).rejects.toThrow(`cannot open test store at sqlite ${dir}: `);
  });
});
