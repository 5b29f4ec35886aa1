// The bench's store-size cases (#13 Part 1): stores of 1k, 100k and 1M records filled through the store itself, on
// sqlite and on MariaDB, and an uncached get_data() read through a real server timed at each size. Also the server's
// memory after serving the largest store, against the same server idle (#13 Part 6).
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import mysql from "mysql2/promise";
import { loadFernetKeys } from "../shared/platform/config.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { payloadDigest } from "../shared/request-path/proof.ts";
import { openStore, type NewRecord } from "../shared/request-path/store.ts";
import type { Cluster } from "./cluster.ts";
import { Latencies, rssMiB } from "./fixtures/index.ts";
import type { Progress } from "./progress.ts";

export type StoreKind = "sqlite" | "MariaDB";

export interface StoreSizePoint {
  db: StoreKind;
  records: number;
  p50: number;
  p99: number;
  reads: number;
  /** Seconds it took to fill the store up to this size from the size before. */
  fillS: number;
}

export interface ServerMemory {
  db: StoreKind;
  records: number;
  idleMiB: number;
  afterMiB: number;
}

export interface StoreSizeReport {
  points: StoreSizePoint[];
  memory: ServerMemory[];
}

export interface StoreSizeOptions {
  cluster: Cluster;
  progress: Progress;
  /** Ascending, e.g. 1,000, 100,000, 1,000,000. */
  sizes: readonly number[];
  readsPerSize: number;
  /** One uncached get_data() read straight to `server`; true, or why it failed. */
  readUncached: (server: string) => Promise<true | string>;
  /** A MariaDB account that may create the bench's database, or null to measure sqlite alone. */
  mysqlUrl: string | null;
}

/** The bench's own MariaDB database beside the tests' (`test`) on the same account, its tables dropped before each run. */
export function benchMysqlUrl(mysqlUrl: string): string {
  const url = new URL(mysqlUrl);
  url.pathname = "/securemesh_bench";
  return url.toString();
}

const FILL_BATCH = 10_000;
const WARMUP_READS = 20;

export async function measureStoreSizes(options: StoreSizeOptions): Promise<StoreSizeReport> {
  const report: StoreSizeReport = { points: [], memory: [] };
  const locations: [StoreKind, string][] = [["sqlite", join(options.cluster.logDir, "bench-store.db")]];
  if (options.mysqlUrl !== null) {
    await resetBenchDatabase(options.mysqlUrl);
    locations.push(["MariaDB", benchMysqlUrl(options.mysqlUrl)]);
  }
  for (const [db, location] of locations) {
    const store = await openStore(location);
    const server = `store-${db.toLowerCase()}`;
    try {
      const fill = recordMaker(options.cluster.pki);
      let filled = 0;
      let url: string | null = null;
      let idleMiB = 0;
      for (const size of options.sizes) {
        const started = performance.now();
        options.progress.line(`bench: filling the ${db} store to ${size.toLocaleString("en")} records through the store`);
        while (filled < size) {
          const batch = Math.min(FILL_BATCH, size - filled);
          await store.insertMany(Array.from({ length: batch }, fill));
          filled += batch;
        }
        const fillS = (performance.now() - started) / 1000;
        if (!url) {
          url = await options.cluster.startServer(server, 0, ["--db", location]);
          idleMiB = rssMiB(options.cluster.role(server).proc.pid) ?? 0;
        }
        // Unmeasured first reads, so the first size does not pay the new server's and the store's warm-up alone.
        for (let i = 0; i < WARMUP_READS; i++) await options.readUncached(url);
        const latencies = new Latencies();
        for (let i = 0; i < options.readsPerSize; i++) {
          const begun = performance.now();
          const outcome = await options.readUncached(url);
          if (outcome !== true) throw new Error(`uncached read from the ${db} store at ${size} records failed: ${outcome}`);
          latencies.add(performance.now() - begun);
        }
        const { p50, p99 } = latencies.summary();
        report.points.push({ db, records: size, p50, p99, reads: options.readsPerSize, fillS });
        options.progress.line(
          `  ${db} at ${size.toLocaleString("en")} records: uncached p50 ${p50.toFixed(2)} ms, p99 ${p99.toFixed(2)} ms (filled in ${fillS.toFixed(1)} s)`,
        );
      }
      report.memory.push({ db, records: filled, idleMiB, afterMiB: rssMiB(options.cluster.role(server).proc.pid) ?? 0 });
    } finally {
      await store.close();
      await options.cluster.stop([server]);
    }
  }
  return report;
}

/** Records as clients send them: a few dozen real Fernet tokens (decrypting is part of a read), each jti new. */
function recordMaker(pki: string): () => NewRecord {
  const fernet = new Fernet(loadFernetKeys(pki));
  const tokens = Array.from({ length: 64 }, (_, i) => fernet.encrypt(`bench record ${i}`));
  let n = 0;
  return () => {
    const token = tokens[n % tokens.length]!;
    n += 1;
    return { sender: n % 2 ? "client1" : "client2", token, jti: randomUUID(), digest: payloadDigest(token), server: 0 };
  };
}

async function resetBenchDatabase(mysqlUrl: string): Promise<void> {
  const conn = await mysql.createConnection(mysqlUrl);
  try {
    await conn.query("CREATE DATABASE IF NOT EXISTS securemesh_bench");
    await conn.query(
      "DROP TABLE IF EXISTS securemesh_bench.records, securemesh_bench.records_generation, securemesh_bench.records_used_proofs, securemesh_bench.records_senders, securemesh_bench.records_meta",
    );
  } finally {
    await conn.end();
  }
}
