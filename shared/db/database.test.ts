import { expect, test } from "bun:test";
import { Unavailable } from "../platform/errors.ts";
import { checkTableName, describeDatabaseUrl, mysqlNodeUrls, orUnavailable, parseDatabaseUrl, unavailable } from "./database.ts";

test("database URLs name MySQL or a sqlite file", () => {
  expect(parseDatabaseUrl("mysql://u:p@h:1/db")).toEqual({ kind: "mysql", url: "mysql://u:p@h:1/db" });
  expect(parseDatabaseUrl("sqlite:/tmp/a.db")).toEqual({ kind: "sqlite", path: "/tmp/a.db" });
  expect(parseDatabaseUrl("sqlite:///tmp/a.db")).toEqual({ kind: "sqlite", path: "/tmp/a.db" });
  expect(parseDatabaseUrl("data/a.db")).toEqual({ kind: "sqlite", path: "data/a.db" });
  expect(describeDatabaseUrl("mysql://root:hunter2@db.example/prod")).toBe("mysql db.example:3306/prod");
  expect(describeDatabaseUrl("mysql://root:hunter2@[bad")).toBe("mysql (unparseable URL)");
});

test("a MySQL URL may name several nodes: each keeps the credentials, database and options; the port defaults to 3306", () => {
  const url = "mysql://root:p%40ss@10.1.0.11:3306,10.1.0.12,[fd00::13]:3307/test?charset=utf8mb4";
  expect(parseDatabaseUrl(url)).toEqual({ kind: "mysql", url });
  expect(mysqlNodeUrls(url)).toEqual([
    { url: "mysql://root:p%40ss@10.1.0.11:3306/test?charset=utf8mb4", hostPort: "10.1.0.11:3306" },
    { url: "mysql://root:p%40ss@10.1.0.12/test?charset=utf8mb4", hostPort: "10.1.0.12:3306" },
    { url: "mysql://root:p%40ss@[fd00::13]:3307/test?charset=utf8mb4", hostPort: "[fd00::13]:3307" },
  ]);
  expect(mysqlNodeUrls("mysql://db.example")).toEqual([{ url: "mysql://db.example", hostPort: "db.example:3306" }]);
  expect(describeDatabaseUrl(url)).toBe("mysql 10.1.0.11:3306,10.1.0.12:3306,[fd00::13]:3307/test");
  expect(describeDatabaseUrl("mysql://root:hunter2@a:1,,b/x")).toBe("mysql (unparseable URL)");
  // A password with an unencoded / ? or # ends the authority early: what is left of it must not be quoted either.
  for (const bad of [
    "mysql://root:hunter2@a:1,b:notaport/x",
    "mysql://root:hunter2@a,/x",
    "postgres://a/x",
    "mysql://root:hunt/er2@127.0.0.1:3306/test",
    "mysql://root:hunt#er2@h/test",
    "mysql://root:hunt?er2@h/test",
  ]) {
    let error: unknown;
    try {
      mysqlNodeUrls(bad);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(TypeError);
    expect((error as Error).message).not.toContain("hunter2");
    expect((error as Error).message).not.toContain("hunt");
  }
});

test("table names must be plain identifiers", () => {
  expect(checkTableName("records_123")).toBe("records_123");
  for (const bad of ["", "1records", "records; DROP TABLE x", "a-b", "x".repeat(65)]) expect(() => checkTableName(bad)).toThrow(TypeError);
});

test("unavailable keeps the driver's reason out of request-time messages and in start-up ones", async () => {
  const cause = Object.assign(new Error(""), { code: "ECONNREFUSED" });
  expect(unavailable("token store", cause)).toMatchObject({ message: "token store unavailable", cause, status: 503 });
  expect(unavailable("token store", cause, "mysql h:3306/db").message).toBe("cannot open token store at mysql h:3306/db: ECONNREFUSED");
  const failed = await orUnavailable("record store", () => {
    throw cause;
  }).catch((error: unknown) => error);
  expect(failed).toBeInstanceOf(Unavailable);
  expect(failed).toMatchObject({ message: "record store unavailable", cause });
  expect(await orUnavailable("record store", async () => 7)).toBe(7);
});
