// Runs the sqlite record store and token store through their paces on whichever runtime runs this file; prints OK.
// Usage: bun shared/db/runtime-check.ts | deno run -A shared/db/runtime-check.ts (runtime.test.ts runs both).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { IdempotencyConflict, ProofRejected } from "../platform/errors.ts";
import { openStore } from "../request-path/store.ts";
import { openTokenStore } from "../token-path/token-store.ts";
import { execute, sqliteFailure } from "./sqlite.ts";

function check(condition: boolean, what: string): void {
  if (!condition) throw new Error(`check failed: ${what}`);
}

async function rejectsWith(promise: Promise<unknown>, type: new (...args: never[]) => Error, what: string): Promise<void> {
  const outcome = await promise.then(
    () => undefined,
    (error: unknown) => error,
  );
  check(outcome instanceof type, `${what}: expected ${type.name}, got ${String(outcome)}`);
}

const dir = mkdtempSync(join(tmpdir(), "securemesh-runtime-check-"));
try {
  const path = join(dir, "records.db");
  const store = await openStore(path);
  const first = { sender: "client1", token: "token-1", jti: "jti-1", idempotencyKey: "key-1", digest: "digest-1", server: 5001 };
  const created = await store.insert(first);
  check(!created.repeated && (await store.count()) === 1, "insert stores one record");
  const latest = await store.latest(5, "client1");
  check(latest.length === 1 && latest[0]!.token === "token-1" && latest[0]!.id === created.id, "latest reads it back");
  const retried = await store.insert({ ...first, server: 5002 });
  check(retried.repeated && retried.id === created.id && retried.server === 5001, "a retry returns the first result");
  await rejectsWith(store.insert({ ...first, idempotencyKey: undefined }), ProofRejected, "a replayed jti");
  await rejectsWith(store.insert({ ...first, jti: "jti-2", digest: "other" }), IdempotencyConflict, "a reused Idempotency-Key");
  const proof = { jti: "invalidation-1", server: 5001, expiresAt: Math.floor(Date.now() / 1000) + 60 };
  check((await store.bumpGeneration(proof)) === 2, "an invalidation bumps the generation");
  await rejectsWith(store.bumpGeneration(proof), ProofRejected, "a replayed invalidation proof");
  check((await store.generation()) === 2, "a refused invalidation leaves the generation");
  // Re-encryption's compare-and-set (fernet-rewrap.ts): it takes where the token is the one read, and only there.
  const [page] = await store.tokensAfter(0, 10);
  check(page?.id === created.id && page.token === "token-1", "tokensAfter pages the records");
  const swapped = await store.replaceTokens([
    { id: created.id, previous: "token-1", next: "token-1b" },
    { id: created.id, previous: "token-1", next: "token-1c" },
  ]);
  check(swapped[0] === true && swapped[1] === false && (await store.latest(1))[0]!.token === "token-1b", `replaceTokens is a compare-and-set (got ${swapped})`);

  // Another process holding the write lock: a write here is busy, a read (ping) is not.
  const other = new DatabaseSync(path);
  execute(other, "BEGIN IMMEDIATE");
  const blocked = new DatabaseSync(path);
  execute(blocked, "PRAGMA busy_timeout = 0");
  let failure: string | undefined;
  try {
    execute(blocked, "BEGIN IMMEDIATE");
  } catch (error) {
    failure = sqliteFailure(error);
  }
  check(failure === "busy", `a held write lock reads as busy (got ${failure})`);
  await store.ping();
  execute(other, "ROLLBACK");
  other.close();
  blocked.close();
  await store.close();

  const tokens = await openTokenStore(`sqlite:${join(dir, "tokens.db")}`);
  await tokens.put({ clientId: "client1", tokenType: "marketplace", ciphertext: "c", nonce: "n", keyVersion: 1, updatedAt: 1 });
  await tokens.put({ clientId: "client1", tokenType: "marketplace", ciphertext: "c2", nonce: "n2", keyVersion: 2, updatedAt: 2 });
  const row = await tokens.get("client1", "marketplace");
  check(row?.ciphertext === "c2" && row.keyVersion === 2 && (await tokens.all()).length === 1, "the token store upserts");
  await tokens.close();
  console.log(`OK ${navigator.userAgent}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
