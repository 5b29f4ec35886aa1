// Issue 23: a keyring and a token store that do not belong together are refused, naming both; a host without the
// keyring never makes one that opens nothing; a keyring file of the old format is bound only by the KeyServer itself.
import { afterAll, describe, expect, test } from "bun:test";
import { createCipheriv, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError } from "../platform/errors.ts";
import { displayPath } from "../platform/paths.ts";
import { newId, writeKeyringFile } from "./keyring-file.ts";
import { newKey } from "./keyring.ts";
import { openTokenStore, TokenVault, type TokenStore } from "./token-store.ts";
import { openVault, type VaultPurpose } from "./vault-binding.ts";

const TOKEN = "marketplace-token-0123456789";
const opened: TokenStore[] = [];
afterAll(async () => {
  await Promise.all(opened.map((s) => s.close().catch(() => {})));
});

const tmp = () => mkdtempSync(join(tmpdir(), "securemesh-binding-"));

/** A KeyServer's data folder and its sqlite store, with client1's token sealed, as `token add` leaves them. */
async function deployed() {
  const dir = tmp();
  const location = { db: join(dir, "tokens.db"), dataDir: join(dir, "keyserver") };
  const { vault } = await openVault(location, "add");
  await vault.add("client1", "marketplace", TOKEN);
  const storeId = (await vault.store.storeId())!;
  await vault.store.close();
  return { ...location, dir, storeId, keyringId: vault.keyring.id, keyringPath: join(location.dataDir, "master_keys.json") };
}

/** The one line an opening refuses with, or "opened". */
async function outcome(location: { db: string; dataDir: string }, purpose: VaultPurpose): Promise<string> {
  try {
    const { vault } = await openVault(location, purpose);
    opened.push(vault.store);
    return "opened";
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return (error as Error).message;
  }
}

const PURPOSES: VaultPurpose[] = ["serve", "add", "use"];

describe("a keyring and a store that do not belong together", () => {
  // The operator's sequence: the keyring shared with the KeyServer, the store left to its default.
  test("a sqlite file that does not exist is refused before it is made, for every purpose, naming both", async () => {
    const real = await deployed();
    const wrong = { db: join(real.dir, "elsewhere", "tokens.db"), dataDir: real.dataDir };
    for (const purpose of PURPOSES) {
      expect(await outcome(wrong, purpose)).toBe(
        `keyring ${displayPath(real.keyringPath)} belongs to token store sqlite ${displayPath(real.db)} (store id ${real.storeId}), ` +
          `not to sqlite ${displayPath(wrong.db)} (no such file): give it the KeyServer's own configuration (--config FILE, or the --db or --db-file the KeyServer runs with)`,
      );
    }
    expect(existsSync(join(real.dir, "elsewhere"))).toBe(false);
  });

  test("an empty store, or one bound to another keyring, is refused; the KeyServer is told to use its keyring's store", async () => {
    const real = await deployed();
    const other = await deployed();
    const empty = join(tmp(), "tokens.db");
    (await openTokenStore(empty)).close();
    const head = `keyring ${displayPath(real.keyringPath)} belongs to token store sqlite ${displayPath(real.db)} (store id ${real.storeId}), not to`;
    expect(await outcome({ db: empty, dataDir: real.dataDir }, "use")).toBe(
      `${head} sqlite ${displayPath(empty)} (bound to no keyring): give it the KeyServer's own configuration (--config FILE, or the --db or --db-file the KeyServer runs with)`,
    );
    expect(await outcome({ db: other.db, dataDir: real.dataDir }, "serve")).toBe(
      `${head} sqlite ${displayPath(other.db)} (store id ${other.storeId}, bound to another keyring): ` +
        "start the KeyServer with the store its keyring belongs to (--db), or import this store's keyring",
    );
    // Neither store was touched: the empty one is still bound to nothing.
    const emptyStore = await openTokenStore(empty);
    opened.push(emptyStore);
    expect([await emptyStore.storeId(), await emptyStore.keyVersions()]).toEqual([undefined, []]);
  });

  test("a keyring file replaced by another keyring's key, claiming the same store, is refused: its keys do not open", async () => {
    const real = await deployed();
    writeKeyringFile(real.keyringPath, { id: newId(), store: { id: real.storeId, at: "forged" }, key: newKey() });
    expect(await outcome(real, "serve")).toMatch(
      /^the master keys in sqlite \S+ do not open under keyring \S+ \(keyring [0-9a-f]{16}\): the keyring file was replaced or altered; restore it from its backup \('token keyring import BACKUP'\)$/,
    );
  });
});

