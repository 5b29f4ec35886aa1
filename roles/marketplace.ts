// A stand-in for the external marketplace API: HTTPS, and a fixed item for the one right Bearer token.
import { timingSafeEqual, createHash } from "node:crypto";
import { exitWithConfigError, parseFlags, parsePort, pkiDir, exitOnSignals } from "../shared/platform/config.ts";
import { ConfigError, MeshError } from "../shared/platform/errors.ts";
import { createApp, listenReloadable } from "../shared/platform/http.ts";
import { createLogger, type Logger } from "../shared/ops/log.ts";
import { readPrivateFile } from "../shared/platform/private-files.ts";
import { assertSafeTlsEnvironment, loadIdentity } from "../shared/platform/tls.ts";

const USAGE = `
Usage: roles/marketplace.ts [PORT] --token-file FILE [options]

An external API stand-in over HTTPS (server certificate 'marketplace'; no client certificate needed, as for
a public API). GET /api/item answers 401 without the right Bearer token, and the fixed item with it.

Options:
  --token-file FILE   file holding the one accepted token (default $MARKETPLACE_TOKEN_FILE)
  --host HOST         address to bind (default 127.0.0.1)
  --pki DIR           PKI folder from pki.sh (default $PKI_DIR, else certs/)
  -h, --help          show this help
`;

export const ITEM = { item: { id: 1, name: "Test item", price: 10.0, currency: "EUR" } };

/** Compares SHA-256 digests in constant time, so neither content nor length leaks through timing. */
export function bearerMatches(header: string | null, expected: string): boolean {
  const match = /^Bearer (.+)$/.exec(header ?? "");
  if (!match) return false;
  const digest = (s: string) => createHash("sha256").update(s).digest();
  return timingSafeEqual(digest(match[1]!), digest(expected));
}

export function createMarketplaceApp({ token, logger }: { token: string; logger: Logger }) {
  // The stand-in external API: its callers hold a bearer token, not one of our certificates, and its metrics name
  // no caller, so /metrics is open here as on a third party's server.
  return createApp({ logger, metricsRoute: () => {} })
    .get("/health", () => ({ status: "ok", role: "marketplace" }))
    .get("/api/item", ({ request, set }) => {
      if (!bearerMatches(request.headers.get("authorization"), token)) {
        set.headers["www-authenticate"] = 'Bearer realm="marketplace"';
        throw new MeshError("ERR_UNAUTHORIZED", 401, "missing or invalid bearer token");
      }
      return ITEM;
    });
}

async function main(): Promise<void> {
  const logger = createLogger("marketplace");
  let app: ReturnType<typeof createMarketplaceApp>;
  let port: number;
  let host: string;
  let identity: ReturnType<typeof loadIdentity>;
  try {
    assertSafeTlsEnvironment();
    const { values, positionals } = parseFlags("marketplace", USAGE, { "token-file": { type: "string" }, host: { type: "string" }, pki: { type: "string" } });
    const tokenFile = values["token-file"] ?? process.env.MARKETPLACE_TOKEN_FILE;
    if (!tokenFile) throw new ConfigError("--token-file is required (the token the API accepts)");
    let token: string;
    try {
      // A secret like a private key: refused when group or others can read it.
      token = readPrivateFile(tokenFile).trim();
    } catch (error) {
      if (error instanceof ConfigError) throw error;
      throw new ConfigError(`cannot read --token-file ${tokenFile}`);
    }
    if (!token) throw new ConfigError(`--token-file ${tokenFile} is empty`);
    identity = loadIdentity(pkiDir(values.pki), "marketplace");
    host = values.host ?? "127.0.0.1";
    port = parsePort(positionals[0] ?? process.env.PORT, "PORT", 5005);
    app = createMarketplaceApp({ token, logger });
  } catch (error) {
    exitWithConfigError("marketplace", error);
  }
  // Server TLS only: a public API asks for no client certificate.
  const listener = await listenReloadable(app, { port, hostname: host, tls: { cert: identity.cert, key: identity.key } }).catch((error) =>
    exitWithConfigError("marketplace", error),
  );
  logger.info(`marketplace listening on https://${host}:${listener.port}`);
  exitOnSignals(() => listener.stop());
}

if (import.meta.main) await main();
