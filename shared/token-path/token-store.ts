// The KeyServer's token table `storage`, sealed at rest: one interface, node:sqlite by default, MySQL by URL.
import type { DatabaseSync, StatementSync } from "node:sqlite";
import { checkTableName, orUnavailable, parseDatabaseUrl } from "../db/database.ts";
import { openMysql, type MysqlDatabase, type SqlValue } from "../db/mysql.ts";
import { execute, openSqlite } from "../db/sqlite.ts";
import { SealBroken, type MasterKeyring, type Sealed } from "./keyring.ts";

export interface TokenRow extends Sealed {
  clientId: string;
  tokenType: string;
  updatedAt: number;
}

export interface TokenStore {
  readonly kind: "sqlite" | "mysql";
  put(row: TokenRow): Promise<void>;
  get(clientId: string, tokenType: string): Promise<TokenRow | undefined>;
  all(): Promise<TokenRow[]>;
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

const fromRaw = (r: Raw): TokenRow => ({
  clientId: r.client_id, tokenType: r.token_type, ciphertext: r.token, nonce: r.nonce, keyVersion: Number(r.key_version), updatedAt: Number(r.updated_at),
});
const toParams = (r: TokenRow): [string, string, string, string, number, number] => [r.clientId, r.tokenType, r.ciphertext, r.nonce, r.keyVersion, r.updatedAt];

/** The statements both dialects share; each adds its own upsert. */
function tokenSql(table: string) {
  const columns = "client_id, token_type, token, nonce, key_version, updated_at";
  return {
    insert: `INSERT INTO ${table} (${columns}) VALUES (?, ?, ?, ?, ?, ?)`,
    get: `SELECT ${columns} FROM ${table} WHERE client_id = ? AND token_type = ?`,
    all: `SELECT ${columns} FROM ${table} ORDER BY client_id, token_type`,
    any: `SELECT 1 FROM ${table} LIMIT 1`,
  } as const;
}

class SqliteTokenStore implements TokenStore {
  readonly kind = "sqlite" as const;
  readonly #db: DatabaseSync;
  readonly #put: StatementSync;
  readonly #get: StatementSync;
  readonly #all: StatementSync;
  readonly #ping: StatementSync;

  constructor(db: DatabaseSync, table: string) {
    const sql = tokenSql(table);
    this.#db = db;
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

  async ping(): Promise<void> {
    await orUnavailable(TOKEN_STORE, () => this.#ping.get());
  }

  async close(): Promise<void> {
    this.#db.close();
  }
}

class MysqlTokenStore implements TokenStore {
  readonly kind = "mysql" as const;
  readonly #db: MysqlDatabase;
  readonly #sql: ReturnType<typeof tokenSql>;

  constructor(db: MysqlDatabase, table: string) {
    this.#db = db;
    this.#sql = tokenSql(table);
  }

  async put(row: TokenRow): Promise<void> {
    // An upsert of the whole row: run again after a certification failure or on another node, it leaves the same row.
    await orUnavailable(TOKEN_STORE, () => this.#db.transaction((s) => s.run(`${this.#sql.insert} ON DUPLICATE KEY UPDATE token = VALUES(token),
      nonce = VALUES(nonce), key_version = VALUES(key_version), updated_at = VALUES(updated_at)`, toParams(row))));
  }

  async get(clientId: string, tokenType: string): Promise<TokenRow | undefined> {
    const [raw] = await this.#rows<Raw>(this.#sql.get, [clientId, tokenType]);
    return raw && fromRaw(raw);
  }

  async all(): Promise<TokenRow[]> {
    return (await this.#rows<Raw>(this.#sql.all)).map(fromRaw);
  }

  async ping(): Promise<void> {
    // A table, not SELECT 1, which a Galera node without quorum still answers.
    await orUnavailable(TOKEN_STORE, () => this.#db.rows(this.#sql.any));
  }

  async close(): Promise<void> {
    await this.#db.end();
  }

  /**
   * Causal on Galera: a row re-sealed by `token rotate-key` through another node must be read as re-sealed, since
   * the old key version is retired right after (#11 M4).
   */
  #rows<T>(sql: string, params: SqlValue[] = []): Promise<T[]> {
    return orUnavailable(TOKEN_STORE, () => this.#db.rows<T>(sql, params, { causal: true }));
  }
}

/** One CREATE TABLE both dialects accept; MySQL adds its engine. */
function schema(table: string): string {
  return `CREATE TABLE IF NOT EXISTS ${table} (
    client_id VARCHAR(128) NOT NULL,
    token_type VARCHAR(64) NOT NULL,
    token TEXT NOT NULL,
    nonce VARCHAR(24) NOT NULL,
    key_version INT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, token_type)
  )`;
}

/** Opens `mysql://…` or a sqlite path, creating the `storage` table if missing. */
export async function openTokenStore(url: string, options: { table?: string } = {}): Promise<TokenStore> {
  const table = checkTableName(options.table ?? "storage");
  const location = parseDatabaseUrl(url);
  if (location.kind === "mysql") {
    const db = await openMysql(location.url, { what: TOKEN_STORE, connectionLimit: 4, schema: [`${schema(table)} ENGINE=InnoDB`] });
    return new MysqlTokenStore(db, table);
  }
  const db = await openSqlite(location.path, { what: TOKEN_STORE, createSchema: (db) => execute(db, schema(table)) });
  return new SqliteTokenStore(db, table);
}

/** Tokens sealed with the master keyring; the row's client and type are bound into each seal. */
export class TokenVault {
  constructor(readonly store: TokenStore, readonly keyring: MasterKeyring) {}

  static context(clientId: string, tokenType: string): string {
    return `${clientId}\u0000${tokenType}`;
  }

  async add(clientId: string, tokenType: string, token: string): Promise<void> {
    const sealed = this.keyring.seal(token, TokenVault.context(clientId, tokenType));
    await this.store.put({ clientId, tokenType, ...sealed, updatedAt: Date.now() });
  }

  /**
   * The plaintext token, or undefined for an unknown client/type. A seal that does not open with the keys in
   * memory may be newer or older than them: `token rotate-key`, another process, adds a version, re-seals every
   * row and retires the old version. So the keyring is re-read from its file and the row once more from the
   * store, and only a seal that still does not open is an error (#11 M4: no release fails during a rotation).
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
      this.keyring.reload();
    } catch {
      throw new SealBroken(); // the KeyServer's keyring watcher logs why the file does not read
    }
    const again = await this.store.get(clientId, tokenType);
    return again && this.keyring.open(again, context);
  }

  /** Re-seals every token under a new master key version, then retires versions no row uses. */
  async rotate(): Promise<{ version: number; resealed: number; retired: number[] }> {
    const version = this.keyring.addVersion();
    const rows = await this.store.all();
    for (const row of rows) {
      const context = TokenVault.context(row.clientId, row.tokenType);
      const sealed = this.keyring.seal(this.keyring.open(row, context), context);
      await this.store.put({ ...row, ...sealed, updatedAt: Date.now() });
    }
    const inUse = new Set((await this.store.all()).map((r) => r.keyVersion));
    return { version, resealed: rows.length, retired: this.keyring.retire(inUse) };
  }
}
