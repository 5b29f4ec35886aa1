// bun harness bench: every case side by side in one run, interleaved in rounds so the machine's drift hits each alike.
import { createPublicKey } from "node:crypto";
import { readFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import { loadFernetKeys } from "../shared/platform/config.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { MeshClient } from "../shared/request-path/mesh-client.ts";
import { FORWARDER_HEADER, PROOF_HEADER, PROOF_LIFETIME_S, ProofSigner } from "../shared/request-path/proof.ts";
import { runPython, PYTHON } from "../shared/testing/python.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { ON_BEHALF_OF_HEADER, openJoseResponse, prepareJoseRequest } from "../shared/token-path/token-exchange.ts";
import { expectThat, type Cluster } from "./cluster.ts";
import { ensureHaproxy, startHaproxy } from "./haproxy.ts";
import { Latencies, runLoad, startTokenStack, type LatencySummary } from "./fixtures/index.ts";
import type { Progress } from "./progress.ts";
import { countRecords, seedRecords, type Ports } from "./scenario.ts";

export interface BenchOptions {
  /** Seconds each case runs in all, split over the rounds. */
  durationS: number;
  concurrency: number;
  cluster: Cluster;
  ports: Ports;
  db: string;
  tokenDb: string;
  progress: Progress;
  /** Run only the cases whose id starts with one of these (all when empty). */
  only?: string[];
}

export interface CaseResult {
  id: string;
  label: string;
  unit: "req/s" | "ops/s";
  rate: number;
  count: number;
  errors: number;
  errorSamples: string[];
  latency: LatencySummary | null;
}

export interface Comparison {
  label: string;
  value: number;
  unit: "x" | "ms" | "%" | "errors";
  /** e.g. "≥ 1.00x"; absent for a figure with no goal. */
  goal?: string;
  met?: boolean;
  detail: string;
}

export interface BenchReport {
  date: string;
  machine: { cpus: number; cpuModel: string; memoryGiB: number; platform: string };
  versions: Record<string, string>;
  options: { durationS: number; concurrency: number; rounds: number; records: number };
  results: CaseResult[];
  comparisons: Comparison[];
}

const SEEDED_RECORDS = 1000;
const FERNET_PLAINTEXT = "x".repeat(1024);
/** The bench's own health-check settings, the same for the coordinator and HAProxy. */
const HEALTH = { intervalMs: 1000, timeoutMs: 1000, fall: 2, rise: 2 };

interface Slice {
  rate: number;
  count: number;
  errors: number;
  errorSamples: string[];
  latencies?: Latencies;
}

interface BenchCase {
  id: string;
  label: string;
  unit: CaseResult["unit"];
  /** Runs the case for `ms` and reports what it did. */
  run(ms: number): Promise<Slice>;
}

/** Python's cryptography, timed by Python itself for `seconds`: Fernet encrypt, Fernet decrypt, or RSA-OAEP decrypt. */
const PYTHON_TIMERS = `
import sys, time, base64
what, seconds = sys.argv[1], float(sys.argv[2])
def rate(op):
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(50): op()
        n += 50
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds: return n / elapsed
if what in ("fernet-encrypt", "fernet-decrypt"):
    from cryptography.fernet import Fernet
    f = Fernet(sys.stdin.read().strip().encode())
    message = b"x" * 1024
    token = f.encrypt(message)
    print(rate(lambda: f.encrypt(message)) if what == "fernet-encrypt" else rate(lambda: f.decrypt(token)))
else:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    key = serialization.load_pem_private_key(sys.stdin.read().encode(), None)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = key.public_key().encrypt(b"k" * 32, oaep)
    print(rate(lambda: key.decrypt(wrapped, oaep)))
`;

async function pythonRate(what: string, ms: number, stdin: string): Promise<Slice> {
  const out = await runPython(PYTHON_TIMERS, stdin, {}, [what, String(ms / 1000)]);
  const rate = Number(out);
  return { rate, count: Math.round((rate * ms) / 1000), errors: 0, errorSamples: [] };
}

/** A tight in-process loop for `ms`, checked in batches so the clock is not read every operation. */
function localRate(ms: number, op: () => unknown): Slice {
  let count = 0;
  const started = performance.now();
  let elapsed = 0;
  while (elapsed < ms) {
    for (let i = 0; i < 100; i++) op();
    count += 100;
    elapsed = performance.now() - started;
  }
  return { rate: (count * 1000) / elapsed, count, errors: 0, errorSamples: [] };
}

async function loadSlice(options: BenchOptions, label: string, ms: number, request: (worker: number) => Promise<boolean | string>, during?: (elapsedMs: number) => void): Promise<Slice> {
  const run = await runLoad({ concurrency: options.concurrency, durationMs: ms, request, progress: options.progress, label, during });
  return { rate: (run.requests * 1000) / run.elapsedMs, count: run.requests, errors: run.errors, errorSamples: run.errorSamples, latencies: run.latencies };
}

export async function runBench(options: BenchOptions): Promise<BenchReport> {
  const { cluster, ports, progress, durationS } = options;
  const rounds = Math.max(1, Math.min(5, Math.floor(durationS / 2)));
  const sliceMs = (durationS * 1000) / rounds;

  const haproxyVersion = ensureHaproxy((line) => progress.line(line));
  const pythonVersions = await runPython("import sys, cryptography; print(sys.version.split()[0], cryptography.__version__)");
  const [pythonVersion, cryptographyVersion] = pythonVersions.split(" ");

  progress.line(`bench: seeding ${SEEDED_RECORDS} records, starting 2 servers, the coordinator, HAProxy and the KeyServer`);
  await seedRecords(options.db, cluster.pki, SEEDED_RECORDS);
  const servers = await Promise.all([cluster.startServer("server1", ports.server1), cluster.startServer("server2", ports.server2)]);
  const healthArgs = ["--health-interval", String(HEALTH.intervalMs), "--health-timeout", String(HEALTH.timeoutMs), "--fall", String(HEALTH.fall), "--rise", String(HEALTH.rise)];
  const coordinator = await cluster.startCoordinator("coordinator", ports.coordinator, servers, healthArgs);
  // The direct path and HAProxy forward as the coordinator does: with its forwarder assertion (#11).
  const coordinatorIdentity = loadIdentity(cluster.pki, "coordinator");
  const coordinatorSigner = new ProofSigner(coordinatorIdentity);
  const forwarderAssertion = () => coordinatorSigner.forwarderAssertion();
  const haproxyProcess = await startHaproxy(cluster, { pki: cluster.pki, dir: cluster.logDir, port: ports.haproxy, servers, health: HEALTH, forwarderAssertion });
  const haproxy = haproxyProcess.url;
  // The load generator asks for client1 far faster than any real client: a per-caller nonce quota fit for it.
  const tokens = await startTokenStack({ cluster, ports, tokenDb: options.tokenDb, keyserverArgs: ["--replay-quota", "1000000"] });

  // The same roles on Deno beside the Bun ones (#12), on the same store, the same token table and keys: two
  // servers behind a coordinator, and a KeyServer. Each case runs alone, so the idle set costs the other little.
  progress.line("bench: starting 2 servers, a coordinator and a KeyServer on Deno beside them");
  for (const name of ["deno-server1", "deno-server2", "deno-coordinator", "deno-keyserver"]) cluster.pinRuntime(name, "deno");
  const denoServers = await Promise.all([cluster.startServer("deno-server1", 0), cluster.startServer("deno-server2", 0)]);
  const denoCoordinator = await cluster.startCoordinator("deno-coordinator", 0, denoServers, healthArgs);
  const denoKeyserver = await cluster.startRole("deno-keyserver", "keyserver", ["0", "--data", tokens.dataDir, "--db", options.tokenDb, "--replay-quota", "1000000"]);

  // Each worker speaks with its own client's certificate, alternating client1 and client2.
  const identities = ["client1", "client2"].map((name) => loadIdentity(cluster.pki, name));
  const clientTls = identities.map(mutualTlsClientOptions);
  const fernet = new Fernet(loadFernetKeys(cluster.pki));
  const direct = servers[0]!;
  const writers = (target: string) => identities.map((identity) =>
    new MeshClient({ identity, fernet, coordinators: [target], attempts: 1, forwardedBy: target === direct ? coordinatorIdentity : undefined }));
  const writerFor = new Map([direct, coordinator, haproxy, denoCoordinator].map((target) => [target, writers(target)] as const));

  // A client re-uses a read proof while it is young, as servers cache verified proofs: one signature per proof.
  const readers = writerFor.get(coordinator)!;
  const readProofs = readers.map(() => ({ headers: {} as Record<string, string>, signedAt: -Infinity }));
  const readProof = async (worker: number) => {
    const proof = readProofs[worker % 2]!;
    if (performance.now() - proof.signedAt > (PROOF_LIFETIME_S * 1000) / 2) {
      proof.signedAt = performance.now();
      proof.headers = await readers[worker % 2]!.readProof("/api/get_cached_data");
    }
    return proof.headers[PROOF_HEADER]!;
  };
  const read = (target: string, refresh: boolean) => async (worker: number) => {
    const response = await fetch(`${target}/api/get_cached_data`, {
      headers: {
        [PROOF_HEADER]: await readProof(worker),
        ...(target === direct ? { [FORWARDER_HEADER]: await forwarderAssertion() } : {}),
        ...(refresh ? { "cache-control": "no-cache" } : {}),
      },
      tls: clientTls[worker % 2],
      signal: AbortSignal.timeout(5000),
    });
    const body = (await response.json()) as { cached?: boolean };
    return response.status === 200 && body.cached === !refresh ? true : `answered ${response.status}, cached=${body.cached}`;
  };
  const write = (target: string) => async (worker: number) => {
    const { status, body } = await writerFor.get(target)![worker % 2]!.sendData(`bench ${worker}`);
    return status === 200 ? true : `answered ${status}: ${JSON.stringify(body)}`;
  };

  const keyserverTls = mutualTlsClientOptions(loadIdentity(cluster.pki, "secureproxy"));
  const publicPem = ((await (await fetch(`${tokens.keyserver}/public_key`, { tls: keyserverTls })).json()) as { public_key: string }).public_key;
  const keyserverKey = createPublicKey(publicPem);
  const release = (keyserver: string) => async () => {
    const prepared = await prepareJoseRequest(keyserverKey, "client1", "marketplace");
    // As the SecureProxy asks: for client1, whose proxy.use the KeyServer checks again (#11).
    const headers = { "content-type": prepared.contentType, [ON_BEHALF_OF_HEADER]: "spiffe://securemesh/client/client1" };
    const response = await fetch(keyserver, { method: "POST", headers, body: prepared.body, tls: keyserverTls, signal: AbortSignal.timeout(5000) });
    if (response.status !== 200) return `answered ${response.status}`;
    return (await openJoseResponse(await response.text(), prepared.sessionKey)) === tokens.token || "wrong token";
  };
  const rsaKeyPem = readFileSync(join(tokens.dataDir, "rsa_key.pem"), "utf8");
  const fernetKey = readFileSync(join(cluster.pki, "encryption_key.txt"), "utf8");
  const token = fernet.encrypt(FERNET_PLAINTEXT);

  /**
   * A cached-read case: the servers behind `target` first read through once (uncounted, round-robin reaches each of
   * them), so the case measures cached reads whatever wrote into the shared store before it.
   */
  const cachedReads = async (id: string, ms: number, target: string, servers: number) => {
    for (let i = 0; i < servers; i++) await read(target, true)(i);
    return loadSlice(options, id, ms, read(target, false));
  };
  const cases: BenchCase[] = [
    { id: "a-read", label: "a. direct to server 1: cached read", unit: "req/s", run: (ms) => cachedReads("a-read", ms, servers[0]!, 1) },
    { id: "b-read", label: "b. coordinator, 2 servers: cached read", unit: "req/s", run: (ms) => cachedReads("b-read", ms, coordinator, 2) },
    { id: "c-read", label: "c. HAProxy, 2 servers: cached read", unit: "req/s", run: (ms) => cachedReads("c-read", ms, haproxy, 2) },
    { id: "h-read-deno", label: "h. coordinator and 2 servers on Deno: cached read", unit: "req/s", run: (ms) => cachedReads("h-read-deno", ms, denoCoordinator, 2) },
    { id: "a-write", label: "a. direct to server 1: POST /api/data", unit: "req/s", run: (ms) => loadSlice(options, "a-write", ms, write(servers[0]!)) },
    { id: "b-write", label: "b. coordinator, 2 servers: POST /api/data", unit: "req/s", run: (ms) => loadSlice(options, "b-write", ms, write(coordinator)) },
    { id: "c-write", label: "c. HAProxy, 2 servers: POST /api/data", unit: "req/s", run: (ms) => loadSlice(options, "c-write", ms, write(haproxy)) },
    { id: "h-write-deno", label: "h. coordinator and 2 servers on Deno: POST /api/data", unit: "req/s", run: (ms) => loadSlice(options, "h-write-deno", ms, write(denoCoordinator)) },
    { id: "f-uncached", label: "f. coordinator: uncached get_data() read", unit: "req/s", run: (ms) => loadSlice(options, "f-uncached", ms, read(coordinator, true)) },
    { id: "d-encrypt", label: "d. securemesh Fernet encrypt 1 KiB", unit: "ops/s", run: async (ms) => localRate(ms, () => fernet.encrypt(FERNET_PLAINTEXT)) },
    { id: "d-encrypt-python", label: "d. Python cryptography Fernet encrypt 1 KiB", unit: "ops/s", run: (ms) => pythonRate("fernet-encrypt", ms, fernetKey) },
    { id: "d-decrypt", label: "d. securemesh Fernet decrypt 1 KiB", unit: "ops/s", run: async (ms) => localRate(ms, () => fernet.decrypt(token)) },
    { id: "d-decrypt-python", label: "d. Python cryptography Fernet decrypt 1 KiB", unit: "ops/s", run: (ms) => pythonRate("fernet-decrypt", ms, fernetKey) },
    { id: "e-releases", label: "e. KeyServer token releases (JOSE, mutual TLS)", unit: "req/s", run: (ms) => loadSlice(options, "e-releases", ms, release(tokens.keyserver)) },
    { id: "e-rsa-bound", label: "e. RSA-2048 OAEP private decrypts, one core (Python/OpenSSL)", unit: "ops/s", run: (ms) => pythonRate("rsa-decrypt", ms, rsaKeyPem) },
    { id: "h-releases-deno", label: "h. KeyServer on Deno: token releases", unit: "req/s", run: (ms) => loadSlice(options, "h-releases-deno", ms, release(denoKeyserver)) },
  ];

  const only = options.only ?? [];
  const selected = only.length === 0 ? cases : cases.filter((c) => only.some((prefix) => c.id.startsWith(prefix)));
  expectThat(selected.length > 0, `--only ${only.join(",")} matches no case (cases: ${cases.map((c) => c.id).join(", ")})`);
  cases.splice(0, cases.length, ...selected);
  progress.line(`bench: warming up every case (${cases.length} cases, 300 ms each, not counted)`);
  for (const c of cases) await c.run(300);

  const slices = new Map<string, Slice[]>(cases.map((c) => [c.id, []]));
  for (let round = 1; round <= rounds; round++) {
    for (const c of cases) {
      progress.status(`round ${round}/${rounds} ${c.id}`);
      const slice = await c.run(sliceMs);
      slices.get(c.id)!.push(slice);
      if (!progress.tty) progress.line(`  round ${round}/${rounds} ${c.id}: ${Math.round(slice.rate).toLocaleString("en")} ${c.unit}${slice.errors ? `, ${slice.errors} errors` : ""} (${progress.elapsed()})`);
    }
  }

  // g: failover under load, after the interleaved cases since it kills a server they use.
  const runFailover = only.length === 0 || only.some((prefix) => "g-failover".startsWith(prefix));
  if (runFailover) {
    progress.line(`bench: g. failover: POST /api/data through the coordinator for ${durationS} s, server 2 killed at a third of it`);
    let killed = false;
    const failover = await loadSlice(options, "g-failover", durationS * 1000, write(coordinator), (elapsed) => {
      if (!killed && elapsed >= (durationS * 1000) / 3) {
        killed = true;
        void cluster.kill("server2");
      }
    });
    expectThat(killed, "the failover case never killed server 2");
    slices.set("g-failover", [failover]);
  }

  haproxyProcess.close();
  const results: CaseResult[] = cases.map((c) => summarize(c.id, c.label, c.unit, slices.get(c.id)!));
  if (runFailover) results.push(summarize("g-failover", "g. coordinator POST /api/data, server 2 killed part-way", "req/s", slices.get("g-failover")!));
  const records = await countRecords(options.db);

  return {
    date: new Date().toISOString(),
    machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model.trim() ?? "unknown", memoryGiB: Math.round(totalmem() / 2 ** 30), platform: `${process.platform} ${process.arch}` },
    versions: { bun: Bun.version, haproxy: haproxyVersion, python: pythonVersion ?? "?", cryptography: cryptographyVersion ?? "?", pythonPath: PYTHON },
    options: { durationS, concurrency: options.concurrency, rounds, records },
    results,
    comparisons: compare(results),
  };
}

