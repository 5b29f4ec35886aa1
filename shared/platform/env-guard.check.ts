// Run by env-guard.test.ts under Bun and Deno, never by `bun test` itself: whether a call pinned to our CA (the
// roles' own outbound path, HttpsClient) accepts a server of another CA while NODE_EXTRA_CA_CERTS names that CA, with the
// guard run first (`--guard`) or not. Prints one JSON line. PKI_DIR is ours; OTHER_PKI_DIR the other CA's.
import https from "node:https";
import type { AddressInfo } from "node:net";
import { assertSafeEnvironment } from "./env-guard.ts";
import { HttpsClient } from "./https-client.ts";
import { loadIdentity, mutualTlsClientOptions } from "./tls.ts";

// As in a role: the guard before anything else reads a key or opens a connection.
const cleared = process.argv.includes("--guard") ? assertSafeEnvironment() : [];
const foreign = loadIdentity(process.env.OTHER_PKI_DIR!, "server");
const server = https.createServer({ cert: foreign.cert, key: foreign.key }, (_request, response) => response.end("foreign"));
await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
const url = `https://127.0.0.1:${(server.address() as AddressInfo).port}/`;
const client = new HttpsClient({ tls: mutualTlsClientOptions(loadIdentity(process.env.PKI_DIR!, "client1")) });
const outcome = await client.request(url, { timeoutMs: 5000 }).then(
  (response) => `accepted (${response.text()})`,
  () => "refused",
);
client.close();
server.close();
console.log(JSON.stringify({ cleared, outcome }));
process.exit(0);
