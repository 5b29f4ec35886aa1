// The start-up guard against environment switches that write secrets out or weaken TLS (finding L3): every role
// runs it first, before it reads a key or opens a port. Each entry below was measured on Bun 1.4.5 and Deno 2.9.6.
import { ConfigError } from "./errors.ts";

/** The environment as the guard sees it: process.env, or a fake one in tests. */
export type Environment = Record<string, string | undefined>;

/**
 * One switch the guard knows. To add one: measure it on both runtimes (a key-log file, a token on stderr, a server
 * of another CA accepted), add a line here and a case to env-guard.test.ts; the test fails for an entry without one.
 */
export interface EnvironmentSwitch {
  name: string;
  /** Where it was measured to do harm. The guard acts on both all the same: a role may move runtime, or upgrade. */
  runtimes: "bun" | "deno" | "bun, deno";
  /** What it does, as measured; the refusal line says it. */
  does: string;
  /**
   * refuse: the role stops with one line and exit status 2.
   * clear: it is deleted from the environment instead, for a variable machines set for every program (refusing
   * would stop every role there) whose only effect on a role is to trust more, and which the runtime reads only
   * when a connection needs it, so deleting it first works (measured).
   */
  action: "refuse" | "clear";
  /**
   * Whether this value is unsafe: true (it does what `does` says), a reason of its own, or false when harmless.
   * Without it, every non-empty value is unsafe.
   */
  unsafe?: (value: string) => boolean | string;
  /** A refusal shows the value when it is a mode (`curl`, `0`), never a path or an address. */
  showValue?: boolean;
}

/** Flags the option variables may carry: they size memory and do nothing else. Anything else is refused. */
const HARMLESS_FLAGS = new Set(["--max-old-space-size", "--max-semi-space-size", "--stack-size", "--smol"]);

/** What the flags seen in the wild do, for the refusal line; a flag on neither list is refused as unreviewed. */
const FLAG_HARMS: readonly [RegExp, string][] = [
  [/^--(inspect|debug)/, "opens a debugger that can read every key in memory"],
  [/^(-r|--require|--preload|--import|--loader|--experimental-loader)$/, "runs code of its own inside the role"],
  [/^--tls-keylog$/, "writes every TLS session's secrets to a file"],
  [/heap-?snapshot|^--heap-prof|^--cpu-prof|^--prof$|^--report/, "writes the process's memory or profile to disk"],
  [/^--insecure-http-parser$/, "accepts malformed HTTP (request smuggling)"],
  [
    /^--(tls-min-v1\.[01]|tls-max-v1\.2|tls-cipher-list|security-revert|openssl-|use-system-ca|use-openssl-ca|use-bundled-ca|enable-fips|force-fips)/,
    "changes what TLS accepts",
  ],
];

/**
 * The first flag in an option list that is not a memory size, with what it does. `separators` splits the list:
 * Node and Bun options are separated by spaces, V8 flags by commas too. V8 spells `_` and `-` alike.
 */
function unsafeFlag(list: string, separators: RegExp): string | false {
  for (const token of list.split(separators).filter(Boolean)) {
    const flag = token.split("=")[0]!.replace(/^(--?)(.*)$/, (_, dashes: string, rest: string) => dashes + rest.replaceAll("_", "-"));
    if (HARMLESS_FLAGS.has(flag)) continue;
    const harm = FLAG_HARMS.find(([pattern]) => pattern.test(flag))?.[1];
    return `${shown(token)} ${harm ?? "is not on the reviewed list (memory sizes only)"}`;
  }
  return false;
}

/**
 * Every switch the guard acts on: variable, runtime(s), what it does, and why it is refused or cleared.
 * Reviewed and left alone (measured harmless to a role, or acting only with a refused switch): REVIEWED below.
 */
