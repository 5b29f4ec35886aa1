// The KeyServer's token table `storage`, sealed at rest, beside the tables of its keyring: `storage_keyring` (the
// master key versions, each wrapped under the keyring key) and `storage_meta` (the store's id, which its keyring
// file records: issue 23). One interface, node:sqlite by default, MySQL by URL.
import type { DatabaseSync, StatementSync } from "node:sqlite";
import { checkTableName, describeDatabaseUrl, orUnavailable, parseDatabaseUrl } from "../db/database.ts";
import { openMysql, type MysqlDatabase, type SqlValue } from "../db/mysql.ts";
import { execute, openSqlite } from "../db/sqlite.ts";
import { SealBroken, type KeyArchive, type KeyVersionStore, type MasterKeyring, type Sealed, type WrappedKey } from "./keyring.ts";

export interface TokenRow extends Sealed {
  clientId: string;
  tokenType: string;
  updatedAt: number;
}

export interface TokenStore extends KeyVersionStore {
  readonly kind: "sqlite" | "mysql";
  /** Where it is, for messages: describeDatabaseUrl(), never a password. */
  readonly description: string;
  put(row: TokenRow): Promise<void>;
  get(clientId: string, tokenType: string): Promise<TokenRow | undefined>;
  all(): Promise<TokenRow[]>;
  /** Token rows per master key version. */
  versionsInUse(): Promise<Map<number, number>>;
  /** The store's id, once a keyring was bound to it. */
  storeId(): Promise<string | undefined>;
  /** Sets the store's id unless it has one; returns the one it has now. */
  claimStoreId(id: string): Promise<string>;
  ping(): Promise<void>;
  close(): Promise<void>;
}

const TOKEN_STORE = "token store";

interface Raw {
  client_id: string;
  token_type: string;
  token: string;
  nonce: string;
  key_version: number | string;
  updated_at: number | string;
}

interface RawKey {
  version: number | string;
  wrapped: string;
  nonce: string;
  created_at: number | string;
}

const fromRaw = (r: Raw): TokenRow => ({
  clientId: r.client_id,
  tokenType: r.token_type,
  ciphertext: r.token,
  nonce: r.nonce,
  keyVersion: Number(r.key_version),
  updatedAt: Number(r.updated_at),
});
const toParams = (r: TokenRow): [string, string, string, string, number, number] => [r.clientId, r.tokenType, r.ciphertext, r.nonce, r.keyVersion, r.updatedAt];
const keyFromRaw = (r: RawKey): WrappedKey => ({ version: Number(r.version), wrapped: r.wrapped, nonce: r.nonce, createdAt: Number(r.created_at) });

/** The statements both dialects share; each adds its own upsert and insert-if-absent. */
function tokenSql(table: string) {
  const columns = "client_id, token_type, token, nonce, key_version, updated_at";
  const keyring = `${table}_keyring`;
  const meta = `${table}_meta`;
  return {
    insert: `INSERT INTO ${table} (${columns}) VALUES (?, ?, ?, ?, ?, ?)`,
    get: `SELECT ${columns} FROM ${table} WHERE client_id = ? AND token_type = ?`,
    all: `SELECT ${columns} FROM ${table} ORDER BY client_id, token_type`,
    any: `SELECT 1 FROM ${table} LIMIT 1`,
    inUse: `SELECT key_version, COUNT(*) AS n FROM ${table} GROUP BY key_version`,
    keys: `SELECT version, wrapped, nonce, created_at FROM ${keyring} ORDER BY version`,
    insertKey: `INTO ${keyring} (version, wrapped, nonce, created_at) VALUES (?, ?, ?, ?)`,
    // One statement: a row sealed under the version in the meantime keeps it.
    removeKey: `DELETE FROM ${keyring} WHERE version = ? AND NOT EXISTS (SELECT 1 FROM ${table} WHERE key_version = ?)`,
    storeId: `SELECT value FROM ${meta} WHERE name = 'store_id'`,
    insertStoreId: `INTO ${meta} (name, value) VALUES ('store_id', ?)`,
  } as const;
}

class SqliteTokenStore implements TokenStore {
  readonly kind = "sqlite" as const;
  readonly description: string;
  readonly #db: DatabaseSync;
  readonly #sql: ReturnType<typeof tokenSql>;
  readonly #put: StatementSync;
  readonly #get: StatementSync;
  readonly #all: StatementSync;
  readonly #ping: StatementSync;

