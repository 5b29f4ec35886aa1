import { beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { Authorizer, RequestLimiter } from "../authz/index.ts";
import { loadFernetKeys, policyPath } from "../platform/config.ts";
import { Fernet } from "./fernet.ts";
import { createLogger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { PROOF_HEADER, ProofSigner, ProofVerifier } from "./proof.ts";
import { openStore, type RecordStore } from "./store.ts";
import { testPki } from "../testing/pki.ts";
import { handledAs } from "../testing/peers.ts";
import { scrape } from "../testing/prometheus.ts";
import { runPython } from "../testing/python.ts";
import { loadIdentity } from "../platform/tls.ts";
import { CachedDataView, type DataSnapshot } from "./data-view.ts";
import { createServerApp, STORE_PING_DEADLINE_MS } from "./server-app.ts";
import { lateBound } from "../testing/timing.ts";

let pki: string;
let store: RecordStore;
let fernet: Fernet;
let signer: ProofSigner;
let client2: ProofSigner;
/** The server app as the coordinator's connection reaches it: the listener binds the coordinator's identity. */
let app: ReturnType<typeof handledAs>;
/** The same app with no caller bound: for scrape(), which reads /metrics as the scraper. */
let serverApp: ReturnType<typeof createServerApp>;
const COORDINATOR_ID = "spiffe://securemesh/coordinator/coordinator";
let verifier: ProofVerifier;
let authz: Authorizer;
const logs: string[] = [];
let clockMs = 1_000_000;
const clock = () => clockMs;

beforeAll(async () => {
  pki = await testPki();
  store = await openStore(join(mkdtempSync(join(tmpdir(), "securemesh-server-")), "r.db"));
  fernet = new Fernet(loadFernetKeys(pki));
  signer = new ProofSigner(loadIdentity(pki, "client1"));
  client2 = new ProofSigner(loadIdentity(pki, "client2"));
  const logger = createLogger("server", { format: "text", color: false, write: (l) => logs.push(l) });
  verifier = new ProofVerifier(loadIdentity(pki, "server").ca);
  // The repository's own default policy: these tests pin down what it allows.
  const metrics = new Metrics();
  authz = new Authorizer(policyPath(), logger, metrics);
  const view = new CachedDataView({ store, fernet, logger, ttlMs: 30_000, now: clock });
  // app.handle needs no socket: the port is only the server number the answers carry.
  serverApp = createServerApp({ port: () => 7001, store, view, fernet, verifier, authz, logger, ttl: 300, metrics });
  app = handledAs(serverApp, COORDINATOR_ID);
});

async function post(body: unknown, headers: Record<string, string> = {}, target = app) {
  const response = await target.handle(
    new Request("http://localhost/api/data", {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: typeof body === "string" ? body : JSON.stringify(body),
    }),
  );
  // biome-ignore lint/suspicious/noExplicitAny: the tests read answers' fields as toMatchObject checks them
  return { status: response.status, body: (await response.json()) as Record<string, any> };
}

async function signed(message: string, token = fernet.encrypt(message), by = signer) {
  return { data: token, proof: await by.sign({ method: "POST", path: "/api/data", payload: token }) };
}

const readHeaders = async (by = signer, path = "/api/get_cached_data") => ({ [PROOF_HEADER]: await by.sign({ method: "GET", path, payload: "" }) });

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
    expect((await post({ ...(await signed("x")), extra: 1 })).body.error).toBe('unexpected field: "extra"');
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
  expect(await res.json()).toMatchObject({
    status: "ok",
    store_status: "ok",
    role: "server",
    server: 7001,
    store: "sqlite",
    cache: { generation: expect.any(Number) },
  });
});

test("issue 22 L2: /health tells a caller without status.read that the server lives, and nothing more", async () => {
  const res = await handledAs(serverApp, "spiffe://securemesh/client/client1").handle(new Request("http://localhost/health"));
  // cache.stats guards the cache's counters; the facts and Fernet key state are the status page's.
  expect(await res.json()).toEqual({ status: "ok", store_status: "ok", role: "server", server: 7001, store: "sqlite" });
});

test("issue 20: a store that fails or hangs its ping makes /health 200 store_status stalled, within the deadline", async () => {
  const logger = createLogger("server", { format: "text", color: false, write: () => {} });
  for (const ping of [() => Promise.reject(new Error("gone")), () => new Promise<void>(() => {})]) {
    const stalled = Object.assign(Object.create(store) as RecordStore, { ping });
    const view = new CachedDataView({ store: stalled, fernet, logger, ttlMs: 30_000, now: clock });
    const target = createServerApp({ port: () => 7001, store: stalled, view, fernet, verifier, authz, logger, ttl: 300 });
    const started = performance.now();
    const res = await target.handle(new Request("http://localhost/health"));
    expect(performance.now() - started).toBeLessThan(lateBound(STORE_PING_DEADLINE_MS + 400));
    expect({ status: res.status, body: await res.json() }).toMatchObject({
      status: 200,
      body: { status: "degraded", store_status: "stalled", role: "server" },
    });
  }
});

