// Issue 23, "no command can lose data", as real processes on Bun and on Deno: a server holding 30,000 records under
// key OLD, a client writing through it, and `./pki.sh fernet add`, `promote`, then `retire --key OLD --force` at once
// (the server has only begun re-encrypting them). The server keeps OLD for its records, moves
// every one to NEW with its timestamp, and only then drops OLD; every record reads through get_cached_data by a client
// holding NEW alone. Before, the retire made every record under OLD "(unreadable: encrypted under a retired key)".
// Then the same server killed half-way through: restarted, it takes OLD up again from its state folder (the key was
// in memory only before, so a restart lost every record still under it); restarted on a new host, the CA host's
// archive gives OLD back (`./pki.sh fernet restore`).
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { randomUUID } from "node:crypto";
import { existsSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createLogger } from "../shared/ops/log.ts";
import { REPO_ROOT } from "../shared/platform/config.ts";
import { fernetKeyFingerprint, fernetKeysInOrder, parseFernetKeyFile } from "../shared/platform/fernet-key-file.ts";
import { loadIdentity } from "../shared/platform/tls.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { FernetKeys } from "../shared/request-path/fernet-reload.ts";
import { PROMOTE_AFTER_ADD_MS } from "../shared/request-path/fernet-keys.ts";
import { MeshClient } from "../shared/request-path/mesh-client.ts";
import { payloadDigest } from "../shared/request-path/proof.ts";
import { openStore } from "../shared/request-path/store.ts";
import { newPki, runLoad, temporaryCluster, waitFor, type Cluster } from "../harness/fixtures/index.ts";
import { testedRuntimes } from "../shared/testing/unit-run.ts";

setDefaultTimeout(180_000); // Deno starts slowly on a shared two-core machine, and the walk is paced

const SEEDED = 30_000;
/** The seeded records' timestamps: two days before the test, one second apart. */
const SEEDED_AT = Math.floor(Date.now() / 1000) - 2 * 86_400;

const temporary: string[] = [];
afterAll(() => temporary.forEach((dir) => rmSync(dir, { recursive: true, force: true })));

/** `./pki.sh fernet ARGS` on the PKI, as an operator runs it on the CA host. */
async function pkiFernet(pki: string, ...args: string[]): Promise<{ code: number; out: string; err: string }> {
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh"), "fernet", ...args], {
    env: { ...process.env, PKI_DIR: pki },
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { code, out: out.trim(), err: err.trim() };
}

/** The records a server wrote under `key` before the rotation, as clients sent them, stamped two days ago. */
async function seedUnder(key: string, db: string): Promise<void> {
  const seeding = await openStore(db);
  const under = new Fernet(key);
  for (let start = 0; start < SEEDED; start += 2000) {
    await seeding.insertMany(
      Array.from({ length: 2000 }, (_, j) => {
        const token = under.encrypt(`seeded ${start + j}`, { now: SEEDED_AT + start + j });
        return { sender: "client2", token, jti: randomUUID(), digest: payloadDigest(token), server: 0 };
      }),
    );
  }
  await seeding.close();
}

/** A policy in `pki` where client2 may read its own records only: its view is the newest of the seeded records. */
function ownViewPolicy(pki: string): string {
  const policy = JSON.parse(readFileSync(join(REPO_ROOT, "roles", "policy.json"), "utf8"));
  for (const rule of policy.rules)
    if (rule.identity.endsWith("/client2")) rule.allow = rule.allow.map((a: string) => (a === "view.read:all" ? "view.read:own" : a));
  writeFileSync(join(pki, "policy.json"), JSON.stringify(policy));
  return join(pki, "policy.json");
}

