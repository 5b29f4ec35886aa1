// Command-line and environment configuration shared by every role: flags, --help, one-line errors, PKI paths.
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { ConfigError } from "./errors.ts";
import { REPO_ROOT } from "./paths.ts";
import { readPrivateFile } from "./private-files.ts";
import { flagVariable, readConfigFile, type FlagSource } from "./config-file.ts";
import { fernetKeysInOrder, parseFernetKeyFile, type FernetKeyFile } from "./fernet-key-file.ts";

export { displayPath, REPO_ROOT } from "./paths.ts";

export type FlagSpec = Record<string, { type: "string" | "boolean"; short?: string; multiple?: boolean }>;

export interface Parsed<T extends FlagSpec> {
  values: { [K in keyof T]?: T[K]["type"] extends "boolean" ? boolean : T[K]["multiple"] extends true ? string[] : string };
  positionals: string[];
  /** Where each given flag came from (config-file.ts): a secret may not come from the command line. */
  sources: { [K in keyof T]?: FlagSource };
}

/** The line every role's --help ends with: the config file and variables it reads (config-file.ts). */
export const CONFIG_HELP = `
  --config FILE      read flags from FILE: SECUREMESH_<FLAG>=value lines (SECUREMESH_DB, SECUREMESH_PORT, ...), the
                     format of a systemd EnvironmentFile (default $SECUREMESH_CONFIG); the command line wins over
                     the file, the file over SECUREMESH_<FLAG> variables in the environment`;

/**
 * Parses flags strictly; `--help` prints `usage` and exits 0, and any mistake exits 2 with one line. A flag the command
 * line leaves out is read from the --config file, then from its SECUREMESH_<FLAG> variable (config-file.ts); a
 * multi-valued flag lists its values there separated by spaces.
 * @example const { values } = parseFlags("server", usage, { port: { type: "string" } });
 */
export function parseFlags<T extends FlagSpec>(
  role: string,
  usage: string,
  spec: T,
  argv = process.argv.slice(2),
  env: Record<string, string | undefined> = process.env,
): Parsed<T> {
  try {
    const { values, positionals } = parseArgs({
      args: argv,
      options: { ...spec, config: { type: "string" }, help: { type: "boolean", short: "h" } },
      allowPositionals: true,
      strict: true,
    });
    if ((values as { help?: boolean }).help) {
      // The same flags on both runtimes: `bun roles/ROLE.ts …` or `deno run -A roles/ROLE.ts …`.
      console.log(usage.trim() + "\n" + CONFIG_HELP.replace(/^\n/, ""));
      process.exit(0);
    }
    const configPath = (values as { config?: string }).config ?? env.SECUREMESH_CONFIG;
    const file = configPath ? readConfigFile(configPath) : new Map<string, string>();
    const known = new Set([...Object.keys(spec), "port"].map(flagVariable));
    const stray = [...file.keys()].find((name) => !known.has(name));
    if (stray) throw new ConfigError(`${configPath}: ${stray} is not a flag of ${role} (see --help)`);
    const out = values as Record<string, unknown>;
    const sources: Record<string, FlagSource> = {};
    for (const [flag, option] of Object.entries(spec)) {
      if (out[flag] !== undefined) {
        sources[flag] = "argv";
        continue;
      }
      const name = flagVariable(flag);
      const [raw, source] = file.has(name) ? [file.get(name), "file" as const] : [env[name], "env" as const];
      if (raw === undefined || raw === "") continue;
      if (option.type === "boolean") {
        if (raw !== "true" && raw !== "false") throw new ConfigError(`${name} must be true or false, not '${raw}'`);
        out[flag] = raw === "true";
      } else {
        out[flag] = option.multiple ? raw.split(/\s+/).filter(Boolean) : raw;
      }
      sources[flag] = source;
    }
    const port = file.get("SECUREMESH_PORT") ?? env.SECUREMESH_PORT;
    if (positionals.length === 0 && port) positionals.push(port);
    delete out.config;
    return { values: out as Parsed<T>["values"], positionals, sources: sources as Parsed<T>["sources"] };
  } catch (error) {
    const message = error instanceof ConfigError ? error.message : `${(error as Error).message} (see --help)`;
    return exitWithConfigError(role, new ConfigError(message));
  }
}

/** Prints `role: message` on one line and exits; for configuration that cannot work. */
export function exitWithConfigError(role: string, error: unknown): never {
  const message = error instanceof Error ? error.message : String(error);
  console.error(`${role}: ${message.split("\n")[0]}`);
  process.exit(2);
}

/** A TCP port from a flag or variable; 0 asks the OS for a free one. */
export function parsePort(value: string | undefined, name: string, fallback?: number): number {
  if (value === undefined || value === "") {
    if (fallback === undefined) throw new ConfigError(`${name} is required`);
    return fallback;
  }
  const port = Number(value);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new ConfigError(`${name} must be a port number from 0 to 65535, not '${value}'`);
  return port;
}

