// Real role processes started in an unsafe setting, on the runtime where it matters: an environment switch that
// writes secrets out or weakens TLS (L3), a secret file group or others can read (L4). Each must stop the role
// with one line and exit status 2, before it opens a port; a role that started anyway is sent one mutual-TLS
// request, so a key log shows. And the files a role creates come out private (L4), on Bun and on Deno.
import { afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { chmodSync, cpSync, existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { RsaKeyPair } from "../shared/token-path/token-exchange.ts";
import { testPki } from "../shared/testing/pki.ts";
import { roleCommand, waitFor } from "../harness/cluster.ts";
import { testedRuntimes } from "../shared/testing/unit-run.ts";

setDefaultTimeout(60_000);

let pki: string;
let otherPki: string;
const temporary: string[] = [];

beforeAll(async () => {
  [pki, otherPki] = await Promise.all([testPki("main"), testPki("other")]);
});

afterEach(() => {
  for (const dir of temporary.splice(0)) rmSync(dir, { recursive: true, force: true });
});

function tempDir(label: string): string {
  const dir = mkdtempSync(join(tmpdir(), `securemesh-guard-${label}-`));
  temporary.push(dir);
  return dir;
}

interface Outcome {
  exitCode: number | null;
  /** The lines the role itself printed to stderr (`server: …`); a runtime's own notices are left out. */
  roleLines: string[];
  /** Whether it got as far as listening (it was then sent one request, and stopped). */
  listened: boolean;
}

/**
 * Starts `roles/<role>.ts` on `runtime` with `env` added, in `cwd`, and waits for it to exit or to listen; a role
 * that listens is sent one mutual-TLS request as client1 (so a key log has something to write), then
 * `whileListening` runs, then the role is stopped.
 */
async function startRole(
  runtime: "bun" | "deno",
  role: string,
  args: string[],
  env: Record<string, string>,
  cwd: string,
  whileListening: () => unknown = () => {},
): Promise<Outcome> {
  const inherited = { ...process.env };
  delete inherited.FERNET_KEY; // the Fernet key must come from the PKI's file here
  await using proc = Bun.spawn(roleCommand(runtime, role, args), { env: { ...inherited, NO_COLOR: "1", ...env }, cwd, stdout: "pipe", stderr: "pipe" });
  let stdout = "";
  const reading = (async () => {
    for await (const chunk of proc.stdout) stdout += new TextDecoder().decode(chunk);
  })();
  const stderr = new Response(proc.stderr).text();
  const port = await waitFor(
    `${role} on ${runtime} to exit or listen`,
    () => {
      const listening = /listening on https:\/\/[^ ]+:(\d+)/.exec(stdout);
      return listening ? Number(listening[1]) : proc.exitCode !== null ? -1 : false;
    },
    30_000,
  );
  if (port > 0) {
    await fetch(`https://127.0.0.1:${port}/api/cache_stats`, { tls: mutualTlsClientOptions(loadIdentity(pki, "client1")) })
      .then((r) => r.text())
      .catch(() => "");
    try {
      await whileListening();
    } finally {
      proc.kill("SIGTERM");
    }
  }
  const exitCode = await proc.exited;
  await reading;
  const roleLines = (await stderr).split("\n").filter((line) => line.startsWith(`${role}: `));
  return { exitCode, roleLines, listened: port > 0 };
}

const escapeRegExp = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** The one line a refusal prints: the role, what is set and why, and the fix. */
const refusalLine = (role: string, starts: string, variable: string) =>
  expect.stringMatching(new RegExp(`^${role}: ${escapeRegExp(starts)}.*, so this role will not start; unset ${variable}$`));

/**
 * What the key log in `dir` holds. Deno creates SSLKEYLOGFILE, empty, as it starts, before any of our code runs
 * (measured with `deno eval 1`); the guard can only see that nothing is ever written to it.
 */
const keyLogBytes = (dir: string) => (existsSync(join(dir, "keys.log")) ? statSync(join(dir, "keys.log")).size : 0);

/** A script for --require that does nothing: a missing one stops Deno before the guard could. */
function emptyScript(dir: string): string {
  writeFileSync(join(dir, "nothing.cjs"), "// nothing\n");
  return join(dir, "nothing.cjs");
}

/**
 * A mutual-TLS server for the client role to reach. A key log is written only for some connections (measured):
 * Deno's for the ones a role opens, not its node:https listener's; Bun's --tls-keylog for node:tls (the KeyServer's
 * listener), not for fetch or Bun.serve. Each key-log case runs the role that would write one.
 */
function handshakeServer() {
  const id = loadIdentity(pki, "server");
  return Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    tls: { cert: id.cert, key: id.key, ca: id.ca, requestCert: true, rejectUnauthorized: true },
    fetch: () => Response.json({}),
  });
}

type Role = "server" | "client" | "keyserver";