function summarize(id: string, label: string, unit: CaseResult["unit"], parts: Slice[]): CaseResult {
  const count = parts.reduce((n, s) => n + s.count, 0);
  // The mean of the slices' rates: every slice ran the same time, so this is total work over total time.
  const rate = parts.reduce((n, s) => n + s.rate, 0) / parts.length;
  const withLatency = parts.filter((s) => s.latencies);
  let latency: LatencySummary | null = null;
  if (withLatency.length > 0) {
    const all = new Latencies();
    for (const s of withLatency) all.merge(s.latencies!);
    latency = all.summary();
  }
  return { id, label, unit, rate, count, errors: parts.reduce((n, s) => n + s.errors, 0), errorSamples: parts.flatMap((s) => s.errorSamples).slice(0, 5), latency };
}

function compare(results: CaseResult[]): Comparison[] {
  const by = (id: string) => results.find((r) => r.id === id)!;
  const out: Comparison[] = [];
  // With --only, a comparison is made only when every case it needs ran.
  const ran = (...ids: string[]) => ids.every((id) => results.some((r) => r.id === id));
  for (const route of ["read", "write"] as const) {
    if (!ran(`a-${route}`, `b-${route}`, `c-${route}`)) continue;
    const [a, b, c] = [by(`a-${route}`), by(`b-${route}`), by(`c-${route}`)];
    const what = route === "read" ? "cached read" : "POST /api/data";
    const throughput = b.rate / c.rate;
    out.push({ label: `coordinator / HAProxy throughput, ${what}`, value: throughput, unit: "x", goal: "≥ 1.00x", met: throughput >= 1, detail: `${fmt(b.rate)} vs ${fmt(c.rate)} req/s` });
    const addedB = b.latency!.p50 - a.latency!.p50;
    const addedC = c.latency!.p50 - a.latency!.p50;
    out.push({ label: `added p50 over direct, ${what}: coordinator vs HAProxy`, value: addedB - addedC, unit: "ms", goal: "coordinator ≤ HAProxy", met: addedB <= addedC, detail: `+${addedB.toFixed(2)} ms vs +${addedC.toFixed(2)} ms (direct p50 ${a.latency!.p50.toFixed(2)} ms)` });
    out.push({ label: `coordinator / direct throughput, ${what}`, value: b.rate / a.rate, unit: "x", detail: `${fmt(b.rate)} vs ${fmt(a.rate)} req/s` });
  }
  for (const op of ["encrypt", "decrypt"] as const) {
    if (!ran(`d-${op}`, `d-${op}-python`)) continue;
    const ours = by(`d-${op}`);
    const python = by(`d-${op}-python`);
    out.push({ label: `Fernet ${op} 1 KiB / Python cryptography`, value: ours.rate / python.rate, unit: "x", goal: "≥ 3.00x", met: ours.rate / python.rate >= 3, detail: `${fmt(ours.rate)} vs ${fmt(python.rate)} ops/s` });
  }
  if (ran("e-releases", "e-rsa-bound")) {
    const releases = by("e-releases");
    const bound = by("e-rsa-bound");
    out.push({ label: "token releases / RSA-2048 OAEP decrypt bound", value: (100 * releases.rate) / bound.rate, unit: "%", goal: "≥ 70%", met: releases.rate / bound.rate >= 0.7, detail: `${fmt(releases.rate)} releases/s vs ${fmt(bound.rate)} decrypts/s` });
  }
  if (ran("b-read", "f-uncached")) {
    const cached = by("b-read");
    const uncached = by("f-uncached");
    out.push({ label: "cached / uncached get_data() reads via coordinator", value: cached.rate / uncached.rate, unit: "x", detail: `${fmt(cached.rate)} vs ${fmt(uncached.rate)} req/s; p50 ${cached.latency!.p50.toFixed(2)} vs ${uncached.latency!.p50.toFixed(2)} ms` });
  }
  // The roles on Deno against the same roles on Bun, in the same run (#12).
  for (const [deno, bun, what, unit] of [["h-read-deno", "b-read", "coordinator + servers, cached read", "req/s"], ["h-write-deno", "b-write", "coordinator + servers, POST /api/data", "req/s"], ["h-releases-deno", "e-releases", "KeyServer token releases", "releases/s"]] as const) {
    if (!ran(deno, bun)) continue;
    out.push({ label: `Deno / Bun throughput, ${what}`, value: by(deno).rate / by(bun).rate, unit: "x", detail: `${fmt(by(deno).rate)} vs ${fmt(by(bun).rate)} ${unit}` });
  }
  if (ran("g-failover", "b-write")) {
    const failover = by("g-failover");
    const steady = by("b-write");
    out.push({ label: "errors while a server is killed under load", value: failover.errors, unit: "errors", goal: "0 errors", met: failover.errors === 0, detail: `${failover.count} requests; p99 ${failover.latency!.p99.toFixed(1)} ms vs ${steady.latency!.p99.toFixed(1)} ms steady` });
  }
  return out;
}

export function fmt(n: number): string {
  return Math.round(n).toLocaleString("en");
}
