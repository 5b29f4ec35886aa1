// The fast loop (`npm run test:unit`, which sets SECUREMESH_TESTS=unit) leaves out what needs a service or costs
// most: its cases on a MySQL store (it runs with no MariaDB), and role processes on Deno (a Deno process costs about
// twice a Bun one in CPU, and the loop is bound by CPU). `npm test`, and so CI, runs every case and skips none.

export const UNIT_RUN = process.env.SECUREMESH_TESTS === "unit";

/** The database kinds a table of cases runs on: sqlite always, mysql except in the unit run. */
export function testedDatabases<Kind extends string>(kinds: readonly Kind[]): Kind[] {
  return UNIT_RUN ? kinds.filter((kind) => kind !== "mysql") : [...kinds];
}

/** The runtimes a table of process cases runs its roles on: Bun always, Deno except in the unit run. */
export function testedRuntimes<Runtime extends "bun" | "deno">(runtimes: readonly Runtime[] = ["bun", "deno"] as Runtime[]): Runtime[] {
  return UNIT_RUN ? runtimes.filter((runtime) => runtime !== "deno") : [...runtimes];
}