for (const runtime of testedRuntimes()) {
  describe(`a Fernet rotation on a server on ${runtime} with records under the old key`, () => {
    test("add, promote, retire --force at once: OLD kept, every record moved to NEW with its timestamp, then OLD dropped; every record reads under NEW alone", async () => {
      const pki = await newPki(`rewrap-${runtime}`);
      temporary.push(pki);
      // client2 may read its own records only: its view is the newest of the seeded records, all made under OLD.
      await using cluster = await temporaryCluster({ label: `fernet-rewrap-${runtime}`, pki, runtime, env: { SECUREMESH_POLICY: ownViewPolicy(pki) } });
      const keyFile = () => fernetKeysInOrder(parseFernetKeyFile(readFileSync(join(pki, "encryption_key.txt"), "utf8"), "key file"));
      const [OLD] = keyFile();
      const fpOld = fernetKeyFingerprint(OLD!);

      const db = join(cluster.logDir, "records.db");
      await seedUnder(OLD!, db);
      const underOld = new Fernet(OLD!);

      const server = await cluster.startServer("server", 0, ["--db", db]);
      const serverLines = () => cluster.role("server").lines;
      const health = async () => (await cluster.health(server))?.body.fernet_rewrap as Record<string, unknown> | undefined;
      // With one key there is nothing to move: pending 0 from the start, while a slow census counts what it cannot read.
      expect(await health()).toEqual({ state: "counting", pending: 0, by_key: {}, rewrapped: 0, unreadable: null, kept: [] });

      // Clients that follow the key file, as applications do, talking to the server directly over the coordinator's
      // certificate (the identity it lets forward). Their reload lines are kept.
      const clientLines: string[] = [];
      const client = (name: string) =>
        new MeshClient({
          identity: loadIdentity(pki, name),
          coordinators: [server],
          tlsIdentity: loadIdentity(pki, "coordinator"),
          expect: "spiffe://securemesh/server/*",
          fernet: FernetKeys.open(pki).watch(createLogger(name, { write: (l) => clientLines.push(`${name}: ${l}`), color: false, format: "text" })),
        });
      const [writer, reader] = [client("client1"), client("client2")];
      const acks: number[] = [];
      let stopping = false;
      // One writer, each write sent once the last is answered: the pace is the server's own (harness/fixtures/load.ts).
      const writing = runLoad({
        concurrency: 1,
        until: () => stopping,
        label: "writes during the rotation",
        request: async (_, i) => {
          const { status, body } = await writer.sendData(`written during the rotation ${i}`);
          if (status !== 200) return `${status} ${JSON.stringify(body)}`;
          acks.push(Number(body.id));
          return true;
        },
      });
      const moreAcks = (count: number, what: string) => {
        const from = acks.length;
        return waitFor(`${count} acknowledged writes ${what}`, () => acks.length - from >= count, 30_000);
      };
      const everyoneLogged = (pattern: RegExp) =>
        waitFor(
          `the server and both clients to log ${pattern}`,
          () =>
            serverLines().some((l) => pattern.test(l)) &&
            ["client1", "client2"].every((c) => clientLines.some((l) => l.startsWith(`${c}: `) && pattern.test(l))),
          15_000,
        );

      let oldDropped: string;
      let storeAtDrop: { id: number; token: string }[];
      try {
        await moreAcks(5, "before the add");
        expect((await pkiFernet(pki, "add")).code).toBe(0);
        const addedAt = performance.now();
        const [, NEW] = keyFile();
        const fpNew = fernetKeyFingerprint(NEW!);
        await everyoneLogged(new RegExp(`Fernet keys reloaded: 2 keys, primary ${fpOld}, decrypt-only ${fpNew} \\(added ${fpNew}\\)$`));
        await waitFor("the promote's minimum time after the add", () => performance.now() - addedAt >= PROMOTE_AFTER_ADD_MS, PROMOTE_AFTER_ADD_MS + 1000);
        expect((await pkiFernet(pki, "promote")).code).toBe(0);
        await everyoneLogged(new RegExp(`Fernet keys reloaded: 2 keys, primary ${fpNew}, decrypt-only ${fpOld} \\(primary was ${fpOld}\\)$`));
        // A write under OLD sent before the writer's reload has been answered: no request under OLD is in flight.
        await moreAcks(2, "after the writer took up the promote");

        // Retire OLD at once, as for a key thought exposed: the server has counted its records under OLD and begun
        // moving them, at 5,000 a second at most, so most are still under OLD.
        await cluster
          .role("server")
          .waitForLine(new RegExp(`^Fernet re-encryption: \\d+ records under ${fpOld}; moving them to the primary ${fpNew} `), 60_000);
        const retire = await pkiFernet(pki, "retire", "--key", fpOld, "--force");
        expect(retire).toMatchObject({
          code: 0,
          out: expect.stringContaining(`A server whose stored records are still under ${fpOld} keeps that key in memory and in its --state-dir`),
        });
        const kept = await cluster.role("server").waitForLine(new RegExp(`^Fernet key ${fpOld} is no longer in `), 15_000);
        expect(kept).toMatch(
          new RegExp(
            `^Fernet key ${fpOld} is no longer in .*encryption_key\\.txt, but \\d+ stored records still use it: kept \\(in memory and in its state folder\\) to read them \\(never for a new request\\) while they are re-encrypted to ${fpNew}; it is dropped once none do \\(/health fernet_rewrap\\)$`,
          ),
        );
        expect(serverLines()).toContain(`Fernet keys reloaded: 1 key, primary ${fpNew} (kept ${fpOld} for stored records)`);
        const during = await health();
        // (pending read first: Bun 1.4.5's toMatchObject writes an asymmetric matcher into the object it checks)
        expect({ kept: during?.kept, state: during?.state, pendingAboveZero: Number(during?.pending) > 0 }).toEqual({
          kept: [fpOld],
          state: "re-encrypting",
          pendingAboveZero: true,
        });
        // Meanwhile the records under OLD read: the newest seeded ones are the last the walk reaches.
        const own = await reader.readCachedData(true);
        expect({ total: own.snapshot.total, unreadable: own.snapshot.latest.filter((r) => !r.text.startsWith("seeded ")).map((r) => r.text) }).toEqual({
          total: SEEDED,
          unreadable: [],
        });

        oldDropped = await cluster.role("server").waitForLine(new RegExp(`^Fernet key ${fpOld} dropped: `), 120_000);
        const raw = new (await import("bun:sqlite")).Database(db, { readonly: true });
        storeAtDrop = raw.query<{ id: number; token: string }, []>("SELECT id, token FROM records ORDER BY id").all();
        raw.close();
        await moreAcks(5, "after OLD was dropped");
      } finally {
        stopping = true;
        await writing;
      }
      const written = await writing;

      const [NEW] = keyFile();
      const fpNew = fernetKeyFingerprint(NEW!);
      const underNew = new Fernet(NEW!);
      // Dropped only after re-encrypting: when the line came, no record was under OLD, and each seeded one kept its stamp.
      const opens = (key: Fernet, token: string) => key.keyIndex(token) === 0;
      expect({
        records: storeAtDrop!.length >= SEEDED,
        underOld: storeAtDrop!.filter((r) => opens(underOld, r.token)).length,
        underNew: storeAtDrop!.every((r) => opens(underNew, r.token)),
      }).toEqual({ records: true, underOld: 0, underNew: true });
      const stamp = (token: string) => Number(Buffer.from(token, "base64url").readBigUInt64BE(1));
      expect(storeAtDrop!.slice(0, SEEDED).every((r, i) => stamp(r.token) === SEEDED_AT + i && underNew.decryptText(r.token) === `seeded ${i}`)).toBe(true);
      const lines = serverLines();
      const movedLine = lines.find((l) => /^Fernet re-encryption: moved \d+ records to the primary /.test(l));
      expect(oldDropped!).toMatch(
        new RegExp(
          `^Fernet key ${fpOld} dropped: no stored record uses it any more \\(\\d+ records moved off it by this server, to ${fpNew}\\); 1 key, primary ${fpNew}$`,
        ),
      );
      expect(lines.findIndex((l) => l.startsWith(`Fernet key ${fpOld} is no longer in`))).toBeLessThan(lines.indexOf(movedLine!));
      expect(lines.indexOf(movedLine!)).toBeLessThan(lines.indexOf(oldDropped!));

      // Every record reads through get_cached_data, by clients that hold NEW alone (the file's only key now).
      expect(keyFile()).toEqual([NEW!]);
      const own = await reader.readCachedData(true);
      expect({ total: own.snapshot.total, texts: own.snapshot.latest.map((r) => r.text) }).toEqual({
        total: SEEDED,
        texts: Array.from({ length: 20 }, (_, i) => `seeded ${SEEDED - 1 - i}`),
      });
      const all = await writer.readCachedData(true);
      expect({ total: all.snapshot.total, unreadable: all.snapshot.latest.filter((r) => !r.text.startsWith("written during the rotation ")).length }).toEqual({
        total: SEEDED + acks.length,
        unreadable: 0,
      });
      expect({ failures: written.errorSamples.slice(0, 3), failed: written.errors }).toEqual({ failures: [], failed: 0 });
      const after = await health();
      expect(after).toMatchObject({ state: "idle", pending: 0, kept: [], unreadable: 0 });
      expect(after!.rewrapped as number).toBeGreaterThanOrEqual(SEEDED);
      [writer, reader].forEach((c) => c.close());
      console.log(`${runtime}: ${movedLine} (${after!.rewrapped} in all, ${acks.length} writes during the rotation, 0 failed)`);
    });
  });
}