describe("a host without the keyring", () => {
  test("on a store that holds sealed tokens: refused for every purpose, and no keyring file is made", async () => {
    const real = await deployed();
    const replacementHost = join(tmp(), "keyserver");
    for (const purpose of PURPOSES) {
      expect(await outcome({ db: real.db, dataDir: replacementHost }, purpose)).toBe(
        `no keyring at ${displayPath(join(replacementHost, "master_keys.json"))}, ` +
          `but token store sqlite ${displayPath(real.db)} holds 1 sealed token and is bound to a keyring (store id ${real.storeId}): ` +
          "restore that keyring with 'token keyring import BACKUP' (a new keyring would open none of them)",
      );
    }
    expect(existsSync(replacementHost) ? readdirSync(replacementHost) : []).toEqual([]);
  });

  test("on a store sealed before keyrings were bound (the old code's, its keyring file gone): refused, saying to put that file back", async () => {
    const dir = tmp();
    const store = await openTokenStore(join(dir, "tokens.db"));
    await store.put(legacySeal(newKey(), "client1", "marketplace", TOKEN, 1));
    await store.close();
    expect(await outcome({ db: join(dir, "tokens.db"), dataDir: join(dir, "k") }, "serve")).toBe(
      `no keyring at ${displayPath(join(dir, "k", "master_keys.json"))}, ` +
        `but token store sqlite ${displayPath(join(dir, "tokens.db"))} holds 1 sealed token, sealed before keyrings were bound to stores: ` +
        "put back the master_keys.json they were sealed with and start the KeyServer (it binds the two) (a new keyring would open none of them)",
    );
  });

  test("on an empty store: the KeyServer and token add make the keyring; other commands have nothing to act on", async () => {
    const dir = tmp();
    expect(await outcome({ db: join(dir, "tokens.db"), dataDir: join(dir, "k") }, "use")).toBe(
      `no keyring at ${displayPath(join(dir, "k", "master_keys.json"))} and no token store at ${displayPath(join(dir, "tokens.db"))}: ` +
        "nothing to act on; give it the KeyServer's own configuration (--config FILE, or the --db or --db-file the KeyServer runs with)",
    );
    const made = await openVault({ db: join(dir, "tokens.db"), dataDir: join(dir, "k") }, "serve");
    opened.push(made.vault.store);
    expect(made.notes).toEqual([
      expect.stringMatching(
        /^made keyring [0-9a-f]{16} in \S+master_keys\.json, bound to sqlite \S+ \(store id [0-9a-f]{16}\); back it up: 'token keyring export BACKUP'$/,
      ),
    ]);
    expect([made.vault.keyring.versions, readdirSync(join(dir, "k")).sort()]).toEqual([[1], ["master_keys.json"]]);
  });

  test("two KeyServers starting at once on one empty store: one binds it, the other is told to import that keyring", async () => {
    const dir = tmp();
    const db = join(dir, "tokens.db");
    (await openTokenStore(db)).close();
    const results = await Promise.allSettled([1, 2].map((i) => openVault({ db, dataDir: join(dir, `host${i}`) }, "serve")));
    const won = results.filter((r) => r.status === "fulfilled");
    for (const r of won) opened.push(r.value.vault.store);
    const lost = results.filter((r): r is PromiseRejectedResult => r.status === "rejected").map((r) => (r.reason as Error).message);
    expect({ won: won.length, lost: lost.map((m) => /'token keyring import BACKUP'/.test(m)) }).toEqual({ won: 1, lost: [true] });
  });

  test("an opening that stopped between the store and the file is finished by the next one", async () => {
    const dir = tmp();
    const location = { db: join(dir, "tokens.db"), dataDir: join(dir, "k") };
    const store = await openTokenStore(location.db);
    const half = { id: newId(), store: { id: newId(), at: store.description }, key: newKey() };
    writeKeyringFile(join(location.dataDir, "master_keys.json.new"), half);
    await store.claimStoreId(half.store.id);
    await store.close();
    const resumed = await openVault(location, "add");
    opened.push(resumed.vault.store);
    expect({ notes: resumed.notes, keyring: resumed.vault.keyring.id, versions: resumed.vault.keyring.versions, files: readdirSync(location.dataDir) }).toEqual(
      {
        notes: [`finished binding keyring ${half.id} to ${store.description} (store id ${half.store.id})`],
        keyring: half.id,
        versions: [1],
        files: ["master_keys.json"],
      },
    );
  });
});

