// Run under Deno by runtime.test.ts (`deno run -A shared/platform/runtime/runtime.deno-check.ts`), never by
// `bun test` (the name keeps it out of bun's *.test.ts pattern). It starts the listeners the roles use, on Deno,
// with the PKI in $PKI_DIR, checks the outbound side in-process, prints one JSON line, and serves until its stdin
// closes. The Bun test then attacks the listeners from another process, with real certificates.
import { createHmac } from "node:crypto";
import net from "node:net";
import { text } from "node:stream/consumers";
import { expectPeer, TrustMaterial } from "../../authz/index.ts";
import { createApp, listenReloadable, readBodyLimited } from "../http.ts";
import { listenWithPeerIdentity, PEER_HEADER } from "../peer-tls.ts";
import { mutualTlsClientOptions, mutualTlsServerOptions } from "../tls.ts";
import { createLogger } from "../../ops/log.ts";
import { OTHER_HOST, outboundHostChecks, SAN_HOST } from "../../testing/host-checks.ts";
import { runtime } from "./index.ts";

const dir = process.env.PKI_DIR!;
const logger = createLogger("deno-check", { write: () => {} });
const trust = TrustMaterial.open(dir, "server");
const app = () => createApp({ logger })
  .get("/who", ({ request }) => ({ peer: request.headers.get(PEER_HEADER) ?? null }))
  .post("/echo", async ({ request }) => ({ bytes: (await readBodyLimited(request)).byteLength }), { parse: "none" });

// The Elysia listener of server and coordinator: its CRL from tls.crl, as a role without isRevoked would have it.
const mutual = await listenReloadable(app(), { port: 0, hostname: "127.0.0.1", tls: mutualTlsServerOptions(trust.identity) });
// The peer-identity listener of KeyServer and SecureProxy, with a short header deadline for the test.
const peer = await listenWithPeerIdentity(app(), {
  port: 0, hostname: "127.0.0.1", tls: mutualTlsServerOptions(trust.identity), headerDeadlineMs: 1000,
  isRevoked: (serial) => trust.isRevoked(serial),
});

/** What an outbound call ended with: its status, or its error's name and code. */
async function outcome(call: Promise<Response>): Promise<Record<string, unknown>> {
  try {
    const response = await call;
    return { status: response.status, body: await response.json() };
  } catch (error) {
    return { error: (error as Error).name, code: (error as { code?: unknown }).code ?? null, message: (error as Error).message };
  }
}

// A server certificate for SAN_HOST only (issued by the Bun test as "elsewhere"), served there and on OTHER_HOST.
const elsewhere = mutualTlsServerOptions(TrustMaterial.open(dir, "elsewhere").identity);
const [sanHost, otherHost] = await Promise.all([SAN_HOST, OTHER_HOST].map((hostname) => listenReloadable(app(), { port: 0, hostname, tls: elsewhere })));

const client = loadClientTls();
function loadClientTls() {
  const coordinator = TrustMaterial.open(dir, "coordinator").identity;
  return mutualTlsClientOptions(coordinator);
}
const base = `https://127.0.0.1:${mutual.port}`;
const closedPort = await new Promise<number>((resolve) => {
  const probe = net.createServer();
  probe.listen(0, "127.0.0.1", () => {
    const { port } = probe.address() as net.AddressInfo;
    probe.close(() => resolve(port));
  });
});
const outbound = {
  plain: await outcome(runtime.fetch(`${base}/who`, { tls: client })),
  rightIdentity: await outcome(runtime.fetch(`${base}/who`, { tls: { ...client, checkServerIdentity: expectPeer("spiffe://securemesh/server/*") } })),
  wrongIdentity: await outcome(runtime.fetch(`${base}/who`, { tls: { ...client, checkServerIdentity: expectPeer("spiffe://securemesh/keyserver/*") } })),
  postWithIdentity: await outcome(runtime.fetch(`${base}/echo`, { method: "POST", body: "hello", tls: { ...client, checkServerIdentity: expectPeer("spiffe://securemesh/server/*") } })),
  refused: await outcome(runtime.fetch(`https://127.0.0.1:${closedPort}/`, { tls: client })),
  refusedWithIdentity: await outcome(runtime.fetch(`https://127.0.0.1:${closedPort}/`, { tls: { ...client, checkServerIdentity: expectPeer("spiffe://securemesh/server/*") } })),
  untrusted: await outcome(runtime.fetch(`${base}/who`, { tls: { rejectUnauthorized: true, ca: TrustMaterial.open(process.env.OTHER_PKI_DIR!, "server").identity.ca, cert: client.cert, key: client.key } })),
  hostChecks: await outboundHostChecks(client, { sanHost: sanHost!.port, otherHost: otherHost!.port }),
  hmacMatches: runtime.hmacSha256(Buffer.from("k"), Buffer.from("data")).equals(createHmac("sha256", "k").update("data").digest()),
  runtime: runtime.name,
};
console.log(JSON.stringify({ mutual: mutual.port, peer: peer.port, outbound }));
await text(process.stdin);
await Promise.all([mutual.stop(true), peer.close(), sanHost!.stop(true), otherHost!.stop(true)]);
process.exit(0);
