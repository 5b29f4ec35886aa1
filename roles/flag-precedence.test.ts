// Issue 23, "one configuration per host": the command line wins over the --config file, and the file over
// SECUREMESH_<FLAG> variables, for every role, as real processes. A unit's EnvironmentFile sets SECUREMESH_PORT and
// SECUREMESH_SERVERS; an operator who starts the role by hand with a port or --servers-file on the command line
// must get what they typed. Before, the coordinator listened on SECUREMESH_PORT whatever its argv said, and stopped
// on "--servers and --servers-file: give one of them" with --servers-file on argv and SECUREMESH_SERVERS set.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { testPki } from "../shared/testing/pki.ts";
import { roleCommand, waitFor } from "../harness/cluster.ts";
import { freePort } from "../harness/fixtures/index.ts";

setDefaultTimeout(60_000);

let pki: string;
let dir: string;
beforeAll(async () => {
  pki = await testPki("main");
  dir = mkdtempSync(join(tmpdir(), "securemesh-flags-"));
  writeFileSync(join(dir, "token.txt"), "a-marketplace-token\n", { mode: 0o600 });
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/**
 * Starts `roles/<role>.ts` on Bun with `args` and `env` added, and waits until it listens or exits: the URL it
 * listens on and the rest of its "listening on" line, or its exit code and the lines it printed.
 */
async function start(
  role: string,
  args: string[],
  env: Record<string, string>,
): Promise<{ listening: string; said: string } | { exitCode: number; lines: string[] }> {
  const inherited = { ...process.env };
  for (const name of Object.keys(inherited)) if (name.startsWith("SECUREMESH_") || name === "PORT" || name === "SERVERS") delete inherited[name];
  await using proc = Bun.spawn(roleCommand("bun", role, args), { env: { ...inherited, NO_COLOR: "1", PKI_DIR: pki, ...env }, stdout: "pipe", stderr: "pipe" });
  let output = "";
  const read = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream) output += new TextDecoder().decode(chunk);
  };
  const reading = Promise.all([read(proc.stdout), read(proc.stderr)]);
  const outcome = await waitFor(
    `${role} to listen or exit`,
    () => {
      const listening = / listening on (https:\/\/\S+?:\d+)(.*)\n/.exec(output);
      if (listening) return { listening: listening[1]!, said: listening[2]!.trim() };
      return proc.exitCode !== null ? { exitCode: proc.exitCode } : false;
    },
    30_000,
  );
  proc.kill("SIGTERM");
  await proc.exited;
  await reading;
  return outcome.listening !== undefined
    ? { listening: outcome.listening, said: outcome.said }
    : { exitCode: outcome.exitCode!, lines: output.trim().split("\n") };
}

describe("a port on the command line beats SECUREMESH_PORT in the environment and in the --config file", () => {
  const roles: [role: string, args: string[]][] = [
    ["coordinator", ["--servers", "https://127.0.0.1:1"]],
    ["server", ["--db", "sqlite::memory:"]],
    ["keyserver", ["--data", "KEYSERVER_DATA"]],
    ["secureproxy", []],
    ["marketplace", ["--token-file", "TOKEN_FILE"]],
  ];
  const fill = (args: string[]) => args.map((a) => a.replace("KEYSERVER_DATA", join(dir, "keyserver")).replace("TOKEN_FILE", join(dir, "token.txt")));

  test.each(roles)("the %s", async (role, args) => {
    const [fromArgv, fromEnv, fromFile] = await Promise.all([freePort(), freePort(), freePort()]);
    const config = join(dir, `${role}.conf`);
    writeFileSync(config, `SECUREMESH_PORT=${fromFile}\n`);
    const listening = async (argv: string[]) =>
      ((outcome) => ("listening" in outcome ? outcome.listening : outcome))(await start(role, [...argv, ...fill(args)], { SECUREMESH_PORT: String(fromEnv) }));
    expect(await listening([String(fromArgv)])).toBe(`https://127.0.0.1:${fromArgv}`);
    expect(await listening([String(fromArgv), "--config", config])).toBe(`https://127.0.0.1:${fromArgv}`);
    // Without one on the command line, the file's.
    expect(await listening(["--config", config])).toBe(`https://127.0.0.1:${fromFile}`);
  });

  test("the coordinator's --port (its workers') beats SECUREMESH_PORT too", async () => {
    const [fromArgv, fromEnv] = await Promise.all([freePort(), freePort()]);
    expect(await start("coordinator", ["--port", String(fromArgv), "--servers", "https://127.0.0.1:1"], { SECUREMESH_PORT: String(fromEnv) })).toMatchObject({
      listening: `https://127.0.0.1:${fromArgv}`,
    });
  });
});

describe("the coordinator's --servers-file on the command line beats SECUREMESH_SERVERS", () => {
  const serversFile = () => {
    const path = join(dir, "servers.txt");
    writeFileSync(path, "https://127.0.0.1:5999\n");
    return path;
  };
  /** The servers a coordinator forwards to, from its "listening on" line, or how it stopped. */
  const serversOf = async (args: string[], env: Record<string, string>) => {
    const outcome = await start("coordinator", ["0", ...args], env);
    return "said" in outcome ? outcome.said : outcome;
  };
  const fromFile = () => `(servers: https://127.0.0.1:5999 (from ${join(dir, "servers.txt")}))`;

  test("in the environment", async () => {
    expect(await serversOf(["--servers-file", serversFile()], { SECUREMESH_SERVERS: "https://127.0.0.1:5998" })).toBe(fromFile());
  });

  test("in the --config file", async () => {
    const config = join(dir, "coordinator-servers.conf");
    writeFileSync(config, "SECUREMESH_SERVERS=https://127.0.0.1:5998\n");
    expect(await serversOf(["--config", config, "--servers-file", serversFile()], {})).toBe(fromFile());
  });

  test("both on the command line is still a mistake, said in one line", async () => {
    expect(await serversOf(["--servers", "https://127.0.0.1:5998", "--servers-file", serversFile()], {})).toEqual({
      exitCode: 2,
      lines: ["coordinator: --servers and --servers-file both come from the command line: give one of them"],
    });
  });
});
