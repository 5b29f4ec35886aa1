// The floor under the coordinator, for the bench only: Bun.serve with mutual TLS in front, kept-alive mutual TLS
// behind, round-robin, nothing else (no Elysia, no health checks, no failover, no access log, no metrics) but what
// the hop must do for security: every upstream connection checked at its handshake for a server identity, through
// the HttpsClient the coordinator uses (Bun's fetch can only check it by opening a connection per request). What
// the coordinator costs above this is securemesh's; what this costs above HAProxy is Bun's.
// Usage: bun harness/bare-proxy.ts SERVER_URL… (the coordinator's identity from $PKI_DIR; servers decide `forward`
// on that certificate).
import { expectPeer } from "../shared/authz/expect-peer.ts";
import { pkiDir } from "../shared/platform/config.ts";
import { HttpsClient } from "../shared/platform/https-client.ts";
import { loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions } from "../shared/platform/tls.ts";

const servers = process.argv.slice(2);
if (servers.length === 0) throw new Error("usage: bare-proxy.ts SERVER_URL…");
const identity = loadIdentity(pkiDir(), "coordinator");
const upstream = new HttpsClient({ tls: { ...mutualTlsClientOptions(identity), checkServerIdentity: expectPeer("spiffe://securemesh/server/*") } });
let next = 0;

const server = Bun.serve({
  port: 0,
  hostname: "127.0.0.1",
  reusePort: false,
  tls: mutualTlsServerOptions(identity),
  async fetch(request) {
    const url = new URL(request.url);
    const headers: Record<string, string> = {};
    request.headers.forEach((value, name) => {
      if (name !== "host") headers[name] = value;
    });
    const body = request.method === "GET" || request.method === "HEAD" ? undefined : new Uint8Array(await request.arrayBuffer());
    const answer = await upstream.request(servers[next++ % servers.length] + url.pathname + url.search, {
      method: request.method,
      headers,
      body,
      timeoutMs: 5000,
      idempotent: request.method === "GET" || request.headers.has("idempotency-key"),
    });
    return new Response(answer.body, { status: answer.status, headers: { "content-type": answer.header("content-type") ?? "application/json" } });
  },
});
console.log(`bare proxy listening on https://127.0.0.1:${server.port}`);
