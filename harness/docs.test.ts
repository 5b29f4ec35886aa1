// The docs kept honest (STYLE 16): every link and anchor in README.md, docs/ and bench/HISTORY.md resolves,
// each options table matches its command's --help both ways (the --config part every role's --help ends with, once,
// in the common table), every constant the pages quote is the code's, every finding the code cites has its anchor,
// and every test the findings page names exists.
import { DEFAULT_IN_FLIGHT } from "../shared/authz/limits.ts";
import { DRAIN_DEADLINE_MS, DRAIN_GRACE_MS, DRAIN_QUIET_MS } from "../shared/platform/drain.ts";
import { ADMIN_DRAIN_WAIT_MS } from "../shared/coordinator/app.ts";
import { LIMIT_LOG_INTERVAL_MS } from "../shared/authz/request-limiter.ts";
import { DEFAULT_MAX_LIMIT_WAIT_MS } from "../shared/platform/https-client.ts";
import { describe, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { parseClientConfig } from "../roles/client.ts";
import { parseCoordinatorConfig } from "../roles/coordinator.ts";
import { parseKeyserverConfig } from "../roles/keyserver.ts";
import { defaultApiIdentity, KEYSERVER_IDENTITY, parseProxyConfig } from "../roles/secureproxy.ts";
import { parseServerConfig } from "../roles/server.ts";
import { parsePolicy } from "../shared/authz/policy.ts";
import { CONFIG_HELP, REPO_ROOT } from "../shared/platform/config.ts";
import { ENVIRONMENT_SWITCHES } from "../shared/platform/env-guard.ts";
import {
  BODY_DEADLINE_MS,
  DEFAULT_BODY_LIMIT,
  HANDSHAKE_DEADLINE_MS,
  HEADER_DEADLINE_MS,
  IDLE_TIMEOUT_S,
  MAX_CONNECTIONS_PER_IDENTITY,
  MAX_HANDSHAKES_PER_ADDRESS,
} from "../shared/platform/runtime/limits.ts";
import { CAP_ANSWER_WITHIN_MS } from "../shared/platform/runtime/admission.ts";
import { RELOAD_INTERVAL_MS } from "../shared/platform/watch.ts";
import { LATEST_RECORDS } from "../shared/request-path/data-view.ts";
import { COORDINATOR_IDENTITY } from "../shared/request-path/mesh-client.ts";
import { RETRY_BUDGET_MIN_PER_SECOND, RETRY_BUDGET_PERCENT, RETRY_BUDGET_WINDOW_MS } from "../shared/request-path/retry-budget.ts";
import { STORE_PING_DEADLINE_MS } from "../shared/request-path/server-app.ts";
import {
  BASE_EJECTION_MS,
  CONSECUTIVE_GATEWAY_FAILURES,
  EJECTION_DECAY_MS,
  MAX_EJECTED_PERCENT,
  MAX_EJECTION_MS,
  PANIC_THRESHOLD_PERCENT,
  POOL_RETRY_AFTER_S,
  QUEUE_MAX_WAITING,
  QUEUE_TIMEOUT_MS,
} from "../shared/request-path/upstream.ts";
import { CLOCK_SKEW_S, PROOF_LIFETIME_S, PROOF_TYPE } from "../shared/request-path/proof.ts";
import { PROMOTE_AFTER_ADD_MS } from "../shared/request-path/fernet-keys.ts";
import { MAX_CLOCK_SKEW_S } from "../shared/request-path/fernet.ts";
import { CPU_OVER_FLOOR_GOAL, DENO_OVER_BUN_GOAL, IDLE_RSS_GOAL_MIB, THROUGHPUT_VS_HAPROXY_GOAL } from "./bench.ts";
import { RELOAD_BOUND_MS } from "./findings.ts";
import { SERVER_TOKEN_TTL_S } from "./multihost/deployment.ts";
import { FULL_PLAN, SHORT_PLAN } from "./multihost/run.ts";
import { GALERA_RESTART_ATTEMPTS, GALERA_RESTART_BACKOFF_MS } from "./multihost/runbooks.ts";
import { seedPorts } from "./scenario.ts";

/** The pages this test reads, relative to the repository. */
const PAGES = [
  "README.md",
  ...readdirSync(join(REPO_ROOT, "docs"))
    .filter((f) => f.endsWith(".md"))
    .sort()
    .map((f) => `docs/${f}`),
  "bench/HISTORY.md",
];

const source = (path: string) => readFileSync(join(REPO_ROOT, path), "utf8");
/** A page without its fenced code blocks: transcripts and shell lines are neither links nor headings. */
const prose = (text: string) => text.replace(/^```[^\n]*\n[\s\S]*?^```[ \t]*$/gm, "");
const oneLine = (text: string) => text.replace(/\s+/g, " ").trim();

/** GitHub's heading anchor: the text as rendered, lower case, punctuation dropped, spaces to hyphens. */
export function slug(heading: string): string {
  const text = heading
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1") // a link renders as its text
    .replace(/`([^`]*)`/g, "$1")
    .replace(/<[^>]+>/g, "");
  return text
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, "")
    .replace(/ /g, "-");
}

/** Every anchor a page offers: its headings' slugs (GitHub numbers repeats -1, -2, …) and its explicit ids. */
export function anchorsOf(text: string): Set<string> {
  const anchors = new Set<string>();
  const seen = new Map<string, number>();
  for (const [, heading] of prose(text).matchAll(/^#{1,6}[ \t]+(.+?)[ \t#]*$/gm)) {
    const base = slug(heading!);
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    anchors.add(n === 0 ? base : `${base}-${n}`);
  }
  for (const [, id] of text.matchAll(/<a\s+(?:id|name)="([^"]+)"/g)) anchors.add(id!);
  return anchors;
}

/** The relative links of a page outside code blocks: [text](target) and ![alt](target). */
function linksOf(text: string): string[] {
  return [...prose(text).matchAll(/!?\[(?:[^[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+"[^"]*")?\)/g)]
    .map((m) => m[1]!)
    .filter((target) => !/^[a-z][a-z+.-]*:/i.test(target)); // http:, https:, mailto: are not ours to check
}

/** Where a link leads, or what is wrong with it. */
export function brokenLink(page: string, target: string, read: (path: string) => string | null): string | null {
  const hash = target.indexOf("#");
  const path = hash === -1 ? target : target.slice(0, hash);
  const anchor = hash === -1 ? null : decodeURIComponent(target.slice(hash + 1));
  const file = path === "" ? page : relative(REPO_ROOT, resolve(REPO_ROOT, dirname(page), decodeURIComponent(path)));
  if (file.startsWith("..") || !existsSync(join(REPO_ROOT, file))) return `${page}: ${target}: no such file ${file}`;
  if (anchor === null) return null;
  const text = read(file);
  if (text === null) return `${page}: ${target}: ${file} is not a page with anchors`;
  return anchorsOf(text).has(anchor) ? null : `${page}: ${target}: ${file} has no heading or <a id> "${anchor}"`;
}

const readPage = (path: string) => (path.endsWith(".md") ? source(path) : null);

/** Paths of the repository a page quotes in backticks (`shared/platform/tls.ts`); generated ones are left out. */
function quotedPaths(text: string): string[] {
  const generated = /^(harness\/logs|bench\/partial\.json)/;
  return [...prose(text).matchAll(/`((?:roles|shared|harness|bench|docs|\.ci)\/[A-Za-z0-9_./-]*|pki\.sh)`/g)]
    .map((m) => m[1]!)
    .filter((p) => !generated.test(p));
}

/** The rows of the markdown table that follows `<!-- marker -->`, each as its cells. */
export function tableAfter(text: string, marker: string): string[][] {
  const at = text.indexOf(`<!-- ${marker} -->`);
  if (at === -1) return [];
  const lines = text.slice(at).split("\n").slice(1);
  const rows: string[][] = [];
  for (const line of lines) {
    if (!line.startsWith("|")) {
      if (rows.length > 0) break;
      continue;
    }
    // Split on pipes that are not escaped (`--access-log on\|off`).
    const cells = line
      .trim()
      .replace(/^\||\|$/g, "")
      .split(/(?<!\\)\|/)
      .map((c) => c.trim().replace(/\\\|/g, "|"));
    rows.push(cells);
  }
  return rows.slice(2); // the header and the --- line
}

/** The options a --help text names, without --help itself. */
export function helpFlags(help: string): Set<string> {
  return new Set([...help.matchAll(/(?<![\w-])--[a-z][a-z-]*/g)].map((m) => m[0]).filter((f) => f !== "--help"));
}

/** The lines --help gives one option under "Options:", joined; the whole text when it has none of its own. */
function helpEntry(help: string, flag: string): string {
  const options = help.slice(help.indexOf("Options:"));
  const entries = options.split(/\n(?=\s{2}(?:-\w, )?--[a-z])/);
  const own = entries.find((e) => new RegExp(`^\\s{2}(?:-\\w, )?${flag}(?![a-z-])`).test(e));
  return oneLine(own ?? help);
}

/** The values a default cell states (numbers, SPIFFE IDs, URLs), each of which its help entry must state too. */
function statedValues(cell: string): string[] {
  return [...cell.replace(/`/g, "").matchAll(/spiffe:\/\/[^\s,)]+|https:\/\/[^\s,)]+|\d[\d.]*\d|\d/g)].map((m) => m[0]);
}