/** The command-line arguments that start `role` against the test PKI, with its files in `dir`. */
function roleArgs(role: Role, dir: string, serverPort: number): string[] {
  if (role === "client") return ["--coordinator", `https://127.0.0.1:${serverPort}`, "--no-cache-check", "--timeout", "5000"];
  return role === "keyserver" ? ["0", "--data", join(dir, "keyserver")] : ["0"];
}

describe("an environment switch that writes secrets or weakens TLS stops the role", () => {
  type Case = [runtime: "bun" | "deno", role: Role, label: string, env: (dir: string) => Record<string, string>, starts: string];
  const keyLog = (dir: string) => join(dir, "keys.log");
  const cases: Case[] = [
    ["deno", "client", "SSLKEYLOGFILE", (dir) => ({ SSLKEYLOGFILE: keyLog(dir) }), "SSLKEYLOGFILE is set: Deno writes"],
    ["bun", "keyserver", "SSLKEYLOGFILE", (dir) => ({ SSLKEYLOGFILE: keyLog(dir) }), "SSLKEYLOGFILE is set: Deno writes"],
    ["bun", "keyserver", "BUN_OPTIONS=--tls-keylog", (dir) => ({ BUN_OPTIONS: `--tls-keylog=${keyLog(dir)}` }), "BUN_OPTIONS is set: --tls-keylog="],
    ["bun", "server", "BUN_CONFIG_VERBOSE_FETCH=curl", () => ({ BUN_CONFIG_VERBOSE_FETCH: "curl" }), "BUN_CONFIG_VERBOSE_FETCH=curl is set: Bun logs"],
    ["bun", "client", "BUN_CONFIG_VERBOSE_FETCH=1", () => ({ BUN_CONFIG_VERBOSE_FETCH: "1" }), "BUN_CONFIG_VERBOSE_FETCH=1 is set: Bun logs"],
    [
      "bun",
      "server",
      "NODE_TLS_REJECT_UNAUTHORIZED=0",
      () => ({ NODE_TLS_REJECT_UNAUTHORIZED: "0" }),
      "NODE_TLS_REJECT_UNAUTHORIZED=0 is set: it turns certificate checks off",
    ],
    [
      "deno",
      "server",
      "NODE_TLS_REJECT_UNAUTHORIZED=0",
      () => ({ NODE_TLS_REJECT_UNAUTHORIZED: "0" }),
      "NODE_TLS_REJECT_UNAUTHORIZED=0 is set: it turns certificate checks off",
    ],
    [
      "deno",
      "server",
      "NODE_OPTIONS=--inspect",
      () => ({ NODE_OPTIONS: "--inspect=127.0.0.1:0" }),
      "NODE_OPTIONS is set: --inspect=127.0.0.1:0 opens a debugger",
    ],
    [
      "bun",
      "server",
      "NODE_OPTIONS=--inspect",
      () => ({ NODE_OPTIONS: "--inspect=127.0.0.1:0" }),
      "NODE_OPTIONS is set: --inspect=127.0.0.1:0 opens a debugger",
    ],
    ["deno", "server", "NODE_OPTIONS=--require", (dir) => ({ NODE_OPTIONS: `--require ${emptyScript(dir)}` }), "NODE_OPTIONS is set: --require runs code"],
    ["bun", "server", "BUN_OPTIONS=--inspect", () => ({ BUN_OPTIONS: "--inspect=127.0.0.1:0" }), "BUN_OPTIONS is set: --inspect=127.0.0.1:0 opens a debugger"],
    ["bun", "server", "BUN_INSPECT", () => ({ BUN_INSPECT: "127.0.0.1:0" }), "BUN_INSPECT is set: Bun opens a debugger"],
    ["deno", "client", "NODE_DEBUG=http", () => ({ NODE_DEBUG: "http" }), "NODE_DEBUG=http is set: Deno's node:http debug log"],
    ["deno", "client", "DENO_CERT", () => ({ DENO_CERT: join(otherPki, "ca_cert.pem") }), "DENO_CERT is set: Deno's fetch trusts"],
  ];

  test.each(cases.filter(([runtime]) => testedRuntimes().includes(runtime)))(
    "on %s, the %s with %s: exit 2, one line, no key log",
    async (runtime, role, label, env, starts) => {
      const dir = tempDir("env");
      using server = handshakeServer();
      const outcome = await startRole(
        runtime,
        role,
        roleArgs(role, dir, server.port!),
        { PKI_DIR: pki, DATABASE_URL: join(dir, "records.db"), ...env(dir) },
        dir,
      );
      expect({ ...outcome, keyLogBytes: keyLogBytes(dir) }).toEqual({
        exitCode: 2,
        roleLines: [refusalLine(role, starts, label.split("=")[0]!)],
        listened: false,
        keyLogBytes: 0,
      });
    },
  );
});