  constructor(db: DatabaseSync, table: string, description: string) {
    const sql = tokenSql(table);
    this.description = description;
    this.#db = db;
    this.#sql = sql;
    this.#put = db.prepare(`${sql.insert} ON CONFLICT (client_id, token_type) DO UPDATE SET token = excluded.token,
      nonce = excluded.nonce, key_version = excluded.key_version, updated_at = excluded.updated_at`);
    this.#get = db.prepare(sql.get);
    this.#all = db.prepare(sql.all);
    this.#ping = db.prepare("SELECT 1");
  }

  async put(row: TokenRow): Promise<void> {
    await orUnavailable(TOKEN_STORE, () => this.#put.run(...toParams(row)));
  }

  async get(clientId: string, tokenType: string): Promise<TokenRow | undefined> {
    const raw = await orUnavailable(TOKEN_STORE, () => this.#get.get(clientId, tokenType) as Raw | undefined);
    return raw && fromRaw(raw);
  }

  async all(): Promise<TokenRow[]> {
    return orUnavailable(TOKEN_STORE, () => (this.#all.all() as unknown as Raw[]).map(fromRaw));
  }

  async versionsInUse(): Promise<Map<number, number>> {
    const rows = await this.#rows<{ key_version: number; n: number }>(this.#sql.inUse);
    return new Map(rows.map((r) => [Number(r.key_version), Number(r.n)]));
  }

  async keyVersions(): Promise<WrappedKey[]> {
    return (await this.#rows<RawKey>(this.#sql.keys)).map(keyFromRaw);
  }

  async addKeyVersion(key: WrappedKey): Promise<boolean> {
    return (await this.#run(`INSERT OR IGNORE ${this.#sql.insertKey}`, [key.version, key.wrapped, key.nonce, key.createdAt])) === 1;
  }

  async removeKeyVersion(version: number): Promise<boolean> {
    return (await this.#run(this.#sql.removeKey, [version, version])) === 1;
  }

  async storeId(): Promise<string | undefined> {
    return (await this.#rows<{ value: string }>(this.#sql.storeId))[0]?.value;
  }

  async claimStoreId(id: string): Promise<string> {
    await this.#run(`INSERT OR IGNORE ${this.#sql.insertStoreId}`, [id]);
    return (await this.storeId())!;
  }

  async ping(): Promise<void> {
    await orUnavailable(TOKEN_STORE, () => this.#ping.get());
  }

  async close(): Promise<void> {
    this.#db.close();
  }

  #rows<T>(sql: string, params: SqlValue[] = []): Promise<T[]> {
    return orUnavailable(TOKEN_STORE, () => this.#db.prepare(sql).all(...params) as unknown as T[]);
  }

  async #run(sql: string, params: SqlValue[]): Promise<number> {
    return Number((await orUnavailable(TOKEN_STORE, () => this.#db.prepare(sql).run(...params))).changes);
  }
}

class MysqlTokenStore implements TokenStore {
  readonly kind = "mysql" as const;
  readonly description: string;
  readonly #db: MysqlDatabase;
  readonly #sql: ReturnType<typeof tokenSql>;

  constructor(db: MysqlDatabase, table: string) {
    this.description = db.description;
    this.#db = db;
    this.#sql = tokenSql(table);
  }

  async put(row: TokenRow): Promise<void> {
    // An upsert of the whole row: run again after a certification failure or on another node, it leaves the same row.
    await orUnavailable(TOKEN_STORE, () =>
      this.#db.transaction((s) =>
        s.run(
          `${this.#sql.insert} ON DUPLICATE KEY UPDATE token = VALUES(token),
      nonce = VALUES(nonce), key_version = VALUES(key_version), updated_at = VALUES(updated_at)`,
          toParams(row),
        ),
      ),
    );
  }

  async get(clientId: string, tokenType: string): Promise<TokenRow | undefined> {
    const [raw] = await this.#rows<Raw>(this.#sql.get, [clientId, tokenType]);
    return raw && fromRaw(raw);
  }

  async all(): Promise<TokenRow[]> {
    return (await this.#rows<Raw>(this.#sql.all)).map(fromRaw);
  }

  async versionsInUse(): Promise<Map<number, number>> {
    const rows = await this.#rows<{ key_version: number; n: number | string }>(this.#sql.inUse);
    return new Map(rows.map((r) => [Number(r.key_version), Number(r.n)]));
  }

  async keyVersions(): Promise<WrappedKey[]> {
    return (await this.#rows<RawKey>(this.#sql.keys)).map(keyFromRaw);
  }

  async addKeyVersion(key: WrappedKey): Promise<boolean> {
    // Run again after a lost COMMIT, an insert that landed the first time reads as not added: read it back.
    await this.#run(`INSERT IGNORE ${this.#sql.insertKey}`, [key.version, key.wrapped, key.nonce, key.createdAt]);
    return (await this.keyVersions()).some((k) => k.version === key.version && k.wrapped === key.wrapped);
  }

  async removeKeyVersion(version: number): Promise<boolean> {
    await this.#run(this.#sql.removeKey, [version, version]);
    return !(await this.keyVersions()).some((k) => k.version === version);
  }

  async storeId(): Promise<string | undefined> {
    return (await this.#rows<{ value: string }>(this.#sql.storeId))[0]?.value;
  }

  async claimStoreId(id: string): Promise<string> {
    await this.#run(`INSERT IGNORE ${this.#sql.insertStoreId}`, [id]);
    return (await this.storeId())!;
  }

  async ping(): Promise<void> {
    // A table, not SELECT 1, which a Galera node without quorum still answers.
    await orUnavailable(TOKEN_STORE, () => this.#db.rows(this.#sql.any));
  }

  async close(): Promise<void> {
    await this.#db.end();
  }

  /**
   * Causal on Galera: a row re-sealed by `token rotate-key` through another node must be read as re-sealed, and a
   * master key version added there must be seen here, since the old version is retired right after (#11 M4).
   */
  #rows<T>(sql: string, params: SqlValue[] = []): Promise<T[]> {
    return orUnavailable(TOKEN_STORE, () => this.#db.rows<T>(sql, params, { causal: true }));
  }

  async #run(sql: string, params: SqlValue[]): Promise<void> {
    await orUnavailable(TOKEN_STORE, () => this.#db.transaction((s) => s.run(sql, params)));
  }
}

/** The CREATE TABLEs both dialects accept; MySQL adds its engine. Every table has a primary key, as Galera needs. */
function schema(table: string): string[] {
  return [
    `CREATE TABLE IF NOT EXISTS ${table} (
    client_id VARCHAR(128) NOT NULL,
    token_type VARCHAR(64) NOT NULL,
    token TEXT NOT NULL,
    nonce VARCHAR(24) NOT NULL,
    key_version INT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, token_type)
  )`,
    `CREATE TABLE IF NOT EXISTS ${table}_keyring (
    version INT NOT NULL,
    wrapped VARCHAR(128) NOT NULL,
    nonce VARCHAR(24) NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (version)
  )`,
    `CREATE TABLE IF NOT EXISTS ${table}_meta (
    name VARCHAR(64) NOT NULL,
    value VARCHAR(255) NOT NULL,
    PRIMARY KEY (name)
  )`,
  ];
}

/** Opens `mysql://…` or a sqlite path, creating the tables if missing. */
export async function openTokenStore(url: string, options: { table?: string } = {}): Promise<TokenStore> {
  const table = checkTableName(options.table ?? "storage");
  const location = parseDatabaseUrl(url);
  if (location.kind === "mysql") {
    const db = await openMysql(location.url, { what: TOKEN_STORE, connectionLimit: 4, schema: schema(table).map((s) => `${s} ENGINE=InnoDB`) });
    return new MysqlTokenStore(db, table);
  }
  const db = await openSqlite(location.path, { what: TOKEN_STORE, createSchema: (db) => schema(table).forEach((s) => execute(db, s)) });
  return new SqliteTokenStore(db, table, describeDatabaseUrl(url));
}

/** What a rotation did. */
export interface Rotation {
  version: number;
  resealed: number;
  /** Versions archived and removed from the store. */
  retired: number[];
  /** Rows that did not open, so stayed under their version (which is then kept): "client/type vN". */
  unopened: string[];
}

/** Tokens sealed with the master keyring; the row's client and type are bound into each seal. */
export class TokenVault {
  constructor(
    readonly store: TokenStore,
    readonly keyring: MasterKeyring,
  ) {}

  static context(clientId: string, tokenType: string): string {
    return `${clientId}\u0000${tokenType}`;
  }

  async add(clientId: string, tokenType: string, token: string): Promise<void> {
    const sealed = this.keyring.seal(token, TokenVault.context(clientId, tokenType));
    await this.store.put({ clientId, tokenType, ...sealed, updatedAt: Date.now() });
  }

  /**
   * The plaintext token, or undefined for an unknown client/type. A seal that does not open with the keys in
   * memory may be newer or older than them: `token rotate-key`, another process or host, adds a version, re-seals
   * every row and retires the old version. So the versions are read again from the store, and the row once more,
   * and only a seal that still does not open is an error (#11 M4: no release fails during a rotation).
   */
  async reveal(clientId: string, tokenType: string): Promise<string | undefined> {
    const context = TokenVault.context(clientId, tokenType);
    const row = await this.store.get(clientId, tokenType);
    if (!row) return undefined;
    try {
      return this.keyring.open(row, context);
    } catch (error) {
      if (!(error instanceof SealBroken)) throw error;
    }
    try {
      await this.keyring.refresh();
    } catch {
      throw new SealBroken(); // the KeyServer's keyring refresh logs why the keys do not read
    }
    const again = await this.store.get(clientId, tokenType);
    return again && this.keyring.open(again, context);
  }

  /**
   * Re-seals every token under a new master key version, then archives and removes the versions no row uses. A row
   * that does not open is left as it is, and its version kept: nothing a rotation does loses a token (issue 23).
   */
  async rotate(archive: KeyArchive): Promise<Rotation> {
    const version = await this.keyring.addVersion(archive);
    const rows = await this.store.all();
    const unopened: string[] = [];
    let resealed = 0;
    for (const row of rows) {
      const context = TokenVault.context(row.clientId, row.tokenType);
      let token: string;
      try {
        token = this.keyring.open(row, context);
      } catch (error) {
        if (!(error instanceof SealBroken)) throw error;
        unopened.push(`${row.clientId}/${row.tokenType} v${row.keyVersion}`);
        continue;
      }
      await this.store.put({ ...row, ...this.keyring.seal(token, context), updatedAt: Date.now() });
      resealed += 1;
    }
    const inUse = new Set((await this.store.versionsInUse()).keys());
    return { version, resealed, retired: await this.keyring.retire(inUse, archive), unopened };
  }
}
