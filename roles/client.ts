// A securemesh client: sends Fernet-encrypted messages with a sender proof to the coordinator over mutual TLS.
import { parseCrl } from "../shared/authz/crl.ts";
import { isIdentityPattern } from "../shared/authz/identity.ts";
import { exitWithConfigError, parseFlags, parsePositive, pkiDir } from "../shared/platform/config.ts";
import { ConfigError } from "../shared/platform/errors.ts";
import { FernetKeys } from "../shared/request-path/fernet-reload.ts";
import { createLogger, describeError, printable } from "../shared/ops/log.ts";
import { COORDINATOR_IDENTITY, describeSnapshot, MeshClient } from "../shared/request-path/mesh-client.ts";
import { assertSafeTlsEnvironment, loadIdentity } from "../shared/platform/tls.ts";

const USAGE = `
Usage: roles/client.ts [options]

Encrypts each message with Fernet, signs a sender proof with the client's certificate key,
and sends it over mutual TLS to the coordinator. Exits 1 if any message fails.

Options:
  --name NAME          client identity; uses certs/NAME_cert.pem and NAME_key.pem (default client1)
  --message TEXT       message to send (default "Hello from NAME")
  --count N            send the message N times (default 1)
  --no-cache-check     do not read the servers' cached data before sending
  --coordinator URL    coordinator URL; repeat it for failover (default https://127.0.0.1:8000)
  --expect-coordinator ID
                       identity a coordinator must present (default spiffe://securemesh/coordinator/*);
                       a connection to anything else is closed before a byte is sent
  --timeout MS         per-request timeout (default 5000)
  --pki DIR            PKI folder from pki.sh (default $PKI_DIR, else certs/); its encryption_key.txt
                       (or $FERNET_KEY) holds the Fernet keys, reloaded within a second of a change
  -h, --help           show this help
`;

export interface ClientConfig {
  name: string;
  message: string;
  count: number;
  coordinators: string[];
  expectCoordinator: string;
  timeoutMs: number;
  pki: string;
  cacheCheck: boolean;
}

export function parseClientConfig(argv: string[]): ClientConfig {
  const { values } = parseFlags(
    "client",
    USAGE,
    {
      name: { type: "string" },
      message: { type: "string" },
      count: { type: "string" },
      coordinator: { type: "string", multiple: true },
      "expect-coordinator": { type: "string" },
      timeout: { type: "string" },
      pki: { type: "string" },
      "no-cache-check": { type: "boolean" },
    },
    argv,
  );
  const name = values.name ?? "client1";
  if (!/^[A-Za-z0-9_-]+$/.test(name)) throw new ConfigError(`--name: '${name}' may hold letters, digits, - and _ only`);
  const count = parsePositive(values.count, "--count", 1);
  const expectCoordinator = values["expect-coordinator"] ?? COORDINATOR_IDENTITY;
  if (!isIdentityPattern(expectCoordinator)) {
    throw new ConfigError(`--expect-coordinator: '${expectCoordinator}' is not a SPIFFE ID such as ${COORDINATOR_IDENTITY}`);
  }
  if (!Number.isInteger(count)) throw new ConfigError("--count must be a whole number");
  return {
    name,
    message: values.message ?? `Hello from ${name}`,
    count,
    coordinators: values.coordinator?.length ? values.coordinator : ["https://127.0.0.1:8000"],
    expectCoordinator,
    timeoutMs: parsePositive(values.timeout, "--timeout", 5000),
    pki: pkiDir(values.pki),
    cacheCheck: !values["no-cache-check"],
  };
}

/** The lab's variant 6: look at the servers' cached view before sending. A failed check does not stop the send. */
async function checkCache(client: MeshClient, name: string): Promise<void> {
  try {
    const answer = await client.readCachedData();
    // The host too, as the coordinator names it: every server host may listen on the same port (issue 23).
    const server = answer.via ? printable(answer.via) : String(answer.server);
    if (answer.cached) {
      console.log(`[${name}] Cache hit (server ${server}, age ${(answer.ageMs / 1000).toFixed(1)} s): ${describeSnapshot(answer.snapshot)}`);
    } else {
      console.log(`[${name}] Cache miss (server ${server} read through get_data()): ${describeSnapshot(answer.snapshot)}`);
    }
  } catch (error) {
    console.log(`[${name}] Cache check failed: ${describeError(error)}`);
  }
}

async function main(): Promise<void> {
  let config: ClientConfig;
  let client: MeshClient;
  try {
    assertSafeTlsEnvironment();
    config = parseClientConfig(process.argv.slice(2));
    const identity = loadIdentity(config.pki, config.name);
    // The coordinator's certificate is checked against our CA's CRL too, at every handshake.
    const crl = identity.crl ? parseCrl(identity.crl, identity.ca) : null;
    client = new MeshClient({
      identity,
      // The key file as it is now, followed while the messages go out: a long --count takes up a rotation step.
      fernet: FernetKeys.open(config.pki).watch(createLogger("client")),
      coordinators: config.coordinators,
      expect: config.expectCoordinator,
      isRevoked: (serial) => crl?.isRevoked(serial) ?? false,
      timeoutMs: config.timeoutMs,
    });
  } catch (error) {
    exitWithConfigError("client", error);
  }
  let failed = 0;
  for (let i = 0; i < config.count; i++) {
    if (config.cacheCheck) await checkCache(client, config.name);
    try {
      const { status, body, trace, server } = await client.sendData(config.message);
      // The trace id names this request in every hop's log (coordinator, server, and its store line).
      if (status === 200) {
        console.log(`[${config.name}] Success: ${JSON.stringify({ ...body, ...(server ? { via: server } : {}), trace })}`);
      } else {
        failed += 1;
        // The error text comes from the other side: printed through printable() so it cannot drive this terminal.
        const where = server ? `server ${printable(server)}, ` : "";
        console.log(
          `[${config.name}] Error ${status}: ${printable(String((body as { error?: unknown }).error ?? JSON.stringify(body)))} (${where}trace=${trace})`,
        );
      }
    } catch (error) {
      failed += 1;
      console.log(`[${config.name}] Error: ${describeError(error)}`);
    }
  }
  process.exit(failed === 0 ? 0 : 1);
}

if (import.meta.main) await main();