test("the KeyServer's token commands, which read the master keys, are guarded too", async () => {
  const dir = tempDir("admin");
  await using proc = Bun.spawn(roleCommand("bun", "keyserver", ["token", "list", "--data", join(dir, "keyserver")]), {
    env: { ...process.env, PKI_DIR: pki, BUN_INSPECT: "127.0.0.1:0" },
    cwd: dir,
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  expect({
    exitCode,
    stdout,
    roleLines: stderr.split("\n").filter((l) => l.startsWith("keyserver: ")),
    keyring: existsSync(join(dir, "keyserver", "master_keys.json")),
  }).toEqual({ exitCode: 2, stdout: "", roleLines: [refusalLine("keyserver", "BUN_INSPECT is set: ", "BUN_INSPECT")], keyring: false });
});

describe.each(testedRuntimes())("secret files, roles on %s", (runtime) => {
  /** A copy of the test PKI (modes kept) with `file` loosened to 0644. */
  function pkiWithLoose(dir: string, file: string): string {
    const copy = join(dir, "pki");
    cpSync(pki, copy, { recursive: true });
    chmodSync(join(copy, file), 0o644);
    return copy;
  }
  const refusal = (role: string, path: string) => `${role}: ${path} is readable by group or others (mode 0644); run chmod 600 ${path}`;

  test("a server whose private key is 0644 exits 2 with one line", async () => {
    const dir = tempDir("loose-key");
    const loose = pkiWithLoose(dir, "server_key.pem");
    const outcome = await startRole(runtime, "server", ["0"], { PKI_DIR: loose, DATABASE_URL: join(dir, "records.db") }, dir);
    expect(outcome).toEqual({ exitCode: 2, roleLines: [refusal("server", join(loose, "server_key.pem"))], listened: false });
  });

  test("a server whose Fernet key file is 0644 exits 2 with one line", async () => {
    const dir = tempDir("loose-fernet");
    const loose = pkiWithLoose(dir, "encryption_key.txt");
    const outcome = await startRole(runtime, "server", ["0"], { PKI_DIR: loose, DATABASE_URL: join(dir, "records.db") }, dir);
    expect(outcome).toEqual({ exitCode: 2, roleLines: [refusal("server", join(loose, "encryption_key.txt"))], listened: false });
  });

  test("a KeyServer whose RSA key in its data folder is 0644 exits 2 with one line", async () => {
    const dir = tempDir("loose-rsa");
    const data = join(dir, "keyserver");
    await RsaKeyPair.loadOrCreate(join(data, "rsa_key.pem"));
    chmodSync(join(data, "rsa_key.pem"), 0o644);
    const outcome = await startRole(runtime, "keyserver", ["0", "--data", data], { PKI_DIR: pki }, dir);
    expect(outcome).toEqual({ exitCode: 2, roleLines: [refusal("keyserver", join(data, "rsa_key.pem"))], listened: false });
  });

  test("what a KeyServer and a server create is 0600, in folders 0700", async () => {
    const dir = tempDir("created");
    const modes = (base: string, files: string[]) =>
      Object.fromEntries(files.map((f) => [f, existsSync(join(base, f)) ? (statSync(join(base, f)).mode & 0o777).toString(8) : "missing"]));
    let keyserverFiles: Record<string, string> = {};
    let serverFiles: Record<string, string> = {};
    const keyserver = await startRole(runtime, "keyserver", ["0", "--data", join(dir, "fresh", "keyserver"), "--ecdh-es"], { PKI_DIR: pki }, dir, () => {
      keyserverFiles = modes(dir, [
        "fresh",
        "fresh/keyserver",
        ...["master_keys.json", "rsa_key.pem", "ecdh_key.pem", "tokens.db", "tokens.db-wal", "tokens.db-shm"].map((f) => `fresh/keyserver/${f}`),
      ]);
    });
    const server = await startRole(runtime, "server", ["0"], { PKI_DIR: pki, DATABASE_URL: join(dir, "db", "records.db") }, dir, () => {
      serverFiles = modes(dir, ["db", "db/records.db", "db/records.db-wal", "db/records.db-shm"]);
    });
    expect({ keyserver: keyserver.listened, server: server.listened, keyserverFiles, serverFiles }).toEqual({
      keyserver: true,
      server: true,
      keyserverFiles: {
        fresh: "700",
        "fresh/keyserver": "700",
        "fresh/keyserver/master_keys.json": "600",
        "fresh/keyserver/rsa_key.pem": "600",
        "fresh/keyserver/ecdh_key.pem": "600",
        "fresh/keyserver/tokens.db": "600",
        "fresh/keyserver/tokens.db-wal": "600",
        "fresh/keyserver/tokens.db-shm": "600",
      },
      serverFiles: { db: "700", "db/records.db": "600", "db/records.db-wal": "600", "db/records.db-shm": "600" },
    });
  });
});
