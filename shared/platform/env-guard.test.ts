// The environment guard: one case per switch in its table given a fake environment, the values it must let be,
// and, in a real Bun and Deno process, that clearing NODE_EXTRA_CA_CERTS closes what it opens.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { denoBinary } from "../../harness/cluster.ts";
import { testPki } from "../testing/pki.ts";
import { assertSafeEnvironment, ENVIRONMENT_SWITCHES, REVIEWED, type Environment } from "./env-guard.ts";
import { ConfigError } from "./errors.ts";
import { assertSafeTlsEnvironment } from "./tls.ts";
import { testedRuntimes } from "../testing/unit-run.ts";

/** What the guard does with one variable: the refusal line, or "cleared", or "accepted". */
function verdict(name: string, value: string): string {
  const env: Environment = { PATH: "/usr/bin", [name]: value };
  try {
    const cleared = assertSafeEnvironment(env);
    return cleared.length ? `cleared ${cleared.join(",")} (left: ${Object.keys(env).join(",")})` : "accepted";
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return (error as Error).message;
  }
}

/** Every refusal has one shape: what is set, what it does, and the fix. */
const refusal = (label: string, name: string) =>
  expect.stringMatching(new RegExp(`^${escapeRegExp(label)} is set: .+, so this role will not start; unset ${name}$`));
const escapeRegExp = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** The exact refusal line: what is set, what it does, and the fix (unset the variable). */
const refused = (label: string, reason: string) => `${label} is set: ${reason}, so this role will not start; unset ${label.split("=")[0]}`;

/** One case or more per switch; the last test fails for a switch added to the table without one here. */
const CASES: [name: string, value: string, expected: unknown][] = [
  [
    "NODE_TLS_REJECT_UNAUTHORIZED",
    "0",
    refused(
      "NODE_TLS_REJECT_UNAUTHORIZED=0",
      "it turns certificate checks off (Bun: fetch and node:https, and client certificates on a server, oven-sh/bun#35240; Deno: node:https, without a warning)",
    ),
  ],
  [
    "NODE_TLS_REJECT_UNAUTHORIZED",
    "false",
    refused("NODE_TLS_REJECT_UNAUTHORIZED=false", "it asks for certificate checks to be turned off (only 1 keeps them)"),
  ],
  ["NODE_TLS_REJECT_UNAUTHORIZED", "1", "accepted"],
  [
    "SSLKEYLOGFILE",
    "/tmp/keys.log",
    refused("SSLKEYLOGFILE", "Deno writes the secrets of every TLS connection a role opens to that file, mode 0644 (Bun 1.4.5 ignores it)"),
  ],
  [
    "BUN_CONFIG_VERBOSE_FETCH",
    "curl",
    refused(
      "BUN_CONFIG_VERBOSE_FETCH=curl",
      "Bun logs every outgoing request before our code runs: curl prints the Authorization header in clear, 1 and true every other header (sender proofs, forwarder assertions)",
    ),
  ],
  ["BUN_CONFIG_VERBOSE_FETCH", "1", refusal("BUN_CONFIG_VERBOSE_FETCH=1", "BUN_CONFIG_VERBOSE_FETCH")],
  ["BUN_CONFIG_VERBOSE_FETCH", "true", refusal("BUN_CONFIG_VERBOSE_FETCH=true", "BUN_CONFIG_VERBOSE_FETCH")],
  ["NODE_DEBUG", "http", refusal("NODE_DEBUG=http", "NODE_DEBUG")],
  ["NODE_DEBUG", "tls,net", refusal("NODE_DEBUG=tls,net", "NODE_DEBUG")],
  ["NODE_OPTIONS", "--inspect=127.0.0.1:9229", refused("NODE_OPTIONS", "--inspect=127.0.0.1:9229 opens a debugger that can read every key in memory")],
  ["NODE_OPTIONS", "--max-old-space-size=512 --inspect-brk", refused("NODE_OPTIONS", "--inspect-brk opens a debugger that can read every key in memory")],
  ["NODE_OPTIONS", "--require /tmp/x.js", refused("NODE_OPTIONS", "--require runs code of its own inside the role")],
  ["NODE_OPTIONS", "--tls-keylog=/tmp/k", refused("NODE_OPTIONS", "--tls-keylog=/tmp/k writes every TLS session's secrets to a file")],
  ["NODE_OPTIONS", "--insecure-http-parser", refused("NODE_OPTIONS", "--insecure-http-parser accepts malformed HTTP (request smuggling)")],
  ["NODE_OPTIONS", "--tls-min-v1.0", refused("NODE_OPTIONS", "--tls-min-v1.0 changes what TLS accepts")],
  ["NODE_OPTIONS", "--security-revert=CVE-2023-46809", refused("NODE_OPTIONS", "--security-revert=CVE-2023-46809 changes what TLS accepts")],
  ["NODE_OPTIONS", "--use-system-ca", refusal("NODE_OPTIONS", "NODE_OPTIONS")],
  ["NODE_OPTIONS", "--heapsnapshot-signal=SIGUSR2", refused("NODE_OPTIONS", "--heapsnapshot-signal=SIGUSR2 writes the process's memory or profile to disk")],
  ["NODE_OPTIONS", "--frobnicate", refused("NODE_OPTIONS", "--frobnicate is not on the reviewed list (memory sizes only)")],
  ["NODE_OPTIONS", "--max-old-space-size=512", "accepted"],
  ["BUN_OPTIONS", "--preload=/tmp/x.js", refused("BUN_OPTIONS", "--preload=/tmp/x.js runs code of its own inside the role")],
  ["BUN_OPTIONS", "-r /tmp/x.js", refused("BUN_OPTIONS", "-r runs code of its own inside the role")],
  ["BUN_OPTIONS", "--inspect-wait", refusal("BUN_OPTIONS", "BUN_OPTIONS")],
  ["BUN_OPTIONS", "--tls-keylog=/tmp/k", refusal("BUN_OPTIONS", "BUN_OPTIONS")],
  ["BUN_OPTIONS", "--smol", "accepted"],
  [
    "DENO_V8_FLAGS",
    "--expose-gc,--heap-snapshot-on-gc=0",
    "DENO_V8_FLAGS is set: --expose-gc is not on the reviewed list (memory sizes only), so this role will not start; unset DENO_V8_FLAGS",
  ],
  [
    "DENO_V8_FLAGS",
    "--heap_snapshot_on_gc=0",
    "DENO_V8_FLAGS is set: --heap_snapshot_on_gc=0 writes the process's memory or profile to disk, so this role will not start; unset DENO_V8_FLAGS",
  ],
  ["DENO_V8_FLAGS", "--max_old_space_size=512,--stack-size=2000", "accepted"],
  [
    "BUN_INSPECT",
    "127.0.0.1:9229",
    refused("BUN_INSPECT", "Bun opens a debugger that can read every key in memory, without a word, before any of our code runs"),
  ],
  ["BUN_INSPECT_CONNECT_TO", "unix:///tmp/debug.sock", refusal("BUN_INSPECT_CONNECT_TO", "BUN_INSPECT_CONNECT_TO")],
  [
    "DENO_CERT",
    "/tmp/other_ca.pem",
    refused("DENO_CERT", "Deno's fetch trusts that file's CAs besides ours, even on a hop pinned to our CA (a server of another CA was accepted)"),
  ],
  ["DENO_TLS_CA_STORE", "system", refusal("DENO_TLS_CA_STORE=system", "DENO_TLS_CA_STORE")],
  ["DENO_TLS_CA_STORE", "mozilla,system", refusal("DENO_TLS_CA_STORE=mozilla,system", "DENO_TLS_CA_STORE")],
  ["DENO_TLS_CA_STORE", "mozilla", "accepted"],
  ["NODE_EXTRA_CA_CERTS", "/etc/ssl/certs/ca-certificates.crt", "cleared NODE_EXTRA_CA_CERTS (left: PATH)"],
];

