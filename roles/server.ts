// A securemesh server: receives Fernet payloads with a sender proof over mutual TLS and commits them to the store.
import { createHash } from "node:crypto";
import { Authorizer, mutualTlsListening, senderName, TrustMaterial } from "../shared/authz/index.ts";
import { exitWithConfigError, loadFernetKeys, parseFlags, parsePort, parsePositive, pkiDir, policyPath, displayPath, exitOnSignals } from "../shared/platform/config.ts";
import { BadRequest, ProofRejected } from "../shared/platform/errors.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { createApp, listenReloadable, peerIdentity, readJsonFields, requestTrace } from "../shared/platform/http.ts";
import { CachedDataView } from "../shared/request-path/data-view.ts";
import { createLogger, printable, type Logger } from "../shared/ops/log.ts";
import { Metrics } from "../shared/ops/metrics.ts";
import { payloadDigest, PROOF_HEADER, ProofVerifier } from "../shared/request-path/proof.ts";
import { describeStoreUrl, openStore, type RecordStore } from "../shared/request-path/store.ts";
import { assertSafeTlsEnvironment } from "../shared/platform/tls.ts";

const USAGE = `
Usage: roles/server.ts PORT [options]

Receives Fernet-encrypted data over mutual TLS, checks the sender proof, and stores each record.
Every request must come through an identity the policy lets forward (the coordinator), and every
action is decided against the sender proof's identity by the policy.

Options:
  --host HOST        address to bind (default 127.0.0.1)
  --db URL           record store: mysql://user:pass@host:3306/db, several nodes of a Galera cluster as
                     mysql://user:pass@host1:3306,host2:3306,host3:3306/db, or a sqlite path
                     (default $DATABASE_URL, else data/records.db)
  --pki DIR          PKI folder from pki.sh (default $PKI_DIR, else certs/)
  --no-crl           run without revocation: crl.pem is not read, no certificate is refused as revoked
                     (a warning at start says so); without it, no valid crl.pem stops the role
  --policy FILE      authorization policy (default $SECUREMESH_POLICY, else roles/policy.json);
                     it, the certificates and the CRL reload on change and on SIGHUP
  --ttl SECONDS      oldest Fernet token accepted (default $FERNET_TTL, else 300)
  --cache-ttl MS     how long get_data() stays cached (default 30000)
  --cache-entries N  cache bound, least recently used evicted first (default 16)
  -h, --help         show this help

Environment: LOG_FORMAT=json for JSON log lines, NO_COLOR to turn colours off.
`;

export interface ServerConfig {
  port: number;
  host: string;
  db: string | undefined;
  pki: string;
  /** --no-crl: no revocation at all (#18). */
  noCrl: boolean;
  policy: string;
  ttl: number;
  cacheTtlMs: number;
  cacheEntries: number;
}

export function parseServerConfig(argv: string[]): ServerConfig {
  const { values, positionals } = parseFlags("server", USAGE, {
    host: { type: "string" },
    db: { type: "string" },
    pki: { type: "string" },
    "no-crl": { type: "boolean" },
    policy: { type: "string" },
    ttl: { type: "string" },
    "cache-ttl": { type: "string" },
    "cache-entries": { type: "string" },
  }, argv);
  return {
    port: parsePort(positionals[0] ?? process.env.PORT, "PORT (first argument)"),
    host: values.host ?? "127.0.0.1",
    db: values.db ?? process.env.DATABASE_URL,
    pki: pkiDir(values.pki),
    noCrl: values["no-crl"] ?? false,
    policy: policyPath(values.policy),
    ttl: parsePositive(values.ttl ?? process.env.FERNET_TTL, "--ttl", 300),
    cacheTtlMs: parsePositive(values["cache-ttl"], "--cache-ttl", 30_000),
    cacheEntries: parsePositive(values["cache-entries"], "--cache-entries", 16),
  };
}

export interface ServerDeps {
  port: number;
  store: RecordStore;
  view: CachedDataView;
  fernet: Fernet;
  verifier: ProofVerifier;
  authz: Authorizer;
  logger: Logger;
  ttl: number;
  metrics?: Metrics;
}

const IDEMPOTENCY_KEY = /^[A-Za-z0-9_.:-]{1,128}$/;

/** Idempotency keys belong to their sender: the same key from two senders names two requests (#11 L5). */
export function senderIdempotencyKey(sender: string, key: string): string {
  return createHash("sha256").update(`${sender}\u0000${key}`).digest("base64url");
}

