// The KeyServer's token table `storage`, sealed at rest: one interface, bun:sqlite by default, MySQL by URL.
import { Database } from "bun:sqlite";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import mysql from "mysql2/promise";
import { Unavailable } from "../platform/errors.ts";
import { SealBroken, type MasterKeyring, type Sealed } from "./keyring.ts";
import { checkTableName } from "../request-path/store.ts";

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

const columns = "client_id, token_type, token, nonce, key_version, updated_at";

interface Raw {
  client_id: string;
  token_type: string;
  token: string;
  nonce: string;
  key_version: number;
  updated_at: number;
}

const fromRaw = (r: Raw): TokenRow => ({
  clientId: r.client_id, tokenType: r.token_type, ciphertext: r.token, nonce: r.nonce, keyVersion: Number(r.key_version), updatedAt: Number(r.updated_at),
});
const toParams = (r: TokenRow) => [r.clientId, r.tokenType, r.ciphertext, r.nonce, r.keyVersion, r.updatedAt];

function unavailable(error: unknown): Unavailable {
  return new Unavailable("token store unavailable", { cause: error });
}

class SqliteTokenStore implements TokenStore {
  readonly kind = "sqlite" as const;
  constructor(private readonly db: Database, private readonly table: string) {}

  async put(row: TokenRow): Promise<void> {
    this.#run(() => this.db.query(`INSERT INTO ${this.table} (${columns}) VALUES (?, ?, ?, ?, ?, ?)
      ON CONFLICT (client_id, token_type) DO UPDATE SET token = excluded.token, nonce = excluded.nonce,
      key_version = excluded.key_version, updated_at = excluded.updated_at`).run(...toParams(row)));
  }

  async get(clientId: string, tokenType: string): Promise<TokenRow | undefined> {
    const raw = this.#run(() => this.db.query(`SELECT ${columns} FROM ${this.table} WHERE client_id = ? AND token_type = ?`).get(clientId, tokenType) as Raw | null);
    return raw ? fromRaw(raw) : undefined;
  }

  async all(): Promise<TokenRow[]> {
    return this.#run(() => (this.db.query(`SELECT ${columns} FROM ${this.table} ORDER BY client_id, token_type`).all() as Raw[]).map(fromRaw));
  }

  async ping(): Promise<void> {
    this.#run(() => this.db.query("SELECT 1").get());
  }

  async close(): Promise<void> {
    this.db.close();
  }

  #run<T>(fn: () => T): T {
    try {
      return fn();
    } catch (error) {
      throw unavailable(error);
    }
  }
}

class MysqlTokenStore implements TokenStore {
  readonly kind = "mysql" as const;
  constructor(private readonly pool: mysql.Pool, private readonly table: string) {}

  async put(row: TokenRow): Promise<void> {
    await this.#rows(`INSERT INTO ${this.table} (${columns}) VALUES (?, ?, ?, ?, ?, ?)
      ON DUPLICATE KEY UPDATE token = VALUES(token), nonce = VALUES(nonce), key_version = VALUES(key_version), updated_at = VALUES(updated_at)`, toParams(row));
  }

  async get(clientId: string, tokenType: string): Promise<TokenRow | undefined> {
    const [raw] = await this.#rows<Raw>(`SELECT ${columns} FROM ${this.table} WHERE client_id = ? AND token_type = ?`, [clientId, tokenType]);
    return raw ? fromRaw(raw) : undefined;
  }

  async all(): Promise<TokenRow[]> {
    return (await this.#rows<Raw>(`SELECT ${columns} FROM ${this.table} ORDER BY client_id, token_type`)).map(fromRaw);
  }

  async ping(): Promise<void> {
    await this.#rows("SELECT 1");
  }

  async close(): Promise<void> {
    await this.pool.end();
  }

  async #rows<T>(sql: string, params: (string | number)[] = []): Promise<T[]> {
    try {
      const [rows] = await this.pool.execute(sql, params);
      return rows as T[];
    } catch (error) {
      throw unavailable(error);
    }
  }
}

const SCHEMA = (table: string, text: string) => `CREATE TABLE IF NOT EXISTS ${table} (
  client_id VARCHAR(128) NOT NULL,
  token_type VARCHAR(64) NOT NULL,
  token ${text} NOT NULL,
  nonce VARCHAR(24) NOT NULL,
  key_version INT NOT NULL,
  updated_at BIGINT NOT NULL,
  PRIMARY KEY (client_id, token_type)
)`;

/** Opens `mysql://…` or a sqlite path, creating the `storage` table if missing. */
export async function openTokenStore(url: string, options: { table?: string } = {}): Promise<TokenStore> {
  const table = checkTableName(options.table ?? "storage");
  if (url.startsWith("mysql://")) {
    const pool = mysql.createPool({ uri: url, connectionLimit: 4, connectTimeout: 2000 });
    try {
      await pool.query(SCHEMA(table, "TEXT") + " ENGINE=InnoDB");
    } catch (error) {
      await pool.end().catch(() => {});
      throw new Unavailable(`cannot open MySQL token store: ${(error as { code?: string }).code ?? (error as Error).message}`, { cause: error });
    }
    return new MysqlTokenStore(pool, table);
  }
  const path = url.replace(/^sqlite:(\/\/)?/, "");
  try {
    mkdirSync(dirname(path), { recursive: true });
    const db = new Database(path, { create: true, strict: true });
    db.exec("PRAGMA busy_timeout = 5000");
    db.exec("PRAGMA journal_mode = WAL");
    db.exec(SCHEMA(table, "TEXT"));
    return new SqliteTokenStore(db, table);
  } catch (error) {
    throw new Unavailable(`cannot open sqlite token store at ${path}: ${(error as Error).message}`, { cause: error });
  }
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
