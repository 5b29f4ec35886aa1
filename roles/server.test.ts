import { beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { loadFernetKeys } from "../shared/config.ts";
import { Fernet } from "../shared/fernet.ts";
import { createLogger } from "../shared/log.ts";
import { ProofSigner, ProofVerifier } from "../shared/proof.ts";
import { openStore, type RecordStore } from "../shared/store.ts";
import { testPki } from "../shared/testing/pki.ts";
import { scrape } from "../shared/testing/prometheus.ts";
import { runPython } from "../shared/testing/python.ts";
import { loadIdentity } from "../shared/tls.ts";
import { CachedDataView, type DataSnapshot } from "../shared/data-view.ts";
import { createServerApp } from "./server.ts";

let pki: string;
let store: RecordStore;
let fernet: Fernet;
let signer: ProofSigner;
let app: ReturnType<typeof createServerApp>;
let verifier: ProofVerifier;
const logs: string[] = [];
let clockMs = 1_000_000;
const clock = () => clockMs;

beforeAll(async () => {
  pki = await testPki();
  store = await openStore(join(mkdtempSync(join(tmpdir(), "securemesh-server-")), "r.db"));
  fernet = new Fernet(loadFernetKeys(pki));
  signer = new ProofSigner(loadIdentity(pki, "client1"));
  const logger = createLogger("server", { format: "text", color: false, write: (l) => logs.push(l) });
  verifier = new ProofVerifier(loadIdentity(pki, "server").ca);
  const view = new CachedDataView({ store, fernet, logger, ttlMs: 30_000, now: clock });
  // app.handle needs no socket: the port is only the server number the answers carry.
  app = createServerApp({ port: 7001, store, view, fernet, verifier, logger, ttl: 300 });
});

async function post(body: unknown, headers: Record<string, string> = {}) {
  const response = await app.handle(new Request("http://localhost/api/data", {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  }));
  return { status: response.status, body: (await response.json()) as Record<string, any> };
}

async function signed(message: string, token = fernet.encrypt(message)) {
  return { data: token, proof: await signer.sign({ method: "POST", path: "/api/data", payload: token }) };
}

describe("POST /api/data", () => {
  test("stores the record, logs the plaintext and answers after commit", async () => {
    const before = await store.count();
    const res = await post(await signed("hello from client1"));
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ result: "ok", id: expect.any(Number), server: 7001 });
    expect(await store.count()).toBe(before + 1);
    expect(logs).toContain("Decrypted data: hello from client1 (from client1)");
  });

  test("a token made by Python's cryptography is stored and logged", async () => {
    const key = loadFernetKeys(pki)[0]!;
    const token = await runPython(`from cryptography.fernet import Fernet\nprint(Fernet(${JSON.stringify(key)}.encode()).encrypt(b"made in python").decode())`);
    const res = await post(await signed("", token));
    expect(res.status).toBe(200);
    expect(logs).toContain("Decrypted data: made in python (from client1)");
  });

  test("the same Idempotency-Key stores once and answers the same", async () => {
    const body = await signed("only once");
    const first = await post(body, { "idempotency-key": "k-123" });
    const again = await post(body, { "idempotency-key": "k-123" });
    expect(again).toEqual(first);
    expect(logs.filter((l) => l.includes("Decrypted data: only once"))).toHaveLength(1);
  });

  test("a replayed proof gets 401", async () => {
    const body = await signed("replay me");
    expect((await post(body)).status).toBe(200);
    expect(await post(body)).toEqual({ status: 401, body: { error: "proof already used (replayed jti)", code: "ERR_PROOF" } });
  });

  test("a missing or forged proof gets 401 JSON", async () => {
    const token = fernet.encrypt("x");
    expect(await post({ data: token })).toEqual({ status: 401, body: { error: "sender proof missing", code: "ERR_PROOF" } });
    const other = new ProofSigner(loadIdentity(await testPki("other"), "client1"));
    const forged = await post({ data: token, proof: await other.sign({ method: "POST", path: "/api/data", payload: token }) });
    expect(forged).toEqual({ status: 401, body: { error: "proof certificate is not issued by our CA", code: "ERR_PROOF" } });
  });

  test("bad input gets a clear 4xx JSON error", async () => {
    expect(await post("{not json")).toEqual({ status: 400, body: { error: "request body is not valid JSON", code: "ERR_BAD_REQUEST" } });
    expect((await post({ ...(await signed("x")), extra: 1 })).body.error).toBe("unexpected field: extra");
    const wrongType = await app.handle(new Request("http://localhost/api/data", { method: "POST", headers: { "content-type": "text/plain" }, body: "hi" }));
    expect(wrongType.status).toBe(415);
    const wrongKey = await post(await signed("", new Fernet("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=").encrypt("x")));
    expect(wrongKey).toEqual({ status: 400, body: { error: "invalid or expired token", code: "ERR_INVALID_TOKEN" } });
    expect((await post(await signed("x"), { "idempotency-key": "bad key\n" })).status).toBe(400);
  });

  test("unknown routes get 404 and wrong methods 405", async () => {
    const missing = await app.handle(new Request("http://localhost/nope"));
    expect([missing.status, ((await missing.json()) as { code: string }).code]).toEqual([404, "ERR_NOT_FOUND"]);
    const wrong = await app.handle(new Request("http://localhost/api/data"));
    expect([wrong.status, ((await wrong.json()) as { code: string }).code]).toEqual([405, "ERR_METHOD_NOT_ALLOWED"]);
  });

  test("log lines cannot be forged with control characters", async () => {
    await post(await signed("line1\nFAKE line"));
    expect(logs).toContain("Decrypted data: line1\\x0aFAKE line (from client1)");
  });
});