/**
 * A server with SEEDED records under OLD, and the rotation on the CA host as fast as the command allows: add, promote
 * --force, then retire --key OLD --force once the server has begun moving records (5,000 a second at most), so most
 * are still under OLD; then the server is killed mid-way. Returns what the test needs to go on.
 */
async function retireThenKill(cluster: Cluster, pki: string) {
  const keyFile = () => fernetKeysInOrder(parseFernetKeyFile(readFileSync(join(pki, "encryption_key.txt"), "utf8"), "key file"));
  const [OLD] = keyFile();
  const fpOld = fernetKeyFingerprint(OLD!);
  const db = join(cluster.logDir, "records.db");
  await seedUnder(OLD!, db);
  const first = await cluster.startServer("server", 0, ["--db", db]);
  expect((await pkiFernet(pki, "add")).code).toBe(0);
  const [, NEW] = keyFile();
  const fpNew = fernetKeyFingerprint(NEW!);
  await cluster.role("server").waitForLine(new RegExp(`^Fernet keys reloaded: .*\\(added ${fpNew}\\)$`));
  expect((await pkiFernet(pki, "promote", "--force")).code).toBe(0);
  await cluster.role("server").waitForLine(new RegExp(`^Fernet re-encryption: \\d+ records under ${fpOld}; moving them to the primary ${fpNew} `), 60_000);
  const retire = await pkiFernet(pki, "retire", "--key", fpOld, "--force");
  expect(retire).toMatchObject({ code: 0, out: expect.stringContaining(`./pki.sh fernet restore ${fpOld} puts the key back`) });
  await cluster.role("server").waitForLine(new RegExp(`^Fernet key ${fpOld} is no longer in `), 15_000);
  expect(await cluster.health(first).then((h) => (h?.body.fernet_rewrap as { kept: string[] } | undefined)?.kept)).toEqual([fpOld]);
  await cluster.kill("server");
  return { db, NEW: NEW!, fpOld, fpNew };
}

