// The floor under the coordinator, for the bench only: Bun.serve with mutual TLS in front, kept-alive mutual TLS
// behind, round-robin, nothing else (no Elysia, no health checks, no failover, no access log, no metrics) but what
// the hop must do for security: every upstream connection checked at its handshake for a server identity, through
// the HttpsClient the coordinator uses (Bun's fetch can only check it by opening a connection per request). What
// the coordinator costs above this is securemesh's; what this costs above HAProxy is Bun's.
// With --gate, the same behind the TLS gate the roles listen through on Bun (bun-gate.ts: Bun.listen for TLS, to see
// the caller's certificate, relayed to a loopback Bun.serve), so the bench can tell the gate's cost from the rest of
// the coordinator's. Its admission knows no revoked serial: a Set lookup less per request than a role's.
// Usage: bun harness/bare-proxy.ts [--gate] SERVER_URL… (the coordinator's identity from $PKI_DIR; servers decide
// `forward` on that certificate).
import { expectPeer, tlsPeerIdentity } from "../shared/authz/expect-peer.ts";
import { pkiDir } from "../shared/platform/config.ts";
import { HttpsClient } from "../shared/platform/https-client.ts";
import { Admission } from "../shared/platform/runtime/admission.ts";
import { serveThroughGate } from "../shared/platform/runtime/bun-gate.ts";
import { loadIdentity, mutualTlsClientOptions, mutualTlsServerOptions } from "../shared/platform/tls.ts";

const gated = process.argv[2] === "--gate";
const servers = process.argv.slice(gated ? 3 : 2);
if (servers.length === 0) throw new Error("usage: bare-proxy.ts [--gate] SERVER_URL…");
const identity = loadIdentity(pkiDir(), "coordinator");
const upstream = new HttpsClient({ tls: { ...mutualTlsClientOptions(identity), checkServerIdentity: expectPeer("spiffe://securemesh/server/*") } });
let next = 0;

async function forward(request: Request): Promise<Response> {
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
}

const tls = mutualTlsServerOptions(identity);
let port: number;
if (gated) {
  const listener = await serveThroughGate(
    { fetch: forward, handle: async (request) => forward(request), config: {}, server: null, compile: () => undefined },
    {
      port: 0,
      hostname: "127.0.0.1",
      tls,
      sharePort: false,
      admission: new Admission({ mutual: true, ca: tls.ca, identify: tlsPeerIdentity, isRevoked: () => false }),
      fetch: forward,
      serve: {},
      probePortFree: async () => {},
      listenError: (error) => {
        throw error;
      },
    },
  );
  port = listener.port;
} else {
  port = Bun.serve({ port: 0, hostname: "127.0.0.1", reusePort: false, tls, fetch: forward }).port!;
}
console.log(`bare proxy${gated ? " behind the TLS gate" : ""} listening on https://127.0.0.1:${port}`);