describe("the environment guard, one variable at a time", () => {
  test.each(CASES)("%s=%s", (name, value, expected) => {
    expect(verdict(name, value)).toEqual(expected as string);
  });

  test("an empty value is no value: nothing to refuse", () => {
    expect(ENVIRONMENT_SWITCHES.map((s) => verdict(s.name, ""))).toEqual(ENVIRONMENT_SWITCHES.map(() => "accepted"));
  });

  test("the switches reviewed and left alone start a role", () => {
    expect(REVIEWED.map((r) => `${r.name}: ${verdict(r.name, r.value)}`)).toEqual(REVIEWED.map((r) => `${r.name}: accepted`));
  });

  test("a refusal stays one short line whatever the value holds", () => {
    const message = verdict("NODE_OPTIONS", `--inspect=\n${"x".repeat(200)}`);
    expect({ lines: message.split("\n").length, short: message.length < 200 }).toEqual({ lines: 1, short: true });
  });

  test("the old name still guards: roles call assertSafeTlsEnvironment()", () => {
    expect(() => assertSafeTlsEnvironment({ SSLKEYLOGFILE: "/tmp/k" })).toThrow("SSLKEYLOGFILE is set: ");
    expect(() => assertSafeTlsEnvironment({ PATH: "/usr/bin" })).not.toThrow();
  });

  test("every switch in the table has a case here", () => {
    const tested = new Set(CASES.filter(([, , expected]) => expected !== "accepted").map(([name]) => name));
    expect(ENVIRONMENT_SWITCHES.map((s) => s.name).filter((name) => !tested.has(name))).toEqual([]);
  });
});

describe.each(testedRuntimes())("NODE_EXTRA_CA_CERTS naming another CA, on %s", (runtime) => {
  /** Runs env-guard.check.ts: a fetch pinned to our CA, to a server of the other CA. */
  async function check(guard: boolean): Promise<unknown> {
    const [pki, otherPki] = await Promise.all([testPki("main"), testPki("other")]);
    const script = join(import.meta.dir, "env-guard.check.ts");
    const command = runtime === "deno" ? [denoBinary(), "run", "-A", script] : [process.execPath, script];
    await using proc = Bun.spawn([...command, ...(guard ? ["--guard"] : [])], {
      env: { ...process.env, PKI_DIR: pki, OTHER_PKI_DIR: otherPki, NODE_EXTRA_CA_CERTS: join(otherPki, "ca_cert.pem") },
      stdout: "pipe",
      stderr: "pipe",
    });
    const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    if (exitCode !== 0) throw new Error(`env-guard.check.ts on ${runtime} exited ${exitCode}: ${stderr.trim()}`);
    return JSON.parse(stdout);
  }

  test("the guard clears it, and a call pinned to our CA refuses that CA's server either way", async () => {
    // Deno's fetch trusted it beside the pinned CA (Deno.createHttpClient adds caCerts to its roots), which is why it is
    // cleared. The roles' HttpsClient (node:tls with `ca`) trusts the pinned CA alone on both runtimes.
    expect({ unguarded: await check(false), guarded: await check(true) }).toEqual({
      unguarded: { cleared: [], outcome: "refused" },
      guarded: { cleared: ["NODE_EXTRA_CA_CERTS"], outcome: "refused" },
    });
  }, 60_000);
});