/** Every record in `db` opens under `key` alone. */
async function allUnder(db: string, key: string): Promise<{ records: number; underKeyAlone: number }> {
  const raw = new (await import("bun:sqlite")).Database(db, { readonly: true });
  const tokens = raw.query<{ token: string }, []>("SELECT token FROM records ORDER BY id").all();
  raw.close();
  const under = new Fernet(key);
  return { records: tokens.length, underKeyAlone: tokens.filter((r) => under.keyIndex(r.token) === 0).length };
}

const newestSeeded = Array.from({ length: 20 }, (_, i) => `seeded ${SEEDED - 1 - i}`);

describe("a server killed mid re-encryption, after OLD was retired", () => {
  test("restarted, it takes OLD up again from its state folder: every record reads at once and moves to NEW, then OLD and its file go", async () => {
    const pki = await newPki("rewrap-restart");
    temporary.push(pki);
    await using cluster = await temporaryCluster({ label: "fernet-rewrap-restart", pki, env: { SECUREMESH_POLICY: ownViewPolicy(pki) } });
    const { db, NEW, fpOld } = await retireThenKill(cluster, pki);
    const kept = join(cluster.logDir, "state", "fernet-kept", `${fpOld}.key`);
    expect(statSync(kept).mode & 0o777).toBe(0o600);

    const server = await cluster.startServer("server-restarted", 0, ["--db", db]);
    expect(cluster.role("server-restarted").lines).toContainEqual(
      expect.stringMatching(new RegExp(`^Fernet key ${fpOld} is not in .*, but was kept for stored records before this restart `)),
    );
    const reader = cluster.client("client2", [server], { direct: true });
    try {
      const own = await reader.readCachedData(true);
      expect({ total: own.snapshot.total, texts: own.snapshot.latest.map((r) => r.text) }).toEqual({ total: SEEDED, texts: newestSeeded });
      await cluster.role("server-restarted").waitForLine(new RegExp(`^Fernet key ${fpOld} dropped: no stored record uses it any more `), 120_000);
      expect({ ...(await allUnder(db, NEW)), keptFile: existsSync(kept) }).toEqual({ records: SEEDED, underKeyAlone: SEEDED, keptFile: false });
      expect((await cluster.health(server))?.body.fernet_rewrap).toMatchObject({ pending: 0, unreadable: 0, kept: [] });
    } finally {
      reader.close();
    }
  });

  test("restarted without its state folder (a new host), OLD's records read as unreadable, not lost: restore OLD from the archive, and every record reads and moves to NEW", async () => {
    const pki = await newPki("rewrap-restore");
    temporary.push(pki);
    await using cluster = await temporaryCluster({ label: "fernet-rewrap-restore", pki, env: { SECUREMESH_POLICY: ownViewPolicy(pki) } });
    const { db, NEW, fpOld, fpNew } = await retireThenKill(cluster, pki);
    const server = await cluster.startServer("server-restarted", 0, ["--db", db, "--state-dir", join(cluster.logDir, "new-host-state")]);
    const reader = cluster.client("client2", [server], { direct: true });
    try {
      const before = await reader.readCachedData(true);
      const unreadable = before.snapshot.latest.filter((r) => !r.text.startsWith("seeded ")).length;
      expect({ total: before.snapshot.total, unreadable }).toEqual({ total: SEEDED, unreadable: before.snapshot.latest.length });

      // restore OLD: the archive kept it; the server takes it up live, reads every record, and moves them to NEW.
      const restore = await pkiFernet(pki, "restore", fpOld);
      expect(restore).toMatchObject({ code: 0, out: expect.stringContaining(`restored key ${fpOld} from `) });
      await cluster
        .role("server-restarted")
        .waitForLine(new RegExp(`^Fernet keys reloaded: 2 keys, primary ${fpNew}, decrypt-only ${fpOld} \\(added ${fpOld}\\)$`));
      const after = await reader.readCachedData(true);
      expect({ total: after.snapshot.total, texts: after.snapshot.latest.map((r) => r.text) }).toEqual({ total: SEEDED, texts: newestSeeded });
      await waitFor(
        "the restarted server to move every record off OLD",
        async () => {
          const rewrap = (await cluster.health(server))?.body.fernet_rewrap as { pending: number | null; unreadable: number | null } | undefined;
          return rewrap?.pending === 0 && rewrap.unreadable === 0;
        },
        120_000,
      );

      // Now OLD goes for good, by name (--force again: it stopped encrypting less than TTL + skew ago): no record is
      // under it, so the server drops it at once, and every record reads under NEW alone.
      expect((await pkiFernet(pki, "retire", "--key", fpOld, "--force")).code).toBe(0);
      await cluster.role("server-restarted").waitForLine(new RegExp(`^Fernet keys reloaded: 1 key, primary ${fpNew} \\(dropped ${fpOld}\\)$`));
      expect(await allUnder(db, NEW)).toEqual({ records: SEEDED, underKeyAlone: SEEDED });
    } finally {
      reader.close();
    }
  });
});