/** A positive duration or count from a flag or variable. */
export function parsePositive(value: string | undefined, name: string, fallback: number): number {
  if (value === undefined || value === "") return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new ConfigError(`${name} must be a positive number, not '${value}'`);
  return n;
}

/** Where pki.sh wrote its material: --pki, then $PKI_DIR, then certs/ in the repository. */
export function pkiDir(flag?: string): string {
  return resolve(flag ?? process.env.PKI_DIR ?? join(REPO_ROOT, "certs"));
}

/** Reads a file the PKI should hold, turning a missing or unreadable file into a one-line fix. */
export function readPkiFile(dir: string, file: string): string {
  return readPkiPath(dir, file, (path) => readFileSync(path, "utf8"));
}

/**
 * Reads a secret the PKI holds (a private key, the Fernet key) as readPkiFile does, and refuses it when group or
 * others can read it: `certs/server_key.pem is readable by group or others (mode 0644); run chmod 600 …`.
 */
export function readPrivatePkiFile(dir: string, file: string): string {
  return readPkiPath(dir, file, readPrivateFile);
}

/** The roles whose identity file is named after the role (server_cert.pem), whatever the host's identity is called. */
const ROLE_FILES = new Set(["server", "coordinator", "keyserver", "secureproxy", "marketplace"]);

/**
 * How a host gets a PKI file it lacks. Never a command that could make a CA here or replace one (issue 23): the
 * files come from the CA host, where `./pki.sh issue` and `./pki.sh bundle` only ever use the CA that is there.
 */
function missingPkiFileFix(file: string): string {
  const elsewhere = "or point --pki or PKI_DIR at the folder that holds";
  const identity = /^(.+)_(?:cert|key)\.pem$/.exec(file)?.[1];
  if (identity && identity !== "ca") {
    const packs = ROLE_FILES.has(identity)
      ? `./pki.sh bundle NAME DIR --as ${identity} packs this host's identity NAME (./pki.sh issue NAME --${identity} --san … issues it)`
      : `./pki.sh bundle ${identity} DIR packs them (./pki.sh issue ${identity} --KIND --san … issues it)`;
    return `copy this host's files from the CA host, where ${packs}, ${elsewhere} them`;
  }
  if (file === "encryption_key.txt") return `copy encryption_key.txt from the CA host (./pki.sh bundle NAME DIR --fernet there packs it), ${elsewhere} it`;
  return `copy ${file} from the CA host (./pki.sh bundle NAME DIR there packs it with this host's identity), ${elsewhere} it`;
}

function readPkiPath(dir: string, file: string, read: (path: string) => string): string {
  const path = join(dir, file);
  try {
    return read(path);
  } catch (error) {
    if (error instanceof ConfigError) throw error;
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new ConfigError(`missing ${path}: ${missingPkiFileFix(file)}`);
    if (code === "EACCES") throw new ConfigError(`cannot read ${path}: permission denied`);
    throw new ConfigError(`cannot read ${path}: ${code ?? (error as Error).message}`);
  }
}

/** The Fernet key file in a PKI folder; fernet-key-file.ts says its format, fernet-keys.ts rotates it. */
export const FERNET_KEY_FILE = "encryption_key.txt";

/**
 * The Fernet keys, the primary (encrypting) one first: $FERNET_KEY, else encryption_key.txt in the PKI (0600), in
 * the format of fernet-key-file.ts (a file of one key per line, newest first, reads as before).
 */
export function loadFernetKeys(dir: string): string[] {
  return fernetKeysInOrder(loadFernetKeyFile(dir));
}

/** As loadFernetKeys, with each key's role and dates (fernet-reload.ts tells an added key from a demoted one). */
export function loadFernetKeyFile(dir: string): FernetKeyFile {
  const fromEnv = process.env.FERNET_KEY;
  const text = fromEnv ?? readPrivatePkiFile(dir, FERNET_KEY_FILE);
  const where = fromEnv === undefined ? join(dir, FERNET_KEY_FILE) : "$FERNET_KEY";
  if (!/[^\s,]/.test(text.replace(/#.*/g, ""))) {
    if (fromEnv !== undefined)
      throw new ConfigError(`FERNET_KEY is set but holds no Fernet key: give the key, or unset it to read ${join(dir, FERNET_KEY_FILE)}`);
    throw new ConfigError(`no Fernet key in ${where}: ${missingPkiFileFix(FERNET_KEY_FILE)}`);
  }
  return parseFernetKeyFile(text, where);
}

/** Runs `cleanup` once on SIGTERM or SIGINT, then exits 0: every role stops the same way. */
export function exitOnSignals(cleanup: () => Promise<unknown> | unknown): void {
  const stop = async () => {
    await cleanup();
    process.exit(0);
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}

/** The authorization policy: --policy, then $SECUREMESH_POLICY, then roles/policy.json in the repository. */
export function policyPath(flag?: string): string {
  return resolve(flag ?? process.env.SECUREMESH_POLICY ?? join(REPO_ROOT, "roles", "policy.json"));
}