describe("cache routes", () => {
  interface CachedAnswer {
    cached: boolean;
    age_ms: number;
    server: number;
    generation: number;
    data: string;
  }
  const read = async (target = app, headers: Record<string, string> = {}) => {
    const res = await target.handle(new Request("http://localhost/api/get_cached_data", { headers: { ...(await readHeaders()), ...headers } }));
    expect(res.status).toBe(200);
    const body = (await res.json()) as CachedAnswer;
    return { ...body, view: JSON.parse(fernet.decryptText(body.data)) as DataSnapshot };
  };
  const invalidate = async (proof?: string) => {
    const res = await app.handle(
      new Request("http://localhost/api/invalidate_cache", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(proof ? { proof } : {}),
      }),
    );
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
    const other = handledAs(
      createServerApp({
        port: () => 7002,
        store,
        fernet,
        verifier,
        authz,
        logger: otherLogger,
        ttl: 300,
        view: new CachedDataView({ store, fernet, logger: otherLogger, ttlMs: 30_000, now: clock }),
      }),
      COORDINATOR_ID,
    );
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
    // Single use (#11 L3): the same proof again is a replay, here and however often it is sent.
    expect(await invalidate(proof)).toEqual({ status: 401, body: { error: "proof already used (replayed jti)", code: "ERR_PROOF" } });
    expect((await read()).generation).toBe(before + 1);
  });

  test("the TTL expires entries (injected clock)", async () => {
    await read();
    expect((await read()).cached).toBe(true);
    clockMs += 30_000;
    expect((await read()).cached).toBe(false);
  });

  test("GET /api/cache_stats reports hits, misses, entries and generation", async () => {
    const res = await app.handle(new Request("http://localhost/api/cache_stats", { headers: await readHeaders(signer, "/api/cache_stats") }));
    expect(await res.json()).toMatchObject({
      server: 7001,
      hits: expect.any(Number),
      misses: expect.any(Number),
      entries: expect.any(Number),
      evictions: expect.any(Number),
      invalidations: 1,
      hitRatio: expect.any(Number),
      generation: expect.any(Number),
    });
  });
});

describe("GET /metrics", () => {
  test("parses as Prometheus text with requests by route and status, latency and cache counters", async () => {
    const stats = (await (
      await app.handle(new Request("http://localhost/api/cache_stats", { headers: await readHeaders(signer, "/api/cache_stats") }))
    ).json()) as { hits: number; misses: number };
    const metrics = await scrape(serverApp);
    expect(metrics.value("securemesh_http_requests_total", { route: "/api/data", method: "POST", status: "200" })).toBeGreaterThan(0);
    expect(metrics.value("securemesh_http_requests_total", { route: "/api/data", status: "401" })).toBeGreaterThan(0);
    expect(metrics.value("securemesh_http_requests_total", { route: "unmatched", status: "404" })).toBeGreaterThan(0);
    expect(metrics.value("securemesh_http_request_duration_seconds", { route: "/api/get_cached_data" })).toBeGreaterThan(0);
    expect(metrics.value("securemesh_cache_hits_total")).toBe(stats.hits);
    expect(metrics.value("securemesh_cache_misses_total")).toBe(stats.misses);
  });
});

