// What every store shares whatever its database: the URL forms, table-name checking, and the 503 on failure.
import { resolve } from "node:path";
import { displayPath } from "../platform/config.ts";
import { Unavailable } from "../platform/errors.ts";

/** Where a store lives: a MySQL/MariaDB URL, or a sqlite file. */
export type DatabaseLocation = { kind: "mysql"; url: string } | { kind: "sqlite"; path: string };

/** `mysql://user:pass@host:port/db` names MySQL; `sqlite:path`, `sqlite://path` or a plain path name a sqlite file. */
export function parseDatabaseUrl(url: string): DatabaseLocation {
  if (url.startsWith("mysql://")) return { kind: "mysql", url };
  return { kind: "sqlite", path: url.replace(/^sqlite:(\/\/)?/, "") };
}

/** A description of a database URL safe for logs: never the password, and a repository-relative path. */
export function describeDatabaseUrl(url: string): string {
  const location = parseDatabaseUrl(url);
  if (location.kind === "sqlite") return `sqlite ${displayPath(resolve(location.path))}`;
  try {
    const u = new URL(url);
    return `mysql ${u.hostname}:${u.port || 3306}${u.pathname}`;
  } catch {
    return "mysql (unparseable URL)";
  }
}

/** Table names are interpolated into SQL, so only plain identifiers are accepted. */
export function checkTableName(table: string): string {
  if (!/^[A-Za-z_][A-Za-z0-9_]{0,63}$/.test(table)) throw new TypeError(`invalid table name '${table}'`);
  return table;
}

/**
 * The 503 a store throws when its database fails. At request time the driver's error stays in `cause` (logged,
 * never sent to a client). With `opening`, the failure is at start-up, so where and why go in the message, which
 * the operator reads: `opening` must not hold a password (use describeDatabaseUrl).
 */
export function unavailable(what: string, cause: unknown, opening?: string): Unavailable {
  if (opening === undefined) return new Unavailable(`${what} unavailable`, { cause });
  return new Unavailable(`cannot open ${what} at ${opening}: ${reasonOf(cause)}`, { cause });
}

/** Runs `fn`, turning any failure into `unavailable(what)`: for reads, where every failure means the same. */
export async function orUnavailable<T>(what: string, fn: () => T | Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    throw unavailable(what, error);
  }
}

// mysql2's connection errors can have an empty message (an AggregateError over IPv4 and IPv6) but always a code.
function reasonOf(error: unknown): string {
  const { message, code } = error as { message?: string; code?: string };
  return message || code || String(error);
}
