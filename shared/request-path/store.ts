// Picks and opens the record store a URL names: node:sqlite by default, MySQL when given a mysql:// URL.
import { join } from "node:path";
import { describeDatabaseUrl, parseDatabaseUrl } from "../db/database.ts";
import { displayPath, REPO_ROOT } from "../platform/config.ts";
import type { RecordStore, StoreOptions } from "./record-store.ts";

export type { InsertResult, NewRecord, ProofUse, RecordStore, StoreOptions, StoredRecord, StoredToken, TokenChange } from "./record-store.ts";

export const DEFAULT_SQLITE_PATH = join(REPO_ROOT, "data", "records.db");

/**
 * Opens the store that `url` names: `mysql://user:pass@host:port/db`, `sqlite:path`, a plain path, or nothing for
 * the embedded default (data/records.db). The schema is created if missing. Each driver is loaded only when used.
 */
export async function openStore(url: string | undefined, options: StoreOptions = {}): Promise<RecordStore> {
  const location = parseDatabaseUrl(url || DEFAULT_SQLITE_PATH);
  if (location.kind === "mysql") {
    const { MysqlStore } = await import("./store-mysql.ts");
    return MysqlStore.open(location.url, options);
  }
  const { SqliteStore } = await import("./store-sqlite.ts");
  return SqliteStore.open(location.path, options);
}

/** A safe description of a store URL for logs: never the password, and a repository-relative path. */
export function describeStoreUrl(url: string | undefined): string {
  return url ? describeDatabaseUrl(url) : `sqlite ${displayPath(DEFAULT_SQLITE_PATH)}`;
}

/** For the check command: the store `url` names, reachable, and its id; opened and closed again. */
export async function storeFacts(url: string | undefined): Promise<{ describe: string; id: string }> {
  const store = await openStore(url);
  try {
    return { describe: describeStoreUrl(url), id: await store.storeId() };
  } finally {
    await store.close();
  }
}
