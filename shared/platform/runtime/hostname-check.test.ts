// No hop matches a host name against a certificate's common name: pki.sh's leaves carry CN=NAME, and an identity
// named like a host would otherwise pass for it (found by attack on #14).
import { expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync } from "node:fs";
import type tls from "node:tls";
import { issueIdentity, newPki } from "../../testing/pki.ts";
import { expectPeer } from "../../authz/expect-peer.ts";
import { hostnameRefusal } from "./hostname-check.ts";
import { HttpsClient } from "../https-client.ts";

setDefaultTimeout(30_000);

test("a certificate with no DNS name names no host, whatever its CN; addresses still match their IP SANs", () => {
  const addressOnly = {
    subject: { CN: "localhost" },
    subjectaltname: "URI:spiffe://securemesh/server/localhost, IP Address:10.9.9.9",
  } as unknown as tls.PeerCertificate;
  expect(hostnameRefusal("localhost", addressOnly)).toBeInstanceOf(Error);
  expect(hostnameRefusal("10.9.9.9", addressOnly)).toBeUndefined();
  expect(hostnameRefusal("10.9.9.8", addressOnly)).toBeInstanceOf(Error);
  const named = { subject: { CN: "x" }, subjectaltname: "DNS:server1.mesh.test, IP Address:10.9.9.9" } as unknown as tls.PeerCertificate;
  expect(hostnameRefusal("server1.mesh.test", named)).toBeUndefined();
});

test("pki.sh gives an address-only identity a .invalid DNS name, so neither a checked nor a plain fetch takes its CN for a host", async () => {
  const dir = await newPki("hostname-cn");
  await issueIdentity(dir, "localhost", "server", { sans: ["IP:127.0.0.1"] });
  const cert = readFileSync(`${dir}/localhost_cert.pem`, "utf8");
  const server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    tls: { cert, key: readFileSync(`${dir}/localhost_key.pem`, "utf8") },
    fetch: () => new Response("ok"),
  });
  try {
    const ca = readFileSync(`${dir}/ca_cert.pem`, "utf8");
    const reach = async (url: string, checked: boolean) => {
      try {
        const tlsOptions = { ca, rejectUnauthorized: true, ...(checked ? { checkServerIdentity: expectPeer("spiffe://securemesh/server/*") } : {}) } as const;
        const client = new HttpsClient({ tls: tlsOptions });
        try {
          return (await client.request(url, { timeoutMs: 5000 })).status;
        } finally {
          client.close();
        }
      } catch (error) {
        return (error as { code?: string }).code ?? "refused";
      }
    };
    // By its address the certificate is good; by the name in its CN it is not, checked or plain.
    expect(await reach(`https://127.0.0.1:${server.port}/`, true)).toBe(200);
    expect(await reach(`https://localhost:${server.port}/`, true)).toBe("ERR_TLS_HOSTNAME");
    expect(await reach(`https://localhost:${server.port}/`, false)).toBe("ERR_TLS_HOSTNAME");
    // Bun's own fetch, which falls back to the CN when a certificate has no DNS name: the .invalid name stops it.
    const plain = await fetch(`https://localhost:${server.port}/`, { tls: { ca } }).then(
      (r) => r.status,
      (error: { code?: string }) => error.code ?? "refused",
    );
    expect(plain).not.toBe(200);
  } finally {
    server.stop(true);
  }
});
