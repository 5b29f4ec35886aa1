// Issue 23 part 3, "keys change live": the three-phase Fernet rotation on a real mesh under load. Writers and a reader
// run through the coordinator while fernet-keys.ts adds, promotes and retires a key on the file every host follows;
// no request fails, every acknowledged record is stored and opens under the keys, and no role restarts.
// Server 1 and the coordinator run on Deno, server 2 on Bun (--runtime mixed). Servers take --ttl 5 (FERNET_TTL), so
// retire is safe 65 s after the promote (TTL + 60 s clock skew) rather than 360 s.
// The records written under the retired key stay readable: from the promote on, both servers move them to the new key
// (fernet-rewrap.ts, sharing the store by compare-and-set), so the retire finds none under it and drops it; client2,
// which writes only before the add and may read only its own records, reads them all through both servers after.
import { afterAll, expect, test } from "bun:test";
import { Database } from "bun:sqlite";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createLogger } from "../shared/ops/log.ts";
import { REPO_ROOT } from "../shared/platform/config.ts";
import { fernetKeyFingerprint, fernetKeysInOrder, parseFernetKeyFile } from "../shared/platform/fernet-key-file.ts";
import { loadIdentity } from "../shared/platform/tls.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { FernetKeys } from "../shared/request-path/fernet-reload.ts";
import { PROMOTE_AFTER_ADD_MS, retireSafeAt } from "../shared/request-path/fernet-keys.ts";
import { MeshClient } from "../shared/request-path/mesh-client.ts";
import { newPki, runLoad, startMesh, waitFor } from "./fixtures/index.ts";

const TTL_S = 5;
const temporary: string[] = [];
afterAll(() => temporary.forEach((dir) => rmSync(dir, { recursive: true, force: true })));

