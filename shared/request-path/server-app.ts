// The server's app: each route checks who forwarded it (the TLS peer), the sender's proof, and the policy, then
// decrypts and commits a record, or serves the get_data() view through its cache. roles/server.ts runs it.
import { createHash } from "node:crypto";
import type { Authorizer, RequestLimiter } from "../authz/index.ts";
import { senderName } from "../authz/index.ts";
import { BadRequest, ProofRejected } from "../platform/errors.ts";
import { createApp, peerIdentity, readJsonFields, requestTrace } from "../platform/http.ts";
import { printable, type Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import type { CachedDataView } from "./data-view.ts";
import type { Fernet } from "./fernet.ts";
import type { RewrapStatus } from "./fernet-rewrap.ts";
import { payloadDigest, PROOF_HEADER, type ProofVerifier } from "./proof.ts";
import type { RecordStore } from "./store.ts";

export interface ServerDeps {
  /** The port the server listens on (known once it is bound): the records and answers name it. */
  port: () => number;
  store: RecordStore;
  view: CachedDataView;
  fernet: Fernet;
  verifier: ProofVerifier;
  authz: Authorizer;
  logger: Logger;
  ttl: number;
  metrics?: Metrics;
  /** The Fernet keys in force by fingerprint, the primary first, for /health: which hosts loaded a rotation step. */
  fernetKeys?: () => readonly string[];
  /** What the host says about itself on /health (shared/service/host-facts.ts): compared by coordinators and `check`. */
  facts?: () => object;
  /** Re-encryption after a rotation, for /health: records still under old keys, keys kept for them (fernet-rewrap.ts). */
  fernetRewrap?: () => RewrapStatus;
  /** Each sender's requests in flight and rate, per the proof's verified sender and the policy's limits (issue 20). */
  limiter?: RequestLimiter;
}

/** How long /health waits for the store's ping before it reports the store stalled: well under a probe's timeout. */
export const STORE_PING_DEADLINE_MS = 500;

/** Whether the store answers a ping within STORE_PING_DEADLINE_MS. */
async function storeAnswers(store: RecordStore): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), STORE_PING_DEADLINE_MS);
  });
  try {
    return await Promise.race([
      store.ping().then(
        () => true,
        () => false,
      ),
      deadline,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

const IDEMPOTENCY_KEY = /^[A-Za-z0-9_.:-]{1,128}$/;

/** Idempotency keys belong to their sender: the same key from two senders names two requests (#11 L5). */
export function senderIdempotencyKey(sender: string, key: string): string {
  return createHash("sha256").update(`${sender}\u0000${key}`).digest("base64url");
}

export function createServerApp(deps: ServerDeps) {
  const { store, view, fernet, verifier, authz, logger, ttl, metrics = new Metrics(), limiter } = deps;
  view.exportMetrics(metrics);
  /**
   * Runs a request's work within its sender's limits. Servers are called by coordinators, so the sender the proof
   * names is the one identity here that a limit can be fair to; its proof is not yet used when the 429 is answered.
   */
  const limited = <T>(sender: string, work: () => Promise<T>): Promise<T> => (limiter ? limiter.run(sender, work) : work());

  /**
   * Who forwards is the TLS peer of this very connection (the listener binds it to the request, on both runtimes):
   * an identity that may not forward, a client calling directly among them, is served nothing (#11 L4). Nothing in
   * the request itself says who forwarded it, so nothing in it can be captured and replayed (issue 18, H1).
   */
  const requireForwarder = authz.requirePeer("forward");
  /** Reads carry their proof in a header: a GET has no body to put it in. */
  const verifyHeaderProof = (request: Request, path: string) => {
    const proof = request.headers.get(PROOF_HEADER);
    if (!proof) throw new ProofRejected("sender proof missing");
    return verifier.verify(proof, { method: "GET", path, payload: "" });
  };

  return createApp({ logger, metrics, metricsRoute: authz.requirePeer("metrics.read") })
    .get("/health", async ({ request }) => {
      // A live process whose store stalls is not a dead server (issue 20: during a Galera eviction every coordinator
      // held every server out): 200 with store_status "stalled", so the pool keeps it for what its cache can answer
      // and sends writes elsewhere first. A hung store must not hang the probe either: it gets STORE_PING_DEADLINE_MS.
      if (!(await storeAnswers(store))) {
        return { status: "degraded", store_status: "stalled", role: "server", server: deps.port(), store: store.kind, error: "record store unavailable" };
      }
      const alive = { status: "ok", store_status: "ok", role: "server", server: deps.port(), store: store.kind };
      // The rest is what cache.stats guards and the coordinators' status page shows (issue 22 L2): only for a caller
      // the policy grants status.read. Chosen with allows(), no audit line: each coordinator probes every second,
      // and an answer without it refuses nothing.
      if (!authz.allows(peerIdentity(request), "status.read")) return alive;
      // Plain reads only: on Galera a causal read waits out a lost node's eviction, and every probe would time out at once.
      return {
        ...alive,
        cache: await view.stats({ causal: false }),
        fernet_keys: deps.fernetKeys?.(),
        fernet_rewrap: deps.fernetRewrap?.(),
        ...(deps.facts ? { facts: { ...deps.facts(), store: await store.storeId() } } : {}),
      };
    })
    .post("/api/data", async ({ request, body }) => {
      requireForwarder(request);
      const { data, proof } = readJsonFields(request, body, ["data", "proof?"]);
      if (proof === undefined) throw new ProofRejected("sender proof missing");
      const idempotencyKey = request.headers.get("idempotency-key") ?? undefined;
      if (idempotencyKey !== undefined && !IDEMPOTENCY_KEY.test(idempotencyKey)) {
        throw new BadRequest("Idempotency-Key must be 1-128 characters of letters, digits and _.:-");
      }
      const { sender, jti } = await verifier.verify(proof, { method: "POST", path: "/api/data", payload: data });
      authz.require(sender, "records.write");
      return limited(sender, async () => {
        const text = fernet.decryptText(data, { ttl });
        const name = senderName(sender);
        const started = performance.now();
        const stored = await store.insert({
          sender: name,
          token: data,
          jti,
          digest: payloadDigest(data),
          server: deps.port(),
          idempotencyKey: idempotencyKey === undefined ? undefined : senderIdempotencyKey(sender, idempotencyKey),
        });
        // The database hop of the request, under its trace id (#14).
        const { field, id } = requestTrace(request);
        logger.info(
          `Store: record ${stored.id} ${stored.repeated ? "was already stored (a repeat)" : "stored"} for ${name} in ${(performance.now() - started).toFixed(1)} ms ${field}=${id}`,
        );
        if (!stored.repeated) logger.info(`Decrypted data: ${printable(text)} (from ${name})`);
        return { result: "ok", id: stored.id, server: stored.server };
      });
    })
    .get("/api/get_cached_data", async ({ request }) => {
      requireForwarder(request);
      const { sender } = await verifyHeaderProof(request, "/api/get_cached_data");
      // Everyone's records, or only your own: the policy says which (#11 M5).
      const everyone = authz.allows(sender, "view.read", "all");
      authz.require(sender, "view.read", everyone ? "all" : "own");
      const refresh = /no-cache/i.test(request.headers.get("cache-control") ?? "");
      return limited(sender, async () => {
        const { snapshot, cached, ageMs } = await view.read(refresh, everyone ? undefined : senderName(sender));
        // Encrypted for the client, so the coordinator in between cannot read the view.
        return { cached, age_ms: ageMs, server: deps.port(), generation: snapshot.generation, data: fernet.encrypt(JSON.stringify(snapshot)) };
      });
    })
    .post("/api/invalidate_cache", async ({ request, body }) => {
      requireForwarder(request);
      const { proof } = readJsonFields(request, body, ["proof?"]);
      if (proof === undefined) throw new ProofRejected("sender proof missing");
      const { sender, jti, expiresAt } = await verifier.verify(proof, { method: "POST", path: "/api/invalidate_cache", payload: "" });
      authz.require(sender, "cache.invalidate");
      return limited(sender, async () => {
        const generation = await view.invalidate({ jti, server: deps.port(), expiresAt });
        logger.info(`Cache invalidated by ${senderName(sender)} (generation ${generation})`);
        return { result: "ok", server: deps.port(), generation };
      });
    })
    .get("/api/cache_stats", async ({ request }) => {
      requireForwarder(request);
      const { sender } = await verifyHeaderProof(request, "/api/cache_stats");
      authz.require(sender, "cache.stats");
      return limited(sender, async () => ({ server: deps.port(), ...(await view.stats()) }));
    });
}
