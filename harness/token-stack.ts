// Starts the token path as real processes: KeyServer (seeded by its own admin CLI), marketplace, SecureProxy.
import { randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { expectThat, type Cluster } from "./cluster.ts";

export interface TokenStack {
  keyserver: string;
  secureproxy: string;
  marketplace: string;
  /** The seeded token; only tests look at it, to prove it appears nowhere it should not. */
  token: string;
  dataDir: string;
  /** POST /request_api on the proxy as `caller` (the name of a certificate in the PKI; the policy decides). */
  requestApi(body: Record<string, string>, caller?: string): Promise<{ status: number; body: Record<string, unknown> }>;
}

export interface TokenStackPorts {
  keyserver: number;
  secureproxy: number;
  marketplace: number;
}

export interface TokenStackOptions {
  /** Extra flags for the KeyServer, e.g. ["--legacy-replay", "allow"]. */
  keyserverArgs?: string[];
  /** Extra flags for the SecureProxy, e.g. ["--format", "legacy"]. */
  proxyArgs?: string[];
}

export async function startTokenStack(cluster: Cluster, ports: TokenStackPorts, tokenDb: string, options: TokenStackOptions = {}): Promise<TokenStack> {
  const secrets = mkdtempSync(join(tmpdir(), "securemesh-tokens-"));
  const dataDir = join(secrets, "keyserver");
  const token = `mkt_${randomBytes(18).toString("base64url")}`;
  const tokenFile = join(secrets, "marketplace_token");
  writeFileSync(tokenFile, token, { mode: 0o600 });

  const seeded = await cluster.run("keyserver-admin", "keyserver", ["token", "add", "--client", "client1", "--type", "marketplace", "--token", "-", "--data", dataDir, "--db", tokenDb], { stdin: token });
  expectThat(seeded.exitCode === 0, `token add failed:\n${seeded.lines.join("\n")}`);

  const [keyserver, marketplace] = await Promise.all([
    cluster.startRole("keyserver", "keyserver", [String(ports.keyserver), "--data", dataDir, "--db", tokenDb, ...(options.keyserverArgs ?? [])]),
    cluster.startRole("marketplace", "marketplace", [String(ports.marketplace), "--token-file", tokenFile]),
  ]);
  const marketPort = new URL(marketplace).port;
  const secureproxy = await cluster.startRole("secureproxy", "secureproxy", [
    String(ports.secureproxy), "--keyserver", keyserver, "--allow", `marketplace=localhost:${marketPort},127.0.0.1:${marketPort}`, ...(options.proxyArgs ?? []),
  ]);

  return {
    keyserver, secureproxy, marketplace, token, dataDir,
    async requestApi(body, caller = "client1") {
      const response = await fetch(`${secureproxy}/request_api`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
        tls: mutualTlsClientOptions(loadIdentity(cluster.pki, caller)),
        signal: AbortSignal.timeout(10_000),
      });
      return { status: response.status, body: (await response.json()) as Record<string, unknown> };
    },
  };
}
