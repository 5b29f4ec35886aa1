// What every store shares whatever its database: the URL forms, table-name checking, and the 503 on failure.
import { resolve } from "node:path";
import { displayPath } from "../platform/config.ts";
import { Unavailable } from "../platform/errors.ts";

/** Where a store lives: a MySQL/MariaDB URL, or a sqlite file. */
export type DatabaseLocation = { kind: "mysql"; url: string } | { kind: "sqlite"; path: string };

/**
 * `mysql://user:pass@host:port/db` names MySQL, and `mysql://user:pass@host1:port1,host2:port2,…/db` a cluster of
 * nodes (Galera) tried in that order; `sqlite:path`, `sqlite://path` or a plain path name a sqlite file.
 */
export function parseDatabaseUrl(url: string): DatabaseLocation {
  if (url.startsWith("mysql://")) return { kind: "mysql", url };
  return { kind: "sqlite", path: url.replace(/^sqlite:(\/\/)?/, "") };
}

/** One node of a MySQL URL: its own single-host URL (credentials, database and options kept) and `host:port`. */
export interface MysqlNodeUrl {
  url: string;
  hostPort: string;
}

/**
 * The nodes a MySQL URL names, in order: `mysql://root@10.1.0.11:3306,10.1.0.12,[fd00::13]:3307/test` is three,
 * the second on port 3306. Throws TypeError, without the password, on a URL that does not parse.
 */
export function mysqlNodeUrls(url: string): MysqlNodeUrl[] {
  if (!url.startsWith("mysql://")) throw new TypeError("invalid MySQL URL: it must start with mysql://");
  const rest = url.slice("mysql://".length);
  const authorityEnd = rest.search(/[/?#]/);
  const authority = authorityEnd === -1 ? rest : rest.slice(0, authorityEnd);
  const tail = authorityEnd === -1 ? "" : rest.slice(authorityEnd);
  const at = authority.lastIndexOf("@");
  const userinfo = at === -1 ? "" : authority.slice(0, at + 1);
  const hosts = (at === -1 ? authority : authority.slice(at + 1)).split(",");
  return hosts.map((host, index) => {
    const node = `mysql://${userinfo}${host}${tail}`;
    let parsed: URL;
    try {
      parsed = new URL(node);
    } catch {
      // Not quoted: a password with an unencoded / ? or # ends the authority early, so this "host" can be part of
      // the password (found by attack on #14).
      throw new TypeError(`invalid MySQL URL: host ${index + 1} of ${hosts.length} does not parse (percent-encode / ? # @ in the password)`);
    }
    if (parsed.hostname === "") throw new TypeError(`invalid MySQL URL: host ${index + 1} of ${hosts.length} is empty`);
    return { url: node, hostPort: `${parsed.hostname}:${parsed.port || 3306}` };
  });
}

/** A description of a database URL safe for logs: every host but never the password, and a repository-relative path. */
export function describeDatabaseUrl(url: string): string {
  const location = parseDatabaseUrl(url);
  if (location.kind === "sqlite") return `sqlite ${displayPath(resolve(location.path))}`;
  try {
    const nodes = mysqlNodeUrls(url);
    return `mysql ${nodes.map((n) => n.hostPort).join(",")}${new URL(nodes[0]!.url).pathname}`;
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
