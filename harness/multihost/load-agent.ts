// The load of `bun harness multihost`, run on a client host (inside its namespace): workers send writes through the
// coordinators with the real client module, failing over between them, and optionally call the SecureProxies through
// the application's ProxyClient, failing over between them.
// One line per outcome on stdout, so the harness counts them; SIGTERM stops it after the requests in flight.
//
//   ack ID MS [failover]     a write acknowledged with record ID after MS ms (failover: after trying another coordinator first)
//   fail WHAT                a write that failed, and why
//   token ok PROXY [failover]  a call through a SecureProxy to the marketplace (failover: after trying another first)
//   token fail WHAT          one that failed, and why
//   done {"sent":…}          the totals, last
import { parseArgs } from "node:util";
import { createLogger, describeError } from "../../shared/ops/log.ts";
import { FernetKeys } from "../../shared/request-path/fernet-reload.ts";
import { MeshClient } from "../../shared/request-path/mesh-client.ts";
import { loadIdentity } from "../../shared/platform/tls.ts";
import { ProxyClient } from "../../shared/token-path/proxy-client.ts";

const { values } = parseArgs({
  options: {
    name: { type: "string" },
    pki: { type: "string" },
    coordinator: { type: "string", multiple: true },
    workers: { type: "string" },
    interval: { type: "string" },
    timeout: { type: "string" },
    proxy: { type: "string", multiple: true },
    "api-uri": { type: "string" },
    "proxy-timeout": { type: "string" },
    attempts: { type: "string" },
    backoff: { type: "string" },
  },
});
const name = values.name ?? "client1";
const pki = values.pki ?? process.env.PKI_DIR ?? "certs";
const coordinators = values.coordinator ?? [];
const workers = Number(values.workers ?? 2);
/** Each worker starts a request at most this often: the load is steady, not as fast as the two cores allow. */
const intervalMs = Number(values.interval ?? 50);
/** Per attempt at one coordinator; past it the client re-sends to the next with the same Idempotency-Key. */
const timeoutMs = Number(values.timeout ?? 5000);
/** The clients' rounds over every coordinator (MeshClient) and every proxy (ProxyClient), and the first backoff (doubled each round); their defaults when not given. */
const attempts = values.attempts === undefined ? undefined : Number(values.attempts);
const backoffMs = values.backoff === undefined ? undefined : Number(values.backoff);
if (
  coordinators.length === 0 ||
  !(workers > 0) ||
  !(intervalMs >= 0) ||
  !(timeoutMs > 0) ||
  (attempts !== undefined && !(attempts >= 1)) ||
  (backoffMs !== undefined && !(backoffMs >= 0))
) {
  console.error(
    "load-agent: needs --coordinator URL (repeatable), --workers N > 0, --interval MS >= 0, --timeout MS > 0; --attempts N >= 1, --backoff MS >= 0",
  );
  process.exit(2);
}

const identity = loadIdentity(pki, name);
// The keys follow the host's encryption_key.txt: a "rotate the Fernet key" row changes it under load.
const client = new MeshClient({
  identity,
  fernet: FernetKeys.open(pki).watch(createLogger(name)),
  coordinators,
  timeoutMs,
  ...(attempts === undefined ? {} : { attempts }),
  ...(backoffMs === undefined ? {} : { backoffMs }),
});
const totals = { sent: 0, acknowledged: 0, failed: 0, failedOver: 0, tokenCalls: 0, tokenFailed: 0, tokenFailedOver: 0 };
let stopping = false;
process.on("SIGTERM", () => {
  stopping = true;
});

const paced = async (fn: () => Promise<void>, everyMs = intervalMs) => {
  while (!stopping) {
    const started = performance.now();
    await fn();
    const rest = everyMs - (performance.now() - started);
    if (rest > 0 && !stopping) await Bun.sleep(rest); // the pace of a steady client, by design
  }
};

async function write(worker: number, i: number): Promise<void> {
  totals.sent += 1;
  const started = performance.now();
  try {
    const { status, body, attempts } = await client.sendData(`multihost ${name} ${worker}-${i}`);
    if (status === 200 && typeof body.id === "number") {
      totals.acknowledged += 1;
      const failover = attempts > 1;
      if (failover) totals.failedOver += 1;
      console.log(`ack ${body.id} ${Math.round(performance.now() - started)}${failover ? " failover" : ""}`);
    } else {
      totals.failed += 1;
      console.log(`fail ${status} ${JSON.stringify(body).slice(0, 200)}`);
    }
  } catch (error) {
    totals.failed += 1;
    console.log(`fail ${describeError(error).replace(/\n/g, " ")}`);
  }
}

const proxies = values.proxy?.length
  ? // Above a proxy's own budget for its KeyServers, so a slow release is the proxy's to report, not ours.
    new ProxyClient({
      identity,
      proxies: values.proxy,
      timeoutMs: Number(values["proxy-timeout"] ?? 20_000),
      ...(attempts === undefined ? {} : { attempts }),
      ...(backoffMs === undefined ? {} : { backoffMs }),
    })
  : undefined;
async function tokenCall(): Promise<void> {
  totals.tokenCalls += 1;
  try {
    const { status, body, proxy, attempts } = await proxies!.requestApi({ ClientId: name, TokenType: "marketplace", ApiUri: values["api-uri"]! });
    if (status === 200) {
      if (attempts > 1) totals.tokenFailedOver += 1;
      return void console.log(`token ok ${proxy}${attempts > 1 ? " failover" : ""}`);
    }
    totals.tokenFailed += 1;
    console.log(`token fail ${status} ${JSON.stringify(body).slice(0, 200)}`);
  } catch (error) {
    totals.tokenFailed += 1;
    console.log(`token fail ${describeError(error).replace(/\n/g, " ")}`);
  }
}

console.log(`ready ${name} → ${coordinators.join(", ")}`);
const loops = Array.from({ length: workers }, (_, worker) => {
  let i = 0;
  return paced(() => write(worker, i++));
});
// Token calls beside the writes, a quarter as often: each costs the KeyServer an RSA decryption.
if (proxies && values["api-uri"]) loops.push(paced(tokenCall, intervalMs * 4));
await Promise.all(loops);
proxies?.close();
console.log(`done ${JSON.stringify(totals)}`);
