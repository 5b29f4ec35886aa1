// The MariaDB the tests use ($TEST_MYSQL_URL, else the local one CI starts), and stand-ins for a database node that
// fails in the ways a cluster's nodes do: one that never answers, one whose connection dies right after COMMIT.
import net from "node:net";
import { TcpRelay } from "./tcp-relay.ts";

export const TEST_MYSQL_URL = process.env.TEST_MYSQL_URL ?? "mysql://root@127.0.0.1:3306/test";

/** A table name no other test run uses, so runs can share the database. */
export function uniqueTable(prefix: string): string {
  return `${prefix}_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
}

/**
 * A database of its own on the test server, dropped when disposed: for a KeyServer's token store, whose keyring is
 * bound to it (issue 23), so a shared `test.storage` left by another run is never found holding tokens of a lost keyring.
 */
export async function scratchDatabase(prefix = "securemesh_scratch"): Promise<{ url: string; name: string; on(hostPort: string): string } & AsyncDisposable> {
  const name = `${prefix}_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
  // Loaded here: the other helpers of this file are used where mysql2 is not (its import costs 13 MiB).
  const { default: mysql } = await import("mysql2/promise");
  const conn = await mysql.createConnection(TEST_MYSQL_URL);
  await conn.query(`CREATE DATABASE ${name}`);
  const url = new URL(TEST_MYSQL_URL);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    name,
    /** The same database through another host:port (a relay in front of the server, say). */
    on: (hostPort) => multiHostUrl(url.toString(), [hostPort]),
    async [Symbol.asyncDispose]() {
      await conn.query(`DROP DATABASE IF EXISTS ${name}`);
      await conn.end();
    },
  };
}

/** The host:port of a single-host MySQL URL. */
export function hostPortOf(url: string): { host: string; port: number } {
  const u = new URL(url);
  return { host: u.hostname, port: Number(u.port || 3306) };
}

/** A TCP listener that accepts and never says a word: a frozen or cut-off node, as a client sees it (no RST). */
export class SilentNode implements AsyncDisposable {
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();

  private constructor(server: net.Server) {
    this.#server = server;
  }

  static start(): Promise<SilentNode> {
    let node: SilentNode;
    const server = net.createServer((socket) => {
      node.#sockets.add(socket);
      socket.on("error", () => {});
      socket.on("close", () => node.#sockets.delete(socket));
    });
    node = new SilentNode(server);
    return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(node)));
  }

  get hostPort(): string {
    return `127.0.0.1:${(this.#server.address() as net.AddressInfo).port}`;
  }

  [Symbol.asyncDispose](): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}

/**
 * A relay to a real server that, while armed, passes a client's COMMIT on and then drops that client's connection
 * before the answer comes back: the server commits, the client cannot know (a node dying under a COMMIT). While
 * cut, it refuses connections.
 */
export class LostCommitRelay implements AsyncDisposable {
  /** COMMITs still to lose. */
  armed = 0;
  /** COMMITs lost so far. */
  lost = 0;
  #relay!: TcpRelay;

  static async start(target: { host: string; port: number }): Promise<LostCommitRelay> {
    const lossy = new LostCommitRelay();
    // COM_QUERY (0x03) with the text mysql2 sends for conn.commit().
    const commit = Buffer.from("\x03COMMIT", "latin1");
    lossy.#relay = await TcpRelay.start(target, {
      dropClientAfter: (chunk) => {
        if (lossy.armed === 0 || !chunk.includes(commit)) return false;
        lossy.armed -= 1;
        lossy.lost += 1;
        return true;
      },
    });
    return lossy;
  }

  get hostPort(): string {
    return this.#relay.hostPort;
  }

  cut(): void {
    this.#relay.cut();
  }

  restore(): void {
    this.#relay.restore();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.#relay.close();
  }
}

/** `url` (one host) with its host:port replaced by several: a multi-host URL over stand-ins and the real server. */
export function multiHostUrl(url: string, hostPorts: readonly string[]): string {
  const u = new URL(url);
  const userinfo = u.username ? `${u.username}${u.password ? `:${u.password}` : ""}@` : "";
  return `mysql://${userinfo}${hostPorts.join(",")}${u.pathname}${u.search}`;
}