export const ENVIRONMENT_SWITCHES: readonly EnvironmentSwitch[] = [
  {
    name: "NODE_TLS_REJECT_UNAUTHORIZED",
    runtimes: "bun, deno",
    action: "refuse",
    showValue: true,
    does: "it turns certificate checks off (Bun: fetch and node:https, and client certificates on a server, oven-sh/bun#35240; Deno: node:https, without a warning)",
    // Only "0" does anything on either runtime ("false", "no", "00" are ignored); any value but "1" still asks
    // for the checks to be off, so it is refused too, with what it asks for.
    unsafe: (value) => (value === "1" ? false : value === "0" ? true : "it asks for certificate checks to be turned off (only 1 keeps them)"),
  },
  {
    // Refused, not cleared: Deno opens the file as it starts, before any of our code (measured with `deno eval 1`).
    name: "SSLKEYLOGFILE",
    runtimes: "deno",
    action: "refuse",
    does: "Deno writes the secrets of every TLS connection a role opens to that file, mode 0644 (Bun 1.4.5 ignores it)",
  },
  {
    name: "BUN_CONFIG_VERBOSE_FETCH",
    runtimes: "bun",
    action: "refuse",
    showValue: true,
    does: "Bun logs every outgoing request before our code runs: curl prints the Authorization header in clear, 1 and true every other header (sender proofs, forwarder assertions)",
  },
  {
    name: "NODE_DEBUG",
    runtimes: "deno",
    action: "refuse",
    showValue: true,
    does: "Deno's node:http debug log prints each request's headers, bearer tokens included (net and tls their connections; Bun only warns)",
  },
  {
    name: "NODE_OPTIONS",
    runtimes: "deno",
    action: "refuse",
    does: "Deno reads Node's flags from it (--inspect opens a debugger, --require runs code); Bun 1.4.5 ignores it",
    unsafe: (value) => unsafeFlag(value, /\s+/),
  },
  {
    name: "BUN_OPTIONS",
    runtimes: "bun",
    action: "refuse",
    does: "Bun reads its command-line flags from it (--inspect, --preload, --tls-keylog, --insecure-http-parser)",
    unsafe: (value) => unsafeFlag(value, /\s+/),
  },
  {
    name: "DENO_V8_FLAGS",
    runtimes: "deno",
    action: "refuse",
    does: "Deno passes it to V8: --heap-snapshot-on-gc writes the heap, private keys included, to 0644 files",
    unsafe: (value) => unsafeFlag(value, /[\s,]+/),
  },
  {
    name: "BUN_INSPECT",
    runtimes: "bun",
    action: "refuse",
    does: "Bun opens a debugger that can read every key in memory, without a word, before any of our code runs",
  },
  {
    name: "BUN_INSPECT_CONNECT_TO",
    runtimes: "bun",
    action: "refuse",
    does: "Bun hands a debugger at that address every key in memory, before any of our code runs",
  },
  {
    name: "DENO_CERT",
    runtimes: "deno",
    action: "refuse",
    does: "Deno's fetch trusts that file's CAs besides ours, even on a hop pinned to our CA (a server of another CA was accepted)",
  },
  {
    name: "DENO_TLS_CA_STORE",
    runtimes: "deno",
    action: "refuse",
    showValue: true,
    does: "Deno's fetch trusts the system store (and SSL_CERT_FILE) besides our CA, even on a hop pinned to it (a server of another CA was accepted)",
    unsafe: (value) => value !== "mozilla", // Deno's default
  },
  {
    // Refusing would stop every role on hosts that set it for all programs (CI images; this project's own test
    // machine sets it to the system bundle). Deno reads it at its first connection, so deleting it first works.
    // Bun reads it at start, before our code, but adds it only where no CA is pinned, as SSL_CERT_FILE does.
    name: "NODE_EXTRA_CA_CERTS",
    runtimes: "deno",
    action: "clear",
    does: "Deno's fetch trusts that file's CAs besides ours, even on a hop pinned to our CA (a server of another CA was accepted)",
  },
];

/** Measured and left alone: what each does to a role, so nobody measures it again. */
export const REVIEWED: readonly { name: string; value: string; why: string }[] = [
  { name: "RUST_LOG", value: "trace", why: "Deno 2.9.6 prints nothing for it (rustls, hyper, reqwest at trace)" },
  {
    name: "SSL_CERT_FILE",
    value: "/etc/ssl/certs/ca-certificates.crt",
    why: "Bun's default store only, for hops with no pinned CA (an API without --api-ca); Deno only with DENO_TLS_CA_STORE=system, refused",
  },
  { name: "SSL_CERT_DIR", value: "/etc/ssl/certs", why: "no effect measured on either runtime" },
  { name: "NODE_USE_SYSTEM_CA", value: "1", why: "the default store of node:https only (Deno); pinned hops unchanged" },
  {
    name: "HTTPS_PROXY",
    value: "http://127.0.0.1:3128",
    why: "fetch tunnels through it with CONNECT; the pinned CA and client certificate still hold end to end (measured)",
  },
  { name: "NODE_USE_ENV_PROXY", value: "1", why: "Deno's node:https then tunnels through HTTPS_PROXY too; the checks hold end to end (measured)" },
  { name: "OPENSSL_CONF", value: "/etc/ssl/openssl.cnf", why: "neither runtime reads it (a broken file changed nothing)" },
  { name: "OTEL_DENO", value: "true", why: "exports spans, metrics and the role's own log lines, no request headers (measured against a collector)" },
  { name: "BUN_INSPECT_NOTIFY", value: "unix:///tmp/x.sock", why: "acts only with BUN_INSPECT, refused; alone nothing listens or connects" },
  { name: "BUN_INSPECT_PRELOAD", value: "/tmp/x.js", why: "acts only with BUN_INSPECT, refused; alone nothing runs" },
  { name: "NODE_OPTIONS", value: "--max-old-space-size=512", why: "a memory size (the only kind of flag allowed)" },
];

/** A value as a refusal may show it: one line, short. */
function shown(value: string): string {
  const printable = value.replace(/[\x00-\x1f\x7f]/g, "?");
  return printable.length > 60 ? `${printable.slice(0, 57)}...` : printable;
}

/**
 * Refuses (ConfigError, naming the variable and the fix) or clears every switch in ENVIRONMENT_SWITCHES that is set
 * to an unsafe value. Returns the names it cleared.
 * @example assertSafeEnvironment(); // first thing in a role's main, before any key is read or port opened
 */
export function assertSafeEnvironment(env: Environment = process.env): string[] {
  const cleared: string[] = [];
  for (const entry of ENVIRONMENT_SWITCHES) {
    const value = env[entry.name];
    if (value === undefined || value === "") continue;
    const verdict = entry.unsafe ? entry.unsafe(value) : true;
    if (verdict === false) continue;
    const why = verdict === true ? entry.does : verdict;
    if (entry.action === "clear") {
      delete env[entry.name];
      cleared.push(entry.name);
      continue;
    }
    const label = entry.showValue ? `${entry.name}=${shown(value)}` : entry.name;
    throw new ConfigError(`${label} is set: ${why}, so this role will not start; unset ${entry.name}`);
  }
  return cleared;
}
