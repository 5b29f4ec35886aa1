// One configuration per host (issue 23): the file format, which source wins, and secrets kept off argv and out of
// files others can read.
import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseServerConfig } from "../../roles/server.ts";
import { chooseFlag, flagVariable, holdsSecret, parseConfigText, readConfigFile, readDbFile, refuseSecretOnArgv } from "./config-file.ts";

const dir = mkdtempSync(join(tmpdir(), "securemesh-config-"));
const file = (name: string, text: string, mode = 0o600) => {
  const path = join(dir, name);
  writeFileSync(path, text, { mode });
  return path;
};
const saved = { ...process.env };
afterEach(() => {
  for (const name of Object.keys(process.env)) if (name.startsWith("SECUREMESH_") && !(name in saved)) delete process.env[name];
});

describe("the file", () => {
  test("reads a systemd EnvironmentFile: comments, blanks, quotes, export; a malformed line names its number", () => {
    expect([...parseConfigText("# c\n\nSECUREMESH_HOST=10.0.0.5\nexport SECUREMESH_TTL=\"60\"\nSECUREMESH_POLICY='/etc/p.json'\n", "f")]).toEqual([
      ["SECUREMESH_HOST", "10.0.0.5"],
      ["SECUREMESH_TTL", "60"],
      ["SECUREMESH_POLICY", "/etc/p.json"],
    ]);
    expect(() => parseConfigText("SECUREMESH_HOST=1\nhost 10.0.0.5\n", "f.env")).toThrow("f.env:2: expected NAME=value, such as SECUREMESH_HOST=10.0.0.5");
    expect(flagVariable("cache-ttl")).toBe("SECUREMESH_CACHE_TTL");
  });

  test("a file holding a secret is refused when group or others can read it; without one, its mode is the operator's", () => {
    expect(holdsSecret("SECUREMESH_DB", "mysql://app:s3cret@db:3306/test")).toBe(true);
    expect(holdsSecret("SECUREMESH_DB", "mysql://app@db:3306/test")).toBe(false);
    expect(holdsSecret("SECUREMESH_API_TOKEN", "x")).toBe(true);
    const open = file("open.env", "SECUREMESH_DB=mysql://app:s3cret@db:3306/test\n", 0o644);
    expect(() => readConfigFile(open)).toThrow(
      `--config ${open} holds a secret (SECUREMESH_DB): ${open} is readable by group or others (mode 0644); run chmod 600 ${open}`,
    );
    expect(readConfigFile(file("closed.env", "SECUREMESH_DB=mysql://app:s3cret@db:3306/test\n")).get("SECUREMESH_DB")).toBe("mysql://app:s3cret@db:3306/test");
    expect(readConfigFile(file("plain.env", "SECUREMESH_HOST=10.0.0.5\n", 0o644)).get("SECUREMESH_HOST")).toBe("10.0.0.5");
  });
});

describe("which source wins", () => {
  test("a password on argv is refused; in the file or the environment it is not", () => {
    expect(() => refuseSecretOnArgv("db", "mysql://app:pw@db/test", "argv")).toThrow("--db holds a password, which every user of this host can read in ps");
    expect(() => refuseSecretOnArgv("db", "mysql://app:pw@db/test", "file")).not.toThrow();
    expect(() => refuseSecretOnArgv("db", "mysql://app@db/test", "argv")).not.toThrow();
  });

  test("of --db and --db-file, the one from the higher source; both from one source is refused", () => {
    expect(chooseFlag("db", "db-file", {})).toBeNull();
    expect(chooseFlag("db", "db-file", { db: "file", "db-file": "argv" })).toBe("db-file");
    expect(chooseFlag("db", "db-file", { db: "argv", "db-file": "env" })).toBe("db");
    expect(chooseFlag("db", "db-file", { db: "env", "db-file": "file" })).toBe("db-file");
    expect(() => chooseFlag("db", "db-file", { db: "file", "db-file": "file" })).toThrow(
      "--db and --db-file both come from the --config file: give one of them",
    );
  });

  test("the server: --db-file on the command line beats SECUREMESH_DB in the environment and in the --config file", () => {
    const dbFile = file("db-url", "sqlite:/var/lib/securemesh/from-db-file.db\n");
    process.env.SECUREMESH_DB = "/tmp/from-environment.db";
    expect(parseServerConfig(["5001", "--db-file", dbFile]).db).toBe("sqlite:/var/lib/securemesh/from-db-file.db");
    const config = file("server.env", "SECUREMESH_DB=/tmp/from-config-file.db\nSECUREMESH_HOST=10.0.0.5\n");
    expect(parseServerConfig(["5001", "--config", config]).db).toBe("/tmp/from-config-file.db");
    expect(parseServerConfig(["5001", "--config", config, "--db-file", dbFile])).toMatchObject({
      db: "sqlite:/var/lib/securemesh/from-db-file.db",
      host: "10.0.0.5",
    });
    expect(parseServerConfig(["5001", "--config", config, "--host", "127.0.0.1"]).host).toBe("127.0.0.1");
  });

  test("--db-file that cannot be read names the flag", () => {
    expect(() => readDbFile(join(dir, "missing"))).toThrow(`cannot read --db-file ${join(dir, "missing")}: ENOENT`);
    expect(() => readDbFile(file("open-db-url", "mysql://a:b@c/d", 0o644))).toThrow("is readable by group or others (mode 0644)");
  });
});
