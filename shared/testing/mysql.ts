// The MariaDB the tests use: $TEST_MYSQL_URL, else the local one CI starts.
export const TEST_MYSQL_URL = process.env.TEST_MYSQL_URL ?? "mysql://root@127.0.0.1:3306/test";

/** A table name no other test run uses, so runs can share the database. */
export function uniqueTable(prefix: string): string {
  return `${prefix}_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
}
