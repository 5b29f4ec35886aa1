// The one place TLS is configured: mutual-TLS server options, client options for fetch, and the environment guard.
import { X509Certificate, createPrivateKey } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "./errors.ts";
import { readPkiFile, readPrivatePkiFile } from "./config.ts";
import { assertSafeEnvironment, type Environment } from "./env-guard.ts";

/** The extendedKeyUsage a certificate needs to act as a client. */
export const CLIENT_AUTH_OID = "1.3.6.1.5.5.7.3.2";
/** The extendedKeyUsage of a certificate that serves. */
export const SERVER_AUTH_OID = "1.3.6.1.5.5.7.3.1";

export interface Identity {
  name: string;
  cert: string;
  key: string;
  ca: string;
  /**
   * The CA's revocation list (PEM) for the TLS stack: from TrustMaterial, the CRL it checked and keeps in force;
   * from loadIdentity, crl.pem as it is on disk, unchecked. Absent: nothing is revoked.
   */
  crl?: string;
}

/**
 * loadKeyMaterial, plus crl.pem as it is on disk when there is one, unchecked: for tools and tests that use a PKI
 * directly. A role goes through TrustMaterial (shared/authz/trust.ts), which requires a valid, current CRL and never
 * lets a missing or older one turn revocation off (#18 M2).
 */
export function loadIdentity(dir: string, name: string): Identity {
  const identity = loadKeyMaterial(dir, name);
  return existsSync(join(dir, "crl.pem")) ? { ...identity, crl: readPkiFile(dir, "crl.pem") } : identity;
}

/** Loads `<name>_cert.pem`, `<name>_key.pem` and the CA from the PKI, checking that the key fits the certificate. */
export function loadKeyMaterial(dir: string, name: string): Identity {
  const cert = readPkiFile(dir, `${name}_cert.pem`);
  const key = readPrivatePkiFile(dir, `${name}_key.pem`);
  const ca = readPkiFile(dir, "ca_cert.pem");
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert);
  } catch {
    throw new ConfigError(`${dir}/${name}_cert.pem is not a PEM certificate`);
  }
  try {
    if (!x509.checkPrivateKey(createPrivateKey(key))) throw new Error("mismatch");
  } catch {
    throw new ConfigError(`${dir}/${name}_key.pem does not match ${name}_cert.pem or is not a PEM private key`);
  }
  return { name, cert, key, ca };
}

/**
 * Refuses to run where the environment would write secrets out or weaken TLS (NODE_TLS_REJECT_UNAUTHORIZED=0,
 * SSLKEYLOGFILE, BUN_CONFIG_VERBOSE_FETCH, debugger switches…): the table is in env-guard.ts. Every role calls it
 * first; it throws ConfigError, which the role prints as one line before exiting with status 2.
 */
export function assertSafeTlsEnvironment(env: Environment = process.env): void {
  assertSafeEnvironment(env);
}

/**
 * A mutual-TLS listener's TLS: only clients with a valid certificate from our CA complete the handshake. The CRL is
 * not among them: the listeners ask the role's live CRL themselves at every handshake and on every request
 * (shared/platform/runtime/admission.ts), where a TLS stack given a CRL past its nextUpdate (Bun's) refuses every
 * client, and Deno's ignores it.
 */
export function mutualTlsServerOptions(identity: Identity) {
  return {
    cert: identity.cert,
    key: identity.key,
    ca: identity.ca,
    requestCert: true,
    rejectUnauthorized: true,
  } as const;
}

/** Options for an outbound hop: present our certificate and trust only our CA. */
export function mutualTlsClientOptions(identity: Identity) {
  return {
    cert: identity.cert,
    key: identity.key,
    ca: identity.ca,
    rejectUnauthorized: true,
  } as const;
}

/** The identity a certificate names: its subject CN. */
export function certificateName(x509: X509Certificate): string {
  const match = /(?:^|\n)CN=([^\n]+)/.exec(x509.subject);
  return match?.[1] ?? "";
}
