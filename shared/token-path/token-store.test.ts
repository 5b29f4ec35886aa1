import { afterAll, describe, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, readFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import mysql from "mysql2/promise";
import { ConfigError } from "../platform/errors.ts";
import { SealBroken } from "./keyring.ts";
import { readKeyringFile } from "./keyring-file.ts";
import { hostPortOf, LostCommitRelay, multiHostUrl, TEST_MYSQL_URL, uniqueTable } from "../testing/mysql.ts";
import { testedDatabases, UNIT_RUN } from "../testing/unit-run.ts";
import { openTokenStore, TokenVault, type TokenStore } from "./token-store.ts";
import { openVault } from "./vault-binding.ts";

const TOKEN = "marketplace-token-0123456789";
const mysqlTables: string[] = [];
const stores: TokenStore[] = [];

afterAll(async () => {
  await Promise.all(stores.map((s) => s.close()));
  if (mysqlTables.length === 0) return;
  const conn = await mysql.createConnection(TEST_MYSQL_URL);
  for (const table of mysqlTables) await conn.query(`DROP TABLE IF EXISTS ${table}, ${table}_keyring, ${table}_meta`);
  await conn.end();
});

const tmp = () => mkdtempSync(join(tmpdir(), "securemesh-vault-"));

type RawRows = () => Promise<Record<string, unknown>[]>;

/** Each backend with a way to read the raw `storage` and `storage_keyring` rows, as an attacker with the database would. */
const backends: Record<string, () => Promise<{ store: TokenStore; rawRows: RawRows; rawKeys: RawRows }>> = {
  sqlite: async () => {
    const path = join(tmp(), "tokens.db");
    const store = await openTokenStore(path);
    const select = (table: string) => async () => {
      const db = new DatabaseSync(path, { readOnly: true });
      try {
        return db.prepare(`SELECT * FROM ${table}`).all() as Record<string, unknown>[];
      } finally {
        db.close();
      }
    };
    return { store, rawRows: select("storage"), rawKeys: select("storage_keyring") };
  },
  mysql: async () => {
    const table = uniqueTable("storage");
    mysqlTables.push(table);
    const store = await openTokenStore(TEST_MYSQL_URL, { table });
    const select = (name: string) => async () => {
      const conn = await mysql.createConnection(TEST_MYSQL_URL);
      const [rows] = await conn.query(`SELECT * FROM ${name}`);
      await conn.end();
      return rows as Record<string, unknown>[];
    };
    return { store, rawRows: select(table), rawKeys: select(`${table}_keyring`) };
  },
};

describe.each(testedDatabases(Object.keys(backends)))("%s token vault", (kind) => {
  /** A store of this backend and a keyring bound to it, as the KeyServer's first start makes them. */
  const open = async () => {
    const backend = await backends[kind]!();
    stores.push(backend.store);
    const dataDir = tmp();
    const opened = await openVault({ db: "unused", dataDir, store: backend.store }, "add");
    return { ...backend, ...opened, dataDir };
  };

  test("SQL metacharacters in clientId and tokenType are stored and found verbatim (the KeyServer refuses them before; the store must not depend on it)", async () => {
    const { vault } = await open();
    const clientId = `' OR '1'='1`;
    const tokenType = `x'; DROP TABLE storage; -- "\\`;
    await vault.add(clientId, tokenType, TOKEN);
    expect(await vault.reveal(clientId, tokenType)).toBe(TOKEN);
    expect(await vault.reveal("client1", tokenType)).toBeUndefined();
  });

  test("tokens are sealed at rest: a raw SELECT shows no plaintext, and the master keys in the store are wrapped", async () => {
    const { vault, rawRows, rawKeys } = await open();
    await vault.add("client1", "marketplace", TOKEN);
    await vault.add("client2", "marketplace", TOKEN);
    const rows = await rawRows();
    expect(rows).toHaveLength(2);
    expect(JSON.stringify(rows)).not.toContain(TOKEN);
    expect(JSON.stringify(rows)).not.toContain(Buffer.from(TOKEN).toString("base64"));
    // Same token, two rows: random nonces make the ciphertexts differ.
    expect(rows[0]!.token).not.toBe(rows[1]!.token);
    expect(await vault.reveal("client1", "marketplace")).toBe(TOKEN);
    expect(await vault.reveal("client1", "other")).toBeUndefined();
    // One version, 32 bytes wrapped with its 16-byte tag: the key itself is not there.
    expect((await rawKeys()).map((k) => ({ version: Number(k.version), bytes: Buffer.from(String(k.wrapped), "base64").length }))).toEqual([
      { version: 1, bytes: 48 },
    ]);
  });

  test("master-key rotation keeps every token readable, archives the old key, and restore brings it back", async () => {
    const { vault, archive } = await open();
    for (let i = 0; i < 5; i++) await vault.add(`client${i}`, "marketplace", `${TOKEN}-${i}`);
    expect(await vault.rotate(archive)).toEqual({ version: 2, resealed: 5, retired: [1], unopened: [] });
    expect((await vault.store.all()).map((r) => r.keyVersion)).toEqual([2, 2, 2, 2, 2]);
    for (let i = 0; i < 5; i++) expect(await vault.reveal(`client${i}`, "marketplace")).toBe(`${TOKEN}-${i}`);
    expect({ keyring: vault.keyring.versions, archived: archive.versions, mode: statSync(archive.path).mode & 0o777 }).toEqual({
      keyring: [2],
      archived: [1],
      mode: 0o600,
    });
    // A new version is numbered above every archived one, never reusing a number.
    expect(await vault.rotate(archive)).toEqual({ version: 3, resealed: 5, retired: [2], unopened: [] });
    expect(await vault.store.addKeyVersion(archive.get(1)!)).toBe(true);
    await vault.keyring.refresh();
    expect([vault.keyring.versions, vault.keyring.currentVersion]).toEqual([[1, 3], 3]);
  });

  // Issue 23: rotate-key retired every version no row of *its* store used, so a wrong store lost the real one's key.
  test("a version a row still uses is never removed: not by retire, and not by a row sealed under it at the last moment", async () => {
    const { vault, archive, store } = await open();
    await vault.add("client1", "marketplace", TOKEN);
    const v1Row = (await store.get("client1", "marketplace"))!;
    await vault.keyring.addVersion(archive);
    // retire() told that nothing uses v1, while a row does (a `token add` on another host sealed under v1 just now).
    expect(await vault.keyring.retire(new Set(), archive)).toEqual([]);
    expect(vault.keyring.versions).toEqual([1, 2]);
    expect(await store.removeKeyVersion(1)).toBe(false);
    expect(await vault.reveal("client1", "marketplace")).toBe(TOKEN);
    // A row that does not open (moved from another row) keeps its version through a rotation, which says so.
    await store.put({ ...v1Row, clientId: "client9" });
    expect(await vault.rotate(archive)).toEqual({ version: 3, resealed: 1, retired: [2], unopened: ["client9/marketplace v1"] });
    expect(vault.keyring.versions).toEqual([1, 3]);
  });

  // #11 M4: `token rotate-key` runs as its own process; the running KeyServer kept the old keyring in memory,
  // so every release failed (502 at the proxy) until it was restarted. Issue 23: a second KeyServer (its own copy of
  // the keyring file, on another host) sees the rotation at once, since the versions live in the store.
  test("a vault whose keyring another process or host rotated still reveals, even a row read just before the rotation", async () => {
    const { store, dataDir } = await open();
    const running = await openVault({ db: "unused", dataDir, store }, "serve");
    await running.vault.add("client1", "marketplace", TOKEN);
    expect(await running.vault.reveal("client1", "marketplace")).toBe(TOKEN);

    const rotate = async () => {
      const admin = await openVault({ db: "unused", dataDir, store }, "use");
      return admin.vault.rotate(admin.archive);
    };
    expect(await rotate()).toEqual({ version: 2, resealed: 1, retired: [1], unopened: [] });
    expect(running.vault.keyring.versions).toEqual([1]); // nothing told the running vault
    expect(await running.vault.reveal("client1", "marketplace")).toBe(TOKEN);
    expect(running.vault.keyring.versions).toEqual([2]);

    // A row read under v2, then v2 is retired and the running vault refreshes before the row is opened.
    const stale = (await store.get("client1", "marketplace"))!;
    expect(await rotate()).toEqual({ version: 3, resealed: 1, retired: [2], unopened: [] });
    await running.vault.keyring.refresh();
    let reads = 0;
    const staleOnce: TokenStore = Object.assign(Object.create(store) as TokenStore, {
      get: async (clientId: string, tokenType: string) => (reads++ === 0 ? stale : store.get(clientId, tokenType)),
    });
    expect(await new TokenVault(staleOnce, running.vault.keyring).reveal("client1", "marketplace")).toBe(TOKEN);
    expect(reads).toBe(2);
  });

  test("a sealed token moved to another row does not open", async () => {
    const { vault, store } = await open();
    await vault.add("client1", "marketplace", TOKEN);
    const row = (await store.get("client1", "marketplace"))!;
    await store.put({ ...row, clientId: "client2" });
    await expect(vault.reveal("client2", "marketplace")).rejects.toBeInstanceOf(SealBroken);
  });
});

test.skipIf(UNIT_RUN)("a mysql token store on a multi-host URL leaves a node that fails for the next, even under a lost COMMIT (#14)", async () => {
  await using relay = await LostCommitRelay.start(hostPortOf(TEST_MYSQL_URL));
  const { host, port } = hostPortOf(TEST_MYSQL_URL);
  const table = uniqueTable("storage");
  mysqlTables.push(table);
  const store = await openTokenStore(multiHostUrl(TEST_MYSQL_URL, [relay.hostPort, `${host}:${port}`]), { table });
  try {
    const row = { clientId: "client1", tokenType: "marketplace", ciphertext: "c1", nonce: "n", keyVersion: 1, updatedAt: 1 };
    relay.armed = 1;
    await store.put(row); // its COMMIT lands but the answer is lost: the upsert runs again on the next node
    expect(relay.lost).toBe(1);
    relay.cut();
    await store.ping();
    await store.put({ ...row, ciphertext: "c2", keyVersion: 2 });
    expect(await store.all()).toEqual([{ ...row, ciphertext: "c2", keyVersion: 2 }]);
  } finally {
    await store.close();
  }
});

describe("the keyring file", () => {
  test("is created mode 0600 and holds the keyring key and its store's id, never a master key; one others can read is refused", async () => {
    const dataDir = join(tmp(), "keys");
    const store = await openTokenStore(join(tmp(), "tokens.db"));
    stores.push(store);
    const { vault } = await openVault({ db: "unused", dataDir, store }, "add");
    await vault.add("client1", "marketplace", TOKEN);
    const path = join(dataDir, "master_keys.json");
    const file = JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
    expect({ mode: statSync(path).mode & 0o777, fields: Object.keys(file).sort(), store: file.store }).toEqual({
      mode: 0o600,
      fields: ["format", "key", "keyring", "store"],
      store: { id: await store.storeId(), at: store.description },
    });
    chmodSync(path, 0o644);
    expect(() => readKeyringFile(path)).toThrow(ConfigError);
  });
});
