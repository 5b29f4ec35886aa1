// The systemd unit templates in roles/systemd/ (issue 23): each passes `systemd-analyze verify` without a word, carries
// the hardening every role gets, and the Deno unit's permission set is enough for a real server and no wider.
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_ROOT } from "../shared/platform/config.ts";
import { loadIdentity } from "../shared/platform/tls.ts";
import { testPki } from "../shared/testing/pki.ts";
import { waitFor } from "./fixtures/index.ts";

setDefaultTimeout(60_000);

const UNITS_DIR = join(REPO_ROOT, "roles", "systemd");
const units = readdirSync(UNITS_DIR)
  .filter((f) => f.endsWith(".service"))
  .sort();
const work = mkdtempSync(join(tmpdir(), "securemesh-systemd-"));
const processes: Bun.Subprocess[] = [];
afterAll(() => processes.forEach((p) => p.kill()));

/** A unit as installed on this machine: /opt/securemesh is this checkout, /etc and /var/lib are folders of the test's. */
function installed(text: string, root: string): string {
  return text.replaceAll("/opt/securemesh", REPO_ROOT).replaceAll("/etc/securemesh", join(root, "etc")).replaceAll("/var/lib/securemesh", join(root, "state"));
}

test("there is a unit for every serving role, and one for the server on Deno", () => {
  expect(units).toEqual(["coordinator", "keyserver", "marketplace", "secureproxy", "server-deno", "server"].map((r) => `securemesh-${r}.service`).sort());
});

describe.each(units)("%s", (unit) => {
  const text = readFileSync(join(UNITS_DIR, unit), "utf8");

  test("systemd-analyze verify passes it without a warning", async () => {
    const dir = join(work, `verify-${unit}`);
    mkdirSync(join(dir, "etc"), { recursive: true });
    writeFileSync(join(dir, "etc", `${unit.replace(/\.service$/, "")}.env`), "");
    writeFileSync(join(dir, unit), installed(text, dir));
    await using proc = Bun.spawn(["systemd-analyze", "verify", join(dir, unit)], { stdout: "pipe", stderr: "pipe" });
    const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    expect({ code, said: `${out}${err}`.trim() }).toEqual({ code: 0, said: "" });
  });

  test("runs hardened: its own user, a read-only system, no new privileges, reload on SIGHUP, restart on failure", () => {
    const keys = new Map(
      text
        .split("\n")
        .filter((l) => /^[A-Z]\w*=/.test(l))
        .map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]),
    );
    expect({
      user: keys.get("User"),
      system: keys.get("ProtectSystem"),
      home: keys.get("ProtectHome"),
      nnp: keys.get("NoNewPrivileges"),
      caps: keys.get("CapabilityBoundingSet"),
      writes: keys.get("ReadWritePaths"),
      reload: keys.get("ExecReload"),
      restart: keys.get("Restart"),
      env: keys.get("EnvironmentFile"),
      umask: keys.get("UMask"),
    }).toEqual({
      user: "securemesh",
      system: "strict",
      home: "yes",
      nnp: "yes",
      caps: "",
      writes: "/var/lib/securemesh",
      reload: "/bin/kill -HUP $MAINPID",
      restart: "on-failure",
      env: "/etc/securemesh/%N.env",
      umask: "0077",
    });
    // Secrets come as credentials, never on the command line or in the environment file.
    const needsSecret = /server|keyserver|marketplace/.test(unit);
    expect(keys.has("LoadCredential")).toBe(needsSecret);
    // biome-ignore lint/suspicious/noTemplateCurlyInString: systemd's own ${...}, which the unit file must hold as written
    if (needsSecret) expect(keys.get("ExecStart")).toContain("${CREDENTIALS_DIRECTORY}/");
  });
});

test("the Deno unit's permission set runs a real server, which answers /health over mutual TLS", async () => {
  const text = readFileSync(join(UNITS_DIR, "securemesh-server-deno.service"), "utf8");
  const root = join(work, "deno-host");
  const pki = join(root, "etc", "pki");
  const credentials = join(root, "credentials");
  mkdirSync(join(root, "state"), { recursive: true, mode: 0o700 });
  mkdirSync(credentials, { recursive: true, mode: 0o700 });
  cpSync(await testPki(), pki, { recursive: true });
  writeFileSync(join(credentials, "db-url"), join(root, "state", "records.db"), { mode: 0o600 });
  // biome-ignore lint/suspicious/noTemplateCurlyInString: systemd's own ${...}, replaced as systemd would
  const execStart = /^ExecStart=(.*)$/m.exec(installed(text, root))![1]!.replaceAll("${CREDENTIALS_DIRECTORY}", credentials).split(/\s+/);
  expect(execStart).not.toContain("-A");
  expect(execStart.filter((a) => a.startsWith("--allow-"))).toEqual([
    "--allow-net",
    "--allow-env",
    "--allow-sys=hostname",
    expect.stringMatching(/^--allow-read=/),
    `--allow-write=${join(root, "state")}`,
  ]);
  // The unit's deno is node_modules/.bin/deno; npm ci leaves that a wrapper, so the platform binary runs it here.
  const deno = readdirSync(join(REPO_ROOT, "node_modules", "@deno")).map((p) => join(REPO_ROOT, "node_modules", "@deno", p, "deno"))[0]!;
  const proc = Bun.spawn([deno, ...execStart.slice(1)], {
    cwd: REPO_ROOT,
    env: { ...process.env, SECUREMESH_PKI: pki, PORT: "0", NO_COLOR: "1" },
    stdout: "pipe",
    stderr: "pipe",
  });
  processes.push(proc);
  let output = "";
  const reader = (async () => {
    for await (const chunk of proc.stdout) output += new TextDecoder().decode(chunk);
  })();
  const port = await waitFor("the Deno server to listen", () => Number(/listening on https:\/\/127\.0\.0\.1:(\d+)/.exec(output)?.[1]) || undefined, 30_000);
  const coordinator = loadIdentity(pki, "coordinator");
  const health = await fetch(`https://127.0.0.1:${port}/health`, { tls: { cert: coordinator.cert, key: coordinator.key, ca: coordinator.ca } });
  expect([health.status, ((await health.json()) as { facts?: { store?: string } }).facts?.store]).toEqual([200, expect.stringMatching(/^[0-9a-f-]{36}$/)]);
  proc.kill();
  await proc.exited;
  await reader;
  expect(output).not.toContain("PermissionDenied");
});
