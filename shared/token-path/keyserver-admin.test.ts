// The token commands in process (issue 23): each says which store and keyring it acts on; the keyring reaches a second
// KeyServer host by an encrypted export and import; rotate-key archives, restore-key brings a version back.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError } from "../platform/errors.ts";
import { displayPath } from "../platform/paths.ts";
import { runTokenCommand, type VaultConfig } from "./keyserver-admin.ts";
import { openVault } from "./vault-binding.ts";

const TOKEN = "mkt-token-never-printed-7";
const PASSPHRASE = "a passphrase kept apart from the backup";
const tmp = () => mkdtempSync(join(tmpdir(), "securemesh-admin-"));

/** Runs one token command as `keyserver token …` would, with `stdin`; its printed lines, or its one-line refusal. */
async function run(config: Omit<VaultConfig, "dbSource"> & { dbSource?: string }, stdin = ""): Promise<string[]> {
  const lines: string[] = [];
  try {
    await runTokenCommand({ dbSource: "--db", ...config }, { stdin: async () => stdin, say: (line) => lines.push(line) });
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    lines.push(`REFUSED ${error.message}`);
  }
  return lines;
}

/** One sqlite store shared by two KeyServer hosts' data folders (as a Galera store is by two hosts). */
function twoHosts() {
  const dir = tmp();
  const db = join(dir, "tokens.db");
  return { dir, db, a: join(dir, "hostA"), b: join(dir, "hostB") };
}

describe("token keyring export and import", () => {
  test("the second KeyServer host gets the keyring by an encrypted backup; both open the store's tokens; nothing secret is printed", async () => {
    const { dir, db, a, b } = twoHosts();
    const added = await run({ command: "add", db, dataDir: a, client: "client1", type: "marketplace", token: "-" }, TOKEN);
    expect(added).toEqual([
      expect.stringMatching(
        new RegExp(
          `^token store sqlite ${displayPath(db)} \\(store id [0-9a-f]{16}, from --db\\); keyring ${displayPath(join(a, "master_keys.json"))} \\(keyring [0-9a-f]{16}, master key versions 1, current v1\\)$`,
        ),
      ),
      expect.stringMatching(/^made keyring [0-9a-f]{16} in .*, bound to sqlite .*; back it up: 'token keyring export BACKUP'$/),
      `stored token for client=client1 type=marketplace in sqlite ${displayPath(db)} (sealed under master key v1)`,
    ]);
    const backupFile = join(dir, "keyring.backup");
    const exported = await run({ command: "export", db, dataDir: a, file: backupFile }, `${PASSPHRASE}\n`);
    expect(exported[1]).toMatch(
      new RegExp(
        `^wrote an encrypted backup of keyring [0-9a-f]{16} \\(token store sqlite ${displayPath(db).replace(/[.]/g, "\\.")}, store id [0-9a-f]{16}; master key versions 1; archived: none\\) ` +
          `to ${displayPath(backupFile)} \\(0600; scrypt N=2\\^17 r=8 p=1, AES-256-GCM\\): keep it and its passphrase apart, and off this host$`,
      ),
    );

    // Host B, before the import: it would not start, and no command makes it a keyring of its own.
    expect(await run({ command: "list", db, dataDir: b })).toEqual([
      expect.stringMatching(/^REFUSED no keyring at .*hostB\/master_keys\.json, but token store .* holds 1 sealed token and is bound to a keyring/),
    ]);
    const imported = await run({ command: "import", db, dataDir: b, file: backupFile }, PASSPHRASE);
    expect(imported).toEqual([
      expect.stringMatching(
        new RegExp(
          `^imported keyring [0-9a-f]{16} from ${displayPath(backupFile)} into ${displayPath(join(b, "master_keys.json"))} \\(0600\\), ` +
            `bound to sqlite ${displayPath(db)} \\(store id [0-9a-f]{16}\\); it opens master key versions 1 of that store; archived versions in .*hostB/master_keys\\.archive\\.json: none$`,
        ),
      ),
    ]);
    expect([statSync(backupFile).mode & 0o777, statSync(join(b, "master_keys.json")).mode & 0o777]).toEqual([0o600, 0o600]);
    const onB = await openVault({ db, dataDir: b }, "serve");
    expect(await onB.vault.reveal("client1", "marketplace")).toBe(TOKEN);
    await onB.vault.store.close();

    // A rotation on host A is seen by host B through the store: no second import.
    expect((await run({ command: "rotate-key", db, dataDir: a }))[1]).toBe(
      `re-sealed 1 token(s) under master key v2; retired versions: 1 (archived in ${displayPath(join(a, "master_keys.archive.json"))}; 'token restore-key VERSION' brings one back)`,
    );
    const afterRotation = await openVault({ db, dataDir: b }, "serve");
    expect([await afterRotation.vault.reveal("client1", "marketplace"), afterRotation.vault.keyring.versions]).toEqual([TOKEN, [2]]);
    await afterRotation.vault.store.close();

    const key = (JSON.parse(readFileSync(join(a, "master_keys.json"), "utf8")) as { key: string }).key;
    for (const line of [...added, ...exported, ...imported]) {
      expect(line).not.toContain(TOKEN);
      expect(line).not.toContain(key);
    }
    expect(readFileSync(backupFile, "utf8")).not.toContain(key);
  });

  test("import refuses a wrong passphrase, a backup of another store, and a host holding another keyring, in one line each", async () => {
    const { dir, db, a, b } = twoHosts();
    await run({ command: "add", db, dataDir: a, client: "client1", type: "marketplace", token: "-" }, TOKEN);
    const backupFile = join(dir, "keyring.backup");
    await run({ command: "export", db, dataDir: a, file: backupFile }, PASSPHRASE);
    expect(await run({ command: "import", db, dataDir: b, file: backupFile }, "not the passphrase")).toEqual([
      `REFUSED the passphrase does not open ${displayPath(backupFile)} (wrong passphrase)`,
    ]);

    const other = twoHosts();
    await run({ command: "add", db: other.db, dataDir: other.a, client: "client2", type: "marketplace", token: "-" }, TOKEN);
    expect(await run({ command: "import", db: other.db, dataDir: other.b, file: backupFile }, PASSPHRASE)).toEqual([
      expect.stringMatching(
        new RegExp(
          `^REFUSED ${displayPath(backupFile)} is the keyring of token store sqlite ${displayPath(db)} \\(store id [0-9a-f]{16}\\), ` +
            `but this configuration's token store is sqlite ${displayPath(other.db)} \\(store id [0-9a-f]{16}\\): give it the KeyServer's own configuration`,
        ),
      ),
    ]);
    expect(await run({ command: "import", db, dataDir: other.a, file: backupFile }, PASSPHRASE)).toEqual([
      expect.stringMatching(
        new RegExp(
          `^REFUSED ${displayPath(join(other.a, "master_keys.json"))} holds another keyring \\(keyring [0-9a-f]{16}, bound to sqlite ${displayPath(other.db)}\\): ` +
            "move it aside first if nothing needs it \\(an import never overwrites a keyring\\)$",
        ),
      ),
    ]);
    // Tampered: one byte of the sealed body.
    const file = JSON.parse(readFileSync(backupFile, "utf8")) as Record<string, string>;
    const body = Buffer.from(file.ciphertext!, "base64");
    body[5]! ^= 1;
    const tampered = join(dir, "tampered.backup");
    writeFileSync(tampered, JSON.stringify({ ...file, ciphertext: body.toString("base64") }));
    expect(await run({ command: "import", db, dataDir: b, file: tampered }, PASSPHRASE)).toEqual([
      `REFUSED ${displayPath(tampered)} was altered after it was exported: it does not authenticate under its passphrase; use another copy of the backup`,
    ]);
    expect(await run({ command: "export", db, dataDir: a, file: backupFile }, PASSPHRASE)).toEqual([
      expect.any(String),
      `REFUSED ${displayPath(backupFile)} exists: export to a new file (a backup is never overwritten)`,
    ]);
  });
});