test("GET /health reports the server, its store and its cache", async () => {
  const res = await app.handle(new Request("http://localhost/health"));
  expect(await res.json()).toMatchObject({ status: "ok", role: "server", server: 7001, store: "sqlite", cache: { generation: expect.any(Number) } });
});

describe("cache routes", () => {
  interface CachedAnswer { cached: boolean; age_ms: number; server: number; generation: number; data: string }
  const read = async (target = app, headers: Record<string, string> = {}) => {
    const res = await target.handle(new Request("http://localhost/api/get_cached_data", { headers }));
    expect(res.status).toBe(200);
    const body = (await res.json()) as CachedAnswer;
    return { ...body, view: JSON.parse(fernet.decryptText(body.data)) as DataSnapshot };
  };
  const invalidate = async (proof?: string) => {
    const res = await app.handle(new Request("http://localhost/api/invalidate_cache", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(proof ? { proof } : {}),
    }));
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  };

  test("a miss reads through, then a hit returns the cached copy with its age", async () => {
    await read(app, { "cache-control": "no-cache" });
    clockMs += 1200;
    const hit = await read();
    expect([hit.cached, hit.age_ms, hit.server]).toEqual([true, 1200, 7001]);
    expect(hit.view.total).toBe(await store.count());
    expect(logs.filter((l) => /^Cache hit \(age 1\.2 s, generation \d+\)$/.test(l))).toHaveLength(1);
  });

  test("the data is Fernet-encrypted: without the key it is unreadable", async () => {
    const answer = await read();
    expect(answer.data).toStartWith("gAAAAA");
    expect(JSON.stringify(answer)).not.toContain("Decrypted");
  });

  test("a write makes the next read a miss that includes it", async () => {
    await read();
    const written = await post(await signed("fresh write"));
    const after = await read();
    expect(after.cached).toBe(false);
    expect(after.view.latest[0]).toMatchObject({ id: written.body.id, text: "fresh write", sender: "client1" });
  });

  test("a server that missed a write (partitioned) does not serve its old copy", async () => {
    const otherLogs: string[] = [];
    const otherLogger = createLogger("server", { format: "text", color: false, write: (l) => otherLogs.push(l) });
    const other = createServerApp({
      port: 7002, store, fernet, verifier, logger: otherLogger, ttl: 300,
      view: new CachedDataView({ store, fernet, logger: otherLogger, ttlMs: 30_000, now: clock }),
    });
    await read(other);
    expect((await read(other)).cached).toBe(true);
    const written = await post(await signed("written while 5002 was away"));
    const after = await read(other);
    expect(after.cached).toBe(false);
    expect(after.view.latest[0]!.id).toBe(written.body.id as number);
  });

  test("invalidation needs a sender proof, then clears and moves the generation on", async () => {
    expect(await invalidate()).toEqual({ status: 401, body: { error: "sender proof missing", code: "ERR_PROOF" } });
    await read();
    const before = (await read()).generation;
    const proof = await signer.sign({ method: "POST", path: "/api/invalidate_cache", payload: "" });
    expect(await invalidate(proof)).toEqual({ status: 200, body: { result: "ok", server: 7001, generation: before + 1 } });
    const after = await read();
    expect([after.cached, after.generation]).toEqual([false, before + 1]);
    expect(logs).toContain(`Cache invalidated by client1 (generation ${before + 1})`);
  });

  test("the TTL expires entries (injected clock)", async () => {
    await read();
    expect((await read()).cached).toBe(true);
    clockMs += 30_000;
    expect((await read()).cached).toBe(false);
  });

  test("GET /api/cache_stats reports hits, misses, entries and generation", async () => {
    const res = await app.handle(new Request("http://localhost/api/cache_stats"));
    expect(await res.json()).toMatchObject({
      server: 7001, hits: expect.any(Number), misses: expect.any(Number), entries: expect.any(Number),
      evictions: expect.any(Number), invalidations: 1, hitRatio: expect.any(Number), generation: expect.any(Number),
    });
  });
});

describe("GET /metrics", () => {
  test("parses as Prometheus text with requests by route and status, latency and cache counters", async () => {
    const stats = (await (await app.handle(new Request("http://localhost/api/cache_stats"))).json()) as { hits: number; misses: number };
    const metrics = await scrape(app);
    expect(metrics.value("securemesh_http_requests_total", { route: "/api/data", method: "POST", status: "200" })).toBeGreaterThan(0);
    expect(metrics.value("securemesh_http_requests_total", { route: "/api/data", status: "401" })).toBeGreaterThan(0);
    expect(metrics.value("securemesh_http_requests_total", { route: "unmatched", status: "404" })).toBeGreaterThan(0);
    expect(metrics.value("securemesh_http_request_duration_seconds", { route: "/api/get_cached_data" })).toBeGreaterThan(0);
    expect(metrics.value("securemesh_cache_hits_total")).toBe(stats.hits);
    expect(metrics.value("securemesh_cache_misses_total")).toBe(stats.misses);
  });
});
