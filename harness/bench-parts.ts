// What the bench needs beyond Bun, probed before it starts: a part that cannot run (no HAProxy, no Python with
// cryptography, no Deno, no MariaDB) is skipped with its reason, and every other figure is still measured (issue 22).
import mysql from "mysql2/promise";
import { PYTHON, runPython } from "../shared/testing/python.ts";
import { TEST_MYSQL_URL } from "../shared/testing/mysql.ts";
import { denoBinary } from "./cluster.ts";
import { ensureHaproxy, HAPROXY } from "./haproxy.ts";

export type BenchPart = "haproxy" | "python" | "deno" | "mariadb";

/** Where each part is looked for; a test points one at nothing to see the bench skip it. */
export interface PartLocations {
  haproxy: string;
  python: string;
  /** A MariaDB account that may create the bench's own database. */
  mysqlUrl: string;
}

export interface SkippedPart {
  part: BenchPart;
  /** What the bench lost, e.g. "the HAProxy cases (c-) and the HAProxy goals". */
  lost: string;
  reason: string;
}

export interface BenchParts {
  locations: PartLocations;
  has(part: BenchPart): boolean;
  /** Whether the case with this id can run: every part it needs is here. */
  canRun(caseId: string): boolean;
  skipped: SkippedPart[];
  versions: { haproxy: string; python: string; cryptography: string };
}

export const DEFAULT_PART_LOCATIONS: PartLocations = { haproxy: HAPROXY, python: PYTHON, mysqlUrl: TEST_MYSQL_URL };

const LOST: Record<BenchPart, string> = {
  haproxy: "the HAProxy cases (c-), HAProxy in the concurrency sweep, and the goals against HAProxy",
  python: "Python's cryptography cases (d-*-python, e-rsa-bound, e-ecdh-bound) and the goals against them",
  deno: "the Deno cases (h-) and the Deno goals",
  mariadb: "the MariaDB rows of the store-size sweep and its MariaDB goal",
};

/** Case ids that need a part: a case is skipped when its part is. */
export function partOfCase(id: string): BenchPart | null {
  if (id.startsWith("c-")) return "haproxy";
  if (id.endsWith("-python") || id === "e-rsa-bound" || id === "e-ecdh-bound") return "python";
  if (id.startsWith("h-")) return "deno";
  return null;
}

export async function probeBenchParts(locations: PartLocations, log: (line: string) => void): Promise<BenchParts> {
  const skipped: SkippedPart[] = [];
  const skip = (part: BenchPart, reason: string) => {
    skipped.push({ part, lost: LOST[part], reason });
    log(`bench: skipping ${part}: ${reason}`);
  };
  const versions = { haproxy: "not run", python: "not run", cryptography: "not run" };

  // apt-get only for the default name: a path given on purpose is not replaced by an install.
  const haproxy = ensureHaproxy(log, locations.haproxy, locations.haproxy === HAPROXY);
  if (typeof haproxy === "string") versions.haproxy = haproxy;
  else skip("haproxy", haproxy.missing);

  try {
    const [python, cryptography] = (
      await runPython("import sys, cryptography; print(sys.version.split()[0], cryptography.__version__)", "", {}, [], locations.python)
    ).split(" ");
    versions.python = python ?? "?";
    versions.cryptography = cryptography ?? "?";
  } catch (error) {
    skip("python", `${locations.python} with cryptography did not run: ${lastLine(error)}`);
  }

  try {
    denoBinary();
  } catch (error) {
    skip("deno", lastLine(error));
  }

  const reachable = await mariadbReachable(locations.mysqlUrl);
  if (reachable !== true) skip("mariadb", reachable);

  const missing = new Set(skipped.map((s) => s.part));
  const has = (part: BenchPart) => !missing.has(part);
  const canRun = (caseId: string) => {
    const part = partOfCase(caseId);
    return part === null || has(part);
  };
  return { locations, has, canRun, skipped, versions };
}

/** True, or why MariaDB at `url` did not answer; the reason names host and port, never the URL's credentials. */
async function mariadbReachable(url: string): Promise<true | string> {
  let where = "the MariaDB URL";
  try {
    const parsed = new URL(url);
    where = `${parsed.hostname}:${parsed.port || 3306}`;
    const conn = await mysql.createConnection({ uri: url, connectTimeout: 3000 });
    await conn.end();
    return true;
  } catch (error) {
    const code = (error as { code?: string }).code;
    return `MariaDB at ${where} did not answer${code ? ` (${code})` : ""}`;
  }
}

function lastLine(error: unknown): string {
  const text = error instanceof Error ? error.message : String(error);
  return text.trim().split("\n").at(-1)!.slice(0, 200);
}