/** A row sealed as the code before issue 23 sealed it: AES-256-GCM under a raw master key from master_keys.json. */
function legacySeal(key: Buffer, clientId: string, tokenType: string, token: string, version: number) {
  const nonce = randomBytes(12);
  const cipher = createCipheriv("aes-256-gcm", key, nonce);
  cipher.setAAD(Buffer.from(TokenVault.context(clientId, tokenType)));
  const ciphertext = Buffer.concat([cipher.update(token, "utf8"), cipher.final(), cipher.getAuthTag()]).toString("base64");
  return { clientId, tokenType, ciphertext, nonce: nonce.toString("base64"), keyVersion: version, updatedAt: 1 };
}

describe("a keyring file of the old format (master keys in the file, bound to no store)", () => {
  async function legacyDeployment(options: { sealWith?: Buffer } = {}) {
    const dir = tmp();
    const location = { db: join(dir, "tokens.db"), dataDir: join(dir, "k") };
    const keys = { "1": newKey(), "2": newKey() };
    const store = await openTokenStore(location.db);
    await store.put(legacySeal(options.sealWith ?? keys["2"], "client1", "marketplace", TOKEN, 2));
    await store.close();
    mkdirSync(location.dataDir, { recursive: true, mode: 0o700 });
    writeFileSync(
      join(location.dataDir, "master_keys.json"),
      JSON.stringify({ current: 2, keys: { "1": keys["1"].toString("base64"), "2": keys["2"].toString("base64") } }),
      { mode: 0o600 },
    );
    return location;
  }

  test("only the KeyServer binds it to its store: admin commands are refused until then", async () => {
    const location = await legacyDeployment();
    for (const purpose of ["add", "use"] as const) {
      expect(await outcome(location, purpose)).toBe(
        `${displayPath(join(location.dataDir, "master_keys.json"))} is a keyring file of the old format, bound to no token store yet: ` +
          "start the KeyServer once with its own configuration (it binds its keyring to its store), then run this again",
      );
    }
    const serve = await openVault(location, "serve");
    opened.push(serve.vault.store);
    expect(serve.notes).toEqual([
      expect.stringMatching(
        /^bound the keyring file of the old format to sqlite \S+ \(store id [0-9a-f]{16}\): its 2 master keys now live in the store, wrapped under keyring [0-9a-f]{16}; back it up: 'token keyring export BACKUP'$/,
      ),
    ]);
    expect([await serve.vault.reveal("client1", "marketplace"), serve.vault.keyring.versions]).toEqual([TOKEN, [1, 2]]);
    const file = JSON.parse(readFileSync(join(location.dataDir, "master_keys.json"), "utf8")) as Record<string, unknown>;
    expect([file.format, "keys" in file]).toEqual([2, false]);
    expect(await outcome(location, "use")).toBe("opened");
  });

  test("one that does not open the store's tokens is refused, and nothing is bound", async () => {
    const location = await legacyDeployment({ sealWith: newKey() });
    expect(await outcome(location, "serve")).toBe(
      `${displayPath(join(location.dataDir, "master_keys.json"))} (old format) opens 0 of the 1 tokens in sqlite ${displayPath(location.db)}: ` +
        "it is not this store's keyring; start the KeyServer on the store it belongs to, or restore this store's keyring",
    );
    const store = await openTokenStore(location.db);
    opened.push(store);
    expect(await store.storeId()).toBeUndefined();
  });
});

describe("tokens sealed under a version the keyring lacks", () => {
  test("stop the KeyServer at start with the way back; admin commands still open, to restore it", async () => {
    const real = await deployed();
    const { vault, archive } = await openVault(real, "use");
    const v1Row = (await vault.store.get("client1", "marketplace"))!;
    expect((await vault.rotate(archive)).retired).toEqual([1]);
    // The database restored from a dump taken before the rotation: its row is sealed under v1 again.
    await vault.store.put(v1Row);
    await vault.store.close();
    expect(await outcome(real, "serve")).toBe(
      `token store sqlite ${displayPath(real.db)} holds 1 token sealed under master key version(s) 1 that its keyring lacks: ` +
        `bring them back with 'token restore-key VERSION' (from ${displayPath(join(real.dataDir, "master_keys.archive.json"))}) or 'token keyring import BACKUP'`,
    );
    const admin = await openVault(real, "use");
    opened.push(admin.vault.store);
    expect(admin.missing).toEqual([1]);
  });
});