const mentions = (text: string, value: string) =>
  /^[\d.]+$/.test(value) ? new RegExp(`(?<![\\d.])${value.replace(/\./g, "\\.")}(?![\\d])`).test(text) : text.includes(value);

/** A command's --help, run as a user runs it (environment switches the guard refuses left out). */
async function helpOf(script: string): Promise<string> {
  const env: Record<string, string | undefined> = { ...process.env };
  for (const { name } of ENVIRONMENT_SWITCHES) delete env[name];
  const proc = Bun.spawn([process.execPath, join(REPO_ROOT, script), "--help"], { cwd: REPO_ROOT, env, stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  expect({ script, exitCode, stderr }).toEqual({ script, exitCode: 0, stderr: "" });
  return stdout;
}

/** Runs `fn` with these environment variables unset, so a role's parser shows its own defaults. */
function withoutEnv<T>(names: string[], fn: () => T): T {
  const saved = names.map((n) => [n, process.env[n]] as const);
  for (const n of names) delete process.env[n];
  try {
    return fn();
  } finally {
    for (const [n, v] of saved) if (v !== undefined) process.env[n] = v;
  }
}

/** Every value a page must state as the code has it: `NAME` = value, or a constants-table row `| NAME | value |`. */
const CONSTANTS: Record<string, number> = {
  PROOF_LIFETIME_S,
  CLOCK_SKEW_S,
  IDLE_TIMEOUT_S,
  HEADER_DEADLINE_MS,
  BODY_DEADLINE_MS,
  HANDSHAKE_DEADLINE_MS,
  MAX_HANDSHAKES_PER_ADDRESS,
  MAX_CONNECTIONS_PER_IDENTITY,
  DEFAULT_BODY_LIMIT,
  RELOAD_INTERVAL_MS,
  RELOAD_BOUND_MS,
  LATEST_RECORDS,
  CAP_ANSWER_WITHIN_MS,
  SERVER_TOKEN_TTL_S,
  GALERA_RESTART_ATTEMPTS,
  GALERA_RESTART_BACKOFF_MS,
  DEFAULT_IN_FLIGHT,
  LIMIT_LOG_INTERVAL_MS,
  DEFAULT_MAX_LIMIT_WAIT_MS,
  DRAIN_QUIET_MS,
  DRAIN_GRACE_MS,
  DRAIN_DEADLINE_MS,
  ADMIN_DRAIN_WAIT_MS,
  // Issue 20: docs/overload.md
  CONSECUTIVE_GATEWAY_FAILURES,
  BASE_EJECTION_MS,
  MAX_EJECTION_MS,
  EJECTION_DECAY_MS,
  MAX_EJECTED_PERCENT,
  PANIC_THRESHOLD_PERCENT,
  QUEUE_MAX_WAITING,
  QUEUE_TIMEOUT_MS,
  POOL_RETRY_AFTER_S,
  RETRY_BUDGET_PERCENT,
  RETRY_BUDGET_MIN_PER_SECOND,
  RETRY_BUDGET_WINDOW_MS,
  STORE_PING_DEADLINE_MS,
  CRL_DAYS: Number(/crl_days=\$\{CRL_DAYS:-(\d+)\}/.exec(source("pki.sh"))?.[1]),
};

/** The quoted numbers after each `NAME` in a text: `NAME` = 60, `NAME` | 60 (a table row). */
export function quotedConstants(text: string, name: string): number[] {
  return [...prose(text).matchAll(new RegExp(`\`${name}\`\\s*(?:=|\\|)\\s*([0-9][0-9,_]*)`, "g"))].map((m) => Number(m[1]!.replace(/[,_]/g, "")));
}

const policy = parsePolicy(source("roles/policy.json"));
// SECUREMESH_CONFIG and every SECUREMESH_<FLAG> too: a role's parser reads flags from them (shared/platform/config-file.ts).
const ENV_NAMES = [
  "PORT",
  "SERVERS",
  "DATABASE_URL",
  "KEYSERVER_DB",
  "FERNET_TTL",
  "PKI_DIR",
  ...Object.keys(process.env).filter((n) => n.startsWith("SECUREMESH_")),
];
const defaults = withoutEnv(ENV_NAMES, () => ({
  server: parseServerConfig(["0"]),
  coordinator: parseCoordinatorConfig([]),
  client: parseClientConfig([]),
  keyserver: parseKeyserverConfig([]),
  secureproxy: parseProxyConfig([]),
}));
const ports = seedPorts();

/**
 * What a page says in its own words, and the code's value it must match: the pattern's groups, joined by spaces, are
 * compared with `value` (as text). A page that no longer says it fails too, so an edit must keep the statement or this row.
 */
const STATEMENTS: { page: string; pattern: RegExp; value: string | number; what: string }[] = [
  {
    page: "docs/performance.md",
    pattern:
      /CPU per request with its access log\s+at most ([\d.]+x) the bare Bun proxy's \(1 process and 2 workers\), one coordinator process at least ([\d.]+x) HAProxy's throughput\s+with both logging, its p99 at concurrency 64 no worse than HAProxy's, Deno at least ([\d.]+x) Bun on cached reads,\s+([\d.]+x) on POST and ([\d.]+x) on token releases, and every role idle at most (\d+) MiB on Bun and (\d+) MiB on Deno/,
    value: [CPU_OVER_FLOOR_GOAL, THROUGHPUT_VS_HAPROXY_GOAL, DENO_OVER_BUN_GOAL.read, DENO_OVER_BUN_GOAL.write, DENO_OVER_BUN_GOAL.releases]
      .map((goal) => `${goal.toFixed(2)}x`)
      .concat([String(IDLE_RSS_GOAL_MIB.bun), String(IDLE_RSS_GOAL_MIB.deno)])
      .join(" "),
    what: "the bench's issue-22 goals (harness/bench.ts)",
  },
  { page: "README.md", pattern: /`\.\/pki\.sh` signs CRLs for (\d+) days/, value: CONSTANTS.CRL_DAYS!, what: "CRL_DAYS in pki.sh" },
  {
    page: "docs/operations.md",
    pattern: /fernet promote --ttl TTL` \(refused sooner than (\d+) s after the add\)/,
    value: PROMOTE_AFTER_ADD_MS / 1000,
    what: "PROMOTE_AFTER_ADD_MS in the Fernet runbook",
  },
  {
    page: "docs/operations.md",
    pattern: /Once TTL \+ (\d+) s of clock skew have passed since the promote/,
    value: MAX_CLOCK_SKEW_S,
    what: "MAX_CLOCK_SKEW_S in the Fernet runbook",
  },
  {
    page: "README.md",
    pattern: /the roles reload crl\.pem within (a second)/,
    value: RELOAD_INTERVAL_MS <= 1000 ? "a second" : `${RELOAD_INTERVAL_MS} ms`,
    what: "RELOAD_INTERVAL_MS",
  },
  {
    page: "docs/roles.md",
    pattern: /`roles\/coordinator\.ts \[PORT\] \[options\]` \(PORT default (\d+)\)/,
    value: defaults.coordinator.port,
    what: "the coordinator's port",
  },
  {
    page: "docs/roles.md",
    pattern: /`roles\/keyserver\.ts \[PORT\] \[options\]` \(PORT default (\d+)\)/,
    value: defaults.keyserver.port,
    what: "the KeyServer's port",
  },
  {
    page: "docs/roles.md",
    pattern: /`roles\/secureproxy\.ts \[PORT\] \[options\]` \(PORT default (\d+)\)/,
    value: defaults.secureproxy.port,
    what: "the SecureProxy's port",
  },
  {
    page: "docs/roles.md",
    pattern: /`roles\/marketplace\.ts \[PORT\] --token-file FILE \[options\]` \(PORT default (\d+)\)/,
    value: Number(/"PORT", (\d+)\)/.exec(source("roles/marketplace.ts"))?.[1]),
    what: "the marketplace's port",
  },
  { page: "docs/harness.md", pattern: /servers (\d+) and \d+, the coordinator/, value: ports.server1, what: "server 1's seed port" },
  { page: "docs/harness.md", pattern: /servers \d+ and (\d+), the coordinator/, value: ports.server2, what: "server 2's seed port" },
  { page: "docs/harness.md", pattern: /the coordinator (\d+), the KeyServer/, value: ports.coordinator, what: "the coordinator's seed port" },
  { page: "docs/harness.md", pattern: /the KeyServer (\d+), the\s+SecureProxy/, value: ports.keyserver, what: "the KeyServer's seed port" },
  { page: "docs/harness.md", pattern: /SecureProxy (\d+), the marketplace/, value: ports.secureproxy, what: "the SecureProxy's seed port" },
  { page: "docs/harness.md", pattern: /the marketplace (\d+), the coordinator's admin page/, value: ports.marketplace, what: "the marketplace's seed port" },
  { page: "docs/harness.md", pattern: /admin page (\d+), HAProxy/, value: ports.coordinatorAdmin, what: "the admin page's seed port" },
  { page: "docs/harness.md", pattern: /HAProxy (\d+) in the bench/, value: ports.haproxy, what: "HAProxy's seed port" },
  {
    page: "docs/authorization.md",
    pattern: /The repository's policy gives coordinator identities (\d+)/,
    value: policy.limits.find((l) => l.identity === "spiffe://securemesh/coordinator/*")?.connections ?? -1,
    what: "the coordinators' limit in roles/policy.json",
  },
  {
    page: "docs/authorization.md",
    pattern: /\{ "identity": "\*", "connections": (\d+) \}/,
    value: policy.limits.find((l) => l.identity === "*")?.connections ?? -1,
    what: "the catch-all limit in roles/policy.json",
  },
  { page: "docs/architecture.md", pattern: /`typ` exactly `([^`]+)`/, value: PROOF_TYPE, what: "PROOF_TYPE" },
  {
    page: "docs/architecture.md",
    pattern: /`--timeout`, default (\d+) ms per attempt/,
    value: defaults.coordinator.timeoutMs,
    what: "the coordinator's --timeout",
  },
  {
    page: "docs/architecture.md",
    pattern: /in up to (\d+) rounds with a backoff of \d+ ms/,
    value: Number(/attempts: (\d+)/.exec(source("shared/request-path/mesh-client.ts"))?.[1]),
    what: "MeshClient's rounds",
  },
  {
    page: "docs/architecture.md",
    pattern: /rounds with a backoff of (\d+) ms/,
    value: Number(/backoffMs: (\d+)/.exec(source("shared/request-path/mesh-client.ts"))?.[1]),
    what: "MeshClient's backoff",
  },
  {
    page: "docs/tokens.md",
    pattern: /within ±(\d+) s of the KeyServer's clock/,
    value: Number(/windowMs \?\? (\d+)_000/.exec(source("shared/token-path/replay.ts"))?.[1]),
    what: "the replay window",
  },
  { page: "docs/tokens.md", pattern: /\(`--replay-quota`, default (\d+)\)/, value: defaults.keyserver.replayQuota, what: "--replay-quota" },
  {
    page: "docs/tokens.md",
    pattern: /must present (spiffe:\/\/securemesh\/marketplace\/marketplace)/,
    value: defaultApiIdentity("marketplace"),
    what: "the marketplace's pinned identity",
  },
  { page: "docs/caching.md", pattern: /`--cache-ttl MS`\s+\(default (\d+)\)/, value: defaults.server.cacheTtlMs, what: "--cache-ttl" },
  { page: "docs/caching.md", pattern: /`--cache-entries N` \(default (\d+)\)/, value: defaults.server.cacheEntries, what: "--cache-entries" },
  { page: "docs/security.md", pattern: /\| SecureProxy → KeyServer \| `([^`]+)`/, value: KEYSERVER_IDENTITY, what: "the KeyServer's pinned identity" },
  {
    page: "docs/security.md",
    pattern: /\| client → coordinator \| `--expect-coordinator` \(default `([^`]+)`\)/,
    value: COORDINATOR_IDENTITY,
    what: "the client's expected coordinator",
  },
  { page: "docs/security.md", pattern: /`--expect-server` \(default `([^`]+)`\)/, value: defaults.coordinator.expectServer, what: "--expect-server" },
  { page: "docs/roles.md", pattern: /\| `--timeout MS` \| (\d+) \| per-request timeout \|/, value: defaults.client.timeoutMs, what: "the client's --timeout" },
];

/** Findings the code cites: `#11 L5`, `#18 M2`, `#13 Part 4`, `issue 18, H1`, `issue 14 part 7`, `#12`, `issue 23`, as anchors. */
export function citedAnchors(text: string): string[] {
  const anchors: string[] = [];
  const cite = /(?<![\w/-])(?:#|[Ii]ssue )([1-9]\d)\b(?:(?:,|:)?\s+(?:[Pp]art (\d+)\b|([HML]\d+|Hardening)\b))?/g;
  for (const [, issue, part, id] of text.matchAll(cite)) {
    anchors.push(part ? `${issue}-part-${part}` : id ? `${issue}-${id.toLowerCase()}` : issue!);
  }
  return anchors;
}

function codeFiles(dir: string): string[] {
  return readdirSync(join(REPO_ROOT, dir), { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && e.name.endsWith(".ts"))
    .map((e) => relative(REPO_ROOT, join(e.parentPath, e.name)))
    .filter((p) => !p.startsWith("harness/logs/"));
}

/** `[`file`](link) — “words of a test's name”, “…”: the tests a page names, with the files they are in. */
export function citedTests(page: string, text: string): { file: string; name: string }[] {
  const cited: { file: string; name: string }[] = [];
  const citation = /((?:\[`[^`\]]+`\]\([^)]+\)(?:\s+and\s+)?)+)\s+—\s+((?:“[^”]+”(?:,\s*)?)+)/g;
  for (const [, links, names] of prose(text).matchAll(citation)) {
    const files = [...links!.matchAll(/\]\(([^)#]+)\)/g)].map((m) => relative(REPO_ROOT, resolve(REPO_ROOT, dirname(page), m[1]!)));
    for (const [, name] of names!.matchAll(/“([^”]+)”/g)) for (const file of files) cited.push({ file, name: oneLine(name!) });
  }
  return cited;
}

describe("links and anchors", () => {
  test("slugs follow GitHub's rules", () => {
    expect([
      slug("Caching: `get_data()`"),
      slug("`bun harness security`"),
      slug('Issue 18: "No unverified hop"'),
      slug("The regression cases, from a real run"),
    ]).toEqual(["caching-get_data", "bun-harness-security", "issue-18-no-unverified-hop", "the-regression-cases-from-a-real-run"]);
    expect([...anchorsOf('# A\n## A\n```\n# not a heading\n```\n<a id="x-1"></a>\n')]).toEqual(["a", "a-1", "x-1"]);
  });

  test("every relative link and #anchor in README.md, docs/*.md and bench/HISTORY.md resolves", () => {
    const broken = PAGES.flatMap((page) =>
      linksOf(source(page))
        .map((target) => brokenLink(page, target, readPage))
        .filter((p) => p !== null),
    );
    expect(broken).toEqual([]);
  });

  test("a broken link, a missing file and a missing anchor are each reported", () => {
    const read = (path: string) => (path === "docs/x.md" ? '# Title\n<a id="kept"></a>\n' : readPage(path));
    expect([brokenLink("docs/security.md", "nowhere.md", read), brokenLink("docs/security.md", "security-findings.md#no-such-finding", read)]).toEqual([
      "docs/security.md: nowhere.md: no such file docs/nowhere.md",
      'docs/security.md: security-findings.md#no-such-finding: docs/security-findings.md has no heading or <a id> "no-such-finding"',
    ]);
  });

  test("every repository path the pages quote in backticks exists", () => {
    const missing = PAGES.flatMap((page) =>
      quotedPaths(source(page))
        .filter((p) => !existsSync(join(REPO_ROOT, p)))
        .map((p) => `${page}: \`${p}\``),
    );
    expect(missing).toEqual([]);
  });

  test("the README links every page of docs/, and stays under 15,000 bytes", () => {
    const readme = source("README.md");
    const linked = new Set(linksOf(readme).map((t) => t.split("#")[0]));
    const unlinked = PAGES.filter((p) => p.startsWith("docs/") && !linked.has(p));
    expect({ unlinked, small: Buffer.byteLength(readme) <= 15_000 }).toEqual({ unlinked: [], small: true });
  });
});

/** The flags of a table's rows, each row's first cell. */
const documentedFlags = (rows: string[][]) => new Set(rows.flatMap((r) => [...r[0]!.matchAll(/--[a-z][a-z-]*/g)].map((m) => m[0])));

/** Each row's stated defaults that the flag's --help entry does not state. */
function wrongDefaultsOf(rows: string[][], help: string): string[] {
  return rows.flatMap((row) => {
    const flag = /--[a-z][a-z-]*/.exec(row[0]!)?.[0] ?? "";
    const entry = helpEntry(help, flag);
    return statedValues(row[1] ?? "")
      .filter((v) => !mentions(entry, v))
      .map((v) => `${flag}: default ${v} is not in its --help: ${entry}`);
  });
}

describe("options tables against --help", () => {
  const commands: [string, string][] = [
    ["server", "roles/server.ts"],
    ["coordinator", "roles/coordinator.ts"],
    ["client", "roles/client.ts"],
    ["keyserver", "roles/keyserver.ts"],
    ["secureproxy", "roles/secureproxy.ts"],
    ["marketplace", "roles/marketplace.ts"],
    ["harness", "harness/index.ts"],
  ];
  const pageOf = (name: string) => (name === "harness" ? "docs/harness.md" : "docs/roles.md");
  /** What every role's --help ends with (shared/platform/config.ts): documented once, in the common table. */
  const common = CONFIG_HELP.replace(/^\n/, "");
  const commonFlags = helpFlags(common);

  test.each(commands)("%s: the table lists exactly the options --help prints, and the defaults it states", async (name, script) => {
    const rows = tableAfter(source(pageOf(name)), `options: ${name}`);
    const help = await helpOf(script);
    const isRole = name !== "harness";
    // A role's own options: its --help without the common part, which must be there, word for word, to be left out.
    const own = isRole ? help.replace(common, "") : help;
    const documented = documentedFlags(rows);
    const printed = helpFlags(own);
    expect({
      rows: rows.length > 0,
      endsWithCommon: isRole ? help.includes(common) : "not a role",
      notInHelp: [...documented].filter((f) => !printed.has(f)),
      notInTable: [...printed].filter((f) => !documented.has(f)),
      commonInTable: [...documented].filter((f) => commonFlags.has(f)),
      wrongDefaults: wrongDefaultsOf(rows, own),
    }).toEqual({ rows: true, endsWithCommon: isRole ? true : "not a role", notInHelp: [], notInTable: [], commonInTable: [], wrongDefaults: [] });
  });

  test("the common table lists exactly the options every role's --help ends with (CONFIG_HELP), and their defaults", () => {
    const rows = tableAfter(source("docs/roles.md"), "options: common");
    const documented = documentedFlags(rows);
    expect({
      rows: rows.length > 0,
      notInHelp: [...documented].filter((f) => !commonFlags.has(f)),
      notInTable: [...commonFlags].filter((f) => !documented.has(f)),
      wrongDefaults: wrongDefaultsOf(rows, `Options:\n${common}`),
    }).toEqual({ rows: true, notInHelp: [], notInTable: [], wrongDefaults: [] });
  });

  test("the environment guard's table lists exactly ENVIRONMENT_SWITCHES, with each one's action", () => {
    const rows = tableAfter(source("docs/security.md"), "env-guard");
    const documented = rows.map((r) => `${r[0]!.replace(/`/g, "")} ${r[1]}`).sort();
    expect(documented).toEqual(ENVIRONMENT_SWITCHES.map((s) => `${s.name} ${s.action}`).sort());
  });
});

describe("constants and statements", () => {
  test("every constant quoted as `NAME` = value (or in a constants table) is the code's, and each is quoted somewhere", () => {
    const wrong: string[] = [];
    const unquoted: string[] = [];
    for (const [name, value] of Object.entries(CONSTANTS)) {
      expect(Number.isFinite(value)).toBe(true);
      const quoted = PAGES.flatMap((page) => quotedConstants(source(page), name).map((n) => ({ page, n })));
      if (quoted.length === 0) unquoted.push(name);
      for (const { page, n } of quoted) if (n !== value) wrong.push(`${page}: ${name} = ${n}, the code says ${value}`);
    }
    expect({ wrong, unquoted }).toEqual({ wrong: [], unquoted: [] });
  });

  test.each(STATEMENTS.map((s) => [s.what, s] as const))("%s", (_what, { page, pattern, value }) => {
    const match = pattern.exec(oneLine(source(page)));
    // Several groups are compared as one text, joined by spaces.
    expect({ page, says: match ? match.slice(1).join(" ") : `nothing matching ${pattern}` }).toEqual({ page, says: String(value) });
  });

  test("a quoted constant is read as written, with separators", () => {
    expect(quotedConstants("`X` = 65,536 bytes; `X` | 10_000 |; `X`, later", "X")).toEqual([65536, 10000]);
  });
});

/** Each `### ` section under `## Runbooks` of a page: its heading and its text (prose only). */
export function runbooksOf(text: string): Map<string, string> {
  const section = /^## Runbooks$([\s\S]*?)(?=^## |(?![\s\S]))/m.exec(prose(text))?.[1] ?? "";
  return new Map(
    section
      .split(/^### /m)
      .slice(1)
      .map((part) => {
        const [heading, ...body] = part.split("\n");
        return [heading!.trim(), oneLine(body.join("\n"))] as const;
      }),
  );
}

/** The rows a runbook names: “NAME” after `Row(s) of \`bun harness multihost\`:`, up to the sentence's end. */
export function citedRows(runbook: string): string[] {
  return [...runbook.matchAll(/Rows? of `bun harness multihost`:((?:[^“.]|\.(?! ))*?(?:“[^”]+”[^“.]*?)+)(?:\.(?: |$)|$)/g)].flatMap((m) =>
    [...m[1]!.matchAll(/“([^”]+)”/g)].map((q) => q[1]!),
  );
}

describe("runbooks and the multihost rows that run them", () => {
  const runbooks = runbooksOf(source("docs/operations.md"));
  const rows = [...FULL_PLAN.faults, ...SHORT_PLAN.faults];

  test("every row a runbook names is a row of bun harness multihost", () => {
    const names = new Set(rows.map((f) => f.name));
    const named = [...runbooks].flatMap(([heading, text]) => citedRows(text).map((row) => ({ heading, row })));
    expect({ named: named.length >= 8, unknown: named.filter(({ row }) => !names.has(row)) }).toEqual({ named: true, unknown: [] });
  });

  test("every row that follows a runbook is named by that runbook", () => {
    const followed = rows.filter((f) => f.runbook);
    const unnamed = followed.filter((f) => !citedRows(runbooks.get(f.runbook!) ?? "").includes(f.name)).map((f) => `${f.runbook}: ${f.name}`);
    expect({ followed: followed.length >= 8, unnamed }).toEqual({ followed: true, unnamed: [] });
  });

  test("a runbook's rows are read as the page writes them", () => {
    expect(citedRows("Run it. Rows of `bun harness multihost`: “a, then b”, “c: d (x)”; the short run splits it, “e” first. Then “f”.")).toEqual([
      "a, then b",
      "c: d (x)",
      "e",
    ]);
  });
});

describe("findings and the tests that cover them", () => {
  const findings = anchorsOf(source("docs/security-findings.md"));

  test("every finding the code cites has its anchor in docs/security-findings.md", () => {
    const missing = new Set<string>();
    for (const file of [...codeFiles("roles"), ...codeFiles("shared"), ...codeFiles("harness")]) {
      for (const anchor of citedAnchors(source(file))) if (!findings.has(anchor)) missing.add(`${file}: #${anchor}`);
    }
    expect([...missing]).toEqual([]);
  });

  test("citations are read as the code writes them; the runtimes' own issues are not ours", () => {
    expect(
      citedAnchors(
        "(#11 L5) (issue 18, H1) (#18 M2) (#13 Part 4) (issue 14 part 7) (#12) (issue 18: H1) oven-sh/bun#14097 (#11 Hardening) (issue 23, finding 8)",
      ),
    ).toEqual(["11-l5", "18-h1", "18-m2", "13-part-4", "14-part-7", "12", "18-h1", "11-hardening", "23"]);
  });

  test("every test the pages name exists in the file they name", () => {
    const cited = PAGES.flatMap((page) => citedTests(page, source(page)));
    const missing = cited.filter(({ file, name }) => !oneLine(source(file)).includes(name)).map(({ file, name }) => `${file}: “${name}”`);
    expect({ cited: cited.length > 50, missing }).toEqual({ cited: true, missing: [] });
  });
});
