// One configuration per host (issue 23): a role's flags from a file, `--config FILE` (or $SECUREMESH_CONFIG), or from
// SECUREMESH_<FLAG> variables, in the format of a systemd EnvironmentFile, so the unit and a hand-started role read the
// same file. The command line wins over the file, the file over the environment.
import { ConfigError } from "./errors.ts";
import { readFileSync, statSync } from "node:fs";
import { openToOthers, readPrivateFile } from "./private-files.ts";

/** The variable (and config-file key) for a flag: --cache-ttl → SECUREMESH_CACHE_TTL; the port is SECUREMESH_PORT. */
export function flagVariable(flag: string): string {
  return `SECUREMESH_${flag.toUpperCase().replace(/-/g, "_")}`;
}

const LINE = /^(?:export\s+)?([A-Z][A-Z0-9_]*)=(.*)$/;

/**
 * `NAME=value` lines as systemd reads an EnvironmentFile: blank lines and `#` comments skipped, a value may be quoted
 * with "" or ''. A line in any other shape stops the role with its number, so a typo is not silently ignored.
 */
export function parseConfigText(text: string, where: string): Map<string, string> {
  const entries = new Map<string, string>();
  for (const [i, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const match = LINE.exec(line);
    if (!match) throw new ConfigError(`${where}:${i + 1}: expected NAME=value, such as SECUREMESH_HOST=10.0.0.5`);
    let value = match[2]!.trim();
    if (value.length >= 2 && (value[0] === '"' || value[0] === "'") && value.at(-1) === value[0]) value = value.slice(1, -1);
    entries.set(match[1]!, value);
  }
  return entries;
}

export function readConfigFile(path: string): Map<string, string> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    throw new ConfigError(`cannot read --config ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
  const entries = parseConfigText(text, path);
  // A file that holds a secret is a secret file: refused when group or others can read it, as --db-file is
  // (issue 23; found by the docs pass: a 0644 config holding the database password was accepted).
  const secret = [...entries].find(([name, value]) => holdsSecret(name, value));
  if (secret) {
    const open = openToOthers(path, statSync(path).mode);
    if (open) throw new ConfigError(`--config ${path} holds a secret (${secret[0]}): ${open}`);
  }
  return entries;
}

/** Whether a config entry is a secret: a database URL with a password, or a name that says token, password or secret. */
export function holdsSecret(name: string, value: string): boolean {
  return /TOKEN|PASSWORD|PASSPHRASE|SECRET/.test(name) || /^mysql:\/\/[^/@]*:[^/@]*@/i.test(value);
}

/** Where a flag's value came from: a secret may not come from the command line, where `ps` shows it. */
export type FlagSource = "argv" | "file" | "env";

/** Where a flag's value came from, as a command says it ("--db", "$SECUREMESH_DB", "SECUREMESH_DB in the --config file"). */
export function describeFlagSource(flag: string, source: FlagSource | undefined): string {
  if (source === "file") return `${flagVariable(flag)} in the --config file`;
  if (source === "env") return `$${flagVariable(flag)}`;
  return `--${flag}`;
}

/**
 * A database URL with a password, given on the command line: every user of the host sees it in `ps`. Found by an
 * operator following the deployment docs (issue 23). The URL goes in the config file, the environment, or a file of
 * its own (--db-file).
 */
export function refuseSecretOnArgv(flag: string, value: string | undefined, source: FlagSource | undefined): void {
  if (value === undefined || source !== "argv") return;
  if (/^mysql:\/\/[^/@]*:[^/@]*@/i.test(value)) {
    throw new ConfigError(
      `--${flag} holds a password, which every user of this host can read in ps: put the URL in --${flag}-file FILE (0600), in the --config file, or in $${flagVariable(flag)}`,
    );
  }
}

const PRECEDENCE: Record<FlagSource, number> = { argv: 3, file: 2, env: 1 };

/**
 * Of two flags that say the same thing (--db and --db-file), the one to use: the one from the higher source (the
 * command line over the file over the environment), so `--db-file` given on the command line beats SECUREMESH_DB in
 * the config file; null when neither is set. Both from one source is a ConfigError: which was meant is not ours to guess.
 */
export function chooseFlag<A extends string, B extends string>(a: A, b: B, sources: Partial<Record<string, FlagSource>>): A | B | null {
  const [sa, sb] = [sources[a], sources[b]];
  if (sa === undefined) return sb === undefined ? null : b;
  if (sb === undefined) return a;
  if (sa === sb)
    throw new ConfigError(
      `--${a} and --${b} both come from ${sa === "argv" ? "the command line" : sa === "file" ? "the --config file" : "the environment"}: give one of them`,
    );
  return PRECEDENCE[sa] > PRECEDENCE[sb] ? a : b;
}

/** --db-file: the URL in FILE (0600), or one line naming the flag and what is wrong. */
export function readDbFile(path: string): string {
  try {
    return readPrivateFile(path).trim();
  } catch (error) {
    if (error instanceof ConfigError) throw error;
    throw new ConfigError(`cannot read --db-file ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
}

/**
 * The database URL from --db or --db-file, whichever came from the higher source (a password on the command line is
 * refused), else the environment variable `envVar`; with where it came from, as the role's start line says it.
 */
export function chooseDbUrl(
  values: { db?: string; "db-file"?: string },
  sources: Partial<Record<string, FlagSource>>,
  envVar: string,
): { url: string; source: string } | undefined {
  refuseSecretOnArgv("db", values.db, sources.db);
  const flag = chooseFlag("db", "db-file", sources);
  if (flag === "db") return { url: values.db!, source: describeFlagSource("db", sources.db) };
  if (flag === "db-file") {
    const file = values["db-file"]!;
    return { url: readDbFile(file), source: `${describeFlagSource("db-file", sources["db-file"])} (${file})` };
  }
  const fromEnv = process.env[envVar];
  return fromEnv ? { url: fromEnv, source: `$${envVar}` } : undefined;
}
