// Run under Deno by runtime.test.ts (`deno run -A shared/platform/runtime/runtime.deno-check.ts`), never by
// `bun test` (the name keeps it out of bun's *.test.ts pattern). It starts the listeners the roles use, on Deno,
// with the PKI in $PKI_DIR, checks the outbound side in-process, prints one JSON line, and serves until its stdin
// closes. The Bun test then attacks the listeners from another process, with real certificates.
import { createHmac } from "node:crypto";
import net from "node:net";
import { text } from "node:stream/consumers";
import { expectPeer, tlsPeerIdentity, TrustMaterial } from "../../authz/index.ts";
import { createApp, listenReloadable, peerOf, readBodyLimited } from "../http.ts";
import { HttpsClient } from "../https-client.ts";
import { mutualTlsClientOptions, mutualTlsServerOptions } from "../tls.ts";
import { createLogger } from "../../ops/log.ts";
import { OTHER_HOST, outboundHostChecks, SAN_HOST } from "../../testing/host-checks.ts";
import { runtime } from "./index.ts";

const dir = process.env.PKI_DIR!;
const logger = createLogger("deno-check", { write: () => {} });
const trust = TrustMaterial.open(dir, "server");
const app = () =>
  createApp({ logger })
    .get("/who", ({ request }) => ({ peer: peerOf(request)?.identity ?? null }))
    .post("/echo", async ({ request }) => ({ bytes: (await readBodyLimited(request)).byteLength }), { parse: "none" });

// A listener as the roles run it: the live revocation check, and whom a certificate names.
const live = await listenReloadable(app(), {
  port: 0,
  hostname: "127.0.0.1",
  tls: mutualTlsServerOptions(trust.identity),
  identify: tlsPeerIdentity,
  isRevoked: (serial) => trust.isRevoked(serial),
});

/** What an outbound call ended with: its status, or its error's name and code. */
async function outcome(call: Promise<{ status: number; json(): unknown }>): Promise<Record<string, unknown>> {
  try {
    const response = await call;
    return { status: response.status, body: response.json() };
  } catch (error) {
    return { error: (error as Error).name, code: (error as { code?: unknown }).code ?? null, message: (error as Error).message };
  }
}

// A server certificate for SAN_HOST only (issued by the Bun test as "elsewhere"), served there and on OTHER_HOST.
const elsewhere = mutualTlsServerOptions(TrustMaterial.open(dir, "elsewhere").identity);
const [sanHost, otherHost] = await Promise.all(
  [SAN_HOST, OTHER_HOST].map((hostname) =>
    listenReloadable(app(), { port: 0, hostname, tls: elsewhere, identify: tlsPeerIdentity, isRevoked: (serial) => trust.isRevoked(serial) }),
  ),
);

const client = mutualTlsClientOptions(TrustMaterial.open(dir, "coordinator").identity);
const expecting = (expected: string) => new HttpsClient({ tls: { ...client, checkServerIdentity: expectPeer(expected) } });
const base = `https://127.0.0.1:${live.port}`;
const closedPort = await new Promise<number>((resolve) => {
  const probe = net.createServer();
  probe.listen(0, "127.0.0.1", () => {
    const { port } = probe.address() as net.AddressInfo;
    probe.close(() => resolve(port));
  });
});
const server = expecting("spiffe://securemesh/server/*");
const keptAlive = await (async () => {
  for (let i = 0; i < 50; i++) await server.request(`${base}/who`, { timeoutMs: 5000 });
  return server.connections()[`127.0.0.1:${live.port}`];
})();
const untrusted = new HttpsClient({
  tls: { rejectUnauthorized: true, ca: TrustMaterial.open(process.env.OTHER_PKI_DIR!, "server").identity.ca, cert: client.cert, key: client.key },
});
const outbound = {
  rightIdentity: await outcome(server.request(`${base}/who`, { timeoutMs: 5000 })),
  wrongIdentity: await outcome(expecting("spiffe://securemesh/keyserver/*").request(`${base}/who`, { timeoutMs: 5000 })),
  postWithIdentity: await outcome(server.request(`${base}/echo`, { method: "POST", body: "hello", timeoutMs: 5000 })),
  keptAlive,
  refused: await outcome(server.request(`https://127.0.0.1:${closedPort}/`, { timeoutMs: 5000 })),
  untrusted: await outcome(untrusted.request(`${base}/who`, { timeoutMs: 5000 })),
  hostChecks: await outboundHostChecks(client, { sanHost: sanHost!.port, otherHost: otherHost!.port }),
  hmacMatches: runtime.hmacSha256(Buffer.from("k"), Buffer.from("data")).equals(createHmac("sha256", "k").update("data").digest()),
  runtime: runtime.name,
};
console.log(JSON.stringify({ live: live.port, outbound }));
await text(process.stdin);
await Promise.all([live.stop(true), sanHost!.stop(true), otherHost!.stop(true)]);
process.exit(0);
