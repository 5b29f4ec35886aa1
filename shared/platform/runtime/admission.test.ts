// Admission's own verdicts on certificates the TLS stack authorized: what BoringSSL (Bun) lets through must still
// be a client's certificate.
import { expect, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type tls from "node:tls";
import { tlsPeerIdentity } from "../../authz/index.ts";
import { issueCaCertificateAsClient, newPki } from "../../testing/pki.ts";
import { Admission } from "./admission.ts";

/** A peer certificate as a listener hands it to Admission: its DER, serial and SANs. */
function peerCertificate(pem: string): tls.PeerCertificate {
  const cert = new X509Certificate(pem);
  return { raw: cert.raw, serialNumber: cert.serialNumber, subjectaltname: cert.subjectAltName, subject: { CN: "x" } } as unknown as tls.PeerCertificate;
}

// Found by attack: a certificate of our CA with basicConstraints CA:TRUE and clientAuth (a sub-CA) was admitted as a
// client on Bun, whose BoringSSL authorizes it as a leaf; rustls (Deno) refuses it. A CA certificate is never a
// client's, whatever it names.
test("a CA certificate our CA signed is refused as a client, though the TLS stack authorized it", async () => {
  const dir = await newPki("admission-ca-leaf");
  await issueCaCertificateAsClient(dir, "subca");
  const refusals: string[] = [];
  const ca = readFileSync(join(dir, "ca_cert.pem"), "utf8");
  const admission = new Admission({ mutual: true, ca, identify: tlsPeerIdentity, isRevoked: () => false, onRefused: (r) => refusals.push(r.reason) });
  const admit = (name: string) => {
    const decision = admission.admit("127.0.0.1", true, peerCertificate(readFileSync(join(dir, `${name}_cert.pem`), "utf8")));
    return "peer" in decision ? `admitted ${decision.peer.identity}` : `refused ${decision.refusal.reason}`;
  };
  expect({ client1: admit("client1"), subca: admit("subca"), caItself: admit("ca") }).toEqual({
    client1: "admitted spiffe://securemesh/client/client1",
    subca: "refused untrusted",
    caItself: "refused untrusted",
  });
  // Refused by the stack too, a CA certificate is not "one of our serving certificates" to be told ERR_CLIENT_CERT.
  const unauthorized = admission.admit("127.0.0.1", false, peerCertificate(readFileSync(join(dir, "ca_cert.pem"), "utf8")));
  expect("refusal" in unauthorized && unauthorized.refusal.reason).toBe("untrusted");
});