/** Handlers read `deps.port` per request, so a role started on port 0 can fill it in once bound. */
export function createServerApp(deps: ServerDeps) {
  const { store, view, fernet, verifier, authz, logger, ttl, metrics = new Metrics() } = deps;
  view.exportMetrics(metrics);

  /**
   * Who forwards is the TLS peer of this very connection (the listener binds it to the request, on both runtimes):
   * an identity that may not forward, a client calling directly among them, is served nothing (#11 L4). Nothing in
   * the request itself says who forwarded it, so nothing in it can be captured and replayed (issue 18, H1).
   */
  const requireForwarder = (request: Request) => authz.require(peerIdentity(request), "forward");
  /** Reads carry their proof in a header: a GET has no body to put it in. */
  const verifyHeaderProof = (request: Request, path: string) => {
    const proof = request.headers.get(PROOF_HEADER);
    if (!proof) throw new ProofRejected("sender proof missing");
    return verifier.verify(proof, { method: "GET", path, payload: "" });
  };

  return createApp({ logger, metrics })
    .get("/health", async ({ set }) => {
      try {
        await store.ping();
        // Plain reads only: on Galera a causal read waits out a lost node's eviction, and every probe would time out at once.
        return { status: "ok", role: "server", server: deps.port, store: store.kind, cache: await view.stats({ causal: false }) };
      } catch {
        set.status = 503;
        return { status: "degraded", role: "server", server: deps.port, store: store.kind, error: "record store unavailable" };
      }
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
      const text = fernet.decryptText(data, { ttl });
      const name = senderName(sender);
      const started = performance.now();
      const stored = await store.insert({
        sender: name, token: data, jti, digest: payloadDigest(data), server: deps.port,
        idempotencyKey: idempotencyKey === undefined ? undefined : senderIdempotencyKey(sender, idempotencyKey),
      });
      // The database hop of the request, under its trace id (#14).
      const { field, id } = requestTrace(request);
      logger.info(`Store: record ${stored.id} ${stored.repeated ? "was already stored (a repeat)" : "stored"} for ${name} in ${(performance.now() - started).toFixed(1)} ms ${field}=${id}`);
      if (!stored.repeated) logger.info(`Decrypted data: ${printable(text)} (from ${name})`);
      return { result: "ok", id: stored.id, server: stored.server };
    })
    .get("/api/get_cached_data", async ({ request }) => {
      requireForwarder(request);
      const { sender } = await verifyHeaderProof(request, "/api/get_cached_data");
      // Everyone's records, or only your own: the policy says which (#11 M5).
      const everyone = authz.allows(sender, "view.read", "all");
      authz.require(sender, "view.read", everyone ? "all" : "own");
      const refresh = /no-cache/i.test(request.headers.get("cache-control") ?? "");
      const { snapshot, cached, ageMs } = await view.read(refresh, everyone ? undefined : senderName(sender));
      // Encrypted for the client, so the coordinator in between cannot read the view.
      return { cached, age_ms: ageMs, server: deps.port, generation: snapshot.generation, data: fernet.encrypt(JSON.stringify(snapshot)) };
    })
    .post("/api/invalidate_cache", async ({ request, body }) => {
      requireForwarder(request);
      const { proof } = readJsonFields(request, body, ["proof?"]);
      if (proof === undefined) throw new ProofRejected("sender proof missing");
      const { sender, jti, expiresAt } = await verifier.verify(proof, { method: "POST", path: "/api/invalidate_cache", payload: "" });
      authz.require(sender, "cache.invalidate");
      const generation = await view.invalidate({ jti, server: deps.port, expiresAt });
      logger.info(`Cache invalidated by ${senderName(sender)} (generation ${generation})`);
      return { result: "ok", server: deps.port, generation };
    })
    .get("/api/cache_stats", async ({ request }) => {
      requireForwarder(request);
      const { sender } = await verifyHeaderProof(request, "/api/cache_stats");
      authz.require(sender, "cache.stats");
      return { server: deps.port, ...(await view.stats()) };
    });
}

async function main(): Promise<void> {
  const logger = createLogger("server");
  const metrics = new Metrics();
  let config: ServerConfig;
  let deps: Omit<ServerDeps, "store" | "logger" | "view">;
  let trust: TrustMaterial;
  try {
    assertSafeTlsEnvironment();
    config = parseServerConfig(process.argv.slice(2));
    trust = TrustMaterial.open(config.pki, "server", { noCrl: config.noCrl });
    deps = {
      port: config.port, fernet: new Fernet(loadFernetKeys(config.pki)), ttl: config.ttl, metrics,
      verifier: new ProofVerifier(trust.identity.ca, { isRevoked: (serial) => trust.isRevoked(serial) }),
      authz: new Authorizer(config.policy, logger, metrics),
    };
  } catch (error) {
    exitWithConfigError("server", error);
  }
  const store = await openStore(config.db).catch((error) => exitWithConfigError("server", error));
  const view = new CachedDataView({ store, fernet: deps.fernet, logger, ttlMs: config.cacheTtlMs, maxEntries: config.cacheEntries });
  const serverDeps: ServerDeps = { ...deps, store, view, logger };
  const app = createServerApp(serverDeps);
  const listener = await listenReloadable(app, { port: config.port, hostname: config.host, ...mutualTlsListening(trust, deps.authz) })
    .catch((error) => exitWithConfigError("server", error));
  // With port 0 the bound port is only known now; records must name the real one.
  serverDeps.port = listener.port;
  // Revocation needs no TLS swap: the listener asks the live CRL at every handshake and on every request, and the
  // proofs are checked against it too. A new certificate, key or CA swaps the listener's TLS, and proofs follow the
  // new CA at once.
  trust.onReload((identity, changed) => {
    if (!changed.certificate) return undefined;
    deps.verifier.setCa(identity.ca);
    return listener.reload(mutualTlsListening(trust).tls);
  }).watch(logger);
  deps.authz.watch();
  logger.info(`server listening on https://${config.host}:${listener.port} (store: ${describeStoreUrl(config.db)}; policy: ${displayPath(config.policy)})`);

  exitOnSignals(async () => {
    trust.stop();
    deps.authz.stop();
    await listener.stop();
    await store.close();
  });
}

if (import.meta.main) await main();
