// The floor under the coordinator, for the bench only: Bun.serve with mutual TLS in front, Bun's fetch with mutual TLS
// behind, round-robin, nothing else (no Elysia, no health checks, no failover, no access log, no metrics, no
// identity checks). What the coordinator costs above this is securemesh's; what this costs above HAProxy is Bun's.
// Usage: bun harness/bare-proxy.ts SERVER_URL… (the coordinator's identity from $PKI_DIR; it signs its forwarder
// assertion as the coordinator does, once a minute, not per request).
import { FORWARDER_HEADER, ProofSigner } from "../shared/request-path/proof.ts";
import { pkiDir } from "../shared/platform/config.ts";
import { loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions } from "../shared/platform/tls.ts";

const servers = process.argv.slice(2);
if (servers.length === 0) throw new Error("usage: bare-proxy.ts SERVER_URL…");
const identity = loadIdentity(pkiDir(), "coordinator");
const upstreamTls = mutualTlsClientOptions(identity);
const signer = new ProofSigner(identity);
let next = 0;

const server = Bun.serve({
  port: 0,
  hostname: "127.0.0.1",
  reusePort: false,
  tls: mutualTlsServerOptions(identity),
  async fetch(request) {
    const url = new URL(request.url);
    const headers = new Headers(request.headers);
    headers.set(FORWARDER_HEADER, await signer.forwarderAssertion());
    const upstream = await fetch(servers[next++ % servers.length] + url.pathname + url.search, {
      method: request.method, headers, body: request.body, tls: upstreamTls,
    } as RequestInit);
    return new Response(upstream.body, { status: upstream.status, headers: { "content-type": upstream.headers.get("content-type") ?? "application/json" } });
  },
});
console.log(`bare proxy listening on https://127.0.0.1:${server.port}`);