describe("authorization (#11): every request decided by the policy against a verified identity", () => {
  const coordinator = () => new ProofSigner(loadIdentity(pki, "coordinator"));
  const denied = (identity: string, permission: string) => ({ error: `spiffe://securemesh/${identity} lacks permission ${permission}`, code: "ERR_FORBIDDEN" });

  test("L4: a request whose connection is not held by an identity allowed to forward is refused", async () => {
    const body = await signed("sent straight to a server");
    const inner = createServerApp({
      port: () => 7001,
      store,
      view: new CachedDataView({ store, fernet, logger: createLogger("server", { write: () => {} }), ttlMs: 30_000 }),
      fernet,
      verifier,
      authz,
      logger: createLogger("server", { write: () => {} }),
      ttl: 300,
    });
    expect(await post(body, {}, handledAs(inner, ""))).toEqual({
      status: 403,
      body: { error: "an unidentified caller lacks permission forward", code: "ERR_FORBIDDEN" },
    });
    expect(await post(body, {}, handledAs(inner, "spiffe://securemesh/client/client1"))).toEqual({ status: 403, body: denied("client/client1", "forward") });
    // A request no listener accepted (no verified connection at all) names no one.
    const unbound = await inner.handle(
      new Request("http://localhost/api/data", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) }),
    );
    expect(unbound.status).toBe(403);
  });

  test("L4: identities that are not clients cannot write, even with a valid proof", async () => {
    for (const [name, expected] of [
      ["coordinator", "coordinator/coordinator"],
      ["secureproxy", "secureproxy/secureproxy"],
    ] as const) {
      const body = await signed(`written by ${name}`, undefined, new ProofSigner(loadIdentity(pki, name)));
      expect(await post(body)).toEqual({ status: 403, body: denied(expected, "records.write") });
    }
  });

  test("every decision is one audit line and a counter", async () => {
    const lines = logs.length;
    await post(await signed("audited"));
    const audit = logs.slice(lines).filter((l) => l.startsWith("AUTHZ "));
    expect(audit).toEqual([
      "AUTHZ allow identity=spiffe://securemesh/coordinator/coordinator action=forward resource=- (spiffe://securemesh/coordinator/coordinator may forward)",
      "AUTHZ allow identity=spiffe://securemesh/client/client1 action=records.write resource=- (spiffe://securemesh/client/client1 may records.write)",
    ]);
    const metrics = await scrape(serverApp);
    expect(
      metrics.value("securemesh_authz_decisions_total", { identity: "spiffe://securemesh/client/client1", action: "records.write", decision: "allow" }),
    ).toBeGreaterThan(0);
  });

  test("M5: reads need a proof, and a coordinator's proof reads nothing", async () => {
    const noProof = await app.handle(new Request("http://localhost/api/get_cached_data", {}));
    expect([noProof.status, await noProof.json()]).toEqual([401, { error: "sender proof missing", code: "ERR_PROOF" }]);
    const asCoordinator = await app.handle(new Request("http://localhost/api/get_cached_data", { headers: await readHeaders(coordinator()) }));
    expect([asCoordinator.status, await asCoordinator.json()]).toEqual([403, denied("coordinator/coordinator", "view.read:own")]);
    const proofForWrite = { [PROOF_HEADER]: await signer.sign({ method: "POST", path: "/api/data", payload: "" }) };
    expect((await app.handle(new Request("http://localhost/api/get_cached_data", { headers: proofForWrite }))).status).toBe(401);
  });

  test("M5: an identity allowed view.read:own sees only its own records", async () => {
    const policy = join(mkdtempSync(join(tmpdir(), "securemesh-policy-")), "policy.json");
    writeFileSync(
      policy,
      JSON.stringify({
        rules: [
          { identity: "spiffe://securemesh/coordinator/coordinator", allow: ["forward"] },
          { identity: "spiffe://securemesh/client/client1", allow: ["records.write", "view.read:all"] },
          { identity: "spiffe://securemesh/client/client2", allow: ["records.write", "view.read:own"] },
        ],
      }),
    );
    const logger = createLogger("server", { format: "text", color: false, write: () => {} });
    const narrow = handledAs(
      createServerApp({
        port: () => 7003,
        store,
        fernet,
        verifier,
        authz: new Authorizer(policy, logger),
        logger,
        ttl: 300,
        view: new CachedDataView({ store, fernet, logger, ttlMs: 30_000, now: clock }),
      }),
      COORDINATOR_ID,
    );
    const mine = await post(await signed("client2's own", undefined, client2), {}, narrow);
    await post(await signed("client1's, not for client2"), {}, narrow);
    const view = async (by: ProofSigner) => {
      const res = await narrow.handle(new Request("http://localhost/api/get_cached_data", { headers: await readHeaders(by) }));
      return JSON.parse(fernet.decryptText(((await res.json()) as { data: string }).data)) as DataSnapshot;
    };
    const own = await view(client2);
    expect(own.latest.every((r) => r.sender === "client2")).toBe(true);
    expect(own.latest[0]!.id).toBe(mine.body.id);
    expect(Object.keys(own.bySender)).toEqual(["client2"]);
    const all = await view(signer);
    expect(all.latest[0]!.sender).toBe("client1");
    expect(all.total).toBe(await store.count());
  });

  test("L5: Idempotency-Keys belong to their sender", async () => {
    const same = fernet.encrypt("D");
    const byClient2 = await post(await signed("", same, client2), { "idempotency-key": "shared-K" });
    expect(byClient2.status).toBe(200);
    // client1 sending the same D under K is its own, new request, not client2's record.
    const byClient1 = await post(await signed("", same), { "idempotency-key": "shared-K" });
    expect(byClient1.status).toBe(200);
    expect(byClient1.body.id).not.toBe(byClient2.body.id);
    // client1's retry of its own request is recognised; a different payload under its own key is a conflict.
    expect((await post(await signed("", same), { "idempotency-key": "shared-K" })).body.id).toBe(byClient1.body.id);
    expect((await post(await signed("D prime"), { "idempotency-key": "shared-K" })).status).toBe(409);
  });

  test("a denial is a 403 JSON naming the identity and the permission", async () => {
    const invalidation = await app.handle(
      new Request("http://localhost/api/invalidate_cache", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ proof: await coordinator().sign({ method: "POST", path: "/api/invalidate_cache", payload: "" }) }),
      }),
    );
    expect([invalidation.status, await invalidation.json()]).toEqual([403, denied("coordinator/coordinator", "cache.invalidate")]);
    const stats = await app.handle(new Request("http://localhost/api/cache_stats", { headers: await readHeaders(coordinator(), "/api/cache_stats") }));
    expect([stats.status, await stats.json()]).toEqual([403, denied("coordinator/coordinator", "cache.stats")]);
  });
});

