// The SecureProxy: fetches a client's API token from the KeyServer and calls the API with it, never showing it.
// It knows who calls it (the peer certificate's SPIFFE ID), and the policy decides which ClientId and TokenType
// that caller may use (#11 H1).
import { basename, dirname, resolve } from "node:path";
import { parseSpiffeId } from "../shared/authz/index.ts";
import { displayPath, parseFlags, parsePort, parsePositive, pkiDir, policyPath, readPkiFile } from "../shared/platform/config.ts";
import { ConfigError } from "../shared/platform/errors.ts";
import { apiTrust, certificateBundle, ProxyHops, type ApiTrustConfig } from "../shared/token-path/proxy-hops.ts";
import { createProxyApp, parseAllowlist, type Allowlist } from "../shared/token-path/secureproxy-app.ts";
import { runRole, type ServingConfig } from "../shared/service/run-role.ts";
import { parseKeyservers, typedEntries } from "../shared/token-path/proxy-flags.ts";

export { apiTrust, defaultApiIdentity, KEYSERVER_IDENTITY, ProxyHops } from "../shared/token-path/proxy-hops.ts";
export { parseKeyservers } from "../shared/token-path/proxy-flags.ts";
export { checkApiUri, createProxyApp, KeyServerIdentityRefused, parseAllowlist, type Allowlist, type ProxyDeps } from "../shared/token-path/secureproxy-app.ts";

const USAGE = `
Usage: roles/secureproxy.ts [PORT] [options]

POST /request_api {"ClientId", "TokenType", "ApiUri"}: gets that client's token from the KeyServer (a fresh
session key per request), calls ApiUri with "Authorization: Bearer <token>", and returns the API's answer.
Callers authenticate with mutual TLS, and the policy must grant the caller proxy.use:CLIENTID/TOKENTYPE. ApiUri
must be https and on the allowlist for its token type. Every outbound hop pins whom it may reach, checked at each
handshake: the KeyServer a KeyServer identity (spiffe://securemesh/keyserver/*); each token type's API, under the
mesh's CA, one identity (--api-identity), or, under a CA that is not the mesh's (--api-ca), that CA and the host.

Options:
  --keyserver URL[,URL]  KeyServers, tried in this order (default https://127.0.0.1:5003); after a failure
                         (a connection that fails, a 5xx) the next one gets a new request, never the same body, and
                         one that failed is tried last for 5 s
  --allow TYPE=HOSTS     allowed host:port list per token type, repeatable
                         (default marketplace=localhost:5005,127.0.0.1:5005)
  --api-identity TYPE=ID the identity the API of TYPE must present when its CA is the mesh's, repeatable
                         (default spiffe://securemesh/marketplace/TYPE: no other mesh certificate is an API)
  --api-ca [TYPE=]FILE   a CA bundle that is not the mesh's for the API of TYPE (without TYPE=, of every type);
                         its calls then check that CA and the host name, as a web client does
  --format jose|legacy   wire format to the KeyServer (default jose)
  --timeout MS           KeyServer and API timeout (default 5000)
  --policy FILE          authorization policy (default $SECUREMESH_POLICY, else roles/policy.json)
  --host HOST            address to bind (default 127.0.0.1)
  --pki DIR              PKI folder from pki.sh (default $PKI_DIR, else certs/)
  --no-crl               run without revocation: crl.pem is not read, no certificate is refused as revoked
                         (a warning at start says so); without it, no valid crl.pem stops the role
  -h, --help             show this help
`;

export interface ProxyConfig extends ServingConfig, ApiTrustConfig {
  keyservers: string[];
  allow: Allowlist;
  format: "jose" | "legacy";
  timeoutMs: number;
}

export function parseProxyConfig(argv: string[]): ProxyConfig {
  const { values, positionals } = parseFlags(
    "secureproxy",
    USAGE,
    {
      keyserver: { type: "string" },
      allow: { type: "string", multiple: true },
      format: { type: "string" },
      "api-ca": { type: "string", multiple: true },
      "api-identity": { type: "string", multiple: true },
      timeout: { type: "string" },
      host: { type: "string" },
      pki: { type: "string" },
      policy: { type: "string" },
      "no-crl": { type: "boolean" },
    },
    argv,
  );
  const format = values.format ?? "jose";
  if (format !== "jose" && format !== "legacy") throw new ConfigError("--format must be jose or legacy");
  const apiIdentities = typedEntries("--api-identity", values["api-identity"] ?? []);
  for (const [type, id] of apiIdentities) {
    if (!parseSpiffeId(id)) throw new ConfigError(`--api-identity ${type}=${id}: not a SPIFFE ID such as spiffe://securemesh/marketplace/${type}`);
  }
  const apiCas = new Map(
    [...typedEntries("--api-ca", values["api-ca"] ?? [], "*")].map(
      ([type, file]) => [type, certificateBundle(readPkiFile(dirname(resolve(file)), basename(file)), `--api-ca ${file}`)] as const,
    ),
  );
  return {
    port: parsePort(positionals[0] ?? process.env.PORT, "PORT", 5004),
    host: values.host ?? "127.0.0.1",
    keyservers: parseKeyservers(values.keyserver ?? "https://127.0.0.1:5003"),
    allow: parseAllowlist(values.allow?.length ? values.allow : ["marketplace=localhost:5005,127.0.0.1:5005"]),
    format,
    apiIdentities,
    apiCas,
    timeoutMs: parsePositive(values.timeout, "--timeout", 5000),
    pki: pkiDir(values.pki),
    noCrl: values["no-crl"] ?? false,
    policy: policyPath(values.policy),
  };
}

if (import.meta.main) {
  await runRole({
    name: "secureproxy",
    parse: parseProxyConfig,
    start({ config, logger, metrics, trust, authz, limiter }) {
      const hops = new ProxyHops(
        trust.identity,
        (type) => apiTrust(type, trust.identity.ca, config),
        (serial) => trust.isRevoked(serial),
      );
      const { keyservers, allow, format, timeoutMs } = config;
      return {
        app: createProxyApp({
          keyservers,
          allow,
          format,
          timeoutMs,
          logger,
          metrics,
          hops,
          authz,
          limiter,
        }),
        describe: `keyserver${keyservers.length > 1 ? "s" : ""} ${keyservers.join(", ")}, format ${format}, policy ${displayPath(config.policy)}`,
        // Revocation is asked per connection and per request; a renewed certificate or CA reaches both hops.
        onCertificate: (identity) => hops.reload(identity),
        close: () => hops.close(),
      };
    },
  });
}
