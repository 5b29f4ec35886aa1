// The SecureProxy's outbound hops, each pinned to whom it may reach (issue 18): the KeyServer by identity and CRL, and
// each token type's API by one identity under the mesh's CA, or by a CA that is not the mesh's and the host name.
import { X509Certificate } from "node:crypto";
import { expectPeer } from "../authz/index.ts";
import { ConfigError } from "../platform/errors.ts";
import { HttpsClient } from "../platform/https-client.ts";
import { certificateBlocks } from "../platform/pem.ts";
import { hostnameRefusal } from "../platform/runtime/hostname-check.ts";
import { mutualTlsClientOptions, type Identity } from "../platform/tls.ts";

/** What the API hops need of the proxy's configuration. */
export interface ApiTrustConfig {
  /** Per token type: the identity its API must present under the mesh's CA. */
  apiIdentities: ReadonlyMap<string, string>;
  /** Per token type ("*": every type without its own), a CA bundle of its API's own. */
  apiCas: ReadonlyMap<string, string>;
}

/** Whom the KeyServer hop must reach. */
export const KEYSERVER_IDENTITY = "spiffe://securemesh/keyserver/*";

/** The identity the API of `tokenType` must present under the mesh's CA, unless --api-identity names another. */
export const defaultApiIdentity = (tokenType: string) => `spiffe://securemesh/marketplace/${tokenType}`;

/**
 * An --api-ca bundle as TLS will read it, or a ConfigError: only `CERTIFICATE` blocks. The TLS stacks also take
 * `X509 CERTIFICATE` and other labels, which holdsCa would not recognise as the mesh's CA, and the API identity pin
 * would be dropped (issue 18 attacker, F4); so any other block refuses the bundle.
 */
export function certificateBundle(text: string, where: string): string {
  const labels = [...text.matchAll(/-----BEGIN ([^-\r\n]*)-----/g)].map((m) => m[1]!);
  const other = labels.find((label) => label !== "CERTIFICATE");
  if (other !== undefined) throw new ConfigError(`${where}: a PEM block labelled '${other.slice(0, 40)}': only CERTIFICATE blocks are accepted`);
  if (labels.length === 0) throw new ConfigError(`${where}: no CERTIFICATE block`);
  return text;
}

/** Whether a PEM bundle holds the mesh's CA certificate: then it is the mesh's trust, and an identity is pinned. */
function holdsCa(bundle: string, caPem: string): boolean {
  const ca = new X509Certificate(caPem).raw;
  return certificateBlocks(bundle).some((pem) => {
    try {
      return new X509Certificate(pem).raw.equals(ca);
    } catch {
      return false;
    }
  });
}

/** How the API of one token type is trusted: its CA bundle and, under the mesh's CA, the one identity it must show. */
export interface ApiTrust {
  ca: string;
  /** null: a CA that is not the mesh's, checked as the web does (chain and host name). */
  identity: string | null;
}

/**
 * The default is safe: with nothing set, an API is trusted under the mesh's CA only as the one identity of its token
 * type (spiffe://securemesh/marketplace/TYPE), so no server, coordinator or KeyServer certificate that names the
 * API's host is handed a client's token (issue 18, M1: a server certificate on :5005 received it).
 */
export function apiTrust(tokenType: string, meshCa: string, config: ApiTrustConfig): ApiTrust {
  const bundle = config.apiCas.get(tokenType) ?? config.apiCas.get("*");
  if (bundle !== undefined && !holdsCa(bundle, meshCa)) return { ca: bundle, identity: null };
  return { ca: bundle ?? meshCa, identity: config.apiIdentities.get(tokenType) ?? defaultApiIdentity(tokenType) };
}

/**
 * The outbound hops, each an HttpsClient that checks whom every connection reached at its handshake and sets
 * `rejectUnauthorized: true` explicitly (#11 Hardening). The KeyServer is a mesh peer, pinned by identity and
 * checked against our CRL; each API by its token type's trust (apiTrust). Kept-alive connections serve later calls.
 */
export class ProxyHops {
  readonly keyserver: HttpsClient;
  readonly #apis = new Map<string, HttpsClient>();
  readonly #trust: (tokenType: string) => ApiTrust;
  readonly #isRevoked: (serialHex: string) => boolean;

  constructor(identity: Identity, trust: (tokenType: string) => ApiTrust, isRevoked: (serialHex: string) => boolean = () => false) {
    this.#trust = trust;
    this.#isRevoked = isRevoked;
    this.keyserver = new HttpsClient({ tls: this.#keyserverTls(identity), isRevoked });
  }

  #keyserverTls(identity: Identity) {
    return {
      ...mutualTlsClientOptions(identity),
      rejectUnauthorized: true,
      checkServerIdentity: expectPeer(KEYSERVER_IDENTITY, { isRevoked: this.#isRevoked }),
    } as const;
  }

  /** The client for `tokenType`'s API, made at its first call. */
  api(tokenType: string): HttpsClient {
    let client = this.#apis.get(tokenType);
    if (!client) {
      const { ca, identity } = this.#trust(tokenType);
      const check = identity === null ? hostnameRefusal : expectPeer(identity, { isRevoked: this.#isRevoked });
      client = new HttpsClient({
        tls: { ca, rejectUnauthorized: true, checkServerIdentity: check },
        ...(identity === null ? {} : { isRevoked: this.#isRevoked }),
      });
      this.#apis.set(tokenType, client);
    }
    return client;
  }

  /** A renewed certificate or CA: new connections use it; the API clients are made again at their next call. */
  reload(identity: Identity): void {
    this.keyserver.setTls(this.#keyserverTls(identity));
    for (const client of this.#apis.values()) client.close();
    this.#apis.clear();
  }

  close(): void {
    this.keyserver.close();
    for (const client of this.#apis.values()) client.close();
  }
}