describe("per-sender limits (issue 20): a server knows the sender from its proof, whichever coordinator forwards", () => {
  /** A server app whose policy limits client2; `hold` keeps every insert waiting until released. */
  function limitedApp(limits: unknown[]) {
    const dir = mkdtempSync(join(tmpdir(), "securemesh-limits-"));
    const policy = JSON.parse(readFileSync(policyPath(), "utf8")) as { limits: unknown[] };
    policy.limits = [...limits, ...policy.limits];
    writeFileSync(join(dir, "policy.json"), JSON.stringify(policy));
    const logger = createLogger("server", { format: "text", color: false, write: (l) => logs.push(l) });
    const limitedAuthz = new Authorizer(join(dir, "policy.json"), logger);
    let nowMs = 0;
    let gate = Promise.withResolvers<void>();
    gate.resolve();
    // Inserts waiting at the gate, and who waits for a number of them: a request is in flight once it waits there.
    let waiting = 0;
    const waiters: { count: number; resolve: () => void }[] = [];
    const held: RecordStore = Object.create(store, {
      insert: {
        value: async (record: Parameters<RecordStore["insert"]>[0]) => {
          waiting += 1;
          for (const w of waiters.filter((w) => waiting >= w.count)) w.resolve();
          await gate.promise;
          return store.insert(record);
        },
      },
    });
    const limiter = new RequestLimiter({ limits: (id) => limitedAuthz.limits(id), logger, now: () => nowMs });
    const view = new CachedDataView({ store, fernet, logger, ttlMs: 30_000, now: clock });
    const target = handledAs(
      createServerApp({ port: () => 7001, store: held, view, fernet, verifier, authz: limitedAuthz, logger, ttl: 300, limiter }),
      COORDINATOR_ID,
    );
    return {
      target,
      advance: (ms: number) => (nowMs += ms),
      hold: () => (gate = Promise.withResolvers<void>()),
      release: () => gate.resolve(),
      /** Resolves once `count` inserts wait at the gate: their requests hold their places. */
      inFlight: (count: number) =>
        new Promise<void>((resolve) => {
          if (waiting >= count) resolve();
          else waiters.push({ count, resolve });
        }),
    };
  }

  test("over its rate, a sender gets 429 JSON with Retry-After; its refused proof still stores later; others pass", async () => {
    const { target, advance } = limitedApp([{ identity: "spiffe://securemesh/client/client2", rate: { perSecond: 1, burst: 1 } }]);
    expect((await post(await signed("first", undefined, client2), {}, target)).status).toBe(200);
    const refusedBody = await signed("second", undefined, client2);
    const response = await target.handle(
      new Request("http://localhost/api/data", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(refusedBody) }),
    );
    expect([response.status, response.headers.get("retry-after"), await response.json()]).toEqual([
      429,
      "1",
      { error: "spiffe://securemesh/client/client2 is over its rate of 1 requests a second", code: "ERR_RATE_LIMITED" },
    ]);
    expect((await post(await signed("client1 is untouched"), {}, target)).status).toBe(200);
    advance(1000);
    expect((await post(refusedBody, {}, target)).status).toBe(200);
  });

  test("over its requests in flight, a sender gets 429 while its others are held; a finished one frees a place", async () => {
    const { target, hold, release, inFlight } = limitedApp([{ identity: "spiffe://securemesh/client/client2", inFlight: 2 }]);
    hold();
    const pending = [post(await signed("a", undefined, client2), {}, target), post(await signed("b", undefined, client2), {}, target)];
    await inFlight(2); // both hold their places before the third comes (under load, it could otherwise come first)
    const over = await post(await signed("c", undefined, client2), {}, target);
    expect([over.status, over.body.code]).toEqual([429, "ERR_IN_FLIGHT_LIMIT"]);
    const client1 = post(await signed("client1 has its own places"), {}, target);
    release();
    expect((await Promise.all([...pending, client1])).map((r) => r.status)).toEqual([200, 200, 200]);
    expect((await post(await signed("d", undefined, client2), {}, target)).status).toBe(200);
  });
});