describe("token restore-key", () => {
  test("brings an archived version back into the store, for tokens a restored database holds under it", async () => {
    const { db, a } = twoHosts();
    await run({ command: "add", db, dataDir: a, client: "client1", type: "marketplace", token: "-" }, TOKEN);
    const before = await openVault({ db, dataDir: a }, "use");
    const v1Row = (await before.vault.store.get("client1", "marketplace"))!;
    await before.vault.store.close();
    await run({ command: "rotate-key", db, dataDir: a });
    expect((await run({ command: "restore-key", db, dataDir: a, version: 7 }))[1]).toBe(
      `REFUSED master key v7 is not in the archive ${displayPath(join(a, "master_keys.archive.json"))} (archived versions: 1); a keyring backup that holds it can be imported on a host without this keyring`,
    );

    // The database comes back from a dump taken before the rotation.
    const restored = await openVault({ db, dataDir: a }, "use");
    await restored.vault.store.put(v1Row);
    await restored.vault.store.close();
    expect((await run({ command: "list", db, dataDir: a }))[1]).toBe(
      "WARNING: tokens in this store are sealed under master key version(s) 1, which the keyring lacks: " +
        `'token restore-key VERSION' brings one back from ${displayPath(join(a, "master_keys.archive.json"))}`,
    );
    expect((await run({ command: "restore-key", db, dataDir: a, version: 1 })).at(-1)).toBe(
      `restored master key v1 from ${displayPath(join(a, "master_keys.archive.json"))} into sqlite ${displayPath(db)}; ` +
        "master key versions: 1, 2 (current v2); running KeyServers pick it up within seconds",
    );
    const serving = await openVault({ db, dataDir: a }, "serve");
    expect(await serving.vault.reveal("client1", "marketplace")).toBe(TOKEN);
    await serving.vault.store.close();
  });
});
