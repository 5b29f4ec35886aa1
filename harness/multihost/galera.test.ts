// A 3-node Galera cluster on loopback: replication, a node killed and restarted, and a minority that refuses writes.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import mysql from "mysql2/promise";
import { GaleraCluster } from "./galera.ts";

setDefaultTimeout(180_000);

let galera: GaleraCluster;
beforeAll(async () => {
  galera = await GaleraCluster.start();
}, 180_000);
afterAll(async () => {
  await galera?.[Symbol.asyncDispose]();
});

/**
 * Runs one statement over TCP as the scenario's roles connect: root@'%' with no password. Reads are causal: a commit
 * through one node is certified everywhere before it returns, but another node may still be applying it.
 */
async function sql<T = unknown>(name: string, statement: string, params: unknown[] = []): Promise<T[]> {
  const conn = await mysql.createConnection({ uri: galera.node(name).url, connectTimeout: 2000 });
  try {
    await conn.query("SET SESSION wsrep_sync_wait = 1");
    return (await conn.query(statement, params))[0] as T[];
  } finally {
    await conn.end();
  }
}

const sizes = async () => Promise.all(galera.nodes.filter((n) => n.running).map(async (n) => (await galera.status(n.name))?.clusterSize));

describe("Galera on loopback", () => {
  test("three nodes, each on its own address, Synced in one Primary component", async () => {
    expect(new Set(galera.nodes.map((n) => n.address)).size).toBe(3);
    for (const node of galera.nodes) {
      expect(await galera.status(node.name)).toEqual({ clusterSize: 3, clusterStatus: "Primary", state: "Synced", ready: true });
    }
  });

  test("a row written on node 1 is read on node 3", async () => {
    await sql("db1", "CREATE TABLE IF NOT EXISTS t (id INT PRIMARY KEY, v VARCHAR(20))");
    await sql("db1", "INSERT INTO t VALUES (1, 'from db1')");
    expect(await sql("db3", "SELECT id, v FROM t")).toEqual([{ id: 1, v: "from db1" }]);
  });

  test("node 2 killed: size 2 and writes go on; restarted: it rejoins, size 3, and has the rows it missed", async () => {
    await galera.kill("db2");
    expect(galera.node("db2").running).toBe(false);
    await galera.waitUntil("db1", (s) => s.clusterSize === 2);
    await sql("db1", "INSERT INTO t VALUES (2, 'while db2 was down')");
    expect(await sql("db3", "SELECT COUNT(*) AS n FROM t")).toEqual([{ n: 2 }]);

    expect(await galera.restart("db2")).toBe("IST"); // its position recovered from InnoDB: only the missed writes
    await galera.waitSynced();
    expect(await sizes()).toEqual([3, 3, 3]);
    expect(await sql("db2", "SELECT v FROM t WHERE id = 2")).toEqual([{ v: "while db2 was down" }]);
  });

  test("node 3 cut off as a minority: non-Primary, refuses writes; the majority writes on; healed, it catches up", async () => {
    await galera.setIsolated("db3", true);
    await galera.waitUntil("db3", (s) => s.clusterStatus === "non-Primary", 30_000);
    expect((await galera.status("db3"))?.ready).toBe(false);
    const refused = await sql("db3", "INSERT INTO t VALUES (3, 'minority')").then(
      () => undefined,
      (e: { errno?: number }) => e.errno,
    );
    expect(refused).toBe(1047); // ER_UNKNOWN_COM_ERROR: "WSREP has not yet prepared node for application use"
    await galera.waitUntil("db1", (s) => s.clusterSize === 2 && s.clusterStatus === "Primary", 30_000);
    await sql("db1", "INSERT INTO t VALUES (4, 'majority')");

    await galera.setIsolated("db3", false);
    await galera.waitSynced();
    expect(await sql("db3", "SELECT id FROM t ORDER BY id")).toEqual([{ id: 1 }, { id: 2 }, { id: 4 }]);
  });
});
