import { expect, test } from "bun:test";
import { Unavailable } from "../platform/errors.ts";
import { checkTableName, describeDatabaseUrl, orUnavailable, parseDatabaseUrl, unavailable } from "./database.ts";

test("database URLs name MySQL or a sqlite file", () => {
  expect(parseDatabaseUrl("mysql://u:p@h:1/db")).toEqual({ kind: "mysql", url: "mysql://u:p@h:1/db" });
  expect(parseDatabaseUrl("sqlite:/tmp/a.db")).toEqual({ kind: "sqlite", path: "/tmp/a.db" });
  expect(parseDatabaseUrl("sqlite:///tmp/a.db")).toEqual({ kind: "sqlite", path: "/tmp/a.db" });
  expect(parseDatabaseUrl("data/a.db")).toEqual({ kind: "sqlite", path: "data/a.db" });
  expect(describeDatabaseUrl("mysql://root:hunter2@db.example/prod")).toBe("mysql db.example:3306/prod");
  expect(describeDatabaseUrl("mysql://root:hunter2@[bad")).toBe("mysql (unparseable URL)");
});

test("table names must be plain identifiers", () => {
  expect(checkTableName("records_123")).toBe("records_123");
  for (const bad of ["", "1records", "records; DROP TABLE x", "a-b", "x".repeat(65)]) expect(() => checkTableName(bad)).toThrow(TypeError);
});

test("unavailable keeps the driver's reason out of request-time messages and in start-up ones", async () => {
  const cause = Object.assign(new Error(""), { code: "ECONNREFUSED" });
  expect(unavailable("token store", cause)).toMatchObject({ message: "token store unavailable", cause, status: 503 });
  expect(unavailable("token store", cause, "mysql h:3306/db").message).toBe("cannot open token store at mysql h:3306/db: ECONNREFUSED");
  const failed = await orUnavailable("record store", () => { throw cause; }).catch((error: unknown) => error);
  expect(failed).toBeInstanceOf(Unavailable);
  expect(failed).toMatchObject({ message: "record store unavailable", cause });
  expect(await orUnavailable("record store", async () => 7)).toBe(7);
});
