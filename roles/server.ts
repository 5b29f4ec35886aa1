// A securemesh server: receives Fernet payloads with a sender proof over mutual TLS and commits them to the store.
import { exitWithConfigError, loadFernetKeys, parseFlags, parsePort, parsePositive, pkiDir, exitOnSignals } from "../shared/config.ts";
import { BadRequest, ProofRejected } from "../shared/errors.ts";
import { Fernet } from "../shared/fernet.ts";
import { createApp, listenOrExit, readJsonFields } from "../shared/http.ts";
import { CachedDataView } from "../shared/data-view.ts";
import { createLogger, printable, type Logger } from "../shared/log.ts";
import { Metrics } from "../shared/metrics.ts";
import { payloadDigest, ProofVerifier } from "../shared/proof.ts";
import { describeStoreUrl, openStore, type RecordStore } from "../shared/store.ts";
import { assertSafeTlsEnvironment, loadIdentity, mutualTlsServerOptions } from "../shared/tls.ts";

const USAGE = `
Usage: bun roles/server.ts PORT [options]

Receives Fernet-encrypted data over mutual TLS, checks the sender proof, and stores each record.

Options:
  --host HOST        address to bind (default 127.0.0.1)
  --db URL           record store: mysql://user:pass@host:3306/db, or a sqlite path
                     (default $DATABASE_URL, else data/records.db)
  --pki DIR          PKI folder from pki.sh (default $PKI_DIR, else certs/)
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
  ttl: number;
  cacheTtlMs: number;
  cacheEntries: number;
}

export function parseServerConfig(argv: string[]): ServerConfig {
  const { values, positionals } = parseFlags("server", USAGE, {
    host: { type: "string" },
    db: { type: "string" },
    pki: { type: "string" },
    ttl: { type: "string" },
    "cache-ttl": { type: "string" },
    "cache-entries": { type: "string" },
  }, argv);
  return {
    port: parsePort(positionals[0] ?? process.env.PORT, "PORT (first argument)"),
    host: values.host ?? "127.0.0.1",
    db: values.db ?? process.env.DATABASE_URL,
    pki: pkiDir(values.pki),
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
  logger: Logger;
  ttl: number;
  metrics?: Metrics;
}

const IDEMPOTENCY_KEY = /^[A-Za-z0-9_.:-]{1,128}$/;

/** Handlers read `deps.port` per request, so a role started on port 0 can fill it in once bound. */
export function createServerApp(deps: ServerDeps) {
  const { store, view, fernet, verifier, logger, ttl, metrics = new Metrics() } = deps;
  view.exportMetrics(metrics);
  return createApp({ logger, metrics })
    .get("/health", async ({ set }) => {
      try {
        await store.ping();
        return { status: "ok", role: "server", server: deps.port, store: store.kind, cache: await view.stats() };
      } catch {
        set.status = 503;
        return { status: "degraded", role: "server", server: deps.port, store: store.kind, error: "record store unavailable" };
      }
    })
    .post("/api/data", async ({ request, body }) => {
      const { data, proof } = readJsonFields(request, body, ["data", "proof?"]);
      if (proof === undefined) throw new ProofRejected("sender proof missing");
      const idempotencyKey = request.headers.get("idempotency-key") ?? undefined;
      if (idempotencyKey !== undefined && !IDEMPOTENCY_KEY.test(idempotencyKey)) {
        throw new BadRequest("Idempotency-Key must be 1-128 characters of letters, digits and _.:-");
      }
      const { sender, jti } = await verifier.verify(proof, { method: "POST", path: "/api/data", payload: data });
      const text = fernet.decryptText(data, { ttl });
      const stored = await store.insert({ sender, token: data, jti, idempotencyKey, digest: payloadDigest(data), server: deps.port });
      if (!stored.repeated) logger.info(`Decrypted data: ${printable(text)} (from ${sender})`);
      return { result: "ok", id: stored.id, server: stored.server };
    })
    .get("/api/get_cached_data", async ({ request }) => {
      const refresh = /no-cache/i.test(request.headers.get("cache-control") ?? "");
      const { snapshot, cached, ageMs } = await view.read(refresh);
      // Encrypted for the client, so the coordinator in between cannot read the view.
      return { cached, age_ms: ageMs, server: deps.port, generation: snapshot.generation, data: fernet.encrypt(JSON.stringify(snapshot)) };
    })
    .post("/api/invalidate_cache", async ({ request, body }) => {
      const { proof } = readJsonFields(request, body, ["proof?"]);
      if (proof === undefined) throw new ProofRejected("sender proof missing");
      const { sender } = await verifier.verify(proof, { method: "POST", path: "/api/invalidate_cache", payload: "" });
      const generation = await view.invalidate();
      logger.info(`Cache invalidated by ${sender} (generation ${generation})`);
      return { result: "ok", server: deps.port, generation };
    })
    .get("/api/cache_stats", async () => ({ server: deps.port, ...(await view.stats()) }));
}

async function main(): Promise<void> {
  const logger = createLogger("server");
  let config: ServerConfig;
  let deps: Omit<ServerDeps, "store" | "logger" | "view">;
  let tls;
  try {
    assertSafeTlsEnvironment();
    config = parseServerConfig(Bun.argv.slice(2));
    const identity = loadIdentity(config.pki, "server");
    tls = mutualTlsServerOptions(identity);
    deps = { port: config.port, fernet: new Fernet(loadFernetKeys(config.pki)), verifier: new ProofVerifier(identity.ca), ttl: config.ttl };
  } catch (error) {
    exitWithConfigError("server", error);
  }
  const store = await openStore(config.db).catch((error) => exitWithConfigError("server", error));
  const view = new CachedDataView({ store, fernet: deps.fernet, logger, ttlMs: config.cacheTtlMs, maxEntries: config.cacheEntries });
  const serverDeps: ServerDeps = { ...deps, store, view, logger };
  const app = createServerApp(serverDeps);
  const port = listenOrExit("server", app, { port: config.port, hostname: config.host, tls });
  // With port 0 the bound port is only known now; records must name the real one.
  serverDeps.port = port;
  logger.info(`server listening on https://${config.host}:${port} (store: ${describeStoreUrl(config.db)})`);

  exitOnSignals(async () => {
    await app.stop();
    await store.close();
  });
}

if (import.meta.main) await main();
