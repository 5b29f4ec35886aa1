// Where the repository is, and how a path is shown in a log line or an error: relative to it when inside it.
import { dirname, isAbsolute, relative, resolve } from "node:path";

/** The repository root, so roles find certs/ and data/ wherever they are started from. */
export const REPO_ROOT = resolve(dirname(new URL(import.meta.url).pathname), "..", "..");

/** A path for a log line or a doc: relative to the repository when inside it, so no machine's layout leaks. */
export function displayPath(path: string): string {
  const inside = relative(REPO_ROOT, path);
  return inside && !inside.startsWith("..") && !isAbsolute(inside) ? inside : path;
}
