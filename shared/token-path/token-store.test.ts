import { afterAll, describe, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import mysql from "mysql2/promise";
import { ConfigError } from "../platform/errors.ts";
import { MasterKeyring, SealBroken } from "./keyring.ts";
import { hostPortOf, LostCommitRelay, multiHostUrl, TEST_MYSQL_URL, uniqueTable } from "../testing/mysql.ts";
import { openTokenStore, TokenVault, type TokenStore } from "./token-store.ts";

const TOKEN = "marketplace-token-0123456789";
const mysqlTables: string[] = [];
const stores: TokenStore[] = [];

afterAll(async () => {
  await Promise.all(stores.map((s) => s.close()));
  if (mysqlTables.length === 0) return;
  const conn = await mysql.createConnection(TEST_MYSQL_URL);
  for (const table of mysqlTables) await conn.query(`DROP TABLE IF EXISTS ${table}`);
  await conn.end();
});

const tmp = () => mkdtempSync(join(tmpdir(), "securemesh-vault-"));

/** Each backend with a way to read the raw `storage` rows, as an attacker with the database would. */
const backends: Record<string, () => Promise<{ store: TokenStore; rawRows: () => Promise<Record<string, unknown>[]> }>> = {
  sqlite: async () => {
    const path = join(tmp(), "tokens.db");
    const store = await openTokenStore(path);
    return {
      store,
      rawRows: async () => {
        const db = new DatabaseSync(path, { readOnly: true });
        try {
          return db.prepare("SELECT * FROM storage").all() as Record<string, unknown>[];
        } finally {
          db.close();
        }
      },
    };
  },
  mysql: async () => {
    const table = uniqueTable("storage");
    mysqlTables.push(table);
    const store = await openTokenStore(TEST_MYSQL_URL, { table });
    return {
      store,
      rawRows: async () => {
        const conn = await mysql.createConnection(TEST_MYSQL_URL);
        const [rows] = await conn.query(`SELECT * FROM ${table}`);
        await conn.end();
        return rows as Record<string, unknown>[];
      },
    };
  },
};

describe.each(Object.keys(backends))("%s token vault", (kind) => {
  const open = async () => {
    const backend = await backends[kind]!();
    stores.push(backend.store);
    return { ...backend, vault: new TokenVault(backend.store, MasterKeyring.open(join(tmp(), "master_keys.json"))) };
  };

  test("SQL metacharacters in clientId and tokenType are stored and found verbatim (the KeyServer refuses them before; the store must not depend on it)", async () => {
    const { vault } = await open();
    const clientId = `' OR '1'='1`;
    const tokenType = `x'; DROP TABLE storage; -- "\\`;
    await vault.add(clientId, tokenType, TOKEN);
    expect(await vault.reveal(clientId, tokenType)).toBe(TOKEN);
    expect(await vault.reveal("client1", tokenType)).toBeUndefined();
  });

  test("tokens are sealed at rest: a raw SELECT shows no plaintext", async () => {
    const { vault, rawRows } = await open();
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
  });

  test("master-key rotation keeps every token readable and retires the old key", async () => {
    const { vault } = await open();
    for (let i = 0; i < 5; i++) await vault.add(`client${i}`, "marketplace", `${TOKEN}-${i}`);
    expect(await vault.rotate()).toEqual({ version: 2, resealed: 5, retired: [1] });
    expect((await vault.store.all()).map((r) => r.keyVersion)).toEqual([2, 2, 2, 2, 2]);
    for (let i = 0; i < 5; i++) expect(await vault.reveal(`client${i}`, "marketplace")).toBe(`${TOKEN}-${i}`);
    expect(vault.keyring.versions).toEqual([2]);
  });

  // #11 M4: `token rotate-key` runs as its own process; the running KeyServer kept the old keyring in memory,
  // so every release failed (502 at the proxy) until it was restarted.
  test("a vault whose keyring another process rotated still reveals, even a row read just before the rotation", async () => {
    const { store } = await open();
    const keyringPath = join(tmp(), "master_keys.json");
    const running = new TokenVault(store, MasterKeyring.open(keyringPath));
    await running.add("client1", "marketplace", TOKEN);
    expect(await running.reveal("client1", "marketplace")).toBe(TOKEN);

    const rotate = () => new TokenVault(store, MasterKeyring.open(keyringPath)).rotate();
    expect(await rotate()).toEqual({ version: 2, resealed: 1, retired: [1] });
    expect(running.keyring.versions).toEqual([1]); // nothing told the running vault
    expect(await running.reveal("client1", "marketplace")).toBe(TOKEN);
    expect(running.keyring.versions).toEqual([2]);

    // A row read under v2, then v2 is retired and the running vault's watcher reloads before the row is opened.
    const stale = (await store.get("client1", "marketplace"))!;
    expect(await rotate()).toEqual({ version: 3, resealed: 1, retired: [2] });
    running.keyring.reload();
    let reads = 0;
    const staleOnce: TokenStore = {
      kind: store.kind,
      get: async (clientId, tokenType) => (reads++ === 0 ? stale : store.get(clientId, tokenType)),
      put: (row) => store.put(row), all: () => store.all(), ping: () => store.ping(), close: async () => {},
    };
    expect(await new TokenVault(staleOnce, running.keyring).reveal("client1", "marketplace")).toBe(TOKEN);
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

test("a mysql token store on a multi-host URL leaves a node that fails for the next, even under a lost COMMIT (#14)", async () => {
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

describe("MasterKeyring", () => {
  test("is created mode 0600, reloads the same keys, and refuses a file others can read", () => {
    const path = join(tmp(), "keys", "master_keys.json");
    const first = MasterKeyring.open(path);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const sealed = first.seal("secret", "ctx");
    expect(MasterKeyring.open(path).open(sealed, "ctx")).toBe("secret");
    chmodSync(path, 0o644);
    expect(() => MasterKeyring.open(path)).toThrow(ConfigError);
  });
});
