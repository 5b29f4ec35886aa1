// Host-name checks under test (#14): a certificate issued for one loopback address, served on another. All of
// 127.0.0.0/8 is loopback here, so two addresses stand for two hosts without any network setup.
import { expectPeer } from "../authz/expect-peer.ts";
import { HttpsClient } from "../platform/https-client.ts";
import type { ClientTls } from "../platform/runtime/index.ts";

/** The address the test certificates name (`--san IP:127.0.0.2`). */
export const SAN_HOST = "127.0.0.2";
/** Another loopback address, which the test certificates do not name. */
export const OTHER_HOST = "127.0.0.3";

/** How an outbound call ended: "200" (any status), or the error's code. */
export async function outcomeOf(call: Promise<{ status: number }>): Promise<string> {
  try {
    const response = await call;
    return String(response.status);
  } catch (error) {
    return String((error as { code?: unknown }).code ?? (error as Error).name);
  }
}

/**
 * The roles' outbound client (HttpsClient) to a listener on SAN_HOST and on OTHER_HOST, each serving a server
 * certificate for SAN_HOST only: with no identity check, with expectPeer, and with an identity check that forgets the
 * host (the client must check it anyway). Both runtimes must give `expectedHostChecks`.
 */
export async function outboundHostChecks(client: ClientTls, ports: { sanHost: number; otherHost: number }): Promise<Record<string, string>> {
  const checks = {
    plain: undefined,
    expectPeer: expectPeer("spiffe://securemesh/server/*"),
    "a check that forgets the host": () => undefined,
  };
  const outcomes: Record<string, string> = {};
  for (const [host, port] of [
    [SAN_HOST, ports.sanHost],
    [OTHER_HOST, ports.otherHost],
  ] as const) {
    for (const [name, check] of Object.entries(checks)) {
      const http = new HttpsClient({ tls: check ? { ...client, checkServerIdentity: check } : client });
      outcomes[`${host} ${name}`] = await outcomeOf(http.request(`https://${host}:${port}/who`, { timeoutMs: 10_000 }));
      http.close();
    }
  }
  return outcomes;
}

export const expectedHostChecks = {
  [`${SAN_HOST} plain`]: "200",
  [`${SAN_HOST} expectPeer`]: "200",
  [`${SAN_HOST} a check that forgets the host`]: "200",
  [`${OTHER_HOST} plain`]: "ERR_TLS_HOSTNAME",
  [`${OTHER_HOST} expectPeer`]: "ERR_TLS_HOSTNAME",
  [`${OTHER_HOST} a check that forgets the host`]: "ERR_TLS_HOSTNAME",
};