/** Runs `bun shared/request-path/fernet-keys.ts ARGS --pki DIR` as pki.sh would: its exit code and output. */
async function fernetKeys(pki: string, ...args: string[]): Promise<{ code: number; out: string; err: string }> {
  await using proc = Bun.spawn([process.execPath, join(REPO_ROOT, "shared/request-path/fernet-keys.ts"), ...args, "--pki", pki, "--ttl", String(TTL_S)], {
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { code, out: out.trim(), err: err.trim() };
}

test("add → promote → retire under load: 0 failed requests, every acknowledged record stored and readable, no restart", async () => {
  const pki = await newPki("fernet-rotation");
  temporary.push(pki);
  // client2 may read its own records only: its view is then the records it wrote, all before the add, under the old key.
  const policy = JSON.parse(readFileSync(join(REPO_ROOT, "roles", "policy.json"), "utf8"));
  for (const rule of policy.rules)
    if (rule.identity.endsWith("/client2")) rule.allow = rule.allow.map((a: string) => (a === "view.read:all" ? "view.read:own" : a));
  writeFileSync(join(pki, "policy.json"), JSON.stringify(policy));
  await using mesh = await startMesh({ pki, runtime: "mixed", env: { FERNET_TTL: String(TTL_S), SECUREMESH_POLICY: join(pki, "policy.json") } });
  const keyFile = () => fernetKeysInOrder(parseFernetKeyFile(readFileSync(join(pki, "encryption_key.txt"), "utf8"), "key file"));
  const [oldKey] = keyFile();

  // Two long-lived clients, each following the key file as an application would; their reload lines are kept.
  const clientLines: string[][] = [];
  const clients = ["client1", "client2"].map((name, i) => {
    const lines: string[] = [];
    clientLines[i] = lines;
    const keys = FernetKeys.open(pki).watch(createLogger(name, { write: (l) => lines.push(l), color: false, format: "text" }));
    return new MeshClient({ identity: loadIdentity(pki, name), fernet: keys, coordinators: [mesh.coordinator] });
  });
  /** Every host (both servers and both clients) has logged a reload line matching `pattern`. */
  const everyHostLogged = (pattern: RegExp) =>
    waitFor(
      `every host to log ${pattern}`,
      () =>
        mesh.servers.every((s) => mesh.cluster.role(s.name).lines.some((l) => pattern.test(l))) &&
        clientLines.every((lines) => lines.some((l) => pattern.test(l))),
      15_000,
    );

  // The load: a writer per client and one reader of the servers' encrypted view, until told to stop, each sending its
  // next request once the last is answered (the harness's load generator: the pace is the mesh's own); client2's
  // writer stops at the add, so what it wrote is all under the old key.
  const acks: number[] = [];
  let reads = 0;
  let stopping = false;
  let added = false;
  const beforeAdd: number[] = [];
  const byClient2: number[] = [];
  const writer = (client: MeshClient, name: string) => async (_: number, i: number) => {
    const { status, body } = await client.sendData(`rotation write ${i} by ${name}`);
    if (status !== 200 || typeof body.id !== "number") return `write ${status} ${JSON.stringify(body)}`;
    acks.push(body.id);
    if (!added) beforeAdd.push(body.id);
    if (name === "client2") byClient2.push(body.id);
    return true;
  };
  const [client1, client2] = clients as [MeshClient, MeshClient];
  const load = Promise.all([
    runLoad({ concurrency: 1, until: () => stopping, request: writer(client1, "client1") }),
    runLoad({ concurrency: 1, until: () => stopping || added, request: writer(client2, "client2") }),
    runLoad({
      concurrency: 1,
      until: () => stopping,
      request: async () => {
        await clients[reads % 2]!.readCachedData(reads % 5 === 0); // now and then past the cache, for a freshly encrypted view
        reads += 1;
        return true;
      },
    }),
  ]);
  const moreAcks = (count: number, what: string) => {
    const from = acks.length;
    return waitFor(`${count} acknowledged writes ${what}`, () => acks.length - from >= count, 30_000);
  };

  try {
    await moreAcks(20, "before the add");

    // 1. add: every host can decrypt the new key before anyone encrypts with it.
    added = true;
    const add = await fernetKeys(pki, "add");
    const addedAt = performance.now();
    const [, newKey] = keyFile();
    const [fpOld, fpNew] = [fernetKeyFingerprint(oldKey!), fernetKeyFingerprint(newKey!)];
    expect(add).toMatchObject({ code: 0, out: expect.stringContaining(`added key ${fpNew} to `) });
    await everyHostLogged(new RegExp(`^Fernet keys reloaded: 2 keys, primary ${fpOld}, decrypt-only ${fpNew} \\(added ${fpNew}\\)$`));
    const health = await Promise.all(mesh.servers.map(async (s) => (await mesh.cluster.health(s.url))?.body.fernet_keys));
    expect(health).toEqual([
      [fpOld, fpNew],
      [fpOld, fpNew],
    ]);
    await moreAcks(20, "after the add");

    // 2. promote, no sooner than the command allows.
    await waitFor("the promote's minimum time after the add", () => performance.now() - addedAt >= PROMOTE_AFTER_ADD_MS, PROMOTE_AFTER_ADD_MS + 1000);
    const promote = await fernetKeys(pki, "promote");
    const promotedAt = new Date();
    expect(promote).toMatchObject({ code: 0, out: expect.stringContaining(`promoted key ${fpNew} to primary`) });
    await everyHostLogged(new RegExp(`^Fernet keys reloaded: 2 keys, primary ${fpNew}, decrypt-only ${fpOld} \\(primary was ${fpOld}\\)$`));
    await moreAcks(20, "after the promote");

    // 3. retire: refused until TTL + skew after the promote, then done.
    const early = await fernetKeys(pki, "retire");
    expect({ code: early.code, err: early.err }).toMatchObject({ code: 1, err: expect.stringContaining(`nothing retired yet: ${fpOld} stopped encrypting`) });
    const safeAt = retireSafeAt(promotedAt, TTL_S).getTime() + 1000;
    await waitFor("retire to be safe (TTL + 60 s after the promote)", () => Date.now() >= safeAt, 90_000);
    // Meanwhile both servers moved every record under the old key to the new one: none is left under it.
    const rewrapBefore = await Promise.all(mesh.servers.map(async (s) => (await mesh.cluster.health(s.url))?.body.fernet_rewrap as Record<string, unknown>));
    expect(rewrapBefore.map((r) => ({ state: r.state, pending: r.pending, by_key: r.by_key, kept: r.kept }))).toEqual(
      mesh.servers.map(() => ({ state: "watching", pending: 0, by_key: { [fpOld]: 0 }, kept: [] })),
    );
    const retire = await fernetKeys(pki, "retire");
    expect(retire).toMatchObject({ code: 0, out: expect.stringContaining(`retired key ${fpOld} from `) });
    // No record uses it, so every server drops it at once, as every client does.
    await everyHostLogged(new RegExp(`^Fernet keys reloaded: 1 key, primary ${fpNew} \\(dropped ${fpOld}\\)$`));
    await moreAcks(20, "after the retire");
    // What client2 wrote, all under the old key, reads through both servers now: they hold the new key alone.
    const ownSeen = new Map<number, string[]>();
    await waitFor(
      "client2's own view from both servers",
      async () => {
        const answer = await client2.readCachedData(true);
        ownSeen.set(
          answer.server,
          answer.snapshot.latest.map((r) => r.text),
        );
        return ownSeen.size === mesh.servers.length;
      },
      15_000,
    );
    const shown = Math.min(20, byClient2.length);
    for (const [server, texts] of ownSeen) {
      expect({ server, read: texts.length, all: texts.every((t) => /^rotation write \d+ by client2$/.test(t)) }).toEqual({ server, read: shown, all: true });
    }
    // The one-shot client role reads the file as it is now: only the new key, which every server holds alone.
    const oneShot = await mesh.cluster.runClient("client-role", ["--coordinator", mesh.coordinator, "--no-cache-check", "--message", "after the retire"]);
    expect({ exitCode: oneShot.exitCode, success: oneShot.lines.some((l) => l.startsWith("[client1] Success: ")) }).toEqual({ exitCode: 0, success: true });
  } finally {
    stopping = true;
    await load;
    clients.forEach((c) => c.close());
  }
  const runs = await load;
  const failed = runs.reduce((sum, r) => sum + r.errors, 0);

  // Nothing failed, and no role restarted (each started once, and is still up).
  expect({ failures: runs.flatMap((r) => r.errorSamples).slice(0, 3), failed }).toEqual({ failures: [], failed: 0 });
  expect(reads).toBeGreaterThan(10);
  for (const s of mesh.servers) expect((await mesh.cluster.health(s.url))?.status).toBe(200);

  // Every acknowledged record is in the store once, and opens under the new key alone: those written under the
  // retired one were moved to it, each exactly once between the two servers.
  const [newKey] = keyFile();
  const db = new Database(mesh.db, { readonly: true });
  const rows = db.query<{ id: number; token: string }, []>(`SELECT id, token FROM records WHERE id IN (${acks.join(",")})`).all();
  db.close();
  const underNew = new Fernet(newKey!);
  const onlyNew = rows.filter((r) => {
    try {
      return underNew.decryptText(r.token).startsWith("rotation write ");
    } catch {
      return false;
    }
  });
  expect({ acknowledged: acks.length, distinct: new Set(acks).size, stored: rows.length, openUnderNewAlone: onlyNew.length }).toEqual({
    acknowledged: acks.length,
    distinct: acks.length,
    stored: acks.length,
    openUnderNewAlone: acks.length,
  });
  const rewrap = await Promise.all(
    mesh.servers.map(async (s) => (await mesh.cluster.health(s.url))?.body.fernet_rewrap as { rewrapped: number; pending: number; kept: string[] }),
  );
  const moved = rewrap.reduce((sum, r) => sum + r.rewrapped, 0);
  // Written under both keys (the rotation happened under this load): at least everything acknowledged before the add
  // was under the old key, and was moved; nothing was moved twice.
  expect({
    movedAtLeastBeforeAdd: moved >= beforeAdd.length,
    movedAtMostAll: moved <= acks.length,
    beforeAdd: beforeAdd.length > 0,
    pending: rewrap.map((r) => r.pending),
    kept: rewrap.map((r) => r.kept),
  }).toEqual({ movedAtLeastBeforeAdd: true, movedAtMostAll: true, beforeAdd: true, pending: [0, 0], kept: [[], []] });
  console.log(
    `rotation under load: ${acks.length} writes acknowledged and stored, ${moved} moved to the new key by the servers (${rewrap.map((r) => r.rewrapped).join(" + ")}), ${reads} reads, ${failed} failed`,
  );
}, 240_000);
